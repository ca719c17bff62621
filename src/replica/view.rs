//! What the replica mount reads: every kept generation's manifests, and where each of its bytes
//! is now. A byte of generation G is either *in place* (the image holds the same entry, at the
//! same offset, in the applied generation, and applying the next one does not change it) or in
//! a pack of kept chunks: before a generation is applied, every entry it overwrites is kept
//! (when restore points are kept or a mount is served), so any generation still held can be
//! read while the images change under it.
//!
//! Readers take the state's read lock for the time of one read; a commit takes the write lock
//! only to switch state (begin and end of applying), never while it writes the images.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use super::META_DIR;
use super::history::{History, Point};
use super::keep::{self, Policy};
use super::kept::Kept;
use crate::manifest::changed_entries;
use crate::manifest::{self, ChunkParams, Entry, Kind, Manifest};

/// One held generation: its record and its images.
struct Gen {
    point: Point,
    images: BTreeMap<String, Arc<Manifest>>,
}

struct State {
    gens: BTreeMap<u64, Gen>,
    /// The generation the images hold.
    applied: u64,
    /// While a generation is being applied: the images it changes (`None`: removed).
    applying: Option<BTreeMap<String, Option<Arc<Manifest>>>>,
    /// The images, open for reading.
    files: HashMap<String, Arc<File>>,
}

impl State {
    fn current(&self) -> &BTreeMap<String, Arc<Manifest>> {
        &self.gens[&self.applied].images
    }

    /// Whether entry `e` of image `path` is in the image file at its offset, now and until
    /// the generation being applied (if any) is applied.
    fn in_place(&self, path: &str, e: &Entry) -> bool {
        let same = |m: &Manifest| {
            m.index_starting_at(e.offset)
                .is_some_and(|i| m.entries()[i] == *e)
        };
        let now = self.current().get(path).is_some_and(|m| same(m));
        let next = match self.applying.as_ref().and_then(|a| a.get(path)) {
            None => true,
            Some(Some(m)) => same(m),
            Some(None) => false,
        };
        now && next && self.files.contains_key(path)
    }

    /// The chunks held generation `n` reads from the packs, not in place (none for the
    /// applied one).
    fn read_from_packs(&self, n: u64) -> impl Iterator<Item = [u8; 32]> + '_ {
        let images = self.gens.get(&n).filter(|_| n != self.applied);
        images
            .into_iter()
            .flat_map(|g| &g.images)
            .flat_map(|(path, m)| {
                let entries: Box<dyn Iterator<Item = &Entry>> = match self.current().get(path) {
                    Some(c) if Arc::ptr_eq(c, m) => Box::new(std::iter::empty()),
                    Some(c) => Box::new(changed_entries(c, m)),
                    None => Box::new(m.entries().iter()),
                };
                entries.filter_map(|e| e.hash()).map(|h| *h.as_bytes())
            })
    }

    /// The chunks that held generations other than the applied one need from the packs, and
    /// those the applied one reads from them while the next is being applied (what the apply
    /// overwrites or removes).
    fn needed(&self) -> HashSet<[u8; 32]> {
        let mut needed: HashSet<[u8; 32]> = self
            .gens
            .keys()
            .flat_map(|n| self.read_from_packs(*n))
            .collect();
        for (path, next) in self.applying.iter().flatten() {
            let Some(now) = self.current().get(path) else {
                continue;
            };
            let overwritten: Box<dyn Iterator<Item = &Entry>> = match next {
                Some(next) => Box::new(changed_entries(next, now)),
                None => Box::new(now.entries().iter()),
            };
            needed.extend(overwritten.filter_map(|e| e.hash()).map(|h| *h.as_bytes()));
        }
        needed
    }
}

/// What a path of a generation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// An image of this size.
    Image(u64),
    Dir,
}

/// A restore point as `ferry generations` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PointInfo {
    pub generation: u64,
    pub committed: u64,
    pub group_root: String,
    pub epoch: u64,
    pub images: usize,
    /// Bytes of kept chunks only this generation needs (what expiring it alone frees).
    pub own_bytes: u64,
    /// Whether an open file on the replica mount reads it.
    pub pinned: bool,
}

