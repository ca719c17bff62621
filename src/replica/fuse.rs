//! The read-only replica mount: a directory per namespace (the primary's node name), in it the
//! newest generation's images at their paths, and every held generation under
//! `NAME/.ferry/generations/<N>/` (looked up by name, never listed, as ZFS hides `.zfs`).
//!
//! An image's inode is (generation, path): its content never changes, so the kernel may cache
//! its pages and attributes for good. A path of the newest generation is looked up again at
//! every open (no entry caching), so a new open gets the newest generation's inode while files
//! opened earlier keep reading theirs; each open pins its generation in the [`View`] until it
//! is closed (invariant 7).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use parking_lot::Mutex;

use super::META_DIR;
use super::site::Site;
use super::view::{Found, View};

/// Attributes and names of a generation never change.
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// The newest generation's names and directories change at each commit.
const NOW: Duration = Duration::ZERO;
const MAX_READ: u32 = 1 << 20;
/// Extended attribute of an image: the generation it shows.
pub const GENERATION_XATTR: &str = "user.ferry.generation";

/// A namespace: the primary's node name.
type Ns = Arc<str>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Node {
    /// The mount's root: a directory per namespace.
    Root,
    /// A directory of a namespace's newest generation (`""`: the namespace's directory).
    Live(Ns, String),
    /// `NS/.ferry`
    Meta(Ns),
    /// `NS/.ferry/generations`
    Points(Ns),
    /// A directory of a held generation.
    PointDir(Ns, u64, String),
    /// An image as a generation has it.
    Image(Ns, u64, String),
}

impl Node {
    fn ns(&self) -> Option<&Ns> {
        match self {
            Node::Root => None,
            Node::Live(ns, _)
            | Node::Meta(ns)
            | Node::Points(ns)
            | Node::PointDir(ns, ..)
            | Node::Image(ns, ..) => Some(ns),
        }
    }
}

#[derive(Default)]
struct Inodes {
    nodes: Vec<Node>,
    ids: HashMap<Node, u64>,
}

impl Inodes {
    fn ino(&mut self, n: Node) -> u64 {
        if let Some(&i) = self.ids.get(&n) {
            return i;
        }
        self.nodes.push(n.clone());
        let i = self.nodes.len() as u64;
        self.ids.insert(n, i);
        i
    }

    fn node(&self, ino: u64) -> Option<Node> {
        self.nodes.get(ino.checked_sub(1)? as usize).cloned()
    }
}

/// An open file: the view, generation and image it reads.
type Opened = (Arc<View>, u64, String);

/// A directory entry as readdir gives it: inode, type, name.
type DirEntry = (u64, FileType, String);

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

pub struct ReplicaFuse {
    site: Arc<Site>,
    inodes: Mutex<Inodes>,
    /// Open files: what each reads.
    files: Mutex<HashMap<u64, Opened>>,
    /// Open directories: their entries when opened.
    dirs: Mutex<HashMap<u64, Vec<DirEntry>>>,
    next_fh: AtomicU64,
}

