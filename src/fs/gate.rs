//! The write gate of a primary mount: open, every change goes through; closed (the mount
//! fenced itself because it may no longer be the primary, see `failover`), a change waits for
//! it to open again, and past a grace fails with EIO. Reads never wait.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Open, or closed with the reason a held write is told.
#[derive(Debug, Default)]
pub struct Gate {
    closed: Mutex<Option<Closed>>,
    opened: Condvar,
}

#[derive(Clone, Debug)]
struct Closed {
    why: String,
    grace: Duration,
}

impl Gate {
    /// Holds every change from now on, each for up to `grace`, with `why` for the log and EIO.
    pub fn close(&self, why: String, grace: Duration) {
        let mut c = self.closed.lock();
        if c.is_none() {
            log::error!("guest writes are held from now on: {why}");
        }
        *c = Some(Closed { why, grace });
    }

    /// Lets changes through again, the held ones first.
    pub fn open(&self) {
        if self.closed.lock().take().is_some() {
            log::warn!("guest writes go through again");
        }
        self.opened.notify_all();
    }

    /// Why changes are held, when they are.
    pub fn closed(&self) -> Option<String> {
        self.closed.lock().as_ref().map(|c| c.why.clone())
    }

    /// Waits while the gate is closed, up to its grace; `Err(why)` when the grace ran out.
    pub fn pass(&self) -> Result<(), String> {
        let mut c = self.closed.lock();
        let Some(first) = c.clone() else {
            return Ok(());
        };
        let until = Instant::now() + first.grace;
        while let Some(now) = c.clone() {
            if self.opened.wait_until(&mut c, until).timed_out() && c.is_some() {
                return Err(now.why);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_held_change_goes_on_when_the_gate_opens_and_fails_past_the_grace() {
        let g = Arc::new(Gate::default());
        assert_eq!(g.pass(), Ok(()));
        g.close("lost etcd".into(), Duration::from_secs(30));
        let held = {
            let g = g.clone();
            std::thread::spawn(move || g.pass())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!held.is_finished(), "a change went through a closed gate");
        g.open();
        assert_eq!(held.join().unwrap(), Ok(()));

        g.close("lost etcd".into(), Duration::from_millis(50));
        let t = Instant::now();
        assert_eq!(g.pass(), Err("lost etcd".to_string()));
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(g.closed().as_deref(), Some("lost etcd"));
    }
}
