//! Reference-model test through the real mount (after mountpoint-s3's `tests/reftests/`).
//!
//! Each proptest case fills a backing directory with three images (one in a subdirectory),
//! mounts it, and applies a random sequence of operations both to the files on the mount and
//! to an in-memory model (path -> bytes): writes (buffered and O_DIRECT, inside and past the
//! end), hole punches, zero ranges, truncates (by handle and by path, growing and shrinking),
//! fsyncs, renames of images (also over another image) and of the directory, unlinks and
//! re-creations, clean remounts and SIGKILLs of the daemon, and writes and truncates through
//! kept handles, which follow their image through renames and outlive its unlink (the content
//! of such an orphan is checked through its handle). After every step:
//!
//! - every image read through the mount, and its backing file, equal the model, and so do
//!   the sizes and the names in the directories;
//! - the dirty ranges the daemon reports (`ferry status --ranges`) cover every byte that
//!   differs from the content the image had at the start of the case. Bytes past the shorter
//!   end compare as zeros: the sync engine treats a size change itself as a dirty run, so the
//!   dirty set need not repeat it. Images created during the case started as nothing (every
//!   non-zero byte must be covered). The start content follows an image through renames, so
//!   the dirty ranges must too;
//! - no dirty range stays under a name that no longer exists (until an unclean stop, whose
//!   recovery may bring back dead names: extra work, never lost work);
//! - after a clean remount the dirty ranges are exactly those from before it.
//!
//! Every case ends with a SIGKILL of the daemon and a remount: the ranges recovered from the
//! intent log must still cover every changed byte, and every image must be intact (ferry
//! writes through to the backing file before it acknowledges, so this holds for all images,
//! fsynced or not). The intent log runs with 64 KiB extents here, so that recovery's
//! rounding to extents is fine enough to notice a missing mark in these small images.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use proptest::prelude::*;

use common::bytes::write as put;
use common::{Mount, covers};

/// The intent log's extent size in these tests.
const EXTENT: u64 = 64 << 10;
/// Image names: in the root, and in the subdirectory (which is renamed between `d` and `e`).
const ROOT_NAMES: [&str; 3] = ["a.img", "b.img", "c.img"];
const DIR_NAMES: [&str; 2] = ["x.img", "y.img"];
const DIRS: [&str; 2] = ["d", "e"];

/// An offset, resolved against the image's size when the operation runs.
#[derive(Clone, Copy, Debug)]
enum At {
    /// A fraction (of 65536) of the size plus 256 KiB: inside the image or past its end.
    Rel(u16),
    /// The same, rounded down to 4 KiB (whole blocks: punches really deallocate).
    Block(u16),
    /// Near an intent-log extent boundary: `k * EXTENT + delta`.
    Edge(u8, i16),
}

