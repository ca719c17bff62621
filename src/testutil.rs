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

/// Flips bits of the byte at `at` of the file at `path` (bit rot, for tests).
pub fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the file to damage");
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).expect("read the byte");
    f.write_all_at(&[b[0] ^ 0x5a], at)
        .expect("write it flipped");
}

/// The records of a staging journal or kept-chunk pack at `path`: (offset of the data, length).
pub fn journal_records(path: &std::path::Path) -> Vec<(u64, u64)> {
    let b = std::fs::read(path).expect("read the journal");
    let (mut pos, mut out) = (0usize, vec![]);
    while pos + 40 <= b.len() {
        let n = u32::from_le_bytes(b[pos + 36..pos + 40].try_into().expect("4 bytes")) as usize;
        out.push((pos as u64 + 40, n as u64));
        pos += 40 + n;
    }
    out
}
