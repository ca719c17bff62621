//! The intent log's file format: pure encoding and decoding, no I/O.
//!
//! Layout (little endian):
//! ```text
//! header, 32 bytes
//!  0  8  magic "FERRYIL\n"
//!  8  4  format version (1)
//! 12  4  state: 1 active (marks appended since the log was last rewritten),
//!               2 clean (exact unsynced ranges, written once at a clean unmount)
//! 16  8  extent size in bytes (a power of two, at least 4 KiB)
//! 24  8  BLAKE3 (derive-key HEADER_CONTEXT) of bytes 0..24, first 8 bytes
//! records, one after another
//!  0  4  body length n (at most MAX_BODY)
//!  4  1  kind: 1 mark, 2 clean ranges, 3 clean end
//!  5  n  body
//! 5+n 8  BLAKE3 (derive-key RECORD_CONTEXT) of bytes 0..5+n, first 8 bytes
//! mark and clean-ranges bodies
//!  0  2  image path length p (1..=MAX_PATH)
//!  2  p  image path, relative to the mount root, raw bytes (need not be UTF-8)
//! 2+p    one or more runs (start u64, end u64), half-open: extent indices in a mark,
//!        byte offsets in clean ranges
//! clean-end body
//!  0  8  number of clean-range records before it
//! ```
//! An active log holds mark records only, and its tail may be torn by a crash mid-append: the
//! first record that is incomplete or fails its checksum ends the log. A clean log holds
//! clean-range records and exactly one clean-end record, last; it is written atomically, so any
//! damage in it is corruption.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{IntentError, MIN_EXTENT_SIZE, exact_set};
use crate::dirty::RangeSet;

pub const VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FERRYIL\n";
pub const HEADER_LEN: usize = 32;
/// A record body is at most this long; a length prefix above it is damage, not a record.
pub const MAX_BODY: usize = 1 << 20;
/// The longest image path a record holds (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Runs per record (16 bytes each), so a record body stays far below `MAX_BODY`.
const RUNS_PER_RECORD: usize = 4096;
const PREFIX: usize = 5;
const SUM: usize = 8;
const HEADER_CONTEXT: &str = "ferry intent log header v1";
const RECORD_CONTEXT: &str = "ferry intent log record v1";

const KIND_MARK: u8 = 1;
const KIND_RANGES: u8 = 2;
const KIND_END: u8 = 3;

/// What a log file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Marks appended while mounted; the previous run may not have stopped cleanly.
    Active,
    /// Written at a clean unmount: the exact unsynced ranges.
    Clean,
}

/// A decoded log file.
#[derive(Debug)]
pub struct Decoded {
    pub state: State,
    pub extent_size: u64,
    /// Active: marked extent indices per image. Clean: unsynced byte ranges per image. Exact
    /// sets (they never coarsen).
    pub images: HashMap<PathBuf, RangeSet>,
    /// Where an active log's valid records end, if bytes follow them.
    pub torn: Option<Torn>,
}

/// The ignored tail of an active log.
#[derive(Debug, PartialEq, Eq)]
pub struct Torn {
    pub offset: u64,
    pub len: u64,
    pub reason: &'static str,
}

/// Why `image` cannot be named in a record, if it cannot.
pub fn check_image(image: &Path) -> Result<(), &'static str> {
    match image.as_os_str().len() {
        0 => Err("the image path is empty"),
        n if n > MAX_PATH => Err("the image path is longer than 4096 bytes"),
        _ => Ok(()),
    }
}

pub fn header(state: State, extent_size: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    let state: u32 = match state {
        State::Active => 1,
        State::Clean => 2,
    };
    b.extend_from_slice(&state.to_le_bytes());
    b.extend_from_slice(&extent_size.to_le_bytes());
    let sum = checksum(HEADER_CONTEXT, &b);
    b.extend_from_slice(&sum);
    b
}

/// Appends mark records naming the extent runs of `image`. The name must pass `check_image`.
pub fn push_marks(out: &mut Vec<u8>, image: &Path, extents: &RangeSet) {
    push_runs(out, KIND_MARK, image, extents);
}

