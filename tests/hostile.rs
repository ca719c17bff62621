//! A pinned peer gone wrong (a compromised primary, a broken build) against a real replica
//! daemon over real QUIC: whatever it sends, what the daemon holds for it stays bounded, the
//! offending connection is dropped, and the daemon goes on serving the real primary.
//! (Unpinned peers never get past the handshake: tests/tls.rs.)

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{PRIMARY, Pair, random};
use ferry::manifest::ChunkParams;
use ferry::net::transport::{client, read_frame, write_frame};
use ferry::net::{Congestion, Fingerprint, Identity, SERVER_NAME};
use ferry::wire::frame::Frame;
use ferry::wire::primary::Claim;

/// Every wait is bounded, so a regression fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A connection to the pair's replica with the pair's own primary key (what a compromised
/// primary holds).
async fn connect(p: &Pair) -> (quinn::Endpoint, quinn::Connection) {
    let id = Identity::load(&p.primary.dir.path().join("keys")).unwrap();
    let replica: Fingerprint = p.replica.fingerprint.parse().unwrap();
    let ep = client(
        &id,
        &[replica],
        (Ipv4Addr::LOCALHOST, 0).into(),
        Congestion::default(),
    )
    .unwrap();
    let addr: SocketAddr = (Ipv4Addr::LOCALHOST, p.replica.port).into();
    let conn = tokio::time::timeout(TIMEOUT, ep.connect(addr, SERVER_NAME).unwrap())
        .await
        .unwrap()
        .unwrap();
    (ep, conn)
}

/// Opens the control stream and says Hello as the pair's primary; returns the stream.
async fn hello(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Claim::first(PRIMARY).hello(ChunkParams::default());
    write_frame(&mut send, &hello).await.unwrap();
    let welcome = tokio::time::timeout(TIMEOUT, read_frame(&mut recv))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(welcome, Some(Frame::Welcome { .. })),
        "{welcome:?}"
    );
    (send, recv)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    kb << 10
}

