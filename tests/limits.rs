//! Bandwidth limits: a sync never ships faster than `bandwidth_limit` allows (held within 5%).

mod common;

use std::fs;

use common::Pair;

#[test]
fn the_overall_and_per_peer_limits_hold() {
    for (toml, limit) in [
        ("[primary]\nbandwidth_limit = \"16MiB/s\"\n", 16u64 << 20),
        ("", 8u64 << 20), // per peer, set below
    ] {
        let p = if toml.is_empty() {
            let p = Pair::with(&[], "");
            // The per-peer limit goes into the [[peer]] section.
            let c =
                fs::read_to_string(&p.primary.config).unwrap() + "bandwidth_limit = \"8MiB/s\"\n";
            fs::write(&p.primary.config, c).unwrap();
            p.primary.unmount();
            p.primary.mount();
            p
        } else {
            Pair::with(&[], toml)
        };
        let mut data = vec![0u8; 32 << 20];
        blake3::Hasher::new()
            .update(b"limits")
            .finalize_xof()
            .fill(&mut data);
        fs::write(p.primary.path("a.img"), &data).unwrap();
        let v = p.sync_ok();
        let r = &v["replicas"][0];
        let bytes = r["bytes_sent"].as_u64().unwrap() as f64;
        let secs = r["duration_ms"].as_u64().unwrap() as f64 / 1000.0;
        let rate = bytes / secs;
        assert!(
            rate <= 1.05 * limit as f64,
            "{rate:.0} B/s over a limit of {limit} B/s: {v}"
        );
        assert!(bytes >= 32.0 * 1048576.0 * 0.99, "{v}");
    }
}
