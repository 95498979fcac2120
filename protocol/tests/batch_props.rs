//! Property tests for the record-batch format: arbitrary records round-trip,
//! every truncation fails, and no input (random, or a valid batch mutated
//! and resealed so the mutation gets past the CRC) makes decoding panic.

use bytes::Bytes;
use covet_protocol::batch::{
    decode_records, read_header, stamp_base_offset, validate, BatchBuilder, BatchError,
    BatchHeader, BatchRecords, Header, Record, StoredRecord,
};
use proptest::prelude::*;

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_header() -> impl Strategy<Value = Header> {
    let key = proptest::collection::vec(any::<char>(), 0..6).prop_map(String::from_iter);
    (key, arb_bytes(12)).prop_map(|(key, value)| Header { key, value })
}

/// Timestamps spread over ±30 000 years around the epoch, so deltas are
/// often negative and large but never overflow.
fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::option::of(arb_bytes(20)),
        arb_bytes(200),
        proptest::collection::vec(arb_header(), 0..4),
        -1_000_000_000_000_000i64..1_000_000_000_000_000,
    )
        .prop_map(|(key, value, headers, timestamp_ms)| Record {
            key,
            value,
            headers,
            timestamp_ms,
        })
}

fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    proptest::collection::vec(arb_record(), 1..12)
}

fn build(records: &[Record]) -> Bytes {
    let mut builder = BatchBuilder::with_producer(42, 3, 1000);
    for r in records {
        builder.push(r);
    }
    builder.build().expect("at least one record")
}

fn same_record(got: &StoredRecord, want: &Record) -> bool {
    got.timestamp_ms == want.timestamp_ms
        && got.key == want.key
        && got.value == want.value
        && got.headers == want.headers
}

/// Runs every entry point on `bytes`; they must agree and must not panic.
/// Anything that decodes must survive re-encoding unchanged.
fn check_consistent(bytes: &[u8]) {
    let _ = read_header(bytes);
    let validated = validate(bytes);
    let decoded = decode_records(&Bytes::copy_from_slice(bytes));
    assert_eq!(
        validated.as_ref().map(|_| ()),
        decoded.as_ref().map(|_| ()),
        "validate and decode_records disagree"
    );
    check_lazy(bytes, &validated, &decoded);
    if let Ok(records) = decoded {
        let again: Vec<Record> = records
            .iter()
            .map(|r| Record {
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r.headers.clone(),
                timestamp_ms: r.timestamp_ms,
            })
            .collect();
        // Decoded timestamps may be too far apart for one builder's deltas
        // (the decoded batch's first delta need not be 0); skip those.
        let mut builder = BatchBuilder::new();
        if again.iter().all(|r| builder.try_push(r).is_ok()) {
            let batch = builder.build().expect("at least one record");
            let rebuilt = decode_records(&batch).expect("re-encoded batch is valid");
            assert_eq!(rebuilt.len(), again.len());
            assert!(rebuilt.iter().zip(&again).all(|(g, w)| same_record(g, w)));
        }
    }
}

/// [`BatchRecords`] on `bytes` yields what `decode_records` decoded; on a
/// batch that `validate` refuses, the records before the fault and then
/// `validate`'s error, and nothing after it.
fn check_lazy(
    bytes: &[u8],
    validated: &Result<BatchHeader, BatchError>,
    decoded: &Result<Vec<StoredRecord>, BatchError>,
) {
    let (records, error) = match BatchRecords::new(Bytes::copy_from_slice(bytes)) {
        Err(e) => (Vec::new(), Some(e)),
        Ok(mut lazy) => {
            let mut records = Vec::new();
            let mut error = None;
            for item in lazy.by_ref() {
                match item {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            assert!(lazy.next().is_none(), "BatchRecords is not fused");
            (records, error)
        }
    };
    assert_eq!(
        error.as_ref(),
        validated.as_ref().err(),
        "lazy error differs"
    );
    if let Ok(all) = decoded {
        assert_eq!(&records, all, "lazy records differ");
    }
}

/// Sets `batch_length` to the buffer's length (when it has room for the
/// field) and recomputes the CRC (when there is a header).
fn reseal(buf: &mut [u8]) {
    if buf.len() >= 12 {
        let len = u32::try_from(buf.len() - 12).unwrap_or(u32::MAX);
        buf[8..12].copy_from_slice(&len.to_le_bytes());
    }
    if buf.len() >= 17 {
        let crc = crc32c::crc32c(&buf[17..]);
        buf[13..17].copy_from_slice(&crc.to_le_bytes());
    }
}

/// One edit to a batch: overwrite, insert or remove a byte at a position
/// given as a fraction of the length, so it lands anywhere.
#[derive(Debug, Clone)]
enum Edit {
    Set(f64, u8),
    Insert(f64, u8),
    Remove(f64),
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0.0..1.0, any::<u8>()).prop_map(|(at, b)| Edit::Set(at, b)),
        (0.0..1.0, any::<u8>()).prop_map(|(at, b)| Edit::Insert(at, b)),
        (0.0..1.0).prop_map(Edit::Remove),
    ]
}

