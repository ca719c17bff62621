//! `ferry mount`: option parsing, the per-mount state directory, daemonising, and the FUSE
//! session's life from mount to clean unmount.
//!
//! Without `-f` the command forks before any thread exists; the child mounts and reports
//! through a pipe, and the parent exits 0 only once the mount is live (what `mount(8)` and
//! fstab expect), or prints the child's error. SIGTERM, SIGINT and `umount` end the session
//! cleanly: the intent log is closed with the exact unsynced ranges.

use std::io::{Read, Write};
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use fuser::{MountOption, SessionACL};

use crate::config::Config;
use crate::dirty::IntentLog;
use crate::fs::fuse::FerryFuse;
use crate::fs::outside::Outside;
use crate::fs::{Fs, Tracker};

/// How often writes that bypass the mount are looked for between sync points (each sync
/// point looks first too): bounds how long one goes unrecorded in the intent log.
const OUTSIDE_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Parsed `-o` options.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MountOptions {
    pub config: Option<PathBuf>,
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub fsname: Option<String>,
    /// Options passed on to the kernel.
    pub kernel: Vec<MountOption>,
    /// FUSE worker threads, if given (`threads()` has the default).
    pub threads: Option<usize>,
    /// No dirty tracking and no intent log (only to measure their cost).
    pub notrack: bool,
    /// Refuse to mount unless only root can reach the backing directory.
    pub private_backing: bool,
    /// SOURCE is a replica store: start the replica daemon with its read-only mount.
    pub replica: bool,
    /// O_DIRECT opens use direct I/O on the backing file too (no host page cache).
    pub direct_backing: bool,
    /// The kernel caches buffered writes (FUSE writeback cache).
    pub writeback_cache: bool,
}

const ACCEPTED: &str = "config=FILE, replica, allow_other, allow_root, default_permissions, ro, rw, \
    fsname=NAME, threads=N, private_backing, direct_backing, writeback_cache, dev, nodev, suid, nosuid, exec, noexec, atime, noatime, sync, \
    async, dirsync, and fstab-only options (defaults, auto, noauto, user, users, _netdev, \
    nofail, x-*)";

impl MountOptions {
    /// FUSE worker threads: as given, else 16 (32 with `direct_backing`). A worker serves one
    /// request at a time and waits in it for the disk when the backing file's pages are not
    /// cached, so the threads bound how many of a guest's requests reach the disk at once
    /// (virtio queues keep 16 to 128 in flight); docs/BENCHMARKS.md, "Worker threads".
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or(if self.direct_backing { 32 } else { 16 })
    }

    /// Parses comma-separated option lists as given with `-o` (several `-o` allowed).
    pub fn parse(lists: &[String]) -> Result<MountOptions> {
        let mut o = MountOptions::default();
        for opt in lists
            .iter()
            .flat_map(|l| l.split(','))
            .filter(|s| !s.is_empty())
        {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, value) {
                ("config", Some(v)) => o.config = Some(PathBuf::from(v)),
                ("ro", None) => o.read_only = true,
                ("rw", None) => o.read_only = false,
                ("allow_other", None) => o.allow_other = true,
                ("allow_root", None) => o.allow_root = true,
                ("default_permissions", None) => o.kernel.push(MountOption::DefaultPermissions),
                ("fsname", Some(v)) => o.fsname = Some(v.to_string()),
                ("subtype", Some(_)) => {}
                ("threads", Some(v)) => {
                    o.threads = Some(
                        v.parse()
                            .ok()
                            .filter(|n| (1..=64).contains(n))
                            .ok_or_else(|| anyhow!("mount option threads={v}: give 1 to 64"))?,
                    )
                }
                ("notrack", None) => o.notrack = true,
                ("replica", None) => o.replica = true,
                ("private_backing", None) => o.private_backing = true,
                ("direct_backing", None) => o.direct_backing = true,
                ("writeback_cache", None) => o.writeback_cache = true,
                ("dev", None) => o.kernel.push(MountOption::Dev),
                ("nodev", None) => o.kernel.push(MountOption::NoDev),
                ("suid", None) => o.kernel.push(MountOption::Suid),
                ("nosuid", None) => o.kernel.push(MountOption::NoSuid),
                ("exec", None) => o.kernel.push(MountOption::Exec),
                ("noexec", None) => o.kernel.push(MountOption::NoExec),
                ("atime", None) => o.kernel.push(MountOption::Atime),
                ("noatime", None) => o.kernel.push(MountOption::NoAtime),
                ("sync", None) => o.kernel.push(MountOption::Sync),
                ("async", None) => o.kernel.push(MountOption::Async),
                ("dirsync", None) => o.kernel.push(MountOption::DirSync),
                // fstab and mount(8) bookkeeping, meaningless to the filesystem.
                (
                    "defaults" | "auto" | "noauto" | "user" | "users" | "nouser" | "_netdev"
                    | "nofail" | "relatime" | "norelatime" | "strictatime",
                    None,
                ) => {}
                (k, _) if k.starts_with("x-") || k == "comment" => {}
                _ => bail!("unknown mount option {opt:?}; ferry accepts {ACCEPTED}"),
            }
        }
        Ok(o)
    }
}

