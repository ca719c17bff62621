//! ferry keeps virtual-machine images replicated across a wide-area network.
//!
//! See `docs/ARCHITECTURE.md` for the data flow and which module owns what.

pub mod chunk;
pub mod cli;
pub mod config;
pub mod control;
pub mod dirty;
pub mod durable;
pub mod epoch;
pub mod failover;
pub mod fault;
pub mod fs;
pub mod heap;
pub mod manifest;
pub mod metrics;
pub mod mount;
pub mod net;
pub mod priority;
pub mod replica;
pub mod sync;
#[doc(hidden)]
pub mod testutil;
pub mod wan;
pub mod wire;
