//! Full and incremental re-chunking.
//!
//! An incremental re-chunk takes the stale manifest, the new image and the dirty byte runs, and
//! runs the scan of `scan.rs` only where the dirty runs can have changed its output:
//!
//! * **In place.** Runs inside one data chunk that provably move none of its cuts (most small
//!   writes into data; see `inplace.rs`) only re-hash that chunk; the scan never sees them.
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
//!   continues from where the earlier one stopped. A long group (a full chunk is one group from
//!   0 to the end) is split into pieces scanned in parallel, each but the first started at an
//!   arbitrary aligned offset; a piece scans on past the next one's start, and the two are
//!   joined at the first entry boundary they share (from an entry start the scan depends only on
//!   what follows). Inside a long zero run a piece stops at its limit, and the next piece, which
//!   then starts with a zero extent, is joined by extending that extent back to the run's start;
//!   if that run began after the piece's start (a write just past it), the two are joined at
//!   the run's start, an entry start of both.
//!   Pieces that fail to meet are rescanned from the real scan's state, so the result never
//!   depends on the split.
//!
//! Known-zero ranges (stale zero extents without dirty bytes, and holes in the file) are passed
//! to the scan as a hint, so a re-chunk never reads a zero run it already knows.
//! A size change is a dirty run from the smaller size to the larger.

use std::io;
use std::ops::Range;

use rayon::prelude::*;

use super::gear::WINDOW;
use super::inplace::{InPlace, rehash_in_place};
use super::scan::{End, ScanStats, Scanner, Span, Start};
use super::{ChunkParams, Source, align_down};
use crate::manifest::{Entry, Kind, Manifest};

/// How a re-chunk splits long stretches of work across cores.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// The longest piece: a group of dirty runs longer than this is scanned in pieces, each
    /// started speculatively and joined where its boundaries meet the previous piece's. A
    /// group is also cut into as many pieces as there are threads to scan them, down to
    /// [`Tuning::min_piece`]: one long run among many small changes (a VM's 32 MiB write
    /// beside scattered ones) was otherwise scanned by one thread while the others waited.
    pub split: u64,
    /// How far a piece scans past the start of the next one, to meet its boundaries.
    pub overshoot: u64,
}

impl Tuning {
    pub fn for_params(p: ChunkParams) -> Tuning {
        Tuning {
            split: 32 << 20,
            overshoot: 4 * p.max_size as u64 + p.zero_min as u64,
        }
    }

    /// The shortest piece a group is cut into for more threads: a quarter of the longest, and
    /// long enough that scanning past its end costs at most an eighth more.
    pub fn min_piece(&self) -> u64 {
        (self.split / 4).max(8 * self.overshoot)
    }

    /// How many pieces a group of `len` bytes is scanned in, with `threads` to scan them: none
    /// longer than `split`, and a multiple of `threads` (every thread gets as many: 7 pieces
    /// on 2 threads left the last one running alone), unless that makes them shorter than
    /// [`Tuning::min_piece`].
    pub fn pieces(&self, len: u64, threads: usize) -> u64 {
        let needed = len.div_ceil(self.split.max(1)).max(1);
        let most = len / self.min_piece().max(1);
        let t = threads.max(1) as u64;
        needed.div_ceil(t).saturating_mul(t).min(most).max(needed)
    }
}

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
    rechunk_tuned(stale, src, dirty, Tuning::for_params(stale.params()))
}

/// When a scan task stops.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// At the first entry end `>= until` that is a stale entry start (the task's output meets
    /// the stale manifest again).
    Stale { until: u64 },
    /// At the first entry end `>= limit`, or inside a zero run past `limit`.
    Past { limit: u64 },
}

/// One piece of scanning. A speculative task starts at an offset that need not be an entry
/// start of the real scan; its output is used from where it meets the real scan.
#[derive(Clone, Copy, Debug)]
struct Task {
    start: Start,
    speculative: bool,
    stop: Stop,
}

struct Done {
    entries: Vec<Entry>,
    end: End,
    stats: ScanStats,
}

impl Stop {
    /// Where the task's work ends (it may scan a little further to meet the stale manifest).
    fn bound(self) -> u64 {
        match self {
            Stop::Stale { until } => until,
            Stop::Past { limit } => limit,
        }
    }
}

