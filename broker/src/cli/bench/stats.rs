//! Latency figures: an HdrHistogram of nanoseconds, reported as
//! microsecond percentiles in the benchmarks' JSON line.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// The longest latency recorded exactly; longer ones are clamped to it
/// (a benchmark run is bounded far below this).
const MAX_NANOS: u64 = 600_000_000_000;

/// Latencies of one run, with three significant digits.
pub struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    pub fn new() -> Latency {
        // Bounds and precision are constants within hdrhistogram's limits,
        // so construction cannot fail.
        let hist = Histogram::new_with_bounds(1, MAX_NANOS, 3)
            .expect("histogram bounds 1 ns..600 s with 3 digits are valid");
        Latency { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos())
            .unwrap_or(MAX_NANOS)
            .clamp(1, MAX_NANOS);
        self.hist.saturating_record(nanos);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// `{"p50": µs, "p90", "p99", "p999", "max"}`, or `null` with no sample.
    pub fn to_json(&self) -> Value {
        if self.hist.is_empty() {
            return Value::Null;
        }
        let us = |nanos: u64| (nanos as f64 / 1000.0 * 10.0).round() / 10.0;
        json!({
            "p50": us(self.hist.value_at_quantile(0.50)),
            "p90": us(self.hist.value_at_quantile(0.90)),
            "p99": us(self.hist.value_at_quantile(0.99)),
            "p999": us(self.hist.value_at_quantile(0.999)),
            "max": us(self.hist.max()),
        })
    }
}

/// Records per second and MB per second over `elapsed`.
pub fn rates(records: u64, record_size: usize, elapsed: Duration) -> (f64, f64) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let per_sec = records as f64 / secs;
    (per_sec, per_sec * record_size as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut l = Latency::new();
        for i in 1..=1000u64 {
            l.record(Duration::from_micros(i));
        }
        let v = l.to_json();
        let p50 = v["p50"].as_f64().unwrap_or_default();
        let max = v["max"].as_f64().unwrap_or_default();
        assert!((499.0..=501.0).contains(&p50), "p50 {p50}");
        assert!((999.0..=1001.0).contains(&max), "max {max}");
        assert_eq!(l.count(), 1000);
    }

    #[test]
    fn no_sample_is_null_and_huge_values_clamp() {
        let mut l = Latency::new();
        assert!(l.to_json().is_null());
        l.record(Duration::from_secs(100_000));
        assert_eq!(l.count(), 1);
    }
}
