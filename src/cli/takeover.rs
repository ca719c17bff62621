//! The faces of a takeover: `ferry promote` (a replica becomes the primary of a namespace)
//! and `ferry rejoin` (a fenced old primary becomes a replica of the new one). The work is in
//! `replica::promote`, `sync::rejoin` and `mount::seed_promoted`; this orders it and reports.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{PromoteArgs, RejoinArgs, replica_namespaces};
use crate::replica::promote::{Answers, Peer, probe_peers};

/// What every `[[peer]]` of `config` holds of namespace `ns`, asked at once.
fn ask_replicas(config: &crate::config::Config, id: &crate::net::Identity, ns: &str) -> Answers {
    let peers: Vec<Peer> = config
        .peers
        .iter()
        .map(|p| Peer {
            name: p.name.clone(),
            addr: p.addr,
            fingerprint: p.fingerprint,
        })
        .collect();
    probe_peers(id, &peers, ns, PROBE_WITHIN)
}

/// `ferry promote --config FILE [--mount MNT] [--primary NAME] [--force]`.
pub(super) fn promote_cmd(a: &PromoteArgs) -> Result<()> {
    use crate::replica::promote::{self, Held};
    use serde_json::json;
    let t0 = std::time::Instant::now();
    let config = crate::config::Config::load(&a.config)?;
    let rc = crate::mount::replica_section(&config, &a.config)?;
    let params = config.chunk_params().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mnt = (a.mount.clone())
        .or(config.failover.as_ref().and_then(|f| f.mount.clone()))
        .or(rc.mount.clone())
        .ok_or_else(|| {
            anyhow::anyhow!("where should the promoted images be served? give --mount MNT")
        })?;
    let ns = match &a.primary {
        Some(n) => n.clone(),
        None => {
            let all = replica_namespaces(&a.config)?;
            let promoted = crate::replica::site::read_promoted(&rc.store)?;
            let mut names: Vec<&String> = all.iter().map(|n| &n.name).collect();
            names.extend(promoted.keys());
            match names.as_slice() {
                [one] => (*one).clone(),
                [] => anyhow::bail!("store {} holds no primary's images", rc.store.display()),
                many => anyhow::bail!(
                    "store {} holds several primaries' images ({}): name one with --primary NAME",
                    rc.store.display(),
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    if let (Some(f), None) = (&config.failover, a.at_epoch) {
        // By hand beside automatic failover: never against a primary etcd says is alive.
        match crate::failover::leader_now(f) {
            Ok(Some(h)) if h.leader.node != config.node.name && !a.force => anyhow::bail!(
                "etcd (cluster {}) says node {} is the primary (epoch {}) and its lease is \
                 alive: promoting by hand would make two. If that node is really gone, wait \
                 for its lease ({:?}) and a replica takes over by itself; give --force to \
                 promote anyway",
                f.cluster,
                h.leader.node,
                h.epoch,
                f.ttl
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "ferry: etcd cannot say who the primary is ({e:#}); promoting by hand: make \
                 sure the old primary is down"
            ),
        }
    }
    let identity = crate::net::Identity::load(&config.node.key_dir)?;
    let mut answers = Vec::new();
    let p = match promote::open(&rc.store, &ns, params, crate::mount::policy(&rc))? {
        Err(done) => done,
        Ok(opened) => {
            let own = opened.held();
            answers = ask_replicas(&config, &identity, &ns);
            let mut epoch =
                promote::decide(&own, &answers, a.force).map_err(|e| anyhow::anyhow!(e))?;
            if let Some(at) = a.at_epoch {
                anyhow::ensure!(
                    at >= epoch,
                    "etcd's leader key stands for epoch {at}, but a replica has seen epoch {} \
                     already: fix the key ferry/<cluster>/epoch-base",
                    epoch - 1
                );
                epoch = at;
            }
            promote::promote(
                opened,
                &config.node.name,
                &identity.fingerprint().to_string(),
                epoch,
            )?
        }
    };
    // Replicas that hold the very generation promoted need no Merkle descent.
    let base = Held {
        epoch: p.base.epoch,
        holder: String::new(),
        generation: p.base.generation,
        root: crate::manifest::from_hex(&p.base.root).unwrap_or_default(),
    };
    let agreed: Vec<String> = answers
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .is_ok_and(|h| (h.generation, h.root) == (base.generation, base.root))
        })
        .map(|(n, _)| n.clone())
        .collect();
    crate::mount::seed_promoted(&config, &p, &agreed)?;
    let mut opts = format!("config={}", a.config.canonicalize()?.display());
    for o in &a.options {
        opts.push(',');
        opts.push_str(o);
    }
    let mounted = crate::control::socket_of(&mnt).is_ok();
    if !mounted {
        let exe = std::env::current_exe()?;
        let out = std::process::Command::new(exe)
            .arg("mount")
            .arg(&p.backing)
            .arg(&mnt)
            .arg("-o")
            .arg(&opts)
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "namespace {ns} is promoted (epoch {}), but its mount failed: {}; fix that and \
                 run `ferry promote` again (it mounts what is promoted)",
                p.epoch,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let took_ms = t0.elapsed().as_millis() as u64;
    let fstab = format!(
        "{} {} fuse.ferry {opts} 0 0",
        p.backing.display(),
        mnt.display()
    );
    let replicas: Vec<serde_json::Value> = answers
        .iter()
        .map(|(n, r)| match r {
            Ok(h) => json!({"name": n, "epoch": h.epoch, "generation": h.generation,
                "root": crate::manifest::hex(&h.root)}),
            Err(e) => json!({"name": n, "error": e}),
        })
        .collect();
    if a.json {
        println!(
            "{}",
            json!({
                "namespace": ns,
                "epoch": p.epoch,
                "promoted_now": p.now,
                "base": p.base,
                "backing": p.backing,
                "mountpoint": mnt,
                "replicas": replicas,
                "took_ms": took_ms,
                "fstab": fstab,
            })
        );
        return Ok(());
    }
    if p.now {
        println!(
            "namespace {ns} promoted: epoch {} from generation {} of epoch {} (root {})",
            p.epoch,
            p.base.generation,
            p.base.epoch,
            &p.base.root[..16.min(p.base.root.len())]
        );
    } else {
        println!("namespace {ns} was promoted already (epoch {})", p.epoch);
    }
    for (n, r) in &answers {
        match r {
            Ok(h) => println!(
                "  replica {n}: generation {} of epoch {}",
                h.generation, h.epoch
            ),
            Err(e) => println!("  replica {n}: not reached ({e})"),
        }
    }
    println!(
        "primary mount {} on {} {} ({took_ms} ms)",
        p.backing.display(),
        mnt.display(),
        if mounted {
            "was live already"
        } else {
            "is live"
        }
    );
    println!("to mount it at boot, put this line into /etc/fstab:\n  {fstab}");
    Ok(())
}

/// The backing directory of the one fenced mount whose state is under `state_dir`.
fn fenced_source(state_dir: &std::path::Path) -> Result<PathBuf> {
    use crate::epoch::{self, Lineage};
    let mut found = Vec::new();
    for d in std::fs::read_dir(state_dir.join("mounts"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(Some(l)) = epoch::load::<Lineage>(&d.path().join(epoch::FILE))
            && let Some(f) = l.fenced
        {
            found.push(f.source);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!(
            "no mount of this node was fenced (none of {}/mounts/*/epoch.json says so): give \
             the backing directory of the mount to rejoin",
            state_dir.display()
        ),
        _ => anyhow::bail!("several mounts of this node were fenced: give the backing directory"),
    }
}

/// Unmounts the ferry mount serving `source`, if one does, and waits for its daemon to exit.
fn stop_mount_of(source: &std::path::Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let src = source.display().to_string();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() < 3 || f[0].replace("\\040", " ") != src || !f[2].starts_with("fuse") {
            continue;
        }
        let mnt = PathBuf::from(f[1].replace("\\040", " "));
        let pid = crate::control::socket_of(&mnt)
            .and_then(|s| crate::control::request(&s, &serde_json::json!({"cmd": "status"}), None))
            .ok()
            .and_then(|v| v["pid"].as_i64());
        let out = std::process::Command::new("umount").arg(&mnt).output()?;
        if !out.status.success() {
            anyhow::bail!(
                "cannot unmount {} ({}): stop the VMs using it first",
                mnt.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if let Some(pid) = pid {
            let t = std::time::Instant::now();
            while unsafe { libc::kill(pid as i32, 0) } == 0 && t.elapsed().as_secs() < 30 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// `ferry rejoin --config FILE [SOURCE]`.
pub(super) fn rejoin_cmd(a: &RejoinArgs) -> Result<()> {
    use crate::epoch::{self, Holder, Lineage};
    use crate::sync::rejoin;
    let config = crate::config::Config::load(&a.config)?;
    let rc = crate::mount::replica_section(&config, &a.config)?;
    let params = config.chunk_params().map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = match &a.source {
        Some(s) => s.clone(),
        None => fenced_source(&config.node.state_dir)?,
    };
    let source = source
        .canonicalize()
        .with_context(|| format!("backing directory {} not found", source.display()))?;
    let state = crate::mount::state_dir(&config, &source);
    let lineage = epoch::load::<Lineage>(&state.join(epoch::FILE))?
        .unwrap_or_else(|| Lineage::first(&config.node.name));
    let ns = lineage.namespace.clone();
    let identity = crate::net::Identity::load(&config.node.key_dir)?;
    let answers = ask_replicas(&config, &identity, &ns);
    let newer = answers
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|h| h.epoch > lineage.epoch && !h.holder.is_empty())
        .max_by_key(|h| h.epoch)
        .cloned();
    let Some(newer) = newer else {
        let asked: Vec<String> = answers
            .iter()
            .map(|(n, r)| match r {
                Ok(h) => format!("{n}: epoch {}", h.epoch),
                Err(e) => format!("{n}: {e}"),
            })
            .collect();
        anyhow::bail!(
            "no replica holds namespace {ns} at an epoch above this node's ({}); asked {}. \
             Rejoin is for a primary a promotion replaced: this one was not fenced (or the \
             replicas that know it cannot be reached now)",
            lineage.epoch,
            if asked.is_empty() {
                "no one ([[peer]] lists none)".into()
            } else {
                asked.join(", ")
            }
        );
    };
    stop_mount_of(&source)?;
    // A mount found by another name (`-o fsname=`) still answers on its control socket: its
    // images must not be read, let alone moved, while it runs.
    let socket = state.join("control.sock");
    let status = serde_json::json!({"cmd": "status"});
    let within = Some(std::time::Duration::from_secs(5));
    if let Ok(v) = crate::control::request(&socket, &status, within) {
        anyhow::bail!(
            "the mount of {} is still live at {} (pid {}): unmount it, then run rejoin again",
            source.display(),
            v["mountpoint"].as_str().unwrap_or("?"),
            v["pid"]
        );
    }
    let current = rejoin::current(&state, &source, params, config.primary.intent_extent)?;
    // What the new primary last acknowledged from this node is where their lines parted (or
    // before it): everything since is this node's alone.
    let base = crate::manifest::ManifestDir::new(
        state.join("peers").join(&newer.holder).join("manifests"),
    )
    .load_all(params);
    if base.is_empty() {
        log::warn!(
            "no acknowledgement from {} is recorded here: every image is saved aside in full",
            newer.holder
        );
    }
    let ranges: std::collections::BTreeMap<String, Vec<std::ops::Range<u64>>> = current
        .images
        .iter()
        .map(|(p, m)| (p.clone(), rejoin::differing(base.get(p), m)))
        .collect();
    let now = epoch::now();
    let saved = config
        .node
        .state_dir
        .join("rejoin")
        .join(format!("{ns}.{}-{now}", lineage.epoch));
    let index = rejoin::Index {
        namespace: ns.clone(),
        epoch: lineage.epoch,
        new_primary: newer.holder.clone(),
        new_epoch: newer.epoch,
        time: now,
        images: vec![],
    };
    let saved_bytes = rejoin::save_aside(&source, &saved, &ranges, index)?;
    let fp = identity.fingerprint().to_string();
    let holder = Holder {
        epoch: lineage.epoch,
        node: config.node.name.clone(),
        fingerprint: fp.clone(),
        since: lineage.since,
        forks: vec![],
    };
    let root = crate::manifest::hex(&crate::wire::primary::group_root(&current.images));
    crate::replica::seed(&source, &current.images, current.generation, &root, &holder)?;
    crate::replica::site::adopt(&rc.store, &ns, &source, &fp)?;
    let retired = state.with_extension(format!("rejoined-{now}"));
    std::fs::rename(&state, &retired)
        .with_context(|| format!("cannot move {} aside", state.display()))?;
    let store = rc.store.join(&ns);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "namespace": ns,
                "new_primary": newer.holder,
                "new_epoch": newer.epoch,
                "saved": saved,
                "saved_bytes": saved_bytes,
                "images": current.images.len(),
                "store": store,
            })
        );
        return Ok(());
    }
    println!(
        "{} rejoins namespace {ns} as a replica of {} (epoch {})",
        config.node.name, newer.holder, newer.epoch
    );
    println!(
        "  saved aside {saved_bytes} bytes this node wrote that {} never got: {}",
        newer.holder,
        saved.display()
    );
    println!("  images now in the replica store at {}", store.display());
    println!(
        "next: start the replica daemon (ferry replica --config {}), and list this node as a \
         [[peer]] of {}: its next sync sends only what differs. Remove the old fstab line of \
         this mount.",
        a.config.display(),
        newer.holder
    );
    Ok(())
}

/// How long `ferry promote` waits for each other replica's answer.
const PROBE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
