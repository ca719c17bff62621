//! A node's network side as one value: the tokio runtime and the QUIC endpoint on it. The
//! primary's sync engine holds a client node, the replica daemon a server node; neither builds
//! a runtime or an endpoint of its own.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Result;

use super::{Congestion, Fingerprint, Identity, transport};

pub struct Node {
    rt: tokio::runtime::Runtime,
    ep: quinn::Endpoint,
}

/// How many runtime threads, their name, and what each runs first (e.g. lowering its
/// priority).
#[derive(Clone, Copy)]
pub struct Threads {
    pub count: usize,
    pub name: &'static str,
    pub on_start: fn(),
}

fn runtime(t: Threads) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(t.count)
        .thread_name(t.name)
        .on_thread_start(t.on_start)
        .enable_all()
        .build()?)
}

impl Node {
    /// A client presenting `id` to servers pinned by `pinned`, sending with `cc`.
    pub fn client(
        id: &Identity,
        pinned: &[Fingerprint],
        cc: Congestion,
        threads: Threads,
    ) -> Result<Node> {
        let rt = runtime(threads)?;
        let ep = {
            let _guard = rt.enter();
            transport::client(id, pinned, "0.0.0.0:0".parse().expect("an address"), cc)?
        };
        Ok(Node { rt, ep })
    }

    /// A server on `listen` presenting `id`, accepting the clients pinned by `pinned`.
    pub fn server(
        id: &Identity,
        pinned: &[Fingerprint],
        listen: SocketAddr,
        threads: Threads,
    ) -> Result<Node> {
        let rt = runtime(threads)?;
        let ep = {
            let _guard = rt.enter();
            transport::server(id, pinned, listen)?
        };
        Ok(Node { rt, ep })
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.ep
    }

    /// Runs `f` to completion on the node's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
