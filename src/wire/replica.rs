//! The replica's side of a session, sans I/O: frames in, frames out, the store behind a trait.
//!
//! Order of a generation: `Hello` → `Welcome`; optional tree and leaf queries; `Begin`, the
//! image `Plan`s (each checked against the base manifest the store holds: every splice
//! boundary and the resulting root); `Want` (the chunks neither stored nor staged); `Chunk` and
//! `Patch` frames (each hash verified before it is staged); `Commit` → the store commits and
//! applies the generation → `Ack` with the roots. Any violation ends the session with `Refuse`
//! and leaves the last committed generation untouched.

use std::collections::{BTreeMap, HashSet};

use super::frame::{
    Frame, Hash, ImageState, MAX_ITEMS, NsChange, Refusal, RefuseCode, Splice, VERSION, WireEntry,
};
use super::plan;
use crate::chunk::ChunkParams;
use crate::manifest::{LEAF_SPAN, Manifest, short_hex as hex};

/// What the replica's store does for a session. The real store is `replica::Store`; tests use
/// an in-memory one.
pub trait ReplicaStore {
    fn params(&self) -> ChunkParams;
    fn epoch(&self) -> u64;
    /// Last committed generation and its group root.
    fn generation(&self) -> (u64, Hash);
    fn images(&self) -> Vec<ImageState>;
    /// The committed manifest of an image.
    fn manifest(&self, path: &str) -> Option<&Manifest>;
    /// True when the chunk is stored in some image or already staged.
    fn have(&self, hash: &Hash) -> bool;
    /// Bytes `[offset, offset + len)` of the committed image (zeros past its end).
    fn base_bytes(&self, path: &str, offset: u64, len: u64) -> std::io::Result<Vec<u8>>;
    /// Stages a verified chunk.
    fn stage(&mut self, hash: &Hash, data: &[u8]) -> std::io::Result<()>;
    /// Stages chunk `hash`, sent as a patch: the committed bytes of `path` at
    /// `[offset, offset + len)` (zeros past its end) with `ranges` (offsets in the chunk,
    /// inside it) laid over. `Ok(false)`, staging nothing, when they do not make `hash` or the
    /// base cannot be read (the primary then sends the chunk whole). A store may keep the
    /// ranges alone, as long as it commits the same bytes. `checked_at`: the caller already
    /// found that the ranges make `hash` over the bytes committed at that generation (see
    /// [`Checked`]); a store whose committed generation is still that one need not look again.
    fn stage_patch(
        &mut self,
        hash: &Hash,
        path: &str,
        offset: u64,
        len: u64,
        ranges: &[(u64, serde_bytes::ByteBuf)],
        _checked_at: Option<u64>,
    ) -> std::io::Result<bool> {
        let Ok(mut bytes) = self.base_bytes(path, offset, len) else {
            return Ok(false);
        };
        for (at, data) in ranges {
            bytes[*at as usize..*at as usize + data.len()].copy_from_slice(data);
        }
        if *blake3::hash(&bytes).as_bytes() != *hash {
            return Ok(false);
        }
        self.stage(hash, &bytes).map(|()| true)
    }
    /// Commits and applies a generation whose chunks are all stored or staged.
    fn commit(&mut self, g: &Generation) -> anyhow::Result<()>;
    /// Whether the store has room to stage and commit these new manifests: `Err` says how much
    /// is free and how much is needed, before any data is sent.
    fn room_for(&self, _images: &BTreeMap<String, Manifest>) -> Result<(), String> {
        Ok(())
    }
    /// Prepares to receive these new manifests (after [`ReplicaStore::room_for`] agreed): a
    /// store may stage some images in place, and may then `have` chunks it did not before.
    fn prepare(&mut self, _images: &BTreeMap<String, Manifest>) -> std::io::Result<()> {
        Ok(())
    }
}

/// A generation as the replica received it.
#[derive(Clone, Debug)]
pub struct Generation {
    pub number: u64,
    pub group_root: Hash,
    pub changes: Vec<NsChange>,
    /// New manifests of the images that changed.
    pub images: BTreeMap<String, Manifest>,
}

pub const META_DIR: &str = ".ferry";

