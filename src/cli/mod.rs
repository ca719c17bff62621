//! The command line: parse, then hand each command to the module that owns it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};

use crate::chunk::{self, ChunkParams, FileSource};
use crate::manifest;
use crate::net;

mod takeover;

/// ferry keeps virtual-machine images replicated across a wide-area network.
///
/// Images live on a ferry mount; ferry records which bytes change, re-chunks only those
/// (FastCDC + BLAKE3) at each sync point, and ships only new content to the replicas.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount a backing directory of images as a ferry filesystem.
    ///
    /// Every write through MOUNTPOINT lands in the file of the same name under SOURCE, and
    /// ferry records which bytes changed (durably, in an intent log under the state
    /// directory), so each sync ships only those. Without -f the command returns once the
    /// mount is live and the daemon logs to STATE_DIR/mounts/<source>/ferry.log. `umount
    /// MOUNTPOINT` or SIGTERM unmounts cleanly.
    ///
    /// The same command runs as a mount helper: `mount -t fuse.ferry SOURCE MOUNTPOINT -o
    /// config=FILE`, or an fstab line `SOURCE MOUNTPOINT fuse.ferry config=FILE,allow_other 0 0`.
    ///
    /// With a `[failover]` table the mount holds etcd's leader key with a lease and writes
    /// under the epoch the key stands for; if it cannot renew the lease in time it fences
    /// itself (no sync point, guest writes held, EIO after `write_grace`) until it can, and
    /// for good if another node took the key (`ferry status` says which).
    Mount(MountArgs),
    /// Make a sync point now and wait until the replicas have committed it.
    ///
    /// Freezes the changes of every image on the mount (or only the IMAGEs named), re-chunks
    /// just the changed regions, and ships the new generation to the configured peers. Waits
    /// until as many replicas as `[primary] replicas` have committed it, then prints a summary
    /// (`--json`: root, dirty_bytes, bytes_sent, chunks_sent, patches_sent, duration_ms and per
    /// replica its name, state and committed root). Exits non-zero if they did not commit.
    Sync(SyncArgs),
    /// Show a mount's replication: the generation, the sync in progress, each replica's state
    /// and lag, and the unsynced bytes per image.
    ///
    /// Answers at once, even while a sync runs: the daemon publishes a snapshot at each step of
    /// a sync. Shows the last generation cut and how many replicas hold it; the sync in
    /// progress (its phase and the bytes sent of those the replicas asked for); one row per
    /// replica with its state (committed, shipping X of Y, failing with the cause and what to do,
    /// or behind), the generation it committed, its lag (bytes of the last generation it lacks,
    /// and generations), its recovery point (how long ago the sync point it holds was cut: the
    /// writes it would lack if this primary failed now, with a line saying why when that is
    /// more than twice sync_interval), when it last committed and whether the selection ships
    /// to it; the bytes changed since the last sync point; and one row per image with unsynced
    /// bytes or
    /// bytes some replica lacks. docs/OPERATIONS.md lists every field of --json and every
    /// failure cause.
    ///
    /// On a replica host, `ferry status` (or `ferry status --config FILE` for one replica,
    /// running or not) shows each replica store: the generation it committed and when (how long
    /// ago), its epoch, images, restore points and what they cost, the bytes staged for the
    /// next generation, and the daemon's pid, listen address and mount.
    Status(StatusArgs),
    /// Check that the replicas (or, with --primary, this primary) hold what their manifests say.
    ///
    /// Without --primary, on a primary mount: asks every replica what it holds and compares
    /// its generation and each image's size and Merkle root with this primary's manifests of
    /// the generation that replica last committed; prints each replica and the images that
    /// differ. With --deep, each replica also re-reads and re-hashes every image and every kept
    /// chunk of its restore points and reports each damaged chunk by image, offset and length
    /// (it reads its whole store: minutes per 100 GiB). With --deep --repair, each replica
    /// mends damaged chunks from good copies in its own store; what it cannot, its manifest
    /// stops claiming, and a sync point then ships the right bytes as a new generation (applied
    /// atomically); the check then runs again. Exits non-zero while anything differs.
    ///
    /// With --primary: re-reads every image in its backing directory and re-hashes each chunk
    /// against the manifest of the last generation cut, so a change that bypassed the mount
    /// and escaped detection (or bit rot in the backing file) is found. Bytes written through
    /// the mount since the last sync point are skipped (the next sync point re-chunks them).
    /// With --repair, marks what differs changed, so the next `ferry sync` ships it.
    Verify(VerifyArgs),
    /// Run the replica daemon (foreground, systemd style).
    ///
    /// Listens on `[replica] listen` for the primaries pinned in `[replica] primaries`. Each
    /// primary has its own namespace in `[replica] store`, the directory STORE/NAME named by
    /// its [node] name (bound to its key on first contact: no other primary can reach it), with
    /// its own generations, restore points and epoch; each image keeps there the relative path
    /// it has on the primary's mount. Every generation is applied atomically: a crash at any
    /// point leaves the last committed generation, or the new one after restart.
    ///
    /// With --mount (or `[replica] mount`) it also serves the store read-only at MNT, a
    /// directory per primary: every image at MNT/NAME/PATH as the newest committed generation
    /// has it, never a half-applied one. A file keeps the generation it was opened at until it
    /// is closed (a VM booted from the replica for a disaster-recovery test keeps a consistent
    /// disk while newer generations arrive); a new open sees the newest. Restore points
    /// (`[replica] keep`, `keep_for`) are under MNT/NAME/.ferry/generations/<N>/, which is not
    /// listed.
    ///
    /// With a `[failover]` table it also watches etcd's leader key: when the primary's lease
    /// runs out and this replica holds the newest generation of the live replicas, it takes the
    /// key, promotes itself as `ferry promote` does (at `[failover] mount`) and goes on as the
    /// replica daemon of the store's other namespaces (docs/OPERATIONS.md, "Automatic
    /// failover on etcd").
    Replica(ReplicaArgs),
    /// List a replica's restore points: number, time, group root, bytes each holds alone.
    ///
    /// Reads the store named by `[replica] store` (the daemon may be running or not). "Own
    /// bytes" are the kept chunks only that generation needs: what expiring it alone frees.
    Generations(GenerationsArgs),
    /// Write out one image as a restore point of a replica has it.
    ///
    /// Writes FILE (sparse: zero extents become holes), every chunk verified against the
    /// generation's manifest, then prints the image's root. Refuses to overwrite an existing
    /// FILE. The daemon may be running: a generation that expires meanwhile ends the restore
    /// with an error, never a wrong file.
    Restore(RestoreArgs),
    /// Make this replica the primary of a namespace: after a disaster at the primary's site.
    ///
    /// Asks the other replicas (the config's [[peer]]s) what they hold of the namespace, and
    /// refuses, naming it, when one holds a newer generation (promote that one, or give
    /// --force). Then records the next epoch durably (above every epoch any replica has seen)
    /// and serves the namespace's images read-write as a primary mount at MNT, starting from
    /// the committed generation: no image byte is copied or re-read. The mount replicates to
    /// the [[peer]]s with the config's [primary] policy; they follow it when their [replica]
    /// primaries pin this node's key, and from then on refuse the old primary as fenced (run
    /// `ferry rejoin` there once it is back).
    ///
    /// The replica daemon must not run on the store meanwhile (stop it first; restart it
    /// afterwards to go on serving other primaries' namespaces). Running promote again after
    /// a crash, or after an unmount, finishes the same promotion and mounts again.
    ///
    /// With a `[failover]` table, a promotion by hand is refused while etcd says another
    /// node holds the leader key with a live lease (--force overrides).
    Promote(PromoteArgs),
    /// Make a fenced old primary a replica of the primary that replaced it.
    ///
    /// Run on the old primary once it is back and a promotion elsewhere has fenced it. Asks
    /// the config's [[peer]]s who holds its namespace now (refused when no replica knows a
    /// newer epoch: this node is still the primary), stops its primary mount (or finds it
    /// stopped), brings its manifests up to date from the intent log, and saves every range it
    /// wrote that the new primary never got (what differs from the generation the new primary
    /// last acknowledged from it) as sparse files with an index.json under STATE_DIR/rejoin/,
    /// before a byte is overwritten. Then its backing directory becomes its namespace in
    /// [replica] store (a rename: same filesystem), bound to its own key, so that the new
    /// primary, listing this node as a [[peer]], takes it over and sends only what differs.
    /// Start the replica daemon afterwards.
    Rejoin(RejoinArgs),
    /// Chunk a file and print its Merkle root, chunk count and chunk sizes.
    ///
    /// Reads FILE once (holes are skipped, not read), cuts it into content-defined chunks with
    /// FastCDC, hashes each with BLAKE3, and records runs of zero bytes as zero extents. The
    /// root identifies the content: two files with the same root hold the same bytes.
    Manifest(ManifestArgs),
    /// Create this node's identity: a private key and a self-signed certificate.
    ///
    /// Writes DIR/node.key (mode 0600) and DIR/node.crt, creating DIR (mode 0700) if needed,
    /// and prints the certificate's fingerprint (SHA-256, 64 hex digits). Nodes trust each
    /// other only by fingerprint: put this one into the config of every node that must talk to
    /// this one (a replica's `[replica] primaries`, a primary's `[[peer]] fingerprint`). Never
    /// overwrites an existing key: a new key is a new identity that every peer would refuse.
    Keygen(KeygenArgs),
    /// Print this node's fingerprint again, to put into the other nodes' configs.
    ///
    /// Reads only DIR/node.crt (public), so it works without access to the private key.
    Id(IdArgs),
    /// Write the man pages (ferry.1 and one per command) into DIR; for installers.
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

