//! `ferry replica --config FILE`: the replica daemon. It listens for QUIC connections from the
//! pinned primaries and runs a [`ReplicaSession`] per connection against the store: the control
//! stream carries the session's frames both ways, data streams carry chunks and patches.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::Store;
use crate::chunk::ChunkParams;
use crate::net::transport::{self, read_frame, write_frame};
use crate::net::{Fingerprint, Identity, Node, Threads};
use crate::wire::frame::{Frame, Refusal, RefuseCode};
use crate::wire::replica::ReplicaSession;

type SharedStore = Arc<parking_lot::Mutex<Store>>;

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
}

/// Runs the replica daemon in the foreground until SIGTERM or SIGINT.
pub fn run(opts: Options) -> Result<()> {
    let store = Store::open(&opts.store, opts.params)?;
    let threads = Threads {
        count: 4,
        name: "ferry-replica",
        on_start: || {},
    };
    let node = Node::server(&opts.identity, &opts.primaries, opts.listen, threads)?;
    let root = store.root().display().to_string();
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(store));
    if let Some(addr) = opts.metrics {
        crate::metrics::serve(addr, super::metrics::registry(&store), "replica");
    }
    log::info!(
        "replica listening on {} (fingerprint {}), store {root}, {} pinned primaries",
        node.endpoint().local_addr()?,
        opts.identity.fingerprint(),
        opts.primaries.len()
    );
    // systemd (Type=notify): ready once the store is replayed and the endpoint listens.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("cannot tell systemd the replica is ready: {e}");
    }
    node.block_on(serve(store, node.endpoint().clone()))
}

async fn serve(store: SharedStore, ep: quinn::Endpoint) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                let store = store.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(incoming, store).await {
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
    ep.close(0u32.into(), b"replica stopping");
    ep.wait_idle().await;
    Ok(())
}

async fn connection(incoming: quinn::Incoming, store: SharedStore) -> Result<()> {
    let remote = incoming.remote_address();
    let conn = incoming
        .await
        .with_context(|| format!("handshake with {remote} refused"))?;
    let fp = transport::fingerprint(&conn)?;
    log::info!("primary {fp} connected from {remote}");
    let (mut send, mut recv) = conn.accept_bi().await.context("no control stream")?;
    let session = Arc::new(parking_lot::Mutex::new(ReplicaSession::default()));
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
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

    // Frames are handled, and their answers queued, under the session's lock: answers leave
    // in the order the session produced them.
    let handle = {
        let store = store.clone();
        let session = session.clone();
        let closed = closed.clone();
        move |f: Frame, tx: &mpsc::UnboundedSender<Frame>| -> bool {
            tokio::task::block_in_place(|| {
                let mut st = store.lock();
                let mut s = session.lock();
                for f in s.handle(&mut *st, f) {
                    let _ = tx.send(f);
                }
                if s.is_closed() {
                    closed.notify_one();
                    return false;
                }
                true
            })
        }
    };
    let refuse = {
        let session = session.clone();
        move |tx: &mpsc::UnboundedSender<Frame>, reason: String| {
            let mut s = session.lock();
            if !s.is_closed() {
                s.close();
                let _ = tx.send(Refusal::new(RefuseCode::Protocol, reason).frame());
            }
        }
    };

    // Data streams: every frame goes to the same session. Once it is closed, they are
    // stopped, so the primary stops sending and reads the refusal.
    let data = {
        let conn = conn.clone();
        let tx = tx.clone();
        let handle = handle.clone();
        let refuse = refuse.clone();
        tokio::spawn(async move {
            while let Ok(mut uni) = conn.accept_uni().await {
                let tx = tx.clone();
                let handle = handle.clone();
                let refuse = refuse.clone();
                tokio::spawn(async move {
                    loop {
                        match read_frame(&mut uni).await {
                            Ok(Some(f)) => {
                                if !handle(f, &tx) {
                                    let _ = uni.stop(0u32.into());
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                refuse(&tx, format!("bad data frame: {e:#}"));
                                let _ = uni.stop(0u32.into());
                                break;
                            }
                        }
                    }
                });
            }
        })
    };

    let result = loop {
        tokio::select! {
            r = read_frame(&mut recv) => match r {
                Ok(Some(f)) => {
                    if !handle(f, &tx) {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    refuse(&tx, format!("bad control frame: {e:#}"));
                    break Err(e);
                }
            },
            _ = closed.notified() => break Ok(()),
        }
    };
    drop(tx);
    let _ = writer.await;
    data.abort();
    conn.close(0u32.into(), b"session over");
    log::info!("primary {fp} disconnected");
    result
}
