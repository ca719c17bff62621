//! Secondary selection: with more peers configured than `replicas` requires, which ones the
//! primary ships to. Pure: peers' health in, choices with reasons out.
//!
//! Policy, in order:
//! 1. a selected peer stays selected (no flapping, no needless reseeding) unless it has been
//!    failing for longer than `failover_after`;
//! 2. free places go to healthy peers first (answered the last time they were contacted; a peer
//!    never contacted counts as healthy until it fails);
//! 3. then to peers in zones not yet covered by the selection;
//! 4. then to the lowest measured round-trip time, then the highest measured throughput, then
//!    the name (so the choice is stable).

use std::collections::HashSet;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub zone: Option<String>,
    /// Since when the peer has been failing (None: it answered last time, or was never tried).
    pub failing_since: Option<Instant>,
    pub rtt: Option<Duration>,
    /// Bytes per second of its last transfer.
    pub throughput: Option<f64>,
    pub selected: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub name: String,
    pub selected: bool,
    pub reason: String,
}

fn describe(c: &Candidate) -> String {
    let mut parts = Vec::new();
    parts.push(if c.failing_since.is_some() {
        "failing".to_string()
    } else {
        "healthy".to_string()
    });
    if let Some(z) = &c.zone {
        parts.push(format!("zone {z}"));
    }
    if let Some(r) = c.rtt {
        parts.push(format!("rtt {:.1} ms", r.as_secs_f64() * 1000.0));
    }
    if let Some(t) = c.throughput {
        parts.push(format!("{:.1} MB/s", t / 1e6));
    }
    parts.join(", ")
}

/// Chooses `k` of `cands` (all of them when there are no more than `k`).
pub fn select(
    cands: &[Candidate],
    k: usize,
    failover_after: Duration,
    now: Instant,
) -> Vec<Choice> {
    let failed_long = |c: &Candidate| {
        c.failing_since
            .is_some_and(|t| now.saturating_duration_since(t) > failover_after)
    };
    let mut chosen: Vec<(usize, String)> = Vec::new();
    if cands.len() <= k {
        return cands
            .iter()
            .map(|c| Choice {
                name: c.name.clone(),
                selected: true,
                reason: format!(
                    "needed: {} of {k} replicas configured ({})",
                    cands.len(),
                    describe(c)
                ),
            })
            .collect();
    }
    // 1. Keep the current selection unless it failed for too long.
    for (i, c) in cands.iter().enumerate() {
        if c.selected && !failed_long(c) && chosen.len() < k {
            chosen.push((i, format!("kept ({})", describe(c))));
        }
    }
    // 2-4. Fill the rest by the ranking.
    let mut rest: Vec<usize> = (0..cands.len())
        .filter(|i| !chosen.iter().any(|(j, _)| j == i))
        .collect();
    while chosen.len() < k && !rest.is_empty() {
        let zones: HashSet<&String> = chosen
            .iter()
            .filter_map(|(i, _)| cands[*i].zone.as_ref())
            .collect();
        rest.sort_by(|&a, &b| {
            let (ca, cb) = (&cands[a], &cands[b]);
            let key = |c: &Candidate| {
                (
                    c.failing_since.is_some(),
                    c.zone.as_ref().is_some_and(|z| zones.contains(z)),
                )
            };
            key(ca)
                .cmp(&key(cb))
                .then(
                    ca.rtt
                        .unwrap_or(Duration::MAX)
                        .cmp(&cb.rtt.unwrap_or(Duration::MAX)),
                )
                .then(
                    cb.throughput
                        .unwrap_or(0.0)
                        .total_cmp(&ca.throughput.unwrap_or(0.0)),
                )
                .then(ca.name.cmp(&cb.name))
        });
        let i = rest.remove(0);
        let c = &cands[i];
        let new_zone = c.zone.as_ref().is_some_and(|z| !zones.contains(z));
        let why = if c.selected {
            "kept".to_string()
        } else if cands.iter().any(|o| o.selected && failed_long(o)) {
            "replacing a peer failing longer than failover_after".to_string()
        } else {
            "best ranked".to_string()
        };
        let zone_note = if new_zone { ", new zone" } else { "" };
        chosen.push((i, format!("{why} ({}{zone_note})", describe(c))));
    }
    cands
        .iter()
        .enumerate()
        .map(|(i, c)| match chosen.iter().find(|(j, _)| *j == i) {
            Some((_, why)) => Choice {
                name: c.name.clone(),
                selected: true,
                reason: why.clone(),
            },
            None => Choice {
                name: c.name.clone(),
                selected: false,
                reason: if failed_long(c) && c.selected {
                    format!(
                        "replaced: failing for more than {} s ({})",
                        failover_after.as_secs(),
                        describe(c)
                    )
                } else {
                    format!("standby ({})", describe(c))
                },
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, zone: &str, rtt_ms: u64) -> Candidate {
        Candidate {
            name: name.into(),
            zone: Some(zone.into()),
            failing_since: None,
            rtt: Some(Duration::from_millis(rtt_ms)),
            throughput: None,
            selected: false,
        }
    }

    fn selected(ch: &[Choice]) -> Vec<&str> {
        ch.iter()
            .filter(|c| c.selected)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn healthy_then_distinct_zones_then_rtt() {
        let now = Instant::now();
        let mut cands = vec![
            c("b1", "eu", 10),
            c("b2", "eu", 5),
            c("c1", "us", 80),
            c("d1", "ap", 40),
        ];
        cands[1].failing_since = Some(now);
        let ch = select(&cands, 2, Duration::from_secs(300), now);
        // b2 is failing; b1 (eu, 10 ms) first, then the best other zone: ap (40 ms).
        assert_eq!(selected(&ch), ["b1", "d1"]);
        assert!(ch[1].reason.starts_with("standby"), "{:?}", ch[1]);
    }

    #[test]
    fn a_selected_peer_is_kept_until_it_fails_for_too_long() {
        let now = Instant::now();
        let mut cands = vec![c("a", "eu", 50), c("b", "us", 5)];
        cands[0].selected = true;
        cands[0].failing_since = Some(now - Duration::from_secs(60));
        let ch = select(&cands, 1, Duration::from_secs(300), now);
        assert_eq!(selected(&ch), ["a"]);
        let ch = select(&cands, 1, Duration::from_secs(30), now);
        assert_eq!(selected(&ch), ["b"]);
        assert!(ch[0].reason.starts_with("replaced"), "{:?}", ch[0]);
        assert!(ch[1].reason.contains("replacing"), "{:?}", ch[1]);
    }

    #[test]
    fn with_no_more_peers_than_required_all_are_selected() {
        let now = Instant::now();
        let cands = vec![c("a", "eu", 50), c("b", "eu", 5)];
        assert_eq!(
            selected(&select(&cands, 2, Duration::ZERO, now)),
            ["a", "b"]
        );
        assert_eq!(
            selected(&select(&cands, 5, Duration::ZERO, now)),
            ["a", "b"]
        );
    }
}
