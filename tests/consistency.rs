//! Invariant 3: a generation is the images' content at the freeze instant, though the guest
//! goes on writing (copy-before-write window).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Pair;
use common::stamps::{Aligned, BLOCK, open_direct, prefix, stamp};

const BLOCKS: u64 = 4096;

#[test]
fn every_generation_holds_exactly_the_stamps_1_to_m() {
    let p = Pair::new();
    let path = p.primary.path("stamps.img");
    fs::File::create(&path)
        .unwrap()
        .set_len(BLOCKS * BLOCK as u64)
        .unwrap();
    p.sync_ok();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let f = open_direct(&path);
            let mut buf = Aligned::new();
            for i in 1..=BLOCKS {
                buf.bytes().copy_from_slice(&stamp(i));
                f.write_all_at(buf.bytes(), (i - 1) * BLOCK as u64).unwrap();
                std::thread::sleep(Duration::from_micros(400));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut seen = Vec::new();
    loop {
        let finished = done.load(Ordering::SeqCst);
        let v = p.sync_ok();
        assert_eq!(v["committed"], 1, "{v}");
        seen.push(prefix(&fs::read(p.replica_path("stamps.img")).unwrap()));
        if finished {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(
        *seen.last().unwrap(),
        BLOCKS,
        "the last sync holds every stamp"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "generations go forward: {seen:?}"
    );
    let mid = seen.iter().filter(|&&m| m > 0 && m < BLOCKS).count();
    assert!(mid >= 2, "syncs must land while the writer runs: {seen:?}");
}

#[test]
fn the_images_of_a_group_are_cut_at_one_instant() {
    let p = Pair::new();
    let (a, b) = (p.primary.path("disk-a.img"), p.primary.path("disk-b.img"));
    for path in [&a, &b] {
        fs::File::create(path)
            .unwrap()
            .set_len(BLOCKS * BLOCK as u64)
            .unwrap();
    }
    p.sync_ok();
    let done = Arc::new(AtomicBool::new(false));
    // Stamp i goes to disk A, then to disk B: at any instant B holds i or i - 1 stamps when A
    // holds i.
    let writer = {
        let (done, a, b) = (done.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let (fa, fb) = (open_direct(&a), open_direct(&b));
            let mut buf = Aligned::new();
            for i in 1..=BLOCKS / 2 {
                buf.bytes().copy_from_slice(&stamp(i));
                fa.write_all_at(buf.bytes(), (i - 1) * BLOCK as u64)
                    .unwrap();
                std::thread::sleep(Duration::from_micros(300));
                fb.write_all_at(buf.bytes(), (i - 1) * BLOCK as u64)
                    .unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut pairs = Vec::new();
    loop {
        let finished = done.load(Ordering::SeqCst);
        p.sync_ok();
        let ma = prefix(&fs::read(p.replica_path("disk-a.img")).unwrap());
        let mb = prefix(&fs::read(p.replica_path("disk-b.img")).unwrap());
        assert!(
            mb == ma || mb + 1 == ma,
            "disk A at {ma}, disk B at {mb}: not one instant"
        );
        pairs.push((ma, mb));
        if finished {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(*pairs.last().unwrap(), (BLOCKS / 2, BLOCKS / 2));
    assert!(
        pairs
            .iter()
            .filter(|(a, _)| *a > 0 && *a < BLOCKS / 2)
            .count()
            >= 2,
        "{pairs:?}"
    );
}
