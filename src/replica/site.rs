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
use crate::wire::frame::{Refusal, RefuseCode};

/// One namespace's store, shared by its sessions, its scrubs and the mount.
pub type Shared = Arc<Mutex<Store>>;

/// The file binding each namespace to its primary's fingerprint.
const BINDINGS: &str = "primaries.json";

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
/// name, bound fingerprint, and a read-only view of its generations.
pub fn read_only(root: &Path, params: ChunkParams, policy: Policy) -> Result<Vec<Namespace>> {
    refuse_flat_layout(root)?;
    let mut out = Vec::new();
    for (name, fingerprint) in read_bindings(root)? {
        let dir = root.join(&name);
        if !dir.join(META_DIR).is_dir() {
            continue; // bound, but its store not created yet
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
}

impl Site {
    /// Opens the site's store at `root`: every bound namespace is opened (replayed and indexed
    /// as [`Store::open_with`] does). One that cannot be (damaged metadata) is logged and left
    /// closed: the others are served, and its primary is refused with the cause until it opens.
    pub fn open(root: &Path, params: ChunkParams, policy: Policy) -> Result<Site> {
        fs::create_dir_all(root.join(META_DIR))
            .with_context(|| format!("cannot create store {}", root.display()))?;
        let root = root.canonicalize()?;
        refuse_flat_layout(&root)?;
        let bindings = read_bindings(&root)?;
        let mut stores = BTreeMap::new();
        for name in bindings.keys() {
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

    /// The namespace of the primary with fingerprint `fp` calling itself `name`: bound and
    /// created on first contact; refused when the name belongs to another key, or the key
    /// already sends under another name.
    pub fn claim(&self, name: &str, fp: &str) -> Result<Shared, Refusal> {
        if !valid_name(name) {
            return Err(Refusal::new(
                RefuseCode::Namespace,
                format!(
                    "node name {name:?} cannot name a namespace here (one path component, not \
                     starting with '.', at most 255 bytes): change [node] name on the primary"
                ),
            ));
        }
        let mut bindings = self.bindings.lock();
        if let Some(owner) = bindings.get(name)
            && owner != fp
        {
            return Err(Refusal::new(
                RefuseCode::Namespace,
                format!(
                    "namespace {name} of this replica belongs to the primary with key {owner}, \
                     not to this one ({fp}): give this primary its own [node] name"
                ),
            ));
        }
        if let Some((other, _)) = bindings.iter().find(|(n, f)| *f == fp && *n != name) {
            return Err(Refusal::new(
                RefuseCode::Namespace,
                format!(
                    "this primary's key {fp} sends to namespace {other} of this replica, not \
                     {name}: set [node] name back to {other}, or, with the replica stopped, \
                     rename {root}/{other} to {root}/{name} and its entry in \
                     {root}/.ferry/{BINDINGS}",
                    root = self.root.display()
                ),
            ));
        }
        if let Some((s, _)) = self.stores.read().get(name) {
            return Ok(s.clone());
        }
        let store_err = |e: anyhow::Error| {
            Refusal::store(format!("cannot open namespace {name}: {e:#}"), e.as_ref())
        };
        if !bindings.contains_key(name) {
            let mut next = bindings.clone();
            next.insert(name.to_string(), fp.to_string());
            let bytes = serde_json::to_vec_pretty(&next).expect("a map of strings");
            durable::write_atomic(&self.root.join(META_DIR).join(BINDINGS), &bytes)
                .map_err(|e| store_err(e.into()))?;
            *bindings = next;
            log::info!("namespace {name} bound to primary {fp}");
        }
        let mut s =
            Store::open_with(&self.root.join(name), self.params, self.policy).map_err(store_err)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ChunkParams {
        ChunkParams::default()
    }

    /// A site at `dir` with namespaces site-a (key aa) and site-c (key cc).
    fn two_namespaces(dir: &Path) -> Site {
        let site = Site::open(dir, params(), Policy::default()).unwrap();
        site.claim("site-a", "aa").unwrap();
        site.claim("site-c", "cc").unwrap();
        site
    }

    #[test]
    fn a_name_is_bound_to_the_first_key_and_refused_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let site = two_namespaces(dir.path());
        assert_eq!(site.names(), ["site-a", "site-c"]);
        // Another key under a bound name; a bound key under another name.
        let r = site.claim("site-a", "cc").err().unwrap();
        assert_eq!(r.code, RefuseCode::Namespace);
        assert!(
            r.reason.contains("belongs to the primary with key aa"),
            "{r}"
        );
        let r = site.claim("site-x", "aa").err().unwrap();
        assert!(r.reason.contains("sends to namespace site-a"), "{r}");
        assert!(!dir.path().join("site-x").exists());
        for bad in ["", ".ferry", "..", "a/b", &"x".repeat(256)] {
            let r = site.claim(bad, "dd").err().unwrap();
            assert_eq!(r.code, RefuseCode::Namespace, "{bad}");
        }
        // The bindings survive a restart; the namespaces open again.
        drop(site);
        let site = Site::open(dir.path(), params(), Policy::default()).unwrap();
        assert_eq!(site.names(), ["site-a", "site-c"]);
        assert!(site.claim("site-a", "cc").is_err());
        site.claim("site-a", "aa").unwrap();
        let ns = read_only(dir.path(), params(), Policy::default()).unwrap();
        let seen: Vec<_> = ns.iter().map(|n| (&*n.name, &*n.fingerprint)).collect();
        assert_eq!(seen, [("site-a", "aa"), ("site-c", "cc")]);
    }

    #[test]
    fn a_damaged_namespace_is_refused_with_its_cause_and_the_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let site = two_namespaces(dir.path());
        drop(site);
        let record = dir.path().join("site-a/.ferry/generation");
        fs::write(&record, b"{not json").unwrap();
        let site = Site::open(dir.path(), params(), Policy::default()).unwrap();
        assert_eq!(site.names(), ["site-c"]);
        let r = site.claim("site-a", "aa").err().unwrap();
        assert_eq!(r.code, RefuseCode::Store);
        assert!(
            r.reason.contains("generation record") && r.reason.contains("corrupt"),
            "{r}"
        );
        // Its restore points are still read beside the daemon (`ferry generations`).
        let ns = read_only(dir.path(), params(), Policy::default()).unwrap();
        assert!(ns.iter().all(|n| n.view.is_ok()));
        // Mended, it opens at the next contact.
        fs::remove_file(&record).unwrap();
        site.claim("site-a", "aa").unwrap();
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
