//! Promotion and fencing with real processes: a primary mount A shipping to replica daemons B
//! and C over QUIC on loopback. A syncs to both, then to C only (B down), then A is lost.
//! B is refused promotion while C is newer; promoted anyway (`--force`) or C promoted instead,
//! the new primary serves the images read-write and the other replica follows it; A, back,
//! is refused as fenced and keeps its writes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{FERRY, Mount, PRIMARY, Replica};
use serde_json::Value;

/// Adds `fp` to the replica's `primaries` and restarts it (a config is read at start).
fn pin(r: &mut Replica, fp: &str) {
    r.stop();
    let c = std::fs::read_to_string(&r.config).unwrap();
    let c = c.replacen("primaries = [", &format!("primaries = [\"{fp}\", "), 1);
    std::fs::write(&r.config, c).unwrap();
    r.start();
}

/// The `[[peer]]` table naming replica `r` as `name`.
fn peer(r: &Replica, name: &str) -> String {
    r.peer_toml()
        .replace("name = \"site-b\"", &format!("name = \"{name}\""))
}

fn append(config: &Path, toml: &str) {
    let c = std::fs::read_to_string(config).unwrap() + toml;
    std::fs::write(config, c).unwrap();
}

fn promote(r: &Replica, extra: &[&str]) -> Output {
    Command::new(FERRY)
        .args(["promote", "--json", "--config"])
        .arg(&r.config)
        .arg("--mount")
        .arg(&r.mnt)
        .args(extra)
        .output()
        .unwrap()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Replica `r`'s committed generation of the namespace, from `ferry generations --json`.
fn generations(r: &Replica) -> Vec<u64> {
    let out = common::run(
        Command::new(FERRY)
            .args(["generations", "--json", "--config"])
            .arg(&r.config),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["primaries"][0]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect()
}

/// Sites A (primary), B and C (replicas that trust A and each other), and the bytes of A's
/// image at each step: `gen1` reached B and C, `gen2` only C, `after` only A.
struct Drill {
    a: Mount,
    /// A's key fingerprint.
    fa: String,
    b: Replica,
    c: Replica,
    gen1: Vec<u8>,
    gen2: Vec<u8>,
    after: Vec<u8>,
}

const IMAGE: &str = "disk.img";

fn drill() -> Drill {
    let a = Mount::prepare_with("", "[primary]\nreplicas = 2\nsync_timeout = \"10s\"\n");
    let fa = common::keygen(&a.dir.path().join("keys"));
    let mut b = Replica::new(&[&fa]);
    let mut c = Replica::new(&[&fa]);
    let (fb, fc) = (b.fingerprint.clone(), c.fingerprint.clone());
    for (r, name) in [(&b, "site-b"), (&c, "site-c")] {
        let t = std::fs::read_to_string(&r.config).unwrap();
        std::fs::write(
            &r.config,
            t.replace("name = \"replica\"", &format!("name = \"{name}\"")),
        )
        .unwrap();
    }
    pin(&mut b, &fc);
    pin(&mut c, &fb);
    append(&a.config, &(peer(&b, "site-b") + &peer(&c, "site-c")));
    // Once promoted, each replicates to the other.
    append(
        &b.config,
        &format!("[primary]\nreplicas = 1\n{}", peer(&c, "site-c")),
    );
    append(
        &c.config,
        &format!("[primary]\nreplicas = 1\n{}", peer(&b, "site-b")),
    );
    a.mount();

    let mut image = ferry::testutil::random(4 << 20, 1);
    std::fs::write(a.path(IMAGE), &image).unwrap();
    let (v, ok, err) = common::sync(&a.mnt);
    assert!(ok, "{v} {err}");
    let gen1 = image.clone();

    // B's link is down: the next generation reaches C only.
    b.stop();
    let patch = ferry::testutil::random(256 << 10, 2);
    write_at(&a.path(IMAGE), 1 << 20, &patch);
    image[1 << 20..(1 << 20) + patch.len()].copy_from_slice(&patch);
    let (v, ok, _) = common::sync(&a.mnt);
    assert!(!ok, "B is down: 2 replicas cannot commit: {v}");
    let c_state = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "site-c")
        .unwrap()["state"]
        .clone();
    assert_eq!(c_state, "committed", "{v}");
    let gen2 = image.clone();

    // A writes on, replicated nowhere, and is lost.
    write_at(&a.path(IMAGE), 3 << 20, b"written after the last sync");
    image[3 << 20..(3 << 20) + 27].copy_from_slice(b"written after the last sync");
    a.kill9();
    Drill {
        a,
        fa,
        b,
        c,
        gen1,
        gen2,
        after: image,
    }
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A, back after the promotion, is refused as fenced, says so in its status, and keeps its
/// writes.
fn a_is_fenced(d: &Drill, by: &str) {
    d.a.mount();
    let (v, ok, err) = common::sync(&d.a.mnt);
    assert!(!ok, "the old primary must not commit anywhere: {v}");
    let fenced = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["cause"] == "fenced");
    assert!(fenced, "{v} {err}");
    let st = d.a.status();
    let reason = st["sync"]["fenced"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("by {by}")) && reason.contains("epoch 1"),
        "{st}"
    );
    // Every later sync is refused at once, saying what to do; nothing A wrote is lost.
    let (_, ok, err) = common::sync(&d.a.mnt);
    assert!(
        !ok && err.contains("was fenced") && err.contains("ferry rejoin"),
        "{err}"
    );
    assert_eq!(std::fs::read(d.a.path(IMAGE)).unwrap(), d.after);
}

