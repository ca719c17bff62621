//! Sync points on the primary: freeze the dirty set, re-chunk only the dirty regions into the
//! active manifests, and ship the new generation to the replicas.
//!
//! The parts, each with one owner: `cut.rs` computes a generation from the stale manifests and
//! the frozen changes; `link.rs` decides retries and give-ups for one replica; `select.rs`
//! chooses the replicas; `ship.rs` runs one session over QUIC; `board.rs` is what status
//! shows, published at each step so that a running sync never blocks `ferry status`. This
//! file drives them and keeps the state on disk.
//!
//! State kept under the mount's state directory, so a restarted primary neither re-reads its
//! images nor resends what a replica holds:
//! * `active/generation.json` and `active/manifests/<image>.manifest`: the last generation the
//!   primary cut (the "stale" side of the next re-chunk);
//! * `peers/<name>/generation.json` and `peers/<name>/manifests/<image>.manifest`: what each
//!   replica acknowledged (the base of its next plan);
//! * `epoch.json` ([`crate::epoch::Lineage`]): the namespace and epoch it writes under, when a
//!   promotion made this mount the primary, and whether a replica fenced it.
//!
//! The tracker's freeze is committed (the intent log forgets its marks) once the new active
//! manifests are on disk: from then on they, not the marks, say what each replica still lacks.

pub mod board;
pub mod bucket;
pub mod cut;
pub mod link;
pub mod metrics;
pub mod rejoin;
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
use serde::Serialize;
use serde_json::{Value, json};

use crate::chunk::{ChunkParams, Source};
use crate::dirty::RangeSet;
use crate::epoch::{self, Fence, Lineage};
use crate::fs::cow::Window;
use crate::fs::outside::Outside;
use crate::fs::{Frozen as FrozenChanges, Tracker};
use crate::manifest::{self, GenRecord, Kind, Manifest, ManifestDir, hex};
use crate::net::{Congestion, Fingerprint, Identity, Node, Pool, Threads};
use crate::wire::frame::Takeover;
use crate::wire::primary::{
    Acked, ChunkSource, Claim, Generation, PeerKnowledge, PrimarySession, group_root, may_read,
};

use board::{Board, State};
use bucket::Bucket;
use link::{Cause, Link, Next, Policy};
use ship::{ShipStats, Shipment, ship};

/// Memory for blocks saved by copy-before-write during a sync, before they spill to disk.
const COW_MEMORY: u64 = 128 << 20;

/// Memory for chunk frames shared by the shipments of one generation to several replicas.
const FRAME_CACHE: u64 = 64 << 20;

/// One replica, as the face describes it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub zone: Option<String>,
    /// Bytes per second to this peer.
    pub bandwidth_limit: Option<u64>,
}

/// What the engine is told by the face (built from the config file there).
pub struct Options {
    pub node: String,
    pub params: ChunkParams,
    /// Replicas that must commit a generation.
    pub required: usize,
    /// How long a selected replica may fail before another takes its place.
    pub failover_after: Duration,
    /// Bytes per second, all peers together.
    pub bandwidth_limit: Option<u64>,
    pub congestion: Congestion,
    /// This node's key (needed when there are peers).
    pub identity: Option<Identity>,
    pub peers: Vec<PeerSpec>,
}

/// One replica the primary ships to.
struct Peer {
    name: String,
    addr: SocketAddr,
    zone: Option<String>,
    bucket: Option<Arc<Bucket>>,
    known: PeerKnowledge,
    /// Whether this process saw the replica acknowledge `known` (its last shipment committed):
    /// only then can the sync tell what it may still ask for (see `narrow`).
    confirmed: bool,
    /// Health as last seen (for secondary selection), and since when it fails (for status).
    failing_since: Option<Instant>,
    down_since: Option<SystemTime>,
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
    /// Why it failed: a stable code (see `link::Cause::code`) and the words.
    pub cause: Option<&'static str>,
    pub error: Option<String>,
    pub bytes_sent: u64,
    pub chunks_sent: u64,
    pub patches_sent: u64,
    pub wire_bytes: u64,
    /// QUIC packets sent to it, and how many of them the link lost (every attempt).
    pub packets_sent: u64,
    pub packets_lost: u64,
    /// How busy its data-stream readers were while the data arrived, in percent (its `Ack`):
    /// near 100, the replica set the pace, not the link.
    pub busy_pct: u8,
    pub duration_ms: u64,
    /// Sessions it took (a lost connection is retried with backoff; staged chunks are not
    /// sent again).
    pub attempts: u32,
    /// Connections made to it: 0 when the sync ran on the connection kept from the last one.
    pub connections: u64,
    /// Sessions planned before the replica's first answer, on the state the last sync left it
    /// in (on a kept connection): one round trip less each.
    pub planned_ahead: u64,
    /// Payload bytes of the last attempt alone.
    pub last_attempt_bytes: u64,
    /// Data frames (chunks and patches) taken from those made for another replica of the
    /// same sync (fan-out).
    pub chunks_reused: u64,
    /// Chunks of the new content this replica already held, so not sent (deduplication).
    pub chunks_held: u64,
}

/// The engine's working state: one sync at a time holds it, from freeze to the last
/// acknowledgement.
struct Work {
    generation: u64,
    group_root: [u8; 32],
    images: BTreeMap<String, Arc<Manifest>>,
    peers: Vec<Peer>,
    /// Images that cannot be read as regular files now, and why: they keep their last
    /// generation (the replicas keep it too) until they can be read again.
    broken: BTreeMap<String, String>,
    /// When the last generation's sync point was cut (the freeze): every write acknowledged
    /// before then is in it. Unknown until this process cuts one.
    point: Option<SystemTime>,
}

/// What is told every sync's report.
pub type OnReport = Box<dyn Fn(&Report) + Send + Sync>;

