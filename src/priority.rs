//! How the CPU is shared between a VM's I/O and the work ferry does beside it on the same host.
//! Linux keeps scheduling per thread, so each thread sets its own when it starts:
//!
//! - **request threads** (the mounts' FUSE workers) keep the daemon's nice value and ask for
//!   the scheduler's shortest time slice, [`REQUEST_SLICE_NS`]: a guest's write waits for one
//!   of them to wake, and with the default slice (1.4 ms on two CPUs) a woken worker often
//!   waited for a CPU behind whatever ran there, nice 10 threads included (nice shares the CPU
//!   out over time, it does not make a woken thread run at once); with the short slice those
//!   waits halved in bench-cow's trace;
//! - **background threads** (a sync's re-chunking, hashing and shipping; a replica's checking
//!   and applying) run at nice [`NICE`]: under contention they get about a tenth of the CPU
//!   time a nice 0 thread wants, so the VMs are served first, yet the work still progresses
//!   on a busy host. A sync's threads also put their I/O in the idle class;
//! - where the operator names CPUs for them (`[node] background_cpus`, [`confine_background`]),
//!   background threads run only there, so a woken request thread or guest vCPU on the other
//!   CPUs does not wait for a CPU behind them (libvirt's `emulatorpin` and DRBD's `cpu-mask` do
//!   the like). A lock such a thread shares with the request path then waits for its CPU too:
//!   docs/BENCHMARKS.md, "Background threads on their own CPU".
//!
//! Measured with scripts/bench-cow: docs/BENCHMARKS.md, "Write latency during syncs".

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;

/// The nice value of a background thread.
const NICE: libc::c_int = 10;

/// The time slice a request thread asks for (`sched_attr.sched_runtime` of a normal thread,
/// Linux 6.12 and later; older kernels ignore it): the shortest the scheduler allows. A woken
/// thread with a shorter slice than the running one may preempt it (EEVDF's PREEMPT_SHORT),
/// and its deadlines come sooner. A request is served in tens of microseconds, so the short
/// slice costs no extra switches.
const REQUEST_SLICE_NS: u64 = 100_000;

/// The I/O priority of a sync's threads: the idle class, served when the disk has nothing
/// else to do, so a sync's reads of the images do not queue ahead of the VM's I/O. Schedulers
/// with priority aging (mq-deadline: 10 s) still serve it on a disk that is never idle; where
/// the scheduler ignores classes ("none"), this changes nothing.
const IOPRIO_IDLE: libc::c_int = 3 << 13; // IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT

/// `struct sched_attr` of sched_setattr(2), its first version (48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// The calling thread's scheduling attributes.
fn attr() -> io::Result<SchedAttr> {
    let mut a = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: the calling thread (pid 0) and a buffer of the size passed.
    if unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut a as *mut SchedAttr,
            size,
            0,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(a)
}

/// Gives the calling request thread the short slice, once per thread (a thread-local flag:
/// fuser offers no hook at a worker's start, so the data path calls this per request).
pub fn request_thread() {
    thread_local!(static DONE: Cell<bool> = const { Cell::new(false) });
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    let set = attr().and_then(|mut a| {
        if a.policy != libc::SCHED_OTHER as u32 {
            return Ok(()); // an operator's choice (chrt): theirs
        }
        a.size = std::mem::size_of::<SchedAttr>() as u32;
        a.runtime = REQUEST_SLICE_NS;
        // SAFETY: the calling thread and a sched_attr of the size it declares.
        match unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &a as *const SchedAttr, 0) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    });
    if let Err(e) = set {
        log::debug!("cannot shorten a request thread's time slice: {e}");
    }
}

/// The CPUs background threads run on, once [`confine_background`] named them.
static BACKGROUND_CPUS: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// The CPUs the calling thread may run on (its affinity: the machine's, or a cgroup's or
/// taskset's share of them).
fn allowed() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the kernel fills one of the size passed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every index is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// `cpus` if each is one of `allowed`, else why not.
fn within(cpus: &[usize], allowed: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Err("no CPUs named".into());
    }
    match cpus.iter().find(|c| !allowed.contains(c)) {
        None => Ok(()),
        Some(c) => Err(format!(
            "CPU {c} is not one this process may run on (it may use {}): name CPUs from that \
             list",
            list(allowed)
        )),
    }
}

