//! Frames: the messages of protocol `ferry/1` and their encoding.
//!
//! On every QUIC stream a frame is a 4-byte little-endian length followed by that many bytes of
//! a postcard-encoded [`Frame`]. The length is checked against [`MAX_FRAME`] before anything is
//! allocated, and decoding never trusts a count inside the frame beyond the bytes present, so
//! a malformed or hostile frame costs at most one bounded buffer and a clear error.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkParams;

/// Protocol version carried in the hello; a peer with another version is refused. Version 2:
/// refusals carry a [`RefuseCode`]. Version 3: `Hello` names the namespace and the takeover
/// it writes under; `Probe`.
pub const VERSION: u16 = 4;

/// Largest encoded frame: the largest chunk FastCDC allows (16 MiB) plus room for its header.
pub const MAX_FRAME: usize = (16 << 20) + (64 << 10);

/// The largest data frame (a `Chunk`, or a `Patch` of one) a session with chunks of at most
/// `params.max_size` bytes carries: the chunk, twice over for a patch's per-range framing at
/// worst, plus headers. A replica reads data streams with this bound, so what a peer can make
/// it hold in partly received frames is a few chunks per stream, not [`MAX_FRAME`].
pub fn data_frame_limit(params: &crate::manifest::ChunkParams) -> usize {
    (2 * params.max_size as usize + (64 << 10)).min(MAX_FRAME)
}

/// Plan entries per [`Frame::Plan`] frame, and hashes per [`Frame::Want`] frame, so control
/// frames stay small (about 2 MiB at most).
pub const MAX_ITEMS: usize = 32 * 1024;

/// A BLAKE3 hash on the wire.
pub type Hash = [u8; 32];

/// The group root of a generation: BLAKE3 over the sorted (path, size, root) of every image.
/// It names the generation; both sides compute it.
pub fn group_root<'a>(images: impl IntoIterator<Item = (&'a str, u64, Hash)>) -> Hash {
    let mut h = blake3::Hasher::new_derive_key("ferry 2026 group root v1");
    for (path, size, root) in images {
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path.as_bytes());
        h.update(&size.to_le_bytes());
        h.update(&root);
    }
    *h.finalize().as_bytes()
}

/// A manifest entry on the wire (its offset is implied by the entries before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireEntry {
    Data { len: u64, hash: Hash },
    Zero { len: u64 },
}

/// One image as a replica holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageState {
    pub path: String,
    pub size: u64,
    pub root: Hash,
}

/// A change to an image's manifest: the entries covering `[start, old_end)` of the base are
/// replaced by `entries` (which may cover a different length only at the end of the image).
/// Offsets are in the base manifest's coordinates; splices come in offset order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splice {
    pub start: u64,
    pub old_end: u64,
    pub entries: Vec<WireEntry>,
}

/// A namespace change, applied before the image plans of its generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsChange {
    Rename { from: String, to: String },
    Remove { path: String },
}

/// Why a replica refused a session, for the primary to act on and to tell its operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// The peers speak different protocol versions.
    Version,
    /// The peers chunk with different parameters.
    Params,
    /// The primary's epoch is older than the replica's: another primary was promoted.
    Fenced,
    /// A frame broke the session's rules (order, bounds, paths).
    Protocol,
    /// Data did not match its hash.
    Corrupt,
    /// The replica's store is full.
    NoSpace,
    /// The replica's store failed otherwise (an I/O error).
    Store,
    /// The primary's node name names another primary's namespace on this replica (or the
    /// primary sends there under another name).
    Namespace,
}

