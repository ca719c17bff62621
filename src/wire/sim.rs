//! The two sides of the protocol driven against each other in memory, as quinn-proto's tests
//! do: no sockets, no disk, every frame through the real encoder and decoder.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;

use super::frame::{self, Frame, Hash, ImageState};
use super::primary::{self, ChunkSource, Claim, Generation, Out, PeerKnowledge, PrimarySession};
use super::replica::{self, ReplicaSession, ReplicaStore};
use crate::chunk::{ChunkParams, chunk_full, rechunk};
use crate::dirty::RangeSet;
use crate::manifest::{Kind, Manifest};
use crate::testutil::random;

pub(super) fn params() -> ChunkParams {
    ChunkParams {
        min_size: 512,
        avg_size: 2048,
        max_size: 8192,
        zero_min: 4096,
    }
}

#[derive(Default)]
pub(super) struct MemStore {
    /// Acknowledges with a root other than the one committed.
    lie: bool,
    pub(super) generation: u64,
    group_root: Hash,
    epoch: u64,
    pub(super) images: BTreeMap<String, (Vec<u8>, Manifest)>,
    pub(super) staged: HashMap<Hash, Vec<u8>>,
}

impl MemStore {
    pub(super) fn seed(&mut self, path: &str, bytes: Vec<u8>) {
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

pub(super) struct Src(pub(super) BTreeMap<String, Vec<u8>>);

impl ChunkSource for Src {
    fn read(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let b = &self.0[path];
        let mut out = vec![0u8; len as usize];
        let end = (offset + len).min(b.len() as u64);
        if offset < end {
            out[..(end - offset) as usize].copy_from_slice(&b[offset as usize..end as usize]);
        }
        Ok(out)
    }
}

/// Sends a frame through the codec, as the wire would.
fn wire(f: &Frame) -> Frame {
    let b = frame::encode(f);
    frame::decode(&b[4..]).unwrap()
}

struct Run {
    result: Result<primary::Acked, primary::Ended>,
    data_bytes: u64,
    patches: u64,
    reconciled: Vec<String>,
}

/// Ships `images` as generation `number` to `store`, with what the primary believes it holds.
fn ship(
    images: &BTreeMap<String, Vec<u8>>,
    manifests: &BTreeMap<String, Arc<Manifest>>,
    number: u64,
    known: PeerKnowledge,
    store: &mut MemStore,
) -> Run {
    let g = Arc::new(Generation {
        number,
        group_root: primary::group_root(manifests),
        images: manifests.clone(),
    });
    let src = Src(images.clone());
    let (mut p, hello) = PrimarySession::new(&Claim::first("test"), params(), g, known);
    let mut r = ReplicaSession::default();
    let mut to_replica = vec![hello];
    let (mut data_bytes, mut patches) = (0, 0);
    for _ in 0..10_000 {
        let mut to_primary = Vec::new();
        for f in to_replica.drain(..) {
            to_primary.extend(r.handle(store, wire(&f)));
        }
        for f in to_primary {
            for o in p.handle(wire(&f)) {
                match o {
                    Out::Send(f) => to_replica.push(f),
                    Out::Jobs => {
                        while let Some(job) = p.next_job() {
                            let (f, n) = primary::make_frame(&job, &src).unwrap();
                            data_bytes += n;
                            patches += matches!(f, Frame::Patch { .. }) as u64;
                            to_replica.push(f);
                        }
                        to_replica.extend(p.data_sent());
                    }
                    Out::Done(result) => {
                        return Run {
                            result,
                            data_bytes,
                            patches,
                            reconciled: p.reconciled.clone(),
                        };
                    }
                }
            }
        }
    }
    panic!("the session did not finish");
}

pub(super) fn manifests(images: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Arc<Manifest>> {
    images
        .iter()
        .map(|(p, b)| (p.clone(), Arc::new(chunk_full(b, params()).unwrap().0)))
        .collect()
}

fn assert_same(images: &BTreeMap<String, Vec<u8>>, store: &MemStore) {
    assert_eq!(
        images.keys().collect::<Vec<_>>(),
        store.images.keys().collect::<Vec<_>>()
    );
    for (p, b) in images {
        assert!(store.images[p].0 == *b, "{p} differs");
    }
}

#[test]
fn a_first_sync_then_a_patch_sync() {
    let mut store = MemStore::default();
    let mut images = BTreeMap::from([("a".to_string(), random(200_000, 1))]);
    let ms = manifests(&images);
    let run = ship(&images, &ms, 1, PeerKnowledge::default(), &mut store);
    run.result.unwrap();
    assert_same(&images, &store);
    // Known base, known dirty bytes: the change goes as patches.
    let old = ms["a"].clone();
    let img = images.get_mut("a").unwrap();
    img[50_000..50_100].fill(7);
    img[150_000..150_010].fill(9);
    let (new, _) = rechunk(&old, &img.clone(), &[50_000..50_100, 150_000..150_010]).unwrap();
    let mut dirty = RangeSet::new();
    dirty.insert(50_000..50_100);
    dirty.insert(150_000..150_010);
    let known = PeerKnowledge {
        generation: 1,
        manifests: ms.clone(),
        dirty: BTreeMap::from([("a".to_string(), dirty)]),
    };
    let ms2 = BTreeMap::from([("a".to_string(), Arc::new(new))]);
    let run = ship(&images, &ms2, 2, known, &mut store);
    run.result.unwrap();
    assert_same(&images, &store);
    assert!(run.patches >= 1);
    assert!(run.data_bytes <= 110, "sent {}", run.data_bytes);
}

#[test]
fn a_stale_patch_base_falls_back_to_the_whole_chunk() {
    let mut store = MemStore::default();
    let mut images = BTreeMap::from([("a".to_string(), random(100_000, 2))]);
    let ms = manifests(&images);
    ship(&images, &ms, 1, PeerKnowledge::default(), &mut store)
        .result
        .unwrap();
    // The primary believes the replica holds an older version than it does (wrong dirty set).
    let img = images.get_mut("a").unwrap();
    img[10_000..10_050].fill(1);
    img[60_000..60_050].fill(2);
    let ms2 = manifests(&images);
    let mut dirty = RangeSet::new();
    dirty.insert(10_000..10_050); // the second change is missing: its patch cannot verify
    let known = PeerKnowledge {
        generation: 1,
        manifests: ms,
        dirty: BTreeMap::from([("a".to_string(), dirty)]),
    };
    ship(&images, &ms2, 2, known, &mut store).result.unwrap();
    assert_same(&images, &store);
}

#[test]
fn a_fenced_primary_and_a_lying_replica_fail_the_session() {
    let images = BTreeMap::from([("a".to_string(), random(10_000, 3))]);
    let ms = manifests(&images);
    let mut store = MemStore {
        epoch: 5,
        ..MemStore::default()
    };
    let run = ship(&images, &ms, 1, PeerKnowledge::default(), &mut store);
    match run.result.unwrap_err() {
        primary::Ended::Refused(r) => {
            assert_eq!(r.code, frame::RefuseCode::Fenced);
            assert!(r.reason.contains("fenced"), "{r}");
        }
        e => panic!("{e}"),
    }
    let mut store = MemStore {
        lie: true,
        ..MemStore::default()
    };
    let run = ship(&images, &ms, 1, PeerKnowledge::default(), &mut store);
    assert!(
        matches!(run.result.unwrap_err(), primary::Ended::Broken(e) if e.contains("another root"))
    );
}

#[test]
fn invalid_paths_are_refused() {
    for p in ["../etc/passwd", "/abs", "a/../../b", ".ferry/x", "", "a\0b"] {
        assert!(!replica::valid_path(p), "{p}");
    }
    for p in ["a", "vms/a.qcow2", "x.ferry"] {
        assert!(replica::valid_path(p), "{p}");
    }
    let mut store = MemStore::default();
    let mut s = ReplicaSession::default();
    s.handle(&mut store, Claim::first("x").hello(params()));
    let out = s.handle(
        &mut store,
        Frame::Begin {
            generation: 1,
            base_generation: 0,
            group_root: [0; 32],
            changes: vec![frame::NsChange::Remove {
                path: "../x".into(),
            }],
            images: 0,
        },
    );
    assert!(
        matches!(&out[0], Frame::Refuse { code: frame::RefuseCode::Protocol, reason }
        if reason.contains("invalid image path"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the replica holds and whatever the primary believes it holds, the replica ends
    /// with exactly the primary's images.
    #[test]
    fn the_replica_always_ends_with_the_primary_images(
        old_len in 0usize..120_000,
        new_len in 0usize..140_000,
        writes in prop::collection::vec((0usize..140_000, 1usize..3000, any::<u8>()), 0..5),
        primary_knows in any::<bool>(),
        zeros in prop::option::of((0usize..100_000, 4096usize..30_000)),
        extra_on_replica in any::<bool>(),
    ) {
        let mut old = random(old_len, 11);
        if let Some((at, n)) = zeros {
            let at = at.min(old.len());
            let end = (at + n).min(old.len());
            old[at..end].fill(0);
        }
        let mut store = MemStore::default();
        store.seed("img", old.clone());
        if extra_on_replica {
            store.seed("stale-leftover", random(5000, 12));
        }
        store.generation = 3;
        let mut new = old.clone();
        new.resize(new_len, 0);
        for (at, n, b) in writes {
            let at = at.min(new.len());
            let end = (at + n).min(new.len());
            new[at..end].fill(b);
        }
        let images = BTreeMap::from([("img".to_string(), new)]);
        let ms = manifests(&images);
        let known = if primary_knows {
            PeerKnowledge {
                generation: 3,
                manifests: BTreeMap::from([("img".to_string(), Arc::new(store.images["img"].1.clone()))]),
                dirty: BTreeMap::new(),
            }
        } else {
            PeerKnowledge::default()
        };
        let run = ship(&images, &ms, 2, known, &mut store);
        let acked = run.result.unwrap();
        prop_assert_eq!(acked.generation, 4, "numbered past the replica's 3");
        assert_same(&images, &store);
        if !primary_knows && old_len > 0 && store.images.contains_key("img") {
            prop_assert!(run.reconciled.iter().any(|p| p == "img") || ms["img"].root() == store.images["img"].1.root());
        }
    }
}
