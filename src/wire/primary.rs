//! The primary's side of a session with one replica, sans I/O: frames in; control frames and
//! data jobs out. Turning a job into a data frame (reading the image, verifying, compressing)
//! is [`make_frame`], which the transport runs on worker threads.
//!
//! The session finds the replica's base for each image: the manifest the primary saved at the
//! replica's last acknowledgement when the replica reports that root; otherwise (a replica
//! seeded from elsewhere, a primary that lost its state) it descends the replica's Merkle tree,
//! querying only the children of nodes that differ from its own, fetches the entries of the
//! differing leaves, and rebuilds the replica's manifest from them and its own, checking the
//! rebuilt root against the replica's.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use super::frame::{
    Frame, Hash, ImageState, MAX_ITEMS, NsChange, Refusal, Splice, Takeover, VERSION, WireEntry,
};
use super::plan::{self, from_wire};
use crate::chunk::ChunkParams;
use crate::dirty::RangeSet;
use crate::manifest::{Entry, FANOUT, Manifest};

/// One consistency group's generation, as the primary built it.
#[derive(Clone, Debug)]
pub struct Generation {
    pub number: u64,
    pub group_root: Hash,
    pub images: BTreeMap<String, Arc<Manifest>>,
}

/// The group root of these manifests (see [`super::frame::group_root`]).
pub fn group_root(images: &BTreeMap<String, Arc<Manifest>>) -> Hash {
    super::frame::group_root(
        images
            .iter()
            .map(|(p, m)| (p.as_str(), m.size(), *m.root().as_bytes())),
    )
}

/// What the primary knows of a replica from its last acknowledgement.
#[derive(Clone, Debug, Default)]
pub struct PeerKnowledge {
    pub generation: u64,
    pub manifests: BTreeMap<String, Arc<Manifest>>,
    /// Bytes changed on the primary since the replica's generation, per image (for patches).
    /// Absent for an image: unknown, no patches.
    pub dirty: BTreeMap<String, RangeSet>,
}

/// A data frame to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    Chunk {
        hash: Hash,
        path: String,
        offset: u64,
        len: u64,
    },
    Patch {
        hash: Hash,
        path: String,
        offset: u64,
        len: u64,
        base: Option<Hash>,
        ranges: Vec<Range<u64>>,
    },
}

impl Job {
    /// Bytes of image the job produces.
    pub fn bytes(&self) -> u64 {
        match self {
            Job::Chunk { len, .. } | Job::Patch { len, .. } => *len,
        }
    }

    /// What the frame this job makes is known by, for sharing it between the replicas of one
    /// sync: a chunk's frame by its id (its bytes wherever they are); a patch's by everything
    /// it is made of (replicas at different generations are sent different ranges of the
    /// same chunk), under a key of its own so it never meets a chunk id.
    pub fn frame_key(&self) -> Hash {
        match self {
            Job::Chunk { hash, .. } => *hash,
            Job::Patch {
                hash,
                path,
                offset,
                len,
                base,
                ranges,
            } => {
                let mut h = blake3::Hasher::new_derive_key("ferry 2026 patch frame");
                h.update(hash);
                h.update(&offset.to_le_bytes());
                h.update(&len.to_le_bytes());
                h.update(&base.map_or([0; 33], |b| {
                    let mut k = [1; 33];
                    k[1..].copy_from_slice(&b);
                    k
                }));
                for r in ranges {
                    h.update(&r.start.to_le_bytes());
                    h.update(&r.end.to_le_bytes());
                }
                h.update(path.as_bytes());
                *h.finalize().as_bytes()
            }
        }
    }
}

/// What the session asks the transport to do.
#[derive(Debug)]
pub enum Out {
    /// Send on the control stream.
    Send(Frame),
    /// Data jobs became available ([`PrimarySession::next_job`]).
    Jobs,
    /// The session ended: the replica acknowledged the generation, or it failed.
    Done(Result<Acked, Ended>),
}

/// Why a session ended without an acknowledgement.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Ended {
    /// The replica refused, with its code and words.
    #[error("replica refused: {0}")]
    Refused(Refusal),
    /// The replica broke the protocol's rules (a bug or a version mismatch on its side).
    #[error("{0}")]
    Broken(String),
    /// The session was planned ahead of the replica's `Welcome` ([`PrimarySession::plan_ahead`])
    /// on a state the replica no longer holds: a new session, planned on its `Welcome`, is needed.
    #[error("{0}")]
    Stale(String),
}

/// A successful acknowledgement.
#[derive(Clone, Debug)]
pub struct Acked {
    pub generation: u64,
    pub group_root: Hash,
    /// The replica's base for each image, as found (for the caller to learn from).
    pub images: Vec<ImageState>,
    /// How busy its data-stream readers were (`Frame::Ack`).
    pub busy_pct: u8,
}

/// Reads image bytes for data frames.
pub trait ChunkSource: Sync {
    fn read(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>>;
}

enum Phase {
    Hello,
    /// Finding bases: images still waiting for tree or leaf answers.
    Bases,
    Wants,
    Data,
    Done,
}

struct Recon {
    peer_size: u64,
    peer_root: Hash,
    /// Differing nodes at the level being queried.
    level: usize,
    pending: usize,
    differing: Vec<usize>,
    leaves: BTreeMap<u32, Vec<Entry>>,
}

/// Who a primary is to its replicas, as `Hello` says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Its own node name.
    pub node: String,
    /// The namespace it writes (its node name, or the one it took over).
    pub namespace: String,
    pub epoch: u64,
    /// The generation it took over from, if it was promoted.
    pub takeover: Option<Takeover>,
}

