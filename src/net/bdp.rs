//! `bdp`, ferry's congestion controller: its window is the path's measured bandwidth-delay
//! product, so what it sends is what the bottleneck carries.
//!
//! Why not quinn's BBR: quinn paces at 1.25 x window / smoothed RTT, so a controller sets its
//! rate only through its window, and quinn's BBR keeps a window that let it offer 2.1-2.3x what
//! a 100 Mbit/s, 50 ms path delivered (the bottleneck queue dropped the rest; docs/BENCHMARKS.md,
//! "WAN goodput"). Here the window is the rate estimate times the minimum RTT, with a gain that
//! probes and drains in turn, so the window, and with it quinn's pacer, follow the estimate:
//!
//! * **Bandwidth**: once per round (a smoothed RTT, at least [`MIN_ROUND`]), the bytes acked
//!   in it over its length; the estimate is the largest of the last [`ROUNDS`] samples. A round
//!   the sender spent short of data (quinn's `app_limited`) counts only if it raises the
//!   estimate.
//! * **Minimum RTT**: of the samples (ack time minus send time) of the last 5 to 10 s.
//! * **Startup**: gain 2, so the estimate doubles each round until it stops growing by a
//!   quarter for three rounds; the queue it leaves is at most one bandwidth-delay product.
//! * **Cruise**: the gain cycles per round through [`GAINS`]: one round at 1.25 finds bandwidth
//!   freed by others, one at 0.75 drains what that queued (so RTT samples near the path's
//!   own come in every eight rounds and the minimum stays true), six at 1.
//! * **Ack aggregation**: where acks come in bursts (a busy host, a receiver that acks late),
//!   more is acked at once than the rate explains; the largest such excess of the last
//!   [`ROUNDS`] rounds is added to the window, as BBR does, or the window would starve the
//!   link on fast, CPU-bound paths.
//! * **Loss** is not congestion (random loss on a long path would stop a loss-based controller:
//!   CUBIC keeps 4% of the 100 Mbit/s, 0.5% loss path busy). The rate estimate only counts
//!   what arrived, so a path that drops more delivers less and the window follows it down.
//!   Persistent congestion (every packet of a PTO period lost) starts over from the initial
//!   window.
//!
//! [`Model`] is the controller, sans I/O: it is driven by the same calls quinn makes and is
//! tested against the WAN relay's own path model in tests/congestion.rs.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Rounds the bandwidth estimate and the ack-aggregation excess remember.
pub const ROUNDS: usize = 10;
/// Gains of the eight cruise rounds: probe, drain, then hold.
pub const GAINS: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// The startup gain.
const STARTUP_GAIN: f64 = 2.0;
/// The shortest round, so fast paths take their rate samples over more than one ack burst.
pub const MIN_ROUND: Duration = Duration::from_millis(1);
/// Half the minimum RTT's window.
const MIN_RTT_HALF: Duration = Duration::from_secs(5);
/// The window before any estimate (RFC 9002's recommended initial window).
pub const INITIAL_WINDOW: u64 = 14_720;
/// The smallest window, in datagrams.
const MIN_WINDOW_PACKETS: u64 = 4;
/// Datagrams of window on top of the product: acks of every second packet, one in the pacer.
const HEADROOM_PACKETS: u64 = 3;
/// The ack-aggregation allowance is at most this much of the rate.
const MAX_AGGREGATION: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Startup,
    /// Index into [`GAINS`].
    Cruise(usize),
}

