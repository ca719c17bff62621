//! `ferry promote`: one primary's namespace of this replica becomes the backing directory of a
//! read-write primary mount, under the next epoch.
//!
//! In this order, each step durable before the next, so that a crash anywhere leaves either
//! the replica it was or a promotion that a second `ferry promote` finishes:
//! 1. the store's lock is taken (the replica daemon must not serve it meanwhile), and the
//!    namespace is opened: a committed generation not yet applied is applied first;
//! 2. the other replicas are asked what they hold of the namespace ([`decide`]): a newer one
//!    refuses the promotion unless forced, and the new epoch is above every epoch seen;
//! 3. the namespace's holder (this node, the new epoch) is recorded, then the namespace is
//!    entered in `<store>/.ferry/promoted.json`: from then on this node is its primary, and the
//!    daemon fences the old one;
//! 4. the namespace's metadata directory moves aside to `<store>/.ferry/promoted/<name>.<epoch>`
//!    (a rename: no image byte is copied or read), so `<store>/<name>` holds only the images,
//!    as a primary's backing directory does. Its committed manifests seed the primary mount's
//!    active generation, so the mount re-chunks nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use super::site::{self, PROMOTED, Promoted};
use super::{META_DIR, Policy, Store};
use crate::chunk::ChunkParams;
use crate::durable;
use crate::epoch::{self, Base, Holder};
use crate::manifest::{ManifestDir, hex, short_hex};
use crate::net::transport::{connect, read_frame, write_frame};
use crate::net::{Congestion, Fingerprint, Identity, Node, Threads};
use crate::wire::frame::{Frame, Hash, VERSION};

/// Another replica of the namespace, as the promoted node's config names it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

/// What a replica holds of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    /// The node that holds that epoch (empty when unknown).
    pub holder: String,
    pub generation: u64,
    pub root: Hash,
}

/// What the other replicas said (or why they could not be asked).
pub type Answers = Vec<(String, Result<Held, String>)>;

/// Asks every peer at once what it holds of `namespace`, each within `within`.
pub fn probe_peers(id: &Identity, peers: &[Peer], namespace: &str, within: Duration) -> Answers {
    if peers.is_empty() {
        return vec![];
    }
    let pinned: Vec<Fingerprint> = peers.iter().map(|p| p.fingerprint).collect();
    let threads = Threads {
        count: 1,
        name: "ferry-promote",
        on_start: || {},
    };
    let node = match Node::client(id, &pinned, Congestion::default(), threads) {
        Ok(n) => n,
        Err(e) => {
            let e = format!("{e:#}");
            return peers
                .iter()
                .map(|p| (p.name.clone(), Err(e.clone())))
                .collect();
        }
    };
    let ep = node.endpoint().clone();
    // All at once: an unreachable replica costs `within`, not `within` per replica.
    let mut answers: Answers = node.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for p in peers {
            let (ep, name, addr, ns) = (ep.clone(), p.name.clone(), p.addr, namespace.to_string());
            set.spawn(async move {
                let r = tokio::time::timeout(within, ask(&ep, addr, &ns))
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within {within:?}")));
                (name, r.map_err(|e| format!("{e:#}")))
            });
        }
        set.join_all().await
    });
    answers.sort_by_key(|(n, _)| peers.iter().position(|p| &p.name == n));
    answers
}

