//! Kept chunks: the bytes that restore points (and files open at an older generation) need
//! after newer generations overwrote them in the images. One pack per applied generation holds
//! what applying it overwrote; packs use the staging journal's self-checking records, so a
//! torn tail after a crash is cut and the rest kept. A chunk is in at most one pack.
//!
//! Expiry never loses a chunk still needed: a pack is deleted only when nothing in it is
//! needed, and rewritten (new file fsynced, then renamed over the old one) when less than half
//! of it is.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::Journal;
use crate::durable;

pub struct Kept {
    dir: PathBuf,
    max_chunk: u32,
    /// Opened by a reader beside the daemon (`ferry restore`): never writes.
    read_only: bool,
    packs: BTreeMap<u64, Journal>,
    /// Which pack holds each chunk.
    index: HashMap<[u8; 32], u64>,
}

impl Kept {
    /// Opens the packs under `dir` (created if missing).
    pub fn open(dir: &Path, max_chunk: u32) -> io::Result<Kept> {
        fs::create_dir_all(dir)?;
        Kept::open_with(dir, max_chunk, false)
    }

    /// Opens the packs under `dir` to read them while the daemon may change them.
    pub fn open_read_only(dir: &Path, max_chunk: u32) -> io::Result<Kept> {
        Kept::open_with(dir, max_chunk, true)
    }

