//! Change tracking for one mount: which bytes of which image changed since the last sync point,
//! which images were renamed or removed, and the intent log that makes the former survive a
//! crash. The filesystem core reports every change here; the sync engine freezes it at a sync
//! point.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::cow::{FileKey, Window};
use crate::dirty::{IntentError, IntentLog, RangeSet, SyncToken, rebase};

/// A change to the set of images (not to their bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsEvent {
    Renamed { from: PathBuf, to: PathBuf },
    Removed { path: PathBuf },
}

#[derive(Default)]
struct State {
    dirty: BTreeMap<PathBuf, RangeSet>,
    events: Vec<NsEvent>,
}

/// The file a change is made to: its open backing file and identity (for copy-before-write).
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub file: &'a File,
    pub key: FileKey,
}

/// What a sync point took: the dirty ranges and namespace events up to the freeze.
pub struct Frozen {
    pub dirty: BTreeMap<PathBuf, RangeSet>,
    pub events: Vec<NsEvent>,
    token: Option<SyncToken>,
}

/// Per-mount change tracking. Without an intent log (benchmarks only) nothing is recorded.
///
/// The gate orders changes against sync points and renames: a change holds it shared from
/// its intent-log mark to its dirty-set insert, so a freeze (which holds it exclusively) never
/// falls between the two; that is what lets a committed sync drop the marks it covered. A
/// rename holds it exclusively, so no change is marked under a name that is going away.
pub struct Tracker {
    log: Option<IntentLog>,
    window: Mutex<Option<Arc<Window>>>,
    gate: RwLock<()>,
    state: Mutex<State>,
    on_fsync: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Tracker {
    /// Tracking backed by `log`, starting from the ranges recovered from it.
    pub fn new(log: IntentLog, recovered: BTreeMap<PathBuf, RangeSet>) -> Tracker {
        Tracker {
            log: Some(log),
            window: Mutex::new(None),
            on_fsync: Mutex::new(None),
            gate: RwLock::new(()),
            state: Mutex::new(State {
                dirty: recovered,
                events: Vec::new(),
            }),
        }
    }

    /// No tracking and no intent log: the baseline the tracking overhead is measured against.
    pub fn disabled() -> Tracker {
        Tracker {
            log: None,
            window: Mutex::new(None),
            on_fsync: Mutex::new(None),
            gate: RwLock::new(()),
            state: Mutex::new(State::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.log.is_some()
    }

    /// Runs `f` after every successful fsync through the mount (`sync_on_fsync`).
    pub fn set_on_fsync(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.on_fsync.lock() = Some(f);
    }

    /// An image was fsynced through the mount.
    pub fn fsynced(&self) {
        if let Some(f) = &*self.on_fsync.lock() {
            f();
        }
    }

    /// Runs `op`, which changes bytes `range` of `image`: the range is made durable in the
    /// intent log first (`op` does not run if that fails), and added to the dirty set after
    /// `op`, whether or not `op` succeeded (a failed write may have changed some bytes).
    pub fn change<T>(
        &self,
        image: &Path,
        target: Target<'_>,
        range: Range<u64>,
        op: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, IntentError> {
        let Some(log) = &self.log else {
            return Ok(op());
        };
        if range.start >= range.end {
            return Ok(op());
        }
        let _gate = self.gate.read();
        log.mark(image, range.clone())?;
        if let Err(e) = self.save_old(target, range.clone()) {
            return Ok(Err(e));
        }
        let r = op();
        let mut s = self.state.lock();
        match s.dirty.get_mut(image) {
            Some(set) => set.insert(range),
            None => {
                let mut set = RangeSet::new();
                set.insert(range);
                s.dirty.insert(image.to_path_buf(), set);
            }
        }
        Ok(r)
    }

    /// Bytes `range` of `image` changed without going through the mount (found afterwards):
    /// marked durably in the intent log, then added to the dirty set.
    pub fn mark(&self, image: &Path, range: Range<u64>) -> Result<(), IntentError> {
        let Some(log) = &self.log else {
            return Ok(());
        };
        if range.start >= range.end {
            return Ok(());
        }
        let _gate = self.gate.read();
        log.mark(image, range.clone())?;
        self.state
            .lock()
            .dirty
            .entry(image.to_path_buf())
            .or_default()
            .insert(range);
        Ok(())
    }

    /// Runs `op`, which changes bytes of a file that is no longer an image (unlinked while
    /// open): nothing to record, but a sync point's frozen view of it must not change.
    pub fn change_unnamed<T>(
        &self,
        target: Target<'_>,
        range: Range<u64>,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _gate = self.gate.read();
        self.save_old(target, range)?;
        op()
    }

    /// Copy-before-write: saves the old bytes the open window (if any) still needs.
    fn save_old(&self, target: Target<'_>, range: Range<u64>) -> io::Result<()> {
        let window = self.window.lock().clone();
        match window {
            Some(w) => w.before_change(target.key, target.file, range),
            None => Ok(()),
        }
    }

    /// Runs `op`, which renames `from` (an image, or a directory holding images) to `to`, with
    /// no change in flight; the dirty ranges and intent-log marks follow the new names.
    /// `replaces` says an existing `to` is replaced (and so removed).
    pub fn rename<T>(
        &self,
        from: &Path,
        to: &Path,
        replaces: bool,
        op: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, IntentError> {
        let Some(log) = &self.log else {
            return Ok(op());
        };
        let _gate = self.gate.write();
        let mut s = self.state.lock();
        let moved: Vec<PathBuf> = s
            .dirty
            .keys()
            .filter(|p| p.starts_with(from))
            .cloned()
            .collect();
        // Marks go to the new names first: if the rename fails they are merely extra.
        for old in &moved {
            log.rename(old, &rebase(old, from, to).expect("filtered by prefix"))?;
        }
        let r = op();
        if r.is_err() {
            return Ok(r);
        }
        if replaces {
            s.dirty.retain(|p, _| !p.starts_with(to));
            s.events.push(NsEvent::Removed {
                path: to.to_path_buf(),
            });
        }
        for old in moved {
            let set = s.dirty.remove(&old).expect("key listed above");
            s.dirty
                .insert(rebase(&old, from, to).expect("filtered by prefix"), set);
        }
        s.events.push(NsEvent::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
        Ok(r)
    }

    /// Runs `op`, which swaps the names `a` and `b` (renameat2 with RENAME_EXCHANGE; each an
    /// image or a directory holding images), with no change in flight: the dirty ranges and
    /// intent-log marks of each follow it to the other's name.
    pub fn exchange<T>(
        &self,
        a: &Path,
        b: &Path,
        op: impl FnOnce() -> io::Result<T>,
    ) -> Result<io::Result<T>, IntentError> {
        let Some(log) = &self.log else {
            return Ok(op());
        };
        let _gate = self.gate.write();
        let mut s = self.state.lock();
        let under = |root: &Path| -> Vec<PathBuf> {
            s.dirty
                .keys()
                .filter(|p| p.starts_with(root))
                .cloned()
                .collect()
        };
        let moves: Vec<(PathBuf, PathBuf)> = (under(a).into_iter())
            .map(|old| (rebase(&old, a, b).expect("filtered by prefix"), old))
            .chain(
                under(b)
                    .into_iter()
                    .map(|old| (rebase(&old, b, a).expect("filtered by prefix"), old)),
            )
            .map(|(new, old)| (old, new))
            .collect();
        // Marks follow the names first (durably); if the exchange fails they go back.
        log.exchange(a, b)?;
        let r = op();
        if r.is_err() {
            log.exchange(a, b)?;
            return Ok(r);
        }
        let sets: Vec<(PathBuf, RangeSet)> = moves
            .into_iter()
            .map(|(old, new)| (new, s.dirty.remove(&old).expect("key listed above")))
            .collect();
        s.dirty.extend(sets);
        // As three renames through a name no path can have (it holds a NUL).
        let aside = PathBuf::from("\0exchange");
        s.events.extend([
            NsEvent::Renamed {
                from: a.to_path_buf(),
                to: aside.clone(),
            },
            NsEvent::Renamed {
                from: b.to_path_buf(),
                to: a.to_path_buf(),
            },
            NsEvent::Renamed {
                from: aside,
                to: b.to_path_buf(),
            },
        ]);
        Ok(r)
    }

    /// `path` (an image or a directory) was removed.
    pub fn removed(&self, path: &Path) {
        if self.log.is_none() {
            return;
        }
        let mut s = self.state.lock();
        s.dirty.retain(|p, _| !p.starts_with(path));
        s.events.push(NsEvent::Removed {
            path: path.to_path_buf(),
        });
    }

    /// The dirty ranges now, per image (for status and tests).
    pub fn dirty(&self) -> BTreeMap<PathBuf, Vec<Range<u64>>> {
        let s = self.state.lock();
        s.dirty
            .iter()
            .map(|(p, r)| (p.clone(), r.to_vec()))
            .collect()
    }

    /// The dirty ranges of one image now.
    pub fn dirty_of(&self, image: &Path) -> Vec<Range<u64>> {
        let s = self.state.lock();
        s.dirty.get(image).map(|r| r.to_vec()).unwrap_or_default()
    }

    /// Dirty bytes now, over all images.
    pub fn dirty_bytes(&self) -> u64 {
        let s = self.state.lock();
        s.dirty.values().map(|r| r.covered_bytes()).sum()
    }

    /// Bytes of the extents the intent log marks (0 without one): what an unclean stop now
    /// makes the next mount re-read, at most.
    pub fn logged_bytes(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.logged_bytes())
    }

    /// A sync point: takes the dirty ranges and events so far; later changes start afresh.
    pub fn freeze(&self) -> Frozen {
        self.freeze_only(None)
    }

    /// A sync point for some images only (all when `only` is `None`): the others keep their
    /// dirty ranges, marked again in the intent log's new epoch so committing this sync does
    /// not forget them.
    pub fn freeze_only(&self, only: Option<&HashSet<PathBuf>>) -> Frozen {
        self.freeze_with(only, || Ok(None))
            .expect("freezing without a window cannot fail")
            .0
    }

    /// A sync point that also opens a copy-before-write window: `open` runs while no change
    /// is in flight, and the window stays open (every change saves the old bytes it still
    /// needs) until [`Tracker::close_window`].
    pub fn freeze_with(
        &self,
        only: Option<&HashSet<PathBuf>>,
        open: impl FnOnce() -> io::Result<Option<Window>>,
    ) -> io::Result<(Frozen, Option<Arc<Window>>)> {
        let _gate = self.gate.write();
        let window = open()?.map(Arc::new);
        *self.window.lock() = window.clone();
        let mut s = self.state.lock();
        let token = self.log.as_ref().map(|l| l.begin_sync());
        let all = std::mem::take(&mut s.dirty);
        let (dirty, keep): (BTreeMap<_, _>, BTreeMap<_, _>) = match only {
            None => (all, BTreeMap::new()),
            Some(set) => all.into_iter().partition(|(p, _)| set.contains(p)),
        };
        if let Some(log) = &self.log {
            for (path, set) in &keep {
                for r in set.iter() {
                    if let Err(e) = log.mark(path, r) {
                        log::error!(
                            "cannot mark {} again in the intent log: {e}",
                            path.display()
                        );
                    }
                }
            }
        }
        s.dirty = keep;
        let frozen = Frozen {
            dirty,
            events: std::mem::take(&mut s.events),
            token,
        };
        Ok((frozen, window))
    }

    /// The sync has read everything it needs from the frozen images.
    pub fn close_window(&self) {
        let w = self.window.lock().take();
        if let Some(w) = w {
            log::debug!(
                "copy-before-write window closed ({} bytes saved)",
                w.saved_bytes()
            );
        }
    }

    /// The frozen changes reached every replica the policy requires: forget them (the intent
    /// log compacts lazily).
    pub fn commit(&self, f: Frozen) -> Result<(), IntentError> {
        match (&self.log, f.token) {
            (Some(log), Some(t)) => log.commit_sync(t),
            _ => Ok(()),
        }
    }

    /// The sync failed: the frozen changes are dirty again.
    pub fn abort(&self, f: Frozen) {
        if let (Some(log), Some(t)) = (&self.log, f.token) {
            log.abort_sync(t);
        }
        let mut s = self.state.lock();
        let mut frozen = f.dirty;
        // Names changed since the freeze apply to the frozen ranges too.
        for ev in &s.events {
            match ev {
                NsEvent::Renamed { from, to } => {
                    let moved: Vec<PathBuf> = frozen
                        .keys()
                        .filter(|p| p.starts_with(from))
                        .cloned()
                        .collect();
                    for old in moved {
                        let set = frozen.remove(&old).expect("key listed above");
                        frozen.insert(rebase(&old, from, to).expect("filtered by prefix"), set);
                    }
                }
                NsEvent::Removed { path } => frozen.retain(|p, _| !p.starts_with(path)),
            }
        }
        for (path, set) in frozen {
            s.dirty.entry(path).or_default().extend_from(&set);
        }
        let later = std::mem::take(&mut s.events);
        s.events = f.events;
        s.events.extend(later);
    }

    /// Clean unmount: the intent log keeps the exact unsynced ranges for the next mount.
    pub fn close_clean(&self) -> Result<(), IntentError> {
        match &self.log {
            Some(log) => log.close_clean(&self.state.lock().dirty),
            None => Ok(()),
        }
    }
}
