//! The copy-before-write window of a sync point (QEMU's backup job is the model).
//!
//! At the freeze, under the tracker's gate (no write in flight), the window opens every image of
//! the group and records its size. Until the sync has read what it needs, the first write,
//! punch or truncate that touches a 4 KiB block of a frozen image saves the block's old bytes
//! first. The sync reads each image through a [`FrozenImage`]: the file, overlaid with the saved
//! blocks, clipped to the size at the freeze: exactly the image as it was at the freeze, though
//! the guest keeps writing (invariant 3). Images are found by (device, inode), so renames and
//! unlinks after the freeze change nothing. Saved blocks live in memory up to a bound, then in a
//! spill file under the mount's state directory, which is removed when the window closes.
//!
//! Once the sync point is cut, the sync knows what the replicas can still ask for (the entries
//! that differ from what each holds, and of those that go as patches only the patches' ranges:
//! `wire::primary::may_read`) and narrows the window to those spans ([`Window::narrow`]): a
//! write elsewhere needs no copy. At a steady 50 MB/s of scattered
//! writes, the whole-image window copied every block written during a sync (92 MB for a
//! 1.9 s sync) and spilled to disk past its memory bound.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::outside::stamp::Stamp;
use crate::chunk::{Source, touches};

/// Copy-before-write granularity.
pub const BLOCK: u64 = 4096;

/// Backing file identity: (device, inode).
pub type FileKey = (u64, u64);

/// Where a saved block is. Never replaced once saved, so a copy taken under the lock stays
/// valid.
#[derive(Clone, Copy)]
enum Saved {
    /// Offset in the window's memory slabs.
    Memory(u64),
    /// Offset in the spill file.
    Spilled(u64),
}

/// Memory for saved blocks, allocated a slab at a time: a block is copied into the next free
/// slot, and all of them are freed with the window. (A block of its own per save cost the
/// guest's write a `malloc`, and the thread that dropped the window, often a network thread,
/// tens of thousands of `free`s into the writers' arenas.)
const SLAB: u64 = 1 << 20;

#[derive(Default)]
struct Slabs {
    slabs: Vec<Box<[u8]>>,
    end: u64,
}

struct Spill {
    path: PathBuf,
    file: Option<Arc<File>>,
    end: u64,
}

/// One image as it was at the freeze.
pub struct FrozenImage {
    file: File,
    size: u64,
    stamp: Stamp,
    saved: Mutex<BTreeMap<u64, Saved>>,
    /// The spans still needed (sorted, disjoint), once narrowed; the whole image until then.
    needed: Mutex<Option<Vec<Range<u64>>>>,
    window: Arc<Shared>,
}

struct Shared {
    memory_used: AtomicU64,
    memory_limit: u64,
    memory: Mutex<Slabs>,
    spill: Mutex<Spill>,
    saved_bytes: AtomicU64,
}

/// The window of one sync point.
pub struct Window {
    images: HashMap<FileKey, Arc<FrozenImage>>,
    by_path: BTreeMap<String, Arc<FrozenImage>>,
    /// Images that could not be opened, and why.
    failed: BTreeMap<String, io::Error>,
    shared: Arc<Shared>,
}

impl Window {
    /// Opens a window over the images `paths` (relative to `root`). Must run while no change
    /// is in flight (under the tracker's gate). Spilled blocks go to `spill`. An image that
    /// cannot be opened is left out and listed in [`Window::failed`].
    pub fn open(
        root: &Path,
        paths: &[String],
        spill: &Path,
        memory_limit: u64,
    ) -> io::Result<Window> {
        let shared = Arc::new(Shared {
            memory_used: AtomicU64::new(0),
            memory_limit,
            memory: Mutex::new(Slabs::default()),
            spill: Mutex::new(Spill {
                path: spill.to_path_buf(),
                file: None,
                end: 0,
            }),
            saved_bytes: AtomicU64::new(0),
        });
        let mut images = HashMap::new();
        let mut by_path = BTreeMap::new();
        let mut failed = BTreeMap::new();
        // Relative to the directory's descriptor: its own path's length does not count.
        let dir = super::at::Dir::open(root)?;
        for p in paths {
            let opened = dir
                .open_file(Path::new(p), libc::O_RDONLY, 0)
                .and_then(|f| Ok((f.metadata()?, f)));
            let (m, file) = match opened {
                Ok(o) => o,
                // Gone since it was listed (cannot happen under the gate, but be safe).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    failed.insert(p.clone(), e);
                    continue;
                }
            };
            let img = Arc::new(FrozenImage {
                file,
                size: m.len(),
                stamp: Stamp::of(&m),
                saved: Mutex::new(BTreeMap::new()),
                needed: Mutex::new(None),
                window: shared.clone(),
            });
            images.insert((m.dev(), m.ino()), img.clone());
            by_path.insert(p.clone(), img);
        }
        Ok(Window {
            images,
            by_path,
            failed,
            shared,
        })
    }

    /// The frozen images by their path at the freeze.
    pub fn images(&self) -> &BTreeMap<String, Arc<FrozenImage>> {
        &self.by_path
    }

    /// The images that could not be opened at the freeze, and why.
    pub fn failed(&self) -> &BTreeMap<String, io::Error> {
        &self.failed
    }

    /// Called before bytes `range` of the file `key` change (`file` reads its current bytes):
    /// saves the old content of every block of a frozen image not saved yet.
    pub fn before_change(&self, key: FileKey, file: &File, range: Range<u64>) -> io::Result<()> {
        let Some(img) = self.images.get(&key) else {
            return Ok(());
        };
        img.save(file, range)
    }

    /// From now on, saves only blocks of image `path` that touch `spans` (sorted, disjoint):
    /// what a sync still reads of it. Blocks saved before stay saved.
    pub fn narrow(&self, path: &str, spans: Vec<Range<u64>>) {
        if let Some(img) = self.by_path.get(path) {
            debug_assert!(spans.windows(2).all(|w| w[0].end <= w[1].start));
            *img.needed.lock() = Some(spans);
        }
    }

    /// Bytes saved so far.
    pub fn saved_bytes(&self) -> u64 {
        self.shared.saved_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let sp = self.shared.spill.lock();
        if sp.file.is_some() {
            let _ = std::fs::remove_file(&sp.path);
        }
    }
}

