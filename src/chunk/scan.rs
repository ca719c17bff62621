//! The scan: the one deterministic procedure that turns image bytes into entries. A full chunk
//! and every incremental re-chunk run this same code, which is what makes them agree.
//!
//! Rules, applied left to right from offset 0, at every entry start `s`:
//! * if `s` is a multiple of [`ZERO_BLOCK`] and the `zero_min` bytes at `s` are all zero (and
//!   lie within the image), a *zero extent* starts: it runs over whole aligned zero blocks until
//!   the first block holding a non-zero byte, or the end of the image;
//! * otherwise a *data chunk* starts: its segment ends at the first aligned offset after `s`
//!   where a zero extent could start (as above), or at the end of the image; FastCDC (2020,
//!   normalisation level 1) cuts the segment's first `max_size` bytes, and the chunk id is the
//!   BLAKE3 hash of the chunk's bytes.
//!
//! The scan carries no state from one entry to the next except its position, and inside a zero
//! run the offset where the run began; `rechunk.rs` relies on exactly that.
//!
//! Reading is lazy: FastCDC's cut from a window of `R` bytes is final once it lies at least two
//! bytes before the window's end (candidates are tested in byte pairs, and a longer window only
//! adds candidates after it), and only aligned offsets up to one byte past the cut can move it.
//! So a chunk needs its own bytes, two more, and `zero_min` beyond for the zero check.

use std::io;
use std::ops::Range;

use std::sync::Arc;

use blake3::hazmat::ChainingValue;
use rayon::prelude::*;

use super::gear::{Fires, Rule, WINDOW, position};
use super::pieces::Known;
use super::{ChunkParams, Source, ZERO_BLOCK, align_down, is_zero};
use crate::manifest::{Entry, Kind};

/// Where a scan begins: at an entry start, or inside a zero run that is known to qualify as a
/// zero extent: `[run_start, pos)` is zero, `pos` is aligned, and the run is at least
/// `zero_min` long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    Data(u64),
    Zero { run_start: u64, pos: u64 },
}

impl Start {
    /// Offset of the first entry this scan emits.
    pub(crate) fn first_offset(self) -> u64 {
        match self {
            Start::Data(s) => s,
            Start::Zero { run_start, .. } => run_start,
        }
    }
}

/// Where a scan ended: after an entry for which the stop rule held, at the end of the image,
/// or inside a zero run that reached the zero limit (resume it with `Start::Zero`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    Stopped,
    Eof,
    Suspended { run_start: u64, pos: u64 },
}

/// What a scan read and hashed, to show that a re-chunk costs what the dirty bytes cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes read from the source (holes skipped by hint are not read).
    pub bytes_read: u64,
    /// Bytes hashed with BLAKE3 as data chunks.
    pub bytes_hashed: u64,
    /// Bytes FastCDC's gear hash ran over to find cuts.
    pub bytes_cut: u64,
}

impl std::ops::AddAssign for ScanStats {
    fn add_assign(&mut self, o: ScanStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_hashed += o.bytes_hashed;
        self.bytes_cut += o.bytes_cut;
    }
}

/// What a re-chunk knows of the free gear hash's hits (`gear.rs`) from an image position on.
pub(crate) enum Span {
    /// Up to `until` the hits are those of a chunk whose bytes start at `base` (a stale chunk
    /// with its fires cached, and no dirty byte within [`WINDOW`] before any of these positions).
    Known {
        until: u64,
        base: u64,
        known: Arc<Known>,
    },
    /// Up to `until` the hits must be found by hashing the bytes.
    Unknown { until: u64 },
}

/// A hit of a chunk starting at `base`, seen from a chunk starting at `pos` (at most the hit's
/// position).
fn rebased(hit: u32, base: u64, pos: u64) -> u32 {
    super::gear::moved(hit, position(hit) + base - pos)
}

/// The span of hits known at an image position: see [`Scanner::with_hits`].
pub(crate) type HitsAt<'a> = dyn Fn(u64) -> Span + Sync + 'a;

/// The pieces' values a data chunk at (offset, length) shares with a cached stale chunk: see
/// [`Scanner::with_same_pieces`].
pub(crate) type SamePieces<'a> = dyn Fn(u64, usize) -> Vec<Option<ChainingValue>> + Sync + 'a;

/// A data chunk emitted but not yet hashed.
struct Pending {
    /// Its index in the output.
    index: usize,
    /// Its bytes in the scanner's buffer.
    bytes: Range<usize>,
    fires: Option<Fires>,
    /// Its pieces' values known without hashing (`SamePieces`).
    known: Vec<Option<ChainingValue>>,
}