/// A whole active log holding `marks`, images in path order.
pub fn active(extent_size: u64, marks: &HashMap<PathBuf, RangeSet>) -> Vec<u8> {
    let mut b = header(State::Active, extent_size);
    let mut images: Vec<_> = marks.iter().filter(|(_, s)| !s.is_empty()).collect();
    images.sort_by(|a, b| a.0.cmp(b.0));
    for (image, extents) in images {
        push_marks(&mut b, image, extents);
    }
    b
}

/// A whole clean log holding the exact unsynced `ranges` per image. Names must pass
/// `check_image`.
pub fn clean<'a>(
    extent_size: u64,
    ranges: impl IntoIterator<Item = (&'a PathBuf, &'a RangeSet)>,
) -> Vec<u8> {
    let mut b = header(State::Clean, extent_size);
    let mut records = 0;
    for (image, set) in ranges {
        records += push_runs(&mut b, KIND_RANGES, image, set);
    }
    push_record(&mut b, KIND_END, &(records as u64).to_le_bytes());
    b
}

/// Appends one record per `RUNS_PER_RECORD` runs of `set`; returns how many.
fn push_runs(out: &mut Vec<u8>, kind: u8, image: &Path, set: &RangeSet) -> usize {
    debug_assert!(check_image(image).is_ok());
    let name = image.as_os_str().as_bytes();
    let runs: Vec<Range<u64>> = set.to_vec();
    let mut body = Vec::new();
    for part in runs.chunks(RUNS_PER_RECORD) {
        body.clear();
        body.extend_from_slice(&(name.len() as u16).to_le_bytes());
        body.extend_from_slice(name);
        for r in part {
            body.extend_from_slice(&r.start.to_le_bytes());
            body.extend_from_slice(&r.end.to_le_bytes());
        }
        push_record(out, kind, &body);
    }
    runs.len().div_ceil(RUNS_PER_RECORD)
}

fn push_record(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    debug_assert!(body.len() <= MAX_BODY);
    let start = out.len();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    let sum = checksum(RECORD_CONTEXT, &out[start..]);
    out.extend_from_slice(&sum);
}

fn checksum(context: &str, bytes: &[u8]) -> [u8; SUM] {
    let mut h = blake3::Hasher::new_derive_key(context);
    h.update(bytes);
    let mut sum = [0; SUM];
    sum.copy_from_slice(&h.finalize().as_bytes()[..SUM]);
    sum
}

