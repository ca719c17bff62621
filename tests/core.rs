//! The reference model run against the filesystem core in this process: no FUSE, no root, no
//! daemon, fast enough for thousands of operations in every `cargo test`. The same model as
//! tests/model.rs (which runs through the kernel on a real mount, a smaller suite for the
//! kernel path): random writes, hole punches, zero ranges, truncates, renames (also over
//! another image and of a directory), unlinks, re-creations, clean restarts and crashes of the
//! core, checked after every step:
//!
//! - every backing file equals the model, and the directory holds exactly the model's names;
//! - the dirty ranges of the tracker cover every byte that differs from what the image held at
//!   the start (bytes past the shorter end compare as zeros; a created image started as
//!   nothing), following the image through renames;
//! - after a clean restart the dirty ranges are exactly those from before it; after a crash
//!   (the intent log not closed) they still cover every change.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::bytes;
use ferry::dirty::{FILE_NAME, IntentLog};
use ferry::fs::{Caller, Fs, Ino, ROOT, SetAttr, Tracker, falloc};
use ferry::testutil::random;
use proptest::prelude::*;

const EXTENT: u64 = 64 << 10;
const NAMES: [&str; 5] = ["a.img", "b.img", "c.img", "d/x.img", "d/y.img"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        img: usize,
        at: u64,
        len: u64,
        seed: u64,
    },
    Punch {
        img: usize,
        at: u64,
        len: u64,
    },
    ZeroRange {
        img: usize,
        at: u64,
        len: u64,
        keep_size: bool,
    },
    Truncate {
        img: usize,
        to: u64,
    },
    Rename {
        img: usize,
        to: usize,
    },
    RenameDir,
    /// renameat2 with RENAME_EXCHANGE of two images.
    Exchange {
        img: usize,
        with: usize,
    },
    Unlink {
        img: usize,
    },
    Create {
        name: usize,
        len: u64,
        seed: u64,
    },
    Restart {
        clean: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let img = 0usize..5;
    let at = 0u64..400_000;
    let len = prop_oneof![1u64..64, 1u64..=8192, 1u64..=200_000];
    prop_oneof![
        30 => (img.clone(), at.clone(), len.clone(), any::<u64>())
            .prop_map(|(img, at, len, seed)| Op::Write { img, at, len, seed }),
        6 => (img.clone(), at.clone(), len.clone()).prop_map(|(img, at, len)| Op::Punch { img, at, len }),
        6 => (img.clone(), at.clone(), len, any::<bool>())
            .prop_map(|(img, at, len, keep_size)| Op::ZeroRange { img, at, len, keep_size }),
        8 => (img.clone(), at).prop_map(|(img, to)| Op::Truncate { img, to }),
        6 => (img.clone(), 0usize..5).prop_map(|(img, to)| Op::Rename { img, to }),
        2 => Just(Op::RenameDir),
        3 => (img.clone(), 0usize..5).prop_map(|(img, with)| Op::Exchange { img, with }),
        3 => img.clone().prop_map(|img| Op::Unlink { img }),
        4 => (0usize..5, 0u64..200_000, any::<u64>())
            .prop_map(|(name, len, seed)| Op::Create { name, len, seed }),
        2 => any::<bool>().prop_map(|clean| Op::Restart { clean }),
    ]
}

/// The core over a backing directory, with its tracker and intent log.
struct Core {
    root: PathBuf,
    log: PathBuf,
    fs: Fs,
    tracker: Arc<Tracker>,
}

impl Core {
    fn open(root: &Path, log: &Path) -> Core {
        let (intent, recovery) = IntentLog::open(log, EXTENT).unwrap();
        let tracker = Arc::new(Tracker::new(intent, recovery.dirty));
        let fs = Fs::new(root, false, tracker.clone()).unwrap();
        Core {
            root: root.to_path_buf(),
            log: log.to_path_buf(),
            fs,
            tracker,
        }
    }

    fn me() -> Caller {
        Caller {
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        }
    }

    /// The inode of a relative path, looked up component by component.
    fn ino(&self, path: &str) -> Ino {
        let mut ino = ROOT;
        for c in Path::new(path).components() {
            ino = self.fs.lookup(ino, c.as_os_str()).unwrap().ino;
        }
        ino
    }

