//! Differential test of POSIX semantics: the same random sequences of system calls, with random
//! names, modes, flags and callers (root, or uid 65534 through `allow_other`), run against a
//! plain directory and through a ferry mount whose backing directory is on the same
//! filesystem. Every return value and errno must agree, and so must the stat fields that
//! matter (type, mode, nlink, uid, gid, size, explicitly set times). The deviations ferry keeps
//! on purpose are listed in docs/SEMANTICS.md and left out of the generator here.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::Mount;

/// A tiny deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

const NAMES: &[&str] = &["a", "b", "d", "d/x", "d/y", "e", "e/z"];
const MODES: &[u32] = &[
    0o644, 0o600, 0o755, 0o777, 0o400, 0o1777, 0o2775, 0o4755, 0o000,
];

#[derive(Clone, Debug)]
enum Op {
    Open {
        name: &'static str,
        flags: i32,
        mode: u32,
    },
    Mkdir {
        name: &'static str,
        mode: u32,
    },
    Rmdir {
        name: &'static str,
    },
    Unlink {
        name: &'static str,
    },
    Rename {
        from: &'static str,
        to: &'static str,
        flags: u32,
    },
    Symlink {
        target: &'static str,
        name: &'static str,
    },
    Readlink {
        name: &'static str,
    },
    Mkfifo {
        name: &'static str,
        mode: u32,
    },
    Chmod {
        name: &'static str,
        mode: u32,
    },
    Chown {
        name: &'static str,
        uid: u32,
        gid: u32,
    },
    Truncate {
        name: &'static str,
        len: i64,
    },
    Write {
        name: &'static str,
        offset: i64,
        len: usize,
    },
    Utimens {
        name: &'static str,
        mtime: Option<i64>,
    },
    SetXattr {
        name: &'static str,
        attr: &'static str,
        len: usize,
        flags: i32,
    },
    GetXattr {
        name: &'static str,
        attr: &'static str,
    },
    ListXattr {
        name: &'static str,
    },
    RemoveXattr {
        name: &'static str,
        attr: &'static str,
    },
}

const ATTRS: &[&str] = &["user.k", "user.j", "trusted.t", "security.x"];

