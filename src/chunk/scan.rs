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

/// What a scan read and hashed, to show that a re-chunk costs what the dirty bytes cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes read from the source (holes skipped by hint are not read).
    pub bytes_read: u64,
    /// Bytes hashed with BLAKE3 as data chunks.
    pub bytes_hashed: u64,
}

impl std::ops::AddAssign for ScanStats {
    fn add_assign(&mut self, o: ScanStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_hashed += o.bytes_hashed;
    }
}

/// Known-zero hint: the end of a run of zero bytes starting at the given offset (or the offset
/// itself when nothing is known).
pub(crate) type ZeroHint<'a> = dyn Fn(u64) -> io::Result<u64> + Sync + 'a;

const FIRST_READ: usize = 512 * 1024;
const MAX_READ: usize = 8 * 1024 * 1024;
/// Pending hash work above which chunks are hashed on all cores.
const PARALLEL_HASH: usize = 2 * 1024 * 1024;

pub(crate) struct Scanner<'a> {
    src: &'a dyn Source,
    hint: &'a ZeroHint<'a>,
    p: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    size: u64,
    /// Bytes `[base, base + buf.len())` of the image.
    buf: Vec<u8>,
    base: u64,
    read_size: usize,
    /// Data chunks emitted but not yet hashed: (index in the output, range in `buf`).
    pending: Vec<(usize, Range<usize>)>,
    pending_bytes: usize,
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
            base: 0,
            read_size: FIRST_READ,
            pending: Vec::new(),
            pending_bytes: 0,
            stats: ScanStats::default(),
        }
    }

    /// Scans from `start`, appending entries to `out`, until `stop(end)` returns true for the
    /// end of an emitted entry, or the end of the image.
    pub(crate) fn scan(
        &mut self,
        start: Start,
        out: &mut Vec<Entry>,
        stop: &mut dyn FnMut(u64) -> bool,
    ) -> io::Result<()> {
        let mut next = start;
        loop {
            let (entry, after) = match next {
                Start::Data(pos) if pos >= self.size => break,
                Start::Data(pos) => self.data_step(pos, out)?,
                Start::Zero { run_start, pos } => {
                    let end = self.zero_run_end(pos, out)?;
                    let e = Entry {
                        offset: run_start,
                        len: end - run_start,
                        kind: Kind::Zero,
                    };
                    (Some(e), Start::Data(end))
                }
            };
            next = after;
            if let Some(e) = entry {
                let end = e.end();
                out.push(e);
                if stop(end) {
                    break;
                }
            }
        }
        self.flush_hashes(out);
        Ok(())
    }

    /// One step at an entry start: either a data chunk (returned) or the start of a zero run
    /// (nothing returned yet; the next step scans the run).
    fn data_step(&mut self, pos: u64, out: &mut [Entry]) -> io::Result<(Option<Entry>, Start)> {
        let z = self.p.zero_min as u64;
        let max = self.p.max_size as u64;
        self.ensure(pos, max + z + ZERO_BLOCK, out)?;
        if pos % ZERO_BLOCK == 0 && self.zero_run_at(pos) {
            return Ok((
                None,
                Start::Zero {
                    run_start: pos,
                    pos: pos + z,
                },
            ));
        }
        let limit = (pos + max).min(self.size);
        let mut seg_end = limit;
        let mut q = align_down(pos) + ZERO_BLOCK;
        while q < limit {
            if self.zero_run_at(q) {
                seg_end = q;
                break;
            }
            q += ZERO_BLOCK;
        }
        let from = (pos - self.base) as usize;
        let to = (seg_end - self.base) as usize;
        let (_, len) = v2020::cut(
            &self.buf[from..to],
            self.p.min_size as usize,
            self.p.avg_size as usize,
            self.p.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        self.pending.push((out.len(), from..from + len));
        self.pending_bytes += len;
        let e = Entry {
            offset: pos,
            len: len as u64,
            kind: Kind::Data(blake3::Hash::from_bytes([0; 32])),
        };
        Ok((Some(e), Start::Data(pos + len as u64)))
    }

    /// True when a zero extent may start at aligned `q`: `zero_min` zero bytes within the image.
    /// The bytes must be in the buffer.
    fn zero_run_at(&self, q: u64) -> bool {
        let z = self.p.zero_min as u64;
        if q + z > self.size {
            return false;
        }
        let from = (q - self.base) as usize;
        is_zero(&self.buf[from..from + z as usize])
    }

    /// The end of the zero run that covers `[.., q)`: the aligned offset of the first block at or
    /// after `q` holding a non-zero byte, or the end of the image.
    fn zero_run_end(&mut self, mut q: u64, out: &mut [Entry]) -> io::Result<u64> {
        let mut hinted_at = None;
        loop {
            if q >= self.size {
                return Ok(self.size);
            }
            if hinted_at != Some(q) {
                let h = (self.hint)(q)?.min(self.size);
                if h >= self.size {
                    return Ok(self.size);
                }
                q = q.max(align_down(h));
                hinted_at = Some(q);
            }
            self.ensure(q, ZERO_BLOCK, out)?;
            while q < self.size {
                let end = (q + ZERO_BLOCK).min(self.size);
                if end > self.base + self.buf.len() as u64 {
                    break;
                }
                let block = &self.buf[(q - self.base) as usize..(end - self.base) as usize];
                if !is_zero(block) {
                    return Ok(q);
                }
                q = end;
            }
        }
    }

    /// Makes `[pos, pos + need)` (clipped to the image) available in the buffer, hashing what is
    /// pending first if the buffer must move.
    fn ensure(&mut self, pos: u64, need: u64, out: &mut [Entry]) -> io::Result<()> {
        let want_end = (pos + need).min(self.size);
        if pos >= self.base && want_end <= self.base + self.buf.len() as u64 {
            return Ok(());
        }
        self.flush_hashes(out);
        self.refill(pos, need)
    }

    /// Moves the buffer to start at `pos` and fills at least `need` bytes (clipped to the image),
    /// keeping bytes already read. Pending hashes must have been flushed.
    fn refill(&mut self, pos: u64, need: u64) -> io::Result<()> {
        debug_assert!(self.pending.is_empty());
        let end = (pos + need.max(self.read_size as u64)).min(self.size);
        let old_end = self.base + self.buf.len() as u64;
        let keep = if pos >= self.base && pos < old_end {
            let from = (pos - self.base) as usize;
            self.buf.drain(..from);
            self.buf.len()
        } else {
            self.buf.clear();
            0
        };
        self.base = pos;
        let want = (end - pos) as usize;
        if want > keep {
            self.buf.resize(want, 0);
            self.src.read_at(&mut self.buf[keep..], pos + keep as u64)?;
            self.stats.bytes_read += (want - keep) as u64;
        }
        self.read_size = (self.read_size * 2).min(MAX_READ);
        Ok(())
    }

    /// Hashes the data chunks emitted since the last flush, on all cores when there is enough.
    fn flush_hashes(&mut self, out: &mut [Entry]) {
        if self.pending.is_empty() {
            return;
        }
        let buf = &self.buf;
        let hash = |(i, r): &(usize, Range<usize>)| (*i, blake3::hash(&buf[r.clone()]));
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
