//! The two sessions over a fault-injecting in-memory link, many attempts in a row as the sync
//! engine makes them: random fault schedules (data frames reordered, delayed and duplicated,
//! the connection cut at any frame and the transfer resumed by a new session, a replica that
//! stops answering, garbage on the wire in either direction). Every run must end in a
//! committed generation equal to the primary's, or in a clear failure with the replica still
//! at its previous generation; a resumed session never resends a chunk the replica already
//! staged.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use super::frame::{self, Frame};
use super::primary::{self, Claim, Ended, Generation, Out, PeerKnowledge, PrimarySession};
use super::replica::{ReplicaSession, ReplicaStore};
use super::sim::{MemStore, Src, manifests, params};
use crate::testutil::random;

/// What the link does to one frame.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Pass,
    /// A data frame overtakes nothing: it is held back behind `n` later frames.
    Delay(u8),
    /// A data frame arrives twice.
    Duplicate,
    /// The connection is cut before the frame arrives: the attempt ends.
    Cut,
    /// From here on the replica answers nothing: the attempt times out.
    Silence,
    /// One byte of the encoded frame is flipped on the way.
    Garbage(u16),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        40 => Just(Fault::Pass),
        6 => (1u8..6).prop_map(Fault::Delay),
        3 => Just(Fault::Duplicate),
        2 => Just(Fault::Cut),
        1 => Just(Fault::Silence),
        1 => any::<u16>().prop_map(Fault::Garbage),
    ]
}

/// How one attempt ended.
#[derive(Debug)]
enum End {
    Acked(primary::Acked),
    /// The session ended with an error (a refusal, a broken rule, an undecodable frame).
    Failed(String),
    /// The connection was cut or went silent: worth another attempt.
    Lost,
}

/// A frame in flight and how many frames it still lets pass before it is delivered.
struct InFlight {
    to_replica: bool,
    bytes: Vec<u8>,
    hold: u8,
}

fn is_data(f: &Frame) -> bool {
    matches!(f, Frame::Chunk { .. } | Frame::Patch { .. })
}

/// One attempt: a new pair of sessions over the link, with faults drawn from `faults` in turn.
/// Returns how it ended and the chunks the primary sent that the store held at the start.
fn attempt(
    g: &Arc<Generation>,
    known: &PeerKnowledge,
    src: &Src,
    store: &mut MemStore,
    faults: &mut impl Iterator<Item = Fault>,
) -> (End, usize) {
    let held_at_start: HashSet<[u8; 32]> = store.staged.keys().copied().collect();
    let mut resent = 0;
    let (mut p, hello) =
        PrimarySession::new(&Claim::first("test"), params(), g.clone(), known.clone());
    let mut r = ReplicaSession::default();
    let mut wire: VecDeque<InFlight> = VecDeque::new();
    let mut silent = false;
    let send = |wire: &mut VecDeque<InFlight>, f: &Frame, to_replica: bool| {
        wire.push_back(InFlight {
            to_replica,
            bytes: frame::encode(f),
            hold: 0,
        });
    };
    send(&mut wire, &hello, true);
    for _ in 0..200_000 {
        let Some(mut m) = wire.pop_front() else {
            // Nothing in flight and no end: the session waits for a peer that went silent.
            return (End::Lost, resent);
        };
        if m.hold > 0 {
            m.hold -= 1;
            let at = wire.len().min(1);
            wire.insert(at, m);
            continue;
        }
        let f = frame::decode(&m.bytes[4..]).expect("frames on the wire are well formed");
        let mut deliver = vec![m.bytes];
        match faults.next().unwrap_or(Fault::Pass) {
            Fault::Pass => {}
            Fault::Delay(n) if is_data(&f) && m.to_replica => {
                wire.push_back(InFlight {
                    to_replica: true,
                    bytes: deliver.pop().unwrap(),
                    hold: n,
                });
            }
            Fault::Duplicate if is_data(&f) && m.to_replica => deliver.push(deliver[0].clone()),
            Fault::Delay(_) | Fault::Duplicate => {}
            Fault::Cut => return (End::Lost, resent),
            Fault::Silence => silent = true,
            Fault::Garbage(at) => {
                let b = &mut deliver[0];
                let i = 4 + at as usize % (b.len() - 4);
                b[i] ^= 0x5a;
            }
        }
        for bytes in deliver {
            if m.to_replica {
                let out = match frame::decode(&bytes[4..]) {
                    Ok(f) => r.handle(store, f),
                    // The transport refuses what it cannot decode, as the daemon does.
                    Err(e) => {
                        r.close();
                        vec![frame::Refusal::from(format!("bad frame: {e}")).frame()]
                    }
                };
                if !silent {
                    for f in out {
                        send(&mut wire, &f, false);
                    }
                }
                continue;
            }
            let f = match frame::decode(&bytes[4..]) {
                Ok(f) => f,
                Err(e) => return (End::Failed(format!("undecodable answer: {e}")), resent),
            };
            for o in p.handle(f) {
                match o {
                    Out::Send(f) => send(&mut wire, &f, true),
                    Out::Jobs => {
                        while let Some(job) = p.next_job() {
                            let (f, _) = primary::make_frame(&job, src).unwrap();
                            if let Frame::Chunk { hash, .. } = &f
                                && held_at_start.contains(hash)
                            {
                                resent += 1;
                            }
                            send(&mut wire, &f, true);
                        }
                        if let Some(c) = p.data_sent() {
                            send(&mut wire, &c, true);
                        }
                    }
                    Out::Done(Ok(a)) => return (End::Acked(a), resent),
                    // A stale plan is worth another attempt, as `sync::link` takes it.
                    Out::Done(Err(Ended::Stale(_))) => return (End::Lost, resent),
                    Out::Done(Err(e)) => {
                        let why = match e {
                            Ended::Refused(r) => format!("refused ({:?}): {}", r.code, r.reason),
                            Ended::Broken(s) | Ended::Stale(s) => s,
                        };
                        return (End::Failed(why), resent);
                    }
                }
            }
        }
    }
    panic!("the attempt neither ended nor stalled");
}

