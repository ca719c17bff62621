//! `ferry replica --config FILE`: the replica daemon. It listens for QUIC connections from the
//! pinned primaries and runs a [`ReplicaSession`] per connection against the store: the control
//! stream carries the session's frames both ways, data streams carry chunks and patches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::site::{Caller, Shared as SharedStore};
use super::{META_DIR, Site};
use crate::chunk::ChunkParams;
use crate::net::transport::{self, read_frame, write_frame};
use crate::net::{Fingerprint, Identity, Node, Threads};
use crate::wire::frame::{Frame, Refusal, RefuseCode, VERSION};
use crate::wire::replica::{Checked, ReplicaSession, ReplicaStore};

/// How long a connected primary has to send its `Hello`.
const HELLO_WITHIN: Duration = Duration::from_secs(30);

/// Connections one primary (one key) may have open at once: a sync, a `ferry verify`, a probe,
/// and the stale connections of a link that flapped (each lingers until the idle timeout) are
/// legitimate; more are refused, so a primary gone wrong cannot make this daemon hold a
/// connection's worth of memory many times over.
pub const CONNECTIONS_PER_PRIMARY: usize = 8;

/// Answers of a session queued for its control stream before the session stops reading the
/// primary's frames: a session answers a handful of frames per generation (plus the queries
/// of a Merkle descent), so this never holds up one that reads.
const ANSWERS_QUEUED: usize = 64;

/// Batches of data frames read from one stream ahead of the thread that checks and stages them
/// (each what had arrived, at most one frame's limit plus 256 KiB): enough that reading and
/// checking overlap, few enough that a slow store stops the reading (and QUIC's flow control
/// then the primary) after a few MiB of memory.
const STREAM_QUEUED: usize = 4;

/// The connections open per primary key.
#[derive(Default)]
struct Open(parking_lot::Mutex<std::collections::HashMap<Fingerprint, usize>>);

/// One connection counted in [`Open`], until dropped.
struct Counted<'a>(&'a Open, Fingerprint);

