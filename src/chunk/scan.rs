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

use fastcdc::v2020::{self, Normalization};
use rayon::prelude::*;

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

/// For a data chunk starting at the given offset, how far into it FastCDC's rule is known not
/// to fire (0 when nothing is known): see [`Scanner::with_known`].
pub(crate) type KnownNoCut<'a> = dyn Fn(u64) -> u64 + Sync + 'a;

/// The bytes before a position that FastCDC's gear hash still depends on there: each pair of
/// bytes shifts the hash left by two, so a byte's contribution is gone 64 bytes later.
const GEAR_MEMORY: u64 = 64;

/// Known-zero hint: the end of a run of zero bytes starting at the given offset (or the offset
/// itself when nothing is known).
pub(crate) type ZeroHint<'a> = dyn Fn(u64) -> io::Result<u64> + Sync + 'a;

/// First read of a scan, and after a jump; each read that continues the last doubles, up to
/// `MAX_READ`.
const FIRST_READ: u64 = 16 * 1024;
const MAX_READ: u64 = 8 * 1024 * 1024;
/// Pending hash work above which chunks are hashed on all cores.
const PARALLEL_HASH: usize = 4 * 1024 * 1024;

pub(crate) struct Scanner<'a> {
    src: &'a dyn Source,
    hint: &'a ZeroHint<'a>,
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    size: u64,
    /// `buf[..filled]` holds the image bytes `[base, base + filled)`.
    buf: Vec<u8>,
    filled: usize,
    base: u64,
    read_size: u64,
    /// Data chunks emitted but not yet hashed: (index in the output, range in `buf`).
    pending: Vec<(usize, Range<usize>)>,
    pending_bytes: usize,
    known: Option<&'a KnownNoCut<'a>>,
    pub(crate) stats: ScanStats,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(src: &'a dyn Source, hint: &'a ZeroHint<'a>, p: ChunkParams) -> Self {
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        Scanner {
            src,
            hint,
            p,
            mask_s,
            mask_l,
            size: src.size(),
            buf: Vec::new(),
            filled: 0,
            base: 0,
            read_size: FIRST_READ / 2,
            pending: Vec::new(),
            pending_bytes: 0,
            known: None,
            stats: ScanStats::default(),
        }
    }

    /// Lets the scan skip what is known: `known(pos)` is how many bytes into a data chunk
    /// starting at `pos` the rule provably does not fire (a re-chunk knows this of a stale
    /// chunk's bytes up to its first dirty byte: the stale scan tested them). The gear hash then
    /// starts [`GEAR_MEMORY`] bytes before that point instead of at `min_size`, which gives the
    /// same hash from that point on; a cut found in those warm-up bytes is not trusted and
    /// the chunk is cut from `min_size`.
    pub(crate) fn with_known(mut self, known: &'a KnownNoCut<'a>) -> Self {
        self.known = Some(known);
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
            want = (want * 2).min(limit - pos + z);
        };
        Ok(Some(self.data_entry(pos, len, out)))
    }

    /// Records a data chunk for hashing at the next flush and returns its entry; the caller
    /// pushes it right away, so it will be `out[out.len()]`.
    fn data_entry(&mut self, pos: u64, len: u64, out: &[Entry]) -> Entry {
        let from = (pos - self.base) as usize;
        self.pending.push((out.len(), from..from + len as usize));
        self.pending_bytes += len as usize;
        Entry {
            offset: pos,
            len,
            kind: Kind::Data(blake3::Hash::from_bytes([0; 32])),
        }
    }

    /// FastCDC's cut for a chunk starting at `pos` in a segment ending at `end` (buffered).
    fn cut(&mut self, pos: u64, end: u64) -> u64 {
        let min = self.p.min_size as u64;
        // Where the hash may start: a whole gear memory before the first position whose
        // outcome is not known, on the rule's pair boundary, and not before `min_size`.
        let known = self.known.map_or(0, |k| k(pos)).min(end - pos);
        let from = known.saturating_sub(GEAR_MEMORY) & !1;
        if from > min {
            let len = from + self.cut_from(pos + from, end, from);
            if len >= known {
                return len;
            }
            // The rule fired in the warm-up, where the hash is not yet the real one.
        }
        self.cut_from(pos, end, 0)
    }

    /// FastCDC's cut of the chunk starting `skip` bytes before `at`, hashing from `at` (from
    /// `min_size` when `skip` is 0): the cut's length counted from `at`.
    fn cut_from(&mut self, at: u64, end: u64, skip: u64) -> u64 {
        let from = (at - self.base) as usize;
        let to = (end - self.base) as usize;
        let (min, avg, max) = match skip {
            0 => (
                self.p.min_size as usize,
                self.p.avg_size as usize,
                self.p.max_size as usize,
            ),
            s => (
                0,
                (self.p.avg_size as u64).saturating_sub(s) as usize,
                (self.p.max_size as u64 - s) as usize,
            ),
        };
        let (_, len) = v2020::cut(
            &self.buf[from..to],
            min,
            avg,
            max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        self.stats.bytes_cut += (len as u64).saturating_sub(min as u64);
        len as u64
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
        let want_end = (pos + need).min(self.size);
        if pos >= self.base && want_end <= self.base + self.filled as u64 {
            return Ok(());
        }
        self.flush_hashes(out);
        // Keep what is buffered from `pos` on, and read on from there. Reads grow while the scan
        // streams on and start small again after a jump (over a hole, to another run).
        let old_end = self.base + self.filled as u64;
        if pos >= self.base && pos <= old_end {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else {
            self.read_size = FIRST_READ;
        }
        let end = (pos + need.max(self.read_size)).min(self.size);
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
        let hash = |(i, r): &(usize, Range<usize>)| (*i, super::pieces::hash(&buf[r.clone()]));
        let hashes: Vec<(usize, blake3::Hash)> = if self.pending_bytes >= PARALLEL_HASH {
            self.pending.par_iter().map(hash).collect()
        } else {
            self.pending.iter().map(hash).collect()
        };
        for (i, h) in hashes {
            out[i].kind = Kind::Data(h);
        }
        self.stats.bytes_hashed += self.pending_bytes as u64;
        self.pending.clear();
        self.pending_bytes = 0;
    }
}
