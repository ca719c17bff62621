//! Many primaries, one disaster-recovery site: one replica daemon keeps a namespace per
//! primary (its [node] name, bound to its key on first contact), and no primary can reach
//! another's.
//!
//! The three-primary test runs each primary's mount daemon in its own network namespace, each
//! joined to the replica's namespace by a veth pair:
//!
//! ```text
//!   host-1 (10.232.1.1) ──veth──┐
//!   host-2 (10.232.2.1) ──veth──┼──► replica namespace: ferry replica on 0.0.0.0:PORT
//!   host-3 (10.232.3.1) ──veth──┘     (10.232.1.2, 10.232.2.2, 10.232.3.2), mount on MNT
//! ```

mod common;

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{FERRY, Mount, Replica, keygen, random, require, require_root, run, sync};
use serde_json::Value;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Network namespaces removed on drop: the replica's and one per primary.
struct Nets {
    replica: String,
    primaries: Vec<String>,
}

impl Nets {
    fn new(primaries: usize) -> Nets {
        require_root();
        require("ip", "iproute2");
        require("nsenter", "util-linux");
        let base = format!(
            "ferry-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let nets = Nets {
            replica: format!("{base}-r"),
            primaries: (1..=primaries).map(|i| format!("{base}-p{i}")).collect(),
        };
        run(Command::new("ip").args(["netns", "add", &nets.replica]));
        let ip = |ns: &str, args: &[&str]| run(Command::new("ip").args(["-n", ns]).args(args));
        ip(&nets.replica, &["link", "set", "lo", "up"]);
        for (i, ns) in nets.primaries.iter().enumerate() {
            let i = i + 1;
            run(Command::new("ip").args(["netns", "add", ns]));
            let (here, there) = (format!("fp{i}"), format!("fr{i}"));
            run(Command::new("ip").args([
                "link",
                "add",
                &here,
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &there,
                "netns",
                &nets.replica,
            ]));
            for (ns, dev, host) in [(ns.as_str(), &here, 1), (&nets.replica, &there, 2)] {
                ip(
                    ns,
                    &["addr", "add", &format!("10.232.{i}.{host}/24"), "dev", dev],
                );
                ip(ns, &["link", "set", dev, "up"]);
            }
            ip(ns, &["link", "set", "lo", "up"]);
        }
        nets
    }
}

