//! The failover decisions, as pure functions of what the agents observed: when a primary must
//! fence itself, how long a replica waits before it campaigns, and the epoch a leader key
//! stands for. Fed their inputs (times, ranks, revisions); no etcd, no clock.

use std::time::{Duration, Instant};

/// How long before its lease can expire a primary stops acknowledging writes: a quarter of the
/// ttl, at least one second. The lease is counted from when etcd received the last renewal,
/// which is no earlier than when the primary sent it, so fencing at `sent + ttl - margin`
/// always comes before etcd can let the key go, whatever the primary's clock says (monotonic
/// time only).
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_secs(1)).min(ttl / 2)
}

/// How often a primary renews its lease: three times per ttl, so one lost renewal costs nothing.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// How soon a primary tries again after a renewal failed (an etcd member down or slow: the
/// next attempt may reach another): a sixteenth of the ttl, at least 100 ms.
pub fn retry_after(ttl: Duration) -> Duration {
    (ttl / 16).max(Duration::from_millis(100))
}

/// The instant a primary whose last successful renewal was *sent* at `renewed` must fence itself.
pub fn fence_at(renewed: Instant, ttl: Duration) -> Instant {
    renewed + ttl - margin(ttl)
}

/// The epoch a leader key stands for: the cluster's base (the highest epoch any node held when
/// the cluster was first used, kept in etcd) plus the key's create revision. Create revisions
/// only grow across an etcd cluster, and a key made again gets a new one, so every new leader
/// has a higher epoch than every leader before it.
pub fn epoch(base: u64, create_revision: i64) -> u64 {
    base + create_revision.max(0) as u64
}

/// What a replica knows of one candidate: its node name and the newest generation it committed
/// of the namespace (epoch first, then generation number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: String,
    pub epoch: u64,
    pub generation: u64,
}

impl Candidate {
    fn key(&self) -> (u64, u64) {
        (self.epoch, self.generation)
    }
}

/// How many live candidates come before `me`: those holding a newer generation, and among
/// those as new, those with a smaller name (so exactly one candidate has rank 0).
pub fn rank(me: &Candidate, others: &[Candidate]) -> usize {
    others
        .iter()
        .filter(|o| o.node != me.node)
        .filter(|o| o.key() > me.key() || (o.key() == me.key() && o.node < me.node))
        .count()
}

/// How long `me` waits after the leader key vanished before it campaigns: the newest replica
/// at once, each one after it `step` later. The others are not dead weight: if the newer ones
/// do not take the key in that time (they are down too), the next one does.
pub fn campaign_delay(me: &Candidate, others: &[Candidate], step: Duration) -> Duration {
    step * rank(me, others) as u32
}

/// How much longer a replica that reached etcd at `reached` waits, at `now`, before it may
/// campaign: until a ttl has passed since. A leader key that expired while etcd was out of
/// reach (of this replica, and so perhaps of the primary too) is the primary's to take back
/// first; a key gone while this replica was following is not held up.
pub fn settled(reached: Instant, now: Instant, ttl: Duration) -> Duration {
    (reached + ttl).saturating_duration_since(now)
}

/// Whether `me` may campaign after its wait, re-checked against the candidates alive now: no
/// live candidate holds a newer generation. (One as new with a smaller name had its turn
/// first and did not take it.)
pub fn may_campaign(me: &Candidate, others: &[Candidate]) -> bool {
    others
        .iter()
        .all(|o| o.node == me.node || o.key() <= me.key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, epoch: u64, generation: u64) -> Candidate {
        Candidate {
            node: node.into(),
            epoch,
            generation,
        }
    }

    #[test]
    fn a_primary_fences_itself_before_its_lease_can_expire() {
        let t0 = Instant::now();
        for secs in [2, 3, 5, 10, 60] {
            let ttl = Duration::from_secs(secs);
            let at = fence_at(t0, ttl);
            // Before the lease's earliest expiry, and with at least a renewal's slack.
            assert!(at < t0 + ttl, "ttl {ttl:?}");
            assert!(at >= t0 + ttl / 2, "ttl {ttl:?}: fenced too eagerly");
            if secs >= 4 {
                assert!(
                    t0 + renew_every(ttl) * 2 < at,
                    "ttl {ttl:?}: one lost renewal fences"
                );
            }
        }
        assert_eq!(margin(Duration::from_secs(10)), Duration::from_millis(2500));
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_secs(1));
    }

    #[test]
    fn every_new_leader_key_stands_for_a_higher_epoch() {
        assert_eq!(epoch(0, 7), 7);
        assert_eq!(epoch(3, 2), 5);
        assert!(epoch(3, 9) > epoch(3, 8));
        assert_eq!(epoch(4, -1), 4);
    }

    #[test]
    fn the_newest_replica_campaigns_first_and_the_others_in_turn() {
        let (b, c2, d) = (c("b", 5, 10), c("c", 5, 9), c("d", 5, 10));
        let all = [b.clone(), c2.clone(), d.clone()];
        assert_eq!(rank(&b, &all), 0);
        assert_eq!(rank(&d, &all), 1, "as new as b, but b's name comes first");
        assert_eq!(rank(&c2, &all), 2);
        let step = Duration::from_secs(2);
        assert_eq!(campaign_delay(&b, &all, step), Duration::ZERO);
        assert_eq!(campaign_delay(&c2, &all, step), Duration::from_secs(4));
        // An older epoch loses whatever its generation number.
        assert_eq!(rank(&c("e", 4, 99), &[c("f", 5, 1)]), 1);
        // Alone, a replica does not wait.
        assert_eq!(
            campaign_delay(&c2, std::slice::from_ref(&c2), step),
            Duration::ZERO
        );
    }

    /// A replica that just reached etcd waits out a ttl from then (the primary's chance to take
    /// back a key that expired while etcd was out); one following for longer waits nothing more.
    #[test]
    fn a_replica_just_back_on_etcd_lets_the_primary_reclaim_first() {
        let (t0, ttl) = (Instant::now(), Duration::from_secs(4));
        assert_eq!(settled(t0, t0, ttl), ttl);
        assert_eq!(
            settled(t0, t0 + Duration::from_secs(1), ttl),
            Duration::from_secs(3)
        );
        assert_eq!(
            settled(t0, t0 + Duration::from_secs(9), ttl),
            Duration::ZERO
        );
    }

    #[test]
    fn a_replica_behind_a_live_one_never_campaigns() {
        let (b, c2) = (c("b", 5, 10), c("c", 5, 9));
        assert!(!may_campaign(&c2, &[b.clone(), c2.clone()]));
        assert!(may_campaign(&b, &[b.clone(), c2.clone()]));
        // b died after its turn: c's re-check no longer sees it.
        assert!(may_campaign(&c2, std::slice::from_ref(&c2)));
        // As new as a live one with a smaller name that let its turn pass: may.
        assert!(may_campaign(&c("d", 5, 10), &[b]));
    }
}
