//! The primary mount, through the real kernel: POSIX operations, real qemu clients, sparse
//! images, durability across SIGKILL, the intent log, and bad input.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::process::Command;

use common::{FERRY, Mount, covers, require, run, threads_where};

#[test]
fn posix_operations_reach_the_backing_directory() {
    let m = Mount::new();
    fs::create_dir(m.path("vms")).unwrap();
    fs::write(m.path("vms/a.img"), b"hello ferry").unwrap();
    assert_eq!(fs::read(m.backing("vms/a.img")).unwrap(), b"hello ferry");
    assert_eq!(fs::read(m.path("vms/a.img")).unwrap(), b"hello ferry");

    let f = OpenOptions::new()
        .write(true)
        .open(m.path("vms/a.img"))
        .unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    let back = fs::read(m.backing("vms/a.img")).unwrap();
    assert_eq!(&back[..11], b"HELLO ferry");
    assert_eq!(back.len(), 100);
    assert_eq!(fs::metadata(m.path("vms/a.img")).unwrap().len(), 100);

    fs::set_permissions(m.path("vms/a.img"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.backing("vms/a.img")).unwrap().mode() & 0o777,
        0o600
    );
    fs::rename(m.path("vms/a.img"), m.path("vms/b.img")).unwrap();
    assert!(!m.backing("vms/a.img").exists());
    assert!(m.backing("vms/b.img").exists());
    std::os::unix::fs::symlink("b.img", m.path("vms/link")).unwrap();
    assert_eq!(
        fs::read_link(m.path("vms/link")).unwrap().to_str(),
        Some("b.img")
    );
    let mut names: Vec<String> = fs::read_dir(m.path("vms"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b.img", "link"]);
    fs::remove_file(m.path("vms/link")).unwrap();
    fs::remove_file(m.path("vms/b.img")).unwrap();
    assert!(!m.backing("vms/b.img").exists());
    fs::remove_dir(m.path("vms")).unwrap();
    assert!(!m.backing("vms").exists());
    let st = nix_statvfs(&m.mnt);
    assert!(st > 0, "statfs reports the backing filesystem's size");
}

fn nix_statvfs(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_blocks
}

#[test]
fn qemu_writes_discards_and_reads_images_on_the_mount() {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let m = Mount::new();
    let qcow = m.path("vm.qcow2");
    let raw = m.path("disk.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("1G"));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("256M"));
    // O_DIRECT (cache=none, as VMs run) and buffered writes, discards and reads, scattered.
    for (cache, pattern) in [("none", "0xa5"), ("writeback", "0x3c")] {
        for img in [&qcow, &raw] {
            let fmt = if img == &qcow { "qcow2" } else { "raw" };
            run(Command::new("qemu-io")
                .args(["-f", fmt, "-t", cache])
                .args(["-c", &format!("write -P {pattern} 0 64k")])
                .args(["-c", &format!("write -P {pattern} 7M 4k")])
                .args(["-c", &format!("write -P {pattern} 100M 1M")])
                .args(["-c", "write -z 101M 64k"])
                .args(["-c", "discard 8M 1M"])
                .args(["-c", &format!("read -P {pattern} 7M 4k")])
                .args(["-c", &format!("read -P {pattern} 100M 64k")])
                .args(["-c", "read -P 0 101M 64k"])
                .arg(img));
        }
    }
    run(Command::new("qemu-img").arg("check").arg(&qcow));
    for name in ["vm.qcow2", "disk.raw"] {
        run(Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(m.path(name))
            .arg(m.backing(name)));
    }
    // Every byte qemu wrote into the raw image is in its dirty set.
    let dirty = m.dirty("disk.raw");
    for r in [0..65536, 7 << 20..(7 << 20) + 4096, 100 << 20..101 << 20] {
        assert!(covers(&dirty, &r), "{r:?} not in {dirty:?}");
    }
}

#[test]
fn fallocate_modes_and_sparse_seeks() {
    let m = Mount::new();
    let p = m.path("sparse.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&[7u8; 1 << 20], 4 << 20).unwrap();
    let fd = f.as_raw_fd();
    // SEEK_DATA / SEEK_HOLE through the mount see the backing file's holes.
    let data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) };
    assert_eq!(data, 4 << 20);
    let hole = unsafe { libc::lseek(fd, 4 << 20, libc::SEEK_HOLE) };
    assert_eq!(hole, 5 << 20);
    // Punch a hole, zero a range, allocate past the end, allocate keeping the size.
    let fa = |mode, off: i64, len: i64| {
        assert_eq!(
            unsafe { libc::fallocate(fd, mode, off, len) },
            0,
            "fallocate {mode}"
        );
    };
    fa(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        4 << 20,
        64 << 10,
    );
    fa(
        libc::FALLOC_FL_ZERO_RANGE,
        (4 << 20) + (128 << 10),
        64 << 10,
    );
    fa(0, 16 << 20, 1 << 20);
    fa(libc::FALLOC_FL_KEEP_SIZE, 17 << 20, 1 << 20);
    assert_eq!(f.metadata().unwrap().len(), 17 << 20);
    let mut buf = vec![1u8; 64 << 10];
    f.read_exact_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    f.read_exact_at(&mut buf, (4 << 20) + (128 << 10)).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let collapse = unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 1 << 20) };
    assert_eq!(collapse, -1, "collapse-range would shift data: refused");
    drop(f);
    common::cmp(&p, &m.backing("sparse.img"));
    let dirty = m.dirty("sparse.img");
    for r in [4 << 20..(4 << 20) + 65536, 16 << 20..17 << 20] {
        assert!(covers(&dirty, &r), "{r:?} not in {dirty:?}");
    }
}

