//! The intent log, after DRBD's activity log: one file per mount (`<state_dir>/intent.log`).
//! Before the first write to an extent (default 4 MiB, aligned) that is not marked since the
//! last sync point reaches the backing file, the extent is recorded durably (append, then
//! `fdatasync`). After an unclean stop the log names every extent that may hold bytes the
//! replicas have not seen, so recovery re-reads those and nothing else (DESIGN.md invariant 6).
//!
//! Rules:
//! * A mark is acknowledged only once its record is on disk. Concurrent first writes share one
//!   `fdatasync` (group commit): the first caller to find no append running leads and writes
//!   every mark queued so far; the others wait on a condition variable.
//! * Marks are never erased in place. A committed sync's marks linger: they stay in the file for
//!   [`LINGER`] more (half of it at least, and until the second commit after that), and a write
//!   to a lingering extent makes it live again without an append (md's write-intent bitmap
//!   clears its bits lazily for the same reason: with a sync point every second, the first write
//!   to each extent after each commit would otherwise wait for an fdatasync, and a guest's
//!   writes keep coming back to the same extents). Then the file is rewritten atomically with
//!   the marks still live or lingering (compaction); if that fails the old marks stay on disk,
//!   which costs a re-read after a crash and loses nothing. A lingering mark costs the same: the
//!   re-read of an extent written in the last seconds before the last commit.
//! * Past the linger, committed marks stay *hot* (DRBD's activity log keeps its hot extents
//!   the same way, by count and not by time) while the hot marks fit a limit of extents
//!   ([`HOT`] bytes' worth unless set): a guest that writes again after a quiet spell, to the
//!   extents it wrote before, waits for no append. When the marks leaving the linger would take
//!   the hot ones past the limit, the hot set starts again from those marks alone (the older
//!   ones are forgotten and the file compacted). With no linger nothing stays hot.
//! * An append that fails leaves nothing a later open would misread: the next append starts at
//!   the same offset, a partial record is cut off, and after a failed `fdatasync` (when the
//!   kernel may have dropped the pages) the whole log is rewritten before the next append.
//! * Opening always rewrites the log (atomically) with every recovered extent marked: that drops
//!   a torn tail and turns a clean record back into an active log.
//! * Each rewrite keeps [`RESERVE`] bytes allocated past the end: a state directory whose
//!   filesystem fills does not stop the guests' writes (only the sync points, which save
//!   manifests there, until space returns).
//!
//! Error policy: every fallible function returns [`IntentError`]. I/O errors carry the action
//! and the log's path; the caller turns the error into an errno with [`IntentError::errno`], so
//! a full disk stays `ENOSPC` for the write that needed the mark. A damaged or foreign file is
//! an error that says what to do; a torn tail is not an error but a `log::warn!`.

mod format;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{DEFAULT_LIMIT, RangeSet};
use crate::durable;
use format::State as FileState;

/// The extent size a mount uses unless configured otherwise: 4 MiB.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// The log's file name inside the node's `state_dir`.
pub const FILE_NAME: &str = "intent.log";
/// How long a committed sync's marks stay in the file (see the rules above).
pub const LINGER: Duration = Duration::from_secs(10);
/// How many bytes' worth of extents stay marked past the linger (see the rules above): after a
/// crash, the next mount re-reads at most this much more than the extents written in the last
/// linger.
pub const HOT: u64 = 4 << 30;
/// Smallest extent size accepted (one page).
const MIN_EXTENT_SIZE: u64 = 4096;
/// Room kept allocated past the log's end (its size unchanged), so that marks are still
/// appended, and guest writes go on, when the state directory's filesystem fills: about 30,000
/// marks, made again at each rewrite (every committed sync point compacts the log).
const RESERVE: u64 = 1 << 20;

