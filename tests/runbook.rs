//! docs/OPERATIONS.md as a tested runbook: every command block of the document runs, in the
//! document's order, on the host it is written for, and what the document shows a command
//! print is what it prints. A command that stops working, or an output or error message that
//! changes, fails this test, naming the line of the document.
//!
//! Each host (site-a, site-b) is a scratch machine: its own PID, mount and network namespace,
//! `/etc`, `/var` and `/usr/local` as overlays of the real ones (what it writes there lands in
//! a scratch directory, never on this host), `/srv` and `/var/lib/ferry` scratch directories
//! of this host's filesystem, a fresh `/tmp` and `/run`, and a veth
//! link between the two (site-a 192.0.2.1, site-b 192.0.2.10). ferry is installed there by the
//! document's own install step.
//!
//! The document, read as a runbook:
//! - A fenced block of `sh` or `console` is a command block: a line starting with `# ` is a
//!   command (run by bash as root, from the project's root directory; a trailing `\` joins the
//!   next line), the lines after it are its output as shown. A command whose shown output has
//!   a line `PROG: ...` (PROG being `ferry`, `/bin/sh` or the command's program) must fail,
//!   every other must succeed; every line shown must match a line printed (every token with a
//!   digit in it matches any token with a digit; a shown line ending in `...` matches by
//!   prefix). A command ending in `&` runs in the background.
//! - A fenced block of `toml`, `ini` or `text` whose first line is `# /PATH...` is a file:
//!   written to PATH on the host (appended for `/etc/fstab`), every `<NAME's ferry id>` replaced
//!   by host NAME's fingerprint.
//! - `<!-- runbook: ... -->` lines before a block: `host NAME` (default site-a), `before CMD`
//!   and `after CMD` (steps the reader does not need to see, kept in the document's source),
//!   `unchecked WHY` (the output shown is an example, not checked).
//!
//! What differs from a real host, and why:
//! - `cargo build --release` is not run (the suite built the binary; a release build takes
//!   minutes), and `target/release/ferry` stands for the binary under test;
//!   `scripts/install` installs that binary (`--binary`) instead of building one.
//! - There is no systemd as PID 1 on the test machine: `systemctl start|enable --now UNIT`
//!   runs the installed unit's `ExecStart=` (with its `EnvironmentFile=` and `%i`) and waits
//!   for its `READY=1` on `NOTIFY_SOCKET` as systemd does for `Type=notify`; `systemctl stop`
//!   sends SIGTERM and waits for the exit; `daemon-reload` does nothing. The unit files
//!   themselves are checked by `systemd-analyze verify` (tests/units.rs).
//! - libvirt (Debian's `libvirt-daemon`, without QEMU's system emulator) is started by hand
//!   with the `libvirt-qemu` user its `libvirt-daemon-system` package would create; those
//!   steps are `before` notes of the libvirt block.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const HOSTS: [(&str, &str); 2] = [("site-a", "192.0.2.1"), ("site-b", "192.0.2.10")];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Default)]
struct Block {
    line: usize,
    lang: String,
    body: Vec<String>,
    host: Option<String>,
    unchecked: bool,
    before: Vec<String>,
    after: Vec<String>,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut notes = Block::default();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        if let Some(note) = line
            .strip_prefix("<!-- runbook: ")
            .and_then(|l| l.strip_suffix(" -->"))
        {
            let (word, rest) = note.split_once(' ').unwrap_or((note, ""));
            match word {
                "host" => notes.host = Some(rest.to_string()),
                "unchecked" => notes.unchecked = true,
                "before" => notes.before.push(rest.to_string()),
                "after" => notes.after.push(rest.to_string()),
                _ => panic!("{DOC}:{}: unknown runbook note {note:?}", i + 1),
            }
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            continue;
        };
        let mut block = std::mem::take(&mut notes);
        block.line = i + 1;
        block.lang = lang.trim().to_string();
        for (_, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            block.body.push(l.to_string());
        }
        out.push(block);
    }
    out
}

/// A command of a block, with the output the document shows for it.
struct Step {
    line: usize,
    cmd: String,
    shown: Vec<String>,
}

