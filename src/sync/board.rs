//! What `ferry status` shows about syncing, kept apart from the engine's work so that a running
//! sync never blocks it. The engine publishes at each step (a cut, each replica's attempt and
//! result); a status request copies the view under a lock held for microseconds and reads the
//! live counters of the shipments in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};

use super::link::Cause;
use super::ship::ShipStats;
use crate::manifest::hex;

/// Where one replica stands.
#[derive(Clone, Debug)]
pub enum State {
    /// It holds the last generation cut.
    Committed,
    /// It holds an older generation and nothing is being sent to it (not selected, or no
    /// sync point since it fell behind).
    Behind,
    /// A shipment is in flight.
    Shipping {
        generation: u64,
        attempt: u32,
        stats: Arc<ShipStats>,
    },
    /// Its last attempt failed; the sync retries (within its deadline) or has given up.
    Failing { since: SystemTime, cause: Cause },
}

/// One replica as status shows it.
#[derive(Clone, Debug)]
pub struct Replica {
    pub name: String,
    pub addr: String,
    pub zone: Option<String>,
    pub selected: bool,
    pub reason: String,
    /// The generation it committed, its group root, and when this node learnt it.
    pub generation: u64,
    pub root: Option<[u8; 32]>,
    pub committed_at: Option<SystemTime>,
    /// When the sync point of the generation it committed was cut: it holds every write
    /// acknowledged before then (its recovery point). Unknown until it commits one, when
    /// the record of the last is older than this.
    pub point_at: Option<SystemTime>,
    /// Bytes of new content of each image of the last generation cut that it lacks.
    pub behind: BTreeMap<String, u64>,
    pub state: State,
    pub failing_since: Option<Instant>,
    pub rtt: Option<Duration>,
    pub throughput: Option<f64>,
    /// The last sync's outcome for it.
    pub last: Option<Value>,
}

impl Replica {
    /// After a cut or at the end of a sync: committed when it holds the last generation and
    /// lacks nothing of it, behind otherwise; a shipment in flight or a failure stays as it is
    /// (a failing replica stays failing until it commits).
    pub fn settle(&mut self, generation: u64) {
        if matches!(self.state, State::Shipping { .. } | State::Failing { .. }) {
            return;
        }
        self.state = if self.generation >= generation && self.behind.is_empty() {
            State::Committed
        } else {
            State::Behind
        };
    }
}

/// A sync in progress.
#[derive(Clone, Debug, Serialize)]
pub struct Running {
    /// "cutting" (freezing and re-chunking) or "shipping".
    pub phase: &'static str,
    pub generation: u64,
    pub dirty_bytes: u64,
    #[serde(skip)]
    pub started: Instant,
}

#[derive(Clone, Debug, Default)]
pub struct View {
    pub generation: u64,
    pub root: [u8; 32],
    pub required: usize,
    pub replicas: Vec<Replica>,
    pub running: Option<Running>,
    pub last_sync: Option<Value>,
    pub broken: BTreeMap<String, String>,
    /// What the last sync point found in the backing directory and did not replicate (not a
    /// regular file, or a name that cannot be replicated), with what it is.
    pub skipped: Vec<(String, String)>,
    /// Set once a replica refused this primary as fenced by a promotion.
    pub fenced: Option<crate::epoch::Fence>,
    /// The automatic failover's standing (none without `[failover]`).
    pub failover: Option<Value>,
}

#[derive(Default)]
pub struct Board {
    view: Mutex<View>,
}

impl Board {
    pub fn new(view: View) -> Board {
        Board {
            view: Mutex::new(view),
        }
    }

    /// Changes the view (keep `f` short: status waits for it).
    pub fn update<R>(&self, f: impl FnOnce(&mut View) -> R) -> R {
        f(&mut self.view.lock())
    }

    /// Changes one replica's view.
    pub fn replica(&self, name: &str, f: impl FnOnce(&mut Replica)) {
        if let Some(r) = self
            .view
            .lock()
            .replicas
            .iter_mut()
            .find(|r| r.name == name)
        {
            f(r)
        }
    }

    pub fn view(&self) -> View {
        self.view.lock().clone()
    }