/// The directory holding one mount's state (intent log, control socket, log, manifests),
/// named after its backing directory: up to 32 characters of its path and a hash of all of it,
/// short enough that the control socket's path fits in a unix socket address (108 bytes).
pub fn state_dir(config: &Config, source: &Path) -> PathBuf {
    let readable: String = source
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let id = blake3::hash(source.as_os_str().as_encoded_bytes()).to_hex();
    config
        .node
        .state_dir
        .join("mounts")
        .join(format!("{readable}-{}", &id[..12]))
}

/// Makes the state directory of the primary mount a promotion starts: the promoted
/// generation as the active one and as what each of `agreed` holds (replicas that answered
/// with that very generation), the stamps of its images as they are now (nothing changed
/// outside the mount), and last the lineage (namespace, epoch, base) the mount writes under.
/// Done already for this epoch: nothing changes. Returns the state directory.
pub fn seed_promoted(
    config: &Config,
    p: &crate::replica::promote::Promotion,
    agreed: &[String],
) -> Result<PathBuf> {
    use crate::epoch::{self, Lineage};
    use crate::fs::outside::stamp::{Record, Stamp};
    let backing = p.backing.canonicalize()?;
    let state = state_dir(config, &backing);
    let lineage = state.join(epoch::FILE);
    if epoch::load::<Lineage>(&lineage)?
        .is_some_and(|l| l.epoch == p.epoch && l.namespace == p.namespace)
    {
        return Ok(state);
    }
    // An earlier mount of this directory left state of another lineage: not this one's.
    if state.exists() {
        std::fs::remove_dir_all(&state)
            .with_context(|| format!("cannot clear {}", state.display()))?;
    }
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;
    let base = (p.base.generation, p.base.root.as_str());
    let images = crate::sync::seed(&state, &p.manifests(), base, agreed)?;
    let mut stamps = Record::default();
    for image in images {
        let m = std::fs::symlink_metadata(backing.join(&image)).with_context(|| {
            format!(
                "promoted image {image} is missing from {}",
                backing.display()
            )
        })?;
        stamps.images.insert(image, Stamp::of(&m));
    }
    stamps.save(&state.join("stamps.json"))?;
    let l = Lineage {
        namespace: p.namespace.clone(),
        epoch: p.epoch,
        since: crate::epoch::now(),
        base: Some(p.base.clone()),
        fenced: None,
    };
    epoch::save(&lineage, &l)?;
    Ok(state)
}

/// What `ferry mount` was asked to do.
pub struct MountRequest {
    pub source: PathBuf,
    pub mountpoint: PathBuf,
    pub options: MountOptions,
    pub foreground: bool,
}

