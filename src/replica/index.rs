//! The replica's chunk index: where each data chunk of the committed images can be read, so a
//! generation's chunks that the store already holds (elsewhere, or in another image) are
//! copied rather than asked for.
//!
//! A commit changes a few entries of large manifests, so the index follows the changed entries
//! instead of being built again from every entry (at 128 Ki entries, the rebuild was 6% of
//! the replica's CPU per sync). Each chunk counts its places; when a chunk loses the place
//! the index names but is still held elsewhere, and the commit names no new place for it, the
//! index is built again: exact, and rare (a duplicate chunk overwritten where it was found).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::manifest::{Entry, Kind, Manifest, changed_entries};
use crate::wire::frame::Hash;

/// Where a chunk can be read: (image, offset, length).
pub type Place = (Arc<str>, u64, u64);

#[derive(Default)]
pub struct ChunkIndex {
    chunks: HashMap<Hash, (Place, u32)>,
}

/// What a commit changes in the committed manifests: per image, the manifest before (`None`:
/// the image is new) and after (`None`: the image is removed).
pub type Changes<'a> = Vec<(&'a str, Option<&'a Manifest>, Option<&'a Manifest>)>;

impl ChunkIndex {
    /// The index of `manifests`, built from every entry.
    pub fn build(manifests: &BTreeMap<String, Manifest>) -> ChunkIndex {
        let mut chunks: HashMap<Hash, (Place, u32)> = HashMap::new();
        for (path, m) in manifests {
            let name: Arc<str> = Arc::from(path.as_str());
            for e in m.entries() {
                if let Kind::Data(h) = e.kind {
                    chunks
                        .entry(*h.as_bytes())
                        .and_modify(|(_, n)| *n += 1)
                        .or_insert_with(|| ((name.clone(), e.offset, e.len), 1));
                }
            }
        }
        ChunkIndex { chunks }
    }

    /// Follows a commit's `changes`; `manifests` are the committed manifests after it (built
    /// from when a place cannot be followed).
    pub fn update(&mut self, changes: &Changes, manifests: &BTreeMap<String, Manifest>) {
        // Chunks that lost the place the index named but are still held somewhere.
        let mut homeless: HashSet<Hash> = HashSet::new();
        for (path, before, after) in changes {
            let Some(before) = before else { continue };
            for e in not_in(*after, before) {
                let Kind::Data(h) = e.kind else { continue };
                let h = *h.as_bytes();
                let Some((place, n)) = self.chunks.get_mut(&h) else {
                    continue;
                };
                *n -= 1;
                if *n == 0 {
                    self.chunks.remove(&h);
                    homeless.remove(&h);
                } else if (&*place.0, place.1) == (*path, e.offset) {
                    homeless.insert(h);
                }
            }
        }
        for (path, before, after) in changes {
            let Some(after) = after else { continue };
            let name: Arc<str> = Arc::from(*path);
            for e in not_in(*before, after) {
                let Kind::Data(h) = e.kind else { continue };
                let h = *h.as_bytes();
                let place = (name.clone(), e.offset, e.len);
                match self.chunks.get_mut(&h) {
                    Some((p, n)) => {
                        *n += 1;
                        if homeless.remove(&h) {
                            *p = place;
                        }
                    }
                    None => {
                        self.chunks.insert(h, (place, 1));
                    }
                }
            }
        }
        if !homeless.is_empty() {
            *self = ChunkIndex::build(manifests);
        }
    }

    pub fn get(&self, hash: &Hash) -> Option<&Place> {
        self.chunks.get(hash).map(|(p, _)| p)
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.chunks.contains_key(hash)
    }

    /// Distinct chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }
}

/// The entries of `m` not identical in `other` (all of them when there is no `other`).
fn not_in<'a>(
    other: Option<&'a Manifest>,
    m: &'a Manifest,
) -> Box<dyn Iterator<Item = &'a Entry> + 'a> {
    match other {
        Some(o) => Box::new(changed_entries(o, m)),
        None => Box::new(m.entries().iter()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ChunkParams;

    const LEN: u64 = 4096;

    /// An image of `n` equal-sized entries; `k` 0 is zero bytes, others a chunk named by `k`
    /// (few names, so chunks repeat across places and images).
    fn image(kinds: &[u8]) -> Manifest {
        let entries = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| Entry {
                offset: i as u64 * LEN,
                len: LEN,
                kind: match k {
                    0 => Kind::Zero,
                    k => Kind::Data(blake3::hash(&[k])),
                },
            })
            .collect();
        Manifest::new(ChunkParams::default(), kinds.len() as u64 * LEN, entries).unwrap()
    }

    /// Every chunk of `manifests` and nothing else, with its count, each at a place that holds it.
    fn assert_exact(index: &ChunkIndex, manifests: &BTreeMap<String, Manifest>, step: usize) {
        let built = ChunkIndex::build(manifests);
        assert_eq!(index.len(), built.len(), "step {step}: chunk count");
        for (h, (_, n)) in &built.chunks {
            let (place, m) = index
                .chunks
                .get(h)
                .unwrap_or_else(|| panic!("step {step}: lost"));
            assert_eq!(m, n, "step {step}: places counted");
            let held = manifests[&*place.0]
                .index_starting_at(place.1)
                .map(|i| manifests[&*place.0].entries()[i]);
            assert!(
                held.is_some_and(
                    |e| e.hash().map(|x| *x.as_bytes()) == Some(*h) && e.len == place.2
                ),
                "step {step}: the place named does not hold the chunk"
            );
        }
    }

    #[test]
    fn following_commits_gives_what_a_full_build_gives() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let names = ["a", "b", "c"];
        let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
        let mut index = ChunkIndex::build(&manifests);
        let mut changed = 0;
        for step in 0..2_000 {
            // A commit: some images rewritten in a few places, one sometimes removed.
            let mut after = manifests.clone();
            for name in names {
                match next(6) {
                    0 => {
                        after.remove(name);
                    }
                    1 | 2 => {
                        let mut kinds: Vec<u8> = match manifests.get(name) {
                            Some(m) => m
                                .entries()
                                .iter()
                                .map(|e| match e.kind {
                                    Kind::Zero => 0,
                                    Kind::Data(h) => (1..8u8)
                                        .find(|k| blake3::hash(&[*k]) == h)
                                        .expect("one of ours"),
                                })
                                .collect(),
                            None => vec![0; 1 + next(8) as usize],
                        };
                        for _ in 0..1 + next(3) {
                            let i = next(kinds.len() as u64) as usize;
                            kinds[i] = next(8) as u8;
                        }
                        after.insert(name.to_string(), image(&kinds));
                    }
                    _ => {}
                }
            }
            let paths: std::collections::BTreeSet<&String> =
                manifests.keys().chain(after.keys()).collect();
            let changes: Changes = paths
                .into_iter()
                .map(|p| (p.as_str(), manifests.get(p), after.get(p)))
                .collect();
            let had = index.chunks.len();
            index.update(&changes, &after);
            changed += usize::from(index.chunks.len() != had);
            assert_exact(&index, &after, step);
            manifests = after;
        }
        assert!(changed > 100, "the commits changed the index");
    }
}
