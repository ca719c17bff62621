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
//! A kept connection also remembers the state its last session left the replica in (the
//! acknowledgement), so the next session can plan on it without waiting for the replica's
//! `Welcome` (`PrimarySession::plan_ahead`).
//!
//! Sessions on one connection run one at a time (one control stream, `tls::CONTROL_STREAMS`).
//! A session that fails, or is abandoned (a timeout drops it), takes its connection with it
//! ([`Lease`]): a data stream it left half-written never reaches the next session.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::transport::{ConnectError, connect};
use crate::wire::primary::Acked;

pub struct Pool {
    ep: quinn::Endpoint,
    /// Per address: the connection, and what the replica acknowledged last on it.
    open: parking_lot::Mutex<HashMap<SocketAddr, (quinn::Connection, Option<Acked>)>>,
}

/// A connection lent for one session: unless [`Lease::keep`] is called, it is closed when the
/// lease is dropped.
pub struct Lease<'a> {
    pool: &'a Pool,
    addr: SocketAddr,
    pub conn: quinn::Connection,
    /// Whether it served an earlier session.
    pub reused: bool,
    /// What the replica acknowledged at the end of the last session on it.
    pub last: Option<Acked>,
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
        let (conn, reused, last) = match open {
            Some((c, last)) if c.close_reason().is_none() => (c, true, last),
            _ => {
                let c = connect(&self.ep, addr).await?;
                if let Some((old, _)) = self.open.lock().insert(addr, (c.clone(), None)) {
                    old.close(0u32.into(), b"replaced");
                }
                (c, false, None)
            }
        };
        Ok(Lease {
            pool: self,
            addr,
            conn,
            reused,
            last,
            kept: false,
        })
    }

    /// Whether a connection to `addr` is open now (kept from the last session, or serving one).
    pub fn is_open(&self, addr: SocketAddr) -> bool {
        self.open
            .lock()
            .get(&addr)
            .is_some_and(|(c, _)| c.close_reason().is_none())
    }

    /// Closes every kept connection (the primary stops).
    pub fn close_all(&self) {
        for (_, (c, _)) in self.open.lock().drain() {
            c.close(0u32.into(), b"primary stopping");
        }
    }
}

impl Lease<'_> {
    /// The session ended well, with `acked`: the connection serves the next one.
    pub fn keep(mut self, acked: &Acked) {
        self.kept = true;
        let mut open = self.pool.open.lock();
        if let Some((c, last)) = open.get_mut(&self.addr)
            && c.stable_id() == self.conn.stable_id()
        {
            *last = Some(acked.clone());
        }
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
            .is_some_and(|(c, _)| c.stable_id() == self.conn.stable_id())
        {
            open.remove(&self.addr);
        }
    }
}