#[test]
fn fsync_acknowledged_data_survives_kill9() {
    let m = Mount::new();
    let mut f = File::create(m.path("db.img")).unwrap();
    f.write_all(&[0x42; 3 << 20]).unwrap();
    f.sync_all().unwrap();
    m.kill9();
    assert!(!m.is_mounted());
    let back = fs::read(m.backing("db.img")).unwrap();
    assert_eq!(back.len(), 3 << 20);
    assert!(back.iter().all(|&b| b == 0x42));
    m.mount();
    let mut got = Vec::new();
    File::open(m.path("db.img"))
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, back);
}

#[test]
fn after_kill9_the_logged_extents_are_dirty_and_only_those() {
    let m = Mount::new();
    let f = File::create(m.path("big.img")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    // A clean unmount first: the size change is carried over exactly.
    m.unmount();
    m.mount();
    let f = OpenOptions::new()
        .write(true)
        .open(m.path("big.img"))
        .unwrap();
    let writes = [(1 << 20) + 17, 33 << 20, (50 << 20) + 4095];
    for &off in &writes {
        f.write_all_at(b"ferry!", off).unwrap();
    }
    drop(f);
    m.kill9();
    m.mount();
    let dirty = m.dirty("big.img");
    for &off in &writes {
        assert!(covers(&dirty, &(off..off + 6)), "{off} not in {dirty:?}");
    }
    // Recovery re-reads only the logged extents (4 MiB each), not the whole image.
    let bytes: u64 = dirty.iter().map(|r| r.end - r.start).sum();
    assert!(bytes <= 64 << 20, "{bytes}");
    let (last_clean, _) = (0..64u64 << 20, ());
    assert!(
        covers(&dirty, &last_clean),
        "the size change from before is still dirty"
    );
}

#[test]
fn a_clean_unmount_keeps_the_exact_unsynced_ranges() {
    let m = Mount::new();
    let f = File::create(m.path("x.img")).unwrap();
    f.write_all_at(&[1; 100], 5000).unwrap();
    f.write_all_at(&[2; 10], 9 << 20).unwrap();
    drop(f);
    let before = m.dirty("x.img");
    m.unmount();
    m.mount();
    assert_eq!(m.dirty("x.img"), before);
    assert_eq!(before, vec![5000..5100, (9 << 20)..(9 << 20) + 10]);
}

#[test]
fn renames_carry_the_dirty_ranges() {
    let m = Mount::new();
    fs::create_dir(m.path("a")).unwrap();
    let f = File::create(m.path("a/disk.img")).unwrap();
    f.write_all_at(&[1; 4096], 1 << 20).unwrap();
    drop(f);
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert!(m.dirty("a/disk.img").is_empty());
    assert!(covers(
        &m.dirty("b/disk.img"),
        &((1 << 20)..(1 << 20) + 4096)
    ));
    fs::rename(m.path("b/disk.img"), m.path("top.img")).unwrap();
    assert!(covers(&m.dirty("top.img"), &((1 << 20)..(1 << 20) + 4096)));
}

#[test]
fn the_mount_helper_form_and_fstab_work() {
    require("mount.fuse3", "fuse3");
    let m = Mount::prepare("");
    // `ferry SOURCE MOUNTPOINT -o OPTS`, as mount.fuse3 runs it.
    run(Command::new(FERRY)
        .arg(&m.source)
        .arg(&m.mnt)
        .arg("-o")
        .arg(&m.options));
    assert!(m.is_mounted());
    fs::write(m.path("f"), b"x").unwrap();
    m.unmount();
    // mount(8) runs helpers with the default PATH, where an installed ferry lives: put this
    // build there for the test (moving any installed one aside, and back afterwards).
    let _installed = Installed::new(std::path::Path::new("/usr/local/sbin/ferry"));
    let fstab = m.dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "{} {} fuse.ferry {},allow_other,noauto,_netdev 0 0\n",
            m.source.display(),
            m.mnt.display(),
            m.options
        ),
    )
    .unwrap();
    run(Command::new("mount").arg("-T").arg(&fstab).arg(&m.mnt));
    assert!(m.is_mounted());
    assert_eq!(fs::read(m.path("f")).unwrap(), b"x");
    m.unmount();
    // mount -t fuse.ferry SOURCE MOUNTPOINT -o config=FILE
    run(Command::new("mount")
        .args(["-t", "fuse.ferry"])
        .arg(&m.source)
        .arg(&m.mnt)
        .arg("-o")
        .arg(&m.options));
    assert!(m.is_mounted());
    m.unmount();
}

