//! The read-only replica mount (invariant 7) and restore points: real mounts on both sides,
//! real QUIC on loopback, qemu tools reading the replica as another user.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::stamps::{self, Stamper, prefix};
use common::{FERRY, Pair, require};
use ferry::testutil::flip_byte as flip;
use serde_json::Value;

/// What QEMU runs as on a hypervisor host: not root.
const QEMU_UID: u32 = 65534;

/// Reads all of `f` from the daemon, not from the page cache (its pages are dropped first).
fn read_all(f: &File) -> Vec<u8> {
    use std::os::fd::AsRawFd;
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// The generation an image of the replica mount shows (`user.ferry.generation`).
fn generation_of(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut buf = [0u8; 32];
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"user.ferry.generation".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(
        n > 0,
        "getxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    std::str::from_utf8(&buf[..n as usize])
        .unwrap()
        .parse()
        .unwrap()
}

/// `ferry COMMAND --json --config FILE` on the pair's replica.
fn replica_json(p: &Pair, command: &str) -> Value {
    let out = Command::new(FERRY)
        .args([command, "--json", "--config"])
        .arg(&p.replica.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ferry generations --json` of the pair's replica: its primary's restore points.
fn generations(p: &Pair) -> Value {
    let v = replica_json(p, "generations");
    assert_eq!(v["primaries"][0]["primary"], common::PRIMARY, "{v}");
    v["primaries"][0].clone()
}

fn numbers(v: &Value) -> Vec<u64> {
    v["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect()
}

/// An O_DIRECT writer stamps blocks in order into two disks (A then B) while syncs run; files
/// opened on the replica mount read exactly the stamps 1..m of the generation current at
/// their open, for as long as they stay open, and two disks showing one generation are cut at
/// one instant. Another user reads the newest generation too. Closed, the old generations go.
#[test]
fn a_file_open_on_the_replica_mount_keeps_its_generation() {
    const BLOCKS: u64 = 2048;
    let p = Pair::with_replica(&[], "", "mount = \"{mnt}\"");
    assert!(p.replica.is_mounted(), "{}", p.replica.log_text());
    let disks = [p.primary.path("disk-a.img"), p.primary.path("disk-b.img")];
    stamps::create(&disks, BLOCKS);
    p.sync_ok();
    let writer = Stamper::start(&disks, BLOCKS, Duration::from_micros(750));
    let (ra, rb) = (
        p.replica.served.join("disk-a.img"),
        p.replica.served.join("disk-b.img"),
    );
    // Files opened on the replica mount: the file, its generation, what it read first.
    let mut open: Vec<(File, u64, Vec<u8>)> = Vec::new();
    let mut same_generation_pairs = 0;
    loop {
        let finished = writer.done();
        let v = p.sync_ok();
        let g = v["generation"].as_u64().unwrap();
        // A new open sees the newest generation.
        assert_eq!(generation_of(&ra), g);
        let fa = File::open(&ra).unwrap();
        let first = read_all(&fa);
        let m = prefix(&first);
        let fb = File::open(&rb).unwrap();
        if generation_of(&rb) == g {
            let mb = prefix(&read_all(&fb));
            assert!(mb == m || mb + 1 == m, "A holds {m} stamps, B {mb}");
            same_generation_pairs += 1;
        }
        // Another user (QEMU's) reads the same generation through the mount.
        let out = Command::new("cat")
            .arg(&ra)
            .uid(QEMU_UID)
            .gid(QEMU_UID)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(out.stdout == first, "uid {QEMU_UID} read other bytes");
        // And with O_DIRECT (QEMU's cache=none), served as FUSE direct I/O.
        let out = Command::new("dd")
            .arg(format!("if={}", ra.display()))
            .args(["iflag=direct", "bs=1M", "status=none"])
            .uid(QEMU_UID)
            .gid(QEMU_UID)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            out.stdout == first,
            "uid {QEMU_UID} read other bytes with O_DIRECT"
        );
        open.push((fa, g, first));
        // Every file opened earlier still reads its own generation.
        for (f, g, first) in &open {
            assert!(
                read_all(f) == *first,
                "a file opened at generation {g} changed"
            );
        }
        if finished {
            break;
        }
    }
    writer.join();
    let ms: Vec<u64> = open.iter().map(|(_, _, b)| prefix(b)).collect();
    assert_eq!(*ms.last().unwrap(), BLOCKS);
    assert!(
        ms.iter().filter(|&&m| m > 0 && m < BLOCKS).count() >= 2,
        "syncs must land while the writer runs: {ms:?}"
    );
    assert!(same_generation_pairs >= 2);
    let held = numbers(&generations(&p));
    assert!(
        held.len() >= 3,
        "open files pin their generations: {held:?}"
    );

    // Closed, only the newest is kept (no `keep`), and so are no overwritten chunks.
    let newest = open.last().unwrap().1;
    drop(open);
    std::thread::sleep(Duration::from_millis(300));
    let v = generations(&p);
    assert_eq!(numbers(&v), vec![newest], "{v}");
    assert_eq!(v["kept_bytes"], 0, "{v}");
    // The mount's root holds a directory per primary; in it, the restore points are
    // reachable by name but not listed.
    let names = |d: &std::path::Path| -> Vec<String> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(names(&p.replica.mnt), [common::PRIMARY]);
    let listed = names(&p.replica.served);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(!listed.iter().any(|n| n.starts_with('.')));
    assert!(
        p.replica
            .served
            .join(format!(".ferry/generations/{newest}/disk-a.img"))
            .exists()
    );
}

/// `keep = 3`: the replica mount shows the three newest generations under
/// `.ferry/generations/<N>/`, each equal to the primary's image at its sync (qemu-img check
/// run by another user on them), `ferry restore` writes one out, an expired one is refused
/// with a clear message, and a killed daemon restarts with its restore points and its mount.
#[test]
fn restore_points_are_served_listed_and_restored() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let mut p = Pair::with_replica(&[], "", "mount = \"{mnt}\"\nkeep = 3");
    let img = "vm.qcow2";
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p.primary.path(img))
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let saved = tempfile::tempdir().unwrap();
    let mut at: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for n in 1..=5u8 {
        // The same guest megabyte each time, so the image is overwritten in place.
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {n} 1M 1M")])
            .arg(p.primary.path(img))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let g = p.sync_ok()["generation"].as_u64().unwrap();
        let copy = saved.path().join(format!("{g}.qcow2"));
        fs::copy(p.primary.backing(img), &copy).unwrap();
        at.push((g, copy));
    }
    let v = generations(&p);
    let kept: Vec<u64> = at[2..].iter().map(|(g, _)| *g).collect();
    assert_eq!(numbers(&v), kept, "{v}");
    let kept_bytes = v["kept_bytes"].as_u64().unwrap();
    assert!(
        kept_bytes > 0 && kept_bytes < 6 << 20,
        "two restore points of 1 MiB changes cost {kept_bytes} bytes"
    );
    assert!(
        v["generations"][0]["own_bytes"].as_u64().unwrap() > 0,
        "{v}"
    );

    let check = |p: &Pair| {
        for (g, copy) in &at[2..] {
            let shown = p
                .replica
                .served
                .join(format!(".ferry/generations/{g}/{img}"));
            common::cmp(&shown, copy);
            let out = Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2"])
                .arg(&shown)
                .uid(QEMU_UID)
                .gid(QEMU_UID)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check of generation {g}: {out:?}"
            );
        }
        common::cmp(&p.replica.served.join(img), &at[4].1);
    };
    check(&p);

    let (oldest, copy) = &at[2];
    let shown = format!("{}/{img}", common::PRIMARY);
    let shown = shown.as_str();
    let to = saved.path().join("restored.qcow2");
    let out = Command::new(FERRY)
        .args([
            "restore",
            shown,
            "--generation",
            &oldest.to_string(),
            "--to",
        ])
        .arg(&to)
        .arg("--config")
        .arg(&p.replica.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    common::cmp(&to, copy);
    let expired = at[1].0;
    let out = Command::new(FERRY)
        .args([
            "restore",
            shown,
            "--generation",
            &expired.to_string(),
            "--to",
        ])
        .arg(saved.path().join("no.qcow2"))
        .arg("--config")
        .arg(&p.replica.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("generation {expired} of test is not kept")),
        "{err}"
    );
    assert!(!saved.path().join("no.qcow2").exists());

    // kill -9: the mount is left dead; the restarted daemon mounts again and serves the same.
    p.replica.kill9();
    p.replica.start();
    assert!(p.replica.is_mounted());
    check(&p);
    // The replica host's status: the store's generation, restore points and daemon.
    let status = |p: &Pair| replica_json(p, "status");
    let v = status(&p);
    let ns = &v["primaries"][0];
    assert_eq!(ns["primary"], common::PRIMARY, "{v}");
    assert_eq!(ns["generation"], at[4].0, "{v}");
    assert_eq!(ns["restore_points"], serde_json::json!(kept), "{v}");
    assert!(v["pid"].as_u64().is_some(), "{v}");
    assert!(ns["committed_ago_s"].as_u64().unwrap() < 600, "{v}");
    p.replica.stop();
    assert!(
        !p.replica.is_mounted(),
        "SIGTERM unmounts the replica mount"
    );
    let v = status(&p);
    assert_eq!(
        (v["pid"].clone(), v["primaries"][0]["generation"].clone()),
        (Value::Null, at[4].0.into()),
        "{v}"
    );
}

/// Processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// `ferry STORE MNT -o replica,config=FILE` (what `mount -t fuse.ferry` and an fstab line
/// run) starts the replica daemon with its mount and returns once both are live; `umount MNT`
/// stops it.
#[test]
fn the_mount_helper_form_starts_the_replica_with_its_mount() {
    let mut p = Pair::new();
    fs::write(p.primary.path("a.img"), vec![7u8; 100_000]).unwrap();
    p.replica.stop();
    let mnt = p.replica.mnt.clone();
    let served = p.replica.served.clone();
    let options = format!("replica,config={}", p.replica.config.display());
    common::run(
        Command::new(FERRY)
            .arg(&p.replica.store)
            .arg(&mnt)
            .arg("-o")
            .arg(&options),
    );
    assert!(p.replica.is_mounted());
    p.sync_ok();
    assert_eq!(fs::read(served.join("a.img")).unwrap(), vec![7u8; 100_000]);

    // A store other than the config's is refused, saying which one the config names.
    let out = Command::new(FERRY)
        .arg(p.replica.dir.path())
        .arg(p.primary.dir.path())
        .arg("-o")
        .arg(&options)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not the replica store"),
        "{err}"
    );

    common::run(Command::new("umount").arg(&mnt));
    let config = p.replica.config.display().to_string();
    let t = std::time::Instant::now();
    while !processes_naming(&config).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "umount did not stop the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry verify MNT [--deep] [--repair] --json` on the primary.
fn verify(p: &Pair, args: &[&str]) -> (Value, bool) {
    let out = Command::new(FERRY)
        .arg("verify")
        .args(args)
        .arg("--json")
        .arg(&p.primary.mnt)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{out:?}\nreplica log:\n{}", p.replica.log_text()));
    assert_eq!(v["ok"] == true, out.status.success(), "{v}");
    (v, out.status.success())
}

/// (image or null, offset, state) of each damaged chunk a replica's deep verify reported.
fn damage(check: &Value) -> Vec<(Value, Value, String)> {
    check["deep"]["damage"]
        .as_array()
        .unwrap_or_else(|| panic!("no deep report: {check}"))
        .iter()
        .map(|d| {
            let state = d["state"].as_str().unwrap().to_string();
            (d["path"].clone(), d["offset"].clone(), state)
        })
        .collect()
}

/// One flipped byte in a replica's image and one in a kept chunk of a restore point:
/// `ferry verify --deep` names both (image and offset; the restore point), `--repair` mends the
/// kept chunk from the same chunk in another image of the store and the image chunk through a
/// new generation from the primary, and a second verify is clean: every image and restore
/// point reads back as the primary had it. The scheduled deep verify (`scrub_interval`) does
/// the same by itself, and the plain `ferry verify` then names the chunk's byte range.
#[test]
fn verify_deep_names_a_flipped_byte_in_an_image_and_a_kept_chunk_and_repair_mends_both() {
    let mut p = Pair::with_replica(&[], "", "mount = \"{mnt}\"\nkeep = 3");
    let old = common::random(4 << 20, 11);
    fs::write(p.primary.path("a.img"), &old).unwrap();
    fs::write(p.primary.path("b.img"), &old).unwrap();
    let g1 = p.sync_ok()["generation"].as_u64().unwrap();
    // a is rewritten: its old chunks are kept for generation g1 (and live in b).
    let new = common::random(4 << 20, 12);
    fs::write(p.primary.path("a.img"), &new).unwrap();
    p.sync_ok();
    let (v, ok) = verify(&p, &["--deep"]);
    assert!(ok, "{v}");
    assert!(
        v["replicas"][0]["deep"]["kept_chunks"].as_u64().unwrap() > 10,
        "{v}"
    );

    let packs: Vec<_> = fs::read_dir(p.replica.images.join(".ferry/kept"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    flip(&p.replica_path("a.img"), 3_000_000);
    // Inside the data of the pack's third record.
    let third = ferry::testutil::journal_records(&packs[0])[2].0;
    flip(&packs[0], third + 100);

    // Shallow: the replica still claims the generation's roots.
    assert!(verify(&p, &[]).1);
    let (v, ok) = verify(&p, &["--deep"]);
    assert!(!ok);
    let found = damage(&v["replicas"][0]);
    assert_eq!(found.len(), 2, "{v}");
    assert_eq!(found[0].0, "a.img");
    let off = found[0].1.as_u64().unwrap();
    let len = v["replicas"][0]["deep"]["damage"][0]["len"]
        .as_u64()
        .unwrap();
    assert!(off <= 3_000_000 && 3_000_000 < off + len, "{v}");
    assert_eq!(
        (found[1].0.clone(), found[1].2.as_str()),
        (Value::Null, "found")
    );
    assert_eq!(
        v["replicas"][0]["deep"]["damage"][1]["generations"],
        serde_json::json!([g1])
    );

    let (v, ok) = verify(&p, &["--deep", "--repair"]);
    assert!(ok, "{v}\nreplica log:\n{}", p.replica.log_text());
    let states: Vec<String> = damage(&v["repair"]["replicas"][0])
        .into_iter()
        .map(|d| d.2)
        .collect();
    assert_eq!(states, ["resync", "repaired"], "{v}");
    assert!(damage(&v["replicas"][0]).is_empty(), "{v}");
    // The repair changed the replica's image behind the primary's kept connection: the sync
    // that brings the chunk was planned on the last acknowledgement, found stale at the
    // replica's Welcome, and went through on a new connection.
    let log = p.primary.log_text();
    assert!(log.contains("planning again on its answer"), "{log}");
    assert!(verify(&p, &["--deep"]).1);
    assert_eq!(fs::read(p.replica_path("a.img")).unwrap(), new);
    let restore_point = p
        .replica
        .served
        .join(format!(".ferry/generations/{g1}/a.img"));
    assert!(
        fs::read(&restore_point).unwrap() == old,
        "the restore point reads back"
    );

    // The scheduled deep verify finds damage by itself; then the replica no longer claims the
    // damaged chunk, and the plain `ferry verify` names the image and the byte range (by
    // Merkle descent); `--repair` ships the chunk.
    flip(&p.replica_path("a.img"), 1_000_000);
    p.replica.stop();
    let config = fs::read_to_string(&p.replica.config).unwrap() + "scrub_interval = \"1s\"\n";
    fs::write(&p.replica.config, config).unwrap();
    let from = p.replica.log_text().len();
    p.replica.start();
    let t = std::time::Instant::now();
    while !p.replica.log_text()[from..].contains("deep verify of generation") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            p.replica.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (v, ok) = verify(&p, &[]);
    assert!(!ok);
    let differs = &v["replicas"][0]["differing"];
    assert_eq!(differs.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(differs[0]["path"], "a.img");
    let r = &differs[0]["ranges"];
    assert_eq!(r.as_array().unwrap().len(), 1, "{v}");
    let (start, end) = (r[0][0].as_u64().unwrap(), r[0][1].as_u64().unwrap());
    assert!(
        start <= 1_000_000 && 1_000_000 < end && end - start < 1 << 20,
        "{v}"
    );
    assert!(verify(&p, &["--repair"]).1);
    assert!(verify(&p, &["--deep"]).1);
    assert_eq!(fs::read(p.replica_path("a.img")).unwrap(), new);
}

/// The store is too small to keep what a generation overwrites (`keep = 3`): the sync pauses
/// before sending data, saying so in numbers, and nothing of the generation shows; the mount
/// goes on serving the newest committed generation and every restore point reads as before.
/// With space back, the same sync resumes by itself and sends the generation once.
#[test]
fn a_store_without_room_to_keep_pauses_the_sync_and_loses_no_restore_point() {
    let mut p = Pair::with_replica(&[], "", "mount = \"{mnt}\"\nkeep = 3");
    // The store on a small filesystem of its own.
    p.replica.stop();
    let store = p.replica.store.clone();
    fs::create_dir_all(&store).unwrap();
    let tmpfs = common::Tmpfs::mount(&store, "12m");
    p.replica.start();

    let img = p.primary.path("a.img");
    fs::write(&img, common::random(4 << 20, 1)).unwrap();
    let g1 = p.sync_ok()["generation"].as_u64().unwrap();
    let at1 = fs::read(p.primary.backing("a.img")).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&common::random(2 << 20, 2), 0).unwrap();
    drop(f);
    let g2 = p.sync_ok()["generation"].as_u64().unwrap();
    let at2 = fs::read(p.primary.backing("a.img")).unwrap();

    // Every byte changes: 4 MiB to stage and 4 MiB to keep do not fit.
    fs::write(&img, common::random(4 << 20, 3)).unwrap();
    let sync = common::sync_in_background(&p.primary.mnt);
    let t = std::time::Instant::now();
    let r = loop {
        let r = p.primary.status()["sync"]["replicas"][0].clone();
        if r["cause"] == "no_space" {
            break r;
        }
        assert!(
            !sync.is_finished() && t.elapsed() < Duration::from_secs(30),
            "{r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("4.0 MiB to keep what it overwrites"),
        "{r}"
    );
    let shown = p.replica.served.join("a.img");
    assert_eq!(
        fs::read(&shown).unwrap(),
        at2,
        "the mount serves the last commit"
    );
    assert_eq!(generation_of(&shown), g2);
    let point = |g: u64| {
        p.replica
            .served
            .join(format!(".ferry/generations/{g}/a.img"))
    };
    assert_eq!(fs::read(point(g1)).unwrap(), at1);
    assert_eq!(numbers(&generations(&p)), [g1, g2]);

    // Space back: the same sync goes on, and sends the generation once.
    tmpfs.resize("64m");
    let (v, ok, err) = sync.join().unwrap();
    assert!(ok, "{v} {err}");
    let g3 = v["generation"].as_u64().unwrap();
    let sent = v["replicas"][0]["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 5 << 20,
        "sent {sent} bytes for a 4 MiB generation: {v}"
    );
    common::cmp(&p.primary.backing("a.img"), &p.replica.image("a.img"));
    assert_eq!(numbers(&generations(&p)), [g1, g2, g3]);
    assert_eq!(fs::read(point(g1)).unwrap(), at1);
    assert_eq!(fs::read(point(g2)).unwrap(), at2);
}
