//! ferry keeps virtual-machine images replicated across a wide-area network.
//!
//! See `docs/ARCHITECTURE.md` for the data flow and which module owns what.

pub mod chunk;
pub mod cli;
pub mod dirty;
pub mod durable;
pub mod manifest;
pub mod net;
