//! A replica site's store: one namespace per primary, named by the primary's node name (`[node]
//! name`, sent in `Hello`), each a full [`Store`] in `<store>/<name>/` with its own images,
//! generations, restore points and epoch.
//!
//! A name is bound to the fingerprint of the primary that first used it, in
//! `<store>/.ferry/primaries.json` (written atomically before the namespace is created): a
//! primary can only ever reach its own namespace. Another key claiming a bound name, or a bound
//! key under a new name, is refused and nothing changes. Namespaces share nothing, not even
//! chunks: a primary must not learn from what it is not asked for whether another primary
//! holds some data.
//!
//! The one way a namespace changes hands is a promotion: a primary with a higher epoch that
//! names, as the generation it took over from, one this namespace holds. The namespace is then
//! bound to the new key and records its holder (see [`crate::epoch::Holder`]); every lower
//! epoch is refused as fenced from then on. A namespace promoted on this node
//! (`<store>/.ferry/promoted.json`) is served by its primary mount, not by the daemon.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use parking_lot::{Mutex, RwLock};

use super::{META_DIR, Policy, Store, View};
use crate::chunk::ChunkParams;
use crate::durable;
use crate::epoch::{self, Fork, Holder};
use crate::wire::frame::{Frame, Refusal, RefuseCode, Takeover};

/// One namespace's store, shared by its sessions, its scrubs and the mount.
pub type Shared = Arc<Mutex<Store>>;

/// The file binding each namespace to its primary's fingerprint.
const BINDINGS: &str = "primaries.json";

/// The file naming the namespaces promoted on this node: name → its new holder (this node).
pub const PROMOTED: &str = "promoted.json";

/// The lock the daemon and `ferry promote` hold on a store (one writer at a time).
const LOCK: &str = "lock";

/// The namespaces promoted on this node.
pub type Promoted = BTreeMap<String, Holder>;

pub fn read_promoted(root: &Path) -> Result<Promoted> {
    let p = root.join(META_DIR).join(PROMOTED);
    Ok(epoch::load(&p)?.unwrap_or_default())
}

/// How long [`lock`] waits for a holder to let go: a replica daemon told to stop (`umount`
/// of its replica mount, `systemctl stop`) still closes its connections for a moment after
/// the command that stopped it returned.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the store's lock (waiting [`LOCK_WAIT`] at most for a stopping holder), or says who
/// holds it.
pub fn lock(root: &Path) -> Result<fs::File> {
    use std::os::unix::io::AsRawFd;
    let p = root.join(META_DIR).join(LOCK);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    let t = std::time::Instant::now();
    // SAFETY: flock on a file descriptor we own.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if t.elapsed() < LOCK_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        anyhow::bail!(
            "store {} is in use: a replica daemon (or a promotion) holds {}; stop it first \
             (systemctl stop ferry-replica, or umount its replica mount)",
            root.display(),
            p.display()
        );
    }
    Ok(f)
}

/// Makes the store `dir` (seeded by [`super::seed`]) namespace `name` of the site at `root`,
/// bound to key `fp`: a fenced primary's images, rejoining as a replica. The directory is
/// renamed into the store (no byte copied), so both must be on one filesystem.
pub fn adopt(root: &Path, name: &str, dir: &Path, fp: &str) -> Result<()> {
    fs::create_dir_all(root.join(META_DIR))
        .with_context(|| format!("cannot create store {}", root.display()))?;
    let _lock = lock(root)?;
    let mut bindings = read_bindings(root)?;
    let to = root.join(name);
    if bindings.contains_key(name) || to.exists() {
        anyhow::bail!(
            "store {} has a namespace {name} already: move {} aside first",
            root.display(),
            to.display()
        );
    }
    fs::rename(dir, &to).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            anyhow::anyhow!(
                "{} and the replica store {} are on different filesystems: set [replica] store \
                 to a directory on the filesystem of the images, so they become the replica's \
                 without a copy",
                dir.display(),
                root.display()
            )
        } else {
            anyhow::anyhow!("cannot move {} to {}: {e}", dir.display(), to.display())
        }
    })?;
    durable::fsync_dir(root)?;
    bindings.insert(name.to_string(), fp.to_string());
    let bytes = serde_json::to_vec_pretty(&bindings).expect("a map of strings");
    durable::write_atomic(&root.join(META_DIR).join(BINDINGS), &bytes)?;
    Ok(())
}