/// Whether an image path from a primary may be used under the store: relative, no `..`, not
/// the store's own metadata directory.
pub fn valid_path(p: &str) -> bool {
    let path = std::path::Path::new(p);
    !p.is_empty()
        && p.len() <= 4096
        && !p.contains('\0')
        && path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        && path
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() != META_DIR)
}

/// A data frame whose costly check was done before its turn in the session, on the thread that
/// read it: the frames of several data streams are checked at once, and the session (and the
/// store's lock) is held only to stage them. A verdict holds for its own frame alone.
pub struct Checked {
    frame: Frame,
    verdict: Verdict,
}

enum Verdict {
    /// Nothing checked ahead: the session checks.
    None,
    /// A chunk's bytes decompressed and found to hash to its id, or why not.
    Chunk(Result<Vec<u8>, Refusal>),
    /// A patch found to make its chunk over the bytes committed at this generation.
    Patch(u64),
}

impl Checked {
    /// A frame to be checked by the session itself.
    pub fn unchecked(frame: Frame) -> Checked {
        Checked {
            frame,
            verdict: Verdict::None,
        }
    }

    /// Decompresses and hashes a `Chunk` frame (chunks of at most `max_size` bytes); any other
    /// frame is left to the session. The bytes move into the verdict (the frame keeps an empty
    /// body): an uncompressed chunk is not copied.
    pub fn chunk(frame: Frame, max_size: usize) -> Checked {
        match frame {
            Frame::Chunk { hash, zstd, data } => Checked {
                verdict: Verdict::Chunk(verified(&hash, zstd, data, max_size)),
                frame: Frame::Chunk {
                    hash,
                    zstd,
                    data: Vec::new(),
                },
            },
            frame => Checked::unchecked(frame),
        }
    }

    /// A `Patch` frame the store found to make its chunk over the bytes it had committed at
    /// `generation`.
    pub fn patch(frame: Frame, generation: u64) -> Checked {
        let verdict = match &frame {
            Frame::Patch { .. } => Verdict::Patch(generation),
            _ => Verdict::None,
        };
        Checked { frame, verdict }
    }
}

/// Whether every range of a patch lies inside its chunk of `len` bytes.
pub fn ranges_fit(len: u64, ranges: &[(u64, serde_bytes::ByteBuf)]) -> bool {
    ranges.iter().all(|(off, data)| {
        off.checked_add(data.len() as u64)
            .is_some_and(|end| end <= len)
    })
}

/// A chunk frame's bytes, decompressed (at most `max` bytes), if they hash to `hash`.
fn verified(hash: &Hash, zstd: bool, data: Vec<u8>, max: usize) -> Result<Vec<u8>, Refusal> {
    let raw = if zstd {
        super::squeeze::unpack(&data, max).map_err(|e| {
            Refusal::new(
                RefuseCode::Corrupt,
                format!("chunk {} does not decompress: {e}", hex(hash)),
            )
        })?
    } else {
        data
    };
    if crate::chunk::hash_by_pieces(&raw).as_bytes() != hash {
        return Err(Refusal::new(
            RefuseCode::Corrupt,
            format!(
                "chunk {} does not match its hash: corrupt data refused",
                hex(hash)
            ),
        ));
    }
    Ok(raw)
}

struct Pending {
    number: u64,
    group_root: Hash,
    changes: Vec<NsChange>,
    images_expected: u32,
    images: BTreeMap<String, Manifest>,
    /// The plan of the image being received: (path, base root, new size, new root, splices).
    partial: Option<(String, Hash, u64, Hash, Vec<Splice>)>,
    outstanding: HashSet<Hash>,
    commit_asked: bool,
}

enum State {
    AwaitHello,
    Ready,
    Receiving(Box<Pending>),
    Closed,
}

pub struct ReplicaSession {
    state: State,
    /// The epoch the primary said it writes under (its `Hello`).
    epoch: u64,
    /// Chunks received but not needed (already staged or never wanted): counted for tests.
    pub duplicates: u64,
}

impl Default for ReplicaSession {
    fn default() -> Self {
        ReplicaSession {
            state: State::AwaitHello,
            epoch: 0,
            duplicates: 0,
        }
    }
}

