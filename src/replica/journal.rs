//! The staging journal: verified chunks of the generation being received, appended to one file
//! and found again by hash. Each record is self-checking (its key is the BLAKE3 hash of its
//! bytes), so after a crash the valid prefix is kept and a torn tail is cut off. A record in
//! the middle whose bytes no longer match its hash (bit rot) is skipped and listed as damaged,
//! not cut with everything after it: kept-chunk packs use this format too, and one flipped
//! byte must cost one chunk, which `ferry verify --deep` can then repair in place. Chunks staged
//! for a transfer that was interrupted stay staged: the resumed transfer does not ask for them
//! again.
//!
//! Record: magic `FJ01` (4 bytes), chunk hash (32), length u32le, the bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable::{self, Writeback};

const MAGIC: &[u8; 4] = b"FJ01";
const HEADER: u64 = 40;

pub struct Journal {
    path: PathBuf,
    file: File,
    end: u64,
    index: HashMap<[u8; 32], (u64, u32)>,
    /// Records whose bytes do not match the hash in their header: (hash, data offset, length).
    damaged: Vec<([u8; 32], u64, u32)>,
    /// Whether opening it cut off a torn or corrupt tail.
    cut_tail: bool,
    writeback: Writeback,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, keeping its valid prefix.
    pub fn open(path: &Path, max_chunk: u32) -> io::Result<Journal> {
        Journal::open_with(path, max_chunk, true)
    }

    /// Opens the journal at `path` to read it while its owner may append: a torn tail is
    /// ignored, not cut.
    pub fn open_read_only(path: &Path, max_chunk: u32) -> io::Result<Journal> {
        Journal::open_with(path, max_chunk, false)
    }

