//! The process heap, given back.
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
