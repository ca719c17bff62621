//! A real etcd cluster for the failover tests: three members of Debian's `etcd-server` on
//! loopback, each in its own data directory, stopped (and their data removed) when dropped;
//! and a TCP relay that stands for a network link the tests can cut.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use super::require;

pub struct Member {
    pub name: String,
    pub client: u16,
    peer: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial: String,
}

impl Cluster {
    /// Three members, started and healthy.
    pub fn start() -> Cluster {
        require("etcd", "etcd-server");
        require("etcdctl", "etcd-client");
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: super::free_port(),
                peer: super::free_port(),
                data: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir,
            members,
            initial,
        };
        for i in 0..3 {
            c.start_member(i);
        }
        c.wait_healthy(3);
        c
    }

    /// The client URLs, as `[failover] etcd` lists them.
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// A link to each member (a node's path to it that a test can cut).
    pub fn links(&self) -> Vec<Link> {
        self.members.iter().map(|m| Link::new(m.client)).collect()
    }

    /// `etcd = [...]` for a config.
    pub fn toml_list(urls: &[String]) -> String {
        let q: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        format!("[{}]", q.join(", "))
    }

    pub fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer
            ))
            .arg(format!("--initial-cluster={}", self.initial))
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "ferry-test"])
            // A fast election, as on a LAN: the tests measure ferry, not etcd's defaults.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL: a lost host).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until `n` members answer a linearizable read.
    pub fn wait_healthy(&self, n: usize) {
        let t = Instant::now();
        loop {
            let healthy = self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .filter(|m| self.ctl(&[&format!("http://127.0.0.1:{}", m.client)], &["get", "x"]))
                .count();
            if healthy >= n {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "etcd: only {healthy} of {n} members healthy after 30 s: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs etcdctl against `endpoints`; whether it succeeded.
    pub fn ctl(&self, endpoints: &[&str], args: &[&str]) -> bool {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(["--command-timeout=1s", "--dial-timeout=1s"])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The value of `key`, if any (etcdctl against every member).
    pub fn get(&self, key: &str) -> Option<String> {
        let urls = self.urls();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", urls.join(",")))
            .args(["--command-timeout=2s", "get", "--print-value-only", key])
            .output()
            .unwrap();
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!v.is_empty()).then_some(v)
    }

    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let t = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = t.lines().rev().take(5).collect();
                format!("{}: {}", m.name, tail.join(" | "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A TCP relay from a loopback port to `to`, standing for a network link: [`Link::cut`] drops
/// every connection and refuses new ones (as a partition does), [`Link::heal`] lets them in.
pub struct Link {
    pub port: u16,
    cut: Arc<AtomicBool>,
    open: Arc<parking_lot::Mutex<Vec<TcpStream>>>,
}

impl Link {
    pub fn new(to: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let open: Arc<parking_lot::Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(a) = s else { continue };
                if c.load(SeqCst) {
                    // A partition: nothing answers. Hold the connection without a byte.
                    o.lock().push(a);
                    continue;
                }
                let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                o.lock()
                    .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                for (mut from, mut into) in
                    [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) if !c.load(SeqCst) => {
                                    if into.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                // Cut: bytes vanish (the far side hears nothing more).
                                Ok(_) => {}
                            }
                        }
                        let _ = into.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Link { port, cut, open }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The partition: every byte either way is dropped from now on; nothing is closed (a
    /// cut cable does not send a FIN).
    pub fn cut(&self) {
        self.cut.store(true, SeqCst);
    }

    /// The partition heals: the connections held through it are closed (their peers find them
    /// dead, as after a long partition), new ones go through.
    pub fn heal(&self) {
        for s in self.open.lock().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.cut.store(false, SeqCst);
    }
}