#[derive(Args, Debug)]
pub struct ManpagesArgs {
    /// Directory for the pages, e.g. /usr/local/share/man/man1.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory for node.key and node.crt, e.g. /etc/ferry/keys (the config's `key_dir`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one JSON object: {"fingerprint", "key", "cert"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// Directory holding node.crt (the config's `key_dir`).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Print one JSON object: {"fingerprint", "cert"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The backing directory that holds the images.
    pub source: PathBuf,
    /// Where to mount it (an existing empty directory).
    pub mountpoint: PathBuf,
    /// Mount options, comma separated: config=FILE (the node's config), allow_other,
    /// allow_root, default_permissions, ro, fsname=NAME, threads=N (FUSE workers, default 16, 32 with direct_backing),
    /// direct_backing (a guest's O_DIRECT I/O, QEMU cache=none, bypasses the host's page cache
    /// on the backing file too), writeback_cache (the kernel caches buffered writes; sync
    /// points flush them first; a killed daemon loses those not yet sent), and the usual dev/nodev, suid/nosuid, exec/noexec, atime/noatime. fstab-only options
    /// (noauto, _netdev, nofail, x-*) are accepted and ignored.
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// The epoch etcd's leader key stands for (a promotion by automatic failover).
    #[arg(skip)]
    pub at_epoch: Option<u64>,
    /// Stay in the foreground (for systemd and debugging); log to stderr.
    #[arg(short = 'f', long)]
    pub foreground: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    /// The mountpoint of a running `ferry mount`.
    pub mountpoint: PathBuf,
    /// Images (paths relative to the mount) to cut; default: all.
    pub images: Vec<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Give up waiting for the replicas after this many seconds. A sync point already in
    /// progress when this one is asked for may hold it up: then it waits up to twice as long,
    /// plus 5 s, and if none finished says what holds it up.
    #[arg(long, value_name = "S", default_value_t = 3600.0)]
    pub timeout: f64,
    /// Only ask for a sync point and return at once (it is merged with one already pending).
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug)]
pub struct ReplicaArgs {
    /// The node's config file (with a [replica] section).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Serve the read-only replica mount here (overrides `[replica] mount`).
    #[arg(long, value_name = "MNT")]
    pub mount: Option<PathBuf>,
    /// Serve no read-only replica mount, whatever `[replica] mount` or `--mount` say (a promotion by
    /// automatic failover restarts the daemon so when the primary mount took that path).
    #[arg(long)]
    pub no_mount: bool,
}

#[derive(Args, Debug)]
pub struct GenerationsArgs {
    /// The node's config file (with a [replica] section).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Only the restore points of this primary (its [node] name); all of them by default.
    #[arg(long, value_name = "NAME")]
    pub primary: Option<String>,
    /// Print one JSON object: primaries, each with primary, fingerprint, generations
    /// (generation, committed, group_root, epoch, images, own_bytes, pinned) and kept_bytes.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The node's config file: [replica] store holds the namespace, [[peer]] names the other
    /// replicas, [primary] is the sync policy once promoted.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Where to serve the images read-write (default: [failover] mount, else [replica] mount).
    #[arg(long, value_name = "MNT")]
    pub mount: Option<PathBuf>,
    /// The namespace to take over: the old primary's [node] name (needed when the store
    /// holds several).
    #[arg(long, value_name = "NAME")]
    pub primary: Option<String>,
    /// Promote even though another replica holds a newer generation (its newer generations
    /// stay there as restore points, kept for good).
    #[arg(long)]
    pub force: bool,
    /// Mount options, as `ferry mount -o` takes them (e.g. allow_other for a hypervisor that
    /// runs QEMU as another user).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Print one JSON object: namespace, epoch, base (epoch, generation, root), backing,
    /// mountpoint, replicas (what each said), took_ms, fstab.
    #[arg(long)]
    pub json: bool,
    /// The epoch etcd's leader key stands for (a promotion by automatic failover).
    #[arg(skip)]
    pub at_epoch: Option<u64>,
}