fn steps(block: &Block) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    let mut joining = false;
    for (k, l) in block.body.iter().enumerate() {
        let line = block.line + 1 + k;
        if joining {
            let step = out.last_mut().unwrap();
            step.cmd.push('\n');
            step.cmd.push_str(l);
            joining = l.ends_with('\\');
        } else if let Some(cmd) = l.strip_prefix("# ") {
            out.push(Step {
                line,
                cmd: cmd.to_string(),
                shown: Vec::new(),
            });
            joining = cmd.ends_with('\\');
        } else if let Some(step) = out.last_mut() {
            if !l.trim().is_empty() {
                step.shown.push(l.to_string());
            }
        } else {
            panic!("{DOC}:{line}: a command block must start with a command (`# ...`), not {l:?}");
        }
    }
    out
}

/// Whether the output the document shows matches a line that was printed.
fn matches(shown: &str, printed: &str) -> bool {
    let (shown, prefix) = match shown.trim_end().strip_suffix("...") {
        Some(s) => (s, true),
        None => (shown, false),
    };
    let a: Vec<&str> = shown.split_whitespace().collect();
    let b: Vec<&str> = printed.split_whitespace().collect();
    if b.len() < a.len() || (!prefix && b.len() != a.len()) {
        return false;
    }
    let digit = |s: &str| s.chars().any(|c| c.is_ascii_digit());
    a.iter().zip(&b).enumerate().all(|(k, (x, y))| {
        if digit(x) {
            digit(y)
        } else if prefix && k == a.len() - 1 {
            y.starts_with(x)
        } else {
            x == y
        }
    })
}

/// The command's program: its first word that is not a variable assignment.
fn program(cmd: &str) -> &str {
    cmd.split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or("")
}

fn must_fail(step: &Step) -> bool {
    let prog = program(&step.cmd);
    let base = prog.rsplit('/').next().unwrap_or(prog);
    step.shown.iter().any(|l| {
        ["ferry", "/bin/sh", prog, base]
            .iter()
            .any(|p| !p.is_empty() && l.starts_with(&format!("{p}: ")))
    })
}

/// A scratch machine: a process that holds PID, mount and network namespaces, with overlays
/// over the directories ferry writes to.
struct Host {
    name: String,
    holder: Child,
    pid: u32,
    /// The daemons `systemctl start` started: unit, nsenter's child.
    units: Vec<(String, Child)>,
}

impl Host {
    fn new(name: &str, addr: &str, scratch: &Path) -> Host {
        let holder = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--mount", "--net"])
            .args(["--propagation", "private", "--", "sleep", "infinity"])
            .spawn()
            .expect("unshare");
        let pid = child_of(holder.id());
        let host = Host {
            name: name.to_string(),
            holder,
            pid,
            units: Vec::new(),
        };
        let dir = scratch.join(name);
        let mut setup = String::from("set -e\n");
        for d in ["etc", "var", "usr/local"] {
            let o = dir.join(d.replace('/', "_"));
            let (u, w) = (o.join("upper"), o.join("work"));
            fs::create_dir_all(&u).unwrap();
            fs::create_dir_all(&w).unwrap();
            setup += &format!(
                "mount -t overlay overlay -o lowerdir=/{d},upperdir={},workdir={} /{d}\n",
                u.display(),
                w.display()
            );
        }
        // Images, state and stores on the host's own filesystem, as on a real host (an
        // overlay would hide what ferry relies on there: fanotify's file handles, for one).
        for d in ["srv", "var/lib/ferry"] {
            let b = dir.join(d.replace('/', "_"));
            fs::create_dir_all(&b).unwrap();
            setup += &format!("mkdir -p /{d}\nmount --bind {} /{d}\n", b.display());
        }
        // A fresh /tmp and /run; the checkout (with the binary) stays where it is if it lies
        // under them (a clone in /tmp): held open across the tmpfs mounts, then bound back (by the
        // open descriptor: `mount` must not resolve its path, which the tmpfs now hides).
        let checkout = env!("CARGO_MANIFEST_DIR");
        let hidden = ["/tmp/", "/run/"].iter().any(|t| checkout.starts_with(t));
        if hidden {
            setup += &format!("exec 9<{checkout}\n");
        }
        setup += "mount -t tmpfs tmpfs /tmp\nmount -t tmpfs tmpfs /run\n";
        if hidden {
            setup += &format!(
                "mkdir -p {checkout}\nmount --no-canonicalize --bind /proc/self/fd/9 {checkout}\n"
            );
        }
        setup += &format!(
            "ip link set lo up\n\
             echo {name} > /etc/hostname\necho '{addr} {name}' >> /etc/hosts\n"
        );
        let (ok, out) = host.sh(&setup, Duration::from_secs(30));
        assert!(ok, "cannot set up the scratch host {name}: {out}");
        host
    }

