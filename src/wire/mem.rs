//! An in-memory replica store: what the in-process simulation of the protocol (`sim`) and the
//! session fuzz target (`fuzz/fuzz_targets/session.rs`) drive a [`ReplicaSession`] against.
//! No disk: the behaviour under test is the session's, not the store's.
//!
//! [`ReplicaSession`]: super::replica::ReplicaSession

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use super::frame::{self, Hash, ImageState};
use super::primary::{ChunkSource, Generation, PeerKnowledge, group_root};
use super::replica::{self, ReplicaStore};
use crate::chunk::{ChunkParams, chunk_full, rechunk};
use crate::dirty::RangeSet;
use crate::manifest::{Kind, Manifest};

/// The image `a` the session fuzz target's store starts with (what the seeds' first sync
/// ships).
pub fn seed_a() -> Vec<u8> {
    let mut v = vec![0u8; 100_000];
    blake3::Hasher::new()
        .update(b"seed a")
        .finalize_xof()
        .fill(&mut v);
    v
}

/// The bytes of image `a` the seeds' patch sync changes.
pub const PATCHED: std::ops::Range<u64> = 50_000..50_100;

/// Image `a` as the seeds' patch sync ships it: [`PATCHED`] filled with 7s.
pub fn seed_a_patched() -> Vec<u8> {
    let mut v = seed_a();
    v[PATCHED.start as usize..PATCHED.end as usize].fill(7);
    v
}

/// What the primary ships in the seeds' patch sync (what the `primary_session` fuzz target
/// drives): generation 2, image `a` as [`seed_a_patched`], to a replica it knows at
/// generation 1 with [`PATCHED`] dirty since.
pub fn patch_sync() -> (Arc<Generation>, PeerKnowledge) {
    let (old, _) = chunk_full(&seed_a(), params()).expect("chunks");
    let (new, _) =
        rechunk(&old, &seed_a_patched(), std::slice::from_ref(&PATCHED)).expect("chunks");
    let images = BTreeMap::from([("a".to_string(), Arc::new(new))]);
    let g = Arc::new(Generation {
        number: 2,
        group_root: group_root(&images),
        images,
    });
    let mut dirty = RangeSet::new();
    dirty.insert(PATCHED);
    let known = PeerKnowledge {
        generation: 1,
        manifests: BTreeMap::from([("a".to_string(), Arc::new(old))]),
        dirty: BTreeMap::from([("a".to_string(), dirty)]),
    };
    (g, known)
}

/// Images in memory, by path, as a primary's chunk source.
pub struct Images(pub BTreeMap<String, Vec<u8>>);

impl ChunkSource for Images {
    fn read(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let b = self
            .0
            .get(path)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, path.to_string()))?;
        let mut out = vec![0u8; len as usize];
        let end = (offset + len).min(b.len() as u64);
        if offset < end {
            out[..(end - offset) as usize].copy_from_slice(&b[offset as usize..end as usize]);
        }
        Ok(out)
    }
}

/// A store as it is after the seeds' first sync: image `a` ([`seed_a`]) at generation 1.
pub fn after_first_sync() -> MemStore {
    let mut store = MemStore::default();
    store.seed("a", seed_a());
    let manifests = store
        .images
        .iter()
        .map(|(p, (_, m))| (p.clone(), Arc::new(m.clone())))
        .collect();
    store.generation = 1;
    store.group_root = group_root(&manifests);
    store
}

/// Small chunks, so that a few hundred KiB make many.
pub fn params() -> ChunkParams {
    ChunkParams {
        min_size: 512,
        avg_size: 2048,
        max_size: 8192,
        zero_min: 4096,
    }
}

#[derive(Clone, Default)]
pub struct MemStore {
    /// Acknowledges with a root other than the one committed.
    pub lie: bool,
    pub generation: u64,
    pub group_root: Hash,
    pub epoch: u64,
    pub images: BTreeMap<String, (Vec<u8>, Manifest)>,
    pub staged: HashMap<Hash, Vec<u8>>,
}

impl MemStore {
    pub fn seed(&mut self, path: &str, bytes: Vec<u8>) {
        let (m, _) = chunk_full(&bytes, params()).unwrap();
        self.images.insert(path.into(), (bytes, m));
    }

    fn find(&self, h: &Hash) -> Option<Vec<u8>> {
        if let Some(d) = self.staged.get(h) {
            return Some(d.clone());
        }
        for (bytes, m) in self.images.values() {
            for e in m.entries() {
                if e.hash().is_some_and(|x| x.as_bytes() == h) {
                    return Some(bytes[e.offset as usize..e.end() as usize].to_vec());
                }
            }
        }
        None
    }
}

impl ReplicaStore for MemStore {
    fn params(&self) -> ChunkParams {
        params()
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
    fn generation(&self) -> (u64, Hash) {
        let mut root = self.group_root;
        if self.lie && self.generation > 0 {
            root[0] ^= 1;
        }
        (self.generation, root)
    }
    fn images(&self) -> Vec<ImageState> {
        self.images
            .iter()
            .map(|(p, (_, m))| ImageState {
                path: p.clone(),
                size: m.size(),
                root: *m.root().as_bytes(),
            })
            .collect()
    }
    fn manifest(&self, path: &str) -> Option<&Manifest> {
        self.images.get(path).map(|(_, m)| m)
    }
    fn have(&self, hash: &Hash) -> bool {
        self.find(hash).is_some()
    }
    fn base_bytes(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let (b, _) = self.images.get(path).ok_or(std::io::ErrorKind::NotFound)?;
        let mut out = vec![0u8; len as usize];
        let end = (offset + len).min(b.len() as u64);
        if offset < end {
            out[..(end - offset) as usize].copy_from_slice(&b[offset as usize..end as usize]);
        }
        Ok(out)
    }
    fn stage(&mut self, hash: &Hash, data: &[u8]) -> std::io::Result<()> {
        self.staged.insert(*hash, data.to_vec());
        Ok(())
    }
    fn commit(&mut self, g: &replica::Generation) -> anyhow::Result<()> {
        for c in &g.changes {
            if let frame::NsChange::Remove { path } = c {
                self.images.remove(path);
            }
        }
        let mut built = Vec::new();
        for (path, m) in &g.images {
            let mut bytes = vec![0u8; m.size() as usize];
            for e in m.entries() {
                if let Kind::Data(h) = e.kind {
                    let d = self.find(h.as_bytes()).expect("every chunk is here");
                    bytes[e.offset as usize..e.end() as usize].copy_from_slice(&d);
                }
            }
            built.push((path.clone(), bytes, m.clone()));
        }
        for (path, bytes, m) in built {
            self.images.insert(path, (bytes, m));
        }
        self.generation = g.number;
        self.group_root = g.group_root;
        self.staged.clear();
        Ok(())
    }
}