    /// The parent's inode and the last name.
    fn parent(&self, path: &str) -> (Ino, String) {
        let p = Path::new(path);
        let parent = p.parent().unwrap().to_str().unwrap();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        (
            if parent.is_empty() {
                ROOT
            } else {
                self.ino(parent)
            },
            name,
        )
    }

    fn with_handle<T>(&self, path: &str, f: impl FnOnce(u64) -> T) -> T {
        let fh = self.fs.open(self.ino(path), libc::O_RDWR).unwrap();
        let r = f(fh);
        self.fs.release(fh);
        r
    }

    fn dirty(&self) -> BTreeMap<String, Vec<Range<u64>>> {
        self.tracker
            .dirty()
            .into_iter()
            .map(|(p, r)| (p.to_string_lossy().into_owned(), r))
            .collect()
    }
}

/// Deterministic bytes from a seed: every fifth seed gives zeros.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    if seed % 5 == 0 {
        vec![0; len]
    } else {
        random(len, seed)
    }
}

struct Model {
    /// Current path -> content.
    files: BTreeMap<String, Vec<u8>>,
    /// Current path -> the content it had at the start (follows renames).
    start: BTreeMap<String, Vec<u8>>,
    /// Which directory the `d/` images live in now.
    dir: &'static str,
}

impl Model {
    fn name(&self, i: usize) -> String {
        NAMES[i].replacen("d/", &format!("{}/", self.dir), 1)
    }
}

fn check(core: &Core, m: &Model) {
    // The backing tree holds exactly the model's files, with its content.
    let mut on_disk = BTreeMap::new();
    for dir in ["", "d", "e"] {
        let Ok(rd) = std::fs::read_dir(core.root.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_file() {
                let rel = Path::new(dir).join(e.file_name());
                let rel = rel.to_str().unwrap().to_string();
                on_disk.insert(rel.clone(), std::fs::read(core.root.join(&rel)).unwrap());
            }
        }
    }
    assert_eq!(
        on_disk.keys().collect::<Vec<_>>(),
        m.files.keys().collect::<Vec<_>>()
    );
    for (p, b) in &m.files {
        assert!(on_disk[p] == *b, "{p} differs from the model");
    }
    // Every changed byte is covered by the dirty ranges of its current name.
    let dirty = core.dirty();
    for (p, now) in &m.files {
        let was = &m.start[p];
        let ranges = dirty.get(p).cloned().unwrap_or_default();
        let n = now.len().max(was.len());
        let at = |b: &Vec<u8>, i: usize| b.get(i).copied().unwrap_or(0);
        let mut i = 0;
        while i < n {
            if at(now, i) != at(was, i) {
                let i64 = i as u64;
                assert!(
                    ranges.iter().any(|r| r.contains(&i64)),
                    "{p}: byte {i} changed but is not dirty (ranges {ranges:?})"
                );
            }
            i += 1;
        }
    }
}