/// The sync engine of one mount.
pub struct Engine {
    root: PathBuf,
    state: PathBuf,
    node: String,
    /// The namespace and epoch it writes under, and whether it was fenced (`epoch.json`).
    lineage: parking_lot::Mutex<Lineage>,
    /// Why sync points are held, while the failover agent doubts this mount is the primary.
    held: parking_lot::Mutex<Option<String>>,
    params: ChunkParams,
    required: usize,
    failover_after: Duration,
    tracker: Arc<Tracker>,
    outside: Arc<Outside>,
    bucket: Option<Arc<Bucket>>,
    net: Option<Node>,
    /// The connections kept open to the replicas (with `net`).
    pool: Option<Arc<Pool>>,
    work: parking_lot::Mutex<Work>,
    board: Arc<Board>,
    /// Told every sync's report (metrics).
    on_report: parking_lot::Mutex<Option<OnReport>>,
    /// Makes the kernel send every write it has cached for the mount (writeback cache,
    /// shared mappings) before the freeze, so a sync point holds every write acknowledged
    /// before it began.
    flush: parking_lot::Mutex<Option<Flush>>,
}

/// See [`Engine::before_freeze`].
pub type Flush = Box<dyn Fn() -> std::io::Result<()> + Send + Sync>;

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

/// What is under the backing directory: the images (regular files, as UTF-8 relative paths)
/// and what is not replicated, with what it is (a named pipe, a socket, a device node, a
/// symbolic link, a name that cannot be replicated).
#[derive(Default)]
struct Listing {
    images: Vec<String>,
    skipped: Vec<(String, String)>,
}

fn list_images(root: &Path) -> Result<Listing> {
    use rustix::fs::FileType;
    let mut out = Listing::default();
    // Relative to the directory's descriptor: its own path's length does not count.
    let dir = crate::fs::at::Dir::open(root)
        .with_context(|| format!("cannot open {}", root.display()))?;
    let mut stack = vec![PathBuf::new()];
    while let Some(under) = stack.pop() {
        let listed = dir
            .list(&under)
            .with_context(|| format!("cannot list {}", root.join(&under).display()))?;
        for ent in listed {
            let rel = under.join(&ent.name);
            let kind = match ent.kind {
                FileType::Unknown => {
                    use std::os::unix::fs::MetadataExt;
                    FileType::from_raw_mode(dir.metadata(&rel)?.mode())
                }
                k => k,
            };
            if kind == FileType::Directory {
                stack.push(rel);
                continue;
            }
            let name = rel.to_string_lossy().into_owned();
            if kind != FileType::RegularFile {
                let what = dir
                    .metadata(&rel)
                    .map(|m| kind_of(&m))
                    .unwrap_or("special file");
                out.skipped.push((name, what.to_string()));
                continue;
            }
            match rel.to_str() {
                Some(s) if crate::wire::replica::valid_path(s) => out.images.push(s.to_string()),
                _ => {
                    log::warn!("{}: name cannot be replicated; skipped", rel.display());
                    out.skipped
                        .push((name, "name that cannot be replicated".into()));
                }
            }
        }
    }
    out.images.sort();
    out.skipped.sort();
    Ok(out)
}

/// Bytes of new content of each image of `images` that a replica holding `known` lacks: what
/// a plan would have to bring (patches counted whole).
fn behind(
    images: &BTreeMap<String, Arc<Manifest>>,
    known: &BTreeMap<String, Arc<Manifest>>,
) -> BTreeMap<String, u64> {
    images
        .iter()
        .filter_map(|(p, m)| {
            let n = match known.get(p) {
                Some(k) if k.root() == m.root() => 0,
                Some(k) => manifest::diff(k, m).new_bytes(),
                None => m
                    .entries()
                    .iter()
                    .filter(|e| matches!(e.kind, Kind::Data(_)))
                    .map(|e| e.len)
                    .sum(),
            };
            (n > 0).then(|| (p.clone(), n))
        })
        .collect()
}

/// A generation record of the state directory, or `None` when it is damaged (bit rot): the
/// file is moved aside with a warning, and the caller learns its fields again.
fn read_record(path: &Path) -> Result<Option<GenRecord>> {
    let damage = match GenRecord::read(path) {
        Ok(r) => match r.root() {
            Ok(_) => return Ok(Some(r)),
            Err(e) => e,
        },
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => e.to_string(),
        Err(e) => return Err(e.into()),
    };
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = path.with_extension(format!("json.damaged-{secs}"));
    fs::rename(path, &aside)
        .with_context(|| format!("{} is damaged ({damage})", path.display()))?;
    log::warn!(
        "{} was damaged ({damage}): moved aside to {} and made again (the replicas' answers at \
         the next sync set what it cannot know)",
        path.display(),
        aside.display()
    );
    Ok(None)
}

/// When a file was last changed, as the time a replica's record was written.
fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// One replica's shipment of one generation, as the driver saw it end.
struct Shipped {
    name: String,
    result: Result<Acked, Cause>,
    total: ShipStats,
    last: Arc<ShipStats>,
    attempts: u32,
    took: Duration,
    /// When the first failed attempt started, if one did.
    failed_since: Option<SystemTime>,
}