/// Parses a log file; `path` only names the file in errors.
pub fn decode(path: &Path, b: &[u8]) -> Result<Decoded, IntentError> {
    let corrupt_header = |reason: String| IntentError::CorruptHeader {
        path: path.to_path_buf(),
        reason,
    };
    let n = b.len().min(MAGIC.len());
    if b[..n] != MAGIC[..n] {
        return Err(IntentError::NotIntentLog {
            path: path.to_path_buf(),
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    if b.len() >= 12 && u32_at(8) > VERSION {
        return Err(IntentError::NewerVersion {
            path: path.to_path_buf(),
            found: u32_at(8),
        });
    }
    if b.len() < HEADER_LEN {
        return Err(corrupt_header(format!(
            "the file is {} bytes, shorter than the {HEADER_LEN}-byte header",
            b.len()
        )));
    }
    if checksum(HEADER_CONTEXT, &b[..24]) != b[24..HEADER_LEN] {
        return Err(corrupt_header("header checksum mismatch".into()));
    }
    let version = u32_at(8);
    if version == 0 {
        return Err(corrupt_header("format version 0".into()));
    }
    let state = match u32_at(12) {
        1 => State::Active,
        2 => State::Clean,
        s => return Err(corrupt_header(format!("unknown state {s}"))),
    };
    let extent_size = u64::from_le_bytes(b[16..24].try_into().unwrap());
    if extent_size < MIN_EXTENT_SIZE || !extent_size.is_power_of_two() {
        return Err(corrupt_header(format!("extent size {extent_size}")));
    }
    // Runs in a mark are extent indices; the last extent holds byte u64::MAX - 1.
    let max_extent = u64::MAX / extent_size + 1;

    let mut d = Decoded {
        state,
        extent_size,
        images: HashMap::new(),
        torn: None,
    };
    let mut off = HEADER_LEN;
    let mut ranges_records = 0u64;
    let mut ended = false;
    while off < b.len() {
        let corrupt = |reason: String| IntentError::Corrupt {
            path: path.to_path_buf(),
            offset: off as u64,
            reason,
        };
        let (kind, body, next) = match record_at(b, off) {
            Ok(r) => r,
            // A crash tears only the last append: a bad record with a good one after it is
            // damage (bit rot, a stray write), and the marks past it cannot be trusted gone.
            Err(reason) if state == State::Active && good_record_after(b, off) => {
                return Err(corrupt(format!(
                    "{reason}, with intact records after it: damage, not a write cut short"
                )));
            }
            Err(reason) if state == State::Active => {
                d.torn = Some(Torn {
                    offset: off as u64,
                    len: (b.len() - off) as u64,
                    reason,
                });
                break;
            }
            Err(reason) => return Err(corrupt(reason.into())),
        };
        if ended {
            return Err(corrupt("a record follows the clean-end record".into()));
        }
        match (state, kind) {
            (State::Active, KIND_MARK) | (State::Clean, KIND_RANGES) => {
                let (image, runs) = parse_runs(body).map_err(corrupt)?;
                let set = d.images.entry(image).or_insert_with(exact_set);
                for r in runs {
                    if kind == KIND_MARK && r.end > max_extent {
                        return Err(corrupt(format!(
                            "extent {} is past the end of the offset space",
                            r.end - 1
                        )));
                    }
                    set.insert(r);
                }
                ranges_records += u64::from(kind == KIND_RANGES);
            }
            (State::Clean, KIND_END) => {
                let count = <[u8; 8]>::try_from(body)
                    .map(u64::from_le_bytes)
                    .map_err(|_| corrupt(format!("clean-end record of {} bytes", body.len())))?;
                if count != ranges_records {
                    return Err(corrupt(format!(
                        "the clean-end record counts {count} range records, the file has \
                         {ranges_records}"
                    )));
                }
                ended = true;
            }
            (state, kind) => {
                return Err(corrupt(format!(
                    "unexpected record kind {kind} in a {} log",
                    match state {
                        State::Active => "active",
                        State::Clean => "clean",
                    }
                )));
            }
        }
        off = next;
    }
    if state == State::Clean && !ended {
        return Err(IntentError::Corrupt {
            path: path.to_path_buf(),
            offset: off as u64,
            reason: "the clean-end record is missing".into(),
        });
    }
    Ok(d)
}

/// Whether the bad record at `off` has a length that ends inside the file, followed by a
/// valid record.
fn good_record_after(b: &[u8], off: usize) -> bool {
    let rest = &b[off..];
    if rest.len() < PREFIX {
        return false;
    }
    let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    let next = off + PREFIX + n + SUM;
    n <= MAX_BODY && next < b.len() && record_at(b, next).is_ok()
}

/// The record at `off`: kind, body and the offset after it; or why there is no valid record.
fn record_at(b: &[u8], off: usize) -> Result<(u8, &[u8], usize), &'static str> {
    let rest = &b[off..];
    if rest.len() < PREFIX {
        return Err("incomplete record header");
    }
    let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    if n > MAX_BODY {
        return Err("record length over the bound");
    }
    if rest.len() < PREFIX + n + SUM {
        return Err("record runs past the end of the file");
    }
    if checksum(RECORD_CONTEXT, &rest[..PREFIX + n]) != rest[PREFIX + n..PREFIX + n + SUM] {
        return Err("record checksum mismatch");
    }
    Ok((rest[4], &rest[PREFIX..PREFIX + n], off + PREFIX + n + SUM))
}

fn parse_runs(body: &[u8]) -> Result<(PathBuf, Vec<Range<u64>>), String> {
    if body.len() < 2 {
        return Err("record too short for an image name".into());
    }
    let p = u16::from_le_bytes([body[0], body[1]]) as usize;
    if p == 0 || p > MAX_PATH || body.len() < 2 + p {
        return Err(format!("bad image name length {p}"));
    }
    let image = PathBuf::from(OsStr::from_bytes(&body[2..2 + p]));
    let runs = &body[2 + p..];
    if runs.is_empty() || runs.len() % 16 != 0 {
        return Err(format!(
            "{} bytes of runs for {} (a non-zero multiple of 16 expected)",
            runs.len(),
            image.display()
        ));
    }
    let mut out = Vec::with_capacity(runs.len() / 16);
    for run in runs.chunks_exact(16) {
        let start = u64::from_le_bytes(run[..8].try_into().unwrap());
        let end = u64::from_le_bytes(run[8..].try_into().unwrap());
        if start >= end {
            return Err(format!("empty run {start}..{end} for {}", image.display()));
        }
        out.push(start..end);
    }
    Ok((image, out))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one run is the common case
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ES: u64 = 4 << 20;

    fn marks(list: &[(&str, &[Range<u64>])]) -> HashMap<PathBuf, RangeSet> {
        list.iter()
            .map(|(p, rs)| {
                let mut s = exact_set();
                for r in rs.iter() {
                    s.insert(r.clone());
                }
                (PathBuf::from(p), s)
            })
            .collect()
    }

    fn sample_active() -> Vec<u8> {
        active(
            ES,
            &marks(&[("vm/a.img", &[0..2, 7..8]), ("b.qcow2", &[3..4])]),
        )
    }

    fn sample_clean() -> Vec<u8> {
        let m: std::collections::BTreeMap<PathBuf, RangeSet> = marks(&[
            ("vm/a.img", &[10..4096, 1 << 40..(1 << 40) + 1]),
            ("c", &[5..6]),
        ])
        .into_iter()
        .collect();
        clean(ES, &m)
    }

    #[test]
    fn active_and_clean_logs_round_trip() {
        let d = decode(Path::new("l"), &sample_active()).unwrap();
        assert_eq!(d.state, State::Active);
        assert_eq!(d.extent_size, ES);
        assert_eq!(d.torn, None);
        assert_eq!(d.images[Path::new("vm/a.img")].to_vec(), vec![0..2, 7..8]);
        assert_eq!(d.images[Path::new("b.qcow2")].to_vec(), vec![3..4]);

        let d = decode(Path::new("l"), &sample_clean()).unwrap();
        assert_eq!(d.state, State::Clean);
        assert_eq!(
            d.images[Path::new("vm/a.img")].to_vec(),
            vec![10..4096, 1 << 40..(1 << 40) + 1]
        );
        assert_eq!(d.images[Path::new("c")].to_vec(), vec![5..6]);
    }

    #[test]
    fn a_clean_log_of_nothing_is_a_header_and_an_end_record() {
        let b = clean(ES, &std::collections::BTreeMap::new());
        let d = decode(Path::new("l"), &b).unwrap();
        assert_eq!(d.state, State::Clean);
        assert!(d.images.is_empty());
    }

    #[test]
    fn non_utf8_image_names_survive() {
        use std::os::unix::ffi::OsStringExt;
        let name = PathBuf::from(std::ffi::OsString::from_vec(
            b"vm\xff/disk\x80.img".to_vec(),
        ));
        let mut m = HashMap::new();
        m.insert(name.clone(), [1..3].into_iter().collect::<RangeSet>());
        let d = decode(Path::new("l"), &active(ES, &m)).unwrap();
        assert_eq!(d.images[&name].to_vec(), vec![1..3]);
    }

    #[test]
    fn many_runs_split_into_bounded_records() {
        let mut s = exact_set();
        for i in 0..10_000u64 {
            s.insert(i * 2..i * 2 + 1);
        }
        let mut m = HashMap::new();
        m.insert(PathBuf::from("big"), s.clone());
        let b = active(ES, &m);
        let d = decode(Path::new("l"), &b).unwrap();
        assert_eq!(d.images[Path::new("big")], s);
        let m: std::collections::BTreeMap<_, _> = m.into_iter().collect();
        let d = decode(Path::new("l"), &clean(ES, &m)).unwrap();
        assert_eq!(d.images[Path::new("big")], s);
    }

    #[test]
    fn every_cut_of_an_active_log_decodes_to_a_prefix() {
        let b = sample_active();
        let full = decode(Path::new("l"), &b).unwrap();
        for len in HEADER_LEN..b.len() {
            let d = decode(Path::new("l"), &b[..len]).unwrap();
            for (image, set) in &d.images {
                for r in set.iter() {
                    assert!(full.images[image].contains_range(r));
                }
            }
            if let Some(t) = d.torn {
                assert_eq!(t.offset + t.len, len as u64);
            }
        }
    }

    #[test]
    fn any_damage_to_a_clean_log_is_an_error_naming_the_file() {
        let p = Path::new("/state/intent.log");
        let b = sample_clean();
        for len in 0..b.len() {
            let e = decode(p, &b[..len]).unwrap_err();
            assert!(e.to_string().contains("/state/intent.log"), "{e}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            let e = decode(p, &c).unwrap_err();
            assert!(e.to_string().contains("/state/intent.log"), "{e}");
        }
        let mut c = b.clone();
        c.extend_from_slice(&[0; 20]);
        assert!(matches!(
            decode(p, &c).unwrap_err(),
            IntentError::Corrupt { .. }
        ));
    }

    #[test]
    fn header_failures_are_named() {
        let p = Path::new("x");
        let b = sample_active();
        assert!(matches!(
            decode(p, b"hello world, not a log at all....").unwrap_err(),
            IntentError::NotIntentLog { .. }
        ));
        assert!(matches!(
            decode(p, b"").unwrap_err(),
            IntentError::CorruptHeader { .. }
        ));
        assert!(matches!(
            decode(p, &b[..20]).unwrap_err(),
            IntentError::CorruptHeader { .. }
        ));
        let mut c = b.clone();
        c[16] ^= 1;
        let e = decode(p, &c).unwrap_err();
        assert!(e.to_string().contains("header checksum"), "{e}");
        let mut c = b.clone();
        c[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            decode(p, &c).unwrap_err(),
            IntentError::NewerVersion { found: 2, .. }
        ));
    }

    #[test]
    fn a_checksummed_record_of_the_wrong_kind_is_corruption_not_a_torn_tail() {
        let mut b = header(State::Active, ES);
        push_record(&mut b, KIND_END, &0u64.to_le_bytes());
        assert!(matches!(
            decode(Path::new("l"), &b).unwrap_err(),
            IntentError::Corrupt { offset: 32, .. }
        ));
        let mut b = header(State::Active, ES);
        push_record(&mut b, KIND_MARK, &[1, 0, b'a', 0]);
        assert!(matches!(
            decode(Path::new("l"), &b).unwrap_err(),
            IntentError::Corrupt { .. }
        ));
    }

    #[test]
    fn a_zero_filled_tail_is_torn() {
        let mut b = sample_active();
        let end = b.len() as u64;
        b.extend_from_slice(&[0; 4096]);
        let d = decode(Path::new("l"), &b).unwrap();
        assert_eq!(
            d.torn,
            Some(Torn {
                offset: end,
                len: 4096,
                reason: "record checksum mismatch"
            })
        );
    }

    proptest! {
        /// Decoding never panics, whatever follows a valid header or a valid log.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..300),
            prefix in 0usize..3,
        ) {
            let mut b = match prefix {
                0 => Vec::new(),
                1 => header(State::Active, ES),
                _ => sample_active(),
            };
            b.extend_from_slice(&tail);
            let _ = decode(Path::new("l"), &b);
            let mut c = header(State::Clean, ES);
            c.extend_from_slice(&tail);
            let _ = decode(Path::new("l"), &c);
        }
    }
}
