//! TLS for QUIC: mutual authentication by pinned certificate fingerprints (invariant 5).
//!
//! Both sides present their node certificate and accept the other's only if its SHA-256
//! [`Fingerprint`] is in the pinned list from the config (`[replica] primaries` on a replica,
//! `[[peer]] fingerprint` on a primary). Certificates are self-signed, so names, issuers,
//! chains and validity dates mean nothing and are not checked; the handshake signatures are
//! verified properly, which proves the peer holds the pinned certificate's key.
//!
//! Everything else is fixed: TLS 1.3 only, ALPN [`ALPN`], the *ring* crypto provider passed
//! explicitly (no process-wide default is needed or consulted), no session resumption and no
//! 0-RTT, so every connection runs the full handshake and the pin check.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::keys::{Fingerprint, Identity};

/// The ALPN protocol of ferry's replication protocol, version 1. A peer that does not offer it
/// is refused during the handshake.
pub const ALPN: &[u8] = b"ferry/1";

/// The server name a client sends (SNI). Servers are identified by fingerprint, so it is the
/// same for every node and never checked.
pub const SERVER_NAME: &str = "ferry-node";

/// How often an idle connection sends a keep-alive, well inside [`IDLE_TIMEOUT`] and NAT
/// binding lifetimes. Once a second (a few dozen bytes): a primary waiting for a replica's
/// acknowledgement hears within a second that the replica restarted (its stateless reset
/// answers the keep-alive, `net::transport`), where 5 s kept the sync waiting that long.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// A connection that hears nothing for this long is closed; a cut link is noticed this late
/// at most.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes one stream may have in flight unread by the receiver. 8 MiB is the bandwidth-delay
/// product of about 1.3 Gbit/s at 50 ms RTT, so one stream fills a 100 Mbit/s to 1 Gbit/s WAN
/// link (quinn's default, 1.25 MB, caps a stream at about 200 Mbit/s at that RTT).
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;

/// Bytes all streams of a connection together may have in flight unread: room for two
/// streams at full [`STREAM_RECEIVE_WINDOW`]. Also bounds the receive memory per peer.
pub const RECEIVE_WINDOW: u32 = 16 << 20;

/// Bytes a sender keeps in flight over all its streams.
pub const SEND_WINDOW: u64 = 16 << 20;

/// Data streams a primary opens per connection, and all a peer may have open at once: with the
/// one control stream ([`CONTROL_STREAMS`]) and frames of at most [`crate::wire::MAX_FRAME`],
/// what a peer can make a node hold in partly received frames is bounded (quinn's default
/// would let it open 100 streams of each kind).
pub const DATA_STREAMS: u8 = 4;

/// The control streams a peer may have open at once (one per session).
pub const CONTROL_STREAMS: u8 = 1;

/// The crypto provider for every TLS configuration: *ring*, as quinn's default features use.
/// Passed explicitly to each builder, so nothing depends on a process-level default provider.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A TLS configuration that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The pinned list is empty, so every peer would be refused.
    #[error(
        "no peer fingerprints are pinned for the {side}: every peer would be refused; put the \
         fingerprints that `ferry id` prints on the other nodes into the config"
    )]
    NothingPinned { side: Side },
    /// rustls refused this node's key or certificate (or the settings).
    #[error("cannot build the TLS {side} configuration for node {fingerprint}: {source}")]
    Rustls {
        side: Side,
        fingerprint: Fingerprint,
        source: rustls::Error,
    },
    /// The crypto provider lacks the cipher suite QUIC's initial packets need.
    #[error("cannot use the TLS {side} configuration for QUIC: {source}")]
    Quic {
        side: Side,
        source: NoInitialCipherSuite,
    },
}

/// Which end of a connection a configuration is for (only names it in errors and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Accepts connections (a replica).
    Server,
    /// Makes connections (a primary).
    Client,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Server => "server (incoming connections)",
            Side::Client => "client (outgoing connections)",
        })
    }
}