/// The controller's state; see the module documentation.
#[derive(Debug, Clone)]
pub struct Model {
    mtu: u64,
    mode: Mode,
    /// Delivery rate samples (bytes/s) of the last rounds, newest last, and their maximum.
    rates: VecDeque<f64>,
    rate_max: f64,
    /// The round in progress: its start and the bytes acked since.
    round_start: Option<Instant>,
    round_acked: u64,
    round_app_limited: bool,
    /// Startup's plateau detection.
    full_rate: f64,
    flat_rounds: u32,
    /// Minimum RTT, in two halves of its window.
    min_rtt_now: Option<Duration>,
    min_rtt_before: Option<Duration>,
    min_rtt_since: Option<Instant>,
    srtt: Duration,
    /// Ack aggregation: the current epoch's start and bytes, and the excess per round.
    epoch_start: Option<Instant>,
    epoch_acked: u64,
    excess: VecDeque<u64>,
    /// The largest of `excess` (quinn asks for the window a few times per packet sent, so the
    /// maxima change once a round, not per call).
    excess_max: u64,
    round_excess: u64,
    /// Bytes acked in the current batch of acks.
    batch_acked: u64,
}

impl Model {
    pub fn new(mtu: u16) -> Model {
        Model {
            mtu: u64::from(mtu),
            mode: Mode::Startup,
            rates: VecDeque::with_capacity(ROUNDS),
            rate_max: 0.0,
            round_start: None,
            round_acked: 0,
            round_app_limited: false,
            full_rate: 0.0,
            flat_rounds: 0,
            min_rtt_now: None,
            min_rtt_before: None,
            min_rtt_since: None,
            srtt: Duration::ZERO,
            epoch_start: None,
            epoch_acked: 0,
            excess: VecDeque::with_capacity(ROUNDS),
            excess_max: 0,
            round_excess: 0,
            batch_acked: 0,
        }
    }

    /// The bottleneck rate estimate in bytes per second (0 before the first round ends).
    pub fn rate(&self) -> f64 {
        self.rate_max
    }

    /// The minimum RTT of the last 5 to 10 s.
    pub fn min_rtt(&self) -> Option<Duration> {
        match (self.min_rtt_now, self.min_rtt_before) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn gain(&self) -> f64 {
        match self.mode {
            Mode::Startup => STARTUP_GAIN,
            Mode::Cruise(i) => GAINS[i],
        }
    }

    pub fn in_startup(&self) -> bool {
        self.mode == Mode::Startup
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        let floor = MIN_WINDOW_PACKETS * self.mtu;
        let (rate, Some(min_rtt)) = (self.rate(), self.min_rtt()) else {
            return INITIAL_WINDOW.max(floor);
        };
        if rate == 0.0 {
            return INITIAL_WINDOW.max(floor);
        }
        let bdp = rate * min_rtt.as_secs_f64();
        let aggregation = self
            .excess_max
            .max(self.round_excess)
            .min((rate * MAX_AGGREGATION.as_secs_f64()) as u64);
        let w = (self.gain() * bdp) as u64 + aggregation + HEADROOM_PACKETS * self.mtu;
        match self.mode {
            Mode::Startup => w.max(INITIAL_WINDOW),
            Mode::Cruise(_) => w,
        }
        .max(floor)
    }

    /// One acked packet of `bytes`, sent at `sent`; `srtt` is the connection's smoothed RTT.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, srtt: Duration) {
        self.srtt = srtt;
        self.round_acked += bytes;
        self.batch_acked += bytes;
        self.sample_rtt(now, now.saturating_duration_since(sent));
    }