impl ReplicaFuse {
    pub fn new(site: Arc<Site>) -> ReplicaFuse {
        let mut inodes = Inodes::default();
        inodes.ino(Node::Root);
        ReplicaFuse {
            site,
            inodes: Mutex::new(inodes),
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.lock().node(ino.0).ok_or(Errno::ENOENT)
    }

    fn view(&self, ns: &str) -> Result<Arc<View>, Errno> {
        self.site.view(ns).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64, node: &Node) -> Result<FileAttr, Errno> {
        let Some(ns) = node.ns() else {
            return Ok(dir_attr(ino, SystemTime::now()));
        };
        let view = self.view(ns)?;
        let (number, kind, size) = match node {
            Node::Root => unreachable!("handled above"),
            Node::Live(..) | Node::Meta(_) | Node::Points(_) => {
                (view.newest(), FileType::Directory, 0)
            }
            Node::PointDir(_, n, _) => (*n, FileType::Directory, 0),
            Node::Image(_, n, p) => match view.find(*n, p) {
                Some(Found::Image(size)) => (*n, FileType::RegularFile, size),
                _ => return Err(Errno::ESTALE),
            },
        };
        let at = view.committed_at(number).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut a = dir_attr(ino, at);
        if let Node::Image(_, _, p) = node {
            a.kind = kind;
            a.size = size;
            a.blocks = size.div_ceil(512);
            a.nlink = 1;
            a.perm = 0o444;
            if let Some(md) = view.image_file(p).and_then(|f| f.metadata().ok()) {
                a.perm = (md.mode() & 0o555) as u16;
                a.uid = md.uid();
                a.gid = md.gid();
            }
        }
        Ok(a)
    }

    /// The child `name` of directory `parent`, and how long the kernel may cache the name.
    fn child(&self, parent: &Node, name: &str) -> Result<(Node, Duration), Errno> {
        let Some(ns) = parent.ns() else {
            // A namespace appears with its primary's first contact.
            self.view(name)?;
            return Ok((Node::Live(name.into(), String::new()), NOW));
        };
        let view = self.view(ns)?;
        let ns = ns.clone();
        let found = |n: u64, p: String, dir: fn(Ns, u64, String) -> Node| match view.find(n, &p) {
            Some(Found::Image(_)) => Ok(Node::Image(ns.clone(), n, p)),
            Some(Found::Dir) => Ok(dir(ns.clone(), n, p)),
            None => Err(Errno::ENOENT),
        };
        match parent {
            Node::Root => unreachable!("handled above"),
            Node::Live(_, d) if d.is_empty() && name == META_DIR => {
                Ok((Node::Meta(ns.clone()), FOREVER))
            }
            Node::Live(_, d) => Ok((
                found(view.newest(), join(d, name), |ns, _, p| Node::Live(ns, p))?,
                NOW,
            )),
            Node::Meta(_) if name == "generations" => Ok((Node::Points(ns.clone()), FOREVER)),
            Node::Meta(_) => Err(Errno::ENOENT),
            Node::Points(_) => {
                let n: u64 = name.parse().map_err(|_| Errno::ENOENT)?;
                if !view.generations().contains(&n) {
                    return Err(Errno::ENOENT);
                }
                Ok((Node::PointDir(ns.clone(), n, String::new()), NOW))
            }
            Node::PointDir(_, n, d) => Ok((found(*n, join(d, name), Node::PointDir)?, FOREVER)),
            Node::Image(..) => Err(Errno::ENOTDIR),
        }
    }

    fn entries(&self, node: &Node) -> Result<Vec<(Node, FileType, String)>, Errno> {
        let Some(ns) = node.ns() else {
            return Ok(self
                .site
                .names()
                .into_iter()
                .map(|n| {
                    (
                        Node::Live(n.as_str().into(), String::new()),
                        FileType::Directory,
                        n,
                    )
                })
                .collect());
        };
        let view = self.view(ns)?;
        let listed = |n: u64, d: &str, dir: fn(Ns, u64, String) -> Node| {
            let list = view.list(n, d).ok_or(Errno::ESTALE)?;
            Ok::<_, Errno>(
                list.into_iter()
                    .map(|(name, f)| {
                        let p = join(d, &name);
                        match f {
                            Found::Image(_) => {
                                (Node::Image(ns.clone(), n, p), FileType::RegularFile, name)
                            }
                            Found::Dir => (dir(ns.clone(), n, p), FileType::Directory, name),
                        }
                    })
                    .collect(),
            )
        };
        match node {
            Node::Root => unreachable!("handled above"),
            Node::Live(_, d) => listed(view.newest(), d, |ns, _, p| Node::Live(ns, p)),
            Node::Meta(_) => Ok(vec![(
                Node::Points(ns.clone()),
                FileType::Directory,
                "generations".into(),
            )]),
            Node::Points(_) => Ok(view
                .generations()
                .into_iter()
                .map(|n| {
                    (
                        Node::PointDir(ns.clone(), n, String::new()),
                        FileType::Directory,
                        n.to_string(),
                    )
                })
                .collect()),
            Node::PointDir(_, n, d) => listed(*n, d, Node::PointDir),
            Node::Image(..) => Err(Errno::ENOTDIR),
        }
    }
}

/// A read-only directory's attributes, with time `at`.
fn dir_attr(ino: u64, at: SystemTime) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: at,
        mtime: at,
        ctime: at,
        crtime: at,
        kind: FileType::Directory,
        perm: 0o555,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for ReplicaFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        // O_DIRECT reads with many in flight (libaio, io_uring) reach the daemon together.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            log::info!("this kernel does not offer asynchronous direct I/O through FUSE");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            let parent = self.node(parent)?;
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            let (node, ttl) = self.child(&parent, name)?;
            let ino = self.inodes.lock().ino(node.clone());
            Ok::<_, Errno>((self.attr(ino, &node)?, ttl))
        })();
        match r {
            Ok((a, ttl)) => {
                let attr_ttl = if a.kind == FileType::RegularFile {
                    FOREVER
                } else {
                    ttl
                };
                reply.entry_with_ttls(&attr_ttl, &ttl, &a, Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(ino.0, &n)) {
            Ok(a) if a.kind == FileType::RegularFile => reply.attr(&FOREVER, &a),
            Ok(a) => reply.attr(&NOW, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        let Ok(Node::Image(ns, n, path)) = self.node(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let view = match self.view(&ns) {
            Ok(v) => v,
            Err(e) => return reply.error(e),
        };
        if !view.pin(n) {
            // Expired since the lookup: the kernel looks the path up again.
            return reply.error(Errno::ESTALE);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.files.lock().insert(fh, (view, n, path));
        // An O_DIRECT open (QEMU's cache=none) is served as FUSE direct I/O: each read goes
        // to the daemon, many at once; the others share the page cache across opens.
        let direct = if flags.0 & libc::O_DIRECT != 0 {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE | direct);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::priority::request_thread();
        let Some((view, n, path)) = self.files.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut buf = vec![0u8; size as usize];
        match view.read(n, &path, offset, &mut buf) {
            Ok(got) => reply.data(&buf[..got]),
            Err(e) => {
                log::error!("read of {path} (generation {n}) at {offset}: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let opened = self.files.lock().remove(&fh.0);
        if let Some((view, n, _)) = opened {
            view.unpin(n);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = (|| {
            let node = self.node(ino)?;
            let entries = self.entries(&node)?;
            let mut inodes = self.inodes.lock();
            Ok::<_, Errno>(
                entries
                    .into_iter()
                    .map(|(n, k, name)| (inodes.ino(n), k, name))
                    .collect::<Vec<_>>(),
            )
        })();
        match r {
            Ok(list) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.dirs.lock().insert(fh, list);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dirs = self.dirs.lock();
        let Some(list) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let dots = [
            (ino.0, FileType::Directory, "."),
            (ino.0, FileType::Directory, ".."),
        ];
        let all = dots
            .into_iter()
            .chain(list.iter().map(|(i, k, n)| (*i, *k, n.as_str())));
        for (i, (e_ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e_ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    /// `user.ferry.generation` on an image: the generation it shows (what a file opened now,
    /// or opened through this inode, reads).
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (Ok(Node::Image(_, n, _)), Some(GENERATION_XATTR)) = (self.node(ino), name.to_str())
        else {
            return reply.error(Errno::ENODATA);
        };
        let value = n.to_string();
        if size == 0 {
            reply.size(value.len() as u32);
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(value.as_bytes());
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match super::statvfs(self.site.root()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }
}
