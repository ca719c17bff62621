//! The replica's staged-patch log reader: any file opens to its valid prefix, each record it
//! keeps read back and checked again, and a second open finds the same; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-patches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("patches");
    std::fs::write(&p, data).unwrap();
    // The generation the file says it was staged on, so that its records are read.
    let generation = data
        .get(4..12)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let open = || ferry::replica::patches::PatchLog::open(&p, generation, 1 << 16);
    let Ok(log) = open() else {
        return;
    };
    let held: Vec<[u8; 32]> = log.hashes().copied().collect();
    for h in &held {
        let patch = log.get(h).unwrap().expect("listed");
        assert_eq!(&patch.hash, h);
        assert!(
            patch
                .ranges
                .iter()
                .all(|(at, b)| *at as usize + b.len() <= patch.len as usize)
        );
    }
    drop(log);
    assert_eq!(
        open().unwrap().len(),
        held.len(),
        "a second open keeps the same records"
    );
});
