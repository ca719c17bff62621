//! Plans: how an image's manifest changes from a base to a new generation, as splices, and how
//! a replica applies them (checking every boundary and the resulting root).

use super::frame::{Splice, WireEntry};
use crate::chunk::ChunkParams;
use crate::manifest::{Entry, Kind, Manifest};

/// Why a plan cannot be applied to the base the replica holds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("splice at {start} does not start on an entry boundary of the base")]
    Start { start: u64 },
    #[error("splice at {start} ends at {end}, not an entry boundary of the base")]
    End { start: u64, end: u64 },
    #[error("splices overlap or are out of order at {start}")]
    Order { start: u64 },
    #[error("the planned manifest is invalid: {0}")]
    Invalid(String),
    #[error("the planned manifest's root {got} is not the announced {want}")]
    Root { got: String, want: String },
}

pub fn to_wire(e: &Entry) -> WireEntry {
    match e.kind {
        Kind::Data(h) => WireEntry::Data {
            len: e.len,
            hash: *h.as_bytes(),
        },
        Kind::Zero => WireEntry::Zero { len: e.len },
    }
}

pub fn from_wire(offset: u64, w: &WireEntry) -> Entry {
    match *w {
        WireEntry::Data { len, hash } => Entry {
            offset,
            len,
            kind: Kind::Data(blake3::Hash::from_bytes(hash)),
        },
        WireEntry::Zero { len } => Entry {
            offset,
            len,
            kind: Kind::Zero,
        },
    }
}

fn wire_len(w: &WireEntry) -> u64 {
    match *w {
        WireEntry::Data { len, .. } | WireEntry::Zero { len } => len,
    }
}

/// The splices that turn `base` into `new`: each maximal run of entries that differ, between
/// boundaries both manifests share.
pub fn splices(base: &Manifest, new: &Manifest) -> Vec<Splice> {
    let (b, n) = (base.entries(), new.entries());
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < b.len() || j < n.len() {
        if i < b.len() && j < n.len() && b[i] == n[j] {
            i += 1;
            j += 1;
            continue;
        }
        // Both lists are at the same offset here (what precedes is identical).
        let start = b.get(i).map_or(base.size(), |e| e.offset);
        let j0 = j;
        let (mut old_end, mut new_end) = (start, start);
        loop {
            if old_end == new_end && old_end > start {
                let same_next = i < b.len() && j < n.len() && b[i] == n[j];
                if same_next || (i == b.len() && j == n.len()) {
                    break;
                }
            }
            if i == b.len() && j == n.len() {
                break;
            }
            let take_old = j == n.len() || (i < b.len() && old_end <= new_end);
            if take_old {
                old_end = b[i].end();
                i += 1;
            } else {
                new_end = n[j].end();
                j += 1;
            }
        }
        out.push(Splice {
            start,
            old_end,
            entries: n[j0..j].iter().map(to_wire).collect(),
        });
    }
    out
}

/// Applies `splices` to `base`, giving the manifest of `new_size` bytes whose root must be
/// `want_root`.
pub fn apply(
    base: &Manifest,
    params: ChunkParams,
    splices: &[Splice],
    new_size: u64,
    want_root: &blake3::Hash,
) -> Result<Manifest, PlanError> {
    let b = base.entries();
    let mut out: Vec<Entry> = Vec::with_capacity(b.len() + splices.len());
    let mut i = 0; // next base entry to copy
    let mut shift: i128 = 0; // new offset - old offset after the splices so far
    let mut last_end = 0u64;
    for s in splices {
        if s.start < last_end || s.old_end < s.start {
            return Err(PlanError::Order { start: s.start });
        }
        while i < b.len() && b[i].offset < s.start {
            push_shifted(&mut out, &b[i], shift)?;
            i += 1;
        }
        if i < b.len() && b[i].offset != s.start || i == b.len() && s.start != base.size() {
            return Err(PlanError::Start { start: s.start });
        }
        while i < b.len() && b[i].offset < s.old_end {
            i += 1;
        }
        let at_boundary = if i < b.len() {
            b[i].offset == s.old_end
        } else {
            s.old_end == base.size()
        };
        if !at_boundary {
            return Err(PlanError::End {
                start: s.start,
                end: s.old_end,
            });
        }
        let mut off = (s.start as i128 + shift) as u64;
        let new_start = off;
        for w in &s.entries {
            out.push(from_wire(off, w));
            off = off
                .checked_add(wire_len(w))
                .ok_or_else(|| PlanError::Invalid("entry lengths overflow".into()))?;
        }
        shift += (off - new_start) as i128 - (s.old_end - s.start) as i128;
        last_end = s.old_end;
    }
    for e in &b[i..] {
        push_shifted(&mut out, e, shift)?;
    }
    let m = Manifest::new_over(base, params, new_size, out)
        .map_err(|e| PlanError::Invalid(e.to_string()))?;
    if m.root() != *want_root {
        return Err(PlanError::Root {
            got: m.root().to_hex().to_string(),
            want: want_root.to_hex().to_string(),
        });
    }
    Ok(m)
}

