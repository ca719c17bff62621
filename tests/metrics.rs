//! Prometheus metrics of the mount daemon and the replica daemon: scraped during a sync and
//! after it, checked against `ferry status --json` and the sync's report; a busy metrics
//! address is an error in the log, and the mount serves on.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Pair, free_port, random};

/// `GET /metrics` on 127.0.0.1:`port`; the body.
fn scrape(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The value of the sample `key` (name and labels as exposed), if present.
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

fn must(text: &str, key: &str) -> f64 {
    sample(text, key).unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

#[test]
fn both_daemons_serve_metrics_that_agree_with_status() {
    common::require_root();
    let (pport, rport) = (free_port(), free_port());
    let mut p = Pair::with(
        &[],
        &format!(
            "metrics = \"127.0.0.1:{pport}\"\n[primary]\nbandwidth_limit = \"16MiB/s\"\n\
             sync_interval = \"1h\"\n"
        ),
    );
    p.replica.kill9();
    // The first apply after an acknowledgement holds at its first write into an image (under
    // the store's lock) until the test lets it go.
    let flags = p.replica.failpoints("replica.image.write=1*return(hold)");
    let held = flags.path().join("replica.image.write");
    let c = fs::read_to_string(&p.replica.config).unwrap().replacen(
        "[node]\n",
        &format!("[node]\nmetrics = \"127.0.0.1:{rport}\"\n"),
        1,
    );
    fs::write(&p.replica.config, c).unwrap();
    p.replica.start();
    let before = scrape(rport);
    // The primary's namespace exists from its first contact (a probe at mount, or the sync).
    let gen_key = "ferry_store_generation{primary=\"test\"}";
    assert_eq!(sample(&before, gen_key).unwrap_or(0.0), 0.0, "{before}");
    assert!(must(&before, "ferry_store_free_bytes") > 0.0);

    fs::write(p.primary.path("a.img"), random(48 << 20, 1)).unwrap();
    let p = Arc::new(p);
    let sync = {
        let p = p.clone();
        std::thread::spawn(move || p.sync_ok())
    };
    // During the sync: running, bytes moving, the replica shipping.
    let t = Instant::now();
    loop {
        let m = scrape(pport);
        if must(&m, "ferry_sync_running") == 1.0 && must(&m, "ferry_sync_bytes_done") > 0.0 {
            assert!(must(&m, "ferry_sync_bytes_done") <= must(&m, "ferry_sync_bytes_total"));
            assert_eq!(
                must(
                    &m,
                    "ferry_replica_state{replica=\"site-b\",state=\"shipping\"}"
                ),
                1.0,
                "{m}"
            );
            // The replica answers during the transfer too.
            assert_eq!(must(&scrape(rport), gen_key), 0.0);
            break;
        }
        assert!(
            !sync.is_finished(),
            "the sync ended before a scrape saw it: {m}"
        );
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = sync.join().unwrap();

    // After: the same figures as status and the report.
    let m = scrape(pport);
    let s = p.primary.status();
    let r = &s["sync"]["replicas"][0];
    let g = s["sync"]["generation"].as_f64().unwrap();
    assert_eq!(must(&m, "ferry_generation"), g);
    assert_eq!(must(&m, "ferry_replica_generation{replica=\"site-b\"}"), g);
    assert_eq!(
        must(&m, "ferry_replica_lag_bytes{replica=\"site-b\"}"),
        r["lag_bytes"].as_f64().unwrap()
    );
    assert_eq!(
        must(&m, "ferry_replica_lag_generations{replica=\"site-b\"}"),
        0.0
    );
    assert_eq!(
        must(
            &m,
            "ferry_replica_state{replica=\"site-b\",state=\"committed\"}"
        ),
        1.0
    );
    assert_eq!(must(&m, "ferry_sync_running"), 0.0);
    // The synced image's extents still linger in the intent log.
    let logged = s["intent_log_bytes"].as_f64().unwrap();
    assert!(logged > 0.0, "{s}");
    assert_eq!(must(&m, "ferry_intent_log_bytes"), logged);
    assert_eq!(must(&m, "ferry_syncs_total{result=\"committed\"}"), 1.0);
    assert_eq!(
        must(&m, "ferry_sent_bytes_total{replica=\"site-b\"}"),
        report["bytes_sent"].as_f64().unwrap()
    );
    assert_eq!(
        must(&m, "ferry_wire_bytes_total{replica=\"site-b\"}"),
        report["wire_bytes"].as_f64().unwrap()
    );
    assert_eq!(must(&m, "ferry_sync_duration_seconds_count"), 1.0);
    assert_eq!(must(&m, "ferry_rpo_target_seconds"), 3600.0);
    assert_eq!(must(&m, "ferry_replica_rpo_met{replica=\"site-b\"}"), 1.0);
    // Nothing written since the sync point: the replica holds every write.
    assert_eq!(
        must(
            &m,
            "ferry_replica_recovery_point_age_seconds{replica=\"site-b\"}"
        ),
        0.0
    );

    // The replica acknowledges at its commit record and applies right after, holding its
    // store: a scrape then never waits for it, and shows the generation acknowledged.
    common::wait_for("the apply to hold", || held.exists());
    let rm = scrape(rport);
    assert_eq!(must(&rm, gen_key), g, "{rm}");
    assert_eq!(must(&rm, "ferry_store_images{primary=\"test\"}"), 1.0);
    assert_eq!(
        must(&rm, "ferry_store_image_bytes{primary=\"test\"}"),
        (48 << 20) as f64
    );
    assert_eq!(
        must(&rm, "ferry_store_commit_seconds_count{primary=\"test\"}"),
        1.0
    );
    // `ferry status` on the replica host shows the restore point the mount serves, and says
    // the acknowledged generation is being applied.
    let status = |r: &common::Replica| -> serde_json::Value {
        let out = common::run(
            Command::new(common::FERRY)
                .args(["status", "--json", "--config"])
                .arg(&r.config),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let rs = status(&p.replica);
    let ns = &rs["primaries"][0];
    assert_eq!(ns["applying"].as_f64(), Some(g), "{rs}");
    assert!(ns["generation"].as_f64().unwrap() < g, "{rs}");
    let text = common::run(
        Command::new(common::FERRY)
            .args(["status", "--config"])
            .arg(&p.replica.config),
    );
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains(&format!("generation {g} is acknowledged and being applied")),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );

    // Once applied, the staging is empty.
    fs::remove_file(&held).unwrap();
    let mut rm = String::new();
    common::wait_for("the staging to empty", || {
        rm = scrape(rport);
        must(&rm, "ferry_store_staged_bytes{primary=\"test\"}") == 0.0
    });
    assert_eq!(must(&rm, "ferry_store_namespaces"), 1.0);
    assert_eq!(must(&rm, gen_key), g);
    // The apply's end records the restore point, then removes the commit record.
    common::wait_for("the apply to end", || {
        status(&p.replica)["primaries"][0]["applying"].is_null()
    });
    assert_eq!(
        status(&p.replica)["primaries"][0]["generation"].as_f64(),
        Some(g)
    );
    assert_eq!(must(&rm, "ferry_store_images{primary=\"test\"}"), 1.0);
    assert_eq!(
        must(&rm, "ferry_store_image_bytes{primary=\"test\"}"),
        (48 << 20) as f64
    );
    assert_eq!(must(&rm, "ferry_store_staged_bytes{primary=\"test\"}"), 0.0);
    assert_eq!(
        must(&rm, "ferry_store_commit_seconds_count{primary=\"test\"}"),
        1.0
    );

    // A copy of the image: every chunk of it is new content the replica already holds, so
    // nothing is sent and the chunk-reuse counter counts each one.
    let sent = report["replicas"][0]["chunks_sent"].as_u64().unwrap();
    assert!(sent > 100, "{report}");
    common::run(
        Command::new("cp")
            .arg(p.primary.path("a.img"))
            .arg(p.primary.path("b.img")),
    );
    let copy = p.sync_ok();
    let o = &copy["replicas"][0];
    assert_eq!(o["chunks_sent"].as_u64(), Some(0), "{copy}");
    assert_eq!(o["chunks_held"].as_u64(), Some(sent), "{copy}");
    let m = scrape(pport);
    assert_eq!(
        must(&m, "ferry_chunks_held_total{replica=\"site-b\"}"),
        sent as f64
    );
    assert_eq!(
        must(&m, "ferry_chunks_sent_total{replica=\"site-b\"}"),
        sent as f64
    );
}

#[test]
fn a_busy_metrics_address_is_logged_and_the_mount_serves_on() {
    common::require_root();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let m = common::Mount::prepare_with("", &format!("metrics = \"127.0.0.1:{port}\"\n"));
    m.mount();
    fs::write(m.path("a.img"), b"still serving").unwrap();
    assert_eq!(fs::read(m.path("a.img")).unwrap(), b"still serving");
    let log = m.log_text();
    assert!(
        log.contains(&format!("cannot serve mount metrics on 127.0.0.1:{port}"))
            && log.contains("change [node] metrics"),
        "{log}"
    );
}
