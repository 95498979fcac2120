//! The record-batch format: how records travel from producer to log to
//! consumer.
//!
//! A batch is the unit a producer sends, the broker replicates and stores,
//! and a consumer fetches. The broker never re-encodes a batch: it validates
//! it once ([`validate`]), writes the partition's next offset into the first
//! eight bytes ([`stamp_base_offset`]) and keeps the bytes as they are. That
//! is why `base_offset` sits outside the CRC, and why [`decode_records`]
//! (and [`BatchRecords`], which decodes one record at a time for readers)
//! hands back slices of the batch instead of copies.
//!
//! This module is the reference for the format; change the two together.
//!
//! # Header
//!
//! All integers are little-endian. The header is a fixed [`HEADER_LEN`]
//! (61) bytes:
//!
//! | offset | size | field | notes |
//! |---|---|---|---|
//! | 0  | 8 | `base_offset` u64 | offset of the first record; stamped by the broker; not covered by the CRC |
//! | 8  | 4 | `batch_length` u32 | bytes after this field: total length − 12 |
//! | 12 | 1 | `magic` u8 | format version, [`MAGIC`] = 1 |
//! | 13 | 4 | `crc` u32 | CRC32C of every byte from offset 17 to the end |
//! | 17 | 2 | `attributes` u16 | 0 for now (no compression); other values are kept, not interpreted |
//! | 19 | 4 | `last_offset_delta` u32 | `record_count` − 1 |
//! | 23 | 8 | `first_timestamp` i64 | ms since the Unix epoch; base for record timestamp deltas |
//! | 31 | 8 | `max_timestamp` i64 | largest record timestamp in the batch |
//! | 39 | 8 | `producer_id` i64 | [`NO_PRODUCER_ID`] (−1) if none |
//! | 47 | 2 | `producer_epoch` i16 | [`NO_PRODUCER_EPOCH`] (−1) if none |
//! | 49 | 4 | `base_sequence` i32 | [`NO_SEQUENCE`] (−1) if none |
//! | 53 | 4 | `record_count` u32 | at least 1 |
//! | 57 | 4 | reserved u32 | must be 0 |
//!
//! # Records
//!
//! `record_count` records follow the header back to back, with nothing after
//! the last. "varint" is unsigned LEB128 limited to the `u32` range;
//! "zigzag" is a zigzag-mapped LEB128 `i64`. Each record is:
//!
//! ```text
//! length          varint   bytes of the body that follows
//! body:
//!   attributes    u8       0 (other values are accepted and ignored)
//!   timestamp     zigzag   delta from first_timestamp, may be negative
//!   offset_delta  varint   must equal the record's index: 0, 1, 2, ...
//!   key_len       zigzag   −1 = null key, else the key's length
//!   key           bytes
//!   value_len     varint
//!   value         bytes
//!   header_count  varint
//!   headers:      header_count times:
//!     key_len     varint
//!     key         bytes, valid UTF-8
//!     value_len   varint
//!     value       bytes
//! ```
//!
//! The body must be consumed exactly by its `length`.
//!
//! # What validation enforces
//!
//! Beyond the layout above: varints must be minimally encoded (so every
//! value has exactly one encoding), `max_timestamp` must equal the largest
//! record timestamp, and `base_offset + record_count` and every record
//! timestamp must fit their types. The first record's timestamp delta is not
//! required to be 0, although [`BatchBuilder`] always writes it so.
//!
//! # Known limits
//!
//! No compression and no transactional or control batches yet; the
//! `attributes` bits are reserved for them.

use bytes::{Buf, BufMut, Bytes};

mod decode;
mod encode;
mod varint;

#[cfg(test)]
mod tests;

pub use decode::{decode_records, validate, validate_with_limit, BatchRecords};
pub use encode::{encode, BatchBuilder};

/// The format version written into, and required in, the `magic` byte.
pub const MAGIC: u8 = 1;

