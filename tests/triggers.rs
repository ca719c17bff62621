//! Sync points that happen without `ferry sync` waiting for them: the RPO interval, fsync,
//! `--no-wait`, and the coalescing that keeps them from piling up.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{FERRY, Pair, run};

fn wait_identical(p: &Pair, name: &str, within: Duration) {
    let t = Instant::now();
    loop {
        let a = fs::read(p.primary.backing(name)).unwrap();
        if fs::read(p.replica_path(name)).is_ok_and(|b| b == a) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "{name} not replicated within {within:?}\n{}",
            p.primary.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn generation(p: &Pair) -> u64 {
    p.primary.status()["sync"]["generation"].as_u64().unwrap()
}

#[test]
fn the_sync_interval_replicates_without_being_asked() {
    let p = Pair::with(&[], "[primary]\nsync_interval = \"1s\"\n");
    fs::write(p.primary.path("a.img"), vec![7u8; 300_000]).unwrap();
    wait_identical(&p, "a.img", Duration::from_secs(20));
    let f = OpenOptions::new()
        .write(true)
        .open(p.primary.path("a.img"))
        .unwrap();
    f.write_all_at(b"changed", 1000).unwrap();
    drop(f);
    wait_identical(&p, "a.img", Duration::from_secs(20));
}

#[test]
fn fsync_triggers_coalesced_sync_points() {
    let p = Pair::with(&[], "[primary]\nsync_on_fsync = true\n");
    let f = File::create(p.primary.path("db.img")).unwrap();
    let g0 = generation(&p);
    // A burst of fsyncs: at most one sync runs and one more is merged behind it.
    for i in 0..40u64 {
        f.write_all_at(&[i as u8; 4096], i * 4096).unwrap();
        f.sync_data().unwrap();
    }
    drop(f);
    wait_identical(&p, "db.img", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let cut = generation(&p) - g0;
    assert!(cut >= 1, "fsync made no sync point");
    assert!(
        cut < 40,
        "{cut} sync points for 40 fsyncs: they were not merged"
    );
}

#[test]
fn no_wait_returns_at_once_and_the_sync_follows() {
    let p = Pair::new();
    fs::write(p.primary.path("x.img"), vec![3u8; 1 << 20]).unwrap();
    let out = run(Command::new(FERRY)
        .args(["sync", "--no-wait", "--json"])
        .arg(&p.primary.mnt));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["queued"], true);
    wait_identical(&p, "x.img", Duration::from_secs(20));
}
