//! Shipping one generation to one replica over QUIC: the transport around a
//! [`PrimarySession`]. Control frames go on one bidirectional stream; data frames are produced
//! on worker threads (read, verify, compress) and sent on several unidirectional streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::anyhow;

use super::bucket::{Bucket, pace};
use crate::net::transport::{ConnectError, connect, read_frame, refused_by_tls, write_frame};
use crate::wire::frame::Frame;
use crate::wire::primary::{Acked, ChunkSource, Job, Out, PrimarySession, make_frame};

/// Data streams per connection.
pub const STREAMS: usize = 4;

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
}

impl ShipStats {
    /// Adds another attempt's figures to these.
    pub fn add(&self, o: &ShipStats) {
        for (a, b) in [
            (&self.bytes_sent, &o.bytes_sent),
            (&self.chunks_sent, &o.chunks_sent),
            (&self.patches_sent, &o.patches_sent),
            (&self.wire_bytes, &o.wire_bytes),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

type Session = Arc<parking_lot::Mutex<PrimarySession>>;

/// Why a shipment failed.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// No connection could be made: worth retrying for a while.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
    /// The connection was lost: worth retrying.
    #[error("{0:#}")]
    Transport(anyhow::Error),
    /// The replica refused or the session broke its rules: retrying would not help.
    #[error("{0}")]
    Session(String),
}

/// Runs a session to completion against the replica at `addr`.
pub async fn ship(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    session: PrimarySession,
    hello: Frame,
    src: Arc<dyn ChunkSource + Send + Sync>,
    stats: Arc<ShipStats>,
    buckets: Vec<Arc<Bucket>>,
) -> Result<Acked, ShipError> {
    let conn = connect(ep, addr).await.map_err(|e| match e {
        e @ ConnectError::Trust { .. } => ShipError::Session(e.to_string()),
        e => ShipError::Unreachable(e.into()),
    })?;
    let r = match run(&conn, session, hello, src, &stats, &buckets).await {
        Err(ShipError::Transport(e)) if refused_by_tls(&e) => Err(ShipError::Session(format!(
            "{addr} refused this node's certificate ({e:#}): pin this node's fingerprint \
             (ferry id) in the replica's primaries"
        ))),
        r => r,
    };

    stats
        .wire_bytes
        .fetch_add(conn.stats().udp_tx.bytes, Ordering::Relaxed);
    stats
        .rtt_us
        .store(conn.rtt().as_micros() as u64, Ordering::Relaxed);

    conn.close(0u32.into(), b"done");
    r
}

/// Test hook: `FERRY_FAULT=corrupt-chunk` in the primary's environment flips one byte of the
/// first chunk it sends (after hashing), to prove the replica refuses it.
fn corrupt_once() -> bool {
    static ARMED: std::sync::OnceLock<std::sync::atomic::AtomicBool> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            std::sync::atomic::AtomicBool::new(
                std::env::var("FERRY_FAULT").as_deref() == Ok("corrupt-chunk"),
            )
        })
        .swap(false, Ordering::Relaxed)
}

async fn run(
    conn: &quinn::Connection,
    session: PrimarySession,
    hello: Frame,
    src: Arc<dyn ChunkSource + Send + Sync>,
    stats: &Arc<ShipStats>,
    buckets: &[Arc<Bucket>],
) -> Result<Acked, ShipError> {
    let t = ShipError::Transport;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| t(e.into()))?;
    write_frame(&mut send, &hello).await.map_err(t)?;
    let session: Session = Arc::new(parking_lot::Mutex::new(session));
    loop {
        let f = read_frame(&mut recv)
            .await
            .map_err(t)?
            .ok_or_else(|| t(anyhow!("replica closed the session")))?;
        let outs = session.lock().handle(f);
        for o in outs {
            match o {
                Out::Send(f) => write_frame(&mut send, &f).await.map_err(t)?,
                Out::Jobs => {
                    send_data(conn, &session, &src, stats, buckets).await?;
                    let commit = session.lock().data_sent();
                    if let Some(c) = commit {
                        write_frame(&mut send, &c).await.map_err(t)?;
                    }
                }
                Out::Done(Ok(acked)) => return Ok(acked),
                Out::Done(Err(e)) => return Err(ShipError::Session(e)),
            }
        }
    }
}

/// Sends every pending job on [`STREAMS`] data streams.
async fn send_data(
    conn: &quinn::Connection,
    session: &Session,
    src: &Arc<dyn ChunkSource + Send + Sync>,
    stats: &Arc<ShipStats>,
    buckets: &[Arc<Bucket>],
) -> Result<(), ShipError> {
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut uni = conn
            .open_uni()
            .await
            .map_err(|e| ShipError::Transport(e.into()))?;
        let session = session.clone();
        let src = src.clone();
        let stats = stats.clone();
        let buckets = buckets.to_vec();
        tasks.push(tokio::spawn(async move {
            loop {
                let job = session.lock().next_job();
                let Some(job) = job else { break };
                let src = src.clone();
                let is_patch = matches!(job, Job::Patch { .. });
                let (mut frame, n) = tokio::task::spawn_blocking(move || make_frame(&job, &*src))
                    .await
                    .map_err(|e| ShipError::Session(e.to_string()))?
                    .map_err(ShipError::Session)?;
                if let Frame::Chunk { data, .. } = &mut frame
                    && !data.is_empty()
                    && corrupt_once()
                {
                    log::warn!("FERRY_FAULT: corrupting a chunk on purpose");
                    data[0] ^= 0xFF;
                }
                let refs: Vec<&Bucket> = buckets.iter().map(|b| &**b).collect();
                pace(&refs, n).await;
                write_frame(&mut uni, &frame)
                    .await
                    .map_err(ShipError::Transport)?;

                stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
                let counter = if is_patch {
                    &stats.patches_sent
                } else {
                    &stats.chunks_sent
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            uni.finish().map_err(|e| ShipError::Transport(e.into()))?;
            Ok::<(), ShipError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| ShipError::Session(e.to_string()))??;
    }
    Ok(())
}

/// Checks that a peer answers (a full handshake, so its certificate too); its round-trip time.
pub async fn probe(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<std::time::Duration, ShipError> {
    let conn = connect(ep, addr).await.map_err(|e| match e {
        e @ ConnectError::Trust { .. } => ShipError::Session(e.to_string()),
        e => ShipError::Transport(e.into()),
    })?;
    let rtt = conn.rtt();
    conn.close(0u32.into(), b"probe");
    Ok(rtt)
}
