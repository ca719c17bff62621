//! The replica daemon's Prometheus metrics: each namespace's figures, labelled with its
//! primary's node name, the store's free space, and how long commits take. A scrape never
//! waits for a store: while a frame, a commit or an apply holds one, it shows the figures the
//! store published after its last commit or apply (so the generation it shows is never behind
//! the one it acknowledged).

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{Figures, Site};
use crate::metrics::Gauges;

pub struct StoreCollector {
    site: Arc<Site>,
    /// Each namespace's figures: those its store published last (when it opened, after each
    /// commit and apply), or those of the last scrape that found it free, whichever came later.
    last: Latest,
}

type Latest = Arc<parking_lot::Mutex<BTreeMap<String, Figures>>>;

/// What one store reports to the metrics as it changes.
pub struct Watch {
    name: String,
    latest: Latest,
    /// Seconds each commit takes.
    pub commit_seconds: Histogram,
}

impl Watch {
    /// The store's figures now.
    pub fn publish(&self, f: Figures) {
        self.latest.lock().insert(self.name.clone(), f);
    }
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

/// The labels of a namespace's samples.
type Labels = Vec<(String, String)>;

/// The registry of a replica daemon serving `site`: the store's figures per namespace (label
/// `primary`, the primary's node name).
pub fn registry(site: &Arc<Site>) -> Registry {
    let mut reg = Registry::default();
    let apply = Family::<Labels, Histogram>::new_with_constructor(
        (|| Histogram::new(exponential_buckets(0.01, 2.0, 16))) as fn() -> Histogram,
    );
    reg.register(
        "ferry_store_commit_seconds",
        "Time to commit a generation: verify, journal, apply, up to its acknowledgement (the images' fsync follows it)",
        apply.clone(),
    );
    let last = Latest::default();
    let latest = last.clone();
    site.on_open(move |name, s| {
        s.watch(Watch {
            name: name.to_string(),
            latest: latest.clone(),
            commit_seconds: apply
                .get_or_create(&vec![("primary".to_string(), name.to_string())])
                .clone(),
        })
    });
    reg.register_collector(Box::new(StoreCollector {
        site: site.clone(),
        last,
    }));
    reg
}

impl Collector for StoreCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures: Vec<(String, Figures)> = {
            let mut last = self.last.lock();
            for (name, store) in self.site.stores() {
                if let Some(s) = store.try_lock() {
                    last.insert(name, s.figures());
                }
            }
            last.iter().map(|(n, f)| (n.clone(), f.clone())).collect()
        };
        let mut g = Gauges::new(enc);
        g.one(
            "ferry_store_namespaces",
            "Primaries with a namespace in the store",
            figures.len() as f64,
        )?;
        let mut each = |name: &str, help: &str, v: fn(&Figures) -> Option<f64>| {
            let samples: Vec<_> = figures
                .iter()
                .filter_map(|(ns, f)| Some((vec![("primary", ns.clone())], v(f)?)))
                .collect();
            g.family(name, help, &samples)
        };
        each(
            "ferry_store_generation",
            "The generation the namespace committed",
            |f| Some(f.generation as f64),
        )?;
        each("ferry_store_epoch", "The namespace's epoch", |f| {
            Some(f.epoch as f64)
        })?;
        each("ferry_store_images", "Images in the namespace", |f| {
            Some(f.images as f64)
        })?;
        each(
            "ferry_store_image_bytes",
            "Bytes of the namespace's images (their sizes)",
            |f| Some(f.image_bytes as f64),
        )?;
        each(
            "ferry_store_staged_bytes",
            "Bytes staged for the next generation",
            |f| Some(f.staged_bytes as f64),
        )?;
        each(
            "ferry_store_chunks",
            "Distinct chunks of the committed images",
            |f| Some(f.chunks as f64),
        )?;
        each(
            "ferry_store_kept_generations",
            "Generations the namespace can serve: restore points, the newest one included",
            |f| Some(f.kept_generations as f64),
        )?;
        each(
            "ferry_store_kept_bytes",
            "Bytes of kept chunks (what newer generations overwrote and restore points need)",
            |f| Some(f.kept_bytes as f64),
        )?;
        each(
            "ferry_store_verified_timestamp_seconds",
            "When the last deep verify of the namespace (ferry verify --deep, scrub_interval) ended",
            |f| f.verified.map(|(at, _)| at as f64),
        )?;
        each(
            "ferry_store_damaged_chunks",
            "Damaged chunks the last deep verify found and could not mend in place",
            |f| f.verified.map(|(_, left)| left as f64),
        )?;
        if let Some((free, total)) = super::space(self.site.root()) {
            g.one(
                "ferry_store_free_bytes",
                "Free bytes on the store's filesystem (for its user)",
                free as f64,
            )?;
            g.one(
                "ferry_store_size_bytes",
                "Size of the store's filesystem",
                total as f64,
            )?;
        }
        Ok(())
    }
}
