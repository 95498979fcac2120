//! The crate's error type and its conversion to `raft::Error`.

use std::io;
use std::path::PathBuf;

use raft::StorageError;

/// Everything that can go wrong in a group's storage.
///
/// Callers can act on the variants: `Compacted` and `Unavailable` are range
/// errors of a read, `Corrupt` means the group must not be served from this
/// directory, `Poisoned` means the group must be reopened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "write segment".
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Bytes on disk fail their checksum or do not decode. Never served.
    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        /// The file holding the bad bytes.
        path: PathBuf,
        /// Byte offset of the bad frame (or header) in that file.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// The requested index is below the first index still in the log.
    #[error("index {index} is compacted (first index is {first_index})")]
    Compacted {
        /// The requested index.
        index: u64,
        /// The log's first index.
        first_index: u64,
    },
    /// The requested index is beyond the end of the log.
    #[error("index {index} is unavailable (last index is {last_index})")]
    Unavailable {
        /// The requested index (for a range, its exclusive end).
        index: u64,
        /// The log's last index.
        last_index: u64,
    },
    /// The entries given to `append` do not have consecutive indexes.
    #[error("entries are not contiguous: expected index {expected}, found {found}")]
    NonContiguous {
        /// The index that should have come next.
        expected: u64,
        /// The index that came instead.
        found: u64,
    },
    /// `append` started outside `[min, max]`: it would leave a gap or
    /// overwrite compacted or snapshotted (hence committed) entries.
    #[error("cannot append at index {index}: allowed range is [{min}, {max}]")]
    InvalidAppend {
        /// The first index of the appended entries.
        index: u64,
        /// The lowest index an append may start at.
        min: u64,
        /// The highest index an append may start at (last index + 1).
        max: u64,
    },
    /// A snapshot given to `compact` or `apply_snapshot` is older than the
    /// stored one.
    #[error("snapshot at index {index} is older than the stored one at index {current}")]
    SnapshotOutOfDate {
        /// The given snapshot's index.
        index: u64,
        /// The stored snapshot's index.
        current: u64,
    },
    /// A snapshot given to `compact` does not match the log.
    #[error("invalid snapshot at index {index}: {reason}")]
    InvalidSnapshot {
        /// The snapshot's index.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry or record does not fit the on-disk format.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An earlier write or sync of this group failed. The state of the
    /// page cache is then unknown, so every later write and sync fails until
    /// the group is reopened (which re-reads and re-verifies the disk).
    #[error("storage poisoned by an earlier write or sync failure; reopen the group")]
    Poisoned,
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        position: u64,
        reason: impl Into<String>,
    ) -> Self {
        StoreError::Corrupt {
            path: path.into(),
            position,
            reason: reason.into(),
        }
    }
}

/// The conversion used by the `raft::Storage` impl: range errors map to the
/// matching `StorageError`, everything else to `StorageError::Other`.
impl From<StoreError> for raft::Error {
    fn from(err: StoreError) -> Self {
        let storage = match err {
            StoreError::Compacted { .. } => StorageError::Compacted,
            StoreError::Unavailable { .. } => StorageError::Unavailable,
            StoreError::SnapshotOutOfDate { .. } => StorageError::SnapshotOutOfDate,
            other => StorageError::Other(Box::new(other)),
        };
        raft::Error::Store(storage)
    }
}
