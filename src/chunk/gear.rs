//! FastCDC's cut rule, position by position, and where in a chunk's bytes it can fire,
//! remembered so that a re-chunk tests clean bytes by lookup instead of hashing them again.
//!
//! FastCDC 2020 (normalisation level 1, as `fastcdc::v2020::cut` applies it) ends a chunk
//! starting at `c` before the first position `j` in `[c + min_size, end)` where the gear hash
//! of the bytes from `c + min_size` to `j` has no bit of the mask set: the strict mask while
//! `j - c < avg_size`, the loose one from there. Positions are tested up to the window's length
//! rounded down to even (the crate tests them in byte pairs) and `max_size`; if none fires the
//! chunk takes the whole window.
//!
//! The masks use only the hash's low 48 bits, and a byte's contribution to those is gone 48
//! bytes later (the hash shifts left by one per byte). So from 48 bytes past `c + min_size` on,
//! the rule's outcome at `j` is a function of the 48 bytes ending at `j` alone: of a *free*
//! gear hash that runs over the whole image, whatever the chunk's start. Where that free hash
//! meets either mask is a *hit*: about 2.5 per 64 KiB. A chunk's hits (positions relative to its
//! start, from [`Fires::from`] on) are its [`Fires`]; they depend only on its bytes (`from` is
//! at least [`WINDOW`]), so they are cached by chunk id with its pieces' values (`pieces.rs`).
//! A scan that crosses clean bytes of a chunk whose fires are known finds every cut there from
//! the hits (`scan.rs`); only the bytes a write reaches, and the first [`WINDOW`] past each
//! chunk start, are hashed again.

use fastcdc::v2020::{self, Normalization};

use super::ChunkParams;

/// How far back a position's outcome reaches (48 bytes, rounded up to be safe). Also the least
/// [`Fires::from`]: a hit closer to a chunk's start would depend on the bytes before it.
pub(crate) const WINDOW: u64 = 64;

/// Flags of a hit (the low two bits; the position is the rest).
const STRICT: u32 = 1;
const LOOSE: u32 = 2;

/// Where the free gear hash meets a mask in one chunk's bytes: every hit at a position in
/// `[from, len)`, in order, each `position << 2 | flags`, for the masks of `avg_size` `avg`
/// (the same bytes chunked with another average have other hits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Fires {
    pub(crate) avg: u32,
    pub(crate) from: u32,
    pub(crate) hits: Box<[u32]>,
}

impl Fires {
    /// The hits at positions in `[from, to)`.
    pub(crate) fn between(&self, from: u64, to: u64) -> &[u32] {
        let lo = self.hits.partition_point(|&h| u64::from(h >> 2) < from);
        let hi = self.hits.partition_point(|&h| u64::from(h >> 2) < to);
        &self.hits[lo..hi]
    }

    pub(crate) fn bytes(&self) -> usize {
        self.hits.len() * size_of::<u32>()
    }
}

/// A hit's position.
pub(crate) fn position(hit: u32) -> u64 {
    u64::from(hit >> 2)
}

/// The same hit at another position (a chunk's hits, seen from another start).
pub(crate) fn moved(hit: u32, to: u64) -> u32 {
    (to as u32) << 2 | hit & (STRICT | LOOSE)
}

/// The rule for one set of chunk parameters.
pub(crate) struct Rule {
    gear: &'static [u64; 256],
    mask_s: u64,
    mask_l: u64,
    /// Bits both masks hold: a position is a hit only if the hash has none of them.
    both: u64,
    pub(crate) min: u64,
    avg: u64,
    max: u64,
}

impl Rule {
    pub(crate) fn new(p: ChunkParams) -> Rule {
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        let gear = match v2020::get_gear_with_seed(0).0 {
            std::borrow::Cow::Borrowed(g) => g.try_into().expect("a gear table has 256 entries"),
            std::borrow::Cow::Owned(_) => unreachable!("seed 0 borrows the static table"),
        };
        Rule {
            gear,
            mask_s,
            mask_l,
            both: mask_s & mask_l,
            min: p.min_size as u64,
            avg: p.avg_size as u64,
            max: p.max_size as u64,
        }
    }

    /// True when the rule fires at a hit `at` bytes into the chunk (past the truncated start).
    pub(crate) fn fires(&self, hit: u32, at: u64) -> bool {
        hit & if at < self.avg { STRICT } else { LOOSE } != 0
    }

    /// The positions up to which the rule is tested in a chunk whose window holds `w` bytes,
    /// and the chunk's length if it fires nowhere: `(last, len)`. `last <= min` means none.
    pub(crate) fn window(&self, w: u64) -> (u64, u64) {
        let rem = w.min(self.max);
        if rem <= self.min {
            return (0, rem);
        }
        (rem & !1, rem)
    }

