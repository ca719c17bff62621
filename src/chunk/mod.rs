//! The chunk engine: FastCDC (the `fastcdc` crate's 2020 algorithm) cut points, BLAKE3 chunk
//! ids, zero extents, and the incremental re-chunk that builds an active manifest out of a
//! stale one by reading only around the dirty runs.
//!
//! The chunking of an image is a deterministic left-to-right scan (see `scan.rs` for the exact
//! rules). Incremental re-chunking (`rechunk.rs`) restarts that scan at a point before each
//! dirty run where its state is known, and stops it where its output meets the stale manifest
//! again, so the result equals a full scan exactly (DESIGN.md invariant 1).

mod gear;
mod inplace;
mod pieces;
mod rechunk;
mod scan;
mod source;

pub(crate) use pieces::forget as forget_pieces;
pub use pieces::{hash as hash_by_pieces, overlay_id};
pub use rechunk::{Tuning, chunk_full, rechunk, rechunk_tuned};
pub use scan::ScanStats;
pub use source::{FileSource, Source, hole_end};

pub use crate::manifest::{ChunkParams, ParamsError, ZERO_BLOCK};

use std::ops::Range;

/// Whether chunk `id`'s pieces are cached (tests).
#[cfg(test)]
pub(crate) fn pieces_cached(id: &blake3::Hash) -> bool {
    pieces::get(id).is_some()
}

/// Whether `r` overlaps one of `spans` (sorted, disjoint): a dirty run, a span still needed.
pub fn touches(spans: &[Range<u64>], r: Range<u64>) -> bool {
    let i = spans.partition_point(|s| s.end <= r.start);
    spans.get(i).is_some_and(|s| s.start < r.end)
}

/// Rounds `x` down to a multiple of [`ZERO_BLOCK`].
pub(crate) fn align_down(x: u64) -> u64 {
    x & !(ZERO_BLOCK - 1)
}

/// True when every byte of `buf` is zero. Checks a short prefix first so data blocks fail fast,
/// then folds the rest in pieces the compiler vectorises.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let head = buf.len().min(16);
    if buf[..head].iter().any(|&b| b != 0) {
        return false;
    }
    buf[head..]
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_is_any_overlap_with_sorted_spans_ends_excluded() {
        let spans = [0..1, 10..20];
        assert!(touches(&spans, 19..30) && touches(&spans, 0..5) && touches(&spans, 12..13));
        assert!(!touches(&spans, 1..10) && !touches(&spans, 20..40) && !touches(&[], 0..9));
    }

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut b = vec![0u8; 4096];
        assert!(is_zero(&b));
        for i in [0, 15, 16, 300, 4095] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
