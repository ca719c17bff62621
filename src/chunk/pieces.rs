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
use std::ops::Range;
use std::sync::{Arc, LazyLock};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};
use blake3::{Hash, Hasher};
use parking_lot::Mutex;

use super::gear::Fires;

/// The piece size: a power of two, a multiple of BLAKE3's 1 KiB chunk.
pub(super) const PIECE: usize = 8192;

/// Bytes of chaining values (and fires) the cache holds at most (about 12 GiB of image in 64 KiB
/// chunks).
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

/// What is remembered of a chunk's bytes: its pieces' values, and where FastCDC's rule can fire
/// in them when a scan cut them (`gear.rs`; a replica's patch check does not cut).
pub(crate) struct Known {
    pub(crate) values: Box<[ChainingValue]>,
    pub(crate) fires: Option<Fires>,
}

impl Known {
    /// The chunk's fires for chunks of average size `avg`, if they were found.
    pub(crate) fn fires_for(&self, avg: u32) -> Option<&Fires> {
        self.fires.as_ref().filter(|f| f.avg == avg)
    }

    fn bytes(&self) -> usize {
        self.values.len() * size_of::<ChainingValue>() + self.fires.as_ref().map_or(0, Fires::bytes)
    }
}

/// Two generations of entries: lookups promote from the older, and when the newer fills half the
/// budget the older is dropped (a clock of two hands: what was used since the last turn stays).
#[derive(Default)]
struct Cache {
    new: HashMap<Hash, Arc<Known>>,
    old: HashMap<Hash, Arc<Known>>,
    new_bytes: usize,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);

/// What is known of the chunk `id`, if it is cached.
pub(crate) fn get(id: &Hash) -> Option<Arc<Known>> {
    let mut c = CACHE.lock();
    if let Some(v) = c.new.get(id) {
        return Some(v.clone());
    }
    let v = c.old.remove(id)?;
    insert(&mut c, *id, v.clone());
    Some(v)
}

/// Remembers the pieces' values of the chunk `id`, and its fires if they were found.
pub(super) fn put(id: Hash, values: Vec<ChainingValue>, fires: Option<Fires>) {
    let known = Known {
        values: values.into(),
        fires,
    };
    insert(&mut CACHE.lock(), id, Arc::new(known));
}

/// Forgets the pieces' values of the chunk `id`, whose bytes a re-chunk or a patch replaced at
/// the place they were hashed for (and tests: a chunk whose pieces are not cached).
pub(crate) fn forget(id: &Hash) {
    let mut c = CACHE.lock();
    if let Some(v) = c.new.remove(id) {
        c.new_bytes -= v.bytes();
    }
    c.old.remove(id);
}

fn insert(c: &mut Cache, id: Hash, v: Arc<Known>) {
    let bytes = v.bytes();
    if c.new_bytes + bytes > CACHE_BYTES / 2 {
        c.old = std::mem::take(&mut c.new);
        c.new_bytes = 0;
    }
    c.new_bytes += bytes;
    if let Some(prev) = c.new.insert(id, v) {
        c.new_bytes -= prev.bytes();
    }
}

/// The id of the chunk `bytes` (its BLAKE3 hash), hashed by pieces when it has more than one,
/// whose values are then remembered: the first patch or in-place write to a chunk that a scan
/// or a received frame hashed this way reads and hashes only the pieces it touches.
pub fn hash(bytes: &[u8]) -> Hash {
    hash_with(bytes, None)
}

/// [`hash`], remembering the chunk's fires with its pieces' values (a scan's chunk).
pub(super) fn hash_with(bytes: &[u8], fires: Option<Fires>) -> Hash {
    hash_reusing(bytes, fires, &[]).0
}

/// [`hash_with`], taking piece `i`'s value from `known[i]` where it is given (see [`same`])
/// instead of hashing the piece. Returns the id and the bytes hashed.
pub(super) fn hash_reusing(
    bytes: &[u8],
    fires: Option<Fires>,
    known: &[Option<ChainingValue>],
) -> (Hash, usize) {
    if bytes.len() <= PIECE {
        return (blake3::hash(bytes), bytes.len());
    }
    let mut hashed = 0;
    let values: Vec<ChainingValue> = bytes
        .chunks(PIECE)
        .enumerate()
        .map(|(i, p)| match known.get(i) {
            Some(Some(v)) => *v,
            _ => {
                hashed += p.len();
                value(i, p)
            }
        })
        .collect();
    let id = root(&values, bytes.len());
    put(id, values, fires);
    (id, hashed)
}