/// Runs `ferry mount`: returns once the mount is live (daemon) or when it ends (`-f`).
pub fn run(req: MountRequest) -> Result<()> {
    if req.options.replica {
        return run_replica(req);
    }
    let config = match &req.options.config {
        Some(p) => {
            let c = Config::load(p)?;
            confine(&c, p)?;
            c
        }
        None => Config::default(),
    };
    let source = req
        .source
        .canonicalize()
        .with_context(|| format!("backing directory {} not found", req.source.display()))?;
    if !source.is_dir() {
        bail!(
            "{} is not a directory: SOURCE must be the backing directory holding the images",
            source.display()
        );
    }
    let mountpoint = req.mountpoint.canonicalize().with_context(|| {
        format!(
            "mountpoint {} not found: create it first",
            req.mountpoint.display()
        )
    })?;
    if !mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    if mountpoint.starts_with(&source) {
        bail!(
            "mountpoint {} lies inside the backing directory {}: pick a mountpoint outside it",
            mountpoint.display(),
            source.display()
        );
    }
    if let Some(m) = mounted_at(&mountpoint) {
        bail!(
            "{} is already a mountpoint ({m}): unmount it first",
            mountpoint.display()
        );
    }
    if req.options.private_backing {
        check_private(&source)?;
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse kernel module (modprobe fuse)");
    }
    let state = state_dir(&config, &source);
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create state directory {}", state.display()))?;

    if req.foreground {
        return serve(&config, &source, &mountpoint, &state, &req.options, None);
    }
    let log = state.join("ferry.log");
    daemonize(&log, |ready| {
        serve(
            &config,
            &source,
            &mountpoint,
            &state,
            &req.options,
            Some(ready),
        )
    })
}

/// Keeps this daemon's background threads on the CPUs `[node] background_cpus` of `config`
/// (read from `path`) names, if it names any.
pub fn confine(config: &Config, path: &Path) -> Result<()> {
    match &config.node.background_cpus {
        Some(cpus) => crate::priority::confine_background(cpus)
            .map_err(|e| anyhow!("config {}: [node] background_cpus: {e}", path.display())),
        None => Ok(()),
    }
}

/// `mount -t fuse.ferry STORE MNT -o replica,config=FILE`: the replica daemon of that config,
/// serving its read-only mount at MNT; returns once both listen (without `-f`). Its log goes
/// to STATE_DIR/replica.log.
fn run_replica(req: MountRequest) -> Result<()> {
    let config_path = req.options.config.as_ref().ok_or_else(|| {
        anyhow!("-o replica needs config=FILE: the replica's config file with a [replica] section")
    })?;
    let config = Config::load(config_path)?;
    confine(&config, config_path)?;
    let mut opts = replica_options(&config, config_path, Some(req.mountpoint.clone()))?;
    opts.stop_on_unmount = true;
    let same = |a: &Path, b: &Path| a.canonicalize().ok() == b.canonicalize().ok();
    if !same(&req.source, &opts.store) {
        bail!(
            "SOURCE {} is not the replica store of {} ([replica] store = {}): give that store",
            req.source.display(),
            config_path.display(),
            opts.store.display()
        );
    }
    if let Some(m) = mounted_at(&req.mountpoint) {
        bail!(
            "{} is already a mountpoint ({m}): unmount it first",
            req.mountpoint.display()
        );
    }
    if req.foreground {
        return crate::replica::daemon::run(opts, None);
    }
    std::fs::create_dir_all(&config.node.state_dir).with_context(|| {
        format!(
            "cannot create state directory {}",
            config.node.state_dir.display()
        )
    })?;
    daemonize(&config.node.state_dir.join("replica.log"), |ready| {
        crate::replica::daemon::run(opts, Some(ready))
    })
}