impl Claim {
    /// A primary that writes its own namespace at epoch 0 (tests, and nodes never promoted).
    pub fn first(node: &str) -> Claim {
        Claim {
            node: node.to_string(),
            namespace: node.to_string(),
            epoch: 0,
            takeover: None,
        }
    }

    pub fn hello(&self, params: ChunkParams) -> Frame {
        Frame::Hello {
            version: VERSION,
            epoch: self.epoch,
            node: self.node.clone(),
            params,
            namespace: self.namespace.clone(),
            takeover: self.takeover.clone(),
        }
    }
}

pub struct PrimarySession {
    node: String,
    epoch: u64,
    params: ChunkParams,
    generation: Arc<Generation>,
    peer: PeerKnowledge,
    phase: Phase,
    peer_generation: u64,
    /// The number this generation carries to this replica: the primary's, or one past the
    /// replica's if the primary lost count (its state was lost or restored from a backup).
    number: u64,
    bases: BTreeMap<String, Arc<Manifest>>,
    peer_images: BTreeMap<String, ImageState>,
    recon: BTreeMap<String, Recon>,
    wanted: Vec<Hash>,
    /// Distinct chunks the plan offered (new content of this generation for this replica), in
    /// the plan's order.
    offered: Vec<Hash>,
    /// Of those, the ones sent ahead of the replica's wants ([`PrimarySession::early_jobs`]).
    early: HashSet<Hash>,
    /// Of those, the ones the replica already held (stored or staged): not sent.
    held: u64,
    jobs: VecDeque<Job>,
    locations: HashMap<Hash, (String, u64, u64)>,
    /// `Commit` was sent: the replica commits once the data it waits for arrives, so jobs added
    /// later (after a `NeedFull`) need no second one.
    commit_sent: bool,
    /// Images whose base was found by reconciliation (their dirty ranges are unknown).
    pub reconciled: Vec<String>,
    /// Planned ahead: the `Welcome` the plan assumed, until the replica's own confirms it, and
    /// what the plan led to beyond frames to send (held back until then).
    ahead: Option<Frame>,
    held_back: Vec<Out>,
}

