//! The node's config file (TOML, one per node; see DESIGN.md). Loading checks everything it can
//! up front (durations, sizes, fingerprints, addresses) and names the file and the key in every
//! error, so a bad config fails at start-up, not at the first sync.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::chunk::ChunkParams;
use crate::net::{Congestion, Fingerprint};

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    #[serde(default)]
    pub primary: Primary,
    #[serde(default, rename = "peer")]
    pub peers: Vec<Peer>,
    pub replica: Option<Replica>,
    #[serde(default)]
    pub chunking: Chunking,
    /// Automatic failover on an etcd cluster (none: promotion is manual).
    pub failover: Option<Failover>,
}

/// `[failover]`: the etcd cluster that says which node is the primary (docs/OPERATIONS.md,
/// "Automatic failover").
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    /// The etcd members' client URLs, e.g. "http://10.0.0.5:2379".
    pub etcd: Vec<String>,
    /// The leader key's lease: a primary that cannot renew it for this long has lost its place.
    #[serde(default = "default_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
    /// The key prefix: `ferry/<cluster>/...`; one primary per cluster.
    pub cluster: String,
    /// Where a promotion of this node serves the images as the primary mount (the directory
    /// the hypervisor's storage points at); default `[replica] mount`, whose read-only view
    /// then gives way to the primary mount.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    /// How long a fenced primary holds guest writes before failing them with EIO.
    #[serde(default = "default_write_grace", deserialize_with = "duration")]
    pub write_grace: Duration,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_key_dir")]
    pub key_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics (opt-in), e.g. 127.0.0.1:9477.
    #[serde(default)]
    pub metrics: Option<std::net::SocketAddr>,
    /// The CPUs a daemon's background threads (a sync's re-chunking and shipping, a replica's
    /// checking and applying) may run on, e.g. "2-3"; the request threads keep every CPU.
    #[serde(default, deserialize_with = "cpu_list_opt")]
    pub background_cpus: Option<Vec<usize>>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Primary {
    /// RPO target: a sync point at least this often (none when absent).
    #[serde(default, deserialize_with = "duration_opt")]
    pub sync_interval: Option<Duration>,
    #[serde(default)]
    pub sync_on_fsync: bool,
    /// How many peers must commit a generation.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Bytes per second, all peers together (none when absent).
    #[serde(default, deserialize_with = "rate_opt")]
    pub bandwidth_limit: Option<u64>,
    /// Granularity of the intent log.
    #[serde(default = "default_intent_extent", deserialize_with = "size")]
    pub intent_extent: u64,
    /// How long a committed sync's intent-log marks stay in the log (a write to such an
    /// extent needs no append); "0s" forgets them at each commit.
    #[serde(default = "default_intent_linger", deserialize_with = "duration")]
    pub intent_linger: Duration,
    /// How much of the extents written before the linger stays marked (a guest coming back
    /// to them after a quiet spell waits for no append); after a crash the next mount re-reads
    /// up to this much more. "0" keeps none.
    #[serde(default = "default_intent_hot", deserialize_with = "size")]
    pub intent_hot: u64,
    /// A selected replica failing for longer than this is replaced by another (which is then
    /// seeded), when more peers are configured than `replicas`.
    #[serde(default = "default_failover_after", deserialize_with = "duration")]
    pub failover_after: Duration,
    /// How long a scheduled sync point waits for the replicas before it counts as failed.
    #[serde(default = "default_sync_timeout", deserialize_with = "duration")]
    pub sync_timeout: Duration,
    /// The congestion controller of the data connections: "bdp" (default), "bbr", "cubic" or
    /// "newreno"; see [`Congestion`] for the trade-off.
    #[serde(default)]
    pub congestion: Congestion,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub zone: Option<String>,
    /// Bytes per second to this peer (none when absent).
    #[serde(default, deserialize_with = "rate_opt")]
    pub bandwidth_limit: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Replica {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub primaries: Vec<Fingerprint>,
    /// Serve the read-only replica mount here.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    /// Restore points kept by count (the newest generation counts)...
    #[serde(default)]
    pub keep: Option<usize>,
    /// ... and by age.
    #[serde(default, deserialize_with = "duration_opt")]
    pub keep_for: Option<Duration>,
    /// Re-hash the whole store this often and mend what differs (a deep verify).
    #[serde(default, deserialize_with = "duration_opt")]
    pub scrub_interval: Option<Duration>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Chunking {
    #[serde(default = "default_min", deserialize_with = "size")]
    pub min: u64,
    #[serde(default = "default_avg", deserialize_with = "size")]
    pub avg: u64,
    #[serde(default = "default_max", deserialize_with = "size")]
    pub max: u64,
}

fn default_name() -> String {
    let mut buf = [0u8; 256];
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let n = buf.iter().position(|&b| b == 0).unwrap_or(0);
    if r == 0 && n > 0 {
        String::from_utf8_lossy(&buf[..n]).into_owned()
    } else {
        "ferry".into()
    }
}
fn default_key_dir() -> PathBuf {
    PathBuf::from("/etc/ferry/keys")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferry")
}
fn one() -> usize {
    1
}
fn default_failover_after() -> Duration {
    Duration::from_secs(300)
}
fn default_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_write_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_sync_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_intent_extent() -> u64 {
    4 << 20
}
/// The intent log's own default (`dirty::LINGER`; config sits below `dirty`).
fn default_intent_linger() -> Duration {
    Duration::from_secs(10)
}
/// The intent log's own default (`dirty::HOT`).
fn default_intent_hot() -> u64 {
    4 << 30
}
fn default_min() -> u64 {
    ChunkParams::default().min_size as u64
}
fn default_avg() -> u64 {
    ChunkParams::default().avg_size as u64
}
fn default_max() -> u64 {
    ChunkParams::default().max_size as u64
}

impl Default for Node {
    fn default() -> Self {
        Node {
            name: default_name(),
            key_dir: default_key_dir(),
            state_dir: default_state_dir(),
            metrics: None,
            background_cpus: None,
        }
    }
}

impl Default for Primary {
    fn default() -> Self {
        Primary {
            sync_interval: None,
            sync_on_fsync: false,
            replicas: 1,
            bandwidth_limit: None,
            intent_extent: default_intent_extent(),
            intent_linger: default_intent_linger(),
            intent_hot: default_intent_hot(),
            sync_timeout: default_sync_timeout(),
            congestion: Congestion::default(),
            failover_after: default_failover_after(),
        }
    }
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking {
            min: default_min(),
            avg: default_avg(),
            max: default_max(),
        }
    }
}

fn duration_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("bad duration {s:?} ({e}); e.g. \"30s\"")))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    duration_opt(d).map(|o| o.expect("duration_opt returns Some"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("bad size {s:?} ({e}); e.g. \"64KiB\""))
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn rate_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    let body = s.trim().strip_suffix("/s").ok_or_else(|| {
        serde::de::Error::custom(format!(
            "bad rate {s:?}: write it as a size per second, e.g. \"100MiB/s\""
        ))
    })?;
    parse_size(body).map(Some).map_err(serde::de::Error::custom)
}