/// An estimate of a scan's work by the dirty runs it covers: their bytes, and a fixed cost per
/// run (a write's seeks, reads and hash calls).
struct Work<'a> {
    runs: &'a [Range<u64>],
    /// The bytes of the runs before each run.
    before: Vec<u64>,
}

impl Work<'_> {
    const PER_RUN: u64 = 16 * 1024;

    fn new(runs: &[Range<u64>]) -> Work<'_> {
        let mut before = Vec::with_capacity(runs.len() + 1);
        let mut sum = 0;
        for r in runs {
            before.push(sum);
            sum += r.end - r.start;
        }
        before.push(sum);
        Work { runs, before }
    }

    /// The work of the dirty bytes in `[a, b)`.
    fn within(&self, a: u64, b: u64) -> u64 {
        let i = self.runs.partition_point(|r| r.end <= a);
        let j = self.runs.partition_point(|r| r.start < b);
        if i >= j {
            return 0;
        }
        let head = a.saturating_sub(self.runs[i].start);
        let tail = self.runs[j - 1].end.saturating_sub(b);
        self.before[j] - self.before[i] - head - tail + (j - i) as u64 * Work::PER_RUN
    }
}

/// `f` of every item on all of rayon's threads, the heaviest (by `weight`) first, each thread
/// taking the next when it is free; the results in the items' order.
fn heaviest_first<T: Sync, R: Send>(
    items: &[T],
    weight: impl Fn(&T) -> u64,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weight(&items[i])));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<parking_lot::Mutex<Option<R>>> = items
        .iter()
        .map(|_| parking_lot::Mutex::new(None))
        .collect();
    let threads = rayon::current_num_threads().min(items.len());
    (0..threads).into_par_iter().for_each(|_| {
        while let Some(&i) = order.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            *slots[i].lock() = Some(f(&items[i]));
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("every item ran"))
        .collect()
}