    /// The view as `ferry status --json` prints it under `sync`.
    pub fn json(&self) -> Value {
        let v = self.view();
        let (now, wall) = (Instant::now(), SystemTime::now());
        let replicas: Vec<Value> = v
            .replicas
            .iter()
            .map(|r| replica_json(r, &v, now, wall))
            .collect();
        let running = v.running.as_ref().map(|s| {
            let mut j = serde_json::to_value(s).expect("serialisable");
            j["elapsed_ms"] = (now.duration_since(s.started).as_millis() as u64).into();
            let (mut done, mut total) = (0, 0);
            for r in &v.replicas {
                if let State::Shipping { stats, .. } = &r.state {
                    done += stats.done_bytes.load(Ordering::Relaxed);
                    total += stats.planned_bytes.load(Ordering::Relaxed);
                }
            }
            j["bytes_done"] = done.into();
            j["bytes_total"] = total.into();
            j
        });
        json!({
            "generation": v.generation,
            "root": hex(&v.root),
            "required": v.required,
            "replicas": replicas,
            "running": running,
            "fenced": v.fenced,
            "failover": v.failover,
            "last_sync": v.last_sync,
            "broken": v
                .broken
                .iter()
                .map(|(p, r)| json!({"path": p, "reason": r}))
                .collect::<Vec<_>>(),
            "skipped": v
                .skipped
                .iter()
                .filter(|(p, _)| !v.broken.contains_key(p))
                .map(|(p, k)| json!({"path": p, "kind": k}))
                .collect::<Vec<_>>(),
        })
    }
}

