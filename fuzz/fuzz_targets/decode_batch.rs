//! Feeds arbitrary bytes to the batch decoder. Besides "never panics", it
//! checks that `validate` and `decode_records` agree, that a decoded batch's
//! offsets are consecutive, and that its records survive re-encoding.
//!
//! Random bytes rarely carry a correct CRC, so when the input is long enough
//! to hold a header the target also tries it with `batch_length` and the CRC
//! patched in, letting the fuzzer reach the record rules.

#![no_main]

use bytes::Bytes;
use covet_protocol::batch::{decode_records, read_header, validate, BatchBuilder, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 17 {
        let mut sealed = data.to_vec();
        let len = u32::try_from(sealed.len() - 12).unwrap_or(u32::MAX);
        sealed[8..12].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&sealed[17..]);
        sealed[13..17].copy_from_slice(&crc.to_le_bytes());
        check(&sealed);
    }
});

fn check(data: &[u8]) {
    let _ = read_header(data);
    let validated = validate(data);
    let decoded = decode_records(&Bytes::copy_from_slice(data));
    assert_eq!(validated.as_ref().err(), decoded.as_ref().err());
    let (Ok(header), Ok(records)) = (validated, decoded) else {
        return;
    };
    assert_eq!(records.len(), header.record_count as usize);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, header.base_offset + i as u64);
    }
    let again: Vec<Record> = records
        .iter()
        .map(|r| Record {
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp_ms: r.timestamp_ms,
        })
        .collect();
    // Timestamps may be too far apart for one builder's deltas; skip those.
    let mut builder = BatchBuilder::new();
    if again.iter().all(|r| builder.try_push(r).is_ok()) {
        let batch = builder.build().expect("at least one record");
        let rebuilt = decode_records(&batch).expect("a built batch is valid");
        assert!(rebuilt.iter().zip(&again).all(|(g, w)| g.key == w.key
            && g.value == w.value
            && g.headers == w.headers
            && g.timestamp_ms == w.timestamp_ms));
    }
}