#[doc(hidden)]
pub fn rechunk_tuned(
    stale: &Manifest,
    src: &dyn Source,
    dirty: &[Range<u64>],
    tuning: Tuning,
) -> io::Result<(Manifest, ScanStats)> {
    let p = stale.params();
    let new_size = src.size();
    let dirty = normalize(dirty, stale.size(), new_size);
    let InPlace {
        rehashed,
        rest: runs,
        mut stats,
    } = rehash_in_place(stale, src, &dirty)?;
    // The free hash's hits at a position are a stale chunk's (cached with its pieces) where no
    // dirty byte lies within `WINDOW` bytes up to the position (`gear.rs`).
    let hits_at = |j: u64| -> Span {
        let i = dirty.partition_point(|r| r.end + WINDOW - 1 <= j);
        let next_dirty = match dirty.get(i) {
            Some(r) if r.start <= j => {
                return Span::Unknown {
                    until: r.end + WINDOW - 1,
                };
            }
            Some(r) => r.start,
            None => u64::MAX,
        };
        let Some(e) = stale.index_at(j).map(|k| stale.entries()[k]) else {
            return Span::Unknown { until: next_dirty };
        };
        let until = e.end().min(next_dirty);
        let known = match e.kind {
            Kind::Data(id) => super::pieces::get(&id),
            Kind::Zero => None,
        };
        let from = known
            .as_ref()
            .and_then(|k| k.fires_for(p.avg_size))
            .map(|f| f.from);
        match (known, from) {
            (Some(known), Some(from)) => {
                let from = e.offset + u64::from(from);
                if j < from {
                    Span::Unknown {
                        until: from.min(until),
                    }
                } else {
                    Span::Known {
                        until,
                        base: e.offset,
                        known,
                    }
                }
            }
            _ => Span::Unknown { until },
        }
    };
    // A new chunk that starts where a stale one did shares that one's clean whole pieces.
    let same_pieces = |start: u64, len: usize| {
        let Some(e) = stale.index_starting_at(start).map(|k| stale.entries()[k]) else {
            return Vec::new();
        };
        let Some(known) = e.hash().and_then(|id| super::pieces::get(&id)) else {
            return Vec::new();
        };
        let clean =
            |r: Range<usize>| !super::touches(&dirty, start + r.start as u64..start + r.end as u64);
        super::pieces::same(&known.values, e.len as usize, len, clean)
    };
    // The stale manifest first: where it knows zeros, asking the file (a `SEEK_DATA`, which
    // both threads' scans serialise on the descriptor's position lock) would add little.
    let hint = |q: u64| -> io::Result<u64> {
        match stale_zero_until(stale, &runs, q) {
            z if z > q => Ok(z),
            _ => src.known_zero_until(q),
        }
    };

    // Group runs whose restart falls before the end of the previous run.
    let mut groups: Vec<(Start, u64)> = Vec::new();
    for run in &runs {
        let start = restart(stale, src, run.start)?;
        match groups.last_mut() {
            Some((_, until)) if start.first_offset() < *until => *until = run.end,
            _ => groups.push((start, run.end)),
        }
    }
    // Split long groups into speculative pieces.
    let threads = rayon::current_num_threads();
    let mut tasks = Vec::new();
    for (start, until) in groups {
        let first = start.first_offset();
        let pieces = tuning.pieces(until.saturating_sub(first), threads);
        let piece = until.saturating_sub(first) / pieces;
        let mut from = first;
        let mut task_start = start;
        let mut speculative = false;
        for k in 1..pieces {
            let next = align_down(first + k * piece);
            if next <= from {
                continue;
            }
            tasks.push(Task {
                start: task_start,
                speculative,
                stop: Stop::Past {
                    limit: next + tuning.overshoot,
                },
            });
            task_start = Start::Data(next);
            speculative = true;
            from = next;
        }
        tasks.push(Task {
            start: task_start,
            speculative,
            stop: Stop::Stale { until },
        });
    }

    // Where a scan is expected to stop, and no read ahead goes further: a scan to meet the
    // stale manifest at the first stale entry start from its bound (the common case: the cut a
    // write moved comes back there), with the bytes that make that cut final; any other at
    // most one chunk past its bound. What a scan needs beyond is read all the same.
    let past = p.max_size as u64 + p.zero_min as u64 + 2;
    let read_limit = |stop: Stop| match stop {
        Stop::Stale { until } => {
            let k = stale.entries().partition_point(|e| e.offset < until);
            stale
                .entries()
                .get(k)
                .map_or(until.saturating_add(past), |e| {
                    e.offset + p.zero_min as u64 + 2
                })
        }
        Stop::Past { limit } => limit.saturating_add(past),
    };
    let run = |start: Start, stop: Stop| -> io::Result<Done> {
        let mut scanner = Scanner::new(src, &hint, p)
            .with_hits(&hits_at)
            .with_same_pieces(&same_pieces)
            .with_read_limit(read_limit(stop));
        let mut entries = Vec::new();
        let end = match stop {
            Stop::Stale { until } => scanner.scan(
                start,
                &mut entries,
                &mut |e| e >= until && stale.index_starting_at(e).is_some(),
                u64::MAX,
            )?,
            Stop::Past { limit } => {
                scanner.scan(start, &mut entries, &mut |e| e >= limit, limit)?
            }
        };
        Ok(Done {
            entries,
            end,
            stats: scanner.stats,
        })
    };
    // A task runs from a few KiB to many MiB: the heaviest first, each thread taking the next
    // when it is free. In rayon's order a 32 MiB write's piece among a hundred short ones began
    // halfway through and ran on alone at the end (and its adjacent tasks were kept together on
    // one thread by rayon's default leaves).
    let work = Work::new(&runs);
    let results: Vec<io::Result<Done>> = heaviest_first(
        &tasks,
        |t| work.within(t.start.first_offset(), t.stop.bound()),
        |t| run(t.start, t.stop),
    );

    // Join the pieces in order. `tail` is the real scan's state where `out` ends.
    let mut out: Vec<Entry> = Vec::with_capacity(stale.entries().len() + 16);
    // Every chunk the scans hashed (they remembered its pieces), kept or not by the joins.
    let mut hashed: Vec<Entry> = Vec::new();
    let mut tail = Some(Start::Data(0));
    for (task, result) in tasks.iter().zip(results) {
        let Some(state) = tail else { break };
        let done = result?;
        stats += done.stats;
        hashed.extend_from_slice(&done.entries);
        let first = task.start.first_offset();
        let joined = match (task.speculative, state) {
            (false, Start::Data(c)) if first >= c => {
                copy_stale(stale, c..first, &mut out);
                Some(done)
            }
            (true, Start::Data(_)) => join_at_common_boundary(&mut out, first, done),
            // The real scan's zero run began after this piece's start: it is in the state of
            // an entry start there, as the piece is if it has an entry starting there.
            (true, Start::Zero { run_start, .. }) if run_start > first => {
                join_at_common_boundary(&mut out, first, done)
            }
            (true, Start::Zero { run_start, pos }) => {
                join_in_zero_run(&mut out, run_start, pos, first, p.zero_min as u64, done)
            }
            _ => None,
        };
        let done = match joined {
            Some(done) => done,
            // The pieces did not meet: carry the real scan on over this task's stretch.
            None => {
                let d = run(state, task.stop)?;
                stats += d.stats;
                hashed.extend_from_slice(&d.entries);
                d
            }
        };
        out.extend_from_slice(&done.entries);
        tail = match done.end {
            End::Eof => None,
            End::Stopped => Some(Start::Data(out.last().map_or(0, Entry::end))),
            End::Suspended { run_start, pos } => Some(Start::Zero { run_start, pos }),
        };
    }
    match tail {
        Some(Start::Data(c)) if c < new_size => copy_stale(stale, c..new_size, &mut out),
        Some(z @ Start::Zero { .. }) => {
            let d = run(z, Stop::Stale { until: new_size })?;
            stats += d.stats;
            out.extend_from_slice(&d.entries);
        }
        _ => {}
    }
    // Chunks re-hashed in place kept their bounds; where the scan did not pass over them, `out`
    // holds their stale entries (where it did, the same bounds and the same new id, unless a
    // cut the scan moved reached into them: then the scan's chunks stand there).
    for (i, hash) in rehashed {
        let e = stale.entries()[i];
        let k = out.partition_point(|o| o.offset < e.offset);
        match out
            .get_mut(k)
            .filter(|o| o.offset == e.offset && o.len == e.len)
        {
            Some(o) => o.kind = Kind::Data(hash),
            None => hashed.push(Entry {
                kind: Kind::Data(hash),
                ..e
            }),
        }
    }
    let m = Manifest::new_over(stale, p, new_size, out).map_err(|e| {
        io::Error::other(format!(
            "internal error: re-chunk produced an invalid manifest ({e}); please report it"
        ))
    })?;
    // The pieces' values of the chunks replaced (re-hashed in place or cut again) are
    // forgotten, as a replica's patch check forgets its base, and so are those of chunks hashed
    // on the way that the new manifest does not hold (a scan's stretch the joins dropped, a
    // chunk re-hashed in place that a moved cut then reached): the cache holds what is in
    // place. (Left there, they were never looked up again, and grew the mount's memory under a
    // steady load until the cache's bound, 64 MiB of values.)
    for e in crate::manifest::changed_entries(&m, stale) {
        if let Some(h) = e.hash() {
            super::pieces::forget(&h);
        }
    }
    for e in hashed {
        let kept = m
            .index_starting_at(e.offset)
            .is_some_and(|k| m.entries()[k] == e);
        if let (false, Some(h)) = (kept, e.hash()) {
            super::pieces::forget(&h);
        }
    }
    Ok((m, stats))
}

