//! `ferry-wan-relay`: a user-space UDP relay that emulates a WAN path, to test and benchmark
//! ferry's QUIC traffic where the kernel has no netem.
//!
//! A client sends to the relay's listen address; the relay forwards to the real server and
//! sends the server's replies back to the client that spoke last. Each direction has its own
//! impairment: loss (independent, and optionally Gilbert-Elliott bursts), a rate cap with a
//! bounded tail-drop queue, one-way delay with jitter, and reordering.
//!
//! Design:
//! * The impairment of one direction is a sans-I/O state machine, [`Link`]: given the arrival
//!   time and length of a packet (and its own seeded [`Rng`]), [`Link::admit`] answers when the
//!   packet leaves the relay, or that it is dropped. Everything the relay does to a packet is
//!   decided there, so it is unit-tested with no sockets and no clock.
//! * The relay ([`Relay`]) runs four OS threads: per direction a receiver (blocking `recv`,
//!   `Link::admit`, push into a `BinaryHeap` keyed by release time) and a sender (waits on a
//!   condition variable until the earliest release time, sends). The timed waits are futex
//!   waits on hrtimers (about 50 µs of slack), not tokio's timer: tokio rounds every deadline up
//!   to the next millisecond, which would add 0-1 ms to each packet's delay and break the 1 ms
//!   accuracy this tool is for. A blocking thread per direction also keeps the relay off the
//!   tokio runtimes (tokio stays inside `net/` and `sync/ship.rs`).
//! * Model of one direction, in this order: loss (a lost packet never reaches the queue), the
//!   bottleneck (a packet leaves it `(len + overhead) * 8 / rate` after the previous one, or
//!   after its arrival; it is tail-dropped if the bytes queued ahead of it plus its own exceed
//!   the queue limit), then propagation: `delay` plus a jitter sample. Jitter keeps packet
//!   order (a packet is never released before the one that arrived before it, as on a FIFO
//!   path), so at high packet rates delays bunch towards the top of the jitter range; the only
//!   reordering is what `reorder` asks for: that share of packets is held `reorder_gap` longer
//!   and overtaken.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

/// Bytes of IPv4 and UDP headers that each datagram costs on a real link: counted against the
/// rate cap and the queue, so `--rate 100mbit` is 100 Mbit/s of IP packets.
pub const DEFAULT_OVERHEAD: u32 = 28;

/// The smallest default queue: a few full-size packets, even on a slow or short path.
pub const MIN_QUEUE: u64 = 64 << 10;

/// How jitter samples are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JitterDist {
    /// Uniform in `[-jitter, +jitter]`.
    #[default]
    Uniform,
    /// Normal with standard deviation `jitter`, cut at ±3 `jitter`.
    Normal,
}

/// Gilbert-Elliott burst loss: a two-state chain (good, bad) stepped once per packet; every
/// packet in the bad state is lost, none in the good state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    /// Long-run share of packets lost to bursts, in `[0, 1)`.
    pub loss: f64,
    /// Mean burst length in packets, at least 1.
    pub mean_len: f64,
}

impl Burst {
    /// Probability of leaving the bad state at a packet.
    fn p_leave(&self) -> f64 {
        1.0 / self.mean_len
    }

    /// Probability of entering the bad state, so that the stationary bad share is `loss`.
    fn p_enter(&self) -> f64 {
        self.loss * self.p_leave() / (1.0 - self.loss)
    }
}

/// What one direction of the path does to packets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Impairment {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Jitter amplitude (uniform) or standard deviation (normal).
    pub jitter: Duration,
    pub jitter_dist: JitterDist,
    /// Probability that a packet is lost, independently of the others, in `[0, 1]`.
    pub loss: f64,
    pub burst: Option<Burst>,
    /// Probability that a packet is held back `reorder_gap` longer than the others.
    pub reorder: f64,
    pub reorder_gap: Duration,
    /// Bottleneck rate in bits per second; `None` for no cap.
    pub rate: Option<u64>,
    /// Queue limit in bytes (with `rate` only); `None` for the default, [`Impairment::queue_limit`].
    pub queue: Option<u64>,
    /// Bytes added to each datagram's length for the rate and the queue.
    pub overhead: u32,
}

impl Default for Impairment {
    fn default() -> Impairment {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            jitter_dist: JitterDist::Uniform,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            reorder_gap: Duration::from_millis(10),
            rate: None,
            queue: None,
            overhead: DEFAULT_OVERHEAD,
        }
    }
}