#[derive(Args, Debug)]
pub struct RejoinArgs {
    /// The node's config file: [replica] store receives the images, [[peer]] names the
    /// replicas to ask who holds the namespace now.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The fenced mount's backing directory (found in the state directory when omitted).
    pub source: Option<PathBuf>,
    /// Print one JSON object: namespace, new_primary, new_epoch, saved (directory), saved_bytes,
    /// images, store.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The node's config file (with a [replica] section).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The image as the replica mount shows it: PRIMARY/PATH, the primary's [node] name and
    /// the image's path under its mount.
    pub image: String,
    /// The restore point (see `ferry generations`).
    #[arg(long, value_name = "N")]
    pub generation: u64,
    /// Where to write the image.
    #[arg(long, value_name = "FILE")]
    pub to: PathBuf,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The mountpoint of a running `ferry mount`.
    pub mountpoint: PathBuf,
    /// Re-hash this primary's own images against its manifests (not the replicas').
    #[arg(long, conflicts_with = "deep")]
    pub primary: bool,
    /// Each replica re-reads and re-hashes its images and kept chunks.
    #[arg(long)]
    pub deep: bool,
    /// Mend what differs (see above); with neither --primary nor --deep, a sync point that
    /// brings each differing replica to the primary's bytes.
    #[arg(long)]
    pub repair: bool,
    /// Print one JSON object: ok, and replicas (name, ok, generation, expected_generation,
    /// differing: path, ranges, error, deep: images, bytes, kept_chunks, damage: path, offset, len, hash,
    /// generations, state) and, after a repair, repair (the first pass and the sync's report);
    /// with --primary: ok, repaired, images (path, ok, mismatched, size, error).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The mountpoint of a running `ferry mount`; without it, every ferry mount on this host
    /// (and the replica daemons running here are listed).
    pub mountpoint: Option<PathBuf>,
    /// Print one JSON object instead of text (without MOUNTPOINT: an array, one per mount).
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds (default 2) until interrupted, like watch(1).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// Include every dirty byte range, not only the totals.
    #[arg(long)]
    pub ranges: bool,
    /// A replica node's config file: show that replica's store (the daemon may be stopped).
    #[arg(long, value_name = "FILE", conflicts_with = "mountpoint")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// The file to chunk (any regular file: raw, qcow2, vmdk image...).
    pub file: PathBuf,
    /// Print one JSON object (root, chunks, size, ...) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write the manifest to this file (atomically, with a checksum).
    #[arg(long, value_name = "PATH")]
    pub save: Option<PathBuf>,
    #[command(flatten)]
    pub chunking: ChunkingArgs,
}

/// Chunk size options; every node of a cluster must use the same values.
#[derive(Args, Debug)]
#[command(next_help_heading = "Chunking")]
pub struct ChunkingArgs {
    /// Smallest chunk, e.g. 16KiB.
    #[arg(long = "chunk-min", value_name = "SIZE", default_value = "16KiB")]
    pub min: ByteSize,
    /// Average chunk.
    #[arg(long = "chunk-avg", value_name = "SIZE", default_value = "64KiB")]
    pub avg: ByteSize,
    /// Largest chunk.
    #[arg(long = "chunk-max", value_name = "SIZE", default_value = "256KiB")]
    pub max: ByteSize,
}

impl ChunkingArgs {
    pub fn params(&self) -> Result<ChunkParams> {
        let small = |b: ByteSize, what: &str| {
            u32::try_from(b.as_u64()).with_context(|| format!("chunk {what} size {b} is too large"))
        };
        Ok(ChunkParams::new(
            small(self.min, "min")?,
            small(self.avg, "avg")?,
            small(self.max, "max")?,
        )?)
    }
}

/// Rewrites the mount-helper form `ferry SOURCE MOUNTPOINT [-o OPTS]` (how `mount.fuse3` and
/// fstab call a FUSE filesystem) into `ferry mount SOURCE MOUNTPOINT ...`.
pub fn helper_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    use clap::CommandFactory;
    let first = args.get(1).map(|a| a.to_string_lossy().into_owned());
    if let Some(first) = first {
        let known = Cli::command()
            .get_subcommands()
            .any(|c| c.get_name() == first || c.get_all_aliases().any(|a| a == first));
        if !known && first != "help" && !first.starts_with('-') && args.len() >= 3 {
            args.insert(1, "mount".into());
        }
    }
    args
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Mount(a) => crate::mount::run(crate::mount::MountRequest {
            options: crate::mount::MountOptions::parse(&a.options)?,
            source: a.source,
            mountpoint: a.mountpoint,
            foreground: a.foreground,
        }),
        Command::Sync(a) => sync_cmd(a),
        Command::Status(a) => status_cmd(a),
        Command::Verify(a) => verify_cmd(a),
        Command::Replica(a) => replica_cmd(&a),
        Command::Generations(a) => generations_cmd(&a),
        Command::Restore(a) => restore_cmd(&a),
        Command::Promote(a) => takeover::promote_cmd(&a),
        Command::Rejoin(a) => takeover::rejoin_cmd(&a),
        Command::Manifest(a) => manifest_cmd(a),
        Command::Keygen(a) => keygen_cmd(a),
        Command::Id(a) => id_cmd(a),
        Command::Manpages(a) => manpages_cmd(&a.dir),
    }
}

/// ferry.1 and ferry-COMMAND.1 for every visible command, generated from the same clap
/// definitions as `--help`, so they cannot drift.
fn manpages_cmd(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = Cli::command();
    let write = |name: &str, c: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(c).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        // clap names are &'static str; this process ends right after.
        let name: &'static str = Box::leak(format!("ferry-{}", sub.get_name()).into_boxed_str());
        write(name, sub.clone().name(name))?;
    }
    write("ferry", cmd)
}

fn keygen_cmd(a: KeygenArgs) -> Result<()> {
    let fp = net::keygen(&a.dir)?;
    if a.json {
        let v = serde_json::json!({
            "fingerprint": fp,
            "key": a.dir.join(net::KEY_FILE),
            "cert": a.dir.join(net::CERT_FILE),
        });
        println!("{v}");
    } else {
        println!("{fp}");
    }
    Ok(())
}

fn id_cmd(a: IdArgs) -> Result<()> {
    let fp = net::fingerprint_in(&a.dir)?;
    if a.json {
        let v = serde_json::json!({
            "fingerprint": fp,
            "cert": a.dir.join(net::CERT_FILE),
        });
        println!("{v}");
    } else {
        println!("{fp}");
    }
    Ok(())
}

fn manifest_cmd(a: ManifestArgs) -> Result<()> {
    let params = a.chunking.params()?;
    let src = FileSource::open(&a.file)
        .with_context(|| format!("cannot open image {}", a.file.display()))?;
    let t = Instant::now();
    let (m, scan) = chunk::chunk_full(&src, params)
        .with_context(|| format!("cannot chunk {}", a.file.display()))?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(path) = &a.save {
        manifest::save(path, &m)?;
    }
    let s = m.stats();
    let rate = m.size() as f64 / secs.max(1e-9);
    if a.json {
        let v = serde_json::json!({
            "file": a.file,
            "root": m.root().to_hex().as_str(),
            "size": m.size(),
            "chunks": s.chunks,
            "zero_extents": s.zero_extents,
            "data_bytes": s.data_bytes,
            "zero_bytes": s.zero_bytes,
            "min_chunk": s.min_chunk,
            "avg_chunk": s.avg_chunk,
            "max_chunk": s.max_chunk,
            "bytes_read": scan.bytes_read,
            "seconds": secs,
            "bytes_per_second": rate as u64,
            "params": params,
        });
        println!("{v}");
    } else {
        println!("{}", a.file.display());
        println!("  root     {}", m.root());
        println!("  size     {} ({} bytes)", iec(m.size()), m.size());
        println!(
            "  chunks   {} data, {} ({} min, {} avg, {} max)",
            s.chunks,
            iec(s.data_bytes),
            iec(s.min_chunk),
            iec(s.avg_chunk),
            iec(s.max_chunk)
        );
        println!(
            "  zeros    {} zero extents, {}",
            s.zero_extents,
            iec(s.zero_bytes)
        );
        println!(
            "  speed    {}/s ({secs:.2} s, {} read)",
            iec(rate as u64),
            iec(scan.bytes_read)
        );
    }
    Ok(())
}