/// `cpus` as taskset -c writes them ("0-3,6").
fn list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(match j > i {
            true => format!("{}-{}", cpus[i], cpus[j]),
            false => cpus[i].to_string(),
        });
        i = j + 1;
    }
    out.join(",")
}

/// Keeps this process's background threads on `cpus` from now on: each applies it as it
/// starts ([`background_cpu`]), and the threads they start inherit it. Call it before any
/// starts, once (a second call keeps the first set). Fails, saying which CPUs the process
/// may use, if one of `cpus` is not among them.
pub fn confine_background(cpus: &[usize]) -> Result<(), String> {
    let allowed = allowed().map_err(|e| format!("cannot read this process's CPUs: {e}"))?;
    within(cpus, &allowed)?;
    // SAFETY: a zeroed cpu_set_t is an empty set, and every CPU was checked to be below
    // CPU_SETSIZE (it is one of the process's).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let _ = BACKGROUND_CPUS.set(set);
    Ok(())
}

/// Lowers the calling thread's CPU priority to [`NICE`], and keeps it on the background CPUs
/// if [`confine_background`] named them.
pub fn background_cpu() {
    if let Some(set) = BACKGROUND_CPUS.get() {
        // SAFETY: the calling thread (0) and a whole cpu_set_t.
        if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) } != 0 {
            log::warn!(
                "cannot keep a background thread on [node] background_cpus: {}",
                io::Error::last_os_error()
            );
        }
    }
    // SAFETY: a plain system call on the calling thread's own id.
    let tid = unsafe { libc::gettid() };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE) } != 0 {
        log::debug!(
            "cannot lower a background thread's CPU priority: {}",
            io::Error::last_os_error()
        );
    }
}

/// Lowers the calling thread's CPU priority ([`background_cpu`]) and puts its I/O in the idle
/// class ([`IOPRIO_IDLE`]).
pub fn background() {
    background_cpu();
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    // SAFETY: a plain system call on the calling thread's own id.
    let tid = unsafe { libc::gettid() };
    if unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, IOPRIO_IDLE) } != 0 {
        log::debug!(
            "cannot lower a background thread's I/O priority: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_keeps_custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        (major, minor) >= (6, 12)
    }

    #[test]
    fn a_background_thread_runs_at_nice_10_with_the_default_slice() {
        std::thread::spawn(|| {
            background();
            let a = attr().unwrap();
            assert_eq!(a.nice, NICE);
            assert_eq!(a.policy, libc::SCHED_OTHER as u32);
            assert_ne!(a.runtime, REQUEST_SLICE_NS);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_request_thread_keeps_its_nice_value_and_gets_the_short_slice() {
        std::thread::spawn(|| {
            let before = attr().unwrap();
            request_thread();
            request_thread();
            let a = attr().unwrap();
            assert_eq!(a.nice, before.nice);
            assert_eq!(a.policy, before.policy);
            if kernel_keeps_custom_slices() {
                assert_eq!(a.runtime, REQUEST_SLICE_NS);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn background_cpus_must_be_the_process_s_own() {
        assert_eq!(within(&[1], &[0, 1]), Ok(()));
        assert_eq!(within(&[0, 1], &[0, 1, 2, 3]), Ok(()));
        let e = within(&[2], &[0, 1, 4, 5, 6]).unwrap_err();
        assert!(
            e.contains("CPU 2 is not one") && e.contains("(it may use 0-1,4-6)"),
            "{e}"
        );
        assert!(within(&[], &[0]).is_err());
        assert_eq!(list(&[3]), "3");
        assert_eq!(list(&[0, 2, 3, 4, 7, 8]), "0,2-4,7-8");
        // This machine's own: the thread may run on at least one CPU, and on those it names.
        let mine = allowed().unwrap();
        assert!(!mine.is_empty());
        assert_eq!(within(&mine, &mine), Ok(()));
    }
}