impl Open {
    fn enter(&self, fp: Fingerprint) -> Option<Counted<'_>> {
        let mut m = self.0.lock();
        let n = m.entry(fp).or_default();
        if *n >= CONNECTIONS_PER_PRIMARY {
            return None;
        }
        *n += 1;
        Some(Counted(self, fp))
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut m = self.0.0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// What the replica daemon is told by the face (built from the config file there).
pub struct Options {
    pub identity: Identity,
    pub params: ChunkParams,
    pub store: PathBuf,
    pub listen: SocketAddr,
    /// The primaries it accepts.
    pub primaries: Vec<Fingerprint>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// Where to serve the read-only replica mount.
    pub mount: Option<PathBuf>,
    /// The restore points kept.
    pub keep: super::Policy,
    /// A deep verify with repair this often (the first one an interval after start).
    pub scrub_interval: Option<Duration>,
    /// An unmount of the replica mount stops the daemon (the mount-helper form, where the
    /// mount is the service); otherwise the daemon goes on receiving.
    pub stop_on_unmount: bool,
    /// Called with the opened store before the daemon listens (the failover agent's start).
    pub on_site: Option<OnSite>,
}

/// A hook called with the opened store.
pub type OnSite = Box<dyn FnOnce(&Arc<Site>) -> Result<()>>;

/// Runs the replica daemon in the foreground until SIGTERM or SIGINT; `ready` is called once
/// it listens (and its mount is live).
/// The file under the store's `.ferry/` where the running daemon records its pid and socket
/// buffers for `ferry status --config`.
pub const DAEMON_FACTS: &str = "daemon.json";

pub fn run(mut opts: Options, ready: Option<Box<dyn FnOnce()>>) -> Result<()> {
    let site = Arc::new(Site::open(&opts.store, opts.params, opts.keep)?);
    if let Some(f) = opts.on_site.take() {
        f(&site)?;
    }
    let mount = match &opts.mount {
        Some(mnt) => Some(mount(&site, mnt, opts.stop_on_unmount)?),
        None => None,
    };
    // Beside VMs on the same host the replica's work yields the CPU to them; its I/O keeps its
    // class, as a commit's writes and fsyncs are the replication lag.
    let threads = Threads {
        count: 4,
        name: "ferry-replica",
        on_start: crate::priority::background_cpu,
    };
    let node = Node::server(&opts.identity, &opts.primaries, opts.listen, threads)?;
    let root = site.root().display().to_string();
    if let Some(every) = opts.scrub_interval {
        let site = site.clone();
        std::thread::Builder::new()
            .name("ferry-scrub".into())
            .spawn(move || {
                crate::priority::background();
                loop {
                    std::thread::sleep(every);
                    for (name, store) in site.stores() {
                        log::info!("scheduled deep verify of namespace {name} (scrub_interval)");
                        if let Err(e) = super::scrub::scrub(&store, true) {
                            log::error!("scheduled deep verify of namespace {name} failed: {e:#}");
                        }
                    }
                }
            })?;
    }
    if let Some(addr) = opts.metrics {
        crate::metrics::serve(addr, super::metrics::registry(&site), "replica");
    }
    log::info!(
        "replica listening on {} (fingerprint {}), store {root}, {} pinned primaries, \
         namespaces {:?}",
        node.endpoint().local_addr()?,
        opts.identity.fingerprint(),
        opts.primaries.len(),
        site.names()
    );
    // What `ferry status --config` shows beside the store's own state: this daemon's socket
    // buffers, when the kernel capped them (the receiving end is where datagrams drop).
    let facts = serde_json::json!({
        "pid": std::process::id(),
        "udp_buffer_capped": crate::net::transport::capped_buffer(),
    });
    if let Err(e) = crate::durable::write_atomic(
        &site.root().join(META_DIR).join(DAEMON_FACTS),
        &serde_json::to_vec(&facts)?,
    ) {
        log::warn!("cannot record this daemon's facts for ferry status: {e}");
    }
    if let Some(ready) = ready {
        ready();
    }
    // systemd (Type=notify): ready once the store is replayed and the endpoint listens.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("cannot tell systemd the replica is ready: {e}");
    }
    let r = node.block_on(serve(site, node.endpoint().clone()));
    if let Some(m) = mount {
        m.unmount();
    }
    r
}

