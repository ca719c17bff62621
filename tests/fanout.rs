//! Several replicas: k of n must commit, each at its own generation; secondary selection with
//! failover; a replica offline for several generations catches up in one plan.

mod common;

use std::fs;
use std::process::Command;

use common::{FERRY, Mount, Replica, keygen};

struct Fanout {
    replicas: Vec<Replica>,
    primary: Mount,
}

fn fanout(n: usize, primary_toml: &str, zones: &[&str]) -> Fanout {
    let primary = Mount::prepare_with("", primary_toml);
    let fp = keygen(&primary.dir.path().join("keys"));
    let replicas: Vec<Replica> = (0..n).map(|_| Replica::new(&[&fp])).collect();
    let mut config = fs::read_to_string(&primary.config).unwrap();
    for (i, r) in replicas.iter().enumerate() {
        config += &format!(
            "[[peer]]\nname = \"r{i}\"\naddr = \"127.0.0.1:{}\"\nfingerprint = \"{}\"\nzone = \"{}\"\n",
            r.port,
            r.fingerprint,
            zones[i % zones.len()]
        );
    }
    fs::write(&primary.config, config).unwrap();
    primary.mount();
    Fanout { replicas, primary }
}

impl Fanout {
    fn sync(&self) -> (serde_json::Value, bool) {
        let out = Command::new(FERRY)
            .args(["sync", "--json", "--timeout", "30"])
            .arg(&self.primary.mnt)
            .output()
            .unwrap();
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (v, out.status.success())
    }

    fn has(&self, i: usize, name: &str) -> bool {
        fs::read(self.replicas[i].image(name)).ok()
            == Some(fs::read(self.primary.backing(name)).unwrap())
    }

    fn selected(&self) -> Vec<String> {
        let s = self.primary.status();
        s["sync"]["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["selected"] == true)
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }
}

fn write(m: &Mount, name: &str, seed: u64) {
    let mut v = vec![0u8; 2 << 20];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    fs::write(m.path(name), v).unwrap();
}

#[test]
fn k_of_n_with_distinct_zones_and_failover_to_a_seeded_standby() {
    let mut f = fanout(
        3,
        "[primary]\nreplicas = 2\nfailover_after = \"1s\"\n",
        &["eu", "eu", "us"],
    );
    write(&f.primary, "a.img", 1);
    let (v, ok) = f.sync();
    assert!(ok, "{v}");
    assert_eq!(v["committed"], 2);
    // Two zones: one eu replica and the us one.
    let sel = f.selected();
    assert_eq!(sel.len(), 2, "{sel:?}");
    assert!(
        sel.contains(&"r2".to_string()),
        "the only us replica: {sel:?}"
    );
    let reasons = f.primary.status()["sync"]["replicas"].to_string();
    assert!(reasons.contains("standby"), "{reasons}");
    // A selected replica dies; after failover_after the standby takes its place and is seeded.
    let dead = if sel.contains(&"r0".to_string()) {
        0
    } else {
        1
    };
    let standby = 1 - dead;
    f.replicas[dead].kill9();
    write(&f.primary, "b.img", 2);
    let (v, ok) = f.sync();
    assert!(!ok, "only one of two committed: {v}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    write(&f.primary, "c.img", 3);
    let (v, ok) = f.sync();
    assert!(ok, "the standby replaced the dead replica: {v}");
    for name in ["a.img", "b.img", "c.img"] {
        assert!(
            f.has(standby, name),
            "standby r{standby} seeded with {name}"
        );
        assert!(f.has(2, name));
    }
    let status = f.primary.status()["sync"]["replicas"].to_string();
    assert!(status.contains("replaced"), "{status}");
}

#[test]
fn a_replica_offline_for_several_generations_catches_up_in_one_plan() {
    let mut f = fanout(2, "[primary]\nreplicas = 2\n", &["eu", "us"]);
    write(&f.primary, "a.img", 10);
    assert!(f.sync().1);
    f.replicas[1].kill9();
    for i in 0..2 {
        write(&f.primary, "a.img", 20 + i);
        let (v, ok) = f.sync();
        assert!(!ok);
        assert_eq!(v["committed"], 1, "{v}");
        assert!(f.has(0, "a.img"));
    }
    f.replicas[1].start();
    let (v, ok) = f.sync();
    assert!(ok, "{v}");
    assert!(f.has(1, "a.img"));
    let r1 = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "r1")
        .unwrap()
        .clone();
    assert_eq!(r1["attempts"], 1, "one plan, one connection: {r1}");
    // It jumped over the generations it missed.
    let status = f.primary.status();
    let gens: Vec<u64> = status["sync"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens[0], gens[1], "{status}");
}

#[test]
fn a_fan_out_makes_each_data_frame_once() {
    common::require_root();
    let f = fanout(3, "[primary]\nreplicas = 3\n", &["a", "b", "c"]);
    fs::write(f.primary.path("vm.img"), common::random(24 << 20, 7)).unwrap();
    let (v, ok) = f.sync();
    assert!(ok, "{v}");
    let rs = v["replicas"].as_array().unwrap();
    assert_eq!(rs.len(), 3);
    let chunks: Vec<u64> = rs
        .iter()
        .map(|r| r["chunks_sent"].as_u64().unwrap())
        .collect();
    let reused: u64 = rs
        .iter()
        .map(|r| r["chunks_reused"].as_u64().unwrap())
        .sum();
    assert!(chunks.iter().all(|c| *c == chunks[0] && *c > 100), "{v}");
    // Every chunk was read, verified and compressed once, for whichever replica wanted it
    // first; the two others took the frame made for it.
    eprintln!(
        "fan-out of 24 MiB to 3 replicas: {} ms, {reused} of {} chunk frames reused",
        v["duration_ms"],
        3 * chunks[0]
    );
    assert_eq!(reused, 2 * chunks[0], "{v}");
    for i in 0..3 {
        assert!(f.has(i, "vm.img"));
    }

    // Scattered small writes go as patches: each patch's ranges are read once too.
    {
        use std::os::unix::fs::FileExt;
        let img = fs::OpenOptions::new()
            .write(true)
            .open(f.primary.path("vm.img"))
            .unwrap();
        for i in 0..40u64 {
            img.write_all_at(&common::random(4096, 100 + i), i * 600_000 + 12_288)
                .unwrap();
        }
    }
    let (v, ok) = f.sync();
    assert!(ok, "{v}");
    let rs = v["replicas"].as_array().unwrap();
    let sent = |r: &serde_json::Value, what: &str| r[what].as_u64().unwrap();
    let patches = sent(&rs[0], "patches_sent");
    let frames = patches + sent(&rs[0], "chunks_sent");
    assert!(patches > 20, "{v}");
    for r in rs {
        assert_eq!(sent(r, "patches_sent"), patches, "{v}");
        assert_eq!(
            sent(r, "patches_sent") + sent(r, "chunks_sent"),
            frames,
            "{v}"
        );
    }
    let reused: u64 = rs.iter().map(|r| sent(r, "chunks_reused")).sum();
    assert_eq!(reused, 2 * frames, "{v}");
    for i in 0..3 {
        assert!(f.has(i, "vm.img"));
    }
}