impl At {
    fn resolve(self, size: u64) -> u64 {
        let span = size + (256 << 10);
        match self {
            At::Rel(f) => span * f as u64 / 65536,
            At::Block(f) => (span * f as u64 / 65536) & !4095,
            At::Edge(k, d) => (k as i64 * EXTENT as i64 + d as i64).max(0) as u64,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Write `len` bytes made from `seed`; `direct` opens with O_DIRECT (rounded to 4 KiB).
    Write {
        img: usize,
        at: At,
        len: u64,
        seed: u64,
        direct: bool,
    },
    /// fallocate(PUNCH_HOLE | KEEP_SIZE).
    Punch {
        img: usize,
        at: At,
        len: u64,
    },
    /// fallocate(ZERO_RANGE), which grows the image unless `keep_size`.
    ZeroRange {
        img: usize,
        at: At,
        len: u64,
        keep_size: bool,
    },
    /// ftruncate on an open handle, or truncate(2) by path.
    Truncate {
        img: usize,
        to: At,
        by_path: bool,
    },
    Fsync {
        img: usize,
        data_only: bool,
    },
    /// Rename an image to one of the pool's names (replacing an image there).
    Rename {
        img: usize,
        to: usize,
    },
    /// Rename the subdirectory between `d` and `e`.
    RenameDir,
    /// Unlink an existing image and create it again with `len` new bytes.
    Recreate {
        img: usize,
        len: u64,
        seed: u64,
    },
    /// Create an image under a pool name (unlinking any image there first).
    Create {
        name: usize,
        len: u64,
        seed: u64,
    },
    Unlink {
        img: usize,
    },
    /// Open an image and keep the handle (up to three; the oldest is closed first). Handles
    /// follow their image through renames and outlive its unlink.
    Open {
        img: usize,
    },
    /// Write through a kept handle, whatever became of its image's name.
    HandleWrite {
        h: usize,
        at: At,
        len: u64,
        seed: u64,
    },
    /// ftruncate through a kept handle.
    HandleTruncate {
        h: usize,
        to: At,
    },
    /// Unmount cleanly and mount again (kept handles are closed first).
    Remount,
    /// SIGKILL the daemon and mount again.
    Crash,
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        3 => any::<u16>().prop_map(At::Rel),
        2 => any::<u16>().prop_map(At::Block),
        2 => (0u8..10, -64i16..64).prop_map(|(k, d)| At::Edge(k, d)),
    ]
}

/// 1 byte to 300 KiB, small sizes often.
fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 1u64..64,
        2 => 1u64..=8192,
        3 => 1u64..=300 << 10,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let img = 0usize..8;
    prop_oneof![
        30 => (img.clone(), at(), len(), any::<u64>(), prop::bool::weighted(0.25)).prop_map(
            |(img, at, len, seed, direct)| Op::Write { img, at, len, seed, direct }
        ),
        8 => (img.clone(), at(), len()).prop_map(|(img, at, len)| Op::Punch { img, at, len }),
        8 => (img.clone(), at(), len(), any::<bool>()).prop_map(|(img, at, len, keep_size)| {
            Op::ZeroRange { img, at, len, keep_size }
        }),
        8 => (img.clone(), at(), any::<bool>())
            .prop_map(|(img, to, by_path)| Op::Truncate { img, to, by_path }),
        4 => (img.clone(), any::<bool>()).prop_map(|(img, data_only)| Op::Fsync { img, data_only }),
        6 => (img.clone(), 0usize..5).prop_map(|(img, to)| Op::Rename { img, to }),
        3 => Just(Op::RenameDir),
        4 => (img.clone(), 0u64..200_000, any::<u64>())
            .prop_map(|(img, len, seed)| Op::Recreate { img, len, seed }),
        3 => (0usize..5, 0u64..200_000, any::<u64>())
            .prop_map(|(name, len, seed)| Op::Create { name, len, seed }),
        2 => img.clone().prop_map(|img| Op::Unlink { img }),
        3 => img.prop_map(|img| Op::Open { img }),
        6 => (0usize..3, at(), len(), any::<u64>())
            .prop_map(|(h, at, len, seed)| Op::HandleWrite { h, at, len, seed }),
        2 => (0usize..3, at()).prop_map(|(h, to)| Op::HandleTruncate { h, to }),
        1 => Just(Op::Remount),
        1 => Just(Op::Crash),
    ]
}

/// Deterministic bytes from a seed: every fifth seed gives zeros, the others pseudo-random
/// bytes with some whole 4 KiB blocks of zeros.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    if seed % 5 == 0 {
        return vec![0; len];
    }
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = vec![0u8; len];
    for block in out.chunks_mut(4096) {
        if next() % 6 == 0 {
            continue;
        }
        for b in block.chunks_mut(8) {
            let v = next().to_le_bytes();
            b.copy_from_slice(&v[..b.len()]);
        }
    }
    out
}

/// The byte ranges where `new` differs from `old`, bytes past the end of either being zero.
fn changed(old: &[u8], new: &[u8]) -> Vec<Range<u64>> {
    let n = old.len().max(new.len());
    let byte = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut i = 0;
    while i < n {
        let end = (i + 4096).min(n);
        if end <= old.len() && end <= new.len() && old[i..end] == new[i..end] {
            i = end;
            continue;
        }
        for j in i..end {
            if byte(old, j) != byte(new, j) {
                let j = j as u64;
                match out.last_mut() {
                    Some(r) if r.end == j => r.end += 1,
                    _ => out.push(j..j + 1),
                }
            }
        }
        i = end;
    }
    out
}