impl Impairment {
    /// The queue limit in bytes when there is a rate cap: the configured one, or 1.5 times the
    /// bandwidth-delay product `rate * 2 * delay` (at least [`MIN_QUEUE`]).
    pub fn queue_limit(&self) -> Option<u64> {
        let rate = self.rate?;
        Some(self.queue.unwrap_or_else(|| {
            let bdp = rate as f64 / 8.0 * (2 * self.delay).as_secs_f64();
            ((1.5 * bdp) as u64).max(MIN_QUEUE)
        }))
    }

    /// Checks the ranges; the error names the setting.
    pub fn check(&self) -> Result<()> {
        let unit = |p: f64| (0.0..=1.0).contains(&p);
        if !unit(self.loss) {
            bail!("loss must be between 0 and 100%");
        }
        if !unit(self.reorder) {
            bail!("reorder must be between 0 and 100%");
        }
        if let Some(b) = self.burst {
            if !(0.0..1.0).contains(&b.loss) {
                bail!("burst loss must be at least 0 and below 100%");
            }
            if b.mean_len.is_nan() || b.mean_len < 1.0 {
                bail!("the mean burst length must be at least 1 packet");
            }
        }
        if self.rate == Some(0) {
            bail!("the rate must be above 0 (leave it out for no cap)");
        }
        if let Some(q) = self.queue_limit()
            && q < 1500
        {
            bail!("a queue of {q} bytes cannot hold one full-size packet");
        }
        Ok(())
    }
}

/// Parses a rate in bits per second: a number with an optional SI unit (`k`, `m`, `g`, alone
/// or followed by `bit`, case-insensitive, optionally `/s`), as tc writes them: `100mbit`,
/// `1.5Gbit/s`, `250k`, `8000000`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("/s").unwrap_or(&t);
    let t = t.strip_suffix("bit").unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a rate: write e.g. 100mbit, 1gbit, 500kbit"))?;
    let bits = v * mult;
    if !(bits.is_finite() && bits >= 1.0) {
        return Err(format!("{s:?} is not a positive rate"));
    }
    Ok(bits.round() as u64)
}

