//! Changes that bypass the mount (made to the backing directory while unmounted, or straight to
//! a backing file while mounted) are found and replicated; an image that became something else
//! keeps its last generation on the replica; `ferry verify --primary` finds a stale manifest.
//! Real mounts, a real replica daemon, real QUIC on loopback.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{FERRY, Pair, random};

const MIB: usize = 1 << 20;

fn identical(p: &Pair, name: &str) {
    common::cmp(&p.primary.backing(name), &p.replica_path(name));
}

fn write_through_mount(p: &Pair, name: &str, bytes: &[u8]) {
    fs::write(p.primary.path(name), bytes).unwrap();
}

/// Writes `bytes` at `offset` of the backing file itself, not through the mount.
fn write_behind(p: &Pair, name: &str, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(p.primary.backing(name))
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn edits_made_while_unmounted_are_found_at_mount_and_replicated() {
    let p = Pair::new();
    for (i, name) in ["edit.img", "trunc.img", "moved.img", "replaced.img"]
        .iter()
        .enumerate()
    {
        write_through_mount(&p, name, &random(8 * MIB, i as u64 + 1));
    }
    p.sync_ok();
    p.primary.unmount();

    // An operator's tools at work on the backing directory while ferry is down.
    write_behind(&p, "edit.img", 2 * MIB as u64, &random(MIB, 10));
    OpenOptions::new()
        .write(true)
        .open(p.primary.backing("trunc.img"))
        .unwrap()
        .set_len(3 * MIB as u64 + 123)
        .unwrap();
    fs::rename(
        p.primary.backing("moved.img"),
        p.primary.backing("renamed.img"),
    )
    .unwrap();
    fs::write(p.primary.backing("other"), random(8 * MIB, 11)).unwrap();
    fs::rename(
        p.primary.backing("other"),
        p.primary.backing("replaced.img"),
    )
    .unwrap();
    fs::write(p.primary.backing("new.img"), random(2 * MIB, 12)).unwrap();

    p.primary.mount();
    let log = p.primary.log_text();
    for (name, what) in [
        ("edit.img", "mtime"),
        ("trunc.img", "size 8388608 -> 3145851"),
        ("replaced.img", "inode"),
    ] {
        assert!(
            log.lines().any(|l| l.contains(name)
                && l.contains("changed outside the mount")
                && l.contains(what)),
            "no warning names {name} ({what}):\n{log}"
        );
    }
    let r = p.sync_ok();
    assert!(r["dirty_bytes"].as_u64().unwrap() > 0, "{r}");
    for name in [
        "edit.img",
        "trunc.img",
        "renamed.img",
        "replaced.img",
        "new.img",
    ] {
        identical(&p, name);
    }
    assert!(!p.replica_path("moved.img").exists());
    // The edit costs its own bytes on the wire, not the image's.
    let edit_and_more = r["bytes_sent"].as_u64().unwrap();
    assert!(
        edit_and_more < (1 + 8 + 2 + 1) as u64 * MIB as u64,
        "shipped {edit_and_more} bytes"
    );
}

#[test]
fn writes_to_backing_files_while_mounted_are_found_and_replicated() {
    let p = Pair::new();
    for (i, name) in ["a.img", "b.img", "c.img", "d.img"].iter().enumerate() {
        write_through_mount(&p, name, &random(8 * MIB, i as u64 + 20));
    }
    p.sync_ok();

    // Straight to the backing files, while the mount is live; a.img also through the mount.
    write_behind(&p, "a.img", 5 * MIB as u64, &random(MIB, 30));
    let via = OpenOptions::new()
        .write(true)
        .open(p.primary.path("a.img"))
        .unwrap();
    via.write_all_at(&random(4096, 31), 0).unwrap();
    drop(via);
    OpenOptions::new()
        .write(true)
        .open(p.primary.backing("b.img"))
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    fs::write(p.primary.dir.path().join("elsewhere"), random(8 * MIB, 32)).unwrap();
    fs::rename(
        p.primary.dir.path().join("elsewhere"),
        p.primary.backing("c.img"),
    )
    .unwrap();

    let status = p.primary.status();
    let outside: Vec<String> = status["sync"]["outside"]
        .as_array()
        .unwrap_or_else(|| panic!("no outside changes in status: {status}"))
        .iter()
        .map(|o| o["path"].as_str().unwrap().to_string())
        .collect();
    for name in ["a.img", "b.img", "c.img"] {
        assert!(outside.iter().any(|o| o == name), "{name}: {status}");
    }
    assert!(!outside.iter().any(|o| o == "d.img"), "{status}");
    p.sync_ok();
    for name in ["a.img", "b.img", "c.img", "d.img"] {
        identical(&p, name);
    }
    let log = p.primary.log_text();
    assert!(
        log.contains("a.img") && log.contains("written outside the mount"),
        "{log}"
    );
    // The mount's own writes are never taken for outside ones.
    write_through_mount(&p, "d.img", &random(8 * MIB, 33));
    let status = p.primary.status();
    let again = status["sync"]["outside"].as_array().unwrap();
    assert!(!again.iter().any(|o| o["path"] == "d.img"), "{status}");
}

#[test]
fn a_touch_alone_ships_no_data() {
    let p = Pair::new();
    write_through_mount(&p, "t.img", &random(4 * MIB, 40));
    p.sync_ok();
    p.primary.unmount();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    OpenOptions::new()
        .write(true)
        .open(p.primary.backing("t.img"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    p.primary.mount();
    assert!(p.primary.log_text().contains("changed outside the mount"));
    let r = p.sync_ok();
    assert_eq!(r["bytes_sent"], 0, "{r}");
    assert_eq!(r["chunks_sent"], 0, "{r}");
    identical(&p, "t.img");
    // Cleanly unmounted and mounted again with nothing changed: no warning at all.
    let warnings = p
        .primary
        .log_text()
        .matches("changed outside the mount")
        .count();
    p.primary.unmount();
    p.primary.mount();
    assert_eq!(
        p.primary
            .log_text()
            .matches("changed outside the mount")
            .count(),
        warnings
    );
}

#[test]
fn an_image_replaced_by_a_directory_keeps_its_last_generation_and_the_others_replicate() {
    let p = Pair::new();
    let old = random(4 * MIB, 50);
    write_through_mount(&p, "broken.img", &old);
    write_through_mount(&p, "fine.img", &random(4 * MIB, 51));
    let linked = random(MIB, 54);
    write_through_mount(&p, "link.img", &linked);
    p.sync_ok();

    fs::remove_file(p.primary.backing("broken.img")).unwrap();
    fs::create_dir(p.primary.backing("broken.img")).unwrap();
    fs::remove_file(p.primary.backing("link.img")).unwrap();
    std::os::unix::fs::symlink("fine.img", p.primary.backing("link.img")).unwrap();
    write_through_mount(&p, "fine.img", &random(4 * MIB, 52));
    let r = p.sync_ok();
    identical(&p, "fine.img");
    assert_eq!(fs::read(p.replica_path("broken.img")).unwrap(), old, "{r}");
    assert_eq!(fs::read(p.replica_path("link.img")).unwrap(), linked, "{r}");
    let status = p.primary.status();
    let broken = status["sync"]["broken"].as_array().unwrap();
    assert!(
        broken
            .iter()
            .any(|b| b["path"] == "broken.img"
                && b["reason"].as_str().unwrap().contains("directory")),
        "{status}"
    );
    assert!(
        broken
            .iter()
            .any(|b| b["path"] == "link.img"
                && b["reason"].as_str().unwrap().contains("symbolic link")),
        "{status}"
    );
    assert!(
        p.primary
            .log_text()
            .lines()
            .any(|l| l.contains("broken.img") && l.contains("directory")),
        "{}",
        p.primary.log_text()
    );
    let text = common::run(Command::new(FERRY).arg("status").arg(&p.primary.mnt));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("broken.img"), "{text}");

    // Put back as a regular file: it replicates again.
    fs::remove_file(p.primary.backing("link.img")).unwrap();
    fs::write(p.primary.backing("link.img"), random(MIB, 55)).unwrap();
    fs::remove_dir(p.primary.backing("broken.img")).unwrap();
    fs::write(p.primary.backing("broken.img"), random(4 * MIB, 53)).unwrap();
    p.sync_ok();
    identical(&p, "broken.img");
    identical(&p, "link.img");
    let status = p.primary.status();
    assert!(
        status["sync"]["broken"].as_array().unwrap().is_empty(),
        "{status}"
    );
}

/// `ferry verify --primary` re-hashes the primary's own images against its manifests, so a
/// stale manifest is found even when detection failed (here: its record is forged to match).
#[test]
fn verify_primary_finds_a_stale_manifest_and_repair_ships_it() {
    let p = Pair::new();
    write_through_mount(&p, "v.img", &random(8 * MIB, 60));
    write_through_mount(&p, "w.img", &random(MIB, 61));
    p.sync_ok();
    let verify = |extra: &[&str]| {
        let out = Command::new(FERRY)
            .args(["verify", "--primary", "--json"])
            .args(extra)
            .arg(&p.primary.mnt)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("verify: {}", String::from_utf8_lossy(&out.stderr)));
        (v, out.status.success())
    };
    let (v, ok) = verify(&[]);
    assert!(ok && v["ok"] == true, "{v}");
    assert_eq!(v["images"].as_array().unwrap().len(), 2, "{v}");

    p.primary.unmount();
    write_behind(
        &p,
        "v.img",
        3 * MIB as u64 + 17,
        b"bit rot, or a missed write",
    );
    // Detection is defeated: the record of the backing files now says what is there.
    let stamps = common::find_file(&p.primary.state, "stamps.json");
    let mut rec: serde_json::Value = serde_json::from_slice(&fs::read(&stamps).unwrap()).unwrap();
    let meta = fs::metadata(p.primary.backing("v.img")).unwrap();
    {
        use std::os::unix::fs::MetadataExt;
        let s = &mut rec["images"]["v.img"];
        s["mtime_ns"] = (meta.mtime() * 1_000_000_000 + meta.mtime_nsec()).into();
        s["ctime_ns"] = (meta.ctime() * 1_000_000_000 + meta.ctime_nsec()).into();
    }
    fs::write(&stamps, serde_json::to_vec(&rec).unwrap()).unwrap();
    p.primary.mount();
    assert!(!p.primary.log_text().contains("changed outside the mount"));

    let (v, ok) = verify(&[]);
    assert!(!ok, "{v}");
    let bad: Vec<&serde_json::Value> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["ok"] == false)
        .collect();
    assert_eq!(bad.len(), 1, "{v}");
    assert_eq!(bad[0]["path"], "v.img");
    let range = &bad[0]["mismatched"][0];
    let off = 3 * MIB as u64 + 17;
    assert!(
        range[0].as_u64().unwrap() <= off && range[1].as_u64().unwrap() > off,
        "{v}"
    );
    // A plain sync does not see it ...
    let r = p.sync_ok();
    assert_eq!(r["bytes_sent"], 0, "{r}");
    // ... --repair marks it, and the next sync ships just that chunk.
    let (v, ok) = verify(&["--repair"]);
    assert!(!ok && v["repaired"] == true, "{v}");
    let r = p.sync_ok();
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 2 * MIB as u64, "{r}");
    identical(&p, "v.img");
    let (v, ok) = verify(&[]);
    assert!(ok, "{v}");
}