/// The replica mount being served.
struct Served {
    mnt: PathBuf,
    unmounter: fuser::SessionUnmounter,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Served {
    fn unmount(mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.unmounter.unmount() {
            log::warn!(
                "cannot unmount the replica mount {}: {e}",
                self.mnt.display()
            );
        }
        // Files still open on it keep the session: detach it (they read on until closed,
        // then the kernel ends the session), and wait only a little for that.
        if let Ok(c) = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let t = std::time::Instant::now();
        while !self.thread.is_finished() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        log::info!("replica mount {} unmounted", self.mnt.display());
    }
}

/// Serves the read-only replica mount at `mnt`: a directory per namespace.
fn mount(site: &Arc<Site>, mnt: &std::path::Path, stop_on_unmount: bool) -> Result<Served> {
    use fuser::{MountOption, SessionACL};
    clear_dead_mount(mnt);
    let mnt = mnt.canonicalize().with_context(|| {
        format!(
            "replica mountpoint {} not found: create it first",
            mnt.display()
        )
    })?;
    site.serve_mount();
    let fs = super::fuse::ReplicaFuse::new(site.clone());
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(site.root().display().to_string()),
        MountOption::Subtype("ferry".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Hypervisors run QEMU as another user; the kernel checks each caller against the
    // images' modes.
    cfg.acl = SessionACL::All;
    // Virtio queues keep up to 32 and more reads in flight: each worker thread has its own
    // /dev/fuse descriptor, so they are answered in parallel.
    cfg.n_threads = Some(8);
    cfg.clone_fd = true;
    let mut session = fuser::Session::new(fs, &mnt, &cfg)
        .with_context(|| format!("cannot mount the replica on {}", mnt.display()))?;
    let unmounter = session.unmount_callable();
    let background = session.spawn().context("cannot start the replica mount")?;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread = {
        let (stopping, mnt) = (stopping.clone(), mnt.clone());
        std::thread::Builder::new()
            .name("replica-mount".into())
            .spawn(move || {
                if let Err(e) = background.join() {
                    log::error!("replica mount {}: {e}", mnt.display());
                }
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if stop_on_unmount {
                    log::info!("replica mount {} unmounted: stopping", mnt.display());
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                } else {
                    log::warn!(
                        "replica mount {} was unmounted; the daemon goes on receiving \
                         (restart it to serve the mount again)",
                        mnt.display()
                    );
                }
            })?
    };
    log::info!(
        "replica mount {} serves namespaces {:?} (read-only; restore points under \
         NAME/.ferry/generations)",
        mnt.display(),
        site.names()
    );
    Ok(Served {
        mnt,
        unmounter,
        stopping,
        thread,
    })
}

async fn serve(site: Arc<Site>, ep: quinn::Endpoint) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let open = Arc::new(Open::default());
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                let site = site.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(incoming, site, &open).await {
                        log::warn!("session with {remote} ended: {e:#}");
                    }
                });
            }
            _ = term.recv() => {
                log::info!("SIGTERM: stopping");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                log::info!("SIGINT: stopping");
                break;
            }
        }
    }
    // Closing tells every primary at once; draining a connection to a primary that cannot
    // be reached (its site is down: the reason to promote) would take three backed-off probe
    // timeouts, seconds, while this daemon holds the store's lock.
    ep.close(0u32.into(), b"replica stopping");
    let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    Ok(())
}

async fn connection(incoming: quinn::Incoming, site: Arc<Site>, open: &Open) -> Result<()> {
    let remote = incoming.remote_address();
    let conn = incoming
        .await
        .with_context(|| format!("handshake with {remote} refused"))?;
    let fp = transport::fingerprint(&conn)?;
    let Some(_counted) = open.enter(fp) else {
        let why = format!(
            "primary {fp} already has {CONNECTIONS_PER_PRIMARY} connections open to this replica"
        );
        conn.close(1u32.into(), why.as_bytes());
        anyhow::bail!("{why} ({remote} refused)");
    };
    log::info!("primary {fp} connected from {remote}");
    // A primary keeps its connection from one sync point to the next (`net::pool`): each
    // session is a control stream of its own, one after the other. The first must come at
    // once; later ones whenever the next sync point is (keep-alives hold the connection).
    let mut sessions = 0u64;
    let ended = loop {
        let next = conn.accept_bi();
        let stream = if sessions == 0 {
            tokio::time::timeout(HELLO_WITHIN, next)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "primary {fp} opened no stream within {} s",
                        HELLO_WITHIN.as_secs()
                    )
                })?
                .context("no control stream")?
        } else {
            match next.await {
                Ok(stream) => stream,
                // The primary closed the connection, or it timed out: nothing was under way.
                Err(_) => break Ok(()),
            }
        };
        sessions += 1;
        match session(&conn, stream, &site, fp, remote).await {
            Ok(Ended::Finished) => continue,
            Ok(Ended::Closed) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    conn.close(0u32.into(), b"session over");
    log::info!("primary {fp} disconnected after {sessions} session(s)");
    crate::heap::give_back();
    ended
}

/// How a session ended: the primary finished its control stream after it (the connection
/// serves the next one), or the session was refused, broken or lost (the connection closes).
enum Ended {
    Finished,
    Closed,
}

