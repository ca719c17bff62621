//! Shipping one generation to one replica over QUIC: the transport around a
//! [`PrimarySession`]. Control frames go on one bidirectional stream; data frames are produced
//! on worker threads (read, verify, compress) and sent on several unidirectional streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::anyhow;

use super::bucket::{Bucket, pace};
use super::link::Cause;
use crate::chunk::ChunkParams;
use crate::manifest::Manifest;
use crate::net::Pool;
use crate::net::pool::Lease;
use crate::net::transport::{ConnectError, connect, read_frame, refused_by_tls, write_frame};
use crate::wire::frame::{Frame, Refusal, encode_to};
use crate::wire::primary::{
    Acked, ChunkSource, Claim, Generation, Job, Out, PeerKnowledge, PrimarySession, group_root,
    make_frame,
};

/// Data streams per connection: as many as a peer accepts at once.
pub const STREAMS: usize = crate::net::tls::DATA_STREAMS as usize;

/// Data frames already made for one generation, shared by its shipments to every replica, so
/// a fan-out reads, verifies and compresses each chunk, and reads each patch's ranges, once:
/// the first shipment to want a frame makes it, the others wait for it (frames are known by
/// [`Job::frame_key`]). Bounded: a frame pushed out (the oldest first) is made again if
/// another replica still wants it.
pub struct FrameCache {
    limit: u64,
    inner: parking_lot::Mutex<CacheInner>,
}

type Made = Arc<(Frame, u64)>;

#[derive(Default)]
struct CacheInner {
    frames: std::collections::HashMap<[u8; 32], Arc<std::sync::OnceLock<Result<Made, String>>>>,
    order: std::collections::VecDeque<([u8; 32], u64)>,
    bytes: u64,
}

impl FrameCache {
    /// A cache of at most `limit` bytes of frame payload.
    pub fn new(limit: u64) -> Arc<FrameCache> {
        Arc::new(FrameCache {
            limit,
            inner: Default::default(),
        })
    }

    /// The frame known by `key`, made by `make` unless another shipment made it (or is making
    /// it: this blocks until it is made). The flag says whether it was reused. A frame that
    /// could not be made is not kept: the next to want it tries again.
    fn get_or_make(
        &self,
        key: [u8; 32],
        make: impl FnOnce() -> Result<(Frame, u64), String>,
    ) -> Result<(Made, bool), String> {
        let cell = self.inner.lock().frames.entry(key).or_default().clone();
        let mut make = Some(make);
        let mut made_here = false;
        let got = cell
            .get_or_init(|| {
                made_here = true;
                (make.take().expect("made once"))().map(Arc::new)
            })
            .clone();
        let made = match got {
            Ok(made) => made,
            Err(e) => {
                let mut c = self.inner.lock();
                if c.frames.get(&key).is_some_and(|k| Arc::ptr_eq(k, &cell)) {
                    c.frames.remove(&key);
                }
                drop(c);
                return match make.take() {
                    Some(make) => make().map(|f| (Arc::new(f), false)),
                    None => Err(e),
                };
            }
        };
        if made_here {
            let mut c = self.inner.lock();
            c.bytes += made.1;
            c.order.push_back((key, made.1));
            while c.bytes > self.limit {
                let Some((old, n)) = c.order.pop_front() else {
                    break;
                };
                c.frames.remove(&old);
                c.bytes -= n;
            }
        }
        Ok((made, !made_here))
    }
}

/// What a shipment cost.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Payload bytes of chunks and patches (after compression).
    pub bytes_sent: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub patches_sent: AtomicU64,
    /// UDP bytes the connection sent, all overhead included.
    pub wire_bytes: AtomicU64,
    /// The connection's round-trip time estimate at the end, in microseconds.
    pub rtt_us: AtomicU64,
    /// UDP datagrams the connection sent, and how many of them QUIC declared lost: a lossy
    /// link, not ferry, is then what slows the sync, and status says so.
    pub packets_sent: AtomicU64,
    pub packets_lost: AtomicU64,
    /// Bytes of image the replica asked for, and how many of them were sent (for progress).
    pub planned_bytes: AtomicU64,
    pub done_bytes: AtomicU64,
    /// Data frames (chunks and patches) taken from the [`FrameCache`] (made for another
    /// replica) instead of read, verified and compressed again.
    pub chunks_reused: AtomicU64,
    /// Chunks of the generation's new content the replica already held (not sent): what
    /// content addressing saved.
    pub chunks_held: AtomicU64,
    /// Connections made: none when the session ran on the one kept from the last sync point.
    pub connections: AtomicU64,
    /// Sessions planned ahead of the replica's `Welcome`, on the state the last session on the
    /// same connection left it in, that were acknowledged: one round trip less each.
    pub planned_ahead: AtomicU64,
}