fn gen_op(r: &mut Rng) -> Op {
    let name = r.pick(NAMES);
    match r.below(15) {
        13 => Op::SetXattr {
            name,
            attr: r.pick(ATTRS),
            len: r.pick(&[0, 5, 300]),
            flags: r.pick(&[0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
        },
        14 => match r.below(3) {
            0 => Op::GetXattr {
                name,
                attr: r.pick(ATTRS),
            },
            1 => Op::ListXattr { name },
            _ => Op::RemoveXattr {
                name,
                attr: r.pick(ATTRS),
            },
        },
        0 | 1 => {
            let acc = r.pick(&[libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR]);
            let mut flags = acc;
            for f in [
                libc::O_CREAT,
                libc::O_EXCL,
                libc::O_TRUNC,
                libc::O_APPEND,
                libc::O_NOFOLLOW,
                libc::O_DIRECTORY,
            ] {
                if r.below(3) == 0 {
                    flags |= f;
                }
            }
            Op::Open {
                name,
                flags,
                mode: r.pick(MODES),
            }
        }
        2 => Op::Mkdir {
            name,
            mode: r.pick(MODES),
        },
        3 => Op::Rmdir { name },
        4 => Op::Unlink { name },
        5 => Op::Rename {
            from: name,
            to: r.pick(NAMES),
            flags: r.pick(&[0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE]),
        },
        6 => Op::Symlink {
            target: r.pick(&["a", "d", "nowhere", "../outside"]),
            name,
        },
        7 => Op::Readlink { name },
        8 => Op::Mkfifo {
            name,
            mode: r.pick(MODES),
        },
        9 => Op::Chmod {
            name,
            mode: r.pick(MODES),
        },
        10 => Op::Chown {
            name,
            uid: r.pick(&[0, 65534]),
            gid: r.pick(&[0, 65534]),
        },
        11 => {
            if r.below(2) == 0 {
                Op::Truncate {
                    name,
                    len: r.pick(&[0, 1, 4096, 100_000]),
                }
            } else {
                Op::Write {
                    name,
                    offset: r.pick(&[0, 10, 8192]),
                    len: r.pick(&[1, 4096, 70_000]),
                }
            }
        }
        _ => Op::Utimens {
            name,
            mtime: r.pick(&[None, Some(1_000_000_000), Some(1_700_000_123)]),
        },
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn ret(r: libc::c_long) -> Result<i64, i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r)
    }
}

/// Runs `op` under `root`; returns the result (a count or 0) or the errno.
fn apply(root: &Path, op: &Op) -> Result<i64, i32> {
    let p = |n: &str| c(&root.join(n));
    unsafe {
        match *op {
            Op::Open { name, flags, mode } => {
                let fd = ret(libc::open(
                    p(name).as_ptr(),
                    flags | libc::O_CLOEXEC | libc::O_NONBLOCK,
                    mode,
                ) as _)?;
                libc::close(fd as i32);
                Ok(0)
            }
            Op::Mkdir { name, mode } => ret(libc::mkdir(p(name).as_ptr(), mode) as _),
            Op::Rmdir { name } => ret(libc::rmdir(p(name).as_ptr()) as _),
            Op::Unlink { name } => ret(libc::unlink(p(name).as_ptr()) as _),
            Op::Rename { from, to, flags } => ret(libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                p(from).as_ptr(),
                libc::AT_FDCWD,
                p(to).as_ptr(),
                flags,
            )),
            Op::Symlink { target, name } => {
                let t = CString::new(target).unwrap();
                ret(libc::symlink(t.as_ptr(), p(name).as_ptr()) as _)
            }
            Op::Readlink { name } => {
                let mut buf = [0u8; 256];
                ret(libc::readlink(p(name).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) as _)
            }
            Op::Mkfifo { name, mode } => ret(libc::mkfifo(p(name).as_ptr(), mode) as _),
            Op::Chmod { name, mode } => ret(libc::chmod(p(name).as_ptr(), mode) as _),
            Op::Chown { name, uid, gid } => ret(libc::lchown(p(name).as_ptr(), uid, gid) as _),
            Op::Truncate { name, len } => ret(libc::truncate(p(name).as_ptr(), len) as _),
            Op::Write { name, offset, len } => {
                let fd = ret(libc::open(
                    p(name).as_ptr(),
                    libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
                ) as _)?;
                let buf = vec![0x5au8; len];
                let r = ret(libc::pwrite(fd as i32, buf.as_ptr().cast(), len, offset) as _);
                libc::close(fd as i32);
                r
            }
            Op::SetXattr {
                name,
                attr,
                len,
                flags,
            } => {
                let a = CString::new(attr).unwrap();
                let v = vec![len as u8; len];
                ret(
                    libc::lsetxattr(p(name).as_ptr(), a.as_ptr(), v.as_ptr().cast(), len, flags)
                        as _,
                )
            }
            Op::GetXattr { name, attr } => {
                let a = CString::new(attr).unwrap();
                let mut buf = [0u8; 1024];
                let n = ret(libc::lgetxattr(
                    p(name).as_ptr(),
                    a.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                ) as _)?;
                // The value's bytes matter too: fold them into the result.
                Ok(n * 1000 + buf[..n as usize].iter().map(|&b| b as i64).sum::<i64>())
            }
            Op::ListXattr { name } => {
                let mut buf = [0u8; 1024];
                ret(libc::llistxattr(p(name).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) as _)
            }
            Op::RemoveXattr { name, attr } => {
                let a = CString::new(attr).unwrap();
                ret(libc::lremovexattr(p(name).as_ptr(), a.as_ptr()) as _)
            }
            Op::Utimens { name, mtime } => {
                let omit = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                };
                let ts = [
                    omit,
                    match mtime {
                        Some(s) => libc::timespec {
                            tv_sec: s,
                            tv_nsec: 0,
                        },
                        None => libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_NOW,
                        },
                    },
                ];
                ret(libc::utimensat(
                    libc::AT_FDCWD,
                    p(name).as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ) as _)
            }
        }
    }
}

/// What must agree of one name: type and mode, links, owner, size (files), and mtime when
/// the last operation set it explicitly.
fn observe(root: &Path, name: &str, with_mtime: bool) -> Option<(u32, u64, u32, u32, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(root.join(name)).ok()?;
    let size = if m.is_dir() { 0 } else { m.size() };
    let mtime = if with_mtime { m.mtime() } else { 0 };
    Some((m.mode(), m.nlink(), m.uid(), m.gid(), size, mtime))
}

/// Runs `f` on this thread as uid/gid 65534 for file-system purposes (setfsuid is per thread).
fn as_nobody<T>(f: impl FnOnce() -> T) -> T {
    unsafe {
        libc::setfsgid(65534);
        libc::setfsuid(65534);
    }
    let r = f();
    unsafe {
        libc::setfsuid(0);
        libc::setfsgid(0);
    }
    r
}

#[test]
fn random_syscall_sequences_agree_with_the_native_filesystem() {
    let m = Mount::prepare("allow_other");
    let native = m.dir.path().join("native");
    std::fs::create_dir(&native).unwrap();
    open_to_all(&[m.dir.path(), &native, &m.source]);
    // The mount's root is the backing directory: give both roots the same mode and owner.
    m.mount();
    agree(&native, &m.mnt, 1..=200);
}

/// With `-o writeback_cache` the kernel caches writes and leaves the clearing of set-user-ID
/// and set-group-ID bits to the daemon (FUSE_HANDLE_KILLPRIV_V2): the same sequences agree.
#[test]
fn with_the_writeback_cache_too() {
    let m = Mount::prepare("allow_other,writeback_cache");
    let native = m.dir.path().join("native");
    std::fs::create_dir(&native).unwrap();
    open_to_all(&[m.dir.path(), &native, &m.source]);
    m.mount();
    agree(&native, &m.mnt, 1..=100);
}