/// The pieces a new chunk of `new_len` bytes shares with a cached chunk of `old_len` bytes that
/// started at the same place (pure): piece `i` has the old value where it covers the same bytes
/// of both chunks (the same offset and length) and `clean` says none of those bytes changed
/// (`clean` takes a range of offsets in the chunk). A piece's value depends only on its bytes
/// and its offset in the chunk, so it is the new chunk's value too: a write that moves a cut
/// re-hashes the pieces it changed and the bytes the cut moved over, not the chunk's clean
/// start.
pub(super) fn same(
    values: &[ChainingValue],
    old_len: usize,
    new_len: usize,
    clean: impl Fn(Range<usize>) -> bool,
) -> Vec<Option<ChainingValue>> {
    if old_len <= PIECE || new_len <= PIECE || values.len() != count(old_len) {
        return Vec::new();
    }
    (0..count(new_len))
        .map(|i| {
            let at = i * PIECE;
            let (end_new, end_old) = ((at + PIECE).min(new_len), (at + PIECE).min(old_len));
            (at < old_len && end_new == end_old && clean(at..end_new)).then(|| values[i])
        })
        .collect()
}

/// The id of a chunk of `len` bytes that is the bytes at a place (read through `read`: offset in
/// the chunk, buffer) with `ranges` (offset in the chunk, bytes; inside it) laid over: what a
/// replica checks a patch by. `base` is the chunk that started at that place before, and its
/// length: with its piece values cached, only the pieces the ranges touch, and those it did not
/// cover alike (a patch whose chunk's end moved, see [`same`]), are read and hashed; otherwise
/// the whole chunk. The result's values are cached, so the next patch of the same chunk is cheap
/// too. Returns the id and the bytes read.
pub fn overlay_id(
    base: Option<(&Hash, usize)>,
    len: usize,
    ranges: &[(usize, &[u8])],
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<(Hash, u64)> {
    let lay = |at: usize, buf: &mut [u8]| {
        for (r, bytes) in ranges {
            let (from, to) = ((*r).max(at), (r + bytes.len()).min(at + buf.len()));
            if from < to {
                buf[from - at..to - at].copy_from_slice(&bytes[from - r..to - r]);
            }
        }
    };
    if len <= PIECE {
        let mut buf = vec![0u8; len];
        read(0, &mut buf)?;
        lay(0, &mut buf);
        return Ok((blake3::hash(&buf), len as u64));
    }
    let clean = |p: Range<usize>| {
        ranges
            .iter()
            .all(|(r, bytes)| bytes.is_empty() || r + bytes.len() <= p.start || *r >= p.end)
    };
    let known = base
        .and_then(|(id, old_len)| Some(same(&get(id)?.values, old_len, len, clean)))
        .unwrap_or_default();
    let n = count(len);
    let mut values = vec![[0; 32]; n];
    let mut buf = vec![0u8; PIECE];
    let mut read_bytes = 0;
    for (i, v) in values.iter_mut().enumerate() {
        if let Some(Some(known)) = known.get(i) {
            *v = *known;
            continue;
        }
        let at = i * PIECE;
        let piece = &mut buf[..PIECE.min(len - at)];
        read(at as u64, piece)?;
        read_bytes += piece.len() as u64;
        lay(at, piece);
        *v = value(i, piece);
    }
    let id = root(&values, len);
    put(id, values, None);
    // The base's bytes are superseded at this place: keep the cache to the chunks that are
    // (its size then follows the images, not the number of sync points). The same bytes
    // elsewhere are hashed whole at their next change, once.
    if let Some((base, _)) = base.filter(|(b, _)| **b != id) {
        forget(base);
    }
    Ok((id, read_bytes))
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

    /// A new chunk starting where a cached one did takes the old values of the whole pieces
    /// both cover alike and that did not change; with them its id is BLAKE3's.
    #[test]
    fn a_new_chunk_shares_the_clean_pieces_it_covers_like_the_old_one() {
        let old = random(65_536 + 777, 31);
        let old_values: Vec<_> = old
            .chunks(PIECE)
            .enumerate()
            .map(|(i, p)| value(i, p))
            .collect();
        // A write at 20,000..24,096 moved the cut from 66,313 to 40,000.
        let mut new = old[..40_000].to_vec();
        new[20_000..24_096].copy_from_slice(&random(4096, 32));
        let clean = |r: Range<usize>| r.end <= 20_000 || r.start >= 24_096;
        let known = same(&old_values, old.len(), new.len(), clean);
        let shared: Vec<bool> = known.iter().map(Option::is_some).collect();
        // Piece 2 holds the write; piece 4 ends at 40,000 in the new chunk, 40,960 in the old.
        assert_eq!(shared, [true, true, false, true, false]);
        let (id, hashed) = hash_reusing(&new, None, &known);
        assert_eq!(id, blake3::hash(&new));
        assert_eq!(hashed, PIECE + (40_000 - 4 * PIECE));
        // The same length: the tail piece is shared too. Unlike lengths of the old tail: not.
        let whole = same(&old_values, old.len(), old.len(), |_| true);
        assert!(whole.iter().all(Option::is_some));
        assert_eq!(hash_reusing(&old, None, &whole), (blake3::hash(&old), 0));
        let longer = same(&old_values, old.len(), old.len() + 1, |_| true);
        assert_eq!(longer.iter().filter(|v| v.is_none()).count(), 1);
        assert!(same(&old_values, old.len(), PIECE, |_| true).is_empty());
    }

    /// A chunk's fires belong to the average size they were found for: the same bytes cut with
    /// other masks have other hits, and a mount's images may be chunked with other parameters.
    #[test]
    fn fires_are_found_only_for_the_average_they_were_made_with() {
        let bytes = random(65_536 + 5, 77);
        let fires = Fires {
            avg: 65_536,
            from: 16_384,
            hits: vec![20_000 << 2 | 1].into(),
        };
        let id = hash_with(&bytes, Some(fires.clone()));
        let known = get(&id).unwrap();
        assert_eq!(known.fires_for(65_536), Some(&fires));
        assert_eq!(known.fires_for(16_384), None);
    }

    /// A chunk hashed by `hash` (as a scan and a replica's check of a received chunk do) has
    /// BLAKE3's id, and its pieces are remembered: the first overlay of it already reads only
    /// the piece it touches.
    #[test]
    fn a_chunk_hashed_by_pieces_has_its_blake3_id_and_its_first_overlay_is_cheap() {
        let bytes = random(65_536 + 777, 21);
        let id = hash(&bytes);
        assert_eq!(id, blake3::hash(&bytes));
        assert_eq!(hash(&bytes[..PIECE]), blake3::hash(&bytes[..PIECE]));
        let mut read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let change: &[u8] = &[7; 100];
        let (new, n) = overlay_id(
            Some((&id, bytes.len())),
            bytes.len(),
            &[(3 * PIECE + 5, change)],
            &mut read,
        )
        .unwrap();
        let mut want = bytes.clone();
        want[3 * PIECE + 5..3 * PIECE + 105].copy_from_slice(change);
        assert_eq!(new, blake3::hash(&want));
        assert_eq!(n, PIECE as u64, "only the touched piece is read");
    }

    /// A patch of a chunk whose end moved (a write that moved its cut) reuses the cached values
    /// of the pieces it covers like the chunk that started at its place did, and reads the
    /// others: the touched ones, and those where the two chunks end differently.
    #[test]
    fn an_overlay_whose_end_moved_reads_the_pieces_it_does_not_share_with_its_base() {
        let image = random(3 * 65_536, 41);
        let mut read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&image[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let patch: &[u8] = &[9; 100];
        let laid = |len: usize| {
            let mut v = image[..len].to_vec();
            v[20_000..20_100].copy_from_slice(patch);
            v
        };
        // Shorter: pieces 0, 1, 3 shared; 2 holds the patch, 4 ends at 40,000, not 40,960.
        let old_len = 65_536 + 300;
        let old = hash(&image[..old_len]);
        let (id, n) =
            overlay_id(Some((&old, old_len)), 40_000, &[(20_000, patch)], &mut read).unwrap();
        assert_eq!(id, blake3::hash(&laid(40_000)));
        assert_eq!(n, (PIECE + 40_000 - 4 * PIECE) as u64);
        // Longer: only the pieces before the old end, and clean, are shared.
        let old = hash(&image[..40_000]);
        let new_len = 65_536 + 300;
        let (id, n) =
            overlay_id(Some((&old, 40_000)), new_len, &[(20_000, patch)], &mut read).unwrap();
        assert_eq!(id, blake3::hash(&laid(new_len)));
        assert_eq!(n, (new_len - 3 * PIECE) as u64);
    }

    /// A patch's id from the cached pieces of its base equals the hash of the patched bytes,
    /// reading only the touched pieces once the base's values are known; and without them
    /// (first touch, or a base the cache never saw) the whole chunk is read.
    #[test]
    fn an_overlay_is_hashed_by_its_touched_pieces_once_the_base_is_known() {
        let base = random(65_536 + 300, 9);
        let len = base.len();
        let mut read = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&base[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let patch1: Vec<(usize, Vec<u8>)> = vec![(100, vec![1; 50]), (8190, vec![2; 10])];
        let patch2: Vec<(usize, Vec<u8>)> = vec![(65_600, vec![3; 200])];
        let laid = |b: &[u8], p: &[(usize, Vec<u8>)]| {
            let mut v = b.to_vec();
            for (at, bytes) in p {
                v[*at..*at + bytes.len()].copy_from_slice(bytes);
            }
            v
        };
        fn as_ranges(p: &[(usize, Vec<u8>)]) -> Vec<(usize, &[u8])> {
            p.iter().map(|(a, b)| (*a, b.as_slice())).collect()
        }
        let base_id = blake3::hash(&base);
        // The base never seen: everything is read.
        let (id1, n) =
            overlay_id(Some((&base_id, len)), len, &as_ranges(&patch1), &mut read).unwrap();
        let one = laid(&base, &patch1);
        assert_eq!(id1, blake3::hash(&one));
        assert_eq!(n, len as u64);
        // Its result's values are cached: the next patch reads one piece (the last, short one).
        let mut read_one = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&one[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let (id2, n) =
            overlay_id(Some((&id1, len)), len, &as_ranges(&patch2), &mut read_one).unwrap();
        let two = laid(&one, &patch2);
        assert_eq!(id2, blake3::hash(&two));
        assert_eq!(n, (len - 8 * PIECE) as u64);
        // The superseded base is forgotten (the cache holds what is in place), the new one kept.
        assert!(get(&id1).is_none() && get(&id2).is_some());
        // Ranges across a piece boundary touch both pieces.
        let mut read_two = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&two[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let p3 = vec![(2 * PIECE - 3, vec![4; 6])];
        let (id3, n) = overlay_id(Some((&id2, len)), len, &as_ranges(&p3), &mut read_two).unwrap();
        assert_eq!(id3, blake3::hash(&laid(&two, &p3)));
        assert_eq!(n, 2 * PIECE as u64);
        // A patch over the forgotten base is still right, read whole.
        let (again, n) =
            overlay_id(Some((&id1, len)), len, &as_ranges(&p3), &mut read_one).unwrap();
        assert_eq!(again, blake3::hash(&laid(&one, &p3)));
        assert_eq!(n, len as u64);
        // A small chunk is hashed whole.
        let small = &base[..1000];
        let mut read_small = |at: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&small[at as usize..at as usize + buf.len()]);
            Ok(())
        };
        let p4 = vec![(999, vec![5])];
        let (id4, _) = overlay_id(None, 1000, &as_ranges(&p4), &mut read_small).unwrap();
        assert_eq!(id4, blake3::hash(&laid(small, &p4)));
    }
}
