//! Pinned mutual TLS over real QUIC endpoints on 127.0.0.1 (invariant 5: no peer is spoken to
//! unless its certificate fingerprint is pinned; TLS 1.3 only).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::net::{self, Fingerprint, Identity};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Every wait in these tests is bounded by this, so a regression fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(10);

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

fn identity() -> Identity {
    Identity::generate().unwrap()
}

/// A replica-side endpoint presenting `id` and trusting `pinned`.
fn server(id: &Identity, pinned: &[Fingerprint]) -> quinn::Endpoint {
    quinn::Endpoint::server(net::server_config(id, pinned).unwrap(), loopback()).unwrap()
}

/// Connects with `cfg` and returns the endpoint (kept alive by the caller) and the outcome of
/// the handshake as the client sees it.
async fn connect(
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let ep = quinn::Endpoint::client(loopback()).unwrap();
    let connecting = ep.connect_with(cfg, addr, net::SERVER_NAME).unwrap();
    let result = tokio::time::timeout(TIMEOUT, connecting)
        .await
        .expect("the handshake ends, one way or the other, in time");
    (ep, result)
}

/// Sends `msg` on a new bi-stream and reads the whole reply.
async fn exchange(conn: &quinn::Connection, msg: &[u8]) -> Result<Vec<u8>, String> {
    let work = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(msg).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .expect("the exchange ends in time")
}

/// What the server application saw of one connection: the peer's fingerprint and the messages
/// it received, or the handshake error.
type Served = Result<(Option<Fingerprint>, Vec<Vec<u8>>), quinn::ConnectionError>;

/// Serves one connection on `server`: reads one message per stream and answers `ack: MSG`.
fn serve_one(server: quinn::Endpoint) -> tokio::task::JoinHandle<Served> {
    tokio::spawn(async move {
        let incoming = tokio::time::timeout(TIMEOUT, server.accept())
            .await
            .expect("a connection attempt arrives")
            .expect("endpoint open");
        let conn = tokio::time::timeout(TIMEOUT, incoming)
            .await
            .expect("the handshake ends in time")?;
        let who = net::peer_fingerprint(&conn);
        let mut got = Vec::new();
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(msg) = recv.read_to_end(1 << 16).await else {
                break;
            };
            got.push(msg.clone());
            let _ = send.write_all(&[b"ack: ", &msg[..]].concat()).await;
            let _ = send.finish();
        }
        Ok((who, got))
    })
}

/// Log lines at warn level and above, from every test in this binary.
static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LOGS.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn logged(needle: &str) -> bool {
    LOGS.lock().unwrap().iter().any(|l| l.contains(needle))
}

