//! `ferry verify --primary`: re-hashes the primary's own images against the active manifests,
//! so a manifest that no longer describes its image (a change that bypassed the mount and
//! escaped detection, bit rot in the backing file) is found. Chunks that overlap bytes written
//! since the last sync point are skipped: the next sync point re-chunks them anyway.
//!
//! `ferry verify` (the replicas): [`compare`] judges what a replica says it holds (its
//! generation, and each image's size and Merkle root) against this primary's manifests of the
//! generation it last saw that replica commit, with the replica's deep verify when one was
//! asked.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use super::ship::Checked;
use crate::manifest::Manifest;
use crate::wire::frame::ImageState;
use crate::wire::scrub::Report;

/// What re-hashing one image found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageCheck {
    pub path: String,
    pub ok: bool,
    /// Entries (data chunks and zero extents) compared, and their bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Bytes skipped because they were written since the last sync point.
    pub skipped_bytes: u64,
    /// Byte ranges whose content differs from the manifest, merged (`[start, end)`).
    pub mismatched: Vec<[u64; 2]>,
    /// The size the manifest records and the backing file's, when they differ.
    pub size: Option<[u64; 2]>,
    /// Why the image could not be checked.
    pub error: Option<String>,
}

impl ImageCheck {
    /// Drops the mismatches that `dirty` (ranges written since the read began) explains, and
    /// judges the image again.
    pub fn excuse(&mut self, dirty: &[Range<u64>]) {
        self.mismatched.retain(|r| !overlaps(dirty, &(r[0]..r[1])));
        self.settle();
    }

    fn settle(&mut self) {
        self.ok = self.error.is_none() && self.mismatched.is_empty() && self.size.is_none();
    }
}

fn overlaps(skip: &[Range<u64>], r: &Range<u64>) -> bool {
    skip.iter().any(|s| s.start < r.end && r.start < s.end)
}

/// Compares the backing file `file` with `manifest`, skipping entries that overlap `skip`.
pub fn check(path: &str, file: &Path, manifest: &Manifest, skip: &[Range<u64>]) -> ImageCheck {
    let mut out = ImageCheck {
        path: path.to_string(),
        ..ImageCheck::default()
    };
    let f = match File::open(file).and_then(|f| Ok((f.metadata()?.len(), f))) {
        Ok(f) => f,
        Err(e) => {
            out.error = Some(format!("cannot open {}: {e}", file.display()));
            return out;
        }
    };
    let (size, f) = f;
    let tail = size.min(manifest.size())..size.max(manifest.size());
    if size != manifest.size() && !overlaps(skip, &tail) {
        out.size = Some([manifest.size(), size]);
    }
    let results: Vec<io::Result<Option<Range<u64>>>> = manifest
        .entries()
        .par_iter()
        .filter(|e| !overlaps(skip, &(e.offset..e.end())))
        .map(|e| Ok((!e.is_held_by(&f, size)?).then_some(e.offset..e.end())))
        .collect();
    for e in manifest.entries() {
        if overlaps(skip, &(e.offset..e.end())) {
            out.skipped_bytes += e.len;
        } else {
            out.chunks += 1;
            out.bytes += e.len;
        }
    }
    for r in results {
        match r {
            Ok(Some(r)) => match out.mismatched.last_mut() {
                Some(last) if last[1] == r.start => last[1] = r.end,
                _ => out.mismatched.push([r.start, r.end]),
            },
            Ok(None) => {}
            Err(e) => {
                out.error = Some(format!("cannot read {}: {e}", file.display()));
                break;
            }
        }
    }
    out.settle();
    out
}

/// What `ferry verify` found on one replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaCheck {
    pub name: String,
    pub ok: bool,
    /// The generation the replica holds (none: it could not be asked).
    pub generation: Option<u64>,
    /// The generation this primary last saw it commit.
    pub expected_generation: u64,
    /// Images whose size or root differs from this primary's manifests of that generation,
    /// or that only one side has.
    pub differing: Vec<Differs>,
    pub error: Option<String>,
    /// The replica's deep verify, when asked.
    pub deep: Option<Report>,
}

/// One image a replica holds otherwise than this primary's manifest says.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Differs {
    pub path: String,
    /// The byte ranges whose chunks differ (`[start, end)`, merged; all of it when one side
    /// lacks the image).
    pub ranges: Vec<[u64; 2]>,
}

