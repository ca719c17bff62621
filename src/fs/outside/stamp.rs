//! What a backing file looked like when ferry last accounted for all of its bytes, and the pure
//! policy that judges whether it changed behind the mount's back since.
//!
//! A [`Stamp`] is taken of every image at each sync point's freeze (every change before it is
//! in the new generation, every change after it is in the dirty set and the intent log) and at
//! a clean unmount (every change is in the generation or in the intent log's clean record). At
//! the next mount a different stamp means the file was changed by something other than ferry,
//! unless an unclean stop left intent-log marks on the image: then the difference is expected
//! (the mount wrote it after the sync point) and the marks say what to re-read.

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::durable;

/// The identity, size and change times of one backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl Stamp {
    pub fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }

    /// What differs from `was`, in words ("size 8388608 -> 3145851, mtime, ctime"); `None` if
    /// nothing does.
    pub fn differences(&self, was: &Stamp) -> Option<String> {
        let mut d = Vec::new();
        if (self.dev, self.ino) != (was.dev, was.ino) {
            d.push(format!(
                "inode {}:{} -> {}:{} (replaced)",
                was.dev, was.ino, self.dev, self.ino
            ));
        }
        if self.size != was.size {
            d.push(format!("size {} -> {}", was.size, self.size));
        }
        if self.mtime_ns != was.mtime_ns {
            d.push("mtime".into());
        }
        if self.ctime_ns != was.ctime_ns {
            d.push("ctime".into());
        }
        (!d.is_empty()).then(|| d.join(", "))
    }
}

/// Whether an image known to the last generation changed behind the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// As recorded.
    Same,
    /// Changed by something other than ferry: re-read it all. Says what changed.
    Changed(String),
    /// Differs, but an unclean stop left intent-log marks on it: the mount wrote it after the
    /// record, and the marks say what to re-read.
    Logged,
}

/// Judges one image known to the last generation. `was` is its recorded stamp (none: no record,
/// e.g. the first mount of a state directory made before records were kept); `logged` says the
/// intent log holds marks for it after an unclean stop.
pub fn judge(was: Option<&Stamp>, now: &Stamp, logged: bool) -> Verdict {
    let Some(was) = was else {
        return Verdict::Changed("no record of it".into());
    };
    match now.differences(was) {
        None => Verdict::Same,
        Some(_) if logged => Verdict::Logged,
        Some(d) => Verdict::Changed(d),
    }
}

/// The stamps of every image, as saved in the mount's state directory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub images: BTreeMap<String, Stamp>,
}

impl Record {
    /// Loads the record at `path`; `Ok(None)` if there is none yet.
    pub fn load(path: &Path) -> io::Result<Option<Record>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is damaged ({e})", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves it atomically and durably.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        durable::write_atomic(path, &serde_json::to_vec(self).map_err(io::Error::other)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size: 4096,
            mtime_ns: 10,
            ctime_ns: 20,
        }
    }

    #[test]
    fn an_unchanged_file_is_the_same() {
        assert_eq!(judge(Some(&stamp()), &stamp(), false), Verdict::Same);
        assert_eq!(judge(Some(&stamp()), &stamp(), true), Verdict::Same);
    }

    #[test]
    fn each_difference_is_named() {
        let was = stamp();
        let now = Stamp {
            size: 8192,
            ctime_ns: 21,
            ..was
        };
        assert_eq!(
            judge(Some(&was), &now, false),
            Verdict::Changed("size 4096 -> 8192, ctime".into())
        );
        let replaced = Stamp { ino: 3, ..was };
        let Verdict::Changed(why) = judge(Some(&was), &replaced, false) else {
            panic!()
        };
        assert!(why.contains("inode 1:2 -> 1:3"), "{why}");
        let touched = Stamp {
            mtime_ns: 11,
            ..was
        };
        assert_eq!(
            judge(Some(&was), &touched, false),
            Verdict::Changed("mtime".into())
        );
    }

    #[test]
    fn intent_log_marks_after_an_unclean_stop_explain_a_difference() {
        let now = Stamp {
            mtime_ns: 99,
            ..stamp()
        };
        assert_eq!(judge(Some(&stamp()), &now, true), Verdict::Logged);
    }

    #[test]
    fn no_record_means_re_read_it() {
        assert_eq!(
            judge(None, &stamp(), true),
            Verdict::Changed("no record of it".into())
        );
    }

    #[test]
    fn the_record_round_trips_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps.json");
        assert_eq!(Record::load(&path).unwrap(), None);
        let mut r = Record::default();
        r.images.insert("a/b.img".into(), stamp());
        r.save(&path).unwrap();
        assert_eq!(Record::load(&path).unwrap(), Some(r));
        std::fs::write(&path, b"{not json").unwrap();
        let e = Record::load(&path).unwrap_err().to_string();
        assert!(e.contains("stamps.json is damaged"), "{e}");
    }
}
