//! One replica's link during one sync, sans I/O: after each attempt to ship, decide whether to
//! try again, after how long, or to give up, and say why in words an operator can act on.
//! Fed the attempt's outcome and the time, like `select.rs`; the driver in `mod.rs` only
//! connects, ships and sleeps.
//!
//! The rules:
//! * a connection lost mid-transfer is retried until the sync's deadline (what the replica
//!   staged is not sent again);
//! * a replica that cannot be reached at all is retried for [`Policy::unreachable_for`] after
//!   the last contact, then given up (the sync should not wait its whole timeout on a host
//!   that is down);
//! * a replica whose store is full pauses the transfer: it is asked again, at the longest
//!   backoff, until the sync's deadline, and resumes by itself when space returns (it sends
//!   only what the replica lacks: the refusal comes before data, or keeps what was staged);
//! * any other refusal, a broken protocol, a TLS refusal or a local read error is final:
//!   retrying would give the same answer;
//! * waits between attempts double from [`Policy::first_backoff`] up to
//!   [`Policy::max_backoff`], and never run past the deadline.

use std::fmt;
use std::time::{Duration, Instant};

use crate::wire::frame::{Refusal, RefuseCode};
use crate::wire::primary::Ended;

/// Why an attempt (or a whole sync, for one replica) failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No connection could be made.
    Unreachable(String),
    /// The connection was lost during the session.
    Lost(String),
    /// The TLS handshake was refused one way or the other: a fingerprint is not pinned.
    Trust(String),
    /// The replica refused the session.
    Refused(Refusal),
    /// The replica broke the protocol's rules.
    Broken(String),
    /// This node could not read what it had to ship.
    Local(String),
    /// No acknowledgement before the sync's deadline.
    Timeout(Duration),
}

impl Cause {
    /// A stable name for scripts (`ferry status --json`, `ferry sync --json`).
    pub fn code(&self) -> &'static str {
        match self {
            Cause::Unreachable(_) => "unreachable",
            Cause::Lost(_) => "connection_lost",
            Cause::Trust(_) => "not_trusted",
            Cause::Refused(r) => match r.code {
                RefuseCode::Version => "version_mismatch",
                RefuseCode::Params => "chunking_mismatch",
                RefuseCode::Fenced => "fenced",
                RefuseCode::Protocol => "protocol_error",
                RefuseCode::Corrupt => "corrupt_data",
                RefuseCode::NoSpace => "no_space",
                RefuseCode::Store => "store_error",
                RefuseCode::Namespace => "namespace_taken",
            },
            Cause::Broken(_) => "protocol_error",
            Cause::Local(_) => "local_read_error",
            Cause::Timeout(_) => "timeout",
        }
    }

    /// Whether another attempt in the same sync could succeed.
    fn retryable(&self) -> bool {
        matches!(self, Cause::Unreachable(_) | Cause::Lost(_)) || self.is_no_space()
    }

    fn is_no_space(&self) -> bool {
        matches!(self, Cause::Refused(r) if r.code == RefuseCode::NoSpace)
    }
}

impl From<Ended> for Cause {
    fn from(e: Ended) -> Cause {
        match e {
            Ended::Refused(r) => Cause::Refused(r),
            Ended::Broken(s) => Cause::Broken(s),
            // The next attempt connects anew and plans on the replica's answer.
            Ended::Stale(s) => Cause::Lost(s),
        }
    }
}

/// The words: what happened, then what to do.
impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Unreachable(e) => write!(
                f,
                "unreachable: {e}; check that `ferry replica` runs there and that UDP to its \
                 port is open"
            ),
            Cause::Lost(e) => write!(f, "connection lost: {e}"),
            Cause::Trust(e) => write!(f, "{e}"),
            Cause::Refused(r) => {
                let todo = match r.code {
                    RefuseCode::NoSpace => {
                        "; free space in the replica's store (or grow it): ferry asks again \
                         until the sync's deadline, and at each sync point after it, and sends \
                         only what is missing"
                    }
                    RefuseCode::Store => "; see the replica's log",
                    RefuseCode::Fenced => "; this primary ships nothing more",
                    RefuseCode::Corrupt => {
                        "; data was damaged between this node's disk and the replica (memory \
                         or network): the replica kept its last generation"
                    }
                    RefuseCode::Version
                    | RefuseCode::Params
                    | RefuseCode::Protocol
                    | RefuseCode::Namespace => "",
                };
                write!(f, "replica refused: {}{todo}", r.reason)
            }
            Cause::Broken(e) => write!(f, "replica broke the protocol: {e}"),
            Cause::Local(e) => write!(f, "{e}"),
            Cause::Timeout(t) => write!(
                f,
                "no acknowledgement within {} s (raise `ferry sync --timeout` for large \
                 first syncs over slow links)",
                t.as_secs()
            ),
        }
    }
}