/// A primary asking for its namespace, as its `Hello` and its certificate say.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    pub namespace: &'a str,
    pub node: &'a str,
    pub fingerprint: &'a str,
    pub epoch: u64,
    pub takeover: Option<&'a Takeover>,
}

/// What a claim on a bound namespace does.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The holder's own key at its epoch: served.
    Serve,
    /// The holder's own key at a higher epoch: recorded, then served.
    Raise,
    /// A promoted primary that holds what this namespace holds: bound to its key, recorded
    /// (with the older epoch's generations past its base kept aside, if any), then served.
    TakeOver(Option<Fork>),
}

/// Judges a claim on a namespace bound to key `owner`, whose holder is `holder` and whose
/// committed generation is `committed`; `follows_base` says whether the namespace descends to
/// the generation the caller took over from: it holds it, or that generation is of the epoch
/// the namespace is at (one primary per epoch: its generations are one line, so the namespace
/// is behind the base or past it on the same line).
/// Pure: the caller does what the verdict says.
fn judge(
    owner: &str,
    holder: &Holder,
    c: &Caller,
    committed: u64,
    follows_base: bool,
) -> Result<Verdict, Refusal> {
    let ns = c.namespace;
    let held_by = || {
        if holder.node.is_empty() {
            format!("epoch {}", holder.epoch)
        } else {
            format!(
                "epoch {} by {} (key {}) since {}",
                holder.epoch,
                holder.node,
                holder.fingerprint,
                epoch::when(holder.since)
            )
        }
    };
    if c.epoch < holder.epoch {
        return Err(Refusal::new(
            RefuseCode::Fenced,
            format!(
                "namespace {ns} is held at {}; primary {} writes it at epoch {}: it was fenced by \
                 that promotion. Run `ferry rejoin --config FILE` on {}",
                held_by(),
                c.node,
                c.epoch,
                c.node
            ),
        ));
    }
    if owner == c.fingerprint {
        return Ok(if c.epoch > holder.epoch {
            Verdict::Raise
        } else {
            Verdict::Serve
        });
    }
    match c.takeover {
        Some(t) if c.epoch > holder.epoch && follows_base => {
            let fork = (committed > t.generation).then(|| Fork {
                epoch: holder.epoch,
                first: t.generation + 1,
                last: committed,
            });
            Ok(Verdict::TakeOver(fork))
        }
        Some(t) if c.epoch > holder.epoch => Err(Refusal::new(
            RefuseCode::Namespace,
            format!(
                "primary {} (key {}) takes namespace {ns} over at epoch {} from generation {} \
                 (root {}), which this replica does not hold: promote a node that holds this \
                 replica's generations, or move the namespace aside here to start it afresh",
                c.node,
                c.fingerprint,
                c.epoch,
                t.generation,
                crate::manifest::short_hex(&t.group_root)
            ),
        )),
        _ if c.epoch == holder.epoch && !holder.node.is_empty() => Err(Refusal::new(
            RefuseCode::Fenced,
            format!(
                "namespace {ns} is held at {}; primary {} (key {}) claims the same epoch: two \
                 nodes were promoted at once. Keep the one this replica follows and run `ferry \
                 rejoin --config FILE` on {}",
                held_by(),
                c.node,
                c.fingerprint,
                c.node
            ),
        )),
        _ => Err(Refusal::new(
            RefuseCode::Namespace,
            format!(
                "namespace {ns} of this replica belongs to the primary with key {owner}, not to \
                 this one ({}): give this primary its own [node] name",
                c.fingerprint
            ),
        )),
    }
}