/// `-o private_backing`: only root may reach the images behind the mount's back. Some
/// directory on the way to the backing files, the backing directory or one of its ancestors,
/// must belong to root and grant its group and others no search permission (mode 0700 or
/// 0750 without group search, ...): then no other user can open a file under it by path,
/// whatever the files' own modes. Putting that directory *above* the backing directory keeps
/// the mount usable by the hypervisor's user (the mount's root shows the backing directory's
/// own mode, which may stay 0755).
fn check_private(source: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    for dir in source.ancestors() {
        let m =
            std::fs::metadata(dir).with_context(|| format!("cannot look up {}", dir.display()))?;
        if m.uid() == 0 && m.mode() & 0o011 == 0 {
            return Ok(());
        }
    }
    bail!(
        "-o private_backing: every directory from / to the backing directory {0} lets users \
         other than root pass, so they can change images behind the mount's back; put it \
         inside a directory only root can enter (mkdir -m 700 /srv/ferry-private, then keep \
         the backing directory under it), or make it root's alone (chown root {0} && chmod \
         700 {0}; then only root can use the mount's top directory)",
        source.display()
    );
}

/// The filesystem type mounted at `path`, if something is.
fn mounted_at(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split(' ');
        let (_, at, ty) = (f.next()?, f.next()?, f.next()?);
        (Path::new(&at.replace("\\040", " ")) == path).then(|| ty.to_string())
    })
}

/// Forks; the child runs `serve` with a readiness callback, the parent waits for it.
fn daemonize(log: &Path, serve: impl FnOnce(Box<dyn FnOnce()>) -> Result<()>) -> Result<()> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (mut rx, tx) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(rx);
            unsafe { libc::setsid() };
            let _ = std::env::set_current_dir("/");
            redirect_stdio(log);
            let tx = Arc::new(parking_lot::Mutex::new(Some(tx)));
            let tx2 = tx.clone();
            let ready: Box<dyn FnOnce()> = Box::new(move || {
                if let Some(mut t) = tx2.lock().take() {
                    let _ = t.write_all(b"OK\n");
                }
            });
            let r = serve(ready);
            if let Err(e) = &r {
                log::error!("{e:#}");
                if let Some(mut t) = tx.lock().take() {
                    let _ = writeln!(t, "{e:#}");
                }
            }
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
        _ => {
            drop(tx);
            let mut msg = String::new();
            let _ = rx.read_to_string(&mut msg);
            match msg.trim_end() {
                "OK" => Ok(()),
                "" => bail!(
                    "the mount daemon exited before mounting; see {}",
                    log.display()
                ),
                m => Err(anyhow!("{m}")),
            }
        }
    }
}

fn redirect_stdio(log: &Path) {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    use std::os::unix::io::AsRawFd;
    if let Ok(n) = &null {
        unsafe {
            libc::dup2(n.as_raw_fd(), 0);
            libc::dup2(n.as_raw_fd(), 1);
        }
    }
    if let Ok(l) = &logf {
        unsafe { libc::dup2(l.as_raw_fd(), 2) };
    }
}

