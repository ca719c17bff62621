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

/// Reads a data stream's frames in batches: all that have arrived once one is complete. A
/// sync of scattered writes is thousands of 4 KiB patch frames; read one at a time, each was a
/// hand-off from the connection to its reader and on to the thread that checks it.
pub struct FrameBatches {
    recv: quinn::RecvStream,
    limit: usize,
    buf: Vec<u8>,
}

/// Bytes buffered beyond one frame of the stream's limit, at most: a batch holds at most
/// `limit + BATCH_BYTES` bytes of frames (about 60 patches of 4 KiB beyond the first).
const BATCH_BYTES: usize = 256 << 10;

impl FrameBatches {
    /// Batches of `recv`'s frames, each at most `limit` bytes (see
    /// [`frame::data_frame_limit`]).
    pub fn new(recv: quinn::RecvStream, limit: usize) -> FrameBatches {
        FrameBatches {
            recv,
            limit,
            buf: Vec::new(),
        }
    }

    /// Asks the peer to stop sending.
    pub fn stop(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }

    /// The next frames, at least one; `None` when the peer finished the stream cleanly between
    /// frames. Memory follows what the peer sent, not what it announced.
    pub async fn next(&mut self) -> Result<Option<Vec<Frame>>> {
        loop {
            let frames = self.complete()?;
            if !frames.is_empty() {
                return Ok(Some(frames));
            }
            if !self.read(true).await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("the stream ended inside a frame");
            }
            // What else has arrived joins this batch, without waiting for more.
            while self.read(false).await? {}
        }
    }

    /// Appends the next bytes of the stream to the buffer; false when it is finished (or, not
    /// `wait`ing, when nothing more has arrived).
    async fn read(&mut self, wait: bool) -> Result<bool> {
        // Waiting, the buffer holds less than one whole frame (else `complete` took it).
        let room = (self.limit + BATCH_BYTES).saturating_sub(self.buf.len());
        if room == 0 {
            return Ok(false);
        }
        let next = self.recv.read_chunk(room, true);
        let r = if wait {
            next.await
        } else {
            // `read_chunk` is cancel-safe: dropped unfinished, it has taken nothing.
            match ready_now(next).await {
                Some(r) => r,
                None => return Ok(false),
            }
        };
        match r {
            Ok(Some(chunk)) => {
                self.buf.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => Ok(false),
            // The peer closed the connection between frames: the session is over.
            Err(quinn::ReadError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed,
            )) if self.buf.is_empty() => Ok(false),
            Err(e) => Err(e).context("reading a frame"),
        }
    }

    /// The complete frames at the front of the buffer, removed from it.
    fn complete(&mut self) -> Result<Vec<Frame>> {
        let mut frames = Vec::new();
        let mut at = 0;
        while self.buf.len() - at >= 4 {
            let len = frame::check_len(self.buf[at..at + 4].try_into().expect("4 bytes"))?;
            if len > self.limit {
                bail!(
                    "a frame of {len} bytes exceeds this stream's limit of {} bytes",
                    self.limit
                );
            }
            if self.buf.len() - at < 4 + len {
                break;
            }
            match frame::decode(&self.buf[at + 4..at + 4 + len]) {
                Ok(f) => frames.push(f),
                // The frames before a broken one are delivered; the next call reports it.
                Err(_) if !frames.is_empty() => break,
                Err(e) => return Err(e.into()),
            }
            at += 4 + len;
        }
        self.buf.drain(..at);
        Ok(frames)
    }
}

/// The output of `fut` if it is ready at once (polled once, then dropped).
async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match fut.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Identity;

    /// A connected pair over loopback: the endpoints, the client's connection and the server's.
    async fn pair() -> ([quinn::Endpoint; 2], quinn::Connection, quinn::Connection) {
        let (a, b) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let any = "127.0.0.1:0".parse().unwrap();
        let server = super::server(&b, &[a.fingerprint()], any).unwrap();
        let addr = server.local_addr().unwrap();
        let client = super::client(&a, &[b.fingerprint()], any, Congestion::default()).unwrap();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            (server, conn)
        });
        let out = client.connect(addr, SERVER_NAME).unwrap().await.unwrap();
        let (server, conn) = accept.await.unwrap();
        ([client, server], out, conn)
    }

    fn chunk(i: u32) -> Frame {
        Frame::Chunk {
            hash: [i as u8; 32],
            zstd: false,
            data: vec![i as u8; 4096 + i as usize],
        }
    }

    /// Frames written back to back arrive whole and in order, many to a batch of bounded size;
    /// a stream that ends inside a frame is an error, not a short frame; a frame over the
    /// stream's limit is refused before its body is read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_written_together_are_read_in_batches_whole_and_in_order() {
        let (_ep, out, conn) = pair().await;
        let mut bytes = Vec::new();
        for i in 0..1000 {
            frame::encode_to(&chunk(i), &mut bytes);
        }
        let mut send = out.open_uni().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let mut batches = FrameBatches::new(conn.accept_uni().await.unwrap(), 64 << 10);
        let (mut got, mut reads) = (Vec::new(), 0);
        while let Some(b) = batches.next().await.unwrap() {
            assert!(!b.is_empty());
            let bytes: usize = b.iter().map(|f| frame::encode(f).len()).sum();
            assert!(
                bytes <= (64 << 10) + BATCH_BYTES,
                "a batch of {bytes} bytes"
            );
            got.extend(b);
            reads += 1;
        }
        assert_eq!(got, (0..1000).map(chunk).collect::<Vec<_>>());
        assert!(reads < 500, "{reads} batches for 1000 frames");

        // Cut short: the last frame lacks its final byte.
        let mut send = out.open_uni().await.unwrap();
        send.write_all(&bytes[..bytes.len() - 1]).await.unwrap();
        send.finish().unwrap();
        let mut batches = FrameBatches::new(conn.accept_uni().await.unwrap(), 64 << 10);
        let mut n = 0;
        let err = loop {
            match batches.next().await {
                Ok(Some(b)) => n += b.len(),
                Ok(None) => panic!("a stream cut inside a frame ended cleanly"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, 999);
        assert!(format!("{err:#}").contains("inside a frame"), "{err:#}");

        // Over the limit.
        let mut send = out.open_uni().await.unwrap();
        send.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
        let mut batches = FrameBatches::new(conn.accept_uni().await.unwrap(), 64 << 10);
        let err = batches.next().await.unwrap_err();
        assert!(
            format!("{err:#}").contains("exceeds this stream's limit"),
            "{err:#}"
        );
    }
}
