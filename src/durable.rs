//! Durable file updates: write a temporary file, fsync it, rename it over the target, fsync the
//! directory. After a crash the target holds either its old content or the new content.
//! [`write_new`] creates a file that must not exist yet (keys), linking instead of renaming.
//! [`Writeback`] and [`empty_behind`] keep large staging files' disk work off a commit's path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Replaces `path` with `data` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes `path` name the durable file `from` too (a hard link), replacing what `path` named,
/// atomically and durably: after a crash `path` names its old file or `from`'s. No byte is
/// copied, so it costs the same whatever the file's size. Files written by [`write_atomic`] are
/// never changed in place, so the two names can share one file.
pub fn link_atomic(from: &Path, path: &Path) -> io::Result<()> {
    let tmp = temp_path(path)?;
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = fs::hard_link(from, &tmp).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(parent(path))
}

/// Creates `path` holding `data`, with permission bits `mode`, atomically and durably; fails with
/// [`io::ErrorKind::AlreadyExists`] if `path` exists, and never replaces it.
///
/// The data goes to a temporary file created with `mode` (so it is never more open than that,
/// even briefly), which is fsynced and then hard-linked to `path`: the link is the atomic
/// no-replace step. After a crash `path` is either absent or complete.
pub fn write_new(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path)?;
    // A temporary file left by a crashed run with the same pid may have other permissions:
    // remove it rather than reuse it.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    fsync_dir(dir)
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `parts` one after another at `offset`, all of them (`pwritev(2)`): a record's header
/// and its bytes without first copying both into one buffer.
pub fn write_parts_at(file: &File, parts: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<io::IoSlice> = parts[first..].iter().map(|p| io::IoSlice::new(p)).collect();
        let mut n = match rustix::io::pwritev(file, &slices, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += n as u64;
        // Past what was written: whole parts, then into the next one.
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

/// Bytes a staging file takes before [`Writeback`] starts writing them to disk.
pub const WRITEBACK_STEP: u64 = 8 << 20;

/// Starts writing an append-only file's new bytes back to disk as they come, without waiting
/// for them (`sync_file_range(2)`, `SYNC_FILE_RANGE_WRITE`), so that the fsync that makes it
/// durable waits for the last few MiB, not for all of them: the disk works while the data
/// still arrives.
#[derive(Debug, Default)]
pub struct Writeback {
    started: u64,
}

impl Writeback {
    /// The file's bytes now end at `end`.
    pub fn appended(&mut self, file: &File, end: u64) {
        if end < self.started + WRITEBACK_STEP {
            return;
        }
        start_writeback(file, self.started, end - self.started);
        self.started = end;
    }
}

/// Starts writing `len` bytes of `file` from `offset` back to disk (0: to its end), without
/// waiting for them. Only a hint: an error here shows again at the fsync, which is what counts.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Empties the file open as `file` at `path`: a new empty file takes its name, and the old
/// one, if large, is closed on a thread of its own, where the kernel frees its pages and
/// blocks (truncating a 200 MiB staging journal took about 45 ms on a commit's path). Not
/// durable: for files whose stale content is harmless after a crash (self-checking staging
/// records, a patch log stamped with its generation).
pub fn empty_behind(path: &Path, file: &mut File) -> io::Result<()> {
    if file.metadata()?.len() < WRITEBACK_STEP {
        return file.set_len(0);
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let new = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let old = std::mem::replace(file, new);
    let _ = std::thread::Builder::new()
        .name("ferry-free".into())
        .spawn(move || drop(old));
    Ok(())
}

/// The temporary file beside `path` that this process writes before the final step.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(parent(path).join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether any error of `e`'s chain says the filesystem is full (ENOSPC) or the quota is
/// reached (EDQUOT).
pub fn is_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<io::Error>()
            && (matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || io.kind() == io::ErrorKind::StorageFull)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn link_atomic_replaces_with_the_same_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("staged"), dir.path().join("committed"));
        write_atomic(&from, b"new").unwrap();
        write_atomic(&to, b"old").unwrap();
        link_atomic(&from, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"new");
        fs::remove_file(&from).unwrap();
        assert_eq!(
            fs::read(&to).unwrap(),
            b"new",
            "the link outlives the staged name"
        );
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the committed file is left");
        assert!(
            link_atomic(&from, &to).is_err(),
            "a missing source is an error"
        );
        assert_eq!(fs::read(&to).unwrap(), b"new", "and changes nothing");
    }

    #[test]
    fn write_parts_at_writes_every_part_in_order_at_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.path().join("f"))
            .unwrap();
        let big = vec![7u8; 3 << 20];
        write_parts_at(&file, &[b"head", b"", &big, b"tail"], 5).unwrap();
        let got = fs::read(dir.path().join("f")).unwrap();
        assert_eq!(got.len(), 5 + 4 + big.len() + 4);
        assert_eq!(&got[..5], &[0; 5], "nothing before the offset");
        assert_eq!(&got[5..9], b"head");
        assert!(got[9..9 + big.len()].iter().all(|&b| b == 7));
        assert_eq!(&got[9 + big.len()..], b"tail");
        write_parts_at(&file, &[], 0).unwrap();
        assert_eq!(
            fs::read(dir.path().join("f")).unwrap(),
            got,
            "no parts, no change"
        );
    }

    #[test]
    fn write_new_creates_with_the_mode_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let e = write_new(&path, b"two", 0o600).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"one");
        // No temporary file is left beside it, after success or refusal.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_new_ignores_a_stale_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let tmp = temp_path(&path).unwrap();
        fs::write(&tmp, b"stale").unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).unwrap();
        write_new(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!tmp.exists());
    }
}
