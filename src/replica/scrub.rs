//! Deep verify of a replica's store (`ferry verify --deep`, `[replica] scrub_interval`):
//! every committed image and every kept chunk is read again and re-hashed against the
//! manifests. With `repair`, what differs is mended:
//!
//! * a damaged chunk of an image from a good copy the store holds (a kept chunk, the same
//!   chunk elsewhere in an image, a staged chunk), verified, written in place and fsynced; a
//!   damaged zero extent by punching it again;
//! * a damaged chunk with no good copy here: the image's manifest is made to describe what the
//!   image holds (that entry's hash becomes the hash of the bytes there), so the image's root
//!   no longer claims the generation's bytes. The primary's next session sees the root differ,
//!   finds the chunk by Merkle descent and ships it in its next generation, which is applied
//!   atomically like any other (state `resync` until then);
//! * a damaged kept chunk from the same chunk in an image or the staging journal; with no
//!   copy anywhere, the restore points that read it are named (`lost`).
//!
//! Images are hashed without the store's lock, so commits go on; what looks damaged is checked
//! again under the lock against the manifest current then, so a commit that raced the read is
//! not reported.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use rayon::prelude::*;

use super::{Store, write_entry};
use crate::durable;
use crate::manifest::{self, Entry, Kind, Manifest};
pub use crate::wire::scrub::{Damage, Report, State};

/// Re-hashes the store's images and kept chunks; with `repair`, mends what it can.
pub fn scrub(store: &Mutex<Store>, repair: bool) -> Result<Report> {
    let (root, paths, generation, view) = {
        let mut s = store.lock();
        s.settle()?;
        let paths: Vec<String> = s.manifests.keys().cloned().collect();
        (s.root.clone(), paths, s.record.generation, s.view().clone())
    };
    let mut report = Report {
        generation,
        ..Report::default()
    };
    for path in paths {
        let Some(m) = store.lock().manifests.get(&path).cloned() else {
            continue; // removed by a generation meanwhile
        };
        report.images += 1;
        report.bytes += m.size();
        let file = root.join(&path);
        let suspects = match differing(&file, &m) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Gone from the disk: the whole image is damaged; forgotten by the store, the
                // primary's next generation sends it whole. (Unless a generation removed it
                // meanwhile: checked under the lock.)
                let mut s = store.lock();
                if !s.manifests.contains_key(&path) || file.exists() {
                    continue;
                }
                let state = if repair { State::Resync } else { State::Found };
                log::warn!("verify: image {} is missing", file.display());
                report.push(Damage {
                    path: Some(path.clone()),
                    offset: Some(0),
                    len: m.size(),
                    hash: String::new(),
                    generations: Vec::new(),
                    state,
                });
                if repair {
                    s.forget(&path)?;
                }
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        };
        if suspects.is_empty() {
            continue;
        }
        let mut s = store.lock();
        let Some(current) = s.manifests.get(&path) else {
            continue;
        };
        let f = File::open(&file)?;
        let size = f.metadata()?.len();
        let mut confirmed = Vec::new();
        for e in suspects {
            let still = current
                .index_starting_at(e.offset)
                .is_some_and(|i| current.entries()[i] == e);
            if still && !e.is_held_by(&f, size)? {
                confirmed.push(e);
            }
        }
        let states = if repair {
            s.mend_all(&path, &confirmed)?
        } else {
            vec![State::Found; confirmed.len()]
        };
        for (e, state) in confirmed.iter().zip(states) {
            log::warn!(
                "verify: {} bytes {}..{} do not match the manifest ({})",
                file.display(),
                e.offset,
                e.end(),
                words(state)
            );
            report.push(Damage {
                path: Some(path.clone()),
                offset: Some(e.offset),
                len: e.len,
                hash: e
                    .hash()
                    .map(|h| manifest::hex(h.as_bytes()))
                    .unwrap_or_default(),
                generations: Vec::new(),
                state,
            });
        }
    }
    report.kept_chunks = view.kept_figures().1;
    for (hash, pack) in view.verify_kept()? {
        let generations = view.generations_with(&hash);
        let state = if !repair {
            State::Found
        } else {
            let copy = store.lock().good_copy(&hash, &[], false)?;
            match copy {
                Some(data) if view.repair_kept(&hash, &data)? => State::Repaired,
                _ => State::Lost,
            }
        };
        log::warn!(
            "verify: kept chunk {} in pack {pack} is damaged ({}); restore points that read it: {:?}",
            manifest::hex(&hash),
            match state {
                State::Found => "found; `ferry verify --deep --repair` mends it",
                State::Repaired => "repaired from the same chunk in an image",
                _ => "no good copy in this store: those restore points lost it",
            },
            generations
        );
        report.push(Damage {
            path: None,
            offset: None,
            len: 0,
            hash: manifest::hex(&hash),
            generations,
            state,
        });
    }
    store.lock().verified = Some((std::time::SystemTime::now(), report.left()));
    log::info!(
        "deep verify of generation {}: {} images ({} bytes) and {} kept chunks re-hashed; {} \
         damaged chunks, {} not mended",
        report.generation,
        report.images,
        report.bytes,
        report.kept_chunks,
        report.damage.len() as u64 + report.unlisted,
        report.left()
    );
    Ok(report)
}

/// What the log says of a damaged entry in state `state`.
fn words(state: State) -> &'static str {
    match state {
        State::Found => "found; `ferry verify --deep --repair` mends it",
        State::Repaired => "repaired from a good copy in the store",
        State::Resync => "the primary's next generation brings the right bytes",
        State::Lost => "lost",
    }
}