/// Joins a speculative piece that started at `x` to the real scan in `out`, which ran past
/// `x`: at the first real entry end after `x` that is also an entry start of the piece, the
/// two scans are in the same state, so the piece's entries from there on are real. Returns
/// the piece trimmed to those entries, or `None` if the scans did not meet.
fn join_at_common_boundary(out: &mut Vec<Entry>, x: u64, mut done: Done) -> Option<Done> {
    let from = out.partition_point(|e| e.end() < x);
    for i in from..out.len() {
        let e = out[i].end();
        let j = done.entries.partition_point(|d| d.offset < e);
        if done.entries.get(j).is_some_and(|d| d.offset == e) {
            out.truncate(i + 1);
            done.entries.drain(..j);
            return Some(done);
        }
    }
    None
}

/// Joins a speculative piece that started at aligned `x` to a real scan that was inside a zero
/// run `[run_start, pos)` reaching at least `zero_min` past `x`: the piece then began with a zero
/// extent from `x`, which ends where the real run ends.
fn join_in_zero_run(
    out: &mut Vec<Entry>,
    run_start: u64,
    pos: u64,
    x: u64,
    zero_min: u64,
    mut done: Done,
) -> Option<Done> {
    let first = *done.entries.first()?;
    if run_start > x || pos < x + zero_min || first.offset != x || !first.is_zero() {
        return None;
    }
    out.push(Entry {
        offset: run_start,
        len: first.end() - run_start,
        kind: Kind::Zero,
    });
    done.entries.remove(0);
    Some(done)
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
    use super::super::pieces::PIECE;
    use super::*;

    /// Chunks the scan replaced (a write over a cut moves it) leave the pieces cache; the new
    /// ones are in it.
    #[test]
    fn a_rescanned_change_forgets_the_replaced_chunks_pieces() {
        let p = ChunkParams::default();
        let mut img = crate::testutil::random(1 << 20, 8);
        let (stale, _) = chunk_full(&img, p).unwrap();
        let c = stale.entries()[3];
        let (before, at) = (stale.entries()[2].hash().unwrap(), c.hash().unwrap());
        assert!(super::super::pieces::get(&before).is_some());
        let written = c.offset - 2048..c.offset + 2048;
        img[written.start as usize..written.end as usize].fill(0x3C);
        let (m, _) = rechunk(&stale, &img, std::slice::from_ref(&written)).unwrap();
        for gone in [before, at] {
            assert!(!m.entries().iter().any(|e| e.hash() == Some(gone)));
            assert!(super::super::pieces::get(&gone).is_none());
        }
        let new = m.entries()[m.index_at(written.start).unwrap()]
            .hash()
            .unwrap();
        assert!(super::super::pieces::get(&new).is_some());
    }

    /// A chunk re-hashed in place, whose bounds a cut moved by a write in the chunk before then
    /// changed, leaves nothing in the pieces cache: nothing would look its values up again, and
    /// under a steady load such leftovers grew the mount's memory to the cache's whole bound.
    #[test]
    fn a_chunk_rehashed_in_place_then_cut_again_leaves_nothing_cached() {
        let p = ChunkParams::default();
        let base = crate::testutil::random(4 << 20, 21);
        let (stale, _) = chunk_full(&base, p).unwrap();
        let es = stale.entries();
        let middle = |e: &Entry| e.offset + e.len / 2..e.offset + e.len / 2 + 4096;
        // A write in the middle of chunk `i` (re-hashed in place on its own) and one with other
        // bytes in the middle of chunk `i - 1`, until that one moves a cut so that the scan's
        // chunks cover chunk `i` with other bounds.
        let found = (2..es.len() - 1)
            .flat_map(|i| (0..16u64).map(move |w| (i, w)))
            .find_map(|(i, w)| {
                let (a, b) = (es[i - 1], es[i]);
                let mut img = base.clone();
                let (ra, rb) = (middle(&a), middle(&b));
                img[rb.start as usize..rb.end as usize].fill(0x5A);
                let (alone, _) = rechunk(&stale, &img, std::slice::from_ref(&rb)).unwrap();
                let id = alone.entries()[alone.index_starting_at(b.offset)?].hash()?;
                img[ra.start as usize..ra.end as usize]
                    .copy_from_slice(&crate::testutil::random(4096, 1000 + w));
                let (m, _) = rechunk(&stale, &img, &[ra, rb]).unwrap();
                let moved = !m
                    .entries()
                    .iter()
                    .any(|e| e.offset == b.offset && e.len == b.len);
                moved.then_some((img, m, id))
            });
        let (img, m, id) = found.expect("a write that moves a cut over the next chunk");
        assert_eq!(m.entries(), chunk_full(&img, p).unwrap().0.entries());
        assert!(!m.entries().iter().any(|e| e.hash() == Some(id)));
        assert!(
            super::super::pieces::get(&id).is_none(),
            "the in-place chunk the scan cut again is still cached"
        );
    }

    /// A write over the end of a chunk of more than four pieces, which moves its cut (the new
    /// manifest is checked against a full re-chunk): the stale chunk, the re-chunk's figures, the
    /// write, and the bytes of the chunks that changed. Tests running at once pass their own
    /// `seed`: a re-chunk forgets the cached pieces of the chunk it replaced, which another test
    /// of the same image may be about to use.
    fn moved_cut(seed: u64) -> (Entry, ScanStats, Range<u64>, u64) {
        let p = ChunkParams::default();
        let mut img = crate::testutil::random(4 << 20, seed);
        let (stale, _) = chunk_full(&img, p).unwrap();
        let c = *stale
            .entries()
            .iter()
            .find(|e| e.len as usize > 4 * PIECE)
            .unwrap();
        let written = c.end() - 2048..c.end() + 2048;
        img[written.start as usize..written.end as usize]
            .copy_from_slice(&crate::testutil::random(4096, 10));
        let (m, stats) = rechunk(&stale, &img, std::slice::from_ref(&written)).unwrap();
        assert_eq!(m.root(), chunk_full(&img, p).unwrap().0.root());
        let at = m.entries()[m.index_at(c.offset).unwrap()];
        assert!(at.offset == c.offset && at.len != c.len, "the cut moved");
        let changed = crate::manifest::changed_entries(&stale, &m)
            .map(|e| e.len)
            .sum();
        (c, stats, written, changed)
    }

    /// The scan cuts the chunk again: its clean whole pieces before the write keep their cached
    /// values (the same bytes at the same offsets of a chunk starting at the same place), and
    /// only the rest is hashed.
    #[test]
    fn a_moved_cut_rehashes_the_bytes_after_the_write_not_the_chunks_clean_start() {
        let (c, stats, written, changed) = moved_cut(9);
        let kept = (written.start - c.offset) / PIECE as u64 * PIECE as u64;
        assert!(kept >= 4 * PIECE as u64);
        assert!(
            stats.bytes_hashed <= changed - kept,
            "hashed {} of {changed} changed bytes; {kept} had cached values",
            stats.bytes_hashed
        );
    }

    /// A short scan reads the chunks it cuts and, past the last one, only the bytes that make
    /// its cut final (the zero check's `zero_min`, and two): a window that doubled until the
    /// cut was final read up to twice the last chunk, and reads ahead ran a chunk past where
    /// the scan met the stale manifest again.
    #[test]
    fn a_moved_cut_reads_the_chunks_it_cuts_and_the_zero_check_past_them() {
        let z = ChunkParams::default().zero_min as u64;
        for seed in 100..112 {
            let (_, stats, _, changed) = moved_cut(seed);
            assert!(
                stats.bytes_read <= changed + z + 2,
                "seed {seed}: read {} for {changed} bytes of changed chunks",
                stats.bytes_read
            );
        }
    }

    /// An image of 1 MiB of random bytes (`seed`) and `n + skip` MiB of zeros, its manifest, and
    /// the image with a 4 KiB write at `at` into each MiB of zeros after the first `skip`.
    fn writes_into_zeros(
        seed: u64,
        n: usize,
        skip: usize,
        at: usize,
    ) -> (Manifest, Vec<u8>, Vec<Range<u64>>) {
        const MIB: usize = 1 << 20;
        let mut img = crate::testutil::random(MIB, seed);
        img.resize((1 + skip + n) * MIB, 0);
        let (stale, _) = chunk_full(&img, ChunkParams::default()).unwrap();
        let mut dirty = Vec::new();
        for i in 0..n {
            let at = (1 + skip + i) * MIB + at;
            img[at..at + 4096].fill(i as u8 | 1);
            dirty.push(at as u64..at as u64 + 4096);
        }
        (stale, img, dirty)
    }

    /// Writes scattered over one long zero extent form one group (each one's scan would start
    /// at the extent's start), scanned in speculative pieces. A piece that starts where the
    /// real scan is inside a zero run that began after the piece's start (a write just past it)
    /// is joined at their common entry start, not scanned again (which read 2.4 times what one
    /// scan reads here; the pieces' overshoots read 1.4 times).
    #[test]
    fn pieces_of_a_long_zero_extent_join_past_the_writes_near_their_starts() {
        let p = ChunkParams::default();
        let (stale, img, dirty) = writes_into_zeros(11, 128, 0, 64 * 1024);
        let whole = Tuning {
            split: u64::MAX,
            ..Tuning::for_params(p)
        };
        let pieces = Tuning {
            split: 4 << 20,
            ..whole
        };
        let (m, one) = rechunk_tuned(&stale, &img, &dirty, whole).unwrap();
        let (n, split) = rechunk_tuned(&stale, &img, &dirty, pieces).unwrap();
        assert_eq!(m.root(), chunk_full(&img, p).unwrap().0.root());
        assert_eq!(n.root(), m.root());
        assert!(
            split.bytes_read <= one.bytes_read + one.bytes_read / 2,
            "read {} in pieces, {} in one scan",
            split.bytes_read,
            one.bytes_read
        );
    }

    /// A write into a long zero extent is read, cut and hashed as its own block: the zeros
    /// around it are known from the stale manifest (or the file's holes), not read (each write
    /// read 24 KiB before: its block, the zero check's 16 KiB after it, and a first read's
    /// minimum).
    #[test]
    fn writes_into_a_zero_extent_read_their_blocks_not_the_zeros_around_them() {
        let p = ChunkParams::default();
        let (stale, img, dirty) = writes_into_zeros(12, 60, 1, 40 * 1024);
        let (m, stats) = rechunk(&stale, &img, &dirty).unwrap();
        assert_eq!(m.root(), chunk_full(&img, p).unwrap().0.root());
        let written = 60 * 4096;
        assert!(
            stats.bytes_read <= written + written / 2,
            "read {} for {written} bytes written into zeros",
            stats.bytes_read
        );
        // A block may be hashed twice where a piece's overshoot reaches into the next one.
        assert!(stats.bytes_hashed <= written + written / 8);
    }

    /// Scan tasks run heaviest first, each thread taking the next when it is free; results come
    /// back in the tasks' order.
    #[test]
    fn tasks_run_heaviest_first_and_return_in_order() {
        let weights = [3u64, 9, 1, 7, 7, 0];
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let ran = parking_lot::Mutex::new(Vec::new());
        let out = one.install(|| {
            heaviest_first(
                &weights,
                |&w| w,
                |&w| {
                    ran.lock().push(w);
                    w * 10
                },
            )
        });
        assert_eq!(out, vec![30, 90, 10, 70, 70, 0]);
        assert_eq!(ran.into_inner(), vec![9, 7, 7, 3, 1, 0]);
        assert!(heaviest_first(&[] as &[u64], |&w| w, |&w| w).is_empty());
    }

    /// A task's work: the dirty bytes within its range, and a fixed cost per run it reaches.
    #[test]
    fn a_tasks_work_counts_the_dirty_bytes_it_covers() {
        let w = Work::new(&[10..20, 100..200, 1000..1004]);
        let k = Work::PER_RUN;
        assert_eq!(w.within(0, 5), 0);
        assert_eq!(w.within(0, 2000), 114 + 3 * k);
        assert_eq!(w.within(15, 150), 5 + 50 + 2 * k);
        assert_eq!(w.within(20, 100), 0);
        assert_eq!(w.within(150, 1002), 50 + 2 + 2 * k);
        assert_eq!(w.within(120, 130), 10 + k);
    }

    #[test]
    fn a_long_group_is_cut_for_every_thread_down_to_the_shortest_piece() {
        let t = Tuning::for_params(ChunkParams::default());
        const MIB: u64 = 1 << 20;
        // Its overshoot is 1 MiB + 16 KiB: no piece is shorter than eight of them.
        assert_eq!(t.min_piece(), 8 * (MIB + 16 * 1024));
        // One 32 MiB run: one piece per thread, where it was one piece on one thread.
        assert_eq!(t.pieces(32 * MIB, 2), 2);
        assert_eq!(t.pieces(32 * MIB, 4), 3);
        assert_eq!(t.pieces(32 * MIB, 1), 1);
        // Short groups stay whole; long ones are cut in pieces of at most `split`.
        assert_eq!(t.pieces(12 * MIB, 2), 1);
        assert_eq!(t.pieces(200 * MIB, 2), 8);
        assert_eq!(t.pieces(200 * MIB, 1), 7);
        assert_eq!(t.pieces(0, 2), 1);
    }

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
