//! Shared helpers for the tests that run real mounts and real tools.
#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Waits until `cond` holds, polling every 10 ms; fails the test after 30 s, naming `what`.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[allow(unused_imports)]
pub use ferry::testutil::random;

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
        Mount::prepare_with(extra, "")
    }

    /// Like [`Mount::prepare`], with more TOML appended to the config (after `[node]`).
    pub fn prepare_with(extra: &str, toml: &str) -> Mount {
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
                "[node]\nname = \"test\"\nstate_dir = \"{}\"\nkey_dir = \"{}\"\n{toml}",
                state.display(),
                dir.path().join("keys").display()
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
        self.mount_with_env(&[]);
    }

    /// Mounts with these environment variables for the daemon (e.g. `FAILPOINTS`).
    pub fn mount_with_env(&self, env: &[(&str, &str)]) {
        run(Command::new(FERRY)
            .arg("mount")
            .arg(&self.source)
            .arg(&self.mnt)
            .arg("-o")
            .arg(&self.options)
            .envs(env.iter().copied()));
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

    /// The mount daemon's log.
    pub fn log_text(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.state.join("mounts")) {
            for d in rd.flatten() {
                out += &std::fs::read_to_string(d.path().join("ferry.log")).unwrap_or_default();
            }
        }
        out
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

/// A port free for UDP and TCP on loopback.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    // Outside the kernel's ephemeral range (32768-60999 by default): a port the kernel hands
    // out for port 0 is handed out again at once on a busy run, so a daemon that binds it later
    // (a relay started again after a cut, an etcd member) could find it taken by another
    // process's outgoing socket. Each test process starts at its own place in 20000-31999.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 600 * 20;
    loop {
        let p = (20_000 + (start + NEXT.fetch_add(1, SeqCst)) % 12_000) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

/// `ferry keygen --dir DIR`; returns the fingerprint.
pub fn keygen(dir: &Path) -> String {
    let out = run(Command::new(FERRY).args(["keygen", "--dir"]).arg(dir));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The node name of the primaries [`Mount::prepare`] makes: their namespace on a replica.
pub const PRIMARY: &str = "test";

/// A replica daemon (`ferry replica --config`) run as a child process.
pub struct Replica {
    pub dir: tempfile::TempDir,
    /// The replica mount's mountpoint (mounted when the config says `mount = "{mnt}"`).
    pub mnt: PathBuf,
    /// The [`PRIMARY`]'s directory on the replica mount.
    pub served: PathBuf,
    /// The store (`[replica] store`): a namespace per primary.
    pub store: PathBuf,
    /// The [`PRIMARY`]'s namespace in the store: its images and their metadata.
    pub images: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    pub fingerprint: String,
    /// The network namespace the daemon runs in, if not this one.
    net: Option<String>,
    /// Environment variables of the daemon's next [`Replica::start`] (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// A command and its arguments that run the daemon at its next [`Replica::start`] (e.g.
    /// `setpriv` dropping a capability); not with a network namespace.
    pub launcher: Vec<String>,
    child: Option<std::process::Child>,
}

impl Replica {
    /// Image `name` of the [`PRIMARY`]'s namespace in the store, once the store has settled:
    /// the replica acknowledges a generation when its commit record is durable and applies it
    /// to the images right after (the commit record goes when that is done). Waits up to 10 s.
    pub fn image(&self, name: &str) -> PathBuf {
        ferry::replica::wait_settled(&self.images, Duration::from_secs(10));
        self.images.join(name)
    }

    /// A replica that trusts the primaries with these fingerprints.
    pub fn new(primaries: &[&str]) -> Replica {
        Replica::with(primaries, "")
    }

    /// A replica with more lines in its `[replica]` section (`{mnt}` stands for a mountpoint
    /// made for it, [`Replica::mnt`]).
    pub fn with(primaries: &[&str], extra: &str) -> Replica {
        Replica::with_net(primaries, extra, None)
    }

    /// Like [`Replica::with`], the daemon in network namespace `net` (listening on every
    /// address there), or here on loopback.
    pub fn with_net(primaries: &[&str], extra: &str, net: Option<&str>) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let extra = extra.replace("{mnt}", &mnt.display().to_string());
        let store = dir.path().join("store");
        let fingerprint = keygen(&dir.path().join("keys"));
        let port = free_port();
        let config = dir.path().join("replica.toml");
        let list: Vec<String> = primaries.iter().map(|p| format!("\"{p}\"")).collect();
        let host = if net.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        std::fs::write(
            &config,
            format!(
                "[node]\nname = \"replica\"\nkey_dir = \"{}\"\nstate_dir = \"{}\"\n\
                 [replica]\nlisten = \"{host}:{port}\"\nstore = \"{}\"\nprimaries = [{}]\n{extra}\n",
                dir.path().join("keys").display(),
                dir.path().join("state").display(),
                store.display(),
                list.join(", ")
            ),
        )
        .unwrap();
        let log = dir.path().join("replica.log");
        let mut r = Replica {
            dir,
            served: mnt.join(PRIMARY),
            mnt,
            images: store.join(PRIMARY),
            store,
            config,
            log,
            port,
            fingerprint,
            net: net.map(str::to_string),
            env: Vec::new(),
            launcher: Vec::new(),
            child: None,
        };
        r.start();
        r
    }

    pub fn start(&mut self) {
        // The log is appended to: only what this start writes counts.
        let from = self.log_text().len();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // `nsenter --net` enters only the network namespace: the replica mount made there is
        // visible here (`ip netns exec` would make it in a private mount namespace).
        let mut cmd = match &self.net {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(FERRY);
                c
            }
            None => match &self.launcher[..] {
                [] => Command::new(FERRY),
                [first, rest @ ..] => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(FERRY);
                    c
                }
            },
        };
        let child = cmd
            .args(["replica", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready when it logs that it listens.
        let t = Instant::now();
        while !self.log_text()[from..].contains("replica listening") {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "replica did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid (run here, not through `nsenter`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the replica runs").id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait until the daemon has exited (its mount unmounted).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's next [`Replica::start`] runs with failpoints `spec` (`FAILPOINTS`' syntax);
    /// returns the directory where a point set to `return(hold)` puts a file of its name while
    /// it holds (remove the file to let it go).
    pub fn failpoints(&mut self, spec: &str) -> tempfile::TempDir {
        let flags = tempfile::tempdir().unwrap();
        self.env = vec![
            ("FAILPOINTS".to_string(), spec.to_string()),
            (
                "FERRY_FAILPOINT_DIR".to_string(),
                flags.path().display().to_string(),
            ),
        ];
        flags
    }

    pub fn is_mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(self.mnt.to_str().unwrap()))
    }

    /// The `[[peer]]` section a primary needs to ship to this replica.
    pub fn peer_toml(&self) -> String {
        format!(
            "[[peer]]\nname = \"site-b\"\naddr = \"127.0.0.1:{}\"\nfingerprint = \"{}\"\n",
            self.port, self.fingerprint
        )
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
        if self.is_mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// A primary mount shipping to one replica.
pub struct Pair {
    pub replica: Replica,
    pub primary: Mount,
}

impl Pair {
    pub fn new() -> Pair {
        Pair::with_env(&[])
    }

    /// A pair whose mount daemon runs with these environment variables.
    pub fn with_env(env: &[(&str, &str)]) -> Pair {
        Pair::with(env, "")
    }

    /// A pair with environment variables for the mount daemon and more primary config (e.g. a
    /// `[primary]` section).
    pub fn with(env: &[(&str, &str)], toml: &str) -> Pair {
        Pair::with_replica(env, toml, "")
    }

    /// A pair whose replica has more lines in its `[replica]` section (see [`Replica::with`]).
    pub fn with_replica(env: &[(&str, &str)], toml: &str, replica: &str) -> Pair {
        Pair::build(env, toml, replica, |_| {})
    }

    /// A pair whose mount is prepared by `adjust` (e.g. another backing directory) before it
    /// is mounted.
    pub fn build(
        env: &[(&str, &str)],
        toml: &str,
        replica: &str,
        adjust: impl FnOnce(&mut Mount),
    ) -> Pair {
        Pair::launched(&[], env, toml, replica, adjust)
    }

    /// A pair whose mount daemon is started through `launcher` (a command and its arguments
    /// that run the rest, e.g. `setpriv` dropping a capability).
    pub fn launched(
        launcher: &[&str],
        env: &[(&str, &str)],
        toml: &str,
        replica: &str,
        adjust: impl FnOnce(&mut Mount),
    ) -> Pair {
        let mut primary = Mount::prepare_with("", toml);
        adjust(&mut primary);

        let fp = keygen(&primary.dir.path().join("keys"));
        let replica = Replica::with(&[&fp], replica);
        let config = std::fs::read_to_string(&primary.config).unwrap() + &replica.peer_toml();
        std::fs::write(&primary.config, config).unwrap();
        let mut cmd = match launcher {
            [] => Command::new(FERRY),
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(FERRY);
                c
            }
        };
        cmd.arg("mount")
            .arg(&primary.source)
            .arg(&primary.mnt)
            .arg("-o")
            .arg(&primary.options);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd);
        Pair { replica, primary }
    }

    /// `ferry sync --json`; returns the report and whether the command succeeded.
    pub fn sync(&self) -> (Value, bool) {
        let (v, ok, err) = sync(&self.primary.mnt);
        if v.is_null() {
            return (serde_json::json!({ "stderr": err }), ok);
        }
        (v, ok)
    }

    /// A sync that must commit.
    pub fn sync_ok(&self) -> Value {
        let (v, ok) = self.sync();
        assert!(
            ok,
            "sync failed: {v}\nreplica log:\n{}",
            self.replica.log_text()
        );
        v
    }

    pub fn replica_path(&self, name: &str) -> PathBuf {
        self.replica.image(name)
    }
}

