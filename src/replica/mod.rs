//! The replica's store: each image at the same relative path as on the primary, and under
//! `.ferry/` the committed manifests, the generation record, and the staging area.
//!
//! A generation is made durable and applied in this order, which is what keeps invariant 2
//! (the images always equal a committed generation, after any crash):
//! 1. every chunk of the generation is in the staging journal (received and verified, or copied
//!    from where the store already holds it and verified), or is a patch staged for the very
//!    place it goes (`patches`: the changed ranges over the committed bytes there), and both
//!    are fsynced; or, in an image the store does not hold yet, is written at its places in
//!    that image's staged file (`fresh`), completed and fsynced;
//! 2. the new manifests are written under `.ferry/staging/manifests/`;
//! 3. the commit record `.ferry/staging/commit` is written atomically: the generation is
//!    committed, and acknowledged after this step (a crash from here on is finished by the
//!    replay below, so the promise holds);
//! 4. new images' staged files are renamed where they go; the other images are changed in
//!    place from the journal and the patches (data written, zero extents punched as holes,
//!    sizes set), not yet fsynced (a large generation by several threads, each a run of
//!    entries: into the page cache this is CPU work);
//! 5. the staged manifests replace the committed ones (hard links), then the generation record
//!    is replaced;
//! 6. then the images are fsynced and the staging area is emptied.
//!
//! Steps 4 to 6 are *settling*: after the acknowledgement is on its way, and before anything
//! else touches the store (a session, a stage, a commit, a scrub). Until then the store answers
//! for the committed generation as it will be ([`Store::committed`], the images it reports),
//! and the replica mount serves the previous one, reading what the apply overwrites from the
//! kept chunks. An apply that fails there is written again from the staging (the replay below)
//! at the next settle, and the session that finds it failing is refused with the cause.
//!
//! On start, a commit record not older than the generation record is replayed from step 4:
//! every chunk the staging holds is written again at each place the generation's manifests put
//! it (writing the same bytes again is harmless), since a crash before step 6 may have lost any
//! of step 4's writes and the committed manifests may already be the new ones. The images are
//! written from the staging alone, so the replay needs neither the old manifests nor the old
//! bytes; a new image's staged file still there is renamed. A staging journal without a commit
//! record is kept, so an interrupted transfer resumes without sending those chunks again (and a
//! new image's staged file, checked by hash first: see `fresh`).
//!
//! Settling after the acknowledgement takes the apply and the images' fsync (a random write
//! per patch on the disk) off every sync's lag; the next session, staging or commit waits for
//! it.

pub mod daemon;
mod fresh;
mod fuse;
pub mod history;
mod index;
mod journal;
pub mod keep;
mod kept;
pub mod metrics;
pub mod patches;
pub mod promote;
pub mod scrub;
pub mod site;
pub mod view;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkParams, FileSource, chunk_full};
use crate::durable;
use crate::epoch::{self, Holder};
use crate::manifest::{
    self, Entry, Kind, Manifest, ManifestDir, ManifestFileError, changed_entries,
};
use crate::wire::frame::{Hash, ImageState, NsChange};
use crate::wire::replica::{Generation, ReplicaStore};
use std::time::SystemTime;

use fresh::Fresh;
use index::ChunkIndex;
pub use journal::Journal;
pub use keep::Policy;
use patches::{Patch, PatchLog};
pub use site::Site;
pub use view::View;

/// The store's metadata directory (an image path may not start with it).
pub use crate::wire::replica::META_DIR;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct GenerationRecord {
    generation: u64,
    group_root: String,
    epoch: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CommitRecord {
    generation: u64,
    group_root: String,
    changes: Vec<NsChange>,
    images: Vec<String>,
    /// The generation the staged patches patch (absent in records written before settling
    /// existed: those were applied and fsynced before the generation record was replaced).
    #[serde(default)]
    base: Option<u64>,
    /// The new images staged in place (`fresh`): applied by renaming their staged files.
    #[serde(default)]
    fresh: Vec<String>,
}

impl CommitRecord {
    fn read(meta: &Path) -> Result<Option<CommitRecord>> {
        let p = meta.join("staging").join("commit");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .with_context(|| format!("commit record {} is corrupt", p.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(format!("cannot read {}", p.display())),
        }
    }
}

/// A generation committed (step 3) but not yet applied: steps 4 and 5 wait for the settle.
struct Pending {
    commit: CommitRecord,
    images: BTreeMap<String, Manifest>,
}

/// A generation written into the images but not yet fsynced there (step 6).
struct Unsettled {
    generation: u64,
    /// The images it wrote. None after a settle failed: a failed fsync may have dropped the
    /// pages it could not write, so the next settle writes the staged chunks again.
    files: Option<Vec<File>>,
}

/// Which entries of a generation's manifests applying writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writes {
    /// Those that differ from the committed manifests in memory: each must be staged.
    Changed,
    /// Every entry whose chunk is staged (a replay: the others are in place already).
    Staged,
}

/// A replica's store.
pub struct Store {
    root: PathBuf,
    params: ChunkParams,
    record: GenerationRecord,
    manifests: BTreeMap<String, Manifest>,
    /// Where each chunk of the committed images lives.
    index: ChunkIndex,
    journal: Journal,
    /// Chunks of the next generation staged as patches of the committed images.
    patches: PatchLog,
    /// New images of the next generation, staged in place.
    fresh: Fresh,
    /// Every held generation, read by the replica mount (set once the store is open).
    view: Option<Arc<View>>,
    /// The metrics, when someone watches: each commit's time, the figures after each change.
    watch: Option<metrics::Watch>,
    /// When the last deep verify ended, and the damaged chunks it left.
    verified: Option<(SystemTime, u64)>,
    /// The epoch this namespace accepts and who holds it (`.ferry/epoch.json`).
    holder: Holder,
    /// Committed images open for reading, by path, with the generation they were opened at:
    /// a patch check reads a piece or two of its base, and opening the file for each of
    /// thousands of patches cost more than the read.
    readers: parking_lot::Mutex<std::collections::HashMap<String, (u64, Arc<File>)>>,
    /// The generation committed but not yet applied (steps 4 and 5 of the module comment).
    pending: Option<Pending>,
    /// The generation applied but not yet settled (step 6 of the module comment).
    unsettled: Option<Unsettled>,
}

/// A store's figures, for metrics.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub generation: u64,
    pub epoch: u64,
    pub images: usize,
    pub image_bytes: u64,
    /// Bytes of chunks staged for the next generation.
    pub staged_bytes: u64,
    pub staged_chunks: usize,
    /// Distinct chunks of the committed images.
    pub chunks: usize,
    /// Restore points held (the newest generation included).
    pub kept_generations: usize,
    /// Bytes in the packs of kept chunks.
    pub kept_bytes: u64,
    /// When the last deep verify ended (Unix seconds), and the damaged chunks it left.
    pub verified: Option<(u64, u64)>,
}

