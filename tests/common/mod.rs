//! Shared helpers for the tests that run real mounts and real tools.
#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Fails the test (never skips it) when a tool is missing, naming the Debian package.
pub fn require(cmd: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{cmd} is not installed: install the Debian package {package} (scripts/deps does it as root)"
    );
}

pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts FUSE filesystems and must run as root (CI does)"
    );
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A ferry mount of a fresh backing directory, with its own config and state directory.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub options: String,
}

impl Mount {
    pub fn new() -> Mount {
        Mount::with_options("")
    }

    /// A mount with extra `-o` options (besides config=).
    pub fn with_options(extra: &str) -> Mount {
        let m = Mount::prepare(extra);
        m.mount();
        m
    }

    /// Directories and config, not mounted yet.
    pub fn prepare(extra: &str) -> Mount {
        require_root();
        require("fusermount3", "fuse3");
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        let state = dir.path().join("state");
        for d in [&source, &mnt, &state] {
            std::fs::create_dir(d).unwrap();
        }
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"test\"\nstate_dir = \"{}\"\n",
                state.display()
            ),
        )
        .unwrap();
        let options = if extra.is_empty() {
            format!("config={}", config.display())
        } else {
            format!("config={},{extra}", config.display())
        };
        Mount {
            dir,
            source,
            mnt,
            state,
            config,
            options,
        }
    }

    pub fn mount(&self) {
        run(Command::new(FERRY)
            .arg("mount")
            .arg(&self.source)
            .arg(&self.mnt)
            .arg("-o")
            .arg(&self.options));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    pub fn backing(&self, name: &str) -> PathBuf {
        self.source.join(name)
    }

    pub fn is_mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let mnt = self.mnt.to_string_lossy().to_string();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(mnt.as_str()))
    }

    /// `ferry status --json --ranges`.
    pub fn status(&self) -> Value {
        let out = run(Command::new(FERRY)
            .args(["status", "--json", "--ranges"])
            .arg(&self.mnt));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.status()["pid"].as_i64().unwrap() as i32
    }

    /// The dirty ranges of one image, as the daemon reports them.
    pub fn dirty(&self, image: &str) -> Vec<Range<u64>> {
        let s = self.status();
        s["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["path"] == image)
            .flat_map(|i| i["dirty"].as_array().unwrap().clone())
            .map(|r| r[0].as_u64().unwrap()..r[1].as_u64().unwrap())
            .collect()
    }

    /// Unmounts cleanly and waits for the daemon to exit.
    pub fn unmount(&self) {
        let pid = self.pid();
        run(Command::new("umount").arg(&self.mnt));
        wait_gone(pid);
    }

    /// Kills the daemon with SIGKILL (an unclean stop) and clears the dead mount.
    pub fn kill9(&self) {
        let pid = self.pid();
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_gone(pid);
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.is_mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        }
    }
}

/// Waits until process `pid` has exited. A zombie counts as gone: it holds no files, and the
/// daemon's parent is init, which may take a second or more to reap it.
pub fn wait_gone(pid: i32) {
    let t = Instant::now();
    let zombie = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // "pid (comm) S ...": the state follows the last ')'.
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|st| st == "Z")
            })
            .unwrap_or(false)
    };
    while unsafe { libc::kill(pid, 0) } == 0 && !zombie() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "process {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when every byte of `need` lies in one of `have`.
pub fn covers(have: &[Range<u64>], need: &Range<u64>) -> bool {
    let mut pos = need.start;
    let mut sorted = have.to_vec();
    sorted.sort_by_key(|r| r.start);
    for r in sorted {
        if r.start <= pos && r.end > pos {
            pos = r.end;
        }
    }
    pos >= need.end
}

pub fn cmp(a: &Path, b: &Path) {
    run(Command::new("cmp").arg(a).arg(b));
}