    /// The end of one batch of acks (all with the same `now`).
    pub fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        let acked = std::mem::take(&mut self.batch_acked);
        self.round_app_limited |= app_limited;
        self.aggregate(now, acked);
        let Some(start) = self.round_start else {
            self.start_round(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < self.srtt.max(MIN_ROUND) {
            return;
        }
        let sample = self.round_acked as f64 / elapsed.as_secs_f64();
        if !self.round_app_limited || sample > self.rate() {
            if self.rates.len() == ROUNDS {
                self.rates.pop_front();
            }
            self.rates.push_back(sample);
            self.rate_max = self.rates.iter().copied().fold(0.0, f64::max);
        }
        if self.excess.len() == ROUNDS {
            self.excess.pop_front();
        }
        self.excess
            .push_back(std::mem::take(&mut self.round_excess));
        self.excess_max = self.excess.iter().copied().max().unwrap_or(0);
        self.end_round();
        self.start_round(now);
    }

    /// Packets were lost: only persistent congestion counts (see the module documentation).
    pub fn on_congestion_event(&mut self, persistent: bool) {
        if persistent {
            let mtu = self.mtu as u16;
            *self = Model::new(mtu);
        }
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    fn start_round(&mut self, now: Instant) {
        self.round_start = Some(now);
        self.round_acked = 0;
        self.round_app_limited = false;
    }

    fn end_round(&mut self) {
        match self.mode {
            Mode::Startup => {
                let rate = self.rate();
                if rate >= 1.25 * self.full_rate {
                    self.full_rate = rate;
                    self.flat_rounds = 0;
                } else {
                    self.flat_rounds += 1;
                    if self.flat_rounds >= 3 {
                        // Drain first: startup left up to one product queued.
                        self.mode = Mode::Cruise(1);
                    }
                }
            }
            Mode::Cruise(i) => self.mode = Mode::Cruise((i + 1) % GAINS.len()),
        }
    }

    fn sample_rtt(&mut self, now: Instant, rtt: Duration) {
        let since = *self.min_rtt_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= MIN_RTT_HALF {
            self.min_rtt_before = self.min_rtt_now.take();
            self.min_rtt_since = Some(now);
        }
        self.min_rtt_now = Some(self.min_rtt_now.map_or(rtt, |m| m.min(rtt)));
    }

    /// BBR's ack-aggregation measure: bytes acked since the epoch began beyond what the rate
    /// explains; a new epoch begins whenever the acks fall behind the rate.
    fn aggregate(&mut self, now: Instant, acked: u64) {
        let rate = self.rate();
        let expected = match self.epoch_start {
            Some(start) => (rate * now.saturating_duration_since(start).as_secs_f64()) as u64,
            None => 0,
        };
        let (expected, so_far) = if self.epoch_start.is_none() || self.epoch_acked <= expected {
            // The acks caught up with the rate: a new epoch, whose first batch is all excess.
            self.epoch_start = Some(now);
            (0, 0)
        } else {
            (expected, self.epoch_acked)
        };
        self.epoch_acked = so_far + acked;
        let excess = self.epoch_acked.saturating_sub(expected);
        self.round_excess = self.round_excess.max(excess);
    }
}

/// The quinn controller: [`Model`] plus what quinn asks of a controller.
#[derive(Debug, Clone)]
pub struct Bdp {
    model: Model,
}

impl Controller for Bdp {
    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.model.on_ack(now, sent, bytes, rtt.get());
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.model.on_end_acks(now, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.model.on_congestion_event(is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.model.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.model.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window();
        m.pacing_rate = Some((self.model.rate() * self.model.gain() * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        INITIAL_WINDOW
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Builds a [`Bdp`] per connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct BdpConfig;

impl ControllerFactory for BdpConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Bdp {
            model: Model::new(current_mtu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maxima the window reads are those of the rounds remembered, as the rounds roll.
    #[test]
    fn the_remembered_maxima_follow_the_rounds() {
        let mut m = Model::new(1200);
        let t0 = Instant::now();
        let srtt = Duration::from_millis(2);
        for step in 0..400u64 {
            let now = t0 + Duration::from_micros(500 * step);
            // Bursts of varying size, so rates and excesses rise and fall.
            let bytes = 1200 * (1 + (step * 7919) % 23);
            m.on_ack(now, now - srtt, bytes, srtt);
            m.on_end_acks(now, step % 17 == 0);
            let rate = m.rates.iter().copied().fold(0.0, f64::max);
            assert_eq!(m.rate(), rate, "step {step}");
            assert_eq!(m.excess_max, m.excess.iter().copied().max().unwrap_or(0));
        }
        assert_eq!(m.rates.len(), ROUNDS, "the rounds rolled over");
        assert!(m.rate() > 0.0 && m.window() > INITIAL_WINDOW);
    }
}
