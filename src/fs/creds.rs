//! Creating files as the caller. The daemon runs as root; a file, directory, node or symlink it
//! creates for a caller is created with the caller's filesystem uid and gid (`setfsuid` and
//! `setfsgid`, which Linux keeps per thread), so the kernel itself applies every rule a native
//! creation follows: the owner, the group of a setgid directory and its inheritance by new
//! directories, dropping S_ISGID for a group the caller is not in, and no capability beyond
//! the caller's (a non-zero fsuid drops CAP_FSETID, CAP_CHOWN and the DAC overrides). The mode
//! arrives with the caller's umask already applied (FUSE sends it), so the thread's own umask
//! must be 0: each thread that creates files gets its own filesystem context once
//! (`unshare(CLONE_FS)`) with umask 0, so the daemon's other files keep the process umask.
//! Supplementary groups are not sent by FUSE: creating threads have none, so a caller's
//! supplementary groups do not count where the kernel looks at groups on creation.

use std::cell::Cell;
use std::io;

use super::Caller;

thread_local! {
    static PREPARED: Cell<bool> = const { Cell::new(false) };
}

fn prepare_thread() -> io::Result<()> {
    if PREPARED.get() {
        return Ok(());
    }
    // SAFETY: plain system calls that change only this thread's filesystem context and
    // credentials (the raw setgroups syscall is per thread; glibc's wrapper is not).
    unsafe {
        if libc::unshare(libc::CLONE_FS) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::umask(0);
        if libc::geteuid() == 0 {
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
        }
    }
    PREPARED.set(true);
    Ok(())
}

/// Runs `f` (which creates something) with the caller's filesystem uid and gid and umask 0.
pub fn as_caller<T>(who: Caller, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    prepare_thread()?;
    // SAFETY: per-thread credential changes, restored below before returning.
    unsafe {
        libc::setfsgid(who.gid);
        libc::setfsuid(who.uid);
    }
    let r = f();
    // SAFETY: as above; the daemon's own fsuid and fsgid are its euid and egid.
    unsafe {
        libc::setfsuid(libc::geteuid());
        libc::setfsgid(libc::getegid());
    }
    r
}
