//! Time to take over: from `ferry promote` to the first write accepted (and fsynced) on the new
//! primary's mount, for a store of `FERRY_TAKEOVER_GIB` GiB (default 64). The images are sparse
//! files whose committed manifests list one data chunk per 64 KiB, the entries a store of that
//! much real data holds: a promotion reads manifests and metadata only, never image bytes, so
//! this measures what a real store costs without 64 GiB of disk. A benchmark, not a test of
//! the suite (`#[ignore]`): `scripts/bench-takeover` runs it and prints the figures.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use ferry::chunk::ChunkParams;
use ferry::epoch::Holder;
use ferry::manifest::{Entry, Kind, Manifest, hex};

#[test]
#[ignore = "a benchmark: scripts/bench-takeover"]
fn takeover_time() {
    common::require_root();
    let gib: u64 = std::env::var("FERRY_TAKEOVER_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let seeded = dir.path().join("seeded");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&seeded).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fp = common::keygen(&dir.path().join("keys"));
    let params = ChunkParams::default();
    let images = 8u64;
    let size = (gib << 30) / images;
    let chunk = 64u64 << 10;
    let t = Instant::now();
    let mut manifests = BTreeMap::new();
    for i in 0..images {
        let name = format!("vm-{i}.raw");
        std::fs::File::create(seeded.join(&name))
            .unwrap()
            .set_len(size)
            .unwrap();
        let entries: Vec<Entry> = (0..size / chunk)
            .map(|k| Entry {
                offset: k * chunk,
                len: chunk,
                kind: Kind::Data(blake3::hash(&[i.to_le_bytes(), k.to_le_bytes()].concat())),
            })
            .collect();
        manifests.insert(
            name,
            Arc::new(Manifest::new(params, size, entries).unwrap()),
        );
    }
    let entries: usize = manifests.values().map(|m| m.entries().len()).sum();
    let root = hex(&ferry::wire::primary::group_root(&manifests));
    let holder = Holder {
        node: "site-a".into(),
        fingerprint: fp.clone(),
        ..Holder::default()
    };
    ferry::replica::seed(&seeded, &manifests, 7, &root, &holder).unwrap();
    ferry::replica::site::adopt(&store, "site-a", &seeded, &fp).unwrap();
    eprintln!(
        "store of {gib} GiB: {images} sparse images, {entries} manifest entries, made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"site-b\"\nkey_dir = \"{keys}\"\nstate_dir = \"{state}\"\n\
             [replica]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{store}\"\nprimaries = [\"{fp}\"]\n",
            keys = dir.path().join("keys").display(),
            state = dir.path().join("state").display(),
            port = common::free_port(),
            store = store.display(),
        ),
    )
    .unwrap();

    let t0 = Instant::now();
    let out = common::run(
        Command::new(common::FERRY)
            .args(["promote", "--json", "--config"])
            .arg(&config)
            .arg("--mount")
            .arg(&mnt),
    );
    let promoted = t0.elapsed();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("vm-0.raw"))
        .unwrap();
    f.write_all_at(&[0x5a; 4096], 1 << 30).unwrap();
    f.sync_all().unwrap();
    let first_write = t0.elapsed();
    drop(f);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .unwrap_or_default();
    println!("cpu: {cpu}");
    println!(
        "takeover of a {gib} GiB store ({entries} entries): promote {:.0} ms (its own figure {} \
         ms), first write accepted and fsynced {:.0} ms after `ferry promote` started",
        promoted.as_secs_f64() * 1000.0,
        v["took_ms"],
        first_write.as_secs_f64() * 1000.0
    );
    common::run(Command::new("umount").arg(&mnt));
}
