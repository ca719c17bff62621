//! Dirty tracking: the set of byte ranges written since the last sync point ([`RangeSet`]), and
//! the crash-persistent intent log that says, after an unclean stop, which extents may hold
//! changes the replicas have not seen ([`IntentLog`]).
//!
//! The filesystem core calls both on every write: [`IntentLog::mark`] before the bytes reach the
//! backing file (a lock and a lookup unless the extent is newly dirty), then
//! [`RangeSet::insert`] once they have.

mod intent;

pub use intent::{
    DEFAULT_EXTENT_SIZE, FILE_NAME, HOT, IntentError, IntentLog, Recovery, SyncToken,
};

use std::collections::BTreeMap;
use std::ops::Range;

/// How many ranges a [`RangeSet`] holds before it coarsens, by default: about 2 MiB of map
/// (29 bytes a range, measured), and 5 s of random 4 KiB writes at 50 MB/s. At 16,384 the set
/// coarsened after 1.3 s of such writes, and a sync point that fell that far behind then
/// re-read and shipped gaps four times the size of the writes, and fell further behind
/// (docs/BENCHMARKS.md, "A one-second RPO under load").
pub const DEFAULT_LIMIT: usize = 65536;

/// Sorted, disjoint, non-adjacent half-open byte ranges of one image. Adjacent or overlapping
/// inserts merge. Memory is bounded: when the number of ranges exceeds `limit`, the ranges with
/// the smallest gaps between them are merged (coarsened) until at most `limit * 3 / 4` remain; a
/// range is never dropped, coverage only grows.
///
/// Insert is O(log n) amortised: a range is removed at most once after it was inserted, and a
/// coarsening pass (O(n)) runs at most once per `limit / 4` inserts.
///
/// Two sets are equal when they hold the same ranges and have the same limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end of each range.
    map: BTreeMap<u64, u64>,
    limit: usize,
    /// Sum of the ranges' lengths.
    covered: u64,
}

impl Default for RangeSet {
    fn default() -> Self {
        RangeSet::new()
    }
}

impl RangeSet {
    /// An empty set that holds up to [`DEFAULT_LIMIT`] ranges before it coarsens.
    pub fn new() -> Self {
        RangeSet::with_limit(DEFAULT_LIMIT)
    }

    /// An empty set that coarsens when it holds more than `limit` ranges (a limit of 0 counts as
    /// 1; `usize::MAX` never coarsens, so the set stays exact).
    pub fn with_limit(limit: usize) -> Self {
        RangeSet {
            map: BTreeMap::new(),
            limit: limit.max(1),
            covered: 0,
        }
    }

    /// The number of ranges above which the set coarsens.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Adds `r`, merging it with the ranges it overlaps or touches. Empty ranges are ignored.
    pub fn insert(&mut self, r: Range<u64>) {
        self.merge(r);
        if self.map.len() > self.limit {
            self.coarsen();
        }
    }

    /// Adds every range of `other` (a union). A failed sync puts its frozen set back this way.
    pub fn extend_from(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.merge(r);
        }
        if self.map.len() > self.limit {
            self.coarsen();
        }
    }

    /// The ranges in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    pub fn to_vec(&self) -> Vec<Range<u64>> {
        self.iter().collect()
    }

    /// The parts of the ranges that lie inside `r`, clipped to `r`, in ascending order.
    pub fn overlapping(&self, r: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let Range { start, end } = r;
        let live = start < end;
        // The one range that may start before `r` and reach into it.
        let before = live
            .then(|| self.map.range(..start).next_back())
            .flatten()
            .filter(|&(_, &e)| e > start);
        let inside = live.then(|| self.map.range(start..end));
        before
            .into_iter()
            .chain(inside.into_iter().flatten())
            .map(move |(&s, &e)| s.max(start)..e.min(end))
    }

    /// Whether every byte of `r` is in the set (true for an empty `r`).
    pub fn contains_range(&self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        self.map
            .range(..=r.start)
            .next_back()
            .is_some_and(|(_, &e)| e >= r.end)
    }

    /// The number of ranges.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The number of bytes the ranges cover.
    pub fn covered_bytes(&self) -> u64 {
        self.covered
    }

    /// Swaps the set for an empty one with the same limit and returns the old content (the
    /// freeze at a sync point).
    pub fn take(&mut self) -> RangeSet {
        std::mem::replace(self, RangeSet::with_limit(self.limit))
    }

    /// Inserts `r` without coarsening.
    fn merge(&mut self, r: Range<u64>) {
        let Range {
            start: mut s,
            end: mut e,
        } = r;
        if s >= e {
            return;
        }
        // The range starting at or before `s` absorbs `r` if it reaches `s`.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back()
            && pe >= s
        {
            if pe >= e {
                return;
            }
            self.map.remove(&ps);
            self.covered -= pe - ps;
            s = ps;
        }
        // Every range starting inside `[s, e]` merges; each is removed once, so this is
        // amortised O(log n).
        while let Some((&ns, &ne)) = self.map.range(s..=e).next() {
            self.map.remove(&ns);
            self.covered -= ne - ns;
            e = e.max(ne);
        }
        self.map.insert(s, e);
        self.covered += e - s;
    }

    /// Merges the ranges separated by the smallest gaps until at most `limit * 3 / 4` remain,
    /// in one O(n) pass.
    fn coarsen(&mut self) {
        let target = ((self.limit as u128 * 3 / 4) as usize).max(1);
        let n = self.map.len();
        if n <= target {
            return;
        }
        let ranges: Vec<(u64, u64)> = std::mem::take(&mut self.map).into_iter().collect();
        // Gap i lies between range i and range i + 1. Close the `n - target` smallest (ties
        // broken by position, so the result is deterministic).
        let mut gaps: Vec<(u64, usize)> = ranges
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].0 - w[0].1, i))
            .collect();
        let close = n - target;
        gaps.select_nth_unstable(close - 1);
        let mut closed = vec![false; n - 1];
        for &(_, i) in &gaps[..close] {
            closed[i] = true;
        }
        let mut current = ranges[0];
        for (i, &(s, e)) in ranges.iter().enumerate().skip(1) {
            if closed[i - 1] {
                self.covered += s - current.1;
                current.1 = e;
            } else {
                self.map.insert(current.0, current.1);
                current = (s, e);
            }
        }
        self.map.insert(current.0, current.1);
        log::debug!(
            "dirty set coarsened from {n} to {} ranges ({} bytes covered)",
            self.map.len(),
            self.covered
        );
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for r in iter {
            set.insert(r);
        }
        set
    }
}