/// The one file named `name` somewhere under `dir` (e.g. in a mount's state directory).
pub fn find_file(dir: &Path, name: &str) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for ent in std::fs::read_dir(&d).unwrap().flatten() {
            let p = ent.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == name) {
                return p;
            }
        }
    }
    panic!("no {name} under {}", dir.display());
}

/// How an image's bytes change, for the reference-model tests (tests/model.rs through the
/// kernel, tests/core.rs in-process).
pub mod etcd;

pub mod bytes {
    /// `data` written at `off`, growing the image if needed.
    pub fn write(d: &mut Vec<u8>, off: u64, data: &[u8]) {
        let end = off as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(data);
    }

    /// fallocate(ZERO_RANGE) (growing the image unless `keep_size`), or PUNCH_HOLE with
    /// `keep_size`: `[off, off + len)` reads as zeros.
    pub fn zero(d: &mut Vec<u8>, off: u64, len: u64, keep_size: bool) {
        let end = (off + len) as usize;
        if !keep_size && d.len() < end {
            d.resize(end, 0);
        }
        let end = end.min(d.len());
        if (off as usize) < end {
            d[off as usize..end].fill(0);
        }
    }
}

/// Stamped blocks: block i - 1 of an image holds stamp i, written in order with O_DIRECT, so a
/// point-in-time copy holds exactly the stamps 1..m.
pub mod stamps {
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::OpenOptionsExt;