/// An intent log that cannot be used or written. Each variant names the file (or the image) and
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    /// Reading, appending to, syncing or replacing the log file failed. A full disk is
    /// `ENOSPC` here; the write that needed the mark must fail with it.
    #[error("cannot {action} intent log {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The file does not start with the intent log's magic.
    #[error(
        "{path} is not a ferry intent log (bad magic): check the node's state_dir, or move the \
         file aside if it does not belong there"
    )]
    NotIntentLog { path: PathBuf },
    /// The file was written by a newer ferry.
    #[error(
        "intent log {path} has format version {found}, newer than this ferry reads (up to {}): \
         upgrade ferry on this host",
        format::VERSION
    )]
    NewerVersion { path: PathBuf, found: u32 },
    /// The header is damaged, so nothing in the file can be trusted.
    #[error(
        "intent log {path} has a corrupt header ({reason}): ferry cannot tell which ranges of \
         the images are unsynced, so every image must be re-read in full (a mount sets the file \
         aside and does that)"
    )]
    CorruptHeader { path: PathBuf, reason: String },
    /// A record is damaged where a crash cannot have torn it: anywhere in a clean log (written
    /// atomically), or a record of an active log that passed its checksum but makes no sense.
    #[error(
        "intent log {path} is corrupt at offset {offset} ({reason}): ferry cannot tell which \
         ranges of the images are unsynced, so every image must be re-read in full (a mount \
         sets the file aside and does that)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The extent size asked for is not usable.
    #[error(
        "intent log extent size {size} is invalid: it must be a power of two of at least 4096 \
         bytes (the default is 4 MiB)"
    )]
    ExtentSize { size: u64 },
    /// The image's name cannot be recorded.
    #[error("cannot record image {image} in the intent log: {reason}")]
    ImageName {
        image: PathBuf,
        reason: &'static str,
    },
    /// The log was closed cleanly at unmount; nothing may be marked after that.
    #[error(
        "intent log {path} was closed cleanly at unmount and takes no more marks (a write after \
         unmount is a bug in ferry)"
    )]
    Closed { path: PathBuf },
}

impl IntentError {
    /// The errno a filesystem operation that failed on this error should return: the I/O
    /// error's own (`ENOSPC` for a full disk), otherwise `EIO`.
    pub fn errno(&self) -> i32 {
        match self {
            IntentError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            IntentError::ImageName { image, .. } if image.as_os_str().len() > format::MAX_PATH => {
                libc::ENAMETOOLONG
            }
            IntentError::ImageName { .. } | IntentError::ExtentSize { .. } => libc::EINVAL,
            _ => libc::EIO,
        }
    }

    /// A copy for each caller that waited on the same failed append.
    fn duplicate(&self) -> IntentError {
        match self {
            IntentError::Io {
                action,
                path,
                source,
            } => IntentError::Io {
                action,
                path: path.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            IntentError::NotIntentLog { path } => IntentError::NotIntentLog { path: path.clone() },
            IntentError::NewerVersion { path, found } => IntentError::NewerVersion {
                path: path.clone(),
                found: *found,
            },
            IntentError::CorruptHeader { path, reason } => IntentError::CorruptHeader {
                path: path.clone(),
                reason: reason.clone(),
            },
            IntentError::Corrupt {
                path,
                offset,
                reason,
            } => IntentError::Corrupt {
                path: path.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            IntentError::ExtentSize { size } => IntentError::ExtentSize { size: *size },
            IntentError::ImageName { image, reason } => IntentError::ImageName {
                image: image.clone(),
                reason,
            },
            IntentError::Closed { path } => IntentError::Closed { path: path.clone() },
        }
    }
}

/// What the previous run left behind, as [`IntentLog::open`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// true: the previous run unmounted cleanly and `dirty` holds its exact unsynced ranges (or
    /// there was no previous run). false: unclean stop; `dirty` holds every logged extent (a
    /// superset of what changed).
    pub clean: bool,
    pub dirty: BTreeMap<PathBuf, RangeSet>,
}

/// One sync point, from [`IntentLog::begin_sync`] to its commit or abort. A token that is
/// dropped instead keeps its marks live for good (safe, only wasteful).
#[must_use = "commit or abort the sync, or its marks stay in the log"]
#[derive(Debug)]
pub struct SyncToken {
    id: u64,
}

/// Extent indices per image. These sets are exact (they never coarsen): a mark that is not on
/// disk must never look marked.
type Marks = HashMap<PathBuf, RangeSet>;

fn exact_set() -> RangeSet {
    RangeSet::with_limit(usize::MAX)
}

/// Where a group of marks stands: set once their append has succeeded or failed.
type Done = OnceLock<Result<(), IntentError>>;

/// Marks queued for the next append.
#[derive(Default)]
struct Pending {
    marks: Marks,
    done: Arc<Done>,
}

/// The append being written.
struct InFlight {
    marks: Arc<Marks>,
    done: Arc<Done>,
}

struct State {
    /// Marks on disk that belong to the current epoch (since the last `begin_sync`).
    current: Marks,
    /// Marks on disk that belong to syncs begun but not committed or aborted.
    syncs: BTreeMap<u64, Marks>,
    /// Marks on disk of committed syncs, not live, kept a while (see the rules above).
    lingering: Lingering,
    next_sync: u64,
    pending: Pending,
    inflight: Option<InFlight>,
    /// Someone owns the file: an append, a compaction, a rename or the clean close. Whoever
    /// sets it locks `IntentLog::file` and does the I/O without holding this state's lock.
    busy: bool,
    /// Bumped whenever marks in the file stop being live; `compacted` is its value when the
    /// file was last rewritten with only live marks.
    forgotten: u64,
    compacted: u64,
    closed: bool,
}

/// Committed marks kept in the file: `young` since `since`, `old` from the period before it,
/// `hot` from before that. At a commit `linger / 2` or more after `since`, `old` cools into
/// `hot` and `young` becomes it.
struct Lingering {
    young: Marks,
    old: Marks,
    hot: Marks,
    since: Instant,
}

impl Lingering {
    fn sets(&self) -> [&Marks; 3] {
        [&self.young, &self.old, &self.hot]
    }

