//! The systemd units under contrib/systemd pass `systemd-analyze verify` (with the binary
//! they start pointed at the one built here): no parse warnings, no unknown options, commands
//! that exist.

mod common;

use std::process::Command;

use common::FERRY;

#[test]
fn the_systemd_units_verify() {
    common::require("systemd-analyze", "systemd");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/sbin/ferry", FERRY);
        // A template is verified as an instance of it.
        let name = name.replace("@.", "@vm.");
        let unit = dir.path().join(&name);
        std::fs::write(&unit, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{name}: systemd-analyze verify says:\n{err}"
        );
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} units found in {}",
        src.display()
    );
}

#[test]
fn man_pages_are_generated_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    common::run(Command::new(FERRY).arg("manpages").arg(dir.path()));
    for page in [
        "ferry",
        "ferry-mount",
        "ferry-sync",
        "ferry-status",
        "ferry-replica",
    ] {
        let text = std::fs::read_to_string(dir.path().join(format!("{page}.1"))).unwrap();
        assert!(
            text.contains(".SH NAME") && text.contains(page),
            "{page}.1:\n{text}"
        );
    }
    let status = std::fs::read_to_string(dir.path().join("ferry-status.1")).unwrap();
    assert!(status.contains("\\-\\-watch"), "{status}");
}