    /// Appends the hits of the free hash at positions `[from, to)` of `bytes` to `out`, as
    /// positions counted from `base` (`base <= from`), stopping after the first where the rule
    /// fires in a chunk starting at `base` if `stop`. The hash is warmed over the [`WINDOW`]
    /// bytes before `from` (or from 0); so hits are exact where `from >= WINDOW` or the image
    /// starts at `bytes[0]`. Returns the number of bytes hashed.
    pub(crate) fn scan(
        &self,
        bytes: &[u8],
        from: usize,
        to: usize,
        base: usize,
        out: &mut Vec<u32>,
        stop: bool,
    ) -> u64 {
        let mut hash = 0u64;
        let warm = from.saturating_sub(WINDOW as usize);
        for &b in &bytes[warm..from] {
            hash = (hash << 1).wrapping_add(self.gear[b as usize]);
        }
        let (gear, both, edge) = (self.gear, self.both, self.min + WINDOW);
        let mut hit = |hash: u64, j: usize| {
            let at = (j - base) as u64;
            let strict = if hash & self.mask_s == 0 { STRICT } else { 0 };
            let flags = strict | if hash & self.mask_l == 0 { LOOSE } else { 0 };
            if flags == 0 {
                return false;
            }
            let h = (at as u32) << 2 | flags;
            out.push(h);
            stop && at >= edge && self.fires(h, at)
        };
        // Two bytes a step, as the crate's cut does: the first byte's hash is kept shifted left
        // by one (its low bit is then zero, which no mask shifted by one tests).
        let (mut j, both_ls) = (from, both << 1);
        while j + 1 < to {
            let a = (hash << 2).wrapping_add(gear[bytes[j] as usize] << 1);
            if a & both_ls == 0 && hit(a >> 1, j) {
                return (j + 1 - warm) as u64;
            }
            hash = a.wrapping_add(gear[bytes[j + 1] as usize]);
            if hash & both == 0 && hit(hash, j + 1) {
                return (j + 2 - warm) as u64;
            }
            j += 2;
        }
        if j < to {
            hash = (hash << 1).wrapping_add(gear[bytes[j] as usize]);
            if hash & both == 0 {
                hit(hash, j);
            }
        }
        (to - warm) as u64
    }

    /// The first position in `[from, to)` of the chunk `chunk` (its bytes from its start) where
    /// the rule fires with the hash as the crate computes it, started at `min_size`: needed
    /// where that differs from the free hash, the first [`WINDOW`] positions past `min_size`.
    pub(crate) fn first_from_min(&self, chunk: &[u8], from: u64, to: u64) -> Option<u64> {
        let (from, to) = (from.max(self.min) as usize, to as usize);
        let mut hash = 0u64;
        for (j, &b) in chunk.iter().enumerate().take(to).skip(self.min as usize) {
            hash = (hash << 1).wrapping_add(self.gear[b as usize]);
            let mask = if (j as u64) < self.avg {
                self.mask_s
            } else {
                self.mask_l
            };
            if j >= from && hash & mask == 0 {
                return Some(j as u64);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;

    fn crate_cut(p: ChunkParams, window: &[u8]) -> usize {
        let (mask_s, mask_l) = v2020::select_masks(p.avg_size as usize, Normalization::Level1);
        v2020::cut(
            window,
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

    /// The rule's cut from the free hash's hits (and the hash from `min_size` for the first
    /// [`WINDOW`] positions past it).
    fn rule_cut(rule: &Rule, window: &[u8]) -> usize {
        let (last, len) = rule.window(window.len() as u64);
        if last <= rule.min {
            return len as usize;
        }
        let edge = (rule.min + WINDOW).min(last);
        if let Some(j) = rule.first_from_min(window, rule.min, edge) {
            return j as usize;
        }
        let mut hits = Vec::new();
        rule.scan(window, edge as usize, last as usize, 0, &mut hits, true);
        hits.iter()
            .find(|&&h| rule.fires(h, position(h)))
            .map_or(len as usize, |&h| position(h) as usize)
    }

    /// From every start, with every window length class (short, odd, past `max_size`), the
    /// rule cuts where the crate does; and a chunk's hits scanned from its start equal the
    /// image's hits seen from there (they depend on the chunk's bytes only).
    #[test]
    fn the_rule_from_hits_cuts_where_the_crate_does() {
        for p in [
            ChunkParams::default(),
            ChunkParams {
                min_size: 256,
                avg_size: 1024,
                max_size: 4096,
                zero_min: 4096,
            },
        ] {
            let rule = Rule::new(p);
            let data = random(3 << 20, 7);
            let mut all = Vec::new();
            rule.scan(&data, 0, data.len(), 0, &mut all, false);
            let (mut pos, mut cuts) = (0, 0);
            while pos < data.len() {
                for w in [
                    p.max_size as usize + 9,
                    3 * p.avg_size as usize / 2 + 1,
                    301,
                ] {
                    let window = &data[pos..(pos + w).min(data.len())];
                    assert_eq!(
                        rule_cut(&rule, window),
                        crate_cut(p, window),
                        "at {pos}+{w}"
                    );
                }
                let window = &data[pos..(pos + p.max_size as usize).min(data.len())];
                let len = crate_cut(p, window);
                let from = WINDOW as usize;
                let mut mine = Vec::new();
                rule.scan(window, from, len, 0, &mut mine, false);
                let lo = all.partition_point(|&h| (position(h) as usize) < pos + from);
                let hi = all.partition_point(|&h| (position(h) as usize) < pos + len);
                let seen: Vec<u32> = all[lo..hi]
                    .iter()
                    .map(|&h| h - ((pos as u32) << 2))
                    .collect();
                assert_eq!(mine, seen, "hits of the chunk at {pos}");
                pos += len;
                cuts += 1;
            }
            assert!(cuts > 30, "{cuts} chunks");
            assert!(all.len() > cuts, "{} hits", all.len());
        }
    }
}
