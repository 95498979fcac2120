//! Building batches: records are encoded once, as they are pushed, into the
//! buffer that becomes the batch; `build` only fills in the header and CRC.

use bytes::{BufMut, Bytes, BytesMut};

use super::varint::{put_uvarint, uvarint_len, zigzag};
use super::{
    write_header, BatchError, BatchHeader, Record, CRC_AT, CRC_FROM, HEADER_LEN, LENGTH_PREFIX_LEN,
    MAGIC, MAX_BATCH_LEN, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
};

/// The `key_len` written for a null key.
const NULL_KEY_LEN: i64 = -1;

/// Builds one batch from records pushed in order.
///
/// Wire format: the batch layout in the [module docs](super), with
/// `base_offset` 0 (the broker stamps it), `attributes` 0, the first pushed
/// record's timestamp as `first_timestamp` and the largest as
/// `max_timestamp`.
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    first_timestamp: i64,
    max_timestamp: i64,
    record_count: u32,
    /// [`HEADER_LEN`] bytes kept free for the header, then the encoded
    /// records, so that `build` does not copy them.
    buf: BytesMut,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    /// A builder for a batch without an idempotent producer.
    pub fn new() -> Self {
        Self::with_producer(NO_PRODUCER_ID, NO_PRODUCER_EPOCH, NO_SEQUENCE)
    }

    /// A builder for a batch from an idempotent producer; `base_sequence` is
    /// the sequence number of the first record.
    pub fn with_producer(producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        Self {
            producer_id,
            producer_epoch,
            base_sequence,
            first_timestamp: 0,
            max_timestamp: 0,
            record_count: 0,
            buf: BytesMut::zeroed(HEADER_LEN),
        }
    }

    /// Appends `record`.
    ///
    /// # Panics
    ///
    /// Where [`try_push`](Self::try_push) would return an error: when the
    /// batch would exceed [`MAX_BATCH_LEN`], or the record's timestamp is
    /// so far from the first record's that the difference overflows `i64`.
    pub fn push(&mut self, record: &Record) {
        if let Err(e) = self.try_push(record) {
            panic!("cannot add record to batch: {e}");
        }
    }

    /// Appends `record`, or leaves the builder unchanged and fails with
    /// [`BatchError::TooLarge`] if the batch would exceed [`MAX_BATCH_LEN`],
    /// or with [`BatchError::Malformed`] if the record's timestamp minus the
    /// first record's overflows `i64`.
    pub fn try_push(&mut self, record: &Record) -> Result<(), BatchError> {
        let delta = self
            .timestamp_delta(record.timestamp_ms)
            .ok_or(BatchError::Malformed(
                "record timestamp too far from the first record's",
            ))?;
        let body_len = body_len(record, delta, self.record_count);
        let size = self.buf.len().saturating_add(framed_len(body_len));
        if size > MAX_BATCH_LEN {
            return Err(BatchError::TooLarge {
                size,
                limit: MAX_BATCH_LEN,
            });
        }
        if self.is_empty() {
            self.first_timestamp = record.timestamp_ms;
            self.max_timestamp = record.timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(record.timestamp_ms);
        put_uvarint(&mut self.buf, body_len as u64);
        let body_start = self.buf.len();
        write_body(&mut self.buf, record, delta, self.record_count);
        debug_assert_eq!(self.buf.len() - body_start, body_len);
        // Cannot overflow: every record takes several bytes, and the size
        // check above keeps the batch under 4 GiB.
        self.record_count += 1;
        Ok(())
    }

    /// Records pushed so far.
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// True if no record has been pushed.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// The exact length of the batch if it were built now (for an empty
    /// builder, [`HEADER_LEN`], although `build` would return `None`).
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// The exact length of the batch if `record` were pushed now, so that a
    /// producer can stay under a byte limit. Meaningless if pushing `record`
    /// would fail.
    pub fn encoded_len_with(&self, record: &Record) -> usize {
        // On overflow push fails anyway; any size will do.
        let delta = self.timestamp_delta(record.timestamp_ms).unwrap_or(0);
        let body_len = body_len(record, delta, self.record_count);
        self.buf.len().saturating_add(framed_len(body_len))
    }

    /// The delta a record with timestamp `ts` would carry, `None` if it
    /// overflows. The first record defines `first_timestamp`, so its is 0.
    fn timestamp_delta(&self, ts: i64) -> Option<i64> {
        if self.is_empty() {
            Some(0)
        } else {
            ts.checked_sub(self.first_timestamp)
        }
    }

    /// Fills in the header and CRC and returns the batch, with base offset
    /// 0; `None` if no record was pushed, since a batch holds at least one.
    pub fn build(self) -> Option<Bytes> {
        let last_offset_delta = self.record_count.checked_sub(1)?;
        let mut buf = self.buf;
        let batch_length = u32::try_from(buf.len() - LENGTH_PREFIX_LEN)
            .expect("try_push keeps the batch within MAX_BATCH_LEN");
        let header = BatchHeader {
            base_offset: 0,
            batch_length,
            magic: MAGIC,
            crc: 0, // computed below, once the rest of the header is in place
            attributes: 0,
            last_offset_delta,
            first_timestamp: self.first_timestamp,
            max_timestamp: self.max_timestamp,
            producer_id: self.producer_id,
            producer_epoch: self.producer_epoch,
            base_sequence: self.base_sequence,
            record_count: self.record_count,
        };
        write_header(&mut buf[..HEADER_LEN], &header);
        let crc = crc32c::crc32c(&buf[CRC_FROM..]);
        buf[CRC_AT..CRC_FROM].copy_from_slice(&crc.to_le_bytes());
        Some(buf.freeze())
    }
}

