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

use rayon::prelude::*;

use super::gear::{Fires, Rule, WINDOW, position};
use super::pieces;
use super::scan::ScanStats;
use super::{Source, ZERO_BLOCK, align_down, is_zero};
use crate::manifest::{Kind, Manifest};

/// How far a change reaches forward in FastCDC's decisions (the gear hash's memory, rounded up).
const REACH: u64 = WINDOW;

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

    let rule = Rule::new(stale.params());
    let results: Vec<io::Result<Rehashed>> = candidates
        .par_iter()
        .map(|c| rehash(stale, src, &rule, c, runs))
        .collect();
    let mut rehashed = Vec::with_capacity(candidates.len());
    let mut stats = ScanStats::default();
    for (c, r) in candidates.iter().zip(results) {
        let r = r?;
        stats.bytes_read += r.read;
        stats.bytes_hashed += r.hashed;
        stats.bytes_cut += r.cut;
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
    cut: u64,
}

/// Checks that the chunk's runs move no cut and hashes its new bytes: only the pieces the runs
/// reach when the old bytes' piece values are cached (see `pieces.rs`), else the whole chunk.
/// `id` is `None` when the runs may move a cut. The rule is tested at the positions the runs
/// reach through the free hash's hits there (`gear.rs`), which, with the old bytes' fires
/// cached, also give the new bytes' fires.
fn rehash(
    stale: &Manifest,
    src: &dyn Source,
    rule: &Rule,
    c: &Candidate,
    runs: &[Range<u64>],
) -> io::Result<Rehashed> {
    // A buffer per thread, never cleared: only the bytes read into it are looked at.
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    let mut buf = BUF.take();
    let r = rehash_into(&mut buf, stale, src, rule, c, runs);
    BUF.set(buf);
    r
}

fn rehash_into(
    buf: &mut Vec<u8>,
    stale: &Manifest,
    src: &dyn Source,
    rule: &Rule,
    c: &Candidate,
    runs: &[Range<u64>],
) -> io::Result<Rehashed> {
    let e = stale.entries()[c.index];
    let runs = &runs[c.runs.clone()];
    let len = e.len as usize;
    let local = |x: u64| (x - e.offset) as usize;
    let cached = match e.kind {
        Kind::Data(old) if len > pieces::PIECE => {
            pieces::get(&old).filter(|k| k.values.len() == pieces::count(len))
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
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let buf = &mut buf[..len];
    let mut read = 0;
    for p in &reach {
        let b = bytes(p);
        read += b.len() as u64;
        src.read_at(&mut buf[b.clone()], e.offset + b.start as u64)?;
    }
    let mut done = Rehashed {
        id: None,
        read,
        hashed: 0,
        cut: 0,
    };
    // The hits at the positions each run reaches, `[start, end + REACH)` (within the chunk).
    let (min, edge) = (rule.min, rule.min + WINDOW);
    let mut hits = Vec::new();
    let mut reached = Vec::with_capacity(runs.len());
    for r in runs {
        if !blocks_keep_a_nonzero_byte(buf, e.offset, r) {
            return Ok(done);
        }
        let (from, to) = (local(r.start), local((r.end + REACH).min(e.end())));
        if (from as u64) < edge && to as u64 > min {
            // Near `min_size` the crate's hash, started there, is not yet the free one.
            done.cut += to.min(edge as usize) as u64 - min;
            if rule
                .first_from_min(buf, from as u64, (to as u64).min(edge))
                .is_some()
            {
                return Ok(done);
            }
        }
        let from = from.max(WINDOW as usize);
        let first = hits.len();
        done.cut += rule.scan(buf, from, to, 0, &mut hits, true);
        let fires = |&h: &u32| position(h) >= edge && rule.fires(h, position(h));
        if hits[first..].iter().any(fires) {
            return Ok(done);
        }
        reached.push(from as u64..to as u64);
    }
    if len <= pieces::PIECE {
        done.id = Some(blake3::hash(buf));
        done.hashed = len as u64;
        return Ok(done);
    }
    // The new bytes' fires: the old ones where the runs did not reach, the new hits where they did.
    let avg = stale.params().avg_size;
    let fires = cached.as_ref().and_then(|k| k.fires_for(avg)).map(|old| {
        let untouched = |&&h: &&u32| !reached.iter().any(|r| r.contains(&position(h)));
        let mut all: Vec<u32> = old.hits.iter().filter(untouched).copied().collect();
        all.extend(hits.iter().filter(|&&h| position(h) >= u64::from(old.from)));
        all.sort_unstable();
        Fires {
            avg,
            from: old.from,
            hits: all.into(),
        }
    });
    let mut values =
        cached.map_or_else(|| vec![[0; 32]; pieces::count(len)], |k| k.values.to_vec());
    for p in &reach {
        for i in p.clone() {
            let b = &buf[bytes(&(i..i + 1))];
            values[i] = pieces::value(i, b);
            done.hashed += b.len() as u64;
        }
    }
    let id = pieces::root(&values, len);
    pieces::put(id, values, fires);
    done.id = Some(id);
    Ok(done)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkParams;
    use crate::testutil::random;

    /// A chunk re-hashed in place leaves the cache with its new bytes' values, not the old (the
    /// re-chunk forgets every chunk it replaced).
    #[test]
    fn a_chunk_rehashed_in_place_forgets_its_old_pieces() {
        let p = ChunkParams::default();
        let mut img = random(4 << 20, 5);
        let (stale, _) = super::super::chunk_full(&img, p).unwrap();
        // A chunk of several pieces with a hit where the write will land (the hit must go).
        let edge = (p.min_size as u64 + WINDOW) as u32;
        let (e, hit) = stale
            .entries()
            .iter()
            .filter(|e| e.offset > 0 && e.len > 40_000)
            .find_map(|e| {
                let fires = pieces::get(&e.hash()?)?.fires_for(p.avg_size)?.clone();
                let h = fires.between(edge.into(), e.len - 8_000).first().copied()?;
                Some((*e, position(h)))
            })
            .expect("a chunk of several pieces with a hit in its middle");
        let old = e.hash().unwrap();
        let at = (e.offset + hit - 100) as usize;
        img[at..at + 4096].fill(0x5A);
        let written = at as u64..at as u64 + 4096;
        let (m, stats) =
            super::super::rechunk(&stale, &img, std::slice::from_ref(&written)).unwrap();
        let i = m.index_at(e.offset).unwrap();
        assert_eq!(
            (m.entries()[i].offset, m.entries()[i].len),
            (e.offset, e.len)
        );
        assert!(stats.bytes_cut < 8_192, "re-hashed in place: {stats:?}");
        let new = m.entries()[i].hash().unwrap();
        assert_ne!(new, old);
        assert!(pieces::get(&old).is_none() && pieces::get(&new).is_some());
        // Its fires are those of its new bytes, as a scan of them finds.
        let fires = pieces::get(&new)
            .unwrap()
            .fires
            .clone()
            .expect("fires kept");
        let bytes = &img[e.offset as usize..e.end() as usize];
        let mut hits = Vec::new();
        Rule::new(p).scan(bytes, fires.from as usize, bytes.len(), 0, &mut hits, false);
        assert_eq!(*fires.hits, *hits);
    }
}
