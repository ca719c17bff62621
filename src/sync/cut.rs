//! Cutting a generation: the new manifests as a plain function of the stale ones (the last
//! generation cut), the frozen changes (dirty ranges and namespace events) and a reader of
//! every image as it was at the sync point. Nothing here touches the disk; the engine saves
//! what [`Cut`] says changed.
//!
//! * Renames and removals apply first, in order, to the stale manifests.
//! * An image present at the sync point is re-chunked where it is dirty (in full when it is
//!   new); an image the caller excluded (`only`) keeps its stale manifest.
//! * An image that is in the last generation but cannot be read now (it became a directory,
//!   its open failed, a read failed) is *broken*: it keeps its stale manifest, so the replicas
//!   keep its last generation, and its changes stay unsynced.
//! * An image neither present nor broken was removed: it leaves the generation.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunk::{ChunkParams, ScanStats, Source, chunk_full, rechunk};
use crate::dirty::{RangeSet, rebase};
use crate::fs::NsEvent;
use crate::manifest::Manifest;

/// The images as they were at the sync point.
pub struct Images<'a> {
    /// Every image that could be opened, by its path under the backing directory.
    pub present: BTreeMap<String, &'a dyn Source>,
    /// Images that could not be opened, and why.
    pub failed: BTreeMap<String, String>,
    /// For an image of the last generation that is neither present nor failed: why it is not
    /// an image any more ("it is now a directory"), or `None` when it is gone.
    pub lookup: &'a dyn Fn(&str) -> Option<String>,
}

/// The changes frozen at the sync point.
pub struct Changes<'a> {
    pub dirty: &'a BTreeMap<PathBuf, RangeSet>,
    pub events: &'a [NsEvent],
    /// Only these images take their changes now (all when `None`).
    pub only: Option<&'a HashSet<PathBuf>>,
}

/// A new generation's manifests and what changed from the stale ones.
#[derive(Debug, Default)]
pub struct Cut {
    pub images: BTreeMap<String, Arc<Manifest>>,
    /// Names whose manifest differs from the stale one under the same name (new, changed or
    /// renamed): the ones to save.
    pub changed: Vec<String>,
    /// Names of the stale generation that are not in the new one: the manifests to delete.
    pub gone: Vec<String>,
    /// Images that cannot be read, and why (they keep their stale manifests).
    pub broken: BTreeMap<String, String>,
    /// What the re-chunks read, hashed and ran the gear hash over, all images together.
    pub scan: ScanStats,
}

pub fn cut(
    stale: &BTreeMap<String, Arc<Manifest>>,
    changes: &Changes,
    images: &Images,
    params: ChunkParams,
) -> Cut {
    let mut next = stale.clone();
    let mut scan = ScanStats::default();
    for ev in changes.events {
        apply_event(&mut next, ev);
    }
    let mut broken: BTreeMap<String, String> = images
        .failed
        .iter()
        .map(|(p, e)| (p.clone(), format!("cannot open it: {e}")))
        .collect();
    for k in next.keys() {
        if !images.present.contains_key(k)
            && !broken.contains_key(k)
            && let Some(why) = (images.lookup)(k)
        {
            broken.insert(k.clone(), why);
        }
    }
    next.retain(|k, _| images.present.contains_key(k) || broken.contains_key(k));

    for (path, src) in &images.present {
        let excluded = changes.only.is_some_and(|o| !o.contains(Path::new(path)));
        if excluded && next.contains_key(path) {
            continue;
        }
        let dirty: Vec<std::ops::Range<u64>> = changes
            .dirty
            .get(Path::new(path))
            .map(|r| r.to_vec())
            .unwrap_or_default();
        let new = match next.get(path) {
            Some(stale) if dirty.is_empty() && stale.size() == src.size() => continue,
            Some(stale) => rechunk(stale, *src, &dirty),
            None => chunk_full(*src, params),
        };
        match new {
            Ok((m, stats)) => {
                scan += stats;
                if next.get(path).is_none_or(|s| s.root() != m.root()) {
                    next.insert(path.clone(), Arc::new(m));
                }
            }
            Err(e) => {
                broken.insert(path.clone(), format!("cannot read it: {e}"));
            }
        }
    }
    let changed = next
        .iter()
        .filter(|(k, m)| stale.get(*k).is_none_or(|s| s.root() != m.root()))
        .map(|(k, _)| k.clone())
        .collect();
    let gone = stale
        .keys()
        .filter(|k| !next.contains_key(*k))
        .cloned()
        .collect();
    Cut {
        images: next,
        changed,
        gone,
        broken,
        scan,
    }
}