#[test]
fn a_forced_promotion_of_the_older_replica_keeps_the_newer_generation_aside() {
    let mut d = drill();
    // The daemon holds the store: promotion waits for it to stop.
    d.b.start();
    let out = promote(&d.b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("in use"), "{err}");
    d.b.stop();
    // C holds a newer generation: B is refused, and C is named.
    let out = promote(&d.b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("site-c holds generation 2 of epoch 0"),
        "{err}"
    );
    assert!(!d.b.mnt.join(IMAGE).exists());

    let v = json(&promote(&d.b, &["--force", "-o", "allow_other"]));
    assert_eq!(v["epoch"], 1, "{v}");
    assert_eq!(v["base"]["generation"], 1, "{v}");
    eprintln!("takeover took {} ms", v["took_ms"]);
    let served = d.b.mnt.join(IMAGE);
    assert_eq!(std::fs::read(&served).unwrap(), d.gen1);

    // The new primary writes and syncs; C follows it, keeping A's generation 2 aside.
    write_at(&served, 0, b"the new primary writes");
    let (v, ok, err) = common::sync(&d.b.mnt);
    assert!(ok, "{v} {err}\n{}", d.c.log_text());
    assert_eq!(
        std::fs::read(d.c.image(IMAGE)).unwrap(),
        std::fs::read(&served).unwrap()
    );
    assert!(
        d.c.log_text().contains("taken over by site-b"),
        "{}",
        d.c.log_text()
    );
    let kept = generations(&d.c);
    assert!(kept.contains(&2), "{kept:?}");
    let to = d.c.dir.path().join("gen2.img");
    common::run(
        Command::new(FERRY)
            .args([
                "restore",
                &format!("{PRIMARY}/{IMAGE}"),
                "--generation",
                "2",
                "--to",
            ])
            .arg(&to)
            .arg("--config")
            .arg(&d.c.config),
    );
    assert_eq!(std::fs::read(&to).unwrap(), d.gen2);

    a_is_fenced(&d, "site-b");
    rejoin(&mut d);
}

