//! The primary mount's side of automatic failover: campaign for the leader key, keep its lease,
//! and fence this mount (no sync point, guest writes held) the moment it can no longer be sure
//! it is the primary.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Instant;

use serde_json::{Value, json};

use super::{Claim, Etcd, Leader, policy};
use crate::config::Failover;
use crate::fs::gate::Gate;
use crate::sync::Engine;

/// Starts the agent of a primary mount.
pub fn start(
    cfg: Failover,
    me: Leader,
    engine: Arc<Engine>,
    gate: Arc<Gate>,
) -> std::io::Result<()> {
    let agent = Agent {
        cfg,
        me,
        engine,
        gate,
    };
    super::spawn_agent(agent.run()).map(|_| ())
}

struct Agent {
    cfg: Failover,
    me: Leader,
    engine: Arc<Engine>,
    gate: Arc<Gate>,
}

impl Agent {
    fn status(&self, state: &str, more: Value) {
        let mut v = json!({
            "state": state,
            "cluster": self.cfg.cluster,
            "etcd": self.cfg.etcd,
            "ttl_s": self.cfg.ttl.as_secs_f64(),
            "since": crate::epoch::now(),
        });
        if let (Some(v), Some(more)) = (v.as_object_mut(), more.as_object()) {
            v.extend(more.clone());
        }
        self.engine.set_failover(v);
    }

    /// Fences this mount for good: another node holds the leader key.
    fn lost(&self, why: String) {
        self.engine.fence_by("etcd", why.clone());
        self.engine.hold(Some(why.clone()));
        self.gate.close(why.clone(), self.cfg.write_grace);
        self.status("fenced", json!({ "reason": why }));
    }

    async fn run(self) {
        if let Some(f) = self.engine.lineage().fenced {
            let why = format!("fenced earlier ({}); run `ferry rejoin`", f.reason);
            self.gate.close(why.clone(), self.cfg.write_grace);
            self.status("fenced", json!({ "reason": why }));
            return;
        }
        self.status("connecting", json!({}));
        let mut warned = false;
        loop {
            let mut etcd = match Etcd::connect(&self.cfg).await {
                Ok(e) => e,
                Err(e) if self.gate.closed().is_some() => {
                    // It led, and its lease ran out: writes stay held until it wins again.
                    self.status(
                        "fencing",
                        json!({ "reason": format!("cannot reach etcd to take the key again: {e:#}") }),
                    );
                    tokio::time::sleep(policy::retry_after(self.cfg.ttl)).await;
                    continue;
                }
                Err(e) => {
                    if !warned {
                        log::error!(
                            "AUTOMATIC FAILOVER IS OFF for now: {e:#}. This mount serves and \
                             syncs as a primary without a lease (manual mode: promote by hand \
                             if this site is lost); it keeps trying to reach etcd every {:?}",
                            self.cfg.ttl
                        );
                        warned = true;
                    }
                    self.status("manual", json!({ "reason": format!("{e:#}") }));
                    tokio::time::sleep(self.cfg.ttl).await;
                    continue;
                }
            };
            match self.lead(&mut etcd).await {
                Ok(()) => return,
                Err(e) => {
                    log::warn!("failover: {e:#}; campaigning again");
                    tokio::time::sleep(policy::renew_every(self.cfg.ttl)).await;
                }
            }
        }
    }

