//! `ferry replica --config FILE`: the replica daemon. It listens for QUIC connections from the
//! pinned primaries and runs a [`ReplicaSession`] per connection against the store: the control
//! stream carries the session's frames both ways, data streams carry chunks and patches.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use tokio::sync::mpsc;

use super::Store;
use crate::config::Config;
use crate::net::transport::{self, read_frame, write_frame};
use crate::net::{Fingerprint, Identity};
use crate::wire::frame::Frame;
use crate::wire::replica::ReplicaSession;

type SharedStore = Arc<parking_lot::Mutex<Store>>;

/// Runs the replica daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let rc = config.replica.clone().ok_or_else(|| {
        anyhow!(
            "{} has no [replica] section: add listen, store and primaries",
            config_path.display()
        )
    })?;
    let id = Identity::load(&config.node.key_dir)?;
    let params = config.chunk_params().map_err(|e| anyhow!("{e}"))?;
    let store = Store::open(&rc.store, params)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(serve(store, id, rc.primaries, rc.listen))
}

async fn serve(
    store: Store,
    id: Identity,
    primaries: Vec<Fingerprint>,
    listen: std::net::SocketAddr,
) -> Result<()> {
    let ep = transport::server(&id, &primaries, listen)?;
    log::info!(
        "replica listening on {} (fingerprint {}), store {}, {} pinned primaries",
        ep.local_addr()?,
        id.fingerprint(),
        store.root().display(),
        primaries.len()
    );
    let store: SharedStore = Arc::new(parking_lot::Mutex::new(store));
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

    // Replies go out in order on the control stream.
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let refuse = matches!(f, Frame::Refuse { .. });
            if write_frame(&mut send, &f).await.is_err() || refuse {
                let _ = send.finish();
                break;
            }
        }
    });

    let handle = {
        let store = store.clone();
        let session = session.clone();
        move |f: Frame, tx: &mpsc::UnboundedSender<Frame>| {
            let out = tokio::task::block_in_place(|| {
                let mut st = store.lock();
                session.lock().handle(&mut *st, f)
            });
            for f in out {
                let _ = tx.send(f);
            }
        }
    };

    // Data streams: every frame goes to the same session.
    let data = {
        let conn = conn.clone();
        let tx = tx.clone();
        let handle = handle.clone();
        tokio::spawn(async move {
            while let Ok(mut uni) = conn.accept_uni().await {
                let tx = tx.clone();
                let handle = handle.clone();
                tokio::spawn(async move {
                    loop {
                        match read_frame(&mut uni).await {
                            Ok(Some(f)) => handle(f, &tx),
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Frame::Refuse {
                                    reason: format!("bad data frame: {e:#}"),
                                });
                                break;
                            }
                        }
                    }
                });
            }
        })
    };

    let result = loop {
        match read_frame(&mut recv).await {
            Ok(Some(f)) => {
                handle(f, &tx);
                if session.lock().is_closed() {
                    break Ok(());
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => {
                let _ = tx.send(Frame::Refuse {
                    reason: format!("bad control frame: {e:#}"),
                });
                break Err(e);
            }
        }
    };
    drop(tx);
    let _ = writer.await;
    data.abort();
    conn.close(0u32.into(), b"session over");
    log::info!("primary {fp} disconnected");
    result
}
