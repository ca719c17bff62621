//! The primary's session state machine: any sequence of frames a pinned replica (broken or
//! compromised) could answer with, in the session that ships generation 2 of image `a` to a
//! replica known at generation 1 (`wire::mem::patch_sync`). Never a panic, every data job it
//! asks for can be made from the image, and it ends acknowledged only with the root it
//! shipped. An input of odd length runs the session planned ahead (a kept connection: planned
//! on that generation as acknowledged, a window of jobs sent before the answers).
#![no_main]
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use ferry::wire::frame::Decoder;
use ferry::wire::frame::ImageState;
use ferry::wire::mem::{Images, params, patch_sync, seed_a_patched};
use ferry::wire::primary::{
    Acked, Claim, Generation, Out, PeerKnowledge, PrimarySession, group_root, make_frame,
};
use libfuzzer_sys::fuzz_target;

/// The session's inputs, made once: chunking them is most of a run's time otherwise.
fn setup() -> &'static (Arc<Generation>, PeerKnowledge, Images) {
    static SETUP: OnceLock<(Arc<Generation>, PeerKnowledge, Images)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let (g, known) = patch_sync();
        let src = Images(BTreeMap::from([("a".to_string(), seed_a_patched())]));
        (g, known, src)
    })
}

fuzz_target!(|data: &[u8]| {
    let (g, known, src) = setup();
    let (mut s, _hello) =
        PrimarySession::new(&Claim::first("test"), params(), g.clone(), known.clone());
    if data.len() % 2 == 1 {
        let last = Acked {
            generation: known.generation,
            group_root: group_root(&known.manifests),
            images: known
                .manifests
                .iter()
                .map(|(path, m)| ImageState {
                    path: path.clone(),
                    size: m.size(),
                    root: *m.root().as_bytes(),
                })
                .collect(),
            busy_pct: 0,
        };
        s.plan_ahead(&last);
        for job in s.early_jobs(data.len() as u64 * 1024) {
            make_frame(&job, src).expect("an early job the image cannot serve");
        }
    }
    let mut d = Decoder::default();
    d.push(data);
    while let Ok(Some(f)) = d.next_frame() {
        for o in s.handle(f) {
            match o {
                Out::Send(_) => {}
                Out::Jobs => {
                    while let Some(job) = s.next_job() {
                        make_frame(&job, src).expect("a job the image cannot serve");
                    }
                    let _ = s.data_sent();
                }
                Out::Done(r) => {
                    if let Ok(a) = r {
                        assert_eq!(a.group_root, g.group_root, "acknowledged another root");
                    }
                    return;
                }
            }
        }
    }
});
