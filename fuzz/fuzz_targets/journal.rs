//! The staging journal and kept-chunk pack reader: any file opens to its valid records (each
//! verified), the damaged ones listed; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-journal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("journal");
    std::fs::write(&p, data).unwrap();
    let Ok(j) = ferry::replica::Journal::open(&p, 1 << 16) else {
        return;
    };
    let held: Vec<[u8; 32]> = j.chunks().map(|(h, _)| *h).collect();
    for h in &held {
        let c = j.get(h).unwrap().expect("listed");
        assert_eq!(blake3::hash(&c).as_bytes(), h);
    }
    let _ = j.verify().unwrap();
});
