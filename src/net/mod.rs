//! The network edge: node identity (`keys.rs`) and QUIC with pinned mutual TLS (`tls.rs`).
//!
//! tokio and quinn are used only here (and in the transport code built on it); the data path
//! and the protocol state machine stay synchronous and free of sockets.

pub mod bdp;
pub mod keys;
pub mod node;
pub mod pool;
pub mod tls;
pub mod transport;

pub use keys::{
    CERT_FILE, CERT_NAME, Fingerprint, Identity, KEY_FILE, KeyError, ParseFingerprintError,
    fingerprint_in, keygen,
};
pub use node::{Node, Threads};
pub use pool::Pool;
pub use tls::{
    ALPN, Congestion, SERVER_NAME, Side, TlsError, client_config, peer_fingerprint, server_config,
    transport_config_with,
};
