//! The filesystem core's error type, and the one place that turns it into an errno.
//!
//! Policy: core methods return `FsError`. Failures of the backing filesystem keep their
//! `io::Error` (so ENOSPC, EDQUOT, EIO... reach the guest unchanged) together with the
//! operation and the image path, for the log. The FUSE adapter calls [`FsError::errno`] and
//! nothing else; it never invents an errno of its own.

use std::io;
use std::path::PathBuf;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backing filesystem refused the operation.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The kernel named an inode or handle this mount does not know (stale after a restart).
    #[error("unknown {what} {id}")]
    Stale { what: &'static str, id: u64 },
    /// The intent log could not record a write; the write was not done.
    #[error("cannot record write to {path} in the intent log: {source}")]
    Intent {
        path: PathBuf,
        source: crate::dirty::IntentError,
    },
    /// The operation is valid but ferry does not support it (it would move data in a way the
    /// dirty tracking cannot describe, such as FALLOC_FL_COLLAPSE_RANGE).
    #[error("{0} is not supported on a ferry mount")]
    Unsupported(&'static str),
    /// The request itself is invalid (a bad name, an offset out of range...).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The mount is read-only.
    #[error("read-only mount")]
    ReadOnly,
    /// The mount fenced itself (it may no longer be the primary) for longer than the grace.
    #[error("write refused: {0}")]
    Fenced(String),
}

impl FsError {
    /// Wraps an I/O error of the backing filesystem.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> FsError {
        FsError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The errno the caller sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Stale { .. } => libc::ESTALE,
            FsError::Intent { source, .. } => source.errno(),
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::Fenced(_) => libc::EIO,
        }
    }

    /// Whether this failure is worth a warning in the log (not the guest's everyday ENOENT).
    pub fn is_notable(&self) -> bool {
        !matches!(
            self.errno(),
            libc::ENOENT | libc::EEXIST | libc::ENOTEMPTY | libc::ENODATA | libc::ENXIO
        )
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