/// Panics, saying where, if `got` is not `want`.
fn same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes, the model has {}; first difference at byte {first} \
         (got {:?}, want {:?})",
        got.len(),
        want.len(),
        got.get(first),
        want.get(first)
    );
}

#[derive(Clone, Debug)]
struct Image {
    /// Which file this is, whatever its name (kept handles refer to it).
    id: u64,
    data: Vec<u8>,
    /// The content at the start of the case; `None` if created during it.
    start: Option<Vec<u8>>,
}

/// The mount, the model, and what the case did so far.
struct Case {
    m: Mount,
    dir: &'static str,
    images: BTreeMap<String, Image>,
    /// Kept handles, with the id of the image each was opened on.
    handles: Vec<(File, u64)>,
    /// Content of images unlinked (or replaced) while a kept handle still holds them.
    orphans: BTreeMap<u64, Vec<u8>>,
    next_id: u64,
    /// The daemon was SIGKILLed during this case: recovered ranges may name dead images.
    crashed: bool,
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The dirty ranges the daemon reports, per image.
fn dirty_map(m: &Mount) -> BTreeMap<String, Vec<Range<u64>>> {
    let s = m.status();
    s["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let ranges = i["dirty"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r[0].as_u64().unwrap()..r[1].as_u64().unwrap())
                .collect::<Vec<_>>();
            (i["path"].as_str().unwrap().to_string(), ranges)
        })
        .filter(|(_, r)| !r.is_empty())
        .collect()
}

/// A buffer of `data` aligned for O_DIRECT.
fn aligned(data: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; data.len() + 4096];
    let skew = buf.as_ptr() as usize % 4096;
    let start = if skew == 0 { 0 } else { 4096 - skew };
    buf[start..start + data.len()].copy_from_slice(data);
    (buf, start)
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64, what: &str) {
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    assert_eq!(
        r,
        0,
        "{what}: fallocate({mode:#x}, {off}, {len}): {}",
        std::io::Error::last_os_error()
    );
}

impl Case {
    /// Backing directory with three images of `initial` (size, seed), then mounted.
    fn new(initial: &[(u64, u64)]) -> Case {
        let m = Mount::prepare("");
        fs::write(
            &m.config,
            format!(
                "[node]\nname = \"model\"\nstate_dir = \"{}\"\n\n[primary]\nintent_extent = \"{}\"\n",
                m.state.display(),
                EXTENT
            ),
        )
        .unwrap();
        let dir = DIRS[0];
        fs::create_dir(m.backing(dir)).unwrap();
        let names = [
            ROOT_NAMES[0].to_string(),
            ROOT_NAMES[1].to_string(),
            format!("{dir}/{}", DIR_NAMES[0]),
        ];
        let mut images = BTreeMap::new();
        for (id, (name, &(size, seed))) in names.iter().zip(initial).enumerate() {
            let data = fill(seed, size as usize);
            fs::write(m.backing(name), &data).unwrap();
            images.insert(
                name.clone(),
                Image {
                    id: id as u64,
                    start: Some(data.clone()),
                    data,
                },
            );
        }
        m.mount();
        Case {
            m,
            dir,
            next_id: images.len() as u64,
            images,
            handles: Vec::new(),
            orphans: BTreeMap::new(),
            crashed: false,
        }
    }

    /// The `i`-th image (modulo their number), if there is any.
    fn pick(&self, i: usize) -> Option<String> {
        let n = self.images.len();
        (n > 0).then(|| self.images.keys().nth(i % n).unwrap().clone())
    }

    /// The `i`-th name of the pool: root names, then names in the subdirectory.
    fn pool(&self, i: usize) -> String {
        let i = i % (ROOT_NAMES.len() + DIR_NAMES.len());
        match ROOT_NAMES.get(i) {
            Some(n) => n.to_string(),
            None => format!("{}/{}", self.dir, DIR_NAMES[i - ROOT_NAMES.len()]),
        }
    }