    /// Campaigns, then keeps the lease while it holds the key. `Ok` once fenced for good.
    async fn lead(&self, etcd: &mut Etcd) -> anyhow::Result<()> {
        let ttl = self.cfg.ttl;
        let lease = etcd.grant().await?;
        let granted = Instant::now();
        let lineage = self.engine.lineage();
        let epoch = match etcd.claim(&self.me, lease, lineage.epoch).await? {
            Claim::Won { epoch } => epoch,
            Claim::Lost(h) => {
                let _ = etcd.revoke(lease).await;
                self.lost(format!(
                    "etcd's leader key {} is held by node {} (epoch {}); this mount writes \
                     namespace {} at epoch {}",
                    etcd.leader_key(),
                    h.leader.node,
                    h.epoch,
                    lineage.namespace,
                    lineage.epoch
                ));
                return Ok(());
            }
        };
        if epoch < lineage.epoch {
            let _ = etcd.resign(lease).await;
            let why = format!(
                "etcd's leader key stands for epoch {epoch}, below the epoch {} this mount \
                 already writes under (a promotion made outside etcd?): fix the key \
                 ferry/{}/epoch-base before failover can work",
                lineage.epoch, self.cfg.cluster
            );
            self.lost(why);
            return Ok(());
        }
        self.engine.raise_epoch(epoch)?;
        log::info!(
            "failover: this mount is the primary of cluster {} (leader key {}, epoch {epoch}, \
             lease ttl {ttl:?})",
            self.cfg.cluster,
            etcd.leader_key()
        );
        self.open(epoch);
        // Two loops at once: renewals, and the watchdog that fences the mount at the last
        // safe instant if no renewal got through by then (whatever a renewal is waiting for).
        let renewed = parking_lot::Mutex::new(granted);
        let fenced = std::sync::atomic::AtomicBool::new(false);
        let watchdog = async {
            loop {
                let at = policy::fence_at(*renewed.lock(), ttl);
                tokio::time::sleep_until(at.into()).await;
                let last = *renewed.lock();
                if Instant::now() >= policy::fence_at(last, ttl) && !fenced.swap(true, SeqCst) {
                    self.fence(format!(
                        "etcd has not renewed this primary's lease for {:.1} s (ttl {ttl:?}): \
                         another node may be promoted soon; guest writes are held (EIO after \
                         {:?}) and no sync point runs until the lease is renewed",
                        last.elapsed().as_secs_f64(),
                        self.cfg.write_grace
                    ));
                }
                if fenced.load(SeqCst) {
                    tokio::time::sleep(ttl / 10).await;
                }
            }
        };
        let renewals = async {
            let mut next = Instant::now() + policy::renew_every(ttl);
            loop {
                tokio::time::sleep_until(next.into()).await;
                let sent = Instant::now();
                next = sent + policy::renew_every(ttl);
                match etcd.renew(lease).await {
                    // The lease runs at least a ttl from when this renewal was sent.
                    Ok(true) => *renewed.lock() = sent,
                    Ok(false) => {
                        // The lease expired and the key went with it. Whoever takes it next is
                        // the primary; this mount campaigns again (it wins only if nobody did).
                        fenced.store(true, SeqCst);
                        self.fence(format!(
                            "the lease on etcd's leader key expired (not renewed for {ttl:?})"
                        ));
                        anyhow::bail!("lease {lease:x} expired");
                    }
                    Err(e) => {
                        // Another member may answer: try again soon, not a third of a ttl on.
                        log::warn!("failover: cannot renew the lease: {e:#}");
                        next = Instant::now() + policy::retry_after(ttl);
                        continue;
                    }
                }
                // Renewed; but is the key still this mount's (not deleted, not rewritten)?
                match etcd.leader().await {
                    Ok(Some(h)) if h.leader == self.me && h.lease == lease => {
                        if fenced.swap(false, SeqCst) {
                            log::warn!("failover: the lease is renewed again: unfenced");
                            self.open(epoch);
                        }
                    }
                    Ok(other) => {
                        let _ = etcd.revoke(lease).await;
                        self.lost(match other {
                            Some(h) => format!(
                                "etcd's leader key {} now names node {} (epoch {})",
                                etcd.leader_key(),
                                h.leader.node,
                                h.epoch
                            ),
                            None => format!(
                                "etcd's leader key {} was deleted under this mount",
                                etcd.leader_key()
                            ),
                        });
                        return Ok(());
                    }
                    Err(e) => log::warn!("failover: {e:#}"),
                }
            }
        };
        tokio::select! {
            r = renewals => r,
            _ = watchdog => unreachable!("the watchdog never ends"),
        }
    }

    fn open(&self, epoch: u64) {
        self.engine.hold(None);
        self.gate.open();
        self.status("leading", json!({ "epoch": epoch, "leader": self.me.node }));
    }

    /// Fences this mount until the lease is renewed (or for good, if it was lost).
    fn fence(&self, why: String) {
        log::error!("failover: fencing this mount: {why}");
        self.engine.hold(Some(why.clone()));
        self.gate.close(why.clone(), self.cfg.write_grace);
        self.status("fencing", json!({ "reason": why }));
    }
}
