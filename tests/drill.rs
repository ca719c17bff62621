//! The failover drill (`scripts/failover-drill`) as a test: three sites in network namespaces,
//! link cuts, a refused promotion (the newer replica named), a promotion, fencing, a rejoin
//! that saves the old primary's writes aside, and all three converging. The script checks
//! every step and exits non-zero on the first that fails; this runs it with the binary under
//! test and holds the figures it reports to the bounds.

mod common;

use std::process::Command;

#[test]
fn failover_drill() {
    common::require_root();
    common::require("ip", "iproute2");
    common::require("nsenter", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let figures = dir.path().join("figures");
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/failover-drill"
    ))
    .env("FERRY_BIN", common::FERRY)
    .env("FERRY_DRILL_FIGURES", &figures)
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the drill failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Vec<u64> = std::fs::read_to_string(&figures)
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (carried, differed) = (f[0], f[1]);
    assert!(
        carried as f64 <= 1.2 * differed as f64,
        "the rejoined primary's link carried {carried} bytes for {differed} that differed"
    );
}
