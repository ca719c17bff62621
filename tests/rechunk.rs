#![allow(clippy::single_range_in_vec_init)] // a list of one dirty range is the common case

//! Invariant 1 of DESIGN.md: re-chunking incrementally (stale manifest, new image, dirty set)
//! gives exactly the manifest a full re-chunk of the new image gives.

use std::io;
use std::ops::Range;

use ferry::chunk::{ChunkParams, Source, Tuning, chunk_full, rechunk, rechunk_tuned};
use ferry::manifest::Manifest;
use proptest::prelude::*;

/// An image in memory whose zero runs are (optionally) reported as holes, as a sparse file's
/// would be, so the scan's skip-without-reading path is exercised too.
struct Image {
    bytes: Vec<u8>,
    holes: bool,
}

impl Source for Image {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes.as_slice().read_at(buf, offset)
    }
    fn known_zero_until(&self, offset: u64) -> io::Result<u64> {
        if !self.holes {
            return Ok(offset);
        }
        let rest = &self.bytes[offset as usize..];
        let zeros = rest.iter().position(|&b| b != 0).unwrap_or(rest.len());
        // Like a filesystem, report holes only in whole 512-byte sectors.
        Ok(offset + (zeros as u64 & !511))
    }
}

fn small(zero_min: u32) -> ChunkParams {
    ChunkParams {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
        zero_min,
    }
}

#[derive(Clone, Debug)]
enum Fill {
    Random(u64),
    Zero,
    Byte(u8),
    /// The bytes that are there already (a rewrite of the same data: dirty, unchanged).
    Keep,
}

fn fill(buf: &mut [u8], f: &Fill) {
    match f {
        Fill::Random(seed) => buf.copy_from_slice(&random(buf.len(), *seed)),
        Fill::Zero => buf.fill(0),
        Fill::Byte(b) => buf.fill(*b),
        Fill::Keep => {}
    }
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        4 => any::<u64>().prop_map(Fill::Random),
        3 => Just(Fill::Zero),
        1 => any::<u8>().prop_map(Fill::Byte),
        1 => Just(Fill::Keep),
    ]
}

/// Where an operation lands: near a stale entry boundary (by index, plus a small delta), near
/// a 4 KiB block edge, or anywhere.
#[derive(Clone, Debug)]
enum At {
    Boundary(usize, i64),
    Block(u64, i64),
    Anywhere(u64),
}

#[derive(Clone, Debug)]
enum Op {
    /// A write starting at `At`.
    Write(At, u64, Fill),
    /// A write ending at `At`.
    WriteTo(At, u64, Fill),
    Truncate(u64),
}

fn at_strategy() -> impl Strategy<Value = At> {
    prop_oneof![
        (any::<usize>(), -3i64..4).prop_map(|(i, d)| At::Boundary(i, d)),
        (any::<u64>(), -3i64..4).prop_map(|(i, d)| At::Block(i, d)),
        any::<u64>().prop_map(At::Anywhere),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (at_strategy(), prop_oneof![1u64..64, 1u64..9000, 4096u64..40_000], fill_strategy())
            .prop_map(|(at, len, f)| Op::Write(at, len, f)),
        3 => (at_strategy(), prop_oneof![1u64..64, 1u64..9000, 4096u64..40_000], fill_strategy())
            .prop_map(|(at, len, f)| Op::WriteTo(at, len, f)),
        1 => (0u64..200_000).prop_map(Op::Truncate),
    ]
}

fn image_strategy() -> impl Strategy<Value = Vec<(u64, Fill)>> {
    prop::collection::vec(
        (
            prop_oneof![1u64..100, 100u64..5000, 4096u64..30_000],
            fill_strategy(),
        ),
        0..24,
    )
}