fn apply(core: &mut Core, m: &mut Model, op: &Op) {
    match *op {
        Op::Write { img, at, len, seed } => {
            let p = m.name(img);
            let Some(f) = m.files.get_mut(&p) else { return };
            let data = fill(seed, len as usize);
            core.with_handle(&p, |fh| core.fs.write(fh, at, &data).unwrap());
            bytes::write(f, at, &data);
        }
        Op::Punch { img, at, len } => {
            let p = m.name(img);
            let Some(f) = m.files.get_mut(&p) else { return };
            let mode = falloc::PUNCH_HOLE | falloc::KEEP_SIZE;
            core.with_handle(&p, |fh| core.fs.fallocate(fh, at, len, mode).unwrap());
            bytes::zero(f, at, len, true);
        }
        Op::ZeroRange {
            img,
            at,
            len,
            keep_size,
        } => {
            let p = m.name(img);
            let Some(f) = m.files.get_mut(&p) else { return };
            let mode = falloc::ZERO_RANGE | if keep_size { falloc::KEEP_SIZE } else { 0 };
            core.with_handle(&p, |fh| core.fs.fallocate(fh, at, len, mode).unwrap());
            bytes::zero(f, at, len, keep_size);
        }
        Op::Truncate { img, to } => {
            let p = m.name(img);
            let Some(f) = m.files.get_mut(&p) else { return };
            let set = SetAttr {
                size: Some(to),
                ..Default::default()
            };
            core.fs.setattr(core.ino(&p), None, set).unwrap();
            f.resize(to as usize, 0);
        }
        Op::Rename { img, to } => {
            let (from, to) = (m.name(img), m.name(to));
            if from == to || !m.files.contains_key(&from) {
                return;
            }
            let (fp, fname) = core.parent(&from);
            let (tp, tname) = core.parent(&to);
            core.fs
                .rename(fp, OsStr::new(&fname), tp, OsStr::new(&tname), 0)
                .unwrap();
            let f = m.files.remove(&from).unwrap();
            let s = m.start.remove(&from).unwrap();
            m.files.insert(to.clone(), f);
            m.start.insert(to, s);
        }
        Op::Exchange { img, with } => {
            let (a, b) = (m.name(img), m.name(with));
            if a == b || !m.files.contains_key(&a) || !m.files.contains_key(&b) {
                return;
            }
            let (ap, aname) = core.parent(&a);
            let (bp, bname) = core.parent(&b);
            core.fs
                .rename(
                    ap,
                    OsStr::new(&aname),
                    bp,
                    OsStr::new(&bname),
                    libc::RENAME_EXCHANGE,
                )
                .unwrap();
            for map in [&mut m.files, &mut m.start] {
                let (va, vb) = (map.remove(&a).unwrap(), map.remove(&b).unwrap());
                map.insert(a.clone(), vb);
                map.insert(b.clone(), va);
            }
        }
        Op::RenameDir => {
            let next = if m.dir == "d" { "e" } else { "d" };
            core.fs
                .rename(ROOT, OsStr::new(m.dir), ROOT, OsStr::new(next), 0)
                .unwrap();
            let prefix = format!("{}/", m.dir);
            for map in [&mut m.files, &mut m.start] {
                let moved: Vec<String> = map
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .cloned()
                    .collect();
                for k in moved {
                    let v = map.remove(&k).unwrap();
                    map.insert(format!("{next}/{}", &k[2..]), v);
                }
            }
            m.dir = next;
        }
        Op::Unlink { img } => {
            let p = m.name(img);
            if m.files.remove(&p).is_none() {
                return;
            }
            m.start.remove(&p);
            let (parent, name) = core.parent(&p);
            core.fs.unlink(parent, OsStr::new(&name)).unwrap();
        }
        Op::Create { name, len, seed } => {
            let p = m.name(name);
            let (parent, leaf) = core.parent(&p);
            if m.files.contains_key(&p) {
                core.fs.unlink(parent, OsStr::new(&leaf)).unwrap();
            }
            let data = fill(seed, len as usize);
            let (_, fh) = core
                .fs
                .create(parent, OsStr::new(&leaf), 0o644, libc::O_RDWR, Core::me())
                .unwrap();
            core.fs.write(fh, 0, &data).unwrap();
            core.fs.release(fh);
            m.files.insert(p.clone(), data);
            m.start.insert(p, vec![]);
        }
        Op::Restart { clean } => {
            let before = core.dirty();
            if clean {
                core.tracker.close_clean().unwrap();
            }
            let (root, log) = (core.root.clone(), core.log.clone());
            // Dropping the core without a clean close is what a crash leaves behind.
            *core = Core::open(&root, &log);
            if clean {
                assert_eq!(
                    core.dirty(),
                    before,
                    "a clean restart changed the dirty ranges"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_core_agrees_with_the_model_and_tracks_every_change(
        ops in prop::collection::vec(op(), 1..60),
        sizes in prop::collection::vec(0usize..300_000, 5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("backing");
        std::fs::create_dir_all(root.join("d")).unwrap();
        let mut m = Model { files: BTreeMap::new(), start: BTreeMap::new(), dir: "d" };
        for (i, name) in NAMES.iter().enumerate() {
            let b = random(sizes[i], i as u64 + 100);
            std::fs::write(root.join(name), &b).unwrap();
            m.files.insert(name.to_string(), b.clone());
            m.start.insert(name.to_string(), b);
        }
        let log = dir.path().join(FILE_NAME);
        let mut core = Core::open(&root, &log);
        for op in &ops {
            apply(&mut core, &mut m, op);
            check(&core, &m);
        }
        // Every case ends with a crash: the intent log still covers every change.
        apply(&mut core, &mut m, &Op::Restart { clean: false });
        check(&core, &m);
    }
}
