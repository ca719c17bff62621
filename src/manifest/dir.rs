//! A directory of manifests, one file per image (`<dir>/<image>.manifest`), and the small
//! record that names the generation they make up. The primary keeps one for its active
//! generation and one per replica (what that replica acknowledged); the replica one for its
//! committed generation and one for the generation it stages.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ChunkParams;
use super::{Manifest, ManifestFileError, load, save};
use crate::durable;

pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    pub fn new(path: impl Into<PathBuf>) -> ManifestDir {
        ManifestDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file of `image`'s manifest.
    pub fn file(&self, image: &str) -> PathBuf {
        self.path.join(format!("{image}.manifest"))
    }

    pub fn load(&self, image: &str) -> Result<Manifest, ManifestFileError> {
        load(&self.file(image))
    }

    /// Saves `image`'s manifest (atomically, creating its parent directories).
    pub fn save(&self, image: &str, m: &Manifest) -> Result<(), ManifestFileError> {
        let p = self.file(image);
        fs::create_dir_all(p.parent().expect("has a parent")).map_err(|source| {
            ManifestFileError::Io {
                action: "create the directory of",
                path: p.clone(),
                source,
            }
        })?;
        save(&p, m)
    }

    /// Makes `image`'s manifest the one `other` holds for it, by linking that file (atomically;
    /// its parent directories created): what a saved manifest costs without encoding or
    /// writing it again.
    pub fn adopt(&self, other: &ManifestDir, image: &str) -> Result<(), ManifestFileError> {
        let p = self.file(image);
        let io = |action, source| ManifestFileError::Io {
            action,
            path: p.clone(),
            source,
        };
        fs::create_dir_all(p.parent().expect("has a parent"))
            .map_err(|e| io("create the directory of", e))?;
        durable::link_atomic(&other.file(image), &p).map_err(|e| io("link", e))
    }

    /// Removes `image`'s manifest, if there is one.
    pub fn remove(&self, image: &str) {
        let _ = fs::remove_file(self.file(image));
    }

    /// Every manifest under the directory with chunk parameters `params`, by image path. A
    /// manifest that cannot be read or has other parameters is skipped with a warning (its
    /// image is chunked in full when next needed).
    pub fn load_all(&self, params: ChunkParams) -> BTreeMap<String, Manifest> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.path.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for ent in rd.flatten() {
                let p = ent.path();
                if ent.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                    continue;
                }
                let Some(rel) = p
                    .strip_prefix(&self.path)
                    .ok()
                    .and_then(|r| r.to_str())
                    .and_then(|r| r.strip_suffix(".manifest"))
                else {
                    continue;
                };
                match load(&p) {
                    Ok(m) if m.params() == params => {
                        out.insert(rel.to_string(), m);
                    }
                    Ok(_) => log::warn!("{}: other chunk parameters; ignored", p.display()),
                    Err(e) => log::warn!("{e}; ignored (the image will be chunked in full)"),
                }
            }
        }
        out
    }
}

/// The generation a directory of manifests makes up: its number and group root (hex), and
/// when its sync point was cut (milliseconds since the Unix epoch; absent in records written
/// before it was kept, and where nobody needs it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRecord {
    pub generation: u64,
    pub group_root: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_ms: Option<u64>,
}

impl GenRecord {
    /// Reads a record; a missing file is generation 0.
    pub fn read(path: &Path) -> io::Result<GenRecord> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is corrupt: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(GenRecord::default()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", path.display()),
            )),
        }
    }

    /// Replaces the record durably.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        durable::write_atomic(path, &serde_json::to_vec(self).expect("serialisable"))
    }

    /// The group root; zeros when the record has none (generation 0).
    pub fn root(&self) -> Result<[u8; 32], String> {
        if self.group_root.is_empty() {
            return Ok([0; 32]);
        }
        from_hex(&self.group_root)
    }
}

/// A hash in hex, as records and status show it.
pub fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// The first 16 hex digits of a hash, for messages.
pub fn short_hex(h: &[u8; 32]) -> String {
    hex(h)[..16].to_string()
}

pub fn from_hex(s: &str) -> Result<[u8; 32], String> {
    blake3::Hash::from_hex(s)
        .map(|h| *h.as_bytes())
        .map_err(|e| format!("{s:?} is not a hash: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_full;
    use crate::testutil::random;

    #[test]
    fn manifests_round_trip_by_image_path_and_others_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let dir = ManifestDir::new(d.path());
        let p = ChunkParams::default();
        let m = chunk_full(&random(300_000, 1), p).unwrap().0;
        dir.save("vms/a.img", &m).unwrap();
        dir.save("b.img", &m).unwrap();
        fs::write(d.path().join("junk.manifest"), b"nope").unwrap();
        let all = dir.load_all(p);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["b.img", "vms/a.img"]);
        assert_eq!(all["vms/a.img"], m);
        dir.remove("b.img");
        assert_eq!(dir.load_all(p).len(), 1);
    }

    #[test]
    fn a_generation_record_round_trips_and_a_missing_one_is_zero() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("generation.json");
        assert_eq!(GenRecord::read(&p).unwrap(), GenRecord::default());
        let r = GenRecord {
            generation: 7,
            group_root: hex(&[9; 32]),
            point_ms: Some(1_800_000_000_000),
        };
        r.write(&p).unwrap();
        assert_eq!(GenRecord::read(&p).unwrap(), r);
        // A record written before the sync point's time was kept reads as not knowing it.
        fs::write(&p, br#"{"generation":3,"group_root":"00"}"#).unwrap();
        assert_eq!(GenRecord::read(&p).unwrap().point_ms, None);
        assert_eq!(r.root().unwrap(), [9; 32]);
        fs::write(&p, b"{").unwrap();
        assert!(GenRecord::read(&p).is_err());
    }
}
