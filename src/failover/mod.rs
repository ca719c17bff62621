//! Automatic failover on an etcd cluster (`[failover]`; docs/OPERATIONS.md, "Automatic
//! failover"). etcd decides who the primary is; ferry only keeps to what it says:
//! * the primary mount holds `ferry/<cluster>/leader` with a lease it renews ([`lead`]); the
//!   epoch it writes under is the key's create revision (plus the cluster's base), and when it
//!   cannot renew for nearly a ttl it fences itself (no sync point, guest writes held) before
//!   etcd can let the key go;
//! * each replica daemon publishes the newest generation it committed under
//!   `ferry/<cluster>/replicas/<node>` and watches the leader key ([`follow`]); when the key is
//!   gone, the newest replica takes it (a transaction on the key's absence, so two can never
//!   both win) and promotes itself as `ferry promote` does.
//!
//! The decisions are in [`policy`] (pure); this module is the etcd side: keys, values, and the
//! few transactions, each bounded by a timeout.

pub mod follow;
pub mod lead;
pub mod policy;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use crate::config::Failover;

/// What the leader key holds: who the primary is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// Its `[node] name`.
    pub node: String,
    /// Its key's fingerprint (`ferry id`).
    pub fingerprint: String,
    /// The namespace it writes on the replicas.
    pub namespace: String,
}

/// What a replica publishes of itself for the others to rank it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub namespace: String,
    pub epoch: u64,
    pub generation: u64,
}

/// The leader key as read: its holder, the epoch it stands for, and its revisions and lease.
#[derive(Clone, Debug)]
pub struct Held {
    pub leader: Leader,
    pub epoch: u64,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// The outcome of a campaign.
#[derive(Clone, Debug)]
pub enum Claim {
    /// This node holds the key with its lease: it is the primary at `epoch`.
    Won { epoch: u64 },
    /// Another node holds it.
    Lost(Held),
}

/// A client of the cluster's etcd, every request bounded by a quarter of the ttl.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    cluster: String,
    endpoints: Vec<String>,
    pub ttl: Duration,
    within: Duration,
    /// The cluster's epoch base, once read (it never changes).
    base: Option<u64>,
}

/// The least interval between HTTP/2 pings to etcd (see [`Etcd::connect`]).
const ETCD_PING: Duration = Duration::from_secs(10);

impl Etcd {
    /// Connects to the members of `cfg.etcd` (any one that answers will do).
    pub async fn connect(cfg: &Failover) -> Result<Etcd> {
        let within = (cfg.ttl / 4).max(Duration::from_millis(500));
        // Every request has its own timeout; the HTTP/2 pings only find a connection that died
        // while idle. etcd (grpc-go) closes a connection whose pings come more often than every
        // 5 s (its default `--grpc-keepalive-min-time`) with "too_many_pings", which cost a
        // follower its place in a failover: so no more often than every 10 s.
        let opts = ConnectOptions::new()
            .with_connect_timeout(within)
            .with_timeout(within)
            .with_keep_alive(ETCD_PING.max(within), within);
        let client = tokio::time::timeout(within * 2, Client::connect(&cfg.etcd, Some(opts)))
            .await
            .map_err(|_| anyhow!("no etcd member answered within {:?}", within * 2))?
            .with_context(|| format!("cannot connect to etcd at {}", cfg.etcd.join(", ")))?;
        let mut e = Etcd {
            client,
            cluster: cfg.cluster.clone(),
            endpoints: cfg.etcd.clone(),
            ttl: cfg.ttl,
            within,
            base: None,
        };
        // A client connects lazily: ask something, so that "unreachable" is said now.
        e.leader().await?;
        Ok(e)
    }

    /// The etcd members, as configured.
    pub fn endpoints(&self) -> String {
        self.endpoints.join(", ")
    }

    fn key(&self, what: &str) -> String {
        format!("ferry/{}/{what}", self.cluster)
    }

