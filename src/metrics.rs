//! Prometheus metrics, opt-in (`[node] metrics = "127.0.0.1:9477"`): a small HTTP endpoint
//! that answers `GET /metrics` with the OpenMetrics text of a `prometheus-client` registry, and
//! a helper for collectors that read their gauges from a snapshot at scrape time.
//!
//! A scrape never waits for a sync: collectors read snapshots (the sync engine's board, the
//! replica store's figures), not the working state.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `registry` at `http://addr/metrics` on a background thread. A busy address is
/// logged as an error naming it and what to do, and the caller goes on serving its mount or
/// store without metrics.
pub fn serve(addr: SocketAddr, registry: Registry, what: &str) {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            log::error!(
                "cannot serve {what} metrics on {addr}: {e}; change [node] metrics in the \
                 config file (the {what} runs on without metrics)"
            );
            return;
        }
    };
    log::info!("{what} metrics on http://{addr}/metrics");
    let registry = Arc::new(registry);
    let spawned = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let r = registry.clone();
                let _ = std::thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || answer(conn, &r));
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the metrics thread: {e}");
    }
}

fn answer(conn: TcpStream, registry: &Registry) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Skip the headers.
    let mut h = String::new();
    while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = if line.starts_with("GET ") && path == "/metrics" {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => ("200 OK", CONTENT_TYPE, body),
            Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
        }
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    let mut w = &conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Writes gauges into a collector's encoder, one family per name.
pub struct Gauges<'a> {
    enc: DescriptorEncoder<'a>,
}

impl<'a> Gauges<'a> {
    pub fn new(enc: DescriptorEncoder<'a>) -> Gauges<'a> {
        Gauges { enc }
    }

    /// One gauge family: `name` with `help`, one sample per label set.
    pub fn family(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(Vec<(&str, String)>, f64)],
    ) -> Result<(), std::fmt::Error> {
        if samples.is_empty() {
            return Ok(());
        }
        let mut fam = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            let e = fam.encode_family(labels)?;
            ConstGauge::new(*v).encode(e)?;
        }
        Ok(())
    }

    /// One gauge without labels.
    pub fn one(&mut self, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
        self.family(name, help, &[(vec![], v)])
    }
}
