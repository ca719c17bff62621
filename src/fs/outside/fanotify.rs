//! The kernel edge of outside-change detection: a fanotify group that reports, with the writer's
//! pid, every write, truncate, create and rename-into in the backing directory's directories.
//!
//! The group reports directory handles and names (`FAN_REPORT_DFID_NAME`), so no file is opened
//! per event; events of one file by one process merge while queued, so the mount's own writes
//! cost one queued event per image between two drains. Only events of other processes are
//! resolved to a path (`open_by_handle_at` on the directory's handle). Needs CAP_SYS_ADMIN (the
//! mount daemon runs as root).
//!
//! [`parse`] is the pure decoder of the kernel's event records; [`Group`] owns the descriptor.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What the group listens for: content changes of files in a marked directory, and entries
/// created or moved into it (files and directories).
const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_CREATE
    | libc::FAN_MOVED_TO
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

const METADATA_LEN: usize = 24;

/// One decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub mask: u64,
    pub pid: i32,
    /// The directory's file handle: `handle_type` (4 bytes, native order) then the handle.
    pub dir: Option<Vec<u8>>,
    /// The entry's name in that directory.
    pub name: Option<OsString>,
}

impl Event {
    /// The kernel dropped events: everything may have changed.
    pub fn overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }
}

/// A malformed record from the kernel (a kernel/ABI mismatch, never expected).
#[derive(Debug, thiserror::Error)]
#[error("malformed fanotify event at byte {at}: {what}")]
pub struct Malformed {
    pub at: usize,
    pub what: &'static str,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes the events in `buf` (what one `read` of the group returned).
pub fn parse(buf: &[u8]) -> Result<Vec<Event>, Malformed> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let bad = |what| Malformed { at, what };
        if buf.len() - at < METADATA_LEN {
            return Err(bad("truncated metadata"));
        }
        let len = u32_at(buf, at) as usize;
        if buf[at + 4] != libc::FANOTIFY_METADATA_VERSION {
            return Err(bad("unknown metadata version"));
        }
        let meta_len = u16_at(buf, at + 6) as usize;
        if len < meta_len || meta_len < METADATA_LEN || at + len > buf.len() {
            return Err(bad("event length out of bounds"));
        }
        let mut ev = Event {
            mask: u64::from_ne_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes")),
            pid: i32::from_ne_bytes(buf[at + 20..at + 24].try_into().expect("4 bytes")),
            dir: None,
            name: None,
        };
        let mut info = at + meta_len;
        while info < at + len {
            if at + len - info < 4 {
                return Err(bad("truncated info header"));
            }
            let kind = buf[info];
            let ilen = u16_at(buf, info + 2) as usize;
            if ilen < 4 || info + ilen > at + len {
                return Err(bad("info record length out of bounds"));
            }
            let rec = &buf[info..info + ilen];
            if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME || kind == libc::FAN_EVENT_INFO_TYPE_DFID
            {
                // header (4), fsid (8), handle_bytes (4), handle_type (4), handle, [name NUL].
                if rec.len() < 20 {
                    return Err(bad("truncated file handle"));
                }
                let hbytes = u32_at(rec, 12) as usize;
                if 20 + hbytes > rec.len() {
                    return Err(bad("file handle longer than its record"));
                }
                ev.dir = Some(rec[16..20 + hbytes].to_vec());
                if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
                    let name = &rec[20 + hbytes..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    ev.name = Some(OsString::from_vec(name[..end].to_vec()));
                }
            }
            info += ilen;
        }
        out.push(ev);
        at += len;
    }
    Ok(out)
}

/// A fanotify group watching the directories of one backing directory.
pub struct Group {
    fd: OwnedFd,
    /// The backing directory, open: the mount point for `open_by_handle_at`.
    root: File,
    root_path: PathBuf,
}

