//! The baseline for ferry's transfer speed: quinn alone, with ferry's own endpoints (UDP socket
//! buffers, TLS with pinned keys, transport settings, congestion controller) and as many
//! streams as a sync uses, moving incompressible bytes and nothing else: no image to read, no
//! hashing, no frames, no journal on the other side. `scripts/bench-veth` runs it between two
//! network namespaces, then one `ferry sync` of the same amount over the same path, and prints
//! the ratio.
//!
//!   quinn_alone serve LISTEN KEY_DIR CLIENT_FINGERPRINT      (answers one connection's
//!                                                            transfers, exits)
//!   quinn_alone send ADDR KEY_DIR SERVER_FINGERPRINT MIB [CC] [--warm]
//!       prints one JSON object; CC: the congestion controller, default ferry's; --warm: first
//!       moves the same amount untimed on the same connection, so that the timed transfer runs
//!       with the controller's estimate made, as a sync on a kept connection does

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use ferry::net::tls::DATA_STREAMS;
use ferry::net::{Congestion, Fingerprint, Identity, SERVER_NAME, transport};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let warm = args.iter().any(|a| a == "--warm");
    args.retain(|a| a != "--warm");
    let usage = "usage: quinn_alone serve LISTEN KEY_DIR CLIENT_FP | send ADDR KEY_DIR SERVER_FP MIB [CC] [--warm]";
    let rt = tokio::runtime::Runtime::new().unwrap();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        // `cargo bench` runs every bench with `--bench`: nothing to do without arguments.
        [] | ["--bench"] => eprintln!("{usage}"),
        ["serve", listen, keys, fp] => rt.block_on(serve(
            listen.parse().unwrap(),
            &Identity::load(Path::new(keys)).unwrap(),
            fp.parse().unwrap(),
        )),
        ["send", addr, keys, fp, mib] | ["send", addr, keys, fp, mib, _] => rt.block_on(send(
            addr.parse().unwrap(),
            &Identity::load(Path::new(keys)).unwrap(),
            fp.parse().unwrap(),
            mib.parse().unwrap(),
            args.get(5)
                .map_or(Ok(Congestion::default()), |cc| cc.parse())
                .unwrap(),
            warm,
        )),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

/// Answers transfers on one connection until the client closes it: reads a transfer's streams
/// to their end, then says how much arrived (8 bytes on a stream of its own).
async fn serve(listen: SocketAddr, id: &Identity, client: Fingerprint) {
    let ep = transport::server(id, &[client], listen).unwrap();
    eprintln!("quinn_alone: listening on {listen}");
    let conn = ep.accept().await.unwrap().await.unwrap();
    'transfers: loop {
        let mut readers = Vec::new();
        for _ in 0..DATA_STREAMS {
            let Ok(mut uni) = conn.accept_uni().await else {
                break 'transfers; // the client closed the connection
            };
            readers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Some(c) = uni.read_chunk(1 << 20, false).await.unwrap() {
                    n += c.bytes.len() as u64;
                }
                n
            }));
        }
        let mut total = 0;
        for r in readers {
            total += r.await.unwrap();
        }
        let mut back = conn.open_uni().await.unwrap();
        back.write_all(&total.to_le_bytes()).await.unwrap();
        back.finish().unwrap();
    }
    ep.wait_idle().await;
}

/// Sends `mib` MiB of random bytes split over the streams a sync uses, and times it from the
/// first byte to the server's count (after an untimed transfer of the same size if `warm`).
async fn send(
    addr: SocketAddr,
    id: &Identity,
    server: Fingerprint,
    mib: u64,
    cc: Congestion,
    warm: bool,
) {
    let ep = transport::client(
        id,
        &[server],
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        cc,
    )
    .unwrap();
    let conn = ep.connect(addr, SERVER_NAME).unwrap().await.unwrap();
    let block = std::sync::Arc::new(ferry::testutil::random(1 << 20, 7));
    let per = mib / DATA_STREAMS as u64;
    if warm {
        transfer(&conn, &block, per).await;
    }
    let before = conn.stats();
    let start = Instant::now();
    transfer(&conn, &block, per).await;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let sent = per * DATA_STREAMS as u64 * (1 << 20);
    let stats = conn.stats();
    println!(
        "{{\"bytes\":{sent},\"ms\":{ms:.1},\"mib_per_s\":{:.1},\"udp_bytes\":{},\"lost_packets\":{}}}",
        sent as f64 / (1 << 20) as f64 / (ms / 1e3),
        stats.udp_tx.bytes - before.udp_tx.bytes,
        stats.path.lost_packets - before.path.lost_packets
    );
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
}

/// Sends `per` MiB (`block` again and again) on each of the sync's streams, and checks the
/// server's count of them.
async fn transfer(conn: &quinn::Connection, block: &std::sync::Arc<Vec<u8>>, per: u64) {
    let mut writers = Vec::new();
    for _ in 0..DATA_STREAMS {
        let mut uni = conn.open_uni().await.unwrap();
        let block = block.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..per {
                uni.write_all(&block).await.unwrap();
            }
            uni.finish().unwrap();
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut back = conn.accept_uni().await.unwrap();
    let got = back.read_to_end(8).await.unwrap();
    let received = u64::from_le_bytes(got.try_into().unwrap());
    assert_eq!(
        received,
        per * DATA_STREAMS as u64 * (1 << 20),
        "the server counted other bytes than were sent"
    );
}