/// Opens the mount's intent log. A damaged one (bit rot: it cannot say which ranges are
/// unsynced) is moved aside together with the images' stamps, so that every image is re-read
/// in full at the next sync point and only what differs from the replicas ships.
fn open_intent_log(
    path: &Path,
    state: &Path,
    extent: u64,
) -> Result<(IntentLog, crate::dirty::Recovery)> {
    use crate::dirty::IntentError;
    match IntentLog::open(path, extent) {
        Err(e @ (IntentError::Corrupt { .. } | IntentError::CorruptHeader { .. })) => {
            let aside = path.with_extension(format!(
                "log.damaged-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ));
            std::fs::rename(path, &aside)
                .with_context(|| format!("{e}; and it cannot be moved aside"))?;
            let _ = std::fs::remove_file(state.join("stamps.json"));
            log::error!(
                "{e}. Moved it to {} and forgot the images' stamps: every image is re-read in \
                 full at the next sync point (only what differs from the replicas ships)",
                aside.display()
            );
            Ok(IntentLog::open(path, extent)?)
        }
        r => Ok(r?),
    }
}

/// Mounts and serves until unmounted.
fn serve(
    config: &Config,
    source: &Path,
    mountpoint: &Path,
    state: &Path,
    opts: &MountOptions,
    ready: Option<Box<dyn FnOnce()>>,
) -> Result<()> {
    // After an unclean stop: the images the intent log holds marks for.
    let mut logged: Option<std::collections::BTreeSet<PathBuf>> = None;
    let tracker = if opts.notrack {
        log::warn!("mounted with notrack: changes are NOT tracked and will not be replicated");
        Tracker::disabled()
    } else {
        let path = state.join("intent.log");
        let (log, recovery) = open_intent_log(&path, state, config.primary.intent_extent)?;
        let log = log
            .lingering(config.primary.intent_linger)
            .hot(config.primary.intent_hot);
        let bytes: u64 = recovery.dirty.values().map(|r| r.covered_bytes()).sum();
        if recovery.clean {
            log::info!(
                "{}: clean start, {bytes} unsynced bytes carried over",
                source.display()
            );
        } else {
            log::warn!(
                "{}: unclean stop detected; {} images, {bytes} bytes of logged extents treated as dirty",
                source.display(),
                recovery.dirty.len()
            );
            logged = Some(recovery.dirty.keys().cloned().collect());
        }
        Tracker::new(log, recovery.dirty)
    };
    let tracker = Arc::new(tracker);
    // Watch for writes that bypass the mount before judging what changed while unmounted, so
    // that nothing falls between the two.
    let outside = Arc::new(Outside::start(source, &state.join("stamps.json")));
    let fs = Arc::new(
        Fs::new(source, opts.read_only, tracker.clone())?
            .with_direct_backing(opts.direct_backing)
            .with_writeback_cache(opts.writeback_cache),
    );
    let closing = tracker.clone();
    let closing_outside = outside.clone();
    let label = source.display().to_string();
    let on_destroy = Box::new(move || {
        if closing.enabled() {
            closing_outside.close(&closing);
        }
        match closing.close_clean() {
            Ok(()) => log::info!("{label}: unmounted cleanly"),
            Err(e) => log::error!("{label}: could not close the intent log cleanly: {e}"),
        }
    });
    let engine = Arc::new(crate::sync::Engine::open(
        sync_options(config)?,
        source,
        state,
        tracker.clone(),
        outside.clone(),
    )?);
    // A sync point first makes the kernel send the writes it caches for the mount (writeback
    // cache, shared mappings): syncfs(2) of the mount, served by this daemon's own workers.
    // Not before the mount is up (or after it is gone): that would sync the filesystem under.
    let root = mountpoint.to_path_buf();
    engine.before_freeze(Box::new(move || {
        const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
        let dir = std::fs::File::open(&root)?;
        if rustix::fs::fstatfs(&dir)?.f_type as i64 != FUSE_SUPER_MAGIC {
            return Ok(());
        }
        Ok(rustix::fs::syncfs(&dir)?)
    }));
    if let Some(f) = &config.failover
        && !opts.read_only
    {
        let id = crate::net::Identity::load(&config.node.key_dir)?;
        let me = crate::failover::Leader {
            node: config.node.name.clone(),
            fingerprint: id.fingerprint().to_string(),
            namespace: engine.lineage().namespace,
        };
        crate::failover::lead::start(f.clone(), me, engine.clone(), fs.gate())?;
    }
    if tracker.enabled() {
        let empty = std::collections::BTreeSet::new();
        outside
            .check_at_mount(
                &engine.image_names(),
                logged.is_none(),
                logged.as_ref().unwrap_or(&empty),
                &tracker,
            )
            .context("cannot record the changes made while unmounted")?;
        let (o, t) = (outside.clone(), tracker.clone());
        std::thread::Builder::new()
            .name("outside".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(OUTSIDE_POLL);
                    o.drain(&t, false);
                }
            })?;
    }
    if let Some(addr) = config.node.metrics {
        let mut reg = prometheus_client::registry::Registry::default();
        let m = crate::sync::metrics::SyncMetrics::register(&mut reg);
        engine.on_report(Box::new(move |r| m.observe(r)));
        reg.register_collector(Box::new(crate::sync::metrics::StatusCollector {
            engine: engine.clone(),
            rpo: config.primary.sync_interval,
        }));
        crate::metrics::serve(addr, reg, "mount");
    }
    let scheduler = crate::sync::trigger::Scheduler::start(
        engine.clone(),
        config.primary.sync_interval,
        config.primary.sync_timeout,
    )?;
    if config.primary.sync_on_fsync {
        let s = scheduler.clone();
        tracker.set_on_fsync(Box::new(move || {
            s.request();
        }));
    }
    let socket = state.join("control.sock");
    let closing_engine = engine.clone();
    crate::control::serve(
        &socket,
        control_handler(
            source,
            mountpoint,
            tracker.clone(),
            outside.clone(),
            engine,
            scheduler,
        ),
    )?;
    let adapter = FerryFuse::new(fs, Some(socket), on_destroy);
    let notifier = adapter.notifier_slot();

    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName(
            opts.fsname
                .clone()
                .unwrap_or_else(|| source.display().to_string()),
        ),
        MountOption::Subtype("ferry".into()),
    ];
    cfg.mount_options.push(if opts.read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    // The daemon runs as root: let the kernel check permissions against each caller.
    cfg.mount_options.push(MountOption::DefaultPermissions);
    cfg.mount_options.extend(
        opts.kernel
            .iter()
            .filter(|o| **o != MountOption::DefaultPermissions)
            .cloned(),
    );
    cfg.acl = if opts.allow_other {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    cfg.n_threads = Some(opts.threads());
    cfg.clone_fd = true;
    let mut session = fuser::Session::new(adapter, mountpoint, &cfg).with_context(|| {
        format!(
            "cannot mount {} on {}",
            source.display(),
            mountpoint.display()
        )
    })?;
    log::info!(
        "mounted {} on {} ({} threads)",
        source.display(),
        mountpoint.display(),
        opts.threads()
    );

    let _ = notifier.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])?;
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: unmounting {}", mp.display());
                if let Err(e) = unmounter.unmount() {
                    log::error!("unmount {} failed: {e}", mp.display());
                }
            }
        })?;
    if opts.writeback_cache {
        let mp = mountpoint.to_path_buf();
        // It stats the mount, which the session answers once it runs (below).
        std::thread::spawn(move || writeback_limits(&mp));
    }
    if let Some(ready) = ready {
        ready();
    }
    // systemd (Type=notify, a foreground mount run as a service): the mount is live.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("cannot tell systemd the mount is ready: {e}");
    }
    let ran = session.run().context("FUSE session failed");
    closing_engine.close_connections();
    ran
}

