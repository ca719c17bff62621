//! The two sides of the protocol driven against each other in memory, as quinn-proto's tests
//! do: no sockets, no disk, every frame through the real encoder and decoder.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::frame::{self, Frame};
pub(super) use super::mem::{Images as Src, MemStore, params};
use super::primary::{self, ChunkSource, Claim, Generation, Out, PeerKnowledge, PrimarySession};
use super::replica::{self, ReplicaSession};
use crate::chunk::{chunk_full, rechunk};
use crate::dirty::RangeSet;
use crate::manifest::Manifest;
use crate::testutil::random;

/// Sends a frame through the codec, as the wire would.
fn wire(f: &Frame) -> Frame {
    let b = frame::encode(f);
    frame::decode(&b[4..]).unwrap()
}

struct Run {
    result: Result<primary::Acked, primary::Ended>,
    /// Every frame the replica got, encoded as on the wire (a seed for the session fuzz
    /// target).
    sent: Vec<u8>,
    /// Every frame the primary got, encoded (a seed for the primary_session fuzz target).
    answered: Vec<u8>,
    data_bytes: u64,
    patches: u64,
    reconciled: Vec<String>,
    /// Frames the replica got before the primary had any answer from it.
    first_round: usize,
}

/// Ships `images` as generation `number` to `store`, with what the primary believes it holds.
fn ship(
    images: &BTreeMap<String, Vec<u8>>,
    manifests: &BTreeMap<String, Arc<Manifest>>,
    number: u64,
    known: PeerKnowledge,
    store: &mut MemStore,
) -> Run {
    ship_from(&Src(images.clone()), manifests, number, known, store)
}

/// [`ship`], reading the images from `src`.
fn ship_from(
    src: &dyn ChunkSource,
    manifests: &BTreeMap<String, Arc<Manifest>>,
    number: u64,
    known: PeerKnowledge,
    store: &mut MemStore,
) -> Run {
    ship_ahead(src, manifests, number, known, store, None)
}

/// Sends `jobs`' frames, counting their bytes and patches.
fn made(
    jobs: Vec<primary::Job>,
    src: &dyn ChunkSource,
    bytes: &mut u64,
    patches: &mut u64,
) -> Vec<Frame> {
    jobs.iter()
        .map(|job| {
            let (f, n) = primary::make_frame(job, src).unwrap();
            *bytes += n;
            *patches += matches!(f, Frame::Patch { .. }) as u64;
            f
        })
        .collect()
}

