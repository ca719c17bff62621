//! The inode table: FUSE inode numbers for the files and directories of the backing directory,
//! each remembered by its parent and name (so renames are one update) and by the backing
//! filesystem's (device, inode) pair (so a second lookup of the same file finds the same
//! number). Inode 1 is the mount root.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

pub type Ino = u64;
pub const ROOT: Ino = 1;
/// The parent of an inode whose name was unlinked while the kernel still holds it.
const UNLINKED: Ino = u64::MAX;

#[derive(Debug)]
struct Node {
    parent: Ino,
    name: OsString,
    backing: (u64, u64),
    lookups: u64,
}

/// All inodes the kernel currently knows.
#[derive(Debug)]
pub struct Inodes {
    nodes: HashMap<Ino, Node>,
    by_backing: HashMap<(u64, u64), Ino>,
    next: Ino,
}

impl Inodes {
    /// A table holding only the root, whose backing identity is `root_backing`.
    pub fn new(root_backing: (u64, u64)) -> Inodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: OsString::new(),
                backing: root_backing,
                lookups: 1,
            },
        );
        Inodes {
            nodes,
            by_backing: HashMap::from([(root_backing, ROOT)]),
            next: ROOT + 1,
        }
    }

    /// Path of `ino` relative to the mount root (empty for the root), or `None` if unknown.
    pub fn path(&self, ino: Ino) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let n = self.nodes.get(&cur)?;
            parts.push(n.name.as_os_str());
            cur = n.parent;
            if parts.len() > 4096 {
                return None; // a cycle would be a bug; never loop forever on it
            }
        }
        Some(parts.iter().rev().collect())
    }

    /// Records one kernel lookup of `name` in `parent`, backed by `backing`; returns its inode.
    /// A file already known under another name (renamed behind our back) is moved to this one.
    pub fn remember(&mut self, parent: Ino, name: &OsStr, backing: (u64, u64)) -> Ino {
        if let Some(&ino) = self.by_backing.get(&backing) {
            let n = self
                .nodes
                .get_mut(&ino)
                .expect("by_backing and nodes agree");
            n.lookups += 1;
            if ino != ROOT {
                n.parent = parent;
                n.name = name.to_os_string();
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_os_string(),
                backing,
                lookups: 1,
            },
        );
        self.by_backing.insert(backing, ino);
        ino
    }

    /// The inode currently named `name` in `parent`, if the kernel knows it.
    pub fn child(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        // Linear in the number of known inodes; image directories hold few files. Index by
        // (parent, name) if that ever changes.
        self.nodes
            .iter()
            .find(|(ino, n)| **ino != ROOT && n.parent == parent && n.name == name)
            .map(|(&ino, _)| ino)
    }

    /// The kernel forgot `n` lookups of `ino`; drops it when none are left.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 {
                let backing = node.backing;
                self.nodes.remove(&ino);
                self.by_backing.remove(&backing);
            }
        }
    }

    /// `ino` was renamed to `name` in `parent`.
    pub fn rename(&mut self, ino: Ino, parent: Ino, name: &OsStr) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = parent;
            n.name = name.to_os_string();
        }
    }

    /// The backing file of `ino` was removed: later lookups of its name must not find it.
    /// The inode itself lives on while the kernel holds it (open files keep working).
    pub fn unlink(&mut self, ino: Ino) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.name = OsString::from(format!(".ferry-unlinked-{ino}"));
            n.parent = UNLINKED;
        }
    }

    /// Whether `ino` is known but was unlinked (or replaced by a rename) while held open.
    pub fn is_unlinked(&self, ino: Ino) -> bool {
        self.nodes.get(&ino).is_some_and(|n| n.parent == UNLINKED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_renames_and_lookups_are_counted() {
        let mut t = Inodes::new((1, 2));
        let dir = t.remember(ROOT, OsStr::new("vms"), (1, 10));
        let img = t.remember(dir, OsStr::new("a.qcow2"), (1, 11));
        assert_eq!(t.path(img).unwrap(), PathBuf::from("vms/a.qcow2"));
        assert_eq!(t.remember(dir, OsStr::new("a.qcow2"), (1, 11)), img);
        t.rename(img, ROOT, OsStr::new("b.qcow2"));
        assert_eq!(t.path(img).unwrap(), PathBuf::from("b.qcow2"));
        assert_eq!(t.child(ROOT, OsStr::new("b.qcow2")), Some(img));
        t.forget(img, 1);
        assert!(t.path(img).is_some());
        t.forget(img, 1);
        assert!(t.path(img).is_none());
        assert_eq!(t.path(ROOT).unwrap(), PathBuf::new());
    }

    #[test]
    fn an_unlinked_inode_is_no_longer_found_by_name() {
        let mut t = Inodes::new((1, 2));
        let img = t.remember(ROOT, OsStr::new("x"), (1, 11));
        assert!(!t.is_unlinked(img));
        t.unlink(img);
        assert_eq!(t.child(ROOT, OsStr::new("x")), None);
        assert!(t.path(img).is_none());
        assert!(t.is_unlinked(img));
    }
}
