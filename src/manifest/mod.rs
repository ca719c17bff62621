//! Manifests: the ordered entry list of one image (data chunks and zero extents), its size, the
//! Merkle tree whose root names the generation, the diff between two manifests, and the
//! on-disk format.

mod diff;
mod dir;
mod file;
mod merkle;
mod params;

pub use diff::{Change, ChangeKind, Diff, changed_entries, diff};
pub use dir::{GenRecord, ManifestDir, from_hex, hex, short_hex};
pub use file::{FORMAT_VERSION, ManifestFileError, load, save};
pub use merkle::{FANOUT, LEAF_SPAN, Tree, leaf_count};
pub use params::{ChunkParams, ParamsError, ZERO_BLOCK};

use blake3::Hash;
use std::sync::Arc;

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Data bytes whose BLAKE3 hash is the chunk id.
    Data(Hash),
    /// Zero bytes (written zeros or a hole): recorded by length, never hashed or shipped.
    Zero,
}

/// One span of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub offset: u64,
    pub len: u64,
    pub kind: Kind,
}

impl Entry {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    pub fn hash(&self) -> Option<Hash> {
        match self.kind {
            Kind::Data(h) => Some(h),
            Kind::Zero => None,
        }
    }

    pub fn is_zero(&self) -> bool {
        self.kind == Kind::Zero
    }

    /// Whether `f` (of `size` bytes: zeros past its end) holds this entry's bytes: a chunk
    /// whose BLAKE3 hash matches, or only zeros (read a MiB at a time: a zero extent may be
    /// any length).
    pub fn is_held_by(&self, f: &std::fs::File, size: u64) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let piece = match self.kind {
            Kind::Data(_) => self.len,
            Kind::Zero => self.len.min(1 << 20),
        };
        let mut buf = vec![0u8; piece as usize];
        let mut hasher = blake3::Hasher::new();
        let mut off = self.offset;
        while off < self.end() {
            let n = (self.end() - off).min(piece) as usize;
            let avail = size.saturating_sub(off).min(n as u64) as usize;
            f.read_exact_at(&mut buf[..avail], off)?;
            buf[avail..n].fill(0);
            match self.kind {
                Kind::Data(_) => {
                    hasher.update(&buf[..n]);
                }
                Kind::Zero if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
                Kind::Zero => {}
            }
            off += n as u64;
        }
        Ok(match self.kind {
            Kind::Data(h) => hasher.finalize() == h,
            Kind::Zero => true,
        })
    }
}

/// Why a list of entries is not a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidManifest {
    #[error("entry {index} starts at {offset}, expected {expected} (entries must tile the image)")]
    Gap {
        index: usize,
        offset: u64,
        expected: u64,
    },
    #[error("entry {index} at {offset} is empty")]
    Empty { index: usize, offset: u64 },
    #[error("data entry {index} at {offset} is {len} bytes, larger than the maximum chunk {max}")]
    TooLong {
        index: usize,
        offset: u64,
        len: u64,
        max: u32,
    },
    #[error("entries end at {end} but the image size is {size}")]
    Size { end: u64, size: u64 },
}

/// The chunk list of one image at one generation, with its Merkle tree. Immutable once built,
/// so the list and the tree are shared: a clone (a commit's pending copy, a reader's view, the
/// committed map's) costs a reference count, not a copy of every entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    params: ChunkParams,
    size: u64,
    entries: Arc<Vec<Entry>>,
    tree: Arc<Tree>,
}

/// Figures about a manifest, for `ferry manifest` and status output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Data chunks.
    pub chunks: u64,
    /// Zero extents.
    pub zero_extents: u64,
    /// Bytes in data chunks.
    pub data_bytes: u64,
    /// Bytes in zero extents.
    pub zero_bytes: u64,
    /// Smallest, mean and largest data chunk (0 when there are none).
    pub min_chunk: u64,
    pub avg_chunk: u64,
    pub max_chunk: u64,
}

impl Manifest {
    /// The manifest of an empty image.
    pub fn empty(params: ChunkParams) -> Manifest {
        Manifest::new(params, 0, Vec::new()).expect("an empty manifest is valid")
    }

    /// Builds a manifest, checking that the entries tile `[0, size)` and respect the chunk sizes.
    pub fn new(
        params: ChunkParams,
        size: u64,
        entries: Vec<Entry>,
    ) -> Result<Manifest, InvalidManifest> {
        Manifest::built(params, size, entries, None)
    }

    /// [`Manifest::new`] for entries that change `base`, the same image's manifest before:
    /// its Merkle tree hashes only the leaves over changed entries (the same tree as `new`'s).
    pub fn new_over(
        base: &Manifest,
        params: ChunkParams,
        size: u64,
        entries: Vec<Entry>,
    ) -> Result<Manifest, InvalidManifest> {
        Manifest::built(params, size, entries, Some(base))
    }

    fn built(
        params: ChunkParams,
        size: u64,
        entries: Vec<Entry>,
        base: Option<&Manifest>,
    ) -> Result<Manifest, InvalidManifest> {
        let mut expected = 0;
        for (index, e) in entries.iter().enumerate() {
            if e.offset != expected {
                return Err(InvalidManifest::Gap {
                    index,
                    offset: e.offset,
                    expected,
                });
            }
            if e.len == 0 {
                return Err(InvalidManifest::Empty {
                    index,
                    offset: e.offset,
                });
            }
            if !e.is_zero() && e.len > params.max_size as u64 {
                return Err(InvalidManifest::TooLong {
                    index,
                    offset: e.offset,
                    len: e.len,
                    max: params.max_size,
                });
            }
            expected = e.end();
        }
        if expected != size {
            return Err(InvalidManifest::Size {
                end: expected,
                size,
            });
        }
        let tree = match base {
            Some(b) => Tree::build_over(size, &entries, &b.tree, &b.entries),
            None => Tree::build(size, &entries),
        };
        Ok(Manifest {
            params,
            size,
            entries: Arc::new(entries),
            tree: Arc::new(tree),
        })
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The Merkle root: the identity of this generation of the image.
    pub fn root(&self) -> Hash {
        self.tree.root()
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Index of the entry holding byte `offset`, if `offset < size`.
    pub fn index_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.size {
            return None;
        }
        Some(self.entries.partition_point(|e| e.end() <= offset))
    }

    /// Index of the entry that starts exactly at `offset`, if one does.
    pub fn index_starting_at(&self, offset: u64) -> Option<usize> {
        let i = self.entries.partition_point(|e| e.offset < offset);
        (i < self.entries.len() && self.entries[i].offset == offset).then_some(i)
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            min_chunk: u64::MAX,
            ..Stats::default()
        };
        for e in self.entries.iter() {
            if e.is_zero() {
                s.zero_extents += 1;
                s.zero_bytes += e.len;
            } else {
                s.chunks += 1;
                s.data_bytes += e.len;
                s.min_chunk = s.min_chunk.min(e.len);
                s.max_chunk = s.max_chunk.max(e.len);
            }
        }
        s.avg_chunk = s.data_bytes.checked_div(s.chunks).unwrap_or(0);
        if s.chunks == 0 {
            s.min_chunk = 0;
        }
        s
    }
}
