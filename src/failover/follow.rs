//! A replica daemon's side of automatic failover: publish the newest generation committed here,
//! watch the leader key, and when it is gone take it if this replica is the newest one alive,
//! after a wait that lets the newer ones go first ([`policy::campaign_delay`]).
//!
//! Winning only takes the key: the daemon then stops serving, the face promotes the namespace
//! as `ferry promote` does (under the key's epoch) and starts its mount, whose own agent
//! ([`super::lead`]) takes the key over from this one's lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::policy::{self, Candidate};
use super::{Claim, Etcd, Leader, Published};
use crate::config::Failover;
use crate::replica::Site;
use crate::wire::frame::Frame;

/// What a won campaign hands to the face.
#[derive(Clone, Debug)]
pub struct Won {
    pub namespace: String,
    pub epoch: u64,
}

/// The agent of a replica daemon, shared with the face that started it.
pub struct Follow {
    won: Mutex<Option<Won>>,
    /// Set by the face once the promotion is done (or failed): the agent lets its lease go.
    done: Mutex<Option<bool>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Follow {
    /// The campaign this replica won, if it did.
    pub fn won(&self) -> Option<Won> {
        self.won.lock().clone()
    }

    /// The promotion is over: `ok` keeps the key for the new mount (whose agent has re-bound
    /// it to its own lease), `!ok` gives it up so that another replica can take it. Waits for
    /// the agent to finish, at most one ttl.
    pub fn finish(&self, ok: bool, ttl: Duration) {
        *self.done.lock() = Some(ok);
        if let Some(t) = self.thread.lock().take() {
            let until = Instant::now() + ttl;
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Starts the agent of a replica daemon serving `site` as node `me`. When it wins, it records
/// the win and sends this process SIGTERM (the daemon's clean stop); the face then promotes.
pub fn start(cfg: Failover, me: Leader, site: Arc<Site>) -> std::io::Result<Arc<Follow>> {
    let f = Arc::new(Follow {
        won: Mutex::new(None),
        done: Mutex::new(None),
        thread: Mutex::new(None),
    });
    let agent = Agent {
        cfg,
        me,
        site: Arc::downgrade(&site),
        f: f.clone(),
    };
    let t = super::spawn_agent(agent.run())?;
    *f.thread.lock() = Some(t);
    Ok(f)
}

struct Agent {
    cfg: Failover,
    /// This node; `namespace` is the one it follows (empty until known).
    me: Leader,
    /// Weak: once the daemon stops, the store (and its lock) must be free for the promotion.
    site: std::sync::Weak<Site>,
    f: Arc<Follow>,
}

impl Agent {
    /// The newest generation committed here of `ns`, and whether this node is its primary
    /// already (promoted).
    fn held(&self, ns: &str) -> (Published, bool) {
        let probed = self.site.upgrade().map(|s| s.probe(ns));
        match probed {
            Some(Frame::Probed {
                epoch,
                holder,
                generation,
                ..
            }) => (
                Published {
                    namespace: ns.to_string(),
                    epoch,
                    generation,
                },
                holder == self.me.node && generation == 0 && epoch > 0,
            ),
            _ => (
                Published {
                    namespace: ns.to_string(),
                    epoch: 0,
                    generation: 0,
                },
                false,
            ),
        }
    }

    async fn run(mut self) {
        let ttl = self.cfg.ttl;
        let mut warned = false;
        // After a failed request (a member restarting, a connection reset), follow again soon:
        // a campaign that waits a whole ttl to retry comes a ttl late. The wait doubles while
        // the failures come quickly, up to the ttl.
        let mut retry = ttl / 16;
        loop {
            let wait = match Etcd::connect(&self.cfg).await {
                Ok(mut etcd) => {
                    let since = Instant::now();
                    match self.follow(&mut etcd).await {
                        Ok(()) => return,
                        Err(e) => log::warn!("failover: {e:#}; following again"),
                    }
                    retry = if since.elapsed() > ttl {
                        ttl / 16
                    } else {
                        (retry * 2).min(ttl)
                    };
                    retry
                }
                Err(e) => {
                    if !warned {
                        log::error!(
                            "AUTOMATIC FAILOVER IS OFF for now: {e:#}. This replica goes on \
                             receiving but will not promote itself; it keeps trying to reach etcd"
                        );
                        warned = true;
                    }
                    ttl
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn follow(&mut self, etcd: &mut Etcd) -> anyhow::Result<()> {
        let ttl = self.cfg.ttl;
        // A key found gone just after this replica (re)gained etcd may have expired while etcd
        // itself was out (it lost quorum, or this host lost it): the primary, alive, could not
        // renew either and takes its key back as soon as it can. No campaign before that had
        // a whole ttl (`policy::settled`).
        let reached = Instant::now();
        let mut lease = etcd.grant().await?;
        let mut tick = tokio::time::interval(policy::renew_every(ttl).min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the leader key was found gone, and when this replica's turn comes.
        let mut turn: Option<Instant> = None;
        // What was published under which lease: a put only when it changes (every put is a
        // revision etcd keeps until it compacts).
        let mut published: Option<(Published, i64)> = None;
        loop {
            tick.tick().await;
            if !etcd.renew(lease).await? {
                lease = etcd.grant().await?;
            }
            let leader = etcd.leader().await?;
            if let Some(h) = &leader {
                if !h.leader.namespace.is_empty() && self.me.namespace != h.leader.namespace {
                    log::info!(
                        "failover: following node {} (namespace {}, epoch {}) on etcd",
                        h.leader.node,
                        h.leader.namespace,
                        h.epoch
                    );
                    self.me.namespace = h.leader.namespace.clone();
                }
            } else if self.me.namespace.is_empty() {
                // Never saw a leader: follow the only namespace this store holds, if one.
                let names = self.site.upgrade().map(|s| s.names()).unwrap_or_default();
                if let [one] = names.as_slice() {
                    self.me.namespace = one.clone();
                }
            }
            let ns = self.me.namespace.clone();
            if ns.is_empty() {
                continue;
            }
            let (mine, promoted) = self.held(&ns);
            if promoted {
                // This node is the namespace's primary: its mount's agent holds the key.
                turn = None;
                continue;
            }
            if published.as_ref() != Some(&(mine.clone(), lease)) {
                etcd.publish(&self.me.node, &mine, lease).await?;
                published = Some((mine.clone(), lease));
            }
            if leader.is_some() {
                turn = None;
                continue;
            }
            if !etcd.ever_led().await? {
                // No primary has reached etcd yet (it may be running in manual mode): a
                // missing key is not a lost primary.
                continue;
            }
            let me = Candidate {
                node: self.me.node.clone(),
                epoch: mine.epoch,
                generation: mine.generation,
            };
            let others = candidates(etcd, &ns).await?;
            let at = *turn.get_or_insert_with(|| {
                let now = Instant::now();
                let wait = policy::campaign_delay(&me, &others, ttl / 2)
                    .max(policy::settled(reached, now, ttl));
                log::warn!(
                    "failover: the leader key of cluster {} is gone; this replica holds \
                     generation {} of epoch {} and campaigns in {wait:?} unless a newer one \
                     (or the primary, back on etcd) takes the key first",
                    self.cfg.cluster,
                    me.generation,
                    me.epoch
                );
                now + wait
            });
            if Instant::now() < at {
                continue;
            }
            if !policy::may_campaign(&me, &others) {
                log::info!("failover: a newer replica is alive; not campaigning");
                continue;
            }
            match etcd.claim(&self.me, lease, mine.epoch).await? {
                Claim::Lost(h) => {
                    log::info!("failover: node {} took the leader key first", h.leader.node);
                    turn = None;
                }
                Claim::Won { epoch } => {
                    log::warn!(
                        "failover: this replica won the leader key of cluster {} at epoch \
                         {epoch}: stopping the replica daemon to promote namespace {ns}",
                        self.cfg.cluster
                    );
                    *self.f.won.lock() = Some(Won {
                        namespace: ns,
                        epoch,
                    });
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    return self.hand_over(etcd, lease).await;
                }
            }
        }
    }

    /// Keeps the won key alive until the promoted mount's agent took it over, or gives it up
    /// if the promotion failed.
    async fn hand_over(&self, etcd: &mut Etcd, lease: i64) -> anyhow::Result<()> {
        let ttl = self.cfg.ttl;
        loop {
            tokio::time::sleep(policy::renew_every(ttl).min(Duration::from_millis(500))).await;
            let done = *self.f.done.lock();
            match done {
                Some(false) => {
                    log::error!("failover: the promotion failed: giving the leader key up");
                    etcd.resign(lease).await?;
                    let _ = etcd.revoke(lease).await;
                    return Ok(());
                }
                Some(true) => {
                    let taken = etcd.leader().await?.is_none_or(|h| h.lease != lease);
                    if taken {
                        // The mount's lease holds the key: this one may go (the key stays).
                        return Ok(());
                    }
                }
                None => {}
            }
            etcd.renew(lease).await?;
        }
    }
}

/// The live replicas that published a generation of `ns`.
async fn candidates(etcd: &mut Etcd, ns: &str) -> anyhow::Result<Vec<Candidate>> {
    Ok(etcd
        .published()
        .await?
        .into_iter()
        .filter(|(_, p)| p.namespace == ns)
        .map(|(node, p)| Candidate {
            node,
            epoch: p.epoch,
            generation: p.generation,
        })
        .collect())
}