/// `-o private_backing` refuses a backing directory that others than root can reach, says how
/// to fix it, and accepts one behind a directory only root can enter (the backing directory
/// itself keeping mode 0755).
#[test]
fn private_backing_refuses_a_backing_directory_others_can_reach() {
    use std::os::unix::fs::PermissionsExt;
    let m = common::Mount::prepare("private_backing,allow_other");
    let mode = |p: &std::path::Path, mode| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    };
    // The temporary directory (root's) opened to all, as /tmp and / are.
    mode(m.dir.path(), 0o755);
    mode(&m.source, 0o755);
    let mount = || {
        Command::new(FERRY)
            .arg("mount")
            .arg(&m.source)
            .arg(&m.mnt)
            .arg("-o")
            .arg(&m.options)
            .output()
            .unwrap()
    };
    let out = mount();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !m.is_mounted());
    assert!(
        err.contains("private_backing") && err.contains("mkdir -m 700"),
        "{err}"
    );
    // Only root can enter the directory holding the backing directory.
    mode(m.dir.path(), 0o700);
    let out = mount();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(m.is_mounted());
}

/// After an unclean stop, an image the mount wrote since the last sync point is re-read only
/// where the intent log says (invariant 6), while one edited behind ferry's back while it was
/// down is found by its stamp and re-read in full.
#[test]
fn after_an_unclean_stop_the_intent_log_and_the_stamps_each_do_their_part() {
    // Marks of the sync below would linger in the log for 10 s and cover both images whole
    // (a superset, as designed): with none, the log holds exactly the write after it.
    let p = Pair::with(&[], "[primary]\nintent_linger = \"0s\"\n");
    write_through_mount(&p, "logged.img", &random(32 * MIB, 70));
    write_through_mount(&p, "edited.img", &random(8 * MIB, 71));
    p.sync_ok();
    let f = OpenOptions::new()
        .write(true)
        .open(p.primary.path("logged.img"))
        .unwrap();
    f.write_all_at(&random(4096, 72), 20 * MIB as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    p.primary.kill9();
    write_behind(&p, "edited.img", MIB as u64, &random(4096, 73));

    p.primary.mount();
    let log = p.primary.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("edited.img") && l.contains("changed outside the mount")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("logged.img") && l.contains("changed outside the mount")),
        "{log}"
    );
    let dirty = |name: &str| -> u64 { p.primary.dirty(name).iter().map(|r| r.end - r.start).sum() };
    assert_eq!(dirty("edited.img"), 8 * MIB as u64);
    // One intent-log extent (4 MiB), not the 32 MiB image.
    assert!(
        dirty("logged.img") <= 4 * MIB as u64,
        "{}",
        dirty("logged.img")
    );
    p.sync_ok();
    identical(&p, "logged.img");
    identical(&p, "edited.img");
}