async fn ask(ep: &quinn::Endpoint, addr: SocketAddr, namespace: &str) -> Result<Held> {
    let conn = connect(ep, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let probe = Frame::Probe {
        version: VERSION,
        namespace: namespace.to_string(),
    };
    write_frame(&mut send, &probe).await?;
    let answer = read_frame(&mut recv).await?;
    conn.close(0u32.into(), b"done");
    match answer {
        Some(Frame::Probed {
            epoch,
            holder,
            generation,
            group_root,
        }) => Ok(Held {
            epoch,
            holder,
            generation,
            root: group_root,
        }),
        Some(Frame::Refuse { reason, .. }) => bail!("refused: {reason}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Whether this node, holding `own`, may be promoted, and to which epoch: above every epoch
/// any replica has seen. A replica holding a newer generation (a higher epoch, or more of the
/// same epoch) is named and refuses it unless `force`: promote that one instead.
pub fn decide(own: &Held, answers: &Answers, force: bool) -> Result<u64, String> {
    let held = answers
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|h| (n, h)));
    let newer: Vec<String> = held
        .clone()
        .filter(|(_, h)| (h.epoch, h.generation) > (own.epoch, own.generation))
        .map(|(n, h)| {
            format!(
                "{n} holds generation {} of epoch {} (root {})",
                h.generation,
                h.epoch,
                short_hex(&h.root)
            )
        })
        .collect();
    if !newer.is_empty() && !force {
        return Err(format!(
            "not promoted: {}, newer than this node's generation {} of epoch {}. Promote the \
             most up-to-date replica instead, or give --force to promote this one (the newer \
             generations stay on those replicas as restore points, kept aside for good)",
            newer.join("; "),
            own.generation,
            own.epoch
        ));
    }
    Ok(held.map(|(_, h)| h.epoch).fold(own.epoch, u64::max) + 1)
}

/// A namespace promoted on this node.
#[derive(Clone, Debug)]
pub struct Promotion {
    pub namespace: String,
    pub epoch: u64,
    /// The generation it took over from.
    pub base: Base,
    /// The images: the primary mount's backing directory.
    pub backing: PathBuf,
    /// The namespace's metadata, moved aside (committed manifests, restore points).
    pub meta: PathBuf,
    /// Whether this call promoted it (false: an earlier one had).
    pub now: bool,
}

impl Promotion {
    /// The committed manifests it starts from.
    pub fn manifests(&self) -> ManifestDir {
        ManifestDir::new(self.meta.join("manifests"))
    }
}

/// Where a namespace's metadata goes when it is promoted at `epoch`.
fn retired(root: &Path, namespace: &str, epoch: u64) -> PathBuf {
    root.join(META_DIR)
        .join("promoted")
        .join(format!("{namespace}.{epoch}"))
}

/// What a namespace holds, and its holder's epoch, read with the store locked.
pub struct Opened {
    store: Store,
    _lock: std::fs::File,
    root: PathBuf,
    namespace: String,
}

impl Opened {
    pub fn held(&self) -> Held {
        let (generation, root) = self.store.committed();
        Held {
            epoch: self.store.holder().epoch,
            holder: self.store.holder().node.clone(),
            generation,
            root: crate::manifest::from_hex(root).unwrap_or_default(),
        }
    }
}

/// Step 1: locks the store at `root` and opens namespace `namespace` (replaying a committed
/// generation). `Ok(Err(p))` when it was promoted here already.
pub fn open(
    root: &Path,
    namespace: &str,
    params: ChunkParams,
    policy: Policy,
) -> Result<std::result::Result<Opened, Promotion>> {
    let root = root
        .canonicalize()
        .with_context(|| format!("replica store {} not found", root.display()))?;
    let lock = site::lock(&root)?;
    if let Some(h) = site::read_promoted(&root)?.get(namespace) {
        return Ok(Err(promotion_of(&root, namespace, h, false)?));
    }
    let dir = root.join(namespace);
    if !site::valid_name(namespace) || !dir.join(META_DIR).is_dir() {
        bail!(
            "store {} has no namespace {namespace:?}: see `ferry generations --config FILE` for \
             the primaries this replica holds",
            root.display()
        );
    }
    let store = Store::open_with(&dir, params, policy)?;
    if store.committed().0 == 0 {
        bail!(
            "namespace {namespace} holds no committed generation yet: there is nothing to \
             promote"
        );
    }
    Ok(Ok(Opened {
        store,
        _lock: lock,
        root,
        namespace: namespace.to_string(),
    }))
}

fn promotion_of(root: &Path, namespace: &str, h: &Holder, now: bool) -> Result<Promotion> {
    let meta = retired(root, namespace, h.epoch);
    let base: Base = epoch::load(&meta.join("base.json"))?
        .ok_or_else(|| anyhow!("{} lacks base.json", meta.display()))?;
    Ok(Promotion {
        namespace: namespace.to_string(),
        epoch: h.epoch,
        base,
        backing: root.join(namespace),
        meta,
        now,
    })
}

/// Steps 3 and 4: records this node (`node`, key `fingerprint`) as the namespace's holder at
/// `new_epoch`, and moves its metadata aside.
pub fn promote(mut o: Opened, node: &str, fingerprint: &str, new_epoch: u64) -> Result<Promotion> {
    let held = o.held();
    if new_epoch <= held.epoch {
        bail!(
            "epoch {new_epoch} is not above the namespace's {}",
            held.epoch
        );
    }
    let holder = Holder {
        epoch: new_epoch,
        node: node.to_string(),
        fingerprint: fingerprint.to_string(),
        since: epoch::now(),
        forks: o.store.holder().forks.clone(),
    };
    o.store.set_holder(holder.clone())?;
    let base = Base {
        epoch: held.epoch,
        generation: held.generation,
        root: hex(&held.root),
    };
    let meta = o.store.root().join(META_DIR);
    epoch::save(&meta.join("base.json"), &base)?;
    let mut promoted: Promoted = site::read_promoted(&o.root)?;
    promoted.insert(o.namespace.clone(), holder.clone());
    epoch::save(&o.root.join(META_DIR).join(PROMOTED), &promoted)?;
    let to = retired(&o.root, &o.namespace, new_epoch);
    std::fs::create_dir_all(to.parent().expect("has a parent"))?;
    std::fs::rename(&meta, &to)
        .with_context(|| format!("cannot move {} to {}", meta.display(), to.display()))?;
    durable::fsync_dir(o.store.root())?;
    durable::fsync_dir(to.parent().expect("has a parent"))?;
    log::info!(
        "namespace {} promoted at epoch {new_epoch} from generation {} of epoch {}",
        o.namespace,
        held.generation,
        held.epoch
    );
    promotion_of(&o.root, &o.namespace, &holder, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(epoch: u64, generation: u64) -> Held {
        Held {
            epoch,
            holder: String::new(),
            generation,
            root: [1; 32],
        }
    }

    #[test]
    fn the_newest_replica_is_promoted_and_the_epoch_rises_above_all_seen() {
        let own = held(0, 5);
        let answers: Answers = vec![
            ("site-c".into(), Ok(held(0, 6))),
            ("site-d".into(), Err("unreachable".into())),
        ];
        let e = decide(&own, &answers, false).unwrap_err();
        assert!(
            e.contains("site-c holds generation 6 of epoch 0") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(decide(&own, &answers, true), Ok(1));
        // Behind or level: promoted; the epoch goes past any other's.
        let answers: Answers = vec![
            ("site-c".into(), Ok(held(0, 5))),
            ("site-d".into(), Ok(held(3, 0))),
        ];
        assert_eq!(decide(&held(0, 5), &answers[..1].to_vec(), false), Ok(1));
        let e = decide(&held(0, 5), &answers, false).unwrap_err();
        assert!(e.contains("site-d"), "{e}");
        assert_eq!(decide(&held(0, 5), &answers, true), Ok(4));
        assert_eq!(decide(&held(2, 1), &vec![], false), Ok(3));
    }
}
