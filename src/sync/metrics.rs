//! The primary's Prometheus metrics: gauges read at scrape time from the engine's board (the
//! same snapshot `ferry status` prints, so the two always agree) and the tracker, and counters
//! and histograms that each sync's report feeds.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::{Engine, Report};
use crate::metrics::Gauges;

type Labels = Vec<(String, String)>;

/// Counters and histograms over the syncs of a mount.
pub struct SyncMetrics {
    syncs: Family<Labels, Counter>,
    duration: Histogram,
    dirty: Histogram,
    sent: Family<Labels, Counter>,
    wire: Family<Labels, Counter>,
    chunks: Family<Labels, Counter>,
    patches: Family<Labels, Counter>,
    held: Family<Labels, Counter>,
    reused: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
}

impl SyncMetrics {
    /// Registers the metrics (names prefixed `ferry_`).
    pub fn register(reg: &mut Registry) -> Arc<SyncMetrics> {
        let m = SyncMetrics {
            syncs: Family::default(),
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            dirty: Histogram::new(exponential_buckets(4096.0, 4.0, 14)),
            sent: Family::default(),
            wire: Family::default(),
            chunks: Family::default(),
            patches: Family::default(),
            held: Family::default(),
            reused: Family::default(),
            retries: Family::default(),
        };
        let reg = reg.sub_registry_with_prefix("ferry");
        reg.register(
            "syncs",
            "Sync points by result (committed: the required replicas committed)",
            m.syncs.clone(),
        );
        reg.register(
            "sync_duration_seconds",
            "Time from a sync point to the last acknowledgement",
            m.duration.clone(),
        );
        reg.register(
            "sync_dirty_bytes",
            "Bytes changed since the previous sync point, per sync point",
            m.dirty.clone(),
        );
        reg.register(
            "sent_bytes",
            "Chunk and patch payload sent (after compression)",
            m.sent.clone(),
        );
        reg.register(
            "wire_bytes",
            "UDP bytes sent, all overhead included",
            m.wire.clone(),
        );
        reg.register("chunks_sent", "Whole chunks sent", m.chunks.clone());
        reg.register("patches_sent", "Patches sent", m.patches.clone());
        reg.register(
            "chunks_held",
            "New chunks the replica already held, so not sent (content addressing at work)",
            m.held.clone(),
        );
        reg.register(
            "chunks_reused",
            "Data frames (chunks and patches) made once for another replica of the same sync (fan-out)",
            m.reused.clone(),
        );
        reg.register(
            "retries",
            "Connections retried after a failed attempt",
            m.retries.clone(),
        );
        Arc::new(m)
    }

    /// Takes one sync's figures.
    pub fn observe(&self, r: &Report) {
        let result = if r.committed >= r.required {
            "committed"
        } else {
            "failed"
        };
        self.syncs
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        self.duration.observe(r.duration_ms as f64 / 1000.0);
        self.dirty.observe(r.dirty_bytes as f64);
        for o in &r.replicas {
            let l = vec![("replica".to_string(), o.name.clone())];
            self.sent.get_or_create(&l).inc_by(o.bytes_sent);
            self.wire.get_or_create(&l).inc_by(o.wire_bytes);
            self.chunks.get_or_create(&l).inc_by(o.chunks_sent);
            self.patches.get_or_create(&l).inc_by(o.patches_sent);
            self.held.get_or_create(&l).inc_by(o.chunks_held);
            self.reused.get_or_create(&l).inc_by(o.chunks_reused);
            self.retries
                .get_or_create(&l)
                .inc_by(o.attempts.saturating_sub(1) as u64);
        }
    }
}

/// Gauges of a mount, read at scrape time.
pub struct StatusCollector {
    pub engine: Arc<Engine>,
    /// The RPO target (`sync_interval`), if there is one.
    pub rpo: Option<Duration>,
}

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
}