/// [`ship_from`], planned ahead of the replica's `Welcome` on `last` when given (a session on
/// a kept connection): the plan follows the `Hello` at once, and behind it up to `budget`
/// bytes of its chunks, before the wants.
fn ship_ahead(
    src: &dyn ChunkSource,
    manifests: &BTreeMap<String, Arc<Manifest>>,
    number: u64,
    known: PeerKnowledge,
    store: &mut MemStore,
    last: Option<(&primary::Acked, u64)>,
) -> Run {
    let g = Arc::new(Generation {
        number,
        group_root: primary::group_root(manifests),
        images: manifests.clone(),
    });
    let (mut p, hello) = PrimarySession::new(&Claim::first("test"), params(), g, known);
    let mut r = ReplicaSession::default();
    let mut to_replica = vec![hello];
    let (mut data_bytes, mut patches) = (0, 0);
    if let Some((last, budget)) = last {
        to_replica.extend(p.plan_ahead(last));
        let early = p.early_jobs(budget);
        to_replica.extend(made(early, src, &mut data_bytes, &mut patches));
    }
    let (mut sent, mut answered) = (Vec::new(), Vec::new());
    let first_round = to_replica.len();
    for _ in 0..10_000 {
        let mut to_primary = Vec::new();
        for f in to_replica.drain(..) {
            sent.extend(frame::encode(&f));
            to_primary.extend(r.handle(store, wire(&f)));
        }
        for f in to_primary {
            answered.extend(frame::encode(&f));
            for o in p.handle(wire(&f)) {
                match o {
                    Out::Send(f) => to_replica.push(f),
                    Out::Jobs => {
                        let jobs = std::iter::from_fn(|| p.next_job()).collect();
                        to_replica.extend(made(jobs, src, &mut data_bytes, &mut patches));
                        to_replica.extend(p.data_sent());
                    }
                    Out::Done(result) => {
                        return Run {
                            result,
                            sent,
                            answered,
                            data_bytes,
                            patches,
                            reconciled: p.reconciled.clone(),
                            first_round,
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

/// A session planned ahead of the replica's `Welcome` (on the state the last acknowledgement
/// on a kept connection reported) commits as one planned on the `Welcome` does: its plan sent
/// with the `Hello`, and behind it the chunks a round trip of the path carries, before the
/// wants; what the wants ask for beyond those follows, and nothing is sent twice. Planned on
/// a state the replica no longer holds, it ends as stale (the transport connects anew and
/// plans on the answer), and the replica commits nothing of it.
#[test]
fn a_session_planned_ahead_commits_and_a_stale_plan_commits_nothing() {
    let mut store = MemStore::default();
    let mut images = BTreeMap::from([("a".to_string(), random(200_000, 4))]);
    let ms1 = manifests(&images);
    let first = ship(&images, &ms1, 1, PeerKnowledge::default(), &mut store);
    let acked1 = first.result.unwrap();
    let change = |images: &mut BTreeMap<String, Vec<u8>>,
                  base: &BTreeMap<String, Arc<Manifest>>,
                  generation: u64,
                  at: &[usize]| {
        let img = images.get_mut("a").unwrap();
        let mut dirty = RangeSet::new();
        let mut written = Vec::new();
        for &at in at {
            img[at..at + 100].fill(generation as u8);
            written.push(at as u64..at as u64 + 100);
            dirty.insert(at as u64..at as u64 + 100);
        }
        let (new, _) = rechunk(&base["a"], &img.clone(), &written).unwrap();
        let known = PeerKnowledge {
            generation: generation - 1,
            manifests: base.clone(),
            dirty: BTreeMap::from([("a".to_string(), dirty)]),
        };
        (BTreeMap::from([("a".to_string(), Arc::new(new))]), known)
    };
    let names = |sent: &[u8], n: usize| {
        let (mut at, mut out) = (0, Vec::new());
        while at < sent.len() && out.len() < n {
            let len = u32::from_le_bytes(sent[at..at + 4].try_into().unwrap()) as usize;
            out.push(replica::frame_name(
                &frame::decode(&sent[at + 4..at + 4 + len]).unwrap(),
            ));
            at += 4 + len;
        }
        out
    };

    // Everything fits in a round trip: the patch follows the plan, before any answer.
    let (ms2, known) = change(&mut images, &ms1, 2, &[50_000]);
    let run = ship_ahead(
        &Src(images.clone()),
        &ms2,
        2,
        known,
        &mut store,
        Some((&acked1, u64::MAX)),
    );
    let acked2 = run.result.unwrap();
    assert_eq!(acked2.generation, 2);
    assert_same(&images, &store);
    assert_eq!(run.patches, 1);
    assert!(run.data_bytes <= 110, "sent {}", run.data_bytes);
    assert_eq!(names(&run.sent, 4), ["Hello", "Begin", "Plan", "Patch"]);
    assert_eq!(run.first_round, 4, "the patch went before the wants");

    // Two chunks change, one fits ahead of the wants: the other follows them, each sent once.
    let (ms3, known) = change(&mut images, &ms2, 3, &[20_000, 150_000]);
    let run = ship_ahead(
        &Src(images.clone()),
        &ms3,
        3,
        known,
        &mut store,
        Some((&acked2, 1)),
    );
    let acked3 = run.result.unwrap();
    assert_same(&images, &store);
    assert_eq!(run.patches, 2, "each chunk sent once");
    assert!(run.data_bytes <= 220, "sent {}", run.data_bytes);
    assert_eq!(names(&run.sent, 4), ["Hello", "Begin", "Plan", "Patch"]);
    assert_eq!(run.first_round, 4, "one patch went before the wants");

    // A new image, a copy of the other: nothing goes ahead (the replica holds every chunk of
    // it already, and its wants are empty), and nothing is sent.
    let mut copied = images.clone();
    copied.insert("b".to_string(), images["a"].clone());
    let ms_copy = manifests(&copied);
    let known = PeerKnowledge {
        generation: 3,
        manifests: ms3.clone(),
        dirty: BTreeMap::new(),
    };
    let run = ship_ahead(
        &Src(copied.clone()),
        &ms_copy,
        4,
        known,
        &mut store,
        Some((&acked3, u64::MAX)),
    );
    let acked4 = run.result.unwrap();
    assert_same(&copied, &store);
    assert_eq!((run.data_bytes, run.first_round), (0, 3), "nothing ahead");

    // Planned on generation 2 while the replica holds 4: stale, and nothing is committed.
    let before = store.images["a"].0.clone();
    let (ms5, known) = change(&mut images, &ms2, 3, &[120_000]);
    let run = ship_ahead(
        &Src(images.clone()),
        &ms5,
        5,
        known,
        &mut store,
        Some((&acked2, u64::MAX)),
    );
    assert!(
        matches!(&run.result, Err(primary::Ended::Stale(m)) if m.contains("generation 4")),
        "{:?}",
        run.result
    );
    assert_eq!((store.generation, store.group_root), (4, acked4.group_root));
    assert!(
        store.images["a"].0 == before,
        "the replica kept generation 4"
    );
}

/// The seeds of the two session fuzz targets: the frames the replica got in a first sync and
/// in a patch sync (`session`), and the replica's answers in the patch sync
/// (`primary_session`). Replayed against each target's starting state, the patch sync
/// commits. `FERRY_WRITE_CORPUS=DIR cargo test --lib write_session_corpus` writes them into
/// DIR/session and DIR/primary_session (DIR = `fuzz/corpus`).
#[test]
fn write_session_corpus() {
    let (first, patch) = first_and_patch_sessions();
    // The patch sync's frames, replayed against the replica target's store, commit.
    let mut store = super::mem::after_first_sync();
    let mut s = ReplicaSession::default();
    let mut d = frame::Decoder::default();
    d.push(&patch.sent);
    while let Ok(Some(f)) = d.next_frame() {
        s.handle(&mut store, f);
    }
    assert_eq!(store.generation, 2, "the seed does not reach a commit");
    // Its answers, replayed into the primary target's session, are acknowledged.
    let (g, known) = super::mem::patch_sync();
    let (mut p, _) = PrimarySession::new(&Claim::first("test"), params(), g, known);
    let mut d = frame::Decoder::default();
    d.push(&patch.answered);
    let mut acked = false;
    while let Ok(Some(f)) = d.next_frame() {
        for o in p.handle(f) {
            match o {
                Out::Jobs => {
                    while p.next_job().is_some() {}
                    p.data_sent();
                }
                Out::Done(r) => acked = r.is_ok(),
                Out::Send(_) => {}
            }
        }
    }
    assert!(acked, "the primary seed does not reach an acknowledgement");
    let Some(dir) = std::env::var_os("FERRY_WRITE_CORPUS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::write(dir.join("session/first-sync"), first.sent).unwrap();
    std::fs::write(dir.join("session/patch-sync"), patch.sent).unwrap();
    std::fs::create_dir_all(dir.join("primary_session")).unwrap();
    std::fs::write(dir.join("primary_session/patch-sync"), patch.answered).unwrap();
}

/// A first sync of image `a` ([`super::mem::seed_a`]) to an empty store, and a second sync
/// that patches it ([`super::mem::patch_sync`]).
fn first_and_patch_sessions() -> (Run, Run) {
    let mut store = MemStore::default();
    let images = BTreeMap::from([("a".to_string(), super::mem::seed_a())]);
    let first = ship(
        &images,
        &manifests(&images),
        1,
        PeerKnowledge::default(),
        &mut store,
    );
    let (g, known) = super::mem::patch_sync();
    let images = BTreeMap::from([("a".to_string(), super::mem::seed_a_patched())]);
    let second = ship(&images, &g.images, 2, known, &mut store);
    second.result.as_ref().unwrap();
    (first, second)
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
fn a_session_overtaken_by_a_promotion_commits_nothing_more() {
    let mut store = MemStore::default();
    let mut s = ReplicaSession::default();
    let hello = Frame::Hello {
        version: frame::VERSION,
        epoch: 0,
        node: "a".into(),
        params: params(),
        namespace: "a".into(),
        takeover: None,
    };
    assert!(matches!(
        s.handle(&mut store, hello)[..],
        [Frame::Welcome { .. }]
    ));
    // A promotion elsewhere takes the namespace over (epoch 3) while the session is open.
    store.epoch = 3;
    let begin = Frame::Begin {
        generation: 1,
        base_generation: 0,
        group_root: [0; 32],
        changes: vec![],
        images: 0,
    };
    match &s.handle(&mut store, begin)[..] {
        [Frame::Refuse { code, reason }] => {
            assert_eq!(*code, frame::RefuseCode::Fenced);
            assert!(reason.contains("taken over at epoch 3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(s.is_closed());
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

/// The images as a sync's narrowed copy-before-write window keeps them: a read of anything
/// else is refused (the real window would return bytes written since the freeze).
struct Narrowed {
    images: Src,
    kept: BTreeMap<String, RangeSet>,
}

impl ChunkSource for Narrowed {
    fn read(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let kept = self
            .kept
            .get(path)
            .is_some_and(|k| k.contains_range(offset..offset + len));
        if !kept {
            return Err(std::io::Error::other(format!(
                "{path} [{offset}, {}) is not in the narrowed window",
                offset + len
            )));
        }
        self.images.read(path, offset, len)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A session reads nothing that `primary::may_read` leaves out of the window, for a replica
    /// whose base and changed bytes the primary knows, whatever the writes.
    #[test]
    fn a_session_reads_only_what_the_narrowed_window_keeps(
        len in 20_000usize..300_000,
        writes in prop::collection::vec((0usize..300_000, 1usize..20_000, any::<u8>()), 1..12),
        grow in 0usize..30_000,
    ) {
        let old = random(len, 21);
        let mut store = MemStore::default();
        let images = BTreeMap::from([("img".to_string(), old.clone())]);
        let ms = manifests(&images);
        ship(&images, &ms, 1, PeerKnowledge::default(), &mut store).result.unwrap();
        let mut new = old.clone();
        new.resize(len + grow, 0);
        let mut dirty = RangeSet::new();
        if grow > 0 {
            dirty.insert(len as u64..(len + grow) as u64);
        }
        for (at, n, b) in writes {
            let at = at % new.len();
            let end = (at + n).min(new.len());
            new[at..end].fill(b);
            dirty.insert(at as u64..end as u64);
        }
        let held = ms["img"].clone();
        let (m, _) = rechunk(&held, &new, &dirty.to_vec()).unwrap();
        let mut kept = RangeSet::new();
        for r in primary::may_read(&held, Some(&dirty), &m) {
            kept.insert(r);
        }
        let known = PeerKnowledge {
            generation: 1,
            manifests: ms.clone(),
            dirty: BTreeMap::from([("img".to_string(), dirty)]),
        };
        let images = BTreeMap::from([("img".to_string(), new)]);
        let src = Narrowed {
            images: Src(images.clone()),
            kept: BTreeMap::from([("img".to_string(), kept)]),
        };
        let ms2 = BTreeMap::from([("img".to_string(), Arc::new(m))]);
        ship_from(&src, &ms2, 2, known, &mut store).result.unwrap();
        assert_same(&images, &store);
    }

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