/// statvfs(3) of the filesystem holding `p`.
pub(crate) fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Free bytes (for this user) and size of the filesystem holding `root`.
pub(crate) fn space(root: &Path) -> Option<(u64, u64)> {
    let s = statvfs(root).ok()?;
    Some((s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
}

/// What committing a generation takes on the store's disk, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Needed {
    /// New chunks into the staging journal (received, or copied from elsewhere in the store).
    stage: u64,
    /// Chunks it overwrites, kept for restore points and open files.
    keep: u64,
    /// Data the images gain (extents that were holes or past their end).
    growth: u64,
    /// Manifests, records and journal headers.
    meta: u64,
}

impl Needed {
    fn total(&self) -> u64 {
        self.stage + self.keep + self.growth + self.meta
    }
}

fn hash_from_hex(s: &str) -> Result<Hash> {
    if s.is_empty() {
        return Ok([0; 32]);
    }
    manifest::from_hex(s).map_err(|e| anyhow::anyhow!("bad hash: {e}"))
}

/// Writes the metadata of a store into `dir`, whose images already are what `manifests` say:
/// committed generation `generation` (group root `group_root`, hex) held by `holder`. For a
/// fenced primary's backing directory that rejoins as a replica: nothing is re-read.
pub fn seed(
    dir: &Path,
    manifests: &BTreeMap<String, Arc<Manifest>>,
    generation: u64,
    group_root: &str,
    holder: &Holder,
) -> Result<()> {
    let meta = dir.join(META_DIR);
    if meta.exists() {
        bail!(
            "{} exists already: {} is a store already",
            meta.display(),
            dir.display()
        );
    }
    let mdir = ManifestDir::new(meta.join("manifests"));
    fs::create_dir_all(mdir.path())?;
    for (image, m) in manifests {
        mdir.save(image, m)?;
    }
    epoch::save(&meta.join(epoch::FILE), holder)?;
    let record = GenerationRecord {
        generation,
        group_root: group_root.to_string(),
        epoch: holder.epoch,
    };
    durable::write_atomic(&meta.join("generation"), &serde_json::to_vec(&record)?)?;
    Ok(())
}

impl Store {
    /// Opens the store at `root` keeping no restore points (see [`Store::open_with`]).
    pub fn open(root: &Path, params: ChunkParams) -> Result<Store> {
        Store::open_with(root, params, Policy::default())
    }

    /// Opens the store at `root`, replaying a committed but unapplied generation and indexing
    /// every image (images without a manifest, e.g. seeded by hand, are chunked now), with
    /// restore points kept as `policy` says.
    pub fn open_with(root: &Path, params: ChunkParams, policy: Policy) -> Result<Store> {
        fs::create_dir_all(root.join(META_DIR).join("manifests"))
            .with_context(|| format!("cannot create store {}", root.display()))?;
        fs::create_dir_all(root.join(META_DIR).join("staging").join("manifests"))?;
        let root = root.canonicalize()?;
        let record_path = root.join(META_DIR).join("generation");
        let record: GenerationRecord = match fs::read(&record_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => r,
                Err(e) => rebuild_record(&root, &record_path, &e)?,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => GenerationRecord::default(),
            Err(e) => return Err(e).context(format!("cannot read {}", record_path.display())),
        };
        let journal = Journal::open(
            &root.join(META_DIR).join("staging").join("journal"),
            params.max_size,
        )?;
        // A generation applied but not settled may have replaced the generation record: its
        // patches were staged on the generation its commit record names.
        let staged_on = CommitRecord::read(&root.join(META_DIR))?
            .and_then(|c| c.base)
            .unwrap_or(record.generation);
        let patches = PatchLog::open(
            &root.join(META_DIR).join("staging").join("patches"),
            staged_on,
            params.max_size,
        )?;
        let root_meta_images = root.join(META_DIR).join("staging").join("images");
        let holder =
            epoch::load::<Holder>(&root.join(META_DIR).join(epoch::FILE))?.unwrap_or_else(|| {
                Holder {
                    epoch: record.epoch,
                    ..Holder::default()
                }
            });
        let mut store = Store {
            root,
            params,
            record,
            manifests: BTreeMap::new(),
            index: ChunkIndex::default(),
            journal,
            patches,
            fresh: Fresh::new(&root_meta_images)?,
            view: None,
            watch: None,
            verified: None,
            holder,
            readers: Default::default(),
            pending: None,
            unsettled: None,
        };
        store.replay()?;
        store.load_manifests()?;
        // The applied generation's point is made again from the committed manifests: a crash
        // may have come before it was recorded, or (after a replay) recorded an older state.
        let number = store.record.generation;
        let committed = store
            .history()
            .list(false)?
            .into_iter()
            .find(|p| p.generation == number)
            .map_or_else(SystemTime::now, |p| p.committed_at());
        store.record_point(committed)?;
        let view = View::open(&store.root, params, policy, number, false)?;
        for f in &store.holder.forks {
            view.keep_fork(f.first, f.last);
        }
        store.view = Some(Arc::new(view));
        log::info!(
            "store {}: generation {}, {} images, {} chunks staged",
            store.root.display(),
            store.record.generation,
            store.manifests.len(),
            store.journal.len()
        );
        Ok(store)
    }

    /// The figures metrics show.
    pub fn figures(&self) -> Figures {
        // The committed generation's images: an acknowledged one not applied yet included.
        let mut sizes: BTreeMap<&str, u64> = self
            .manifests
            .iter()
            .map(|(p, m)| (p.as_str(), m.size()))
            .collect();
        if let Some(p) = &self.pending {
            for c in &p.commit.changes {
                if let NsChange::Remove { path } = c {
                    sizes.remove(path.as_str());
                }
            }
            sizes.extend(p.images.iter().map(|(p, m)| (p.as_str(), m.size())));
        }
        Figures {
            generation: self.committed().0,
            epoch: self.record.epoch,
            images: sizes.len(),
            image_bytes: sizes.values().sum(),
            staged_bytes: self.journal.bytes() + self.patches.bytes() + self.fresh.staged().1,
            staged_chunks: self.journal.len() + self.patches.len() + self.fresh.staged().0,
            chunks: self.index.len(),
            kept_generations: self.view().generations().len(),
            kept_bytes: self.view().kept_figures().0,
            verified: self.verified.map(|(t, left)| {
                let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                (secs.as_secs(), left)
            }),
        }
    }

    /// The epoch this namespace accepts, and who holds it.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The committed generation and its group root (hex): the one last acknowledged, applied
    /// or not yet.
    pub fn committed(&self) -> (u64, &str) {
        match &self.pending {
            Some(p) => (p.commit.generation, &p.commit.group_root),
            None => (self.record.generation, &self.record.group_root),
        }
    }

    /// Whether this namespace holds (as its committed generation or a restore point) the
    /// generation `generation` with group root `root` (hex).
    pub fn holds(&self, generation: u64, root: &str) -> bool {
        self.committed() == (generation, root) || self.view().holds(generation, root)
    }

    /// Records who holds the namespace from now on, durably, before any session of the
    /// holder goes on; keeps the generations of its fork (if any) for good.
    pub fn set_holder(&mut self, h: Holder) -> Result<()> {
        let path = self.meta().join(epoch::FILE);
        epoch::save(&path, &h).with_context(|| format!("cannot write {}", path.display()))?;
        for f in &h.forks {
            self.view().keep_fork(f.first, f.last);
        }
        self.holder = h;
        Ok(())
    }

    /// Reports to `w` from now on (the figures as they are now, first).
    pub fn watch(&mut self, w: metrics::Watch) {
        w.publish(self.figures());
        self.watch = Some(w);
    }

    /// Tells the metrics the store's figures: after every change a scrape must see (a scrape
    /// never waits for the store, which a commit or an apply can hold for seconds).
    fn publish(&self) {
        if let Some(w) = &self.watch {
            w.publish(self.figures());
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What the replica mount reads.
    pub fn view(&self) -> &Arc<View> {
        self.view.as_ref().expect("set when the store opened")
    }

    fn history(&self) -> history::History {
        history::History::new(&self.meta())
    }

    /// Records the applied generation as a restore point.
    fn record_point(&self, committed: SystemTime) -> Result<history::Point> {
        let p = history::Point {
            generation: self.record.generation,
            group_root: self.record.group_root.clone(),
            epoch: self.record.epoch,
            committed: committed
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        self.history()
            .record(&p, &self.manifests_in("manifests"), self.manifests.keys())?;
        Ok(p)
    }

    fn meta(&self) -> PathBuf {
        self.root.join(META_DIR)
    }

    /// Moves what stands where image `path` must go, if it is not a regular file (a directory
    /// left by a primary that rejoined as a replica, a link made by hand), into
    /// `.ferry/displaced/GENERATION/path`: the namespace holds the primary's images, but what
    /// someone put there is never deleted.
    fn displace(&self, path: &str, generation: u64) -> Result<()> {
        let at = self.root.join(path);
        match fs::symlink_metadata(&at) {
            Ok(md) if !md.is_file() => {
                let to = self
                    .meta()
                    .join("displaced")
                    .join(generation.to_string())
                    .join(path);
                if let Some(dir) = to.parent() {
                    fs::create_dir_all(dir)?;
                }
                fs::rename(&at, &to).with_context(|| {
                    format!("cannot move {} aside to {}", at.display(), to.display())
                })?;
                log::warn!(
                    "{}: not a file where image {path} of generation {generation} goes; moved \
                     aside to {}",
                    at.display(),
                    to.display()
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The committed manifests (`"manifests"`) or the staged ones (`"staging/manifests"`).
    fn manifests_in(&self, dir: &str) -> ManifestDir {
        ManifestDir::new(self.meta().join(dir))
    }

    /// Every regular file under the store, as a relative path.
    fn image_paths(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for ent in fs::read_dir(&dir)? {
                let ent = ent?;
                let p = ent.path();
                let rel = p.strip_prefix(&self.root).expect("under root");
                if rel.starts_with(META_DIR) {
                    continue;
                }
                let ft = ent.file_type()?;
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn load_manifests(&mut self) -> Result<()> {
        for path in self.image_paths()? {
            let file = self.root.join(&path);
            let size = fs::metadata(&file)?.len();
            let m = match self.manifests_in("manifests").load(&path) {
                Ok(m) if m.size() == size && m.params() == self.params => m,
                other => {
                    match other {
                        Err(ManifestFileError::Io { source, .. })
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            log::info!("{path}: no manifest; chunking the image")
                        }
                        Err(e) => log::warn!(
                            "{path}: its manifest is damaged ({e}); chunking the image again \
                             (the primary's next sync ships whatever differs)"
                        ),
                        Ok(_) => {
                            log::warn!("{path}: manifest does not fit the image; chunking it again")
                        }
                    }
                    let (m, _) = chunk_full(&FileSource::open(&file)?, self.params)?;
                    self.save_manifest("manifests", &path, &m)?;
                    m
                }
            };
            self.manifests.insert(path, m);
        }
        self.rebuild_index();
        Ok(())
    }

    fn rebuild_index(&mut self) {
        self.index = ChunkIndex::build(&self.manifests);
    }

    fn save_manifest(&self, dir: &str, image: &str, m: &Manifest) -> Result<()> {
        Ok(self.manifests_in(dir).save(image, m)?)
    }

    /// Reads bytes of a committed image, zeros past its end.
    fn read_image(&self, image: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        read_image(&self.root, image, offset, len)
    }

    /// Where a generation's chunks can be read from before it is applied.
    fn sources(&self) -> Sources<'_> {
        Sources {
            root: &self.root,
            journal: &self.journal,
            patches: &self.patches,
            index: &self.index,
        }
    }

    /// Applies a committed generation (steps 4 and 5 of the module comment; [`Store::settle`]
    /// is step 6), and brings the chunk index along: by the changed entries, or built again
    /// when applying failed midway (the manifests in memory may then be partly the new ones).
    fn apply(
        &mut self,
        commit: &CommitRecord,
        new: &BTreeMap<String, Manifest>,
        writes: Writes,
    ) -> Result<()> {
        // The committed manifests this generation removes or replaces.
        let mut before: BTreeMap<String, Manifest> = BTreeMap::new();
        if let Err(e) = self.apply_steps(commit, new, writes, &mut before) {
            self.rebuild_index();
            return Err(e);
        }
        let paths: std::collections::BTreeSet<&String> = before.keys().chain(new.keys()).collect();
        let changes: index::Changes = paths
            .into_iter()
            .map(|p| (p.as_str(), before.get(p), self.manifests.get(p)))
            .collect();
        self.index.update(&changes, &self.manifests);
        // The pieces cached for the chunks this generation replaced (received whole, or
        // patched) are let go: the cache then holds what the images hold, not every chunk
        // ever received up to its bound.
        let empty = Manifest::empty(self.params);
        for (_, old, now) in &changes {
            if let Some(old) = old {
                for e in changed_entries(now.unwrap_or(&empty), old) {
                    if let Some(h) = e.hash() {
                        crate::chunk::forget_pieces(&h);
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_steps(
        &mut self,
        commit: &CommitRecord,
        new: &BTreeMap<String, Manifest>,
        writes: Writes,
        before: &mut BTreeMap<String, Manifest>,
    ) -> Result<()> {
        for c in &commit.changes {
            if let NsChange::Remove { path } = c {
                let p = self.root.join(path);
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context(format!("cannot remove {}", p.display())),
                }
                self.manifests_in("manifests").remove(path);
                if let Some(m) = self.manifests.remove(path) {
                    before.insert(path.clone(), m);
                }
            }
        }
        let empty = Manifest::empty(self.params);
        let mut files = Vec::with_capacity(new.len());
        for (path, m) in new {
            let file_path = self.root.join(path);
            self.displace(path, commit.generation)?;
            if let Some(dir) = file_path.parent() {
                fs::create_dir_all(dir)?;
            }
            let fresh = commit.fresh.contains(path);
            if fresh {
                // Staged in place and durable (step 1): renamed where it goes, unless a
                // replay finds that done already.
                let staged = Fresh::staged_path(&self.meta().join("staging").join("images"), path);
                crate::fault::point("replica.image.write")?;
                match fs::rename(&staged, &file_path) {
                    Ok(()) => durable::fsync_dir(file_path.parent().unwrap_or(&self.root))?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound && writes == Writes::Staged => {}
                    Err(e) => {
                        return Err(e).context(format!(
                            "cannot move the staged image {} to {}",
                            staged.display(),
                            file_path.display()
                        ));
                    }
                }
            }
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&file_path)
                .with_context(|| format!("cannot open {}", file_path.display()))?;
            let old = match writes {
                Writes::Changed => self.manifests.get(path).unwrap_or(&empty),
                Writes::Staged => &empty,
            };
            let staged = Staged {
                journal: &self.journal,
                patches: &self.patches,
            };
            if !fresh {
                write_changes(&f, path, old, m, &staged, writes).with_context(|| {
                    format!("cannot apply generation to {}", file_path.display())
                })?;
            }
            f.set_len(m.size())?;
            files.push(f);
        }
        // The staged manifests (step 2; a replay finds them there too) become the committed
        // ones by a link: no second encoding and writing of every entry.
        let (staged, committed) = (
            self.manifests_in("staging/manifests"),
            self.manifests_in("manifests"),
        );
        for (path, m) in new {
            committed.adopt(&staged, path)?;
            if let Some(old) = self.manifests.insert(path.clone(), m.clone()) {
                before.entry(path.clone()).or_insert(old);
            }
        }
        self.record = GenerationRecord {
            generation: commit.generation,
            group_root: commit.group_root.clone(),
            epoch: self.holder.epoch,
        };
        crate::fault::point("replica.generation.record")?;
        durable::write_atomic(
            &self.meta().join("generation"),
            &serde_json::to_vec(&self.record)?,
        )?;
        // Only now is there something to settle: an apply that failed before this keeps its
        // commit record, and is replayed at the next start.
        self.unsettled = Some(Unsettled {
            generation: commit.generation,
            files: Some(files),
        });
        Ok(())
    }

    /// Makes the generation last applied durable in the images and empties the staging (step 6
    /// of the module comment): called after its acknowledgement is on its way, and before
    /// anything stages, commits, scrubs or serves a session. Nothing to do when it ran already.
    /// On an error the generation stays unsettled and the next call writes it again from the
    /// staging.
    pub fn settle(&mut self) -> Result<()> {
        // Called before every frame is staged: most often there is nothing to do.
        if self.pending.is_none() && self.unsettled.is_none() {
            return Ok(());
        }
        let r = self.settle_all();
        self.publish();
        r
    }

    fn settle_all(&mut self) -> Result<()> {
        let t = std::time::Instant::now();
        if let Some(p) = self.pending.take() {
            let generation = p.commit.generation;
            if let Err(e) = self.apply_pending(p) {
                // Written again from the staging at the next settle (`replay`); until then
                // the mount serves the previous generation.
                self.view().apply_failed();
                self.unsettled = Some(Unsettled {
                    generation,
                    files: None,
                });
                return Err(e).with_context(|| {
                    format!(
                        "store {}: generation {generation} is committed and acknowledged but \
                         cannot be applied to its images (its staging is kept, and applied \
                         again at the next session or restart); check the disk and the kernel \
                         log",
                        self.root.display()
                    )
                });
            }
        }
        let Some(u) = self.unsettled.take() else {
            return Ok(());
        };
        let generation = u.generation;
        let applied = t.elapsed();
        let settled = self.settle_this(u);
        log::debug!(
            "store {}: generation {generation} applied in {} ms, durable in its images {} ms later",
            self.root.display(),
            applied.as_millis(),
            (t.elapsed() - applied).as_millis()
        );
        if settled.is_err() {
            self.unsettled = Some(Unsettled {
                generation,
                files: None,
            });
        }
        settled.with_context(|| {
            format!(
                "store {}: generation {generation} is committed and acknowledged but cannot be \
                 made durable in its images (its staging is kept, and written again at the \
                 next session or restart); check the disk and the kernel log",
                self.root.display()
            )
        })
    }

    fn settle_this(&mut self, u: Unsettled) -> Result<()> {
        crate::fault::point("replica.settle")?;
        let Some(files) = u.files else {
            // Written again from the staging, and settled (replay ends in `settle`).
            return self.replay();
        };
        for f in &files {
            f.sync_all()?;
        }
        drop(files);
        durable::fsync_dir(&self.root)?;
        self.clear_staging(u.generation)
    }

    /// Empties the staging area once generation `generation` is durable in the images: the
    /// commit record first, then the journal, patches and staged manifests.
    fn clear_staging(&mut self, generation: u64) -> Result<()> {
        let staging = self.meta().join("staging");
        crate::fault::point("replica.staging.cleanup")?;
        let _ = fs::remove_file(staging.join("commit"));
        durable::fsync_dir(&staging)?;
        self.journal.clear()?;
        self.patches.clear(generation)?;
        self.fresh.clear();
        for dir in ["manifests", "images"] {
            let _ = fs::remove_dir_all(staging.join(dir));
            fs::create_dir_all(staging.join(dir))?;
        }
        Ok(())
    }

    /// Replays a committed generation that may not be durable in the images yet: not applied
    /// at all, applied in part, or applied but not settled.
    fn replay(&mut self) -> Result<()> {
        let Some(commit) = CommitRecord::read(&self.meta())? else {
            return Ok(());
        };
        if commit.generation < self.record.generation {
            // Settled already; only the clean-up was interrupted.
            return self.clear_staging(self.record.generation);
        }
        if commit.generation > self.record.generation {
            log::warn!(
                "store {}: generation {} was committed but not fully applied; applying it again",
                self.root.display(),
                commit.generation
            );
        } else {
            log::info!(
                "store {}: generation {} was applied but may not be durable in its images yet; \
                 writing its staged chunks again",
                self.root.display(),
                commit.generation
            );
        }
        // The committed manifests as they were before (or already after) this generation.
        for path in &commit.images {
            if let Ok(m) = self.manifests_in("manifests").load(path) {
                self.manifests.insert(path.clone(), m);
            }
        }
        let mut new = BTreeMap::new();
        for path in &commit.images {
            new.insert(
                path.clone(),
                self.manifests_in("staging/manifests").load(path)?,
            );
        }
        self.apply(&commit, &new, Writes::Staged)?;
        if self.journal.lost_records() || self.patches.lost_records() {
            self.mend_replayed(&commit.images)?;
        }
        if self.view.as_ref().is_some_and(|v| v.is_applying()) {
            // A live apply failed: the replica mount still serves the previous generation.
            self.end_apply(SystemTime::now())?;
        }
        self.settle()
    }
}

/// The generation the store at `root` (a namespace's directory) acknowledged and is applying
/// now (or will apply when its daemon starts), if any: its restore points, recorded when an
/// apply ends, do not hold it yet. For readers beside the daemon (`ferry status --config`).
pub fn applying(root: &Path) -> Option<u64> {
    CommitRecord::read(&root.join(META_DIR))
        .ok()
        .flatten()
        .map(|c| c.generation)
}

/// Waits up to `timeout` for the store at `root` (a namespace's directory) to settle: the
/// replica acknowledges a generation once its commit record is durable and applies it right
/// after, removing the record when the images hold it. For readers beside the daemon (`ferry
/// generations`, `ferry restore`), so they see what `ferry sync` reported. False if a commit
/// record is still there (an apply in progress or failed, or a daemon that stopped before it:
/// the restart finishes it).
pub fn wait_settled(root: &Path, timeout: std::time::Duration) -> bool {
    let commit = root.join(META_DIR).join("staging").join("commit");
    let t = std::time::Instant::now();
    while commit.exists() {
        if t.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// A generation record that cannot be read (bit rot, a torn write the atomic replace should
/// have made impossible) is set aside and made again from the newest restore point, which
/// recorded the same fields at its commit. Its images and manifests are what a replay left, so
/// the worst case is a number or root that is behind them: the primary's next session then
/// ships what differs (by Merkle descent if it must), and `ferry verify --deep` checks the rest.
fn rebuild_record(
    root: &Path,
    path: &Path,
    damage: &serde_json::Error,
) -> Result<GenerationRecord> {
    let aside = path.with_file_name(format!(
        "generation.damaged-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    ));
    fs::rename(path, &aside).with_context(|| {
        format!(
            "generation record {} is damaged ({damage}) and cannot be moved aside",
            path.display()
        )
    })?;
    let newest = history::History::new(&root.join(META_DIR))
        .list(true)?
        .into_iter()
        .max_by_key(|p| p.generation);
    let record = newest.map_or_else(GenerationRecord::default, |p| GenerationRecord {
        generation: p.generation,
        group_root: p.group_root,
        epoch: p.epoch,
    });
    durable::write_atomic(path, &serde_json::to_vec(&record)?)?;
    log::warn!(
        "generation record {} was damaged ({damage}): moved aside to {}, and made again from \
         the newest restore point (generation {}); the primary's next sync ships whatever \
         differs, and `ferry verify --deep` checks the images",
        path.display(),
        aside.display(),
        record.generation
    );
    Ok(record)
}

/// Bytes on disk a store (a namespace's directory) has staged for the generation in transfer,
/// read from its files (for a status without the daemon): the journal, the patches, and the
/// blocks of the new images staged in place (their lengths may run ahead of what arrived).
pub fn staged_on_disk(store: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let staging = store.join(META_DIR).join("staging");
    let logs: u64 = ["journal", "patches"]
        .iter()
        .map(|f| fs::metadata(staging.join(f)).map_or(0, |m| m.len()))
        .sum();
    let fresh: u64 = fs::read_dir(staging.join("images")).map_or(0, |d| {
        d.filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    });
    logs + fresh
}

/// Bytes of a committed image, zeros past its end.
fn read_image(root: &Path, image: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let f = File::open(root.join(image))?;
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; len as usize];
    let avail = size.saturating_sub(offset).min(len) as usize;
    f.read_exact_at(&mut buf[..avail], offset)?;
    Ok(buf)
}

/// Where a chunk of the next generation can be read from: the journal, a staged patch over
/// the committed bytes it patches, or the place the store holds it. Every way is verified.
struct Sources<'a> {
    root: &'a Path,
    journal: &'a Journal,
    patches: &'a PatchLog,
    index: &'a ChunkIndex,
}

impl Sources<'_> {
    fn bytes(&self, h: &Hash) -> Result<Vec<u8>> {
        if let Some(data) = self.journal.get(h)? {
            return Ok(data);
        }
        if let Some((src, off, len)) = self.patches.place(h) {
            let p = self.patches.get(h)?.context("staged patch vanished")?;
            let data = p.over(read_image(self.root, src, off, len as u64)?);
            if blake3::hash(&data).as_bytes() != h {
                bail!(
                    "staged patch {} over {src} at {off} does not make its chunk: the store is \
                     damaged there; run `ferry verify --deep`",
                    manifest::hex(h)
                );
            }
            return Ok(data);
        }
        let Some((src, off, len)) = self.index.get(h).cloned() else {
            bail!(
                "chunk {} of the generation is neither staged nor stored",
                manifest::hex(h)
            );
        };
        let data = read_image(self.root, &src, off, len)?;
        if blake3::hash(&data).as_bytes() != h {
            bail!(
                "stored chunk {} in {src} at {off} does not match its hash: the store is \
                 damaged; run `ferry verify --deep`",
                manifest::hex(h)
            );
        }
        Ok(data)
    }
}

/// What a generation's chunks are staged in.
struct Staged<'a> {
    journal: &'a Journal,
    patches: &'a PatchLog,
}

/// Writes the entries of `new` that are not identical in `old` into `f` (image `path`), from
/// the journal, or as the ranges of a patch staged for exactly that place.
fn write_changes(
    f: &File,
    path: &str,
    old: &Manifest,
    new: &Manifest,
    staged: &Staged,
    writes: Writes,
) -> Result<()> {
    // Into the page cache only: the disk's work is settling's (after the acknowledgement). So
    // the work is the CPU's (reading each chunk back from the staging, checking its hash,
    // copying it into the image): a large generation is written by several threads, each a
    // run of entries in offset order.
    let entries: Vec<&Entry> = changed_entries(old, new).collect();
    let bytes: u64 = entries.iter().map(|e| e.len).sum();
    let threads = apply_threads(bytes, entries.len());
    if threads <= 1 {
        for e in entries {
            write_entry(f, path, e, staged, writes)?;
        }
        return Ok(());
    }
    let run = entries.len().div_ceil(threads);
    std::thread::scope(|s| {
        let workers: Vec<_> = entries
            .chunks(run)
            .map(|part| {
                s.spawn(move || -> Result<()> {
                    for e in part {
                        write_entry(f, path, e, staged, writes)?;
                    }
                    Ok(())
                })
            })
            .collect();
        // Every worker is waited for before the first error is returned.
        let results: Vec<Result<()>> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an apply thread panicked")))
            })
            .collect();
        results.into_iter().collect::<Result<()>>()
    })
}

/// How many threads write a generation of `bytes` in `entries` entries into one image: one
/// per CPU (at most 4) for at least 8 MiB or 1,024 entries (below that a thread's start costs
/// more than it saves), else one.
fn apply_threads(bytes: u64, entries: usize) -> usize {
    if bytes < 8 << 20 && entries < 1024 {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

fn write_entry(f: &File, path: &str, e: &Entry, staged: &Staged, writes: Writes) -> Result<()> {
    crate::fault::point("replica.image.write")?;
    match e.kind {
        Kind::Data(h) => {
            let h = h.as_bytes();
            if let Some(data) = staged.journal.get(h)? {
                f.write_all_at(&data, e.offset)?;
            } else if staged.patches.place(h) == Some((path, e.offset, e.len as u32)) {
                let p = staged.patches.get(h)?.context("staged patch vanished")?;
                p.write_into(f)?;
            } else if writes == Writes::Changed {
                bail!("chunk {} at {} is not staged", manifest::hex(h), e.offset);
            }
        }
        Kind::Zero => fresh::punch(f, e)?,
    }
    Ok(())
}

/// What checking a patch against the committed bytes needs: taken under the store's lock,
/// used without it, so the patches of several data streams are checked at once (see
/// `wire::replica::Checked`).
pub struct PatchBase {
    /// The committed image, if it could be opened.
    file: Option<Arc<File>>,
    /// Its size (the committed manifest's).
    size: u64,
    offset: u64,
    len: u64,
    /// The committed chunk starting at the patch's place, and its length (which differs from
    /// the patch's when the chunk's end moved).
    base: Option<(blake3::Hash, u64)>,
    /// The generation whose bytes these are.
    pub generation: u64,
}

impl PatchBase {
    /// Whether `ranges` laid over these committed bytes (zeros past the image's end) make
    /// chunk `hash`. Reads only the pieces the ranges touch when the base was hashed as pieces
    /// before (`chunk::overlay_id`).
    pub fn makes(&self, hash: &Hash, ranges: &[(u64, serde_bytes::ByteBuf)]) -> io::Result<bool> {
        if !crate::wire::replica::ranges_fit(self.len, ranges) {
            return Ok(false);
        }
        let Some(f) = &self.file else {
            return Ok(false);
        };
        let mut read = |at: u64, buf: &mut [u8]| -> io::Result<()> {
            // A hostile offset near 2^64 fails the check, never wraps.
            let at = self
                .offset
                .checked_add(at)
                .ok_or(io::ErrorKind::InvalidInput)?;
            let avail = self.size.saturating_sub(at).min(buf.len() as u64) as usize;
            buf[avail..].fill(0);
            f.read_exact_at(&mut buf[..avail], at)
        };
        let parts: Vec<(usize, &[u8])> = ranges
            .iter()
            .map(|(at, b)| (*at as usize, b.as_slice()))
            .collect();
        Ok(crate::chunk::overlay_id(
            self.base.as_ref().map(|(h, l)| (h, *l as usize)),
            self.len as usize,
            &parts,
            &mut read,
        )
        .is_ok_and(|(id, _)| id.as_bytes() == hash))
    }
}

impl Store {
    /// The committed bytes a patch of chunk `[offset, offset + len)` of image `path` is laid
    /// over, to check it without the store's lock; `None` when no committed image has that
    /// path or the length is more than a chunk's.
    pub fn patch_base(&self, path: &str, offset: u64, len: u64) -> Option<PatchBase> {
        if len > self.params.max_size as u64 {
            return None;
        }
        let m = self.manifests.get(path)?;
        let base = m
            .index_starting_at(offset)
            .and_then(|i| Some((m.entries()[i].hash()?, m.entries()[i].len)));
        let generation = self.record.generation;
        let file = {
            let mut readers = self.readers.lock();
            match readers.get(path) {
                Some((g, f)) if *g == generation => Some(f.clone()),
                _ => File::open(self.root.join(path)).ok().map(|f| {
                    let f = Arc::new(f);
                    // Files of an older generation (an image since removed) are let go.
                    readers.retain(|_, (g, _)| *g == generation);
                    readers.insert(path.to_string(), (generation, f.clone()));
                    f
                }),
            }
        };
        Some(PatchBase {
            file,
            size: m.size(),
            offset,
            len,
            base,
            generation,
        })
    }
}

impl Store {
    /// What committing `images` (new manifests) over the committed ones takes on disk.
    fn needed(&self, images: &BTreeMap<String, Manifest>) -> Needed {
        let empty = Manifest::empty(self.params);
        let keeping = self.view().keeps_overwritten();
        let data = |m: &Manifest| -> u64 {
            m.entries()
                .iter()
                .filter(|e| !e.is_zero())
                .map(|e| e.len)
                .sum()
        };
        let mut n = Needed::default();
        let mut staged = std::collections::HashSet::new();
        let mut kept = std::collections::HashSet::new();
        for (path, new) in images {
            let old = self.manifests.get(path).unwrap_or(&empty);
            // A new image is staged in place: its growth is all it needs.
            let fresh = !self.manifests.contains_key(path);
            for e in changed_entries(old, new).filter(|_| !fresh) {
                if let Some(h) = e.hash()
                    && staged.insert(*h.as_bytes())
                    && !self.journal.contains(h.as_bytes())
                    && !self.patches.contains(h.as_bytes())
                {
                    n.stage += e.len;
                }
            }
            if keeping {
                for e in changed_entries(new, old) {
                    if let Some(h) = e.hash()
                        && kept.insert(*h.as_bytes())
                        && !self.view().is_kept(h.as_bytes())
                    {
                        n.keep += e.len;
                    }
                }
            }
            n.growth += data(new).saturating_sub(data(old));
            n.meta += 2 * (new.entries().len() as u64 * 64 + 4096);
        }
        n.meta += n.stage / 64 + (1 << 20);
        n
    }
}

impl ReplicaStore for Store {
    fn params(&self) -> ChunkParams {
        self.params
    }

    fn epoch(&self) -> u64 {
        self.holder.epoch
    }

    fn generation(&self) -> (u64, Hash) {
        let (number, root) = self.committed();
        (number, hash_from_hex(root).unwrap_or([0; 32]))
    }

    /// The images of the committed generation, as they are once it is applied.
    fn images(&self) -> Vec<ImageState> {
        let mut images: BTreeMap<&str, &Manifest> = self
            .manifests
            .iter()
            .map(|(p, m)| (p.as_str(), m))
            .collect();
        if let Some(p) = &self.pending {
            for c in &p.commit.changes {
                if let NsChange::Remove { path } = c {
                    images.remove(path.as_str());
                }
            }
            images.extend(p.images.iter().map(|(path, m)| (path.as_str(), m)));
        }
        images
            .into_iter()
            .map(|(path, m)| ImageState {
                path: path.to_string(),
                size: m.size(),
                root: *m.root().as_bytes(),
            })
            .collect()
    }

    fn manifest(&self, path: &str) -> Option<&Manifest> {
        self.manifests.get(path)
    }

    fn have(&self, hash: &Hash) -> bool {
        self.journal.contains(hash)
            || self.patches.contains(hash)
            || self.index.contains(hash)
            || self.fresh.holds(hash)
    }

    fn base_bytes(&self, path: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if !self.manifests.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such image"));
        }
        self.read_image(path, offset, len)
    }

    fn stage(&mut self, hash: &Hash, data: &[u8]) -> io::Result<()> {
        self.settle().map_err(io::Error::other)?;
        crate::fault::point("replica.journal.append")?;
        if self.fresh.write(hash, data)? {
            self.journal.append(hash, data)?;
        }
        Ok(())
    }

    /// Checks the patch by the pieces it touches when the committed chunk at its place was
    /// hashed as pieces before (`chunk::overlay_id`), unless it was checked against the
    /// committed generation ahead (`checked_at`), and keeps the ranges alone: the committed
    /// bytes around them stay where they are until the generation is applied (see `patches`).
    fn stage_patch(
        &mut self,
        hash: &Hash,
        path: &str,
        offset: u64,
        len: u64,
        ranges: &[(u64, serde_bytes::ByteBuf)],
        checked_at: Option<u64>,
    ) -> io::Result<bool> {
        self.settle().map_err(io::Error::other)?;
        crate::fault::point("replica.journal.append")?;
        if self.journal.contains(hash) || self.patches.contains(hash) {
            return Ok(true);
        }
        if checked_at != Some(self.record.generation) {
            let Some(base) = self.patch_base(path, offset, len) else {
                return Ok(false);
            };
            if !base.makes(hash, ranges)? {
                return Ok(false);
            }
        }
        debug_assert_eq!(self.patches.generation(), self.record.generation);
        self.patches
            .append(&Patch {
                hash: *hash,
                path: path.to_string(),
                offset,
                len: len as u32,
                ranges: ranges
                    .iter()
                    .map(|(at, b)| (*at as u32, b.to_vec()))
                    .collect(),
            })
            .map(|()| true)
    }

    fn prepare(&mut self, images: &BTreeMap<String, Manifest>) -> io::Result<()> {
        self.settle().map_err(io::Error::other)?;
        self.fresh.prepare(&self.manifests, images)
    }

    fn room_for(&self, images: &BTreeMap<String, Manifest>) -> std::result::Result<(), String> {
        let Some((free, _)) = space(&self.root) else {
            return Ok(());
        };
        let n = self.needed(images);
        if free >= n.total() {
            return Ok(());
        }
        let b = |v: u64| bytesize::ByteSize(v).display().iec().to_string();
        Err(format!(
            "no space in the store {} for this generation: {} free, {} needed ({} to stage, {} \
             to keep what it overwrites, {} of image growth)",
            self.root.display(),
            b(free),
            b(n.total()),
            b(n.stage),
            b(n.keep),
            b(n.growth)
        ))
    }

    fn commit(&mut self, g: &Generation) -> Result<()> {
        let t = std::time::Instant::now();
        let r = self.commit_timed(g);
        if let Some(w) = &self.watch {
            w.commit_seconds.observe(t.elapsed().as_secs_f64());
        }
        self.publish();
        r
    }
}

impl Store {
    /// Keeps every chunk of the committed images that applying `g` overwrites (verified), in
    /// the pack of generation `g`, and makes it durable before the commit record exists.
    fn keep_overwritten(&self, g: &Generation, view: &View) -> Result<()> {
        let empty = Manifest::empty(self.params);
        let removed: Vec<&String> = g
            .changes
            .iter()
            .filter_map(|c| match c {
                NsChange::Remove { path } => Some(path),
                _ => None,
            })
            .collect();
        let mut kept = 0u64;
        for (path, old) in &self.manifests {
            let new = match g.images.get(path) {
                Some(m) => m,
                None if removed.contains(&path) => &empty,
                None => continue,
            };
            for e in changed_entries(new, old) {
                let Some(h) = e.hash() else { continue };
                let h = *h.as_bytes();
                if view.is_kept(&h) {
                    continue;
                }
                let data = self.read_image(path, e.offset, e.len)?;
                if *blake3::hash(&data).as_bytes() != h {
                    log::warn!(
                        "{path} at offset {} does not match its manifest: the store is \
                         damaged there, so older generations cannot be read at that chunk; run \
                         `ferry verify --deep`",
                        e.offset
                    );
                    continue;
                }
                view.keep(g.number, &h, &data).with_context(|| {
                    format!(
                        "cannot keep the chunk of {path} at offset {} that generation {} \
                         overwrites (the restore points read it)",
                        e.offset, g.number
                    )
                })?;
                kept += e.len;
            }
        }
        view.sync_kept(g.number)
            .context("cannot make the kept chunks durable")?;
        log::debug!("generation {}: kept {kept} overwritten bytes", g.number);
        Ok(())
    }

    fn commit_timed(&mut self, g: &Generation) -> Result<()> {
        self.settle()?;
        // 1. Chunks the store holds elsewhere are copied into the journal (and verified), so
        //    applying never reads from an image it is changing. Only the entries that applying
        //    writes are needed: the others are in place already (an image the generation
        //    also removes is written in full).
        let empty = Manifest::empty(self.params);
        let removed = |p: &str| {
            g.changes
                .iter()
                .any(|c| matches!(c, NsChange::Remove { path } if path == p))
        };
        //    A new image staged in place is completed instead, from the same sources, and
        //    made durable.
        let mut fresh = Vec::new();
        for (path, m) in &g.images {
            if self.fresh.stages(path, m) {
                let src = Sources {
                    root: &self.root,
                    journal: &self.journal,
                    patches: &self.patches,
                    index: &self.index,
                };
                self.fresh.complete(path, m, &mut |h| src.bytes(h))?;
                fresh.push(path.clone());
                continue;
            }
            let old = match self.manifests.get(path) {
                Some(old) if !removed(path) => old,
                _ => &empty,
            };
            for e in changed_entries(old, m) {
                let Some(h) = e.hash() else { continue };
                let h = *h.as_bytes();
                if self.journal.contains(&h) {
                    continue;
                }
                // A patch for this very place is written as its ranges; one for elsewhere is
                // made whole now, from the committed bytes it was staged on.
                let unmoved = !removed(path)
                    && !g
                        .changes
                        .iter()
                        .any(|c| matches!(c, NsChange::Rename { from, .. } if from == path));
                if unmoved
                    && self.patches.place(&h) == Some((path.as_str(), e.offset, e.len as u32))
                {
                    continue;
                }
                let data = self.sources().bytes(&h)?;
                self.journal.append(&h, &data)?;
            }
        }
        crate::fault::point("replica.journal.fsync")?;
        self.journal.sync()?;
        self.patches.sync()?;
        // 1b. What applying overwrites, kept for the restore points and open files.
        let view = self.view().clone();
        let writer = view.writer();
        if view.keeps_overwritten() {
            self.keep_overwritten(g, &view)?;
        }
        // 2. Staged manifests.
        for (path, m) in &g.images {
            self.save_manifest("staging/manifests", path, m)?;
        }
        // 3. The commit record.
        let commit = CommitRecord {
            generation: g.number,
            group_root: manifest::hex(&g.group_root),
            changes: g.changes.clone(),
            images: g.images.keys().cloned().collect(),
            base: Some(self.patches.generation()),
            fresh,
        };
        crate::fault::point("replica.commit.record")?;
        durable::write_atomic(
            &self.meta().join("staging").join("commit"),
            &serde_json::to_vec(&commit)?,
        )?;
        // The staged new images are the commit record's now (renamed by the apply, or by its
        // replay).
        self.fresh.clear();
        // Until the settle has applied it, readers of the previous generation read what
        // changes from the kept chunks.
        let mut changes: BTreeMap<String, Option<Arc<Manifest>>> = g
            .changes
            .iter()
            .filter_map(|c| match c {
                NsChange::Remove { path } => Some((path.clone(), None)),
                _ => None,
            })
            .collect();
        for (path, m) in &g.images {
            changes.insert(path.clone(), Some(Arc::new(m.clone())));
        }
        view.begin_apply(changes);
        drop(writer);
        log::info!(
            "store {}: generation {} committed ({} images changed)",
            self.root.display(),
            g.number,
            g.images.len()
        );
        self.pending = Some(Pending {
            commit,
            images: g.images.clone(),
        });
        Ok(())
    }

    /// Applies the committed generation (steps 4 and 5) and makes it the replica mount's.
    fn apply_pending(&mut self, p: Pending) -> Result<()> {
        self.apply(&p.commit, &p.images, Writes::Changed)?;
        self.end_apply(SystemTime::now())
    }

    /// The generation just applied becomes a restore point and what the replica mount's new
    /// opens read; restore points the policy no longer keeps expire.
    fn end_apply(&mut self, committed: SystemTime) -> Result<()> {
        let view = self.view().clone();
        let writer = view.writer();
        view.end_apply(self.record_point(committed)?);
        if let Err(e) = view.expire(&writer) {
            log::warn!("cannot expire restore points: {e:#}");
        }
        drop(writer);
        view.expire_if_due();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::testutil::{flip_byte, journal_records, random, small_params as params};

    fn generation(number: u64, images: Vec<(&str, &[u8])>) -> Generation {
        Generation {
            number,
            group_root: [number as u8; 32],
            changes: vec![],
            images: images
                .into_iter()
                .map(|(p, b)| (p.to_string(), chunk_full(&b.to_vec(), params()).unwrap().0))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// Stages the chunks of `g` the store lacks, as a session would.
    fn stage_missing(store: &mut Store, g: &Generation, bytes: &BTreeMap<&str, Vec<u8>>) {
        for (path, m) in &g.images {
            for e in m.entries() {
                if let Some(h) = e.hash()
                    && !store.have(h.as_bytes())
                {
                    let b = &bytes[path.as_str()][e.offset as usize..e.end() as usize];
                    store.stage(h.as_bytes(), b).unwrap();
                }
            }
        }
    }

    /// An apply that fails midway leaves the manifests in memory partly new: the chunk index
    /// is built again from them, so it never names a place by what the image held before.
    #[test]
    fn an_apply_that_fails_midway_leaves_the_index_true_to_the_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (random(300_000, 11), random(300_000, 12));
        fs::write(dir.path().join("a"), &a).unwrap();
        fs::write(dir.path().join("b"), &b).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let (a2, b2) = (random(300_000, 13), random(300_000, 14));
        let g = generation(1, vec![("a", &a2), ("b", &b2)]);
        stage_missing(
            &mut store,
            &g,
            &BTreeMap::from([("a", a2.clone()), ("b", b2)]),
        );
        store.journal.sync().unwrap();
        for (path, m) in &g.images {
            store.save_manifest("staging/manifests", path, m).unwrap();
        }
        // Image "b"'s staged manifest is gone: applying fails after "a" took its new one.
        fs::remove_file(store.manifests_in("staging/manifests").file("b")).unwrap();
        let commit = CommitRecord {
            generation: 1,
            group_root: manifest::hex(&g.group_root),
            changes: vec![],
            images: vec!["a".to_string(), "b".to_string()],
            base: Some(0),
            fresh: vec![],
        };
        assert!(store.apply(&commit, &g.images, Writes::Changed).is_err());
        assert_eq!(
            store.manifests["a"], g.images["a"],
            "the case this test is about"
        );
        let built = ChunkIndex::build(&store.manifests);
        let hashes = [&a, &a2]
            .into_iter()
            .flat_map(|bytes| {
                chunk_full(&bytes.to_vec(), params())
                    .unwrap()
                    .0
                    .entries()
                    .to_vec()
            })
            .filter_map(|e| e.hash().map(|h| *h.as_bytes()));
        for h in hashes {
            assert_eq!(store.index.contains(&h), built.contains(&h));
        }
    }

    /// A commit reads and writes only the entries that change (invariant 6: its cost follows
    /// the change, not the image). A damaged chunk elsewhere in the image is not read (that is
    /// `ferry verify --deep`'s job), so it neither fails the commit nor gets rewritten.
    #[test]
    fn a_commit_touches_only_the_changed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 1);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.images().len(), 1);

        let mut new = old.clone();
        new[150_000..150_100].fill(7);
        let g = generation(1, vec![("img", &new)]);
        stage_missing(&mut store, &g, &BTreeMap::from([("img", new.clone())]));
        // Damage an unchanged chunk on disk, far from the change.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("img"))
            .unwrap();
        f.write_all_at(&[old[1000] ^ 0xff], 1000).unwrap();
        drop(f);

        store.commit(&g).unwrap();
        store.settle().unwrap();
        let got = fs::read(dir.path().join("img")).unwrap();
        let mut want = new.clone();
        want[1000] ^= 0xff;
        assert_eq!(got, want);
        assert_eq!(store.generation().0, 1);
    }

    /// Chunks the store holds in another image are copied (and verified) into the journal
    /// before applying, so a new image made of known content needs nothing staged.
    #[test]
    fn a_commit_copies_chunks_the_store_holds_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(100_000, 2);
        fs::write(dir.path().join("a"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let g = generation(1, vec![("b", &old)]);
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), old);
        assert_eq!(store.images().len(), 2);
    }

    /// A large generation is written into its image by several threads, each a run of its
    /// entries: the image ends byte for byte the generation's, and a chunk that no longer
    /// matches its hash in the journal, in any thread's run, fails the apply (the settle after
    /// the acknowledgement, which keeps failing while it is damaged) instead of being skipped.
    #[test]
    fn a_large_generation_is_written_by_several_threads_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let one = random(3_000_000, 31);
        let g = generation(1, vec![("img", &one)]);
        let m = &g.images["img"];
        let bytes: u64 = m.entries().iter().map(|e| e.len).sum();
        assert!(
            apply_threads(bytes, m.entries().len()) > 1 || num_cpus() == 1,
            "the case this test is about: {} entries",
            m.entries().len()
        );
        stage_missing(&mut store, &g, &BTreeMap::from([("img", one.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("img")).unwrap(), one);

        let two = random(3_000_000, 32);
        let g2 = generation(2, vec![("img", &two)]);
        stage_missing(&mut store, &g2, &BTreeMap::from([("img", two.clone())]));
        let journal = store.journal.path().to_path_buf();
        let last = *journal_records(&journal).last().unwrap();
        flip_byte(&journal, last.0 + last.1 / 2);
        store.commit(&g2).unwrap();
        let err = store.settle().unwrap_err();
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
        assert!(store.meta().join("staging/commit").exists(), "kept");
        assert!(
            store.settle().is_err(),
            "not settled while the record is damaged"
        );
    }

    /// Receives `g` as a session does: prepared (new images staged in place), then every
    /// chunk the store lacks staged.
    fn receive(store: &mut Store, g: &Generation, bytes: &BTreeMap<&str, Vec<u8>>) {
        store.prepare(&g.images).unwrap();
        stage_missing(store, g, bytes);
    }

    /// A new image is staged as a file of its own, each chunk written at its places as it
    /// comes, and renamed into the store at the commit: its bytes are written once and the
    /// journal holds only what the images the store holds need. A power loss that undoes the
    /// rename (the staged file durable, its new name not) is replayed.
    #[test]
    fn a_new_image_is_staged_in_place_not_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 51);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let mut new = old.clone();
        let shared = random(20_000, 52);
        new.extend_from_slice(&shared);
        // The new image repeats itself (one chunk at two places) and shares bytes with "img".
        let half = random(150_000, 53);
        let fresh = [&half[..], &half[..], &shared[..]].concat();
        let g = generation(1, vec![("img", &new), ("vms/fresh", &fresh)]);
        let bytes = BTreeMap::from([("img", new.clone()), ("vms/fresh", fresh.clone())]);
        receive(&mut store, &g, &bytes);
        let img_changed: std::collections::HashSet<[u8; 32]> =
            changed_entries(&store.manifests["img"], &g.images["img"])
                .filter_map(|e| e.hash().map(|h| *h.as_bytes()))
                .collect();
        assert_eq!(
            store.journal.len(),
            img_changed.len(),
            "only img's chunks journaled"
        );
        store.commit(&g).unwrap();
        apply_only(&mut store);
        assert!(fs::read(dir.path().join("vms/fresh")).unwrap() == fresh);
        assert!(fs::read(dir.path().join("img")).unwrap() == new);

        // The power loss: the rename did not reach the disk, nor did img's writes.
        let staged = Fresh::staged_path(&store.meta().join("staging/images"), "vms/fresh");
        fs::rename(dir.path().join("vms/fresh"), &staged).unwrap();
        fs::write(dir.path().join("img"), &old).unwrap();
        drop(store);
        let mut store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 1);
        assert!(fs::read(dir.path().join("vms/fresh")).unwrap() == fresh);
        assert!(fs::read(dir.path().join("img")).unwrap() == new);
        assert!(!staged.exists());
        store.settle().unwrap();
        assert_eq!(
            fs::read_dir(store.meta().join("staging/images"))
                .unwrap()
                .count(),
            0
        );
    }

    /// A transfer of a new image that stops midway goes on from what it wrote: after a restart
    /// the staged file's entries are checked by hash, and only those that match are not asked
    /// for again.
    #[test]
    fn an_interrupted_new_image_goes_on_from_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let fresh = random(400_000, 61);
        let g = generation(1, vec![("fresh", &fresh)]);
        let entries = g.images["fresh"].entries().to_vec();
        store.prepare(&g.images).unwrap();
        let half = entries.len() / 2;
        for e in &entries[..half] {
            let h = e.hash().unwrap();
            store
                .stage(h.as_bytes(), &fresh[e.offset as usize..e.end() as usize])
                .unwrap();
        }
        assert_eq!(store.journal.len(), 0);
        drop(store);
        // One staged chunk is damaged on disk meanwhile.
        let staged = Fresh::staged_path(&dir.path().join(".ferry/staging/images"), "fresh");
        flip_byte(&staged, entries[1].offset + 5);

        let mut store = Store::open(dir.path(), params()).unwrap();
        store.prepare(&g.images).unwrap();
        let held: Vec<bool> = entries
            .iter()
            .map(|e| store.have(e.hash().unwrap().as_bytes()))
            .collect();
        let expected: Vec<bool> = (0..entries.len()).map(|k| k < half && k != 1).collect();
        assert_eq!(held, expected);
        stage_missing(&mut store, &g, &BTreeMap::from([("fresh", fresh.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert!(fs::read(dir.path().join("fresh")).unwrap() == fresh);
    }

    /// A new image whose manifest changed between two sessions (the primary's image changed
    /// before the interrupted transfer was retried): a chunk written for the first manifest
    /// counts only where the second puts it too.
    #[test]
    fn a_new_image_staged_for_another_manifest_counts_only_chunks_in_their_new_places() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let first = random(300_000, 71);
        let g1 = generation(1, vec![("fresh", &first)]);
        receive(&mut store, &g1, &BTreeMap::from([("fresh", first.clone())]));
        // The same bytes moved by 1,000: the same chunks (but the first) at other offsets.
        let second = [&random(1_000, 72)[..], &first[..]].concat();
        let g2 = generation(1, vec![("fresh", &second)]);
        store.prepare(&g2.images).unwrap();
        let moved = g2.images["fresh"].entries()[2];
        assert!(!store.have(moved.hash().unwrap().as_bytes()));
        stage_missing(
            &mut store,
            &g2,
            &BTreeMap::from([("fresh", second.clone())]),
        );
        store.commit(&g2).unwrap();
        store.settle().unwrap();
        assert!(fs::read(dir.path().join("fresh")).unwrap() == second);
    }

    fn num_cpus() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Reads all of `path` as generation `n` has it, through the view.
    /// Stages the chunks of `g` the store lacks as a session would when the primary sends
    /// patches: a chunk with the same bounds as a committed one of its image comes as the runs
    /// of bytes that differ; the others whole. Returns how many came as patches.
    fn stage_as_patches(
        store: &mut Store,
        g: &Generation,
        bytes: &BTreeMap<&str, Vec<u8>>,
    ) -> usize {
        let mut patched = 0;
        for (path, m) in &g.images {
            let new = &bytes[path.as_str()];
            for e in m.entries() {
                let Some(h) = e.hash() else { continue };
                if store.have(h.as_bytes()) {
                    continue;
                }
                let data = &new[e.offset as usize..e.end() as usize];
                let same_place = store.manifest(path).is_some_and(|old| {
                    old.entries()
                        .iter()
                        .any(|o| o.offset == e.offset && o.len == e.len)
                });
                if !same_place {
                    store.stage(h.as_bytes(), data).unwrap();
                    continue;
                }
                let base = store.base_bytes(path, e.offset, e.len).unwrap();
                let mut ranges = Vec::new();
                let mut i = 0;
                while i < data.len() {
                    if data[i] == base[i] {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < data.len() && data[i] != base[i] {
                        i += 1;
                    }
                    ranges.push((start as u64, serde_bytes::ByteBuf::from(&data[start..i])));
                }
                assert!(
                    store
                        .stage_patch(h.as_bytes(), path, e.offset, e.len, &ranges, None)
                        .unwrap()
                );
                patched += 1;
            }
        }
        patched
    }

    /// A chunk sent as a patch is staged as its changed bytes alone and written into the image
    /// as them: a small write costs the replica a small write, and the image is the new one.
    #[test]
    fn a_patched_chunk_is_staged_and_written_as_its_changed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 1);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let mut new = old.clone();
        for at in [10_000, 90_000, 150_000] {
            new[at..at + 64].fill(7);
        }
        let g = generation(1, vec![("img", &new)]);
        let patched = stage_as_patches(&mut store, &g, &BTreeMap::from([("img", new.clone())]));
        assert!(patched >= 2, "{patched} chunks came as patches");
        let f = store.figures();
        assert!(
            f.staged_bytes < 2_000,
            "{} bytes staged for {patched} patches of 64 bytes each",
            f.staged_bytes
        );
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("img")).unwrap(), new);
        assert_eq!(store.figures().staged_chunks, 0);
        drop(store);
        let store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 1);
        assert_eq!(fs::read(dir.path().join("img")).unwrap(), new);
    }

    /// A generation is acknowledged once its commit record is durable, and applied by the
    /// settle after it. An apply that fails there keeps the commit record and the staging;
    /// every later settle (the next session's first step) writes the generation again from
    /// the staging, and the replica mount serves the previous generation until one succeeds.
    #[test]
    fn a_failed_apply_after_the_acknowledgement_is_replayed_by_the_next_settle() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 41);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let view = store.view().clone();
        view.serve_mount();
        let mut new = old.clone();
        new[50_000..50_500].fill(8);
        let g = generation(1, vec![("img", &new)]);
        stage_as_patches(&mut store, &g, &BTreeMap::from([("img", new.clone())]));
        // The generation record cannot be replaced: its temporary file's name is taken.
        let tmp = store
            .meta()
            .join(format!(".generation.tmp.{}", std::process::id()));
        fs::create_dir(&tmp).unwrap();
        store.commit(&g).unwrap();
        let waiter = std::thread::spawn({
            let view = view.clone();
            move || (view.newest(), std::time::Instant::now())
        });
        let (number, root) = store.generation();
        assert_eq!(
            (number, root),
            (1, g.group_root),
            "acknowledged as committed"
        );
        let img = &store.images()[0];
        assert_eq!(
            (img.size, img.root),
            (new.len() as u64, *g.images["img"].root().as_bytes())
        );
        let failed = std::time::Instant::now();
        let err = store.settle().unwrap_err();
        assert!(format!("{err:#}").contains("cannot be applied"), "{err:#}");
        let (newest, answered) = waiter.join().unwrap();
        assert_eq!(newest, 0, "the mount's newest is the one applied");
        assert!(
            answered.duration_since(failed) < std::time::Duration::from_secs(1),
            "not kept waiting by an apply that failed"
        );
        assert!(
            store.settle().is_err(),
            "refused again while it still fails"
        );
        assert!(
            store.meta().join("staging/commit").exists(),
            "kept for the replay"
        );
        assert_eq!(
            read_view(&view, 0, "img"),
            old,
            "the mount serves the previous one"
        );
        assert_eq!(store.generation().0, 1);

        fs::remove_dir(&tmp).unwrap();
        store.settle().unwrap();
        assert!(fs::read(dir.path().join("img")).unwrap() == new);
        assert!(!store.meta().join("staging/commit").exists());
        assert_eq!(
            read_view(&view, 1, "img"),
            new,
            "the mount serves the new one"
        );
        drop(store);
        let store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 1);
        assert!(fs::read(dir.path().join("img")).unwrap() == new);
    }

    /// A commit lets go of the cached pieces of the chunks it replaced: the cache holds what
    /// the images hold, where it grew to its bound with every chunk ever received.
    #[test]
    fn a_commit_forgets_the_pieces_of_the_chunks_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let params = ChunkParams::new(16384, 65536, 262144).unwrap();
        let old = random(2 << 20, 31);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params).unwrap();
        let ids = |bytes: &[u8]| -> Vec<(blake3::Hash, std::ops::Range<usize>)> {
            chunk_full(&bytes.to_vec(), params)
                .unwrap()
                .0
                .entries()
                .iter()
                .filter_map(|e| Some((e.hash()?, e.offset as usize..e.end() as usize)))
                .collect()
        };
        // Receiving a chunk hashes it by pieces (`wire::replica`): the committed ones were.
        let before = ids(&old);
        for (_, r) in &before {
            crate::chunk::hash_by_pieces(&old[r.clone()]);
        }
        let mut new = old.clone();
        new[500_000..900_000].copy_from_slice(&random(400_000, 32));
        let after = ids(&new);
        for (_, r) in &after {
            crate::chunk::hash_by_pieces(&new[r.clone()]);
        }
        let g = Generation {
            number: 1,
            group_root: [1; 32],
            changes: vec![],
            images: BTreeMap::from([("img".to_string(), chunk_full(&new, params).unwrap().0)]),
        };
        stage_missing(&mut store, &g, &BTreeMap::from([("img", new.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        let still: Vec<blake3::Hash> = after.iter().map(|(h, _)| *h).collect();
        let replaced: Vec<blake3::Hash> = before
            .iter()
            .map(|(h, _)| *h)
            .filter(|h| !still.contains(h))
            .collect();
        assert!(replaced.len() >= 4, "{} chunks replaced", replaced.len());
        for h in &replaced {
            assert!(
                !crate::chunk::pieces_cached(h),
                "a replaced chunk's pieces are kept"
            );
        }
        for h in &still {
            assert!(
                crate::chunk::pieces_cached(h),
                "a chunk in place lost its pieces"
            );
        }
    }

    /// With chunks of several 8 KiB pieces, a patch is checked by the pieces it touches once
    /// the chunk it patches was hashed as pieces (by the patch before): the image is right after
    /// each of three rounds of writes to the same chunks, and a base that does not hold what the
    /// patch was made on is refused (the primary then sends the chunk whole).
    #[test]
    fn patches_of_large_chunks_are_checked_by_their_pieces_round_after_round() {
        let dir = tempfile::tempdir().unwrap();
        let params = ChunkParams::new(16384, 65536, 262144).unwrap();
        let mut img = random(2 << 20, 4);
        fs::write(dir.path().join("img"), &img).unwrap();
        let mut store = Store::open(dir.path(), params).unwrap();
        for round in 1..=3u8 {
            for at in [100_000usize, 700_001, 1_500_000] {
                img[at..at + 4096].fill(round);
            }
            let g = Generation {
                number: round as u64,
                group_root: [round; 32],
                changes: vec![],
                images: BTreeMap::from([("img".to_string(), chunk_full(&img, params).unwrap().0)]),
            };
            let patched = stage_as_patches(&mut store, &g, &BTreeMap::from([("img", img.clone())]));
            assert!(patched >= 3, "round {round}: {patched} patches");
            store.commit(&g).unwrap();
            store.settle().unwrap();
            assert_eq!(
                fs::read(dir.path().join("img")).unwrap(),
                img,
                "round {round}"
            );
        }
        // A base damaged outside the patch's ranges, in a chunk whose pieces are not cached (a
        // scan or a received frame caches them; damage behind a cached chunk is found by
        // `ferry verify --deep`, not by a patch): refused.
        let m = store.manifest("img").unwrap().clone();
        let e = m.entries()[m.entries().len() / 2];
        crate::chunk::forget_pieces(&e.hash().unwrap());
        flip_byte(&dir.path().join("img"), e.offset + 10);
        let mut want = img[e.offset as usize..e.end() as usize].to_vec();
        want[e.len as usize - 1] ^= 0xff;
        let h = *blake3::hash(&want).as_bytes();
        let ranges = vec![(
            e.len - 1,
            serde_bytes::ByteBuf::from(vec![want[e.len as usize - 1]]),
        )];
        assert!(
            !store
                .stage_patch(&h, "img", e.offset, e.len, &ranges, None)
                .unwrap()
        );
        assert!(!store.have(&h));
    }

    /// A patch checked ahead, without the store's lock (the daemon's data streams), is staged
    /// on that check only while the bytes it was checked against are still the committed
    /// ones: after another generation was applied in between, the store looks again.
    #[test]
    fn a_patch_checked_ahead_is_trusted_only_on_the_generation_it_was_checked_against() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 4);
        fs::write(dir.path().join("a"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let m = store.manifest("a").unwrap().clone();
        let e = m.entries()[m.entries().len() / 2];
        let (at, end) = (e.offset as usize, e.end() as usize);
        let patch = |bytes: &[u8], from: usize| {
            let mut chunk = bytes[at..end].to_vec();
            chunk[from..from + 64].fill(0x5a);
            let ranges = vec![(from as u64, serde_bytes::ByteBuf::from(vec![0x5a; 64]))];
            (*blake3::hash(&chunk).as_bytes(), ranges)
        };
        let (h, ranges) = patch(&old, 10);
        let base = store.patch_base("a", e.offset, e.len).unwrap();
        assert!(base.makes(&h, &ranges).unwrap());
        assert_eq!(base.generation, 0);
        // A generation that changes the same chunk elsewhere is applied meanwhile.
        let mut other = old.clone();
        other[at + 200..at + 264].fill(0x33);
        let g = generation(1, vec![("a", &other)]);
        stage_as_patches(&mut store, &g, &BTreeMap::from([("a", other.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert!(
            !store
                .stage_patch(&h, "a", e.offset, e.len, &ranges, Some(base.generation))
                .unwrap(),
            "staged on a check made against bytes no longer committed"
        );
        assert!(!store.have(&h));
        // Checked against what is committed now, it is staged and applied as checked.
        let (h, ranges) = patch(&other, 10);
        let base = store.patch_base("a", e.offset, e.len).unwrap();
        assert!(base.makes(&h, &ranges).unwrap());
        assert!(
            store
                .stage_patch(&h, "a", e.offset, e.len, &ranges, Some(base.generation))
                .unwrap()
        );
        let mut want = other.clone();
        want[at + 10..at + 74].fill(0x5a);
        let g = generation(2, vec![("a", &want)]);
        stage_as_patches(&mut store, &g, &BTreeMap::from([("a", want.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), want);
    }

    /// A patch placed at an offset near 2^64 (a broken or hostile primary) is refused, not
    /// wrapped around to other bytes of the image.
    #[test]
    fn a_patch_at_an_absurd_offset_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), random(100_000, 5)).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let ranges = vec![(0, serde_bytes::ByteBuf::from(vec![1; 16]))];
        let offset = u64::MAX - 8;
        let base = store.patch_base("a", offset, 4096).unwrap();
        assert!(!base.makes(&[7; 32], &ranges).unwrap());
        assert!(
            !store
                .stage_patch(&[7; 32], "a", offset, 4096, &ranges, None)
                .unwrap()
        );
    }

    /// A patched chunk that the generation also puts somewhere else (another image, or its own
    /// image removed and its content moved) is made whole from the bytes it was staged on
    /// before any image changes.
    #[test]
    fn a_patched_chunk_needed_elsewhere_is_made_whole_before_the_images_change() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(100_000, 2);
        fs::write(dir.path().join("a"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let mut new = old.clone();
        new[50_000..50_100].fill(9);
        let g = generation(1, vec![("a", &new), ("b", &new)]);
        let bytes = BTreeMap::from([("a", new.clone()), ("b", new.clone())]);
        assert!(stage_as_patches(&mut store, &g, &bytes) >= 1);
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), new);
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), new);

        // Image `a` removed and its next content, patched at `a`, going to `c`.
        let mut next = new.clone();
        next[20_000..20_010].fill(3);
        let mut g = generation(2, vec![("a", &next)]);
        let patched = stage_as_patches(&mut store, &g, &BTreeMap::from([("a", next.clone())]));
        assert!(patched >= 1);
        let m = g.images.remove("a").unwrap();
        g.images.insert("c".to_string(), m);
        g.changes = vec![NsChange::Remove {
            path: "a".to_string(),
        }];
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert!(!dir.path().join("a").exists());
        assert_eq!(fs::read(dir.path().join("c")).unwrap(), next);
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), new);

        // Image `b` removed and made again in one generation: its file is new, so its patches
        // cannot be laid over it.
        let mut again = new.clone();
        again[70_000..70_010].fill(5);
        let mut g = generation(3, vec![("b", &again)]);
        assert!(stage_as_patches(&mut store, &g, &BTreeMap::from([("b", again.clone())])) >= 1);
        g.changes = vec![NsChange::Remove {
            path: "b".to_string(),
        }];
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), again);
    }

    /// A generation is acknowledged before it is applied to the images, and the apply is not
    /// fsynced until the settle: a power loss then may lose any of its writes, after the
    /// committed manifests and the generation record were replaced. The next open writes every staged chunk and patch again (the patches
    /// staged on the generation before, which the record no longer names), and the images are
    /// the acknowledged generation; settling empties the staging.
    #[test]
    fn a_generation_acknowledged_before_its_fsync_survives_a_power_loss() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(300_000, 21);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        // Small writes (patches), a new region past the end (whole chunks), a new image.
        let mut new = old.clone();
        for at in [7_000, 90_000, 150_000, 260_000] {
            new[at..at + 64].fill(9);
        }
        new.extend_from_slice(&random(100_000, 22));
        let fresh = random(150_000, 23);
        let g = generation(1, vec![("img", &new), ("fresh", &fresh)]);
        let bytes = BTreeMap::from([("img", new.clone()), ("fresh", fresh.clone())]);
        assert!(stage_as_patches(&mut store, &g, &bytes) >= 3);
        store.commit(&g).unwrap();
        assert_eq!(store.generation().0, 1);
        assert!(
            fs::read(dir.path().join("img")).unwrap() == old,
            "applied by the settle, after the acknowledgement"
        );
        apply_only(&mut store);
        assert!(
            store.figures().staged_chunks > 0,
            "staging kept until settled"
        );
        assert!(store.meta().join("staging/commit").exists());

        // The power loss: none of the images' writes reached the disk.
        fs::write(dir.path().join("img"), &old).unwrap();
        fs::remove_file(dir.path().join("fresh")).unwrap();
        drop(store);
        let mut store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 1);
        assert!(fs::read(dir.path().join("img")).unwrap() == new);
        assert!(fs::read(dir.path().join("fresh")).unwrap() == fresh);
        assert_eq!(store.figures().staged_chunks, 0);
        assert!(!store.meta().join("staging/commit").exists());

        // The next generation's first staged patch settles the one before; then settled
        // after its acknowledgement, as the daemon does.
        let mut next = new.clone();
        next[20_000..20_100].fill(3);
        let g2 = generation(2, vec![("img", &next)]);
        stage_as_patches(&mut store, &g2, &BTreeMap::from([("img", next.clone())]));
        store.commit(&g2).unwrap();
        let mut third = next.clone();
        third[200_000..200_010].fill(5);
        let g3 = generation(3, vec![("img", &third)]);
        stage_as_patches(&mut store, &g3, &BTreeMap::from([("img", third.clone())]));
        store.commit(&g3).unwrap();
        store.settle().unwrap();
        assert!(fs::read(dir.path().join("img")).unwrap() == third);
        assert_eq!(store.figures().staged_chunks, 0);
        assert!(!store.meta().join("staging/commit").exists());
        drop(store);
        fs::write(dir.path().join("img"), &new).unwrap(); // a settled generation is not redone
        let store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 3);
        assert!(fs::read(dir.path().join("img")).unwrap() == new);
    }

    /// A crash while the images are being changed, with some patches written and others not:
    /// the replay on the next open writes them all again and the image is the new generation.
    /// Patches staged on a generation that is then applied are dropped, never laid over the
    /// bytes of a newer one.
    #[test]
    fn patches_are_replayed_after_a_crash_in_the_apply_and_dropped_once_applied() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(200_000, 3);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let mut new = old.clone();
        for at in [5_000, 60_000, 120_000, 180_000] {
            new[at..at + 32].fill(1);
        }
        let g = generation(1, vec![("img", &new)]);
        let patched = stage_as_patches(&mut store, &g, &BTreeMap::from([("img", new.clone())]));
        assert!(patched >= 3);
        // Steps 1 to 3 as `commit` takes them, then half of step 4: the first patch written.
        store.journal.sync().unwrap();
        store.patches.sync().unwrap();
        store
            .save_manifest("staging/manifests", "img", &g.images["img"])
            .unwrap();
        let commit = CommitRecord {
            generation: 1,
            group_root: manifest::hex(&g.group_root),
            changes: vec![],
            images: vec!["img".to_string()],
            // As written before settling existed: the patches were staged on the record's.
            base: None,
            fresh: vec![],
        };
        durable::write_atomic(
            &store.meta().join("staging").join("commit"),
            &serde_json::to_vec(&commit).unwrap(),
        )
        .unwrap();
        let first = g.images["img"]
            .entries()
            .iter()
            .find_map(|e| store.patches.get(e.hash()?.as_bytes()).unwrap())
            .unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("img"))
            .unwrap();
        first.write_into(&f).unwrap();
        drop(store);
        let store = Store::open(dir.path(), params()).unwrap();
        assert_eq!(store.generation().0, 1);
        assert_eq!(fs::read(dir.path().join("img")).unwrap(), new);
        assert_eq!(store.figures().staged_chunks, 0);
        drop(store);

        // A patch staged on generation 1, then a crash, then generation 1 is no longer what
        // the store holds (a later generation applied by a store that had lost its patch log
        // is modelled by retagging): the stale patch is not offered as staged.
        let mut store = Store::open(dir.path(), params()).unwrap();
        let mut next = new.clone();
        next[100_000..100_008].fill(4);
        let g2 = generation(2, vec![("img", &next)]);
        assert!(stage_as_patches(&mut store, &g2, &BTreeMap::from([("img", next)])) >= 1);
        let stale: Vec<Hash> = g2.images["img"]
            .entries()
            .iter()
            .filter_map(|e| e.hash().map(|h| *h.as_bytes()))
            .filter(|h| store.patches.contains(h))
            .collect();
        store.record.generation = 5;
        durable::write_atomic(
            &store.meta().join("generation"),
            &serde_json::to_vec(&store.record).unwrap(),
        )
        .unwrap();
        drop(store);
        let store = Store::open(dir.path(), params()).unwrap();
        assert!(stale.iter().all(|h| !store.have(h)));
    }

    /// Staged chunks damaged on the disk after the commit record (bit rot), before the apply:
    /// a journal record in the middle (skipped when the journal is opened), then a patch log
    /// record (the log is cut there). The replay writes what it finds; the images' manifests
    /// then describe what the images hold where the staging lost bytes, so the store never
    /// claims bytes it lacks, and the primary's next session (seeing the roots differ) sends
    /// them. Before, the replay left the old bytes there under the new manifest.
    #[test]
    fn chunks_the_staging_lost_before_the_replay_are_not_claimed() {
        for as_patches in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let old = random(400_000, 81);
            fs::write(dir.path().join("img"), &old).unwrap();
            let mut store = Store::open(dir.path(), params()).unwrap();
            let mut new = old.clone();
            if as_patches {
                for at in [20_000, 120_000, 220_000, 320_000] {
                    new[at..at + 64].fill(9);
                }
            } else {
                new[100_000..250_000].copy_from_slice(&random(150_000, 82));
            }
            let g = generation(1, vec![("img", &new)]);
            let bytes = BTreeMap::from([("img", new.clone())]);
            let damaged = if as_patches {
                assert!(stage_as_patches(&mut store, &g, &bytes) >= 3);
                dir.path().join(META_DIR).join("staging").join("patches")
            } else {
                stage_missing(&mut store, &g, &bytes);
                assert!(journal_records(store.journal.path()).len() >= 3);
                store.journal.path().to_path_buf()
            };
            store.commit(&g).unwrap();
            drop(store); // acknowledged, not applied
            let first_body = if as_patches { 12 + 40 } else { 40 };
            flip_byte(&damaged, first_body + 5);

            let store = Store::open(dir.path(), params()).unwrap();
            assert_eq!(store.generation().0, 1);
            let m = &store.manifests["img"];
            let f = fs::File::open(dir.path().join("img")).unwrap();
            for e in m.entries() {
                assert!(
                    e.is_held_by(&f, m.size()).unwrap(),
                    "as patches: {as_patches}: the manifest claims {}..{}",
                    e.offset,
                    e.end()
                );
            }
            assert_ne!(m.root(), g.images["img"].root(), "as patches: {as_patches}");
            let image = fs::read(dir.path().join("img")).unwrap();
            let lost = m
                .entries()
                .iter()
                .filter(|e| {
                    image[e.offset as usize..e.end() as usize]
                        != new[e.offset as usize..e.end() as usize]
                })
                .count();
            assert!(lost >= 1, "as patches: {as_patches}");
        }
    }

    /// Between the acknowledgement and the apply, the replica mount reads the applied
    /// generation's changing chunks from the kept ones: an expiry in that window (a file closed
    /// on the mount) keeps them.
    #[test]
    fn an_expiry_before_the_apply_keeps_what_the_applied_generation_reads() {
        let dir = tempfile::tempdir().unwrap();
        let old = random(300_000, 51);
        fs::write(dir.path().join("img"), &old).unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        let view = store.view().clone();
        view.serve_mount();
        let mut one = old.clone();
        one[10_000..10_100].fill(1);
        let g = generation(1, vec![("img", &one)]);
        stage_as_patches(&mut store, &g, &BTreeMap::from([("img", one.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        let mut two = one.clone();
        two[100_000..100_100].fill(2);
        two[250_000..250_100].fill(2);
        let g2 = generation(2, vec![("img", &two)]);
        stage_as_patches(&mut store, &g2, &BTreeMap::from([("img", two.clone())]));
        store.commit(&g2).unwrap();
        view.expire(&view.writer()).unwrap();
        assert!(read_view(&view, 1, "img") == one);
        // The mount's newest generation waits for the apply that follows the acknowledgement.
        let waiter = std::thread::spawn({
            let view = view.clone();
            move || view.newest()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        store.settle().unwrap();
        assert_eq!(waiter.join().unwrap(), 2);
        assert!(read_view(&view, 2, "img") == two);
    }

    /// Applies the committed generation without settling it: the state a crash between the
    /// apply and the images' fsync leaves.
    fn apply_only(store: &mut Store) {
        let p = store.pending.take().expect("a committed generation");
        store.apply_pending(p).unwrap();
    }

    fn read_view(view: &View, n: u64, path: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 20];
        let got = view.read(n, path, 0, &mut buf).unwrap();
        buf.truncate(got);
        buf
    }

    /// Restore points: each kept generation reads back exactly as it was committed, after
    /// newer ones overwrote it in place, across a reopen; expiry frees the chunks only the
    /// expired ones needed, and the packs cost what was overwritten, not whole images.
    #[test]
    fn restore_points_read_back_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            keep: Some(3),
            keep_for: None,
        };
        let mut store = Store::open_with(dir.path(), params(), policy).unwrap();
        let mut versions = vec![];
        let mut img = random(300_000, 3);
        for n in 1..=5u64 {
            let at = (n as usize * 37_000) % 250_000;
            img[at..at + 5_000].fill(n as u8);
            if n == 4 {
                img.truncate(200_000);
            }
            let g = generation(n, vec![("img", &img)]);
            stage_missing(&mut store, &g, &BTreeMap::from([("img", img.clone())]));
            store.commit(&g).unwrap();
            store.settle().unwrap();
            versions.push(img.clone());
        }
        let view = store.view().clone();
        assert_eq!(view.generations(), vec![3, 4, 5]);
        for n in 3..=5u64 {
            assert_eq!(
                read_view(&view, n, "img"),
                versions[n as usize - 1],
                "generation {n}"
            );
        }
        // A read in the middle of a chunk, across entries.
        let mut buf = vec![0u8; 10_000];
        assert_eq!(view.read(3, "img", 111_111, &mut buf).unwrap(), 10_000);
        assert_eq!(buf, versions[2][111_111..121_111]);
        let (kept_bytes, _) = view.kept_figures();
        assert!(
            kept_bytes < 150_000,
            "kept {kept_bytes} bytes for 2 small changes"
        );
        let points = view.points();
        assert_eq!(points.len(), 3);
        assert!(points[0].own_bytes > 0 && points[2].own_bytes == 0);
        drop((store, view));

        let store = Store::open_with(dir.path(), params(), policy).unwrap();
        let view = store.view().clone();
        for n in 3..=5u64 {
            assert_eq!(
                read_view(&view, n, "img"),
                versions[n as usize - 1],
                "reopened {n}"
            );
        }
        assert!(!dir.path().join(".ferry/generations/2").exists());
    }

    /// A file open at a generation goes on reading it after newer ones are committed (even
    /// with no restore points kept), and the generation goes when the file is closed.
    #[test]
    fn an_open_file_keeps_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), params()).unwrap();
        store.view().serve_mount();
        let a = random(200_000, 4);
        let g = generation(1, vec![("a", &a)]);
        stage_missing(&mut store, &g, &BTreeMap::from([("a", a.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        let view = store.view().clone();
        let pinned = view.pin_applied();
        assert_eq!(pinned, 1);
        let b = random(200_000, 5);
        let g = generation(2, vec![("a", &b)]);
        stage_missing(&mut store, &g, &BTreeMap::from([("a", b.clone())]));
        store.commit(&g).unwrap();
        store.settle().unwrap();
        assert_eq!(read_view(&view, 1, "a"), a);
        assert_eq!(read_view(&view, 2, "a"), b);
        view.unpin(1);
        assert_eq!(view.generations(), vec![2]);
        assert_eq!(view.kept_figures().0, 0);
    }

    /// Deep verify: a flipped byte in an image and in a kept chunk is named; repair mends both
    /// from good copies in the store, and an image chunk with no copy here stops being claimed
    /// by the manifest, so the next generation brings it (and applies it like any other).
    #[test]
    fn scrub_names_damage_mends_it_from_copies_and_hands_the_rest_to_the_next_generation() {
        use scrub::State;
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            keep: Some(2),
            keep_for: None,
        };
        let mut store = Store::open_with(dir.path(), params(), policy).unwrap();
        let (old, new) = (random(200_000, 6), random(200_000, 7));
        // Generation 1: b is a copy of a; generation 2 overwrites a, so its old chunks are
        // kept (and live in b too).
        for (n, a) in [(1, &old), (2, &new)] {
            let g = generation(n, vec![("a", a), ("b", &old)]);
            let bytes = BTreeMap::from([("a", a.clone()), ("b", old.clone())]);
            stage_missing(&mut store, &g, &bytes);
            store.commit(&g).unwrap();
            store.settle().unwrap();
        }
        let g2 = generation(2, vec![("a", &new), ("b", &old)]);
        let pack = dir.path().join(".ferry/kept/2.pack");
        let recs = journal_records(&pack);
        assert!(recs.len() > 10, "the old chunks of a are kept");
        let store = parking_lot::Mutex::new(store);
        let clean = scrub::scrub(&store, false).unwrap();
        assert_eq!(
            (clean.images, clean.bytes, clean.damage.len()),
            (2, 400_000, 0)
        );
        assert_eq!(clean.kept_chunks, recs.len());

        flip_byte(&dir.path().join("b"), 1_000); // a copy is kept
        flip_byte(&dir.path().join("a"), 50_000); // new data: no copy here
        flip_byte(&pack, recs[5].0 + 3); // a kept chunk, live in b
        let found = scrub::scrub(&store, false).unwrap();
        let where_: Vec<(Option<&str>, Option<u64>, State)> = found
            .damage
            .iter()
            .map(|d| (d.path.as_deref(), d.offset, d.state))
            .collect();
        let chunk_at = |m: &Manifest, off: u64| m.entries()[m.index_at(off).unwrap()].offset;
        let (a2, b2) = (&g2.images["a"], &g2.images["b"]);
        assert_eq!(
            where_,
            vec![
                (Some("a"), Some(chunk_at(a2, 50_000)), State::Found),
                (Some("b"), Some(chunk_at(b2, 1_000)), State::Found),
                (None, None, State::Found),
            ]
        );
        assert_eq!(found.damage[2].generations, vec![1]);
        assert_eq!(found.left(), 3);

        let mended = scrub::scrub(&store, true).unwrap();
        let states: Vec<State> = mended.damage.iter().map(|d| d.state).collect();
        assert_eq!(
            states,
            vec![State::Resync, State::Repaired, State::Repaired]
        );
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), old);
        let after = scrub::scrub(&store, false).unwrap();
        assert!(after.damage.is_empty(), "{after:?}");
        let store = store.into_inner();
        let a_now = store.images().into_iter().find(|i| i.path == "a").unwrap();
        assert_ne!(
            a_now.root,
            *a2.root().as_bytes(),
            "a no longer claims generation 2"
        );
        // Generation 1 reads back whole from the mended pack.
        assert_eq!(read_view(store.view(), 1, "a"), old);

        drop(store);
        // Reopened, a pack with a damaged record in the middle loses that record only.
        flip_byte(&pack, recs[5].0 + 3);
        let store = Store::open_with(dir.path(), params(), policy).unwrap();
        let store = parking_lot::Mutex::new(store);
        let report = scrub::scrub(&store, true).unwrap();
        assert_eq!(
            report.kept_chunks,
            recs.len() - 1,
            "counted before the repair"
        );
        let states: Vec<State> = report.damage.iter().map(|d| d.state).collect();
        assert_eq!(states, vec![State::Repaired]);
        let mut store = store.into_inner();
        assert_eq!(read_view(store.view(), 1, "a"), old);

        // The next generation (a's content unchanged on the primary) brings the chunk.
        let g3 = generation(3, vec![("a", &new), ("b", &old)]);
        let bytes = BTreeMap::from([("a", new.clone()), ("b", old.clone())]);
        stage_missing(&mut store, &g3, &bytes);
        store.commit(&g3).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), new);

        // An image gone from the disk is damaged whole; repaired, the store forgets it, so
        // the next generation sends it whole.
        fs::remove_file(dir.path().join("b")).unwrap();
        let store = parking_lot::Mutex::new(store);
        let found = scrub::scrub(&store, false).unwrap();
        let d = &found.damage[0];
        assert_eq!(
            (d.path.as_deref(), d.offset, d.len),
            (Some("b"), Some(0), 200_000)
        );
        assert_eq!(
            scrub::scrub(&store, true).unwrap().damage[0].state,
            State::Resync
        );
        let mut store = store.into_inner();
        assert!(store.images().iter().all(|i| i.path != "b"));
        let g4 = generation(4, vec![("a", &new), ("b", &old)]);
        stage_missing(&mut store, &g4, &bytes);
        store.commit(&g4).unwrap();
        store.settle().unwrap();
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), old);
    }
}
