//! Sync points on the primary: freeze the dirty set, re-chunk only the dirty regions into the
//! active manifests, and ship the new generation to the replicas.
//!
//! State kept under the mount's state directory, so a restarted primary neither re-reads its
//! images nor resends what a replica holds:
//! * `active/generation.json` and `active/manifests/<image>.manifest`: the last generation the
//!   primary cut (the "stale" side of the next re-chunk);
//! * `peers/<name>/generation.json` and `peers/<name>/manifests/<image>.manifest`: what each
//!   replica acknowledged (the base of its next plan).
//!
//! The tracker's freeze is committed (the intent log forgets its marks) once the new active
//! manifests are on disk: from then on they, not the marks, say what each replica still lacks.

pub mod bucket;
pub mod select;
pub mod ship;
pub mod trigger;
pub mod verify;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::chunk::{ChunkParams, Source, chunk_full, rechunk};
use crate::config::Config;
use crate::dirty::RangeSet;
use crate::durable;
use crate::fs::cow::Window;
use crate::fs::outside::Outside;
use crate::fs::{Frozen as FrozenChanges, NsEvent, Tracker};
use crate::manifest::{self, Manifest};
use crate::net::{Fingerprint, Identity, transport};
use crate::wire::primary::{ChunkSource, Generation, PeerKnowledge, PrimarySession, group_root};

use bucket::Bucket;
use ship::{ShipError, ShipStats, ship};

/// Memory for blocks saved by copy-before-write during a sync, before they spill to disk.
const COW_MEMORY: u64 = 128 << 20;

/// A peer that cannot be reached at all for this long (no connection) fails the sync for it;
/// a connection lost mid-transfer is retried until the sync's timeout.
const UNREACHABLE_GIVE_UP: Duration = Duration::from_secs(10);

/// The nice value of every thread that does sync work (re-chunking, hashing, shipping). The
/// mount's request threads stay at the daemon's own priority, so a VM's writes are served
/// before a sync's CPU work (at nice 10 the scheduler gives such a thread about a tenth of
/// the CPU time a nice 0 thread wants), yet a sync still progresses on a busy host.
const SYNC_NICE: libc::c_int = 10;

/// The I/O priority of those threads: the idle class, served when the disk has nothing else
/// to do, so a sync's reads of the images do not queue ahead of the VM's I/O. Schedulers
/// with priority aging (mq-deadline: 10 s) still serve it on a disk that is never idle;
/// where the scheduler ignores classes ("none"), this changes nothing.
const SYNC_IOPRIO: libc::c_int = 3 << 13; // IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT

