//! Epochs: who may write a namespace of the replicas, and since when (invariant 8: never two
//! primaries). Every promotion starts a higher epoch; a replica that has seen an epoch refuses
//! every lower one.
//!
//! Two records, one per side, each a small JSON file replaced atomically and durably:
//! * [`Lineage`], `epoch.json` in a primary mount's state directory: the namespace the mount
//!   writes on its replicas (its `[node] name`, or the one it took over by a promotion), its
//!   epoch, the generation it took over from, and, once a replica refused it, who fenced it.
//!   A mount without one writes its node's own namespace at epoch 0.
//! * [`Holder`], `.ferry/epoch.json` in a replica namespace: the highest epoch the namespace
//!   has accepted, the node and key that hold it and since when, and the generations of an
//!   older epoch it keeps aside because the new holder took over from an earlier one (a fork).

use std::io;
use std::path::Path;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable;

/// The file name of both records.
pub const FILE: &str = "epoch.json";

/// A generation named the way promotions name it: its epoch, number and group root (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub epoch: u64,
    pub generation: u64,
    pub root: String,
}

/// Who fenced a primary: the replica that refused it said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The replica that refused (its name in `[[peer]]`).
    pub replica: String,
    /// The replica's words: which node holds the namespace, at which epoch, since when.
    pub reason: String,
    /// When it was refused (Unix seconds).
    pub at: u64,
    /// The fenced mount's backing directory (for `ferry rejoin` to find it).
    #[serde(default)]
    pub source: std::path::PathBuf,
}

/// A primary mount's standing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// The namespace it writes on the replicas.
    pub namespace: String,
    pub epoch: u64,
    /// When this epoch began here (Unix seconds).
    pub since: u64,
    /// The generation a promotion started from (none for the namespace's first primary).
    pub base: Option<Base>,
    /// Set when a replica refused it as fenced: it ships nothing more until `ferry rejoin`.
    pub fenced: Option<Fence>,
}

impl Lineage {
    /// The standing of a mount that never took over: its own node's namespace, epoch 0.
    pub fn first(node: &str) -> Lineage {
        Lineage {
            namespace: node.to_string(),
            epoch: 0,
            since: 0,
            base: None,
            fenced: None,
        }
    }
}

/// Generations of an older epoch that a replica holds past the base a new primary took over
/// from: they were replicated nowhere else, and are kept as restore points, never expired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fork {
    pub epoch: u64,
    /// The first and last generation number of the old epoch past the base.
    pub first: u64,
    pub last: u64,
}

/// A replica namespace's standing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub epoch: u64,
    /// The primary's node name and key fingerprint.
    pub node: String,
    pub fingerprint: String,
    /// When it began to hold this epoch here (Unix seconds).
    pub since: u64,
    #[serde(default)]
    pub forks: Vec<Fork>,
}

impl Holder {
    /// Whether generation `n` belongs to a fork (kept aside, never expired).
    pub fn keeps(&self, n: u64) -> bool {
        self.forks.iter().any(|f| (f.first..=f.last).contains(&n))
    }
}

/// Seconds since the Unix epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A time in Unix seconds as people read it (UTC, to the second).
pub fn when(secs: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// Reads a record; `Ok(None)` when there is none. A damaged one is an error that names it.
pub fn load<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the epoch record {} is damaged ({e}): it says which node may write this \
                     namespace; restore it from a backup or from a replica's `ferry status \
                     --json` before going on",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot read the epoch record {}: {e}", path.display()),
        )),
    }
}

/// Replaces a record atomically and durably (fsynced, with its directory).
pub fn save<T: Serialize>(path: &Path, record: &T) -> io::Result<()> {
    durable::write_atomic(
        path,
        &serde_json::to_vec_pretty(record).expect("serialisable"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        assert_eq!(load::<Lineage>(&p).unwrap(), None);
        let l = Lineage {
            base: Some(Base {
                epoch: 0,
                generation: 7,
                root: "ab".into(),
            }),
            epoch: 1,
            since: 5,
            ..Lineage::first("site-a")
        };
        save(&p, &l).unwrap();
        assert_eq!(load::<Lineage>(&p).unwrap(), Some(l));
        std::fs::write(&p, b"{\"epoch\": 1").unwrap();
        let e = load::<Lineage>(&p).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains(FILE), "{e}");
    }

    #[test]
    fn a_holder_keeps_the_generations_of_its_forks() {
        let h = Holder {
            forks: vec![Fork {
                epoch: 0,
                first: 3,
                last: 4,
            }],
            ..Holder::default()
        };
        assert!(!h.keeps(2) && h.keeps(3) && h.keeps(4) && !h.keeps(5));
    }
}
