//! Which restore points a replica keeps: a pure policy fed the generations it holds, the time
//! and the generations open files pin (like `sync::select`, it decides and does nothing).
//!
//! A generation is kept while it is among the newest `keep` *and* younger than `keep_for`
//! (each bound applies when it is set; neither set keeps only the newest). The newest
//! generation is always kept, and so is every generation an open file reads. Generation 0 (the
//! store before its first commit) is not a restore point: it goes once a newer one exists.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// `[replica] keep` and `keep_for`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep: Option<usize>,
    pub keep_for: Option<Duration>,
}

impl Policy {
    /// Whether restore points are kept at all (more than the newest generation).
    pub fn keeps_history(&self) -> bool {
        self.keep.is_some_and(|k| k > 1) || (self.keep.is_none() && self.keep_for.is_some())
    }
}

/// The generations to expire, oldest first. `held` is every generation the store holds, with
/// the time it was committed.
pub fn expired(
    policy: Policy,
    held: &[(u64, SystemTime)],
    pinned: &BTreeSet<u64>,
    now: SystemTime,
) -> Vec<u64> {
    let mut held = held.to_vec();
    held.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
    let count = match (policy.keep, policy.keep_for) {
        (Some(k), _) => k.max(1),
        (None, Some(_)) => usize::MAX,
        (None, None) => 1,
    };
    let mut out: Vec<u64> = held
        .iter()
        .enumerate()
        .filter(|&(i, &(n, at))| {
            let newest = i == 0;
            let too_many = i >= count;
            let too_old = policy
                .keep_for
                .is_some_and(|age| now.duration_since(at).unwrap_or_default() > age);
            !newest && !pinned.contains(&n) && (too_many || too_old || n == 0)
        })
        .map(|(_, &(n, _))| n)
        .collect();
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    fn held(n: u64, now: SystemTime) -> Vec<(u64, SystemTime)> {
        // Generation i committed (n - i) hours before now.
        (1..=n).map(|i| (i, now - H * (n - i) as u32)).collect()
    }

    #[test]
    fn by_count_by_age_and_both() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30);
        let h = held(10, now);
        let none = BTreeSet::new();
        let p = |keep, keep_for| Policy { keep, keep_for };
        assert_eq!(
            expired(p(None, None), &h, &none, now),
            (1..=9).collect::<Vec<_>>()
        );
        assert_eq!(
            expired(p(Some(3), None), &h, &none, now),
            (1..=7).collect::<Vec<_>>()
        );
        // Younger than 4.5 h: generations 6..=10.
        let age = Some(H * 9 / 2);
        assert_eq!(
            expired(p(None, age), &h, &none, now),
            (1..=5).collect::<Vec<_>>()
        );
        assert_eq!(
            expired(p(Some(3), age), &h, &none, now),
            (1..=7).collect::<Vec<_>>()
        );
        assert_eq!(
            expired(p(Some(8), age), &h, &none, now),
            (1..=5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_newest_and_the_pinned_are_never_expired() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30);
        let h = held(5, now);
        let p = Policy {
            keep: Some(0),
            keep_for: Some(Duration::ZERO),
        };
        assert_eq!(expired(p, &h, &BTreeSet::from([2]), now), vec![1, 3, 4]);
        assert!(expired(p, &h[4..], &BTreeSet::new(), now).is_empty());
    }

    #[test]
    fn the_empty_store_is_not_a_restore_point() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30);
        let h = vec![(0, now - H), (1, now)];
        let keep = Policy {
            keep: Some(24),
            keep_for: None,
        };
        assert_eq!(expired(keep, &h, &BTreeSet::new(), now), vec![0]);
        assert!(expired(keep, &h, &BTreeSet::from([0]), now).is_empty());
        assert!(expired(keep, &h[..1], &BTreeSet::new(), now).is_empty());
    }

    #[test]
    fn only_a_policy_beyond_the_newest_keeps_history() {
        let p = |keep, keep_for| Policy { keep, keep_for };
        assert!(!p(None, None).keeps_history());
        assert!(!p(Some(1), Some(H)).keeps_history());
        assert!(p(Some(2), None).keeps_history());
        assert!(p(None, Some(H)).keeps_history());
    }
}