/// The kernel lets a FUSE mount hold at most 1% of the dirty page limit, strictly
/// (`/sys/class/bdi/MAJ:MIN/`): with the writeback cache a writer is then throttled to the
/// daemon's pace after a few MiB. Let this mount's cache hold up to 20% of it, as a disk's
/// may (docs/BENCHMARKS.md, "Buffered writes").
fn writeback_limits(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(m) => m.dev(),
        Err(e) => return log::warn!("cannot stat {}: {e}", mountpoint.display()),
    };
    let bdi = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    for (file, value) in [("strict_limit", "0"), ("max_ratio", "20")] {
        if let Err(e) = std::fs::write(bdi.join(file), value) {
            log::warn!(
                "cannot set {}/{file} to {value} ({e}): buffered writes through the writeback \
                 cache are throttled to the daemon's pace",
                bdi.display()
            );
        }
    }
}

/// Per image: bytes changed since the last sync point (`dirty_bytes`), and bytes of the last
/// generation each replica lacks (`behind`, by replica name). Images with neither are left out.
fn image_status(tracker: &Tracker, sync: &serde_json::Value, ranges: bool) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut images: std::collections::BTreeMap<String, Value> = tracker
        .dirty()
        .into_iter()
        .map(|(path, dirty)| {
            let bytes: u64 = dirty.iter().map(|r| r.end - r.start).sum();
            let mut v = json!({"path": path, "dirty_bytes": bytes, "behind": {}});
            if ranges {
                v["dirty"] = dirty.iter().map(|r| json!([r.start, r.end])).collect();
            }
            (path.to_string_lossy().into_owned(), v)
        })
        .collect();
    for r in sync["replicas"].as_array().into_iter().flatten() {
        let name = r["name"].as_str().unwrap_or("?");
        for (path, n) in r["behind"].as_object().into_iter().flatten() {
            let v = images.entry(path.clone()).or_insert_with(|| {
                let mut v = json!({"path": path, "dirty_bytes": 0, "behind": {}});
                if ranges {
                    v["dirty"] = json!([]);
                }
                v
            });
            v["behind"][name] = n.clone();
        }
    }
    images.into_values().collect()
}

