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

/// One test at a time: each runs three etcd members, a mount and two replica daemons, and
/// measures times against the ttl; four at once on two cores measure the machine instead.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
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

fn sites(etcd: &[String], a_etcd: &[String], a_extra: &str) -> Sites {
    let a = Mount::prepare_with("", "[primary]\nreplicas = 2\nsync_timeout = \"10s\"\n");
    let fa = common::keygen(&a.dir.path().join("keys"));
    let mut b = Replica::new(&[&fa]);
    let mut c = Replica::new(&[&fa]);
    let (fb, fc) = (b.fingerprint.clone(), c.fingerprint.clone());
    configure(&mut b, "site-b", &fc);
    configure(&mut c, "site-c", &fb);
    append(
        &a.config,
        &(peer(&b, "site-b") + &peer(&c, "site-c") + &failover_toml(a_etcd, a_extra)),
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
    let _one = ONE_AT_A_TIME.lock();
    let etcd = Cluster::start();
    let urls = etcd.urls();
    let mut s = sites(&urls, &urls, "write_grace = \"2s\"\n");
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

    // By hand, a promotion is refused while etcd says A leads.
    let out = Command::new(common::FERRY)
        .args(["promote", "--config"])
        .arg(&s.c.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("says node test is the primary"),
        "{err}"
    );

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
    assert_eq!(std::fs::read(s.b.image(IMAGE)).unwrap(), image);

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

/// Writes 4 KiB blocks one after another (each fsynced) on a mount until stopped, as a VM
/// does; records when each was acknowledged and the error that stopped it, if any.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<parking_lot::Mutex<Vec<Instant>>>,
    thread: std::thread::JoinHandle<Option<std::io::Error>>,
}

impl Writer {
    fn start(path: std::path::PathBuf) -> Writer {
        use std::sync::atomic::Ordering::SeqCst;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked: std::sync::Arc<parking_lot::Mutex<Vec<Instant>>> = Default::default();
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(SeqCst) {
                let block = [(i % 251) as u8; 4096];
                if let Err(e) = write_at(&path, (i * 4096) % (4 << 20), &block) {
                    return Some(e);
                }
                a.lock().push(Instant::now());
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        });
        Writer {
            stop,
            acked,
            thread,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().len()
    }

    fn last_acked(&self) -> Option<Instant> {
        self.acked.lock().last().copied()
    }

    fn stop(self) -> Option<std::io::Error> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// `ferry-wan-relay` from a loopback port to a replica: A's link to it, cut by killing it.
struct UdpLink {
    port: u16,
    to: u16,
    log: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl UdpLink {
    fn new(dir: &Path, to: u16) -> UdpLink {
        let mut l = UdpLink {
            port: common::free_port(),
            to,
            log: dir.join(format!("relay-{to}.log")),
            child: None,
        };
        l.heal();
        l
    }

    fn heal(&mut self) {
        let from = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_ferry-wan-relay"))
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--forward")
                .arg(format!("127.0.0.1:{}", self.to))
                .stdout(std::process::Stdio::null())
                .stderr(err)
                .spawn()
                .unwrap(),
        );
        let log = self.log.clone();
        wait_for(
            "the relay to listen",
            Duration::from_secs(10),
            || std::fs::read_to_string(&log).unwrap_or_default()[from..].contains("listening on"),
            String::new,
        );
    }

    fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for UdpLink {
    fn drop(&mut self) {
        self.cut();
    }
}

#[test]
fn a_primary_cut_off_fences_itself_within_the_ttl_and_never_commits_after_the_new_one() {
    common::require_root();
    let _one = ONE_AT_A_TIME.lock();
    let etcd = Cluster::start();
    let urls = etcd.urls();
    let links = etcd.links();
    let link_urls: Vec<String> = links.iter().map(|l| l.url()).collect();
    let relays_dir = tempfile::tempdir().unwrap();
    // A's links to the replicas go through relays (their ports are known once they exist).
    let s = sites(
        &urls,
        &link_urls,
        "write_grace = \"8s\"\nmount = \"/nonexistent/a-promoted\"\n",
    );
    let mut rb = UdpLink::new(relays_dir.path(), s.b.port);
    let mut rc = UdpLink::new(relays_dir.path(), s.c.port);
    s.a.unmount();
    let cfg = std::fs::read_to_string(&s.a.config)
        .unwrap()
        .replace(
            &format!("127.0.0.1:{}\"", s.b.port),
            &format!("127.0.0.1:{}\"", rb.port),
        )
        .replace(
            &format!("127.0.0.1:{}\"", s.c.port),
            &format!("127.0.0.1:{}\"", rc.port),
        );
    std::fs::write(&s.a.config, cfg).unwrap();
    s.a.mount();
    let epoch_a = leading(&s.a);

    let image = ferry::testutil::random(4 << 20, 3);
    std::fs::write(s.a.path(IMAGE), &image).unwrap();
    let (v, ok, err) = common::sync(&s.a.mnt);
    assert!(ok, "{v} {err}");
    let writer = Writer::start(s.a.path(IMAGE));
    std::thread::sleep(Duration::from_millis(500));
    assert!(writer.acked() > 5, "the writer writes");

    // The partition: A reaches neither etcd nor the replicas; its writer goes on writing.
    for l in &links {
        l.cut();
    }
    rb.cut();
    rc.cut();
    let t0 = Instant::now();
    let fenced_after = wait_for(
        "A fences itself",
        TTL,
        || failover_state(&s.a)["state"] == "fencing",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    eprintln!("partition to A fenced: {fenced_after:?} (ttl {TTL:?})");
    let acked_at_fence = writer.acked();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        writer.acked() <= acked_at_fence + 1,
        "a fenced primary acknowledged {} writes",
        writer.acked() - acked_at_fence
    );
    // No write was acknowledged after the lease could have expired.
    assert!(writer.last_acked().unwrap() < t0 + TTL);

    // B and C hold the same generation: B (first by name) is promoted, once A's lease expired.
    let new_mnt = s.b.mnt.clone();
    let served = new_mnt.join(IMAGE);
    wait_for(
        "B promoted",
        TTL * 3,
        || write_at(&served, 0, b"the new primary").is_ok(),
        || format!("B: {}\nC: {}", s.b.log_text(), s.c.log_text()),
    );
    assert!(
        t0.elapsed() >= TTL / 2,
        "promoted before A's lease could expire"
    );
    let (v, ok, err) = common::sync(&new_mnt);
    assert!(ok, "the new primary's first commit: {v} {err}");
    let first_commit = std::fs::read(s.c.image(IMAGE)).unwrap();
    assert_eq!(first_commit, std::fs::read(&served).unwrap());

    // Heal: A learns that B leads, and stays fenced for good.
    for l in &links {
        l.heal();
    }
    rb.heal();
    rc.heal();
    wait_for(
        "A fenced for good",
        TTL * 3,
        || failover_state(&s.a)["state"] == "fenced",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    let st = failover_state(&s.a);
    assert!(st["reason"].as_str().unwrap().contains("site-b"), "{st}");
    let (_, ok, err) = common::sync(&s.a.mnt);
    assert!(!ok && err.contains("ferry rejoin"), "{err}");
    // The held writes failed (EIO past the grace), none was acknowledged after the fence.
    let e = writer.stop().expect("the writer was stopped by an error");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Nothing of A reached a replica after the new primary's first commit.
    assert_eq!(std::fs::read(s.c.image(IMAGE)).unwrap(), first_commit);
    let holder: Value =
        serde_json::from_slice(&std::fs::read(s.c.images.join(".ferry/epoch.json")).unwrap())
            .unwrap();
    assert_eq!(holder["node"], "site-b", "{holder}");
    assert!(holder["epoch"].as_u64().unwrap() > epoch_a, "{holder}");

    // A rejoins as a replica of B, as after a manual promotion: its writes since the cut are
    // saved aside, its mount stops.
    let store = s.a.dir.path().join("store");
    append(
        &s.a.config,
        &format!(
            "[replica]\nlisten = \"127.0.0.1:{}\"\nstore = \"{}\"\nprimaries = [\"{}\", \"{}\"]\n",
            common::free_port(),
            store.display(),
            s.b.fingerprint,
            s.c.fingerprint
        ),
    );
    let out = Command::new(common::FERRY)
        .args(["rejoin", "--json", "--config"])
        .arg(&s.a.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["new_primary"], "site-b", "{v}");
    assert!(
        v["saved_bytes"].as_u64().unwrap() > 0,
        "A's unreplicated writes are kept: {v}"
    );
    let _ = Command::new("umount").arg(&new_mnt).status();
}

#[test]
fn losing_one_etcd_member_changes_nothing_and_losing_two_fences_without_a_promotion() {
    common::require_root();
    let _one = ONE_AT_A_TIME.lock();
    let mut etcd = Cluster::start();
    let urls = etcd.urls();
    let s = sites(&urls, &urls, "write_grace = \"60s\"\n");
    let epoch_a = leading(&s.a);
    let image = ferry::testutil::random(4 << 20, 4);
    std::fs::write(s.a.path(IMAGE), &image).unwrap();

    // One member lost: A leads on, syncs commit.
    etcd.kill(0);
    let t = Instant::now();
    while t.elapsed() < TTL * 2 {
        let st = failover_state(&s.a);
        assert_eq!(
            st["state"],
            "leading",
            "one member lost: {st}\n{}",
            s.a.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (v, ok, err) = common::sync(&s.a.mnt);
    assert!(ok, "{v} {err}");

    // Two lost: no quorum. A fences itself (writes held), and no replica is promoted.
    let writer = Writer::start(s.a.path(IMAGE));
    std::thread::sleep(Duration::from_millis(300));
    etcd.kill(1);
    wait_for(
        "A fences itself",
        TTL,
        || failover_state(&s.a)["state"] == "fencing",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    let held_from = writer.acked();
    std::thread::sleep(TTL * 2);
    assert!(
        writer.acked() <= held_from + 1,
        "writes acknowledged without a lease"
    );
    for r in [&s.b, &s.c] {
        assert!(
            !r.mnt.join(IMAGE).exists(),
            "promoted without a quorum:\n{}",
            r.log_text()
        );
    }

    // The members come back: A's lease is still its own (etcd extends leases across an
    // election), A unfences, the held writes complete: nothing was lost.
    etcd.start_member(0);
    etcd.start_member(1);
    etcd.wait_healthy(3);
    let back = wait_for(
        "A leads again",
        TTL * 3,
        || failover_state(&s.a)["state"] == "leading",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    eprintln!("quorum back to A leading again: {back:?}");
    // On the same lease if a renewal got through before it ran out (etcd extends leases
    // across its elections); else A took the free key again, at a higher epoch.
    let epoch_back = failover_state(&s.a)["epoch"].as_u64().unwrap();
    assert!(epoch_back >= epoch_a, "{epoch_back} < {epoch_a}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(writer.acked() > held_from + 1, "the held writes went on");
    assert!(writer.stop().is_none(), "no write failed");
    let (v, ok, err) = common::sync(&s.a.mnt);
    assert!(ok, "{v} {err}");
    for r in [&s.b, &s.c] {
        assert_eq!(
            std::fs::read(r.image(IMAGE)).unwrap(),
            std::fs::read(s.a.path(IMAGE)).unwrap()
        );
    }
}

#[test]
fn an_unreachable_etcd_leaves_the_mount_serving_and_a_foreign_leader_key_fences_it() {
    common::require_root();
    let _one = ONE_AT_A_TIME.lock();
    let etcd = Cluster::start();
    let urls = etcd.urls();
    let links = etcd.links();
    for l in &links {
        l.cut();
    }
    let link_urls: Vec<String> = links.iter().map(|l| l.url()).collect();
    let s = sites(&urls, &link_urls, "write_grace = \"2s\"\n");

    // etcd unreachable at start: manual mode, loudly; the mount writes and syncs.
    wait_for(
        "A in manual mode",
        Duration::from_secs(15),
        || failover_state(&s.a)["state"] == "manual",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    assert!(
        s.a.log_text().contains("AUTOMATIC FAILOVER IS OFF"),
        "{}",
        s.a.log_text()
    );
    std::fs::write(s.a.path(IMAGE), ferry::testutil::random(1 << 20, 5)).unwrap();
    let (v, ok, err) = common::sync(&s.a.mnt);
    assert!(ok, "manual mode syncs: {v} {err}");

    // etcd reachable: A campaigns and leads.
    for l in &links {
        l.heal();
    }
    wait_for(
        "A leads once etcd answers",
        TTL * 4,
        || failover_state(&s.a)["state"] == "leading",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );

    // Something else overwrites the leader key: A is no longer sure it leads and fences
    // itself; no replica takes a key that is not free.
    assert!(etcd.ctl(
        &[&urls[0]],
        &["put", "ferry/vm-images/leader", "written by a script"]
    ));
    wait_for(
        "A fenced",
        TTL * 2,
        || failover_state(&s.a)["state"] == "fenced",
        || format!("{}\n{}", failover_state(&s.a), s.a.log_text()),
    );
    let st = failover_state(&s.a);
    let reason = st["reason"].as_str().unwrap();
    assert!(reason.contains("ferry did not write"), "{st}");
    let e = write_at(&s.a.path(IMAGE), 0, b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    std::thread::sleep(TTL);
    for r in [&s.b, &s.c] {
        assert!(
            !r.mnt.join(IMAGE).exists(),
            "promoted on a foreign key:\n{}",
            r.log_text()
        );
    }
}
