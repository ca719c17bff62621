//! Token buckets for `bandwidth_limit`: one per peer and one for all peers together. A data
//! frame waits until both buckets hold its payload; the burst is small (50 ms of the rate), so
//! over any second the rate is held within a few percent.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A token bucket of `rate` bytes per second.
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = (rate * 0.05).max(256.0 * 1024.0);
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens; returns how long to wait before sending them (the
    /// tokens are taken now, so waiters queue up fairly).
    pub fn take(&self, n: u64, now: Instant) -> Duration {
        let mut st = self.state.lock();
        let (tokens, last) = *st;
        let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
        let tokens = (tokens + refill).min(self.burst) - n as f64;
        *st = (tokens, now);
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.rate)
        }
    }
}

/// Waits for `n` bytes in every bucket given.
pub async fn pace(buckets: &[&Bucket], n: u64) {
    let now = Instant::now();
    let wait = buckets
        .iter()
        .map(|b| b.take(n, now))
        .max()
        .unwrap_or_default();
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_run_rate_is_the_configured_one() {
        // 100 MB in 1 MB frames through a 10 MB/s bucket take 10 s less the initial burst.
        let b = Bucket::new(10_000_000);
        let start = Instant::now();
        let mut now = start;
        for _ in 0..100 {
            now += b.take(1_000_000, now);
        }
        let elapsed = now.duration_since(start).as_secs_f64();
        let expected = (100e6 - b.burst) / 10e6;
        assert!(
            (elapsed - expected).abs() < 0.01 * expected,
            "{elapsed} vs {expected}"
        );
    }

    #[test]
    fn two_buckets_pace_to_the_slower() {
        let fast = Bucket::new(100_000_000);
        let slow = Bucket::new(1_000_000);
        let now = Instant::now();
        let w = [&fast, &slow]
            .iter()
            .map(|b| b.take(2_000_000, now))
            .max()
            .unwrap();
        assert!(w >= Duration::from_millis(1700), "{w:?}");
    }
}
