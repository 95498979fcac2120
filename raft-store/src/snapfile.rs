//! The `snapshot` file: the latest snapshot and where the log starts.
//!
//! Wire format (integers little-endian):
//!
//! ```text
//! magic "COVETSNP" | version u32 = 1 | crc u32 (CRC32C of the payload) | payload
//! payload: generation u64 | first_index u64 | prev_term u64
//!        | hard-state seq u64 | hard state (term, vote, commit: u64 each)
//!        | conf-state seq u64 | conf state
//!        | snapshot index u64 | snapshot term u64 | snapshot conf state
//!        | snapshot data (rest of the file)
//! ```
//!
//! Conf states use the record layout of [`crate::record`]. The file is
//! replaced atomically: write `snapshot.tmp`, fsync it, rename it over
//! `snapshot`, fsync the directory.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;

use bytes::Bytes;
use raft::prelude::{ConfState, HardState, Snapshot};

pub(crate) use crate::durable::sync_dir;
use crate::error::StoreError;
use crate::record::{
    put_conf_state_fields, put_hard_state_fields, read_conf_state_fields, read_hard_state_fields,
    ByteReader,
};

pub(crate) const SNAPSHOT_FILE: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const MAGIC: &[u8; 8] = b"COVETSNP";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;

/// Everything the `snapshot` file records.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotFile {
    /// The log generation; segments of older generations are stale.
    pub generation: u64,
    /// The first index of the log when this file was written: segments
    /// named below it are leftovers of an interrupted compaction.
    pub first_index: u64,
    /// The term of entry `first_index - 1`.
    pub prev_term: u64,
    /// Hard and conf state when this file was written, with their record
    /// sequence numbers: like records in the segments, the highest `seq`
    /// wins on open.
    pub hard_state: (u64, HardState),
    pub conf_state: (u64, ConfState),
    pub snapshot: Snapshot,
}

impl SnapshotFile {
    /// The state of a group that has never had a snapshot.
    pub(crate) fn fresh() -> Self {
        SnapshotFile {
            generation: 0,
            first_index: 1,
            prev_term: 0,
            hard_state: (0, HardState::default()),
            conf_state: (0, ConfState::default()),
            snapshot: Snapshot::default(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let meta = self.snapshot.get_metadata();
        let mut payload = Vec::with_capacity(128 + self.snapshot.data.len());
        for v in [self.generation, self.first_index, self.prev_term] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        payload.extend_from_slice(&self.hard_state.0.to_le_bytes());
        put_hard_state_fields(&mut payload, &self.hard_state.1);
        payload.extend_from_slice(&self.conf_state.0.to_le_bytes());
        put_conf_state_fields(&mut payload, &self.conf_state.1);
        payload.extend_from_slice(&meta.index.to_le_bytes());
        payload.extend_from_slice(&meta.term.to_le_bytes());
        put_conf_state_fields(&mut payload, meta.get_conf_state());
        payload.extend_from_slice(&self.snapshot.data);

        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    fn decode(file: Bytes) -> Result<Self, String> {
        let mut r = ByteReader::new(&file);
        if r.take(8)? != MAGIC {
            return Err("not a snapshot file (bad magic)".into());
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("unsupported snapshot version {version}"));
        }
        let crc = r.u32()?;
        if crc32c::crc32c(&file[HEADER_LEN..]) != crc {
            return Err("snapshot checksum mismatch".into());
        }
        let mut out = SnapshotFile::fresh();
        out.generation = r.u64()?;
        out.first_index = r.u64()?;
        out.prev_term = r.u64()?;
        out.hard_state = (r.u64()?, read_hard_state_fields(&mut r)?);
        out.conf_state = (r.u64()?, read_conf_state_fields(&mut r)?);
        let meta = out.snapshot.mut_metadata();
        meta.index = r.u64()?;
        meta.term = r.u64()?;
        meta.set_conf_state(read_conf_state_fields(&mut r)?);
        out.snapshot.data = file.slice(r.position()..);
        if out.first_index == 0 {
            return Err("first index 0".into());
        }
        Ok(out)
    }
}

/// Loads `dir/snapshot`, or `None` if there is none. Removes a leftover
/// `snapshot.tmp` from an interrupted write.
pub(crate) fn load(dir: &Path) -> Result<Option<SnapshotFile>, StoreError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    match fs::remove_file(&tmp) {
        Ok(()) => tracing::warn!(path = %tmp.display(), "removed unfinished snapshot file"),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io("remove", tmp, e)),
    }
    let path = dir.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read snapshot", path, e)),
    };
    SnapshotFile::decode(Bytes::from(bytes))
        .map(Some)
        .map_err(|reason| StoreError::corrupt(path, 0, reason))
}

/// Replaces `dir/snapshot` atomically and durably.
pub(crate) fn store(dir: &Path, file: &SnapshotFile) -> Result<(), StoreError> {
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut out = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    out.write_all(&file.encode())
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    out.sync_all()
        .map_err(|e| StoreError::io("fsync", &tmp, e))?;
    drop(out);
    let path = dir.join(SNAPSHOT_FILE);
    fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &path, e))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotFile {
        let mut file = SnapshotFile::fresh();
        file.generation = 2;
        file.first_index = 11;
        file.prev_term = 4;
        file.hard_state.0 = 9;
        file.hard_state.1.term = 5;
        file.hard_state.1.vote = 1;
        file.hard_state.1.commit = 12;
        file.conf_state.0 = 10;
        file.conf_state.1.voters = vec![1, 2, 3];
        let meta = file.snapshot.mut_metadata();
        meta.index = 12;
        meta.term = 5;
        meta.mut_conf_state().learners = vec![4];
        meta.mut_conf_state().auto_leave = true;
        file.snapshot.data = Bytes::from_static(b"state machine");
        file
    }

    #[test]
    fn round_trip() {
        let file = sample();
        let back = SnapshotFile::decode(Bytes::from(file.encode())).expect("decodes");
        assert_eq!(back.generation, 2);
        assert_eq!(back.first_index, 11);
        assert_eq!(back.prev_term, 4);
        assert_eq!(back.hard_state, file.hard_state);
        assert_eq!(back.conf_state, file.conf_state);
        assert_eq!(back.snapshot, file.snapshot);
    }

    #[test]
    fn every_truncation_and_bit_flip_fails() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let prefix = Bytes::copy_from_slice(&bytes[..cut]);
            assert!(SnapshotFile::decode(prefix).is_err(), "prefix {cut}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(SnapshotFile::decode(Bytes::from(bad)).is_err(), "bit {bit}");
        }
    }
}
