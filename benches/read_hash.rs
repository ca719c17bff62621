//! Part of the physical limit of a sync (issue 11: a sync within 3x of "the time to read the
//! dirty bytes, hash them, and the link time"): reads the given ranges of a file and BLAKE3s
//! each, as fast as this machine can (large ranges on all cores), with nothing else: no
//! chunking, no manifest, no frames. `scripts/bench-sync` adds quinn alone's time for the
//! payload over the same path.
//!
//!   read_hash FILE RANGES   (RANGES: lines of "OFFSET LENGTH"; prints one JSON object with
//!                            the best of three passes)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, ranges] = &args[..] else {
        // `cargo bench` runs every bench with `--bench`: nothing to do then.
        eprintln!("usage: read_hash FILE RANGES");
        return;
    };
    let file = File::open(file).unwrap();
    let ranges: Vec<(u64, usize)> = std::fs::read_to_string(ranges)
        .unwrap()
        .lines()
        .map(|l| {
            let (off, len) = l
                .split_once(' ')
                .expect("a line of RANGES is OFFSET LENGTH");
            (off.parse().unwrap(), len.parse().unwrap())
        })
        .collect();
    let bytes: usize = ranges.iter().map(|r| r.1).sum();
    let mut buf = vec![0u8; ranges.iter().map(|r| r.1).max().unwrap_or(0)];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut fold = 0u8;
        for &(off, len) in &ranges {
            let buf = &mut buf[..len];
            file.read_exact_at(buf, off).unwrap();
            let hash = if len >= 1 << 20 {
                blake3::Hasher::new().update_rayon(buf).finalize()
            } else {
                blake3::hash(buf)
            };
            fold ^= hash.as_bytes()[0];
        }
        std::hint::black_box(fold);
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{{\"bytes\":{bytes},\"ranges\":{},\"ms\":{best:.1}}}",
        ranges.len()
    );
}
