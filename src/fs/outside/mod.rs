//! Changes that bypass the mount. The backing directory belongs to ferry while it is mounted
//! (as a block device belongs to DRBD), but operators' tools reach it anyway: `qemu-img` or
//! `dd` on a backing path while the mount is down, a restore from backup, a write straight to
//! the backing file while it is up. Such a change is in no dirty set, so without this module
//! the replicas would never see it and nothing would say so.
//!
//! * At mount, every image the last generation knows is compared with the [`stamp::Record`]
//!   taken at the last sync point or clean unmount ([`Outside::check_at_mount`]).
//! * While mounted, a [`fanotify::Group`] reports every write, truncate, create and
//!   rename-into in the backing directory's directories with the writer's pid; those not made
//!   by this process are changes from outside ([`Outside::drain`], run every second, before
//!   each sync point is cut and at unmount).
//!
//! Either way the image is marked dirty in full (through the tracker, so the intent log holds
//! it across a crash): the next sync point re-chunks it and ships only the chunks that differ.
//! A warning names the file and what changed, and `ferry status` lists it.
//!
//! Not detected while mounted: stores through a shared `mmap` of a backing file by another
//! process (the kernel reports no write for them) when the mount wrote the same image since
//! the last sync point. `ferry verify --primary` finds what detection missed.

pub mod fanotify;
pub mod stamp;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;

use super::Tracker;
use stamp::{Record, Stamp, Verdict};

/// How many findings `ferry status` keeps.
const KEEP_FINDINGS: usize = 64;

/// One change from outside, as `ferry status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The image, relative to the backing directory.
    pub path: String,
    /// What was found ("changed while unmounted: size 1 -> 2, mtime", "written by pid 7 (dd)").
    pub what: String,
    /// When (seconds since the epoch).
    pub at: u64,
}

/// Outside-change detection for one mount.
pub struct Outside {
    root: PathBuf,
    record: PathBuf,
    group: Option<fanotify::Group>,
    pid: i32,
    /// Serialises drains (a timer, sync points, unmount).
    draining: Mutex<()>,
    findings: Mutex<VecDeque<Finding>>,
}

impl Outside {
    /// Detection for the backing directory `root`, whose record lives at `record`. Starts
    /// watching every directory under `root` now; if the kernel refuses, says so and goes on
    /// (changes made while mounted are then not detected, the others still are).
    pub fn start(root: &Path, record: &Path) -> Outside {
        let group = match fanotify::Group::new(root) {
            Ok(g) => Some(g),
            Err(e) => {
                log::warn!(
                    "{}: cannot watch the backing directory for writes that bypass the mount \
                     (fanotify: {e}; the mount daemon needs CAP_SYS_ADMIN): such writes will \
                     not be replicated until found by `ferry verify --primary`",
                    root.display()
                );
                None
            }
        };
        let o = Outside {
            root: root.to_path_buf(),
            record: record.to_path_buf(),
            group,
            pid: std::process::id() as i32,
            draining: Mutex::new(()),
            findings: Mutex::new(VecDeque::new()),
        };
        o.watch_directories();
        o
    }

    /// Whether writes made while mounted are watched.
    pub fn watching(&self) -> bool {
        self.group.is_some()
    }