    pub const BLOCK: usize = 4096;

    /// A 4 KiB buffer aligned for O_DIRECT.
    pub struct Aligned(*mut u8);

    impl Aligned {
        pub fn new() -> Aligned {
            Aligned(unsafe { alloc_zeroed(Layout::from_size_align(BLOCK, BLOCK).unwrap()) })
        }
        pub fn bytes(&mut self) -> &mut [u8] {
            unsafe { std::slice::from_raw_parts_mut(self.0, BLOCK) }
        }
    }

    impl Drop for Aligned {
        fn drop(&mut self) {
            unsafe { dealloc(self.0, Layout::from_size_align(BLOCK, BLOCK).unwrap()) }
        }
    }

    pub fn stamp(i: u64) -> Vec<u8> {
        let mut b = vec![(i % 251) as u8 + 1; BLOCK];
        b[..8].copy_from_slice(&i.to_le_bytes());
        b
    }

    /// The number of leading stamped blocks, checking that every other block is zero.
    pub fn prefix(image: &[u8]) -> u64 {
        let mut m = 0;
        for (j, blk) in image.chunks(BLOCK).enumerate() {
            let i = j as u64 + 1;
            if blk.iter().all(|&b| b == 0) {
                continue;
            }
            assert_eq!(
                blk,
                &stamp(i)[..],
                "block {j} holds a torn or foreign stamp"
            );
            assert_eq!(
                m,
                i - 1,
                "stamp {i} present but stamp {} missing: not a prefix",
                m + 1
            );
            m = i;
        }
        m
    }