/// This build of ferry at `path` for the life of the value.
struct Installed {
    path: std::path::PathBuf,
    aside: Option<std::path::PathBuf>,
}

impl Installed {
    fn new(path: &std::path::Path) -> Installed {
        let aside = fs::symlink_metadata(path).is_ok().then(|| {
            let a = path.with_extension("ferry-test-aside");
            fs::rename(path, &a).unwrap();
            a
        });
        std::os::unix::fs::symlink(FERRY, path).unwrap();
        Installed {
            path: path.to_path_buf(),
            aside,
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(a) = &self.aside {
            let _ = fs::rename(a, &self.path);
        }
    }
}

fn fails(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(FERRY).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn background_cpus_the_daemon_may_not_use_are_refused_and_nothing_is_mounted() {
    let m = Mount::prepare_with("", "background_cpus = \"1023\"\n");
    let e = fails(&[
        "mount".as_ref(),
        m.source.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        m.options.as_ref(),
    ]);
    assert!(
        e.contains("[node] background_cpus")
            && e.contains("CPU 1023 is not one this process may run on (it may use "),
        "{e}"
    );
    assert!(!m.is_mounted());
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let m = Mount::prepare("");
    let o = m.options.as_str();
    let missing = m.dir.path().join("nope");
    let file = m.dir.path().join("ferry.toml");
    let e = fails(&[
        "mount".as_ref(),
        missing.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        o.as_ref(),
    ]);
    assert!(
        e.contains("backing directory") && e.contains("not found"),
        "{e}"
    );
    let e = fails(&[
        "mount".as_ref(),
        file.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        o.as_ref(),
    ]);
    assert!(e.contains("not a directory"), "{e}");
    let e = fails(&[
        "mount".as_ref(),
        m.source.as_ref(),
        missing.as_ref(),
        "-o".as_ref(),
        o.as_ref(),
    ]);
    assert!(e.contains("mountpoint") && e.contains("not found"), "{e}");
    let bad = format!("{o},frobnicate");
    let e = fails(&[
        "mount".as_ref(),
        m.source.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        bad.as_ref(),
    ]);
    assert!(e.contains("unknown mount option \"frobnicate\""), "{e}");
    let badcfg = m.dir.path().join("bad.toml");
    fs::write(&badcfg, "[primary]\nsync_interval = \"soon\"\n").unwrap();
    let opt = format!("config={}", badcfg.display());
    let e = fails(&[
        "mount".as_ref(),
        m.source.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        opt.as_ref(),
    ]);
    assert!(e.contains("bad.toml") && e.contains("sync_interval"), "{e}");
    m.mount();
    let e = fails(&[
        "mount".as_ref(),
        m.source.as_ref(),
        m.mnt.as_ref(),
        "-o".as_ref(),
        o.as_ref(),
    ]);
    assert!(e.contains("already a mountpoint"), "{e}");
    let e = fails(&["status".as_ref(), m.dir.path().as_ref()]);
    assert!(e.contains("not a ferry mount"), "{e}");
}

#[test]
fn a_full_backing_filesystem_fails_the_write_with_enospc_and_loses_no_range() {
    common::require_root();
    let m = Mount::prepare("");
    // A 4 MiB tmpfs as the backing directory; the intent log lives elsewhere.
    let _tmpfs = common::Tmpfs::mount(&m.source, "4m");
    m.mount();
    let mut f = File::create(m.path("full.img")).unwrap();
    let chunk = vec![9u8; 1 << 20];
    let mut written = 0u64;
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(
            written < 16 << 20,
            "a 4 MiB filesystem took {written} bytes"
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);
    let dirty = m.dirty("full.img");
    assert!(covers(&dirty, &(0..written)), "{dirty:?} vs {written}");
    // Whatever reached the backing file is covered too.
    let len = fs::metadata(m.backing("full.img")).unwrap().len();
    assert!(covers(&dirty, &(0..len)), "{dirty:?} vs {len}");
    m.unmount();
}

/// O_DIRECT opens are served as FUSE direct I/O with parallel writes (a virtio queue keeps many
/// in flight): 8 threads writing 4 KiB blocks at once through one O_DIRECT descriptor all land
/// and are all tracked; a read-write mapping of an O_DIRECT-opened image works and its stores
/// are tracked too.
#[test]
fn parallel_o_direct_writes_and_mappings_are_all_tracked() {
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let m = Mount::new();
    let path = m.path("direct.img");
    File::create(&path).unwrap().set_len(8 << 20).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let f = &f;
            s.spawn(move || {
                let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).unwrap();
                let buf = unsafe { std::alloc::alloc(layout) };
                let block = unsafe { std::slice::from_raw_parts_mut(buf, BLOCK) };
                for i in 0..64u64 {
                    let n = i * 8 + t; // blocks 0..512, each written once
                    block.fill((n % 251) as u8 + 1);
                    f.write_all_at(block, n * 2 * BLOCK as u64).unwrap();
                }
                unsafe { std::alloc::dealloc(buf, layout) };
            });
        }
    });
    let backing = fs::read(m.backing("direct.img")).unwrap();
    for n in 0..512u64 {
        let at = (n * 2) as usize * BLOCK;
        assert!(
            backing[at..at + BLOCK]
                .iter()
                .all(|&b| b == (n % 251) as u8 + 1),
            "block {n}"
        );
        assert!(covers(
            &m.dirty("direct.img"),
            &(at as u64..(at + BLOCK) as u64)
        ));
    }

    // A shared mapping of the O_DIRECT descriptor.
    let len = 1 << 20;
    let at = 6 << 20;
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            at as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    unsafe {
        std::ptr::write_bytes(p.cast::<u8>().add(4096), 0x5a, 8192);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
    drop(f);
    let backing = fs::read(m.backing("direct.img")).unwrap();
    assert!(
        backing[at + 4096..at + 4096 + 8192]
            .iter()
            .all(|&b| b == 0x5a)
    );
    assert!(covers(
        &m.dirty("direct.img"),
        &((at + 4096) as u64..(at + 4096 + 8192) as u64)
    ));
}