impl PrimarySession {
    /// A session to ship `generation` to a replica the primary knows as `peer`. Returns the
    /// session and its first frame.
    pub fn new(
        claim: &Claim,
        params: ChunkParams,
        generation: Arc<Generation>,
        peer: PeerKnowledge,
    ) -> (PrimarySession, Frame) {
        let hello = claim.hello(params);
        let s = PrimarySession {
            node: claim.node.clone(),
            epoch: claim.epoch,
            params,
            generation,
            peer,
            phase: Phase::Hello,
            peer_generation: 0,
            number: 0,
            bases: BTreeMap::new(),
            peer_images: BTreeMap::new(),
            recon: BTreeMap::new(),
            wanted: Vec::new(),
            offered: Vec::new(),
            early: HashSet::new(),
            held: 0,
            jobs: VecDeque::new(),
            locations: HashMap::new(),
            commit_sent: false,
            reconciled: Vec::new(),
            ahead: None,
            held_back: Vec::new(),
        };
        (s, hello)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next data frame to produce, if any.
    pub fn next_job(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// Chunks of this generation's new content the replica already held, so none was sent
    /// (known once its wants are in).
    pub fn chunks_held(&self) -> u64 {
        self.held
    }

    /// Bytes of image the pending jobs cover (for progress).
    pub fn pending_bytes(&self) -> u64 {
        self.jobs.iter().map(Job::bytes).sum()
    }

    /// Called by the transport once every job so far has been turned into a frame and sent.
    /// Returns the `Commit` frame the first time only.
    pub fn data_sent(&mut self) -> Option<Frame> {
        if matches!(self.phase, Phase::Data) && self.jobs.is_empty() {
            self.phase = Phase::Done;
            if !std::mem::replace(&mut self.commit_sent, true) {
                return Some(Frame::Commit {
                    generation: self.number,
                });
            }
        }
        None
    }

    /// The replica's base manifests, once known (to remember after an acknowledgement).
    pub fn bases(&self) -> &BTreeMap<String, Arc<Manifest>> {
        &self.bases
    }

    /// Plans on the state the replica acknowledged at the end of the last session on this
    /// connection (`last`), without waiting for its `Welcome`: returns the frames to send right
    /// after the `Hello`, which saves a round trip per sync point on a kept connection. The
    /// replica's `Welcome` must then report exactly that state, or the session ends as
    /// [`Ended::Stale`] (the replica refuses such a plan anyway: its `Begin` names the base
    /// generation, and each `Plan` the image's base root). Only this primary writes its
    /// namespace, so between its sessions the state changes only by a deep repair on the
    /// replica (caught here) or a promotion elsewhere (which fences this primary at its
    /// `Hello`).
    pub fn plan_ahead(&mut self, last: &Acked) -> Vec<Frame> {
        let welcome = Frame::Welcome {
            version: VERSION,
            epoch: self.epoch,
            generation: last.generation,
            group_root: last.group_root,
            images: last.images.clone(),
        };
        let outs = self.handle(welcome.clone());
        self.ahead = Some(welcome);
        let mut frames = Vec::new();
        for o in outs {
            match o {
                Out::Send(f) => frames.push(f),
                o => self.held_back.push(o),
            }
        }
        frames
    }

    /// Handles one frame from the replica.
    pub fn handle(&mut self, f: Frame) -> Vec<Out> {
        let r = match f {
            Frame::Refuse { code, reason } => Err(Ended::Refused(Refusal { code, reason })),
            f if self.ahead.is_some() => self.confirm(f),
            f => self.step(f).map_err(Ended::Broken),
        };
        match r {
            Ok(out) => out,
            Err(e) => {
                self.phase = Phase::Done;
                vec![Out::Done(Err(e))]
            }
        }
    }

    /// The replica's first answer to a session planned ahead: its `Welcome`, which must be the
    /// one the plan assumed.
    fn confirm(&mut self, f: Frame) -> Result<Vec<Out>, Ended> {
        let assumed = self.ahead.take().expect("planned ahead");
        match f {
            Frame::Welcome { .. } if f == assumed => Ok(std::mem::take(&mut self.held_back)),
            Frame::Welcome { generation, .. } => {
                let Frame::Welcome {
                    generation: was, ..
                } = assumed
                else {
                    unreachable!("a Welcome is assumed")
                };
                Err(Ended::Stale(format!(
                    "the replica's state changed since the last sync on this connection (it \
                     holds generation {generation}, the plan was made for its generation {was} \
                     as acknowledged then): planning again on its answer"
                )))
            }
            other => Err(Ended::Broken(format!(
                "unexpected {} from the replica before its Welcome",
                super::replica::frame_name(&other)
            ))),
        }
    }

    /// The replica's images (as it reports them) include every image of this generation, each
    /// with this generation's root and size.
    fn holds_every_image(&self, images: &[ImageState]) -> bool {
        self.generation.images.iter().all(|(path, m)| {
            images
                .iter()
                .any(|i| &i.path == path && i.root == *m.root().as_bytes() && i.size == m.size())
        })
    }

    fn step(&mut self, f: Frame) -> Result<Vec<Out>, String> {
        match (&self.phase, f) {
            (
                Phase::Hello,
                Frame::Welcome {
                    version,
                    epoch,
                    generation,
                    group_root,
                    images,
                },
            ) => {
                if version != VERSION {
                    return Err(format!(
                        "replica speaks protocol version {version}, not {VERSION}"
                    ));
                }
                if epoch > self.epoch {
                    return Err(format!(
                        "replica is at epoch {epoch}, newer than ours ({}): this primary was fenced by a promotion",
                        self.epoch
                    ));
                }
                // The replica committed exactly this generation already: its acknowledgement
                // was lost (it crashed, or the link was cut, after the commit). Done, as if it
                // had acknowledged, rather than committing the same content again under the
                // next number.
                if epoch == self.epoch
                    && generation == self.generation.number
                    && group_root == self.generation.group_root
                    && self.holds_every_image(&images)
                {
                    self.number = generation;
                    self.phase = Phase::Done;
                    return Ok(vec![Out::Done(Ok(Acked {
                        generation,
                        group_root,
                        images,
                        busy_pct: 0,
                    }))]);
                }
                self.peer_generation = generation;
                self.number = self.generation.number.max(generation + 1);
                self.peer_images = images.into_iter().map(|i| (i.path.clone(), i)).collect();
                for (path, m) in &self.generation.images {
                    if let Some(i) = self.peer_images.get(path)
                        && i.size > largest_base(m.size())
                    {
                        return Err(format!(
                            "replica reports {path} at {} bytes, larger than any base this primary \
                             reconciles for its {} bytes (twice that, or 64 GiB more): refused; if \
                             that copy is real, move the replica's namespace aside and sync again",
                            i.size,
                            m.size()
                        ));
                    }
                }
                self.phase = Phase::Bases;
                let mut out = Vec::new();
                let paths: Vec<String> = self.generation.images.keys().cloned().collect();
                for path in paths {
                    out.extend(self.find_base(&path));
                }
                out.extend(self.maybe_plan()?);
                Ok(out)
            }
            (
                Phase::Bases,
                Frame::TreeNodes {
                    path,
                    level,
                    first,
                    hashes,
                },
            ) => self.on_tree_nodes(path, level as usize, first as usize, hashes),
            (Phase::Bases, Frame::Leaves { path, leaves }) => self.on_leaves(path, leaves),
            (
                Phase::Wants,
                Frame::Want {
                    generation,
                    hashes,
                    last,
                },
            ) => {
                if generation != self.number {
                    return Err(format!("want for generation {generation}"));
                }
                self.wanted.extend(hashes);
                if !last {
                    return Ok(vec![]);
                }
                self.make_jobs()?;
                self.phase = Phase::Data;
                Ok(vec![Out::Jobs])
            }
            (Phase::Data | Phase::Done, Frame::NeedFull { generation, hash }) => {
                if generation != self.number {
                    return Err(format!("need-full for generation {generation}"));
                }
                let (path, offset, len) = self
                    .locations
                    .get(&hash)
                    .cloned()
                    .ok_or("replica asked for a chunk that is not in the generation")?;
                self.jobs.push_back(Job::Chunk {
                    hash,
                    path,
                    offset,
                    len,
                });
                self.phase = Phase::Data;
                Ok(vec![Out::Jobs])
            }
            (
                Phase::Done,
                Frame::Ack {
                    generation,
                    group_root,
                    images,
                    busy_pct,
                },
            ) => {
                if generation != self.number || group_root != self.generation.group_root {
                    return Err(format!(
                        "replica acknowledged generation {generation} with another root than the one sent: it will be resynced"
                    ));
                }
                if !self.holds_every_image(&images) {
                    return Err(
                        "replica acknowledged an image with another root than the one sent: it will be resynced"
                            .to_string(),
                    );
                }
                Ok(vec![Out::Done(Ok(Acked {
                    generation,
                    group_root,
                    images,
                    busy_pct,
                }))])
            }
            (_, other) => Err(format!(
                "unexpected {} from the replica",
                super::replica::frame_name(&other)
            )),
        }
    }

    /// Decides the base of one image, or starts reconciling it.
    fn find_base(&mut self, path: &str) -> Vec<Out> {
        let active = &self.generation.images[path];
        let Some(theirs) = self.peer_images.get(path).cloned() else {
            self.bases
                .insert(path.to_string(), Arc::new(Manifest::empty(self.params)));
            return vec![];
        };
        if let Some(known) = self.peer.manifests.get(path)
            && *known.root().as_bytes() == theirs.root
        {
            self.bases.insert(path.to_string(), known.clone());
            return vec![];
        }
        if *active.root().as_bytes() == theirs.root {
            self.bases.insert(path.to_string(), active.clone());
            return vec![];
        }
        // Unknown base: descend the replica's tree. With the same size the trees have the same
        // shape and we compare node by node from the top; otherwise start from the leaves.
        log::info!(
            "{}: replica's base of {path} is unknown to this primary; reconciling by Merkle tree",
            self.node
        );
        self.reconciled.push(path.to_string());
        let depth = tree_depth(theirs.size);
        let (level, nodes) = if theirs.size == active.size() && depth > 1 {
            (
                depth - 2,
                (0..active.tree().level(depth - 2).len()).collect(),
            )
        } else {
            (
                0,
                (0..crate::manifest::leaf_count(theirs.size)).collect::<Vec<_>>(),
            )
        };
        let mut r = Recon {
            peer_size: theirs.size,
            peer_root: theirs.root,
            level,
            pending: 0,
            differing: Vec::new(),
            leaves: BTreeMap::new(),
        };
        let out = query_nodes(path, level, &nodes, &mut r);
        self.recon.insert(path.to_string(), r);
        out
    }

    fn on_tree_nodes(
        &mut self,
        path: String,
        level: usize,
        first: usize,
        hashes: Vec<Hash>,
    ) -> Result<Vec<Out>, String> {
        let r = self
            .recon
            .get_mut(&path)
            .ok_or("tree nodes for an image not queried")?;
        if level != r.level || r.pending == 0 {
            return Err("tree nodes not asked for".into());
        }
        r.pending -= 1;
        let ours = self.generation.images[&path].tree().clone();
        for (k, h) in hashes.iter().enumerate() {
            let idx = first + k;
            let same_shape = tree_depth(r.peer_size) == ours.depth();
            let mine = same_shape.then(|| ours.level(level).get(idx)).flatten();
            if mine.is_none_or(|m| m.as_bytes() != h) {
                r.differing.push(idx);
            }
        }
        if r.pending > 0 {
            return Ok(vec![]);
        }
        let differing = std::mem::take(&mut r.differing);
        if level == 0 {
            // Fetch the entries of the differing leaves.
            let mut out = Vec::new();
            for part in differing.chunks(1024) {
                r.pending += 1;
                out.push(Out::Send(Frame::LeafQuery {
                    path: path.clone(),
                    leaves: part.iter().map(|&l| l as u32).collect(),
                }));
            }
            r.level = usize::MAX; // now waiting for leaves
            if out.is_empty() {
                return self.finish_recon(&path);
            }
            return Ok(out);
        }
        let below: Vec<usize> = differing
            .iter()
            .flat_map(|&n| ours.children(level, n))
            .collect();
        if below.is_empty() {
            return self.finish_recon(&path);
        }
        r.level = level - 1;
        Ok(query_nodes(&path, level - 1, &below, r))
    }

    fn on_leaves(
        &mut self,
        path: String,
        leaves: Vec<(u32, Vec<(u64, super::frame::WireEntry)>)>,
    ) -> Result<Vec<Out>, String> {
        let r = self
            .recon
            .get_mut(&path)
            .ok_or("leaves for an image not queried")?;
        if r.level != usize::MAX || r.pending == 0 {
            return Err("leaves not asked for".into());
        }
        r.pending -= 1;
        for (leaf, entries) in leaves {
            r.leaves.insert(
                leaf,
                entries.iter().map(|(off, w)| from_wire(*off, w)).collect(),
            );
        }
        if r.pending > 0 {
            return Ok(vec![]);
        }
        self.finish_recon(&path)
    }

    /// Rebuilds the replica's manifest from its differing leaves and our own identical ones.
    fn finish_recon(&mut self, path: &str) -> Result<Vec<Out>, String> {
        let r = self.recon.remove(path).expect("reconciling");
        let ours = &self.generation.images[path];
        let span = crate::manifest::LEAF_SPAN;
        let mut entries: Vec<Entry> = Vec::new();
        for leaf in 0..crate::manifest::leaf_count(r.peer_size) as u64 {
            match r.leaves.get(&(leaf as u32)) {
                Some(es) => entries.extend_from_slice(es),
                None => {
                    let es = ours.entries();
                    let i = es.partition_point(|e| e.offset < leaf * span);
                    let j = es.partition_point(|e| e.offset < (leaf + 1) * span);
                    entries.extend_from_slice(&es[i..j]);
                }
            }
        }
        let m = Manifest::new(self.params, r.peer_size, entries)
            .map_err(|e| format!("replica's manifest of {path} could not be rebuilt: {e}"))?;
        if *m.root().as_bytes() != r.peer_root {
            return Err(format!(
                "replica's manifest of {path} rebuilt from its tree does not match its root"
            ));
        }
        self.bases.insert(path.to_string(), Arc::new(m));
        self.maybe_plan()
    }

    /// Once every base is known: the generation's namespace changes and image plans.
    fn maybe_plan(&mut self) -> Result<Vec<Out>, String> {
        if !self.recon.is_empty() || self.bases.len() < self.generation.images.len() {
            return Ok(vec![]);
        }
        let g = self.generation.clone();
        let changes: Vec<NsChange> = self
            .peer_images
            .keys()
            .filter(|p| !g.images.contains_key(*p))
            .map(|p| NsChange::Remove { path: p.clone() })
            .collect();
        let mut plans = Vec::new();
        for (path, active) in &g.images {
            let base = &self.bases[path];
            if base.root() == active.root() {
                continue;
            }
            let splices = plan::splices(base, active);
            plans.extend(plan_frames(self.number, path, base, active, splices));
        }
        let images = g
            .images
            .iter()
            .filter(|(p, m)| self.bases[*p].root() != m.root())
            .count() as u32;
        let mut seen = HashSet::new();
        self.offered = plans
            .iter()
            .filter_map(|f| match f {
                Frame::Plan { splices, .. } => Some(splices),
                _ => None,
            })
            .flatten()
            .flat_map(|s| &s.entries)
            .filter_map(|e| match e {
                WireEntry::Data { hash, .. } => Some(*hash),
                WireEntry::Zero { .. } => None,
            })
            .filter(|h| seen.insert(*h))
            .collect();
        let mut out = vec![Out::Send(Frame::Begin {
            generation: self.number,
            base_generation: self.peer_generation,
            group_root: g.group_root,
            changes,
            images,
        })];
        out.extend(plans.into_iter().map(Out::Send));
        self.phase = Phase::Wants;
        Ok(out)
    }

    /// Turns the wanted hashes into jobs: a patch where the replica's base of the chunk's span
    /// is known and few of its bytes changed, else the whole chunk. Chunks sent ahead of the
    /// wants are not sent again.
    fn make_jobs(&mut self) -> Result<(), String> {
        let wanted = std::mem::take(&mut self.wanted);
        self.locate(&wanted);
        self.held += self.offered.len().saturating_sub(wanted.len()) as u64;
        for hash in wanted {
            if !self.early.contains(&hash) {
                let job = self.job(hash)?;
                self.jobs.push_back(job);
            }
        }
        Ok(())
    }

    /// Where each of `hashes` not located yet is in the generation: only images planned to
    /// this replica can hold one, and only these hashes are kept (a session used to index every
    /// chunk of every image).
    fn locate(&mut self, hashes: &[Hash]) {
        let hashes: HashSet<&Hash> = hashes
            .iter()
            .filter(|h| !self.locations.contains_key(*h))
            .collect();
        if hashes.is_empty() {
            return;
        }
        for (path, m) in &self.generation.images {
            if self.bases.get(path).is_some_and(|b| b.root() == m.root()) {
                continue;
            }
            for e in m.entries() {
                if let Some(h) = e.hash()
                    && hashes.contains(h.as_bytes())
                {
                    self.locations
                        .entry(*h.as_bytes())
                        .or_insert_with(|| (path.clone(), e.offset, e.len));
                }
            }
        }
    }

    fn job(&self, hash: Hash) -> Result<Job, String> {
        let (path, offset, len) = self
            .locations
            .get(&hash)
            .cloned()
            .ok_or("replica wants a chunk that is not in the generation")?;
        Ok(self
            .patch_for(&path, offset, len, hash)
            .unwrap_or(Job::Chunk {
                hash,
                path,
                offset,
                len,
            }))
    }

    /// The first chunks of a plan made ahead ([`PrimarySession::plan_ahead`]), up to `budget`
    /// bytes of image, as jobs to send right behind the plan, before the replica's wants come
    /// back: over a long path the link would otherwise idle for that round trip. They go on the
    /// control stream, so the replica reads them after the plan, when it knows what it wants:
    /// it stages those and counts any other as a duplicate (one it held already elsewhere).
    /// The wants that come back then ask again only for what was not sent. Only chunks of
    /// images the replica holds a version of go ahead: a new image is often a copy.
    pub fn early_jobs(&mut self, budget: u64) -> Vec<Job> {
        if !matches!(self.phase, Phase::Wants) || self.ahead.is_none() {
            return Vec::new();
        }
        let offered = std::mem::take(&mut self.offered);
        self.locate(&offered);
        let mut jobs = Vec::new();
        let mut bytes = 0;
        for &hash in &offered {
            if bytes >= budget {
                break;
            }
            // Not for an image new to the replica: a copy of another image (a VM cloned from a
            // template) is all chunks it holds already, which its wants leave out.
            let new_image = self.locations.get(&hash).is_none_or(|(path, ..)| {
                self.bases.get(path).is_none_or(|b| b.entries().is_empty())
            });
            if new_image {
                continue;
            }
            let Ok(job) = self.job(hash) else { continue };
            bytes += job.bytes();
            self.early.insert(hash);
            jobs.push(job);
        }
        self.offered = offered;
        jobs
    }

    fn patch_for(&self, path: &str, offset: u64, len: u64, hash: Hash) -> Option<Job> {
        if self.reconciled.iter().any(|p| p == path) {
            return None;
        }
        let base = self.bases.get(path)?;
        let ranges = patch_ranges(base, self.peer.dirty.get(path)?, offset, len)?;
        let base_hash = base
            .index_starting_at(offset)
            .map(|i| base.entries()[i])
            .filter(|e| e.len == len)
            .and_then(|e| e.hash())
            .map(|h| *h.as_bytes());
        Some(Job::Patch {
            hash,
            path: path.to_string(),
            offset,
            len,
            base: base_hash,
            ranges,
        })
    }
}

/// The ranges (offsets in the chunk) a patch of the chunk `[offset, offset + len)` carries to a
/// replica holding `base`, with `dirty` the bytes changed since that replica's generation; `None`
/// when the chunk goes whole (no base, or too much of it changed for a patch to pay). The sync
/// reads only these ranges for such a patch, so its copy-before-write window keeps only them
/// (`sync::narrow`).
pub fn patch_ranges(
    base: &Manifest,
    dirty: &RangeSet,
    offset: u64,
    len: u64,
) -> Option<Vec<Range<u64>>> {
    if base.size() == 0 {
        return None;
    }
    let ranges: Vec<Range<u64>> = dirty
        .overlapping(offset..offset + len)
        .map(|r| r.start - offset..r.end - offset)
        .collect();
    let changed: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    // Bytes past the base's end are zeros there; a patch only pays for sparse changes.
    if changed * 2 > len || ranges.len() > 64 {
        return None;
    }
    Some(ranges)
}

/// What a session shipping `new` to a replica holding `held` may read of the images, `dirty`
/// being the bytes changed since that replica's generation: of each data entry not identical
/// there, the ranges of its patch when it goes as one ([`patch_ranges`]), else the whole entry.
/// The sync's copy-before-write window keeps no more (`sync::narrow`): at 50 MB/s of scattered
/// writes nearly every chunk changes between two sync points, and keeping whole chunks copied
/// nearly every write the guest made during a sync (180 MB a sync, spilling to disk).
///
/// A replica that refuses a patch (its base is not what this primary knows: `NeedFull`) asks
/// for the whole chunk, which the window may no longer hold: reading it fails its hash, the
/// shipment fails, the replica counts as unconfirmed, and the next sync point keeps whole
/// chunks for it.
pub fn may_read<'a>(
    held: &'a Manifest,
    dirty: Option<&'a RangeSet>,
    new: &'a Manifest,
) -> impl Iterator<Item = Range<u64>> + 'a {
    crate::manifest::changed_entries(held, new)
        .filter(|e| !e.is_zero())
        .flat_map(move |e| {
            let ranges = dirty
                .and_then(|d| patch_ranges(held, d, e.offset, e.len))
                .unwrap_or_else(|| std::iter::once(0..e.len).collect());
            ranges
                .into_iter()
                .map(move |r| e.offset + r.start..e.offset + r.end)
        })
}