/// A guest that writes again after a quiet spell longer than `intent_linger` waits for no
/// intent-log append where it wrote before (`intent_hot`): those extents are still in the log,
/// so an unclean stop then re-reads them (as `ferry status` says before it); with `intent_hot =
/// "0"` they are forgotten.
#[test]
fn past_the_linger_the_hot_extents_stay_in_the_intent_log() {
    for (hot, kept) in [("", 8 * MIB as u64), ("intent_hot = \"0\"\n", 0)] {
        let p = Pair::with(&[], &format!("[primary]\nintent_linger = \"1s\"\n{hot}"));
        write_through_mount(&p, "vm.img", &random(8 * MIB, 74));
        p.sync_ok();
        // Sync points with nothing to ship, well past the linger.
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            p.sync_ok();
        }
        // `ferry status` says what a crash would re-read now.
        let status = p.primary.status();
        assert_eq!(status["intent_log_bytes"], kept, "{hot:?}: {status}");
        p.primary.kill9();
        p.primary.mount();
        let dirty: u64 = p
            .primary
            .dirty("vm.img")
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert_eq!(dirty, kept, "{hot:?}");
    }
}

/// With `allow_other`, a hypervisor's user (here uid 65534) writing through the mount is the
/// mount's own write, never an outside one; the same user writing the backing file directly is.
#[test]
fn another_users_writes_through_the_mount_are_not_outside_ones() {
    use std::os::unix::fs::PermissionsExt;
    let m = common::Mount::prepare("allow_other");
    fs::set_permissions(m.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    m.mount();
    fs::write(m.path("vm.img"), b"").unwrap();
    std::os::unix::fs::chown(m.path("vm.img"), Some(65534), Some(65534)).unwrap();
    let dd_as_nobody = |target: &std::path::Path| {
        common::run(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "dd"])
                .arg("if=/dev/urandom")
                .arg(format!("of={}", target.display()))
                .args(["bs=64k", "count=16", "conv=notrunc", "status=none"]),
        );
    };
    dd_as_nobody(&m.path("vm.img"));
    let s = m.status();
    assert_eq!(s["dirty_bytes"], 1 << 20, "{s}");
    assert!(s["sync"]["outside"].as_array().unwrap().is_empty(), "{s}");
    dd_as_nobody(&m.backing("vm.img"));
    let s = m.status();
    assert!(
        s["sync"]["outside"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["path"] == "vm.img"),
        "{s}"
    );
}
