//! The filesystem core: a passthrough filesystem over a backing directory that reports every
//! change to the [`Tracker`]. It knows nothing of FUSE: `fuse.rs` is a thin adapter that calls
//! these methods and turns [`FsError`] into an errno, so the core can be tested without a
//! kernel in the loop.
//!
//! Data path for a write: the handle's file is the backing file, opened when the guest opened
//! the image; the range is first made durable in the intent log (if newly dirty), then written
//! with `pwrite`, then added to the image's dirty set. Reads are `pread`s. `fsync` is `fsync` of
//! the backing file. O_DIRECT opens are honoured by the kernel (FUSE direct I/O); the backing
//! file is opened without it, so unaligned requests work.

pub mod at;
pub mod cow;
mod creds;
mod direct;
mod error;
pub mod fuse;
pub mod gate;
mod inode;
pub mod outside;
mod track;

pub use error::{FsError, Result};
pub use inode::{Ino, ROOT};
pub use track::{Frozen, NsEvent, Target, Tracker};

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use inode::Inodes;

/// The kind of a file, as the core reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// Attributes of a file, with the mount's inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// A time to set: now, or a given instant.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// Attribute changes requested by `setattr`; `None` leaves an attribute alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// A size change by a caller without CAP_FSETID: clear set-user-ID and set-group-ID as
    /// the kernel would (it leaves that to us under FUSE_HANDLE_KILLPRIV_V2).
    pub kill_suidgid: bool,
}

/// One directory entry for `readdir`.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: OsString,
}

/// Who is asking: new files belong to them.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// `statfs` figures of the backing filesystem.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// `fallocate` modes the core understands (Linux FALLOC_FL_* bits).
pub mod falloc {
    pub const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
    pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
    pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
}

/// An open file: the backing file and the inode it belongs to.
struct Handle {
    ino: Ino,
    file: File,
    key: cow::FileKey,
    /// The same file opened with O_DIRECT, for the data of an O_DIRECT open under
    /// `-o direct_backing` (see `direct.rs`).
    direct: Option<direct::Direct>,
}

impl Handle {
    fn target(&self) -> Target<'_> {
        Target {
            file: &self.file,
            key: self.key,
        }
    }
}

/// The filesystem core over one backing directory.
pub struct Fs {
    root: PathBuf,
    /// The backing directory, open: every path is relative to it (`*at` calls).
    dir: at::Dir,
    read_only: bool,
    /// Serve O_DIRECT opens with direct I/O on the backing file (`-o direct_backing`).
    direct_backing: bool,
    /// Let the kernel cache buffered writes and send them in batches (`-o writeback_cache`).
    writeback_cache: bool,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Vec<DirEntry>>>,
    next_fh: AtomicU64,
    tracker: Arc<Tracker>,
    /// Orders changes against renames: a change holds it shared from resolving its image's
    /// path to recording the range, a rename exclusively until the inode table has the new
    /// name, so no change is recorded under a name a rename has just moved away.
    names: RwLock<()>,
    /// Closed while the mount may no longer be the primary (automatic failover).
    gate: Arc<gate::Gate>,
}

fn kind_of(ft: fs::FileType) -> FileKind {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else if ft.is_char_device() {
        FileKind::CharDevice
    } else if ft.is_block_device() {
        FileKind::BlockDevice
    } else {
        FileKind::File
    }
}

/// Clears S_ISUID, and S_ISGID if the group may execute, of `file` (see `Fs::kill_suidgid`).
fn kill_suidgid(file: &File) -> io::Result<bool> {
    let mode = file.metadata()?.mode();
    let mut keep = mode & 0o7777;
    keep &= !libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        keep &= !libc::S_ISGID;
    }
    if keep == mode & 0o7777 {
        return Ok(false);
    }
    check(unsafe { libc::fchmod(file.as_raw_fd(), keep) })?;
    Ok(true)
}

