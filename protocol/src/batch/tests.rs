//! Unit tests for the batch format: the exact bytes, round trips, and one
//! test per validation rule. Property tests live in `tests/batch_props.rs`.

use bytes::Bytes;

use super::*;

fn record(key: Option<&str>, value: &str, headers: &[(&str, &str)], ts: i64) -> Record {
    Record {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Bytes::copy_from_slice(value.as_bytes()),
        headers: headers
            .iter()
            .map(|(k, v)| Header {
                key: (*k).to_owned(),
                value: Bytes::copy_from_slice(v.as_bytes()),
            })
            .collect(),
        timestamp_ms: ts,
    }
}

/// The two records of [`KNOWN_BATCH`]: the second has a null key, an empty
/// value and a timestamp 2 ms before the first.
fn known_records() -> Vec<Record> {
    vec![
        record(Some("k"), "v1", &[("h", "x")], 1000),
        record(None, "", &[], 998),
    ]
}

/// `known_records()` from producer (7, 2, 5), written out by hand from the
/// format table.
#[rustfmt::skip]
const KNOWN_BATCH: [u8; 82] = [
    0, 0, 0, 0, 0, 0, 0, 0,             // base_offset 0
    70, 0, 0, 0,                        // batch_length 82 - 12
    1,                                  // magic
    0x40, 0x41, 0x9e, 0xd1,             // crc 0xd19e4140
    0, 0,                               // attributes
    1, 0, 0, 0,                         // last_offset_delta
    0xe8, 0x03, 0, 0, 0, 0, 0, 0,       // first_timestamp 1000
    0xe8, 0x03, 0, 0, 0, 0, 0, 0,       // max_timestamp 1000
    7, 0, 0, 0, 0, 0, 0, 0,             // producer_id 7
    2, 0,                               // producer_epoch 2
    5, 0, 0, 0,                         // base_sequence 5
    2, 0, 0, 0,                         // record_count 2
    0, 0, 0, 0,                         // reserved
    // record 0
    13,                                 // length
    0,                                  // attributes
    0,                                  // timestamp delta 0
    0,                                  // offset delta 0
    2, b'k',                            // key_len zigzag(1), key
    2, b'v', b'1',                      // value_len, value
    1,                                  // header_count
    1, b'h', 1, b'x',                   // header "h" = "x"
    // record 1
    6,                                  // length
    0,                                  // attributes
    3,                                  // timestamp delta zigzag(-2)
    1,                                  // offset delta 1
    1,                                  // key_len zigzag(-1): null
    0,                                  // value_len 0
    0,                                  // header_count 0
];

fn known_batch() -> Bytes {
    let mut builder = BatchBuilder::with_producer(7, 2, 5);
    for r in &known_records() {
        builder.push(r);
    }
    builder.build().expect("two records")
}

/// Recomputes the CRC after a test has edited a batch, so that the edit
/// reaches the record rules instead of stopping at the CRC.
fn reseal(batch: &mut [u8]) {
    let crc = crc32c::crc32c(&batch[CRC_FROM..]);
    batch[CRC_AT..CRC_FROM].copy_from_slice(&crc.to_le_bytes());
}

/// Sets `batch_length` to match the buffer and reseals.
fn reframe(batch: &mut [u8]) {
    let len = (batch.len() - LENGTH_PREFIX_LEN) as u32;
    batch[8..12].copy_from_slice(&len.to_le_bytes());
    reseal(batch);
}

fn malformed(batch: &[u8]) -> &'static str {
    match validate(batch) {
        Err(BatchError::Malformed(why)) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn exact_bytes() {
    assert_eq!(crc32c::crc32c(&KNOWN_BATCH[CRC_FROM..]), 0xd19e_4140);
    assert_eq!(&known_batch()[..], &KNOWN_BATCH[..]);
}

#[test]
fn header_fields() {
    let h = validate(&KNOWN_BATCH).expect("valid");
    let expected = BatchHeader {
        base_offset: 0,
        batch_length: 70,
        magic: MAGIC,
        crc: 0xd19e_4140,
        attributes: 0,
        last_offset_delta: 1,
        first_timestamp: 1000,
        max_timestamp: 1000,
        producer_id: 7,
        producer_epoch: 2,
        base_sequence: 5,
        record_count: 2,
    };
    assert_eq!(h, expected);
    assert_eq!(read_header(&KNOWN_BATCH), Ok(expected));
    assert_eq!(h.total_len(), 82);
    assert_eq!(h.last_offset(), 1);
    assert_eq!(h.next_offset(), 2);
}

#[test]
fn round_trip_with_stamped_offset() {
    let mut buf = known_batch().to_vec();
    stamp_base_offset(&mut buf, 100);
    let h = validate(&buf).expect("stamping keeps the batch valid");
    assert_eq!(
        (h.base_offset, h.last_offset(), h.next_offset()),
        (100, 101, 102)
    );
    let decoded = decode_records(&Bytes::from(buf)).expect("valid");
    let offsets: Vec<u64> = decoded.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [100, 101]);
    for (got, want) in decoded.iter().zip(known_records()) {
        assert_eq!(got.timestamp_ms, want.timestamp_ms);
        assert_eq!(got.key, want.key);
        assert_eq!(got.value, want.value);
        assert_eq!(got.headers, want.headers);
    }
}

