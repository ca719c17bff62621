//! Staged patches: chunks of the generation being received that came as a patch of the
//! committed image (the base bytes at the chunk's place with some ranges replaced), kept as the
//! ranges alone. A 4 KiB write in a 64 KiB chunk then costs the store 4 KiB in staging and
//! 4 KiB written into the image, not the whole chunk twice.
//!
//! A patch is only as good as its base: the bytes outside its ranges are the committed image's,
//! which change only when a generation is applied. So the log is tagged with the generation it
//! was staged on and emptied with the staging journal; opened under another generation, it is
//! dropped. At commit, a patched chunk whose new place is exactly the place it was patched at
//! is written as its ranges (again and again on a replay: the same bytes); a patched chunk
//! needed anywhere else is first made whole from the image and verified into the journal.
//!
//! File: magic `FPL1` and the generation (u64le); then records, each magic `FP01`, the body's
//! length (u32le), its BLAKE3 hash (32 bytes), and the body: the chunk's hash (32), offset in
//! the image (u64le), length (u32le), the image path (u16le length, UTF-8), the number of ranges
//! (u32le), and each range: offset in the chunk (u32le), length (u32le), the bytes. A record that
//! does not check ends the log (a torn tail is cut); its chunk is simply asked for again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable::{self, Writeback};
use crate::wire::frame::Hash;

const FILE_MAGIC: &[u8; 4] = b"FPL1";
const FILE_HEADER: u64 = 12;
const MAGIC: &[u8; 4] = b"FP01";
const RECORD_HEADER: u64 = 40;

/// A chunk as a patch: `ranges` (offset in the chunk, bytes) over the image `path`'s committed
/// bytes `[offset, offset + len)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    pub hash: Hash,
    pub path: String,
    pub offset: u64,
    pub len: u32,
    pub ranges: Vec<(u32, Vec<u8>)>,
}