/// What the sync engine needs of the config file.
fn sync_options(config: &Config) -> Result<crate::sync::Options> {
    let identity = if config.peers.is_empty() {
        None
    } else {
        Some(crate::net::Identity::load(&config.node.key_dir)?)
    };
    Ok(crate::sync::Options {
        node: config.node.name.clone(),
        params: config.chunk_params().map_err(|e| anyhow!("{e}"))?,
        required: config.primary.replicas,
        failover_after: config.primary.failover_after,
        bandwidth_limit: config.primary.bandwidth_limit,
        congestion: config.primary.congestion,
        identity,
        peers: config
            .peers
            .iter()
            .map(|p| crate::sync::PeerSpec {
                name: p.name.clone(),
                addr: p.addr,
                fingerprint: p.fingerprint,
                zone: p.zone.clone(),
                bandwidth_limit: p.bandwidth_limit,
            })
            .collect(),
    })
}

/// Answers control requests for this mount.
fn control_handler(
    source: &Path,
    mountpoint: &Path,
    tracker: Arc<Tracker>,
    outside: Arc<Outside>,
    engine: Arc<crate::sync::Engine>,
    scheduler: Arc<crate::sync::trigger::Scheduler>,
) -> Arc<crate::control::Handler> {
    let (source, mountpoint) = (source.to_path_buf(), mountpoint.to_path_buf());
    Arc::new(move |req: &serde_json::Value| match req["cmd"].as_str() {
        Some("sync") => {
            let images: Vec<String> = req["images"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let timeout =
                std::time::Duration::from_secs_f64(req["timeout"].as_f64().unwrap_or(3600.0));
            if !images.is_empty() {
                return Ok(serde_json::to_value(engine.sync(&images, timeout)?)?);
            }
            if req["no_wait"].as_bool().unwrap_or(false) {
                scheduler.request();
                return Ok(serde_json::json!({"queued": true}));
            }
            let ticket = scheduler.request_within(Some(timeout));
            scheduler
                .wait(ticket, crate::sync::trigger::Scheduler::wait_bound(timeout))
                .map_err(|e| match crate::sync::board::held_up(&engine.status()) {
                    Some(why) => anyhow!("{e}: {why}; `ferry status` shows more"),
                    None => anyhow!(e),
                })
        }
        Some("verify") => {
            let repair = req["repair"].as_bool().unwrap_or(false);
            if req["primary"].as_bool() == Some(true) {
                return Ok(engine.verify_primary(repair));
            }
            let deep = req["deep"].as_bool().unwrap_or(false);
            let checks = engine.verify_replicas(deep, repair);
            let all_ok = |c: &[crate::sync::verify::ReplicaCheck]| c.iter().all(|c| c.ok);
            if !repair || all_ok(&checks) {
                return Ok(serde_json::json!({"matches": all_ok(&checks), "replicas": checks}));
            }
            // What the replicas could not mend from their own stores, the next generation
            // brings (each replica's manifest now says what it holds; the session finds the
            // difference by Merkle descent); then the check runs again, repairing nothing.
            let ticket = scheduler.request_within(None);
            let timeout = std::time::Duration::from_secs(3600);
            let synced = scheduler.wait(ticket, timeout);
            let after = engine.verify_replicas(deep, false);
            Ok(serde_json::json!({
                "matches": all_ok(&after),
                "replicas": after,
                "repair": {
                    "replicas": checks,
                    "sync": synced.unwrap_or_else(|e| serde_json::json!({"error": e})),
                },
            }))
        }
        Some("status") => {
            // Writes that bypassed the mount show at once, not at the next poll.
            outside.drain(&tracker, false);
            let ranges = req["ranges"].as_bool().unwrap_or(false);
            let mut sync = engine.status();
            sync["rpo_target_s"] = scheduler.interval().map(|d| d.as_secs_f64()).into();
            Ok(serde_json::json!({
                "pid": std::process::id(),
                "source": source,
                "mountpoint": mountpoint,
                "tracking": tracker.enabled(),
                "dirty_bytes": tracker.dirty_bytes(),
                "intent_log_bytes": tracker.logged_bytes(),
                "images": image_status(&tracker, &sync, ranges),
                "sync": sync,
            }))
        }
        other => bail!("unknown control command {other:?}"),
    })
}

/// The config file's `[replica]` section, or an error that says what to add.
pub fn replica_section(
    config: &crate::config::Config,
    path: &std::path::Path,
) -> Result<crate::config::Replica> {
    config.replica.clone().ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no [replica] section: add listen, store and primaries",
            path.display()
        )
    })
}