/// How patient a link is.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// The whole sync's deadline, from its start.
    pub timeout: Duration,
    /// How long a replica may be unreachable (no connection at all) before it is given up.
    pub unreachable_for: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Policy {
    pub fn new(timeout: Duration) -> Policy {
        Policy {
            timeout,
            unreachable_for: Duration::from_secs(10),
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then connect again.
    Retry(Duration),
    /// Stop: the sync failed for this replica.
    GiveUp(Cause),
}

/// One replica's attempts during one sync.
#[derive(Debug)]
pub struct Link {
    policy: Policy,
    deadline: Instant,
    last_contact: Instant,
    backoff: Duration,
    attempts: u32,
}

impl Link {
    pub fn new(policy: Policy, now: Instant) -> Link {
        Link {
            policy,
            deadline: now + policy.timeout,
            last_contact: now,
            backoff: policy.first_backoff,
            attempts: 0,
        }
    }

    /// When the driver must stop waiting for the current attempt (then [`Link::failed`] with
    /// [`Cause::Timeout`]).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// An attempt starts.
    pub fn attempt(&mut self) -> u32 {
        self.attempts += 1;
        self.attempts
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The current attempt failed at `now`: retry or give up.
    pub fn failed(&mut self, cause: Cause, now: Instant) -> Next {
        match &cause {
            Cause::Lost(_) => self.last_contact = now,
            Cause::Unreachable(e) if now >= self.last_contact + self.policy.unreachable_for => {
                return Next::GiveUp(Cause::Unreachable(format!(
                    "{e}; no connection for {} s",
                    self.policy.unreachable_for.as_secs()
                )));
            }
            _ => {}
        }
        if !cause.retryable() {
            return Next::GiveUp(cause);
        }
        if now + self.backoff >= self.deadline {
            return Next::GiveUp(cause);
        }
        if cause.is_no_space() {
            // Space comes back when someone frees it: ask at a steady pace.
            self.backoff = self.policy.max_backoff;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
        Next::Retry(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Drives a link through a schedule of failures, one per attempt, each `cost` long;
    /// returns the waits it asked for and how it ended.
    fn drive(
        policy: Policy,
        mut outcome: impl FnMut(u32) -> Cause,
        cost: Duration,
    ) -> (Vec<Duration>, Cause, Duration) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut link = Link::new(policy, now);
        let mut waits = vec![];
        loop {
            let n = link.attempt();
            now += cost;
            let cause = if now >= link.deadline() {
                now = link.deadline();
                Cause::Timeout(policy.timeout)
            } else {
                outcome(n)
            };
            match link.failed(cause, now) {
                Next::Retry(w) => {
                    waits.push(w);
                    now += w;
                }
                Next::GiveUp(c) => return (waits, c, now - t0),
            }
        }
    }

    #[test]
    fn a_full_store_is_asked_again_at_a_steady_pace_until_the_deadline() {
        let no_space = Cause::Refused(Refusal::new(RefuseCode::NoSpace, "ENOSPC"));
        let p = Policy::new(secs(60.0));
        let (waits, c, took) = drive(p, |_| no_space.clone(), secs(0.1));
        assert!(waits.len() >= 10, "{waits:?}");
        assert!(waits.iter().all(|w| *w == p.max_backoff), "{waits:?}");
        assert!(took <= secs(60.0), "{took:?}");
        assert_eq!(c.code(), "no_space");
        assert!(c.to_string().contains("free space"), "{c}");
    }

    #[test]
    fn a_refusal_is_final_at_once() {
        for c in [
            Cause::Refused(Refusal::new(RefuseCode::Params, "chunking")),
            Cause::Trust("x".into()),
            Cause::Broken("x".into()),
            Cause::Local("x".into()),
        ] {
            let (w, got, _) = drive(Policy::new(secs(60.0)), |_| c.clone(), secs(0.1));
            assert!(w.is_empty());
            assert_eq!(got, c);
        }
    }

    #[test]
    fn an_unreachable_replica_is_given_up_after_its_grace_not_the_whole_timeout() {
        let (waits, c, took) = drive(
            Policy::new(secs(3600.0)),
            |_| Cause::Unreachable("refused".into()),
            secs(1.0),
        );
        assert_eq!(c.code(), "unreachable");
        assert!(c.to_string().contains("no connection for 10 s"), "{c}");
        assert!(took >= secs(10.0) && took < secs(20.0), "{took:?}");
        // Backoff doubles from 200 ms and is capped at 5 s.
        assert_eq!(&waits[..3], &[secs(0.2), secs(0.4), secs(0.8)]);
        assert!(waits.iter().all(|w| *w <= secs(5.0)));
    }

    #[test]
    fn lost_connections_are_retried_until_the_deadline_and_contact_resets_the_grace() {
        // The replica answers, then the link drops, again and again: never "unreachable".
        let (waits, c, took) = drive(
            Policy::new(secs(60.0)),
            |n| {
                if n % 2 == 0 {
                    Cause::Unreachable("timed out".into())
                } else {
                    Cause::Lost("reset".into())
                }
            },
            secs(2.0),
        );
        assert!(waits.len() > 5, "{waits:?}");
        assert_ne!(c.code(), "unreachable", "{c}");
        assert!(took <= secs(60.0), "{took:?}");
    }

    #[test]
    fn no_wait_runs_past_the_deadline() {
        for cost in [0.0, 0.3, 1.7, 4.9] {
            let p = Policy::new(secs(7.0));
            let (waits, _, took) = drive(p, |_| Cause::Lost("reset".into()), secs(cost));
            assert!(took <= secs(7.0) + secs(cost), "{cost}: {took:?} {waits:?}");
        }
    }

    #[test]
    fn the_deadline_gives_a_timeout_in_words() {
        let (_, c, took) = drive(
            Policy::new(secs(5.0)),
            |_| Cause::Lost("x".into()),
            secs(10.0),
        );
        assert_eq!(c, Cause::Timeout(secs(5.0)));
        assert_eq!(took, secs(5.0));
        assert!(c.to_string().contains("within 5 s"));
    }
}