/// The namespaces of the store a config names (one per primary), read beside the daemon.
fn replica_namespaces(path: &std::path::Path) -> Result<Vec<crate::replica::site::Namespace>> {
    namespaces_after(path, std::time::Duration::ZERO)
}

/// [`replica_namespaces`], each read once it has applied the generation it acknowledged last
/// (the apply follows the acknowledgement by tens of milliseconds; waited for up to 5 s), so
/// that what `ferry sync` reported is listed and can be restored.
fn settled_namespaces(path: &std::path::Path) -> Result<Vec<crate::replica::site::Namespace>> {
    namespaces_after(path, std::time::Duration::from_secs(5))
}

fn namespaces_after(
    path: &std::path::Path,
    settle: std::time::Duration,
) -> Result<Vec<crate::replica::site::Namespace>> {
    let config = crate::config::Config::load(path)?;
    let rc = crate::mount::replica_section(&config, path)?;
    let params = config.chunk_params().map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = rc.store.canonicalize().with_context(|| {
        format!(
            "replica store {} not found (the config's [replica] store)",
            rc.store.display()
        )
    })?;
    crate::replica::site::read_only(&root, params, crate::mount::policy(&rc), settle)
}

/// The namespace of `name`'s primary, or an error that lists those there are.
fn namespace<'a>(
    all: &'a [crate::replica::site::Namespace],
    name: &str,
) -> Result<&'a crate::replica::site::Namespace> {
    let ns = all.iter().find(|n| n.name == name).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|n| n.name.as_str()).collect();
        anyhow::anyhow!(
            "no primary {name:?} in this replica's store (it holds: {names:?}; a primary's \
             namespace is its [node] name, created when it first syncs)"
        )
    })?;
    ns.view.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ns)
}

/// A namespace's view, which [`namespace`] or the caller checked.
fn view_of(ns: &crate::replica::site::Namespace) -> Result<&crate::replica::View> {
    ns.view.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
}

/// `ferry generations --config FILE [--primary NAME]`.
fn generations_cmd(a: &GenerationsArgs) -> Result<()> {
    let all = settled_namespaces(&a.config)?;
    let chosen: Vec<&crate::replica::site::Namespace> = match &a.primary {
        Some(name) => vec![namespace(&all, name)?],
        None => all.iter().collect(),
    };
    if a.json {
        let list: Vec<serde_json::Value> = chosen
            .iter()
            .map(|ns| match &ns.view {
                Ok(view) => serde_json::json!({
                    "primary": ns.name,
                    "fingerprint": ns.fingerprint,
                    "generations": view.points(),
                    "kept_bytes": view.kept_figures().0,
                }),
                Err(e) => serde_json::json!({
                    "primary": ns.name,
                    "fingerprint": ns.fingerprint,
                    "error": e,
                }),
            })
            .collect();
        println!("{}", serde_json::json!({ "primaries": list }));
        return Ok(());
    }
    if chosen.is_empty() {
        println!("no primary has synced to this replica yet");
    }
    for ns in chosen {
        println!("primary {} (key {}):", ns.name, ns.fingerprint);
        let view = match &ns.view {
            Ok(v) => v,
            Err(e) => {
                println!("  cannot read it: {e}");
                continue;
            }
        };
        println!(
            "  {:>10}  {:<20}  {:<16}  {:>6}  {:>12}",
            "GENERATION", "COMMITTED (UTC)", "GROUP ROOT", "IMAGES", "OWN BYTES"
        );
        for p in view.points() {
            let at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(p.committed),
            );
            println!(
                "  {:>10}  {:<20}  {:<16}  {:>6}  {:>12}",
                p.generation,
                at.to_string().trim_end_matches('Z').replace('T', " "),
                &p.group_root[..p.group_root.len().min(16)],
                p.images,
                p.own_bytes
            );
        }
        println!("  kept chunks: {} bytes", view.kept_figures().0);
    }
    Ok(())
}

/// `ferry restore --config FILE IMAGE --generation N --to FILE`.
fn restore_cmd(a: &RestoreArgs) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let all = settled_namespaces(&a.config)?;
    let (primary, image) = a.image.split_once('/').ok_or_else(|| {
        anyhow::anyhow!(
            "{}: name the image as the replica mount shows it, PRIMARY/PATH (e.g. \
             site-a/{}), PRIMARY being the primary's [node] name",
            a.image,
            a.image
        )
    })?;
    let view = view_of(namespace(&all, primary)?)?;
    let m = view.manifest(a.generation, image).ok_or_else(|| {
        let held = view.generations();
        if held.contains(&a.generation) {
            anyhow::anyhow!(
                "{image} is not in generation {} of {primary}; `ls MNT/{primary}/.ferry/generations/{}` \
                 on the replica mount lists what is",
                a.generation,
                a.generation
            )
        } else {
            anyhow::anyhow!(
                "generation {} of {primary} is not kept here (kept: {held:?}); \
                 `ferry generations` lists them",
                a.generation
            )
        }
    })?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.to)
        .with_context(|| format!("cannot create {} (it must not exist)", a.to.display()))?;
    let result = (|| -> Result<()> {
        for e in m.entries().iter().filter(|e| !e.is_zero()) {
            let data = view.chunk(a.generation, image, e)?;
            out.write_all_at(&data, e.offset)
                .with_context(|| format!("cannot write {}", a.to.display()))?;
        }
        out.set_len(m.size())?;
        out.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&a.to);
        return Err(e.context(format!(
            "restore of {} (generation {}) failed; {} removed",
            a.image,
            a.generation,
            a.to.display()
        )));
    }
    println!(
        "{}: {} bytes of {} at generation {}, root {}",
        a.to.display(),
        m.size(),
        a.image,
        a.generation,
        m.root().to_hex()
    );
    Ok(())
}

