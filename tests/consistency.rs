//! Invariant 3: a generation is the images' content at the freeze instant, though the guest
//! goes on writing (copy-before-write window).

mod common;

use std::fs;
use std::time::Duration;

use common::Pair;
use common::stamps::{self, Stamper, prefix};

const BLOCKS: u64 = 4096;

#[test]
fn every_generation_holds_exactly_the_stamps_1_to_m() {
    let p = Pair::new();
    let path = p.primary.path("stamps.img");
    stamps::create(std::slice::from_ref(&path), BLOCKS);
    p.sync_ok();
    let writer = Stamper::start(&[path], BLOCKS, Duration::from_micros(400));
    let mut seen = Vec::new();
    loop {
        let finished = writer.done();
        let v = p.sync_ok();
        assert_eq!(v["committed"], 1, "{v}");
        seen.push(prefix(&fs::read(p.replica_path("stamps.img")).unwrap()));
        if finished {
            break;
        }
    }
    writer.join();
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
    let disks = [p.primary.path("disk-a.img"), p.primary.path("disk-b.img")];
    stamps::create(&disks, BLOCKS / 2);
    p.sync_ok();
    // Stamp i goes to disk A, then to disk B: at any instant B holds i or i - 1 stamps when A
    // holds i.
    let writer = Stamper::start(&disks, BLOCKS / 2, Duration::from_micros(300));
    let mut pairs = Vec::new();
    loop {
        let finished = writer.done();
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
    writer.join();
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