/// Lowers the calling thread (only it: Linux keeps both per thread) to [`SYNC_NICE`] and
/// [`SYNC_IOPRIO`].
pub(crate) fn lower_thread_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    let tid = unsafe { libc::gettid() };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, SYNC_NICE) } != 0 {
        log::debug!(
            "cannot lower a sync thread's CPU priority: {}",
            std::io::Error::last_os_error()
        );
    }
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, SYNC_IOPRIO) } != 0 {
        log::debug!(
            "cannot lower a sync thread's I/O priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One replica the primary ships to.
struct Peer {
    name: String,
    addr: SocketAddr,
    zone: Option<String>,
    bucket: Option<Arc<Bucket>>,
    known: PeerKnowledge,
    /// Last outcome, for status.
    last: Option<PeerOutcome>,
    /// Health as last seen (for secondary selection).
    failing_since: Option<Instant>,
    rtt: Option<Duration>,
    throughput: Option<f64>,
    /// Whether the selection ships to this peer, and why.
    selected: bool,
    reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeerOutcome {
    pub name: String,
    /// "committed" or "failed".
    pub state: String,
    pub generation: u64,
    /// The group root the replica committed (hex), if it did.
    pub root: Option<String>,
    pub error: Option<String>,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub patches_sent: u64,
    pub wire_bytes: u64,
    pub duration_ms: u64,
    /// Connections it took (a lost connection is retried with backoff; staged chunks are not
    /// sent again).
    pub attempts: u32,
    /// Payload bytes of the last attempt alone.
    pub last_attempt_bytes: u64,
    #[serde(skip)]
    pub at: Option<SystemTime>,
}

#[derive(Default, Serialize, Deserialize)]
struct GenRecord {
    generation: u64,
    group_root: String,
}

struct Inner {
    generation: u64,
    group_root: [u8; 32],
    images: BTreeMap<String, Arc<Manifest>>,
    peers: Vec<Peer>,
    last_sync: Option<Value>,
    /// Images that cannot be read as regular files now, and why: they keep their last
    /// generation (the replicas keep it too) until they can be read again.
    broken: BTreeMap<String, String>,
}

/// The sync engine of one mount.
pub struct Engine {
    root: PathBuf,
    state: PathBuf,
    node: String,
    params: ChunkParams,
    required: usize,
    failover_after: Duration,
    tracker: Arc<Tracker>,
    outside: Arc<Outside>,
    bucket: Option<Arc<Bucket>>,
    rt: tokio::runtime::Runtime,
    endpoint: Option<quinn::Endpoint>,
    inner: parking_lot::Mutex<Inner>,
}

/// A sync's result, as `ferry sync --json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub generation: u64,
    /// The group root (hex).
    pub root: String,
    pub images: usize,
    pub dirty_bytes: u64,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub patches_sent: u64,
    pub wire_bytes: u64,
    pub duration_ms: u64,
    pub rechunk_ms: u64,
    /// Replicas that committed, out of `required`.
    pub committed: usize,
    pub required: usize,
    pub replicas: Vec<PeerOutcome>,
}

/// Reads the images as they were at the sync point, for data frames.
struct Frozen(Arc<Window>);

impl ChunkSource for Frozen {
    fn read(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let img = self
            .0
            .images()
            .get(path)
            .ok_or(std::io::ErrorKind::NotFound)?;
        let mut buf = vec![0u8; len as usize];
        let avail = img.frozen_size().saturating_sub(offset).min(len) as usize;
        img.read_at(&mut buf[..avail], offset)?;
        Ok(buf)
    }
}

fn hex(h: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

fn read_gen(path: &Path) -> Result<GenRecord> {
    match fs::read(path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GenRecord::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Loads `<dir>/<image>.manifest` for every image listed.
fn load_manifests(dir: &Path, params: ChunkParams) -> BTreeMap<String, Arc<Manifest>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let p = ent.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let Some(rel) = p
                .strip_prefix(dir)
                .ok()
                .and_then(|r| r.to_str())
                .and_then(|r| r.strip_suffix(".manifest"))
            else {
                continue;
            };
            match manifest::load(&p) {
                Ok(m) if m.params() == params => {
                    out.insert(rel.to_string(), Arc::new(m));
                }
                Ok(_) => log::warn!("{}: other chunk parameters; ignored", p.display()),
                Err(e) => log::warn!("{e}; ignored (the image will be chunked in full)"),
            }
        }
    }
    out
}

fn save_manifest(dir: &Path, image: &str, m: &Manifest) -> Result<()> {
    let p = dir.join(format!("{image}.manifest"));
    fs::create_dir_all(p.parent().expect("has a parent"))?;
    manifest::save(&p, m)?;
    Ok(())
}

fn remove_manifest(dir: &Path, image: &str) {
    let _ = fs::remove_file(dir.join(format!("{image}.manifest")));
}

/// Regular files under `root`, as UTF-8 relative paths (others are skipped with a warning).
fn list_images(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let ent = ent?;
            let ft = ent.file_type()?;
            let p = ent.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).expect("under root");
                match rel.to_str() {
                    Some(s) if crate::wire::replica::valid_path(s) => out.push(s.to_string()),
                    _ => log::warn!("{}: name cannot be replicated; skipped", rel.display()),
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

impl Engine {
    /// The engine of the mount of `root` (the backing directory) whose state lives in `state`.
    pub fn open(
        config: &Config,
        root: &Path,
        state: &Path,
        tracker: Arc<Tracker>,
        outside: Arc<Outside>,
    ) -> Result<Engine> {
        let params = config.chunk_params().map_err(|e| anyhow!("{e}"))?;
        // Re-chunking and hashing run on rayon's global pool: in a mount daemon only syncs use
        // it. (Already built, as in tests that open several engines in one process: kept.)
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("ferry-chunk-{i}"))
            .start_handler(|_| lower_thread_priority())
            .build_global();
        let active_dir = state.join("active");
        fs::create_dir_all(active_dir.join("manifests"))?;
        let rec = read_gen(&active_dir.join("generation.json"))?;
        let images = load_manifests(&active_dir.join("manifests"), params);
        let mut peers = Vec::new();
        for p in &config.peers {
            let dir = state.join("peers").join(&p.name);
            let rec = read_gen(&dir.join("generation.json"))?;
            peers.push(Peer {
                name: p.name.clone(),
                addr: p.addr,
                bucket: p.bandwidth_limit.map(|r| Arc::new(Bucket::new(r))),
                zone: p.zone.clone(),
                failing_since: None,
                rtt: None,
                throughput: None,
                selected: false,
                reason: "not chosen yet".into(),
                known: PeerKnowledge {
                    generation: rec.generation,
                    manifests: load_manifests(&dir.join("manifests"), params),
                    dirty: BTreeMap::new(),
                },
                last: None,
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-net")
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()?;
        let endpoint = if config.peers.is_empty() {
            None
        } else {
            let id = Identity::load(&config.node.key_dir)?;
            let pinned: Vec<Fingerprint> = config.peers.iter().map(|p| p.fingerprint).collect();
            let _guard = rt.enter();
            Some(transport::client(
                &id,
                &pinned,
                "0.0.0.0:0".parse().expect("an address"),
                config.primary.congestion,
            )?)
        };
        let group = if rec.group_root.is_empty() {
            [0; 32]
        } else {
            *blake3::Hash::from_hex(&rec.group_root)
                .map_err(|e| anyhow!("active generation record: {e}"))?
                .as_bytes()
        };
        Ok(Engine {
            root: root.to_path_buf(),
            state: state.to_path_buf(),
            node: config.node.name.clone(),
            params,
            required: config.primary.replicas.min(config.peers.len()),
            failover_after: config.primary.failover_after,
            tracker,
            outside,
            bucket: config
                .primary
                .bandwidth_limit
                .map(|r| Arc::new(Bucket::new(r))),
            rt,
            endpoint,
            inner: parking_lot::Mutex::new(Inner {
                generation: rec.generation,
                group_root: group,
                images,
                peers,
                last_sync: None,
                broken: BTreeMap::new(),
            }),
        })
    }

    /// Makes a sync point now and ships it; waits for the replicas the policy requires, at most
    /// `timeout`. `only` restricts the sync point to some images (the others keep their
    /// unsynced changes for the next one).
    pub fn sync(&self, only: &[String], timeout: Duration) -> Result<Report> {
        let t0 = Instant::now();
        let mut inner = self.inner.lock();
        // Writes that bypassed the mount, reported up to now, join this sync point.
        self.outside.drain(&self.tracker, true);
        let only: Option<HashSet<PathBuf>> =
            (!only.is_empty()).then(|| only.iter().map(PathBuf::from).collect());
        // Freeze, and open the copy-before-write window over every image, at one instant.
        let root = self.root.clone();
        let spill = self.state.join("cow.spill");
        let (frozen, window) = self
            .tracker
            .freeze_with(only.as_ref(), || {
                let paths = list_images(&root).map_err(std::io::Error::other)?;
                Window::open(&root, &paths, &spill, COW_MEMORY).map(Some)
            })
            .context("cannot open the copy-before-write window")?;
        let window = window.expect("opened above");
        let dirty_bytes: u64 = frozen.dirty.values().map(|r| r.covered_bytes()).sum();
        let cut = match self.cut(&mut inner, &frozen, only.as_ref(), &window) {
            Ok(c) => c,
            Err(e) => {
                self.tracker.close_window();
                self.tracker.abort(frozen);
                return Err(e);
            }
        };
        // What each image looked like at the freeze, for the next mount to compare with.
        self.outside.save(
            window
                .images()
                .iter()
                .filter(|(p, _)| !inner.broken.contains_key(*p))
                .map(|(p, i)| (p.clone(), i.stamp()))
                .collect(),
        );
        // The active manifests now cover the frozen changes: the intent log may forget them.
        let frozen_dirty = frozen.dirty.clone();
        if let Err(e) = self.tracker.commit(frozen) {
            log::warn!("intent log compaction failed (the marks stay): {e}");
        }
        for p in &mut inner.peers {
            for (path, set) in &frozen_dirty {
                if let Some(s) = path.to_str() {
                    p.known
                        .dirty
                        .entry(s.to_string())
                        .or_insert_with(RangeSet::new)
                        .extend_from(set);
                }
            }
        }
        let rechunk_ms = t0.elapsed().as_millis() as u64;
        let generation = Arc::new(Generation {
            number: inner.generation,
            group_root: inner.group_root,
            images: inner.images.clone(),
        });
        log::info!(
            "sync point: generation {} ({} images, {} dirty bytes, {} changed) cut in {rechunk_ms} ms",
            generation.number,
            generation.images.len(),
            dirty_bytes,
            cut
        );
        let outcomes = self.ship_all(&mut inner, &generation, timeout, &window);
        let saved = window.saved_bytes();
        self.tracker.close_window();
        drop(window);
        if saved > 0 {
            log::info!("copy-before-write saved {saved} bytes written during the sync");
        }
        let committed = outcomes.iter().filter(|o| o.state == "committed").count();
        // A replica numbered this generation higher (this primary had lost count): go on from
        // there.
        if let Some(n) = outcomes.iter().map(|o| o.generation).max()
            && n > inner.generation
        {
            inner.generation = n;
            let rec = GenRecord {
                generation: n,
                group_root: hex(&inner.group_root),
            };
            durable::write_atomic(
                &self.state.join("active").join("generation.json"),
                &serde_json::to_vec(&rec)?,
            )?;
        }
        let sum = |f: fn(&PeerOutcome) -> u64| outcomes.iter().map(f).sum::<u64>();
        let report = Report {
            generation: inner.generation,
            root: hex(&generation.group_root),
            images: generation.images.len(),
            dirty_bytes,
            bytes_sent: sum(|o| o.bytes_sent),
            chunks_sent: sum(|o| o.chunks_sent),
            patches_sent: sum(|o| o.patches_sent),
            wire_bytes: sum(|o| o.wire_bytes),
            duration_ms: t0.elapsed().as_millis() as u64,
            rechunk_ms,
            committed,
            required: self.required,
            replicas: outcomes,
        };
        inner.last_sync = Some(serde_json::to_value(&report)?);
        Ok(report)
    }

    /// Cuts a new generation: applies namespace events, re-chunks what changed, saves the
    /// active manifests. Returns how many images changed.
    fn cut(
        &self,
        inner: &mut Inner,
        frozen: &FrozenChanges,
        only: Option<&HashSet<PathBuf>>,
        window: &Window,
    ) -> Result<usize> {
        let active_dir = self.state.join("active");
        let mdir = active_dir.join("manifests");
        let before: HashSet<String> = inner.images.keys().cloned().collect();

        for ev in &frozen.events {
            match ev {
                NsEvent::Renamed { from, to } => {
                    let (Some(from), Some(to)) = (from.to_str(), to.to_str()) else {
                        continue;
                    };
                    let moved: Vec<String> = inner
                        .images
                        .keys()
                        .filter(|k| Path::new(k).starts_with(from))
                        .cloned()
                        .collect();
                    for old in moved {
                        let new =
                            crate::dirty::rebase(Path::new(&old), Path::new(from), Path::new(to))
                                .expect("filtered by prefix");
                        let m = inner.images.remove(&old).expect("listed");
                        remove_manifest(&mdir, &old);
                        inner.images.insert(new.to_string_lossy().into_owned(), m);
                    }
                }
                NsEvent::Removed { path } => {
                    let Some(p) = path.to_str() else { continue };
                    inner.images.retain(|k, _| !Path::new(k).starts_with(p));
                }
            }
        }
        let present: Vec<String> = window.images().keys().cloned().collect();
        let present_set: HashSet<&String> = present.iter().collect();
        let mut broken: BTreeMap<String, String> = window
            .failed()
            .iter()
            .map(|(p, e)| (p.clone(), format!("cannot open it: {e}")))
            .collect();
        for k in inner.images.keys() {
            if present_set.contains(k) || broken.contains_key(k) {
                continue;
            }
            match fs::symlink_metadata(self.root.join(k)) {
                Ok(m) => {
                    broken.insert(k.clone(), format!("it is now a {}", kind_of(&m)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // removed
                Err(e) => {
                    broken.insert(k.clone(), format!("cannot look it up: {e}"));
                }
            }
        }
        // Removed images leave the generation; broken ones keep their last manifest.
        inner
            .images
            .retain(|k, _| present_set.contains(k) || broken.contains_key(k));

        let mut changed = 0;
        for path in &present {
            if only.is_some_and(|o| !o.contains(Path::new(path))) && inner.images.contains_key(path)
            {
                continue;
            }
            let src = &**window.images().get(path).expect("listed from the window");
            let dirty: Vec<std::ops::Range<u64>> = frozen
                .dirty
                .get(Path::new(path))
                .map(|r| r.to_vec())
                .unwrap_or_default();
            let new = match inner.images.get(path) {
                Some(stale) if dirty.is_empty() && stale.size() == src.size() => continue,
                Some(stale) => rechunk(stale, src, &dirty).map(|r| r.0),
                None => chunk_full(src, self.params).map(|r| r.0),
            };
            let new = match new {
                Ok(m) => m,
                Err(e) => {
                    broken.insert(path.clone(), format!("cannot read it: {e}"));
                    continue;
                }
            };
            if inner
                .images
                .get(path)
                .is_some_and(|s| s.root() == new.root())
            {
                continue;
            }
            save_manifest(&mdir, path, &new)?;
            inner.images.insert(path.clone(), Arc::new(new));
            changed += 1;
        }
        // Manifests of images that are gone.
        for m in before.difference(&inner.images.keys().cloned().collect()) {
            remove_manifest(&mdir, m);
        }
        self.report_broken(inner, broken, frozen);
        inner.generation += 1;
        inner.group_root = group_root(&inner.images);
        let rec = GenRecord {
            generation: inner.generation,
            group_root: hex(&inner.group_root),
        };
        durable::write_atomic(
            &active_dir.join("generation.json"),
            &serde_json::to_vec(&rec)?,
        )?;
        Ok(changed)
    }

    /// Says which images became unreadable or readable again, and keeps the changes frozen
    /// for the unreadable ones (their manifests did not take them) for a later sync point.
    fn report_broken(
        &self,
        inner: &mut Inner,
        broken: BTreeMap<String, String>,
        frozen: &FrozenChanges,
    ) {
        for (path, why) in &broken {
            if inner.broken.get(path) != Some(why) {
                log::warn!(
                    "{}: {why}: not a readable image; the replicas keep its last generation and                      the other images go on replicating",
                    self.root.join(path).display()
                );
            }
            for r in frozen
                .dirty
                .get(Path::new(path))
                .into_iter()
                .flat_map(|s| s.iter())
            {
                if let Err(e) = self.tracker.mark(Path::new(path), r) {
                    log::error!("{path}: cannot keep its unsynced changes: {e}");
                }
            }
        }
        for path in inner.broken.keys().filter(|p| !broken.contains_key(*p)) {
            log::info!("{}: readable again", self.root.join(path).display());
        }
        inner.broken = broken;
    }

    /// The images of the last generation cut.
    pub fn image_names(&self) -> BTreeSet<String> {
        self.inner.lock().images.keys().cloned().collect()
    }

    /// `ferry verify --primary`: re-hashes every image against its active manifest (see
    /// `verify.rs`). With `repair`, marks what differs dirty, so the next sync point ships it.
    pub fn verify_primary(&self, repair: bool) -> Value {
        let inner = self.inner.lock();
        let mut checks: Vec<verify::ImageCheck> = Vec::new();
        for (path, m) in &inner.images {
            if let Some(why) = inner.broken.get(path) {
                checks.push(verify::ImageCheck {
                    path: path.clone(),
                    error: Some(why.clone()),
                    ..Default::default()
                });
                continue;
            }
            let skip = self.tracker.dirty_of(Path::new(path));
            let mut c = verify::check(path, &self.root.join(path), m, &skip);
            // A write through the mount that raced the read is not a stale manifest.
            c.excuse(&self.tracker.dirty_of(Path::new(path)));
            if !c.ok {
                log::warn!(
                    "verify: {} differs from its manifest ({} ranges{})",
                    self.root.join(path).display(),
                    c.mismatched.len(),
                    c.size
                        .map(|[a, b]| format!(", size {a} -> {b}"))
                        .unwrap_or_default()
                );
            }
            if repair {
                let mut ranges: Vec<std::ops::Range<u64>> =
                    c.mismatched.iter().map(|r| r[0]..r[1]).collect();
                if let Some([a, b]) = c.size {
                    ranges.push(a.min(b)..a.max(b));
                }
                for r in ranges {
                    if let Err(e) = self.tracker.mark(Path::new(path), r) {
                        log::error!("verify --repair: {path}: {e}");
                    }
                }
            }
            checks.push(c);
        }
        let ok = checks.iter().all(|c| c.ok);
        json!({
            "matches": ok,
            "repaired": repair && !ok,
            "generation": inner.generation,
            "images": checks,
        })
    }

    /// Ships a generation to every peer at once; returns their outcomes.
    fn ship_all(
        &self,
        inner: &mut Inner,
        g: &Arc<Generation>,
        timeout: Duration,
        window: &Arc<Window>,
    ) -> Vec<PeerOutcome> {
        let Some(ep) = &self.endpoint else {
            return vec![];
        };
        let src: Arc<dyn ChunkSource + Send + Sync> = Arc::new(Frozen(window.clone()));
        self.choose(inner);
        let probes: Vec<(usize, SocketAddr)> = inner
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.selected)
            .map(|(i, p)| (i, p.addr))
            .collect();
        let jobs: Vec<_> = inner
            .peers
            .iter()
            .filter(|p| p.selected)
            .map(|p| {
                let buckets: Vec<Arc<Bucket>> =
                    p.bucket.iter().chain(self.bucket.iter()).cloned().collect();
                (p.name.clone(), p.addr, p.known.clone(), buckets)
            })
            .collect();
        let (node, params) = (self.node.clone(), self.params);
        let results = self.rt.block_on(async {
            let futs = jobs.into_iter().map(|(name, addr, known, buckets)| {
                let src = src.clone();
                let ep = ep.clone();
                let g = g.clone();
                let node = node.clone();
                async move {
                    let t = Instant::now();
                    let deadline = tokio::time::Instant::now() + timeout;
                    let mut backoff = Duration::from_millis(200);
                    let mut attempts = 0u32;
                    let mut last_contact = tokio::time::Instant::now();
                    let total = ShipStats::default();
                    loop {
                        attempts += 1;
                        let stats = Arc::new(ShipStats::default());
                        let (session, hello) =
                            PrimarySession::new(&node, 0, params, g.clone(), known.clone());
                        let r = tokio::time::timeout_at(
                            deadline,
                            ship(
                                &ep,
                                addr,
                                session,
                                hello,
                                src.clone(),
                                stats.clone(),
                                buckets.clone(),
                            ),
                        )
                        .await;
                        total.add(&stats);
                        let err = match r {
                            Ok(Ok(acked)) => {
                                break (name, Ok(acked), total, stats, attempts, t.elapsed());
                            }
                            Ok(Err(ShipError::Transport(e))) => {
                                last_contact = tokio::time::Instant::now();
                                e
                            }
                            Ok(Err(ShipError::Unreachable(e)))
                                if last_contact.elapsed() < UNREACHABLE_GIVE_UP =>
                            {
                                e
                            }
                            Ok(Err(ShipError::Unreachable(e))) => {
                                let e = anyhow!(
                                    "{e:#} (unreachable for {} s)",
                                    UNREACHABLE_GIVE_UP.as_secs()
                                );
                                break (name, Err(e), total, stats, attempts, t.elapsed());
                            }
                            Ok(Err(e)) => {
                                break (name, Err(anyhow!(e)), total, stats, attempts, t.elapsed());
                            }
                            Err(_) => {
                                let e =
                                    anyhow!("no acknowledgement within {} s", timeout.as_secs());
                                break (name, Err(e), total, stats, attempts, t.elapsed());
                            }
                        };
                        if tokio::time::Instant::now() + backoff >= deadline {
                            break (name, Err(err), total, stats, attempts, t.elapsed());
                        }
                        log::warn!(
                            "{name}: attempt {attempts} failed ({err:#}); retrying in {backoff:?}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            });
            let probed = futures_join_all(probes.into_iter().map(|(i, addr)| {
                let ep = ep.clone();
                async move {
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), ship::probe(&ep, addr)).await;
                    (i, r.ok().and_then(|r| r.ok()))
                }
            }));
            let shipped = futures_join_all(futs);
            let (shipped, probed) = tokio::join!(shipped, probed);
            for (i, rtt) in probed {
                let p = &mut inner.peers[i];
                match rtt {
                    Some(rtt) => {
                        p.rtt = Some(rtt);
                        p.failing_since = None;
                    }
                    None => {
                        p.failing_since.get_or_insert_with(Instant::now);
                    }
                }
            }
            shipped
        });
        let mut out = Vec::new();
        for (name, r, stats, last, attempts, took) in results {
            let peer = inner
                .peers
                .iter_mut()
                .find(|p| p.name == name)
                .expect("a peer");
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let mut o = PeerOutcome {
                name: name.clone(),
                state: "committed".into(),
                generation: g.number,
                root: None,
                error: None,
                bytes_sent: n(&stats.bytes_sent),
                chunks_sent: n(&stats.chunks_sent),
                patches_sent: n(&stats.patches_sent),
                wire_bytes: n(&stats.wire_bytes),
                duration_ms: took.as_millis() as u64,
                attempts,
                last_attempt_bytes: n(&last.bytes_sent),
                at: Some(SystemTime::now()),
            };
            match r {
                Ok(acked) => {
                    o.root = Some(hex(&acked.group_root));
                    o.generation = acked.generation;
                    peer.failing_since = None;
                    let rtt = n(&last.rtt_us);
                    if rtt > 0 {
                        peer.rtt = Some(Duration::from_micros(rtt));
                    }
                    if o.bytes_sent >= 1 << 20 && o.duration_ms > 0 {
                        peer.throughput = Some(o.bytes_sent as f64 * 1000.0 / o.duration_ms as f64);
                    }
                    if let Err(e) = self.remember(peer, g, acked.generation) {
                        log::warn!("{name}: acknowledged, but its state could not be saved: {e:#}");
                    }
                    log::info!(
                        "{name}: committed generation {} ({} bytes in {} chunks and {} patches, {} ms)",
                        g.number,
                        o.bytes_sent,
                        o.chunks_sent,
                        o.patches_sent,
                        o.duration_ms
                    );
                }
                Err(e) => {
                    peer.failing_since.get_or_insert_with(Instant::now);
                    log::warn!("{name}: generation {} not committed: {e:#}", g.number);
                    o.state = "failed".into();
                    o.error = Some(format!("{e:#}"));
                }
            }
            peer.last = Some(o.clone());
            out.push(o);
        }
        out
    }

    /// A replica acknowledged `g`: it is that replica's new base.
    fn remember(&self, peer: &mut Peer, g: &Generation, number: u64) -> Result<()> {
        let dir = self.state.join("peers").join(&peer.name);
        let mdir = dir.join("manifests");
        for (path, m) in &g.images {
            if peer
                .known
                .manifests
                .get(path)
                .is_none_or(|k| k.root() != m.root())
            {
                save_manifest(&mdir, path, m)?;
            }
        }
        for old in peer.known.manifests.keys() {
            if !g.images.contains_key(old) {
                remove_manifest(&mdir, old);
            }
        }
        let rec = GenRecord {
            generation: number,
            group_root: hex(&g.group_root),
        };
        durable::write_atomic(&dir.join("generation.json"), &serde_json::to_vec(&rec)?)?;
        peer.known = PeerKnowledge {
            generation: number,
            manifests: g.images.clone(),
            dirty: BTreeMap::new(),
        };
        Ok(())
    }

    /// Status for `ferry status`.
    pub fn status(&self) -> Value {
        let inner = self.inner.lock();
        let peers: Vec<Value> = inner
            .peers
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "addr": p.addr.to_string(),
                    "zone": p.zone,
                    "selected": p.selected,
                    "reason": p.reason,
                    "healthy": p.failing_since.is_none(),
                    "failing_for_s": p.failing_since.map(|t| t.elapsed().as_secs()),
                    "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1000.0),
                    "throughput_bytes_per_s": p.throughput,

                    "generation": p.known.generation,
                    "lag_generations": inner.generation.saturating_sub(p.known.generation),
                    "last": p.last,
                })
            })
            .collect();
        json!({
            "generation": inner.generation,
            "root": hex(&inner.group_root),
            "required": self.required,
            "replicas": peers,
            "last_sync": inner.last_sync,
            "broken": inner
                .broken
                .iter()
                .map(|(p, r)| json!({"path": p, "reason": r}))
                .collect::<Vec<_>>(),
            "outside": self.outside.findings(),
            "outside_watch": self.outside.watching(),
        })
    }
}

/// "directory", "symbolic link", ...: what a path that should be an image is instead.
fn kind_of(m: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "named pipe"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device node"
    } else {
        "regular file"
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("a shipping task panicked"));
    }
    out
}

impl Engine {
    /// Applies the secondary selection policy to the peers (see `select.rs`).
    fn choose(&self, inner: &mut Inner) {
        let cands: Vec<select::Candidate> = inner
            .peers
            .iter()
            .map(|p| select::Candidate {
                name: p.name.clone(),
                zone: p.zone.clone(),
                failing_since: p.failing_since,
                rtt: p.rtt,
                throughput: p.throughput,
                selected: p.selected,
            })
            .collect();
        let choices = select::select(&cands, self.required, self.failover_after, Instant::now());
        for (p, c) in inner.peers.iter_mut().zip(choices) {
            if p.selected != c.selected {
                log::info!(
                    "{}: {} ({})",
                    p.name,
                    if c.selected {
                        "selected"
                    } else {
                        "not selected"
                    },
                    c.reason
                );
            }
            p.selected = c.selected;
            p.reason = c.reason;
        }
    }
}
