//! Validating and decoding batches.
//!
//! Both go through one walk over the records ([`walk_records`]), so what
//! [`validate`] accepts is exactly what [`decode_records`] can decode. The
//! walk reports each record to a [`Sink`]: validation's sink does nothing
//! and allocates nothing, decoding's sink collects slices of the batch.
//!
//! [`BatchRecords`] is the lazy form for readers: it checks the frame (the
//! CRC included) up front, then decodes one record per call with the same
//! per-record step the walk uses, and makes the walk's end-of-batch checks
//! after the last record. A consumer pays for a record only when it takes
//! it, and allocates nothing per batch.

use bytes::Bytes;

use super::varint::Reader;
use super::{read_header, BatchError, BatchHeader, Header, StoredRecord, CRC_FROM, HEADER_LEN};

/// The smallest encoded record: a one-byte length, then attributes,
/// timestamp delta, offset delta, key length, value length and header count
/// of one byte each.
const MIN_RECORD_LEN: usize = 7;

/// The smallest encoded header: two one-byte lengths.
const MIN_HEADER_LEN: usize = 2;

/// Fully checks one batch occupying the whole of `batch`: header, length,
/// magic, CRC, and the bounds and rules of every record (see the
/// [module docs](super)). Allocates nothing. Returns the header.
pub fn validate(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = check_frame(batch)?;
    walk_records(batch, &header, &mut NoSink)?;
    Ok(header)
}

/// [`validate`], refusing first, before reading anything, a batch longer
/// than `limit` bytes with [`BatchError::TooLarge`].
pub fn validate_with_limit(batch: &[u8], limit: usize) -> Result<BatchHeader, BatchError> {
    if batch.len() > limit {
        return Err(BatchError::TooLarge {
            size: batch.len(),
            limit,
        });
    }
    validate(batch)
}

/// Validates `batch` as [`validate`] does (CRC included) and returns its
/// records, whose keys and values are slices of `batch`.
///
/// Safe on arbitrary bytes: fails with the same error as [`validate`]
/// instead of panicking, and allocates in proportion to `batch.len()`, not
/// to the counts it declares.
pub fn decode_records(batch: &Bytes) -> Result<Vec<StoredRecord>, BatchError> {
    let header = check_frame(batch)?;
    // Bound the untrusted count by what the bytes could possibly hold.
    let fit = (batch.len() - HEADER_LEN) / MIN_RECORD_LEN;
    let mut sink = Collect {
        batch,
        records: Vec::with_capacity(fit.min(header.record_count as usize)),
    };
    walk_records(batch, &header, &mut sink)?;
    Ok(sink.records)
}

/// Checks everything but the records: header, length, CRC and the header
/// fields' rules. The CRC comes before the field rules so that corruption
/// is reported as corruption.
fn check_frame(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = read_header(batch)?;
    if header.total_len() != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: header.total_len(),
            actual: batch.len(),
        });
    }
    let computed = crc32c::crc32c(&batch[CRC_FROM..]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    if batch[HEADER_LEN - 4..HEADER_LEN] != [0; 4] {
        return Err(BatchError::Malformed("reserved header bytes are not zero"));
    }
    if header.record_count == 0 {
        return Err(BatchError::Malformed("batch has no records"));
    }
    if header.last_offset_delta != header.record_count - 1 {
        return Err(BatchError::Malformed(
            "last_offset_delta is not record_count - 1",
        ));
    }
    // Makes `base_offset + index` safe for every record.
    if header
        .base_offset
        .checked_add(u64::from(header.record_count))
        .is_none()
    {
        return Err(BatchError::Malformed("record offsets overflow u64"));
    }
    Ok(header)
}

/// One decoded record, minus its headers, which follow through
/// [`Sink::header`].
struct RecordParts<'a> {
    offset: u64,
    timestamp_ms: i64,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    /// The declared header count, bounded by the bytes left in the record.
    header_capacity: usize,
}

/// Receives the records of a batch as they are walked: `record` once per
/// record, then `header` once per header of that record.
trait Sink<'a> {
    fn record(&mut self, parts: RecordParts<'a>);
    fn header(&mut self, key: &'a str, value: &'a [u8]);
}

/// Validation: look, keep nothing.
struct NoSink;

