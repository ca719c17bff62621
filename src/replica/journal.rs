//! The staging journal: verified chunks of the generation being received, appended to one file
//! and found again by hash. Each record is self-checking (its key is the BLAKE3 hash of its
//! bytes), so after a crash the valid prefix is kept and a torn tail is cut off. Chunks staged
//! for a transfer that was interrupted stay staged: the resumed transfer does not ask for them
//! again.
//!
//! Record: magic `FJ01` (4 bytes), chunk hash (32), length u32le, the bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"FJ01";
const HEADER: u64 = 40;

pub struct Journal {
    path: PathBuf,
    file: File,
    end: u64,
    index: HashMap<[u8; 32], (u64, u32)>,
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
            if *blake3::hash(&data).as_bytes() != hash {
                break;
            }
            index.insert(hash, (pos + HEADER, n));
            pos += HEADER + n as u64;
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
        let mut rec = Vec::with_capacity(HEADER as usize + data.len());
        rec.extend_from_slice(MAGIC);
        rec.extend_from_slice(hash);
        rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
        rec.extend_from_slice(data);
        if let Err(e) = self.file.write_all_at(&rec, self.end) {
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.index
            .insert(*hash, (self.end + HEADER, data.len() as u32));
        self.end += rec.len() as u64;
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

    /// Empties the journal (after its generation is applied).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.index.clear();
        self.end = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_flipped_byte_ends_the_valid_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        let mut j = Journal::open(&p, 1 << 20).unwrap();
        for i in 0..3u8 {
            let c = vec![i; 500];
            j.append(blake3::hash(&c).as_bytes(), &c).unwrap();
        }
        drop(j);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF], 540 + 100).unwrap(); // inside the second record's data
        drop(f);
        assert_eq!(Journal::open(&p, 1 << 20).unwrap().len(), 1);
    }
}