/// `ferry replica --config FILE`: the replica daemon with what the config file says.
fn replica_cmd(a: &ReplicaArgs) -> Result<()> {
    let config = crate::config::Config::load(&a.config)?;
    crate::mount::confine(&config, &a.config)?;
    let mut opts = crate::mount::replica_options(&config, &a.config, a.mount.clone())?;
    if a.no_mount {
        opts.mount = None;
    }
    let view = opts.mount.clone();
    let follow = std::sync::Arc::new(std::sync::OnceLock::new());
    if let Some(f) = config.failover.clone() {
        let me = crate::failover::Leader {
            node: config.node.name.clone(),
            fingerprint: opts.identity.fingerprint().to_string(),
            namespace: String::new(),
        };
        let slot = follow.clone();
        opts.on_site = Some(Box::new(move |site| {
            let _ = slot.set(crate::failover::follow::start(f, me, site.clone())?);
            Ok(())
        }));
    }
    crate::replica::daemon::run(opts, None)?;
    let (Some(f), Some(follow)) = (&config.failover, follow.get()) else {
        return Ok(());
    };
    let Some(won) = follow.won() else {
        return Ok(());
    };
    // Automatic failover: this replica holds etcd's leader key. Promote as `ferry promote`
    // does, under the key's epoch, on `[failover] mount`.
    let at = f.mount.clone().or(view.clone());
    let promoted = takeover::promote_cmd(&PromoteArgs {
        config: a.config.clone(),
        mount: at.clone(),
        primary: Some(won.namespace.clone()),
        force: false,
        options: vec!["allow_other".into()],
        json: false,
        at_epoch: Some(won.epoch),
    });
    follow.finish(promoted.is_ok(), f.ttl * 2);
    promoted.with_context(|| {
        format!(
            "automatic failover: this replica won etcd's leader key for namespace {} at epoch \
             {}, but its promotion failed (the key is given up for another replica)",
            won.namespace, won.epoch
        )
    })?;
    // Serve on as the replica daemon of this store (which now fences the old primary),
    // without the read-only view if the primary mount took its place.
    use std::os::unix::process::CommandExt;
    let mut again = std::process::Command::new(std::env::current_exe()?);
    again.args(std::env::args_os().skip(1));
    if view.is_some() && at == view && !a.no_mount {
        again.arg("--no-mount");
    }
    let e = again.exec();
    Err(anyhow::anyhow!(
        "cannot restart the replica daemon after the promotion: {e}"
    ))
}

fn status_cmd(a: StatusArgs) -> Result<()> {
    let Some(secs) = a.watch else {
        return status_once(&a);
    };
    if !(secs > 0.0 && secs.is_finite()) {
        anyhow::bail!("--watch takes a number of seconds above 0, e.g. --watch 2");
    }
    loop {
        if !a.json {
            // Clear the screen and go home, as watch(1) does.
            print!("\x1b[H\x1b[2J");
            println!("every {secs} s: ferry status (Ctrl-C to stop)\n");
        }
        if let Err(e) = status_once(&a) {
            println!("ferry: {e:#}");
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
    }
}

/// The status of the mount named, or of every ferry mount on the host.
fn status_once(a: &StatusArgs) -> Result<()> {
    let ask = |mnt: &std::path::Path| -> Result<serde_json::Value> {
        let socket = crate::control::socket_of(mnt)?;
        crate::control::request(
            &socket,
            &serde_json::json!({"cmd": "status", "ranges": a.ranges}),
            Some(std::time::Duration::from_secs(30)),
        )
    };
    if let Some(config) = &a.config {
        let pid = replica_daemons()
            .into_iter()
            .find(|d| same_file(&d["config"], config))
            .map(|d| d["pid"].clone());
        let v = replica_status(config, pid.unwrap_or_default())?;
        if a.json {
            println!("{v}");
        } else {
            print_replica_status(&v);
        }
        return Ok(());
    }
    if let Some(mnt) = &a.mountpoint {
        let v = ask(mnt)?;
        if a.json {
            println!("{v}");
        } else {
            print_status(&v);
        }
        return Ok(());
    }
    let mounts = ferry_mounts()?;
    let replicas: Vec<serde_json::Value> = replica_daemons()
        .into_iter()
        .map(|d| {
            let config = PathBuf::from(d["config"].as_str().unwrap_or_default());
            replica_status(&config, d["pid"].clone()).unwrap_or_else(|e| {
                serde_json::json!({"pid": d["pid"], "config": config, "error": format!("{e:#}")})
            })
        })
        .collect();
    if a.json {
        let all: Vec<serde_json::Value> = mounts
            .iter()
            .map(|m| {
                ask(m).unwrap_or_else(
                    |e| serde_json::json!({"mountpoint": m, "error": format!("{e:#}")}),
                )
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"mounts": all, "replica_daemons": replicas})
        );
        return Ok(());
    }
    if mounts.is_empty() && replicas.is_empty() {
        println!("no ferry mounts and no replica daemons on this host");
    }
    for m in &mounts {
        match ask(m) {
            Ok(v) => print_status(&v),
            Err(e) => println!("{}: {e:#}", m.display()),
        }
    }
    replicas.iter().for_each(print_replica_status);
    Ok(())
}