impl Engine {
    /// The engine of the mount of `root` (the backing directory) whose state lives in `state`.
    pub fn open(
        opts: Options,
        root: &Path,
        state: &Path,
        tracker: Arc<Tracker>,
        outside: Arc<Outside>,
    ) -> Result<Engine> {
        let params = opts.params;
        // Re-chunking and hashing run on rayon's global pool: in a mount daemon only syncs use
        // it. (Already built, as in tests that open several engines in one process: kept.)
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("ferry-chunk-{i}"))
            .start_handler(|_| crate::priority::background())
            .build_global();
        let active = ManifestDir::new(state.join("active").join("manifests"));
        fs::create_dir_all(active.path())?;
        let lineage = epoch::load::<Lineage>(&state.join(epoch::FILE))?
            .unwrap_or_else(|| Lineage::first(&opts.node));
        if let Some(f) = &lineage.fenced {
            log::error!("{}", fenced_words(&lineage, f));
        }
        let images: BTreeMap<String, Arc<Manifest>> = active
            .load_all(params)
            .into_iter()
            .map(|(k, m)| (k, Arc::new(m)))
            .collect();
        let rec_path = state.join("active").join("generation.json");
        let rec = match read_record(&rec_path)? {
            Some(r) => r,
            None => {
                // Made again: the root from the manifests, the number from the replicas'
                // records (a replica that holds a higher one says so at the next sync, and
                // the count goes on from there).
                let generation = opts
                    .peers
                    .iter()
                    .filter_map(|p| {
                        GenRecord::read(&state.join("peers").join(&p.name).join("generation.json"))
                            .ok()
                    })
                    .map(|r| r.generation)
                    .max()
                    .unwrap_or(0);
                let r = GenRecord {
                    generation,
                    group_root: hex(&group_root(&images)),
                    point_ms: None,
                };
                r.write(&rec_path)?;
                r
            }
        };
        let group = rec
            .root()
            .map_err(|e| anyhow!("{}: {e}", rec_path.display()))?;
        let mut peers = Vec::new();
        let mut views = Vec::new();
        for p in &opts.peers {
            let dir = state.join("peers").join(&p.name);
            let rec_path = dir.join("generation.json");
            // Damaged: generation 0, and the replica's answer at the next sync says what it holds.
            let prec = read_record(&rec_path)?.unwrap_or_default();
            let manifests: BTreeMap<String, Arc<Manifest>> =
                ManifestDir::new(dir.join("manifests"))
                    .load_all(params)
                    .into_iter()
                    .map(|(k, m)| (k, Arc::new(m)))
                    .collect();
            let lacks = behind(&images, &manifests);
            let mut view = board::Replica {
                name: p.name.clone(),
                addr: p.addr.to_string(),
                zone: p.zone.clone(),
                selected: false,
                reason: "not chosen yet".into(),
                generation: prec.generation,
                root: prec.root().ok().filter(|_| prec.generation > 0),
                committed_at: (prec.generation > 0).then(|| mtime(&rec_path)).flatten(),
                point_at: prec
                    .point_ms
                    .filter(|_| prec.generation > 0)
                    .map(from_unix_ms),
                state: State::Behind,
                behind: lacks,
                failing_since: None,
                rtt: None,
                throughput: None,
                last: None,
            };
            view.settle(rec.generation);
            views.push(view);
            peers.push(Peer {
                name: p.name.clone(),
                addr: p.addr,
                bucket: p.bandwidth_limit.map(|r| Arc::new(Bucket::new(r))),
                zone: p.zone.clone(),
                failing_since: None,
                down_since: None,
                rtt: None,
                throughput: None,
                selected: false,
                reason: "not chosen yet".into(),
                confirmed: false,
                known: PeerKnowledge {
                    generation: prec.generation,
                    manifests,
                    dirty: BTreeMap::new(),
                },
            });
        }
        let net = if opts.peers.is_empty() {
            None
        } else {
            let id = opts
                .identity
                .as_ref()
                .ok_or_else(|| anyhow!("peers are configured but this node has no key"))?;
            let pinned: Vec<Fingerprint> = opts.peers.iter().map(|p| p.fingerprint).collect();
            let threads = Threads {
                count: 2,
                name: "ferry-net",
                on_start: crate::priority::background,
            };
            Some(Node::client(id, &pinned, opts.congestion, threads)?)
        };
        let required = opts.required.min(opts.peers.len());
        let board = Arc::new(Board::new(board::View {
            generation: rec.generation,
            root: group,
            required,
            replicas: views,
            fenced: lineage.fenced.clone(),
            ..Default::default()
        }));
        Ok(Engine {
            root: root.to_path_buf(),
            state: state.to_path_buf(),
            node: opts.node,
            lineage: parking_lot::Mutex::new(lineage),
            held: parking_lot::Mutex::new(None),
            params,
            required,
            failover_after: opts.failover_after,
            tracker,
            outside,
            bucket: opts.bandwidth_limit.map(|r| Arc::new(Bucket::new(r))),
            pool: net
                .as_ref()
                .map(|n| Arc::new(Pool::new(n.endpoint().clone()))),
            net,
            work: parking_lot::Mutex::new(Work {
                generation: rec.generation,
                group_root: group,
                images,
                peers,
                broken: BTreeMap::new(),
                point: None,
            }),
            board,
            on_report: parking_lot::Mutex::new(None),
            flush: parking_lot::Mutex::new(None),
        })
    }

    /// Runs `f` at each sync point before the freeze: the mount flushes the kernel's cached
    /// writes with it.
    pub fn before_freeze(&self, f: Flush) {
        *self.flush.lock() = Some(f);
    }

    /// Runs `f` with every sync's report.
    pub fn on_report(&self, f: OnReport) {
        *self.on_report.lock() = Some(f);
    }

    /// Bytes of the extents the intent log marks: what a crash would make the next mount
    /// re-read now, at most.
    pub fn intent_log_bytes(&self) -> u64 {
        self.tracker.logged_bytes()
    }

    /// Bytes changed since the last sync point, per image.
    pub fn unsynced(&self) -> Vec<(String, u64)> {
        self.tracker
            .dirty()
            .into_iter()
            .map(|(p, r)| {
                let n = r.iter().map(|r| r.end - r.start).sum();
                (p.to_string_lossy().into_owned(), n)
            })
            .collect()
    }

    fn active(&self) -> ManifestDir {
        ManifestDir::new(self.state.join("active").join("manifests"))
    }

    fn active_record(&self) -> PathBuf {
        self.state.join("active").join("generation.json")
    }

    /// Makes a sync point now and ships it; waits for the replicas the policy requires, at most
    /// `timeout`. `only` restricts the sync point to some images (the others keep their
    /// unsynced changes for the next one).
    pub fn sync(&self, only: &[String], timeout: Duration) -> Result<Report> {
        let t0 = Instant::now();
        let mut work = self.work.lock();
        self.board.update(|v| {
            v.running = Some(board::Running {
                phase: "cutting",
                generation: work.generation + 1,
                dirty_bytes: 0,
                started: t0,
            })
        });
        let r = self.sync_locked(&mut work, only, timeout, t0);
        self.board.update(|v| v.running = None);
        crate::heap::give_back_soon();
        r
    }

    fn sync_locked(
        &self,
        work: &mut Work,
        only: &[String],
        timeout: Duration,
        t0: Instant,
    ) -> Result<Report> {
        // A fenced primary cuts nothing: its changes stay dirty (and in the intent log) for
        // `ferry rejoin` to save aside.
        {
            let l = self.lineage.lock();
            if let Some(f) = &l.fenced {
                anyhow::bail!("{}", fenced_words(&l, f));
            }
            if let Some(why) = &*self.held.lock() {
                anyhow::bail!("no sync point while this mount may not be the primary: {why}");
            }
        }
        // Writes the kernel still caches reach the daemon (and the tracker) first.
        if let Some(flush) = &*self.flush.lock() {
            flush().context(
                "cannot flush the writes the kernel caches for the mount; no sync point was \
                 cut (is the mount still there? see the mount's log)",
            )?;
        }
        // Writes that bypassed the mount, reported up to now, join this sync point.
        self.outside.drain(&self.tracker, true);
        let only: Option<HashSet<PathBuf>> =
            (!only.is_empty()).then(|| only.iter().map(PathBuf::from).collect());
        // Freeze, and open the copy-before-write window over every image, at one instant.
        let root = self.root.clone();
        let spill = self.state.join("cow.spill");
        let mut skipped = Vec::new();
        let mut point = None;
        let (frozen, window) = self
            .tracker
            .freeze_with(only.as_ref(), || {
                // No write is in flight here: every one acknowledged so far is in this point.
                point = Some(SystemTime::now());
                crate::fault::point("sync.freeze")?;
                let listing = list_images(&root).map_err(std::io::Error::other)?;
                skipped = listing.skipped;
                Window::open(&root, &listing.images, &spill, COW_MEMORY).map(Some)
            })
            .context("cannot open the copy-before-write window")?;
        let window = Arc::new(window.expect("opened above"));
        let dirty_bytes: u64 = frozen.dirty.values().map(|r| r.covered_bytes()).sum();
        self.board.update(|v| {
            if let Some(r) = &mut v.running {
                r.dirty_bytes = dirty_bytes;
            }
            v.skipped = skipped;
        });
        let (changed, scan) = match self.cut(work, &frozen, only.as_ref(), &window) {
            Ok(c) => c,
            Err(e) => {
                self.tracker.close_window();
                self.tracker.abort(frozen);
                if crate::durable::is_full(e.as_ref()) {
                    return Err(e.context(format!(
                        "cannot cut the sync point: the state directory {} is full; free \
                         space there. The VMs' writes go on meanwhile, and the next sync point \
                         ships all of them",
                        self.state.display()
                    )));
                }
                return Err(e);
            }
        };
        // What each image looked like at the freeze, for the next mount to compare with.
        self.outside.save(
            window
                .images()
                .iter()
                .filter(|(p, _)| !work.broken.contains_key(*p))
                .map(|(p, i)| (p.clone(), i.stamp()))
                .collect(),
        );
        // The active manifests now cover the frozen changes: the intent log may forget them.
        let frozen_dirty = frozen.dirty.clone();
        if let Err(e) = self.tracker.commit(frozen) {
            log::warn!("intent log compaction failed (the marks stay): {e}");
        }
        for p in &mut work.peers {
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
            number: work.generation,
            group_root: work.group_root,
            images: work.images.clone(),
        });
        log::info!(
            "sync point: generation {} ({} images, {} dirty bytes, {} changed) cut in {rechunk_ms} ms \
             (read {} bytes, hashed {}, gear-hashed {})",
            generation.number,
            generation.images.len(),
            dirty_bytes,
            changed,
            scan.bytes_read,
            scan.bytes_hashed,
            scan.bytes_cut
        );
        // A sync point of some images only leaves the others' writes out: the recovery
        // point stays the last one that took every image.
        if only.is_none() {
            work.point = point;
        }
        self.publish_cut(work);
        let outcomes = self.ship_all(work, &generation, timeout, &window);
        let saved = window.saved_bytes();
        self.tracker.close_window();
        drop(window);
        if saved > 0 {
            log::info!("copy-before-write saved {saved} bytes written during the sync");
        }
        let committed = outcomes.iter().filter(|o| o.state == "committed").count();
        if let Some(o) = outcomes.iter().find(|o| o.cause == Some("fenced")) {
            self.fence(o);
        }
        // A replica numbered this generation higher (this primary had lost count): go on from
        // there.
        if let Some(n) = outcomes.iter().map(|o| o.generation).max()
            && n > work.generation
        {
            work.generation = n;
            GenRecord {
                generation: n,
                group_root: hex(&work.group_root),
                point_ms: None,
            }
            .write(&self.active_record())?;
            self.board.update(|v| v.generation = n);
        }
        let sum = |f: fn(&PeerOutcome) -> u64| outcomes.iter().map(f).sum::<u64>();
        let report = Report {
            generation: work.generation,
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
        log::info!("{}", summary(&report));
        let last = serde_json::to_value(&report)?;
        self.board.update(|v| v.last_sync = Some(last));
        if let Some(f) = &*self.on_report.lock() {
            f(&report);
        }
        Ok(report)
    }

    /// Cuts a new generation (see `cut.rs`) and saves it as the active one. Returns how many
    /// images changed.
    fn cut(
        &self,
        work: &mut Work,
        frozen: &FrozenChanges,
        only: Option<&HashSet<PathBuf>>,
        window: &Window,
    ) -> Result<(usize, crate::chunk::ScanStats)> {
        let root = self.root.clone();
        let lookup = move |k: &str| match fs::symlink_metadata(root.join(k)) {
            Ok(m) => Some(format!("it is now a {}", kind_of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(format!("cannot look it up: {e}")),
        };
        let images = cut::Images {
            present: window
                .images()
                .iter()
                .map(|(k, v)| (k.clone(), &**v as &dyn Source))
                .collect(),
            failed: window
                .failed()
                .iter()
                .map(|(k, e)| (k.clone(), e.to_string()))
                .collect(),
            lookup: &lookup,
        };
        let changes = cut::Changes {
            dirty: &frozen.dirty,
            events: &frozen.events,
            only,
        };
        crate::fault::point("sync.rechunk")?;
        let c = cut::cut(&work.images, &changes, &images, self.params);
        let active = self.active();
        for name in &c.changed {
            crate::fault::point("sync.manifest.save")?;
            active.save(name, &c.images[name])?;
        }
        for name in &c.gone {
            active.remove(name);
        }
        self.report_broken(work, c.broken, frozen);
        work.images = c.images;
        work.generation += 1;
        work.group_root = group_root(&work.images);
        GenRecord {
            generation: work.generation,
            group_root: hex(&work.group_root),
            point_ms: None,
        }
        .write(&self.active_record())?;
        Ok((c.changed.len(), c.scan))
    }

    /// Says which images became unreadable or readable again, and keeps the changes frozen
    /// for the unreadable ones (their manifests did not take them) for a later sync point.
    fn report_broken(
        &self,
        work: &mut Work,
        broken: BTreeMap<String, String>,
        frozen: &FrozenChanges,
    ) {
        for (path, why) in &broken {
            if work.broken.get(path) != Some(why) {
                log::warn!(
                    "{}: {why}: not a readable image; the replicas keep its last generation and \
                     the other images go on replicating",
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
        for path in work.broken.keys().filter(|p| !broken.contains_key(*p)) {
            log::info!("{}: readable again", self.root.join(path).display());
        }
        work.broken = broken;
    }

    /// A new generation was cut: status shows it, and what each replica lacks of it.
    fn publish_cut(&self, work: &Work) {
        let lacks: Vec<BTreeMap<String, u64>> = work
            .peers
            .iter()
            .map(|p| behind(&work.images, &p.known.manifests))
            .collect();
        self.board.update(|v| {
            v.generation = work.generation;
            v.root = work.group_root;
            v.broken = work.broken.clone();
            if let Some(r) = &mut v.running {
                r.phase = "shipping";
            }
            for (r, lacks) in v.replicas.iter_mut().zip(lacks) {
                r.behind = lacks;
                r.settle(work.generation);
            }
        });
    }

    /// The images of the last generation cut.
    pub fn image_names(&self) -> BTreeSet<String> {
        self.work.lock().images.keys().cloned().collect()
    }

    /// `ferry verify --primary`: re-hashes every image against its active manifest (see
    /// `verify.rs`). With `repair`, marks what differs dirty, so the next sync point ships it.
    pub fn verify_primary(&self, repair: bool) -> Value {
        let work = self.work.lock();
        let mut checks: Vec<verify::ImageCheck> = Vec::new();
        for (path, m) in &work.images {
            if let Some(why) = work.broken.get(path) {
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
            "generation": work.generation,
            "images": checks,
        })
    }

    /// Closes the connections kept to the replicas, and waits (a second at most) until they
    /// have told the replicas: the mount is going away.
    pub fn close_connections(&self) {
        if let (Some(net), Some(pool)) = (&self.net, &self.pool) {
            pool.close_all();
            net.block_on(async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), net.endpoint().wait_idle()).await;
            });
        }
    }

    /// `ferry verify` (the replicas): asks every replica what it holds and compares it with
    /// this primary's manifests of the generation it last committed; with `deep`, each replica
    /// re-hashes its store too, mending what it can when `repair` (see `replica/scrub.rs`).
    pub fn verify_replicas(&self, deep: bool, repair: bool) -> Vec<verify::ReplicaCheck> {
        let Some(net) = &self.net else {
            return vec![];
        };
        let peers: Vec<_> = self
            .work
            .lock()
            .peers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.addr,
                    p.known.generation,
                    p.known.manifests.clone(),
                )
            })
            .collect();
        let (claim, params) = (self.claim(), self.params);
        net.block_on(futures_join_all(peers.into_iter().map(
            |(name, addr, expected, known)| {
                let (ep, claim) = (net.endpoint().clone(), claim.clone());
                async move {
                    let held = ship::check(
                        &ep,
                        addr,
                        (&claim, params),
                        (expected, &known),
                        deep.then_some(repair),
                    )
                    .await
                    .map_err(|e| e.to_string());
                    verify::compare(&name, expected, &known, held)
                }
            },
        )))
    }

    /// Ships a generation to every selected peer at once and probes the others; returns the
    /// outcomes of the shipments.
    fn ship_all(
        &self,
        work: &mut Work,
        g: &Arc<Generation>,
        timeout: Duration,
        window: &Arc<Window>,
    ) -> Vec<PeerOutcome> {
        let (Some(net), Some(pool)) = (&self.net, &self.pool) else {
            return vec![];
        };
        let src: Arc<dyn ChunkSource + Send + Sync> = Arc::new(Frozen(window.clone()));
        self.choose(work);
        narrow(window, &work.peers, g);
        let probes: Vec<(usize, SocketAddr)> = work
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.selected)
            .map(|(i, p)| (i, p.addr))
            .collect();
        let jobs: Vec<_> = work
            .peers
            .iter()
            .filter(|p| p.selected)
            .map(|p| {
                let buckets: Vec<Arc<Bucket>> =
                    p.bucket.iter().chain(self.bucket.iter()).cloned().collect();
                (p.name.clone(), p.addr, p.known.clone(), buckets)
            })
            .collect();
        let (claim, params) = (self.claim(), self.params);
        // With one replica nothing is made twice: no cache.
        let cache = (jobs.len() > 1).then(|| ship::FrameCache::new(FRAME_CACHE));
        let (shipped, probed) = net.block_on(async {
            let futs = jobs.into_iter().map(|(name, addr, known, buckets)| {
                let how = Shipment {
                    src: src.clone(),
                    stats: Arc::new(ShipStats::default()),
                    buckets,
                    tamper: None,
                    cache: cache.clone(),
                };
                let drive = Drive {
                    pool: pool.clone(),
                    board: self.board.clone(),
                    claim: claim.clone(),
                    params,
                };
                drive.run(name, addr, g.clone(), known, how, timeout)
            });
            let probed = futures_join_all(probes.into_iter().map(|(i, addr)| {
                let ep = net.endpoint().clone();
                async move {
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), ship::probe(&ep, addr)).await;
                    (i, r.ok().and_then(|r| r.ok()))
                }
            }));
            tokio::join!(futures_join_all(futs), probed)
        });
        for (i, rtt) in probed {
            let p = &mut work.peers[i];
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
        let out: Vec<PeerOutcome> = shipped
            .into_iter()
            .map(|s| self.outcome(work, g, s))
            .collect();
        self.publish_peers(work);
        out
    }

    /// Learns from one shipment's end: the replica's new base, or its failure.
    fn outcome(&self, work: &mut Work, g: &Generation, s: Shipped) -> PeerOutcome {
        let peer = work
            .peers
            .iter_mut()
            .find(|p| p.name == s.name)
            .expect("a peer");
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut o = PeerOutcome {
            name: s.name.clone(),
            state: "committed".into(),
            generation: g.number,
            root: None,
            cause: None,
            error: None,
            bytes_sent: n(&s.total.bytes_sent),
            chunks_sent: n(&s.total.chunks_sent),
            patches_sent: n(&s.total.patches_sent),
            wire_bytes: n(&s.total.wire_bytes),
            packets_sent: n(&s.total.packets_sent),
            packets_lost: n(&s.total.packets_lost),
            busy_pct: 0,
            duration_ms: s.took.as_millis() as u64,
            attempts: s.attempts,
            connections: n(&s.total.connections),
            planned_ahead: n(&s.total.planned_ahead),
            last_attempt_bytes: n(&s.last.bytes_sent),
            chunks_reused: n(&s.total.chunks_reused),
            chunks_held: n(&s.total.chunks_held),
        };
        match s.result {
            Ok(acked) => {
                o.busy_pct = acked.busy_pct;
                o.root = Some(hex(&acked.group_root));
                o.generation = acked.generation;
                peer.failing_since = None;
                peer.down_since = None;
                let rtt = n(&s.last.rtt_us);
                if rtt > 0 {
                    peer.rtt = Some(Duration::from_micros(rtt));
                }
                if o.bytes_sent >= 1 << 20 && o.duration_ms > 0 {
                    peer.throughput = Some(o.bytes_sent as f64 * 1000.0 / o.duration_ms as f64);
                }
                let active = (&self.active(), &work.images);
                let point = work.point;
                peer.confirmed =
                    match remember(&self.state, peer, (g, point), acked.generation, active) {
                        Ok(()) => true,
                        Err(e) => {
                            log::warn!(
                                "{}: acknowledged, but its state could not be saved: {e:#}",
                                s.name
                            );
                            false
                        }
                    };
                log::info!(
                    "{}: committed generation {} ({} bytes in {} chunks and {} patches, {} ms)",
                    s.name,
                    g.number,
                    o.bytes_sent,
                    o.chunks_sent,
                    o.patches_sent,
                    o.duration_ms
                );
                self.board.replica(&s.name, |r| {
                    r.generation = acked.generation;
                    r.root = Some(acked.group_root);
                    r.committed_at = Some(SystemTime::now());
                    r.point_at = point;
                    r.state = State::Committed;
                    // It holds the generation just cut: it lacks nothing of it.
                    r.behind.clear();
                });
            }
            Err(cause) => {
                // It may have committed all the same (the acknowledgement lost).
                peer.confirmed = false;
                peer.failing_since.get_or_insert_with(Instant::now);
                let since = *peer
                    .down_since
                    .get_or_insert(s.failed_since.unwrap_or_else(SystemTime::now));
                log::warn!("{}: generation {} not committed: {cause}", s.name, g.number);
                o.state = "failed".into();
                o.cause = Some(cause.code());
                o.error = Some(cause.to_string());
                self.board.replica(&s.name, |r| {
                    r.state = State::Failing { since, cause };
                });
            }
        }
        let last = serde_json::to_value(&o).ok();
        self.board.replica(&s.name, |r| r.last = last);
        o
    }

    /// Health and selection after a sync's shipments (what each replica lacks was published
    /// at the cut, and cleared for those that committed).
    fn publish_peers(&self, work: &Work) {
        for p in &work.peers {
            self.board.replica(&p.name, |r| {
                r.selected = p.selected;
                r.reason = p.reason.clone();
                r.failing_since = p.failing_since;
                r.rtt = p.rtt;
                r.throughput = p.throughput;
                r.settle(work.generation);
            });
        }
    }

    /// Who this mount is to its replicas.
    fn claim(&self) -> Claim {
        let l = self.lineage.lock();
        Claim {
            node: self.node.clone(),
            namespace: l.namespace.clone(),
            epoch: l.epoch,
            takeover: l.base.as_ref().map(|b| Takeover {
                epoch: b.epoch,
                generation: b.generation,
                group_root: manifest::from_hex(&b.root).unwrap_or_default(),
            }),
        }
    }

    /// The namespace and epoch this mount writes under, and whether it was fenced.
    pub fn lineage(&self) -> Lineage {
        self.lineage.lock().clone()
    }

    /// The failover agent's standing, for `ferry status`.
    pub fn set_failover(&self, v: Value) {
        self.board.update(|b| b.failover = Some(v));
    }

    /// Holds sync points (`Some(why)`) while the failover agent cannot be sure this mount is
    /// still the primary, or lets them go on (`None`).
    pub fn hold(&self, why: Option<String>) {
        *self.held.lock() = why;
    }

    /// The failover agent won the leader key at `epoch`, above the one this mount writes
    /// under: recorded durably before any sync point ships under it.
    pub fn raise_epoch(&self, epoch: u64) -> Result<()> {
        let mut l = self.lineage.lock();
        if epoch <= l.epoch {
            return Ok(());
        }
        let mut next = l.clone();
        next.epoch = epoch;
        next.since = epoch::now();
        epoch::save(&self.state.join(epoch::FILE), &next)
            .context("cannot record the epoch won on etcd")?;
        log::info!(
            "namespace {} written at epoch {epoch} from now on (was {})",
            l.namespace,
            l.epoch
        );
        *l = next;
        Ok(())
    }

    /// A replica refused this mount as fenced: another node holds its namespace at a higher
    /// epoch. Recorded durably, so that no later sync point (after a restart too) ships.
    fn fence(&self, refused: &PeerOutcome) {
        self.fence_by(&refused.name, refused.error.clone().unwrap_or_default());
    }

    /// `by` (a replica, or the etcd cluster) says another node holds this mount's namespace:
    /// recorded durably, so that no later sync point ships until `ferry rejoin`.
    pub fn fence_by(&self, by: &str, reason: String) {
        let mut l = self.lineage.lock();
        if l.fenced.is_some() {
            return;
        }
        l.fenced = Some(Fence {
            replica: by.to_string(),
            reason,
            at: epoch::now(),
            source: self.root.clone(),
        });
        if let Err(e) = epoch::save(&self.state.join(epoch::FILE), &*l) {
            log::error!("cannot record that this primary was fenced: {e}");
        }
        log::error!("{}", fenced_words(&l, l.fenced.as_ref().expect("just set")));
        let fenced = l.fenced.clone();
        self.board.update(|v| v.fenced = fenced);
    }

    /// Status for `ferry status`: a copy of the board, never waiting for a sync.
    pub fn status(&self) -> Value {
        // Read before the view: a sync point cut after this read and shown running, or done,
        // in the view cannot make the claim below wrong.
        // (Without tracking, `-o notrack`, nothing is known unsynced and nothing replicates.)
        let nothing_unsynced = self.tracker.enabled() && self.tracker.dirty_bytes() == 0;
        let mut v = self.board.json();
        if nothing_unsynced && v["running"].is_null() {
            // Nothing written since the last sync point: a replica that holds it holds every
            // write acknowledged so far.
            for r in v["replicas"].as_array_mut().into_iter().flatten() {
                if r["state"] == "committed" && r["recovery_point_age_s"].is_number() {
                    r["recovery_point_age_s"] = 0.0.into();
                }
            }
        }
        if let (Some(pool), Some(replicas)) = (&self.pool, v["replicas"].as_array_mut()) {
            for r in replicas {
                let open = r["addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .is_some_and(|a| pool.is_open(a));
                r["connected"] = open.into();
            }
        }
        v["outside"] = serde_json::to_value(self.outside.findings()).unwrap_or_default();
        v["outside_watch"] = self.outside.watching().into();
        v["udp_buffer_capped"] = crate::net::transport::capped_buffer().into();
        v
    }
}

