//! Re-hashing a data chunk in place: the fast path of an incremental re-chunk for small writes
//! inside one chunk, which leave every cut where it was.
//!
//! A scattered 4 KiB write inside a 64 KiB chunk would otherwise make the scan cut the whole
//! chunk again (FastCDC over every byte from `min_size` to the cut) only to find the same cut.
//! Which cuts a write can move is known exactly, so this module proves that it moves none and
//! then only hashes the chunk's new bytes.
//!
//! Why a stale data chunk `[a, b)` keeps its bounds when every dirty run touching it lies in
//! `[a + 2, b - 66)`, every 4 KiB-aligned block a run touches still holds a non-zero byte of the
//! run, the image size did not change, and FastCDC's rule fires at no position the runs reach
//! (checked here):
//! * *Zero extents.* A zero extent may start at aligned `q` only when the `zero_min` bytes at
//!   `q` (whole blocks) are zero. A block the runs touch still holds a non-zero byte, and the
//!   others did not change, so no new zero run appears. No old one disappears either: an old
//!   zero run overlapping `[a + 2, b)` would have ended the chunk's segment before `b` or made
//!   `a` a zero extent. So every segment (and so every chunk's window) is what it was.
//! * *Cuts.* FastCDC's rule at position `j` of a chunk tests the gear hash of the bytes before
//!   and at `j`, and the masks use only the hash's low 48 bits, so a position's outcome depends
//!   on the 48 bytes ending at it (64 here, to be safe). Positions outside the runs and the 64
//!   bytes after each keep their outcome; the ones inside are tested below. Neither the cut at
//!   `a` (decided by the byte at `a`) nor the one at `b` (its position lies 66 or more bytes past
//!   the runs) can move, and no new cut appears between them.
//! * *Neighbours.* The entries before `a` depend on bytes up to `a + 1` and on zero runs; the
//!   entries from `b` on depend only on bytes from `b` on.
//!
//! The chunk's new id is then the BLAKE3 hash of its new bytes: of the pieces the runs changed,
//! merged with the cached values of the others, when the old bytes were hashed this way before
//! (`pieces.rs`). What the checks refuse goes to
//! the full scan of `rechunk.rs`, so the result never depends on this path (invariant 1; the
//! property tests in tests/rechunk.rs write at every distance from a cut).

use std::io;
use std::ops::Range;

use fastcdc::v2020::{self, Normalization};
use rayon::prelude::*;

use super::pieces;
use super::scan::ScanStats;
use super::{ChunkParams, Source, ZERO_BLOCK, align_down, is_zero};
use crate::manifest::{Kind, Manifest};

/// How far a change reaches forward in FastCDC's decisions (the gear hash's memory, rounded up).
const REACH: u64 = 64;

/// The dirty runs of one stale data chunk.
struct Candidate {
    index: usize,
    runs: Range<usize>,
}

/// What the fast path settled: new ids for stale entries (by index, same bounds), and the runs
/// left for the scan.
pub(super) struct InPlace {
    pub(super) rehashed: Vec<(usize, blake3::Hash)>,
    pub(super) rest: Vec<Range<u64>>,
    pub(super) stats: ScanStats,
}

/// Splits sorted, merged `runs` into the chunks that can be re-hashed in place (done here, on
/// all cores) and the runs the scan must handle.
pub(super) fn rehash_in_place(
    stale: &Manifest,
    src: &dyn Source,
    runs: &[Range<u64>],
) -> io::Result<InPlace> {
    let mut rest = Vec::new();
    let mut candidates = Vec::new();
    let mut i = 0;
    while i < runs.len() {
        let Some(index) = candidate_entry(stale, src, runs[i].start) else {
            rest.push(runs[i].clone());
            i += 1;
            continue;
        };
        let e = stale.entries()[index];
        if i > 0 && runs[i - 1].end > e.offset {
            // An earlier run reaches into this chunk too: the scan takes them all.
            rest.push(runs[i].clone());
            i += 1;
            continue;
        }
        let mut j = i;
        while j < runs.len() && runs[j].start < e.end() {
            j += 1;
        }
        if runs[j - 1].end + REACH + 2 <= e.end() {
            candidates.push(Candidate { index, runs: i..j });
        } else {
            rest.extend_from_slice(&runs[i..j]);
        }
        i = j;
    }

    let cut = CutRule::new(stale.params());
    let results: Vec<io::Result<Rehashed>> = candidates
        .par_iter()
        .map(|c| rehash(stale, src, &cut, c, runs))
        .collect();
    let mut rehashed = Vec::with_capacity(candidates.len());
    let mut stats = ScanStats::default();
    for (c, r) in candidates.iter().zip(results) {
        let r = r?;
        stats.bytes_read += r.read;
        stats.bytes_hashed += r.hashed;
        match r.id {
            Some(h) => rehashed.push((c.index, h)),
            None => rest.extend_from_slice(&runs[c.runs.clone()]),
        }
    }
    rest.sort_unstable_by_key(|r| r.start);
    Ok(InPlace {
        rehashed,
        rest,
        stats,
    })
}