    fn sets_mut(&mut self) -> [&mut Marks; 3] {
        [&mut self.young, &mut self.old, &mut self.hot]
    }

    fn covers(&self, image: &Path, extents: &Range<u64>) -> bool {
        self.sets().iter().any(|m| covers(m, image, extents))
    }

    /// `old`, leaving the linger, joins the hot marks if they all fit in `limit` extents;
    /// otherwise the hot marks become `old` alone (none if it does not fit either). Whether
    /// any mark was forgotten.
    fn cool(&mut self, old: Marks, limit: u64) -> bool {
        merge(&mut self.hot, &old);
        if count(&self.hot) <= limit {
            return false;
        }
        self.hot = if count(&old) <= limit {
            old
        } else {
            Marks::new()
        };
        true
    }
}

/// The open log file. Only the owner of `State::busy` locks it.
struct LogFile {
    /// None when what is on disk after `end` is unknown (a failed `fdatasync`, a failed reopen)
    /// or after the clean close: the next append rewrites the whole log instead.
    file: Option<File>,
    /// Where the next append goes: the end of the last complete, synced append.
    end: u64,
    #[cfg(test)]
    test: tests::Hooks,
}

/// The crash-persistent intent log of one mount. `Send + Sync`; every method takes `&self`.
pub struct IntentLog {
    path: PathBuf,
    extent_size: u64,
    linger: Duration,
    /// How many extents may stay hot.
    hot: u64,
    state: Mutex<State>,
    cond: Condvar,
    file: Mutex<LogFile>,
}

impl fmt::Debug for IntentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntentLog")
            .field("path", &self.path)
            .field("extent_size", &self.extent_size)
            .finish_non_exhaustive()
    }
}

