//! Protocol `ferry/1`, sans I/O: the frames and their encoding (`frame.rs`), plans as
//! manifest splices (`plan.rs`), and the two sides of a session as state machines fed with
//! frames (`primary.rs`, `replica.rs`). The QUIC transport (`net/`) only moves frames. The
//! protocol is described in docs/PROTOCOL.md.

pub mod frame;
pub mod plan;
pub mod primary;
pub mod replica;
pub mod scrub;
pub mod squeeze;

pub use frame::{Frame, FrameError, MAX_FRAME, VERSION};

#[cfg(test)]
mod faults;
pub mod mem;
#[cfg(test)]
mod sim;