/// The replica daemon's options from a config file (`mount` overrides `[replica] mount`).
pub fn replica_options(
    config: &crate::config::Config,
    path: &std::path::Path,
    mount: Option<std::path::PathBuf>,
) -> Result<crate::replica::daemon::Options> {
    let rc = replica_section(config, path)?;
    Ok(crate::replica::daemon::Options {
        identity: crate::net::Identity::load(&config.node.key_dir)?,
        params: config.chunk_params().map_err(|e| anyhow::anyhow!("{e}"))?,
        store: rc.store.clone(),
        listen: rc.listen,
        mount: mount.or(rc.mount.clone()),
        keep: policy(&rc),
        scrub_interval: rc.scrub_interval,
        stop_on_unmount: false,
        primaries: rc.primaries,
        metrics: config.node.metrics,
        on_site: None,
    })
}

/// The restore points a `[replica]` section keeps.
pub fn policy(rc: &crate::config::Replica) -> crate::replica::Policy {
    crate::replica::Policy {
        keep: rc.keep,
        keep_for: rc.keep_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MountOptions> {
        MountOptions::parse(&[s.to_string()])
    }

    #[test]
    fn fstab_options_are_accepted_and_unknown_ones_named() {
        let o = parse("config=/etc/ferry/ferry.toml,allow_other,noauto,_netdev,x-systemd.requires=network-online.target,nodev").unwrap();
        assert_eq!(o.config, Some(PathBuf::from("/etc/ferry/ferry.toml")));
        assert!(o.allow_other);
        assert_eq!(o.kernel, vec![MountOption::NoDev]);
        let e = parse("allow_other,frobnicate").unwrap_err().to_string();
        assert!(
            e.contains("\"frobnicate\"") && e.contains("config=FILE"),
            "{e}"
        );
        assert!(parse("threads=0").is_err());
        assert_eq!(parse("").unwrap().threads(), 16);
        assert_eq!(parse("direct_backing").unwrap().threads(), 32);
        assert_eq!(parse("direct_backing,threads=8").unwrap().threads(), 8);
        assert!(parse("ro").unwrap().read_only);
        assert!(parse("private_backing").unwrap().private_backing);
        assert!(parse("direct_backing").unwrap().direct_backing);
    }
}
