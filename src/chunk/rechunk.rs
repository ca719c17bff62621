//! Full and incremental re-chunking.
//!
//! An incremental re-chunk takes the stale manifest, the new image and the dirty byte runs, and
//! runs the scan of `scan.rs` only where the dirty runs can have changed its output:
//!
//! * **Restart.** Before each run starting at `a`, walk back from the stale entry holding byte
//!   `a - 1` to the first entry start `s` whose scan state the change cannot reach. The scan
//!   decides a data chunk's cut from its own bytes, the first byte after the cut, and whether a
//!   zero extent could start at an aligned offset up to one byte past the cut; it decides a zero
//!   extent's end from the block after it. So a data boundary `s` is safe when `s + 2 <= a` and
//!   the image holds a non-zero byte in `[align_down(s + 1), a)` (no new zero run can reach back
//!   over it), and a boundary after a zero extent is safe when a non-zero byte lies in
//!   `[s, a)`. Inside a zero extent that began at `z0 <= a - zero_min` the scan resumes in its
//!   zero run at `align_down(a)`, without reading the zeros before it.
//! * **Resync.** The scan stops at the first entry end `e >= b` (the run's end) that is also an
//!   entry start of the stale manifest: from an entry start the scan depends only on the bytes
//!   after it, which are unchanged, so the stale entries from `e` on are what a full scan would
//!   produce, up to the next run.
//! * **Parallel.** Runs whose restarts fall inside an earlier run are merged into one group up
//!   front; groups are scanned in parallel. If a group's scan ends past the next group's restart
//!   (its resync point lay beyond it), the next group's result is discarded and the scan simply
//!   continues from where the earlier one stopped.
//!
//! Known-zero ranges (stale zero extents without dirty bytes, and holes in the file) are passed
//! to the scan as a hint, so a re-chunk never reads a zero run it already knows.
//! A size change is a dirty run from the smaller size to the larger.

use std::io;
use std::ops::Range;

use rayon::prelude::*;

use super::scan::{ScanStats, Scanner, Start};
use super::{ChunkParams, Source, align_down};
use crate::manifest::{Entry, Kind, Manifest};

/// Chunks the whole of `src`.
pub fn chunk_full(src: &dyn Source, params: ChunkParams) -> io::Result<(Manifest, ScanStats)> {
    rechunk(&Manifest::empty(params), src, &[])
}

/// Builds the manifest of `src` from `stale` (the manifest of the image before the changes) and
/// the byte ranges written, punched or truncated since (`dirty`, in any order, overlapping or
/// not). Equals `chunk_full(src, stale.params())`, reading only around the dirty ranges.
pub fn rechunk(
    stale: &Manifest,
    src: &dyn Source,
    dirty: &[Range<u64>],
) -> io::Result<(Manifest, ScanStats)> {
    let p = stale.params();
    let new_size = src.size();
    let runs = normalize(dirty, stale.size(), new_size);
    let hint = |q: u64| -> io::Result<u64> {
        Ok(src
            .known_zero_until(q)?
            .max(stale_zero_until(stale, &runs, q)))
    };

    let mut groups: Vec<(Start, u64)> = Vec::new();
    for run in &runs {
        let start = restart(stale, src, run.start)?;
        match groups.last_mut() {
            Some((_, until)) if start.first_offset() < *until => *until = run.end,
            _ => groups.push((start, run.end)),
        }
    }

    let stop_at = |until: u64| move |e: u64| e >= until && stale.index_starting_at(e).is_some();
    let scan = |start: Start, until: u64| -> io::Result<(Vec<Entry>, ScanStats)> {
        let mut scanner = Scanner::new(src, &hint, p);
        let mut out = Vec::new();
        scanner.scan(start, &mut out, &mut stop_at(until))?;
        Ok((out, scanner.stats))
    };
    let results: Vec<_> = groups
        .par_iter()
        .map(|&(start, until)| scan(start, until))
        .collect();

    let mut out: Vec<Entry> = Vec::with_capacity(stale.entries().len() + 16);
    let mut covered = 0u64;
    let mut stats = ScanStats::default();
    for (&(start, until), result) in groups.iter().zip(results) {
        let first = start.first_offset();
        let (entries, st) = if first >= covered {
            copy_stale(stale, covered..first, &mut out);
            result?
        } else {
            // The previous group's scan ran past this group's restart: continue it instead.
            scan(Start::Data(covered), until)?
        };
        stats += st;
        if let Some(last) = entries.last() {
            covered = last.end();
        }
        out.extend(entries);
    }
    if covered < new_size {
        copy_stale(stale, covered..new_size, &mut out);
    }
    let m = Manifest::new(p, new_size, out).map_err(|e| {
        io::Error::other(format!(
            "internal error: re-chunk produced an invalid manifest ({e}); please report it"
        ))
    })?;
    Ok((m, stats))
}