impl Collector for StatusCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.engine.status();
        let mut g = Gauges::new(enc);
        let num = |v: &Value| v.as_f64().unwrap_or(0.0);
        g.one(
            "ferry_generation",
            "The last generation this primary cut",
            num(&s["generation"]),
        )?;
        let run = &s["running"];
        g.one(
            "ferry_sync_running",
            "1 while a sync runs",
            if run.is_object() { 1.0 } else { 0.0 },
        )?;
        g.one(
            "ferry_sync_bytes_done",
            "Bytes of image sent of those the replicas asked for, in the running sync",
            num(&run["bytes_done"]),
        )?;
        g.one(
            "ferry_sync_bytes_total",
            "Bytes of image the replicas asked for in the running sync",
            num(&run["bytes_total"]),
        )?;
        let unsynced: Vec<_> = self
            .engine
            .unsynced()
            .into_iter()
            .map(|(p, n)| (vec![("image", p)], n as f64))
            .collect();
        g.family(
            "ferry_unsynced_bytes",
            "Bytes changed since the last sync point, per image",
            &unsynced,
        )?;
        g.one(
            "ferry_intent_log_bytes",
            "Bytes of the extents the intent log marks: what the next mount re-reads after a \
             crash now, at most",
            self.engine.intent_log_bytes() as f64,
        )?;
        g.one(
            "ferry_images_broken",
            "Images that cannot be read as regular files (not replicating)",
            s["broken"].as_array().map_or(0, |a| a.len()) as f64,
        )?;
        if let Some(t) = self.rpo {
            g.one(
                "ferry_rpo_target_seconds",
                "The RPO target (sync_interval)",
                t.as_secs_f64(),
            )?;
        }
        let replicas = s["replicas"].as_array().cloned().unwrap_or_default();
        let per = |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(Vec<(&str, String)>, f64)> {
            replicas
                .iter()
                .filter_map(|r| {
                    let name = r["name"].as_str().unwrap_or("?").to_string();
                    f(r).map(|v| (vec![("replica", name)], v))
                })
                .collect()
        };
        g.family(
            "ferry_replica_generation",
            "The generation each replica committed",
            &per(&|r| r["generation"].as_f64()),
        )?;
        g.family(
            "ferry_replica_lag_generations",
            "Generations each replica is behind",
            &per(&|r| r["lag_generations"].as_f64()),
        )?;
        g.family(
            "ferry_replica_lag_bytes",
            "Bytes of new content of the last generation each replica lacks",
            &per(&|r| r["lag_bytes"].as_f64()),
        )?;
        g.family(
            "ferry_replica_seconds_since_commit",
            "Seconds since each replica last committed",
            &per(&|r| r["since_commit_s"].as_f64()),
        )?;
        g.family(
            "ferry_replica_recovery_point_age_seconds",
            "Seconds since the sync point of the generation each replica holds (0 when nothing \
             was written since it): the writes it would lose if this primary failed now",
            &per(&|r| r["recovery_point_age_s"].as_f64()),
        )?;
        g.family(
            "ferry_replica_selected",
            "1 when the selection ships to the replica",
            &per(&|r| Some(if r["selected"] == true { 1.0 } else { 0.0 })),
        )?;
        let mut states = Vec::new();
        for r in &replicas {
            for st in ["committed", "shipping", "failing", "behind"] {
                let labels = vec![
                    ("replica", r["name"].as_str().unwrap_or("?").to_string()),
                    ("state", st.to_string()),
                ];
                states.push((labels, if r["state"] == st { 1.0 } else { 0.0 }));
            }
        }
        g.family(
            "ferry_replica_state",
            "Each replica's state, one of committed, shipping, failing, behind",
            &states,
        )?;
        if let Some(t) = self.rpo {
            g.family(
                "ferry_replica_rpo_met",
                "1 when the replica's recovery point is within the RPO target: at most two \
                 sync intervals old",
                &per(&|r| Some(f64::from(u8::from(rpo_met(r, t))))),
            )?;
        }
        Ok(())
    }
}

/// Whether replica `r` (its status) holds every write older than two sync intervals `t`: one
/// interval to the next sync point and one for that point to reach it. A replica whose syncs
/// take longer than the interval falls further behind with each one, though each commits.
pub fn rpo_met(r: &Value, t: Duration) -> bool {
    r["recovery_point_age_s"]
        .as_f64()
        .is_some_and(|age| age <= 2.0 * t.as_secs_f64())
}