fn same_file(a: &serde_json::Value, b: &std::path::Path) -> bool {
    let a = a.as_str().map(std::path::Path::new);
    match (a.and_then(|a| a.canonicalize().ok()), b.canonicalize().ok()) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A replica store's state as `ferry status` shows it, read beside its daemon (`pid`, or null
/// when it is not running).
fn replica_status(config: &std::path::Path, pid: serde_json::Value) -> Result<serde_json::Value> {
    let c = crate::config::Config::load(config)?;
    let rc = crate::mount::replica_section(&c, config)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let primaries: Vec<serde_json::Value> = replica_namespaces(config)?
        .iter()
        .map(|ns| {
            let view = match &ns.view {
                Ok(v) => v,
                Err(e) => {
                    return serde_json::json!({
                        "primary": ns.name,
                        "fingerprint": ns.fingerprint,
                        "error": e,
                    });
                }
            };
            let points = view.points();
            let newest = points.last();
            let root = rc.store.join(&ns.name);
            let staged = crate::replica::staged_on_disk(&root);
            let applying = crate::replica::applying(&root)
                .filter(|&a| newest.is_none_or(|p| p.generation < a));
            serde_json::json!({
                "primary": ns.name,
                "fingerprint": ns.fingerprint,
                "generation": newest.map_or(0, |p| p.generation),
                "committed": newest.map(|p| p.committed),
                "committed_ago_s": newest.map(|p| now.saturating_sub(p.committed)),
                "group_root": newest.map(|p| p.group_root.clone()),
                "epoch": newest.map_or(0, |p| p.epoch),
                "images": newest.map_or(0, |p| p.images),
                "restore_points": points.iter().map(|p| p.generation).collect::<Vec<_>>(),
                "kept_bytes": view.kept_figures().0,
                "staged_bytes": staged,
                "applying": applying,
            })
        })
        .collect();
    // The running daemon's own facts (recorded at its start), if they are this daemon's.
    let facts: serde_json::Value = std::fs::read(
        rc.store
            .join(crate::replica::META_DIR)
            .join(crate::replica::daemon::DAEMON_FACTS),
    )
    .ok()
    .and_then(|b| serde_json::from_slice(&b).ok())
    .filter(|f: &serde_json::Value| !pid.is_null() && f["pid"] == pid)
    .unwrap_or_default();
    Ok(serde_json::json!({
        "config": config,
        "pid": pid,
        "udp_buffer_capped": facts["udp_buffer_capped"],
        "store": rc.store,
        "listen": rc.listen.to_string(),
        "mount": rc.mount,
        "primaries": primaries,
    }))
}

fn print_replica_status(r: &serde_json::Value) {
    let running = match r["pid"].as_u64() {
        Some(pid) => format!("pid {pid}"),
        None => "NOT RUNNING".to_string(),
    };
    println!(
        "replica store {} ({running}, config {})",
        r["store"].as_str().unwrap_or("?"),
        r["config"].as_str().unwrap_or("?")
    );
    if let Some(e) = r["error"].as_str() {
        println!("  cannot read it: {e}");
        return;
    }
    if let Some(got) = r["udp_buffer_capped"].as_u64() {
        println!("  {}", net::transport::capped_buffer_words(got as usize));
    }
    println!(
        "  listening on {}{}",
        r["listen"].as_str().unwrap_or("?"),
        r["mount"]
            .as_str()
            .map_or(String::new(), |m| format!(", mount {m}"))
    );
    let primaries = r["primaries"].as_array().cloned().unwrap_or_default();
    if primaries.is_empty() {
        println!("  no primary has synced to it yet");
    }
    for p in &primaries {
        if let Some(e) = p["error"].as_str() {
            println!("  primary {}: {e}", p["primary"].as_str().unwrap_or("?"));
            continue;
        }
        let ago = p["committed_ago_s"]
            .as_u64()
            .map_or("never".to_string(), |s| {
                format!(
                    "{} ago",
                    humantime::format_duration(std::time::Duration::from_secs(s))
                )
            });
        println!(
            "  primary {}: generation {} (root {}), committed {ago}, epoch {}, {} images",
            p["primary"].as_str().unwrap_or("?"),
            p["generation"],
            p["group_root"]
                .as_str()
                .map_or("-", |g| &g[..g.len().min(16)]),
            p["epoch"],
            p["images"]
        );
        if let Some(a) = p["applying"].as_u64() {
            println!(
                "    generation {a} is acknowledged and being applied (a promotion or restart \
                 finishes it; the mount serves it once applied)"
            );
        }
        println!(
            "    restore points {} ({} of kept chunks); {} staged for the next generation",
            p["restore_points"],
            iec(p["kept_bytes"].as_u64().unwrap_or(0)),
            iec(p["staged_bytes"].as_u64().unwrap_or(0))
        );
    }
}

/// Mountpoints of every ferry mount on this host: FUSE mounts in /proc/self/mountinfo (type
/// `fuse`, or `fuse.ferry` through mount.fuse3) whose root answers ferry's control xattr.
fn ferry_mounts() -> Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\134", "\\")
    };
    Ok(info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mnt = PathBuf::from(unescape(left.split_whitespace().nth(4)?));
            let fstype = right.split_whitespace().next()?;
            (matches!(fstype, "fuse" | "fuse.ferry") && crate::control::socket_of(&mnt).is_ok())
                .then_some(mnt)
        })
        .collect())
}

/// `ferry replica` processes on this host: pid and config file.
fn replica_daemons() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_ferry = args.first().is_some_and(|a| {
            std::path::Path::new(a)
                .file_name()
                .is_some_and(|n| n == "ferry")
        });
        // `ferry replica --config FILE`, or the mount-helper form `-o replica,config=FILE`.
        let helper_opts: Vec<&str> = args
            .iter()
            .position(|a| a == "-o")
            .and_then(|i| args.get(i + 1))
            .map(|o| o.split(',').collect())
            .unwrap_or_default();
        let config = if args.get(1).is_some_and(|a| a == "replica") {
            args.iter()
                .position(|a| a == "--config")
                .and_then(|i| args.get(i + 1))
                .cloned()
        } else if helper_opts.contains(&"replica") {
            helper_opts
                .iter()
                .find_map(|o| o.strip_prefix("config="))
                .map(str::to_string)
        } else {
            continue;
        };
        if is_ferry {
            out.push(serde_json::json!({"pid": pid, "config": config}));
        }
    }
    out
}