impl<'a> Sink<'a> for NoSink {
    fn record(&mut self, _: RecordParts<'a>) {}
    fn header(&mut self, _: &'a str, _: &'a [u8]) {}
}

/// Decoding: turn the walked slices into [`Bytes`] sharing the batch.
struct Collect<'b> {
    batch: &'b Bytes,
    records: Vec<StoredRecord>,
}

impl<'a> Sink<'a> for Collect<'_> {
    fn record(&mut self, parts: RecordParts<'a>) {
        // `slice_ref` works because every slice the walk hands out was cut
        // from `self.batch` itself.
        self.records.push(StoredRecord {
            offset: parts.offset,
            timestamp_ms: parts.timestamp_ms,
            key: parts.key.map(|k| self.batch.slice_ref(k)),
            value: self.batch.slice_ref(parts.value),
            headers: Vec::with_capacity(parts.header_capacity),
        });
    }

    fn header(&mut self, key: &'a str, value: &'a [u8]) {
        if let Some(record) = self.records.last_mut() {
            record.headers.push(Header {
                key: key.to_owned(),
                value: self.batch.slice_ref(value),
            });
        }
    }
}

/// Decoding one record at a time: like [`Collect`], for [`BatchRecords`].
struct One<'b> {
    batch: &'b Bytes,
    record: Option<StoredRecord>,
}

impl<'a> Sink<'a> for One<'_> {
    fn record(&mut self, parts: RecordParts<'a>) {
        self.record = Some(StoredRecord {
            offset: parts.offset,
            timestamp_ms: parts.timestamp_ms,
            key: parts.key.map(|k| self.batch.slice_ref(k)),
            value: self.batch.slice_ref(parts.value),
            headers: Vec::with_capacity(parts.header_capacity),
        });
    }

    fn header(&mut self, key: &'a str, value: &'a [u8]) {
        if let Some(record) = &mut self.record {
            record.headers.push(Header {
                key: key.to_owned(),
                value: self.batch.slice_ref(value),
            });
        }
    }
}

/// The records of one batch, decoded one per [`Iterator::next`]: the lazy
/// form of [`decode_records`], for readers that hand records out one by
/// one.
///
/// [`BatchRecords::new`] checks everything but the records (length, magic,
/// CRC, header rules), so corruption in transit is refused before any
/// record is handed out. Each record is then checked as it is decoded, and
/// the end-of-batch rules (no trailing bytes, truthful `max_timestamp`)
/// after the last: a batch that breaks a record rule yields the records
/// before the fault, then one `Err`, then nothing. Safe on arbitrary bytes
/// as [`decode_records`] is.
#[derive(Debug, Clone)]
pub struct BatchRecords {
    batch: Bytes,
    header: BatchHeader,
    /// Byte position of the next record in `batch`.
    at: usize,
    /// Index of the next record; `record_count` once all were read.
    index: u32,
    max_timestamp: i64,
    /// Set after the end checks or an error: the iterator is fused.
    done: bool,
}

impl BatchRecords {
    /// Checks the frame of `batch` (see the type's docs) and positions
    /// before its first record.
    pub fn new(batch: Bytes) -> Result<BatchRecords, BatchError> {
        let header = check_frame(&batch)?;
        Ok(BatchRecords {
            batch,
            header,
            at: HEADER_LEN,
            index: 0,
            max_timestamp: i64::MIN,
            done: false,
        })
    }

    /// The batch's header, checked by [`BatchRecords::new`].
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// Records not yet handed out.
    pub fn remaining(&self) -> u32 {
        self.header.record_count - self.index
    }

    /// The record at `index`, or the end checks once every record was read.
    fn step(&mut self) -> Result<Option<StoredRecord>, BatchError> {
        let mut rest = Reader::new(self.batch.get(self.at..).unwrap_or_default());
        if self.index == self.header.record_count {
            check_end(&rest, &self.header, self.max_timestamp)?;
            return Ok(None);
        }
        let before = rest.remaining();
        let mut one = One {
            batch: &self.batch,
            record: None,
        };
        let timestamp = next_record(&mut rest, &self.header, self.index, &mut one)?;
        self.at += before - rest.remaining();
        self.index += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp);
        // `read_record` reports every record it returns Ok for.
        one.record
            .map(Some)
            .ok_or(BatchError::Malformed("record was not decoded"))
    }
}