/// Seeds the state directory of a mount whose images are a replica's committed generation
/// `generation` (group root `root`, manifests in `from`): a promotion. That generation becomes
/// the active one, and what each of `peers` acknowledged (replicas known to hold that very
/// generation), so the first sync point re-chunks nothing and ships only what changed since.
/// Replicas not named find their base by Merkle descent at their first session. The manifest
/// files are hard-linked (copied across filesystems): they are only ever replaced, never
/// changed in place. Returns the images' names.
pub fn seed(
    state: &Path,
    from: &ManifestDir,
    (generation, root): (u64, &str),
    peers: &[String],
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![from.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let ent = ent?;
            if ent.file_type()?.is_dir() {
                stack.push(ent.path());
            } else if let Some(rel) = ent
                .path()
                .strip_prefix(from.path())
                .ok()
                .and_then(|r| r.to_str())
            {
                if let Some(image) = rel.strip_suffix(".manifest") {
                    files.push(image.to_string());
                }
            }
        }
    }
    let record = GenRecord {
        generation,
        group_root: root.to_string(),
        point_ms: None,
    };
    let dirs = std::iter::once(state.join("active"))
        .chain(peers.iter().map(|p| state.join("peers").join(p)));
    for dir in dirs {
        let mdir = ManifestDir::new(dir.join("manifests"));
        for image in &files {
            let to = mdir.file(image);
            fs::create_dir_all(to.parent().expect("under the directory"))?;
            if fs::hard_link(from.file(image), &to).is_err() {
                fs::copy(from.file(image), &to)?;
            }
        }
        crate::durable::fsync_dir(mdir.path())?;
        record.write(&dir.join("generation.json"))?;
    }
    files.sort();
    Ok(files)
}