#[tokio::test]
async fn nodes_that_pin_each_other_connect_and_exchange_a_message() {
    let (primary, replica) = (identity(), identity());
    let ep = server(&replica, &[primary.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    let served = serve_one(ep);

    let cfg = net::client_config(
        &primary,
        &[replica.fingerprint()],
        net::Congestion::default(),
    )
    .unwrap();
    let (_ep, conn) = connect(cfg, addr).await;
    let conn = conn.expect("pinned nodes connect");
    assert_eq!(net::peer_fingerprint(&conn), Some(replica.fingerprint()));
    let alpn = conn
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap()
        .protocol;
    assert_eq!(alpn.as_deref(), Some(&b"ferry/1"[..]));

    let reply = exchange(&conn, b"generation 1").await.unwrap();
    assert_eq!(reply, b"ack: generation 1");
    conn.close(0u32.into(), b"done");

    let (who, got) = served
        .await
        .unwrap()
        .expect("the replica accepted the primary");
    // The replica can tell which primary connected.
    assert_eq!(who, Some(primary.fingerprint()));
    assert_eq!(got, vec![b"generation 1".to_vec()]);
}

#[tokio::test]
async fn a_server_pinning_several_peers_accepts_each() {
    let (a, b, replica) = (identity(), identity(), identity());
    let pins = [a.fingerprint(), b.fingerprint()];
    let ep = server(&replica, &pins);
    let addr = ep.local_addr().unwrap();
    for client in [&a, &b] {
        let served = serve_one(ep.clone());
        let cfg = net::client_config(client, &[replica.fingerprint()], net::Congestion::default())
            .unwrap();
        let (_ep, conn) = connect(cfg, addr).await;
        let conn = conn.unwrap();
        assert_eq!(exchange(&conn, b"hi").await.unwrap(), b"ack: hi");
        conn.close(0u32.into(), b"done");
        let (who, _) = served.await.unwrap().unwrap();
        assert_eq!(who, Some(client.fingerprint()));
    }
}

#[tokio::test]
async fn a_client_the_server_has_not_pinned_is_refused_and_its_data_never_arrives() {
    capture_logs();
    let (stranger, replica, trusted) = (identity(), identity(), identity());
    let ep = server(&replica, &[trusted.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    let served = serve_one(ep);

    // The stranger trusts the replica; the replica does not trust the stranger.
    let cfg = net::client_config(
        &stranger,
        &[replica.fingerprint()],
        net::Congestion::default(),
    )
    .unwrap();
    let (_ep, conn) = connect(cfg, addr).await;
    // In TLS 1.3 the client finishes its side of the handshake before the server has checked
    // the client's certificate, so the refusal may only show on first use.
    if let Ok(conn) = conn {
        let e = exchange(&conn, b"please store this").await.unwrap_err();
        assert!(!e.is_empty());
    }

    let e = served
        .await
        .unwrap()
        .expect_err("the replica must refuse the handshake");
    assert!(e.to_string().contains("not pinned"), "{e}");
    assert!(logged(&format!(
        "refused peer with unpinned certificate {}",
        stranger.fingerprint()
    )));
}

#[tokio::test]
async fn a_server_the_client_has_not_pinned_is_refused_by_the_client() {
    capture_logs();
    let (primary, impostor, real_replica) = (identity(), identity(), identity());
    // The impostor would accept the primary, but the primary expects another replica.
    let ep = server(&impostor, &[primary.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    let served = serve_one(ep);

    let cfg = net::client_config(
        &primary,
        &[real_replica.fingerprint()],
        net::Congestion::default(),
    )
    .unwrap();
    let (_ep, conn) = connect(cfg, addr).await;
    let e = conn.expect_err("the primary must refuse an unpinned server");
    assert!(e.to_string().contains("not pinned"), "{e}");
    assert!(served.await.unwrap().is_err());
    assert!(logged(&format!(
        "refused peer with unpinned certificate {}",
        impostor.fingerprint()
    )));
}

#[tokio::test]
async fn a_client_with_the_wrong_alpn_or_none_is_refused() {
    let (primary, replica) = (identity(), identity());
    let ep = server(&replica, &[primary.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    for alpn in [vec![b"h3".to_vec()], vec![b"ferry/2".to_vec()], vec![]] {
        let served = serve_one(ep.clone());
        let mut tls = net::tls::client_crypto(&primary, &[replica.fingerprint()]).unwrap();
        tls.alpn_protocols = alpn.clone();
        let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let (_ep, conn) = connect(cfg, addr).await;
        if let Ok(conn) = conn {
            exchange(&conn, b"hello").await.unwrap_err();
        }
        let e = served.await.unwrap().expect_err("ALPN mismatch refused");
        assert!(e.to_string().contains("protocol"), "{alpn:?}: {e}");
    }
}

#[tokio::test]
async fn a_client_presenting_no_certificate_is_refused() {
    let (primary, replica) = (identity(), identity());
    let ep = server(&replica, &[primary.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    let served = serve_one(ep);
    let mut tls = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let (_ep, conn) = connect(cfg, addr).await;
    if let Ok(conn) = conn {
        exchange(&conn, b"hello").await.unwrap_err();
    }
    served
        .await
        .unwrap()
        .expect_err("no certificate, no connection");
}

#[tokio::test]
async fn a_client_showing_a_pinned_certificate_without_its_key_is_refused() {
    let (primary, replica, thief) = (identity(), identity(), identity());
    let ep = server(&replica, &[primary.fingerprint()]);
    let addr = ep.local_addr().unwrap();
    let served = serve_one(ep);
    // The thief copied the primary's (public) certificate but signs with its own key.
    let stolen = forged(&primary, &thief);
    let mut tls = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_cert_resolver(Arc::new(Fixed(stolen)));
    tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let (_ep, conn) = connect(cfg, addr).await;
    if let Ok(conn) = conn {
        exchange(&conn, b"hello").await.unwrap_err();
    }
    served
        .await
        .unwrap()
        .expect_err("a bad handshake signature is refused");
}

#[tokio::test]
async fn a_server_showing_a_pinned_certificate_without_its_key_is_refused() {
    let (primary, replica, thief) = (identity(), identity(), identity());
    let mut tls = rustls::ServerConfig::builder_with_provider(net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(forged(&replica, &thief))));
    tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), loopback())
        .unwrap();
    let addr = ep.local_addr().unwrap();
    let _served = serve_one(ep);
    let cfg = net::client_config(
        &primary,
        &[replica.fingerprint()],
        net::Congestion::default(),
    )
    .unwrap();
    let (_ep, conn) = connect(cfg, addr).await;
    conn.expect_err("a bad handshake signature is refused");
}

/// QUIC cannot carry TLS 1.2 at all (RFC 9001; rustls will not even start such a QUIC
/// session), so these speak plain TLS over loopback TCP to the same rustls configurations
/// that `server_config` and `client_config` wrap.
#[test]
fn a_client_offering_only_tls12_is_refused() {
    let (primary, replica) = (identity(), identity());
    let server_tls = Arc::new(net::tls::server_crypto(&replica, &[primary.fingerprint()]).unwrap());
    let mut client_tls = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(
            vec![primary.cert_der().clone()],
            primary.key_der().clone_key(),
        )
        .unwrap();
    client_tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let (server_result, client_result) = tcp_session(
        rustls::ServerConnection::new(server_tls).unwrap(),
        rustls::ClientConnection::new(
            Arc::new(client_tls),
            ServerName::try_from(net::SERVER_NAME).unwrap(),
        )
        .unwrap(),
    );
    let e = server_result.expect_err("the server refuses TLS 1.2");
    assert!(e.contains("incompatible"), "{e}");
    client_result.expect_err("the client sees the refusal");
}

#[test]
fn a_server_offering_only_tls12_is_refused() {
    let (primary, replica) = (identity(), identity());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![replica.cert_der().clone()],
            replica.key_der().clone_key(),
        )
        .unwrap();
    server_tls.alpn_protocols = vec![net::ALPN.to_vec()];
    let client_tls = net::tls::client_crypto(&primary, &[replica.fingerprint()]).unwrap();
    let (server_result, client_result) = tcp_session(
        rustls::ServerConnection::new(Arc::new(server_tls)).unwrap(),
        rustls::ClientConnection::new(
            Arc::new(client_tls),
            ServerName::try_from(net::SERVER_NAME).unwrap(),
        )
        .unwrap(),
    );
    server_result.expect_err("no common version");
    client_result.expect_err("the client refuses TLS 1.2");
}

/// Runs a plain TLS session over a loopback TCP connection: the client sends a message, the
/// server reads it. Returns each side's outcome (the message the server read, or the error).
fn tcp_session(
    mut server: rustls::ServerConnection,
    mut client: rustls::ClientConnection,
) -> (Result<Vec<u8>, String>, Result<(), String>) {
    let listener = std::net::TcpListener::bind(loopback()).unwrap();
    let addr = listener.local_addr().unwrap();
    let server_thread = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = Vec::new();
        let mut tls = rustls::Stream::new(&mut server, &mut sock);
        match tls.read_to_end(&mut got) {
            Ok(_) if !got.is_empty() => Ok(got),
            Ok(_) => Err("closed without data".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let client_result = (|| {
        let mut tls = rustls::Stream::new(&mut client, &mut sock);
        tls.write_all(b"secret")?;
        tls.flush()?;
        // The handshake completes (or fails) before the data goes out.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(tls.sock)?;
        }
        tls.conn.send_close_notify();
        tls.conn.complete_io(tls.sock)?;
        Ok::<(), std::io::Error>(())
    })()
    .map_err(|e| e.to_string());
    drop(sock);
    (server_thread.join().unwrap(), client_result)
}

/// `cert`'s certificate paired with `key`'s private key: what someone who copied a node's
/// certificate, but not its key, could present.
fn forged(cert: &Identity, key: &Identity) -> Arc<CertifiedKey> {
    let signer = net::tls::provider()
        .key_provider
        .load_private_key(key.key_der().clone_key())
        .unwrap();
    Arc::new(CertifiedKey::new(vec![cert.cert_der().clone()], signer))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A test client that trusts any server (only the server's behaviour is under test).
#[derive(Debug)]
struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = net::tls::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(m, c, d, &algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = net::tls::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(m, c, d, &algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        net::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[tokio::test]
async fn each_congestion_controller_is_the_one_a_connection_runs() {
    use quinn::congestion::{Bbr, Cubic, NewReno};
    let (primary, replica) = (identity(), identity());
    for cc in [
        net::Congestion::Cubic,
        net::Congestion::NewReno,
        net::Congestion::Bbr,
        net::Congestion::Bdp,
    ] {
        let ep = server(&replica, &[primary.fingerprint()]);
        let addr = ep.local_addr().unwrap();
        let served = serve_one(ep);
        let cfg = net::client_config(&primary, &[replica.fingerprint()], cc).unwrap();
        let (_ep, conn) = connect(cfg, addr).await;
        let conn = conn.expect("pinned nodes connect");
        let state = conn.congestion_state().into_any();
        let running = if state.is::<Cubic>() {
            net::Congestion::Cubic
        } else if state.is::<NewReno>() {
            net::Congestion::NewReno
        } else if state.is::<Bbr>() {
            net::Congestion::Bbr
        } else if state.is::<net::bdp::Bdp>() {
            net::Congestion::Bdp
        } else {
            panic!("unknown controller");
        };
        assert_eq!(running, cc);
        exchange(&conn, b"hello").await.unwrap();
        conn.close(0u32.into(), b"done");
        served.await.unwrap().unwrap();
    }
}