/// Writes, truncates and truncating opens by a user other than root clear set-user-ID and
/// set-group-ID as natively, with and without the writeback cache (where the daemon does it),
/// and the next stat sees it at once.
#[test]
fn writes_by_other_users_clear_set_id_bits_as_natively() {
    for options in ["allow_other", "allow_other,writeback_cache"] {
        let m = Mount::prepare(options);
        let native = m.dir.path().join("native");
        std::fs::create_dir(&native).unwrap();
        open_to_all(&[m.dir.path(), &native, &m.source]);
        m.mount();
        let create = Op::Open {
            name: "a",
            flags: libc::O_CREAT | libc::O_WRONLY,
            mode: 0o6775,
        };
        let chmod = Op::Chmod {
            name: "a",
            mode: 0o6775,
        };
        let steps = [
            create,
            Op::Write {
                name: "a",
                offset: 0,
                len: 10,
            },
            chmod.clone(),
            Op::Truncate { name: "a", len: 1 },
            chmod,
            Op::Open {
                name: "a",
                flags: libc::O_TRUNC | libc::O_WRONLY,
                mode: 0,
            },
        ];
        for (i, op) in steps.iter().enumerate() {
            let here = |root: &Path| {
                let r = as_nobody(|| apply(root, op));
                (r, observe(root, "a", false))
            };
            let (got, want) = (here(&m.mnt), here(&native));
            assert_eq!(got, want, "{options}: step {i} {op:?}");
        }
        let mode = observe(&native, "a", false).unwrap().0;
        assert_eq!(mode & 0o6000, 0, "natively the bits are gone: {mode:o}");
    }
}

/// The backing directory's own path does not count against PATH_MAX: under a backing
/// directory whose path is 3,000 bytes long, 1,255 bytes of directories under the mount make
/// every backing path longer than PATH_MAX (4,096), and the same sequences still agree.
#[test]
fn paths_too_long_for_the_backing_directory_agree_too() {
    let mut m = Mount::prepare("allow_other");
    let native = m.dir.path().join("native");
    m.source = (0..12).fold(m.dir.path().to_path_buf(), |p, _| p.join("b".repeat(250)));
    std::fs::create_dir_all(&m.source).unwrap();
    let deep: PathBuf = (0..5).map(|_| "d".repeat(250)).collect();
    std::fs::create_dir_all(native.join(&deep)).unwrap();
    m.mount();
    std::fs::create_dir_all(m.mnt.join(&deep)).unwrap();
    let (native, mounted) = (native.join(&deep), m.mnt.join(&deep));
    assert!(m.source.join(&deep).join("d/x").as_os_str().len() > libc::PATH_MAX as usize);
    open_to_all(&[m.dir.path(), &native, &mounted]);
    agree(&native, &mounted, 1..=40);
}

/// Mode 1777 (sticky, writable by all), as /tmp.
fn open_to_all(dirs: &[&Path]) {
    use std::os::unix::fs::PermissionsExt;
    for d in dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
}

/// Runs the random sequences `seeds` under `native` and `mounted`, comparing every result and
/// the stat of every name after every call.
fn agree(native: &Path, mounted: &Path, seeds: std::ops::RangeInclusive<u64>) {
    unsafe { libc::umask(0o022) };
    let roots = [native, mounted];
    for seed in seeds {
        // A fresh namespace for each sequence.
        for r in roots {
            for e in std::fs::read_dir(r).unwrap().flatten() {
                let p = e.path();
                let _ = std::process::Command::new("chmod")
                    .arg("-R")
                    .arg("u+rwx")
                    .arg(&p)
                    .output();
                if e.file_type().unwrap().is_dir() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    std::fs::remove_file(&p).unwrap();
                }
            }
        }
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut history = Vec::new();
        for _ in 0..80 {
            let op = gen_op(&mut rng);
            let nobody = rng.below(3) == 0;
            history.push((nobody, op.clone()));
            let run = |root: &Path| {
                if nobody {
                    as_nobody(|| apply(root, &op))
                } else {
                    apply(root, &op)
                }
            };
            let want = run(native);
            let got = run(mounted);
            assert_eq!(
                got, want,
                "seed {seed}: through the mount vs native, after\n{history:#?}"
            );
            // Only the name this step set an mtime on has a known one: every other name's is
            // the wall clock of its own run, which may differ by a second (so is that name's
            // when the step failed on both sides, e.g. another user's EPERM).
            let set_mtime = |name: &str| {
                want.is_ok() && matches!(&op, Op::Utimens { name: n, mtime: Some(_) } if *n == name)
            };
            for name in NAMES {
                assert_eq!(
                    observe(mounted, name, set_mtime(name)),
                    observe(native, name, set_mtime(name)),
                    "seed {seed}: stat of {name} differs, after\n{history:#?}"
                );
            }
        }
    }
}