impl Iterator for BatchRecords {
    type Item = Result<StoredRecord, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Walks the `record_count` records after a checked header, passing each to
/// `sink`, and checks that they fill the batch exactly and that
/// `max_timestamp` is truthful.
fn walk_records<'a>(
    batch: &'a [u8],
    header: &BatchHeader,
    sink: &mut impl Sink<'a>,
) -> Result<(), BatchError> {
    // check_frame guarantees a whole header; should it ever not have, the
    // walk fails on the missing records instead of panicking here.
    let mut rest = Reader::new(batch.get(HEADER_LEN..).unwrap_or_default());
    let mut max_timestamp = i64::MIN;
    // Each pass consumes at least MIN_RECORD_LEN bytes or fails, so a huge
    // declared count on a short batch ends quickly.
    for index in 0..header.record_count {
        let timestamp = next_record(&mut rest, header, index, sink)?;
        max_timestamp = max_timestamp.max(timestamp);
    }
    check_end(&rest, header, max_timestamp)
}

/// Reads the length-prefixed record at `index` from the front of `rest`,
/// passing it to `sink`, and returns its timestamp.
fn next_record<'a>(
    rest: &mut Reader<'a>,
    header: &BatchHeader,
    index: u32,
    sink: &mut impl Sink<'a>,
) -> Result<i64, BatchError> {
    if rest.is_empty() {
        return Err(BatchError::Malformed("fewer records than record_count"));
    }
    let len = rest.len()?;
    let body = rest
        .bytes(len)
        .map_err(|_| BatchError::Malformed("record runs past the end of the batch"))?;
    read_record(Reader::new(body), header, index, sink)
}

/// The checks after the last record: nothing follows it, and the header's
/// `max_timestamp` is the records' largest.
fn check_end(
    rest: &Reader<'_>,
    header: &BatchHeader,
    max_timestamp: i64,
) -> Result<(), BatchError> {
    if !rest.is_empty() {
        return Err(BatchError::Malformed("bytes after the last record"));
    }
    if max_timestamp != header.max_timestamp {
        return Err(BatchError::Malformed(
            "max_timestamp is not the records' largest",
        ));
    }
    Ok(())
}

/// Reads the record at `index` from its body and returns its timestamp.
fn read_record<'a>(
    mut body: Reader<'a>,
    header: &BatchHeader,
    index: u32,
    sink: &mut impl Sink<'a>,
) -> Result<i64, BatchError> {
    let _attributes = body.u8()?; // reserved: no record attributes yet
    let timestamp_ms = header
        .first_timestamp
        .checked_add(body.zigzag64()?)
        .ok_or(BatchError::Malformed("record timestamp overflows i64"))?;
    if body.uvarint32()? != index {
        return Err(BatchError::Malformed(
            "record offset delta is not its index",
        ));
    }
    let key = match body.zigzag64()? {
        -1 => None,
        n => {
            let n =
                usize::try_from(n).map_err(|_| BatchError::Malformed("key length is below -1"))?;
            Some(body.bytes(n)?)
        }
    };
    let value_len = body.len()?;
    let value = body.bytes(value_len)?;
    let header_count = body.len()?;
    sink.record(RecordParts {
        // check_frame made sure base_offset + record_count fits.
        offset: header.base_offset + u64::from(index),
        timestamp_ms,
        key,
        value,
        header_capacity: header_count.min(body.remaining() / MIN_HEADER_LEN),
    });
    read_headers(&mut body, header_count, sink)?;
    if !body.is_empty() {
        return Err(BatchError::Malformed(
            "bytes after the last field of a record",
        ));
    }
    Ok(timestamp_ms)
}

/// Reads `count` record headers. Each consumes at least
/// [`MIN_HEADER_LEN`] bytes or fails, which bounds the loop.
fn read_headers<'a>(
    body: &mut Reader<'a>,
    count: usize,
    sink: &mut impl Sink<'a>,
) -> Result<(), BatchError> {
    for _ in 0..count {
        let key_len = body.len()?;
        let key = std::str::from_utf8(body.bytes(key_len)?)
            .map_err(|_| BatchError::Malformed("header key is not UTF-8"))?;
        let value_len = body.len()?;
        sink.header(key, body.bytes(value_len)?);
    }
    Ok(())
}