/// Judges what replica `name` holds (`held`, or why it could not be asked) against `known`,
/// the manifests of generation `expected` that it last committed.
pub fn compare(
    name: &str,
    expected: u64,
    known: &BTreeMap<String, Arc<Manifest>>,
    held: Result<Checked, String>,
) -> ReplicaCheck {
    let mut out = ReplicaCheck {
        name: name.to_string(),
        ok: false,
        generation: None,
        expected_generation: expected,
        differing: Vec::new(),
        error: None,
        deep: None,
    };
    let held = match held {
        Ok(h) => h,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    out.generation = Some(held.generation);
    if held.generation != expected {
        out.error = Some(format!(
            "it holds generation {}, but this primary last saw it commit {expected}: \
             run `ferry sync`, then verify again",
            held.generation
        ));
    }
    let theirs: BTreeMap<&str, &ImageState> =
        held.images.iter().map(|i| (i.path.as_str(), i)).collect();
    for (path, m) in known {
        let Some(i) = theirs.get(path.as_str()) else {
            out.differing.push(Differs {
                path: path.clone(),
                ranges: vec![[0, m.size()]],
            });
            continue;
        };
        if i.size == m.size() && i.root == *m.root().as_bytes() {
            continue;
        }
        let ranges = match held.manifests.get(path) {
            Some(t) => differing_ranges(m, t),
            None => vec![[0, m.size().max(i.size)]],
        };
        out.differing.push(Differs {
            path: path.clone(),
            ranges,
        });
    }
    for (path, i) in &theirs {
        if !known.contains_key(*path) {
            out.differing.push(Differs {
                path: path.to_string(),
                ranges: vec![[0, i.size]],
            });
        }
    }
    out.differing.sort_by(|a, b| a.path.cmp(&b.path));
    out.ok = out.error.is_none()
        && out.differing.is_empty()
        && held.scrub.as_ref().is_none_or(|d| d.left() == 0);
    out.deep = held.scrub;
    out
}

/// The byte ranges where `a` and `b` describe other bytes, merged: the entries of `a` that `b`
/// does not have with the same span and content, and the tail where their sizes differ.
fn differing_ranges(a: &Manifest, b: &Manifest) -> Vec<[u64; 2]> {
    let theirs: std::collections::HashSet<&crate::manifest::Entry> = b.entries().iter().collect();
    let mut out: Vec<[u64; 2]> = Vec::new();
    let mut spans: Vec<[u64; 2]> = a
        .entries()
        .iter()
        .filter(|e| !theirs.contains(e))
        .map(|e| [e.offset, e.end()])
        .chain((a.size() != b.size()).then(|| [a.size().min(b.size()), a.size().max(b.size())]))
        .collect();
    spans.sort_unstable();
    for r in spans {
        match out.last_mut() {
            Some(last) if last[1] >= r[0] => last[1] = last[1].max(r[1]),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{FileSource, chunk_full};
    use crate::testutil::{random, small_params};

    fn manifest_of(path: &Path) -> Manifest {
        chunk_full(&FileSource::open(path).unwrap(), small_params())
            .unwrap()
            .0
    }

    #[test]
    fn a_file_matching_its_manifest_is_ok_and_a_changed_byte_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let mut data = random(1 << 20, 1);
        data[300_000..400_000].fill(0);
        std::fs::write(&p, &data).unwrap();
        let m = manifest_of(&p);
        let c = check("img", &p, &m, &[]);
        assert!(c.ok, "{c:?}");
        assert_eq!(c.bytes, 1 << 20);

        data[700_001] ^= 1;
        data[350_000] = 1; // inside the zero extent
        std::fs::write(&p, &data).unwrap();
        let c = check("img", &p, &m, &[]);
        assert!(!c.ok);
        assert_eq!(c.mismatched.len(), 2, "{c:?}");
        assert!(c.mismatched[0][0] <= 350_000 && c.mismatched[0][1] > 350_000);
        assert!(c.mismatched[1][0] <= 700_001 && c.mismatched[1][1] > 700_001);

        // Bytes written since the last sync point are not judged.
        let c = check("img", &p, &m, &[350_000..350_001, 700_001..700_002]);
        assert!(c.ok, "{c:?}");
        assert!(c.skipped_bytes > 0);
    }

    #[test]
    fn a_size_change_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, random(100_000, 2)).unwrap();
        let m = manifest_of(&p);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(50_000)
            .unwrap();
        let c = check("img", &p, &m, &[]);
        assert!(!c.ok);
        assert_eq!(c.size, Some([100_000, 50_000]));
        let c = check("gone", &dir.path().join("gone"), &m, &[]);
        assert!(!c.ok && c.error.unwrap().contains("cannot open"));
    }
}
