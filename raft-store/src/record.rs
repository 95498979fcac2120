//! Records: the payload of one frame, written field by field (not protobuf)
//! so that a reader can slice an entry's `data` out of its read buffer.
//!
//! Wire format (integers little-endian), the first byte is the kind:
//!
//! ```text
//! Entry      1 u8 | entry_type u8 | term u64 | index u64 | context_len u32 | context | data (rest)
//! HardState  2 u8 | seq u64 | term u64 | vote u64 | commit u64
//! ConfState  3 u8 | seq u64 | auto_leave u8 | voters | learners | voters_outgoing
//!            | learners_next, where each list is count u32 | count × u64
//! Synced     4 u8 | upto u64
//! ```
//!
//! A `Synced` record (a *sync marker*) says that the first `upto` bytes of
//! the segment file holding it were made durable by a completed `sync` (or
//! by open) before the marker was written; so `upto` never exceeds the
//! marker's own position. Recovery uses it to tell damage to synced data
//! from a write that never reached the disk (see [`crate::recover`]). Its
//! payload has a fixed length, [`SYNCED_PAYLOAD_LEN`], which lets recovery
//! look for markers past a bad frame in linear time.
//!
//! `seq` is a per-group counter that grows with every hard-state or
//! conf-state record written (here or in the snapshot file). On open, the
//! record with the highest `seq` wins, wherever it lies; this is what lets
//! a conflicting-suffix truncation cut away records safely.

use std::ops::Range;

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, EntryType, HardState};

use crate::error::StoreError;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
pub(crate) const KIND_SYNCED: u8 = 4;

/// Payload bytes of a `Synced` record: kind and `upto`.
pub(crate) const SYNCED_PAYLOAD_LEN: usize = 1 + 8;

/// A decoded record. Entries keep byte ranges into the payload so the
/// caller decides whether to copy (recovery scan: never needs data) or
/// slice a shared buffer (reads).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Entry(EntryMeta),
    HardState(u64, HardState),
    ConfState(u64, ConfState),
    /// A sync marker: the file's first `upto` bytes are durable.
    Synced {
        upto: u64,
    },
}

/// An entry record's fixed fields and where its variable parts lie.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EntryMeta {
    pub entry_type: EntryType,
    pub term: u64,
    pub index: u64,
    pub context: Range<usize>,
    pub data: Range<usize>,
}

impl EntryMeta {
    /// Builds the entry, slicing context and data out of `payload` (the
    /// record's bytes) without copying.
    pub(crate) fn to_entry(&self, payload: &Bytes) -> Entry {
        let mut entry = Entry::default();
        entry.set_entry_type(self.entry_type);
        entry.term = self.term;
        entry.index = self.index;
        entry.context = payload.slice(self.context.clone());
        entry.data = payload.slice(self.data.clone());
        entry
    }
}

/// Bytes of an entry record before its context: kind, entry type, term,
/// index, context length.
const ENTRY_FIXED_LEN: u64 = 1 + 1 + 8 + 8 + 4;

/// Bytes of an entry record: fixed fields, context and data.
pub(crate) fn entry_record_len(entry: &Entry) -> u64 {
    ENTRY_FIXED_LEN + entry.context.len() as u64 + entry.data.len() as u64
}

/// Appends an entry record to `buf`.
pub(crate) fn put_entry(buf: &mut Vec<u8>, entry: &Entry) -> Result<(), StoreError> {
    let context_len = u32::try_from(entry.context.len()).map_err(|_| StoreError::TooLarge {
        what: "entry context",
        size: entry.context.len() as u64,
        limit: u64::from(u32::MAX),
    })?;
    buf.push(KIND_ENTRY);
    buf.push(entry_type_code(entry.get_entry_type()));
    buf.extend_from_slice(&entry.term.to_le_bytes());
    buf.extend_from_slice(&entry.index.to_le_bytes());
    buf.extend_from_slice(&context_len.to_le_bytes());
    buf.extend_from_slice(&entry.context);
    buf.extend_from_slice(&entry.data);
    Ok(())
}

