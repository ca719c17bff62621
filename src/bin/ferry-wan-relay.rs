//! `ferry-wan-relay`: the WAN impairment relay of ferry's tests and benchmarks (delay,
//! jitter, loss, bursts, reordering, a rate cap). A test tool, kept out of `ferry` itself.

use anyhow::Result;
use bytesize::ByteSize;
use clap::Parser;
use ferry::wan;

/// A test tool that emulates a WAN path for ferry's QUIC traffic.
///
/// A UDP relay: point a primary's `[[peer]] addr` at --listen and the relay forwards to
/// the replica at --forward, and the replies back to the primary. Each direction gets the
/// same impairments, drawn independently: loss, a rate cap with a tail-drop queue, one-way
/// delay with jitter, reordering. Runs until SIGINT or SIGTERM (or --duration), then prints
/// what it did (--json: one object on stdout). For tests and benchmarks, not production.
#[derive(Parser, Debug)]
#[command(name = "ferry-wan-relay", version)]
struct Args {
    /// Address to receive the client's datagrams on, e.g. 127.0.0.1:7443.
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// The real server, e.g. 10.231.0.2:7443.
    #[arg(long, value_name = "ADDR")]
    forward: std::net::SocketAddr,
    /// One-way delay, e.g. 25ms (RTT 50 ms).
    #[arg(long, value_name = "DURATION", default_value = "0ms", value_parser = duration)]
    delay: std::time::Duration,
    /// Jitter: half-width of a uniform spread, or the standard deviation of a normal one. Jitter
    /// keeps packet order.
    #[arg(long, value_name = "DURATION", default_value = "0ms", value_parser = duration)]
    jitter: std::time::Duration,
    /// How jitter is distributed.
    #[arg(long, value_name = "DIST", default_value = "uniform")]
    jitter_dist: wan::JitterDist,
    /// Percent of packets lost, each independently, e.g. 0.5.
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    loss: f64,
    /// Percent of packets lost in bursts (Gilbert-Elliott), besides --loss.
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    burst_loss: f64,
    /// Mean length of a loss burst, in packets.
    #[arg(long, value_name = "N", default_value_t = 3.0)]
    burst_len: f64,
    /// Percent of packets held back --reorder-gap longer, so later ones overtake them.
    #[arg(long, value_name = "PCT", default_value_t = 0.0)]
    reorder: f64,
    /// How much longer a reordered packet is held.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = duration)]
    reorder_gap: std::time::Duration,
    /// Bottleneck rate in bits/s, e.g. 100mbit or 1gbit; default no cap.
    #[arg(long, value_name = "RATE", value_parser = wan::parse_rate)]
    rate: Option<u64>,
    /// Bottleneck queue (with --rate), e.g. 1MiB; packets beyond it are tail-dropped.
    /// Default: 1.5 x rate x 2 x delay, at least 64 KiB.
    #[arg(long, value_name = "SIZE")]
    queue: Option<ByteSize>,
    /// Bytes of headers counted per datagram against the rate and the queue (IPv4 + UDP).
    #[arg(long, value_name = "BYTES", default_value_t = wan::DEFAULT_OVERHEAD)]
    overhead: u32,
    /// Seed of the random decisions: the same seed replays the same impairments.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Stop after this long instead of waiting for SIGINT or SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    duration: Option<std::time::Duration>,
    /// Print the final figures as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 25ms, 1.5s)"))
}

impl Args {
    /// The relay's settings (the same impairment in both directions).
    fn config(&self) -> Result<wan::RelayConfig> {
        let pct = |p: f64| p / 100.0;
        let imp = wan::Impairment {
            delay: self.delay,
            jitter: self.jitter,
            jitter_dist: self.jitter_dist,
            loss: pct(self.loss),
            burst: (self.burst_loss > 0.0).then_some(wan::Burst {
                loss: pct(self.burst_loss),
                mean_len: self.burst_len,
            }),
            reorder: pct(self.reorder),
            reorder_gap: self.reorder_gap,
            rate: self.rate,
            queue: self.queue.map(|q| q.as_u64()),
            overhead: self.overhead,
        };
        imp.check()?;
        Ok(wan::RelayConfig {
            listen: self.listen,
            forward: self.forward,
            to_server: imp.clone(),
            to_client: imp,
            seed: self.seed,
        })
    }
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let a = Args::parse();
    wan::run(a.config()?, a.duration, a.json)
}
