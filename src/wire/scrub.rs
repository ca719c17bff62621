//! A replica's deep verify as it crosses the wire (`Frame::Scrubbed`): what it re-hashed,
//! what was damaged, and what became of each damaged chunk. The replica makes it
//! (`replica::scrub`); the primary shows it (`ferry verify --deep`).

use serde::{Deserialize, Serialize};

use super::frame::MAX_ITEMS;

/// What a deep verify found, and did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Report {
    /// The store's committed generation when the check began.
    pub generation: u64,
    /// Images and bytes re-hashed.
    pub images: usize,
    pub bytes: u64,
    /// Kept chunks re-hashed.
    pub kept_chunks: usize,
    pub damage: Vec<Damage>,
    /// Damaged chunks past the first [`MAX_ITEMS`], counted but not listed (one frame).
    pub unlisted: u64,
}

/// One damaged chunk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Damage {
    /// The image, for a chunk of an image; none for a kept chunk.
    pub path: Option<String>,
    pub offset: Option<u64>,
    pub len: u64,
    /// The hash its bytes should have (hex; empty for a zero extent).
    pub hash: String,
    /// The restore points that read it (a kept chunk).
    pub generations: Vec<u64>,
    pub state: State,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Found; no repair was asked.
    Found,
    /// Mended from a good copy in this store.
    Repaired,
    /// No good copy here: the primary's next generation brings it.
    Resync,
    /// No good copy anywhere this store can reach: the restore points named lost it.
    Lost,
}

impl Report {
    /// Damage not mended (`resync` counts: the bytes are still wrong until the next sync).
    pub fn left(&self) -> u64 {
        self.damage
            .iter()
            .filter(|d| d.state != State::Repaired)
            .count() as u64
            + self.unlisted
    }

    /// Lists one damaged chunk (or counts it, past [`MAX_ITEMS`]).
    pub fn push(&mut self, d: Damage) {
        if self.damage.len() < MAX_ITEMS {
            self.damage.push(d);
        } else {
            self.unlisted += 1;
        }
    }
}