/// A replica holding image `a` = `old` at generation 1, and what the primary knows of it.
fn replica_at_1(old: &[u8]) -> (MemStore, PeerKnowledge) {
    let mut store = MemStore::default();
    store.seed("a", old.to_vec());
    store.generation = 1;
    let known = PeerKnowledge {
        generation: 1,
        manifests: BTreeMap::from([("a".to_string(), Arc::new(store.images["a"].1.clone()))]),
        dirty: BTreeMap::new(),
    };
    (store, known)
}

/// Generation 2 of `images`, and a reader of them.
fn generation_2(images: &BTreeMap<String, Vec<u8>>) -> (Arc<Generation>, Src) {
    let ms = manifests(images);
    let g = Arc::new(Generation {
        number: 2,
        group_root: primary::group_root(&ms),
        images: ms,
    });
    (g, Src(images.clone()))
}

/// The images and manifests of the store, to compare before and after.
fn snapshot(store: &MemStore) -> (u64, [u8; 32], BTreeMap<String, Vec<u8>>) {
    let (g, root) = store.generation();
    let images = store
        .images
        .iter()
        .map(|(k, (b, _))| (k.clone(), b.clone()))
        .collect();
    (g, root, images)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_fault_schedule_ends_committed_or_cleanly_failed(
        base_len in 0usize..90_000,
        writes in prop::collection::vec((0usize..100_000, 1usize..6000, any::<u8>()), 1..6),
        grow in 0usize..30_000,
        second_image in any::<bool>(),
        schedule in prop::collection::vec(fault(), 0..400),
    ) {
        let old = random(base_len, 21);
        let (mut store, known) = replica_at_1(&old);
        let mut new = old.clone();
        new.resize(base_len + grow, 0);
        for (at, n, b) in &writes {
            let at = (*at).min(new.len());
            let end = (at + n).min(new.len());
            new[at..end].fill(*b);
        }
        let mut images = BTreeMap::from([("a".to_string(), new)]);
        if second_image {
            images.insert("b".into(), random(40_000, 22));
        }
        let (g, src) = generation_2(&images);
        let before = snapshot(&store);
        // Invariant 2: at every instant the replica holds a committed generation, the old one
        // or the new one (it may have committed while its acknowledgement was lost).
        let committed = |store: &MemStore| {
            let now = snapshot(store);
            now == before || (now.1 == g.group_root && now.2 == images)
        };

        let mut faults = schedule.into_iter();
        let mut outcome = None;
        for _ in 0..8 {
            let (end, resent) = attempt(&g, &known, &src, &mut store, &mut faults);
            prop_assert_eq!(resent, 0, "a resumed session resent staged chunks");
            match end {
                End::Lost => {
                    prop_assert!(committed(&store));
                    continue;
                }
                e => {
                    outcome = Some(e);
                    break;
                }
            }
        }
        match outcome {
            Some(End::Acked(a)) => {
                prop_assert_eq!(a.group_root, g.group_root);
                prop_assert_eq!(store.generation().1, g.group_root);
                prop_assert_eq!(snapshot(&store).2, images);
            }
            // A clear failure (or attempts exhausted): nothing half-applied.
            Some(End::Failed(why)) => {
                prop_assert!(!why.is_empty());
                prop_assert!(committed(&store));
            }
            Some(End::Lost) => unreachable!(),
            None => prop_assert!(committed(&store)),
        }
    }
}

/// Without faults every schedule commits: the property above is not passing by failing.
#[test]
fn a_clean_link_commits_and_a_cut_resumes_without_resending() {
    let (mut store, known) = replica_at_1(&random(60_000, 31));
    let images = BTreeMap::from([
        ("a".to_string(), random(60_000, 32)),
        ("b".to_string(), random(50_000, 33)),
    ]);
    let (g, src) = generation_2(&images);
    // Cut after 30 frames: some chunks are staged.
    let mut faults = (0..30).map(|_| Fault::Pass).chain([Fault::Cut]);
    let (end, _) = attempt(&g, &known, &src, &mut store, &mut faults);
    assert!(matches!(end, End::Lost), "{end:?}");
    let staged = store.staged.len();
    assert!(staged > 0, "nothing was staged before the cut");
    let (end, resent) = attempt(&g, &known, &src, &mut store, &mut std::iter::empty());
    assert!(matches!(end, End::Acked(_)), "{end:?}");
    assert_eq!(resent, 0);
    assert_eq!(snapshot(&store).2, images);
}