/// One mount's status as text.
fn print_status(v: &serde_json::Value) {
    println!(
        "{} on {}",
        v["source"].as_str().unwrap_or("?"),
        v["mountpoint"].as_str().unwrap_or("?")
    );
    if v["tracking"] == false {
        println!("  tracking OFF (mounted with notrack): changes are not replicated");
    }
    let fenced = &v["sync"]["fenced"];
    if !fenced.is_null() {
        let by = fenced["replica"].as_str().unwrap_or("?");
        println!(
            "  FENCED (ships nothing; the VMs' writes stay here): {}{by} said: {}",
            if by == "etcd" { "" } else { "replica " },
            fenced["reason"].as_str().unwrap_or("?")
        );
    }
    let f = &v["sync"]["failover"];
    if !f.is_null() {
        let state = f["state"].as_str().unwrap_or("?");
        let what = match state {
            "leading" => format!(
                "the primary (epoch {}, lease ttl {} s)",
                f["epoch"], f["ttl_s"]
            ),
            "connecting" => "reaching etcd".to_string(),
            "manual" => format!(
                "OFF, manual mode (etcd unreachable: {})",
                f["reason"].as_str().unwrap_or("?")
            ),
            "fencing" | "fenced" => format!(
                "{} (guest writes held): {}",
                state.to_uppercase(),
                f["reason"].as_str().unwrap_or("?")
            ),
            other => other.to_string(),
        };
        println!(
            "  failover on etcd (cluster {}): {what}",
            f["cluster"].as_str().unwrap_or("?")
        );
    }
    print_sync(&v["sync"]);
    println!(
        "  unsynced {} (changed since the last sync point)",
        iec(v["dirty_bytes"].as_u64().unwrap_or(0))
    );
    if v["tracking"] == true {
        println!(
            "  intent log marks {} (what the next mount re-reads after a crash, at most)",
            iec(v["intent_log_bytes"].as_u64().unwrap_or(0))
        );
    }
    for b in v["sync"]["broken"].as_array().into_iter().flatten() {
        println!(
            "  NOT REPLICATING {}: {} (the replicas keep its last generation)",
            b["path"].as_str().unwrap_or("?"),
            b["reason"].as_str().unwrap_or("?")
        );
    }
    let skipped: Vec<String> = v["sync"]["skipped"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{} ({})",
                s["path"].as_str().unwrap_or("?"),
                s["kind"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if !skipped.is_empty() {
        println!(
            "  not replicated (only regular files are images): {}",
            skipped.join(", ")
        );
    }
    for o in v["sync"]["outside"].as_array().into_iter().flatten() {
        println!(
            "  changed outside the mount: {}: {}",
            o["path"].as_str().unwrap_or("?"),
            o["what"].as_str().unwrap_or("?")
        );
    }
    if v["sync"]["outside_watch"] == false && v["tracking"] == true {
        println!("  writes to the backing files that bypass the mount are NOT watched (see log)");
    }
    print_images(v);
}

/// Human size.
fn iec(n: u64) -> String {
    ByteSize(n).display().iec().to_string()
}

/// "3 s ago", "5 min ago", "2 h ago".
fn ago(s: u64) -> String {
    match s {
        0..120 => format!("{s} s ago"),
        120..7200 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

/// The generation, the sync in progress, and one row per replica.
fn print_sync(sync: &serde_json::Value) {
    let replicas = sync["replicas"].as_array().cloned().unwrap_or_default();
    let generation = sync["generation"].as_u64().unwrap_or(0);
    let root = sync["root"].as_str().unwrap_or("");
    let holding = replicas
        .iter()
        .filter(|r| r["generation"].as_u64() == Some(generation))
        .count();
    print!(
        "  generation {generation} (root {})",
        root.get(..16).unwrap_or(root)
    );
    if replicas.is_empty() {
        println!(", no replicas configured");
    } else {
        println!(
            ", held by {holding} of {} replicas ({} required)",
            replicas.len(),
            sync["required"]
        );
    }
    if let Some(got) = sync["udp_buffer_capped"].as_u64() {
        println!("  {}", net::transport::capped_buffer_words(got as usize));
    }
    let run = &sync["running"];
    if run.is_object() {
        println!(
            "  syncing generation {}: {}, {} of {} sent, {:.1} s",
            run["generation"],
            run["phase"].as_str().unwrap_or("?"),
            iec(run["bytes_done"].as_u64().unwrap_or(0)),
            iec(run["bytes_total"].as_u64().unwrap_or(0)),
            run["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        );
    }
    if replicas.is_empty() {
        return;
    }
    println!(
        "  {:<16} {:<26} {:>10} {:>22} {:>14} {:>13}  SELECTED",
        "REPLICA", "STATE", "GENERATION", "LAG", "RECOVERY POINT", "LAST COMMIT"
    );
    let target = sync["rpo_target_s"].as_f64();
    for r in &replicas {
        let state = match r["state"].as_str().unwrap_or("?") {
            "shipping" => format!(
                "shipping {} of {}",
                iec(r["shipping"]["bytes_done"].as_u64().unwrap_or(0)),
                iec(r["shipping"]["bytes_total"].as_u64().unwrap_or(0))
            ),
            s => s.to_string(),
        };
        let lag = format!(
            "{}, {} gen",
            iec(r["lag_bytes"].as_u64().unwrap_or(0)),
            r["lag_generations"].as_u64().unwrap_or(0)
        );
        let last = r["since_commit_s"]
            .as_u64()
            .map(ago)
            .unwrap_or_else(|| "never".into());
        let point = match r["recovery_point_age_s"].as_f64() {
            Some(0.0) => "current".to_string(),
            Some(s) if s < 120.0 => format!("{s:.1} s ago"),
            Some(s) => ago(s as u64),
            None => "unknown".to_string(),
        };
        println!(
            "  {:<16} {:<26} {:>10} {:>22} {:>14} {:>13}  {}",
            r["name"].as_str().unwrap_or("?"),
            state,
            r["generation"].as_u64().unwrap_or(0),
            lag,
            point,
            last,
            if r["selected"] == true { "yes" } else { "no" }
        );
        if let Some(line) = target.and_then(|t| rpo_missed(r, t, &sync["last_sync"])) {
            println!("      {line}");
        }
        if let Some(line) = lossy_link(&r["last"], &r["rtt_ms"]) {
            println!("      {line}");
        }
        if let Some(line) = slow_replica(&r["last"]) {
            println!("      {line}");
        }
        if r["state"] == "failing" {
            println!("      {}", r["state_text"].as_str().unwrap_or("?"));
        } else if r["selected"] == false {
            println!(
                "      not selected: {}",
                r["reason"].as_str().unwrap_or("?")
            );
        }
    }
}

/// Why syncs to a replica are slow when the link is: "the link lost 12.5% of the last sync's
/// packets (50 ms RTT) ...", once it lost 2% or more. (ferry's congestion controller does not
/// back off on random loss, but every lost packet is sent again.)
fn lossy_link(last: &serde_json::Value, rtt_ms: &serde_json::Value) -> Option<String> {
    let sent = last["packets_sent"].as_u64().filter(|&n| n > 0)?;
    let share = last["packets_lost"].as_u64()? as f64 / sent as f64;
    if share < 0.02 {
        return None;
    }
    let rtt = rtt_ms
        .as_f64()
        .map(|ms| format!(" ({ms:.0} ms RTT)"))
        .unwrap_or_default();
    Some(format!(
        "the link lost {:.1}% of the last sync's packets{rtt}: each was sent again, so the \
         link, not ferry, slows the syncs to this replica",
        share * 100.0
    ))
}

/// Why syncs to a replica are slow when the replica is: "it was busy 97% of the time ...", once
/// its data-stream readers were busy [`SLOW_REPLICA_PCT`]% or more of a sync that took a
/// second or more (they spent the rest waiting for data: the link's or the primary's pace).
fn slow_replica(last: &serde_json::Value) -> Option<String> {
    let pct = last["busy_pct"].as_u64()?;
    if pct < SLOW_REPLICA_PCT || last["duration_ms"].as_u64()? < 1000 {
        return None;
    }
    Some(format!(
        "it was busy {pct}% of the last sync checking and staging what arrived (waiting for \
         data the rest): its disk or CPU, not the link, sets the pace of syncs to it (see the \
         replica host's load)"
    ))
}

/// Why a replica that commits is still further behind than the RPO target `t` (seconds), once
/// its recovery point is more than two intervals old (`sync::metrics::rpo_met`): its syncs take
/// longer than the interval. Nothing for a failing replica (its own line says why).
fn rpo_missed(r: &serde_json::Value, t: f64, last_sync: &serde_json::Value) -> Option<String> {
    let age = r["recovery_point_age_s"].as_f64()?;
    if r["state"] == "failing"
        || crate::sync::metrics::rpo_met(r, std::time::Duration::from_secs_f64(t))
    {
        return None;
    }
    let took = last_sync["duration_ms"]
        .as_u64()
        .map(|ms| format!("; the last sync took {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    Some(format!(
        "its copy lacks the last {age:.1} s of writes, more than twice sync_interval ({t} s){took}: \
         syncs take longer than the interval, so each carries more than the last; the write \
         rate is more than this host, the link and the replica ship within the interval \
         (see \"What bounds the lag\" in docs/OPERATIONS.md)"
    ))
}

/// How busy a replica's readers must be before status says it sets the pace.
const SLOW_REPLICA_PCT: u64 = 80;

/// One row per image that has unsynced changes or that some replica lacks.
fn print_images(v: &serde_json::Value) {
    let images = v["images"].as_array().cloned().unwrap_or_default();
    if images.is_empty() {
        return;
    }
    let names: Vec<String> = v["sync"]["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    print!("  {:<40} {:>12}", "IMAGE", "UNSYNCED");
    for n in &names {
        print!(" {:>16}", format!("NOT ON {n}"));
    }
    println!();
    for img in &images {
        print!(
            "  {:<40} {:>12}",
            img["path"].as_str().unwrap_or("?"),
            iec(img["dirty_bytes"].as_u64().unwrap_or(0))
        );
        for n in &names {
            print!(
                " {:>16}",
                iec(img["behind"][n.as_str()].as_u64().unwrap_or(0))
            );
        }
        println!();
        for r in img["dirty"].as_array().into_iter().flatten() {
            println!("      {}..{}", r[0], r[1]);
        }
    }
}

fn verify_cmd(a: VerifyArgs) -> Result<()> {
    let socket = crate::control::socket_of(&a.mountpoint)?;
    let mut v = crate::control::request(
        &socket,
        &serde_json::json!({
            "cmd": "verify",
            "primary": a.primary,
            "deep": a.deep,
            "repair": a.repair,
        }),
        None,
    )?;
    // The control protocol's `ok` says the request was answered; the check's verdict is
    // `matches`.
    let ok = v["matches"] == true;
    if let Some(o) = v.as_object_mut() {
        o.remove("matches");
        o.insert("ok".into(), ok.into());
    }
    if a.json {
        println!("{v}");
    } else if a.primary {
        print_primary_check(&v, ok);
    } else {
        if v["replicas"].as_array().is_none_or(|r| r.is_empty()) {
            println!("this primary has no replicas ([[peer]] in its config) to verify");
        }
        if let Some(first) = v["repair"]["replicas"].as_array() {
            println!("repair:");
            first.iter().for_each(print_replica_check);
            if let Some(e) = v["repair"]["sync"]["error"].as_str() {
                println!("  the sync point that ships the right bytes failed: {e}");
            } else {
                println!("  synced generation {}", v["repair"]["sync"]["generation"]);
            }
            println!("after the repair:");
        }
        v["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(print_replica_check);
    }
    if !ok {
        anyhow::bail!(
            "{}",
            match (a.primary, a.repair) {
                (true, false) =>
                    "some images differ from their manifests: run `ferry verify --primary --repair`, then `ferry sync`",
                (true, true) =>
                    "some images differ from their manifests; they are marked changed and the next sync ships them",
                (false, false) =>
                    "some replicas differ from this primary: run `ferry verify --deep --repair`",
                (false, true) =>
                    "some replicas still differ after the repair: see above (a lost kept chunk cannot come back; an unreachable replica is repaired at its next sync)",
            }
        );
    }
    Ok(())
}

fn print_replica_check(r: &serde_json::Value) {
    let name = r["name"].as_str().unwrap_or("?");
    let verdict = if r["ok"] == true {
        "ok     "
    } else {
        "DIFFERS"
    };
    println!("  {name:<16} {verdict}  generation {}", r["generation"]);
    if let Some(e) = r["error"].as_str() {
        println!("      {e}");
    }
    for d in r["differing"].as_array().into_iter().flatten() {
        println!(
            "      {} differs from this primary's manifest",
            d["path"].as_str().unwrap_or("?")
        );
        for x in d["ranges"].as_array().into_iter().flatten() {
            println!("        bytes {}..{}", x[0], x[1]);
        }
    }
    let d = &r["deep"];
    if d.is_null() {
        return;
    }
    println!(
        "      deep: {} images ({}) and {} kept chunks re-hashed, {} damaged",
        d["images"],
        iec(d["bytes"].as_u64().unwrap_or(0)),
        d["kept_chunks"],
        d["damage"].as_array().map_or(0, |a| a.len() as u64) + d["unlisted"].as_u64().unwrap_or(0)
    );
    for x in d["damage"].as_array().into_iter().flatten() {
        let state = x["state"].as_str().unwrap_or("?");
        match x["path"].as_str() {
            Some(p) => {
                let off = x["offset"].as_u64().unwrap_or(0);
                let end = off + x["len"].as_u64().unwrap_or(0);
                println!("        {p} bytes {off}..{end}: {state}");
            }
            None => println!(
                "        kept chunk {} (restore points {}): {state}",
                x["hash"].as_str().unwrap_or("?"),
                x["generations"]
            ),
        }
    }
}

fn print_primary_check(v: &serde_json::Value, ok: bool) {
    for img in v["images"].as_array().into_iter().flatten() {
        let path = img["path"].as_str().unwrap_or("?");
        if img["ok"] == true {
            println!(
                "  ok       {path} ({} in {} chunks{})",
                iec(img["bytes"].as_u64().unwrap_or(0)),
                img["chunks"],
                match img["skipped_bytes"].as_u64().unwrap_or(0) {
                    0 => String::new(),
                    n => format!(", {} unsynced skipped", iec(n)),
                }
            );
            continue;
        }
        println!("  DIFFERS  {path}");
        if let Some(e) = img["error"].as_str() {
            println!("           {e}");
        }
        if let Some(s) = img["size"].as_array() {
            println!("           size {} in the manifest, {} on disk", s[0], s[1]);
        }
        for r in img["mismatched"].as_array().into_iter().flatten() {
            println!("           bytes {}..{}", r[0], r[1]);
        }
    }
    if ok {
        println!("every image matches generation {}", v["generation"]);
    } else if v["repaired"] == true {
        println!("marked as changed: run `ferry sync` to ship them");
    }
}

fn sync_cmd(a: SyncArgs) -> Result<()> {
    let socket = crate::control::socket_of(&a.mountpoint)?;
    let bar = (!a.json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(format!("syncing {}", a.mountpoint.display()));
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let v = crate::control::request(
        &socket,
        &serde_json::json!({
            "cmd": "sync",
            "images": a.images,
            "timeout": a.timeout,
            "no_wait": a.no_wait,
        }),
        // The daemon answers within its own bound: this one only guards against a daemon that
        // never answers.
        Some(
            crate::sync::trigger::Scheduler::wait_bound(std::time::Duration::from_secs_f64(
                a.timeout,
            )) + std::time::Duration::from_secs(30),
        ),
    );
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut v = v?;
    if let Some(o) = v.as_object_mut() {
        o.remove("ok");
    }
    if a.no_wait {
        if a.json {
            println!("{v}");
        } else {
            println!("sync point requested");
        }
        return Ok(());
    }

    let committed = v["committed"].as_u64().unwrap_or(0);
    let required = v["required"].as_u64().unwrap_or(0);
    if a.json {
        println!("{v}");
    } else {
        println!(
            "generation {} root {}",
            v["generation"],
            v["root"].as_str().unwrap_or("?")
        );
        println!(
            "  {} dirty, {} sent in {} chunks and {} patches, {} ms",
            iec(v["dirty_bytes"].as_u64().unwrap_or(0)),
            iec(v["bytes_sent"].as_u64().unwrap_or(0)),
            v["chunks_sent"],
            v["patches_sent"],
            v["duration_ms"]
        );
        for r in v["replicas"].as_array().into_iter().flatten() {
            println!(
                "  {:<16} {:<10} {}",
                r["name"].as_str().unwrap_or("?"),
                r["state"].as_str().unwrap_or("?"),
                r["error"].as_str().or(r["root"].as_str()).unwrap_or("")
            );
        }
    }
    if committed < required {
        anyhow::bail!("only {committed} of the {required} required replicas committed");
    }
    Ok(())
}