fn apply(buf: &mut Vec<u8>, edit: &Edit) {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    match *edit {
        Edit::Set(f, b) if !buf.is_empty() => {
            let i = at(f, buf.len());
            buf[i] = b;
        }
        Edit::Insert(f, b) => {
            let i = at(f, buf.len() + 1);
            buf.insert(i, b);
        }
        Edit::Remove(f) if !buf.is_empty() => {
            let i = at(f, buf.len());
            buf.remove(i);
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn records_round_trip(records in arb_records(), base in 0..u64::MAX / 2) {
        let mut buf = build(&records).to_vec();
        stamp_base_offset(&mut buf, base);
        let header = validate(&buf).expect("built batches are valid");
        let max = records.iter().map(|r| r.timestamp_ms).max();
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!(header.first_timestamp, records[0].timestamp_ms);
        prop_assert_eq!(Some(header.max_timestamp), max);
        prop_assert_eq!(
            (header.producer_id, header.producer_epoch, header.base_sequence),
            (42, 3, 1000)
        );
        prop_assert_eq!(header.next_offset(), base + records.len() as u64);

        let decoded = decode_records(&Bytes::from(buf)).expect("valid");
        prop_assert_eq!(decoded.len(), records.len());
        for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
            prop_assert_eq!(got.offset, base + i as u64);
            prop_assert!(same_record(got, want), "record {} differs", i);
        }
    }

    #[test]
    fn encoded_len_predicts_every_push(records in arb_records()) {
        let mut builder = BatchBuilder::new();
        for r in &records {
            let predicted = builder.encoded_len_with(r);
            builder.push(r);
            prop_assert_eq!(builder.encoded_len(), predicted);
        }
        let expected = builder.encoded_len();
        prop_assert_eq!(builder.build().map(|b| b.len()), Some(expected));
    }

    #[test]
    fn every_truncation_fails(records in arb_records()) {
        let batch = build(&records);
        for n in 0..batch.len() {
            prop_assert!(validate(&batch[..n]).is_err(), "prefix of {} accepted", n);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_consistent(&bytes);
        let mut resealed = bytes;
        reseal(&mut resealed);
        check_consistent(&resealed);
    }

    #[test]
    fn mutated_batches_never_panic(
        records in arb_records(),
        edits in proptest::collection::vec(arb_edit(), 1..6),
        resealed in any::<bool>(),
    ) {
        let mut buf = build(&records).to_vec();
        for e in &edits {
            apply(&mut buf, e);
        }
        if resealed {
            reseal(&mut buf);
        }
        check_consistent(&buf);
    }

    #[test]
    fn corruption_after_the_header_prefix_is_detected(
        records in arb_records(),
        at in 0.0..1.0f64,
        bit in 0..8u8,
    ) {
        let mut buf = build(&records).to_vec();
        let i = 17 + ((at * (buf.len() - 17) as f64) as usize).min(buf.len() - 18);
        buf[i] ^= 1 << bit;
        prop_assert!(
            matches!(validate(&buf), Err(BatchError::CrcMismatch { .. })),
            "flip at byte {} bit {} not caught", i, bit
        );
    }
}