#[test]
fn decoded_values_share_the_batch() {
    let batch = known_batch();
    let records = decode_records(&batch).expect("valid");
    let range = batch.as_ptr_range();
    let value = &records[0].value;
    assert!(range.contains(&value.as_ptr()), "value was copied");
}

#[test]
fn new_builder_has_no_producer() {
    let batch = encode(&known_records()).expect("records");
    let h = validate(&batch).expect("valid");
    assert_eq!(h.producer_id, NO_PRODUCER_ID);
    assert_eq!(h.producer_epoch, NO_PRODUCER_EPOCH);
    assert_eq!(h.base_sequence, NO_SEQUENCE);
    assert_eq!(h.first_timestamp, 1000);
    assert_eq!(h.max_timestamp, 1000);
}

#[test]
fn every_truncated_prefix_fails() {
    for n in 0..KNOWN_BATCH.len() {
        let prefix = &KNOWN_BATCH[..n];
        assert!(validate(prefix).is_err(), "prefix of {n} bytes accepted");
        assert!(decode_records(&Bytes::copy_from_slice(prefix)).is_err());
    }
    assert!(matches!(
        read_header(&KNOWN_BATCH[..HEADER_LEN - 1]),
        Err(BatchError::Truncated {
            needed: HEADER_LEN,
            available: 60
        })
    ));
}

#[test]
fn every_flipped_bit_is_caught() {
    for byte in 8..KNOWN_BATCH.len() {
        for bit in 0..8 {
            let mut buf = KNOWN_BATCH;
            buf[byte] ^= 1 << bit;
            let err = validate(&buf).expect_err("corruption accepted");
            if byte >= CRC_FROM {
                assert!(
                    matches!(err, BatchError::CrcMismatch { .. }),
                    "{byte}.{bit}: {err}"
                );
            }
        }
    }
}

#[test]
fn base_offset_is_outside_the_crc() {
    for base in [1, 0x0102_0304_0506_0708, u64::MAX - 2] {
        let mut buf = KNOWN_BATCH;
        stamp_base_offset(&mut buf, base);
        assert_eq!(validate(&buf).map(|h| h.base_offset), Ok(base));
    }
}

#[test]
fn base_offset_overflow_is_malformed() {
    let mut buf = KNOWN_BATCH;
    stamp_base_offset(&mut buf, u64::MAX - 1);
    assert_eq!(malformed(&buf), "record offsets overflow u64");
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut buf = KNOWN_BATCH.to_vec();
    buf.push(0);
    assert_eq!(
        validate(&buf),
        Err(BatchError::LengthMismatch {
            declared: 82,
            actual: 83
        })
    );
    reframe(&mut buf);
    assert_eq!(malformed(&buf), "bytes after the last record");
}

#[test]
fn zero_records_are_rejected() {
    let mut buf = KNOWN_BATCH[..HEADER_LEN].to_vec();
    buf[19..23].copy_from_slice(&0u32.to_le_bytes()); // last_offset_delta
    buf[53..57].copy_from_slice(&0u32.to_le_bytes()); // record_count
    reframe(&mut buf);
    assert_eq!(malformed(&buf), "batch has no records");
    assert!(BatchBuilder::new().build().is_none());
    assert!(encode(&[]).is_none());
}

#[test]
fn header_rules() {
    let mut buf = KNOWN_BATCH;
    buf[12] = 2;
    assert_eq!(validate(&buf), Err(BatchError::BadMagic(2)));

    let mut buf = KNOWN_BATCH;
    buf[60] = 1;
    reseal(&mut buf);
    assert_eq!(malformed(&buf), "reserved header bytes are not zero");

    let mut buf = KNOWN_BATCH;
    buf[19] = 0; // last_offset_delta 0 with two records
    reseal(&mut buf);
    assert_eq!(malformed(&buf), "last_offset_delta is not record_count - 1");

    let mut buf = KNOWN_BATCH;
    buf[31] = 0xe9; // max_timestamp 1001
    reseal(&mut buf);
    assert_eq!(malformed(&buf), "max_timestamp is not the records' largest");

    let mut buf = KNOWN_BATCH;
    buf[17] = 0x80; // unknown attribute bits are kept, not refused
    reseal(&mut buf);
    assert_eq!(validate(&buf).map(|h| h.attributes), Ok(0x80));
}