/// Length of the fixed batch header.
pub const HEADER_LEN: usize = 61;

/// `producer_id` of a batch sent without an idempotent producer.
pub const NO_PRODUCER_ID: i64 = -1;

/// `producer_epoch` of a batch sent without an idempotent producer.
pub const NO_PRODUCER_EPOCH: i16 = -1;

/// `base_sequence` of a batch sent without an idempotent producer.
pub const NO_SEQUENCE: i32 = -1;

/// The largest batch the format can express: `batch_length` is a `u32`.
pub const MAX_BATCH_LEN: usize = (u32::MAX as usize).saturating_add(LENGTH_PREFIX_LEN);

/// Bytes up to and including `batch_length`, which that field does not count.
const LENGTH_PREFIX_LEN: usize = 12;

/// Where the CRC is stored.
const CRC_AT: usize = 13;

/// Where the CRC-covered bytes begin: everything from `attributes` on.
const CRC_FROM: usize = 17;

/// One record header: a named, opaque value.
///
/// Wire format: `key_len varint | key UTF-8 | value_len varint | value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header's name.
    pub key: String,
    /// The header's value.
    pub value: Bytes,
}

/// A record as a producer writes it, before it has an offset.
///
/// Wire format: see the [module docs](self); encoded by [`BatchBuilder`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Optional key; `None` is distinct from an empty key.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Application headers, in order; names may repeat.
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A record read back out of a batch. `key`, `value` and header values are
/// slices of the batch's [`Bytes`], not copies.
///
/// Wire format: see the [module docs](self); produced by [`decode_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// `base_offset` + the record's index in its batch.
    pub offset: u64,
    /// `first_timestamp` + the record's timestamp delta.
    pub timestamp_ms: i64,
    /// Optional key; `None` is distinct from an empty key.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Application headers, in order.
    pub headers: Vec<Header>,
}

/// The decoded fixed header of a batch (all fields but the reserved word).
///
/// Wire format: 61 bytes, laid out in the table in the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the `batch_length` field.
    pub batch_length: u32,
    /// Format version; always [`MAGIC`] in a header that was read successfully.
    pub magic: u8,
    /// CRC32C of the bytes from offset 17 to the end.
    pub crc: u32,
    /// Batch attributes; 0 for now.
    pub attributes: u16,
    /// `record_count` − 1.
    pub last_offset_delta: u32,
    /// Base for the records' timestamp deltas, in ms since the Unix epoch.
    pub first_timestamp: i64,
    /// Largest record timestamp in the batch.
    pub max_timestamp: i64,
    /// Idempotent producer id, or [`NO_PRODUCER_ID`].
    pub producer_id: i64,
    /// Idempotent producer epoch, or [`NO_PRODUCER_EPOCH`].
    pub producer_epoch: i16,
    /// Sequence number of the first record, or [`NO_SEQUENCE`].
    pub base_sequence: i32,
    /// Number of records; at least 1 in a valid batch.
    pub record_count: u32,
}

impl BatchHeader {
    /// The batch's total length in bytes, `batch_length + 12`.
    pub fn total_len(&self) -> usize {
        (self.batch_length as usize).saturating_add(LENGTH_PREFIX_LEN)
    }

    /// Offset of the last record.
    ///
    /// Exact for a header returned by [`validate`]; saturates at `u64::MAX`
    /// for a header that was only read.
    pub fn last_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.last_offset_delta))
    }

    /// The offset after the last record: where the next batch starts.
    ///
    /// Exact for a header returned by [`validate`]; saturates at `u64::MAX`
    /// for a header that was only read.
    pub fn next_offset(&self) -> u64 {
        self.base_offset
            .saturating_add(u64::from(self.record_count))
    }
}

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The buffer is shorter than the header (or the length) requires.
    #[error("batch truncated: needs {needed} bytes, only {available} available")]
    Truncated { needed: usize, available: usize },
    /// The batch is in a format version this code does not know.
    #[error("unsupported batch format version {0}, expected {MAGIC}")]
    BadMagic(u8),
    /// `batch_length + 12` is not the length of the buffer.
    #[error("batch length field says {declared} bytes but the buffer holds {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    /// The bytes were corrupted after the producer wrote them.
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    /// The bytes are well framed but break a format rule.
    #[error("malformed batch: {0}")]
    Malformed(&'static str),
    /// The batch is bigger than the caller (or the format) allows.
    #[error("batch of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
}

