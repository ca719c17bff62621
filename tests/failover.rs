//! Automatic failover on a real etcd cluster (three members of Debian's etcd-server on
//! loopback): a primary mount A holding etcd's leader key, replica daemons B and C watching it,
//! all real processes over real QUIC. Kill A, cut A off, lose etcd members: never two
//! primaries, and a replica takes over within twice the ttl when A is gone.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::etcd::Cluster;
use common::{Mount, Replica};
use serde_json::Value;

const IMAGE: &str = "disk.img";
const TTL: Duration = Duration::from_secs(4);

fn append(config: &Path, toml: &str) {
    let c = std::fs::read_to_string(config).unwrap() + toml;
    std::fs::write(config, c).unwrap();
}

fn failover_toml(etcd: &[String], extra: &str) -> String {
    format!(
        "[failover]\netcd = {}\nttl = \"{}s\"\ncluster = \"vm-images\"\n{extra}",
        Cluster::toml_list(etcd),
        TTL.as_secs()
    )
}

/// Adds `fp` to the replica's `primaries` and names it `name`.
fn configure(r: &mut Replica, name: &str, fp: &str) {
    r.stop();
    let c = std::fs::read_to_string(&r.config).unwrap();
    let c = c
        .replacen("primaries = [", &format!("primaries = [\"{fp}\", "), 1)
        .replace("name = \"replica\"", &format!("name = \"{name}\""));
    std::fs::write(&r.config, c).unwrap();
}

fn peer(r: &Replica, name: &str) -> String {
    r.peer_toml()
        .replace("name = \"site-b\"", &format!("name = \"{name}\""))
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)?;
    f.sync_all()
}

fn failover_state(m: &Mount) -> Value {
    m.status()["sync"]["failover"].clone()
}