impl Patch {
    /// The whole chunk: `base` (the committed bytes at its place) with the ranges laid over.
    pub fn over(&self, mut base: Vec<u8>) -> Vec<u8> {
        for (at, bytes) in &self.ranges {
            base[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        base
    }

    /// Writes the ranges into `f` at the chunk's place.
    pub fn write_into(&self, f: &File) -> io::Result<()> {
        for (at, bytes) in &self.ranges {
            f.write_all_at(bytes, self.offset + *at as u64)?;
        }
        Ok(())
    }
}

/// The body of a record (pure).
fn encode(p: &Patch) -> Vec<u8> {
    let data: usize = p.ranges.iter().map(|(_, b)| 8 + b.len()).sum();
    let mut out = Vec::with_capacity(32 + 8 + 4 + 2 + p.path.len() + 4 + data);
    out.extend_from_slice(&p.hash);
    out.extend_from_slice(&p.offset.to_le_bytes());
    out.extend_from_slice(&p.len.to_le_bytes());
    out.extend_from_slice(&(p.path.len() as u16).to_le_bytes());
    out.extend_from_slice(p.path.as_bytes());
    out.extend_from_slice(&(p.ranges.len() as u32).to_le_bytes());
    for (at, bytes) in &p.ranges {
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// Decodes a body (pure); `None` when it is not one `encode` made with ranges inside the chunk.
fn decode(b: &[u8]) -> Option<Patch> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let hash: Hash = take(32)?.try_into().ok()?;
    let offset = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let len = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let path_len = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let path = std::str::from_utf8(take(path_len as usize)?)
        .ok()?
        .to_string();
    let n = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut ranges = Vec::new();
    for _ in 0..n {
        let off = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
        if off as u64 + count as u64 > len as u64 {
            return None;
        }
        ranges.push((off, take(count as usize)?.to_vec()));
    }
    (at == b.len()).then_some(Patch {
        hash,
        path,
        offset,
        len,
        ranges,
    })
}

/// Where a staged patch lies in the log, and the place it patches.
struct Staged {
    body: u64,
    body_len: u32,
    path: String,
    offset: u64,
    len: u32,
}

/// Records are gathered in memory and written [`FLUSH`] bytes at a time: one 4 KiB patch per
/// `pwrite` made the kernel zero the new page-cache blocks each record only partly covered
/// (`zero_user_segments` was a third of the appends' time in a profile of bench-scatter) and cost
/// a system call per patch. Nothing is lost that was promised: the log is only trusted after
/// [`PatchLog::sync`], which writes what is gathered first.
const FLUSH: usize = 256 << 10;

pub struct PatchLog {
    path: PathBuf,
    file: File,
    generation: u64,
    /// The file holds the records before this offset; `pending` the ones after it.
    written: u64,
    pending: Vec<u8>,
    end: u64,
    index: HashMap<Hash, Staged>,
    /// Whether opening it cut off a torn or corrupt tail of records staged on its generation.
    cut_tail: bool,
    writeback: Writeback,
}

impl PatchLog {
    /// Opens (or creates) the log at `path` for patches of generation `generation`'s images,
    /// keeping its valid prefix if it was staged on that generation, else emptying it.
    pub fn open(path: &Path, generation: u64, max_chunk: u32) -> io::Result<PatchLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut log = PatchLog {
            path: path.to_path_buf(),
            file,
            generation,
            written: 0,
            pending: Vec::new(),
            end: 0,
            index: HashMap::new(),
            cut_tail: false,
            writeback: Writeback::default(),
        };
        let len = log.file.metadata()?.len();
        let mut head = [0u8; FILE_HEADER as usize];
        if len < FILE_HEADER {
            return log.clear(generation).map(|()| log);
        }
        log.file.read_exact_at(&mut head, 0)?;
        let staged_on = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
        if &head[..4] != FILE_MAGIC || staged_on != generation {
            if len > FILE_HEADER {
                log::info!(
                    "{}: dropping patches staged on generation {staged_on}: the store holds \
                     generation {generation} now",
                    path.display()
                );
            }
            return log.clear(generation).map(|()| log);
        }
        let max_body = 64 + u16::MAX as u64 + 9 * max_chunk as u64;
        let mut pos = FILE_HEADER;
        let mut rec = [0u8; RECORD_HEADER as usize];
        let mut body = Vec::new();
        while pos + RECORD_HEADER <= len {
            log.file.read_exact_at(&mut rec, pos)?;
            let n = u32::from_le_bytes(rec[4..8].try_into().expect("4 bytes"));
            if &rec[..4] != MAGIC || n as u64 > max_body || pos + RECORD_HEADER + n as u64 > len {
                break;
            }
            body.resize(n as usize, 0);
            log.file.read_exact_at(&mut body, pos + RECORD_HEADER)?;
            let Some(p) = (*blake3::hash(&body).as_bytes() == rec[8..40])
                .then(|| decode(&body))
                .flatten()
            else {
                break;
            };
            log.index.insert(
                p.hash,
                Staged {
                    body: pos + RECORD_HEADER,
                    body_len: n,
                    path: p.path,
                    offset: p.offset,
                    len: p.len,
                },
            );
            pos += RECORD_HEADER + n as u64;
        }
        if pos < len {
            log::warn!(
                "{}: dropping {} bytes of torn or corrupt tail at offset {pos} (those chunks \
                 are asked for again)",
                path.display(),
                len - pos
            );
            log.file.set_len(pos)?;
            log.cut_tail = true;
        }
        log.written = pos;
        log.end = pos;
        Ok(log)
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.index.contains_key(hash)
    }

    /// Whether opening it cut off records staged on its generation (see
    /// `Journal::lost_records`).
    pub fn lost_records(&self) -> bool {
        self.cut_tail
    }

    /// The chunks staged as patches.
    pub fn hashes(&self) -> impl Iterator<Item = &Hash> {
        self.index.keys()
    }

    /// The place a staged patch patches: (image, offset, length).
    pub fn place(&self, hash: &Hash) -> Option<(&str, u64, u32)> {
        self.index
            .get(hash)
            .map(|s| (s.path.as_str(), s.offset, s.len))
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes staged so far (with the file's header, written with the first record).
    pub fn bytes(&self) -> u64 {
        self.end
    }

    /// Appends a patch whose result the caller has verified. Written to the file with the
    /// records gathered before it once they reach [`FLUSH`] bytes; a failed write (a full disk)
    /// is cut off and forgets the records it held, so the log stays a valid prefix and those
    /// chunks are asked for again.
    pub fn append(&mut self, p: &Patch) -> io::Result<()> {
        if self.index.contains_key(&p.hash) {
            return Ok(());
        }
        let body = encode(p);
        if self.end == 0 {
            self.pending.extend_from_slice(FILE_MAGIC);
            self.pending
                .extend_from_slice(&self.generation.to_le_bytes());
        }
        let record = self.written + self.pending.len() as u64;
        self.pending.extend_from_slice(MAGIC);
        self.pending
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.pending
            .extend_from_slice(blake3::hash(&body).as_bytes());
        self.pending.extend_from_slice(&body);
        self.index.insert(
            p.hash,
            Staged {
                body: record + RECORD_HEADER,
                body_len: body.len() as u32,
                path: p.path.clone(),
                offset: p.offset,
                len: p.len,
            },
        );
        self.end = self.written + self.pending.len() as u64;
        if self.pending.len() >= FLUSH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the gathered records to the file. On failure the file is cut back to what it
    /// held and the gathered records are forgotten.
    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all_at(&self.pending, self.written) {
            let _ = self.file.set_len(self.written);
            let written = self.written;
            self.index.retain(|_, s| s.body < written);
            self.pending.clear();
            self.end = written;
            return Err(e);
        }
        self.written += self.pending.len() as u64;
        self.pending.clear();
        self.writeback.appended(&self.file, self.written);
        Ok(())
    }

    /// A staged patch, its record checked again on the way out.
    pub fn get(&self, hash: &Hash) -> io::Result<Option<Patch>> {
        let Some(s) = self.index.get(hash) else {
            return Ok(None);
        };
        let at = s.body - RECORD_HEADER;
        let mut rec = vec![0u8; RECORD_HEADER as usize + s.body_len as usize];
        if at >= self.written {
            let from = (at - self.written) as usize;
            let n = rec.len();
            rec.copy_from_slice(&self.pending[from..from + n]);
        } else {
            self.file.read_exact_at(&mut rec, at)?;
        }
        let (head, body) = rec.split_at(RECORD_HEADER as usize);
        match decode(body) {
            Some(p) if *blake3::hash(body).as_bytes() == head[8..40] && p.hash == *hash => {
                Ok(Some(p))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "staged patches {} corrupt at offset {}",
                    self.path.display(),
                    s.body
                ),
            )),
        }
    }

    /// Writes what is gathered and makes the log durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.file.sync_data()
    }

    /// Empties the log for patches of generation `generation`'s images (the file's header is
    /// written with the first record: an empty log is an empty file). Not durable: a log that
    /// comes back after a crash is stamped with an older generation, and dropped when opened.
    pub fn clear(&mut self, generation: u64) -> io::Result<()> {
        durable::empty_behind(&self.path, &mut self.file)?;
        self.writeback = Writeback::default();
        self.index.clear();
        self.cut_tail = false;
        self.generation = generation;
        self.pending.clear();
        self.written = 0;
        self.end = 0;
        Ok(())
    }

    /// The generation whose images the staged patches patch.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for PatchLog {
    /// Writes what is gathered, so a store closed between two syncs finds it when reopened
    /// (not durable: after a crash, what no sync covered is asked for again).
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::warn!(
                "{}: could not write {} staged patches' bytes on close ({e}); they are asked \
                 for again",
                self.path.display(),
                self.pending.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(i: u8) -> Patch {
        Patch {
            hash: [i; 32],
            path: format!("vm-{i}.img"),
            offset: 65536 * i as u64,
            len: 65536,
            ranges: vec![(4096, vec![i; 4096]), (60000, vec![i ^ 0xff; 100])],
        }
    }

    #[test]
    fn records_round_trip_and_survive_a_reopen_on_the_same_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("patches");
        let mut log = PatchLog::open(&p, 7, 1 << 20).unwrap();
        for i in 0..3 {
            log.append(&patch(i)).unwrap();
        }
        assert_eq!(log.get(&[1; 32]).unwrap(), Some(patch(1)));
        assert_eq!(log.place(&[2; 32]), Some(("vm-2.img", 131072, 65536)));
        drop(log);
        let log = PatchLog::open(&p, 7, 1 << 20).unwrap();
        assert_eq!(log.len(), 3);
        for i in 0..3 {
            assert_eq!(log.get(&[i; 32]).unwrap(), Some(patch(i)));
        }
    }

    /// Records are gathered in memory and written in batches: each reads back the same whether
    /// it is still gathered or written, `sync` writes the rest, and a reopen finds them all.
    #[test]
    fn gathered_records_read_back_before_and_after_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("patches");
        let mut log = PatchLog::open(&p, 3, 1 << 20).unwrap();
        // 100 records of about 4.2 KiB: more than one batch of `FLUSH` bytes.
        let n = 100u8;
        for i in 0..n {
            log.append(&patch(i)).unwrap();
        }
        let on_disk = std::fs::metadata(&p).unwrap().len();
        assert!(on_disk > 0, "a full batch was written");
        assert!(on_disk < log.bytes(), "the last records are still gathered");
        for i in [0, n / 2, n - 1] {
            assert_eq!(log.get(&[i; 32]).unwrap(), Some(patch(i)));
        }
        log.sync().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), log.bytes());
        log.append(&patch(n)).unwrap();
        drop(log);
        let log = PatchLog::open(&p, 3, 1 << 20).unwrap();
        assert_eq!(log.len(), n as usize + 1, "closing writes what is gathered");
        for i in 0..=n {
            assert_eq!(log.get(&[i; 32]).unwrap(), Some(patch(i)));
        }
    }

    #[test]
    fn patches_staged_on_another_generation_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("patches");
        let mut log = PatchLog::open(&p, 7, 1 << 20).unwrap();
        log.append(&patch(1)).unwrap();
        drop(log);
        let log = PatchLog::open(&p, 8, 1 << 20).unwrap();
        assert_eq!(log.len(), 0);
        assert!(!log.contains(&[1; 32]));
        // What is staged now is tagged with the new generation.
        let mut log = log;
        log.append(&patch(2)).unwrap();
        drop(log);
        assert!(PatchLog::open(&p, 8, 1 << 20).unwrap().contains(&[2; 32]));
        assert_eq!(PatchLog::open(&p, 9, 1 << 20).unwrap().len(), 0);
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_flipped_byte_is_refused_on_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("patches");
        let mut log = PatchLog::open(&p, 1, 1 << 20).unwrap();
        log.append(&patch(1)).unwrap();
        log.append(&patch(2)).unwrap();
        let full = log.bytes();
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(full - 10).unwrap();
        drop(f);
        let log = PatchLog::open(&p, 1, 1 << 20).unwrap();
        assert_eq!(log.len(), 1);
        assert!(!log.contains(&[2; 32]));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), log.bytes());
        // A byte flipped in a range while open: `get` refuses the record.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0], FILE_HEADER + RECORD_HEADER + 100)
            .unwrap();
        assert!(log.get(&[1; 32]).is_err());
    }

    #[test]
    fn a_body_with_a_range_outside_its_chunk_does_not_decode() {
        let mut p = patch(1);
        assert_eq!(decode(&encode(&p)), Some(p.clone()));
        p.ranges.push((65500, vec![0; 37]));
        assert_eq!(decode(&encode(&p)), None);
        let b = encode(&patch(1));
        assert_eq!(decode(&b[..b.len() - 1]), None);
    }

    #[test]
    fn over_lays_the_ranges_on_the_base() {
        let p = patch(3);
        let out = p.over(vec![9u8; 65536]);
        assert_eq!(&out[..4096], &[9; 4096][..]);
        assert_eq!(&out[4096..8192], &[3; 4096][..]);
        assert_eq!(&out[60000..60100], &[3 ^ 0xff; 100][..]);
        assert_eq!(out[60100], 9);
    }
}