impl Group {
    /// A new group for the backing directory `root` (nothing marked yet).
    pub fn new(root: &Path) -> io::Result<Group> {
        // SAFETY: a plain system call; the result is checked.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_REPORT_DFID_NAME
                    | libc::FAN_UNLIMITED_QUEUE
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Group {
            // SAFETY: `fd` was just returned to us and is owned by nobody else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            root: File::open(root)?,
            root_path: root.to_path_buf(),
        })
    }

    /// Marks the directory `dir` (adding a mark twice is harmless).
    pub fn mark(&self, dir: &Path) -> io::Result<()> {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a valid NUL-terminated path; the result is checked.
        let r = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR | libc::FAN_MARK_DONT_FOLLOW,
                MASK,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads every queued event without waiting.
    pub fn read_all(&self) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len() as libc::size_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(out),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok(out);
            }
            out.extend(parse(&buf[..n as usize]).map_err(io::Error::other)?);
        }
    }

    /// The path, relative to the backing directory, of the directory whose handle is `dir`
    /// (`None` if it is gone or lies outside the backing directory).
    pub fn resolve(&self, dir: &[u8]) -> Option<PathBuf> {
        if dir.len() < 4 {
            return None;
        }
        let handle_type = i32::from_ne_bytes(dir[..4].try_into().expect("4 bytes"));
        let bytes = &dir[4..];
        // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, 4-aligned.
        let mut fh = vec![0u32; 2 + bytes.len().div_ceil(4)];
        fh[0] = bytes.len() as u32;
        fh[1] = handle_type as u32;
        // SAFETY: `fh` has room for the header and the handle's bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                fh.as_mut_ptr().add(2).cast::<u8>(),
                bytes.len(),
            );
        }
        // SAFETY: `fh` is a well-formed file_handle; the result is checked.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.root.as_raw_fd(),
                fh.as_mut_ptr().cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is ours.
        let f = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()?;
        path.strip_prefix(&self.root_path)
            .ok()
            .map(Path::to_path_buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event record as the kernel lays it out, with one DFID_NAME info record.
    fn record(mask: u64, pid: i32, handle: &[u8], name: &str) -> Vec<u8> {
        let mut info = vec![libc::FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 0, 0];
        info.extend([7u8; 8]); // fsid
        info.extend((handle.len() as u32).to_ne_bytes());
        info.extend(1i32.to_ne_bytes()); // handle_type
        info.extend(handle);
        info.extend(name.as_bytes());
        info.push(0);
        while info.len() % 4 != 0 {
            info.push(0);
        }
        let ilen = info.len() as u16;
        info[2..4].copy_from_slice(&ilen.to_ne_bytes());
        let mut ev = Vec::new();
        ev.extend(((METADATA_LEN + info.len()) as u32).to_ne_bytes());
        ev.push(libc::FANOTIFY_METADATA_VERSION);
        ev.push(0);
        ev.extend((METADATA_LEN as u16).to_ne_bytes());
        ev.extend(mask.to_ne_bytes());
        ev.extend((-1i32).to_ne_bytes());
        ev.extend(pid.to_ne_bytes());
        ev.extend(info);
        ev
    }

    #[test]
    fn events_decode_with_their_pid_directory_and_name() {
        let mut buf = record(libc::FAN_MODIFY, 42, &[1, 2, 3, 4, 5, 6, 7, 8], "vm.img");
        buf.extend(record(libc::FAN_MOVED_TO, 7, &[9; 12], "disk.raw"));
        let evs = parse(&buf).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].pid, 42);
        assert_eq!(evs[0].mask, libc::FAN_MODIFY);
        assert_eq!(evs[0].name.as_deref(), Some(std::ffi::OsStr::new("vm.img")));
        let mut dir = 1i32.to_ne_bytes().to_vec();
        dir.extend([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(evs[0].dir.as_deref(), Some(&dir[..]));
        assert_eq!(
            evs[1].name.as_deref(),
            Some(std::ffi::OsStr::new("disk.raw"))
        );
        assert!(!evs[1].overflow());
    }

    #[test]
    fn an_overflow_has_no_info() {
        let mut ev = record(libc::FAN_Q_OVERFLOW, 0, &[], "");
        ev.truncate(METADATA_LEN);
        ev[..4].copy_from_slice(&(METADATA_LEN as u32).to_ne_bytes());
        let evs = parse(&ev).unwrap();
        assert!(evs[0].overflow() && evs[0].dir.is_none());
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let good = record(libc::FAN_MODIFY, 1, &[1; 8], "a");
        for cut in 1..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&1000u16.to_ne_bytes());
        assert!(parse(&bad).is_err());
        let mut bad = good.clone();
        bad[METADATA_LEN + 12..METADATA_LEN + 16].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&bad).is_err());
        let mut bad = good;
        bad[4] = 99;
        assert!(parse(&bad).is_err());
    }
}
