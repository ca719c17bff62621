//! ferry's congestion controller (`net/bdp.rs`) against the WAN relay's own path model
//! (`wan::Link`): a bulk transfer in virtual time, with a sender that sends as quinn does.
//! What users depend on: the controller fills the path and offers no more than it carries.

use ferry::net::bdp::{INITIAL_WINDOW, Model};
use ferry::wan::{Fate, Impairment, Link};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

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
        let capacity =
            (window as f64 * 0.002 / srtt).clamp(10.0 * self.len as f64, 256.0 * self.len as f64);
        self.tokens = (self.tokens + rate * (now - self.last_refill) as f64 / 1e9).min(capacity);
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

/// Runs `sim` to `secs`, measuring from `warmup`; prints and returns utilisation and offered per
/// delivered.
fn measure(name: &str, sim: &mut Sim, secs: f64, warmup: f64) -> (f64, f64) {
    sim.run(secs, warmup);
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
            let (u, o) = measure(name, &mut sim, 20.0, 5.0);
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
    let (u, o) = measure("from the start", &mut sim, 12.0, 0.0);
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
    let (u, o) = measure("rate falls to 20 Mbit/s", &mut sim, 25.0, 13.0);
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
    let (u, o) = measure("1 Gbit/s, acks every 2 ms", &mut sim, 3.0, 1.0);
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