fn tree_depth(size: u64) -> usize {
    let mut n = crate::manifest::leaf_count(size);
    let mut d = 1;
    while n > 1 {
        n = n.div_ceil(FANOUT);
        d += 1;
    }
    d
}

/// The largest replica image this primary finds a base in for an image of `active` bytes: a
/// base is found by asking for its Merkle leaves, so the size a replica reports bounds what
/// the primary allocates for it, and a broken or hostile replica must not make that unbounded
/// (found by the `primary_session` fuzz target: a reported 2^50 bytes ran it out of memory).
/// Twice the image, or 64 GiB more: an image shrunk further than that since the replica last
/// had it is refused with the figures.
fn largest_base(active: u64) -> u64 {
    active
        .saturating_mul(2)
        .max(active.saturating_add(64 << 30))
}

fn query_nodes(path: &str, level: usize, nodes: &[usize], r: &mut Recon) -> Vec<Out> {
    // Contiguous runs of node indices become one query each.
    let mut out = Vec::new();
    let mut i = 0;
    while i < nodes.len() {
        let mut j = i + 1;
        while j < nodes.len() && nodes[j] == nodes[j - 1] + 1 && j - i < MAX_ITEMS {
            j += 1;
        }
        r.pending += 1;
        out.push(Out::Send(Frame::TreeQuery {
            path: path.to_string(),
            level: level as u8,
            first: nodes[i] as u32,
            count: (j - i) as u32,
        }));
        i = j;
    }
    out
}