impl ReplicaSession {
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Welcomed and between generations: a deep verify (`Scrub`, run by the daemon beside the
    /// session) may be asked now.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Closes the session (the transport refused on its behalf: a frame it could not decode).
    pub fn close(&mut self) {
        self.state = State::Closed;
    }

    /// Handles one frame from the primary; returns the frames to send back. A `Refuse` in the
    /// output closes the session; frames that arrive after it (data already in flight on
    /// other streams) are dropped without another answer, so the first refusal, which names
    /// the cause, is the only one the primary gets.
    pub fn handle(&mut self, store: &mut dyn ReplicaStore, f: Frame) -> Vec<Frame> {
        self.handle_checked(store, Checked::unchecked(f))
    }

    /// [`handle`](Self::handle) for a frame checked ahead ([`Checked`]).
    pub fn handle_checked(&mut self, store: &mut dyn ReplicaStore, c: Checked) -> Vec<Frame> {
        if self.is_closed() {
            return vec![];
        }
        match self.step(store, c) {
            Ok(out) => out,
            Err(r) => {
                log::warn!("session refused: {r}");
                self.state = State::Closed;
                vec![r.frame()]
            }
        }
    }

    fn step(&mut self, store: &mut dyn ReplicaStore, c: Checked) -> Result<Vec<Frame>, Refusal> {
        let Checked { frame: f, verdict } = c;
        // A promotion may take the namespace over while this session runs (its primary was
        // cut off, or fenced itself too late): from then on nothing of it is committed.
        if !matches!(self.state, State::AwaitHello) && self.epoch < store.epoch() {
            return Err(Refusal::new(
                RefuseCode::Fenced,
                format!(
                    "the namespace was taken over at epoch {} while this session of epoch {} \
                     ran: it was fenced by that promotion, nothing more of it is committed",
                    store.epoch(),
                    self.epoch
                ),
            ));
        }
        let dups = &mut self.duplicates;
        match (&mut self.state, f) {
            (State::Closed, _) => Err("session already closed".into()),
            (
                State::AwaitHello,
                Frame::Hello {
                    version,
                    epoch,
                    node,
                    params,
                    ..
                },
            ) => {
                let out = hello(store, version, epoch, &node, params)?;
                self.epoch = epoch;
                self.state = State::Ready;
                Ok(out)
            }
            (State::AwaitHello, _) => Err("expected Hello first".into()),
            (
                State::Ready | State::Receiving(_),
                Frame::TreeQuery {
                    path,
                    level,
                    first,
                    count,
                },
            ) => tree_nodes(store, path, level, first, count),
            (State::Ready | State::Receiving(_), Frame::LeafQuery { path, leaves }) => {
                leaves_of(store, path, leaves)
            }
            (
                State::Ready,
                Frame::Begin {
                    generation,
                    base_generation,
                    group_root,
                    changes,
                    images,
                },
            ) => {
                let (pending, out) = begin(
                    store,
                    generation,
                    base_generation,
                    group_root,
                    changes,
                    images,
                )?;
                self.state = State::Receiving(Box::new(pending));
                Ok(out)
            }
            (State::Receiving(p), f @ Frame::Plan { .. }) => p.plan(store, f),
            (State::Receiving(p), Frame::Chunk { hash, zstd, data }) => {
                let checked = match verdict {
                    Verdict::Chunk(r) => Some(r),
                    _ => None,
                };
                p.chunk(store, hash, zstd, data, checked, dups)
            }
            (
                State::Receiving(p),
                Frame::Patch {
                    hash,
                    path,
                    offset,
                    len,
                    base: _,
                    ranges,
                },
            ) => {
                let checked_at = match verdict {
                    Verdict::Patch(g) => Some(g),
                    _ => None,
                };
                p.patch(store, hash, (&path, offset, len), &ranges, checked_at, dups)
            }
            (State::Receiving(p), Frame::Commit { generation }) => p.commit(store, generation),
            (_, other) => Err(format!("unexpected {}", frame_name(&other)).into()),
        }
        .inspect(|out| {
            if out.iter().any(|f| matches!(f, Frame::Ack { .. })) {
                self.state = State::Ready;
            }
        })
    }
}

/// `Hello`: checks version, epoch and chunk parameters; answers `Welcome`.
fn hello(
    store: &dyn ReplicaStore,
    version: u16,
    epoch: u64,
    node: &str,
    params: ChunkParams,
) -> Result<Vec<Frame>, Refusal> {
    if version != VERSION {
        return Err(Refusal::new(
            RefuseCode::Version,
            format!(
                "protocol version {version} is not supported (this replica speaks {VERSION}); run the same ferry version on both hosts"
            ),
        ));
    }
    if epoch < store.epoch() {
        return Err(Refusal::new(
            RefuseCode::Fenced,
            format!(
                "primary {node} has epoch {epoch}, older than this replica's {}: it was fenced by a promotion",
                store.epoch()
            ),
        ));
    }
    if params != store.params() {
        return Err(Refusal::new(
            RefuseCode::Params,
            format!(
                "chunk parameters differ (primary {params:?}, replica {:?}): use the same [chunking] on both",
                store.params()
            ),
        ));
    }
    log::info!("primary {node} connected (epoch {epoch})");
    let (generation, group_root) = store.generation();
    Ok(vec![Frame::Welcome {
        version: VERSION,
        epoch: store.epoch(),
        generation,
        group_root,
        images: store.images(),
    }])
}

/// `TreeQuery`: hashes of a level of an image's Merkle tree.
fn tree_nodes(
    store: &dyn ReplicaStore,
    path: String,
    level: u8,
    first: u32,
    count: u32,
) -> Result<Vec<Frame>, Refusal> {
    let m = store
        .manifest(&path)
        .ok_or_else(|| format!("tree query for unknown image {path:?}"))?;
    let t = m.tree();
    if level as usize >= t.depth() {
        return Err(format!("tree query below the tree of {path:?}").into());
    }
    let lv = t.level(level as usize);
    let from = (first as usize).min(lv.len());
    let to = from
        .saturating_add(count as usize)
        .min(lv.len())
        .min(from + MAX_ITEMS);
    let hashes = lv[from..to].iter().map(|h| *h.as_bytes()).collect();
    Ok(vec![Frame::TreeNodes {
        path,
        level,
        first,
        hashes,
    }])
}

/// `LeafQuery`: the entries of some leaves of an image's manifest.
fn leaves_of(
    store: &dyn ReplicaStore,
    path: String,
    leaves: Vec<u32>,
) -> Result<Vec<Frame>, Refusal> {
    let m = store
        .manifest(&path)
        .ok_or_else(|| format!("leaf query for unknown image {path:?}"))?;
    if leaves.len() > MAX_ITEMS {
        return Err("leaf query too long".into());
    }
    let mut out = Vec::new();
    let mut items = 0;
    for leaf in leaves {
        let lo = leaf as u64 * LEAF_SPAN;
        let es = m.entries();
        let i = es.partition_point(|e| e.offset < lo);
        let j = es.partition_point(|e| e.offset < lo + LEAF_SPAN);
        items += j - i;
        out.push((
            leaf,
            es[i..j]
                .iter()
                .map(|e| (e.offset, plan::to_wire(e)))
                .collect(),
        ));
    }
    if items > 4 * MAX_ITEMS {
        return Err("leaf query asks for too many entries at once".into());
    }
    Ok(vec![Frame::Leaves { path, leaves: out }])
}

/// `Begin`: a generation follows, built on the committed one.
fn begin(
    store: &dyn ReplicaStore,
    generation: u64,
    base_generation: u64,
    group_root: Hash,
    changes: Vec<NsChange>,
    images: u32,
) -> Result<(Pending, Vec<Frame>), Refusal> {
    let (current, _) = store.generation();
    if base_generation != current {
        return Err(format!(
            "generation {generation} is built on {base_generation}, but this replica holds {current}"
        ).into());
    }
    if generation <= current {
        return Err(
            format!("generation {generation} is not newer than the committed {current}").into(),
        );
    }
    for c in &changes {
        let (NsChange::Remove { path } | NsChange::Rename { from: path, .. }) = c;
        if !valid_path(path) {
            return Err(format!("invalid image path {path:?}").into());
        }
        if let NsChange::Rename { to, .. } = c
            && !valid_path(to)
        {
            return Err(format!("invalid image path {to:?}").into());
        }
    }
    let pending = Pending {
        number: generation,
        group_root,
        changes,
        images_expected: images,
        images: BTreeMap::new(),
        partial: None,
        outstanding: HashSet::new(),
        commit_asked: false,
    };
    // Only namespace changes: nothing to want.
    let out = if images == 0 {
        vec![Frame::Want {
            generation,
            hashes: vec![],
            last: true,
        }]
    } else {
        vec![]
    };
    Ok((pending, out))
}

impl Pending {
    /// `Plan`: part of one image's plan, checked against the base the store holds; the
    /// last image's plan is answered with the `Want` list.
    fn plan(&mut self, store: &mut dyn ReplicaStore, f: Frame) -> Result<Vec<Frame>, Refusal> {
        let Frame::Plan {
            generation,
            path,
            base_root,
            new_size,
            new_root,
            splices,
            last,
        } = f
        else {
            return Err(format!("expected a plan, got {}", frame_name(&f)).into());
        };
        if generation != self.number {
            return Err(format!("plan for generation {generation} inside {}", self.number).into());
        }
        if !valid_path(&path) {
            return Err(format!("invalid image path {path:?}").into());
        }
        if self.images.len() as u32 >= self.images_expected || self.images.contains_key(&path) {
            return Err(format!("unexpected plan for {path:?}").into());
        }
        match &mut self.partial {
            Some((pp, _, _, _, acc)) if *pp == path => acc.extend(splices),
            Some((pp, ..)) => {
                return Err(format!("plan for {path:?} interleaved with {pp:?}").into());
            }
            None => self.partial = Some((path.clone(), base_root, new_size, new_root, splices)),
        }
        if !last {
            return Ok(vec![]);
        }
        let (path, base_root, new_size, new_root, splices) =
            self.partial.take().expect("set above");
        let empty = Manifest::empty(store.params());
        let base = store.manifest(&path).unwrap_or(&empty);
        if *base.root().as_bytes() != base_root {
            return Err(
                format!("plan for {path:?} is built on a base this replica does not hold").into(),
            );
        }
        let m = plan::apply(
            base,
            store.params(),
            &splices,
            new_size,
            &blake3::Hash::from_bytes(new_root),
        )
        .map_err(|e| format!("plan for {path:?}: {e}"))?;
        // Only the splices can name a chunk the replica lacks: every other entry is the
        // committed base's, held in its image (so the wants cost the change, not the image).
        // Those the store has are taken out once every plan is in and the store prepared.
        for w in splices.iter().flat_map(|s| &s.entries) {
            if let WireEntry::Data { hash, .. } = w {
                self.outstanding.insert(*hash);
            }
        }
        self.images.insert(path, m);
        if self.images.len() as u32 == self.images_expected {
            store
                .room_for(&self.images)
                .map_err(|e| Refusal::new(RefuseCode::NoSpace, e))?;
            store.prepare(&self.images).map_err(|e| {
                Refusal::new(
                    RefuseCode::Store,
                    format!("cannot stage the generation's new images: {e}"),
                )
            })?;
            // Chunks the store holds or staged (an earlier, interrupted session's too) are not
            // asked for.
            self.outstanding.retain(|h| !store.have(h));
            let want: Vec<Hash> = self.outstanding.iter().copied().collect();
            let mut frames: Vec<Frame> = want
                .chunks(MAX_ITEMS)
                .map(|c| Frame::Want {
                    generation: self.number,
                    hashes: c.to_vec(),
                    last: false,
                })
                .collect();
            frames.push(Frame::Want {
                generation: self.number,
                hashes: vec![],
                last: true,
            });
            return Ok(frames);
        }
        Ok(vec![])
    }