pub struct View {
    root: PathBuf,
    history: History,
    params: ChunkParams,
    policy: Policy,
    /// Keep what applying a generation overwrites: restore points or a mount need it.
    keeping: AtomicBool,
    state: RwLock<State>,
    kept: RwLock<Kept>,
    /// Open files per generation.
    pins: Mutex<BTreeMap<u64, usize>>,
    /// Generations never expired: an older epoch's, past the base a new primary took over
    /// from (see [`crate::epoch::Fork`]).
    forks: Mutex<BTreeSet<u64>>,
    /// Held by a commit from keeping chunks to the start of its apply (`begin_apply`), at the
    /// end of the apply while points expire, and by expiry alone. Between those, what the
    /// applied generation reads from the packs is kept by `State::needed`.
    writer: Mutex<()>,
    /// A file was closed: a generation may have lost its last reader.
    expire_due: AtomicBool,
    /// A generation is acknowledged and not applied yet: the mount's newest generation is the
    /// one coming ([`View::newest`] waits for it).
    settling: Mutex<bool>,
    settled: Condvar,
}

/// How long [`View::newest`] waits for an acknowledged generation's apply (tens of
/// milliseconds as a rule) before it answers with the one applied.
const NEWEST_WAIT: Duration = Duration::from_secs(5);