/// The kind of a directory entry as the backing directory's listing gives it.
fn kind_of_entry(t: rustix::fs::FileType) -> FileKind {
    use rustix::fs::FileType as T;
    match t {
        T::Directory => FileKind::Dir,
        T::Symlink => FileKind::Symlink,
        T::Fifo => FileKind::Fifo,
        T::Socket => FileKind::Socket,
        T::CharacterDevice => FileKind::CharDevice,
        T::BlockDevice => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn attr_of(ino: Ino, m: &fs::Metadata) -> Attr {
    Attr {
        ino,
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        kind: kind_of(m.file_type()),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(SetTime::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(SetTime::At(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

/// Calls `get` (a `*getxattr`/`*listxattr`) with a buffer that grows until the value fits.
fn read_sized(get: impl Fn(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let n = get(&mut []);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let m = get(&mut buf);
        if m >= 0 {
            buf.truncate(m as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e); // ERANGE: it grew in between; ask again
        }
    }
}

/// How errors name an image that was unlinked while open.
const UNLINKED_IMAGE: &str = "(unlinked image)";

/// The most a buffered write of a backing file writes with one `pwrite`, at aligned offsets.
/// The page cache sizes the folio a write creates by the write's length (ext4 has large folios
/// since Linux 6.16), and a later small write into a large folio walks all of its blocks: once
/// a guest's 1 MiB writes (an image copied in) made 1 MiB folios, the kernel's
/// `ext4_block_write_begin` took 55% of the daemon's CPU under 4 KiB random writes, and the
/// workers waited for each other's folio locks. With 64 KiB pieces the same writes ran 1.4-1.7x
/// as fast, and 1 MiB sequential writes (16 calls instead of one) no slower (docs/BENCHMARKS.md,
/// "Large folios").
const WRITE_PIECE: u64 = 64 << 10;

/// Writes `data` at `offset` in pieces that do not cross a [`WRITE_PIECE`] boundary.
fn write_in_pieces(file: &File, mut data: &[u8], mut offset: u64) -> io::Result<()> {
    while !data.is_empty() {
        let n = (WRITE_PIECE - offset % WRITE_PIECE).min(data.len() as u64) as usize;
        file.write_all_at(&data[..n], offset)?;
        (data, offset) = (&data[n..], offset + n as u64);
    }
    Ok(())
}

/// Names the kernel may pass that must never reach the backing directory.
fn valid_name(name: &OsStr) -> Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(FsError::Invalid("file name"));
    }
    Ok(())
}

impl Fs {
    /// A core over the backing directory `root`.
    pub fn new(root: &Path, read_only: bool, tracker: Arc<Tracker>) -> io::Result<Fs> {
        let root = root.canonicalize()?;
        let m = fs::metadata(&root)?;
        if !m.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        let dir = at::Dir::open(&root)?;
        Ok(Fs {
            inodes: RwLock::new(Inodes::new((m.dev(), m.ino()))),
            dir,
            root,
            read_only,
            direct_backing: false,
            writeback_cache: false,
            handles: RwLock::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            tracker,
            names: RwLock::new(()),
            gate: Arc::default(),
        })
    }

    /// With `on`, an O_DIRECT open's aligned reads and writes use direct I/O on the backing
    /// file too, bypassing the host's page cache (`-o direct_backing`).
    pub fn with_direct_backing(mut self, on: bool) -> Fs {
        self.direct_backing = on;
        self
    }

    /// With `on`, the kernel caches buffered writes (FUSE writeback cache) and sends them
    /// later in large batches; each sync point flushes them first (`Engine::before_freeze`).
    pub fn with_writeback_cache(mut self, on: bool) -> Fs {
        self.writeback_cache = on;
        self
    }

    pub fn writeback_cache(&self) -> bool {
        self.writeback_cache
    }

    pub fn backing_root(&self) -> &Path {
        &self.root
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Path of `ino` relative to the mount.
    fn rel(&self, ino: Ino) -> Result<PathBuf> {
        self.inodes.read().path(ino).ok_or(FsError::Stale {
            what: "inode",
            id: ino,
        })
    }

    fn child_rel(&self, parent: Ino, name: &OsStr) -> Result<PathBuf> {
        valid_name(name)?;
        Ok(self.rel(parent)?.join(name))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.read().get(&fh).cloned().ok_or(FsError::Stale {
            what: "file handle",
            id: fh,
        })
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(FsError::ReadOnly);
        }
        self.gate.pass().map_err(FsError::Fenced)
    }

    /// The gate every change passes (closed by the failover agent).
    pub fn gate(&self) -> Arc<gate::Gate> {
        self.gate.clone()
    }

    /// Registers one kernel lookup of `rel` (named `name` in `parent`) and returns its attributes.
    fn remember(&self, parent: Ino, name: &OsStr, rel: &Path) -> Result<Attr> {
        let m = self
            .dir
            .metadata(rel)
            .map_err(|e| FsError::io("stat", rel, e))?;
        let ino = self
            .inodes
            .write()
            .remember(parent, name, (m.dev(), m.ino()));
        Ok(attr_of(ino, &m))
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let rel = self.child_rel(parent, name)?;
        self.remember(parent, name, &rel)
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        self.inodes.write().forget(ino, n);
    }

    pub fn getattr(&self, ino: Ino, fh: Option<u64>) -> Result<Attr> {
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok()) {
            let m = h.file.metadata().map_err(|e| FsError::io("fstat", "", e))?;
            return Ok(attr_of(ino, &m));
        }
        if self.inodes.read().is_unlinked(ino) {
            // Unlinked while open (fstat comes without a handle): stat any handle on it.
            let h = self.handles.read().values().find(|h| h.ino == ino).cloned();
            if let Some(h) = h {
                let m = h.file.metadata().map_err(|e| FsError::io("fstat", "", e))?;
                return Ok(attr_of(ino, &m));
            }
        }
        let rel = self.rel(ino)?;
        let m = self
            .dir
            .metadata(&rel)
            .map_err(|e| FsError::io("stat", &rel, e))?;
        Ok(attr_of(ino, &m))
    }

    pub fn setattr(&self, ino: Ino, fh: Option<u64>, set: SetAttr) -> Result<Attr> {
        self.writable()?;
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok())
            && self.inodes.read().is_unlinked(ino)
        {
            return self.setattr_unlinked(ino, &h, set);
        }
        let rel = self.rel(ino)?;
        if let Some(mode) = set.mode {
            self.dir
                .chmod(&rel, mode)
                .map_err(|e| FsError::io("chmod", &rel, e))?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            self.dir
                .chown(&rel, set.uid, set.gid)
                .map_err(|e| FsError::io("chown", &rel, e))?;
        }
        if let Some(size) = set.size {
            let kill = |f: &File| match set.kill_suidgid {
                true => kill_suidgid(f)
                    .map(|_| ())
                    .map_err(|e| FsError::io("chmod", &rel, e)),
                false => Ok(()),
            };
            match fh.and_then(|fh| self.handle(fh).ok()) {
                Some(h) => {
                    kill(&h.file)?;
                    self.truncate(ino, &h.file, size)?
                }
                None => {
                    let f = self
                        .dir
                        .open_file(&rel, libc::O_WRONLY, 0)
                        .map_err(|e| FsError::io("open", &rel, e))?;
                    kill(&f)?;
                    self.truncate(ino, &f, size)?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let times = [timespec(set.atime), timespec(set.mtime)];
            self.dir
                .set_times(&rel, &times)
                .map_err(|e| FsError::io("utimensat", &rel, e))?;
        }
        self.getattr(ino, fh)
    }

    /// `setattr` of an image unlinked while open: it has no path, so everything goes through
    /// the open handle.
    fn setattr_unlinked(&self, ino: Ino, h: &Handle, set: SetAttr) -> Result<Attr> {
        let fd = h.file.as_raw_fd();
        let io = |op, e| FsError::io(op, UNLINKED_IMAGE, e);
        if let Some(mode) = set.mode {
            check(unsafe { libc::fchmod(fd, (mode & 0o7777) as libc::mode_t) })
                .map_err(|e| io("chmod", e))?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.unwrap_or(u32::MAX);
            let gid = set.gid.unwrap_or(u32::MAX);
            check(unsafe { libc::fchown(fd, uid, gid) }).map_err(|e| io("chown", e))?;
        }
        if let Some(size) = set.size {
            self.truncate(ino, &h.file, size)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = [timespec(set.atime), timespec(set.mtime)];
            check(unsafe { libc::futimens(fd, ts.as_ptr()) }).map_err(|e| io("futimens", e))?;
        }
        let m = h.file.metadata().map_err(|e| io("fstat", e))?;
        Ok(attr_of(ino, &m))
    }

    /// Sets the size of image `ino`, recording the bytes that appear or disappear.
    fn truncate(&self, ino: Ino, file: &File, size: u64) -> Result<()> {
        let _names = self.names.read();
        let m = file
            .metadata()
            .map_err(|e| FsError::io("fstat", UNLINKED_IMAGE, e))?;
        let target = Target {
            file,
            key: (m.dev(), m.ino()),
        };
        let old = m.len();
        let range = old.min(size)..old.max(size);
        let Some(rel) = &self.image_path(ino)? else {
            self.writable()?;
            return self
                .tracker
                .change_unnamed(target, range, || file.set_len(size))
                .map_err(|e| FsError::io("truncate", UNLINKED_IMAGE, e));
        };
        self.tracked(rel, target, range, || file.set_len(size), "truncate")
    }

    /// The path of image `ino` for the tracker, or `None` when it was unlinked (or replaced
    /// by a rename) while open: its bytes belong to no image any more, so there is nothing
    /// to record, but POSIX lets whoever holds it open go on using it.
    fn image_path(&self, ino: Ino) -> Result<Option<PathBuf>> {
        let inodes = self.inodes.read();
        match inodes.path(ino) {
            Some(p) => Ok(Some(p)),
            None if inodes.is_unlinked(ino) => Ok(None),
            None => Err(FsError::Stale {
                what: "inode",
                id: ino,
            }),
        }
    }

    /// Runs `op`, which changes bytes `range` of image `rel`, under the tracker.
    fn tracked<T>(
        &self,
        rel: &Path,
        target: Target<'_>,
        range: Range<u64>,
        op: impl FnOnce() -> io::Result<T>,
        what: &'static str,
    ) -> Result<T> {
        self.writable()?;
        self.tracker
            .change(rel, target, range, op)
            .map_err(|source| FsError::Intent {
                path: rel.to_path_buf(),
                source,
            })?
            .map_err(|e| FsError::io(what, rel, e))
    }

    pub fn opendir(&self, ino: Ino) -> Result<u64> {
        let rel = self.rel(ino)?;
        let mut entries = vec![
            DirEntry {
                ino,
                kind: FileKind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: ROOT,
                kind: FileKind::Dir,
                name: "..".into(),
            },
        ];
        let listed = self
            .dir
            .list(&rel)
            .map_err(|e| FsError::io("opendir", &rel, e))?;
        for ent in listed {
            let kind = match ent.kind {
                // Filesystems without d_type: ask the entry itself.
                rustix::fs::FileType::Unknown => self
                    .dir
                    .metadata(&rel.join(&ent.name))
                    .map(|m| kind_of(m.file_type()))
                    .unwrap_or(FileKind::File),
                t => kind_of_entry(t),
            };
            entries.push(DirEntry {
                // Only a hint to the kernel: it looks each name up before using it.
                ino: ent.ino,
                kind,
                name: ent.name,
            });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, entries);
        Ok(fh)
    }

    /// Entries of an open directory from position `offset` on; each has position index + 1.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, &DirEntry) -> bool,
    ) -> Result<()> {
        let dirs = self.dirs.lock();
        let entries = dirs.get(&fh).ok_or(FsError::Stale {
            what: "directory handle",
            id: fh,
        })?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if add(i as u64 + 1, e) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    /// Creates `name` in `parent` as the caller (see `creds.rs`): `make` gets the backing
    /// directory's descriptor and the path relative to it.
    fn make<T>(
        &self,
        parent: Ino,
        name: &OsStr,
        op: &'static str,
        who: Caller,
        make: impl FnOnce(libc::c_int, &CString) -> io::Result<T>,
    ) -> Result<(PathBuf, T)> {
        self.writable()?;
        let rel = self.child_rel(parent, name)?;
        let c = cstr(&rel).map_err(|e| FsError::io(op, &rel, e))?;
        let made = creds::as_caller(who, || make(self.dir.raw_fd(), &c))
            .map_err(|e| FsError::io(op, &rel, e))?;
        Ok((rel, made))
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, who: Caller) -> Result<Attr> {
        let (rel, ()) = self.make(parent, name, "mkdir", who, |dir, path| {
            // SAFETY: a valid descriptor and NUL-terminated path; the result is checked.
            check(unsafe { libc::mkdirat(dir, path.as_ptr(), mode & 0o7777) })
        })?;
        self.remember(parent, name, &rel)
    }

    /// mknod(2): FIFOs, sockets, device nodes (and regular files). Only regular files are
    /// images; the others live in the backing directory and are not replicated.
    pub fn mknod(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        who: Caller,
    ) -> Result<Attr> {
        let (rel, ()) = self.make(parent, name, "mknod", who, |dir, path| {
            // SAFETY: as in `mkdir`.
            check(unsafe { libc::mknodat(dir, path.as_ptr(), mode, rdev as libc::dev_t) })
        })?;
        self.remember(parent, name, &rel)
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        flags: i32,
        who: Caller,
    ) -> Result<(Attr, u64)> {
        // Read-write whatever the caller asked: copy-before-write reads through the handle,
        // and the kernel holds the caller to the access mode it opened with. The file is new,
        // so opening it checks no permission.
        let keep = libc::O_EXCL | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;
        let oflags =
            libc::O_CREAT | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | (flags & keep);
        let (rel, file) = self.make(parent, name, "create", who, |dir, path| {
            // SAFETY: as in `mkdir`; the descriptor returned is ours alone.
            let fd = unsafe { libc::openat(dir, path.as_ptr(), oflags, mode & 0o7777) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(unsafe { File::from_raw_fd(fd) })
        })?;
        let attr = self.remember(parent, name, &rel)?;
        if flags & libc::O_TRUNC != 0 {
            self.truncate(attr.ino, &file, 0)?;
        }
        let fh = self.add_handle(attr.ino, file, flags)?;
        Ok((attr, fh))
    }

    fn open_backing(&self, rel: &Path, flags: i32, mode: u32) -> Result<File> {
        let acc = flags & libc::O_ACCMODE;
        if acc != libc::O_RDONLY {
            self.writable()?;
        }
        // O_DIRECT is the kernel's business (FUSE direct I/O); O_TRUNC is done by `truncate`
        // so the bytes it drops are recorded; O_APPEND is handled by the kernel's offsets.
        let keep = libc::O_SYNC | libc::O_DSYNC | libc::O_CREAT | libc::O_EXCL | libc::O_NOATIME;
        // O_CREAT and O_EXCL go in as raw flags: `OpenOptions::create` refuses a read-only
        // open, which POSIX allows (open(path, O_CREAT|O_RDONLY, mode)).
        let access = if acc == libc::O_RDONLY {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        self.dir
            .open_file(rel, access | flags & keep | libc::O_NOFOLLOW, mode & 0o7777)
            .or_else(|e| {
                // O_NOATIME is only allowed to the file's owner (or root).
                if e.raw_os_error() == Some(libc::EPERM) && flags & libc::O_NOATIME != 0 {
                    self.open_backing(rel, flags & !libc::O_NOATIME, mode)
                        .map_err(|_| FsError::io("open", rel, e))
                } else {
                    Err(FsError::io("open", rel, e))
                }
            })
    }

    /// Registers an open of `ino` (`file`, opened for the guest's open `flags`).
    fn add_handle(&self, ino: Ino, file: File, flags: i32) -> Result<u64> {
        let m = file
            .metadata()
            .map_err(|e| FsError::io("fstat", self.rel(ino).unwrap_or_default(), e))?;
        let direct = (self.direct_backing && flags & libc::O_DIRECT != 0)
            .then(|| {
                let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
                direct::Direct::reopen(&file, writable)
                    .inspect_err(|e| {
                        log::warn!(
                            "{}: no direct I/O on the backing file ({e}); this open is served \
                             through the page cache",
                            self.rel(ino).unwrap_or_default().display()
                        )
                    })
                    .ok()
            })
            .flatten();
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.write().insert(
            fh,
            Arc::new(Handle {
                ino,
                file,
                key: (m.dev(), m.ino()),
                direct,
            }),
        );
        Ok(fh)
    }

    pub fn open(&self, ino: Ino, flags: i32) -> Result<u64> {
        let rel = self.rel(ino)?;
        let file = self.open_backing(&rel, flags & !libc::O_CREAT, 0)?;
        if flags & libc::O_TRUNC != 0 {
            self.truncate(ino, &file, 0)?;
        }
        self.add_handle(ino, file, flags)
    }

    pub fn release(&self, fh: u64) {
        self.handles.write().remove(&fh);
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let h = self.handle(fh)?;
        if let Some(d) = &h.direct
            && direct::Direct::fits(offset, size as usize)
        {
            match d.read_at(offset, size as usize) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // buffered, below
                r => {
                    return r
                        .map_err(|e| FsError::io("read", self.rel(h.ino).unwrap_or_default(), e));
                }
            }
        }
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match h.file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FsError::io("read", self.rel(h.ino).unwrap_or_default(), e)),
            }
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// Runs `op`, which changes bytes `range` of the image behind `h`, under the tracker.
    fn change<T>(
        &self,
        h: &Handle,
        range: Range<u64>,
        op: impl FnOnce() -> io::Result<T>,
        what: &'static str,
    ) -> Result<T> {
        let _names = self.names.read();
        match self.image_path(h.ino)? {
            Some(rel) => self.tracked(&rel, h.target(), range, op, what),
            None => {
                self.writable()?;
                self.tracker
                    .change_unnamed(h.target(), range, op)
                    .map_err(|e| FsError::io(what, UNLINKED_IMAGE, e))
            }
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        let range = offset..offset + data.len() as u64;
        let op = || {
            crate::fault::point("fs.write")?;
            if let Some(d) = &h.direct
                && direct::Direct::fits(offset, data.len())
            {
                match d.write_all_at(data, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // buffered, below
                    r => return r,
                }
            }
            write_in_pieces(&h.file, data, offset)
        };
        self.change(&h, range, op, "write")?;
        Ok(data.len() as u32)
    }

    /// Clears set-user-ID (and set-group-ID of a group-executable file) of the file open as
    /// `fh`, as a write by a caller without CAP_FSETID does (FUSE_HANDLE_KILLPRIV_V2 leaves
    /// it to the daemon, which writes as root and so keeps them). Returns whether the mode
    /// changed (the kernel's cached attributes are then stale).
    pub fn kill_suidgid(&self, fh: u64) -> Result<bool> {
        let h = self.handle(fh)?;
        kill_suidgid(&h.file)
            .map_err(|e| FsError::io("chmod", self.rel(h.ino).unwrap_or_default(), e))
    }

    pub fn flush(&self, fh: u64) -> Result<()> {
        self.handle(fh).map(|_| ())
    }

    /// Makes the image's data (and with `datasync = false` its metadata) durable.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        let r = if datasync {
            h.file.sync_data()
        } else {
            h.file.sync_all()
        };
        r.map_err(|e| FsError::io("fsync", self.rel(h.ino).unwrap_or_default(), e))?;
        self.tracker.fsynced();
        Ok(())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        let h = self.handle(fh)?;
        let supported = falloc::KEEP_SIZE | falloc::PUNCH_HOLE | falloc::ZERO_RANGE;
        if mode & !supported != 0 {
            return Err(FsError::Unsupported("this fallocate mode"));
        }
        let end = offset
            .checked_add(len)
            .ok_or(FsError::Invalid("fallocate range"))?;
        let size = h
            .file
            .metadata()
            .map_err(|e| FsError::io("fstat", self.rel(h.ino).unwrap_or_default(), e))?
            .len();
        // Content changes inside the file, and the size growth unless KEEP_SIZE.
        let mut changed = if mode & (falloc::PUNCH_HOLE | falloc::ZERO_RANGE) != 0 {
            offset.min(size)..end.min(size)
        } else {
            size..size
        };
        if mode & falloc::KEEP_SIZE == 0 && end > size {
            changed = changed.start.min(size)..end;
        }
        let fd = h.file.as_raw_fd();
        let op = || check(unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) });
        if changed.is_empty() {
            self.writable()?;
            return op()
                .map_err(|e| FsError::io("fallocate", self.rel(h.ino).unwrap_or_default(), e));
        }
        self.change(&h, changed, op, "fallocate")
    }

    /// SEEK_DATA / SEEK_HOLE (and SEEK_SET/CUR/END) on the backing file.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        let r = unsafe { libc::lseek(h.file.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(FsError::io(
                "lseek",
                self.rel(h.ino).unwrap_or_default(),
                io::Error::last_os_error(),
            ));
        }
        Ok(r)
    }

    /// Copies between two open images in the backing filesystem (reflinks where it can).
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let hi = self.handle(fh_in)?;
        let ho = self.handle(fh_out)?;
        let range = off_out..off_out.saturating_add(len);
        self.change(
            &ho,
            range,
            || {
                let (mut i, mut o) = (off_in as i64, off_out as i64);
                let n = unsafe {
                    libc::copy_file_range(
                        hi.file.as_raw_fd(),
                        &mut i,
                        ho.file.as_raw_fd(),
                        &mut o,
                        len as usize,
                        0,
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as u64)
                }
            },
            "copy_file_range",
        )
    }

    /// Extended attributes pass through to the backing file (not replicated). The kernel has
    /// checked the caller's access to the namespace (`user.`, `trusted.`, ...).
    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        let rel = self.rel(ino)?;
        let (_fd, p, n) = self.xattr_args(&rel, Some(name))?;
        let n = n.expect("given");
        read_sized(|buf| unsafe {
            // SAFETY: valid C strings; `buf` is ours, its length is passed.
            libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })
        .map_err(|e| FsError::io("getxattr", &rel, e))
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>> {
        let rel = self.rel(ino)?;
        let (_fd, p, _) = self.xattr_args(&rel, None)?;
        read_sized(|buf| unsafe {
            // SAFETY: as in `getxattr`.
            libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        })
        .map_err(|e| FsError::io("listxattr", &rel, e))
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.writable()?;
        let rel = self.rel(ino)?;
        let (_fd, p, n) = self.xattr_args(&rel, Some(name))?;
        let n = n.expect("given");
        // SAFETY: valid C strings and a value slice with its length.
        check(unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
        .map_err(|e| FsError::io("setxattr", &rel, e))
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        self.writable()?;
        let rel = self.rel(ino)?;
        let (_fd, p, n) = self.xattr_args(&rel, Some(name))?;
        let n = n.expect("given");
        // SAFETY: valid C strings.
        check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
            .map_err(|e| FsError::io("removexattr", &rel, e))
    }

    /// The /proc path of `rel` (see `at::Dir::proc_path`: use the following xattr calls; the
    /// descriptor keeps the path valid) and the attribute name as C strings.
    fn xattr_args(
        &self,
        rel: &Path,
        name: Option<&OsStr>,
    ) -> Result<(OwnedFd, CString, Option<CString>)> {
        let (fd, p) = self
            .dir
            .proc_path(rel)
            .map_err(|e| FsError::io("xattr", rel, e))?;
        let n = name
            .map(|n| CString::new(n.as_bytes()))
            .transpose()
            .map_err(|_| FsError::Invalid("attribute name"))?;
        Ok((fd, p, n))
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let rel = self.rel(ino)?;
        self.dir
            .read_link(&rel)
            .map_err(|e| FsError::io("readlink", &rel, e))
    }

    pub fn symlink(&self, parent: Ino, name: &OsStr, target: &Path, who: Caller) -> Result<Attr> {
        let t = cstr(target).map_err(|e| FsError::io("symlink", target, e))?;
        let (rel, ()) = self.make(parent, name, "symlink", who, |dir, path| {
            // SAFETY: as in `mkdir`.
            check(unsafe { libc::symlinkat(t.as_ptr(), dir, path.as_ptr()) })
        })?;
        self.remember(parent, name, &rel)
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.remove(parent, name, "unlink", |p| self.dir.unlink(p))
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.remove(parent, name, "rmdir", |p| self.dir.rmdir(p))
    }

    /// Removes `name` from `parent` with `rm` (the system call `op`), forgets its inode and
    /// tells the tracker.
    fn remove(
        &self,
        parent: Ino,
        name: &OsStr,
        op: &'static str,
        rm: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<()> {
        self.writable()?;
        let rel = self.child_rel(parent, name)?;
        rm(&rel).map_err(|e| FsError::io(op, &rel, e))?;
        let mut inodes = self.inodes.write();
        if let Some(ino) = inodes.child(parent, name) {
            inodes.unlink(ino);
        }
        drop(inodes);
        self.tracker.removed(&rel);
        Ok(())
    }

    /// Renames; `flags` are renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.writable()?;
        // Until the inode table has the new names: see `names`.
        let _names = self.names.write();
        let from = self.child_rel(parent, name)?;
        let to = self.child_rel(newparent, newname)?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return self.exchange(parent, name, newparent, newname, (&from, &to), flags);
        }
        let replaced = self.dir.metadata(&to).is_ok();
        let op = || self.dir.rename(&from, &to, flags);
        self.tracker
            .rename(&from, &to, replaced, op)
            .map_err(|source| FsError::Intent {
                path: to.clone(),
                source,
            })?
            .map_err(|e| FsError::io("rename", &from, e))?;
        let mut inodes = self.inodes.write();
        if let Some(old) = inodes.child(newparent, newname) {
            inodes.unlink(old);
        }
        if let Some(ino) = inodes.child(parent, name) {
            inodes.rename(ino, newparent, newname);
        }
        Ok(())
    }

    /// renameat2 with RENAME_EXCHANGE: `paths` (`name` in `parent`, `newname` in `newparent`)
    /// swap names, and so do their dirty ranges and inodes. The caller holds `names`.
    fn exchange(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        (a, b): (&Path, &Path),
        flags: u32,
    ) -> Result<()> {
        self.tracker
            .exchange(a, b, || self.dir.rename(a, b, flags))
            .map_err(|source| FsError::Intent {
                path: a.to_path_buf(),
                source,
            })?
            .map_err(|e| FsError::io("rename", a, e))?;
        let mut inodes = self.inodes.write();
        let (ia, ib) = (inodes.child(parent, name), inodes.child(newparent, newname));
        if let Some(ino) = ia {
            inodes.rename(ino, newparent, newname);
        }
        if let Some(ino) = ib {
            inodes.rename(ino, parent, name);
        }
        Ok(())
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let s = self
            .dir
            .statvfs()
            .map_err(|e| FsError::io("statfs", "", e))?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_pieces_writes_every_byte_where_it_belongs() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for offset in [0, 5_000, WRITE_PIECE - 1, 3 * WRITE_PIECE] {
            f.set_len(0).unwrap();
            write_in_pieces(&f, &data, offset).unwrap();
            assert_eq!(f.metadata().unwrap().len(), offset + data.len() as u64);
            let mut back = vec![0u8; data.len()];
            f.read_exact_at(&mut back, offset).unwrap();
            assert!(back == data, "bytes differ after a write at {offset}");
        }
        write_in_pieces(&f, &[], 7).unwrap();
    }
}
