//! The replica daemon's Prometheus metrics: the store's figures (read without waiting: while a
//! commit holds the store, a scrape shows the figures of the previous scrape), its free space,
//! and how long commits take.

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{Figures, Store};
use crate::metrics::Gauges;

pub struct StoreCollector {
    store: Arc<parking_lot::Mutex<Store>>,
    root: PathBuf,
    last: parking_lot::Mutex<Figures>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreCollector")
    }
}

/// The registry of a replica daemon serving `store`.
pub fn registry(store: &Arc<parking_lot::Mutex<Store>>) -> Registry {
    let mut reg = Registry::default();
    let apply = Histogram::new(exponential_buckets(0.01, 2.0, 16));
    reg.register(
        "ferry_store_commit_seconds",
        "Time to commit a generation: verify, journal, apply",
        apply.clone(),
    );
    let root = {
        let mut s = store.lock();
        s.time_commits(apply);
        s.root().to_path_buf()
    };
    reg.register_collector(Box::new(StoreCollector {
        store: store.clone(),
        root,
        last: Default::default(),
    }));
    reg
}

/// Free and total bytes of the filesystem holding `root`.
fn space(root: &std::path::Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct the call fills.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
}

impl Collector for StoreCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = match self.store.try_lock() {
            Some(s) => {
                let f = s.figures();
                *self.last.lock() = f.clone();
                f
            }
            None => self.last.lock().clone(),
        };
        let mut g = Gauges::new(enc);
        g.one(
            "ferry_store_generation",
            "The generation the store committed",
            f.generation as f64,
        )?;
        g.one("ferry_store_epoch", "The store's epoch", f.epoch as f64)?;
        g.one("ferry_store_images", "Images in the store", f.images as f64)?;
        g.one(
            "ferry_store_image_bytes",
            "Bytes of the store's images (their sizes)",
            f.image_bytes as f64,
        )?;
        g.one(
            "ferry_store_staged_bytes",
            "Bytes staged for the next generation",
            f.staged_bytes as f64,
        )?;
        g.one(
            "ferry_store_chunks",
            "Distinct chunks of the committed images",
            f.chunks as f64,
        )?;
        g.one(
            "ferry_store_kept_generations",
            "Generations the store can serve: restore points, the newest one included",
            f.kept_generations as f64,
        )?;
        g.one(
            "ferry_store_kept_bytes",
            "Bytes of kept chunks (what newer generations overwrote and restore points need)",
            f.kept_bytes as f64,
        )?;
        if let Some((at, left)) = f.verified {
            g.one(
                "ferry_store_verified_timestamp_seconds",
                "When the last deep verify of the store (ferry verify --deep, scrub_interval) ended",
                at as f64,
            )?;
            g.one(
                "ferry_store_damaged_chunks",
                "Damaged chunks the last deep verify found and could not mend in place",
                left as f64,
            )?;
        }
        if let Some((free, total)) = space(&self.root) {
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
