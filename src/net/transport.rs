//! Frames over QUIC: length-prefixed frames on streams, and the endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::{Fingerprint, Identity, SERVER_NAME, client_config, server_config};
use crate::wire::frame::{self, Frame};

/// Reads one frame; `None` when the peer finished the stream cleanly between frames.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        // The peer closed the connection between frames: the session is over.
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed,
        ))) => return Ok(None),
        Err(e) => return Err(e).context("reading a frame"),
    }
    let len = frame::check_len(prefix)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .context("reading a frame body")?;
    Ok(Some(frame::decode(&body)?))
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<()> {
    send.write_all(&frame::encode(f))
        .await
        .context("sending a frame")?;
    Ok(())
}

/// A client endpoint presenting `id` and accepting only `pinned` servers.
pub fn client(id: &Identity, pinned: &[Fingerprint], bind: SocketAddr) -> Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::client(bind)
        .with_context(|| format!("cannot open a UDP socket on {bind}"))?;
    ep.set_default_client_config(client_config(id, pinned)?);
    Ok(ep)
}

/// A server endpoint on `listen` presenting `id` and accepting only `pinned` clients.
pub fn server(
    id: &Identity,
    pinned: &[Fingerprint],
    listen: SocketAddr,
) -> Result<quinn::Endpoint> {
    quinn::Endpoint::server(server_config(id, pinned)?, listen)
        .with_context(|| format!("cannot listen on {listen}"))
}

/// Connects to a peer.
pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection> {
    let conn = ep
        .connect(addr, SERVER_NAME)
        .with_context(|| format!("cannot connect to {addr}"))?
        .await
        .with_context(|| format!("handshake with {addr} failed"))?;
    Ok(conn)
}

/// The fingerprint the peer presented, which the verifier already checked against the pins.
pub fn fingerprint(conn: &quinn::Connection) -> Result<Fingerprint> {
    match super::peer_fingerprint(conn) {
        Some(f) => Ok(f),
        None => bail!("peer presented no certificate"),
    }
}

pub type Shared<T> = Arc<parking_lot::Mutex<T>>;