/// Waits until `f` holds, at most `within`; `detail` says what the failure looked like.
fn wait_for(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < within,
            "{what}: not within {within:?}\n{}",
            detail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// Site A (primary, holding the leader key), B and C (replicas that trust A and each other,
/// each able to promote itself on its `mnt`). `a_etcd` is the etcd A talks to.
struct Sites {
    a: Mount,
    b: Replica,
    c: Replica,
}

fn sites(etcd: &[String], a_etcd: &[String], a_extra: &str, a_peers: Option<(u16, u16)>) -> Sites {
    let a = Mount::prepare_with("", "[primary]\nreplicas = 2\nsync_timeout = \"10s\"\n");
    let fa = common::keygen(&a.dir.path().join("keys"));
    let mut b = Replica::new(&[&fa]);
    let mut c = Replica::new(&[&fa]);
    let (fb, fc) = (b.fingerprint.clone(), c.fingerprint.clone());
    configure(&mut b, "site-b", &fc);
    configure(&mut c, "site-c", &fb);
    // A's links to B and C: direct, or through the ports given (relays the test can cut).
    let (pb, pc) = a_peers.unwrap_or((b.port, c.port));
    let via = |r: &Replica, name: &str, port: u16| {
        peer(r, name).replace(&format!(":{}\"", r.port), &format!(":{port}\""))
    };
    append(
        &a.config,
        &(via(&b, "site-b", pb) + &via(&c, "site-c", pc) + &failover_toml(a_etcd, a_extra)),
    );
    for (r, other, name) in [(&b, &c, "site-c"), (&c, &b, "site-b")] {
        append(
            &r.config,
            &format!(
                "[primary]\nreplicas = 1\n{}{}",
                peer(other, name),
                failover_toml(etcd, &format!("mount = \"{}\"\n", r.mnt.display()))
            ),
        );
    }
    b.start();
    c.start();
    a.mount();
    Sites { a, b, c }
}

fn leading(a: &Mount) -> u64 {
    wait_for(
        "A leads",
        Duration::from_secs(15),
        || failover_state(a)["state"] == "leading",
        || a.log_text(),
    );
    failover_state(a)["epoch"].as_u64().unwrap()
}

#[test]
fn a_killed_primary_is_replaced_by_the_newest_replica_within_twice_the_ttl() {
    common::require_root();
    let etcd = Cluster::start();
    let urls = etcd.urls();
    let mut s = sites(&urls, &urls, "write_grace = \"2s\"\n", None);
    let epoch_a = leading(&s.a);
    assert!(epoch_a > 0, "{}", failover_state(&s.a));
    let leader: Value = serde_json::from_str(&etcd.get("ferry/vm-images/leader").unwrap()).unwrap();
    assert_eq!(leader["node"], "test", "{leader}");

    // Generation 1 reaches B and C, generation 2 only C (B is down for it).
    let mut image = ferry::testutil::random(4 << 20, 1);
    std::fs::write(s.a.path(IMAGE), &image).unwrap();
    let (v, ok, err) = common::sync(&s.a.mnt);
    assert!(ok, "{v} {err}");
    s.b.stop();
    let patch = ferry::testutil::random(256 << 10, 2);
    write_at(&s.a.path(IMAGE), 1 << 20, &patch).unwrap();
    image[1 << 20..(1 << 20) + patch.len()].copy_from_slice(&patch);
    let (v, _, _) = common::sync(&s.a.mnt);
    let c_state = &v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "site-c")
        .unwrap()["state"];
    assert_eq!(c_state, "committed", "C commits generation 2: {v}");
    s.b.start();

    // A is lost.
    s.a.kill9();
    let t0 = Instant::now();
    let served = s.c.mnt.join(IMAGE);
    wait_for(
        "C promoted and serving",
        TTL * 3,
        || write_at(&served, 2 << 20, b"the VM goes on").is_ok(),
        || format!("C: {}\nB: {}", s.c.log_text(), s.b.log_text()),
    );
    let took = t0.elapsed();
    eprintln!("kill -9 of the primary to the first write accepted on C: {took:?}");
    assert!(
        took < TTL * 2,
        "took {took:?}, more than twice the ttl\nC: {}",
        s.c.log_text()
    );
    image[2 << 20..(2 << 20) + 14].copy_from_slice(b"the VM goes on");
    assert_eq!(
        std::fs::read(&served).unwrap(),
        image,
        "C serves generation 2 and the write"
    );
    assert!(
        !s.b.mnt.join(IMAGE).exists(),
        "B (older) must not be promoted too\nB: {}",
        s.b.log_text()
    );
    let leader: Value = serde_json::from_str(&etcd.get("ferry/vm-images/leader").unwrap()).unwrap();
    assert_eq!(leader["node"], "site-c", "{leader}");

    // The writer on C goes on, and B follows C.
    let (v, ok, err) = common::sync(&s.c.mnt);
    assert!(ok, "{v} {err}\nB: {}", s.b.log_text());
    let c_status = common::run(
        Command::new(common::FERRY)
            .args(["status", "--json"])
            .arg(&s.c.mnt),
    );
    let c_status: Value = serde_json::from_slice(&c_status.stdout).unwrap();
    let c_failover = &c_status["sync"]["failover"];
    assert_eq!(c_failover["state"], "leading", "{c_failover}");
    assert!(
        c_failover["epoch"].as_u64().unwrap() > epoch_a,
        "{c_failover}"
    );
    assert_eq!(std::fs::read(s.b.images.join(IMAGE)).unwrap(), image);

    // A comes back: etcd says C leads, so A fences itself for good: no sync, writes held and
    // then refused.
    s.a.mount();
    wait_for(
        "A fenced",
        Duration::from_secs(15),
        || failover_state(&s.a)["state"] == "fenced",
        || s.a.log_text(),
    );
    let st = failover_state(&s.a);
    assert!(st["reason"].as_str().unwrap().contains("site-c"), "{st}");
    let t = Instant::now();
    let e = write_at(&s.a.path(IMAGE), 0, b"split brain?").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "held for the grace first"
    );
    let (_, ok, err) = common::sync(&s.a.mnt);
    assert!(!ok && err.contains("ferry rejoin"), "{err}");
    let _ = Command::new("umount").arg(&s.c.mnt).status();
}