/// A refusal: its code and the replica's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: RefuseCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: RefuseCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }

    /// The refusal for a store that failed with `e`, in words `reason`: [`RefuseCode::NoSpace`]
    /// when any error of `e`'s chain is ENOSPC or EDQUOT, [`RefuseCode::Store`] otherwise.
    pub fn store(reason: String, e: &(dyn std::error::Error + 'static)) -> Refusal {
        let code = if crate::durable::is_full(e) {
            RefuseCode::NoSpace
        } else {
            RefuseCode::Store
        };
        Refusal::new(code, reason)
    }

    pub fn frame(&self) -> Frame {
        Frame::Refuse {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// Most rule violations are found where only words are at hand.
impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::new(RefuseCode::Protocol, reason)
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Refusal {
        Refusal::new(RefuseCode::Protocol, reason)
    }
}

/// The generation a promoted primary took over from, as it names it in `Hello`: a replica
/// that holds it lets the new primary write the namespace under a higher epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Takeover {
    /// The epoch of that generation (the old primary's).
    pub epoch: u64,
    pub generation: u64,
    pub group_root: Hash,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Primary → replica, first frame of a connection.
    Hello {
        version: u16,
        epoch: u64,
        /// The primary's own node name.
        node: String,
        params: ChunkParams,
        /// The namespace it writes: its node name, or the one it took over by a promotion.
        namespace: String,
        takeover: Option<Takeover>,
    },
    /// Replica → primary: accepted; what it holds.
    Welcome {
        version: u16,
        epoch: u64,
        generation: u64,
        group_root: Hash,
        images: Vec<ImageState>,
    },
    /// Replica → primary: the session cannot go on, why (for programs) and in words.
    Refuse { code: RefuseCode, reason: String },

    /// Primary → replica: the hashes of `count` tree nodes of an image from index `first` at
    /// `level` (0 = leaves). Used to find the replica's base when the primary does not know it.
    TreeQuery {
        path: String,
        level: u8,
        first: u32,
        count: u32,
    },
    TreeNodes {
        path: String,
        level: u8,
        first: u32,
        hashes: Vec<Hash>,
    },
    /// Primary → replica: the entries of these leaves.
    LeafQuery { path: String, leaves: Vec<u32> },
    Leaves {
        path: String,
        leaves: Vec<(u32, Vec<(u64, WireEntry)>)>,
    },

    /// Primary → replica: generation `generation` follows, built on the replica's
    /// `base_generation`, with these namespace changes and `images` image plans.
    Begin {
        generation: u64,
        base_generation: u64,
        group_root: Hash,
        changes: Vec<NsChange>,
        images: u32,
    },
    /// Part of one image's plan; `last` ends that image's plan.
    Plan {
        generation: u64,
        path: String,
        base_root: Hash,
        new_size: u64,
        new_root: Hash,
        splices: Vec<Splice>,
        last: bool,
    },
    /// Replica → primary: the chunks it lacks (neither stored nor staged); `last` ends the list.
    Want {
        generation: u64,
        hashes: Vec<Hash>,
        last: bool,
    },
    /// Primary → replica, on a data stream: a chunk, maybe zstd-compressed.
    Chunk {
        hash: Hash,
        zstd: bool,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Primary → replica, on a data stream: the chunk `hash` is the replica's bytes
    /// `[offset, offset + len)` of `path` (zeros past its end), whose hash is `base` if known,
    /// with these byte ranges replaced.
    Patch {
        hash: Hash,
        path: String,
        offset: u64,
        len: u64,
        base: Option<Hash>,
        ranges: Vec<(u64, serde_bytes::ByteBuf)>,
    },
    /// Replica → primary: a patch did not apply (or verify); send the whole chunk.
    NeedFull { generation: u64, hash: Hash },
    /// Primary → replica: all wanted data is sent; commit when it has arrived.
    Commit { generation: u64 },
    /// Replica → primary: generation committed and applied, with its roots.
    Ack {
        generation: u64,
        group_root: Hash,
        images: Vec<ImageState>,
        /// How busy the replica's data-stream readers were while this generation's data
        /// arrived, in percent of their time (the rest they waited for data): near 100, the
        /// replica, not the link or the primary, set the pace. 0 when not measured.
        busy_pct: u8,
    },

    /// Primary → replica, after `Welcome` instead of a generation (`ferry verify --deep`):
    /// re-hash the store's images and kept chunks; with `repair`, mend what differs.
    Scrub { repair: bool },
    /// Replica → primary: what the deep verify found and did.
    Scrubbed { report: super::scrub::Report },

    /// A node about to be promoted → replica, first frame of a connection instead of `Hello`:
    /// what does namespace `namespace` hold? Claims nothing.
    Probe { version: u16, namespace: String },
    /// Replica → asker: the namespace's committed generation (0 if it has none), its epoch and
    /// the node that holds that epoch.
    Probed {
        epoch: u64,
        holder: String,
        generation: u64,
        group_root: Hash,
    },
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge { len: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame with its length prefix.
pub fn encode(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode_to(f, &mut out);
    out
}

/// Appends a frame with its length prefix to `out` (several frames written at once).
pub fn encode_to(f: &Frame, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    *out = postcard::to_extend(f, std::mem::take(out)).expect("frames always serialise");
    let len = out.len() - at - 4;
    debug_assert!(len <= MAX_FRAME, "an oversized frame was built");
    out[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

/// Checks a length prefix before the body is read.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix). Trailing bytes are an error.
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let (f, rest) = postcard::take_from_bytes::<Frame>(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(f)
}

/// Splits a byte stream into frames: feed bytes in, take frames out (for tests and fuzzing;
/// the QUIC transport reads prefix and body directly).
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = check_len(self.buf[..4].try_into().expect("4 bytes"))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let f = decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        f.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                version: VERSION,
                epoch: 3,
                node: "site-b".into(),
                params: ChunkParams::default(),
                namespace: "site-a".into(),
                takeover: Some(Takeover {
                    epoch: 2,
                    generation: 7,
                    group_root: [4; 32],
                }),
            },
            Frame::Probe {
                version: VERSION,
                namespace: "site-a".into(),
            },
            Frame::Probed {
                epoch: 3,
                holder: "site-b".into(),
                generation: 9,
                group_root: [5; 32],
            },
            Frame::Plan {
                generation: 9,
                path: "vms/a.qcow2".into(),
                base_root: [1; 32],
                new_size: 1 << 30,
                new_root: [2; 32],
                splices: vec![Splice {
                    start: 65536,
                    old_end: 131072,
                    entries: vec![
                        WireEntry::Data {
                            len: 30000,
                            hash: [3; 32],
                        },
                        WireEntry::Zero { len: 35536 },
                    ],
                }],
                last: true,
            },
            Frame::Chunk {
                hash: [4; 32],
                zstd: false,
                data: vec![5; 70000],
            },
            Frame::Patch {
                hash: [6; 32],
                path: "x".into(),
                offset: 4096,
                len: 65536,
                base: Some([7; 32]),
                ranges: vec![(100, serde_bytes::ByteBuf::from(vec![8; 4096]))],
            },
            Frame::Ack {
                generation: 9,
                group_root: [9; 32],
                images: vec![ImageState {
                    path: "x".into(),
                    size: 5,
                    root: [10; 32],
                }],
                busy_pct: 97,
            },
        ]
    }

    #[test]
    fn frames_round_trip_through_a_byte_stream() {
        let mut d = Decoder::default();
        let all: Vec<u8> = samples().iter().flat_map(encode).collect();
        // Byte by byte: a frame appears only once it is complete.
        let mut out = Vec::new();
        for b in &all {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, samples());
    }

    #[test]
    fn an_oversized_length_is_refused_before_allocating() {
        let mut d = Decoder::default();
        d.push(&u32::MAX.to_le_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn trailing_bytes_and_unknown_variants_are_malformed() {
        let mut b = encode(&samples()[0]);
        b.push(0);
        assert!(decode(&b[4..]).is_err());
        assert!(decode(&[200, 1, 2]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The decoder never panics and never allocates beyond the frame on arbitrary bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode(&bytes);
            let mut d = Decoder::default();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }

        /// Mutated valid frames decode to an error or to some frame, never a panic.
        #[test]
        fn mutated_frames_never_panic(i in 0usize..5, pos in any::<usize>(), byte in any::<u8>()) {
            let mut b = encode(&samples()[i]);
            let p = 4 + pos % (b.len() - 4);
            b[p] = byte;
            let _ = decode(&b[4..]);
        }
    }
}