    fn open_with(path: &Path, max_chunk: u32, writable: bool) -> io::Result<Journal> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create(writable)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut index = HashMap::new();
        let mut damaged = Vec::new();
        let mut pos = 0u64;
        let mut head = [0u8; HEADER as usize];
        let mut data = Vec::new();
        while pos + HEADER <= len {
            file.read_exact_at(&mut head, pos)?;
            let n = u32::from_le_bytes(head[36..40].try_into().expect("4 bytes"));
            if &head[..4] != MAGIC || n > max_chunk || pos + HEADER + n as u64 > len {
                break;
            }
            data.resize(n as usize, 0);
            file.read_exact_at(&mut data, pos + HEADER)?;
            let hash: [u8; 32] = head[4..36].try_into().expect("32 bytes");
            let end = pos + HEADER + n as u64;
            if *blake3::hash(&data).as_bytes() != hash {
                if end == len {
                    // The last record: a write torn by a crash.
                    break;
                }
                log::warn!(
                    "{}: the chunk record at offset {pos} does not match its hash (damaged); \
                     skipping it: run `ferry verify --deep --repair`",
                    path.display()
                );
                damaged.push((hash, pos + HEADER, n));
            } else {
                index.insert(hash, (pos + HEADER, n));
            }
            pos = end;
        }
        if pos < len && writable {
            log::warn!(
                "{}: dropping {} bytes of torn or corrupt tail at offset {pos}",
                path.display(),
                len - pos
            );
            file.set_len(pos)?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            end: pos,
            index,
            damaged,
            cut_tail: pos < len,
            writeback: Writeback::default(),
        })
    }

    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.index.contains_key(hash)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes staged so far.
    pub fn bytes(&self) -> u64 {
        self.end
    }

    /// Appends a chunk whose hash the caller has verified. A failed append (a full disk) is cut
    /// off, so the journal stays a valid prefix.
    pub fn append(&mut self, hash: &[u8; 32], data: &[u8]) -> io::Result<()> {
        if self.index.contains_key(hash) {
            return Ok(());
        }
        let mut header = [0u8; HEADER as usize];
        header[..4].copy_from_slice(MAGIC);
        header[4..36].copy_from_slice(hash);
        header[36..].copy_from_slice(&(data.len() as u32).to_le_bytes());
        if let Err(e) = durable::write_parts_at(&self.file, &[&header, data], self.end) {
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.index
            .insert(*hash, (self.end + HEADER, data.len() as u32));
        self.end += HEADER + data.len() as u64;
        self.writeback.appended(&self.file, self.end);
        Ok(())
    }

    /// The staged bytes of a chunk, verified again on the way out.
    pub fn get(&self, hash: &[u8; 32]) -> io::Result<Option<Vec<u8>>> {
        let Some(&(off, n)) = self.index.get(hash) else {
            return Ok(None);
        };
        let mut data = vec![0u8; n as usize];
        self.file.read_exact_at(&mut data, off)?;
        if blake3::hash(&data).as_bytes() != hash {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "staging journal {} corrupt at offset {off}",
                    self.path.display()
                ),
            ));
        }
        Ok(Some(data))
    }

    /// Reads `buf.len()` bytes of a chunk from `skip` bytes into it, unverified (the record was
    /// verified when the journal was opened or appended). False if the journal lacks it.
    pub fn read_part(&self, hash: &[u8; 32], skip: u64, buf: &mut [u8]) -> io::Result<bool> {
        let Some(&(off, n)) = self.index.get(hash) else {
            return Ok(false);
        };
        if skip + buf.len() as u64 > n as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end of a chunk",
            ));
        }
        self.file.read_exact_at(buf, off + skip)?;
        Ok(true)
    }

    /// Whether records written before it was opened are not readable now: damaged ones were
    /// skipped, or a torn or corrupt tail was cut off. Harmless while staging (those chunks are
    /// asked for again); after a commit record, every record was durable, so a replay may lack
    /// chunks of a committed generation.
    pub fn lost_records(&self) -> bool {
        self.cut_tail || !self.damaged.is_empty()
    }

    /// Re-reads every record: the hashes of those whose bytes no longer match (found damaged
    /// when the journal was opened, or since).
    pub fn verify(&self) -> io::Result<Vec<[u8; 32]>> {
        let mut bad: Vec<[u8; 32]> = self.damaged.iter().map(|d| d.0).collect();
        let mut data = Vec::new();
        for (hash, &(off, n)) in &self.index {
            data.resize(n as usize, 0);
            self.file.read_exact_at(&mut data, off)?;
            if blake3::hash(&data).as_bytes() != hash {
                bad.push(*hash);
            }
        }
        Ok(bad)
    }

    /// Writes the right bytes (verified by the caller) over a damaged record of `hash` of the
    /// same length, and makes them durable; false if no such record is here.
    pub fn rewrite(&mut self, hash: &[u8; 32], data: &[u8]) -> io::Result<bool> {
        let found = self.index.get(hash).copied().or_else(|| {
            self.damaged
                .iter()
                .find(|d| &d.0 == hash)
                .map(|d| (d.1, d.2))
        });
        let Some((off, n)) = found.filter(|&(_, n)| n as usize == data.len()) else {
            return Ok(false);
        };
        self.file.write_all_at(data, off)?;
        self.file.sync_data()?;
        self.damaged.retain(|d| &d.0 != hash);
        self.index.insert(*hash, (off, n));
        Ok(true)
    }

    /// Every chunk held, with its length.
    pub fn chunks(&self) -> impl Iterator<Item = (&[u8; 32], u32)> {
        self.index.iter().map(|(h, &(_, n))| (h, n))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Empties the journal (after its generation is applied). Not durable: records that come
    /// back after a crash are verified chunks, staged for nothing (see [`durable::empty_behind`]).
    pub fn clear(&mut self) -> io::Result<()> {
        durable::empty_behind(&self.path, &mut self.file)?;
        self.writeback = Writeback::default();
        self.index.clear();
        self.damaged.clear();
        self.cut_tail = false;
        self.end = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleared_journal_starts_empty_small_or_large_and_keeps_only_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        // 1 MiB chunks: the small journal is emptied in place, the large one replaced.
        for count in [2u8, 24] {
            let mut j = Journal::open(&p, 1 << 20).unwrap();
            let old: Vec<Vec<u8>> = (0..count).map(|i| vec![i; 1 << 20]).collect();
            for c in &old {
                j.append(blake3::hash(c).as_bytes(), c).unwrap();
            }
            j.clear().unwrap();
            assert_eq!((j.len(), j.bytes()), (0, 0));
            let new = vec![0xee; 5000];
            let h = *blake3::hash(&new).as_bytes();
            j.append(&h, &new).unwrap();
            j.sync().unwrap();
            drop(j);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), HEADER + 5000);
            let mut j = Journal::open(&p, 1 << 20).unwrap();
            assert_eq!(j.len(), 1, "{count} chunks before the clear");
            assert_eq!(j.get(&h).unwrap().as_deref(), Some(&new[..]));
            assert!(!j.contains(blake3::hash(&old[0]).as_bytes()));
            j.clear().unwrap();
        }
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_prefix_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p, 1 << 20).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize]).collect();
        for c in &chunks {
            j.append(blake3::hash(c).as_bytes(), c).unwrap();
        }
        let full = j.bytes();
        drop(j);
        // Cut in the middle of the last record, then add garbage.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(full - 10).unwrap();
        f.write_all_at(b"garbage!", full - 10).unwrap();
        drop(f);
        let j = Journal::open(&p, 1 << 20).unwrap();
        assert_eq!(j.len(), 4);
        for c in &chunks[..4] {
            assert_eq!(
                j.get(blake3::hash(c).as_bytes()).unwrap().as_deref(),
                Some(&c[..])
            );
        }
        assert!(!j.contains(blake3::hash(&chunks[4]).as_bytes()));
        assert!(std::fs::metadata(&p).unwrap().len() < full);
    }

    #[test]
    fn a_flipped_byte_costs_one_record_which_verify_names_and_rewrite_mends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p, 1 << 20).unwrap();
        let chunks: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 500]).collect();
        for c in &chunks {
            j.append(blake3::hash(c).as_bytes(), c).unwrap();
        }
        assert!(j.verify().unwrap().is_empty());
        let flip = |at: u64| {
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(&[0xFF], at).unwrap();
        };
        let second = *blake3::hash(&chunks[1]).as_bytes();
        // Damaged while open: verify names it.
        flip(540 + 100);
        assert_eq!(j.verify().unwrap(), vec![second]);
        drop(j);
        // Reopened: the damaged record is skipped, the ones after it stay.
        let mut j = Journal::open(&p, 1 << 20).unwrap();
        assert_eq!(j.len(), 2);
        assert!(j.contains(blake3::hash(&chunks[2]).as_bytes()));
        assert_eq!(j.verify().unwrap(), vec![second]);
        assert!(
            !j.rewrite(&second, &chunks[1][..499]).unwrap(),
            "length differs"
        );
        assert!(j.rewrite(&second, &chunks[1]).unwrap());
        assert!(j.verify().unwrap().is_empty());
        drop(j);
        let j = Journal::open(&p, 1 << 20).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!(j.get(&second).unwrap().as_deref(), Some(&chunks[1][..]));
    }
}