    /// Runs a bash command line in the host; returns whether it succeeded and what it
    /// printed (stdout and stderr, interleaved as on a terminal).
    fn sh(&self, cmd: &str, within: Duration) -> (bool, String) {
        let out = tempfile::NamedTempFile::new().unwrap();
        let file = out.reopen().unwrap(); // one open file for both: a terminal's interleaving
        let mut child = self
            .command(cmd)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut text = String::new();
        out.reopen().unwrap().read_to_string(&mut text).unwrap();
        match status {
            Some(s) => (s.success(), text),
            None => (
                false,
                format!("{text}\n(still running after {within:?}: killed)"),
            ),
        }
    }

    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid.to_string())
            .args(["--mount", "--net", "--pid", "--uts"])
            .arg(format!("--wd={ROOT}"))
            .arg("--")
            .args(["bash", "-c", cmd])
            .current_dir(ROOT)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        c
    }

    fn fingerprint(&self) -> String {
        let (ok, out) = self.sh("ferry id --dir /etc/ferry/keys", Duration::from_secs(10));
        assert!(ok, "no key on {} yet: {out}", self.name);
        out.trim().to_string()
    }

    /// `systemctl VERB UNIT`, done as systemd would with the unit installed on the host.
    fn systemctl(&mut self, verb: &str, unit: &str, scratch: &Path) -> Result<String, String> {
        match verb {
            "daemon-reload" => Ok(String::new()),
            "start" | "enable --now" | "restart" => {
                if verb == "restart" {
                    self.stop(unit)?;
                }
                self.start(unit, scratch)
            }
            "stop" => self.stop(unit).map(|()| String::new()),
            _ => Err(format!(
                "systemctl {verb} is not emulated by the runbook test"
            )),
        }
    }

    fn start(&mut self, unit: &str, scratch: &Path) -> Result<String, String> {
        let unit = &if unit.contains('.') {
            unit.to_string()
        } else {
            format!("{unit}.service")
        };
        let (template, instance) = match unit.split_once('@') {
            Some((t, rest)) => {
                let (i, kind) = rest.rsplit_once('.').unwrap();
                (format!("{t}@.{kind}"), i.to_string())
            }
            None => (unit.to_string(), String::new()),
        };
        let (ok, file) = self.sh(
            &format!("cat /usr/local/lib/systemd/system/{template}"),
            Duration::from_secs(5),
        );
        if !ok {
            return Err(format!("Unit {unit} not found."));
        }
        let value = |key: &str| {
            file.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.replace("%i", &instance))
        };
        let exec = value("ExecStart=").ok_or("no ExecStart=")?;
        let mut script = String::from("set -a\n");
        if let Some(env) = value("EnvironmentFile=") {
            script += &format!(". {env}\n");
        }
        script += &format!("set +a\nexec {exec}");
        let socket_path = scratch.join(format!("notify-{}-{unit}", self.name));
        let _ = fs::remove_file(&socket_path);
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = scratch.join(format!("{}-{unit}.log", self.name));
        let log = fs::File::create(&log).unwrap();
        let mut child = self
            .command(&script)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = socket.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                self.units.push((unit.to_string(), child));
                return Ok(String::new());
            }
            if let Some(s) = child.try_wait().unwrap() {
                return Err(format!("{unit}: the daemon exited ({s}) before READY=1"));
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                return Err(format!("{unit}: no READY=1 within 60 s"));
            }
        }
    }

    fn stop(&mut self, unit: &str) -> Result<(), String> {
        let unit = &if unit.contains('.') {
            unit.to_string()
        } else {
            format!("{unit}.service")
        };
        let Some(k) = self.units.iter().position(|(u, _)| u == unit) else {
            return Ok(()); // stopping a unit that is not running succeeds, as with systemd
        };
        let (_, mut child) = self.units.remove(k);
        // nsenter forks into the PID namespace: the daemon is its child.
        let daemon = child_of(child.id());
        unsafe { libc::kill(daemon as i32, libc::SIGTERM) };
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                return Err(format!("{unit} did not stop within 60 s of SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The namespace's init: killing it kills every process of the scratch host, and its
        // mounts go with its mount namespace.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.holder.wait();
    }
}

/// The first child of a process (the one `unshare --fork` or `nsenter --pid` started).
fn child_of(pid: u32) -> u32 {
    let start = Instant::now();
    loop {
        let children =
            fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "process {pid} started no child"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn link(a: &Host, b: &Host, addr_a: &str, addr_b: &str) {
    let (ia, ib) = (
        format!("rb{}a", std::process::id()),
        format!("rb{}b", std::process::id()),
    );
    common::run(Command::new("ip").args(["link", "add", &ia, "type", "veth", "peer", "name", &ib]));
    for (h, i, addr) in [(a, &ia, addr_a), (b, &ib, addr_b)] {
        common::run(Command::new("ip").args(["link", "set", i, "netns", &h.pid.to_string()]));
        let (ok, out) = h.sh(
            &format!(
                "ip link set {i} name eth0 && ip addr add {addr}/24 dev eth0 && ip link set eth0 up"
            ),
            Duration::from_secs(10),
        );
        assert!(ok, "{out}");
    }
}

/// Replaces what the document runs that cannot run here (see the module's documentation).
fn adapt(cmd: &str) -> Option<String> {
    let bare = cmd.split(" #").next().unwrap().trim();
    if bare.starts_with("cargo build --release") {
        return None;
    }
    let mut cmd = cmd.replace("target/release/ferry", common::FERRY);
    if bare.starts_with("scripts/install") && !bare.contains("--uninstall") {
        cmd = cmd.replacen(
            "scripts/install",
            &format!("scripts/install --binary {}", common::FERRY),
            1,
        );
    }
    Some(cmd)
}

#[test]
fn operations_md_is_a_runbook() {
    common::require_root();
    for (cmd, package) in [
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("jq", "jq"),
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("systemd-analyze", "systemd"),
        ("libvirtd", "libvirt-daemon"),
        ("virsh", "libvirt-clients"),
    ] {
        common::require(cmd, package);
    }
    let scratch = tempfile::Builder::new()
        .prefix("runbook.")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let mut hosts: Vec<Host> = HOSTS
        .iter()
        .map(|(n, a)| Host::new(n, a, scratch.path()))
        .collect();
    link(&hosts[0], &hosts[1], HOSTS[0].1, HOSTS[1].1);
    let text = fs::read_to_string(DOC).unwrap();
    let mut ran = 0;
    // RUNBOOK_KEEP_GOING=1 runs the whole document and reports every mismatch at the end
    // (for whoever edits the document); by default the first one stops the test.
    let keep_going = std::env::var_os("RUNBOOK_KEEP_GOING").is_some();
    let mut failed: Vec<String> = Vec::new();
    for block in blocks(&text) {
        let host_name = block.host.clone().unwrap_or_else(|| "site-a".into());
        let h = hosts
            .iter()
            .position(|h| h.name == host_name)
            .unwrap_or_else(|| panic!("{DOC}:{}: no host {host_name}", block.line));
        let at = format!("{DOC}:{} ({host_name})", block.line);
        for cmd in &block.before {
            let (ok, out) = hosts[h].sh(cmd, Duration::from_secs(120));
            assert!(ok, "{at}: `before {cmd}` failed:\n{out}");
        }
        match block.lang.as_str() {
            "sh" | "console" => {
                for step in steps(&block) {
                    let at = format!("{DOC}:{} ({host_name})", step.line);
                    eprintln!("{at}: # {}", step.cmd);
                    let Some(cmd) = adapt(&step.cmd) else {
                        eprintln!("    (not run here: the suite built the binary)");
                        continue;
                    };
                    let bare = cmd.split(" #").next().unwrap().trim();
                    let (ok, out) = if let Some(rest) = bare.strip_prefix("systemctl ") {
                        let (verb, unit) = rest.rsplit_once(' ').unwrap_or((rest, ""));
                        match hosts[h].systemctl(verb, unit, scratch.path()) {
                            Ok(out) => (true, out),
                            Err(e) => (false, e),
                        }
                    } else {
                        hosts[h].sh(&cmd, Duration::from_secs(300))
                    };
                    for l in out.lines() {
                        eprintln!("    | {l}");
                    }
                    let fail = must_fail(&step);
                    if ok == fail {
                        failed.push(format!(
                            "{at}: `{}` {} but the document shows it {}; it printed:\n{out}",
                            step.cmd,
                            if ok { "succeeded" } else { "failed" },
                            if fail { "failing" } else { "succeeding" }
                        ));
                    }
                    if !block.unchecked {
                        for shown in &step.shown {
                            if !out.lines().any(|p| matches(shown, p)) {
                                failed.push(format!(
                                    "{at}: `{}` did not print a line like the document's\n  \
                                     {shown}\nit printed:\n{out}",
                                    step.cmd
                                ));
                            }
                        }
                    }
                    assert!(failed.is_empty() || keep_going, "{}", failed.join("\n"));
                    ran += 1;
                }
            }
            "toml" | "ini" | "text" => {
                let Some(path) = block
                    .body
                    .first()
                    .and_then(|l| l.strip_prefix("# /"))
                    .map(|p| format!("/{}", p.split_whitespace().next().unwrap()))
                else {
                    continue;
                };
                let mut content = block.body.join("\n") + "\n";
                for other in &hosts {
                    let placeholder = format!("<{}'s ferry id>", other.name);
                    if content.contains(&placeholder) {
                        content = content.replace(&placeholder, &other.fingerprint());
                    }
                }
                let file = scratch.path().join("file");
                fs::write(&file, &content).unwrap();
                let op = if path == "/etc/fstab" { ">>" } else { ">" };
                let (ok, out) = hosts[h].sh(
                    &format!(
                        "mkdir -p \"$(dirname {path})\" && cat {} {op} {path}",
                        file.display()
                    ),
                    Duration::from_secs(10),
                );
                assert!(ok, "{at}: cannot write {path}: {out}");
                eprintln!("{at}: wrote {path}");
            }
            _ => {}
        }
        for cmd in &block.after {
            let (ok, out) = hosts[h].sh(cmd, Duration::from_secs(120));
            assert!(ok, "{at}: `after {cmd}` failed:\n{out}");
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(
        ran > 40,
        "only {ran} commands ran: is the document's format still read?"
    );
}

#[test]
fn output_lines_match_by_shape() {
    assert!(matches(
        "  generation 2 (root 87731d75944fe4b3)",
        "generation 7 (root 0a)"
    ));
    assert!(!matches(
        "generation 2 (root 87731d75944fe4b3)",
        "generation 2 (root x)"
    ));
    assert!(matches(
        "ferry: unknown option ...",
        "ferry: unknown option \"x\"; more"
    ));
    assert!(!matches(
        "ferry: unknown option",
        "ferry: unknown option \"x\""
    ));
    assert!(!matches("a b c", "a b"));
    let step = Step {
        line: 1,
        cmd: "PATH=/x:$PATH mount -t fuse.ferry a b".into(),
        shown: vec!["/bin/sh: 1: ferry: not found".into()],
    };
    assert!(must_fail(&step));
    let step = Step {
        line: 1,
        cmd: "ferry status /srv/vm".into(),
        shown: vec!["/srv/images on /srv/vm".into()],
    };
    assert!(!must_fail(&step));
}