/// The real primary writes and syncs beside the hostile peer: it must commit.
fn real_primary_syncs(p: &Pair, seed: u64) {
    std::fs::write(p.primary.path("a.img"), random(4 << 20, seed)).unwrap();
    p.sync_ok();
    common::cmp(&p.primary.backing("a.img"), &p.replica_path("a.img"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announcing_4_gib_is_refused_and_the_connection_dropped() {
    common::require_root();
    let p = Pair::new();
    let before = rss(p.replica.pid());
    let (_ep, conn) = connect(&p).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    // The replica may refuse on the header alone and close before the rest is written.
    let _ = send.write_all(&[0u8; 4096]).await;
    let closed = tokio::time::timeout(TIMEOUT, conn.closed()).await;
    assert!(closed.is_ok(), "the replica kept the connection open");
    assert!(
        p.replica.log_text().contains("exceeds the limit"),
        "{}",
        p.replica.log_text()
    );
    assert!(rss(p.replica.pid()) < before + (16 << 20));
    tokio::task::block_in_place(|| real_primary_syncs(&p, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_data_streams_of_half_sent_frames_hold_bounded_memory() {
    common::require_root();
    let p = Pair::new();
    tokio::task::block_in_place(|| real_primary_syncs(&p, 1));
    let before = rss(p.replica.pid());
    let (_ep, conn) = connect(&p).await;
    let _control = hello(&conn).await;
    // Each stream announces a chunk frame of the largest size a chunk may have and sends
    // 1 MiB of it, never the rest. The replica admits a few streams at a time; the opener
    // waits for the others.
    let announce = (ChunkParams::default().max_size * 2).to_le_bytes();
    let junk = vec![0x5au8; 1 << 20];
    let mut open = Vec::new();
    for _ in 0..1000 {
        let Ok(Ok(mut uni)) = tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await
        else {
            break;
        };
        uni.write_all(&announce).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(500), uni.write_all(&junk)).await;
        open.push(uni);
    }
    assert!(
        open.len() <= ferry::net::tls::DATA_STREAMS as usize,
        "{} data streams open at once",
        open.len()
    );
    let grew = rss(p.replica.pid()).saturating_sub(before);
    eprintln!(
        "{} data streams admitted; the replica grew by {} KiB",
        open.len(),
        grew >> 10
    );
    assert!(grew < 48 << 20, "the replica grew by {} MiB", grew >> 20);
    // The daemon serves the real primary meanwhile (another connection, same key).
    tokio::task::block_in_place(|| real_primary_syncs(&p, 2));
    // Frames cut short end the session, and the connection with it.
    drop(open);
    let closed = tokio::time::timeout(TIMEOUT, conn.closed()).await;
    assert!(closed.is_ok(), "a session with broken frames stayed open");
    // A data frame larger than a chunk can be is refused at once.
    let (_ep, conn) = connect(&p).await;
    let _control = hello(&conn).await;
    let mut big = conn.open_uni().await.unwrap();
    big.write_all(&(16u32 << 20).to_le_bytes()).await.unwrap();
    let closed = tokio::time::timeout(TIMEOUT, conn.closed()).await;
    assert!(
        closed.is_ok(),
        "an oversized data frame did not end the session"
    );
    assert!(
        p.replica.log_text().contains("exceeds this stream's limit"),
        "{}",
        p.replica.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_per_primary_are_closed_and_the_rest_served() {
    common::require_root();
    let p = Pair::new();
    let cap = ferry::replica::daemon::CONNECTIONS_PER_PRIMARY;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(connect(&p).await);
    }
    // One more: the daemon closes one at once and says why. Usually the last, but the daemon
    // may count it before the last held one finished its handshake on the daemon's side.
    let (_ep, extra) = connect(&p).await;
    let mut closed = tokio::task::JoinSet::new();
    for c in held.iter().map(|(_, c)| c.clone()).chain([extra]) {
        closed.spawn(async move { c.closed().await });
    }
    let why = tokio::time::timeout(TIMEOUT, closed.join_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    closed.abort_all();
    assert!(
        why.to_string().contains("connections open to this replica"),
        "{why}"
    );
    // Those held go away; the real primary is served again.
    for (ep, conn) in held {
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
    tokio::task::block_in_place(|| real_primary_syncs(&p, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_answers_holds_bounded_memory() {
    common::require_root();
    let p = Pair::new();
    tokio::task::block_in_place(|| real_primary_syncs(&p, 1));
    let before = rss(p.replica.pid());
    let (_ep, conn) = connect(&p).await;
    let (mut send, _recv) = hello(&conn).await;
    // Each query of a few dozen bytes asks for every entry of the image (kilobytes), and the
    // answers are never read. The replica must stop reading queries once a few answers wait,
    // not queue them all.
    let query = Frame::LeafQuery {
        path: "a.img".into(),
        leaves: vec![0, 1, 2, 3],
    };
    let mut sent = 0u64;
    while sent < 200_000 {
        match tokio::time::timeout(Duration::from_secs(2), write_frame(&mut send, &query)).await {
            Ok(Ok(())) => sent += 1,
            _ => break, // flow control: the replica stopped reading
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grew = rss(p.replica.pid()).saturating_sub(before);
    eprintln!(
        "{sent} queries sent before the replica stopped reading; it grew by {} KiB",
        grew >> 10
    );
    assert!(grew < 64 << 20, "the replica grew by {} MiB", grew >> 20);
    // The daemon serves the real primary meanwhile.
    tokio::task::block_in_place(|| real_primary_syncs(&p, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_old_session_is_refused_and_the_connection_dropped() {
    common::require_root();
    let p = Pair::new();
    tokio::task::block_in_place(|| real_primary_syncs(&p, 1));
    tokio::task::block_in_place(|| real_primary_syncs(&p, 2));
    let (_ep, conn) = connect(&p).await;
    let (mut send, mut recv) = hello(&conn).await;
    // Generation 1 again, as its session began: the replica holds generation 2.
    let begin = Frame::Begin {
        generation: 1,
        base_generation: 0,
        group_root: [7; 32],
        changes: vec![],
        images: 1,
    };
    write_frame(&mut send, &begin).await.unwrap();
    let answer = tokio::time::timeout(TIMEOUT, read_frame(&mut recv))
        .await
        .unwrap()
        .unwrap();
    match answer {
        Some(Frame::Refuse { reason, .. }) => {
            assert!(reason.contains("this replica holds 2"), "{reason}")
        }
        other => panic!("a replayed Begin got {other:?}"),
    }
    let closed = tokio::time::timeout(TIMEOUT, conn.closed()).await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after the refusal"
    );
    // Nothing of it reached the store, and the real primary goes on.
    let before = std::fs::read(p.replica_path("a.img")).unwrap();
    assert_eq!(before, random(4 << 20, 2));
    tokio::task::block_in_place(|| real_primary_syncs(&p, 3));
}