/// The hits of the free hash in the data chunk being cut: those at positions `[from, next)`
/// relative to `pos`, and the first where the rule fires, if any was seen.
#[derive(Default)]
struct Cutting {
    pos: u64,
    from: u64,
    next: u64,
    hits: Vec<u32>,
    fire: Option<u64>,
}

/// Known-zero hint: the end of a run of zero bytes starting at the given offset (or the offset
/// itself when nothing is known).
pub(crate) type ZeroHint<'a> = dyn Fn(u64) -> io::Result<u64> + Sync + 'a;

/// The least a read asks for. A read reaches as far past what the scan needs as the scan has
/// streamed since its start or its last jump, from `FIRST_READ` to `MAX_READ`: a long scan
/// reads in large blocks (and hashes them on all cores), and a re-chunk's short stretch
/// around a write reads little more than the chunks it cuts.
const FIRST_READ: u64 = 4 * 1024;
const MAX_READ: u64 = 8 * 1024 * 1024;
/// Pending hash work above which chunks are hashed on all cores.
const PARALLEL_HASH: usize = 4 * 1024 * 1024;

pub(crate) struct Scanner<'a> {
    src: &'a dyn Source,
    hint: &'a ZeroHint<'a>,
    p: ChunkParams,
    rule: Rule,
    size: u64,
    /// `buf[..filled]` holds the image bytes `[base, base + filled)`.
    buf: Vec<u8>,
    filled: usize,
    base: u64,
    /// Where the scan started streaming: its start, or its last jump.
    streaming_from: u64,
    /// Reads ahead stop here (what the scan needs is read wherever it lies).
    read_limit: u64,
    /// Data chunks emitted but not yet hashed.
    pending: Vec<Pending>,
    pending_bytes: usize,
    hits_at: Option<&'a HitsAt<'a>>,
    same_pieces: Option<&'a SamePieces<'a>>,
    cutting: Cutting,
    pub(crate) stats: ScanStats,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(src: &'a dyn Source, hint: &'a ZeroHint<'a>, p: ChunkParams) -> Self {
        Scanner {
            src,
            hint,
            p,
            rule: Rule::new(p),
            size: src.size(),
            buf: Vec::new(),
            filled: 0,
            base: 0,
            streaming_from: 0,
            read_limit: u64::MAX,
            pending: Vec::new(),
            pending_bytes: 0,
            hits_at: None,
            same_pieces: None,
            cutting: Cutting::default(),
            stats: ScanStats::default(),
        }
    }

    /// Lets the scan look up what is known: `hits_at(pos)` tells where the free hash's hits
    /// from `pos` on are those of a stale chunk whose fires are cached (a re-chunk knows this of
    /// the stale chunks' clean bytes). There the rule is tested at those hits only; elsewhere
    /// the bytes are hashed.
    pub(crate) fn with_hits(mut self, hits_at: &'a HitsAt<'a>) -> Self {
        self.hits_at = Some(hits_at);
        self
    }

    /// Lets the scan take the values of a new chunk's pieces that a cached stale chunk starting
    /// at the same place has, with the same bytes (`same_pieces(offset, len)`, see
    /// `pieces::same`), instead of hashing them.
    pub(crate) fn with_same_pieces(mut self, same_pieces: &'a SamePieces<'a>) -> Self {
        self.same_pieces = Some(same_pieces);
        self
    }

    /// Lets the scan read ahead only up to `limit`: where its caller expects it to stop, so that
    /// a scan streaming over a long write does not read megabytes past it.
    pub(crate) fn with_read_limit(mut self, limit: u64) -> Self {
        self.read_limit = limit;
        self
    }

    /// Scans from `start`, appending entries to `out`, until `stop(end)` returns true for the
    /// end of an emitted entry, a zero run reaches `zero_limit`, or the image ends.
    pub(crate) fn scan(
        &mut self,
        start: Start,
        out: &mut Vec<Entry>,
        stop: &mut dyn FnMut(u64) -> bool,
        zero_limit: u64,
    ) -> io::Result<End> {
        let mut next = start;
        let end = loop {
            let entry = match next {
                Start::Data(pos) if pos >= self.size => break End::Eof,
                Start::Data(pos) => match self.data_chunk(pos, out)? {
                    Some(e) => e,
                    None => {
                        let z = self.p.zero_min as u64;
                        next = Start::Zero {
                            run_start: pos,
                            pos: pos + z,
                        };
                        continue;
                    }
                },
                Start::Zero { run_start, pos } => {
                    let end = match self.zero_run_end(pos, zero_limit, out)? {
                        Ok(end) => end,
                        Err(pos) => break End::Suspended { run_start, pos },
                    };
                    Entry {
                        offset: run_start,
                        len: end - run_start,
                        kind: Kind::Zero,
                    }
                }
            };
            let end = entry.end();
            next = Start::Data(end);
            out.push(entry);
            if stop(end) {
                break End::Stopped;
            }
        };
        self.flush_hashes(out);
        Ok(end)
    }

    /// At an entry start: the data chunk starting there, or `None` when a zero extent starts.
    fn data_chunk(&mut self, pos: u64, out: &mut [Entry]) -> io::Result<Option<Entry>> {
        let z = self.p.zero_min as u64;
        let limit = (pos + self.p.max_size as u64).min(self.size);
        if let Some(known) = self.known_zeros_ahead(pos, out)? {
            return Ok(known);
        }
        if pos % ZERO_BLOCK == 0 {
            self.ensure(pos, z, out)?;
            if self.zero_run_at(pos) {
                return Ok(None);
            }
        }
        // Grow the window until the cut is final: no zero extent can start at an aligned offset
        // up to one byte past it (that would end the segment before it), and the window reaches
        // two bytes past it or the segment's limit. A first small window finds the common short
        // chunk between zero runs (a write into a hole) without reading a whole average chunk.
        let mut want = (2 * ZERO_BLOCK).min(limit - pos) + z;
        let mut q = align_down(pos) + ZERO_BLOCK; // next aligned offset to check for zeros
        let len = loop {
            self.ensure(pos, want, out)?;
            let buf_end = self.base + self.filled as u64;
            // Aligned offsets below `checked` are known not to start a zero extent.
            let checked = if buf_end == self.size {
                limit
            } else {
                limit.min((buf_end + 1).saturating_sub(z))
            };
            while q < checked {
                if self.zero_run_at(q) {
                    let len = self.cut(pos, q);
                    return Ok(Some(self.data_entry(pos, len, out)));
                }
                q += ZERO_BLOCK;
            }
            let avail = buf_end.min(limit) - pos;
            if avail < self.p.min_size as u64 + 2 && pos + avail < limit {
                want = (self.p.avg_size as u64 + z).min(limit - pos + z);
                continue;
            }
            let len = self.cut(pos, pos + avail);
            let final_in_window = len + 2 <= avail || pos + avail == limit;
            if final_in_window && (pos + len + 2).min(limit) <= q.min(limit) {
                break len;
            }
            // A cut final in the window waits only for the zero check past it: read just that.
            // Else the window grows by `zero_min` (the search goes on from where it stopped):
            // a window that doubled read up to twice the chunk (a 75 KiB chunk's 160 KiB), and a
            // re-chunk's short scan is mostly such last chunks. Long scans read ahead anyway.
            want = if final_in_window {
                want.max(len + 2 + z)
            } else {
                want + z
            }
            .min(limit - pos + z);
        };
        Ok(Some(self.data_entry(pos, len, out)))
    }

    /// At an entry start whose bytes are not buffered yet: the entry when known zeros (a hole,
    /// a clean stale zero extent: the hint) decide it without reading them. A zero extent starts
    /// at aligned `pos` if the hint covers `zero_min` bytes there; else, if the hint covers
    /// `zero_min` bytes from the next aligned offset `q`, a zero extent may start at `q`, so the
    /// segment, and the chunk, end there, and only `[pos, q)` is read (a write into a hole
    /// reads its own block, not the zeros around it). `None` when the hint does not decide.
    fn known_zeros_ahead(
        &mut self,
        pos: u64,
        out: &mut [Entry],
    ) -> io::Result<Option<Option<Entry>>> {
        let z = self.p.zero_min as u64;
        let q = align_down(pos) + ZERO_BLOCK;
        let buffered_to = self.base + self.filled as u64;
        if (pos >= self.base && q + z <= buffered_to) || q + z > self.size {
            return Ok(None);
        }
        let zero_from = |s: &Self, at: u64| -> io::Result<bool> {
            Ok(at + z <= s.size && (s.hint)(at)?.min(s.size) >= at + z)
        };
        let aligned = pos % ZERO_BLOCK == 0;
        if aligned && zero_from(self, pos)? {
            return Ok(Some(None));
        }
        if !zero_from(self, q)? {
            return Ok(None);
        }
        self.ensure_upto(pos, q - pos, q, out)?;
        let from = (pos - self.base) as usize;
        if aligned && is_zero(&self.buf[from..from + (q - pos) as usize]) {
            // `[pos, q)` and the `zero_min` bytes from `q` are zero.
            return Ok(Some(None));
        }
        let len = self.cut(pos, q);
        Ok(Some(Some(self.data_entry(pos, len, out))))
    }

    /// Records a data chunk for hashing at the next flush and returns its entry; the caller
    /// pushes it right away, so it will be `out[out.len()]`.
    fn data_entry(&mut self, pos: u64, len: u64, out: &[Entry]) -> Entry {
        let from = (pos - self.base) as usize;
        let fires = self.fires_of(pos, len);
        let known = self
            .same_pieces
            .map_or_else(Vec::new, |same| same(pos, len as usize));
        self.pending.push(Pending {
            index: out.len(),
            bytes: from..from + len as usize,
            fires,
            known,
        });
        self.pending_bytes += len as usize;
        Entry {
            offset: pos,
            len,
            kind: Kind::Data(blake3::Hash::from_bytes([0; 32])),
        }
    }

    /// FastCDC's cut for a chunk starting at `pos` in a segment ending at `end` (buffered): the
    /// crate's `v2020::cut` of those bytes (`gear.rs` restates it), from the free hash's hits.
    fn cut(&mut self, pos: u64, end: u64) -> u64 {
        let (last, len) = self.rule.window(end - pos);
        let (min, edge) = (self.rule.min, (self.rule.min + WINDOW).min(last));
        if last <= min {
            return len;
        }
        let chunk = &self.buf[(pos - self.base) as usize..(end - self.base) as usize];
        if let Some(j) = self.rule.first_from_min(chunk, min, edge) {
            self.stats.bytes_cut += j + 1 - min;
            return j;
        }
        self.stats.bytes_cut += edge - min;
        self.find_hits(pos, pos + last);
        match self.cutting.fire {
            Some(j) if j < last => j,
            _ => len,
        }
    }

    /// Finds the free hash's hits in the chunk at `pos` up to `to` (buffered), or up to the first
    /// where the rule fires: from `hits_at` where it knows them, else by hashing the bytes.
    fn find_hits(&mut self, pos: u64, to: u64) {
        let min = self.rule.min;
        let c = &mut self.cutting;
        if c.pos != pos || c.next < pos + min {
            *c = Cutting {
                pos,
                from: pos + min,
                next: pos + min,
                hits: std::mem::take(&mut c.hits),
                fire: None,
            };
            c.hits.clear();
        }
        let (edge, avg) = (min + WINDOW, self.p.avg_size);
        let fires = |h: u32| position(h) >= edge && self.rule.fires(h, position(h));
        while c.next < to && c.fire.is_none() {
            let j = c.next;
            let first = c.hits.len();
            let span = self
                .hits_at
                .map_or(Span::Unknown { until: u64::MAX }, |f| f(j));
            match span {
                Span::Known { until, base, known } if known.fires_for(avg).is_some() => {
                    let until = until.min(to);
                    let f = known.fires_for(avg).expect("matched on it");
                    let hits = f.between(j - base, until - base).iter();
                    c.hits.extend(hits.map(|&h| rebased(h, base, pos)));
                    c.next = until;
                }
                Span::Known { until, .. } | Span::Unknown { until } => {
                    let until = until.min(to);
                    let at = |x: u64| (x - self.base) as usize;
                    let n = self
                        .rule
                        .scan(&self.buf, at(j), at(until), at(pos), &mut c.hits, true);
                    self.stats.bytes_cut += n;
                    c.next = until;
                }
            }
            c.fire = c.hits[first..]
                .iter()
                .find(|&&h| fires(h))
                .map(|&h| position(h));
            if let Some(f) = c.fire {
                c.next = pos + f + 1;
            }
        }
    }

    /// The fires of the chunk `[pos, pos + len)` just cut, when its hits were all found.
    fn fires_of(&mut self, pos: u64, len: u64) -> Option<Fires> {
        let c = &self.cutting;
        if c.pos != pos || c.next <= c.from || len <= self.rule.min {
            return None;
        }
        if c.next < pos + len && c.fire.is_none() {
            self.find_hits(pos, pos + len);
        }
        let c = &self.cutting;
        (c.next >= pos + len).then(|| Fires {
            avg: self.p.avg_size,
            from: (c.from - pos) as u32,
            hits: c
                .hits
                .iter()
                .copied()
                .filter(|&h| position(h) < len)
                .collect(),
        })
    }

    /// True when a zero extent may start at aligned `q`: `zero_min` zero bytes within the image.
    /// The bytes must be buffered.
    fn zero_run_at(&self, q: u64) -> bool {
        let z = self.p.zero_min as u64;
        if q + z > self.size {
            return false;
        }
        let from = (q - self.base) as usize;
        is_zero(&self.buf[from..from + z as usize])
    }

    /// The end of the zero run that covers `[.., q)`: `Ok` with the aligned offset of the first
    /// block at or after `q` holding a non-zero byte (or the end of the image), or `Err` with
    /// the aligned offset the run had reached when it passed `limit`.
    fn zero_run_end(
        &mut self,
        mut q: u64,
        limit: u64,
        out: &mut [Entry],
    ) -> io::Result<Result<u64, u64>> {
        let mut hinted_at = None;
        loop {
            if q >= self.size {
                return Ok(Ok(self.size));
            }
            if hinted_at != Some(q) {
                let h = (self.hint)(q)?.min(self.size);
                if h >= self.size {
                    return Ok(Ok(self.size));
                }
                q = q.max(align_down(h));
                hinted_at = Some(q);
            }
            if q >= limit {
                return Ok(Err(q));
            }
            self.ensure(q, ZERO_BLOCK, out)?;
            let buf_end = self.base + self.filled as u64;
            while q < self.size {
                let end = (q + ZERO_BLOCK).min(self.size);
                if end > buf_end {
                    break;
                }
                let block = &self.buf[(q - self.base) as usize..(end - self.base) as usize];
                if !is_zero(block) {
                    return Ok(Ok(q));
                }
                q = end;
            }
        }
    }

    /// Makes `[pos, pos + need)` (clipped to the image) buffered, hashing what is pending first
    /// if the buffer must move.
    fn ensure(&mut self, pos: u64, need: u64, out: &mut [Entry]) -> io::Result<()> {
        self.ensure_upto(pos, need, self.read_limit, out)
    }

    /// [`Scanner::ensure`], reading ahead at most up to `limit`.
    fn ensure_upto(
        &mut self,
        pos: u64,
        need: u64,
        limit: u64,
        out: &mut [Entry],
    ) -> io::Result<()> {
        let want_end = (pos + need).min(self.size);
        if pos >= self.base && want_end <= self.base + self.filled as u64 {
            return Ok(());
        }
        self.flush_hashes(out);
        // Keep what is buffered from `pos` on, and read on from there. Reads grow while the scan
        // streams on and start small again after a jump (over a hole, to another run).
        let old_end = self.base + self.filled as u64;
        if pos < self.base || pos > old_end {
            self.streaming_from = pos;
        }
        let ahead = pos
            .saturating_sub(self.streaming_from)
            .clamp(FIRST_READ, MAX_READ)
            .min(limit.saturating_sub(pos));
        let end = (pos + need.max(ahead)).min(self.size);
        let keep = if pos >= self.base && pos < old_end {
            let from = (pos - self.base) as usize;
            self.buf.copy_within(from..self.filled, 0);
            self.filled - from
        } else {
            0
        };
        self.base = pos;
        let want = (end - pos) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        if want > keep {
            self.src
                .read_at(&mut self.buf[keep..want], pos + keep as u64)?;
            self.stats.bytes_read += (want - keep) as u64;
        }
        self.filled = want.max(keep);
        Ok(())
    }

    /// Hashes the data chunks emitted since the last flush, on all cores when there is enough.
    fn flush_hashes(&mut self, out: &mut [Entry]) {
        if self.pending.is_empty() {
            return;
        }
        let buf = &self.buf;
        let pending = std::mem::take(&mut self.pending);
        let hash = |p: Pending| {
            let (id, hashed) = super::pieces::hash_reusing(&buf[p.bytes], p.fires, &p.known);
            (p.index, id, hashed)
        };
        let hashes: Vec<(usize, blake3::Hash, usize)> = if self.pending_bytes >= PARALLEL_HASH {
            pending.into_par_iter().map(hash).collect()
        } else {
            pending.into_iter().map(hash).collect()
        };
        for (i, h, hashed) in hashes {
            out[i].kind = Kind::Data(h);
            self.stats.bytes_hashed += hashed as u64;
        }
        self.pending_bytes = 0;
    }
}