/// The stale data entry that a run starting at `x` may be re-hashed in: it starts at least two
/// bytes before `x` and the image did not change size.
fn candidate_entry(stale: &Manifest, src: &dyn Source, x: u64) -> Option<usize> {
    if src.size() != stale.size() {
        return None;
    }
    let i = stale.index_at(x)?;
    let e = stale.entries()[i];
    (matches!(e.kind, Kind::Data(_)) && e.offset + 2 <= x).then_some(i)
}

/// A chunk's new id, and what finding it read and hashed.
struct Rehashed {
    id: Option<blake3::Hash>,
    read: u64,
    hashed: u64,
}

/// Checks that the chunk's runs move no cut and hashes its new bytes: only the pieces the runs
/// reach when the old bytes' piece values are cached (see `pieces.rs`), else the whole chunk.
/// `id` is `None` when the runs may move a cut.
fn rehash(
    stale: &Manifest,
    src: &dyn Source,
    cut: &CutRule,
    c: &Candidate,
    runs: &[Range<u64>],
) -> io::Result<Rehashed> {
    let e = stale.entries()[c.index];
    let runs = &runs[c.runs.clone()];
    let len = e.len as usize;
    let local = |x: u64| (x - e.offset) as usize;
    let cached = match e.kind {
        Kind::Data(old) if len > pieces::PIECE => {
            pieces::get(&old).filter(|v| v.len() == pieces::count(len))
        }
        _ => None,
    };
    // What to read: whole pieces around each run and the positions it reaches, or everything.
    let mut reach: Vec<Range<usize>> = Vec::new();
    match cached {
        Some(_) => {
            for r in runs {
                let from = local(r.start).saturating_sub(REACH as usize) / pieces::PIECE;
                let to = local((r.end + REACH).min(e.end())).div_ceil(pieces::PIECE);
                match reach.last_mut() {
                    Some(last) if last.end >= from => last.end = to,
                    _ => reach.push(from..to),
                }
            }
        }
        None => reach.push(0..pieces::count(len)),
    }
    let bytes = |p: &Range<usize>| p.start * pieces::PIECE..(p.end * pieces::PIECE).min(len);
    let mut buf = vec![0u8; len];
    let mut read = 0;
    for p in &reach {
        let b = bytes(p);
        read += b.len() as u64;
        src.read_at(&mut buf[b.clone()], e.offset + b.start as u64)?;
    }
    let refused = Rehashed {
        id: None,
        read,
        hashed: 0,
    };
    for r in runs {
        if !blocks_keep_a_nonzero_byte(&buf, e.offset, r) {
            return Ok(refused);
        }
        let to = (r.end + REACH).min(e.end());
        if cut.fires_in(&buf, local(r.start), local(to)) {
            return Ok(refused);
        }
    }
    if len <= pieces::PIECE {
        return Ok(Rehashed {
            id: Some(blake3::hash(&buf)),
            read,
            hashed: len as u64,
        });
    }
    let mut values = cached.map_or_else(|| vec![[0; 32]; pieces::count(len)], |v| v.to_vec());
    let mut hashed = 0;
    for p in &reach {
        for i in p.clone() {
            let b = &buf[bytes(&(i..i + 1))];
            values[i] = pieces::value(i, b);
            hashed += b.len() as u64;
        }
    }
    let id = pieces::root(&values, len);
    pieces::put(id, values);
    Ok(Rehashed {
        id: Some(id),
        read,
        hashed,
    })
}

/// True when every aligned block that `r` touches holds a non-zero byte inside `r`. `buf` holds
/// the image from `base`.
fn blocks_keep_a_nonzero_byte(buf: &[u8], base: u64, r: &Range<u64>) -> bool {
    let mut pos = r.start;
    while pos < r.end {
        let end = (align_down(pos) + ZERO_BLOCK).min(r.end);
        if is_zero(&buf[(pos - base) as usize..(end - base) as usize]) {
            return false;
        }
        pos = end;
    }
    true
}

