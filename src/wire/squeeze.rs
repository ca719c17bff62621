//! Compression of whole chunks on the wire (zstd, level 1), and when not to try it.
//!
//! A chunk goes compressed only when that saves at least a tenth. Trying costs about as much as
//! hashing the chunk twice, and a VM image is full of data that never compresses (encrypted
//! disks, media, already compressed files): in a bulk sync of such data zstd took more than a
//! third of the sending threads' time for nothing. So each sending thread backs off: after a
//! chunk that did not compress it sends the next ones as they are, one more each time up to
//! [`MAX_SKIP`], and tries every chunk again as soon as one compresses. Mixed data loses at most
//! `MAX_SKIP` chunks' worth of compression after a run of incompressible ones.
//!
//! Each thread keeps its own zstd contexts: making one costs a few hundred KiB of zeroed memory
//! per chunk otherwise.

use std::cell::RefCell;

/// The most chunks sent as they are after a run of incompressible ones, before trying again.
pub const MAX_SKIP: u32 = 16;

/// The back-off (pure): fed each outcome, says whether to try the next chunk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    /// Chunks still to send without trying.
    skip: u32,
    /// How many the last failure skips.
    step: u32,
}

impl Backoff {
    /// Whether to try compressing the next chunk (counts it when not).
    pub fn try_next(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// What trying gave: `saved` when the chunk went compressed.
    pub fn tried(&mut self, saved: bool) {
        if saved {
            self.step = 0;
        } else {
            self.step = (self.step + 1).min(MAX_SKIP);
        }
        self.skip = self.step;
    }
}

thread_local! {
    static PACK: RefCell<(Option<zstd::bulk::Compressor<'static>>, Backoff)> =
        RefCell::new((None, Backoff::default()));
    static UNPACK: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// `data` compressed when that saves at least a tenth: (compressed, bytes to send).
pub fn pack(data: Vec<u8>) -> (bool, Vec<u8>) {
    PACK.with_borrow_mut(|(ctx, backoff)| {
        if !backoff.try_next() {
            return (false, data);
        }
        if ctx.is_none() {
            *ctx = zstd::bulk::Compressor::new(1).ok();
        }
        let packed = ctx
            .as_mut()
            .and_then(|c| c.compress(&data).ok())
            .unwrap_or_default();
        let saved = !packed.is_empty() && packed.len() * 10 < data.len() * 9;
        backoff.tried(saved);
        if saved { (true, packed) } else { (false, data) }
    })
}

/// Decompresses a chunk of at most `max` bytes.
pub fn unpack(data: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    UNPACK.with_borrow_mut(|ctx| {
        if ctx.is_none() {
            *ctx = Some(zstd::bulk::Decompressor::new()?);
        }
        ctx.as_mut().expect("made above").decompress(data, max)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_each_failure_and_resets_at_a_success() {
        let mut b = Backoff::default();
        let mut tried = Vec::new();
        // Ten incompressible chunks in a row: tried at 0, 2, 5 and 9 (skipping 1, 2, then 3).
        for i in 0..10 {
            if b.try_next() {
                tried.push(i);
                b.tried(false);
            }
        }
        assert_eq!(tried, vec![0, 2, 5, 9]);
        // The skips stop growing at MAX_SKIP.
        for _ in 0..1000 {
            if b.try_next() {
                b.tried(false);
            }
        }
        assert!(b.step <= MAX_SKIP && b.skip <= MAX_SKIP);
        // A success: every chunk is tried again.
        while !b.try_next() {}
        b.tried(true);
        assert!(b.try_next() && b.try_next());
    }

    #[test]
    fn compressible_chunks_go_compressed_and_round_trip() {
        let text = b"a disaster-recovery copy that is never corrupt; ".repeat(1000);
        let (zstd, packed) = pack(text.clone());
        assert!(zstd && packed.len() < text.len() / 10);
        assert_eq!(unpack(&packed, text.len()).unwrap(), text);
        // Incompressible data goes as it is, and so do the next chunks for a while, but
        // compressible data is compressed again within MAX_SKIP + 1 chunks.
        let noise = crate::testutil::random(65536, 1);
        assert_eq!(pack(noise.clone()), (false, noise));
        let compressed = (0..=MAX_SKIP).filter(|_| pack(text.clone()).0).count();
        assert!(compressed >= 1);
    }
}
