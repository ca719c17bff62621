//! A fenced primary's last look at its own images before it rejoins as a replica: what they
//! hold now (the manifests of its last cut brought up to date offline), and what it wrote that
//! the new primary never got, saved aside before anything overwrites it.
//!
//! The mount must be stopped: after a clean unmount the intent log holds the exact ranges
//! changed since the last cut, and the images' stamps say which changed behind the mount.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::Serialize;

use super::list_images;
use crate::chunk::{ChunkParams, FileSource, chunk_full, rechunk};
use crate::dirty::{IntentLog, RangeSet};
use crate::fs::outside::stamp::{self, Record, Stamp, Verdict};
use crate::manifest::{GenRecord, Manifest, ManifestDir};

/// The images as they are now: the generation number of the last cut, and every image's
/// manifest.
pub struct Current {
    pub generation: u64,
    pub images: BTreeMap<String, Arc<Manifest>>,
}

/// Brings the last cut of the stopped mount of `source` (state in `state`) up to date: images
/// with intent-log ranges are re-chunked there, images changed behind the mount or new are
/// chunked in full, removed ones leave.
pub fn current(state: &Path, source: &Path, params: ChunkParams, extent: u64) -> Result<Current> {
    let active = ManifestDir::new(state.join("active").join("manifests")).load_all(params);
    let rec = GenRecord::read(&state.join("active").join("generation.json"))?;
    let log = state.join("intent.log");
    let dirty: BTreeMap<PathBuf, RangeSet> = if log.exists() {
        let (l, recovery) =
            IntentLog::open(&log, extent).map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
        drop(l);
        recovery.dirty
    } else {
        BTreeMap::new()
    };
    let stamps = Record::load(&state.join("stamps.json"))
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut images = BTreeMap::new();
    for path in list_images(source)?.images {
        let file = source.join(&path);
        let src =
            FileSource::open(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let now = Stamp::of(&fs::metadata(&file)?);
        let ranges: Vec<Range<u64>> = dirty
            .get(Path::new(&path))
            .map(|r| r.iter().collect())
            .unwrap_or_default();
        let m = match active.get(&path) {
            Some(stale) => match stamp::judge(stamps.images.get(&path), &now, false) {
                Verdict::Same | Verdict::Logged => rechunk(stale, &src, &ranges)?.0,
                Verdict::Changed(_) => chunk_full(&src, params)?.0,
            },
            None => chunk_full(&src, params)?.0,
        };
        images.insert(path, Arc::new(m));
    }
    Ok(Current {
        generation: rec.generation,
        images,
    })
}

/// One image's ranges saved aside.
#[derive(Debug, Serialize)]
pub struct Saved {
    pub image: String,
    pub ranges: Vec<[u64; 2]>,
    pub bytes: u64,
}

/// The index of a directory of saved-aside writes.
#[derive(Debug, Serialize)]
pub struct Index {
    pub namespace: String,
    /// The epoch these writes were made under, and the node that fenced it.
    pub epoch: u64,
    pub new_primary: String,
    pub new_epoch: u64,
    /// When they were saved (Unix seconds).
    pub time: u64,
    pub images: Vec<Saved>,
}

/// The byte ranges of `now` that differ from `base` (what the new primary never got from this
/// node), merged; all of an image the base lacks.
pub fn differing(base: Option<&Manifest>, now: &Manifest) -> Vec<Range<u64>> {
    let mut set = RangeSet::new();
    match base {
        Some(b) => {
            for c in crate::manifest::diff(b, now).changes {
                set.insert(c.offset..c.offset + c.len);
            }
        }
        None if now.size() > 0 => set.insert(0..now.size()),
        None => {}
    }
    set.iter().collect()
}

/// Copies `ranges` of each image under `source` into sparse files of the same relative path
/// under `dir`, with `index.json` naming them; fsynced. Returns the bytes saved.
pub fn save_aside(
    source: &Path,
    dir: &Path,
    ranges: &BTreeMap<String, Vec<Range<u64>>>,
    mut index: Index,
) -> Result<u64> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut total = 0;
    for (image, rs) in ranges.iter().filter(|(_, r)| !r.is_empty()) {
        let from = fs::File::open(source.join(image))?;
        let to_path = dir.join(image);
        if let Some(p) = to_path.parent() {
            fs::create_dir_all(p)?;
        }
        let to = fs::File::create(&to_path)
            .with_context(|| format!("cannot create {}", to_path.display()))?;
        to.set_len(from.metadata()?.len())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0;
        for r in rs {
            let mut at = r.start;
            while at < r.end {
                let n = ((r.end - at) as usize).min(buf.len());
                from.read_exact_at(&mut buf[..n], at)?;
                to.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
            bytes += r.end - r.start;
        }
        to.sync_all()?;
        total += bytes;
        index.images.push(Saved {
            image: image.clone(),
            ranges: rs.iter().map(|r| [r.start, r.end]).collect(),
            bytes,
        });
    }
    let mut f = fs::File::create(dir.join("index.json"))?;
    f.write_all(&serde_json::to_vec_pretty(&index)?)?;
    f.sync_all()?;
    crate::durable::fsync_dir(dir)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random, small_params};

    #[test]
    fn the_ranges_that_differ_from_the_base_are_saved_aside_sparse() {
        let p = small_params();
        let base = random(256 << 10, 1);
        let mut now = base.clone();
        now[100_000..100_010].copy_from_slice(b"0123456789");
        now.extend_from_slice(&random(5000, 2));
        let mb = chunk_full(&base, p).unwrap().0;
        let mn = chunk_full(&now, p).unwrap().0;
        let rs = differing(Some(&mb), &mn);
        let covers = |a: u64, b: u64| rs.iter().any(|r| r.start <= a && b <= r.end);
        assert!(covers(100_000, 100_010) && covers(base.len() as u64, now.len() as u64));
        assert!(rs.iter().map(|r| r.end - r.start).sum::<u64>() < now.len() as u64 / 2);
        assert_eq!(differing(None, &mn), vec![0..now.len() as u64]);

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("vm")).unwrap();
        fs::write(src.join("vm/a.img"), &now).unwrap();
        let out = dir.path().join("aside");
        let index = Index {
            namespace: "site-a".into(),
            epoch: 0,
            new_primary: "site-b".into(),
            new_epoch: 1,
            time: 0,
            images: vec![],
        };
        let ranges = BTreeMap::from([("vm/a.img".to_string(), rs.clone())]);
        let n = save_aside(&src, &out, &ranges, index).unwrap();
        let saved = fs::read(out.join("vm/a.img")).unwrap();
        assert_eq!(saved.len(), now.len());
        for r in &rs {
            let r = r.start as usize..r.end as usize;
            assert_eq!(saved[r.clone()], now[r]);
        }
        assert_eq!(n, rs.iter().map(|r| r.end - r.start).sum::<u64>());
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["images"][0]["image"], "vm/a.img");
    }
}