impl IntentLog {
    /// Opens (or, when `path` does not exist, creates: first mount) the log, and returns what
    /// the previous run left unsynced. The log is rewritten at once with every recovered extent
    /// marked, so they stay marked until a sync commits. `extent_size` may differ from the one
    /// the file was written with.
    pub fn open(path: &Path, extent_size: u64) -> Result<(IntentLog, Recovery), IntentError> {
        if extent_size < MIN_EXTENT_SIZE || !extent_size.is_power_of_two() {
            return Err(IntentError::ExtentSize { size: extent_size });
        }
        let io_err = |action, source| IntentError::Io {
            action,
            path: path.to_path_buf(),
            source,
        };
        let (recovery, live) = match std::fs::read(path) {
            Ok(bytes) => recover(path, &bytes, extent_size)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::info!(
                    "intent log {}: none found, starting a new one (first mount)",
                    path.display()
                );
                let recovery = Recovery {
                    clean: true,
                    dirty: BTreeMap::new(),
                };
                (recovery, Marks::new())
            }
            Err(e) => return Err(io_err("read", e)),
        };
        let log = IntentLog {
            path: path.to_path_buf(),
            extent_size,
            linger: LINGER,
            hot: HOT / extent_size,
            state: Mutex::new(State {
                current: Marks::new(),
                syncs: BTreeMap::new(),
                lingering: Lingering {
                    young: Marks::new(),
                    old: Marks::new(),
                    hot: Marks::new(),
                    since: Instant::now(),
                },
                next_sync: 0,
                pending: Pending::default(),
                inflight: None,
                busy: false,
                forgotten: 0,
                compacted: 0,
                closed: false,
            }),
            cond: Condvar::new(),
            file: Mutex::new(LogFile {
                file: None,
                end: 0,
                #[cfg(test)]
                test: Default::default(),
            }),
        };
        log.rewrite(&format::active(extent_size, &live))?;
        log.state.lock().current = live;
        Ok((log, recovery))
    }

    /// How long committed marks stay in the file ([`LINGER`] unless set here; zero: a commit
    /// forgets its marks at once).
    pub fn lingering(mut self, linger: Duration) -> IntentLog {
        self.linger = linger;
        self
    }

    /// How many bytes' worth of extents stay marked past the linger ([`HOT`] unless set here;
    /// zero: none, a mark is forgotten once it stops lingering).
    pub fn hot(mut self, bytes: u64) -> IntentLog {
        self.hot = bytes / self.extent_size;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// Durably marks the extents covering `range` of `image` (its path relative to the mount
    /// root); returns once they are on disk. Fast path (every extent already marked in the
    /// current epoch): no I/O, a lock and a lookup.
    pub fn mark(&self, image: &Path, range: Range<u64>) -> Result<(), IntentError> {
        if range.is_empty() {
            return Ok(());
        }
        let extents = self.extents_of(&range);
        let mut st = self.state.lock();
        loop {
            if covers(&st.current, image, &extents) {
                return Ok(());
            }
            // A sync in progress froze these extents' marks, which are in the file until a
            // compaction, and every compaction writes the current marks too: marking them
            // again needs no append. (With a sync point every second, the first write to each
            // extent after each one would otherwise wait for an fdatasync.)
            // The same holds for the lingering marks of committed syncs.
            if st.syncs.values().any(|m| covers(m, image, &extents))
                || st.lingering.covers(image, &extents)
            {
                st.current
                    .entry(image.to_path_buf())
                    .or_insert_with(exact_set)
                    .insert(extents);
                return Ok(());
            }
            if st.closed {
                return Err(self.closed());
            }
            // An append in progress already writes these extents: wait for it rather than
            // write them again. On success they are in `current`; on failure mark them anew.
            match &st.inflight {
                Some(f) if covers(&f.marks, image, &extents) => {
                    let done = f.done.clone();
                    while done.get().is_none() {
                        self.cond.wait(&mut st);
                    }
                }
                _ => break,
            }
        }
        format::check_image(image).map_err(|reason| IntentError::ImageName {
            image: image.to_path_buf(),
            reason,
        })?;
        st.pending
            .marks
            .entry(image.to_path_buf())
            .or_insert_with(exact_set)
            .insert(extents);
        let done = st.pending.done.clone();
        loop {
            if let Some(result) = done.get() {
                return result.as_ref().map(|_| ()).map_err(IntentError::duplicate);
            }
            if st.busy {
                self.cond.wait(&mut st);
            } else {
                self.flush(&mut st);
            }
        }
    }

    /// An image (or a directory of images) was renamed: its marks follow it. They are logged
    /// again under the new name, durably, before this returns, so call it before renaming the
    /// backing file, and with writes to the image held off (a write marked under the old name
    /// after this call stays under the old name).
    pub fn rename(&self, from: &Path, to: &Path) -> Result<(), IntentError> {
        if from == to {
            return Ok(());
        }
        let mut st = self.acquire();
        let result = self.rename_owned(&mut st, from, to);
        self.release(&mut st);
        result
    }

    fn rename_owned(
        &self,
        st: &mut MutexGuard<'_, State>,
        from: &Path,
        to: &Path,
    ) -> Result<(), IntentError> {
        self.remap_owned(st, |image| super::rebase(image, from, to))?;
        log::debug!(
            "intent log {}: marks of {} follow it to {}",
            self.path.display(),
            from.display(),
            to.display()
        );
        Ok(())
    }

    /// Moves every mark to the name `new_name` gives its image (`None`: it stays), logging
    /// the moved marks durably first. One function for rename and exchange: all names move
    /// at once, so a swap never merges the two sets on the way.
    fn remap_owned(
        &self,
        st: &mut MutexGuard<'_, State>,
        new_name: impl Fn(&Path) -> Option<PathBuf>,
    ) -> Result<(), IntentError> {
        if st.closed {
            return Err(self.closed());
        }
        let mut moved = Marks::new();
        for marks in std::iter::once(&st.current)
            .chain(st.lingering.sets())
            .chain(st.syncs.values())
        {
            for (image, set) in marks {
                if let Some(new) = new_name(image) {
                    moved.entry(new).or_insert_with(exact_set).extend_from(set);
                }
            }
        }
        for image in moved.keys() {
            format::check_image(image).map_err(|reason| IntentError::ImageName {
                image: image.clone(),
                reason,
            })?;
        }
        if !moved.is_empty() {
            self.write_owned(st, &moved)?;
            // The records under the old names are dead now.
            st.forgotten += 1;
        }
        let st = &mut **st;
        for marks in std::iter::once(&mut st.current)
            .chain(st.lingering.sets_mut())
            .chain(st.syncs.values_mut())
            .chain(std::iter::once(&mut st.pending.marks))
        {
            remap(marks, &new_name);
        }
        Ok(())
    }

    /// Two names (images or directories of images) were swapped (RENAME_EXCHANGE): the marks
    /// of each follow it to the other's name. As [`IntentLog::rename`]: logged durably before
    /// this returns; call it before swapping the backing files, with writes held off.
    pub fn exchange(&self, a: &Path, b: &Path) -> Result<(), IntentError> {
        if a == b {
            return Ok(());
        }
        let mut st = self.acquire();
        let result = self.remap_owned(&mut st, |image| swapped(image, a, b));
        self.release(&mut st);
        result
    }

    /// A sync point (the freeze): the marks so far belong to this sync, and later writes mark
    /// their extents again. Call it at the freeze instant, while no write is between its `mark`
    /// and its insertion into the dirty set (the filesystem core's freeze lock ensures that),
    /// or a write marked before the freeze but landing after it would lose its mark when the
    /// sync commits.
    pub fn begin_sync(&self) -> SyncToken {
        let mut st = self.state.lock();
        let id = st.next_sync;
        st.next_sync += 1;
        let frozen = std::mem::take(&mut st.current);
        st.syncs.insert(id, frozen);
        SyncToken { id }
    }

    /// The sync committed: its marks are no longer live (those marked again since stay); they
    /// linger, and the lingering marks of long enough ago are forgotten and the file compacted.
    /// An error means only that the compaction failed: the forgotten marks stay on disk until
    /// the next one, which costs a re-read after a crash and loses nothing.
    pub fn commit_sync(&self, t: SyncToken) -> Result<(), IntentError> {
        self.commit_sync_at(t, Instant::now())
    }

    fn commit_sync_at(&self, t: SyncToken, now: Instant) -> Result<(), IntentError> {
        let mut st = self.state.lock();
        let Some(frozen) = st.syncs.remove(&t.id) else {
            return Ok(());
        };
        let l = &mut st.lingering;
        let mut forgot = if self.linger.is_zero() {
            !frozen.values().all(|s| s.is_empty())
        } else {
            merge(&mut l.young, &frozen);
            false
        };
        if now.duration_since(l.since) >= self.linger / 2 {
            let old = std::mem::replace(&mut l.old, std::mem::take(&mut l.young));
            l.since = now;
            forgot |= l.cool(old, self.hot);
        }
        if forgot {
            st.forgotten += 1;
        }
        drop(st);
        let mut st = self.acquire();
        let result = self.compact_owned(&mut st);
        self.release(&mut st);
        result
    }

    /// The sync failed: its marks stay live, as if they had been made in the current epoch.
    pub fn abort_sync(&self, t: SyncToken) {
        let mut st = self.state.lock();
        if let Some(frozen) = st.syncs.remove(&t.id) {
            merge(&mut st.current, &frozen);
        }
    }

    /// Clean unmount: atomically replaces the log with a clean record of the exact unsynced
    /// ranges per image, given by the caller; the next open returns `clean = true` with them.
    /// After success the log takes no more marks. On error the log stays as it was (active),
    /// so the next open recovers every logged extent.
    pub fn close_clean(&self, dirty: &BTreeMap<PathBuf, RangeSet>) -> Result<(), IntentError> {
        let images: Vec<_> = dirty.iter().filter(|(_, s)| !s.is_empty()).collect();
        for (image, _) in &images {
            format::check_image(image).map_err(|reason| IntentError::ImageName {
                image: image.to_path_buf(),
                reason,
            })?;
        }
        let bytes = format::clean(self.extent_size, images.iter().copied());
        let mut st = self.acquire();
        let result = if st.closed {
            Err(self.closed())
        } else {
            MutexGuard::unlocked(&mut st, || {
                let mut lf = self.file.lock();
                durable::write_atomic(&self.path, &bytes).map_err(|e| self.io("replace", e))?;
                lf.file = None;
                Ok(())
            })
        };
        if result.is_ok() {
            st.closed = true;
            log::info!(
                "intent log {}: closed cleanly, {} bytes unsynced in {} images",
                self.path.display(),
                images.iter().map(|(_, s)| s.covered_bytes()).sum::<u64>(),
                images.len()
            );
        }
        self.release(&mut st);
        result
    }

    /// How many extents are marked (live, counted once each), for status and metrics.
    pub fn marked_extents(&self) -> usize {
        let st = self.state.lock();
        let live = live(&st, None);
        live.values().map(|s| s.covered_bytes() as usize).sum()
    }

    /// Bytes of the extents in the file (live, lingering and hot, counted once each): what the
    /// next mount re-reads after an unclean stop now, at most.
    pub fn logged_bytes(&self) -> u64 {
        count(&on_disk(&self.state.lock(), None)) * self.extent_size
    }

    /// The extent indices covering a non-empty byte range.
    fn extents_of(&self, r: &Range<u64>) -> Range<u64> {
        r.start / self.extent_size..(r.end - 1) / self.extent_size + 1
    }

    /// Leads one append: takes every queued mark, writes it with one `fdatasync` (or rewrites
    /// the log if its tail is in doubt), and tells the waiters.
    fn flush(&self, st: &mut MutexGuard<'_, State>) {
        debug_assert!(!st.busy);
        st.busy = true;
        let Pending { marks, done } = std::mem::take(&mut st.pending);
        let marks = Arc::new(marks);
        st.inflight = Some(InFlight {
            marks: marks.clone(),
            done: done.clone(),
        });
        let result = if st.closed {
            Err(self.closed())
        } else {
            self.write_owned(st, &marks)
        };
        if result.is_ok() {
            merge(&mut st.current, &marks);
        }
        st.inflight = None;
        let _ = done.set(result);
        st.busy = false;
        self.cond.notify_all();
    }

    /// Makes `new` durable: appended, or, when the file's tail is in doubt, with the whole log
    /// rewritten to hold the live marks and `new`. The caller owns the file (`busy`).
    fn write_owned(&self, st: &mut MutexGuard<'_, State>, new: &Marks) -> Result<(), IntentError> {
        debug_assert!(st.busy);
        if self.file.lock().file.is_some() {
            let mut bytes = Vec::new();
            for (image, extents) in new {
                format::push_marks(&mut bytes, image, extents);
            }
            MutexGuard::unlocked(st, || self.append(&bytes, new))
        } else {
            let all = on_disk(st, Some(new));
            let generation = st.forgotten;
            MutexGuard::unlocked(st, || self.rewrite(&format::active(self.extent_size, &all)))?;
            st.compacted = generation;
            Ok(())
        }
    }

    /// Rewrites the file with only the live marks, if marks were forgotten since it was last
    /// rewritten. The caller owns the file.
    fn compact_owned(&self, st: &mut MutexGuard<'_, State>) -> Result<(), IntentError> {
        if st.closed || st.forgotten == st.compacted {
            return Ok(());
        }
        let all = on_disk(st, None);
        let generation = st.forgotten;
        let bytes = format::active(self.extent_size, &all);
        let result = MutexGuard::unlocked(st, || {
            crate::fault::point("intent.compact").map_err(|e| self.io("write", e))?;
            self.rewrite(&bytes)
        });
        match &result {
            Ok(()) => {
                st.compacted = generation;
                log::debug!(
                    "intent log {}: compacted to {} bytes, {} images with live marks",
                    self.path.display(),
                    bytes.len(),
                    all.len()
                );
            }
            Err(e) => log::warn!(
                "intent log {}: compaction failed, the forgotten marks stay until the next \
                 one: {e}",
                self.path.display()
            ),
        }
        result
    }

    /// Appends `bytes` (the records of `marks`) at the end of the last good append and syncs.
    fn append(&self, bytes: &[u8], marks: &Marks) -> Result<(), IntentError> {
        let mut lf = self.file.lock();
        let end = lf.end;
        if let Err(e) = lf.write_at(bytes, end) {
            // Cut the partial record off (the next append starts at `end` anyway; this keeps
            // a torn record out of the file and frees its blocks). If even that fails, rewrite
            // the log before the next append.
            let cut = lf.file.as_ref().map(|f| f.set_len(end));
            if let (Some(Ok(())), Some(f)) = (&cut, &lf.file) {
                self.reserve(f, end);
            }
            if !matches!(cut, Some(Ok(()))) {
                log::warn!(
                    "intent log {}: cannot cut the failed append at offset {end} off; the log \
                     will be rewritten before the next append",
                    self.path.display()
                );
                lf.file = None;
            }
            log::error!(
                "intent log {}: cannot append marks at offset {end} ({}): {e}",
                self.path.display(),
                describe(marks)
            );
            return Err(self.io("append to", e));
        }
        if let Err(e) = crate::fault::point("intent.append").and_then(|()| lf.sync_data()) {
            // After a failed fdatasync the kernel may have dropped the dirty pages: what the
            // file holds is unknown, so rewrite it whole before the next append.
            lf.file = None;
            log::error!(
                "intent log {}: fdatasync of marks at offset {end} failed ({}): {e}",
                self.path.display(),
                describe(marks)
            );
            return Err(self.io("fdatasync", e));
        }
        lf.end = end + bytes.len() as u64;
        Ok(())
    }

    /// Replaces the file with `bytes` atomically and durably and reopens it for appends.
    fn rewrite(&self, bytes: &[u8]) -> Result<(), IntentError> {
        let mut lf = self.file.lock();
        durable::write_atomic(&self.path, bytes).map_err(|e| self.io("write", e))?;
        // The old handle names the replaced file now.
        lf.file = None;
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| self.io("reopen", e))?;
        self.reserve(&file, bytes.len() as u64);
        lf.file = Some(file);
        lf.end = bytes.len() as u64;
        Ok(())
    }

    /// Allocates [`RESERVE`] bytes past `end` without changing the file's size: appends there
    /// need no new blocks.
    fn reserve(&self, file: &File, end: u64) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; KEEP_SIZE only allocates blocks.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                end as libc::off_t,
                RESERVE as libc::off_t,
            )
        };
        if r != 0 {
            log::warn!(
                "intent log {}: cannot reserve {} KiB past its end ({}): if its filesystem \
                 fills, guest writes that need a new mark fail with ENOSPC",
                self.path.display(),
                RESERVE >> 10,
                io::Error::last_os_error()
            );
        }
    }

    /// Waits until no one owns the file, then owns it.
    fn acquire(&self) -> MutexGuard<'_, State> {
        let mut st = self.state.lock();
        while st.busy {
            self.cond.wait(&mut st);
        }
        st.busy = true;
        st
    }

    fn release(&self, st: &mut MutexGuard<'_, State>) {
        st.busy = false;
        self.cond.notify_all();
    }

    fn io(&self, action: &'static str, source: io::Error) -> IntentError {
        IntentError::Io {
            action,
            path: self.path.clone(),
            source,
        }
    }

    fn closed(&self) -> IntentError {
        IntentError::Closed {
            path: self.path.clone(),
        }
    }
}