impl FrozenImage {
    /// Saves the old bytes of the blocks of `range` not saved yet. No lock is held during
    /// I/O, so neither the sync reading this image nor another writer waits for this one's
    /// disk. Racing savers of one block are harmless: every writer saves before it writes,
    /// so whoever inserts first read the block before any write to it, and the others'
    /// copies are dropped.
    fn save(&self, file: &File, range: Range<u64>) -> io::Result<()> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return Ok(());
        }
        let (first, last) = (range.start / BLOCK, (end - 1) / BLOCK);
        let wanted: Vec<u64> = match &*self.needed.lock() {
            None => (first..=last).collect(),
            Some(spans) => (first..=last)
                .filter(|b| touches(spans, b * BLOCK..(b + 1) * BLOCK))
                .collect(),
        };
        let vacant: Vec<u64> = {
            let saved = self.saved.lock();
            wanted
                .into_iter()
                .filter(|b| !saved.contains_key(b))
                .collect()
        };
        let (Some(&lo), Some(&hi)) = (vacant.first(), vacant.last()) else {
            return Ok(());
        };
        // One read of the span from the first to the last vacant block.
        let span_end = ((hi + 1) * BLOCK).min(self.size);
        let mut old = vec![0u8; (span_end - lo * BLOCK) as usize];
        read_full(file, &mut old, lo * BLOCK)?;
        let mut stored = Vec::with_capacity(vacant.len());
        for &b in &vacant {
            let from = ((b - lo) * BLOCK) as usize;
            let to = (from + BLOCK as usize).min(old.len());
            stored.push((b, self.window.store(&old[from..to])?));
        }
        let mut saved = self.saved.lock();
        for (b, s) in stored {
            // Another writer may have saved it first: then this copy's 4 KiB stay unused.
            if let std::collections::btree_map::Entry::Vacant(slot) = saved.entry(b) {
                slot.insert(s);
                let len = BLOCK.min(self.size - b * BLOCK);
                self.window.saved_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Size at the freeze.
    /// The backing file's identity, size and times at the freeze.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }

    pub fn frozen_size(&self) -> u64 {
        self.size
    }
}

/// Reads as much of `buf` as the file holds at `off` (zeros past its end).
fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => {
                buf[n..].fill(0);
                break;
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Shared {
    /// Saves one block's old bytes (at most [`BLOCK`]): in memory while within the bound, else
    /// in the spill file.
    fn store(&self, buf: &[u8]) -> io::Result<Saved> {
        if self.memory_used.fetch_add(BLOCK, Ordering::Relaxed) + BLOCK <= self.memory_limit {
            let mut m = self.memory.lock();
            let off = m.end;
            if off % SLAB == 0 {
                m.slabs.push(vec![0u8; SLAB as usize].into_boxed_slice());
            }
            m.end += BLOCK;
            let at = (off % SLAB) as usize;
            m.slabs[(off / SLAB) as usize][at..at + buf.len()].copy_from_slice(buf);
            return Ok(Saved::Memory(off));
        }
        self.memory_used.fetch_sub(BLOCK, Ordering::Relaxed);
        let (file, off) = {
            let mut sp = self.spill.lock();
            if sp.file.is_none() {
                log::info!(
                    "copy-before-write: {} MiB saved in memory; spilling to {}",
                    self.memory_limit >> 20,
                    sp.path.display()
                );
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&sp.path)?;
                sp.file = Some(Arc::new(f));
            }
            let off = sp.end;
            sp.end += BLOCK;
            (sp.file.clone().expect("opened above"), off)
        };
        file.write_all_at(buf, off)?;
        Ok(Saved::Spilled(off))
    }

    fn load(&self, s: &Saved, out: &mut [u8]) -> io::Result<()> {
        match s {
            Saved::Memory(off) => {
                let at = (off % SLAB) as usize;
                out.copy_from_slice(
                    &self.memory.lock().slabs[(off / SLAB) as usize][at..at + out.len()],
                );
            }
            Saved::Spilled(off) => {
                let file = self.spill.lock().file.clone();
                file.expect("a spilled block has a spill file")
                    .read_exact_at(out, *off)?;
            }
        }
        Ok(())
    }
}

impl Source for FrozenImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::fault::point("sync.image.read")?;
        read_full(&self.file, buf, offset)?;
        let end = offset + buf.len() as u64;
        // Copies of the saved blocks, loaded without the lock (a writer saving a block of this
        // image must not wait for the spill file's disk).
        let overlay: Vec<(u64, Saved)> = self
            .saved
            .lock()
            .range(offset / BLOCK..end.div_ceil(BLOCK))
            .map(|(&b, s)| (b, *s))
            .collect();
        for (b, s) in overlay {
            let bs = b * BLOCK;
            let be = (bs + BLOCK).min(self.size);
            let mut block = vec![0u8; (be - bs) as usize];
            self.window.load(&s, &mut block)?;
            let (from, to) = (bs.max(offset), be.min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(from - bs) as usize..(to - bs) as usize]);
        }
        Ok(())
    }

    fn known_zero_until(&self, offset: u64) -> io::Result<u64> {
        // A hole in the live file is a hole at the freeze unless a saved block says otherwise.
        let hole_end = crate::chunk::hole_end(&self.file, offset, self.size)?;
        let saved = self.saved.lock();
        let next_saved = saved
            .range(offset / BLOCK..)
            .next()
            .map_or(u64::MAX, |(&b, _)| (b * BLOCK).max(offset));
        Ok(hole_end.min(next_saved).min(self.size))
    }
}

