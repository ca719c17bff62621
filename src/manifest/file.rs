//! The manifest file: a versioned header, the entries, and a BLAKE3 checksum of everything before
//! it. Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash
//! leaves either the old file or the new one.
//!
//! Layout (little endian):
//! ```text
//!  0  8  magic "FERRYMF\n"
//!  8  4  format version (1)
//! 12 16  chunk params: min, avg, max, zero_min (u32 each)
//! 28  4  reserved, zero
//! 32  8  image size
//! 40  8  entry count n
//! 48 32  Merkle root
//! 80     n entries of 41 bytes: len u64, kind u8 (0 data, 1 zero), chunk id (zeros for zero)
//!  .. 32  BLAKE3 of all preceding bytes
//! ```

use std::path::{Path, PathBuf};

use blake3::Hash;

use super::ChunkParams;
use super::{Entry, Kind, Manifest};
use crate::durable;

pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FERRYMF\n";
const HEADER: usize = 80;
const ENTRY: usize = 41;
const SUM: usize = 32;

/// A manifest file that cannot be used. Each variant names the file and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ManifestFileError {
    #[error("cannot {action} manifest {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a ferry manifest (bad magic)")]
    NotManifest { path: PathBuf },
    #[error(
        "manifest {path} has format version {found}, newer than this ferry reads (up to \
         {FORMAT_VERSION}): upgrade ferry on this host"
    )]
    NewerVersion { path: PathBuf, found: u32 },
    #[error(
        "manifest {path} is truncated ({len} bytes, {expected} expected): it will be rebuilt \
         by a full re-chunk; delete it if it is in the way"
    )]
    Truncated {
        path: PathBuf,
        len: usize,
        expected: usize,
    },
    #[error(
        "manifest {path} is corrupt (checksum mismatch): it will be rebuilt by a full re-chunk; \
         delete it if it is in the way"
    )]
    Checksum { path: PathBuf },
    #[error("manifest {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Serialises a manifest to the file format.
pub fn encode(m: &Manifest) -> Vec<u8> {
    let p = m.params();
    let mut b = Vec::with_capacity(HEADER + m.entries().len() * ENTRY + SUM);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for v in [p.min_size, p.avg_size, p.max_size, p.zero_min, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&m.size().to_le_bytes());
    b.extend_from_slice(&(m.entries().len() as u64).to_le_bytes());
    b.extend_from_slice(m.root().as_bytes());
    for e in m.entries() {
        b.extend_from_slice(&e.len.to_le_bytes());
        match e.kind {
            Kind::Data(h) => {
                b.push(0);
                b.extend_from_slice(h.as_bytes());
            }
            Kind::Zero => {
                b.push(1);
                b.extend_from_slice(&[0; 32]);
            }
        }
    }
    let sum = blake3::hash(&b);
    b.extend_from_slice(sum.as_bytes());
    b
}

