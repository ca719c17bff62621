//! Open handles across renames, through the real mount: writes racing renames of their image
//! are recorded under the name the image ends up with (live and after SIGKILL).

mod common;

use std::fs::{self, File};
use std::ops::Range;
use std::process::Command;
use std::time::Duration;

use common::{Mount, covers, require};

/// The racing writes land anywhere in 1 GiB, so that each stands alone in the dirty set.
const SPAN: u64 = 1 << 30;

/// fio writes 4 KiB blocks at random into `d/x.img` through O_DIRECT and Linux AIO (as QEMU
/// does with cache=none, aio=native) while the directory is renamed between `d` and `e` as
/// fast as it goes: nothing in the kernel orders a write to a file against a rename of its
/// directory. Every write fio made (its I/O log has the offsets) must be dirty under the
/// image's final name, live and after a SIGKILL, and nothing under the other one.
#[test]
fn writes_racing_renames_stay_dirty_under_the_final_name() {
    require("fio", "fio");
    let m = Mount::new();
    // Made in the backing directory, so that only fio's writes are dirty.
    fs::create_dir(m.backing("d")).unwrap();
    File::create(m.backing("d/x.img"))
        .unwrap()
        .set_len(SPAN)
        .unwrap();
    let iolog = m.dir.path().join("fio.iolog");
    let mut fio = Command::new("fio")
        .args(["--name=race", "--rw=randwrite", "--bs=4k", "--direct=1"])
        .args(["--ioengine=libaio", "--iodepth=16", "--norandommap"])
        .args(["--time_based", "--runtime=3"])
        .arg(format!("--size={SPAN}"))
        .arg(format!("--filename={}", m.path("d/x.img").display()))
        .arg(format!("--write_iolog={}", iolog.display()))
        .arg("--output=/dev/null")
        .spawn()
        .unwrap();
    // fio keeps its file descriptor; rename while it writes.
    while !fs::exists(&iolog).unwrap() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let dirs = ["d", "e"];
    let (mut cur, mut renames) = (0, 0);
    while fio.try_wait().unwrap().is_none() {
        fs::rename(m.path(dirs[cur]), m.path(dirs[1 - cur])).unwrap();
        cur = 1 - cur;
        renames += 1;
    }
    assert!(fio.wait().unwrap().success(), "fio failed");
    // "time file action offset length" per I/O (fio's I/O log version 3).
    let written: Vec<Range<u64>> = fs::read_to_string(&iolog)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[2] == "write").then(|| {
                let (off, len): (u64, u64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
                off..off + len
            })
        })
        .collect();
    assert!(
        written.len() > 1000 && renames > 100,
        "too little happened to race: {} writes, {renames} renames",
        written.len()
    );
    let last = format!("{}/x.img", dirs[cur]);
    let gone = format!("{}/x.img", dirs[1 - cur]);
    let check = |when: &str| {
        let dirty = m.dirty(&last);
        let missed: Vec<&Range<u64>> = written.iter().filter(|r| !covers(&dirty, r)).collect();
        assert!(
            missed.is_empty(),
            "{when}: {} of {} writes racing {renames} renames are not dirty under {last}, \
             e.g. {:?}",
            missed.len(),
            written.len(),
            &missed[..missed.len().min(5)]
        );
    };
    check("live");
    assert!(
        m.dirty(&gone).is_empty(),
        "dirty ranges left under {gone}, which no longer exists"
    );
    m.kill9();
    m.mount();
    check("after SIGKILL and remount");
}