/// FastCDC 2020's cut rule (normalisation level 1) position by position, as
/// `fastcdc::v2020::cut` applies it: from `min_size` on, the gear hash of the bytes so far is
/// tested at every position `j` (the chunk would end before `j`), with the strict mask below
/// `avg_size` and the loose one from there.
pub(super) struct CutRule {
    gear: &'static [u64; 256],
    mask_s: u64,
    mask_l: u64,
    min: usize,
    avg: usize,
}

impl CutRule {
    pub(super) fn new(p: ChunkParams) -> CutRule {
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        let gear = match v2020::get_gear_with_seed(0).0 {
            std::borrow::Cow::Borrowed(g) => g.try_into().expect("a gear table has 256 entries"),
            std::borrow::Cow::Owned(_) => unreachable!("seed 0 borrows the static table"),
        };
        CutRule {
            gear,
            mask_s,
            mask_l,
            min: p.min_size as usize,
            avg: p.avg_size as usize,
        }
    }

    /// True when the rule fires at some position in `[from, to)` of the chunk whose bytes start
    /// at `chunk[0]`. Exact for positions at least three bytes before the chunk's window ends
    /// (there the window cannot make the strict mask end earlier than `avg_size`).
    pub(super) fn fires_in(&self, chunk: &[u8], from: usize, to: usize) -> bool {
        let from = from.max(self.min);
        if from >= to {
            return false;
        }
        // The hash starts at `min_size`; from further on, 64 bytes rebuild it exactly.
        let mut hash = 0u64;
        for &b in &chunk[from.saturating_sub(REACH as usize).max(self.min)..from] {
            hash = (hash << 1).wrapping_add(self.gear[b as usize]);
        }
        for (j, &b) in chunk.iter().enumerate().take(to).skip(from) {
            hash = (hash << 1).wrapping_add(self.gear[b as usize]);
            let mask = if j < self.avg {
                self.mask_s
            } else {
                self.mask_l
            };
            if hash & mask == 0 {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;

    fn cut_of(p: ChunkParams, chunk: &[u8]) -> usize {
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        v2020::cut(
            chunk,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            mask_s,
            mask_l,
            mask_s << 1,
            mask_l << 1,
        )
        .1
    }

    /// A chunk re-hashed in place leaves the cache with its new bytes' values, not the old (the
    /// re-chunk forgets every chunk it replaced).
    #[test]
    fn a_chunk_rehashed_in_place_forgets_its_old_pieces() {
        let p = ChunkParams::default();
        let mut img = random(1 << 20, 5);
        let (stale, _) = super::super::chunk_full(&img, p).unwrap();
        let e = *stale
            .entries()
            .iter()
            .find(|e| e.offset > 0 && e.len > 40_000)
            .expect("a chunk of several pieces");
        let old = e.hash().unwrap();
        assert!(pieces::get(&old).is_some());
        let at = (e.offset + 20_000) as usize;
        img[at..at + 4096].fill(0x5A);
        let written = at as u64..at as u64 + 4096;
        let (m, _) = super::super::rechunk(&stale, &img, std::slice::from_ref(&written)).unwrap();
        let new = m.entries()[m.index_at(e.offset).unwrap()].hash().unwrap();
        assert_ne!(new, old);
        assert!(pieces::get(&old).is_none() && pieces::get(&new).is_some());
    }

    /// The restated rule agrees with the crate's cut: no position before a cut fires, the cut's
    /// own position does (unless the window forced it), from any starting position.
    #[test]
    fn the_rule_finds_exactly_the_crates_cuts() {
        for p in [
            ChunkParams::default(),
            ChunkParams {
                min_size: 256,
                avg_size: 1024,
                max_size: 4096,
                zero_min: 4096,
            },
        ] {
            let rule = CutRule::new(p);
            let data = random(4 << 20, 7);
            let mut pos = 0;
            let mut fired = 0;
            while pos < data.len() {
                let window = &data[pos..(pos + p.max_size as usize).min(data.len())];
                let len = cut_of(p, window);
                for from in [0, len / 3, len.saturating_sub(70), len.saturating_sub(3)] {
                    assert!(
                        !rule.fires_in(window, from, len),
                        "before the cut at {pos}+{len}"
                    );
                }
                if len < window.len() {
                    assert!(rule.fires_in(window, len.saturating_sub(10), len + 1));
                    assert!(rule.fires_in(window, len, len + 1));
                    fired += 1;
                }
                pos += len;
            }
            assert!(fired > 40, "{fired} cuts by the rule");
        }
    }
}
