//! Helpers shared by the tests (unit, integration) and the benchmarks; not part of the API.

use crate::chunk::ChunkParams;

/// Small chunks (256 B / 1 KiB / 4 KiB), so a few KiB of test data make many chunks.
pub fn small_params() -> ChunkParams {
    ChunkParams {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
        zero_min: 4096,
    }
}

/// `len` pseudo-random bytes, the same for the same `seed`.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}
