//! The Merkle tree over a manifest.
//!
//! Its shape is fixed by offsets, not by entry positions: leaf `i` covers the entries that start
//! in the byte window `[i * LEAF_SPAN, (i + 1) * LEAF_SPAN)`, and each inner node covers
//! `FANOUT` nodes of the level below. A write changes the entries around it but not the offsets
//! of any other entry, so two manifests of the same image differ only in the leaves (and their
//! ancestors) over the changed bytes, and two parties comparing trees can find the differing
//! entries by descending only into differing nodes.
//!
//! Hashes (BLAKE3 in derive-key mode, one context per node kind, so no leaf can pass for a
//! node):
//! * leaf = H_leaf(for each entry: offset u64le, len u64le, kind u8 (0 data, 1 zero), id 32 bytes
//!   (zeros for a zero extent));
//! * node = H_node(child hashes in order);
//! * root = H_root(size u64le, top node).

use blake3::{Hash, Hasher};

use super::{Entry, Kind};

/// Bytes of image offset covered by one leaf.
pub const LEAF_SPAN: u64 = 1 << 20;
/// Children per inner node.
pub const FANOUT: usize = 16;

const LEAF_CONTEXT: &str = "ferry 2026 manifest leaf v1";
const NODE_CONTEXT: &str = "ferry 2026 manifest node v1";
const ROOT_CONTEXT: &str = "ferry 2026 manifest root v1";

/// The tree's node hashes, level by level: `levels[0]` are the leaves, the last level has one
/// node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    size: u64,
    levels: Vec<Vec<Hash>>,
    root: Hash,
}

/// Number of leaves for an image of `size` bytes (at least one).
pub fn leaf_count(size: u64) -> usize {
    size.div_ceil(LEAF_SPAN).max(1) as usize
}

/// Encodes one entry as the leaf hash consumes it.
pub fn encode_entry(e: &Entry, out: &mut [u8; 49]) {
    out[..8].copy_from_slice(&e.offset.to_le_bytes());
    out[8..16].copy_from_slice(&e.len.to_le_bytes());
    match e.kind {
        Kind::Data(h) => {
            out[16] = 0;
            out[17..].copy_from_slice(h.as_bytes());
        }
        Kind::Zero => {
            out[16] = 1;
            out[17..].fill(0);
        }
    }
}

/// The hash of a leaf holding `entries`.
pub fn leaf_hash(entries: &[Entry]) -> Hash {
    let mut h = Hasher::new_derive_key(LEAF_CONTEXT);
    let mut rec = [0u8; 49];
    for e in entries {
        encode_entry(e, &mut rec);
        h.update(&rec);
    }
    h.finalize()
}

/// The hash of an inner node with the given children.
pub fn node_hash(children: &[Hash]) -> Hash {
    let mut h = Hasher::new_derive_key(NODE_CONTEXT);
    for c in children {
        h.update(c.as_bytes());
    }
    h.finalize()
}

fn root_hash(size: u64, top: &Hash) -> Hash {
    let mut h = Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(&size.to_le_bytes());
    h.update(top.as_bytes());
    h.finalize()
}

impl Tree {
    /// Builds the tree of a manifest of `size` bytes with these entries (which tile the image).
    pub fn build(size: u64, entries: &[Entry]) -> Tree {
        let n = leaf_count(size);
        let mut leaves = Vec::with_capacity(n);
        let mut i = 0;
        for leaf in 0..n as u64 {
            let end = (leaf + 1) * LEAF_SPAN;
            let j = i + entries[i..].partition_point(|e| e.offset < end);
            leaves.push(leaf_hash(&entries[i..j]));
            i = j;
        }
        Tree::from_leaves(size, leaves)
    }

    /// What [`Tree::build`] gives, hashing only the leaves whose entries differ from those of
    /// `base`, the tree of `base_entries` (the same image before a change): a change of a few
    /// entries costs a comparison of the others, not a hash of each.
    pub fn build_over(size: u64, entries: &[Entry], base: &Tree, base_entries: &[Entry]) -> Tree {
        if base.size != size {
            return Tree::build(size, entries);
        }
        let n = leaf_count(size);
        let mut leaves = Vec::with_capacity(n);
        let (mut i, mut k) = (0, 0);
        for leaf in 0..n {
            let end = (leaf as u64 + 1) * LEAF_SPAN;
            let j = i + entries[i..].partition_point(|e| e.offset < end);
            let l = k + base_entries[k..].partition_point(|e| e.offset < end);
            leaves.push(if entries[i..j] == base_entries[k..l] {
                base.levels[0][leaf]
            } else {
                leaf_hash(&entries[i..j])
            });
            (i, k) = (j, l);
        }
        Tree::from_leaves(size, leaves)
    }