/// One image's plan as frames of at most [`MAX_ITEMS`] entries.
fn plan_frames(
    number: u64,
    path: &str,
    base: &Manifest,
    active: &Manifest,
    splices: Vec<Splice>,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut batch: Vec<Splice> = Vec::new();
    let mut items = 0;
    let frame = |splices: Vec<Splice>, last: bool| Frame::Plan {
        generation: number,
        path: path.to_string(),
        base_root: *base.root().as_bytes(),
        new_size: active.size(),
        new_root: *active.root().as_bytes(),
        splices,
        last,
    };
    for s in splices {
        // A splice longer than a frame is cut at an entry boundary of both manifests only if it
        // can be; the simple bound here keeps each frame under the limit by entries.
        for part in split_splice(s, base) {
            if items + part.entries.len() > MAX_ITEMS && !batch.is_empty() {
                frames.push(frame(std::mem::take(&mut batch), false));
                items = 0;
            }
            items += part.entries.len();
            batch.push(part);
        }
    }
    frames.push(frame(batch, true));
    frames
}

/// Splits a splice with more than [`MAX_ITEMS`] entries into consecutive splices; only the
/// first replaces base entries (the rest insert at its end).
fn split_splice(s: Splice, _base: &Manifest) -> Vec<Splice> {
    if s.entries.len() <= MAX_ITEMS {
        return vec![s];
    }
    // The first part replaces the whole old range; the following parts are pure insertions at
    // the old end, which `plan::apply` shifts into place.
    let mut parts = Vec::new();
    let mut chunks = s.entries.chunks(MAX_ITEMS);
    parts.push(Splice {
        start: s.start,
        old_end: s.old_end,
        entries: chunks.next().expect("non-empty").to_vec(),
    });
    for c in chunks {
        parts.push(Splice {
            start: s.old_end,
            old_end: s.old_end,
            entries: c.to_vec(),
        });
    }
    parts
}