impl Drop for Nets {
    fn drop(&mut self) {
        for ns in self.primaries.iter().chain([&self.replica]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A primary mount and its key: [node] name `name`, not mounted yet.
fn prepare(name: &str) -> (Mount, String) {
    let m = Mount::prepare_with("", "");
    let fp = keygen(&m.dir.path().join("keys"));
    let c = fs::read_to_string(&m.config)
        .unwrap()
        .replace("name = \"test\"", &format!("name = \"{name}\""));
    fs::write(&m.config, c).unwrap();
    (m, fp)
}

/// Points `m` at the replica (fingerprint `fp`) at `addr`.
fn peer(m: &Mount, addr: &str, fp: &str) {
    let c = fs::read_to_string(&m.config).unwrap()
        + &format!("[[peer]]\nname = \"dr\"\naddr = \"{addr}\"\nfingerprint = \"{fp}\"\n");
    fs::write(&m.config, c).unwrap();
}

/// Renames `m`'s node (its namespace on replicas) while it is unmounted.
fn rename(m: &Mount, from: &str, to: &str) {
    let c = fs::read_to_string(&m.config)
        .unwrap()
        .replace(&format!("name = \"{from}\""), &format!("name = \"{to}\""));
    fs::write(&m.config, c).unwrap();
}

/// Mounts `m`, its daemon in network namespace `net` (`nsenter --net`, so that the FUSE mount
/// is visible here).
fn mount(m: &Mount, net: Option<&str>) {
    let mut cmd = match net {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(FERRY);
            c
        }
        None => Command::new(FERRY),
    };
    run(cmd
        .arg("mount")
        .arg(&m.source)
        .arg(&m.mnt)
        .arg("-o")
        .arg(&m.options));
    assert!(m.is_mounted());
}

/// `ferry COMMAND --json --config FILE` of the replica.
fn replica_json(r: &Replica, command: &str) -> Value {
    let out = run(Command::new(FERRY)
        .args([command, "--json", "--config"])
        .arg(&r.config));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The replica daemon's resident memory, in KiB.
fn rss_kib(r: &Replica) -> u64 {
    let pid = replica_json(r, "status")["pid"].as_u64().unwrap();
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Three primaries in three network namespaces sync to one replica at once, three rounds, each
/// with an image of the same name: every generation of each commits in that primary's own
/// namespace, byte-identical to it, shown under its name on the replica mount, with its own
/// generations and restore points; the replica's memory grows with what it indexes.
#[test]
fn three_primaries_sync_at_once_each_into_its_own_namespace() {
    let nets = Nets::new(3);
    let names = ["host-1", "host-2", "host-3"];
    let prepared: Vec<(Mount, String)> = names.iter().map(|n| prepare(n)).collect();
    let pins: Vec<&str> = prepared.iter().map(|(_, fp)| fp.as_str()).collect();
    let mut replica = Replica::with_net(&pins, "mount = \"{mnt}\"\nkeep = 2", Some(&nets.replica));
    for (i, (m, _)) in prepared.iter().enumerate() {
        let addr = format!("10.232.{}.2:{}", i + 1, replica.port);
        peer(m, &addr, &replica.fingerprint);
        mount(m, Some(&nets.primaries[i]));
    }
    let primaries: Vec<(String, &Mount)> = names
        .iter()
        .zip(&prepared)
        .map(|(n, (m, _))| (n.to_string(), m))
        .collect();
    let rss_before = rss_kib(&replica);

    let mut generations: Vec<Vec<u64>> = vec![Vec::new(); 3];
    for round in 0..3u64 {
        // Every primary has a disk.img (different bytes each) and one image of its own.
        for (i, (name, m)) in primaries.iter().enumerate() {
            let seed = round * 10 + i as u64;
            let mut disk = if round == 0 {
                random(24 << 20, 100 + i as u64)
            } else {
                fs::read(m.backing("disk.img")).unwrap()
            };
            let at = ((round as usize * 5) << 20) % disk.len();
            disk[at..at + (1 << 20)].copy_from_slice(&random(1 << 20, seed));
            fs::write(m.path("disk.img"), &disk).unwrap();
            fs::write(m.path(&format!("{name}.img")), random(2 << 20, seed + 1000)).unwrap();
        }
        let runs: Vec<_> = primaries
            .iter()
            .map(|(_, m)| common::sync_in_background(&m.mnt))
            .collect();
        for (i, r) in runs.into_iter().enumerate() {
            let (v, ok, err) = r.join().unwrap();
            assert!(
                ok,
                "{} round {round}: {v} {err}\n{}",
                primaries[i].0,
                replica.log_text()
            );
            generations[i].push(v["generation"].as_u64().unwrap());
        }
        for (i, (name, m)) in primaries.iter().enumerate() {
            for img in ["disk.img".to_string(), format!("{name}.img")] {
                common::cmp(&m.backing(&img), &replica.store.join(name).join(&img));
                common::cmp(&m.backing(&img), &replica.mnt.join(name).join(&img));
            }
            // Only its own images in its namespace.
            let mut listed: Vec<String> = fs::read_dir(replica.mnt.join(name))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            listed.sort();
            assert_eq!(listed, ["disk.img".to_string(), format!("{name}.img")]);
            let g = generations[i].last().unwrap();
            assert!(
                replica
                    .mnt
                    .join(format!("{name}/.ferry/generations/{g}/disk.img"))
                    .exists()
            );
        }
    }
    let mut root: Vec<String> = fs::read_dir(&replica.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    assert_eq!(root, ["host-1", "host-2", "host-3"]);

    // Each primary's generations and restore points are its own.
    let v = replica_json(&replica, "status");
    let listed = v["primaries"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{v}");
    for (i, (name, _)) in primaries.iter().enumerate() {
        let p = &listed[i];
        assert_eq!(p["primary"], name.as_str(), "{v}");
        assert_eq!(p["fingerprint"], pins[i], "{v}");
        assert_eq!(p["generation"], *generations[i].last().unwrap(), "{v}");
        assert_eq!(
            p["restore_points"],
            serde_json::json!(generations[i][1..]),
            "{v}"
        );
    }
    let rss_after = rss_kib(&replica);
    eprintln!(
        "replica resident memory: {rss_before} KiB before the first sync, {rss_after} KiB \
         after 3 x 3 generations of 26 MiB per primary"
    );
    drop(primaries);
    replica.stop();
}

/// A second primary, trusted by the replica, that calls itself by the first one's name is
/// refused before it learns anything of that namespace, and the first one's images and
/// generation stay as they were; the first one's key under a new name is refused too.
#[test]
fn a_primary_cannot_reach_another_primarys_namespace() {
    require_root();
    let (a, fa) = prepare("site-a");
    let (b, fb) = prepare("site-a");
    let replica = Replica::new(&[&fa, &fb]);
    let addr = format!("127.0.0.1:{}", replica.port);
    for m in [&a, &b] {
        peer(m, &addr, &replica.fingerprint);
        mount(m, None);
    }
    fs::write(a.path("vm.img"), random(4 << 20, 1)).unwrap();
    let (v, ok, err) = sync(&a.mnt);
    assert!(ok, "{v} {err}");
    let committed = v["generation"].clone();

    fs::write(b.path("vm.img"), random(4 << 20, 2)).unwrap();
    let (v, ok, err) = sync(&b.mnt);
    assert!(!ok, "the impostor's sync committed: {v}");
    let said = format!("{v} {err}");
    assert!(
        said.contains("namespace site-a of this replica belongs to the primary with key")
            && said.contains("namespace_taken"),
        "{said}"
    );
    common::cmp(&a.backing("vm.img"), &replica.store.join("site-a/vm.img"));
    let status = replica_json(&replica, "status");
    assert_eq!(status["primaries"][0]["generation"], committed, "{status}");
    assert_eq!(status["primaries"].as_array().unwrap().len(), 1, "{status}");

    // Under its own name it gets its own namespace.
    b.unmount();
    rename(&b, "site-a", "site-c");
    mount(&b, None);
    let (v, ok, err) = sync(&b.mnt);
    assert!(ok, "{v} {err}");
    common::cmp(&b.backing("vm.img"), &replica.store.join("site-c/vm.img"));
    common::cmp(&a.backing("vm.img"), &replica.store.join("site-a/vm.img"));

    // The first primary's key under another name is refused: it has its namespace.
    a.unmount();
    rename(&a, "site-a", "site-x");
    mount(&a, None);
    let (v, ok, err) = sync(&a.mnt);
    assert!(!ok, "{v}");
    assert!(
        format!("{v} {err}").contains("sends to namespace site-a"),
        "{v} {err}"
    );
    assert!(!replica.store.join("site-x").exists());
}