/// A shared handle to a window, as the tracker holds it.
pub type WindowRef = Arc<Window>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frozen_view_is_the_content_at_the_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut before = vec![0u8; 64 * 1024];
        for (i, b) in before.iter_mut().enumerate() {
            *b = (i / 4096) as u8 + 1;
        }
        std::fs::write(&path, &before).unwrap();
        // A tiny memory bound so some blocks spill.
        let w = Window::open(dir.path(), &["img".into()], &dir.path().join("spill"), 8192).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let m = f.metadata().unwrap();
        let key = (m.dev(), m.ino());
        // Writes, a punch-like overwrite with zeros, a shrink and a growth after the freeze.
        for (off, len, byte) in [
            (100u64, 10u64, 0xAAu8),
            (5000, 9000, 0xBB),
            (30000, 4096, 0),
        ] {
            w.before_change(key, &f, off..off + len).unwrap();
            f.write_all_at(&vec![byte; len as usize], off).unwrap();
        }
        w.before_change(key, &f, 40_000..65_536).unwrap();
        f.set_len(40_000).unwrap();
        f.set_len(100_000).unwrap();
        let img = &w.images()["img"];
        assert_eq!(img.size(), 65_536);
        let mut got = vec![0u8; 65_536];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == before, "frozen view differs");
        let mut part = vec![0u8; 3000];
        img.read_at(&mut part, 3000).unwrap();
        assert_eq!(part, before[3000..6000]);
        assert!(w.saved_bytes() >= 5 * 4096);
        assert!(dir.path().join("spill").exists());
        drop(w);
        assert!(
            !dir.path().join("spill").exists(),
            "the spill file goes with the window"
        );
    }

    /// Narrowed to the spans a sync still reads, the window copies only blocks that touch them:
    /// those read back as at the freeze, and a write elsewhere costs no copy.
    #[test]
    fn a_narrowed_window_saves_only_blocks_of_the_spans_still_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let before = crate::testutil::random(64 * 1024, 5);
        std::fs::write(&path, &before).unwrap();
        let w = Window::open(
            dir.path(),
            &["img".into()],
            &dir.path().join("spill"),
            1 << 20,
        )
        .unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let m = f.metadata().unwrap();
        let key = (m.dev(), m.ino());
        // A span ending inside block 2 and one starting inside block 9.
        w.narrow("img", vec![5000..8193, 40_000..40_900]);
        for off in (0..64 * 1024u64).step_by(4096) {
            w.before_change(key, &f, off..off + 4096).unwrap();
            f.write_all_at(&[0xEE; 4096], off).unwrap();
        }
        assert_eq!(w.saved_bytes(), 3 * 4096, "blocks 1, 2 and 9 only");
        let img = &w.images()["img"];
        for span in [5000..8193usize, 40_000..40_900] {
            let mut got = vec![0u8; span.len()];
            img.read_at(&mut got, span.start as u64).unwrap();
            assert_eq!(got, before[span], "a needed span reads as at the freeze");
        }
    }
}