    /// Marks every directory under the backing directory (new ones since the last call).
    /// A directory created since is harmless until then: every image in it is new to the
    /// generation, so the next sync point reads it in full anyway.
    fn watch_directories(&self) {
        let Some(g) = &self.group else { return };
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if let Err(e) = g.mark(&dir) {
                log::warn!(
                    "{}: cannot watch for writes that bypass the mount: {e}",
                    dir.display()
                );
            }
            for ent in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if ent.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(ent.path());
                }
            }
        }
    }

    fn found(&self, path: &str, what: String) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut f = self.findings.lock();
        if f.len() == KEEP_FINDINGS {
            f.pop_front();
        }
        f.push_back(Finding {
            path: path.to_string(),
            what,
            at,
        });
    }

    /// The changes from outside found so far (the last [`KEEP_FINDINGS`]).
    pub fn findings(&self) -> Vec<Finding> {
        self.findings.lock().iter().cloned().collect()
    }

    /// At mount: judges every image of the last generation (`known`) against the record.
    /// `clean` says the last stop was clean; after an unclean one, `logged` are the images
    /// with intent-log marks. Images found changed are marked dirty in full.
    pub fn check_at_mount(
        &self,
        known: &BTreeSet<String>,
        clean: bool,
        logged: &BTreeSet<PathBuf>,
        tracker: &Tracker,
    ) -> io::Result<()> {
        if known.is_empty() {
            return Ok(());
        }
        let record = match Record::load(&self.record) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{e}: every image is re-read at the next sync point");
                None
            }
        };
        if record.is_none() {
            log::info!(
                "{}: no record of the backing files ({}): every image is re-read at the next \
                 sync point, and only what differs is shipped",
                self.root.display(),
                self.record.display()
            );
        }
        for image in known {
            let path = self.root.join(image);
            let m = match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_file() => m,
                // Gone (a removal) or no longer a file (the sync point reports it).
                _ => continue,
            };
            let now = Stamp::of(&m);
            let was = record.as_ref().and_then(|r| r.images.get(image));
            let is_logged = !clean && logged.contains(Path::new(image));
            match stamp::judge(was, &now, is_logged) {
                Verdict::Same => {}
                Verdict::Logged => log::info!(
                    "{}: differs from the last record; the intent log covers it (unclean stop)",
                    path.display()
                ),
                Verdict::Changed(what) => {
                    if record.is_some() {
                        log::warn!(
                            "{}: changed outside the mount while ferry was not mounted ({what}): \
                             the next sync point re-reads all of it and ships what differs",
                            path.display()
                        );
                        self.found(image, format!("changed while unmounted: {what}"));
                    }
                    let len = now.size.max(was.map_or(0, |w| w.size));
                    tracker
                        .mark(Path::new(image), 0..len)
                        .map_err(io::Error::other)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the writes reported since the last drain; those of other processes mark their
    /// image (or every image under a directory created or moved in) dirty in full. With
    /// `rescan`, first watches directories created since the last scan (before a sync point).
    pub fn drain(&self, tracker: &Tracker, rescan: bool) {
        let Some(g) = &self.group else { return };
        let _one = self.draining.lock();
        if rescan {
            self.watch_directories();
        }
        let events = match g.read_all() {
            Ok(e) => e,
            Err(e) => {
                log::error!(
                    "{}: cannot read the watch for outside writes ({e}): every image is re-read",
                    self.root.display()
                );
                self.mark_all(tracker, "the watch could not be read");
                return;
            }
        };
        // Per path, the processes that changed it.
        let mut changed: BTreeMap<PathBuf, BTreeSet<i32>> = BTreeMap::new();
        for ev in &events {
            if ev.overflow() {
                self.mark_all(tracker, "the kernel dropped write reports");
                return;
            }
            if ev.pid == self.pid {
                continue;
            }
            let (Some(dir), Some(name)) = (&ev.dir, &ev.name) else {
                continue;
            };
            if let Some(d) = g.resolve(dir) {
                changed.entry(d.join(name)).or_default().insert(ev.pid);
            }
        }
        for (rel, pids) in changed {
            let who: Vec<String> = pids.iter().map(|&p| describe(p)).collect();
            let what = format!("written outside the mount by {}", who.join(", "));
            for image in files_under(&self.root, &rel) {
                let Some(name) = image.0.to_str() else {
                    continue;
                };
                log::warn!(
                    "{}: {what}; the next sync point re-reads all of it and ships what differs \
                     (the backing directory belongs to ferry while mounted: write through the \
                     mount)",
                    self.root.join(&image.0).display()
                );
                self.found(name, what.clone());
                if let Err(e) = tracker.mark(&image.0, 0..image.1) {
                    log::error!(
                        "{}: cannot record the outside change in the intent log: {e}",
                        image.0.display()
                    );
                }
            }
        }
    }

    fn mark_all(&self, tracker: &Tracker, why: &str) {
        for (image, len) in files_under(&self.root, Path::new("")) {
            let Some(name) = image.to_str() else { continue };
            self.found(name, format!("possibly written outside the mount: {why}"));
            if let Err(e) = tracker.mark(&image, 0..len) {
                log::error!("{}: cannot mark it dirty: {e}", image.display());
            }
        }
    }

    /// Saves the stamps of a sync point's freeze (`images`: every image it read).
    pub fn save(&self, images: BTreeMap<String, Stamp>) {
        if let Err(e) = (Record { images }).save(&self.record) {
            log::warn!(
                "cannot save {}: {e} (the next mount re-reads more than it needs)",
                self.record.display()
            );
        }
    }

    /// At a clean unmount, once no write can come through the mount: reads the last reports
    /// and records every image as it is now.
    pub fn close(&self, tracker: &Tracker) {
        self.drain(tracker, false);
        let images = files_under(&self.root, Path::new(""))
            .into_iter()
            .filter_map(|(p, _)| {
                let m = fs::symlink_metadata(self.root.join(&p)).ok()?;
                Some((p.to_str()?.to_string(), Stamp::of(&m)))
            })
            .collect();
        self.save(images);
    }
}

/// "pid 7 (dd)", or "pid 7" when it has exited.
fn describe(pid: i32) -> String {
    match fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(c) if pid > 0 => format!("pid {pid} ({})", c.trim_end()),
        _ if pid > 0 => format!("pid {pid}"),
        _ => "a process in another pid namespace".into(),
    }
}

/// The regular files at or under `rel` (relative to `root`), with their sizes.
fn files_under(root: &Path, rel: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![rel.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(root.join(&p)) else {
            continue;
        };
        if m.file_type().is_file() {
            out.push((p, m.len()));
        } else if m.is_dir() {
            for ent in fs::read_dir(root.join(&p)).into_iter().flatten().flatten() {
                stack.push(p.join(ent.file_name()));
            }
        }
    }
    out.sort();
    out
}