#[test]
fn record_count_must_match_the_records() {
    for (count, why) in [
        (1u32, "bytes after the last record"),
        (3, "fewer records than record_count"),
    ] {
        let mut buf = KNOWN_BATCH;
        buf[19..23].copy_from_slice(&(count - 1).to_le_bytes());
        buf[53..57].copy_from_slice(&count.to_le_bytes());
        reseal(&mut buf);
        assert_eq!(malformed(&buf), why, "record_count {count}");
    }
}

/// Offsets of fields in KNOWN_BATCH's records.
const REC0: usize = HEADER_LEN;
const REC1: usize = HEADER_LEN + 14;

#[test]
fn record_rules() {
    let cases: [(usize, u8, &str); 7] = [
        (REC1 + 3, 2, "record offset delta is not its index"),
        (REC1 + 4, 3, "key length is below -1"),
        (REC1 + 5, 2, "length runs past the end of its record"),
        (REC1 + 6, 1, "field runs past the end of its record"),
        (REC0 + 11, 0xff, "header key is not UTF-8"), // header key "h"
        (REC0, 14, "bytes after the last field of a record"), // body too long
        (REC1, 5, "field runs past the end of its record"), // body too short
    ];
    for (at, byte, why) in cases {
        let mut buf = KNOWN_BATCH;
        buf[at] = byte;
        reseal(&mut buf);
        assert_eq!(malformed(&buf), why, "byte {at} = {byte}");
    }
}

#[test]
fn body_must_be_consumed_exactly() {
    // Record 1's body grows by a byte its fields do not account for.
    let mut buf = KNOWN_BATCH.to_vec();
    buf[REC1] = 7;
    buf.push(0);
    reframe(&mut buf);
    assert_eq!(malformed(&buf), "bytes after the last field of a record");
}

#[test]
fn overlong_varints_are_rejected() {
    // Record 1's header_count 0 written as two bytes, 0x80 0x00.
    let mut buf = KNOWN_BATCH.to_vec();
    buf[REC1] = 7;
    buf[REC1 + 6] = 0x80;
    buf.push(0);
    reframe(&mut buf);
    assert_eq!(malformed(&buf), "varint is not minimally encoded");
}

#[test]
fn timestamp_overflow_is_malformed() {
    let mut buf = KNOWN_BATCH;
    buf[23..31].copy_from_slice(&i64::MIN.to_le_bytes()); // first_timestamp
    reseal(&mut buf);
    assert_eq!(malformed(&buf), "record timestamp overflows i64");
}

#[test]
fn arbitrary_timestamps_within_range() {
    let records = [
        record(None, "a", &[], 0),
        record(None, "b", &[], i64::MAX),
        record(None, "c", &[], i64::MIN + 1),
    ];
    let mut builder = BatchBuilder::new();
    builder.push(&records[0]);
    builder.push(&records[1]);
    assert!(matches!(builder.try_push(&records[2]), Ok(())));
    let mut far = BatchBuilder::new();
    far.push(&record(None, "a", &[], i64::MIN));
    assert!(far.try_push(&record(None, "b", &[], 1)).is_err());
    assert_eq!(far.record_count(), 1, "a failed push changes nothing");

    let batch = builder.build().expect("records");
    let h = validate(&batch).expect("valid");
    assert_eq!((h.first_timestamp, h.max_timestamp), (0, i64::MAX));
    let ts: Vec<i64> = decode_records(&batch)
        .expect("valid")
        .iter()
        .map(|r| r.timestamp_ms)
        .collect();
    assert_eq!(ts, [0, i64::MAX, i64::MIN + 1]);
}

#[test]
fn encoded_len_is_exact() {
    // Sizes around the varint boundaries at 128 and 16384.
    let sizes = [0, 1, 100, 127, 128, 16_383, 16_384, 20_000];
    let mut builder = BatchBuilder::new();
    assert_eq!(builder.encoded_len(), HEADER_LEN);
    assert!(builder.is_empty());
    for (i, &n) in sizes.iter().enumerate() {
        let mut r = record(
            Some("key"),
            &"v".repeat(n),
            &[("h", &"x".repeat(n / 2))],
            -(i as i64) * 1000,
        );
        if i % 2 == 0 {
            r.key = None;
        }
        let predicted = builder.encoded_len_with(&r);
        builder.push(&r);
        assert_eq!(builder.encoded_len(), predicted, "record {i} of {n} bytes");
    }
    assert_eq!(builder.record_count(), sizes.len() as u32);
    let expected = builder.encoded_len();
    let batch = builder.build().expect("records");
    assert_eq!(batch.len(), expected);
    assert_eq!(validate(&batch).map(|h| h.total_len()), Ok(expected));
}

