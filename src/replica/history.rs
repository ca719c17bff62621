//! Restore points on disk: `.ferry/generations/<N>/` holds generation N's record and its
//! manifests. The manifests are hard links to the committed manifest files, which are always
//! replaced (written aside and renamed), never changed in place: a link keeps the version it
//! was made for, and a generation that changed one image of a hundred costs one new manifest.
//!
//! A point exists once its directory has its final name: it is built under `<N>.tmp`, fsynced
//! and renamed; removing it renames it to `<N>.del` first. Leftovers of either are cleaned up
//! when the store opens.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::manifest::{ChunkParams, Manifest, ManifestDir};

/// What names a restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub generation: u64,
    pub group_root: String,
    pub epoch: u64,
    /// When the replica committed it (seconds since the epoch).
    pub committed: u64,
}

impl Point {
    pub fn committed_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.committed)
    }
}

pub struct History {
    dir: PathBuf,
}

impl History {
    /// The restore points of the store whose metadata directory is `meta`.
    pub fn new(meta: &Path) -> History {
        History {
            dir: meta.join("generations"),
        }
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(n.to_string())
    }

    /// The manifests of point `n`.
    pub fn manifests(&self, n: u64) -> ManifestDir {
        ManifestDir::new(self.path(n).join("manifests"))
    }

    /// Records point `p` made of the committed manifests in `committed` of `images`.
    pub fn record<'a>(
        &self,
        p: &Point,
        committed: &ManifestDir,
        images: impl Iterator<Item = &'a String>,
    ) -> Result<()> {
        let tmp = self.dir.join(format!("{}.tmp", p.generation));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(tmp.join("manifests"))
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let m = ManifestDir::new(tmp.join("manifests"));
        let mut dirs = std::collections::BTreeSet::from([m.path().to_path_buf()]);
        for image in images {
            let to = m.file(image);
            let parent = to.parent().expect("has a parent");
            fs::create_dir_all(parent)?;
            fs::hard_link(committed.file(image), &to).with_context(|| {
                format!(
                    "cannot link {} to {}",
                    committed.file(image).display(),
                    to.display()
                )
            })?;
            let mut d = parent;
            while d != tmp && dirs.insert(d.to_path_buf()) {
                d = d.parent().expect("under tmp");
            }
        }
        for d in &dirs {
            durable::fsync_dir(d)?;
        }
        durable::write_atomic(&tmp.join("record"), &serde_json::to_vec(p)?)?;
        let dst = self.path(p.generation);
        let _ = fs::remove_dir_all(&dst);
        fs::rename(&tmp, &dst)
            .with_context(|| format!("cannot make restore point {}", dst.display()))?;
        durable::fsync_dir(&self.dir)?;
        Ok(())
    }

    /// Every point, oldest first. Unfinished or half-removed directories are removed unless
    /// `read_only`.
    pub fn list(&self, read_only: bool) -> Result<Vec<Point>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).context(format!("cannot list {}", self.dir.display())),
        };
        for ent in entries {
            let path = ent?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.parse::<u64>().is_err() {
                if !read_only && (name.ends_with(".tmp") || name.ends_with(".del")) {
                    let _ = fs::remove_dir_all(&path);
                }
                continue;
            }
            let rec = path.join("record");
            let p: Point = serde_json::from_slice(
                &fs::read(&rec).with_context(|| format!("cannot read {}", rec.display()))?,
            )
            .with_context(|| {
                format!(
                    "restore point record {} is corrupt: move the directory {} aside",
                    rec.display(),
                    path.display()
                )
            })?;
            out.push(p);
        }
        out.sort_by_key(|p| p.generation);
        Ok(out)
    }

    /// Point `n`'s manifests. `cache` shares identical manifests between points (by root).
    pub fn load(
        &self,
        n: u64,
        params: ChunkParams,
        cache: &mut BTreeMap<[u8; 32], Arc<Manifest>>,
    ) -> BTreeMap<String, Arc<Manifest>> {
        self.manifests(n)
            .load_all(params)
            .into_iter()
            .map(|(path, m)| {
                let m = cache
                    .entry(*m.root().as_bytes())
                    .or_insert_with(|| Arc::new(m))
                    .clone();
                (path, m)
            })
            .collect()
    }

    /// Removes point `n`.
    pub fn remove(&self, n: u64) -> io::Result<()> {
        let del = self.dir.join(format!("{n}.del"));
        fs::rename(self.path(n), &del)?;
        durable::fsync_dir(&self.dir)?;
        fs::remove_dir_all(del)
    }
}