    /// The leader key's name.
    pub fn leader_key(&self) -> String {
        self.key("leader")
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.within, f).await {
            Ok(r) => r.with_context(|| format!("etcd {what} failed ({})", self.endpoints())),
            Err(_) => Err(anyhow!(
                "etcd {what}: no answer within {:?} ({})",
                self.within,
                self.endpoints()
            )),
        }
    }

    /// A new lease of one ttl.
    pub async fn grant(&mut self) -> Result<i64> {
        let ttl = self.ttl.as_secs().max(1) as i64;
        let mut c = self.client.clone();
        Ok(self
            .bounded("lease grant", c.lease_grant(ttl, None))
            .await?
            .id())
    }

    /// Renews `lease` for another ttl: `Ok(false)` when etcd says it is gone (expired).
    pub async fn renew(&mut self, lease: i64) -> Result<bool> {
        let mut c = self.client.clone();
        let answer = self
            .bounded("lease keep-alive", async move {
                let (mut keeper, mut stream) = match c.lease_keep_alive(lease).await {
                    // The client reads etcd's "TTL 0" answer to the first renewal as this.
                    Err(etcd_client::Error::LeaseKeepAliveError(e)) if e == "lease not found" => {
                        return Ok(None);
                    }
                    r => r?,
                };
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await?;
        Ok(answer.is_some_and(|a| a.ttl() > 0))
    }

    /// Lets `lease` go (and every key bound to it).
    pub async fn revoke(&mut self, lease: i64) -> Result<()> {
        let mut c = self.client.clone();
        self.bounded("lease revoke", c.lease_revoke(lease)).await?;
        Ok(())
    }

    /// The cluster's epoch base. Set once, by the first campaign (`floor`: the epoch that
    /// node held), so that the first leader's epoch is above every epoch before etcd; read
    /// as 0 while no campaign set it.
    async fn base(&mut self, floor: Option<u64>) -> Result<u64> {
        if let Some(b) = self.base {
            return Ok(b);
        }
        let key = self.key("epoch-base");
        let mut c = self.client.clone();
        let kv = match floor {
            Some(floor) => {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), floor.to_string(), None)])
                    .or_else([TxnOp::get(key.clone(), None)]);
                let r = self.bounded("transaction", c.txn(txn)).await?;
                if r.succeeded() {
                    self.base = Some(floor);
                    return Ok(floor);
                }
                first_kv(&r.op_responses())
            }
            None => self
                .bounded("get", c.get(key.clone(), None))
                .await?
                .kvs()
                .first()
                .cloned(),
        };
        let Some(kv) = kv else {
            return Ok(0);
        };
        let b = String::from_utf8_lossy(kv.value())
            .trim()
            .parse()
            .map_err(|_| {
                anyhow!(
                    "etcd key {key} holds {:?}, not an epoch: something else wrote it; fix it",
                    String::from_utf8_lossy(kv.value())
                )
            })?;
        self.base = Some(b);
        Ok(b)
    }

    /// Whether any node ever led this cluster (its first campaign set the epoch base). Until
    /// then a missing leader key means a primary that has not reached etcd yet, not a lost one.
    pub async fn ever_led(&mut self) -> Result<bool> {
        if self.base.is_some() {
            return Ok(true);
        }
        let key = self.key("epoch-base");
        let mut c = self.client.clone();
        let r = self.bounded("get", c.get(key, None)).await?;
        Ok(!r.kvs().is_empty())
    }

    /// The leader key, if any node holds it.
    pub async fn leader(&mut self) -> Result<Option<Held>> {
        let key = self.leader_key();
        let mut c = self.client.clone();
        let r = self.bounded("get", c.get(key.clone(), None)).await?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => self.held(kv).await.map(Some),
        }
    }

    async fn held(&mut self, kv: &KeyValue) -> Result<Held> {
        // A value that is not ferry's (something else wrote the key) names no node of this
        // cluster: nobody may take the key over, and a primary that finds it fences itself.
        let leader = serde_json::from_slice(kv.value()).unwrap_or_else(|e| Leader {
            node: format!(
                "(none: the key holds {:?}, which ferry did not write ({e}); delete the key \
                 once you know what wrote it)",
                String::from_utf8_lossy(&kv.value()[..kv.value().len().min(64)])
            ),
            fingerprint: String::new(),
            namespace: String::new(),
        });
        let base = self.base(None).await?;
        Ok(Held {
            leader,
            epoch: policy::epoch(base, kv.create_revision()),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        })
    }

    /// Campaigns for the leader key as `me`, bound to `lease`; `floor` is the highest epoch
    /// this node knows of (it sets the cluster's base the first time). The key is taken when
    /// nobody holds it, or re-bound to `lease` when this very node (name and key) holds it
    /// (a restarted mount, or the mount a promotion started): a transaction on the key's
    /// revision each time, so that of two campaigns at once exactly one wins.
    pub async fn claim(&mut self, me: &Leader, lease: i64, floor: u64) -> Result<Claim> {
        let base = self.base(Some(floor)).await?;
        let key = self.leader_key();
        let value = serde_json::to_vec(me).expect("serialisable");
        let put = || {
            TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([put()])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut c = self.client.clone();
        let r = self.bounded("transaction", c.txn(txn)).await?;
        if r.succeeded() {
            let rev = r.header().map_or(0, |h| h.revision());
            return Ok(Claim::Won {
                epoch: policy::epoch(base, rev),
            });
        }
        let Some(kv) = first_kv(&r.op_responses()) else {
            // Gone between the compare and the get: another round decides.
            return Box::pin(self.claim(me, lease, floor)).await;
        };
        let held = self.held(&kv).await?;
        if held.leader != *me {
            return Ok(Claim::Lost(held));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                held.mod_revision,
            )])
            .and_then([put()]);
        let mut c = self.client.clone();
        if self.bounded("transaction", c.txn(txn)).await?.succeeded() {
            Ok(Claim::Won { epoch: held.epoch })
        } else {
            Box::pin(self.claim(me, lease, floor)).await
        }
    }

    /// Deletes the leader key if `lease` still holds it (a promotion that failed half-way).
    pub async fn resign(&mut self, lease: i64) -> Result<()> {
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        self.bounded("transaction", c.txn(txn)).await?;
        Ok(())
    }

    /// Publishes what this replica holds, bound to `lease` (it vanishes with the replica).
    pub async fn publish(&mut self, node: &str, p: &Published, lease: i64) -> Result<()> {
        let key = self.key(&format!("replicas/{node}"));
        let value = serde_json::to_vec(p).expect("serialisable");
        let mut c = self.client.clone();
        self.bounded(
            "put",
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// What the live replicas published, by node.
    pub async fn published(&mut self) -> Result<Vec<(String, Published)>> {
        let prefix = self.key("replicas/");
        let mut c = self.client.clone();
        let r = self
            .bounded(
                "get",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                let node = kv.key_str().ok()?.strip_prefix(&prefix)?.to_string();
                Some((node, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect())
    }
}

/// Runs an agent on its own thread with its own small runtime: nothing in the daemon (a sync,
/// a slow disk) can delay its renewals, and nothing it waits for can delay a guest's write.
fn spawn_agent(
    agent: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ferry-failover".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(agent)
        })
}

/// Who etcd says the primary is now, for a command run by hand (`ferry promote`): asked once,
/// within about half the ttl.
pub fn leader_now(cfg: &Failover) -> Result<Option<Held>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut etcd = Etcd::connect(cfg).await?;
        etcd.leader().await
    })
}

fn first_kv(ops: &[TxnOpResponse]) -> Option<KeyValue> {
    ops.iter().find_map(|o| match o {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}