#[test]
fn limit_is_checked_first() {
    assert_eq!(
        validate_with_limit(&KNOWN_BATCH, 81),
        Err(BatchError::TooLarge {
            size: 82,
            limit: 81
        })
    );
    assert!(validate_with_limit(&KNOWN_BATCH, 82).is_ok());
}

#[test]
fn errors_read_as_one_line() {
    let errors = [
        BatchError::Truncated {
            needed: 61,
            available: 3,
        },
        BatchError::BadMagic(9),
        BatchError::LengthMismatch {
            declared: 100,
            actual: 90,
        },
        BatchError::CrcMismatch {
            stored: 1,
            computed: 2,
        },
        BatchError::Malformed("batch has no records"),
        BatchError::TooLarge { size: 10, limit: 5 },
    ];
    for e in errors {
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains('\n'), "{text}");
    }
}

#[test]
fn a_new_producer_epoch_keeps_the_batch_valid_and_its_records() {
    let mut b = BatchBuilder::with_producer(9, 0, 40);
    b.push(&Record {
        value: bytes::Bytes::from_static(b"x"),
        timestamp_ms: 5,
        ..Default::default()
    });
    let batch = b.build().unwrap();
    let bumped = with_producer_epoch(&batch, 3).unwrap();
    let h = validate(&bumped).unwrap();
    assert_eq!(
        (h.producer_id, h.producer_epoch, h.base_sequence),
        (9, 3, 40)
    );
    assert_eq!(
        decode_records(&bumped).unwrap(),
        decode_records(&batch).unwrap()
    );
    assert!(with_producer_epoch(b"short", 1).is_err());
}

/// Runs a batch through [`BatchRecords`]: the records it yields before its
/// error (if any), and the error. It must be fused after either.
fn lazily(buf: &[u8]) -> (Vec<StoredRecord>, Option<BatchError>) {
    let mut records = match BatchRecords::new(Bytes::copy_from_slice(buf)) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut ok = Vec::new();
    let mut err = None;
    for item in records.by_ref() {
        match item {
            Ok(r) => {
                assert!(err.is_none(), "a record after an error");
                ok.push(r);
            }
            Err(e) => {
                assert!(err.is_none(), "two errors");
                err = Some(e);
            }
        }
    }
    assert!(records.next().is_none(), "not fused");
    (ok, err)
}

#[test]
fn lazy_records_are_the_decoded_records() {
    let mut buf = KNOWN_BATCH;
    stamp_base_offset(&mut buf, 40);
    let batch = Bytes::copy_from_slice(&buf);
    let mut lazy = BatchRecords::new(batch.clone()).expect("valid");
    assert_eq!(lazy.header(), &validate(&buf).expect("valid"));
    assert_eq!(lazy.remaining(), 2);
    let first = lazy.next().expect("one").expect("valid");
    assert_eq!(lazy.remaining(), 1);
    assert_eq!((first.offset, &first.value[..]), (40, &b"v1"[..]));
    assert_eq!(lazily(&buf), (decode_records(&batch).expect("valid"), None));
}

#[test]
fn lazy_records_refuse_a_bad_frame_before_any_record() {
    for n in 0..KNOWN_BATCH.len() {
        let err = BatchRecords::new(Bytes::copy_from_slice(&KNOWN_BATCH[..n])).err();
        assert_eq!(
            err,
            validate(&KNOWN_BATCH[..n]).err(),
            "prefix of {n} bytes"
        );
    }
    for byte in CRC_FROM..KNOWN_BATCH.len() {
        let mut buf = KNOWN_BATCH;
        buf[byte] ^= 1;
        assert!(matches!(
            BatchRecords::new(Bytes::copy_from_slice(&buf)),
            Err(BatchError::CrcMismatch { .. })
        ));
    }
}

#[test]
fn lazy_records_stop_at_the_first_broken_rule() {
    // (byte, new value, records yielded before the error)
    let cases: [(usize, u8, usize); 7] = [
        (REC1 + 3, 2, 1),
        (REC1 + 4, 3, 1),
        (REC1 + 6, 1, 1),
        (REC0 + 11, 0xff, 0),
        (REC0, 14, 0),
        (REC1, 5, 1),
        (31, 0xe9, 2), // max_timestamp 1001: found after the last record
    ];
    for (at, byte, before) in cases {
        let mut buf = KNOWN_BATCH;
        buf[at] = byte;
        reseal(&mut buf);
        let (ok, err) = lazily(&buf);
        assert_eq!(ok.len(), before, "byte {at} = {byte}");
        assert_eq!(err, validate(&buf).err(), "byte {at} = {byte}");
    }
    let mut buf = KNOWN_BATCH.to_vec();
    buf.push(0);
    reframe(&mut buf);
    let (ok, err) = lazily(&buf);
    assert_eq!(ok.len(), 2);
    assert_eq!(
        err,
        Some(BatchError::Malformed("bytes after the last record"))
    );
}
