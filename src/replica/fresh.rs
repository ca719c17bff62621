//! New images staged in place: an image the store does not hold yet (a first sync, a VM added
//! on the primary) is staged as a file of its own under `.ferry/staging/images/`, each chunk
//! written at its places as it arrives, and renamed into the store at the commit.
//!
//! Staging such an image in the journal would write every byte twice (the journal, then the
//! image) and need twice its size free: a 500 GiB first sync would need 1 TiB. Nothing reads
//! the staged file but the store itself, so writing into it before the commit keeps invariant
//! 2; the commit fills what was not sent (chunks the store holds elsewhere), fsyncs the file
//! (step 1 of the store's commit order), and the apply renames it where the image goes.
//!
//! A chunk also wanted by an image the store holds goes to the journal as well (the apply
//! writes those images from the staging). A transfer that stops midway keeps the file: the
//! next session for the same manifest goes on from what was written; after a restart, or
//! for another manifest of the image, every entry the file holds is checked against its hash
//! first, and only those that match count as staged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::manifest::{Entry, Kind, Manifest, changed_entries};
use crate::wire::frame::Hash;

/// One new image being staged.
struct Image {
    path: String,
    /// The root of the manifest it is staged for: it names that manifest (every entry's offset,
    /// length and hash, and the size, are under it).
    root: blake3::Hash,
    file: File,
    /// Per entry of the manifest: whether the file holds its bytes.
    written: Vec<bool>,
    /// Bytes written since the file's writeback was last started.
    unflushed: u64,
    /// Entries written, and their bytes.
    held: (usize, u64),
}

/// A place of a data chunk in a new image.
struct Place {
    hash: Hash,
    /// Index into [`Fresh::images`], and of the entry in its manifest.
    image: u32,
    entry: u32,
    offset: u64,
}

/// The new images of the generation being received. What it holds per chunk of a new image:
/// its place (48 bytes) and a flag; the manifests stay the session's (a 500 GiB image in 64 KiB
/// chunks: about 400 MB while it is staged, freed at the commit).
pub struct Fresh {
    dir: PathBuf,
    images: Vec<Image>,
    /// Every place of a data chunk in the new images, sorted by hash.
    places: Vec<Place>,
    /// Chunks the generation also writes into images the store holds: these go to the
    /// journal too.
    elsewhere: HashSet<Hash>,
}

impl Fresh {
    /// New images are staged in `dir` (created if needed).
    pub fn new(dir: &Path) -> io::Result<Fresh> {
        fs::create_dir_all(dir)?;
        Ok(Fresh {
            dir: dir.to_path_buf(),
            images: Vec::new(),
            places: Vec::new(),
            elsewhere: HashSet::new(),
        })
    }

    /// Where new image `path` is staged: named by its path's hash, so every staged image is
    /// one file in one directory whatever the depth of its path.
    pub fn staged_path(dir: &Path, path: &str) -> PathBuf {
        dir.join(blake3::hash(path.as_bytes()).to_hex().as_str())
    }

    /// Prepares for a generation whose new manifests are `images`, over the committed
    /// `committed`: each image not committed yet is staged in place. What an earlier session
    /// wrote for the same manifest is kept; otherwise the file's entries are checked by hash.
    pub fn prepare(
        &mut self,
        committed: &BTreeMap<String, Manifest>,
        images: &BTreeMap<String, Manifest>,
    ) -> io::Result<()> {
        let mut before: HashMap<String, Image> =
            self.images.drain(..).map(|i| (i.path.clone(), i)).collect();
        self.places = Vec::new();
        self.elsewhere.clear();
        // Most generations change only images the store holds: nothing to map then (this runs
        // at every sync point).
        if images.keys().all(|p| committed.contains_key(p)) {
            return Ok(());
        }
        for (path, m) in images {
            if let Some(old) = committed.get(path) {
                self.elsewhere.extend(
                    changed_entries(old, m).filter_map(|e| e.hash().map(|h| *h.as_bytes())),
                );
                continue;
            }
            let image = match before.remove(path) {
                Some(i) if i.root == m.root() => i,
                _ => self.open(path, m)?,
            };
            let n = self.images.len() as u32;
            for (k, e) in m.entries().iter().enumerate() {
                if let Some(h) = e.hash() {
                    self.places.push(Place {
                        hash: *h.as_bytes(),
                        image: n,
                        entry: k as u32,
                        offset: e.offset,
                    });
                }
            }
            self.images.push(image);
        }
        self.places.sort_unstable_by_key(|p| p.hash);
        Ok(())
    }

    /// The places of chunk `hash`: a run of [`Fresh::places`].
    fn places_of(places: &[Place], hash: &Hash) -> Range<usize> {
        let start = places.partition_point(|p| p.hash < *hash);
        start..start + places[start..].partition_point(|p| p.hash == *hash)
    }