fn read_full(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl View {
    /// Opens the view of the store at `root` whose applied generation is `applied` (recorded
    /// as a point). `read_only`: a reader beside the daemon, which changes nothing on disk.
    pub fn open(
        root: &Path,
        params: ChunkParams,
        policy: Policy,
        applied: u64,
        read_only: bool,
    ) -> Result<View> {
        let meta = root.join(META_DIR);
        let history = History::new(&meta);
        let kept_dir = meta.join("kept");
        let kept = if read_only {
            Kept::open_read_only(&kept_dir, params.max_size)
        } else {
            Kept::open(&kept_dir, params.max_size)
        }
        .with_context(|| format!("cannot open the kept chunks in {}", kept_dir.display()))?;
        let mut cache = BTreeMap::new();
        let mut gens = BTreeMap::new();
        for point in history.list(read_only)? {
            if point.generation > applied && !read_only {
                // Recorded by a store that was then moved back (restored from a backup):
                // not a generation this store holds.
                log::warn!(
                    "restore point {} is newer than the store's generation {applied}; ignored",
                    point.generation
                );
                continue;
            }
            let images = history.load(point.generation, params, &mut cache);
            gens.insert(point.generation, Gen { point, images });
        }
        let applied = gens.keys().next_back().copied().unwrap_or(applied);
        if !gens.contains_key(&applied) {
            anyhow::bail!(
                "store {}: generation {applied} has no restore point record",
                root.display()
            );
        }
        let mut files = HashMap::new();
        for path in gens[&applied].images.keys() {
            match File::open(root.join(path)) {
                Ok(f) => {
                    files.insert(path.clone(), Arc::new(f));
                }
                Err(e) => log::warn!("cannot open image {path}: {e}"),
            }
        }
        Ok(View {
            root: root.to_path_buf(),
            history,
            params,
            policy,
            keeping: AtomicBool::new(policy.keeps_history()),
            state: RwLock::new(State {
                gens,
                applied,
                applying: None,
                files,
            }),
            kept: RwLock::new(kept),
            pins: Mutex::new(BTreeMap::new()),
            forks: Mutex::new(BTreeSet::new()),
            writer: Mutex::new(()),
            expire_due: AtomicBool::new(false),
            settling: Mutex::new(false),
            settled: Condvar::new(),
        })
    }

    /// A mount will read through this view: keep what each commit overwrites, so files open
    /// at the previous generation can go on reading it.
    pub fn serve_mount(&self) {
        self.keeping.store(true, Ordering::Relaxed);
    }

    /// Keeps generations `first..=last` for good (what commits overwrite of them too): they
    /// are a fork that exists nowhere else.
    pub fn keep_fork(&self, first: u64, last: u64) {
        self.keeping.store(true, Ordering::Relaxed);
        self.forks.lock().extend(first..=last);
    }

    pub fn keeps_overwritten(&self) -> bool {
        self.keeping.load(Ordering::Relaxed)
    }

    pub fn applied(&self) -> u64 {
        self.state.read().applied
    }

    /// The newest generation as the replica mount shows it: once a generation is acknowledged
    /// (its commit record durable), the one applied after it, waited for (the apply follows
    /// the acknowledgement at once), so a read after `ferry sync` returns sees what it synced.
    /// An apply that fails, or takes longer than [`NEWEST_WAIT`] (waited for once), leaves the
    /// one applied.
    pub fn newest(&self) -> u64 {
        let deadline = Instant::now() + NEWEST_WAIT;
        let mut settling = self.settling.lock();
        while *settling {
            if self.settled.wait_until(&mut settling, deadline).timed_out() {
                // A stalled apply: the lookups after this one do not wait for it either.
                *settling = false;
                break;
            }
        }
        drop(settling);
        self.applied()
    }

    /// The acknowledged generation's apply failed: [`View::newest`] stops waiting for it.
    pub fn apply_failed(&self) {
        self.set_settling(false);
    }

    fn set_settling(&self, on: bool) {
        *self.settling.lock() = on;
        if !on {
            self.settled.notify_all();
        }
    }

    /// The held generations, oldest first.
    pub fn generations(&self) -> Vec<u64> {
        self.state.read().gens.keys().copied().collect()
    }

    /// Whether generation `number` is held with group root `root` (hex).
    pub fn holds(&self, number: u64, root: &str) -> bool {
        self.state
            .read()
            .gens
            .get(&number)
            .is_some_and(|g| g.point.group_root == root)
    }

    pub fn committed_at(&self, number: u64) -> Option<SystemTime> {
        self.state
            .read()
            .gens
            .get(&number)
            .map(|g| g.point.committed_at())
    }

    /// What `path` is in generation `number` (`""` is the root directory).
    pub fn find(&self, number: u64, path: &str) -> Option<Found> {
        let st = self.state.read();
        let images = &st.gens.get(&number)?.images;
        if let Some(m) = images.get(path) {
            return Some(Found::Image(m.size()));
        }
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        images
            .range(prefix.clone()..)
            .next()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|_| Found::Dir)
    }

    /// The entries of directory `dir` in generation `number`: name and what it is.
    pub fn list(&self, number: u64, dir: &str) -> Option<Vec<(String, Found)>> {
        let st = self.state.read();
        let images = &st.gens.get(&number)?.images;
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut out: Vec<(String, Found)> = Vec::new();
        for (k, m) in images.range(prefix.clone()..) {
            let Some(rest) = k.strip_prefix(&prefix) else {
                break;
            };
            let (name, found) = match rest.split_once('/') {
                Some((d, _)) => (d, Found::Dir),
                None => (rest, Found::Image(m.size())),
            };
            if out.last().is_none_or(|(n, _)| n != name) {
                out.push((name.to_string(), found));
            }
        }
        Some(out)
    }

    /// The image file of `path` as the applied generation has it (for ownership and mode).
    pub fn image_file(&self, path: &str) -> Option<Arc<File>> {
        self.state.read().files.get(path).cloned()
    }

    /// An open file reads generation `number` until [`View::unpin`]. False if it is not held.
    pub fn pin(&self, number: u64) -> bool {
        let st = self.state.read();
        if !st.gens.contains_key(&number) {
            return false;
        }
        *self.pins.lock().entry(number).or_default() += 1;
        true
    }

    /// The newest generation, pinned.
    pub fn pin_applied(&self) -> u64 {
        let st = self.state.read();
        *self.pins.lock().entry(st.applied).or_default() += 1;
        st.applied
    }

    pub fn unpin(&self, number: u64) {
        let last = {
            let mut pins = self.pins.lock();
            let n = pins.entry(number).or_default();
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                pins.remove(&number);
            }
            last
        };
        if last && number != self.applied() {
            self.expire_due.store(true, Ordering::SeqCst);
            self.expire_if_due();
        }
    }

    /// Expires what a closed file left unneeded, unless a commit or another expiry holds the
    /// writer: whoever holds it looks again when it lets go.
    pub fn expire_if_due(&self) {
        while self.expire_due.load(Ordering::SeqCst) {
            let Some(w) = self.writer.try_lock() else {
                return;
            };
            if self.expire_due.swap(false, Ordering::SeqCst)
                && let Err(e) = self.expire(&w)
            {
                log::warn!("cannot expire restore points: {e:#}");
            }
        }
    }

    /// Reads bytes of `path` as generation `number` has it: returns how many (short at its end).
    pub fn read(&self, number: u64, path: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let st = self.state.read();
        let g = st.gens.get(&number).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("generation {number} is no longer kept"),
            )
        })?;
        let m = g.images.get(path).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path} is not in generation {number}"),
            )
        })?;
        if off >= m.size() {
            return Ok(0);
        }
        let n = (m.size() - off).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let file = st.files.get(path);
        if number == st.applied
            && st.applying.is_none()
            && let Some(f) = file
        {
            read_full(f, buf, off)?;
            return Ok(n);
        }
        let kept = self.kept.read();
        let end = off + n as u64;
        let mut i = m.index_at(off).expect("off < size");
        while let Some(e) = m.entries().get(i)
            && e.offset < end
        {
            let (a, b) = (e.offset.max(off), e.end().min(end));
            let piece = &mut buf[(a - off) as usize..(b - off) as usize];
            match e.kind {
                Kind::Zero => piece.fill(0),
                Kind::Data(h) => {
                    if st.in_place(path, e) {
                        read_full(file.expect("in place"), piece, a)?;
                    } else if !kept.read(h.as_bytes(), a - e.offset, piece)? {
                        return Err(io::Error::other(format!(
                            "chunk {} of {path} at offset {} (generation {number}) is neither in \
                             the image nor kept: the store is damaged; run `ferry verify --deep`",
                            manifest::short_hex(h.as_bytes()),
                            e.offset
                        )));
                    }
                }
            }
            i += 1;
        }
        Ok(n)
    }

    /// A whole chunk of generation `number`, verified against its hash (for `ferry restore`).
    pub fn chunk(&self, number: u64, path: &str, e: &Entry) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; e.len as usize];
        self.read(number, path, e.offset, &mut buf)?;
        if let Kind::Data(h) = e.kind
            && blake3::hash(&buf) != h
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{path} at offset {} (generation {number}) does not match its hash {}",
                    e.offset,
                    manifest::short_hex(h.as_bytes())
                ),
            ));
        }
        Ok(buf)
    }

    /// The manifest of `path` in generation `number`.
    pub fn manifest(&self, number: u64, path: &str) -> Option<Arc<Manifest>> {
        self.state
            .read()
            .gens
            .get(&number)?
            .images
            .get(path)
            .cloned()
    }

    // The store's side.

    /// Taken by a commit for its whole course (see the field).
    pub fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock()
    }

    pub fn is_kept(&self, hash: &[u8; 32]) -> bool {
        self.kept.read().contains(hash)
    }

    /// Keeps a chunk (verified by the caller) that applying generation `number` overwrites.
    pub fn keep(&self, number: u64, hash: &[u8; 32], data: &[u8]) -> io::Result<()> {
        self.kept.write().put(number, hash, data)
    }

    /// Re-reads every kept chunk: those whose bytes no longer match their hash, with their
    /// pack. One pack at a time under the lock, so commits wait for one pack's read at most.
    pub fn verify_kept(&self) -> io::Result<Vec<([u8; 32], u64)>> {
        let mut bad = Vec::new();
        let packs = self.kept.read().packs();
        for n in packs {
            let found = self.kept.read().verify(n)?;
            bad.extend(found.into_iter().map(|h| (h, n)));
        }
        Ok(bad)
    }

    /// A kept chunk, verified.
    pub fn kept_chunk(&self, hash: &[u8; 32]) -> io::Result<Option<Vec<u8>>> {
        self.kept.read().get(hash)
    }

    /// Mends a damaged kept chunk with the right bytes, verified by the caller.
    pub fn repair_kept(&self, hash: &[u8; 32], data: &[u8]) -> io::Result<bool> {
        self.kept.write().repair(hash, data)
    }

    /// The held generations that read chunk `hash` from the kept chunks (not in place).
    pub fn generations_with(&self, hash: &[u8; 32]) -> Vec<u64> {
        let st = self.state.read();
        st.gens
            .keys()
            .copied()
            .filter(|n| st.read_from_packs(*n).any(|h| h == *hash))
            .collect()
    }

    pub fn sync_kept(&self, number: u64) -> io::Result<()> {
        self.kept.read().sync(number)
    }

    /// The images are about to change: `changes` maps each changed image to its new manifest
    /// (`None`: removed).
    pub fn begin_apply(&self, changes: BTreeMap<String, Option<Arc<Manifest>>>) {
        self.state.write().applying = Some(changes);
        self.set_settling(true);
    }

    /// Whether a generation is being applied (between `begin_apply` and `end_apply`).
    pub fn is_applying(&self) -> bool {
        self.state.read().applying.is_some()
    }

    /// Generation `point` is applied: new opens read it.
    pub fn end_apply(&self, point: Point) {
        let mut st = self.state.write();
        let changes = st.applying.take().unwrap_or_default();
        let mut images = st.current().clone();
        for (path, m) in changes {
            match m {
                Some(m) => {
                    match File::open(self.root.join(&path)) {
                        Ok(f) => {
                            st.files.insert(path.clone(), Arc::new(f));
                        }
                        Err(e) => log::warn!("cannot open image {path}: {e}"),
                    }
                    images.insert(path, m);
                }
                None => {
                    st.files.remove(&path);
                    images.remove(&path);
                }
            }
        }
        st.applied = point.generation;
        st.gens.insert(point.generation, Gen { point, images });
        drop(st);
        self.set_settling(false);
    }

    /// Expires the restore points the policy no longer keeps and frees the chunks only they
    /// needed.
    pub fn expire(&self, _writer: &MutexGuard<'_, ()>) -> Result<()> {
        let gone = {
            let mut st = self.state.write();
            let mut pinned: BTreeSet<u64> = self.pins.lock().keys().copied().collect();
            pinned.extend(self.forks.lock().iter().copied());
            let held: Vec<(u64, SystemTime)> = st
                .gens
                .iter()
                .map(|(n, g)| (*n, g.point.committed_at()))
                .collect();
            let gone = keep::expired(self.policy, &held, &pinned, SystemTime::now());
            for n in &gone {
                st.gens.remove(n);
            }
            gone
        };
        for n in &gone {
            self.history
                .remove(*n)
                .with_context(|| format!("cannot remove restore point {n}"))?;
        }
        let needed = self.state.read().needed();
        let freed = self.kept.write().retain(|h| needed.contains(h))?;
        if !gone.is_empty() || freed > 0 {
            log::info!(
                "expired restore points {gone:?}; {freed} bytes of kept chunks freed, {} kept",
                self.kept.read().bytes()
            );
        }
        Ok(())
    }

    /// The restore points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        let st = self.state.read();
        let pins = self.pins.lock();
        // Chunks each generation needs from the packs, and how many generations need each.
        let mut per_gen: BTreeMap<u64, HashMap<[u8; 32], u64>> = BTreeMap::new();
        let mut users: HashMap<[u8; 32], usize> = HashMap::new();
        for (n, g) in &st.gens {
            let mut own = HashMap::new();
            if *n != st.applied {
                for (path, m) in &g.images {
                    let empty = Manifest::empty(self.params);
                    let cur = st.current().get(path).map(|c| &**c).unwrap_or(&empty);
                    for e in changed_entries(cur, m) {
                        if let Some(h) = e.hash() {
                            own.insert(*h.as_bytes(), e.len);
                        }
                    }
                }
            }
            for h in own.keys() {
                *users.entry(*h).or_default() += 1;
            }
            per_gen.insert(*n, own);
        }
        st.gens
            .iter()
            .map(|(n, g)| PointInfo {
                generation: *n,
                committed: g.point.committed,
                group_root: g.point.group_root.clone(),
                epoch: g.point.epoch,
                images: g.images.len(),
                own_bytes: per_gen[n]
                    .iter()
                    .filter(|(h, _)| users[*h] == 1)
                    .map(|(_, l)| l)
                    .sum(),
                pinned: pins.contains_key(n),
            })
            .collect()
    }

    /// Bytes and chunks the packs hold.
    pub fn kept_figures(&self) -> (u64, usize) {
        let k = self.kept.read();
        (k.bytes(), k.chunks())
    }
}