/// Narrows the copy-before-write window to what the selected replicas can still ask for: per
/// image, the data entries of `g` that differ from what each of them holds, and of those that
/// go as patches only the patches' ranges. Only when each of them was seen to acknowledge what
/// it holds; one that may hold something else may ask for anything, and so may one that lacks
/// an image.
fn narrow(window: &Window, peers: &[Peer], g: &Generation) {
    let selected: Vec<&Peer> = peers.iter().filter(|p| p.selected).collect();
    if selected.is_empty() || selected.iter().any(|p| !p.confirmed) {
        return;
    }
    'images: for (path, m) in &g.images {
        let mut spans = RangeSet::with_limit(usize::MAX);
        for p in &selected {
            let Some(held) = p.known.manifests.get(path) else {
                continue 'images;
            };
            for r in may_read(held, p.known.dirty.get(path), m) {
                spans.insert(r);
            }
        }
        window.narrow(path, spans.to_vec());
    }
}

/// A replica acknowledged `g`: it is that replica's new base. A manifest that is also the
/// active one (`active`, saved in `active_dir` at the cut) is linked from there, not written
/// again.
fn remember(
    state: &Path,
    peer: &mut Peer,
    (g, point): (&Generation, Option<SystemTime>),
    number: u64,
    (active_dir, active): (&ManifestDir, &BTreeMap<String, Arc<Manifest>>),
) -> Result<()> {
    let dir = state.join("peers").join(&peer.name);
    let mdir = ManifestDir::new(dir.join("manifests"));
    for (path, m) in &g.images {
        if peer
            .known
            .manifests
            .get(path)
            .is_none_or(|k| k.root() != m.root())
        {
            match active.get(path) {
                Some(a) if Arc::ptr_eq(a, m) => mdir.adopt(active_dir, path)?,
                _ => mdir.save(path, m)?,
            }
        }
    }
    for old in peer.known.manifests.keys() {
        if !g.images.contains_key(old) {
            mdir.remove(old);
        }
    }
    GenRecord {
        generation: number,
        group_root: hex(&g.group_root),
        point_ms: point.map(unix_ms),
    }
    .write(&dir.join("generation.json"))?;
    peer.known = PeerKnowledge {
        generation: number,
        manifests: g.images.clone(),
        dirty: BTreeMap::new(),
    };
    Ok(())
}

