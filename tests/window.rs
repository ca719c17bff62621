//! The copy-before-write window after the cut: narrowed to what the replica may still ask for.
//! A write after the cut to bytes the sync still ships is copied first (the replica gets them
//! as they were at the freeze: invariant 3); a write elsewhere is not copied at all.
//! Built only with `--features failpoints` (as `scripts/test` runs the suite): the sync is held
//! at its first data frame (made, not yet sent) while the test writes. That the window keeps
//! what a sync reads while the guest writes is tests/consistency.rs's; this one counts copies.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

const IMAGE: &str = "vm.img";
const SIZE: usize = 4 << 20;

#[test]
fn after_the_cut_only_writes_to_what_the_sync_still_ships_are_copied() {
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("sync.frame.send");
    let dir = flags.path().display().to_string();
    let p = Pair::with_env(&[
        ("FAILPOINTS", "sync.frame.send=return(hold)"),
        ("FERRY_FAILPOINT_DIR", dir.as_str()),
    ]);
    // Every data frame holds until its flag is removed: a helper releases them unless paused.
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let releaser = {
        let (flag, paused, stop) = (flag.clone(), paused.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !paused.load(Ordering::Relaxed) {
                    let _ = fs::remove_file(&flag);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let image = p.primary.path(IMAGE);
    let gen1 = random(SIZE, 1);
    fs::write(&image, &gen1).unwrap();
    p.sync_ok();

    // Generation 2: one 4 KiB block rewritten at 1 MiB (shipped as a patch).
    let at = 1u64 << 20;
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    let gen2_block = random(4096, 2);
    f.write_all_at(&gen2_block, at).unwrap();
    f.sync_all().unwrap();
    let mut gen2 = gen1.clone();
    gen2[at as usize..at as usize + 4096].copy_from_slice(&gen2_block);

    // Held at its first frame, after the cut: write over the block it ships, and far away.
    paused.store(true, Ordering::Relaxed);
    let mnt = p.primary.mnt.clone();
    let syncing = std::thread::spawn(move || sync(&mnt));
    let t = Instant::now();
    while !flag.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the sync never sent a frame"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    f.write_all_at(&random(4096, 3), at).unwrap();
    f.write_all_at(&random(4096, 4), 3 << 20).unwrap();
    f.sync_all().unwrap();
    paused.store(false, Ordering::Relaxed);
    let (v, ok, err) = syncing.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    releaser.join().unwrap();
    assert!(ok, "generation 2 did not commit: {v} {err}");
    assert_eq!(
        fs::read(p.replica_path(IMAGE)).unwrap(),
        gen2,
        "the replica holds the image as it was at the freeze"
    );
    let log = p.primary.log_text();
    assert!(
        log.contains("copy-before-write saved 4096 bytes written during the sync"),
        "only the shipped block is copied, not the write 2 MiB away: {}",
        log.lines()
            .filter(|l| l.contains("copy-before-write"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