impl LogFile {
    fn write_at(&mut self, bytes: &[u8], offset: u64) -> io::Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Err(io::Error::other("the log file is not open"));
        };
        #[cfg(test)]
        if let Some(keep) = self.test.fail_write.take() {
            file.write_all_at(&bytes[..keep.min(bytes.len())], offset)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all_at(bytes, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let Some(file) = self.file.as_ref() else {
            return Err(io::Error::other("the log file is not open"));
        };
        #[cfg(test)]
        {
            self.test.syncs += 1;
            std::thread::sleep(self.test.sync_delay);
            if std::mem::take(&mut self.test.fail_sync) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        file.sync_data()
    }
}

/// Decodes an existing log: what to report, and the extents (of `extent_size`) to keep marked.
fn recover(path: &Path, bytes: &[u8], extent_size: u64) -> Result<(Recovery, Marks), IntentError> {
    let d = format::decode(path, bytes)?;
    if let Some(t) = &d.torn {
        log::warn!(
            "intent log {}: ignoring {} bytes at offset {} ({}): an append cut short by a \
             crash; the write it was for never reached an image",
            path.display(),
            t.len,
            t.offset,
            t.reason
        );
    }
    let mut dirty = BTreeMap::new();
    let mut live = Marks::new();
    let clean = d.state == FileState::Clean;
    for (image, set) in d.images {
        // `set` holds byte ranges in a clean log, extent indices (of the file's size) in an
        // active one.
        let (bytes, extents) = if clean {
            let extents = cover(&set, extent_size);
            (set, extents)
        } else {
            let mut bytes = exact_set();
            for r in set.iter() {
                bytes.insert(r.start * d.extent_size..r.end.saturating_mul(d.extent_size));
            }
            let extents = if d.extent_size == extent_size {
                set
            } else {
                cover(&bytes, extent_size)
            };
            (bytes, extents)
        };
        if bytes.is_empty() {
            continue;
        }
        live.insert(image.clone(), extents);
        // Hand the caller a set with the usual bound (a clean record's ranges stay exact).
        let limit = if clean {
            DEFAULT_LIMIT.max(bytes.len())
        } else {
            DEFAULT_LIMIT
        };
        let mut out = RangeSet::with_limit(limit);
        out.extend_from(&bytes);
        dirty.insert(image, out);
    }
    let recovery = Recovery { clean, dirty };
    log::info!(
        "intent log {}: previous run {}; {} bytes to resynchronise in {} images",
        path.display(),
        if clean {
            "unmounted cleanly"
        } else {
            "stopped without unmounting: every logged extent is treated as changed"
        },
        recovery
            .dirty
            .values()
            .map(RangeSet::covered_bytes)
            .sum::<u64>(),
        recovery.dirty.len()
    );
    Ok((recovery, live))
}

/// The extents of `extent_size` covering `ranges` (exact).
fn cover(ranges: &RangeSet, extent_size: u64) -> RangeSet {
    let mut out = exact_set();
    for r in ranges.iter() {
        out.insert(r.start / extent_size..(r.end - 1) / extent_size + 1);
    }
    out
}

fn covers(marks: &Marks, image: &Path, extents: &Range<u64>) -> bool {
    marks
        .get(image)
        .is_some_and(|s| s.contains_range(extents.clone()))
}

/// How many extents `marks` holds.
fn count(marks: &Marks) -> u64 {
    marks.values().map(|s| s.covered_bytes()).sum()
}

fn merge(into: &mut Marks, from: &Marks) {
    for (image, set) in from {
        into.entry(image.clone())
            .or_insert_with(exact_set)
            .extend_from(set);
    }
}

/// Every mark that must stay in the file: the live ones and the lingering ones (`mark` trusts
/// those too), and `extra`.
fn on_disk(st: &State, extra: Option<&Marks>) -> Marks {
    let mut all = live(st, extra);
    for marks in st.lingering.sets() {
        merge(&mut all, marks);
    }
    all
}

/// Every live mark: the current epoch's, those of syncs in progress, and `extra`.
fn live(st: &State, extra: Option<&Marks>) -> Marks {
    let mut all = st.current.clone();
    for marks in st.syncs.values().chain(extra) {
        merge(&mut all, marks);
    }
    all
}

/// `image`'s name once `a` and `b` swapped names, if it is under either.
fn swapped(image: &Path, a: &Path, b: &Path) -> Option<PathBuf> {
    super::rebase(image, a, b).or_else(|| super::rebase(image, b, a))
}

fn remap(marks: &mut Marks, new_name: impl Fn(&Path) -> Option<PathBuf>) {
    let names: Vec<(PathBuf, PathBuf)> = marks
        .keys()
        .filter_map(|old| Some((old.clone(), new_name(old)?)))
        .collect();
    let taken: Vec<_> = names
        .into_iter()
        .filter_map(|(old, new)| Some((new, marks.remove(&old)?)))
        .collect();
    for (new, set) in taken {
        marks.entry(new).or_insert_with(exact_set).extend_from(&set);
    }
}

/// "vm/a.img extents 3..5 and 2 more images", for log messages.
fn describe(marks: &Marks) -> String {
    let mut names: Vec<_> = marks.iter().collect();
    names.sort_by(|a, b| a.0.cmp(b.0));
    match names.first() {
        None => "no marks".into(),
        Some((image, set)) => {
            let first = set.iter().next().unwrap_or(0..0);
            let more = match names.len() - 1 {
                0 => String::new(),
                n => format!(" and {n} more images"),
            };
            format!("{} extents {first:?}{more}", image.display())
        }
    }
}

#[cfg(test)]
mod tests;
