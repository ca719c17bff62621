//! `ferry status` tells the truth about the replicas: it answers while a sync runs (and shows
//! it), it says which replica is behind, by how much and why, and the cause of a failed sync
//! reaches the person who ran `ferry sync`.

mod common;

use std::fs;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{FERRY, Pair, random, run};
use serde_json::Value;

fn status_text(p: &Pair) -> String {
    let out = run(Command::new(FERRY).arg("status").arg(&p.primary.mnt));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn replica(s: &Value) -> &Value {
    &s["sync"]["replicas"][0]
}

#[test]
fn status_answers_during_a_sync_and_shows_its_progress() {
    common::require_root();
    let p = Arc::new(Pair::with(
        &[],
        "[primary]\nbandwidth_limit = \"16MiB/s\"\n",
    ));
    fs::write(p.primary.path("big.img"), random(48 << 20, 1)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sync = {
        let (p, done) = (p.clone(), done.clone());
        std::thread::spawn(move || {
            let r = p.sync_ok();
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // Poll until status shows the shipment under way.
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    let seen = loop {
        let asked = Instant::now();
        let s = p.primary.status();
        slowest = slowest.max(asked.elapsed());
        let running = &s["sync"]["running"];
        if running["phase"] == "shipping" && running["bytes_done"].as_u64() > Some(0) {
            // Answered while the sync still runs: it was not waiting for it.
            assert!(!done.load(Ordering::SeqCst));
            break s;
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "the sync ended before status ever showed it running: {s}"
        );
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
    };
    // A figure for the record (not an assertion: the machine may be busy).
    eprintln!("slowest `ferry status` during the sync: {slowest:?}");
    let r = replica(&seen);
    assert_eq!(r["state"], "shipping", "{seen}");
    let (d, total) = (
        r["shipping"]["bytes_done"].as_u64().unwrap(),
        r["shipping"]["bytes_total"].as_u64().unwrap(),
    );
    assert!(d > 0 && d < total && total >= 48 << 20, "{seen}");
    assert_eq!(seen["sync"]["running"]["generation"], 1);
    let text = status_text(&p);
    assert!(text.contains("syncing generation 1: shipping"), "{text}");
    assert!(text.contains("shipping "), "{text}");

    let v = sync.join().unwrap();
    assert_eq!(v["committed"], 1);
    let s = p.primary.status();
    let r = replica(&s);
    assert_eq!(r["state"], "committed", "{s}");
    assert_eq!(r["generation"], 1);
    assert_eq!(r["root"], s["sync"]["root"]);
    assert_eq!(r["lag_bytes"], 0);
    assert_eq!(r["lag_generations"], 0);
    assert!(r["since_commit_s"].as_u64().is_some(), "{s}");
    assert!(s["sync"]["running"].is_null(), "{s}");
}

#[test]
fn a_replica_that_missed_a_generation_is_shown_behind_with_its_cause() {
    common::require_root();
    let mut p = Pair::new();
    fs::write(p.primary.path("a.img"), random(1 << 20, 2)).unwrap();
    p.sync_ok();
    p.replica.kill9();
    fs::write(p.primary.path("b.img"), random(3 << 20, 3)).unwrap();
    let (v, ok) = p.sync();
    assert!(!ok, "{v}");
    assert_eq!(v["replicas"][0]["cause"], "unreachable", "{v}");

    let s = p.primary.status();
    let r = replica(&s);
    assert_eq!(r["state"], "failing", "{s}");
    assert_eq!(r["cause"], "unreachable", "{s}");
    assert_eq!(r["generation"], 1);
    assert_eq!(s["sync"]["generation"], 2);
    assert_eq!(r["lag_generations"], 1);
    assert_eq!(r["lag_bytes"], 3 << 20, "{s}");
    // The image it lacks is named, with the bytes, although nothing is unsynced any more.
    assert_eq!(s["dirty_bytes"], 0);
    let img = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == "b.img")
        .unwrap_or_else(|| panic!("{s}"));
    assert_eq!(img["behind"]["site-b"], 3 << 20, "{s}");
    let text = status_text(&p);
    assert!(text.contains("held by 0 of 1 replicas"), "{text}");
    assert!(text.contains("failing for"), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    // The log has one line per sync point with its figures and each replica's outcome.
    let log = p.primary.log_text();
    assert!(
        log.lines().any(|l| l.contains("sync: generation 2 (")
            && l.contains("0 of 1 required committed")
            && l.contains("site-b failed (unreachable)")),
        "{log}"
    );

    // Back up: the next sync catches it up and status says so.
    p.replica.start();
    p.sync_ok();
    let s = p.primary.status();
    let r = replica(&s);
    assert_eq!(r["state"], "committed", "{s}");
    assert_eq!(r["lag_bytes"], 0);
    assert_eq!(r["generation"], s["sync"]["generation"]);
}

#[test]
fn status_after_a_restart_knows_each_replica_from_its_saved_state() {
    common::require_root();
    let mut p = Pair::new();
    fs::write(p.primary.path("a.img"), random(1 << 20, 4)).unwrap();
    p.sync_ok();
    p.replica.kill9();
    fs::write(p.primary.path("a.img"), random(2 << 20, 5)).unwrap();
    let (_, ok) = p.sync();
    assert!(!ok);
    p.primary.unmount();
    p.primary.mount();
    let s = p.primary.status();
    let r = replica(&s);
    assert_eq!(r["generation"], 1, "{s}");
    assert_eq!(r["state"], "behind", "{s}");
    assert_eq!(r["lag_generations"], 1);
    assert!(r["lag_bytes"].as_u64().unwrap() >= 1 << 20, "{s}");
    assert!(r["since_commit_s"].as_u64().is_some(), "{s}");
}

/// The recovery point: how old the newest write a replica is sure to hold may be. It is what an
/// operator would lose if the primary failed now, and it must not read as fine while a replica
/// falls behind, nor forget a replica's standing when the primary restarts.
#[test]
fn the_recovery_point_says_how_much_a_replica_would_lose_now() {
    common::require_root();
    let mut p = Pair::new();
    fs::write(p.primary.path("a.img"), random(1 << 20, 6)).unwrap();
    p.sync_ok();
    // Nothing written since the sync point: the replica holds every write.
    let s = p.primary.status();
    assert_eq!(replica(&s)["recovery_point_age_s"], 0.0, "{s}");
    assert!(status_text(&p).contains("current"));

    // Written after the point: the replica lacks what came since, and the age grows.
    fs::write(p.primary.path("a.img"), random(1 << 20, 7)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s = p.primary.status();
    let age = replica(&s)["recovery_point_age_s"].as_f64().unwrap();
    assert!((1.5..60.0).contains(&age), "{s}");
    assert!(status_text(&p).contains(" s ago"));

    // A failed sync point does not move it; nor does a restart of the primary.
    p.replica.kill9();
    let (_, ok) = p.sync();
    assert!(!ok);
    p.primary.unmount();
    p.primary.mount();
    let s = p.primary.status();
    let after = replica(&s)["recovery_point_age_s"].as_f64().unwrap();
    assert!(after >= age, "{after} < {age}: {s}");
    p.replica.start();
    p.sync_ok();
    let s = p.primary.status();
    assert_eq!(replica(&s)["recovery_point_age_s"], 0.0, "{s}");

    // A sync point of one image leaves the other's writes out: the point stays the last full one.
    fs::write(p.primary.path("a.img"), random(1 << 20, 10)).unwrap();
    fs::write(p.primary.path("b.img"), random(1 << 20, 11)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    run(Command::new(FERRY)
        .arg("sync")
        .arg(&p.primary.mnt)
        .arg("a.img"));
    let s = p.primary.status();
    assert_eq!(replica(&s)["state"], "committed", "{s}");
    let age = replica(&s)["recovery_point_age_s"].as_f64().unwrap();
    assert!(age >= 1.5, "{s}");
}

/// A replica that commits every sync point but whose syncs take longer than `sync_interval`
/// falls further behind with each one: status says so under its row, with the figures.
#[test]
fn status_says_when_syncs_take_longer_than_the_rpo_target() {
    common::require_root();
    let p = Pair::with(
        &[],
        "[primary]\nsync_interval = \"1s\"\nbandwidth_limit = \"2MiB/s\"\n",
    );
    fs::write(p.primary.path("a.img"), random(1 << 20, 8)).unwrap();
    let t = Instant::now();
    while !replica(&p.primary.status())["recovery_point_age_s"].is_number() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no sync point committed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Keeping up: nothing said.
    assert!(!status_text(&p).contains("sync_interval"));
    // 16 MiB at 2 MiB/s: one sync of about 8 s, while the sync points fall due every second.
    fs::write(p.primary.path("big.img"), random(16 << 20, 9)).unwrap();
    let t = Instant::now();
    let text = loop {
        let text = status_text(&p);
        if text.contains("more than twice sync_interval") {
            break text;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{text}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        text.contains("syncs take longer than the interval"),
        "{text}"
    );
    let s = p.primary.status();
    assert_eq!(s["sync"]["rpo_target_s"], 1.0, "{s}");
}

#[test]
fn status_without_a_mountpoint_lists_every_mount_and_replica_daemon() {
    common::require_root();
    let p = Pair::new();
    let out = run(Command::new(FERRY).args(["status", "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mnt = p.primary.mnt.to_str().unwrap();
    assert!(
        v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountpoint"] == mnt && m["sync"]["replicas"][0]["name"] == "site-b"),
        "{v}"
    );
    let config = p.replica.config.to_str().unwrap();
    assert!(
        v["replica_daemons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["config"] == config),
        "{v}"
    );
    let out = run(Command::new(FERRY).arg("status"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("on {mnt}")), "{text}");
    let store = format!("replica store {} (pid", p.replica.store.display());
    assert!(text.contains(&store), "{text}");
}

#[test]
fn status_watch_refreshes_until_interrupted() {
    common::require_root();
    let p = Pair::new();
    let mut child = Command::new(FERRY)
        .args(["status", "--watch", "0.2"])
        .arg(&p.primary.mnt)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.matches("every 0.2 s: ferry status").count() >= 2,
        "{text}"
    );
    assert!(text.contains("REPLICA"), "{text}");
}

#[test]
fn special_files_are_listed_as_not_replicated() {
    common::require_root();
    let p = Pair::new();
    fs::write(p.primary.path("a.img"), random(1 << 20, 8)).unwrap();
    let fifo = std::ffi::CString::new(p.primary.path("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(p.primary.path("sock")).unwrap();
    std::os::unix::fs::symlink("a.img", p.primary.path("link")).unwrap();
    p.sync_ok();
    let s = p.primary.status();
    let skipped: Vec<(String, String)> = s["sync"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap().into(),
                e["kind"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        skipped,
        [
            ("link".to_string(), "symbolic link".to_string()),
            ("pipe".into(), "named pipe".into()),
            ("sock".into(), "socket".into()),
        ],
        "{s}"
    );
    let text = status_text(&p);
    assert!(
        text.contains("not replicated (only regular files are images): link (symbolic link), pipe (named pipe), sock (socket)"),
        "{text}"
    );
    assert!(p.replica_path("a.img").exists() && !p.replica_path("pipe").exists());
}