/// Sorted, merged dirty runs within the larger of the two sizes, plus the size change.
fn normalize(dirty: &[Range<u64>], old_size: u64, new_size: u64) -> Vec<Range<u64>> {
    let limit = old_size.max(new_size);
    let mut v: Vec<Range<u64>> = dirty
        .iter()
        .map(|r| r.start.min(limit)..r.end.min(limit))
        .filter(|r| r.start < r.end)
        .collect();
    if old_size != new_size {
        v.push(old_size.min(new_size)..limit);
    }
    v.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Where to restart the scan for a dirty run starting at `a` (see the module comment).
fn restart(stale: &Manifest, src: &dyn Source, a: u64) -> io::Result<Start> {
    let es = stale.entries();
    let a = a.min(stale.size());
    if a == 0 {
        return Ok(Start::Data(0));
    }
    let z = stale.params().zero_min as u64;
    let mut k = stale
        .index_at(a - 1)
        .expect("a - 1 is inside the stale image");
    if es[k].is_zero() {
        let z0 = es[k].offset;
        if a >= z0 + z {
            return Ok(Start::Zero {
                run_start: z0,
                pos: align_down(a),
            });
        }
        if k == 0 {
            return Ok(Start::Data(0));
        }
        k -= 1;
    }
    while k > 0 {
        let s = es[k].offset;
        let prev = es[k - 1];
        match prev.kind {
            Kind::Data(_) => {
                if s + 2 <= a && nonzero_in(src, align_down(s + 1)..a)? {
                    return Ok(Start::Data(s));
                }
            }
            Kind::Zero if nonzero_in(src, s..a)? => return Ok(Start::Data(s)),
            Kind::Zero => {
                return Ok(Start::Zero {
                    run_start: prev.offset,
                    pos: s,
                });
            }
        }
        k -= 1;
    }
    Ok(Start::Data(0))
}

/// True when `src` holds a non-zero byte in `range`. Reads a block at a time and stops at the
/// first one found (in data, the first block).
fn nonzero_in(src: &dyn Source, range: Range<u64>) -> io::Result<bool> {
    let mut buf = [0u8; 4096];
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], pos)?;
        if !super::is_zero(&buf[..n]) {
            return Ok(true);
        }
        pos += n as u64;
    }
    Ok(false)
}

/// End of the range starting at `q` known to be zero in the new image because a stale zero
/// extent covers it and no dirty run touches it (`q` itself when nothing is known).
fn stale_zero_until(stale: &Manifest, runs: &[Range<u64>], q: u64) -> u64 {
    let Some(i) = stale.index_at(q) else {
        return q;
    };
    let e = stale.entries()[i];
    if !e.is_zero() {
        return q;
    }
    let r = runs.partition_point(|r| r.end <= q);
    match runs.get(r) {
        Some(run) if run.start <= q => q,
        Some(run) => e.end().min(run.start),
        None => e.end(),
    }
}

/// Appends the stale entries that tile `range` (whose ends are stale entry boundaries).
fn copy_stale(stale: &Manifest, range: Range<u64>, out: &mut Vec<Entry>) {
    if range.start >= range.end {
        return;
    }
    let es = stale.entries();
    let i = es.partition_point(|e| e.offset < range.start);
    let j = es.partition_point(|e| e.offset < range.end);
    debug_assert!(es[i].offset == range.start && es[j - 1].end() == range.end);
    out.extend_from_slice(&es[i..j]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn runs_are_sorted_merged_clipped_and_include_the_size_change() {
        assert_eq!(
            normalize(&[50..60, 10..20, 20..30, 25..27, 5..5], 100, 100),
            vec![10..30, 50..60]
        );
        assert_eq!(
            normalize(&[10..20, 90..500], 100, 80),
            vec![10..20, 80..100]
        );
        assert_eq!(normalize(&[120..130], 100, 200), vec![100..200]);
        assert_eq!(normalize(&[], 0, 0), Vec::<Range<u64>>::new());
    }
}
