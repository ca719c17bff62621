//! The manifest file reader: a damaged or hostile manifest is refused with an error, never a
//! panic; one that loads saves and loads back equal.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("m");
    std::fs::write(&p, data).unwrap();
    if let Ok(m) = ferry::manifest::load(&p) {
        ferry::manifest::save(&p, &m).unwrap();
        assert_eq!(ferry::manifest::load(&p).unwrap().root(), m.root());
    }
});