/// Reads the fixed header of `batch`, without checking the length or CRC.
///
/// Fails if `batch` is shorter than [`HEADER_LEN`] or the magic byte is not
/// [`MAGIC`]. Use [`validate`] before trusting any field.
pub fn read_header(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let Some(mut b) = batch.get(..HEADER_LEN) else {
        return Err(BatchError::Truncated {
            needed: HEADER_LEN,
            available: batch.len(),
        });
    };
    // `b` holds exactly HEADER_LEN bytes, so none of these reads can run out.
    let header = BatchHeader {
        base_offset: b.get_u64_le(),
        batch_length: b.get_u32_le(),
        magic: b.get_u8(),
        crc: b.get_u32_le(),
        attributes: b.get_u16_le(),
        last_offset_delta: b.get_u32_le(),
        first_timestamp: b.get_i64_le(),
        max_timestamp: b.get_i64_le(),
        producer_id: b.get_i64_le(),
        producer_epoch: b.get_i16_le(),
        base_sequence: b.get_i32_le(),
        record_count: b.get_u32_le(),
    };
    if header.magic != MAGIC {
        return Err(BatchError::BadMagic(header.magic));
    }
    Ok(header)
}

/// Writes every header field into `dst` in wire order, the mirror of
/// [`read_header`]; the reserved word is written as 0.
///
/// # Panics
///
/// If `dst` is shorter than [`HEADER_LEN`].
fn write_header(mut dst: &mut [u8], h: &BatchHeader) {
    dst.put_u64_le(h.base_offset);
    dst.put_u32_le(h.batch_length);
    dst.put_u8(h.magic);
    dst.put_u32_le(h.crc);
    dst.put_u16_le(h.attributes);
    dst.put_u32_le(h.last_offset_delta);
    dst.put_i64_le(h.first_timestamp);
    dst.put_i64_le(h.max_timestamp);
    dst.put_i64_le(h.producer_id);
    dst.put_i16_le(h.producer_epoch);
    dst.put_i32_le(h.base_sequence);
    dst.put_u32_le(h.record_count);
    dst.put_u32_le(0); // reserved
}

/// Writes `base_offset` into bytes 0..8 of a batch.
///
/// The base offset is outside the CRC, so a batch stays valid after
/// stamping.
///
/// # Panics
///
/// If `buf` is shorter than 8 bytes. Callers [`validate`] the batch first.
pub fn stamp_base_offset(buf: &mut [u8], base_offset: u64) {
    buf[..8].copy_from_slice(&base_offset.to_le_bytes());
}

/// A copy of `batch` with another producer epoch, CRC recomputed. A
/// producer does this when it moves a partition to a new epoch after giving
/// up on a batch, so the batches still queued behind it are accepted
/// without waiting for the one that will never come. Only the header's
/// epoch field and the CRC change: the records are not re-encoded.
pub fn with_producer_epoch(batch: &[u8], epoch: i16) -> Result<bytes::Bytes, BatchError> {
    read_header(batch)?;
    let mut buf = bytes::BytesMut::from(batch);
    buf[EPOCH_AT..EPOCH_AT + 2].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&buf[CRC_FROM..]);
    buf[CRC_AT..CRC_FROM].copy_from_slice(&crc.to_le_bytes());
    Ok(buf.freeze())
}

/// Where the producer epoch sits in the header.
const EPOCH_AT: usize = 47;