fn push_shifted(out: &mut Vec<Entry>, e: &Entry, shift: i128) -> Result<(), PlanError> {
    let off = e.offset as i128 + shift;
    if off < 0 || off > u64::MAX as i128 {
        return Err(PlanError::Invalid(
            "splices shift entries out of range".into(),
        ));
    }
    out.push(Entry {
        offset: off as u64,
        ..*e
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_full, rechunk};
    use proptest::prelude::*;

    use crate::testutil::{random as img, small_params as params};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Splices computed on the primary rebuild the new manifest exactly from the base.
        #[test]
        fn splices_rebuild_the_new_manifest(
            len in 0usize..60_000,
            writes in prop::collection::vec((0usize..70_000, 1usize..5000, any::<u8>()), 0..6),
            new_len in prop::option::of(0usize..80_000),
        ) {
            let old = img(len, 1);
            let (base, _) = chunk_full(&old, params()).unwrap();
            let mut new = old.clone();
            let mut dirty = vec![];
            for (off, l, byte) in writes {
                let off = off.min(new.len());
                let end = off + l;
                if end > new.len() { new.resize(end, 0); }
                new[off..end].fill(byte);
                dirty.push(off as u64..end as u64);
            }
            if let Some(n) = new_len { new.resize(n, 0); }
            let (active, _) = rechunk(&base, &new, &dirty).unwrap();
            let sp = splices(&base, &active);
            let got = apply(&base, params(), &sp, active.size(), &active.root()).unwrap();
            prop_assert_eq!(got, active.clone());
            // Entries that did not change are not sent.
            let sent: usize = sp.iter().map(|s| s.entries.len()).sum();
            let same = active.entries().iter().filter(|e| base.entries().contains(e)).count();
            prop_assert!(sent <= active.entries().len() - same + 1);
        }
    }

    #[test]
    fn a_plan_that_does_not_fit_the_base_is_refused() {
        let (base, _) = chunk_full(&img(50_000, 2), params()).unwrap();
        let mut v = img(50_000, 2);
        v[20_000] ^= 1;
        let (new, _) = chunk_full(&v, params()).unwrap();
        let sp = splices(&base, &new);
        assert_eq!(sp.len(), 1);
        let root = new.root();
        // Wrong root, shifted start, bad end, out of order: each refused.
        assert!(matches!(
            apply(&base, params(), &sp, new.size(), &base.root()),
            Err(PlanError::Root { .. })
        ));
        let mut bad = sp.clone();
        bad[0].start += 1;
        assert!(apply(&base, params(), &bad, new.size(), &root).is_err());
        let mut bad = sp.clone();
        bad[0].old_end -= 1;
        assert!(apply(&base, params(), &bad, new.size(), &root).is_err());
        let bad = vec![sp[0].clone(), sp[0].clone()];
        assert!(matches!(
            apply(&base, params(), &bad, new.size(), &root),
            Err(PlanError::Order { .. })
        ));
    }
}