/// Encodes `records` into one batch without a producer id; `None` if
/// `records` is empty.
///
/// # Panics
///
/// As [`BatchBuilder::push`].
pub fn encode(records: &[Record]) -> Option<Bytes> {
    let mut builder = BatchBuilder::new();
    for record in records {
        builder.push(record);
    }
    builder.build()
}

/// A record's length prefix plus its body.
fn framed_len(body_len: usize) -> usize {
    uvarint_len(body_len as u64).saturating_add(body_len)
}

/// Length of a record's body; must agree with [`write_body`] byte for byte.
/// Saturates rather than overflows, so absurd sizes fail the batch limit.
fn body_len(record: &Record, timestamp_delta: i64, offset_delta: u32) -> usize {
    let key = match &record.key {
        None => uvarint_len(zigzag(NULL_KEY_LEN)),
        Some(k) => uvarint_len(zigzag(k.len() as i64)).saturating_add(k.len()),
    };
    let headers = record.headers.iter().fold(0usize, |sum, h| {
        sum.saturating_add(bytes_len(h.key.as_bytes()))
            .saturating_add(bytes_len(&h.value))
    });
    [
        1, // attributes
        uvarint_len(zigzag(timestamp_delta)),
        uvarint_len(u64::from(offset_delta)),
        key,
        bytes_len(&record.value),
        uvarint_len(record.headers.len() as u64),
        headers,
    ]
    .into_iter()
    .fold(0, usize::saturating_add)
}

/// A varint length followed by the bytes.
fn bytes_len(b: &[u8]) -> usize {
    uvarint_len(b.len() as u64).saturating_add(b.len())
}

/// Writes a record's body (without its length prefix).
fn write_body(buf: &mut BytesMut, record: &Record, timestamp_delta: i64, offset_delta: u32) {
    buf.put_u8(0); // attributes
    put_uvarint(buf, zigzag(timestamp_delta));
    put_uvarint(buf, u64::from(offset_delta));
    match &record.key {
        None => put_uvarint(buf, zigzag(NULL_KEY_LEN)),
        Some(k) => {
            put_uvarint(buf, zigzag(k.len() as i64));
            buf.put_slice(k);
        }
    }
    put_bytes(buf, &record.value);
    put_uvarint(buf, record.headers.len() as u64);
    for h in &record.headers {
        put_bytes(buf, h.key.as_bytes());
        put_bytes(buf, &h.value);
    }
}

/// Writes a varint length followed by the bytes.
fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    put_uvarint(buf, b.len() as u64);
    buf.put_slice(b);
}