impl ShipStats {
    /// Adds another attempt's figures to these.
    pub fn add(&self, o: &ShipStats) {
        for (a, b) in [
            (&self.bytes_sent, &o.bytes_sent),
            (&self.chunks_sent, &o.chunks_sent),
            (&self.patches_sent, &o.patches_sent),
            (&self.wire_bytes, &o.wire_bytes),
            (&self.packets_sent, &o.packets_sent),
            (&self.packets_lost, &o.packets_lost),
            (&self.planned_bytes, &o.planned_bytes),
            (&self.done_bytes, &o.done_bytes),
            (&self.chunks_reused, &o.chunks_reused),
            (&self.chunks_held, &o.chunks_held),
            (&self.connections, &o.connections),
            (&self.planned_ahead, &o.planned_ahead),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

type Session = Arc<parking_lot::Mutex<PrimarySession>>;

/// Changes a data frame after it was made (tests only: a corrupted chunk proves the replica's
/// check).
pub type Tamper = Arc<dyn Fn(&mut Frame) + Send + Sync>;

/// What one shipment reads from, counts into and is paced by.
#[derive(Clone)]
pub struct Shipment {
    pub src: Arc<dyn ChunkSource + Send + Sync>,
    pub stats: Arc<ShipStats>,
    pub buckets: Vec<Arc<Bucket>>,
    pub tamper: Option<Tamper>,
    /// Chunk frames shared with the other shipments of the same generation.
    pub cache: Option<Arc<FrameCache>>,
}

/// Runs a session to completion against the replica at `addr`, on the connection kept to it
/// (or a new one).
pub async fn ship(
    pool: &Pool,
    addr: SocketAddr,
    session: PrimarySession,
    hello: Frame,
    how: &Shipment,
) -> Result<Acked, Cause> {
    let lease = pool.lease(addr).await.map_err(unreachable)?;
    if !lease.reused {
        how.stats.connections.fetch_add(1, Ordering::Relaxed);
    }
    let before = lease.conn.stats();
    let r = run(&lease, session, hello, how).await;
    count(&lease.conn, &before, &how.stats);
    match r {
        Ok(acked) => {
            if lease.last.is_some() {
                how.stats.planned_ahead.fetch_add(1, Ordering::Relaxed);
            }
            lease.keep(&acked);
            Ok(acked)
        }
        Err(Cause::Trust(m)) => Err(Cause::Trust(format!(
            "{addr} refused this node's certificate ({m}): pin this node's fingerprint (ferry \
             id) in the replica's primaries"
        ))),
        Err(e) => Err(e),
    }
}

/// Adds what the connection sent since `before` to `stats`, and its RTT estimate.
fn count(conn: &quinn::Connection, before: &quinn::ConnectionStats, stats: &ShipStats) {
    let c = conn.stats();
    let add = |a: &AtomicU64, now: u64, then: u64| {
        a.fetch_add(now.saturating_sub(then), Ordering::Relaxed);
    };
    add(&stats.wire_bytes, c.udp_tx.bytes, before.udp_tx.bytes);
    add(
        &stats.packets_sent,
        c.path.sent_packets,
        before.path.sent_packets,
    );
    add(
        &stats.packets_lost,
        c.path.lost_packets,
        before.path.lost_packets,
    );
    stats
        .rtt_us
        .store(conn.rtt().as_micros() as u64, Ordering::Relaxed);
}

/// A lost connection; or a refusal by the TLS layer (the peer refused our certificate after
/// the handshake looked complete: TLS 1.3 checks the client last).
fn lost(e: anyhow::Error) -> Cause {
    if refused_by_tls(&e) {
        Cause::Trust(format!("{e:#}"))
    } else {
        Cause::Lost(format!("{e:#}"))
    }
}

/// One session on the leased connection. On a kept one, the session is planned on the state
/// the last session left the replica in and sent with the `Hello` (the replica's `Welcome`
/// then only confirms it). A session that ends well finishes its control stream: the replica
/// then waits for the next one.
async fn run(
    lease: &Lease<'_>,
    mut session: PrimarySession,
    hello: Frame,
    how: &Shipment,
) -> Result<Acked, Cause> {
    let (conn, reused) = (&lease.conn, lease.reused);
    let mut answered = false;
    let (mut send, mut recv) = heard(conn, reused, async {
        conn.open_bi().await.map_err(|e| lost(e.into()))
    })
    .await?;
    write_frame(&mut send, &hello).await.map_err(lost)?;
    if let Some(last) = &lease.last {
        // Written before the replica's first answer: watched for a replica gone silent, and a
        // stream it stopped (it refused the Hello, or its store is full) yields its reason.
        let ahead = heard(conn, reused, async {
            for f in session.plan_ahead(last) {
                write_frame(&mut send, &f).await.map_err(lost)?;
            }
            // What the path carries in a round trip goes right behind the plan, so the link
            // does not idle while the replica's wants come back.
            let early = session.early_jobs(conn.stats().path.cwnd.min(EARLY_MAX));
            if !early.is_empty() {
                let planned: u64 = early.iter().map(Job::bytes).sum();
                how.stats
                    .planned_bytes
                    .fetch_add(planned, Ordering::Relaxed);
                send_batch(&mut send, early, how).await?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = ahead {
            return Err(refusal_behind(&mut recv, e).await);
        }
    }
    let session: Session = Arc::new(parking_lot::Mutex::new(session));
    let mut held_counted = 0;
    loop {
        let f = heard(conn, reused && !answered, async {
            read_frame(&mut recv).await.map_err(lost)
        })
        .await?
        .ok_or_else(|| lost(anyhow!("replica closed the session")))?;
        answered = true;
        crate::fault::point("sync.frame.recv").map_err(|e| lost(e.into()))?;
        let outs = session.lock().handle(f);
        for o in outs {
            match o {
                Out::Send(f) => write_frame(&mut send, &f).await.map_err(lost)?,
                Out::Jobs => {
                    let (planned, held) = {
                        let s = session.lock();
                        (s.pending_bytes(), s.chunks_held())
                    };
                    how.stats
                        .planned_bytes
                        .fetch_add(planned, Ordering::Relaxed);
                    // Counted once (a NeedFull brings more jobs, not more held chunks).
                    how.stats
                        .chunks_held
                        .fetch_add(held - held_counted, Ordering::Relaxed);
                    held_counted = held;
                    // Nothing left when everything wanted went ahead of the wants.
                    if planned > 0
                        && let Err(e) = send_data(conn, &session, how).await
                    {
                        return Err(refusal_behind(&mut recv, e).await);
                    }
                    let commit = session.lock().data_sent();
                    if let Some(c) = commit {
                        write_frame(&mut send, &c).await.map_err(lost)?;
                    }
                }
                Out::Done(Ok(acked)) => {
                    send.finish().map_err(|e| lost(e.into()))?;
                    return Ok(acked);
                }
                Out::Done(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// `step` (opening the session's control stream, waiting for the replica's first answer),
/// and, when `check`ed (the connection was kept from an earlier session and the replica has
/// not answered on it yet), whether the replica is there at all. One that went away without a
/// word (its host lost power; its daemon killed and not started again) leaves the connection
/// looking open until the idle timeout, 30 s: when nothing at all comes back from it within
/// a moment, not even an acknowledgement or a keep-alive, the connection is taken for lost
/// (the next attempt connects anew, and learns within seconds whether the replica is there).
/// A replica that answers at the transport level is waited for: it may be busy making the
/// last generation durable.
async fn heard<T>(
    conn: &quinn::Connection,
    check: bool,
    step: impl std::future::Future<Output = Result<T, Cause>>,
) -> Result<T, Cause> {
    if !check {
        return step.await;
    }
    let before = conn.stats().udp_rx.datagrams;
    let within = conn.rtt() * 3 + 2 * crate::net::tls::KEEP_ALIVE;
    let mut step = std::pin::pin!(step);
    match tokio::time::timeout(within, &mut step).await {
        Ok(r) => r,
        Err(_) if conn.stats().udp_rx.datagrams > before => step.await,
        Err(_) => Err(Cause::Lost(format!(
            "nothing came back on the kept connection within {} ms",
            within.as_millis()
        ))),
    }
}

/// A replica that refuses mid-transfer (a full disk, a corrupt chunk) stops reading the data
/// streams and says why on the control stream: that reason, if it comes within a moment, is
/// the cause, not the stopped stream.
async fn refusal_behind(recv: &mut quinn::RecvStream, e: Cause) -> Cause {
    if !matches!(e, Cause::Lost(_)) {
        return e;
    }
    // Frames the replica queued before its refusal (answers to earlier frames) come first.
    let refusal = async {
        loop {
            match read_frame(recv).await {
                Ok(Some(Frame::Refuse { code, reason })) => return Some(Refusal { code, reason }),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), refusal).await {
        Ok(Some(r)) => Cause::Refused(r),
        _ => e,
    }
}

/// Most image bytes sent ahead of the replica's wants, behind a plan made ahead (the path's
/// window, up to this: the replica reads those frames one by one on the control stream).
const EARLY_MAX: u64 = 4 << 20;

/// Most image bytes, and most jobs, one stream takes from the session at a time. Scattered
/// writes make thousands of 4 KiB patches per sync; handing each to a blocking thread of its
/// own and back cost about 90 us a patch on an idle machine (the CPUs 70% idle), so a stream
/// makes a batch of frames in one blocking call, then sends them.
const BATCH_BYTES: u64 = 1 << 20;
const BATCH_JOBS: usize = 256;
/// A data frame's bytes beyond its payload, about: its length, kind, hash, flags, and for a
/// patch its path and each range's offset.
const FRAME_ROOM: usize = 128;

/// Sends every pending job on [`STREAMS`] data streams.
async fn send_data(
    conn: &quinn::Connection,
    session: &Session,
    how: &Shipment,
) -> Result<(), Cause> {
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut uni = conn.open_uni().await.map_err(|e| lost(e.into()))?;
        let session = session.clone();
        let how = how.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let jobs = next_batch(&session);
                if jobs.is_empty() {
                    break;
                }
                send_batch(&mut uni, jobs, &how).await?;
            }
            uni.finish().map_err(|e| lost(e.into()))?;
            Ok::<(), Cause>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| Cause::Local(e.to_string()))??;
    }
    Ok(())
}

/// Makes the frames of `jobs` and sends them on `stream` in one write (the replica reads what
/// has arrived at once), paced by the shipment's buckets, and counts them.
async fn send_batch(
    stream: &mut quinn::SendStream,
    jobs: Vec<Job>,
    how: &Shipment,
) -> Result<(), Cause> {
    let made = make_frames(jobs, how).await?;
    // Room for the whole batch at once: grown by doubling, the buffer was copied and faulted
    // in again about as many bytes as it holds.
    let room = made.iter().map(|(_, m)| m.1 as usize + FRAME_ROOM).sum();
    let mut bytes = Vec::with_capacity(room);
    let mut payload = 0;
    for (_, made) in &made {
        let (frame, n) = &**made;
        payload += n;
        match &how.tamper {
            Some(tamper) => {
                let mut frame = frame.clone();
                tamper(&mut frame);
                encode_to(&frame, &mut bytes);
            }
            None => encode_to(frame, &mut bytes),
        }
        crate::fault::point("sync.frame.send").map_err(|e| lost(e.into()))?;
    }
    let refs: Vec<&Bucket> = how.buckets.iter().map(|b| &**b).collect();
    pace(&refs, payload).await;
    stream
        .write_all(&bytes)
        .await
        .map_err(|e| lost(anyhow::Error::from(e).context("sending a frame")))?;

    let stats = &how.stats;
    stats.bytes_sent.fetch_add(payload, Ordering::Relaxed);
    for (job, _) in &made {
        stats.done_bytes.fetch_add(job.bytes(), Ordering::Relaxed);
        let counter = if matches!(job, Job::Patch { .. }) {
            &stats.patches_sent
        } else {
            &stats.chunks_sent
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The next jobs for one stream: up to [`BATCH_JOBS`] of them, or [`BATCH_BYTES`] of image.
fn next_batch(session: &Session) -> Vec<Job> {
    let mut s = session.lock();
    let (mut jobs, mut bytes) = (Vec::new(), 0);
    while jobs.len() < BATCH_JOBS && bytes < BATCH_BYTES {
        let Some(job) = s.next_job() else { break };
        bytes += job.bytes();
        jobs.push(job);
    }
    jobs
}

/// The frames of `jobs`, in order, made on one blocking thread; in a fan-out (a shared cache)
/// each is taken from the cache, made once for all the replicas.
async fn make_frames(jobs: Vec<Job>, how: &Shipment) -> Result<Vec<(Job, Made)>, Cause> {
    let (src, cache) = (how.src.clone(), how.cache.clone());
    let (out, reused) = tokio::task::spawn_blocking(move || {
        let mut reused = 0;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let made = match &cache {
                Some(cache) => {
                    let (made, again) =
                        cache.get_or_make(job.frame_key(), || make_frame(&job, &*src))?;
                    reused += again as u64;
                    made
                }
                None => Arc::new(make_frame(&job, &*src)?),
            };
            out.push((job, made));
        }
        Ok::<_, String>((out, reused))
    })
    .await
    .map_err(|e| Cause::Local(e.to_string()))?
    .map_err(Cause::Local)?;
    how.stats.chunks_reused.fetch_add(reused, Ordering::Relaxed);
    Ok(out)
}

/// Why there is no connection.
fn unreachable(e: ConnectError) -> Cause {
    match e {
        e @ ConnectError::Trust { .. } => Cause::Trust(e.to_string()),
        e => Cause::Unreachable(e.to_string()),
    }
}

/// A new connection to the peer at `addr`, or why there is none.
async fn reach(ep: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection, Cause> {
    connect(ep, addr).await.map_err(unreachable)
}

/// Checks that a peer answers (a full handshake, so its certificate too); its round-trip time.
pub async fn probe(ep: &quinn::Endpoint, addr: SocketAddr) -> Result<std::time::Duration, Cause> {
    let conn = reach(ep, addr).await?;
    let rtt = conn.rtt();
    conn.close(0u32.into(), b"probe");
    Ok(rtt)
}

/// What a replica said it holds and, when a deep verify was asked, the report of it.
pub struct Checked {
    pub generation: u64,
    pub images: Vec<crate::wire::frame::ImageState>,
    /// The replica's manifest of each image it shares with `known` (those whose roots differ
    /// rebuilt by Merkle descent).
    pub manifests: BTreeMap<String, Arc<Manifest>>,
    /// The replica's deep-verify report.
    pub scrub: Option<crate::wire::scrub::Report>,
}

/// Asks the replica at `addr` what it holds, and finds where it differs from `known` (the
/// manifests of generation `expected`, which this primary last saw it commit) by descending
/// the Merkle trees of the images whose roots differ, as a shipping session finds an unknown
/// base, but ships nothing. With `scrub`, the replica then re-hashes its store (repairing when
/// `scrub` is `Some(true)`): no deadline but the connection's idle timeout.
pub async fn check(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    (claim, params): (&Claim, ChunkParams),
    (expected, known): (u64, &BTreeMap<String, Arc<Manifest>>),
    scrub: Option<bool>,
) -> Result<Checked, Cause> {
    let g = Arc::new(Generation {
        number: expected,
        group_root: group_root(known),
        images: known.clone(),
    });
    let (mut session, hello) = PrimarySession::new(claim, params, g, PeerKnowledge::default());
    let conn = reach(ep, addr).await?;
    let r = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.into()))?;
        write_frame(&mut send, &hello).await.map_err(lost)?;
        let mut next = async || match read_frame(&mut recv).await.map_err(lost)? {
            Some(Frame::Refuse { code, reason }) => Err(Cause::Refused(Refusal { code, reason })),
            Some(f) => Ok(f),
            None => Err(lost(anyhow!("replica closed the session"))),
        };
        let mut held = None;
        // Until the session has every base and would begin a generation.
        'descent: loop {
            let f = next().await?;
            if let Frame::Welcome {
                generation, images, ..
            } = &f
            {
                held = Some((*generation, images.clone()));
            }
            for o in session.handle(f) {
                match o {
                    Out::Send(Frame::Begin { .. }) => break 'descent,
                    // The replica holds exactly this generation (every root as known): there
                    // is nothing to descend into.
                    Out::Done(Ok(_)) => break 'descent,
                    Out::Send(f) => write_frame(&mut send, &f).await.map_err(lost)?,
                    Out::Done(Err(e)) => return Err(e.into()),
                    Out::Jobs => {
                        return Err(Cause::Broken(
                            "the replica acknowledged nothing sent".into(),
                        ));
                    }
                }
            }
        }
        let (generation, images) = held.ok_or_else(|| Cause::Broken("no Welcome".into()))?;
        let scrub = match scrub {
            None => None,
            Some(repair) => {
                write_frame(&mut send, &Frame::Scrub { repair })
                    .await
                    .map_err(lost)?;
                match next().await? {
                    Frame::Scrubbed { report } => Some(report),
                    f => {
                        return Err(Cause::Broken(format!(
                            "unexpected {} instead of a deep-verify report",
                            crate::wire::replica::frame_name(&f)
                        )));
                    }
                }
            }
        };
        Ok(Checked {
            generation,
            images,
            manifests: session.bases().clone(),
            scrub,
        })
    }
    .await;
    conn.close(0u32.into(), b"checked");
    r
}
