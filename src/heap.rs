//! The process heap, given back, and its arenas few.
//!
//! A sync's or a transfer's buffers (chunks read and in flight, QUIC's buffers, the re-chunk
//! workers' reads, the copy-before-write window's saved blocks) are freed when it ends, but
//! glibc keeps them in the arena of each thread that touched them: without giving them back, a
//! daemon keeps the peak of its busiest moment resident for good, though its live heap is the
//! chunk index (`scripts/bench-primaries`, `scripts/soak`).
//!
//! Giving back after every sync point cost more than it saved under load: with a sync point
//! each second (or back to back), each one faulted its buffers in afresh, the kernel zeroing
//! every page again, and the guest's writes paid for it where they saved blocks for the window
//! (docs/BENCHMARKS.md, "The heap given back once in a while"). So recurring work asks with
//! [`give_back_soon`]: the heap is given back at once if it was not for [`EVERY`], else once
//! [`EVERY`] has passed since the last time, on a thread of its own.

use std::sync::{LazyLock, Once};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The most malloc arenas a ferry process keeps. glibc's default, eight per CPU, let each of
/// the threads a sync's buffers pass through (FUSE workers saving blocks for the window, the
/// chunkers, the network's) grow an arena of its own to its own high-water mark: under
/// bench-rpo's steady load the mount's memory climbed for minutes (peak 193 MiB in the first
/// third of the load, 232 in the last) where with two arenas it held at 130-160 MiB
/// (docs/BENCHMARKS.md, "The pieces cache's leftovers, and the arenas"). Small allocations stay
/// off the arenas' locks in glibc's per-thread cache.
pub const MOST_ARENAS: usize = 4;

/// The arenas for a process that may run on `cpus` CPUs (pure): one per CPU, at most
/// [`MOST_ARENAS`].
pub fn arenas(cpus: usize) -> usize {
    cpus.clamp(1, MOST_ARENAS)
}

/// True when the environment already chose the arenas (`MALLOC_ARENA_MAX`, or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`): the operator's choice stands (pure).
pub fn arenas_chosen(malloc_arena_max: Option<&std::ffi::OsStr>, tunables: Option<&str>) -> bool {
    malloc_arena_max.is_some() || tunables.is_some_and(|t| t.contains("glibc.malloc.arena_max"))
}

/// Limits this process's malloc arenas to [`arenas`] for its CPUs, unless the environment chose.
/// Called first thing in `main`, before any thread is started.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").ok();
        if arenas_chosen(
            std::env::var_os("MALLOC_ARENA_MAX").as_deref(),
            tunables.as_deref(),
        ) {
            return;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt only sets a glibc malloc parameter; no thread has started yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas(cpus) as libc::c_int);
        }
    }
}

/// The least time between two give-backs asked for by recurring work.
pub const EVERY: Duration = Duration::from_secs(10);

/// Returns the heap's free pages to the system now.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When to give back (pure): fed each request, says whether to give back now, and when one
/// put off is due.
#[derive(Debug, Default)]
pub struct Pace {
    last: Option<Instant>,
    owed: bool,
}

impl Pace {
    /// A give-back asked for at `now`: whether to do it now (else it is owed, see [`Pace::due`]).
    pub fn ask(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_none_or(|l| now.saturating_duration_since(l) >= EVERY)
        {
            self.done(now);
            true
        } else {
            self.owed = true;
            false
        }
    }

    /// When the give-back put off is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        self.owed
            .then(|| self.last.map_or(Instant::now(), |l| l + EVERY))
    }

    /// The heap was given back at `now`.
    pub fn done(&mut self, now: Instant) {
        self.last = Some(now);
        self.owed = false;
    }
}

static PACE: LazyLock<(Mutex<Pace>, Condvar)> = LazyLock::new(Default::default);

/// Gives the heap back after recurring work: now, or [`EVERY`] after the last time.
pub fn give_back_soon() {
    let (pace, cv) = &*PACE;
    if pace.lock().ask(Instant::now()) {
        give_back();
        return;
    }
    static TRIMMER: Once = Once::new();
    TRIMMER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("heap-give-back".into())
            .spawn(trimmer);
        if let Err(e) = spawned {
            log::warn!("cannot start the heap's give-back thread ({e}): the heap is given back only every {} s of sync points", EVERY.as_secs());
        }
    });
    cv.notify_one();
}

fn trimmer() {
    let (pace, cv) = &*PACE;
    let mut p = pace.lock();
    loop {
        match p.due() {
            None => cv.wait(&mut p),
            Some(t) if Instant::now() < t => {
                cv.wait_until(&mut p, t);
            }
            Some(_) => {
                p.done(Instant::now());
                drop(p);
                give_back();
                p = pace.lock();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_keeps_an_arena_per_cpu_up_to_the_most_unless_the_environment_chose() {
        assert_eq!(arenas(1), 1);
        assert_eq!(arenas(2), 2);
        assert_eq!(arenas(64), MOST_ARENAS);
        let some = Some(std::ffi::OsStr::new("8"));
        assert!(arenas_chosen(some, None));
        assert!(arenas_chosen(
            None,
            Some("glibc.malloc.arena_max=8:glibc.malloc.tcache_count=0")
        ));
        assert!(!arenas_chosen(None, Some("glibc.malloc.tcache_count=0")));
        assert!(!arenas_chosen(None, None));
    }

    #[test]
    fn recurring_work_gives_back_once_in_a_while_and_never_leaves_it_owed() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Pace::default();
        assert!(p.ask(t0), "the first time, at once");
        assert_eq!(p.due(), None);
        // Sync points each second: put off, and due EVERY after the last.
        for s in 1..EVERY.as_secs() {
            assert!(!p.ask(at(s)), "{s} s");
            assert_eq!(p.due(), Some(t0 + EVERY));
        }
        assert!(p.ask(t0 + EVERY), "EVERY after, at once again");
        assert_eq!(p.due(), None, "nothing owed after giving back");
        // A burst that stops: the owed one comes due, and once done nothing is owed.
        assert!(!p.ask(t0 + EVERY + Duration::from_millis(10)));
        let due = p.due().unwrap();
        assert_eq!(due, t0 + EVERY * 2);
        p.done(due);
        assert_eq!(p.due(), None);
        assert!(!p.ask(due + Duration::from_secs(1)));
    }
}
