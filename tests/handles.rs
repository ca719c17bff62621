//! Open handles across renames and unlinks, through the real mount: writes racing renames of
//! their image are recorded under the name the image ends up with (live and after SIGKILL),
//! and an image unlinked or replaced while open stays writable, as POSIX requires.

mod common;

use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
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
        written.len() > 200 && renames > 50,
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

#[test]
fn an_image_unlinked_or_replaced_while_open_stays_writable() {
    let m = Mount::new();
    let rw = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(m.path(name))
            .unwrap()
    };
    // Unlinked while open: writes, reads and truncates through the handle still work.
    let f = rw("scratch.img");
    f.write_all_at(b"before", 0).unwrap();
    fs::remove_file(m.path("scratch.img")).unwrap();
    f.write_all_at(b"after", 100)
        .expect("write to an unlinked, still open image");
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"after");
    let len = f
        .metadata()
        .expect("fstat of an unlinked, still open image")
        .len();
    assert_eq!(len, 105);
    f.set_len(50)
        .expect("ftruncate of an unlinked, still open image");
    assert_eq!(f.metadata().unwrap().len(), 50);
    f.sync_all().unwrap();
    drop(f);
    // Replaced by a rename while open: the old file stays writable, the new one is untouched.
    fs::write(m.path("new.img"), b"new").unwrap();
    let old = rw("vm.img");
    old.write_all_at(b"old", 0).unwrap();
    fs::rename(m.path("new.img"), m.path("vm.img")).unwrap();
    old.write_all_at(b"OLD", 4096)
        .expect("write to an image replaced while open");
    drop(old);
    assert_eq!(fs::read(m.path("vm.img")).unwrap(), b"new");
    assert_eq!(fs::read(m.backing("vm.img")).unwrap(), b"new");
    // The dirty set names only images that exist.
    let s = m.status();
    let paths: Vec<&str> = s["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["vm.img"]);
    let want: Range<u64> = 0..3;
    assert!(covers(&m.dirty("vm.img"), &want));
}