/// Drives one replica's shipment: connects and ships, and asks the [`Link`] what to do after
/// each failure; publishes every attempt on the board.
struct Drive {
    pool: Arc<Pool>,
    board: Arc<Board>,
    claim: Claim,
    params: ChunkParams,
}

impl Drive {
    async fn run(
        self,
        name: String,
        addr: SocketAddr,
        g: Arc<Generation>,
        known: PeerKnowledge,
        how: Shipment,
        timeout: Duration,
    ) -> Shipped {
        let t = Instant::now();
        let mut link = Link::new(Policy::new(timeout), t);
        let total = ShipStats::default();
        let mut first_failure: Option<SystemTime> = None;
        let (result, last) = loop {
            let attempt = link.attempt();
            let started = SystemTime::now();
            let how = Shipment {
                stats: Arc::new(ShipStats::default()),
                ..how.clone()
            };
            self.board.replica(&name, |r| {
                r.state = State::Shipping {
                    generation: g.number,
                    attempt,
                    stats: how.stats.clone(),
                }
            });
            let (session, hello) =
                PrimarySession::new(&self.claim, self.params, g.clone(), known.clone());
            let deadline = tokio::time::Instant::from_std(link.deadline());
            let r = tokio::time::timeout_at(deadline, ship(&self.pool, addr, session, hello, &how))
                .await;
            total.add(&how.stats);
            let cause = match r {
                Ok(Ok(acked)) => break (Ok(acked), how.stats),
                Ok(Err(c)) => c,
                Err(_) => Cause::Timeout(timeout),
            };
            match link.failed(cause.clone(), Instant::now()) {
                Next::Retry(wait) => {
                    log::warn!("{name}: attempt {attempt} failed ({cause}); retrying in {wait:?}");
                    let since = *first_failure.get_or_insert(started);
                    self.board
                        .replica(&name, |r| r.state = State::Failing { since, cause });
                    tokio::time::sleep(wait).await;
                }
                Next::GiveUp(c) => {
                    first_failure.get_or_insert(started);
                    break (Err(c), how.stats);
                }
            }
        };
        Shipped {
            name,
            result,
            total,
            last,
            attempts: link.attempts(),
            took: t.elapsed(),
            failed_since: first_failure,
        }
    }
}