/// Parses the file format; `path` only names the file in errors.
pub fn decode(path: &Path, b: &[u8]) -> Result<Manifest, ManifestFileError> {
    let path = || path.to_path_buf();
    let invalid = |reason: String| ManifestFileError::Invalid {
        path: path(),
        reason,
    };
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let truncated = || ManifestFileError::Truncated {
        path: path(),
        len: b.len(),
        expected: HEADER + SUM,
    };
    if !b[..b.len().min(8)].eq(&MAGIC[..b.len().min(8)]) {
        return Err(ManifestFileError::NotManifest { path: path() });
    }
    if b.len() < 12 {
        return Err(truncated());
    }
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(ManifestFileError::NewerVersion {
            path: path(),
            found: version,
        });
    }
    if version == 0 {
        return Err(invalid("format version 0".into()));
    }
    if b.len() < HEADER + SUM {
        return Err(truncated());
    }
    let count = u64_at(40);
    let expected = (count as u128) * ENTRY as u128 + (HEADER + SUM) as u128;
    if (b.len() as u128) < expected {
        return Err(ManifestFileError::Truncated {
            path: path(),
            len: b.len(),
            expected: expected.min(usize::MAX as u128) as usize,
        });
    }
    let (body, sum) = b.split_at(b.len() - SUM);
    if blake3::hash(body).as_bytes() != sum {
        return Err(ManifestFileError::Checksum { path: path() });
    }
    if b.len() as u128 != expected {
        return Err(invalid(format!(
            "{} bytes for {count} entries, expected {expected}",
            b.len()
        )));
    }
    let params = ChunkParams {
        min_size: u32_at(12),
        avg_size: u32_at(16),
        max_size: u32_at(20),
        zero_min: u32_at(24),
    };
    params
        .validate()
        .map_err(|e| invalid(format!("chunk parameters: {e}")))?;
    let size = u64_at(32);
    let root = Hash::from_bytes(b[48..80].try_into().unwrap());
    let mut entries = Vec::with_capacity(count as usize);
    let mut offset = 0u64;
    for rec in body[HEADER..].chunks_exact(ENTRY) {
        let len = u64::from_le_bytes(rec[..8].try_into().unwrap());
        let kind = match rec[8] {
            0 => Kind::Data(Hash::from_bytes(rec[9..].try_into().unwrap())),
            1 => Kind::Zero,
            k => return Err(invalid(format!("entry at {offset} has unknown kind {k}"))),
        };
        entries.push(Entry { offset, len, kind });
        offset = offset
            .checked_add(len)
            .ok_or_else(|| invalid("entry lengths overflow".into()))?;
    }
    let m = Manifest::new(params, size, entries).map_err(|e| invalid(e.to_string()))?;
    if m.root() != root {
        return Err(invalid(format!(
            "stored root {root} does not match the entries (root {})",
            m.root()
        )));
    }
    Ok(m)
}

/// Writes `m` to `path` atomically and durably.
pub fn save(path: &Path, m: &Manifest) -> Result<(), ManifestFileError> {
    durable::write_atomic(path, &encode(m)).map_err(|source| ManifestFileError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and checks the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestFileError> {
    let b = std::fs::read(path).map_err(|source| ManifestFileError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let entries = vec![
            Entry {
                offset: 0,
                len: 70_000,
                kind: Kind::Data(blake3::hash(b"a")),
            },
            Entry {
                offset: 70_000,
                len: 1 << 30,
                kind: Kind::Zero,
            },
            Entry {
                offset: 70_000 + (1 << 30),
                len: 5,
                kind: Kind::Data(blake3::hash(b"b")),
            },
        ];
        Manifest::new(ChunkParams::default(), 70_005 + (1 << 30), entries).unwrap()
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.manifest");
        let m = sample();
        save(&path, &m).unwrap();
        assert_eq!(load(&path).unwrap(), m);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_a_clear_error() {
        let p = Path::new("/state/img.manifest");
        let b = encode(&sample());
        for len in 0..b.len() {
            let e = decode(p, &b[..len]).unwrap_err();
            assert!(e.to_string().contains("/state/img.manifest"), "{e}");
            assert!(
                matches!(
                    e,
                    ManifestFileError::Truncated { .. } | ManifestFileError::Checksum { .. }
                ),
                "cut at {len}: {e}"
            );
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            let e = decode(p, &c).unwrap_err();
            assert!(e.to_string().contains("/state/img.manifest"), "{e}");
        }
    }

    #[test]
    fn a_newer_format_says_to_upgrade() {
        let mut b = encode(&sample());
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = decode(Path::new("m"), &b).unwrap_err();
        assert!(matches!(
            e,
            ManifestFileError::NewerVersion { found: 7, .. }
        ));
        assert!(e.to_string().contains("upgrade ferry"), "{e}");
    }

    #[test]
    fn a_checksummed_file_with_a_wrong_root_is_refused() {
        let mut b = encode(&sample());
        b[50] ^= 1;
        let n = b.len() - 32;
        let sum = blake3::hash(&b[..n]);
        b[n..].copy_from_slice(sum.as_bytes());
        let e = decode(Path::new("m"), &b).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }
}
