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
//! unit-tested against the WAN relay's own path model ([`crate::wan::Link`]) below.

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
    /// Delivery rate samples (bytes/s) of the last rounds, newest last.
    rates: VecDeque<f64>,
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
            round_excess: 0,
            batch_acked: 0,
        }
    }

    /// The bottleneck rate estimate in bytes per second (0 before the first round ends).
    pub fn rate(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
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
            .excess
            .iter()
            .copied()
            .chain([self.round_excess])
            .max()
            .unwrap_or(0)
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
        }
        if self.excess.len() == ROUNDS {
            self.excess.pop_front();
        }
        self.excess
            .push_back(std::mem::take(&mut self.round_excess));
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
    use crate::wan::{Fate, Impairment, Link};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    /// One bulk transfer through the relay's path model, with a sender that sends as quinn
    /// does (window, then a pacer at 1.25 x window / smoothed RTT), a receiver that acks every
    /// second packet, and loss detected by packet threshold (3).
    struct Sim {
        fwd: Link,
        back: Duration,
        model: Model,
        t0: Instant,
        len: u64,
        /// Per packet: send time (ns) and whether it is still in flight.
        sent: Vec<(u64, bool)>,
        in_flight: u64,
        largest_acked: Option<usize>,
        lowest_unacked: usize,
        srtt: Option<Duration>,
        tokens: f64,
        last_refill: u64,
        events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
        seq: u64,
        unacked_at_receiver: Vec<usize>,
        /// If set, the receiver acks what arrived once per this interval (a busy host), not
        /// every second packet.
        ack_batch: Option<Duration>,
        flush_due: bool,
        /// Counters from `measure_from` on.
        measure_from: u64,
        offered: u64,
        delivered: u64,
        queue_drops: u64,
        /// Bottleneck queue delay seen by each measured packet sent (ns), summed.
        queued_ns: u128,
    }

    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        Arrive(usize),
        Ack(Vec<usize>),
        Flush,
        Wake,
    }

    impl Sim {
        fn new(fwd: Impairment, seed: u64) -> Sim {
            let back = fwd.delay;
            Sim {
                fwd: Link::new(fwd, seed),
                back,
                model: Model::new(1200),
                t0: Instant::now(),
                len: 1200,
                sent: Vec::new(),
                in_flight: 0,
                largest_acked: None,
                lowest_unacked: 0,
                srtt: None,
                tokens: 0.0,
                last_refill: 0,
                events: BinaryHeap::new(),
                seq: 0,
                unacked_at_receiver: Vec::new(),
                ack_batch: None,
                flush_due: false,
                measure_from: 0,
                offered: 0,
                delivered: 0,
                queue_drops: 0,
                queued_ns: 0,
            }
        }

        fn at(&self, ns: u64) -> Instant {
            self.t0 + Duration::from_nanos(ns)
        }

        fn push(&mut self, at: u64, ev: Ev) {
            self.seq += 1;
            self.events.push(Reverse((at, self.seq, ev)));
        }

        /// Sends what window and pacer allow at `now`; schedules a wake if the pacer holds.
        fn send(&mut self, now: u64) {
            let window = self.model.window();
            let srtt = self
                .srtt
                .unwrap_or(Duration::from_millis(333))
                .as_secs_f64();
            let rate = 1.25 * window as f64 / srtt;
            let capacity = (window as f64 * 0.002 / srtt)
                .clamp(10.0 * self.len as f64, 256.0 * self.len as f64);
            self.tokens =
                (self.tokens + rate * (now - self.last_refill) as f64 / 1e9).min(capacity);
            self.last_refill = now;
            while self.in_flight + self.len <= window {
                if self.tokens < self.len as f64 {
                    let wait = (self.len as f64 - self.tokens) / rate * 1e9;
                    self.push(now + wait.ceil() as u64 + 1, Ev::Wake);
                    return;
                }
                self.tokens -= self.len as f64;
                let pn = self.sent.len();
                self.sent.push((now, true));
                self.in_flight += self.len;
                if now >= self.measure_from {
                    self.offered += 1;
                    let backlog = self.fwd.backlog(Duration::from_nanos(now)) as u128;
                    let rate = self.fwd.impairment().rate.unwrap_or(u64::MAX) as u128;
                    self.queued_ns += backlog * 8_000_000_000 / rate;
                }
                match self.fwd.admit(Duration::from_nanos(now), self.len as usize) {
                    Fate::Deliver { at, .. } => self.push(at.as_nanos() as u64, Ev::Arrive(pn)),
                    Fate::QueueFull => {
                        if now >= self.measure_from {
                            self.queue_drops += 1;
                        }
                    }
                    Fate::Lost => {}
                }
            }
        }

        fn ack(&mut self, now: u64, pns: Vec<usize>) {
            let t = self.at(now);
            let mut newest = None;
            for pn in pns {
                let (sent, live) = self.sent[pn];
                if !live {
                    continue;
                }
                self.sent[pn].1 = false;
                self.in_flight -= self.len;
                if self.largest_acked.is_none_or(|l| pn > l) {
                    self.largest_acked = Some(pn);
                    newest = Some(sent);
                }
                let srtt = self.srtt.unwrap_or(Duration::from_millis(333));
                self.model.on_ack(t, self.at(sent), self.len, srtt);
            }
            if let Some(sent) = newest {
                let sample = Duration::from_nanos(now - sent);
                self.srtt = Some(match self.srtt {
                    None => sample,
                    Some(s) => (s * 7 + sample) / 8,
                });
            }
            // Packet threshold: three later packets acked.
            if let Some(largest) = self.largest_acked {
                while self.lowest_unacked + 3 <= largest {
                    let pn = self.lowest_unacked;
                    if self.sent[pn].1 {
                        self.sent[pn].1 = false;
                        self.in_flight -= self.len;
                        self.model.on_congestion_event(false);
                    }
                    self.lowest_unacked += 1;
                }
            }
            self.model.on_end_acks(t, false);
        }

        /// Runs until `end` seconds of virtual time, counting from `measure_from` seconds on.
        fn run(&mut self, end: f64, measure_from: f64) {
            self.measure_from = (measure_from * 1e9) as u64;
            self.offered = 0;
            self.delivered = 0;
            self.queue_drops = 0;
            self.queued_ns = 0;
            let end = (end * 1e9) as u64;
            if self.events.is_empty() {
                self.send(0);
            }
            while let Some(Reverse((now, _, _))) = self.events.peek() {
                let now = *now;
                if now > end {
                    break;
                }
                let Some(Reverse((_, _, ev))) = self.events.pop() else {
                    unreachable!()
                };
                match ev {
                    Ev::Arrive(pn) => {
                        if now >= self.measure_from {
                            self.delivered += 1;
                        }
                        self.unacked_at_receiver.push(pn);
                        match self.ack_batch {
                            Some(batch) if !self.flush_due => {
                                self.flush_due = true;
                                self.push(now + batch.as_nanos() as u64, Ev::Flush);
                            }
                            Some(_) => {}
                            None if self.unacked_at_receiver.len() >= 2 => {
                                let pns = std::mem::take(&mut self.unacked_at_receiver);
                                self.push(now + self.back.as_nanos() as u64, Ev::Ack(pns));
                            }
                            None => {}
                        }
                    }
                    Ev::Flush => {
                        self.flush_due = false;
                        let pns = std::mem::take(&mut self.unacked_at_receiver);
                        self.push(now + self.back.as_nanos() as u64, Ev::Ack(pns));
                    }
                    Ev::Ack(pns) => self.ack(now, pns),
                    Ev::Wake => {}
                }
                self.send(now);
                if self.events.is_empty() {
                    // Everything in flight was lost: a PTO later, start over.
                    for p in self.sent.iter_mut() {
                        p.1 = false;
                    }
                    self.in_flight = 0;
                    self.model.on_congestion_event(true);
                    self.push(now + 200_000_000, Ev::Wake);
                }
            }
        }

        /// Delivered IP bytes over the measured time, as a share of the link's rate.
        fn utilisation(&self, secs: f64, warmup: f64) -> f64 {
            let rate = self.fwd.impairment().rate.unwrap() as f64;
            self.delivered as f64 * (self.len + 28) as f64 * 8.0 / (secs - warmup) / rate
        }

        fn offered_per_delivered(&self) -> f64 {
            self.offered as f64 / self.delivered as f64
        }

        /// The mean time a packet waited in the bottleneck queue.
        fn mean_queue_delay(&self) -> Duration {
            Duration::from_nanos((self.queued_ns / u128::from(self.offered.max(1))) as u64)
        }
    }

    fn wan(loss: f64) -> Impairment {
        Impairment {
            delay: Duration::from_millis(25),
            loss,
            rate: Some(100_000_000),
            ..Impairment::default()
        }
    }

    fn report(name: &str, sim: &Sim, secs: f64, warmup: f64) -> (f64, f64) {
        let (u, o) = (sim.utilisation(secs, warmup), sim.offered_per_delivered());
        eprintln!(
            "{name}: utilisation {u:.3}, offered/delivered {o:.3}, queue drops {}, \
             mean queue delay {:?}, rate {:.1} Mbit/s, min rtt {:?}",
            sim.queue_drops,
            sim.mean_queue_delay(),
            sim.model.rate() * 8e-6,
            sim.model.min_rtt()
        );
        (u, o)
    }

    #[test]
    fn fills_a_lossy_long_path_without_flooding_its_queue() {
        for (name, loss) in [("clean", 0.0), ("0.5% loss", 0.005)] {
            for seed in 1..=3 {
                let mut sim = Sim::new(wan(loss), seed);
                sim.run(20.0, 5.0);
                let (u, o) = report(name, &sim, 20.0, 5.0);
                assert!(u >= 0.85, "{name}, seed {seed}: utilisation {u:.3}");
                assert!(o <= 1.05, "{name}, seed {seed}: offered/delivered {o:.3}");
                assert_eq!(sim.queue_drops, 0, "{name}, seed {seed}");
                // A good citizen keeps the queue it builds short: others' packets wait in it.
                let q = sim.mean_queue_delay();
                assert!(
                    q <= Duration::from_millis(10),
                    "{name}, seed {seed}: queue {q:?}"
                );
            }
        }
    }

    #[test]
    fn the_whole_transfer_startup_included_offers_little_more_than_the_path_carries() {
        let mut sim = Sim::new(wan(0.005), 7);
        sim.run(12.0, 0.0);
        let (u, o) = report("from the start", &sim, 12.0, 0.0);
        assert!(u >= 0.8, "utilisation {u:.3}");
        assert!(o <= 1.15, "offered/delivered {o:.3}");
    }

    #[test]
    fn follows_the_path_down_when_its_rate_falls() {
        let mut sim = Sim::new(wan(0.005), 3);
        sim.run(10.0, 10.0);
        // The path's rate drops to a fifth (another user took the link, a backup route);
        // the link's clock goes on from 10 s.
        let mut imp = wan(0.005);
        imp.rate = Some(20_000_000);
        sim.fwd = Link::new(imp, 4);
        sim.run(25.0, 13.0);
        let (u, o) = report("rate falls to 20 Mbit/s", &sim, 25.0, 13.0);
        assert!(u >= 0.85, "utilisation {u:.3}");
        assert!(o <= 1.05, "offered/delivered {o:.3}");
    }

    #[test]
    fn acks_that_come_in_bursts_do_not_starve_a_fast_short_path() {
        // 1 Gbit/s and 100 us RTT, but the receiver acks once per 2 ms (a host busy with other
        // work): the product by the minimum RTT is 12 KB, the link needs 250 KB in flight.
        // The queue of a host's interface (1,000 packets).
        let fast = Impairment {
            delay: Duration::from_micros(50),
            rate: Some(1_000_000_000),
            queue: Some(1_500_000),
            ..Impairment::default()
        };
        let mut sim = Sim::new(fast, 5);
        sim.ack_batch = Some(Duration::from_millis(2));
        sim.run(3.0, 1.0);
        let (u, o) = report("1 Gbit/s, acks every 2 ms", &sim, 3.0, 1.0);
        assert!(u >= 0.8, "utilisation {u:.3}");
        assert!(o <= 1.05, "offered/delivered {o:.3}");
    }

    #[test]
    fn persistent_congestion_starts_over_from_the_initial_window() {
        let mut m = Model::new(1200);
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        for round in 0..20u64 {
            for i in 0..100u64 {
                let now = ms(round * 50 + i / 2);
                m.on_ack(
                    now,
                    now - Duration::from_millis(50),
                    1200,
                    Duration::from_millis(50),
                );
                m.on_end_acks(now, false);
            }
        }
        assert!(m.window() > INITIAL_WINDOW);
        m.on_congestion_event(false);
        assert!(m.window() > INITIAL_WINDOW, "a loss alone changes nothing");
        m.on_congestion_event(true);
        assert_eq!(m.window(), INITIAL_WINDOW);
        assert!(m.in_startup());
    }
}
