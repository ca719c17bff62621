//! How exactly `ferry wan-relay` holds its rate and delay at 100 Mbit/s, and how much it can
//! forward at all (it must not be the bottleneck). Plain loopback UDP, one process:
//!
//! 1. delay: 25 ms one way, 100 Mbit/s cap, 95 Mbit/s offered. Each packet's arrival is
//!    compared with what the relay's own model ([`Link`], run here on the send times) says:
//!    25 ms plus serialisation and queueing. The error is the relay's timing error plus two
//!    loopback hops.
//! 2. rate: the same path, 130 Mbit/s offered: the delivered rate (payload plus the 28 bytes of
//!    IPv4/UDP headers the cap counts) against 100 Mbit/s.
//! 3. capacity: no impairment, as much as one sender thread can offer.
//!
//! `cargo bench --bench wan_relay`; `scripts/bench-wan` runs it. Figures: docs/BENCHMARKS.md.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry::wan::{Fate, Impairment, Link, Relay, RelayConfig};

const LEN: usize = 1200;
const OVERHEAD: usize = 28;

struct Run {
    sent: Vec<Instant>,
    got: Vec<Option<Instant>>,
    relay: ferry::wan::RelayStats,
}

/// Sends `LEN`-byte packets through a relay with `imp` for `secs`, paced at `offered` bits/s
/// (0: as fast as possible), and records when each one arrived.
fn run(imp: Impairment, offered: u64, secs: f64) -> Run {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    ferry::wan::big_buffers(&server);
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let relay = Relay::start(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        forward: server.local_addr().unwrap(),
        to_server: imp.clone(),
        to_client: imp,
        seed: 1,
    })
    .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.connect(relay.local_addr()).unwrap();
    let n_max = if offered == 0 {
        4_000_000
    } else {
        (offered as f64 * secs / ((LEN + OVERHEAD) * 8) as f64) as usize + 16
    };
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut got = vec![None; n_max];
            let mut buf = [0u8; 2048];
            loop {
                match server.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
                        got[seq] = Some(Instant::now());
                    }
                    Ok(_) => {}
                    Err(_) if done.load(Ordering::Relaxed) => return got,
                    Err(_) => {}
                }
            }
        })
    };
    let mut sent = Vec::with_capacity(n_max);
    let mut buf = vec![0u8; LEN];
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let per_packet = Duration::from_secs_f64(((LEN + OVERHEAD) * 8) as f64 / offered.max(1) as f64);
    let mut tick = t0;
    'send: loop {
        // Every millisecond, send what is due: bursts of about a dozen packets.
        if offered > 0 {
            tick += Duration::from_millis(1);
            let now = Instant::now();
            if tick > now {
                std::thread::sleep(tick - now);
            }
        }
        loop {
            let now = Instant::now();
            if now >= end || sent.len() == n_max {
                break 'send;
            }
            if offered > 0 && t0 + per_packet * sent.len() as u32 > now {
                break;
            }
            buf[..8].copy_from_slice(&(sent.len() as u64).to_le_bytes());
            sent.push(Instant::now());
            let _ = client.send(&buf);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    let got = receiver.join().unwrap();
    Run {
        sent,
        got,
        relay: relay.stop(),
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench` asks every bench target to list itself
    }
    let path = Impairment {
        delay: Duration::from_millis(25),
        rate: Some(100_000_000),
        ..Impairment::default()
    };

    // 1. Delay against the model.
    let r = run(path.clone(), 95_000_000, 5.0);
    let mut model = Link::new(path.clone(), 1);
    let t0 = r.sent[0];
    let mut err_us = Vec::new();
    for (i, s) in r.sent.iter().enumerate() {
        let want = match model.admit(s.duration_since(t0), LEN) {
            Fate::Deliver { at, .. } => t0 + at,
            f => panic!("the model dropped packet {i}: {f:?}"),
        };
        if let Some(g) = r.got[i] {
            let e = if g >= want {
                g.duration_since(want).as_secs_f64()
            } else {
                -want.duration_since(g).as_secs_f64()
            };
            err_us.push(e * 1e6);
        }
    }
    let lost = r.sent.len() - err_us.len();
    let mean = err_us.iter().sum::<f64>() / err_us.len() as f64;
    println!(
        "delay  25 ms one way, 100 Mbit/s cap, 95 Mbit/s offered, {} packets ({lost} lost):",
        r.sent.len()
    );
    println!(
        "       arrival - model: mean {mean:.0} µs, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        pct(&mut err_us, 0.5),
        pct(&mut err_us, 0.99),
        pct(&mut err_us, 1.0)
    );
    println!(
        "       relay late by: mean {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        r.relay.to_server.late_us_mean,
        r.relay.to_server.late_us_p99,
        r.relay.to_server.late_us_max
    );

    // 2. Rate under overload.
    let r = run(path.clone(), 130_000_000, 5.0);
    let arrivals: Vec<Instant> = r.got.iter().flatten().copied().collect();
    let first = arrivals.iter().min().unwrap();
    let last = arrivals.iter().max().unwrap();
    let bits = ((arrivals.len() - 1) * (LEN + OVERHEAD) * 8) as f64;
    let rate = bits / last.duration_since(*first).as_secs_f64();
    println!(
        "rate   100 Mbit/s cap, 130 Mbit/s offered: delivered {:.2} Mbit/s ({:+.2}%), {} of {} \
         packets tail-dropped, relay measured {:.2} Mbit/s, {} sent {} arrived",
        rate / 1e6,
        (rate / 1e8 - 1.0) * 100.0,
        r.relay.to_server.queue_drops,
        r.sent.len(),
        r.relay.to_server.throughput_bps / 1e6,
        r.relay.to_server.sent,
        arrivals.len()
    );

    // 3. Capacity.
    let r = run(Impairment::default(), 0, 2.0);
    let arrivals: Vec<Instant> = r.got.iter().flatten().copied().collect();
    let span = arrivals
        .iter()
        .max()
        .unwrap()
        .duration_since(*arrivals.iter().min().unwrap());
    let rate = (arrivals.len() * (LEN + OVERHEAD) * 8) as f64 / span.as_secs_f64();
    println!(
        "capacity  no impairment, one sender flat out: {} sent, {} forwarded ({:.1}%), {:.0} Mbit/s",
        r.sent.len(),
        arrivals.len(),
        arrivals.len() as f64 * 100.0 / r.sent.len() as f64,
        rate / 1e6
    );
}
