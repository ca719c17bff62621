//! The intent log reader (replayed at every mount): any file is recovered or refused with an
//! error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-intent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(ferry::dirty::FILE_NAME);
    std::fs::write(&p, data).unwrap();
    let _ = ferry::dirty::IntentLog::open(&p, ferry::dirty::DEFAULT_EXTENT_SIZE);
});