    /// `Chunk`: verified against its hash, then staged.
    fn chunk(
        &mut self,
        store: &mut dyn ReplicaStore,
        hash: Hash,
        zstd: bool,
        data: Vec<u8>,
        checked: Option<Result<Vec<u8>, Refusal>>,
        duplicates: &mut u64,
    ) -> Result<Vec<Frame>, Refusal> {
        if !self.outstanding.contains(&hash) {
            *duplicates += 1;
            return Ok(vec![]);
        }
        let raw = match checked {
            Some(r) => r?,
            None => verified(&hash, zstd, data, store.params().max_size as usize)?,
        };
        store
            .stage(&hash, &raw)
            .map_err(|e| Refusal::store(format!("cannot stage chunk {}: {e}", hex(&hash)), &e))?;
        self.outstanding.remove(&hash);
        self.maybe_commit(store)
    }

    /// `Patch`: the base bytes with the ranges replaced, verified, then staged; `NeedFull`
    /// when it does not apply.
    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        store: &mut dyn ReplicaStore,
        hash: Hash,
        (path, offset, len): (&str, u64, u64),
        ranges: &[(u64, serde_bytes::ByteBuf)],
        checked_at: Option<u64>,
        duplicates: &mut u64,
    ) -> Result<Vec<Frame>, Refusal> {
        if !self.outstanding.contains(&hash) {
            *duplicates += 1;
            return Ok(vec![]);
        }
        let need_full = || {
            Ok(vec![Frame::NeedFull {
                generation: self.number,
                hash,
            }])
        };
        if !valid_path(path) || len > store.params().max_size as u64 {
            return need_full();
        }
        if !ranges_fit(len, ranges) {
            return Err("patch range outside its chunk".into());
        }
        // The base's own hash (`base`) is not checked: the result's is, which a wrong base
        // fails as surely.
        let staged = store
            .stage_patch(&hash, path, offset, len, ranges, checked_at)
            .map_err(|e| Refusal::store(format!("cannot stage chunk {}: {e}", hex(&hash)), &e))?;
        if !staged {
            return need_full();
        }
        self.outstanding.remove(&hash);
        self.maybe_commit(store)
    }