    /// Opens (or creates) the staged file of `path` for manifest `m`, counting as written the
    /// entries whose bytes it already holds.
    fn open(&self, path: &str, m: &Manifest) -> io::Result<Image> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(Fresh::staged_path(&self.dir, path))?;
        let size = file.metadata()?.len();
        let mut written = vec![false; m.entries().len()];
        let mut held = (0, 0);
        let mut buf = Vec::new();
        for (k, e) in m.entries().iter().enumerate() {
            let Some(h) = e.hash() else { continue };
            if e.end() > size {
                break;
            }
            buf.resize(e.len as usize, 0);
            file.read_exact_at(&mut buf, e.offset)?;
            written[k] = blake3::hash(&buf) == h;
            if written[k] {
                held = (held.0 + 1, held.1 + e.len);
            }
        }
        Ok(Image {
            path: path.to_string(),
            root: m.root(),
            file,
            written,
            unflushed: 0,
            held,
        })
    }

    /// Whether chunk `hash` is staged here and needed nowhere else: at every place it has in
    /// the new images, and wanted by no image the store holds.
    pub fn holds(&self, hash: &Hash) -> bool {
        let places = &self.places[Fresh::places_of(&self.places, hash)];
        !self.elsewhere.contains(hash)
            && !places.is_empty()
            && places
                .iter()
                .all(|p| self.images[p.image as usize].written[p.entry as usize])
    }

    /// Writes a verified chunk at every place it has in the new images. True when the journal
    /// must stage it too (needed elsewhere, or by no new image).
    pub fn write(&mut self, hash: &Hash, data: &[u8]) -> io::Result<bool> {
        let run = Fresh::places_of(&self.places, hash);
        if run.is_empty() {
            return Ok(true);
        }
        let len = data.len() as u64;
        for p in &self.places[run] {
            let image = &mut self.images[p.image as usize];
            if image.written[p.entry as usize] {
                continue;
            }
            image.file.write_all_at(data, p.offset)?;
            image.written[p.entry as usize] = true;
            image.held = (image.held.0 + 1, image.held.1 + len);
            // The disk works while the data still arrives: the commit's fsync waits for the
            // last few MiB, not for the whole image (as the journal's `Writeback` does).
            image.unflushed += len;
            if image.unflushed >= crate::durable::WRITEBACK_STEP {
                crate::durable::start_writeback(&image.file, 0, 0);
                image.unflushed = 0;
            }
        }
        Ok(self.elsewhere.contains(hash))
    }

    /// Whether new image `path` is staged here for exactly manifest `m`.
    pub fn stages(&self, path: &str, m: &Manifest) -> bool {
        self.images
            .iter()
            .any(|i| i.path == path && i.root == m.root())
    }

    /// Completes the staged file of `path` (staged for `m`: see [`Fresh::stages`]): the
    /// entries not written yet from `fill` (the chunk's bytes, verified), zero entries as holes,
    /// its size; then makes it durable (the file and its directory).
    pub fn complete(
        &mut self,
        path: &str,
        m: &Manifest,
        fill: &mut dyn FnMut(&Hash) -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<()> {
        let image = self
            .images
            .iter_mut()
            .find(|i| i.path == path && i.root == m.root())
            .expect("complete() follows stages()");
        for (k, e) in m.entries().iter().enumerate() {
            match e.kind {
                Kind::Data(h) if !image.written[k] => {
                    let data = fill(h.as_bytes())?;
                    image.file.write_all_at(&data, e.offset)?;
                    image.written[k] = true;
                    image.held = (image.held.0 + 1, image.held.1 + e.len);
                }
                Kind::Data(_) => {}
                Kind::Zero => punch(&image.file, e)?,
            }
        }
        image.file.set_len(m.size())?;
        image.file.sync_all()?;
        crate::durable::fsync_dir(&self.dir)?;
        Ok(())
    }

    /// Chunks staged in new images, and their bytes.
    pub fn staged(&self) -> (usize, u64) {
        self.images
            .iter()
            .fold((0, 0), |(n, b), i| (n + i.held.0, b + i.held.1))
    }

    /// Forgets every staged image (their files are removed with the staging).
    pub fn clear(&mut self) {
        self.images.clear();
        self.places = Vec::new();
        self.elsewhere = HashSet::new();
    }
}

/// Makes a zero entry a hole (or zeros, where the filesystem cannot punch): a file left by an
/// earlier manifest may hold data there.
pub fn punch(f: &File, e: &Entry) -> io::Result<()> {
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            e.offset as i64,
            e.len as i64,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut off = e.offset;
    while off < e.end() {
        let n = (e.end() - off).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(())
}
