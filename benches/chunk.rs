//! Chunk engine benchmarks: chunk + hash throughput, and incremental re-chunk against a full
//! re-chunk of the same image (the 2,000 scattered 4 KiB writes plus one 32 MiB run).
//!
//! `cargo bench --bench chunk`; figures are recorded in docs/BENCHMARKS.md.

use std::cell::RefCell;
use std::hint::black_box;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::chunk::{ChunkParams, FileSource, Source, chunk_full, rechunk};
use ferry::manifest::Manifest;

use ferry::testutil::random;

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

/// The change the issue specifies: 2,000 scattered 4 KiB writes (aligned, spread at random
/// over the image) plus one 32 MiB run a third of the way in; `FERRY_BENCH_RUN_BYTE=1` fills
/// the run with one byte value instead of random bytes.
fn plan(size: u64) -> Vec<Range<u64>> {
    let mut dirty = Vec::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..2000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = ((x >> 16) % (size - 4096)) & !4095;
        dirty.push(off..off + 4096);
    }
    let run = (size / 3) & !4095;
    dirty.push(run..run + (32 << 20));
    dirty
}

/// The bytes of dirty run `i` of `n` in round `round`: each 4 KiB write one byte value, the
/// long run random bytes (a VM copying a file in; a run of one byte value has no content-defined
/// cut, so its chunks are all `max_size` and a piece started inside it never meets the scan
/// before it: docs/BENCHMARKS.md measures that case too).
fn bytes_for(i: usize, n: usize, len: usize, round: u8) -> Vec<u8> {
    if i == n - 1 && std::env::var_os("FERRY_BENCH_RUN_BYTE").is_none() {
        random(len, 100 + u64::from(round))
    } else if i == n - 1 {
        vec![0x5A ^ round << 7; len]
    } else {
        vec![(i as u8 | 1) ^ round << 7; len]
    }
}

/// Incremental against full re-chunk of the same changed image. The image is 4 GiB of random
/// bytes in memory (every write lands in data: the worst case), or, with
/// `FERRY_BENCH_IMAGE=path`, a sparse copy of that image file with the change written into it.
fn incremental(c: &mut Criterion) {
    let p = ChunkParams::default();
    match std::env::var_os("FERRY_BENCH_IMAGE") {
        Some(path) => {
            let copy = std::path::PathBuf::from(format!("{}.bench-copy", path.to_string_lossy()));
            let st = std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(&path)
                .arg(&copy)
                .status()
                .unwrap();
            assert!(st.success(), "cp failed");
            let (stale, _) = chunk_full(&FileSource::open(&copy).unwrap(), p).unwrap();
            let dirty = plan(stale.size());
            let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
            for (i, r) in dirty.iter().enumerate() {
                let buf = bytes_for(i, dirty.len(), (r.end - r.start) as usize, 0);
                f.write_all_at(&buf, r.start).unwrap();
            }
            f.sync_all().unwrap();
            let name = format!("image file {}", path.to_string_lossy());
            let old = FileSource::open(std::path::Path::new(&path)).unwrap();
            let new = FileSource::open(&copy).unwrap();
            compare(c, &name, &old, &stale, &new, &dirty);
            std::fs::remove_file(&copy).unwrap();
        }
        None => {
            let mut img = random(4 << 30, 2);
            let (stale, _) = chunk_full(&img, p).unwrap();
            let dirty = plan(img.len() as u64);
            let mut old = img.clone();
            for (i, r) in dirty.iter().enumerate() {
                let len = (r.end - r.start) as usize;
                img[r.start as usize..r.end as usize].copy_from_slice(&bytes_for(
                    i,
                    dirty.len(),
                    len,
                    0,
                ));
            }
            compare(c, "4 GiB random image", &old, &stale, &img, &dirty);
            // The same places written again (a VM rewriting its hot blocks between sync
            // points): the chunks re-hashed above are re-hashed from their cached pieces.
            let (stale, _) = rechunk(&stale, &img, &dirty).unwrap();
            old.copy_from_slice(&img);
            for (i, r) in dirty.iter().enumerate() {
                let len = (r.end - r.start) as usize;
                img[r.start as usize..r.end as usize].copy_from_slice(&bytes_for(
                    i,
                    dirty.len(),
                    len,
                    1,
                ));
            }
            compare(
                c,
                "4 GiB random image, same places again",
                &old,
                &stale,
                &img,
                &dirty,
            );
        }
    }
}

/// Each incremental run starts as a primary's sync does: with what the last one cached of the
/// stale chunks (pieces and fires), here by chunking the old image again (not timed); a re-chunk
/// forgets the chunks it replaced, so without that only the first run would find them.
fn compare(
    c: &mut Criterion,
    name: &str,
    old: &dyn Source,
    stale: &Manifest,
    new: &dyn Source,
    dirty: &[Range<u64>],
) {
    let p = stale.params();
    let mut g = c.benchmark_group(format!("rechunk {name}"));
    g.sample_size(10);
    // Each sample's time per iteration, to print the ratio the issue asks for.
    let (full, inc) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
    let timed = |times: &RefCell<Vec<Duration>>, iters: u64, run: &dyn Fn() -> Duration| {
        let total: Duration = (0..iters).map(|_| run()).sum();
        times.borrow_mut().push(total / iters as u32);
        total
    };
    g.bench_function("full", |b| {
        b.iter_custom(|iters| {
            timed(&full, iters, &|| {
                let t = Instant::now();
                black_box(chunk_full(new, p).unwrap());
                t.elapsed()
            })
        })
    });
    let cached = || assert_eq!(chunk_full(old, p).unwrap().0, *stale);
    g.bench_function("incremental (2000 x 4 KiB + 32 MiB)", |b| {
        b.iter_custom(|iters| {
            timed(&inc, iters, &|| {
                cached();
                let t = Instant::now();
                black_box(rechunk(stale, new, dirty).unwrap());
                t.elapsed()
            })
        })
    });
    g.finish();
    cached();
    let median = |v: &RefCell<Vec<Duration>>| {
        let mut v = v.borrow().clone();
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (f, i) = (median(&full), median(&inc));
    println!(
        "incremental re-chunk {:.1} ms against full {:.1} ms: {:.1}x (medians of the samples)",
        i * 1e3,
        f * 1e3,
        f / i
    );
    let (inc, stats) = rechunk(stale, new, dirty).unwrap();
    assert_eq!(inc, chunk_full(new, p).unwrap().0, "incremental != full");
    println!(
        "incremental re-chunk read {} MiB, cut {} MiB and hashed {} MiB for {} MiB dirty",
        stats.bytes_read >> 20,
        stats.bytes_cut >> 20,
        stats.bytes_hashed >> 20,
        dirty.iter().map(|r| r.end - r.start).sum::<u64>() >> 20
    );
}

criterion_group!(benches, baselines, chunk_and_hash, incremental);
criterion_main!(benches);