/// One session: the primary's Hello on the control stream `(send, recv)`, then the frames of
/// one generation on the control stream and the connection's data streams.
async fn session(
    conn: &quinn::Connection,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    site: &Site,
    fp: Fingerprint,
    remote: std::net::SocketAddr,
) -> Result<Ended> {
    // The first frame names the primary, hence its namespace: the only store this session
    // can reach. A peer that connects and says nothing is not waited for.
    let first = tokio::time::timeout(HELLO_WITHIN, read_frame(&mut recv))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "primary {fp} sent no Hello within {} s",
                HELLO_WITHIN.as_secs()
            )
        })??;
    let fingerprint = fp.to_string();
    let data_limit = match &first {
        Some(Frame::Hello { params, .. }) => crate::wire::frame::data_frame_limit(params),
        _ => crate::wire::MAX_FRAME,
    };
    let claimed = match &first {
        Some(Frame::Hello {
            node,
            namespace,
            epoch,
            takeover,
            ..
        }) => {
            let caller = Caller {
                namespace,
                node,
                fingerprint: &fingerprint,
                epoch: *epoch,
                takeover: takeover.as_ref(),
            };
            tokio::task::block_in_place(|| site.claim(&caller))
        }
        // A node about to be promoted asks what a namespace holds, and goes.
        Some(Frame::Probe { version, namespace }) => {
            let answer = if *version == VERSION {
                tokio::task::block_in_place(|| site.probe(namespace))
            } else {
                Refusal::new(
                    RefuseCode::Version,
                    format!("protocol version {version} is not supported (this replica speaks {VERSION})"),
                )
                .frame()
            };
            let _ = write_frame(&mut send, &answer).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            return Ok(Ended::Closed);
        }
        _ => Err(Refusal::new(RefuseCode::Protocol, "expected Hello first")),
    };
    let store = match claimed {
        Ok(store) => store,
        Err(r) => {
            log::warn!("primary {fp} from {remote} refused: {r}");
            let _ = write_frame(&mut send, &r.frame()).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            return Ok(Ended::Closed);
        }
    };
    let session = Arc::new(parking_lot::Mutex::new(ReplicaSession::default()));
    // Answers wait here for the control stream. Bounded: a primary that never reads its
    // answers stops having its frames read (QUIC's flow control then stops it), instead of
    // making this daemon queue them (tests/hostile.rs).
    let (tx, mut rx) = mpsc::channel::<Frame>(ANSWERS_QUEUED);
    // Set when the session refuses: every reader stops.
    let closed = Arc::new(tokio::sync::Notify::new());

    // Replies go out in order on the control stream. A refusal is the last frame: the stream
    // is finished and the refusal delivered before the connection may close.
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let refuse = matches!(f, Frame::Refuse { .. });
            if write_frame(&mut send, &f).await.is_err() {
                break;
            }
            if refuse {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
                break;
            }
        }
    });

    // Frames are handled under the store's and the session's locks, and their answers queued
    // under the session's alone: answers leave in the order the session produced them, and a
    // primary that does not read its answers holds up its own session, never the store.
    let busy = Arc::new(Busy::default());
    let handle = {
        let store = store.clone();
        let session = session.clone();
        let closed = closed.clone();
        let busy = busy.clone();
        // Blocks (the store's lock, disk writes): called on a blocking thread.
        move |f: Checked, tx: &mpsc::Sender<Frame>| -> bool {
            let mut s = session.lock();
            let mut committed = false;
            // A failpoint's error here is a connection lost (the session ends).
            let lost = |s: &mut ReplicaSession| {
                s.close();
                closed.notify_one();
                false
            };
            if crate::fault::point("replica.frame.recv").is_err() {
                return lost(&mut s);
            }
            let answers = s.handle_checked(&mut *store.lock(), f);
            for mut f in answers {
                let ack = matches!(f, Frame::Ack { .. });
                committed |= ack;
                if let Frame::Ack { busy_pct, .. } = &mut f {
                    *busy_pct = busy.take_pct();
                }
                if ack && crate::fault::point("replica.ack.send").is_err() {
                    return lost(&mut s);
                }
                let _ = tx.blocking_send(f);
            }
            let ended = s.is_closed();
            if committed {
                // The acknowledgement is on its way: now the apply and the images' fsync, off
                // the lag, and without the session's lock (seconds for a large generation):
                // the session's task, which takes it for a moment when the primary finishes
                // the session, goes on to the next session, which waits for the store's lock.
                // If they fail, the session ends: the next one finds the store settling again
                // first, and is refused with the cause if it still fails.
                drop(s);
                if let Err(e) = store.lock().settle() {
                    log::error!("{e:#}");
                    return lost(&mut session.lock());
                }
                crate::heap::give_back_soon();
            }
            if ended {
                closed.notify_one();
                return false;
            }
            true
        }
    };
    // A broken frame ends the session: refused, and the connection closed after it.
    let refuse = {
        let session = session.clone();
        let closed = closed.clone();
        move |tx: &mpsc::Sender<Frame>, reason: String| {
            // Called on the runtime: the session's lock may be held by a frame's staging.
            let mut s = tokio::task::block_in_place(|| session.lock());
            if !s.is_closed() {
                log::warn!("primary {fp}: session refused: {reason}");
                s.close();
                // A peer that reads nothing gets no refusal: the connection closes anyway.
                let _ = tx.try_send(Refusal::new(RefuseCode::Protocol, reason).frame());
                closed.notify_one();
            }
        }
    };

    // Data streams: every frame goes to the same session. Once it is closed, they are
    // stopped, so the primary stops sending and reads the refusal.
    let max_chunk = tokio::task::block_in_place(|| store.lock().params().max_size as usize);
    let data = {
        let conn = conn.clone();
        let tx = tx.clone();
        let handle = handle.clone();
        let refuse = refuse.clone();
        let store = store.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            while let Ok(uni) = conn.accept_uni().await {
                let tx = tx.clone();
                let handle = handle.clone();
                let refuse = refuse.clone();
                let store = store.clone();
                let busy = busy.clone();
                tokio::spawn(async move {
                    // The stream's frames are read in batches (all that have arrived) and
                    // checked and staged on one blocking thread of its own, fed by a short
                    // queue (a `block_in_place` per frame handed the runtime's worker to
                    // another thread each time).
                    let (batches, mut queued) = mpsc::channel::<Vec<Frame>>(STREAM_QUEUED);
                    let answers = tx.clone();
                    let worker = tokio::task::spawn_blocking(move || {
                        let mut since = Instant::now();
                        while let Some(batch) = queued.blocking_recv() {
                            let waited = since.elapsed();
                            let t = Instant::now();
                            let go_on = batch
                                .into_iter()
                                .all(|f| handle(check(&store, max_chunk, f), &answers));
                            busy.add(t.elapsed(), waited);
                            if !go_on {
                                break;
                            }
                            since = Instant::now();
                        }
                    });
                    let mut uni = transport::FrameBatches::new(uni, data_limit);
                    loop {
                        match uni.next().await {
                            Ok(Some(batch)) => {
                                if batches.send(batch).await.is_err() {
                                    // The session ended.
                                    uni.stop();
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                refuse(&tx, format!("bad data frame: {e:#}"));
                                uni.stop();
                                break;
                            }
                        }
                    }
                    drop(batches);
                    let _ = worker.await;
                });
            }
        })
    };

    let welcomed = first
        .is_none_or(|hello| tokio::task::block_in_place(|| handle(Checked::unchecked(hello), &tx)));
    let ended = if !welcomed {
        Ok(Ended::Closed)
    } else {
        loop {
            tokio::select! {
                r = read_frame(&mut recv) => match r {
                    Ok(Some(Frame::Scrub { repair })) if ready(&session) => {
                        let _ = tx.send(scrub(store.clone(), repair, &fp).await).await;
                    }
                    Ok(Some(f)) => {
                        if matches!(f, Frame::Begin { .. }) {
                            busy.take_pct();
                        }
                        // Data frames come here too, behind a plan sent ahead of the wants:
                        // checked off the session's lock, as on a data stream.
                        let go_on = tokio::task::block_in_place(|| {
                            handle(check(&store, max_chunk, f), &tx)
                        });
                        if !go_on {
                            break Ok(Ended::Closed);
                        }
                    }
                    // The primary is done with this session (it finishes the stream only after
                    // an acknowledgement); one that stopped midway left the session open, and is
                    // not given another on this connection.
                    Ok(None) if ready(&session) => break Ok(Ended::Finished),
                    Ok(None) => break Ok(Ended::Closed),
                    Err(e) => {
                        refuse(&tx, format!("bad control frame: {e:#}"));
                        break Err(e);
                    }
                },
                _ = closed.notified() => break Ok(Ended::Closed),
            }
        }
    };
    // The next session's data streams are accepted by its own reader: this one is gone
    // first. The answers still queued go out; the writer ends with the last sender.
    data.abort();
    let _ = data.await;
    drop(tx);
    let _ = writer.await;
    ended
}