/// A rejoins as a replica of B: its writes since B's base are saved aside, and B's next sync
/// makes A's copy equal B's, shipping only what differs.
fn rejoin(d: &mut Drill) {
    // A becomes a replica (a store on the images' filesystem) that trusts B and C; B ships to
    // it once its config lists it (a remount: `ferry promote` again mounts what is promoted).
    let port = common::free_port();
    let store = d.a.dir.path().join("store");
    append(
        &d.a.config,
        &format!(
            "[replica]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{}\"\nprimaries = [\"{}\", \"{}\"]\n",
            store.display(),
            d.b.fingerprint,
            d.c.fingerprint
        ),
    );
    let fa = &d.fa;
    let b_config = std::fs::read_to_string(&d.b.config)
        .unwrap()
        .replace("replicas = 1", "replicas = 2");
    std::fs::write(&d.b.config, b_config).unwrap();
    append(
        &d.b.config,
        &format!(
            "[[peer]]\nname = \"site-a\"\naddr = \"127.0.0.1:{port}\"\nfingerprint = \"{fa}\"\n"
        ),
    );
    common::run(Command::new("umount").arg(&d.b.mnt));
    json(&promote(&d.b, &[]));

    let out = Command::new(FERRY)
        .args(["rejoin", "--json", "--config"])
        .arg(&d.a.config)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["new_primary"], "site-b", "{v}");
    assert!(!d.a.is_mounted(), "rejoin stops the old primary's mount");
    // A's writes since generation 1 (B's base), byte for byte, in a sparse file.
    let saved = std::fs::read(Path::new(v["saved"].as_str().unwrap()).join(IMAGE)).unwrap();
    for (at, len) in [(1usize << 20, 256usize << 10), (3 << 20, 27)] {
        assert_eq!(saved[at..at + len], d.after[at..at + len], "at {at}");
    }
    let saved_bytes = v["saved_bytes"].as_u64().unwrap();
    assert!(
        saved_bytes < 1 << 20,
        "only what differs is saved: {saved_bytes}"
    );

    let log = d.a.dir.path().join("replica.log");
    let mut daemon = Command::new(FERRY)
        .args(["replica", "--config"])
        .arg(&d.a.config)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("replica listening")
    {
        assert!(
            t.elapsed().as_secs() < 30,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (v, ok, err) = common::sync(&d.b.mnt);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let a_log = std::fs::read_to_string(&log).unwrap();
    assert!(ok, "{v} {err}\n{a_log}");
    let served = std::fs::read(d.b.mnt.join(IMAGE)).unwrap();
    assert_eq!(
        std::fs::read(store.join(PRIMARY).join(IMAGE)).unwrap(),
        served
    );
    let to_a = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "site-a")
        .unwrap()["bytes_sent"]
        .as_u64()
        .unwrap();
    eprintln!("rejoin: {saved_bytes} bytes differed on A, B sent {to_a} bytes to A");
    assert!(
        to_a < 1 << 20,
        "A gets only what differs, not the image: {to_a}"
    );
    common::run(Command::new("umount").arg(&d.b.mnt));
}

#[test]
fn the_newest_replica_is_promoted_and_the_older_one_follows_it() {
    let mut d = drill();
    d.c.stop();
    d.b.start();
    let v = json(&promote(&d.c, &[]));
    assert_eq!(v["epoch"], 1, "{v}");
    assert_eq!(v["base"]["generation"], 2, "{v}");
    let served = d.c.mnt.join(IMAGE);
    assert_eq!(std::fs::read(&served).unwrap(), d.gen2);
    // Promoting again finds it done (and mounted).
    let again = json(&promote(&d.c, &[]));
    assert_eq!(again["promoted_now"], false, "{again}");

    // B, behind at generation 1, follows the new primary: it gets only what differs.
    write_at(&served, 2 << 20, b"the new primary writes");
    let (v, ok, err) = common::sync(&d.c.mnt);
    assert!(ok, "{v} {err}\n{}", d.b.log_text());
    assert_eq!(
        std::fs::read(d.b.image(IMAGE)).unwrap(),
        std::fs::read(&served).unwrap()
    );
    let sent = v["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 1 << 20,
        "only the changed chunks travel: {sent} bytes"
    );

    // Rejoin on a node that no promotion fenced says so.
    let out = Command::new(FERRY)
        .args(["rejoin", "--config"])
        .arg(&d.b.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no mount of this node was fenced"),
        "{err}"
    );

    a_is_fenced(&d, "site-c");
    let _ = Command::new("umount").arg(&d.c.mnt).output();
}