/// A small deterministic generator (SplitMix64): the same seed gives the same impairments on
/// every machine and every version of ferry's dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]: the logarithm stays finite
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Sent on at `at` (time since the link's start); `reordered` if it was held back to be
    /// overtaken.
    Deliver { at: Duration, reordered: bool },
    /// Lost on the path (random or burst loss).
    Lost,
    /// Tail-dropped: the bottleneck queue was full.
    QueueFull,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// One direction of the emulated path, sans I/O: times are durations since the link's start.
#[derive(Debug, Clone)]
pub struct Link {
    imp: Impairment,
    queue_limit: u64,
    rng: Rng,
    /// When the bottleneck finishes sending what it holds (ns).
    busy_until: u64,
    /// Release time of the last packet that was not reordered (ns): jitter keeps order.
    last_release: u64,
    /// Gilbert-Elliott state.
    bad: bool,
}

impl Link {
    pub fn new(imp: Impairment, seed: u64) -> Link {
        Link {
            queue_limit: imp.queue_limit().unwrap_or(u64::MAX),
            imp,
            rng: Rng::new(seed),
            busy_until: 0,
            last_release: 0,
            bad: false,
        }
    }

    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Bytes waiting in the bottleneck queue at `now` (0 without a rate cap).
    pub fn backlog(&self, now: Duration) -> u64 {
        match self.imp.rate {
            Some(rate) => {
                let ahead = self.busy_until.saturating_sub(ns(now));
                (ahead as u128 * rate as u128 / 8_000_000_000) as u64
            }
            None => 0,
        }
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`. Arrival times must not
    /// go backwards.
    pub fn admit(&mut self, now: Duration, len: usize) -> Fate {
        let now_ns = ns(now);
        if let Some(b) = self.imp.burst {
            let flip = if self.bad { b.p_leave() } else { b.p_enter() };
            if self.rng.chance(flip) {
                self.bad = !self.bad;
            }
            if self.bad {
                return Fate::Lost;
            }
        }
        if self.rng.chance(self.imp.loss) {
            return Fate::Lost;
        }
        let depart = match self.imp.rate {
            Some(rate) => {
                let wire = len as u64 + u64::from(self.imp.overhead);
                if self.backlog(now) + wire > self.queue_limit {
                    return Fate::QueueFull;
                }
                let start = self.busy_until.max(now_ns);
                self.busy_until = start + (wire as u128 * 8_000_000_000 / rate as u128) as u64;
                self.busy_until
            }
            None => now_ns,
        };
        let delay = ns(self.imp.delay) as i128;
        let j = ns(self.imp.jitter) as f64;
        let offset = if j > 0.0 {
            match self.imp.jitter_dist {
                JitterDist::Uniform => (2.0 * self.rng.unit() - 1.0) * j,
                JitterDist::Normal => (self.rng.normal() * j).clamp(-3.0 * j, 3.0 * j),
            }
        } else {
            0.0
        };
        let at = (depart as i128 + delay + offset as i128).max(depart as i128) as u64;
        if self.rng.chance(self.imp.reorder) {
            let at = at + ns(self.imp.reorder_gap);
            return Fate::Deliver {
                at: Duration::from_nanos(at),
                reordered: true,
            };
        }
        let at = at.max(self.last_release);
        self.last_release = at;
        Fate::Deliver {
            at: Duration::from_nanos(at),
            reordered: false,
        }
    }
}

/// A relay's settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where clients send.
    pub listen: SocketAddr,
    /// The real server.
    pub forward: SocketAddr,
    /// Client to server.
    pub to_server: Impairment,
    /// Server to client.
    pub to_client: Impairment,
    /// Seeds both directions' generators (each direction gets its own stream).
    pub seed: u64,
}

/// Makes the calling thread's timed waits exact: no timer slack (50 µs by default).
fn exact_timers() {
    // SAFETY: a plain prctl on the calling thread with a valid argument.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// A packet waiting for its release time.
struct Held {
    at: Instant,
    seq: u64,
    to: Option<SocketAddr>,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Held) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Held) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}

impl Ord for Held {
    fn cmp(&self, o: &Held) -> CmpOrdering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Lateness histogram: 10 µs buckets up to 10 ms, then one overflow bucket.
const LATE_BUCKET_NS: u64 = 10_000;
const LATE_BUCKETS: usize = 1001;

/// Counters of one direction.
struct Counters {
    received: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    no_client: AtomicU64,
    reordered: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    send_errors: AtomicU64,
    /// ns since the relay's start, plus one (0: nothing sent yet).
    first_sent: AtomicU64,
    last_sent: AtomicU64,
    late_sum_ns: AtomicU64,
    late_max_ns: AtomicU64,
    late: Vec<AtomicU64>,
}

impl Counters {
    fn new() -> Counters {
        let z = || AtomicU64::new(0);
        Counters {
            received: z(),
            lost: z(),
            queue_drops: z(),
            no_client: z(),
            reordered: z(),
            sent: z(),
            sent_bytes: z(),
            send_errors: z(),
            first_sent: z(),
            last_sent: z(),
            late_sum_ns: z(),
            late_max_ns: z(),
            late: (0..LATE_BUCKETS).map(|_| z()).collect(),
        }
    }
}

/// One direction of the relay: its queue and counters.
struct Dir {
    queue: Mutex<BinaryHeap<Reverse<Held>>>,
    wake: Condvar,
    counters: Counters,
    overhead: u64,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    client: Mutex<Option<SocketAddr>>,
    to_server: Dir,
    to_client: Dir,
}

/// Figures of one direction since the relay started.
#[derive(Debug, Clone, Serialize)]
pub struct DirStats {
    pub received: u64,
    pub lost: u64,
    pub queue_drops: u64,
    /// Replies dropped because no client had spoken yet.
    pub no_client: u64,
    pub reordered: u64,
    pub sent: u64,
    /// UDP payload bytes sent.
    pub bytes_sent: u64,
    pub send_errors: u64,
    /// `lost / received`.
    pub loss_ratio: f64,
    /// Bits per second sent (payload plus overhead) between the first and the last packet.
    pub throughput_bps: f64,
    /// How late packets left against their release time (the relay's own timing error).
    pub late_us_mean: f64,
    pub late_us_p50: f64,
    pub late_us_p99: f64,
    pub late_us_max: f64,
}

/// Figures of a relay.
#[derive(Debug, Clone, Serialize)]
pub struct RelayStats {
    pub seconds: f64,
    /// The last client that spoke.
    pub client: Option<SocketAddr>,
    pub to_server: DirStats,
    pub to_client: DirStats,
}

impl Dir {
    fn new(overhead: u32) -> Dir {
        Dir {
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            counters: Counters::new(),
            overhead: u64::from(overhead),
        }
    }

    fn hold(&self, h: Held) {
        let at = h.at;
        let mut q = self.queue.lock();
        let earlier = q.peek().is_none_or(|Reverse(head)| at < head.at);
        q.push(Reverse(h));
        drop(q);
        if earlier {
            self.wake.notify_one();
        }
    }

    fn stats(&self) -> DirStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (received, lost, sent) = (get(&c.received), get(&c.lost), get(&c.sent));
        let bytes_sent = get(&c.sent_bytes);
        let span = get(&c.last_sent).saturating_sub(get(&c.first_sent)) as f64 / 1e9;
        let wire = (bytes_sent + sent * self.overhead) as f64 * 8.0;
        let hist: Vec<u64> = c.late.iter().map(get).collect();
        let pct = |q: f64| {
            let total: u64 = hist.iter().sum();
            if total == 0 {
                return 0.0;
            }
            let want = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, n) in hist.iter().enumerate() {
                seen += n;
                if seen >= want {
                    return ((i as u64 + 1) * LATE_BUCKET_NS) as f64 / 1e3;
                }
            }
            f64::INFINITY
        };
        DirStats {
            received,
            lost,
            queue_drops: get(&c.queue_drops),
            no_client: get(&c.no_client),
            reordered: get(&c.reordered),
            sent,
            bytes_sent,
            send_errors: get(&c.send_errors),
            loss_ratio: if received == 0 {
                0.0
            } else {
                lost as f64 / received as f64
            },
            throughput_bps: if span > 0.0 { wire / span } else { 0.0 },
            late_us_mean: if sent == 0 {
                0.0
            } else {
                get(&c.late_sum_ns) as f64 / sent as f64 / 1e3
            },
            late_us_p50: pct(0.5),
            late_us_p99: pct(0.99),
            late_us_max: get(&c.late_max_ns) as f64 / 1e3,
        }
    }
}

/// Which way packets go.
#[derive(Debug, Clone, Copy)]
enum Way {
    ToServer,
    ToClient,
}

/// A running relay; stops when dropped.
pub struct Relay {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
    forward: SocketAddr,
}

/// Asks for large socket buffers, so bursts wait in the relay's queue (where the model puts
/// them), not in the kernel's. As root the system limit does not apply (`SO_RCVBUFFORCE`).
pub fn big_buffers(s: &UdpSocket) {
    let fd = s.as_raw_fd();
    let size: libc::c_int = 8 << 20;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is an open socket for the call's duration; the option value is a c_int.
        let set = |opt| unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        };
        if !set(force) {
            set(plain);
        }
    }
}

impl Relay {
    /// Binds the sockets and starts forwarding.
    pub fn start(cfg: RelayConfig) -> Result<Relay> {
        cfg.to_server
            .check()
            .context("client-to-server impairment")?;
        cfg.to_client
            .check()
            .context("server-to-client impairment")?;
        let listen = UdpSocket::bind(cfg.listen)
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let any: SocketAddr = if cfg.forward.is_ipv4() {
            "0.0.0.0:0".parse().expect("an address")
        } else {
            "[::]:0".parse().expect("an address")
        };
        let upstream = UdpSocket::bind(any).context("cannot open the upstream socket")?;
        upstream
            .connect(cfg.forward)
            .with_context(|| format!("cannot forward to {}", cfg.forward))?;
        for s in [&listen, &upstream] {
            big_buffers(s);
            // Receivers look at the stop flag this often.
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        let local = listen.local_addr()?;
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            client: Mutex::new(None),
            to_server: Dir::new(cfg.to_server.overhead),
            to_client: Dir::new(cfg.to_client.overhead),
        });
        let (listen, upstream) = (Arc::new(listen), Arc::new(upstream));
        // Distinct streams per direction from one seed.
        let up = Link::new(cfg.to_server.clone(), cfg.seed);
        let down = Link::new(cfg.to_client.clone(), cfg.seed ^ 0xD1B5_4A32_D192_ED03);
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    exact_timers();
                    f()
                })
                .context("cannot start a relay thread")
        };
        {
            let (sh, sock) = (shared.clone(), listen.clone());
            threads.push(spawn(
                "relay-rx-up",
                Box::new(move || receive(&sh, Way::ToServer, &sock, up)),
            )?);
            let (sh, sock) = (shared.clone(), upstream.clone());
            threads.push(spawn(
                "relay-tx-up",
                Box::new(move || send(&sh, Way::ToServer, &sock)),
            )?);
            let (sh, sock) = (shared.clone(), upstream);
            threads.push(spawn(
                "relay-rx-down",
                Box::new(move || receive(&sh, Way::ToClient, &sock, down)),
            )?);
            let (sh, sock) = (shared.clone(), listen);
            threads.push(spawn(
                "relay-tx-down",
                Box::new(move || send(&sh, Way::ToClient, &sock)),
            )?);
        }
        Ok(Relay {
            shared,
            threads,
            local,
            forward: cfg.forward,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn forward_addr(&self) -> SocketAddr {
        self.forward
    }

    /// The figures so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            seconds: self.shared.start.elapsed().as_secs_f64(),
            client: *self.shared.client.lock(),
            to_server: self.shared.to_server.stats(),
            to_client: self.shared.to_client.stats(),
        }
    }

    /// Stops forwarding (packets still queued are dropped) and returns the figures.
    pub fn stop(mut self) -> RelayStats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for d in [&self.shared.to_server, &self.shared.to_client] {
            let _q = d.queue.lock();
            d.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.halt();
    }
}

impl Shared {
    fn dir(&self, way: Way) -> &Dir {
        match way {
            Way::ToServer => &self.to_server,
            Way::ToClient => &self.to_client,
        }
    }
}

fn receive(sh: &Shared, way: Way, sock: &UdpSocket, mut link: Link) {
    let dir = sh.dir(way);
    let c = &dir.counters;
    let mut buf = vec![0u8; 65536];
    let mut seq = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        // An ICMP error for an earlier datagram (server not up, link down).
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(e) => {
                log::warn!("wan-relay: receiving ({way:?}): {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let now = Instant::now();
        let to = match way {
            Way::ToServer => {
                let mut client = sh.client.lock();
                if *client != Some(from) {
                    log::info!("wan-relay: client is now {from}");
                    *client = Some(from);
                }
                None
            }
            Way::ToClient => match *sh.client.lock() {
                Some(c) => Some(c),
                None => {
                    c.no_client.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        c.received.fetch_add(1, Ordering::Relaxed);
        match link.admit(now.duration_since(sh.start), n) {
            Fate::Lost => {
                c.lost.fetch_add(1, Ordering::Relaxed);
            }
            Fate::QueueFull => {
                c.queue_drops.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Deliver { at, reordered } => {
                if reordered {
                    c.reordered.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                dir.hold(Held {
                    at: sh.start + at,
                    seq,
                    to,
                    data: buf[..n].to_vec(),
                });
            }
        }
    }
}

fn send(sh: &Shared, way: Way, sock: &UdpSocket) {
    let dir = sh.dir(way);
    let c = &dir.counters;
    let mut due = Vec::new();
    loop {
        {
            let mut q = dir.queue.lock();
            loop {
                if sh.stop.load(Ordering::Relaxed) {
                    return;
                }
                match q.peek() {
                    Some(Reverse(h)) if h.at <= Instant::now() => break,
                    Some(Reverse(h)) => {
                        let at = h.at;
                        dir.wake.wait_until(&mut q, at);
                    }
                    None => {
                        dir.wake.wait_for(&mut q, Duration::from_millis(100));
                    }
                }
            }
            let now = Instant::now();
            while q.peek().is_some_and(|Reverse(h)| h.at <= now) {
                due.push(q.pop().expect("peeked").0);
            }
        }
        for h in due.drain(..) {
            let now = Instant::now();
            let late = ns(now.duration_since(h.at));
            let r = match h.to {
                Some(to) => sock.send_to(&h.data, to),
                None => sock.send(&h.data),
            };
            if r.is_err() {
                // Unreachable, link down: the packet is lost, as on a real path.
                c.send_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let t = ns(now.duration_since(sh.start)) + 1;
            let _ = c
                .first_sent
                .compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed);
            c.last_sent.store(t, Ordering::Relaxed);
            c.sent.fetch_add(1, Ordering::Relaxed);
            c.sent_bytes
                .fetch_add(h.data.len() as u64, Ordering::Relaxed);
            c.late_sum_ns.fetch_add(late, Ordering::Relaxed);
            c.late_max_ns.fetch_max(late, Ordering::Relaxed);
            let b = ((late / LATE_BUCKET_NS) as usize).min(LATE_BUCKETS - 1);
            c.late[b].fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn describe(i: &Impairment) -> String {
    let mut parts = vec![format!("delay {:?}", i.delay)];
    if !i.jitter.is_zero() {
        parts.push(format!("jitter {:?} ({:?})", i.jitter, i.jitter_dist));
    }
    parts.push(format!("loss {}%", i.loss * 100.0));
    if let Some(b) = i.burst {
        parts.push(format!(
            "burst loss {}% in bursts of {} packets",
            b.loss * 100.0,
            b.mean_len
        ));
    }
    if i.reorder > 0.0 {
        parts.push(format!(
            "reorder {}% by {:?}",
            i.reorder * 100.0,
            i.reorder_gap
        ));
    }
    match (i.rate, i.queue_limit()) {
        (Some(r), Some(q)) => parts.push(format!(
            "rate {} Mbit/s, queue {q} bytes, {} bytes overhead per packet",
            r as f64 / 1e6,
            i.overhead
        )),
        _ => parts.push("no rate cap".into()),
    }
    parts.join(", ")
}

fn print_dir(name: &str, d: &DirStats) {
    eprintln!(
        "  {name}: {} received, {} lost ({:.2}%), {} queue drops, {} reordered, {} sent \
         ({} send errors), {:.2} Mbit/s; late by {:.0} µs mean, {:.0} µs p99, {:.0} µs max",
        d.received,
        d.lost,
        d.loss_ratio * 100.0,
        d.queue_drops,
        d.reordered,
        d.sent,
        d.send_errors,
        d.throughput_bps / 1e6,
        d.late_us_mean,
        d.late_us_p99,
        d.late_us_max
    );
}

/// `ferry-wan-relay`: runs a relay until SIGINT or SIGTERM (or for `duration`), then prints its
/// figures (one JSON object on stdout with `json`, else text on stderr).
pub fn run(cfg: RelayConfig, duration: Option<Duration>, json: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .context("cannot install a signal handler")?;
    }
    let relay = Relay::start(cfg.clone())?;
    eprintln!(
        "wan-relay: listening on {}, forwarding to {}, seed {}",
        relay.local_addr(),
        relay.forward_addr(),
        cfg.seed
    );
    eprintln!("  to server: {}", describe(&cfg.to_server));
    eprintln!("  to client: {}", describe(&cfg.to_client));
    let t = Instant::now();
    while !stop.load(Ordering::Relaxed) && duration.is_none_or(|d| t.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stats = relay.stop();
    if json {
        println!("{}", serde_json::to_string(&stats)?);
    } else {
        eprintln!(
            "wan-relay: stopped after {:.1} s; last client {}",
            stats.seconds,
            stats
                .client
                .map_or_else(|| "none".to_string(), |c| c.to_string())
        );
        print_dir("to server", &stats.to_server);
        print_dir("to client", &stats.to_client);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(f: Fate) -> Duration {
        match f {
            Fate::Deliver { at, .. } => at,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn no_impairment_delivers_at_once() {
        let mut l = Link::new(Impairment::default(), 1);
        for i in 0..100u64 {
            let now = Duration::from_micros(i * 7);
            assert_eq!(
                l.admit(now, 1200),
                Fate::Deliver {
                    at: now,
                    reordered: false
                }
            );
        }
    }

    #[test]
    fn a_fixed_delay_is_added_exactly() {
        let imp = Impairment {
            delay: 25 * MS,
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 1);
        for i in 0..1000u64 {
            let now = Duration::from_nanos(i * 123_457);
            assert_eq!(at(l.admit(now, 1400)), now + 25 * MS);
        }
    }

    #[test]
    fn the_rate_spaces_packets_by_their_serialisation_time() {
        // 972 + 28 bytes = 8,000 bits at 8 Mbit/s: one packet per millisecond.
        let imp = Impairment {
            rate: Some(8_000_000),
            delay: 10 * MS,
            queue: Some(1 << 20),
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 1);
        for i in 1..=50u32 {
            assert_eq!(at(l.admit(Duration::ZERO, 972)), i * MS + 10 * MS);
        }
        assert_eq!(l.backlog(Duration::ZERO), 50_000);
        assert_eq!(l.backlog(20 * MS), 30_000);
        // An idle link sends at once (after one serialisation time).
        let mut l = Link::new(l.impairment().clone(), 1);
        assert_eq!(at(l.admit(100 * MS, 972)), 111 * MS);
        assert_eq!(at(l.admit(300 * MS, 972)), 311 * MS);
    }

    #[test]
    fn a_saturated_link_delivers_the_configured_rate() {
        // Offer 2x the rate with an uneven mix of sizes; what is delivered is the rate.
        let rate = 100_000_000u64;
        let imp = Impairment {
            rate: Some(rate),
            delay: 25 * MS,
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 7);
        let mut rng = Rng::new(3);
        let (mut bits, mut first, mut last) = (0u64, None, Duration::ZERO);
        let mut now = Duration::ZERO;
        while now < Duration::from_secs(2) {
            let len = 200 + (rng.next_u64() % 1253) as usize;
            if let Fate::Deliver { at, .. } = l.admit(now, len) {
                bits += (len as u64 + 28) * 8;
                first.get_or_insert(at);
                last = at;
            }
            now += Duration::from_nanos(((len + 28) * 8 * 1_000_000_000 / 200_000_000) as u64);
        }
        let got = bits as f64 / (last - first.unwrap()).as_secs_f64();
        assert!((got / rate as f64 - 1.0).abs() < 0.01, "{got} bit/s");
    }

    #[test]
    fn a_full_queue_tail_drops_until_it_drains() {
        let imp = Impairment {
            rate: Some(8_000_000),
            queue: Some(10_000),
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 1);
        let fates: Vec<Fate> = (0..15).map(|_| l.admit(Duration::ZERO, 972)).collect();
        assert!(
            fates[..10]
                .iter()
                .all(|f| matches!(f, Fate::Deliver { .. }))
        );
        assert!(fates[10..].iter().all(|f| *f == Fate::QueueFull));
        // One packet's worth drains per millisecond.
        assert_eq!(at(l.admit(MS, 972)), 11 * MS);
        assert_eq!(l.admit(MS, 972), Fate::QueueFull);
    }

    #[test]
    fn the_default_queue_is_one_and_a_half_bandwidth_delay_products() {
        let imp = Impairment {
            rate: Some(100_000_000),
            delay: 25 * MS,
            ..Impairment::default()
        };
        // 100 Mbit/s * 50 ms = 625,000 bytes.
        assert_eq!(imp.queue_limit(), Some(937_500));
        let short = Impairment {
            rate: Some(1_000_000),
            ..Impairment::default()
        };
        assert_eq!(short.queue_limit(), Some(MIN_QUEUE));
        assert_eq!(Impairment::default().queue_limit(), None);
        let tiny = Impairment {
            rate: Some(1_000_000),
            queue: Some(1000),
            ..Impairment::default()
        };
        assert!(tiny.check().is_err());
    }

    fn losses(imp: Impairment, seed: u64, n: usize) -> Vec<bool> {
        let mut l = Link::new(imp, seed);
        (0..n)
            .map(|i| l.admit(Duration::from_micros(i as u64 * 100), 1200) == Fate::Lost)
            .collect()
    }

    #[test]
    fn random_loss_has_the_configured_ratio_and_is_reproducible() {
        let imp = Impairment {
            loss: 0.01,
            ..Impairment::default()
        };
        let a = losses(imp.clone(), 42, 200_000);
        let ratio = a.iter().filter(|&&x| x).count() as f64 / a.len() as f64;
        assert!((0.009..0.011).contains(&ratio), "{ratio}");
        assert_eq!(
            a,
            losses(imp.clone(), 42, 200_000),
            "same seed, same losses"
        );
        assert_ne!(a, losses(imp, 43, 200_000));
    }

    #[test]
    fn burst_loss_has_the_configured_ratio_and_burst_length() {
        let imp = Impairment {
            burst: Some(Burst {
                loss: 0.02,
                mean_len: 4.0,
            }),
            ..Impairment::default()
        };
        let a = losses(imp, 5, 500_000);
        let lost = a.iter().filter(|&&x| x).count();
        let bursts = a.windows(2).filter(|w| !w[0] && w[1]).count();
        let ratio = lost as f64 / a.len() as f64;
        let mean_len = lost as f64 / bursts as f64;
        assert!((0.017..0.023).contains(&ratio), "{ratio}");
        assert!((3.6..4.4).contains(&mean_len), "{mean_len}");
    }

    #[test]
    fn uniform_jitter_stays_in_range_and_keeps_order() {
        let imp = Impairment {
            delay: 25 * MS,
            jitter: 5 * MS,
            ..Impairment::default()
        };
        // Sparse packets (50 ms apart): each delay is its own sample.
        let mut l = Link::new(imp.clone(), 9);
        let d: Vec<f64> = (0..4000u32)
            .map(|i| {
                let now = i * 50 * MS;
                (at(l.admit(now, 1200)) - now).as_secs_f64() * 1e3
            })
            .collect();
        assert!(d.iter().all(|&x| (20.0..=30.0).contains(&x)), "{d:?}");
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        assert!((24.7..25.3).contains(&mean), "{mean}");
        assert!(d.iter().any(|&x| x < 21.0) && d.iter().any(|&x| x > 29.0));
        // Dense packets (0.1 ms apart): never released out of order.
        let mut l = Link::new(imp, 9);
        let mut prev = Duration::ZERO;
        for i in 0..10_000u64 {
            let now = Duration::from_micros(i * 100);
            let t = at(l.admit(now, 1200));
            assert!(t >= prev && t >= now + 20 * MS && t <= now + 30 * MS);
            prev = t;
        }
    }

    #[test]
    fn normal_jitter_has_the_configured_deviation_and_is_cut_at_three() {
        let imp = Impairment {
            delay: 50 * MS,
            jitter: 4 * MS,
            jitter_dist: JitterDist::Normal,
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 11);
        let d: Vec<f64> = (0..20_000u32)
            .map(|i| {
                let now = i * 100 * MS;
                (at(l.admit(now, 1200)) - now).as_secs_f64() * 1e3
            })
            .collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        assert!((49.8..50.2).contains(&mean), "{mean}");
        assert!((3.8..4.2).contains(&sd), "{sd}");
        assert!(d.iter().all(|&x| (38.0..=62.0).contains(&x)));
    }

    #[test]
    fn jitter_never_makes_a_delay_negative() {
        let imp = Impairment {
            delay: MS,
            jitter: 5 * MS,
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 2);
        for i in 0..1000u32 {
            let now = i * 100 * MS;
            assert!(at(l.admit(now, 100)) >= now);
        }
    }

    #[test]
    fn reordered_packets_are_held_back_and_overtaken() {
        let imp = Impairment {
            delay: 10 * MS,
            reorder: 0.05,
            reorder_gap: 3 * MS,
            ..Impairment::default()
        };
        let mut l = Link::new(imp, 13);
        let mut out = Vec::new();
        let n = 100_000u64;
        for i in 0..n {
            let now = Duration::from_micros(i * 200);
            match l.admit(now, 1200) {
                Fate::Deliver { at, reordered } => {
                    let want = now + 10 * MS + if reordered { 3 * MS } else { Duration::ZERO };
                    assert_eq!(at, want);
                    out.push((at, i, reordered));
                }
                f => panic!("{f:?}"),
            }
        }
        let share = out.iter().filter(|o| o.2).count() as f64 / n as f64;
        assert!((0.045..0.055).contains(&share), "{share}");
        // Released in time order, the held-back packets come after later ones.
        out.sort();
        let inversions = out.windows(2).filter(|w| w[0].1 > w[1].1).count();
        assert!(inversions as f64 > 0.04 * n as f64, "{inversions}");
    }

    #[test]
    fn held_packets_leave_in_release_order_then_arrival_order() {
        let t0 = Instant::now();
        let mut q = BinaryHeap::new();
        for (ms, seq) in [(5u64, 1u64), (1, 2), (5, 3), (3, 4), (1, 5)] {
            q.push(Reverse(Held {
                at: t0 + Duration::from_millis(ms),
                seq,
                to: None,
                data: vec![],
            }));
        }
        let order: Vec<u64> = std::iter::from_fn(|| q.pop().map(|r| r.0.seq)).collect();
        assert_eq!(order, [2, 5, 4, 1, 3]);
    }

    #[test]
    fn rates_parse_like_tc() {
        assert_eq!(parse_rate("100mbit"), Ok(100_000_000));
        assert_eq!(parse_rate("100Mbit/s"), Ok(100_000_000));
        assert_eq!(parse_rate("1.5gbit"), Ok(1_500_000_000));
        assert_eq!(parse_rate("250k"), Ok(250_000));
        assert_eq!(parse_rate("8000000"), Ok(8_000_000));
        assert_eq!(parse_rate(" 2 M "), Ok(2_000_000));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5mbit").is_err());
    }

    #[test]
    fn the_generator_is_fixed_across_versions() {
        // SplitMix64's reference outputs for seed 1234567.
        let mut r = Rng::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
    }

    #[test]
    fn a_relay_on_loopback_forwards_both_ways_and_maps_replies_to_the_last_client() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let relay = Relay::start(RelayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            forward: server.local_addr().unwrap(),
            to_server: Impairment::default(),
            to_client: Impairment::default(),
            seed: 1,
        })
        .unwrap();
        let mut buf = [0u8; 64];
        for round in 0..2u8 {
            // A new client each round (a reconnect from a new port): replies follow it.
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            client.send_to(&[round], relay.local_addr()).unwrap();
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[round]);
            server.send_to(&[round, 9], from).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[round, 9]);
            assert_eq!(from, relay.local_addr());
            assert_eq!(relay.stats().client, Some(client.local_addr().unwrap()));
        }
        let s = relay.stop();
        assert_eq!((s.to_server.sent, s.to_client.sent), (2, 2));
    }
}