/// How busy a connection's data-stream readers are: the time they spent checking and staging
/// frames against the time they waited for them, since the last generation began
/// (`Frame::Ack`'s `busy_pct`). Near 100%, this replica, not the link or the primary, sets the
/// pace of the primary's syncs, and its status says so.
#[derive(Default)]
struct Busy {
    busy_ns: AtomicU64,
    wait_ns: AtomicU64,
}

impl Busy {
    fn add(&self, busy: Duration, waited: Duration) {
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        self.wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The share of the readers' time spent busy since the last call, in percent (0 when
    /// nothing was read); starts over.
    fn take_pct(&self) -> u8 {
        let busy = self.busy_ns.swap(0, Ordering::Relaxed);
        let wait = self.wait_ns.swap(0, Ordering::Relaxed);
        (busy as u128 * 100)
            .checked_div(busy as u128 + wait as u128)
            .unwrap_or(0) as u8
    }
}

/// Whether the session is between generations (nothing staged and not committed), asked on
/// the runtime: its lock may be held by a frame's staging, and a runtime thread that blocks on
/// it could be the one that polls the sockets, so every connection of this daemon would fall
/// silent, acknowledgements and keep-alives included, and its primaries take it for gone.
fn ready(session: &parking_lot::Mutex<ReplicaSession>) -> bool {
    tokio::task::block_in_place(|| session.lock().is_ready())
}

/// A data frame's costly check, done on the thread that read it and without the store's lock
/// (but for a moment, to learn what a patch is laid over): chunks decompressed and hashed,
/// patches checked against the committed bytes. The session stages what passed.
fn check(store: &SharedStore, max_chunk: usize, f: Frame) -> Checked {
    match &f {
        Frame::Chunk { .. } => Checked::chunk(f, max_chunk),
        Frame::Patch {
            hash,
            path,
            offset,
            len,
            ranges,
            ..
        } => {
            let base = store.lock().patch_base(path, *offset, *len);
            match base {
                Some(b) if b.makes(hash, ranges).unwrap_or(false) => {
                    Checked::patch(f, b.generation)
                }
                _ => Checked::unchecked(f),
            }
        }
        _ => Checked::unchecked(f),
    }
}

/// Runs a deep verify asked by primary `fp` (its session waits; commits go on) and answers it.
async fn scrub(store: SharedStore, repair: bool, fp: &Fingerprint) -> Frame {
    log::info!(
        "primary {fp} asked for a deep verify{}",
        if repair { " with repair" } else { "" }
    );
    let done = tokio::task::spawn_blocking(move || super::scrub::scrub(&store, repair)).await;
    match done.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(report) => Frame::Scrubbed { report },
        Err(e) => Refusal::new(RefuseCode::Store, format!("deep verify failed: {e:#}")).frame(),
    }
}

/// A replica mount left by a daemon that was killed answers ENOTCONN: detach it, so that the
/// restarted daemon can mount there again.
fn clear_dead_mount(mnt: &std::path::Path) {
    if let Err(e) = std::fs::metadata(mnt)
        && e.raw_os_error() == Some(libc::ENOTCONN)
        && let Ok(c) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes())
    {
        log::warn!(
            "{}: a dead replica mount is left from a stopped daemon; detaching it",
            mnt.display()
        );
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