/// Whether `name` can name a namespace: one path component, not hidden, at most 255 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.starts_with('.') && !name.contains(['/', '\0'])
}

/// What is done with each namespace's store once it is open.
type OnOpen = Box<dyn Fn(&str, &mut Store) + Send>;

/// Name → fingerprint (hex), as persisted.
type Bindings = BTreeMap<String, String>;

fn read_bindings(root: &Path) -> Result<Bindings> {
    let p = root.join(META_DIR).join(BINDINGS);
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is corrupt: it binds each primary's node name to its key; restore it from \
                 a backup, or rewrite it as {{\"NAME\": \"FINGERPRINT\", ...}}",
                p.display()
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Bindings::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// A store of the layout before namespaces (one primary's images at the root) is refused with
/// the two commands that convert it.
fn refuse_flat_layout(root: &Path) -> Result<()> {
    if root.join(META_DIR).join("manifests").is_dir() {
        anyhow::bail!(
            "store {0} holds one primary's images at its root (the layout before namespaces); \
             each primary now has a directory named by its [node] name. With the daemon \
             stopped: `mkdir {0}/NAME && find {0} -mindepth 1 -maxdepth 1 ! -name NAME \
             -exec mv -t {0}/NAME {{}} +` (NAME = the primary's [node] name)",
            root.display()
        );
    }
    Ok(())
}

/// The namespaces of the store at `root`, each read beside the daemon (which may be running):
/// name, bound fingerprint, and a read-only view of its generations. Each is read once it has
/// applied the generation it acknowledged last, waited for up to `settle` (see
/// [`super::wait_settled`]).
pub fn read_only(
    root: &Path,
    params: ChunkParams,
    policy: Policy,
    settle: std::time::Duration,
) -> Result<Vec<Namespace>> {
    refuse_flat_layout(root)?;
    let mut out = Vec::new();
    for (name, fingerprint) in read_bindings(root)? {
        let dir = root.join(&name);
        if !dir.join(META_DIR).is_dir() {
            continue; // bound, but its store not created yet
        }
        if !settle.is_zero() && !super::wait_settled(&dir, settle) {
            log::warn!(
                "namespace {name}: its last acknowledged generation is not applied yet (the \
                 replica daemon applies it, or its restart does); the generations applied are \
                 shown"
            );
        }
        let view = View::open(&dir, params, policy, u64::MAX, true)
            .map_err(|e| format!("namespace {name} cannot be read: {e:#}"));
        out.push(Namespace {
            name,
            fingerprint,
            view,
        });
    }
    Ok(out)
}

/// A namespace as a reader beside the daemon sees it.
pub struct Namespace {
    pub name: String,
    pub fingerprint: String,
    /// Its generations, or why they cannot be read (damaged metadata).
    pub view: Result<View, String>,
}

/// The site's store, as the replica daemon owns it.
pub struct Site {
    root: PathBuf,
    params: ChunkParams,
    policy: Policy,
    /// Held while a namespace is bound and created, so two first contacts do not race.
    bindings: Mutex<Bindings>,
    stores: RwLock<BTreeMap<String, (Shared, Arc<View>)>>,
    /// Views of new namespaces serve a mount (they keep what commits overwrite).
    serve_mount: std::sync::atomic::AtomicBool,
    /// Called with each namespace's store once it is open (metrics time its commits).
    on_open: Mutex<Option<OnOpen>>,
    /// Namespaces promoted on this node: their primaries are fenced here.
    promoted: Promoted,
    /// The store's lock, held while the site is open.
    _lock: fs::File,
}

impl Site {
    /// Opens the site's store at `root`: every bound namespace is opened (replayed and indexed
    /// as [`Store::open_with`] does). One that cannot be (damaged metadata) is logged and left
    /// closed: the others are served, and its primary is refused with the cause until it opens.
    pub fn open(root: &Path, params: ChunkParams, policy: Policy) -> Result<Site> {
        fs::create_dir_all(root.join(META_DIR))
            .with_context(|| format!("cannot create store {}", root.display()))?;
        let root = root.canonicalize()?;
        let lock = lock(&root)?;
        refuse_flat_layout(&root)?;
        let bindings = read_bindings(&root)?;
        let promoted = read_promoted(&root)?;
        let mut stores = BTreeMap::new();
        for name in bindings.keys().filter(|n| !promoted.contains_key(*n)) {
            match Store::open_with(&root.join(name), params, policy) {
                Ok(s) => {
                    let view = s.view().clone();
                    stores.insert(name.clone(), (Arc::new(Mutex::new(s)), view));
                }
                Err(e) => log::error!(
                    "namespace {name} cannot be opened, its primary is refused until it can \
                     (the other namespaces are served): {e:#}"
                ),
            }
        }
        Ok(Site {
            root,
            params,
            policy,
            bindings: Mutex::new(bindings),
            stores: RwLock::new(stores),
            serve_mount: false.into(),
            on_open: Mutex::new(None),
            promoted,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every namespace's store, by name.
    pub fn stores(&self) -> Vec<(String, Shared)> {
        let s = self.stores.read();
        s.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect()
    }

    /// One namespace's view (what the mount reads; never waits for a commit).
    pub fn view(&self, name: &str) -> Option<Arc<View>> {
        Some(self.stores.read().get(name)?.1.clone())
    }

    /// Names of the namespaces.
    pub fn names(&self) -> Vec<String> {
        self.stores.read().keys().cloned().collect()
    }

    /// From now on, every view keeps what commits overwrite (a mount reads through them).
    pub fn serve_mount(&self) {
        self.serve_mount
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (_, view) in self.stores.read().values() {
            view.serve_mount();
        }
    }

    /// Calls `f` with each namespace's store now, and with each one opened later.
    pub fn on_open(&self, f: impl Fn(&str, &mut Store) + Send + 'static) {
        let mut hook = self.on_open.lock();
        for (name, s) in self.stores() {
            f(&name, &mut s.lock());
        }
        *hook = Some(Box::new(f));
    }

    /// The namespace `c` asks for: bound and created on first contact; taken over by a
    /// promoted primary (see [`judge`]); refused when its epoch is fenced, when the name
    /// belongs to another key, or when the key already sends under another name.
    pub fn claim(&self, c: &Caller) -> Result<Shared, Refusal> {
        let name = c.namespace;
        if !valid_name(name) {
            return Err(Refusal::new(
                RefuseCode::Namespace,
                format!(
                    "node name {name:?} cannot name a namespace here (one path component, not \
                     starting with '.', at most 255 bytes): change [node] name on the primary"
                ),
            ));
        }
        if let Some(h) = self.promoted.get(name) {
            return Err(Refusal::new(
                RefuseCode::Fenced,
                format!(
                    "namespace {name} was promoted on this node ({}) at epoch {} since {}: it \
                     is the primary now, and primary {} (epoch {}) was fenced. Run `ferry \
                     rejoin --config FILE` on {}",
                    h.node,
                    h.epoch,
                    epoch::when(h.since),
                    c.node,
                    c.epoch,
                    c.node
                ),
            ));
        }
        let store_err = |e: anyhow::Error| {
            Refusal::store(format!("cannot open namespace {name}: {e:#}"), e.as_ref())
        };
        let mut bindings = self.bindings.lock();
        let holder = Holder {
            epoch: c.epoch,
            node: c.node.to_string(),
            fingerprint: c.fingerprint.to_string(),
            since: epoch::now(),
            forks: Vec::new(),
        };
        if let Some(owner) = bindings.get(name).cloned() {
            let open = self.stores.read().get(name).map(|(s, _)| s.clone());
            let store = match open {
                Some(s) => s,
                // Bound, but it could not be opened (damaged): the cause, once more.
                None => self.open_store(name).map_err(store_err)?,
            };
            let mut st = store.lock();
            // What the last session committed is durable in the images before the next one.
            st.settle().map_err(store_err)?;
            let (committed, _) = st.committed();
            let follows_base = c.takeover.is_some_and(|t| {
                st.holds(t.generation, &crate::manifest::hex(&t.group_root))
                    || t.epoch == st.holder().epoch
            });
            match judge(&owner, st.holder(), c, committed, follows_base)? {
                Verdict::Serve => {}
                Verdict::Raise => st.set_holder(holder).map_err(store_err)?,
                Verdict::TakeOver(fork) => {
                    let mut next = bindings.clone();
                    next.insert(name.to_string(), c.fingerprint.to_string());
                    self.write_bindings(&next)
                        .map_err(|e| store_err(e.into()))?;
                    *bindings = next;
                    let mut h = holder;
                    h.forks = st.holder().forks.clone();
                    if let Some(f) = fork {
                        log::warn!(
                            "namespace {name}: generations {}..={} of epoch {} were never \
                             replicated to {}; kept as restore points for good (ferry \
                             generations --primary {name})",
                            f.first,
                            f.last,
                            f.epoch,
                            c.node
                        );
                        h.forks.push(f);
                    }
                    st.set_holder(h).map_err(store_err)?;
                    log::warn!(
                        "namespace {name} taken over by {} (key {}) at epoch {}: the old primary \
                         (key {owner}) is fenced here from now on",
                        c.node,
                        c.fingerprint,
                        c.epoch
                    );
                }
            }
            drop(st);
            return Ok(store);
        }
        if c.takeover.is_none()
            && let Some((other, _)) = bindings.iter().find(|(_, f)| *f == c.fingerprint)
        {
            return Err(Refusal::new(
                RefuseCode::Namespace,
                format!(
                    "this primary's key {fp} sends to namespace {other} of this replica, not \
                     {name}: set [node] name back to {other}, or, with the replica stopped, \
                     rename {root}/{other} to {root}/{name} and its entry in \
                     {root}/.ferry/{BINDINGS}",
                    fp = c.fingerprint,
                    root = self.root.display()
                ),
            ));
        }
        let mut next = bindings.clone();
        next.insert(name.to_string(), c.fingerprint.to_string());
        self.write_bindings(&next)
            .map_err(|e| store_err(e.into()))?;
        *bindings = next;
        log::info!("namespace {name} bound to primary {}", c.fingerprint);
        let s = self.open_store(name).map_err(store_err)?;
        if c.epoch > 0 {
            s.lock().set_holder(holder).map_err(store_err)?;
        }
        Ok(s)
    }

    fn write_bindings(&self, b: &Bindings) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(b).expect("a map of strings");
        durable::write_atomic(&self.root.join(META_DIR).join(BINDINGS), &bytes)
    }

    /// Opens a bound namespace's store and serves it.
    fn open_store(&self, name: &str) -> Result<Shared> {
        let mut s = Store::open_with(&self.root.join(name), self.params, self.policy)?;
        if self.serve_mount.load(std::sync::atomic::Ordering::SeqCst) {
            s.view().serve_mount();
        }
        if let Some(f) = &*self.on_open.lock() {
            f(name, &mut s);
        }
        let view = s.view().clone();
        let s = Arc::new(Mutex::new(s));
        self.stores
            .write()
            .insert(name.to_string(), (s.clone(), view));
        Ok(s)
    }

    /// What namespace `name` holds, for a node about to be promoted (`Probe`): its committed
    /// generation, epoch and holder. Claims nothing.
    pub fn probe(&self, name: &str) -> Frame {
        if let Some(h) = self.promoted.get(name) {
            return Frame::Probed {
                epoch: h.epoch,
                holder: h.node.clone(),
                generation: 0,
                group_root: [0; 32],
            };
        }
        let store = self.stores.read().get(name).map(|(s, _)| s.clone());
        match store {
            Some(s) => {
                let st = s.lock();
                let (generation, root) = st.committed();
                Frame::Probed {
                    epoch: st.holder().epoch,
                    holder: st.holder().node.clone(),
                    generation,
                    group_root: crate::manifest::from_hex(root).unwrap_or_default(),
                }
            }
            None => Frame::Probed {
                epoch: 0,
                holder: String::new(),
                generation: 0,
                group_root: [0; 32],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChunkParams {
        ChunkParams::default()
    }

    /// The primary with key `fp` writing namespace `ns` at epoch 0.
    fn at<'a>(ns: &'a str, fp: &'a str) -> Caller<'a> {
        Caller {
            namespace: ns,
            node: ns,
            fingerprint: fp,
            epoch: 0,
            takeover: None,
        }
    }

    /// The namespaces as `ferry generations` reads them beside the daemon.
    fn beside(root: &Path) -> Vec<Namespace> {
        read_only(root, params(), Policy::default(), std::time::Duration::ZERO).unwrap()
    }

    #[test]
    fn promotions_take_a_namespace_over_and_fence_every_lower_epoch() {
        let holder = |epoch, node: &str| Holder {
            epoch,
            node: node.into(),
            fingerprint: if node.is_empty() { "" } else { "bb" }.into(),
            since: 0,
            forks: vec![],
        };
        let base = Takeover {
            epoch: 0,
            generation: 3,
            group_root: [7; 32],
        };
        let c = |fp, epoch, takeover| Caller {
            namespace: "site-a",
            node: "site-b",
            fingerprint: fp,
            epoch,
            takeover,
        };
        let first = holder(0, "");
        // The holder's own key: served; at a higher epoch, recorded.
        assert_eq!(
            judge("aa", &first, &c("aa", 0, None), 3, false),
            Ok(Verdict::Serve)
        );
        assert_eq!(
            judge("aa", &first, &c("aa", 2, None), 3, false),
            Ok(Verdict::Raise)
        );
        // A promoted key that holds this namespace's generation takes it over; generations of
        // the old epoch past its base are a fork, kept aside.
        assert_eq!(
            judge("aa", &first, &c("bb", 1, Some(&base)), 3, true),
            Ok(Verdict::TakeOver(None))
        );
        assert_eq!(
            judge("aa", &first, &c("bb", 1, Some(&base)), 5, true),
            Ok(Verdict::TakeOver(Some(Fork {
                epoch: 0,
                first: 4,
                last: 5
            })))
        );
        // Not without the base, a higher epoch, or a takeover at all.
        let r = judge("aa", &first, &c("bb", 1, Some(&base)), 3, false).unwrap_err();
        assert!(
            r.code == RefuseCode::Namespace && r.reason.contains("does not hold"),
            "{r}"
        );
        let r = judge("aa", &first, &c("bb", 0, Some(&base)), 3, true).unwrap_err();
        assert_eq!(r.code, RefuseCode::Namespace, "{r}");
        let r = judge("aa", &first, &c("bb", 1, None), 3, true).unwrap_err();
        assert!(
            r.reason.contains("belongs to the primary with key aa"),
            "{r}"
        );
        // Once taken over, the old key (any lower epoch) is fenced, named by who holds it.
        let taken = holder(1, "site-b");
        let r = judge("bb", &taken, &c("aa", 0, None), 5, false).unwrap_err();
        assert_eq!(r.code, RefuseCode::Fenced);
        assert!(
            r.reason.contains("epoch 1 by site-b (key bb) since")
                && r.reason.contains("ferry rejoin"),
            "{r}"
        );
        // A second promotion to the same epoch is fenced too.
        let r = judge("bb", &taken, &c("cc", 1, Some(&base)), 5, true).unwrap_err();
        assert!(
            r.code == RefuseCode::Fenced && r.reason.contains("two"),
            "{r}"
        );
    }

    #[test]
    fn one_daemon_per_store_and_promoted_namespaces_are_fenced_here() {
        let dir = tempfile::tempdir().unwrap();
        let site = two_namespaces(dir.path());
        let e = Site::open(dir.path(), params(), Policy::default())
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("in use"), "{e:#}");
        drop(site);
        let promoted: Promoted = [(
            "site-a".to_string(),
            Holder {
                epoch: 4,
                node: "here".into(),
                ..Holder::default()
            },
        )]
        .into();
        epoch::save(&dir.path().join(META_DIR).join(PROMOTED), &promoted).unwrap();
        let site = Site::open(dir.path(), params(), Policy::default()).unwrap();
        assert_eq!(site.names(), ["site-c"]);
        let r = site.claim(&at("site-a", "aa")).err().unwrap();
        assert!(
            r.code == RefuseCode::Fenced
                && r.reason.contains("promoted on this node (here) at epoch 4"),
            "{r}"
        );
        assert!(matches!(
            site.probe("site-a"),
            Frame::Probed { epoch: 4, .. }
        ));
        assert!(matches!(
            site.probe("site-c"),
            Frame::Probed {
                epoch: 0,
                generation: 0,
                ..
            }
        ));
    }

    /// A site at `dir` with namespaces site-a (key aa) and site-c (key cc).
    fn two_namespaces(dir: &Path) -> Site {
        let site = Site::open(dir, params(), Policy::default()).unwrap();
        site.claim(&at("site-a", "aa")).unwrap();
        site.claim(&at("site-c", "cc")).unwrap();
        site
    }

    #[test]
    fn a_name_is_bound_to_the_first_key_and_refused_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let site = two_namespaces(dir.path());
        assert_eq!(site.names(), ["site-a", "site-c"]);
        // Another key under a bound name; a bound key under another name.
        let r = site.claim(&at("site-a", "cc")).err().unwrap();
        assert_eq!(r.code, RefuseCode::Namespace);
        assert!(
            r.reason.contains("belongs to the primary with key aa"),
            "{r}"
        );
        let r = site.claim(&at("site-x", "aa")).err().unwrap();
        assert!(r.reason.contains("sends to namespace site-a"), "{r}");
        assert!(!dir.path().join("site-x").exists());
        for bad in ["", ".ferry", "..", "a/b", &"x".repeat(256)] {
            let r = site.claim(&at(bad, "dd")).err().unwrap();
            assert_eq!(r.code, RefuseCode::Namespace, "{bad}");
        }
        // The bindings survive a restart; the namespaces open again.
        drop(site);
        let site = Site::open(dir.path(), params(), Policy::default()).unwrap();
        assert_eq!(site.names(), ["site-a", "site-c"]);
        assert!(site.claim(&at("site-a", "cc")).is_err());
        site.claim(&at("site-a", "aa")).unwrap();
        let ns = beside(dir.path());
        let seen: Vec<_> = ns.iter().map(|n| (&*n.name, &*n.fingerprint)).collect();
        assert_eq!(seen, [("site-a", "aa"), ("site-c", "cc")]);
    }

    #[test]
    fn a_damaged_namespace_is_refused_with_its_cause_and_the_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let site = two_namespaces(dir.path());
        drop(site);
        // (A damaged generation record is made again from the restore points; a damaged
        // epoch record is not: it says who may write the namespace.)
        let record = dir.path().join("site-a/.ferry").join(crate::epoch::FILE);
        fs::write(&record, b"{not json").unwrap();
        let site = Site::open(dir.path(), params(), Policy::default()).unwrap();
        assert_eq!(site.names(), ["site-c"]);
        let r = site.claim(&at("site-a", "aa")).err().unwrap();
        assert_eq!(r.code, RefuseCode::Store);
        assert!(
            r.reason.contains("epoch record") && r.reason.contains("damaged"),
            "{r}"
        );
        // Its restore points are still read beside the daemon (`ferry generations`).
        let ns = beside(dir.path());
        assert!(ns.iter().all(|n| n.view.is_ok()));
        // Mended, it opens at the next contact.
        fs::remove_file(&record).unwrap();
        site.claim(&at("site-a", "aa")).unwrap();
        assert_eq!(site.names(), ["site-a", "site-c"]);
    }

    #[test]
    fn a_store_of_the_flat_layout_is_refused_with_the_way_to_convert_it() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path(), params()).unwrap();
        let e = Site::open(dir.path(), params(), Policy::default())
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("layout before namespaces"),
            "{e:#}"
        );
    }
}
