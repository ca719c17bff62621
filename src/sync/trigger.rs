//! When sync points happen: on request (`ferry sync`, with or without waiting), every
//! `sync_interval` (the RPO), and after an fsync through the mount when `sync_on_fsync` is set.
//!
//! One worker thread runs syncs one at a time. Requests that arrive while a sync runs are
//! merged into the single next one, so a burst of fsyncs or a sync slower than the interval
//! never piles up; a waiting request is answered by the first sync that *started* after it
//! (one that started before may have frozen before the caller's writes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde_json::Value;

use super::Engine;

#[derive(Default)]
struct State {
    /// A sync point was asked for and has not started yet.
    pending: bool,
    /// The shortest timeout a waiting caller gave for it.
    pending_timeout: Option<Duration>,
    /// Number of the last sync started, and of the last finished.
    started: u64,
    finished: u64,
    /// Outcome of the last finished sync (the report as JSON, or the error).
    last: Option<Result<Value, String>>,
    stopping: bool,
}

/// Schedules the sync points of one mount.
pub struct Scheduler {
    state: Mutex<State>,
    cv: Condvar,
    interval: Option<Duration>,
}

impl Scheduler {
    /// Starts the worker thread for `engine`.
    pub fn start(
        engine: Arc<Engine>,
        interval: Option<Duration>,
        timeout: Duration,
    ) -> std::io::Result<Arc<Scheduler>> {
        let s = Arc::new(Scheduler {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            interval,
        });
        let me = s.clone();
        std::thread::Builder::new()
            .name("sync-points".into())
            .spawn(move || {
                crate::priority::background();
                me.work(&engine, interval, timeout)
            })?;
        Ok(s)
    }

    /// `sync_interval`: the RPO target, if sync points come by the clock.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    fn work(&self, engine: &Engine, interval: Option<Duration>, timeout: Duration) {
        let mut next_tick = interval.map(|i| Instant::now() + i);
        loop {
            let seq = {
                let mut st = self.state.lock();
                loop {
                    if st.stopping {
                        return;
                    }
                    if st.pending {
                        break;
                    }
                    match next_tick {
                        Some(t) if Instant::now() >= t => {
                            log::debug!("sync interval elapsed");
                            break;
                        }
                        Some(t) => {
                            self.cv.wait_until(&mut st, t);
                        }
                        None => self.cv.wait(&mut st),
                    }
                }
                st.pending = false;
                st.started += 1;
                (
                    st.started,
                    st.pending_timeout
                        .take()
                        .map_or(timeout, |t| t.min(timeout)),
                )
            };
            let (seq, this_timeout) = seq;
            // The interval counts from the start of a sync: a slow sync is followed by the next
            // one at once, never by a queue of them.
            next_tick = interval.map(|i| Instant::now() + i);
            let r = engine
                .sync(&[], this_timeout)
                .map_err(|e| format!("{e:#}"))
                .and_then(|rep| serde_json::to_value(rep).map_err(|e| e.to_string()));
            if let Err(e) = &r {
                log::warn!("sync {seq} failed: {e}");
            }
            let mut st = self.state.lock();
            st.finished = seq;
            st.last = Some(r);
            self.cv.notify_all();
        }
    }

    /// Asks for a sync point; returns a ticket to wait on.
    pub fn request(&self) -> u64 {
        self.request_within(None)
    }

    /// Asks for a sync point whose replicas must answer within `timeout` (a waiting caller's).
    pub fn request_within(&self, timeout: Option<Duration>) -> u64 {
        let mut st = self.state.lock();
        st.pending = true;
        if let Some(t) = timeout {
            st.pending_timeout = Some(st.pending_timeout.map_or(t, |p| p.min(t)));
        }

        self.cv.notify_all();
        st.started + 1
    }

    /// How long a caller that asked for a sync point with `timeout` waits for it: a sync point
    /// already in progress when it asked may hold it up for as long again (its own timeout,
    /// no longer than the caller's as `request_within` asks), plus 5 s to settle.
    pub fn wait_bound(timeout: Duration) -> Duration {
        timeout * 2 + Duration::from_secs(5)
    }

    /// Waits until a sync that started at or after `ticket` has finished; its outcome.
    pub fn wait(&self, ticket: u64, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while st.finished < ticket {
            if self.cv.wait_until(&mut st, deadline).timed_out() {
                return Err(format!(
                    "no sync point finished within {} s",
                    timeout.as_secs()
                ));
            }
        }
        st.last.clone().unwrap_or_else(|| Err("no sync ran".into()))
    }

    /// Stops the worker after the sync in progress, if any.
    pub fn stop(&self) {
        let mut st = self.state.lock();
        st.stopping = true;
        self.cv.notify_all();
    }
}
