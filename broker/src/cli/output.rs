//! Printing records and tables.

use base64::Engine as _;
use covet_client::{ConsumedRecord, TopicInfo};
use serde_json::{json, Value};

/// Bytes as JSON: text where valid UTF-8, else base64; the second value
/// names which.
fn bytes_json(b: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(b) {
        Ok(s) => (Value::String(s.to_string()), "utf8"),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            "base64",
        ),
    }
}

/// One record as a JSON line.
pub fn record_json(r: &ConsumedRecord) -> String {
    let (value, value_encoding) = bytes_json(&r.value);
    let (key, key_encoding) = match &r.key {
        Some(k) => {
            let (v, e) = bytes_json(k);
            (v, Value::String(e.into()))
        }
        None => (Value::Null, Value::Null),
    };
    let headers: Vec<Value> = r
        .headers
        .iter()
        .map(|h| {
            let (v, e) = bytes_json(&h.value);
            json!({ "key": h.key, "value": v, "value_encoding": e })
        })
        .collect();
    json!({
        "topic": &*r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp_ms,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
        "headers": headers,
    })
    .to_string()
}

pub fn topic_json(t: &TopicInfo) -> Value {
    let config = t.config.unwrap_or_default();
    let partitions: Vec<Value> = t
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "leader": p.leader,
                "replicas": p.replicas,
                "start_offset": p.start_offset,
                "high_watermark": p.high_watermark,
            })
        })
        .collect();
    json!({
        "name": t.name,
        "partitions": partitions,
        "replication_factor": config.replication_factor,
        "retention_ms": config.retention_ms,
        "retention_bytes": config.retention_bytes,
        "max_batch_bytes": config.max_batch_bytes,
    })
}

/// Prints rows as an aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// "unlimited" for a zero limit.
pub fn limit(v: u64) -> String {
    if v == 0 {
        "unlimited".into()
    } else {
        v.to_string()
    }
}
