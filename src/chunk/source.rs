//! Where the chunker reads an image from: a file on disk, a byte slice in tests, and later the
//! frozen view of an image that the copy-before-write window keeps during a sync.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// A readable image of a fixed size. Implementations must be safe to read from several threads
/// at once (the re-chunk of several dirty runs runs in parallel).
pub trait Source: Sync {
    /// Size of the image in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. The range lies within [`Source::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The end of the run of bytes starting at `offset` that are known to be zero without reading
    /// them (a hole in a sparse file), or `offset` when nothing is known. Only a hint: returning
    /// `offset` is always correct.
    fn known_zero_until(&self, offset: u64) -> io::Result<u64> {
        Ok(offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl Source for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

/// An image file, read with `pread`; holes are found with `SEEK_DATA` and never read.
pub struct FileSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// Opens `path` read-only and records its current size.
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            size: meta.len(),
        })
    }

    /// Wraps an open file whose size the caller fixes (the image is frozen at `size`).
    pub fn new(file: File, path: PathBuf, size: u64) -> FileSource {
        FileSource { file, path, size }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "reading {} bytes at offset {offset} of {}: {e}",
                    buf.len(),
                    self.path.display()
                ),
            )
        })
    }

    fn known_zero_until(&self, offset: u64) -> io::Result<u64> {
        hole_end(&self.file, offset, self.size)
    }
}

/// The end of the hole at `offset` in `file` (of `size` bytes), or `offset` when there is data
/// there or the filesystem cannot tell (`SEEK_DATA`). SEEK_DATA moves the descriptor's offset,
/// which nothing else uses: reads are pread.
pub fn hole_end(file: &File, offset: u64, size: u64) -> io::Result<u64> {
    if offset >= size {
        return Ok(offset);
    }
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data at or after `offset`: the rest of the file is a hole.
            Some(libc::ENXIO) => Ok(size),
            // The filesystem cannot tell: read everything.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(offset),
            _ => Err(e),
        };
    }
    Ok((r as u64).min(size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn holes_are_reported_and_data_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.set_len(3 << 20).unwrap();
        drop(f);
        let src = FileSource::open(&path).unwrap();
        assert_eq!(src.size(), 3 << 20);
        let hole_end = src.known_zero_until(0).unwrap();
        // tmpfs and ext4 report the hole; a filesystem without SEEK_DATA reports nothing.
        assert!(hole_end == 0 || hole_end == 1 << 20, "{hole_end}");
        assert_eq!(src.known_zero_until(1 << 20).unwrap(), 1 << 20);
        let mut b = [0u8; 8];
        src.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7u8; 8]);
    }
}