fn apply_event(images: &mut BTreeMap<String, Arc<Manifest>>, ev: &NsEvent) {
    match ev {
        NsEvent::Renamed { from, to } => {
            let (Some(from), Some(to)) = (from.to_str(), to.to_str()) else {
                return;
            };
            let moved: Vec<String> = images
                .keys()
                .filter(|k| Path::new(k).starts_with(from))
                .cloned()
                .collect();
            let mut taken = Vec::new();
            for old in moved {
                let new = rebase(Path::new(&old), Path::new(from), Path::new(to))
                    .expect("filtered by prefix");
                let m = images.remove(&old).expect("listed");
                taken.push((new.to_string_lossy().into_owned(), m));
            }
            images.extend(taken);
        }
        NsEvent::Removed { path } => {
            let Some(p) = path.to_str() else { return };
            images.retain(|k, _| !Path::new(k).starts_with(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;

    fn params() -> ChunkParams {
        ChunkParams {
            min_size: 512,
            avg_size: 2048,
            max_size: 8192,
            zero_min: 4096,
        }
    }

    fn manifest(bytes: &[u8]) -> Arc<Manifest> {
        Arc::new(chunk_full(&bytes.to_vec(), params()).unwrap().0)
    }

    struct Fixture {
        files: BTreeMap<String, Vec<u8>>,
        failed: BTreeMap<String, String>,
        others: BTreeMap<String, String>,
    }

    impl Fixture {
        fn cut(
            &self,
            stale: &BTreeMap<String, Arc<Manifest>>,
            dirty: &BTreeMap<PathBuf, RangeSet>,
            events: &[NsEvent],
            only: Option<&HashSet<PathBuf>>,
        ) -> Cut {
            let lookup = |p: &str| self.others.get(p).cloned();
            let images = Images {
                present: self
                    .files
                    .iter()
                    .map(|(k, v)| (k.clone(), v as &dyn Source))
                    .collect(),
                failed: self.failed.clone(),
                lookup: &lookup,
            };
            let changes = Changes {
                dirty,
                events,
                only,
            };
            cut(stale, &changes, &images, params())
        }
    }

    fn dirty(path: &str, r: std::ops::Range<u64>) -> BTreeMap<PathBuf, RangeSet> {
        let mut s = RangeSet::new();
        s.insert(r);
        BTreeMap::from([(PathBuf::from(path), s)])
    }

    #[test]
    fn a_dirty_image_is_rechunked_to_what_a_full_chunk_gives_and_others_are_kept() {
        let a = random(100_000, 1);
        let b = random(50_000, 2);
        let stale = BTreeMap::from([("a".to_string(), manifest(&a)), ("b".into(), manifest(&b))]);
        let mut a2 = a.clone();
        a2[40_000..40_100].copy_from_slice(&random(100, 3));
        let fx = Fixture {
            files: BTreeMap::from([("a".into(), a2.clone()), ("b".into(), b)]),
            failed: BTreeMap::new(),
            others: BTreeMap::new(),
        };
        let c = fx.cut(&stale, &dirty("a", 40_000..40_100), &[], None);
        assert_eq!(c.changed, vec!["a".to_string()]);
        assert!(c.gone.is_empty() && c.broken.is_empty());
        assert_eq!(c.images["a"].root(), manifest(&a2).root());
        assert!(Arc::ptr_eq(&c.images["b"], &stale["b"]));
    }

    #[test]
    fn renames_carry_manifests_and_are_saved_under_the_new_name() {
        let a = random(30_000, 1);
        let stale = BTreeMap::from([("dir/a".to_string(), manifest(&a))]);
        let fx = Fixture {
            files: BTreeMap::from([("new/a".into(), a.clone())]),
            failed: BTreeMap::new(),
            others: BTreeMap::new(),
        };
        let ev = [NsEvent::Renamed {
            from: "dir".into(),
            to: "new".into(),
        }];
        let c = fx.cut(&stale, &BTreeMap::new(), &ev, None);
        assert_eq!(c.changed, vec!["new/a".to_string()]);
        assert_eq!(c.gone, vec!["dir/a".to_string()]);
        assert!(
            Arc::ptr_eq(&c.images["new/a"], &stale["dir/a"]),
            "no re-chunk"
        );
    }

    #[test]
    fn unreadable_images_keep_their_manifest_and_removed_ones_leave() {
        let a = random(30_000, 1);
        let stale = BTreeMap::from([
            ("a".to_string(), manifest(&a)),
            ("b".to_string(), manifest(&a)),
            ("c".to_string(), manifest(&a)),
        ]);
        let fx = Fixture {
            files: BTreeMap::new(),
            failed: BTreeMap::from([("a".into(), "Permission denied".into())]),
            others: BTreeMap::from([("b".into(), "it is now a directory".into())]),
        };
        let c = fx.cut(&stale, &BTreeMap::new(), &[], None);
        assert_eq!(c.images.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(c.gone, vec!["c".to_string()]);
        assert!(c.broken["a"].contains("cannot open it: Permission denied"));
        assert_eq!(c.broken["b"], "it is now a directory");
        assert!(c.changed.is_empty());
    }

    #[test]
    fn images_left_out_keep_their_changes_for_later_but_new_ones_join() {
        let a = random(30_000, 1);
        let stale = BTreeMap::from([("a".to_string(), manifest(&a))]);
        let mut a2 = a.clone();
        a2[0] ^= 1;
        let fx = Fixture {
            files: BTreeMap::from([("a".into(), a2), ("n".into(), random(10_000, 4))]),
            failed: BTreeMap::new(),
            others: BTreeMap::new(),
        };
        let only = HashSet::from([PathBuf::from("other")]);
        let c = fx.cut(&stale, &dirty("a", 0..1), &[], Some(&only));
        assert!(Arc::ptr_eq(&c.images["a"], &stale["a"]));
        assert_eq!(c.changed, vec!["n".to_string()]);
    }
}
