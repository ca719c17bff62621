//! Shipping one generation to one replica over QUIC: the transport around a
//! [`PrimarySession`]. Control frames go on one bidirectional stream; data frames are produced
//! on worker threads (read, verify, compress) and sent on several unidirectional streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, anyhow, bail};

use crate::net::transport::{connect, read_frame, write_frame};
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
}

type Session = Arc<parking_lot::Mutex<PrimarySession>>;

/// Runs a session to completion against the replica at `addr`.
pub async fn ship(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    session: PrimarySession,
    hello: Frame,
    src: Arc<dyn ChunkSource + Send + Sync>,
    stats: Arc<ShipStats>,
) -> Result<Acked> {
    let conn = connect(ep, addr).await?;
    let r = run(&conn, session, hello, src, &stats).await;
    stats
        .wire_bytes
        .fetch_add(conn.stats().udp_tx.bytes, Ordering::Relaxed);
    conn.close(0u32.into(), b"done");
    r
}

async fn run(
    conn: &quinn::Connection,
    session: PrimarySession,
    hello: Frame,
    src: Arc<dyn ChunkSource + Send + Sync>,
    stats: &Arc<ShipStats>,
) -> Result<Acked> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &hello).await?;
    let session: Session = Arc::new(parking_lot::Mutex::new(session));
    loop {
        let f = read_frame(&mut recv)
            .await?
            .ok_or_else(|| anyhow!("replica closed the session"))?;
        let outs = session.lock().handle(f);
        for o in outs {
            match o {
                Out::Send(f) => write_frame(&mut send, &f).await?,
                Out::Jobs => {
                    send_data(conn, &session, &src, stats).await?;
                    let commit = session.lock().data_sent();
                    if let Some(c) = commit {
                        write_frame(&mut send, &c).await?;
                    }
                }
                Out::Done(Ok(acked)) => return Ok(acked),
                Out::Done(Err(e)) => bail!(e),
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
) -> Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..STREAMS {
        let mut uni = conn.open_uni().await?;
        let session = session.clone();
        let src = src.clone();
        let stats = stats.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let job = session.lock().next_job();
                let Some(job) = job else { break };
                let src = src.clone();
                let is_patch = matches!(job, Job::Patch { .. });
                let (frame, n) = tokio::task::spawn_blocking(move || make_frame(&job, &*src))
                    .await?
                    .map_err(|e| anyhow!(e))?;
                write_frame(&mut uni, &frame).await?;
                stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
                let counter = if is_patch {
                    &stats.patches_sent
                } else {
                    &stats.chunks_sent
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            uni.finish()?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