/// Produces the data frame for a job: reads the image, checks the bytes still hash to the
/// chunk id (the image must not have changed since the sync point), and compresses where it
/// saves. Returns the frame and its payload size on the wire.
pub fn make_frame(job: &Job, src: &dyn ChunkSource) -> Result<(Frame, u64), String> {
    match job {
        Job::Chunk {
            hash,
            path,
            offset,
            len,
        } => {
            let data = src
                .read(path, *offset, *len)
                .map_err(|e| format!("reading {path} at {offset}: {e}"))?;
            if blake3::hash(&data).as_bytes() != hash {
                return Err(format!(
                    "{path} changed at {offset} since the sync point: sync again"
                ));
            }
            let (zstd, data) = super::squeeze::pack(data);
            let n = data.len() as u64;
            Ok((
                Frame::Chunk {
                    hash: *hash,
                    zstd,
                    data,
                },
                n,
            ))
        }
        Job::Patch {
            hash,
            path,
            offset,
            len,
            base,
            ranges,
        } => {
            let mut out = Vec::with_capacity(ranges.len());
            let mut n = 0;
            for r in ranges {
                let bytes = src
                    .read(path, offset + r.start, r.end - r.start)
                    .map_err(|e| format!("reading {path} at {}: {e}", offset + r.start))?;
                n += bytes.len() as u64;
                out.push((r.start, serde_bytes::ByteBuf::from(bytes)));
            }
            Ok((
                Frame::Patch {
                    hash: *hash,
                    path: path.clone(),
                    offset: *offset,
                    len: *len,
                    base: *base,
                    ranges: out,
                },
                n,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::chunk::chunk_full;
    use crate::testutil::random;
    use crate::testutil::small_params as params;

    /// A patch frame is shared only with a replica that would be sent the very same frame.
    #[test]
    fn a_patch_frame_is_known_by_everything_it_is_made_of() {
        let patch = |base: Option<Hash>, ranges: &[(u64, u64)], path: &str| Job::Patch {
            hash: [7; 32],
            path: path.to_string(),
            offset: 65536,
            len: 65536,
            base,
            ranges: ranges.iter().map(|&(a, b)| a..b).collect(),
        };
        let one = patch(Some([1; 32]), &[(0, 4096)], "vm.img");
        assert_eq!(one.frame_key(), one.clone().frame_key());
        for other in [
            patch(Some([2; 32]), &[(0, 4096)], "vm.img"),
            patch(None, &[(0, 4096)], "vm.img"),
            patch(Some([1; 32]), &[(0, 4096), (8192, 12288)], "vm.img"),
            patch(Some([1; 32]), &[(0, 8192)], "vm.img"),
            patch(Some([1; 32]), &[(0, 4096)], "vm2.img"),
            Job::Chunk {
                hash: [7; 32],
                path: "vm.img".into(),
                offset: 65536,
                len: 65536,
            },
        ] {
            assert_ne!(one.frame_key(), other.frame_key(), "{other:?}");
        }
    }

    /// Found by the `primary_session` fuzz target: a replica whose `Welcome` reports an image
    /// of an absurd size (here about 2^50 bytes) made the primary list every Merkle leaf of it
    /// before asking for them, and run out of memory. A size far above the image shipped is
    /// refused with the figures instead.
    /// Without the bytes changed since the replica's generation: every data entry that differs
    /// from what it holds (its bytes are read to ship it), none that it holds at that place.
    #[test]
    fn a_session_may_read_the_entries_the_replica_does_not_hold_there() {
        let old = random(100_000, 7);
        let mut new = old.clone();
        new[40_000..40_010].fill(1);
        new.extend_from_slice(&[0u8; 10_000]);
        new.extend_from_slice(&random(5_000, 8));
        let (held, _) = chunk_full(&old, params()).unwrap();
        let (m, _) = chunk_full(&new, params()).unwrap();
        let spans: Vec<std::ops::Range<u64>> = may_read(&held, None, &m).collect();
        assert!(spans.iter().any(|s| s.contains(&40_000)));
        assert!(spans.iter().any(|s| s.contains(&(new.len() as u64 - 1))));
        // The zero run at 100,000.. is punched by the replica, not read.
        assert!(!spans.iter().any(|s| s.contains(&105_000)));
        // Far from the write the chunks are held at their places.
        assert!(
            !spans
                .iter()
                .any(|s| s.contains(&10_000) || s.contains(&80_000))
        );
        for e in m.entries() {
            let listed = spans
                .iter()
                .any(|s| s.start == e.offset && s.end == e.end());
            let held_there = held.entries().contains(e);
            assert_eq!(listed, !held_there && !e.is_zero(), "{e:?}");
        }
    }

    /// With them: a chunk that goes as a patch is read at the patch's ranges only.
    #[test]
    fn a_session_may_read_only_the_ranges_of_a_patch() {
        let old = random(100_000, 7);
        let mut new = old.clone();
        new[40_000..40_010].fill(1);
        let (held, _) = chunk_full(&old, params()).unwrap();
        let (m, _) = chunk_full(&new, params()).unwrap();
        let mut dirty = RangeSet::new();
        dirty.insert(40_000..40_010);
        let spans: Vec<Range<u64>> = may_read(&held, Some(&dirty), &m).collect();
        assert_eq!(spans, vec![40_000..40_010]);
        // Most of a chunk written: it goes whole.
        let e = m.entries()[m.index_at(40_000).unwrap()];
        dirty.insert(e.offset..e.end() - 10);
        let spans: Vec<Range<u64>> = may_read(&held, Some(&dirty), &m).collect();
        assert_eq!(spans, vec![e.offset..e.end()]);
    }

    #[test]
    fn a_replica_reporting_an_absurd_image_size_is_refused_not_reconciled() {
        // A Welcome (its sixth byte the protocol version), then the absurd frame.
        let input: &[u8] = &[
            78, 0, 0, 0, 1, 4, 0, 1, 231, 122, 52, 222, 34, 184, 204, 219, 189, 247, 48, 33, 241,
            26, 40, 162, 10, 135, 175, 126, 55, 151, 243, 180, 3, 209, 14, 7, 152, 229, 180, 161,
            1, 1, 97, 160, 141, 250, 213, 154, 185, 104, 149, 242, 222, 174, 74, 0, 0, 0, 1, 67, 0,
            1, 231, 122, 56, 222, 34, 184, 204, 219, 189, 247, 48, 33, 241, 135, 10, 175, 26, 40,
            162, 126, 55, 188, 151, 66, 190, 67, 243, 151, 180, 3, 209, 14, 7, 152, 229, 102,
        ];
        let (g, known) = crate::wire::mem::patch_sync();
        let (mut s, _) = PrimarySession::new(&Claim::first("test"), params(), g, known);
        let mut d = crate::wire::frame::Decoder::default();
        d.push(input);
        let mut ended = None;
        while let Ok(Some(f)) = d.next_frame() {
            for o in s.handle(f) {
                if let Out::Done(r) = o {
                    ended = Some(r);
                }
            }
        }
        match ended {
            Some(Err(Ended::Broken(e))) => assert!(e.contains("larger than"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// A replica whose acknowledgement was lost answers the retry's `Hello` holding this very
    /// generation: the session ends acknowledged, sending nothing and committing nothing.
    #[test]
    fn a_replica_that_committed_this_generation_already_is_done_at_welcome() {
        let data = crate::testutil::random(50_000, 3);
        let (m, _) = chunk_full(&data, params()).unwrap();
        let images = BTreeMap::from([("img".to_string(), Arc::new(m.clone()))]);
        let g = Arc::new(Generation {
            number: 2,
            group_root: group_root(&images),
            images,
        });
        let welcome = |generation: u64| Frame::Welcome {
            version: VERSION,
            epoch: 0,
            generation,
            group_root: g.group_root,
            images: vec![ImageState {
                path: "img".into(),
                size: m.size(),
                root: *m.root().as_bytes(),
            }],
        };
        let (mut s, _) = PrimarySession::new(
            &Claim::first("a"),
            params(),
            g.clone(),
            PeerKnowledge::default(),
        );
        let out = s.handle(welcome(2));
        assert!(
            matches!(&out[..], [Out::Done(Ok(a))] if a.generation == 2),
            "{} frames instead of done",
            out.len()
        );
        assert!(s.next_job().is_none() && s.data_sent().is_none());
        // The same root under another number is not this generation: it ships as usual.
        let (mut s, _) = PrimarySession::new(
            &Claim::first("a"),
            params(),
            g.clone(),
            PeerKnowledge::default(),
        );
        let out = s.handle(welcome(1));
        assert!(!matches!(&out[..], [Out::Done(_)]));
    }

    /// After a `NeedFull` the whole chunk is sent, but `Commit` is not sent again: the replica
    /// already has it and would find a second one after its `Ack`.
    #[test]
    fn commit_is_sent_once_even_after_a_need_full() {
        let mut old = vec![0u8; 50_000];
        blake3::Hasher::new().finalize_xof().fill(&mut old);
        let mut new = old.clone();
        new[20_000..20_010].fill(9);
        let (base, _) = chunk_full(&old, params()).unwrap();
        let (active, _) = chunk_full(&new, params()).unwrap();
        let images = BTreeMap::from([("img".to_string(), Arc::new(active.clone()))]);
        let g = Arc::new(Generation {
            number: 2,
            group_root: group_root(&images),
            images,
        });
        let peer = PeerKnowledge {
            generation: 1,
            manifests: BTreeMap::from([("img".to_string(), Arc::new(base.clone()))]),
            dirty: BTreeMap::from([("img".to_string(), {
                let mut r = RangeSet::new();
                r.insert(20_000..20_010);
                r
            })]),
        };
        let (mut s, _hello) = PrimarySession::new(&Claim::first("a"), params(), g, peer);
        let out = s.handle(Frame::Welcome {
            version: VERSION,
            epoch: 0,
            generation: 1,
            group_root: [0; 32],
            images: vec![ImageState {
                path: "img".into(),
                size: base.size(),
                root: *base.root().as_bytes(),
            }],
        });
        assert!(matches!(out[0], Out::Send(Frame::Begin { .. })));
        let changed = active
            .entries()
            .iter()
            .find(|e| !base.entries().contains(e))
            .and_then(|e| e.hash())
            .map(|h| *h.as_bytes())
            .unwrap();
        let out = s.handle(Frame::Want {
            generation: 2,
            hashes: vec![changed],
            last: true,
        });
        assert!(matches!(out[..], [Out::Jobs]));
        assert!(matches!(s.next_job(), Some(Job::Patch { .. })));
        assert!(s.next_job().is_none());
        assert!(matches!(
            s.data_sent(),
            Some(Frame::Commit { generation: 2 })
        ));
        let out = s.handle(Frame::NeedFull {
            generation: 2,
            hash: changed,
        });
        assert!(matches!(out[..], [Out::Jobs]));
        assert!(matches!(s.next_job(), Some(Job::Chunk { .. })));
        assert!(s.data_sent().is_none());
    }
}