/// The highest CPU number a list may name: the kernel's CPU sets of sched_setaffinity(2) as
/// glibc sizes them (`CPU_SETSIZE`).
pub const MAX_CPU: usize = 1023;

/// A CPU list as taskset -c and cpuset(7) write it: numbers and ranges, comma separated
/// ("0-3,8"). Sorted, without repeats.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let bad = |why: &str| {
        format!("bad CPU list {s:?} ({why}); write it as taskset -c does, e.g. \"2-3\" or \"0,2\"")
    };
    let num = |t: &str| -> Result<usize, String> {
        let n: usize = t
            .trim()
            .parse()
            .map_err(|_| bad(&format!("{:?} is not a CPU number", t.trim())))?;
        if n > MAX_CPU {
            return Err(bad(&format!("CPU {n} is past the highest, {MAX_CPU}")));
        }
        Ok(n)
    };
    let mut cpus = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(bad(&format!("the range {a}-{b} runs backwards")));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn cpu_list_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<usize>>, D::Error> {
    let s = String::deserialize(d)?;
    parse_cpu_list(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Parses and checks config text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        c.check().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        self.chunk_params()?;
        if self.primary.intent_extent < 4096 || !self.primary.intent_extent.is_power_of_two() {
            return Err(format!(
                "primary.intent_extent {} must be a power of two of at least 4 KiB",
                self.primary.intent_extent
            ));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.peers {
            if !names.insert(&p.name) {
                return Err(format!(
                    "two peers are named {:?}; peer names must be unique",
                    p.name
                ));
            }
        }
        if self.primary.replicas > self.peers.len() && !self.peers.is_empty() {
            return Err(format!(
                "primary.replicas = {} but only {} peer(s) are configured: add peers or lower \
                 replicas",
                self.primary.replicas,
                self.peers.len()
            ));
        }
        if let Some(r) = &self.replica {
            if r.primaries.is_empty() {
                return Err(
                    "replica.primaries is empty: list the fingerprints (ferry id) of \
                            the primaries allowed to send to this replica"
                        .into(),
                );
            }
            if r.keep == Some(0) {
                return Err("replica.keep = 0: give 1 or more (1 keeps only the newest \
                            generation)"
                    .into());
            }
        }
        if let Some(f) = &self.failover {
            if f.etcd.is_empty() {
                return Err(
                    "failover.etcd is empty: list the etcd members' client URLs, \
                            e.g. [\"http://10.0.0.5:2379\"]"
                        .into(),
                );
            }
            if let Some(u) = f.etcd.iter().find(|u| !u.starts_with("http://")) {
                return Err(format!(
                    "failover.etcd {u:?}: give a client URL such as \"http://10.0.0.5:2379\" \
                     (TLS to etcd is not supported yet)"
                ));
            }
            if f.ttl < Duration::from_secs(2) {
                return Err(format!(
                    "failover.ttl {:?} is too short: give 2s or more (10s is the default)",
                    f.ttl
                ));
            }
            if let Some(r) = &self.replica
                && f.mount.is_none()
                && r.mount.is_none()
            {
                return Err(
                    "failover.mount is missing: a replica that promotes itself needs \
                            the directory to serve the images on as the primary mount (where \
                            the hypervisor's storage points); without it, replica.mount is used"
                        .into(),
                );
            }
            let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if f.cluster.is_empty() || !f.cluster.chars().all(ok) {
                return Err(format!(
                    "failover.cluster {:?}: give a name of letters, digits, '-', '_' or '.'",
                    f.cluster
                ));
            }
        }
        Ok(())
    }

    /// The chunk parameters, validated.
    pub fn chunk_params(&self) -> Result<ChunkParams, String> {
        let c = &self.chunking;
        let small = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| format!("chunking.{what} {v} is too large"))
        };
        ChunkParams::new(
            small(c.min, "min")?,
            small(c.avg, "avg")?,
            small(c.max, "max")?,
        )
        .map_err(|e| format!("chunking: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/ferry/ferry.toml"), text)
    }

    #[test]
    fn the_design_example_parses() {
        let c = parse(&format!(
            r#"
[node]
name = "site-a"
key_dir = "/etc/ferry/keys"
state_dir = "/var/lib/ferry"

[primary]
sync_interval = "30s"
sync_on_fsync = false
replicas = 1
bandwidth_limit = "100MiB/s"

[[peer]]
name = "site-b"
addr = "192.0.2.10:7443"
fingerprint = "{FP}"
zone = "eu-west"

[replica]
listen = "0.0.0.0:7443"
store = "/var/lib/ferry/replica"
primaries = ["{FP}"]
mount = "/srv/replica"
keep = 24
keep_for = "7d"
scrub_interval = "30d"

[failover]
etcd = ["http://192.0.2.20:2379"]
ttl = "10s"
cluster = "vm-images"
"#
        ))
        .unwrap();
        assert_eq!(c.node.name, "site-a");
        assert_eq!(c.primary.sync_interval, Some(Duration::from_secs(30)));
        assert_eq!(c.primary.bandwidth_limit, Some(100 << 20));
        assert_eq!(c.peers[0].addr, "192.0.2.10:7443".parse().unwrap());
        assert_eq!(c.peers[0].zone.as_deref(), Some("eu-west"));
        let r = c.replica.unwrap();
        assert_eq!(r.primaries.len(), 1);
        assert_eq!(r.keep, Some(24));
        assert_eq!(r.keep_for, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(r.scrub_interval, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(
            r.mount.as_deref(),
            Some(std::path::Path::new("/srv/replica"))
        );
        let f = c.failover.unwrap();
        assert_eq!(f.ttl, Duration::from_secs(10));
        assert_eq!(f.cluster, "vm-images");
        assert_eq!(f.write_grace, Duration::from_secs(30));
        assert_eq!(parse("").unwrap().failover, None);
        assert_eq!(parse("").unwrap().primary.replicas, 1);
        assert_eq!(parse("").unwrap().primary.congestion, Congestion::Bdp);
        let cubic = parse("[primary]\ncongestion = \"cubic\"").unwrap();
        assert_eq!(cubic.primary.congestion, Congestion::Cubic);
        assert_eq!(
            parse("").unwrap().primary.intent_linger,
            Duration::from_secs(10)
        );
        let eager = parse("[primary]\nintent_linger = \"0s\"").unwrap();
        assert_eq!(eager.primary.intent_linger, Duration::ZERO);
        assert_eq!(parse("").unwrap().primary.intent_hot, crate::dirty::HOT);
        let cold = parse("[primary]\nintent_hot = \"0\"").unwrap();
        assert_eq!(cold.primary.intent_hot, 0);
        let hot = parse("[primary]\nintent_hot = \"16GiB\"").unwrap();
        assert_eq!(hot.primary.intent_hot, 16 << 30);
        assert_eq!(parse("").unwrap().node.background_cpus, None);
    }

    #[test]
    fn cpu_lists_read_as_taskset_writes_them() {
        assert_eq!(parse_cpu_list("1"), Ok(vec![1]));
        assert_eq!(parse_cpu_list("2-3"), Ok(vec![2, 3]));
        assert_eq!(parse_cpu_list("6, 0-2,1"), Ok(vec![0, 1, 2, 6]));
        assert_eq!(parse_cpu_list("1023"), Ok(vec![1023]));
        for bad in ["", "a", "1-", "-1", "2-1", "1024", "0,,1", "1.5"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        let c = parse("[node]\nbackground_cpus = \"0-1\"").unwrap();
        assert_eq!(c.node.background_cpus, Some(vec![0, 1]));
    }

    #[test]
    fn bad_values_name_the_file_and_the_key() {
        let cases = [
            ("[primary]\nsync_interval = \"soon\"", "sync_interval"),
            ("[primary]\nbandwidth_limit = \"100MiB\"", "bandwidth_limit"),
            (
                "[[peer]]\nname = \"b\"\naddr = \"nowhere\"\nfingerprint = \"00\"",
                "addr",
            ),
            (
                "[[peer]]\nname = \"b\"\naddr = \"10.0.0.1:7443\"\nfingerprint = \"xyz\"",
                "fingerprint",
            ),
            ("[node]\nnmae = \"a\"", "nmae"),
            ("[primary]\ncongestion = \"reno\"", "congestion"),
            ("[primary]\nintent_linger = \"a while\"", "intent_linger"),
            ("[primary]\nintent_hot = \"lots\"", "intent_hot"),
            ("[node]\nbackground_cpus = \"one\"", "background_cpus"),
            ("[node]\nbackground_cpus = \"3-1\"", "runs backwards"),
            ("[node]\nbackground_cpus = \"0,5000\"", "past the highest"),
            ("[node]\nbackground_cpus = \"\"", "is not a CPU number"),
            (
                "[chunking]\nmin = \"64KiB\"\navg = \"16KiB\"",
                "min < avg < max",
            ),
            (
                "[primary]\nreplicas = 3\n[[peer]]\nname = \"b\"\naddr = \"10.0.0.1:1\"\nfingerprint = \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"",
                "replicas",
            ),
            ("[failover]\netcd = []\ncluster = \"vm\"", "failover.etcd"),
            (
                "[failover]\netcd = [\"10.0.0.5:2379\"]\ncluster = \"vm\"",
                "client URL",
            ),
            (
                "[failover]\netcd = [\"http://a:2379\"]\ncluster = \"vm\"\nttl = \"1s\"",
                "failover.ttl",
            ),
            (
                "[failover]\netcd = [\"http://a:2379\"]\ncluster = \"a/b\"",
                "failover.cluster",
            ),
        ];
        for (text, word) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("/etc/ferry/ferry.toml"), "{e}");
            assert!(e.contains(word), "expected {word:?} in: {e}");
        }
    }
}
