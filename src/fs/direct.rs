//! Direct I/O on the backing file (`-o direct_backing`): the data of a guest's O_DIRECT open
//! (QEMU `cache=none`) goes to the disk without passing through the host's page cache, so a
//! host of many VMs does not cache every guest's disk a second time beside the guest's own
//! cache. Requests whose offset and length are not multiples of [`ALIGN`] (and any the
//! backing filesystem refuses with EINVAL) take the buffered path, which the kernel keeps
//! coherent with direct I/O on the same file.

use std::alloc::{Layout, alloc, dealloc};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Alignment of offsets, lengths and memory for direct I/O: the logical block size of every
/// common disk (512 or 4096 bytes) divides it.
pub const ALIGN: usize = 4096;

/// A second descriptor of an open backing file, opened with O_DIRECT.
#[derive(Debug)]
pub struct Direct(File);

impl Direct {
    /// Opens `file` again with O_DIRECT (through /proc, so renames since do not matter).
    pub fn reopen(file: &File, writable: bool) -> io::Result<Direct> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .map(Direct)
    }

    /// Whether a request of `len` bytes at `offset` can go direct.
    pub fn fits(offset: u64, len: usize) -> bool {
        offset % ALIGN as u64 == 0 && len % ALIGN == 0 && len > 0
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        with_buffer(len, |buf| {
            let mut n = 0;
            while n < len {
                match self.0.read_at(&mut buf[n..], offset + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if n % ALIGN != 0 {
                    break; // the end of the file: the next read would not be aligned
                }
            }
            Ok(buf[..n].to_vec())
        })
    }

    /// Writes all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        with_buffer(data.len(), |buf| {
            buf.copy_from_slice(data);
            self.0.write_all_at(buf, offset)
        })
    }
}

/// Runs `f` on this thread's aligned buffer, `len` bytes long.
fn with_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUF: RefCell<Aligned> = const { RefCell::new(Aligned { ptr: std::ptr::null_mut(), cap: 0 }) };
    }
    BUF.with_borrow_mut(|b| {
        b.reserve(len);
        // SAFETY: `ptr` holds `cap >= len` bytes allocated by `reserve`, borrowed once.
        f(unsafe { std::slice::from_raw_parts_mut(b.ptr, len) })
    })
}

/// Memory aligned to [`ALIGN`].
struct Aligned {
    ptr: *mut u8,
    cap: usize,
}

impl Aligned {
    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap, ALIGN).expect("valid layout")
    }

    fn reserve(&mut self, len: usize) {
        if len <= self.cap {
            return;
        }
        let cap = len.next_multiple_of(ALIGN);
        // SAFETY: a non-zero size; the old block (if any) was allocated with its layout.
        unsafe {
            if !self.ptr.is_null() {
                dealloc(self.ptr, Self::layout(self.cap));
            }
            self.ptr = alloc(Self::layout(cap));
        }
        if self.ptr.is_null() {
            std::alloc::handle_alloc_error(Self::layout(cap));
        }
        self.cap = cap;
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by `reserve` with this layout.
            unsafe { dealloc(self.ptr, Self::layout(self.cap)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::random;

    #[test]
    fn direct_reads_and_writes_agree_with_buffered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data = random(1 << 20, 3);
        std::fs::write(&path, &data).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let Ok(d) = Direct::reopen(&file, true) else {
            return; // a filesystem without O_DIRECT: nothing to test here
        };
        assert!(Direct::fits(8192, 4096) && !Direct::fits(512, 4096) && !Direct::fits(0, 100));
        assert_eq!(d.read_at(4096, 8192).unwrap(), &data[4096..12288]);
        // At the end of the file: what there is.
        assert_eq!(
            d.read_at((1 << 20) - 4096, 16384).unwrap(),
            &data[(1 << 20) - 4096..]
        );
        let new = random(8192, 4);
        d.write_all_at(&new, 65536).unwrap();
        let mut back = vec![0; 8192];
        file.read_exact_at(&mut back, 65536).unwrap();
        assert_eq!(back, new);
    }
}