/// The entries of `m` whose bytes `file` does not hold.
fn differing(file: &std::path::Path, m: &Manifest) -> io::Result<Vec<Entry>> {
    let f = File::open(file)?;
    let size = f.metadata()?.len();
    let bad: io::Result<Vec<Option<Entry>>> = m
        .entries()
        .par_iter()
        .map(|e| Ok((!e.is_held_by(&f, size)?).then_some(*e)))
        .collect();
    Ok(bad?.into_iter().flatten().collect())
}

impl Store {
    /// Mends the entries `damaged` of image `path` (their bytes differ from the committed
    /// manifest's) from good copies here; the manifest describes what the image holds at the
    /// others, which the primary's next generation brings.
    fn mend_all(&mut self, path: &str, damaged: &[Entry]) -> Result<Vec<State>> {
        let states = damaged
            .iter()
            .map(|e| self.mend(path, e, damaged))
            .collect::<Result<Vec<State>>>()?;
        let resync: Vec<Entry> = damaged
            .iter()
            .zip(&states)
            .filter(|(_, s)| **s == State::Resync)
            .map(|(e, _)| *e)
            .collect();
        if !resync.is_empty() {
            self.describe_as_held(path, &resync)?;
        }
        Ok(states)
    }

    /// After a replay that could not read every chunk staged for its generation (the staging
    /// lost records after they were durable: damaged on the disk): the entries of `paths` the
    /// images do not hold are mended, so no manifest claims bytes its image lacks (the replay
    /// wrote only what it found staged, and trusts the rest to be in place). Re-hashes those
    /// images whole; only after such a loss.
    pub(super) fn mend_replayed(&mut self, paths: &[String]) -> Result<()> {
        for path in paths {
            let Some(m) = self.manifests.get(path) else {
                continue;
            };
            let file = self.root.join(path);
            let damaged = differing(&file, m)
                .with_context(|| format!("cannot read {} to check it", file.display()))?;
            let states = self.mend_all(path, &damaged)?;
            for (e, state) in damaged.iter().zip(states) {
                log::warn!(
                    "{}: bytes {}..{} of the replayed generation were lost from the staging \
                     (damaged on the disk) and do not match its manifest ({})",
                    file.display(),
                    e.offset,
                    e.end(),
                    words(state)
                );
            }
        }
        Ok(())
    }

    /// Mends damaged entry `e` of `path` from a good copy here (not from the other damaged
    /// entries `damaged`).
    fn mend(&self, path: &str, e: &Entry, damaged: &[Entry]) -> Result<State> {
        let file = self.root.join(path);
        let f = OpenOptions::new().write(true).open(&file)?;
        let data = match e.kind {
            Kind::Zero => {
                let staged = super::Staged {
                    journal: &self.journal,
                    patches: &self.patches,
                };
                write_entry(&f, path, e, &staged, super::Writes::Changed)?;
                f.sync_data()?;
                return Ok(State::Repaired);
            }
            Kind::Data(h) => {
                let skip: Vec<(&str, u64)> = damaged.iter().map(|d| (path, d.offset)).collect();
                self.good_copy(h.as_bytes(), &skip, true)?
            }
        };
        let Some(data) = data else {
            return Ok(State::Resync);
        };
        f.write_all_at(&data, e.offset)
            .with_context(|| format!("cannot write {}", file.display()))?;
        f.sync_data()?;
        Ok(State::Repaired)
    }

    /// A verified copy of chunk `hash` from the images (not at the places `skip`), the staging
    /// journal, and (when `kept`) the kept chunks.
    fn good_copy(
        &self,
        hash: &[u8; 32],
        skip: &[(&str, u64)],
        kept: bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let good = |d: &Vec<u8>| blake3::hash(d).as_bytes() == hash;
        // (No view yet while a replay runs as the store opens.)
        if kept
            && let Some(view) = &self.view
            && let Ok(Some(d)) = view.kept_chunk(hash)
        {
            return Ok(Some(d));
        }
        if let Ok(Some(d)) = self.journal.get(hash) {
            return Ok(Some(d));
        }
        for (path, m) in &self.manifests {
            for e in m.entries() {
                if e.hash().is_some_and(|h| h.as_bytes() == hash)
                    && !skip.contains(&(path.as_str(), e.offset))
                {
                    let d = self.read_image(path, e.offset, e.len)?;
                    if good(&d) {
                        return Ok(Some(d));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Forgets image `path` (its file is gone): the primary's next session sees the store
    /// without it and sends it whole.
    fn forget(&mut self, path: &str) -> Result<()> {
        let dir = self.manifests_in("manifests");
        dir.remove(path);
        if let Some(parent) = dir.file(path).parent() {
            durable::fsync_dir(parent)?;
        }
        self.manifests.remove(path);
        self.rebuild_index();
        Ok(())
    }

    /// Makes the committed manifest of `path` describe the bytes its damaged `entries` hold,
    /// so the primary's next session finds and resends them (see the module comment).
    fn describe_as_held(&mut self, path: &str, entries: &[Entry]) -> Result<()> {
        let m = &self.manifests[path];
        let mut list = m.entries().to_vec();
        for e in entries {
            let Some(i) = m.index_starting_at(e.offset) else {
                continue;
            };
            let data = self.read_image(path, e.offset, e.len)?;
            list[i].kind = Kind::Data(blake3::hash(&data));
        }
        let held = Manifest::new(self.params, m.size(), list)?;
        self.save_manifest("manifests", path, &held)?;
        self.manifests.insert(path.to_string(), held);
        self.rebuild_index();
        Ok(())
    }
}