    fn from_leaves(size: u64, leaves: Vec<Hash>) -> Tree {
        let mut levels = vec![leaves];
        while levels.last().unwrap().len() > 1 {
            let up = levels
                .last()
                .unwrap()
                .chunks(FANOUT)
                .map(node_hash)
                .collect();
            levels.push(up);
        }
        let root = root_hash(size, &levels.last().unwrap()[0]);
        Tree { size, levels, root }
    }

    pub fn root(&self) -> Hash {
        self.root
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of levels; level 0 holds the leaves, level `depth() - 1` the single top node.
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Node hashes of one level.
    pub fn level(&self, level: usize) -> &[Hash] {
        &self.levels[level]
    }

    /// Indices (in the level below) of the children of node `index` at `level` (> 0).
    pub fn children(&self, level: usize, index: usize) -> std::ops::Range<usize> {
        let below = self.levels[level - 1].len();
        (index * FANOUT).min(below)..((index + 1) * FANOUT).min(below)
    }

    /// Leaves whose hashes differ between two trees of the same size, found by descending only
    /// into differing nodes (what two parties do over the wire, one level per round trip).
    pub fn differing_leaves(&self, other: &Tree) -> Vec<usize> {
        assert_eq!(self.size, other.size, "trees of different sizes");
        let mut frontier = vec![0usize];
        for level in (1..self.depth()).rev() {
            let mut next = Vec::new();
            for node in frontier {
                if self.levels[level][node] != other.levels[level][node] {
                    next.extend(self.children(level, node));
                }
            }
            frontier = next;
        }
        frontier.retain(|&i| self.levels[0][i] != other.levels[0][i]);
        frontier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u64, seed: u8) -> Entry {
        Entry {
            offset,
            len,
            kind: Kind::Data(blake3::hash(&[seed])),
        }
    }

    fn tiled(size: u64, chunk: u64, seed: u8) -> Vec<Entry> {
        (0..size / chunk)
            .map(|i| data(i * chunk, chunk, seed.wrapping_add(i as u8)))
            .collect()
    }

    #[test]
    fn one_changed_entry_is_found_by_descending() {
        let size = 300 * LEAF_SPAN;
        let a = tiled(size, 65536, 0);
        let mut b = a.clone();
        let k = 2000; // in leaf 2000 * 64 KiB / 1 MiB = 125
        b[k] = data(b[k].offset, b[k].len, 99);
        let (ta, tb) = (Tree::build(size, &a), Tree::build(size, &b));
        assert_ne!(ta.root(), tb.root());
        assert_eq!(ta.differing_leaves(&tb), vec![125]);
        assert!(ta.differing_leaves(&ta).is_empty());
    }

    #[test]
    fn splitting_a_chunk_changes_only_its_leaf() {
        let size = 40 * LEAF_SPAN;
        let a = tiled(size, 65536, 0);
        let mut b = a.clone();
        let k = 100;
        let (off, len) = (b[k].offset, b[k].len);
        b.splice(
            k..k + 1,
            [data(off, 1000, 5), data(off + 1000, len - 1000, 6)],
        );
        let (ta, tb) = (Tree::build(size, &a), Tree::build(size, &b));
        assert_eq!(ta.differing_leaves(&tb), vec![(off / LEAF_SPAN) as usize]);
    }

    #[test]
    fn a_tree_built_over_a_base_is_the_tree_built_from_scratch() {
        let size = 20 * LEAF_SPAN + 4096;
        let a = tiled(size - 4096, 65536, 0)
            .into_iter()
            .chain([data(size - 4096, 4096, 1)])
            .collect::<Vec<_>>();
        let ta = Tree::build(size, &a);
        let mut b = a.clone();
        for (round, k) in [3usize, 17, 18, 150, 319, 320].into_iter().enumerate() {
            b[k] = data(b[k].offset, b[k].len, 100 + round as u8);
            assert_eq!(Tree::build_over(size, &b, &ta, &a), Tree::build(size, &b));
        }
        // Entries split, a different size: still the same as from scratch.
        let (off, len) = (b[40].offset, b[40].len);
        b.splice(40..41, [data(off, 100, 7), data(off + 100, len - 100, 8)]);
        assert_eq!(Tree::build_over(size, &b, &ta, &a), Tree::build(size, &b));
        b.pop();
        assert_eq!(
            Tree::build_over(size - 4096, &b, &ta, &a),
            Tree::build(size - 4096, &b)
        );
        assert_eq!(Tree::build_over(size, &a, &ta, &a), ta);
    }

    #[test]
    fn size_and_zero_extents_are_part_of_the_root() {
        let z = |len| Entry {
            offset: 0,
            len,
            kind: Kind::Zero,
        };
        let t1 = Tree::build(4096, &[z(4096)]);
        let t2 = Tree::build(8192, &[z(8192)]);
        assert_ne!(t1.root(), t2.root());
        let t3 = Tree::build(4096, &[data(0, 4096, 0)]);
        assert_ne!(t1.root(), t3.root());
        assert_eq!(Tree::build(0, &[]).depth(), 1);
    }
}