fn build(parts: &[(u64, Fill)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (len, f) in parts {
        let start = v.len();
        v.resize(start + *len as usize, 0);
        fill(&mut v[start..], f);
    }
    v
}

fn resolve(at: &At, stale: &Manifest, len: u64) -> u64 {
    let size = len.max(1);
    let raw = match *at {
        At::Boundary(i, d) => {
            let es = stale.entries();
            let b = if es.is_empty() {
                0
            } else {
                es[i % es.len()].offset
            };
            b as i64 + d
        }
        At::Block(i, d) => ((i % (size / 4096 + 1)) * 4096) as i64 + d,
        At::Anywhere(x) => (x % size) as i64,
    };
    raw.clamp(0, len as i64) as u64
}

/// Applies the operations to `img`, returning the dirty ranges a filesystem would record.
fn apply(img: &mut Vec<u8>, stale: &Manifest, ops: &[Op]) -> Vec<Range<u64>> {
    let mut dirty = Vec::new();
    for op in ops {
        let write = match op {
            Op::Write(at, len, f) => {
                let off = resolve(at, stale, img.len() as u64);
                Some((off, off + len, f))
            }
            Op::WriteTo(at, len, f) => {
                let end = resolve(at, stale, img.len() as u64);
                Some((end.saturating_sub(*len), end.max(1), f))
            }
            Op::Truncate(n) => {
                let n = *n;
                let old = img.len() as u64;
                img.resize(n as usize, 0);
                if n != old {
                    dirty.push(n.min(old)..n.max(old));
                }
                None
            }
        };
        if let Some((off, end, f)) = write {
            {
                if end as usize > img.len() {
                    img.resize(end as usize, 0);
                }
                fill(&mut img[off as usize..end as usize], f);
                dirty.push(off..end);
            }
        }
    }
    dirty
}

fn check(params: ChunkParams, parts: &[(u64, Fill)], ops: &[Op], holes: bool, tuning: Tuning) {
    let old = Image {
        bytes: build(parts),
        holes,
    };
    let (stale, _) = chunk_full(&old, params).unwrap();
    let mut bytes = old.bytes.clone();
    let dirty = apply(&mut bytes, &stale, ops);
    let new = Image { bytes, holes };
    // Full chunks first: each round's incremental re-chunk leaves in the cache what it found
    // (pieces and fires, found in place or by the scan), and the next round relies on that.
    let (full, _) = chunk_full(&new, params).unwrap();
    let (split_full, _) = rechunk_tuned(&Manifest::empty(params), &new, &[], tuning).unwrap();
    assert_eq!(
        split_full.entries(),
        full.entries(),
        "split full != full, {tuning:?}"
    );
    // Split into small speculative pieces (joined, or rescanned where they do not meet), the
    // result is the same.
    let (inc, _) = rechunk_tuned(&stale, &new, &dirty, tuning).unwrap();
    assert_eq!(
        inc.entries(),
        full.entries(),
        "split incremental != full, {tuning:?}"
    );
    let (inc, _) = rechunk(&stale, &new, &dirty).unwrap();
    assert_eq!(
        inc.entries(),
        full.entries(),
        "incremental != full for dirty {dirty:?}"
    );
    assert_eq!(inc.root(), full.root());
    // The same places written again with other bytes: chunks re-hashed in place above are now
    // re-hashed from their cached pieces.
    let (second, newer) = next_round(&full, &new, &other_bytes(ops), params, "second");
    // Then other places: a scan crossing bytes the rounds before wrote finds its cuts there by
    // the fires those rounds left.
    next_round(&second, &newer, &other_places(ops), params, "third");
}

/// Applies `ops` to `image` (whose manifest is `stale`) and checks that the incremental
/// re-chunk of the result equals its full chunking; returns both.
fn next_round(
    stale: &Manifest,
    image: &Image,
    ops: &[Op],
    params: ChunkParams,
    round: &str,
) -> (Manifest, Image) {
    let mut bytes = image.bytes.clone();
    let dirty = apply(&mut bytes, stale, ops);
    let next = Image {
        bytes,
        holes: image.holes,
    };
    let want = chunk_full(&next, params).unwrap().0;
    let (inc, _) = rechunk(stale, &next, &dirty).unwrap();
    assert_eq!(
        inc.entries(),
        want.entries(),
        "{round} incremental != full for dirty {dirty:?}"
    );
    (inc, next)
}

/// The same operations at nearby places (next boundary, next block, elsewhere), other bytes.
fn other_places(ops: &[Op]) -> Vec<Op> {
    let moved = |at: &At| match *at {
        At::Boundary(i, d) => At::Boundary(i.wrapping_add(1), d),
        At::Block(i, d) => At::Block(i.wrapping_add(1), d),
        At::Anywhere(x) => At::Anywhere(x.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
    };
    other_bytes(ops)
        .iter()
        .map(|op| match op {
            Op::Write(at, len, f) => Op::Write(moved(at), *len, f.clone()),
            Op::WriteTo(at, len, f) => Op::WriteTo(moved(at), *len, f.clone()),
            Op::Truncate(n) => Op::Truncate(*n),
        })
        .collect()
}

/// The same operations writing other bytes (zeros stay zeros).
fn other_bytes(ops: &[Op]) -> Vec<Op> {
    let other = |f: &Fill| match f {
        Fill::Random(seed) => Fill::Random(seed.wrapping_add(1)),
        Fill::Zero => Fill::Zero,
        Fill::Byte(b) => Fill::Byte(b.wrapping_add(1)),
        Fill::Keep => Fill::Keep,
    };
    ops.iter()
        .map(|op| match op {
            Op::Write(at, len, f) => Op::Write(at.clone(), *len, other(f)),
            Op::WriteTo(at, len, f) => Op::WriteTo(at.clone(), *len, other(f)),
            Op::Truncate(n) => Op::Truncate(*n),
        })
        .collect()
}

fn tuning_strategy() -> impl Strategy<Value = Tuning> {
    (4096u64..40_000, 0u64..20_000).prop_map(|(split, overshoot)| Tuning { split, overshoot })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full(
        parts in image_strategy(),
        ops in prop::collection::vec(op_strategy(), 0..8),
        zero_min in prop_oneof![Just(4096u32), Just(8192u32)],
        holes in any::<bool>(),
        tuning in tuning_strategy(),
    ) {
        check(small(zero_min), &parts, &ops, holes, tuning);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_with_default_params(
        parts in prop::collection::vec(
            (prop_oneof![1u64..5000, 100_000u64..700_000], fill_strategy()), 1..10),
        ops in prop::collection::vec(op_strategy(), 0..6),
        split in 100_000u64..400_000,
    ) {
        let tuning = Tuning { split, overshoot: 4 * 262_144 + 16_384 };
        check(ChunkParams::default(), &parts, &ops, true, tuning);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Chunks of several 8 KiB pieces, so the second round re-hashes from cached pieces.
    #[test]
    fn incremental_equals_full_with_chunks_of_several_pieces(
        parts in image_strategy(),
        ops in prop::collection::vec(op_strategy(), 0..8),
        holes in any::<bool>(),
        tuning in tuning_strategy(),
    ) {
        let p = ChunkParams { min_size: 4096, avg_size: 16_384, max_size: 65_536, zero_min: 4096 };
        check(p, &parts, &ops, holes, tuning);
    }
}

use ferry::testutil::random;

/// A chunk re-hashed in place once (its pieces cached), then written inside again and, by
/// another write, across its first byte: the second write's bytes are in the chunk too, so
/// the cached pieces must not stand in for them (found by scripts/bench-rpo: syncs failed
/// with "changed since the sync point").
#[test]
fn a_write_across_a_chunks_start_is_not_hidden_by_its_cached_pieces() {
    let p = ChunkParams::default();
    let mut img = random(2 << 20, 11);
    let (m0, _) = chunk_full(&img, p).unwrap();
    let c = *m0
        .entries()
        .iter()
        .find(|e| e.offset > 0 && e.len > 40_000)
        .expect("a chunk of several pieces");
    let inside = c.offset + 20_000..c.offset + 24_096;
    img[inside.start as usize..inside.end as usize].fill(0x11);
    let (m1, _) = rechunk(&m0, &img, std::slice::from_ref(&inside)).unwrap();
    assert_eq!(m1.entries(), chunk_full(&img, p).unwrap().0.entries());
    // Written across the chunk's start, but with its old bytes up to 10 past it, so the cut
    // there stays where it is.
    let across = c.offset - 100..c.offset + 100;
    img[c.offset as usize + 10..across.end as usize].fill(0x22);
    img[inside.start as usize..inside.end as usize].fill(0x22);
    let (m2, _) = rechunk(&m1, &img, &[across, inside]).unwrap();
    assert_eq!(m2.entries(), chunk_full(&img, p).unwrap().0.entries());
}

fn inc_vs_full(old: &[u8], new: &[u8], dirty: &[Range<u64>], p: ChunkParams) -> u64 {
    let (stale, _) = chunk_full(&old.to_vec(), p).unwrap();
    let (full, _) = chunk_full(&new.to_vec(), p).unwrap();
    let (inc, stats) = rechunk(&stale, &new.to_vec(), dirty).unwrap();
    assert_eq!(inc.entries(), full.entries());
    stats.bytes_read
}

#[test]
fn a_write_at_every_offset_around_a_chunk_boundary() {
    let p = small(4096);
    let old = random(60_000, 1);
    let (stale, _) = chunk_full(&old, p).unwrap();
    let b = stale.entries()[5].offset;
    for off in b - 70..b + 70 {
        for len in [1, 2, 63, 64, 65] {
            let mut new = old.clone();
            new[off as usize..(off + len) as usize].fill(0xAA);
            inc_vs_full(&old, &new, &[off..off + len], p);
        }
    }
}

#[test]
fn a_write_ending_just_past_a_forced_cut() {
    // Constant bytes are cut at max_size without looking at the byte after the cut, so the new
    // scan meets the stale boundary before the last dirty byte: it must not stop there.
    let p = small(4096);
    let mut old = random(100_000, 9);
    old[20_000..60_000].fill(0x11);
    let (stale, _) = chunk_full(&old, p).unwrap();
    let inside: Vec<u64> = stale
        .entries()
        .iter()
        .map(|e| e.offset)
        .filter(|&o| o > 25_000 && o < 55_000)
        .collect();
    assert!(inside.len() > 3);
    for b in inside {
        for len in [1u64, 2, 100, 5000] {
            let mut new = old.clone();
            let r = (b + 1 - len) as usize..(b + 1) as usize;
            new[r.clone()].fill(0x22);
            inc_vs_full(&old, &new, &[r.start as u64..r.end as u64], p);
        }
    }
}

#[test]
fn a_zero_run_starting_one_byte_after_a_cut() {
    // A cut at `s` is only tested while the segment reaches `s + 2`, so a zero extent created at
    // an aligned `s + 1` moves the cut before it: the restart must go back past `s`.
    let p = small(4096);
    for seed in 0..200 {
        let old = random(400_000, 100 + seed);
        let (stale, _) = chunk_full(&old, p).unwrap();
        let es = stale.entries();
        let Some(k) = (1..es.len()).find(|&k| {
            let s = es[k].offset;
            (s + 1) % 4096 == 0 && es[k - 1].len % 2 == 0 && s + 4097 < old.len() as u64
        }) else {
            continue;
        };
        let s = es[k].offset as usize;
        let mut old = old;
        old[s + 1..s + 101].fill(0);
        let mut new = old.clone();
        new[s + 101..s + 1 + 4096].fill(0);
        inc_vs_full(&old, &new, &[(s + 101) as u64..(s + 4097) as u64], p);
        return;
    }
    panic!("no seed gives a cut one byte before a block edge");
}

#[test]
fn zero_runs_created_split_and_removed() {
    let p = small(8192);
    let mut old = random(200_000, 2);
    old[40_960..81_920].fill(0); // an aligned zero extent
    old[100_000..110_000].fill(0); // a zero run only partly aligned
    let cases: Vec<(Range<usize>, u8)> = vec![
        (60_000..60_001, 1),   // split the zero extent with one byte
        (40_960..41_000, 9),   // data at its start
        (81_910..81_930, 0),   // extend it by zeros
        (81_920..90_112, 0),   // extend it to the next block
        (30_000..40_960, 0),   // extend it backwards, unaligned
        (32_768..40_960, 0),   // extend it backwards, aligned
        (110_000..120_000, 0), // make the partial run qualify
        (100_000..100_001, 5), // break a short run
        (0..200_000, 0),       // all zeros
        (199_999..200_000, 0), // the last byte
    ];
    for (r, byte) in cases {
        let mut new = old.clone();
        new[r.clone()].fill(byte);
        inc_vs_full(&old, &new, &[r.start as u64..r.end as u64], p);
    }
}

#[test]
fn growth_shrink_and_file_end_edges() {
    let p = small(4096);
    let old = random(50_001, 3);
    for new_len in [
        0, 1, 2, 255, 256, 257, 4096, 49_000, 50_000, 50_002, 60_000, 200_000,
    ] {
        let mut new = old.clone();
        new.resize(new_len, 0);
        let (lo, hi) = (new_len.min(old.len()) as u64, new_len.max(old.len()) as u64);
        inc_vs_full(&old, &new, &[lo..hi], p);
        // The size change alone (no dirty range given) is enough.
        inc_vs_full(&old, &new, &[], p);
    }
}

#[test]
fn many_scattered_writes_and_one_long_run() {
    let p = ChunkParams::default();
    let old = random(32 << 20, 4);
    let mut new = old.clone();
    let mut dirty = Vec::new();
    for i in 0..200u64 {
        let off = (i * 7_919_993) % (31 << 20);
        new[off as usize..off as usize + 4096].fill(i as u8);
        dirty.push(off..off + 4096);
    }
    new[10 << 20..14 << 20].fill(0x5A);
    dirty.push(10 << 20..14 << 20);
    inc_vs_full(&old, &new, &dirty, p);
}

#[test]
fn rechunk_reads_around_the_change_not_the_image() {
    // Invariant 6 for the chunker: the bytes read grow with the dirty bytes, not the image.
    let p = ChunkParams::default();
    let old = random(64 << 20, 5);
    let mut new = old.clone();
    new[30_000_000..30_004_096].fill(1);
    let read = inc_vs_full(&old, &new, &[30_000_000..30_004_096], p);
    assert!(
        read < 4 << 20,
        "a 4 KiB write in a 64 MiB image re-read {read} bytes"
    );
    // A 4 KiB write into a large zero region reads next to nothing.
    let mut old = random(8 << 20, 6);
    old[1 << 20..7 << 20].fill(0);
    let mut new = old.clone();
    new[4 << 20..(4 << 20) + 4096].fill(7);
    let read = inc_vs_full(&old, &new, &[4 << 20..(4 << 20) + 4096], p);
    assert!(
        read < 2 << 20,
        "re-read {read} bytes around a write into zeros"
    );
}

#[test]
fn a_sparse_file_is_chunked_without_reading_its_holes() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&random(1 << 20, 7)).unwrap();
    f.seek(SeekFrom::Start(1 << 30)).unwrap();
    f.write_all(&random(1 << 20, 8)).unwrap();
    f.set_len(2 << 30).unwrap();
    drop(f);
    let src = ferry::chunk::FileSource::open(&path).unwrap();
    let (m, stats) = chunk_full(&src, ChunkParams::default()).unwrap();
    let s = m.stats();
    assert_eq!(s.data_bytes, 2 << 20);
    assert_eq!(s.zero_bytes, (2 << 30) - (2 << 20));
    assert_eq!(s.zero_extents, 2);
    assert!(
        stats.bytes_read < 16 << 20,
        "read {} bytes",
        stats.bytes_read
    );
}
