//! What changed between the stale manifest (what a replica holds) and the active one.

use std::collections::HashMap;

use blake3::Hash;

use super::{Entry, Kind, Manifest};

/// How one entry of the active manifest can be produced on a replica that holds the stale one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Content the stale generation holds nowhere: ship the chunk.
    New(Hash),
    /// The stale generation has a data chunk with the same span and other content: a patch
    /// candidate (ship the dirty bytes, the replica checks `base` before and `result` after).
    Patch { base: Hash, result: Hash },
    /// Content the stale generation holds at `from`: the replica copies it locally.
    Copy { hash: Hash, from: u64 },
    /// Zero bytes: the replica punches a hole.
    Zero,
}

/// One entry of the active manifest that is not identical, at the same offset, in the stale one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub offset: u64,
    pub len: u64,
    pub kind: ChangeKind,
}

/// The difference between two manifests of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diff {
    pub old_size: u64,
    pub new_size: u64,
    /// In offset order; every byte of the active image outside these changes is unchanged.
    pub changes: Vec<Change>,
}

impl Diff {
    /// Bytes of new content to ship if every new chunk and patch candidate went whole.
    pub fn new_bytes(&self) -> u64 {
        self.changes
            .iter()
            .filter(|c| matches!(c.kind, ChangeKind::New(_) | ChangeKind::Patch { .. }))
            .map(|c| c.len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.old_size == self.new_size
    }
}

/// Compares `stale` and `active` entry by entry: one pass over both for the entries that
/// differ, then one over the stale entries for where those chunks already are (only the
/// changed chunks are looked up, so the cost is not a map of every stale chunk).
pub fn diff(stale: &Manifest, active: &Manifest) -> Diff {
    let old = stale.entries();
    let mut changed: Vec<(&Entry, Option<&Entry>)> = Vec::new();
    let mut i = 0;
    for e in active.entries() {
        while i < old.len() && old[i].offset < e.offset {
            i += 1;
        }
        let same_span = old
            .get(i)
            .filter(|o| o.offset == e.offset && o.len == e.len);
        if same_span.is_some_and(|o| o.kind == e.kind) {
            continue;
        }
        changed.push((e, same_span));
    }
    let mut by_hash: HashMap<Hash, Option<u64>> = changed
        .iter()
        .filter_map(|(e, _)| e.hash().map(|h| (h, None)))
        .collect();
    if !by_hash.is_empty() {
        for o in old {
            if let Kind::Data(h) = &o.kind
                && let Some(at @ None) = by_hash.get_mut(h)
            {
                *at = Some(o.offset);
            }
        }
    }
    let changes = changed
        .into_iter()
        .map(|(e, same_span)| Change {
            offset: e.offset,
            len: e.len,
            kind: classify(e, same_span, &by_hash),
        })
        .collect();
    Diff {
        old_size: stale.size(),
        new_size: active.size(),
        changes,
    }
}

/// The entries of `new` that are not identical (same offset, length and content) in `old`:
/// what applying `new` over an image holding `old` writes.
pub fn changed_entries<'a>(
    old: &'a Manifest,
    new: &'a Manifest,
) -> impl Iterator<Item = &'a Entry> {
    let o = old.entries();
    let mut i = 0;
    new.entries().iter().filter(move |e| {
        while i < o.len() && o[i].offset < e.offset {
            i += 1;
        }
        o.get(i) != Some(*e)
    })
}

fn classify(
    e: &Entry,
    same_span: Option<&Entry>,
    by_hash: &HashMap<Hash, Option<u64>>,
) -> ChangeKind {
    let Kind::Data(result) = e.kind else {
        return ChangeKind::Zero;
    };
    if let Some(&Some(from)) = by_hash.get(&result) {
        return ChangeKind::Copy { hash: result, from };
    }
    match same_span.map(|o| o.kind) {
        Some(Kind::Data(base)) => ChangeKind::Patch { base, result },
        _ => ChangeKind::New(result),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ChunkParams;

    fn d(offset: u64, len: u64, seed: u8) -> Entry {
        Entry {
            offset,
            len,
            kind: Kind::Data(blake3::hash(&[seed])),
        }
    }

    fn z(offset: u64, len: u64) -> Entry {
        Entry {
            offset,
            len,
            kind: Kind::Zero,
        }
    }

    fn m(size: u64, e: Vec<Entry>) -> Manifest {
        Manifest::new(ChunkParams::default(), size, e).unwrap()
    }

    #[test]
    fn classifies_every_kind_of_change() {
        let stale = m(
            400_000,
            vec![
                d(0, 100_000, 1),
                d(100_000, 100_000, 2),
                z(200_000, 100_000),
                d(300_000, 100_000, 3),
            ],
        );
        let active = m(
            500_000,
            vec![
                d(0, 100_000, 1),       // unchanged
                d(100_000, 100_000, 9), // same span, new content: patch
                d(200_000, 50_000, 3),  // content that stale has at 300_000: copy
                z(250_000, 50_000),     // zero extent with another span
                d(300_000, 100_000, 3), // unchanged
                d(400_000, 100_000, 7), // grown: new
            ],
        );
        let df = diff(&stale, &active);
        assert_eq!(df.old_size, 400_000);
        assert_eq!(df.new_size, 500_000);
        let kinds: Vec<_> = df.changes.iter().map(|c| (c.offset, c.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (
                    100_000,
                    ChangeKind::Patch {
                        base: blake3::hash(&[2]),
                        result: blake3::hash(&[9])
                    }
                ),
                (
                    200_000,
                    ChangeKind::Copy {
                        hash: blake3::hash(&[3]),
                        from: 300_000
                    }
                ),
                (250_000, ChangeKind::Zero),
                (400_000, ChangeKind::New(blake3::hash(&[7]))),
            ]
        );
        assert_eq!(df.new_bytes(), 200_000);
        assert!(diff(&active, &active).is_empty());
    }

    #[test]
    fn a_copy_comes_from_the_first_place_that_holds_the_chunk() {
        let stale = m(300, vec![d(0, 100, 5), d(100, 100, 6), d(200, 100, 5)]);
        let active = m(300, vec![d(0, 100, 5), d(100, 100, 5), d(200, 100, 7)]);
        let kinds: Vec<_> = diff(&stale, &active)
            .changes
            .iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                ChangeKind::Copy {
                    hash: blake3::hash(&[5]),
                    from: 0
                },
                ChangeKind::Patch {
                    base: blake3::hash(&[5]),
                    result: blake3::hash(&[7])
                },
            ]
        );
    }
}
