//! Chunk engine benchmarks: chunk + hash throughput, and incremental re-chunk against a full
//! re-chunk of the same image (the 2,000 scattered 4 KiB writes plus one 32 MiB run).
//!
//! `cargo bench --bench chunk`; figures are recorded in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::ops::Range;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::chunk::{ChunkParams, chunk_full, rechunk};

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

/// Baselines on the same buffer: FastCDC cut points alone and BLAKE3 alone, one core.
fn baselines(c: &mut Criterion) {
    let data = random(256 << 20, 1);
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("fastcdc-2020 cuts, 1 core", |b| {
        b.iter(|| {
            fastcdc::v2020::FastCDC::new(&data, 16384, 65536, 262144)
                .map(|c| c.length)
                .sum::<usize>()
        })
    });
    g.bench_function("blake3 64 KiB pieces, 1 core", |b| {
        b.iter(|| {
            data.chunks(65536)
                .map(|c| blake3::hash(c).as_bytes()[0] as u64)
                .sum::<u64>()
        })
    });
    g.finish();
}

fn chunk_and_hash(c: &mut Criterion) {
    let data = random(256 << 20, 1);
    let p = ChunkParams::default();
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("chunk+hash, all cores", |b| {
        b.iter(|| black_box(chunk_full(&data, p).unwrap()))
    });
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    g.bench_function("chunk+hash, 1 core", |b| {
        b.iter(|| one.install(|| black_box(chunk_full(&data, p).unwrap())))
    });
    g.finish();
}

/// The change the issue specifies: 2,000 scattered 4 KiB writes plus one 32 MiB run.
fn change(img: &mut [u8]) -> Vec<Range<u64>> {
    let size = img.len() as u64;
    let mut dirty = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..2000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 16) % (size - 4096)) & !4095;
        img[off as usize..off as usize + 4096].fill(i as u8 | 1);
        dirty.push(off..off + 4096);
    }
    let run = (size / 3) & !4095;
    img[run as usize..(run + (32 << 20)) as usize].fill(0x5A);
    dirty.push(run..run + (32 << 20));
    dirty
}

fn incremental(c: &mut Criterion) {
    let p = ChunkParams::default();
    let old = random(4 << 30, 2);
    let (stale, _) = chunk_full(&old, p).unwrap();
    let mut new = old;
    let dirty = change(&mut new);
    let mut g = c.benchmark_group("rechunk 4 GiB random image");
    g.sample_size(10);
    g.bench_function("full", |b| {
        b.iter(|| black_box(chunk_full(&new, p).unwrap()))
    });
    g.bench_function("incremental (2000 x 4 KiB + 32 MiB)", |b| {
        b.iter(|| black_box(rechunk(&stale, &new, &dirty).unwrap()))
    });
    g.finish();
    let (inc, stats) = rechunk(&stale, &new, &dirty).unwrap();
    assert_eq!(inc, chunk_full(&new, p).unwrap().0, "incremental != full");
    println!(
        "incremental re-chunk read {} MiB and hashed {} MiB for {} MiB dirty",
        stats.bytes_read >> 20,
        stats.bytes_hashed >> 20,
        dirty.iter().map(|r| r.end - r.start).sum::<u64>() >> 20
    );
}

criterion_group!(benches, baselines, chunk_and_hash, incremental);
criterion_main!(benches);