/// Appends a hard-state record to `buf`.
pub(crate) fn put_hard_state(buf: &mut Vec<u8>, seq: u64, hs: &HardState) {
    buf.push(KIND_HARD_STATE);
    buf.extend_from_slice(&seq.to_le_bytes());
    put_hard_state_fields(buf, hs);
}

/// Appends a sync marker's payload to `buf`.
pub(crate) fn put_synced(buf: &mut Vec<u8>, upto: u64) {
    buf.push(KIND_SYNCED);
    buf.extend_from_slice(&upto.to_le_bytes());
}

/// Appends a conf-state record to `buf`.
pub(crate) fn put_conf_state(buf: &mut Vec<u8>, seq: u64, cs: &ConfState) {
    buf.push(KIND_CONF_STATE);
    buf.extend_from_slice(&seq.to_le_bytes());
    put_conf_state_fields(buf, cs);
}

pub(crate) fn put_hard_state_fields(buf: &mut Vec<u8>, hs: &HardState) {
    for v in [hs.term, hs.vote, hs.commit] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_conf_state_fields(buf: &mut Vec<u8>, cs: &ConfState) {
    buf.push(u8::from(cs.auto_leave));
    for list in [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ] {
        // A conf state lists a handful of node ids; u32 is far beyond that.
        buf.extend_from_slice(&(list.len() as u32).to_le_bytes());
        for id in list {
            buf.extend_from_slice(&id.to_le_bytes());
        }
    }
}

/// Decodes one record. Never panics on arbitrary input.
pub(crate) fn decode(payload: &[u8]) -> Result<Record, String> {
    let mut r = ByteReader::new(payload);
    let record = match r.u8()? {
        KIND_ENTRY => Record::Entry(decode_entry(&mut r)?),
        KIND_HARD_STATE => Record::HardState(r.u64()?, read_hard_state_fields(&mut r)?),
        KIND_CONF_STATE => Record::ConfState(r.u64()?, read_conf_state_fields(&mut r)?),
        KIND_SYNCED => Record::Synced { upto: r.u64()? },
        kind => return Err(format!("unknown record kind {kind}")),
    };
    if !matches!(record, Record::Entry(_)) && r.remaining() != 0 {
        return Err(format!("{} trailing bytes after record", r.remaining()));
    }
    Ok(record)
}

fn decode_entry(r: &mut ByteReader<'_>) -> Result<EntryMeta, String> {
    let entry_type = entry_type_from_code(r.u8()?)?;
    let term = r.u64()?;
    let index = r.u64()?;
    let context_len = r.u32()? as usize;
    let context_start = r.position();
    r.take(context_len)?;
    let data_start = r.position();
    Ok(EntryMeta {
        entry_type,
        term,
        index,
        context: context_start..data_start,
        data: data_start..data_start + r.remaining(),
    })
}

pub(crate) fn read_hard_state_fields(r: &mut ByteReader<'_>) -> Result<HardState, String> {
    // Struct fields are evaluated in the order written.
    Ok(HardState {
        term: r.u64()?,
        vote: r.u64()?,
        commit: r.u64()?,
        ..Default::default()
    })
}

pub(crate) fn read_conf_state_fields(r: &mut ByteReader<'_>) -> Result<ConfState, String> {
    let auto_leave = match r.u8()? {
        0 => false,
        1 => true,
        other => return Err(format!("bad auto_leave flag {other}")),
    };
    Ok(ConfState {
        voters: read_ids(r)?,
        learners: read_ids(r)?,
        voters_outgoing: read_ids(r)?,
        learners_next: read_ids(r)?,
        auto_leave,
        ..Default::default()
    })
}

fn read_ids(r: &mut ByteReader<'_>) -> Result<Vec<u64>, String> {
    let count = r.u32()? as usize;
    if count > r.remaining() / 8 {
        return Err(format!("id list of {count} overruns the record"));
    }
    (0..count).map(|_| r.u64()).collect()
}

fn entry_type_code(t: EntryType) -> u8 {
    match t {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

fn entry_type_from_code(code: u8) -> Result<EntryType, String> {
    match code {
        0 => Ok(EntryType::EntryNormal),
        1 => Ok(EntryType::EntryConfChange),
        2 => Ok(EntryType::EntryConfChangeV2),
        other => Err(format!("unknown entry type {other}")),
    }
}

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        ByteReader { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {}, only {} left",
                self.pos,
                self.remaining()
            ));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry(
        entry_type: EntryType,
        term: u64,
        index: u64,
        context: Vec<u8>,
        data: Vec<u8>,
    ) -> Entry {
        let mut e = Entry::default();
        e.set_entry_type(entry_type);
        e.term = term;
        e.index = index;
        e.context = context.into();
        e.data = data.into();
        e
    }

    #[test]
    fn entry_exact_bytes() {
        let mut buf = Vec::new();
        let e = entry(
            EntryType::EntryConfChange,
            2,
            3,
            b"c".to_vec(),
            b"dd".to_vec(),
        );
        put_entry(&mut buf, &e).expect("encodes");
        let mut want = vec![1, 1];
        want.extend(2u64.to_le_bytes());
        want.extend(3u64.to_le_bytes());
        want.extend(1u32.to_le_bytes());
        want.extend(b"cdd");
        assert_eq!(buf, want);
    }

    proptest! {
        #[test]
        fn entry_round_trip(
            kind in 0u8..3, term: u64, index: u64,
            context in proptest::collection::vec(any::<u8>(), 0..16),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let entry_type = entry_type_from_code(kind).expect("valid code");
            let e = entry(entry_type, term, index, context, data);
            let mut buf = Vec::new();
            put_entry(&mut buf, &e).expect("encodes");
            let payload = Bytes::from(buf);
            let Ok(Record::Entry(meta)) = decode(&payload) else { panic!("not an entry") };
            prop_assert_eq!(meta.to_entry(&payload), e);
            // Every prefix that cuts into the fixed fields or the context fails.
            for cut in 0..meta.data.start {
                prop_assert!(decode(&payload[..cut]).is_err());
            }
        }

        #[test]
        fn state_records_round_trip(
            seq: u64, term: u64, vote: u64, commit: u64, auto_leave: bool,
            voters in proptest::collection::vec(any::<u64>(), 0..5),
            learners in proptest::collection::vec(any::<u64>(), 0..5),
        ) {
            let hs = HardState { term, vote, commit, ..Default::default() };
            let cs = ConfState { voters, learners, auto_leave, ..Default::default() };
            let (mut hs_buf, mut cs_buf) = (Vec::new(), Vec::new());
            put_hard_state(&mut hs_buf, seq, &hs);
            put_conf_state(&mut cs_buf, seq, &cs);
            prop_assert_eq!(decode(&hs_buf), Ok(Record::HardState(seq, hs)));
            prop_assert_eq!(decode(&cs_buf), Ok(Record::ConfState(seq, cs)));
            for cut in 0..hs_buf.len() {
                prop_assert!(decode(&hs_buf[..cut]).is_err());
            }
            for cut in 0..cs_buf.len() {
                prop_assert!(decode(&cs_buf[..cut]).is_err());
            }
        }

        #[test]
        fn sync_marker_round_trip(upto: u64) {
            let mut buf = Vec::new();
            put_synced(&mut buf, upto);
            prop_assert_eq!(buf.len(), SYNCED_PAYLOAD_LEN);
            prop_assert_eq!(buf[0], KIND_SYNCED);
            prop_assert_eq!(&buf[1..], &upto.to_le_bytes()[..]);
            prop_assert_eq!(decode(&buf), Ok(Record::Synced { upto }));
            for cut in 0..buf.len() {
                prop_assert!(decode(&buf[..cut]).is_err());
            }
            buf.push(0);
            prop_assert!(decode(&buf).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }
    }
}