/// One line per sync point for the log: its figures and each replica's outcome.
/// What a fenced primary says, in its log, status and every refused sync.
fn fenced_words(l: &Lineage, f: &Fence) -> String {
    format!(
        "this primary (namespace {}, epoch {}) was fenced: {}{} refused it at {}: {}. It \
         ships nothing more; its VMs' writes stay on this host and are not lost. Run `ferry \
         rejoin --config FILE` to make it a replica of the new primary (its writes since the \
         promotion are saved aside first)",
        l.namespace,
        l.epoch,
        if f.replica.starts_with("etcd") {
            ""
        } else {
            "replica "
        },
        f.replica,
        epoch::when(f.at),
        f.reason
    )
}

fn summary(r: &Report) -> String {
    let mut line = format!(
        "sync: generation {} ({}): {} dirty, {} sent, {} on the wire, {} ms; {} of {} required committed",
        r.generation,
        &r.root[..16],
        r.dirty_bytes,
        r.bytes_sent,
        r.wire_bytes,
        r.duration_ms,
        r.committed,
        r.required
    );
    for o in &r.replicas {
        line += &format!("; {} {}", o.name, o.state);
        if let Some(c) = o.cause {
            line += &format!(" ({c})");
        }
    }
    line
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
    fn choose(&self, work: &mut Work) {
        let cands: Vec<select::Candidate> = work
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
        for (p, c) in work.peers.iter_mut().zip(choices) {
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
