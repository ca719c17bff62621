//! A chunk's id from the BLAKE3 chaining values of its 8 KiB pieces, and a bounded cache of
//! those values by chunk id, so a chunk rewritten in a few places is re-hashed by its changed
//! pieces only (a scattered 4 KiB write then costs one or two pieces, not the whole 64 KiB).
//!
//! BLAKE3 is a tree over 1 KiB input chunks: a subtree's chaining value depends only on its
//! bytes and its offset, and the tree splits every input longer than a piece at a power of two
//! of at least a piece, so a chunk of more than one piece is exactly the merge of its pieces'
//! values (`blake3::hazmat`). The cache is keyed by content (the chunk id), so a value found
//! there belongs to those bytes whatever image or offset holds them, and nothing in it can go
//! stale; a bound keeps its memory fixed.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};
use blake3::{Hash, Hasher};
use parking_lot::Mutex;

/// The piece size: a power of two, a multiple of BLAKE3's 1 KiB chunk.
pub(super) const PIECE: usize = 8192;

/// Bytes of chaining values the cache holds at most (about 12 GiB of image in 64 KiB chunks).
const CACHE_BYTES: usize = 64 << 20;

/// The number of pieces of a chunk of `len` bytes.
pub(super) fn count(len: usize) -> usize {
    len.div_ceil(PIECE)
}

/// The chaining value of piece `i`, whose bytes are `bytes` (a whole piece, or the chunk's tail).
pub(super) fn value(i: usize, bytes: &[u8]) -> ChainingValue {
    Hasher::new()
        .set_input_offset((i * PIECE) as u64)
        .update(bytes)
        .finalize_non_root()
}

/// The chunk id of a chunk of `len` bytes (more than one piece) from its pieces' values.
pub(super) fn root(values: &[ChainingValue], len: usize) -> Hash {
    debug_assert!(len > PIECE && values.len() == count(len));
    let left = left_subtree_len(len as u64) as usize;
    blake3::hazmat::merge_subtrees_root(
        &subtree(values, 0, left),
        &subtree(values, left, len - left),
        Mode::Hash,
    )
}

fn subtree(values: &[ChainingValue], offset: usize, len: usize) -> ChainingValue {
    if len <= PIECE {
        return values[offset / PIECE];
    }
    let left = left_subtree_len(len as u64) as usize;
    merge_subtrees_non_root(
        &subtree(values, offset, left),
        &subtree(values, offset + left, len - left),
        Mode::Hash,
    )
}

/// Two generations of entries: lookups promote from the older, and when the newer fills half the
/// budget the older is dropped (a clock of two hands: what was used since the last turn stays).
#[derive(Default)]
struct Cache {
    new: HashMap<Hash, Arc<[ChainingValue]>>,
    old: HashMap<Hash, Arc<[ChainingValue]>>,
    new_bytes: usize,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);

/// The pieces' values of the chunk `id`, if they are cached.
pub(super) fn get(id: &Hash) -> Option<Arc<[ChainingValue]>> {
    let mut c = CACHE.lock();
    if let Some(v) = c.new.get(id) {
        return Some(v.clone());
    }
    let v = c.old.remove(id)?;
    insert(&mut c, *id, v.clone());
    Some(v)
}

/// Remembers the pieces' values of the chunk `id`.
pub(super) fn put(id: Hash, values: Vec<ChainingValue>) {
    insert(&mut CACHE.lock(), id, values.into());
}

fn insert(c: &mut Cache, id: Hash, v: Arc<[ChainingValue]>) {
    let bytes = v.len() * size_of::<ChainingValue>();
    if c.new_bytes + bytes > CACHE_BYTES / 2 {
        c.old = std::mem::take(&mut c.new);
        c.new_bytes = 0;
    }
    c.new_bytes += bytes;
    if let Some(prev) = c.new.insert(id, v) {
        c.new_bytes -= prev.len() * size_of::<ChainingValue>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;

    #[test]
    fn the_pieces_merge_to_the_chunks_blake3_hash() {
        let data = random(300_000, 3);
        for len in [
            PIECE + 1,
            2 * PIECE,
            2 * PIECE + 1,
            3 * PIECE - 5,
            65_536,
            70_001,
            262_144,
        ] {
            let bytes = &data[..len];
            let values: Vec<_> = bytes
                .chunks(PIECE)
                .enumerate()
                .map(|(i, p)| value(i, p))
                .collect();
            assert_eq!(root(&values, len), blake3::hash(bytes), "{len} bytes");
        }
    }
}