    fn open(&self, p: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.m.path(p))
            .unwrap_or_else(|e| panic!("open {p} on the mount: {e}"))
    }

    /// Creates `p` on the mount holding `data`; it did not exist at the start of the case.
    fn create(&mut self, p: &str, data: Vec<u8>) {
        let f = File::create(self.m.path(p)).unwrap_or_else(|e| panic!("create {p}: {e}"));
        f.write_all_at(&data, 0).unwrap();
        let id = self.next_id;
        self.next_id += 1;
        self.images.insert(
            p.to_string(),
            Image {
                id,
                data,
                start: None,
            },
        );
    }

    fn unlink(&mut self, p: &str) {
        fs::remove_file(self.m.path(p)).unwrap_or_else(|e| panic!("unlink {p}: {e}"));
        self.forget(p);
    }

    /// The image at `p` left the namespace: it lives on only while a kept handle holds it.
    fn forget(&mut self, p: &str) {
        if let Some(im) = self.images.remove(p)
            && self.handles.iter().any(|(_, id)| *id == im.id)
        {
            self.orphans.insert(im.id, im.data);
        }
    }

    /// The content of the file with `id`, named or orphaned, and its name if it has one.
    fn by_id(&mut self, id: u64) -> (Option<String>, &mut Vec<u8>) {
        match self.images.iter().find(|(_, im)| im.id == id) {
            Some((p, _)) => {
                let p = p.clone();
                let d = &mut self.images.get_mut(&p).unwrap().data;
                (Some(p), d)
            }
            None => (
                None,
                self.orphans.get_mut(&id).expect("a kept handle's file"),
            ),
        }
    }

    /// Closes the kept handles (before an unmount).
    fn close_handles(&mut self) {
        self.handles.clear();
        self.orphans.clear();
    }

    /// Applies `op` to the mount and to the model.
    fn apply(&mut self, op: &Op) {
        let size = |c: &Case, p: &str| c.images[p].data.len() as u64;
        match *op {
            Op::Write {
                img,
                at,
                len,
                seed,
                direct,
            } => {
                let Some(p) = self.pick(img) else { return };
                let (mut off, mut len) = (at.resolve(size(self, &p)), len);
                if direct {
                    off &= !4095;
                    len = len.div_ceil(4096) * 4096;
                }
                let data = fill(seed, len as usize);
                if direct {
                    let f = OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(self.m.path(&p))
                        .unwrap_or_else(|e| panic!("open {p} O_DIRECT: {e}"));
                    let (buf, start) = aligned(&data);
                    f.write_all_at(&buf[start..start + data.len()], off)
                        .unwrap_or_else(|e| panic!("O_DIRECT write {p} at {off}: {e}"));
                } else {
                    self.open(&p)
                        .write_all_at(&data, off)
                        .unwrap_or_else(|e| panic!("write {p} at {off}: {e}"));
                }
                put(&mut self.images.get_mut(&p).unwrap().data, off, &data);
            }
            Op::Punch { img, at, len } => {
                let Some(p) = self.pick(img) else { return };
                let off = at.resolve(size(self, &p));
                let f = self.open(&p);
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                fallocate(&f, mode, off, len, &p);
                common::bytes::zero(&mut self.images.get_mut(&p).unwrap().data, off, len, true);
            }
            Op::ZeroRange {
                img,
                at,
                len,
                keep_size,
            } => {
                let Some(p) = self.pick(img) else { return };
                let off = at.resolve(size(self, &p));
                let f = self.open(&p);
                let mode = libc::FALLOC_FL_ZERO_RANGE
                    | if keep_size {
                        libc::FALLOC_FL_KEEP_SIZE
                    } else {
                        0
                    };
                fallocate(&f, mode, off, len, &p);
                let d = &mut self.images.get_mut(&p).unwrap().data;
                common::bytes::zero(d, off, len, keep_size);
            }
            Op::Truncate { img, to, by_path } => {
                let Some(p) = self.pick(img) else { return };
                let new = to.resolve(size(self, &p));
                if by_path {
                    let c = cpath(&self.m.path(&p));
                    let r = unsafe { libc::truncate(c.as_ptr(), new as i64) };
                    assert_eq!(
                        r,
                        0,
                        "truncate {p} to {new}: {}",
                        std::io::Error::last_os_error()
                    );
                } else {
                    self.open(&p)
                        .set_len(new)
                        .unwrap_or_else(|e| panic!("ftruncate {p} to {new}: {e}"));
                }
                self.images
                    .get_mut(&p)
                    .unwrap()
                    .data
                    .resize(new as usize, 0);
            }
            Op::Fsync { img, data_only } => {
                let Some(p) = self.pick(img) else { return };
                let f = self.open(&p);
                let r = if data_only {
                    f.sync_data()
                } else {
                    f.sync_all()
                };
                r.unwrap_or_else(|e| panic!("fsync {p}: {e}"));
            }
            Op::Rename { img, to } => {
                let Some(from) = self.pick(img) else { return };
                let to = self.pool(to);
                if from == to {
                    return;
                }
                fs::rename(self.m.path(&from), self.m.path(&to))
                    .unwrap_or_else(|e| panic!("rename {from} -> {to}: {e}"));
                self.forget(&to);
                let im = self.images.remove(&from).unwrap();
                self.images.insert(to, im);
            }
            Op::RenameDir => {
                let to = if self.dir == DIRS[0] {
                    DIRS[1]
                } else {
                    DIRS[0]
                };
                fs::rename(self.m.path(self.dir), self.m.path(to))
                    .unwrap_or_else(|e| panic!("rename {} -> {to}: {e}", self.dir));
                let prefix = format!("{}/", self.dir);
                let moved: Vec<String> = self
                    .images
                    .keys()
                    .filter(|p| p.starts_with(&prefix))
                    .cloned()
                    .collect();
                for p in moved {
                    let im = self.images.remove(&p).unwrap();
                    self.images
                        .insert(format!("{to}/{}", &p[prefix.len()..]), im);
                }
                self.dir = to;
            }
            Op::Recreate { img, len, seed } => {
                let Some(p) = self.pick(img) else { return };
                self.unlink(&p);
                self.create(&p, fill(seed, len as usize));
            }
            Op::Create { name, len, seed } => {
                let p = self.pool(name);
                if self.images.contains_key(&p) {
                    self.unlink(&p);
                }
                self.create(&p, fill(seed, len as usize));
            }
            Op::Unlink { img } => {
                let Some(p) = self.pick(img) else { return };
                self.unlink(&p);
            }
            Op::Open { img } => {
                let Some(p) = self.pick(img) else { return };
                if self.handles.len() == 3 {
                    let (_, id) = self.handles.remove(0);
                    if !self.handles.iter().any(|(_, i)| *i == id) {
                        self.orphans.remove(&id);
                    }
                }
                let f = self.open(&p);
                self.handles.push((f, self.images[&p].id));
            }
            Op::HandleWrite { h, at, len, seed } => {
                if self.handles.is_empty() {
                    return;
                }
                let id = self.handles[h % self.handles.len()].1;
                let off = at.resolve(self.by_id(id).1.len() as u64);
                let data = fill(seed, len as usize);
                let f = &self.handles[h % self.handles.len()].0;
                let r = f.write_all_at(&data, off);
                let (name, d) = self.by_id(id);
                r.unwrap_or_else(|e| panic!("write at {off} through a handle on {name:?}: {e}"));
                put(d, off, &data);
            }
            Op::HandleTruncate { h, to } => {
                if self.handles.is_empty() {
                    return;
                }
                let id = self.handles[h % self.handles.len()].1;
                let new = to.resolve(self.by_id(id).1.len() as u64);
                let r = self.handles[h % self.handles.len()].0.set_len(new);
                let (name, d) = self.by_id(id);
                r.unwrap_or_else(|e| panic!("ftruncate to {new} of a handle on {name:?}: {e}"));
                d.resize(new as usize, 0);
            }
            Op::Remount => {
                self.close_handles();
                let before = dirty_map(&self.m);
                self.m.unmount();
                self.m.mount();
                assert_eq!(
                    dirty_map(&self.m),
                    before,
                    "a clean remount keeps the exact dirty ranges"
                );
            }
            Op::Crash => self.crash(),
        }
    }

    fn crash(&mut self) {
        self.close_handles();
        self.m.kill9();
        self.m.mount();
        self.crashed = true;
    }

    /// The names on the mount, as the model spells them.
    fn listing(&self) -> Vec<String> {
        let names = |d: &Path| -> Vec<(String, bool)> {
            fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let dir = e.file_type().unwrap().is_dir();
                    (e.file_name().into_string().unwrap(), dir)
                })
                .collect()
        };
        let mut out = Vec::new();
        for (name, is_dir) in names(&self.m.mnt) {
            if !is_dir {
                out.push(name);
                continue;
            }
            assert_eq!(name, self.dir, "the subdirectory's name");
            for (inner, _) in names(&self.m.path(&name)) {
                out.push(format!("{name}/{inner}"));
            }
        }
        out.sort();
        out
    }

    /// Compares the mount, the backing directory and the daemon's dirty set with the model.
    fn check(&self, when: &str) {
        let model: Vec<String> = self.images.keys().cloned().collect();
        assert_eq!(self.listing(), model, "{when}: names on the mount");
        for (p, im) in &self.images {
            let len = fs::metadata(self.m.path(p)).unwrap().len();
            assert_eq!(
                len,
                im.data.len() as u64,
                "{when}: size of {p} on the mount"
            );
            let got = fs::read(self.m.path(p)).unwrap();
            same(
                &got,
                &im.data,
                &format!("{when}: {p} read through the mount"),
            );
            let back = fs::read(self.m.backing(p)).unwrap();
            same(&back, &im.data, &format!("{when}: backing file of {p}"));
        }
        for (id, data) in &self.orphans {
            let (f, _) = self.handles.iter().find(|(_, i)| i == id).unwrap();
            let len = f.metadata().unwrap().len();
            assert_eq!(
                len,
                data.len() as u64,
                "{when}: size of unlinked image {id}"
            );
            let mut got = vec![0u8; data.len()];
            f.read_exact_at(&mut got, 0).unwrap();
            same(
                &got,
                data,
                &format!("{when}: unlinked image {id} read through a handle"),
            );
        }
        let dirty = dirty_map(&self.m);
        let none = Vec::new();
        for (p, im) in &self.images {
            let have = dirty.get(p).unwrap_or(&none);
            for r in changed(im.start.as_deref().unwrap_or(&[]), &im.data) {
                assert!(
                    covers(have, &r),
                    "{when}: bytes {r:?} of {p} changed but the dirty set {have:?} misses them"
                );
            }
        }
        if !self.crashed {
            for p in dirty.keys() {
                assert!(
                    self.images.contains_key(p),
                    "{when}: dirty ranges under {p}, which no longer exists (images: {model:?})"
                );
            }
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_mount_matches_a_model_and_its_dirty_set_covers_every_change(
        initial in prop::collection::vec((0u64..600 << 10, any::<u64>()), 3),
        ops in prop::collection::vec(op(), 1..48),
    ) {
        let mut c = Case::new(&initial);
        c.check("after mounting");
        for (i, op) in ops.iter().enumerate() {
            c.apply(op);
            c.check(&format!("step {i} ({op:?})"));
        }
        c.crash();
        c.check("after SIGKILL and remount at the end");
        c.m.unmount();
    }
}

#[test]
fn changed_compares_past_the_shorter_end_as_zeros() {
    assert_eq!(changed(b"abc", b"abc"), Vec::<Range<u64>>::new());
    assert_eq!(changed(b"abc", b"aXc"), vec![1..2]);
    assert_eq!(changed(b"abc", b"ab"), vec![2..3]);
    assert_eq!(changed(b"ab\0\0", b"ab"), Vec::<Range<u64>>::new());
    assert_eq!(changed(b"", b"\0\0x\0y"), vec![2..3, 4..5]);
    let big = fill(7, 10_000);
    let mut other = big.clone();
    other[4095] ^= 1;
    other[4096] ^= 1;
    other.resize(12_000, 0);
    other[11_999] = 1;
    assert_eq!(changed(&big, &other), vec![4095..4097, 11_999..12_000]);
}