/// The QUIC server configuration: presents `id`, requires a client certificate and accepts
/// only the `pinned` fingerprints, TLS 1.3 and ALPN [`ALPN`], with [`transport_config_with`].
pub fn server_config(
    id: &Identity,
    pinned: &[Fingerprint],
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_crypto(id, pinned)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|source| TlsError::Quic {
        side: Side::Server,
        source,
    })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    // A replica sends acknowledgements and little else: its controller hardly matters.
    cfg.transport_config(Arc::new(transport_config_with(Congestion::default())));
    Ok(cfg)
}

/// The QUIC client configuration: presents `id` as client certificate and accepts only servers
/// with a `pinned` fingerprint, TLS 1.3 and ALPN [`ALPN`], with [`transport_config_with`] `cc`
/// (the controller of what the primary sends: the data). Connect with [`SERVER_NAME`] as the
/// server name.
pub fn client_config(
    id: &Identity,
    pinned: &[Fingerprint],
    cc: Congestion,
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = client_crypto(id, pinned)?;
    let quic = QuicClientConfig::try_from(tls).map_err(|source| TlsError::Quic {
        side: Side::Client,
        source,
    })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport_config_with(cc)));
    Ok(cfg)
}

/// The rustls half of [`server_config`] (what quinn wraps; public so tests can speak plain TLS
/// to it, e.g. offer TLS 1.2, which a QUIC stack cannot).
pub fn server_crypto(
    id: &Identity,
    pinned: &[Fingerprint],
) -> Result<rustls::ServerConfig, TlsError> {
    let side = Side::Server;
    let verifier = Arc::new(PinnedClients(Pins::new(pinned, side)?));
    let err = |source| TlsError::Rustls {
        side,
        fingerprint: id.fingerprint(),
        source,
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert_der().clone()], id.key_der().clone_key())
        .map_err(err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection gets a full handshake and pin check: no resumption, no 0-RTT.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// The rustls half of [`client_config`].
pub fn client_crypto(
    id: &Identity,
    pinned: &[Fingerprint],
) -> Result<rustls::ClientConfig, TlsError> {
    let side = Side::Client;
    let verifier = Arc::new(PinnedServers(Pins::new(pinned, side)?));
    let err = |source| TlsError::Rustls {
        side,
        fingerprint: id.fingerprint(),
        source,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert_der().clone()], id.key_der().clone_key())
        .map_err(err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// The congestion controller of a QUIC connection (it governs what that side sends: on a
/// primary, the data). ferry's own, `bdp`, is the default: over a 100 Mbit/s, 50 ms path with
/// 0.5% loss it keeps 85% of the link busy and offers what the path delivers, where quinn's BBR
/// offers 2.2x (the bottleneck queue drops the rest) and CUBIC and NewReno, taking random loss
/// for congestion, fall to 4% of the link (scripts/bench-wan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: backs off on every loss event, like TCP.
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
    /// BBR (quinn's BBRv1-style model of bottleneck rate and RTT): does not treat random loss
    /// as congestion; offers about twice what the bottleneck carries.
    Bbr,
    /// ferry's own (`net/bdp.rs`): the window is the measured bandwidth-delay product, so it
    /// offers what the path carries; does not treat random loss as congestion.
    #[default]
    Bdp,
}

impl Congestion {
    /// The names [`FromStr`](std::str::FromStr) and serde accept.
    pub const NAMES: [&str; 4] = ["cubic", "newreno", "bbr", "bdp"];

    fn factory(self) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
        use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
        match self {
            Congestion::Cubic => Arc::new(CubicConfig::default()),
            Congestion::NewReno => Arc::new(NewRenoConfig::default()),
            Congestion::Bbr => Arc::new(BbrConfig::default()),
            Congestion::Bdp => Arc::new(super::bdp::BdpConfig),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
            Congestion::Bbr => "bbr",
            Congestion::Bdp => "bdp",
        })
    }
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Congestion, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            "bdp" => Ok(Congestion::Bdp),
            other => Err(format!(
                "unknown congestion controller {other:?}: use one of {}",
                Congestion::NAMES.join(", ")
            )),
        }
    }
}

