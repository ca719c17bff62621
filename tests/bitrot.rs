//! Bit rot in ferry's own files (issue 16): a flipped byte in a manifest or a generation
//! record, on either side, is detected (the manifests' checksums, the records' parse) and
//! mended from what the other copies hold: the image itself, the restore points, the
//! replica's answers. Each case ends with a sync that commits a 4 KiB change without sending
//! the image again. (Bit rot in an image, a staging journal or the intent log: tests named in
//! docs/RELIABILITY.md, "Bit rot".)

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;

const MIB: usize = 1 << 20;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn flip(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x04;
    fs::write(path, b).unwrap();
}

/// The one file under `dir` whose path ends with `suffix`.
fn find(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = files(dir)
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{suffix} under {}: {found:?}",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

/// Generation 1 of a 4 MiB image committed, then 4 KiB of it changed through the mount; then
/// `damage` flips a byte in one of ferry's files (with the daemon owning it stopped, and
/// started again after). A sync must then commit and leave the replica equal to the primary,
/// without sending the image again; `warning` must be in the owning daemon's log.
fn survives(file: &str, replica_side: bool, at: usize, warning: &str) {
    let mut p = Pair::new();
    let mut image = random(4 * MIB, 1);
    fs::write(p.primary.path("vm.img"), &image).unwrap();
    p.sync_ok();
    let change = random(4096, 2);
    image[MIB..MIB + 4096].copy_from_slice(&change);
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(p.primary.path("vm.img"))
            .unwrap();
        f.write_all_at(&change, MIB as u64).unwrap();
        f.sync_all().unwrap();
    }
    if replica_side {
        p.replica.stop();
        flip(&find(&p.replica.store, file), at);
        p.replica.start();
    } else {
        p.primary.unmount();
        flip(&find(&p.primary.state, file), at);
        p.primary.mount();
    }
    let v = p.sync_ok();
    assert!(
        fs::read(p.replica_path("vm.img")).unwrap() == image,
        "{file}: the replica differs from the primary after the sync: {v}"
    );
    let sent = v["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < (MIB as u64) / 2,
        "{file}: {sent} bytes sent for a 4 KiB change: {v}"
    );
    let log = if replica_side {
        p.replica.log_text()
    } else {
        p.primary.log_text()
    };
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(warning)),
        "{file}: no warning with {warning:?}:\n{log}"
    );
}

#[test]
fn a_flipped_byte_in_the_primarys_active_manifest_costs_a_full_re_read_not_a_resend() {
    survives(
        "active/manifests/vm.img.manifest",
        false,
        700,
        "vm.img.manifest",
    );
}

#[test]
fn a_flipped_byte_in_what_the_primary_knows_of_a_replica_is_mended_by_asking_it() {
    survives(
        "peers/site-b/manifests/vm.img.manifest",
        false,
        700,
        "vm.img.manifest",
    );
}

#[test]
fn a_flipped_byte_in_the_primarys_generation_record_is_made_again() {
    survives("active/generation.json", false, 0, "was damaged");
}

#[test]
fn a_flipped_byte_in_the_primarys_record_of_a_replica_is_made_again() {
    survives("peers/site-b/generation.json", false, 0, "was damaged");
}

#[test]
fn a_flipped_byte_in_a_replicas_manifest_is_made_again_from_its_image() {
    survives(
        "test/.ferry/manifests/vm.img.manifest",
        true,
        700,
        "manifest is damaged",
    );
}

#[test]
fn a_flipped_byte_in_a_replicas_generation_record_is_made_again_from_its_restore_points() {
    survives("test/.ferry/generation", true, 0, "was damaged");
}