    /// `Commit`: commit as soon as every wanted chunk is staged.
    fn commit(
        &mut self,
        store: &mut dyn ReplicaStore,
        generation: u64,
    ) -> Result<Vec<Frame>, Refusal> {
        if generation != self.number || (self.images.len() as u32) < self.images_expected {
            return Err(format!("commit of generation {generation} before its plan").into());
        }
        self.commit_asked = true;
        self.maybe_commit(store)
    }

    fn maybe_commit(&mut self, store: &mut dyn ReplicaStore) -> Result<Vec<Frame>, Refusal> {
        if !self.commit_asked || !self.outstanding.is_empty() {
            return Ok(vec![]);
        }
        let g = Generation {
            number: self.number,
            group_root: self.group_root,
            changes: std::mem::take(&mut self.changes),
            images: std::mem::take(&mut self.images),
        };
        // The images as they will be must make up the root the generation is named by:
        // checked before anything is applied.
        let mut after: BTreeMap<String, (u64, Hash)> = store
            .images()
            .into_iter()
            .map(|i| (i.path, (i.size, i.root)))
            .collect();
        for c in &g.changes {
            if let NsChange::Remove { path } = c {
                after.remove(path);
            }
        }
        for (path, m) in &g.images {
            after.insert(path.clone(), (m.size(), *m.root().as_bytes()));
        }
        let root = super::frame::group_root(after.iter().map(|(p, (s, r))| (p.as_str(), *s, *r)));
        if root != g.group_root {
            return Err(Refusal::new(
                RefuseCode::Protocol,
                format!(
                    "the images of generation {} do not make up its group root {}: refused, \
                     nothing applied",
                    g.number,
                    hex(&g.group_root)
                ),
            ));
        }
        store.commit(&g).map_err(|e| {
            Refusal::store(
                format!("cannot commit generation {}: {e:#}", g.number),
                e.as_ref(),
            )
        })?;
        let (generation, group_root) = store.generation();
        Ok(vec![Frame::Ack {
            generation,
            group_root,
            images: store.images(),
            // The transport measures it (`replica::daemon`).
            busy_pct: 0,
        }])
    }
}

pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Welcome { .. } => "Welcome",
        Frame::Refuse { .. } => "Refuse",
        Frame::TreeQuery { .. } => "TreeQuery",
        Frame::TreeNodes { .. } => "TreeNodes",
        Frame::LeafQuery { .. } => "LeafQuery",
        Frame::Leaves { .. } => "Leaves",
        Frame::Begin { .. } => "Begin",
        Frame::Plan { .. } => "Plan",
        Frame::Want { .. } => "Want",
        Frame::Chunk { .. } => "Chunk",
        Frame::Patch { .. } => "Patch",
        Frame::NeedFull { .. } => "NeedFull",
        Frame::Commit { .. } => "Commit",
        Frame::Ack { .. } => "Ack",
        Frame::Scrub { .. } => "Scrub",
        Frame::Scrubbed { .. } => "Scrubbed",
        Frame::Probe { .. } => "Probe",
        Frame::Probed { .. } => "Probed",
    }
}