/// Transport settings for a WAN link of ~50 ms RTT and 100 Mbit/s or more: keep-alive
/// [`KEEP_ALIVE`], idle timeout [`IDLE_TIMEOUT`], windows [`STREAM_RECEIVE_WINDOW`],
/// [`RECEIVE_WINDOW`], [`SEND_WINDOW`]; streams the peer may open [`DATA_STREAMS`] and
/// [`CONTROL_STREAMS`]; unreliable datagrams off (ferry does not use them);
/// the congestion controller `cc`.
pub fn transport_config_with(cc: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(cc.factory());
    t.keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("IDLE_TIMEOUT fits a QUIC varint"),
        ))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(DATA_STREAMS.into())
        .max_concurrent_bidi_streams(CONTROL_STREAMS.into())
        .datagram_receive_buffer_size(None);
    t
}

/// The fingerprint of the certificate the peer of an established connection presented (on a
/// replica: which primary connected). `None` only if the connection is not established.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| Fingerprint::of_cert(c))
}

/// The pinned fingerprints and the signature algorithms to check handshakes with.
#[derive(Debug)]
struct Pins {
    pinned: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
    side: Side,
}

impl Pins {
    fn new(pinned: &[Fingerprint], side: Side) -> Result<Pins, TlsError> {
        if pinned.is_empty() {
            return Err(TlsError::NothingPinned { side });
        }
        Ok(Pins {
            pinned: pinned.to_vec(),
            algorithms: provider().signature_verification_algorithms,
            side,
        })
    }

    /// Accepts `cert` if and only if its fingerprint is pinned.
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of_cert(cert);
        if self.pinned.contains(&fp) {
            log::debug!("peer certificate {fp} is pinned");
            return Ok(());
        }
        let direction = match self.side {
            Side::Server => "on an incoming connection",
            Side::Client => "on an outgoing connection",
        };
        log::warn!(
            "refused peer with unpinned certificate {fp} {direction}; add it to the config's \
             primaries/peers if it is trusted"
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(Unpinned(fp))),
        )))
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The reason a peer certificate was refused, as rustls and quinn report it.
#[derive(thiserror::Error)]
#[error("certificate fingerprint {0} is not pinned")]
struct Unpinned(Fingerprint);

// rustls shows this error with `{:?}` (inside the connection error a refused peer gets), so
// Debug reads as the message too.
impl std::fmt::Debug for Unpinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A replica's check of connecting clients.
#[derive(Debug)]
struct PinnedClients(Pins);

impl ClientCertVerifier for PinnedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// A primary's check of the server it connected to.
#[derive(Debug)]
struct PinnedServers(Pins);

impl ServerCertVerifier for PinnedServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names_round_trip_through_fromstr_display_and_serde() {
        for name in Congestion::NAMES {
            let c: Congestion = name.parse().unwrap();
            assert_eq!(c.to_string(), name);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<Congestion>(&json).unwrap(), c);
        }
        assert_eq!(" BBR ".parse::<Congestion>(), Ok(Congestion::Bbr));
        let e = "reno".parse::<Congestion>().unwrap_err();
        assert!(e.contains("cubic, newreno, bbr, bdp"), "{e}");
        assert_eq!(Congestion::default(), Congestion::Bdp);
    }

    #[test]
    fn an_empty_pin_list_is_refused_up_front() {
        let id = Identity::generate().unwrap();
        let e = server_config(&id, &[]).unwrap_err();
        assert!(
            matches!(e, TlsError::NothingPinned { side: Side::Server }),
            "{e}"
        );
        assert!(e.to_string().contains("ferry id"), "{e}");
        let e = client_config(&id, &[], Congestion::default()).unwrap_err();
        assert!(
            matches!(e, TlsError::NothingPinned { side: Side::Client }),
            "{e}"
        );
    }
}
