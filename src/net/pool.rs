//! The connections a primary keeps open to its replicas, one per address, from one sync point
//! to the next.
//!
//! A connection made for each sync point paid a handshake (one round trip, more on a lossy
//! path) and started its congestion controller over from the initial window, with no
//! estimate of the path: a sync point every second spent its first round trips finding a rate
//! the previous one had already measured. A kept connection carries its controller's estimate
//! and minimum RTT to the next session. Keep-alives (`tls::KEEP_ALIVE`) hold it open between
//! sync points and notice a replica that went away; a replica that restarted answers them with
//! a stateless reset, and the connection is closed before the next sync point wants it.
//!
//! Sessions on one connection run one at a time (one control stream, `tls::CONTROL_STREAMS`).
//! A session that fails, or is abandoned (a timeout drops it), takes its connection with it
//! ([`Lease`]): a data stream it left half-written never reaches the next session.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::transport::{ConnectError, connect};

pub struct Pool {
    ep: quinn::Endpoint,
    open: parking_lot::Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

/// A connection lent for one session: unless [`Lease::keep`] is called, it is closed when the
/// lease is dropped.
pub struct Lease<'a> {
    pool: &'a Pool,
    addr: SocketAddr,
    pub conn: quinn::Connection,
    /// Whether it served an earlier session.
    pub reused: bool,
    kept: bool,
}

impl Pool {
    pub fn new(ep: quinn::Endpoint) -> Pool {
        Pool {
            ep,
            open: Default::default(),
        }
    }

    /// The open connection to `addr`, or a new one.
    pub async fn lease(&self, addr: SocketAddr) -> Result<Lease<'_>, ConnectError> {
        let open = self.open.lock().get(&addr).cloned();
        let (conn, reused) = match open {
            Some(c) if c.close_reason().is_none() => (c, true),
            _ => {
                let c = connect(&self.ep, addr).await?;
                if let Some(old) = self.open.lock().insert(addr, c.clone()) {
                    old.close(0u32.into(), b"replaced");
                }
                (c, false)
            }
        };
        Ok(Lease {
            pool: self,
            addr,
            conn,
            reused,
            kept: false,
        })
    }

    /// Whether a connection to `addr` is open now (kept from the last session, or serving one).
    pub fn is_open(&self, addr: SocketAddr) -> bool {
        self.open
            .lock()
            .get(&addr)
            .is_some_and(|c| c.close_reason().is_none())
    }

    /// Closes every kept connection (the primary stops).
    pub fn close_all(&self) {
        for (_, c) in self.open.lock().drain() {
            c.close(0u32.into(), b"primary stopping");
        }
    }
}

impl Lease<'_> {
    /// The session ended well: the connection serves the next one.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        self.conn.close(0u32.into(), b"session over");
        let mut open = self.pool.open.lock();
        if open
            .get(&self.addr)
            .is_some_and(|c| c.stable_id() == self.conn.stable_id())
        {
            open.remove(&self.addr);
        }
    }
}