/// The new name of `path` when `from` (an image or a directory) becomes `to`; `None` when
/// `path` is not `from` or below it.
pub fn rebase(
    path: &std::path::Path,
    from: &std::path::Path,
    to: &std::path::Path,
) -> Option<std::path::PathBuf> {
    let rest = path.strip_prefix(from).ok()?;
    Some(if rest.as_os_str().is_empty() {
        to.to_path_buf()
    } else {
        to.join(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(ranges: &[Range<u64>]) -> RangeSet {
        ranges.iter().cloned().collect()
    }

    #[test]
    fn overlapping_and_adjacent_inserts_merge() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.to_vec(), vec![10..20, 30..40]);
        s.insert(20..25); // adjacent on the left
        assert_eq!(s.to_vec(), vec![10..25, 30..40]);
        s.insert(25..30); // fills the gap exactly
        assert_eq!(s.to_vec(), vec![10..40]);
        s.insert(0..5);
        s.insert(50..60);
        s.insert(3..55); // swallows everything around it
        assert_eq!(s.to_vec(), vec![0..60]);
        s.insert(5..6); // inside: no change
        assert_eq!(s.to_vec(), vec![0..60]);
        assert_eq!(s.covered_bytes(), 60);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn empty_ranges_are_ignored() {
        let mut s = RangeSet::new();
        s.insert(5..5);
        #[allow(clippy::reversed_empty_ranges)]
        s.insert(9..3);
        assert!(s.is_empty());
        assert_eq!(s.covered_bytes(), 0);
    }

    #[test]
    fn ranges_reach_the_end_of_the_offset_space() {
        let mut s = RangeSet::new();
        s.insert(u64::MAX - 10..u64::MAX);
        s.insert(u64::MAX - 20..u64::MAX - 10);
        assert_eq!(s.to_vec(), vec![u64::MAX - 20..u64::MAX]);
        assert!(s.contains_range(u64::MAX - 1..u64::MAX));
        assert_eq!(
            s.overlapping(u64::MAX - 5..u64::MAX).collect::<Vec<_>>(),
            vec![u64::MAX - 5..u64::MAX]
        );
    }

    #[test]
    fn overlapping_clips_to_the_query() {
        let s = set(&[0..10, 20..30, 40..50]);
        let q = |r: Range<u64>| s.overlapping(r).collect::<Vec<_>>();
        assert_eq!(q(5..45), vec![5..10, 20..30, 40..45]);
        assert_eq!(q(10..20), vec![]);
        assert_eq!(q(25..26), vec![25..26]);
        assert_eq!(q(0..100), s.to_vec());
        assert_eq!(q(30..30), vec![]);
    }

    #[test]
    fn contains_range_needs_one_range_holding_it_all() {
        let s = set(&[0..10, 20..30]);
        assert!(s.contains_range(0..10));
        assert!(s.contains_range(22..23));
        assert!(!s.contains_range(5..15));
        assert!(!s.contains_range(15..16));
        assert!(!s.contains_range(9..21));
        assert!(s.contains_range(40..40));
    }

    #[test]
    fn coarsening_closes_the_smallest_gaps_first() {
        let mut s = RangeSet::with_limit(4);
        // Gaps: 100, 1, 50, 2.
        for r in [0..10, 110..120, 121..130, 180..190, 192..200] {
            s.insert(r);
        }
        // Five ranges exceed the limit of four: down to three by closing the gaps of 1 and 2.
        assert_eq!(s.to_vec(), vec![0..10, 110..130, 180..200]);
        assert_eq!(s.covered_bytes(), 10 + 20 + 20);
    }

    #[test]
    fn coarsening_is_batched() {
        let mut s = RangeSet::with_limit(100);
        for i in 0..101u64 {
            s.insert(i * 10..i * 10 + 1);
        }
        assert_eq!(s.len(), 75);
        // The next 25 disjoint inserts do not coarsen again.
        for i in 0..25u64 {
            s.insert(10_000 + i * 10..10_000 + i * 10 + 1);
        }
        assert_eq!(s.len(), 100);
    }

    #[test]
    fn a_limit_of_one_keeps_one_range_spanning_everything() {
        let mut s = RangeSet::with_limit(0);
        assert_eq!(s.limit(), 1);
        s.insert(10..20);
        s.insert(100..110);
        s.insert(50..60);
        assert_eq!(s.to_vec(), vec![10..110]);
    }

    #[test]
    fn take_leaves_an_empty_set_with_the_same_limit() {
        let mut s = RangeSet::with_limit(7);
        s.insert(1..2);
        let old = s.take();
        assert_eq!(old.to_vec(), vec![1..2]);
        assert!(s.is_empty());
        assert_eq!(s.limit(), 7);
        assert_eq!(s.covered_bytes(), 0);
    }

    #[test]
    fn extend_from_is_a_union() {
        let mut a = set(&[0..10, 50..60]);
        let b = set(&[5..20, 30..40, 60..61]);
        a.extend_from(&b);
        assert_eq!(a.to_vec(), vec![0..20, 30..40, 50..61]);
        assert_eq!(a.covered_bytes(), 20 + 10 + 11);
    }

    /// The model: one bit per byte of a small offset space.
    const SPACE: u64 = 600;

    fn bits_of(s: &RangeSet) -> Vec<bool> {
        let mut bits = vec![false; SPACE as usize];
        for r in s.iter() {
            for b in r {
                bits[b as usize] = true;
            }
        }
        bits
    }

    fn runs(bits: &[bool]) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            let i = i as u64;
            match out.last_mut() {
                Some(r) if b && r.end == i => r.end = i + 1,
                _ if b => out.push(i..i + 1),
                _ => {}
            }
        }
        out
    }

    fn check_shape(s: &RangeSet) {
        let v = s.to_vec();
        for r in &v {
            assert!(r.start < r.end, "empty range in {v:?}");
        }
        for w in v.windows(2) {
            assert!(
                w[0].end < w[1].start,
                "unsorted, overlapping or adjacent: {v:?}"
            );
        }
        assert!(
            v.len() <= s.limit(),
            "{} ranges over limit {}",
            v.len(),
            s.limit()
        );
        assert_eq!(
            s.covered_bytes(),
            v.iter().map(|r| r.end - r.start).sum::<u64>()
        );
        assert_eq!(s.len(), v.len());
    }

    fn range_strategy() -> impl Strategy<Value = Range<u64>> {
        (0..SPACE, 0..40u64).prop_map(|(s, l)| s..(s + l).min(SPACE))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against a bitmap: coverage always includes what was inserted, equals it exactly
        /// while the exact set never had more ranges than the limit, and queries agree.
        #[test]
        fn matches_a_bitmap_model(
            limit in prop_oneof![1usize..12, Just(DEFAULT_LIMIT)],
            inserts in proptest::collection::vec(range_strategy(), 0..80),
            queries in proptest::collection::vec(range_strategy(), 1..8),
            other in proptest::collection::vec(range_strategy(), 0..20),
        ) {
            let mut s = RangeSet::with_limit(limit);
            let mut model = vec![false; SPACE as usize];
            let mut exact = true;
            for r in inserts {
                for b in r.clone() {
                    model[b as usize] = true;
                }
                exact &= runs(&model).len() <= limit;
                s.insert(r);
                check_shape(&s);
                let got = bits_of(&s);
                for (i, &m) in model.iter().enumerate() {
                    prop_assert!(!m || got[i], "byte {} inserted but not covered", i);
                }
                if exact {
                    prop_assert_eq!(s.to_vec(), runs(&model));
                }
            }
            for q in queries {
                let expect: Vec<Range<u64>> = s
                    .iter()
                    .filter_map(|r| {
                        let (a, b) = (r.start.max(q.start), r.end.min(q.end));
                        (a < b).then_some(a..b)
                    })
                    .collect();
                prop_assert_eq!(s.overlapping(q.clone()).collect::<Vec<_>>(), expect);
                let bits = bits_of(&s);
                let all = q.clone().all(|b| bits[b as usize]);
                prop_assert_eq!(s.contains_range(q), all);
            }
            // Union with another set covers both.
            let before = bits_of(&s);
            let o: RangeSet = other.into_iter().collect();
            s.extend_from(&o);
            check_shape(&s);
            let after = bits_of(&s);
            let ob = bits_of(&o);
            for i in 0..SPACE as usize {
                prop_assert!(!(before[i] || ob[i]) || after[i]);
            }
        }
    }
}