/// Pages of `path` in the host's page cache, and its size in pages (mincore of a mapping).
fn resident_pages(path: &std::path::Path) -> (usize, usize) {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    let pages = len.div_ceil(page);
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        (vec.iter().filter(|&&b| b & 1 != 0).count(), pages)
    }
}

/// O_DIRECT reads and writes of 1 MiB through a mount with `options`, after the backing
/// file's pages were dropped from the page cache; returns how many of its pages are cached.
fn cached_after_direct_io(options: &str) -> (usize, usize) {
    let m = Mount::with_options(options);
    let data = common::random(16 << 20, 9);
    fs::write(m.path("vm.raw"), &data).unwrap();
    let backing = File::open(m.backing("vm.raw")).unwrap();
    backing.sync_all().unwrap();
    let r = unsafe { libc::posix_fadvise(backing.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    assert_eq!(resident_pages(&m.backing("vm.raw")).0, 0, "not dropped");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("vm.raw"))
        .unwrap();
    // An aligned buffer, as O_DIRECT callers use.
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let skew = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skew..skew + (1 << 20)];
    for i in 0..8u64 {
        f.read_exact_at(buf, i << 20).unwrap();
        assert!(*buf == data[(i << 20) as usize..((i + 1) << 20) as usize]);
    }
    buf.fill(0x77);
    for i in 8..16u64 {
        f.write_all_at(buf, i << 20).unwrap();
    }
    drop(f);
    let back = fs::read(m.backing("vm.raw")).unwrap();
    assert!(back[..8 << 20] == data[..8 << 20] && back[8 << 20..].iter().all(|&b| b == 0x77));
    // Reading it back above cached it; measure what the O_DIRECT I/O left, again.
    let backing = File::open(m.backing("vm.raw")).unwrap();
    unsafe { libc::posix_fadvise(backing.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(m.path("vm.raw"))
        .unwrap();
    for i in 0..16u64 {
        f.read_exact_at(buf, i << 20).unwrap();
    }
    resident_pages(&m.backing("vm.raw"))
}

/// `-o direct_backing`: a guest's O_DIRECT I/O (QEMU cache=none) leaves nothing of the image in
/// the host's page cache; without it, the backing file is cached (the default, documented).
#[test]
fn direct_backing_keeps_o_direct_io_out_of_the_host_page_cache() {
    let (cached, pages) = cached_after_direct_io("direct_backing");
    assert_eq!(
        cached, 0,
        "{cached} of {pages} pages cached with direct_backing"
    );
    let (cached, pages) = cached_after_direct_io("");
    assert!(
        cached > pages / 2,
        "{cached} of {pages} pages cached without it"
    );
}

#[test]
fn request_threads_ask_for_the_shortest_slice_and_sync_threads_run_at_nice_10() {
    let m = Mount::new();
    let path = m.path("vm.img");
    let f = File::create(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    // Writes from several threads at once, so more than one worker serves requests.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let f = &f;
            s.spawn(move || {
                for i in 0..64u64 {
                    f.write_all_at(&[t as u8 + 1; 4096], (i * 4 + t) * 4096)
                        .unwrap();
                    f.sync_data().unwrap();
                }
            });
        }
    });
    let workers = threads_where(m.pid(), "FUSE workers", |n| n.starts_with("fuser"));
    assert!(workers.iter().all(|t| t.1 == 0), "{workers:?}");
    if workers.iter().any(|t| t.2.is_some()) {
        // The kernel reports slices (6.6+) and keeps a custom one (6.12+): one worker at least
        // served the writes above with the 0.1 ms slice.
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        if (v.next().unwrap(), v.next().unwrap()) >= (6, 12) {
            assert!(workers.iter().any(|t| t.2 == Some(100_000)), "{workers:?}");
        }
    }
    let sync = threads_where(m.pid(), "sync threads", |n| {
        n.starts_with("ferry-chunk") || n == "sync-points"
    });
    assert!(sync.iter().all(|t| t.1 == 10), "{sync:?}");
}
