//! Frames over QUIC: length-prefixed frames on streams, and the endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};

use super::{Congestion, Fingerprint, Identity, SERVER_NAME, client_config, server_config};
use crate::wire::frame::{self, Frame};

/// How much of a frame body is read at a time.
const READ_STEP: usize = 1 << 20;

/// Reads one frame; `None` when the peer finished the stream cleanly between frames.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>> {
    read_frame_within(recv, frame::MAX_FRAME).await
}

/// [`read_frame`] of a stream whose frames are at most `limit` bytes (data streams: see
/// [`frame::data_frame_limit`]).
pub async fn read_frame_within(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<Frame>> {
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
    if len > limit {
        bail!("a frame of {len} bytes exceeds this stream's limit of {limit} bytes");
    }
    // The body grows as it arrives: memory follows what the peer sent, not what it announced
    // (a peer announcing large frames on every stream and sending little holds little).
    let mut body = Vec::with_capacity(len.min(READ_STEP));
    while body.len() < len {
        let at = body.len();
        body.resize(at + (len - at).min(READ_STEP), 0);
        recv.read_exact(&mut body[at..])
            .await
            .context("reading a frame body")?;
    }
    Ok(Some(frame::decode(&body)?))
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<()> {
    send.write_all(&frame::encode(f))
        .await
        .context("sending a frame")?;
    Ok(())
}

/// A client endpoint presenting `id`, accepting only `pinned` servers and sending with the
/// congestion controller `cc`.
pub fn client(
    id: &Identity,
    pinned: &[Fingerprint],
    bind: SocketAddr,
    cc: Congestion,
) -> Result<quinn::Endpoint> {
    let socket = udp_socket(bind).with_context(|| format!("cannot open a UDP socket on {bind}"))?;
    let mut ep = endpoint(id, socket, None)?;
    ep.set_default_client_config(client_config(id, pinned, cc)?);
    Ok(ep)
}

/// A server endpoint on `listen` presenting `id` and accepting only `pinned` clients.
pub fn server(
    id: &Identity,
    pinned: &[Fingerprint],
    listen: SocketAddr,
) -> Result<quinn::Endpoint> {
    let socket = udp_socket(listen).with_context(|| format!("cannot listen on {listen}"))?;
    endpoint(id, socket, Some(server_config(id, pinned)?))
}

fn endpoint(
    id: &Identity,
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint> {
    let rt = quinn::default_runtime().context("no async runtime to run QUIC on")?;
    Ok(quinn::Endpoint::new(restartable(id), server, socket, rt)?)
}

/// An endpoint whose stateless-reset key and connection-id key derive from the node's private
/// key, so they are the same after a restart: a node that crashed and came back recognises
/// the connection ids it issued before and answers its peers' packets of the old connection
/// with a reset they can verify, and they reconnect at once. With quinn's random keys the new
/// process dropped those packets as invalid, and its peers waited out the idle timeout: 30 s in
/// which a sync to a restarted replica stalled (tests/faults.rs, a replica killed at any step).
fn restartable(id: &Identity) -> quinn::EndpointConfig {
    let secret = blake3::derive_key(
        "ferry 2026-12 QUIC stateless reset and connection id keys",
        id.key_der().secret_der(),
    );
    let reset: Arc<dyn quinn::crypto::HmacKey> =
        Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret[..16]));
    let cid_key = u64::from_le_bytes(secret[16..24].try_into().expect("8 bytes"));
    let mut c = quinn::EndpointConfig::new(reset);
    c.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    c
}

/// Socket buffers wanted on both sides. A connection may have 16 MiB in flight (the receive
/// window); with the kernel's default buffer (about 200 KiB) a burst overflows it, the kernel
/// drops datagrams (`UdpRcvbufErrors`) and QUIC sends them again: on loopback the link then
/// carried 2.4-3.2x the payload.
pub const SOCKET_BUFFER: usize = 16 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`] bytes of receive and send buffer: as
/// much as `net.core.rmem_max`/`wmem_max` allow, or all of it with CAP_NET_ADMIN (root).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    grow_buffers(&s);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn grow_buffers(s: &socket2::Socket) {
    use std::os::fd::AsRawFd;
    let set = |opt: libc::c_int| {
        let want = SOCKET_BUFFER as libc::c_int;
        // SAFETY: setsockopt on our own socket with a c_int value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    // With CAP_NET_ADMIN whatever the sysctl says; without, as much as it allows.
    let _ = set(libc::SO_RCVBUFFORCE) || set(libc::SO_RCVBUF);
    let _ = set(libc::SO_SNDBUFFORCE) || set(libc::SO_SNDBUF);
    // The kernel reports twice what it was asked (its bookkeeping included).
    let got = [s.recv_buffer_size(), s.send_buffer_size()]
        .into_iter()
        .filter_map(|r| r.ok())
        .map(|b| b / 2)
        .min();
    if let Some(got) = got.filter(|&g| g < SOCKET_BUFFER) {
        SMALLEST_BUFFER.fetch_min(got, Ordering::Relaxed);
        log::warn!("{}", capped_buffer_words(got));
    }
}

/// The smallest socket buffer this process was granted, if below [`SOCKET_BUFFER`].
static SMALLEST_BUFFER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The UDP socket buffer size (bytes) the kernel granted this process's endpoints when it is
/// less than [`SOCKET_BUFFER`] (capped by `net.core.rmem_max`/`wmem_max` without
/// CAP_NET_ADMIN), for status to say why syncs may be slow.
pub fn capped_buffer() -> Option<usize> {
    Some(SMALLEST_BUFFER.load(Ordering::Relaxed)).filter(|&b| b < SOCKET_BUFFER)
}

/// What a capped socket buffer means and what to do, in words.
pub fn capped_buffer_words(got: usize) -> String {
    format!(
        "the kernel granted UDP socket buffers of {} KiB, not the {} KiB ferry asks for: a burst \
         overflows them, the kernel drops datagrams and QUIC sends them again, which slows syncs; \
         raise net.core.rmem_max and net.core.wmem_max to at least {} (sysctl) or run ferry as \
         root",
        got / 1024,
        SOCKET_BUFFER / 1024,
        SOCKET_BUFFER
    )
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The peer's certificate (or ours, to the peer) is not pinned, or TLS failed: retrying
    /// cannot help until a config changes.
    #[error("TLS handshake with {addr} refused ({source}): check the pinned fingerprints")]
    Trust {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    /// Unreachable, timed out, reset: worth retrying.
    #[error("cannot connect to {addr}: {source:#}")]
    Network {
        addr: SocketAddr,
        source: anyhow::Error,
    },
}

/// True when an error (anywhere in its chain) is a refusal by the TLS layer: the peer refused
/// our certificate after the handshake looked complete (TLS 1.3 checks the client last).
pub fn refused_by_tls(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let conn = c
            .downcast_ref::<quinn::ConnectionError>()
            .or_else(|| match c.downcast_ref::<quinn::ReadExactError>() {
                Some(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
                    Some(e)
                }
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<quinn::ReadError>() {
                Some(quinn::ReadError::ConnectionLost(e)) => Some(e),
                _ => None,
            })
            .or_else(|| match c.downcast_ref::<quinn::WriteError>() {
                Some(quinn::WriteError::ConnectionLost(e)) => Some(e),
                _ => None,
            });
        conn.is_some_and(is_tls)
    })
}

/// True for errors of the TLS layer (QUIC crypto error codes 0x100-0x1ff).
fn is_tls(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

/// How long a handshake may take. A peer that is down does not answer at all (QUIC ignores
/// ICMP), so without this bound a connect would wait for the idle timeout.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to a peer.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = ep
        .connect(addr, SERVER_NAME)
        .map_err(|e| ConnectError::Network {
            addr,
            source: e.into(),
        })?;
    let Ok(r) = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await else {
        return Err(ConnectError::Network {
            addr,
            source: anyhow::anyhow!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
        });
    };
    match r {
        Ok(conn) => Ok(conn),
        Err(e) if is_tls(&e) => Err(ConnectError::Trust { addr, source: e }),
        Err(e) => Err(ConnectError::Network {
            addr,
            source: e.into(),
        }),
    }
}

/// The fingerprint the peer presented, which the verifier already checked against the pins.
pub fn fingerprint(conn: &quinn::Connection) -> Result<Fingerprint> {
    match super::peer_fingerprint(conn) {
        Some(f) => Ok(f),
        None => bail!("peer presented no certificate"),
    }
}

pub type Shared<T> = Arc<parking_lot::Mutex<T>>;
