//! The replica's session state machine: any sequence of frames a pinned primary could send,
//! against an in-memory store holding one image at generation 1. Never a panic; and the store only ever
//! commits a generation whose every chunk it holds (`MemStore::commit` rebuilds each image
//! from its chunks and panics on a missing one).
#![no_main]
use std::sync::OnceLock;

use ferry::wire::frame::Decoder;
use ferry::wire::mem::{MemStore, after_first_sync};
use ferry::wire::replica::ReplicaSession;
use libfuzzer_sys::fuzz_target;

/// The starting store, made once (chunking its image is most of a run's time otherwise).
fn start() -> &'static MemStore {
    static START: OnceLock<MemStore> = OnceLock::new();
    START.get_or_init(after_first_sync)
}

fuzz_target!(|data: &[u8]| {
    let mut store = start().clone();
    let mut s = ReplicaSession::default();
    let mut d = Decoder::default();
    d.push(data);
    while let Ok(Some(f)) = d.next_frame() {
        s.handle(&mut store, f);
        if s.is_closed() {
            break;
        }
    }
});