    /// Opens `path` for O_DIRECT writes, as QEMU's `cache=none` does.
    pub fn open_direct(path: &std::path::Path) -> fs::File {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap()
    }

    /// Images of `blocks` zero blocks at `paths` (before the first sync).
    pub fn create(paths: &[std::path::PathBuf], blocks: u64) {
        for p in paths {
            fs::File::create(p)
                .unwrap()
                .set_len(blocks * BLOCK as u64)
                .unwrap();
        }
    }

    /// A thread writing stamp i into each image in turn (O_DIRECT, as QEMU's `cache=none`),
    /// for i in 1..=blocks, pausing after every write: at any instant a later image holds i or
    /// i - 1 stamps when an earlier one holds i.
    pub struct Stamper {
        done: std::sync::Arc<std::sync::atomic::AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Stamper {
        pub fn start(
            paths: &[std::path::PathBuf],
            blocks: u64,
            pause: std::time::Duration,
        ) -> Stamper {
            use std::os::unix::fs::FileExt;
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let files: Vec<fs::File> = paths.iter().map(|p| open_direct(p)).collect();
            let flag = done.clone();
            let thread = std::thread::spawn(move || {
                let mut buf = Aligned::new();
                for i in 1..=blocks {
                    buf.bytes().copy_from_slice(&stamp(i));
                    for f in &files {
                        f.write_all_at(buf.bytes(), (i - 1) * BLOCK as u64).unwrap();
                        std::thread::sleep(pause);
                    }
                }
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            Stamper { done, thread }
        }

        /// Whether every stamp is written.
        pub fn done(&self) -> bool {
            self.done.load(std::sync::atomic::Ordering::SeqCst)
        }

        pub fn join(self) {
            self.thread.join().unwrap();
        }
    }
}

/// A tmpfs of `size` (mount(8)'s syntax, e.g. "6m") mounted on `dir`, unmounted when dropped: a
/// small filesystem to fill.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir));
        Tmpfs(dir.to_path_buf())
    }

    /// Grows (or shrinks) it to `size`.
    pub fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// `ferry sync --json --timeout 60` on the mount at `mnt`: the report (null if none), whether
/// it committed, its stderr.
pub fn sync(mnt: &Path) -> (Value, bool, String) {
    let out = Command::new(FERRY)
        .args(["sync", "--json", "--timeout", "60"])
        .arg(mnt)
        .output()
        .unwrap();
    (
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`sync`] in a thread, so that a test can watch the sync meanwhile (the mount stays with
/// the test, which stops its daemons when dropped).
pub fn sync_in_background(mnt: &Path) -> std::thread::JoinHandle<(Value, bool, String)> {
    let mnt = mnt.to_path_buf();
    std::thread::spawn(move || sync(&mnt))
}

/// The threads of a process, as (name, nice value, time slice in ns if the kernel
/// reports one).
pub fn threads_of(pid: i32) -> Vec<(String, i64, Option<u64>)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name; nice is field 19 of stat(5), the 17th after it.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        let sched = std::fs::read_to_string(t.path().join("sched")).unwrap_or_default();
        let slice = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok());
        out.push((comm.trim().to_string(), nice, slice));
    }
    out
}

/// The CPUs thread `tid` of `pid` may run on, as `Cpus_allowed_list` of proc(5) gives them
/// ("0-1").
pub fn cpus_of(pid: i32, tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"));
    line.unwrap().split(':').nth(1).unwrap().trim().to_string()
}

/// The threads of `pid` as (name, the CPUs it may run on), [`cpus_of`].
pub fn thread_cpus(pid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let tid = t.file_name().to_string_lossy().into_owned();
        out.push((comm.trim().to_string(), cpus_of(pid, &tid)));
    }
    out
}

/// The threads of `pid` whose name `pick` accepts, as [`threads_of`] gives them; fails the test,
/// naming `what`, when there is none.
pub fn threads_where(
    pid: i32,
    what: &str,
    pick: impl Fn(&str) -> bool,
) -> Vec<(String, i64, Option<u64>)> {
    let all = threads_of(pid);
    let picked: Vec<_> = all.iter().filter(|t| pick(&t.0)).cloned().collect();
    assert!(!picked.is_empty(), "no {what} among {all:?}");
    picked
}
