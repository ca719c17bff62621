//! `ferry keygen` and `ferry id`, run as a user would run them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "ferry failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn is_fingerprint(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

#[test]
fn keygen_prints_the_fingerprint_that_id_prints_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc/ferry/keys");
    let d = dir.to_str().unwrap();

    let fp = stdout(&ferry(&["keygen", "--dir", d])).trim().to_string();
    assert!(is_fingerprint(&fp), "{fp:?}");
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    assert!(dir.join("node.crt").is_file());

    assert_eq!(stdout(&ferry(&["id", "--dir", d])).trim(), fp);

    // The fingerprint is the SHA-256 of the certificate: the library agrees on the file.
    let id = ferry::net::Identity::load(&dir).unwrap();
    assert_eq!(id.fingerprint().to_string(), fp);
}

#[test]
fn json_output_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");
    let d = dir.to_str().unwrap();

    let v: serde_json::Value =
        serde_json::from_str(&stdout(&ferry(&["keygen", "--dir", d, "--json"]))).unwrap();
    let fp = v["fingerprint"].as_str().unwrap();
    assert!(is_fingerprint(fp), "{v}");
    assert_eq!(Path::new(v["key"].as_str().unwrap()), dir.join("node.key"));
    assert_eq!(Path::new(v["cert"].as_str().unwrap()), dir.join("node.crt"));

    let w: serde_json::Value =
        serde_json::from_str(&stdout(&ferry(&["id", "--dir", d, "--json"]))).unwrap();
    assert_eq!(w["fingerprint"], v["fingerprint"]);
    assert_eq!(w["cert"], v["cert"]);
}

#[test]
fn keygen_twice_fails_and_keeps_the_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let fp = stdout(&ferry(&["keygen", "--dir", d]));
    let key = std::fs::read(tmp.path().join("node.key")).unwrap();

    let again = ferry(&["keygen", "--dir", d]);
    assert!(!again.status.success());
    assert!(again.stdout.is_empty());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("node.key") && err.contains("refusing to overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(tmp.path().join("node.key")).unwrap(), key);
    assert_eq!(stdout(&ferry(&["id", "--dir", d])), fp);
}

#[test]
fn id_without_an_identity_says_to_run_keygen() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ferry(&["id", "--dir", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("node.crt") && err.contains("ferry keygen --dir"),
        "{err}"
    );
}

#[test]
fn help_says_what_the_fingerprint_is_for() {
    let help = stdout(&ferry(&["keygen", "--help"]));
    assert!(
        help.contains("fingerprint") && help.contains("primaries"),
        "{help}"
    );
    let help = stdout(&ferry(&["id", "--help"]));
    assert!(help.contains("fingerprint"), "{help}");
}
