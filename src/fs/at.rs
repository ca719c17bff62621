//! The backing directory reached by its descriptor: every path is resolved relative to it
//! (the `*at` system calls), so the length of the backing directory's own path never counts
//! against PATH_MAX. A path that works under the mount works in the backing directory.

use std::ffi::{CString, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

/// An open directory; paths given to its methods are relative to it (empty for itself).
#[derive(Debug)]
pub struct Dir(OwnedFd);

/// One entry of a directory listing.
pub struct Entry {
    pub name: OsString,
    pub ino: u64,
    pub kind: rustix::fs::FileType,
}

/// The path rustix is given: "." for the directory itself.
fn at(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

impl Dir {
    /// Opens the directory `path`.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir(fd))
    }

    /// Opens `rel` with `flags` (O_CLOEXEC is added); `mode` if it is created.
    pub fn open_file(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<File> {
        let flags = OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, at(rel), flags, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    /// A descriptor of `rel` itself (O_PATH, a final symbolic link not followed).
    fn handle_of(&self, rel: &Path) -> io::Result<OwnedFd> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(rustix::fs::openat(&self.0, at(rel), flags, Mode::empty())?)
    }

    /// lstat(2) of `rel`.
    pub fn metadata(&self, rel: &Path) -> io::Result<Metadata> {
        File::from(self.handle_of(rel)?).metadata()
    }

    /// The entries of directory `rel`, without "." and "..".
    pub fn list(&self, rel: &Path) -> io::Result<Vec<Entry>> {
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, at(rel), flags, Mode::empty())?;
        let mut dir = rustix::fs::Dir::new(fd)?;
        let mut out = Vec::new();
        while let Some(ent) = dir.read() {
            let ent = ent?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            out.push(Entry {
                name: OsString::from_vec(name.to_vec()),
                ino: ent.ino(),
                kind: ent.file_type(),
            });
        }
        Ok(out)
    }

    pub fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        Ok(rustix::fs::readlinkat(&self.0, at(rel), Vec::new())?.into_bytes())
    }

    pub fn unlink(&self, rel: &Path) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.0, rel, AtFlags::empty())?)
    }

    pub fn rmdir(&self, rel: &Path) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(&self.0, rel, AtFlags::REMOVEDIR)?)
    }

    /// renameat2(2) within this directory; `flags` as the system call takes them.
    pub fn rename(&self, from: &Path, to: &Path, flags: u32) -> io::Result<()> {
        let flags = RenameFlags::from_bits_retain(flags);
        Ok(rustix::fs::renameat_with(
            &self.0, from, &self.0, to, flags,
        )?)
    }

    /// chmod(2) of `rel` (a final symbolic link followed, as chmod does).
    pub fn chmod(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let mode = Mode::from_raw_mode(mode & 0o7777);
        Ok(rustix::fs::chmodat(
            &self.0,
            at(rel),
            mode,
            AtFlags::empty(),
        )?)
    }

    /// lchown(2) of `rel`; `None` leaves that id as it is.
    pub fn chown(&self, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let uid = uid.map(rustix::fs::Uid::from_raw);
        let gid = gid.map(rustix::fs::Gid::from_raw);
        Ok(rustix::fs::chownat(
            &self.0,
            at(rel),
            uid,
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// utimensat(2) of `rel` (access, modification; UTIME_NOW and UTIME_OMIT as the system
    /// call takes them) without following a final symbolic link.
    pub fn set_times(&self, rel: &Path, times: &[libc::timespec; 2]) -> io::Result<()> {
        let c = CString::new(at(rel).as_os_str().as_bytes())?;
        // SAFETY: a valid descriptor, a NUL-terminated path and two timespecs.
        let r = unsafe {
            libc::utimensat(
                self.raw_fd(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A path naming `rel` itself for the path-based calls that have no `*at` form (the
    /// extended attribute calls), valid while the returned descriptor is held. Use it with
    /// the *following* variants (`getxattr`, not `lgetxattr`): the link in /proc leads to
    /// `rel` itself, even when `rel` is a symbolic link.
    pub fn proc_path(&self, rel: &Path) -> io::Result<(OwnedFd, CString)> {
        let fd = self.handle_of(rel)?;
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        Ok((fd, CString::new(path).expect("no NUL")))
    }

    pub fn statvfs(&self) -> io::Result<rustix::fs::StatVfs> {
        Ok(rustix::fs::fstatvfs(self.0.as_fd())?)
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
}