/// Why a sync point a caller waited for has not finished, read from the view as
/// [`Board::json`] shows it (pure): the sync point in progress, and each selected replica that
/// does not hold the last generation, with what status says of it. `None` when neither is
/// there to blame.
pub fn held_up(sync: &Value) -> Option<String> {
    let mut why = Vec::new();
    if let Some(r) = sync["running"].as_object() {
        why.push(format!(
            "sync point {} is still {} after {} s",
            r["generation"],
            r["phase"].as_str().unwrap_or("running"),
            r["elapsed_ms"].as_u64().unwrap_or(0) / 1000
        ));
    }
    for r in sync["replicas"].as_array().into_iter().flatten() {
        if r["selected"] == true && r["state"] != "committed" {
            why.push(format!(
                "replica {}: {}",
                r["name"].as_str().unwrap_or("?"),
                r["state_text"].as_str().unwrap_or("?")
            ));
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Seconds, to the millisecond.
fn secs(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn replica_json(r: &Replica, v: &View, now: Instant, wall: SystemTime) -> Value {
    let lag_generations = v.generation.saturating_sub(r.generation);
    let behind: u64 = r.behind.values().sum();
    let ago = |t: SystemTime| wall.duration_since(t).unwrap_or_default().as_secs();
    let (state, text, cause) = match &r.state {
        State::Committed => ("committed", "committed".to_string(), None),
        State::Behind => (
            "behind",
            if r.selected {
                "behind: waiting for the next sync point".to_string()
            } else {
                format!("behind: not selected ({})", r.reason)
            },
            None,
        ),
        State::Shipping {
            generation,
            attempt,
            stats,
        } => {
            let done = stats.done_bytes.load(Ordering::Relaxed);
            let total = stats.planned_bytes.load(Ordering::Relaxed);
            let mut t = format!("shipping generation {generation}: {done} of {total} bytes");
            if *attempt > 1 {
                t += &format!(" (attempt {attempt})");
            }
            ("shipping", t, None)
        }
        State::Failing { since, cause } => (
            "failing",
            format!("failing for {} s: {cause}", ago(*since)),
            Some(cause),
        ),
    };
    let shipping = match &r.state {
        State::Shipping { stats, .. } => json!({
            "bytes_done": stats.done_bytes.load(Ordering::Relaxed),
            "bytes_total": stats.planned_bytes.load(Ordering::Relaxed),
            "bytes_sent": stats.bytes_sent.load(Ordering::Relaxed),
        }),
        _ => Value::Null,
    };
    json!({
        "name": r.name,
        "addr": r.addr,
        "zone": r.zone,
        "selected": r.selected,
        "reason": r.reason,
        "healthy": r.failing_since.is_none(),
        "failing_for_s": r.failing_since.map(|t| now.duration_since(t).as_secs()),
        "rtt_ms": r.rtt.map(|d| d.as_secs_f64() * 1000.0),
        "throughput_bytes_per_s": r.throughput,
        "generation": r.generation,
        "root": r.root.map(|h| hex(&h)),
        "since_commit_s": r.committed_at.map(ago),
        "recovery_point_age_s": r.point_at.map(|t| secs(wall.duration_since(t).unwrap_or_default())),
        "lag_generations": lag_generations,
        "lag_bytes": behind,
        "behind": r.behind,
        "state": state,
        "state_text": text,
        "cause": cause.map(|c| c.code()),
        "error": cause.map(|c| c.to_string()),
        "shipping": shipping,
        "last": r.last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(generation: u64, behind: u64) -> Replica {
        Replica {
            name: "b".into(),
            addr: "127.0.0.1:1".into(),
            zone: None,
            selected: false,
            reason: String::new(),
            generation,
            root: None,
            committed_at: None,
            point_at: None,
            behind: if behind > 0 {
                BTreeMap::from([("a".to_string(), behind)])
            } else {
                BTreeMap::new()
            },
            state: State::Committed,
            failing_since: None,
            rtt: None,
            throughput: None,
            last: None,
        }
    }

    #[test]
    fn a_replica_is_committed_only_when_it_holds_the_last_generation_and_lacks_nothing() {
        let mut r = replica(3, 0);
        r.settle(3);
        assert!(matches!(r.state, State::Committed));
        // A new generation was cut: it lacks bytes, or at least the generation.
        let mut r = replica(3, 4096);
        r.settle(4);
        assert!(matches!(r.state, State::Behind));
        let mut r = replica(3, 0);
        r.settle(4);
        assert!(matches!(r.state, State::Behind));
        // A failure stays until a commit; a shipment in flight stays in flight.
        let mut r = replica(3, 0);
        r.state = State::Failing {
            since: SystemTime::now(),
            cause: Cause::Unreachable("x".into()),
        };
        r.settle(3);
        assert!(matches!(r.state, State::Failing { .. }));
    }

    #[test]
    fn status_json_shows_state_lag_and_the_cause_in_words() {
        let mut r = replica(1, 3 << 20);
        r.state = State::Failing {
            since: SystemTime::now(),
            cause: Cause::Unreachable("no answer".into()),
        };
        let b = Board::new(View {
            generation: 2,
            required: 1,
            replicas: vec![r],
            ..Default::default()
        });
        let j = b.json();
        let r = &j["replicas"][0];
        assert_eq!(r["state"], "failing");
        assert_eq!(r["cause"], "unreachable");
        assert_eq!(r["lag_generations"], 1);
        assert_eq!(r["lag_bytes"], 3 << 20);
        assert!(
            r["error"].as_str().unwrap().contains("ferry replica"),
            "{j}"
        );
        assert!(j["running"].is_null());
    }

    #[test]
    fn a_wait_that_timed_out_names_the_sync_in_progress_and_each_selected_replica_short_of_it() {
        let mut failing = replica(1, 3 << 20);
        failing.selected = true;
        failing.state = State::Failing {
            since: SystemTime::now() - Duration::from_secs(90),
            cause: Cause::Unreachable("no answer".into()),
        };
        let mut idle = replica(1, 0);
        idle.name = "c".into();
        let mut done = replica(2, 0);
        done.name = "d".into();
        done.selected = true;
        let b = Board::new(View {
            generation: 2,
            replicas: vec![failing, idle, done],
            running: Some(Running {
                phase: "shipping",
                generation: 2,
                dirty_bytes: 1 << 20,
                started: Instant::now() - Duration::from_secs(95),
            }),
            ..Default::default()
        });
        let why = held_up(&b.json()).unwrap();
        assert!(
            why.starts_with("sync point 2 is still shipping after 95 s; "),
            "{why}"
        );
        assert!(why.contains("replica b: failing for 90 s: "), "{why}");
        assert!(why.contains("no answer"), "{why}");
        // Neither one not selected nor one that holds the generation is to blame.
        assert!(
            !why.contains("replica c") && !why.contains("replica d"),
            "{why}"
        );

        let mut d = replica(2, 0);
        d.selected = true;
        d.settle(2);
        let quiet = Board::new(View {
            generation: 2,
            replicas: vec![d],
            ..Default::default()
        });
        assert_eq!(held_up(&quiet.json()), None);
    }
}
