//! Snapshots of chunk boundaries and roots for fixed inputs. A dependency bump (fastcdc, blake3)
//! or a change to the scan that moves a cut point or a hash changes dedup results and breaks
//! compatibility with manifests other nodes hold: it must fail here, and be a deliberate
//! decision (a new manifest format version) rather than an accident.

use ferry::chunk::{ChunkParams, chunk_full};
use ferry::manifest::{Kind, Manifest};

/// 24 MiB: random data, an aligned 3 MiB zero run, an unaligned 10 KiB zero run (kept in data),
/// 1 MiB of one repeated byte (cut at max size), more random data, an unaligned end.
fn fixed_image() -> Vec<u8> {
    let mut v = vec![0u8; (24 << 20) + 12_345];
    blake3::Hasher::new()
        .update(b"ferry snapshot image v1")
        .finalize_xof()
        .fill(&mut v);
    v[4 << 20..7 << 20].fill(0);
    v[9_000_001..9_010_241].fill(0);
    v[12 << 20..13 << 20].fill(0xEE);
    v
}

fn summary(m: &Manifest) -> String {
    let mut s = format!("root {}\nentries {}\n", m.root(), m.entries().len());
    for e in m.entries().iter().take(8) {
        let id = match e.kind {
            Kind::Data(h) => h.to_hex()[..16].to_string(),
            Kind::Zero => "zero".to_string(),
        };
        s += &format!("{} {} {}\n", e.offset, e.len, id);
    }
    let zeros: Vec<String> = m
        .entries()
        .iter()
        .filter(|e| e.is_zero())
        .map(|e| format!("{}+{}", e.offset, e.len))
        .collect();
    s += &format!("zero extents {}\n", zeros.join(" "));
    s
}

/// Compares with the stored snapshot; `FERRY_UPDATE_SNAPSHOTS=1` rewrites it instead (only
/// together with a manifest format version bump).
fn check(name: &str, m: &Manifest) {
    let path = format!("{}/tests/snapshots/{name}.txt", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("FERRY_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, summary(m)).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        summary(m),
        expected,
        "chunking of the fixed image changed ({path})"
    );
}

#[test]
fn default_parameters() {
    let img = fixed_image();
    let (m, _) = chunk_full(&img, ChunkParams::default()).unwrap();
    check("default", &m);
    // Away from zero runs and the end, the cuts are exactly the fastcdc crate's own, and the ids
    // BLAKE3 hashes of the chunk bytes.
    let head = &img[..4 << 20];
    let theirs: Vec<_> = fastcdc::v2020::FastCDC::new(head, 16384, 65536, 262144).collect();
    for (c, e) in theirs.iter().zip(m.entries()).take(theirs.len() - 2) {
        assert_eq!((c.offset as u64, c.length as u64), (e.offset, e.len));
        let bytes = &img[c.offset..c.offset + c.length];
        assert_eq!(e.kind, Kind::Data(blake3::hash(bytes)));
    }
}

#[test]
fn small_parameters() {
    let p = ChunkParams {
        min_size: 2048,
        avg_size: 8192,
        max_size: 32768,
        zero_min: 8192,
    };
    let (m, _) = chunk_full(&fixed_image(), p).unwrap();
    check("small", &m);
}