    fn open_with(dir: &Path, max_chunk: u32, read_only: bool) -> io::Result<Kept> {
        let mut kept = Kept {
            dir: dir.to_path_buf(),
            max_chunk,
            read_only,
            packs: BTreeMap::new(),
            index: HashMap::new(),
        };
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if read_only && e.kind() == io::ErrorKind::NotFound => return Ok(kept),
            Err(e) => return Err(e),
        };
        for ent in entries {
            let p = ent?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".tmp") && !read_only {
                // An interrupted rewrite: the pack it was to replace is still there.
                let _ = fs::remove_file(&p);
                continue;
            }
            let Some(n) = name.strip_suffix(".pack").and_then(|n| n.parse().ok()) else {
                continue;
            };
            kept.load(n)?;
        }
        Ok(kept)
    }

    fn pack_path(&self, pack: u64) -> PathBuf {
        self.dir.join(format!("{pack}.pack"))
    }

    fn load(&mut self, pack: u64) -> io::Result<()> {
        let p = self.pack_path(pack);
        let j = if self.read_only {
            Journal::open_read_only(&p, self.max_chunk)?
        } else {
            Journal::open(&p, self.max_chunk)?
        };
        for (h, _) in j.chunks() {
            self.index.insert(*h, pack);
        }
        self.packs.insert(pack, j);
        Ok(())
    }

    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.index.contains_key(hash)
    }

    /// Keeps a chunk (verified by the caller) in pack `pack`, unless some pack has it.
    pub fn put(&mut self, pack: u64, hash: &[u8; 32], data: &[u8]) -> io::Result<()> {
        if self.contains(hash) {
            return Ok(());
        }
        if !self.packs.contains_key(&pack) {
            let j = Journal::open(&self.pack_path(pack), self.max_chunk)?;
            durable::fsync_dir(&self.dir)?;
            self.packs.insert(pack, j);
        }
        self.packs
            .get_mut(&pack)
            .expect("opened above")
            .append(hash, data)?;
        self.index.insert(*hash, pack);
        Ok(())
    }

    /// Makes pack `pack` durable.
    pub fn sync(&self, pack: u64) -> io::Result<()> {
        match self.packs.get(&pack) {
            Some(j) => j.sync(),
            None => Ok(()),
        }
    }

    /// Reads part of a kept chunk; false if no pack holds it.
    pub fn read(&self, hash: &[u8; 32], skip: u64, buf: &mut [u8]) -> io::Result<bool> {
        match self.index.get(hash).and_then(|p| self.packs.get(p)) {
            Some(j) => j.read_part(hash, skip, buf),
            None => Ok(false),
        }
    }

    /// A kept chunk, verified against its hash.
    pub fn get(&self, hash: &[u8; 32]) -> io::Result<Option<Vec<u8>>> {
        match self.index.get(hash).and_then(|p| self.packs.get(p)) {
            Some(j) => j.get(hash),
            None => Ok(None),
        }
    }

    /// The packs held, by number.
    pub fn packs(&self) -> Vec<u64> {
        self.packs.keys().copied().collect()
    }

    /// Re-reads every chunk of pack `n` (if it is still there): those whose bytes no longer
    /// match their hash.
    pub fn verify(&self, n: u64) -> io::Result<Vec<[u8; 32]>> {
        match self.packs.get(&n) {
            Some(j) => j.verify(),
            None => Ok(Vec::new()),
        }
    }

    /// Writes the right bytes (verified by the caller) over the damaged kept chunk `hash`;
    /// false if no pack has a record of it.
    pub fn repair(&mut self, hash: &[u8; 32], data: &[u8]) -> io::Result<bool> {
        for (n, j) in self.packs.iter_mut() {
            if j.rewrite(hash, data)? {
                self.index.insert(*hash, *n);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Bytes in all packs (headers included): what the restore points cost on disk.
    pub fn bytes(&self) -> u64 {
        self.packs.values().map(|j| j.bytes()).sum()
    }

    pub fn chunks(&self) -> usize {
        self.index.len()
    }

    /// Frees what is not `needed`: returns the bytes freed.
    pub fn retain(&mut self, needed: impl Fn(&[u8; 32]) -> bool) -> io::Result<u64> {
        let mut freed = 0;
        let numbers: Vec<u64> = self.packs.keys().copied().collect();
        for n in numbers {
            let j = &self.packs[&n];
            let (mut live, mut live_bytes) = (Vec::new(), 0u64);
            for (h, len) in j.chunks() {
                if needed(h) {
                    live.push(*h);
                    live_bytes += len as u64;
                }
            }
            let before = j.bytes();
            if live.is_empty() {
                let j = self.packs.remove(&n).expect("listed");
                for (h, _) in j.chunks() {
                    self.index.remove(h);
                }
                fs::remove_file(j.path())?;
                freed += before;
            } else if live_bytes * 2 < before {
                let tmp = self.dir.join(format!("{n}.pack.tmp"));
                let _ = fs::remove_file(&tmp);
                let mut fresh = Journal::open(&tmp, self.max_chunk)?;
                for h in &live {
                    let data = j.get(h)?.expect("listed in this pack");
                    fresh.append(h, &data)?;
                }
                fresh.sync()?;
                drop(fresh);
                let old = self.packs.remove(&n).expect("listed");
                for (h, _) in old.chunks() {
                    self.index.remove(h);
                }
                fs::rename(&tmp, self.pack_path(n))?;
                durable::fsync_dir(&self.dir)?;
                self.load(n)?;
                freed += before - self.packs[&n].bytes();
            }
        }
        if freed > 0 {
            durable::fsync_dir(&self.dir)?;
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8) -> (Vec<u8>, [u8; 32]) {
        let c = vec![i; 1000 + i as usize];
        let h = *blake3::hash(&c).as_bytes();
        (c, h)
    }

    #[test]
    fn chunks_are_found_across_reopen_and_expired_only_when_unneeded() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = Kept::open(dir.path(), 1 << 20).unwrap();
        for i in 0..6u8 {
            let (c, h) = chunk(i);
            k.put(u64::from(i / 3), &h, &c).unwrap();
            k.put(9, &h, &c).unwrap(); // already kept: not again
        }
        k.sync(0).unwrap();
        k.sync(1).unwrap();
        drop(k);
        let mut k = Kept::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(k.chunks(), 6);
        let (c4, h4) = chunk(4);
        let mut buf = vec![0u8; 10];
        assert!(k.read(&h4, 100, &mut buf).unwrap());
        assert_eq!(buf, c4[100..110]);
        assert!(!dir.path().join("9.pack").exists());

        // Pack 0 keeps one of three (rewritten), pack 1 nothing (deleted).
        let (_, h1) = chunk(1);
        let freed = k.retain(|h| *h == h1).unwrap();
        assert!(freed > 0);
        assert!(!dir.path().join("1.pack").exists());
        assert_eq!(k.chunks(), 1);
        assert_eq!(k.get(&h1).unwrap().unwrap(), chunk(1).0);
        drop(k);
        let k = Kept::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(k.chunks(), 1);
        assert!(k.contains(&h1));
    }

    /// A rewrite interrupted before its rename leaves the old pack whole.
    #[test]
    fn an_interrupted_rewrite_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut k = Kept::open(dir.path(), 1 << 20).unwrap();
        let (c, h) = chunk(7);
        k.put(3, &h, &c).unwrap();
        k.sync(3).unwrap();
        drop(k);
        fs::write(dir.path().join("3.pack.tmp"), b"half written").unwrap();
        let k = Kept::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(k.get(&h).unwrap().unwrap(), c);
        assert!(!dir.path().join("3.pack.tmp").exists());
    }
}
