//! The checker: what a run's acknowledgements, consumed records and final
//! logs say about safety. Everything here is a pure function of recorded
//! data, so it is tested with synthetic runs (`tests/checker.rs`).
//!
//! Definitions (per topic):
//! - **lost**: an acknowledged value not found at its acknowledged
//!   (partition, offset) in the final log;
//! - **duplicated**: for every value stored more than once anywhere in the
//!   topic, the number of extra copies;
//! - **out of order**: within a partition, in offset order, a record whose
//!   producer sequence number is lower than one of the same producer's
//!   earlier records (an equal number is a duplicate and counted there, so
//!   each anomaly is counted once);
//! - **consumer mismatches**: a record a consumer was given that the final
//!   log does not hold at that offset (it saw uncommitted or divergent
//!   data);
//! - **consumer gaps / repeats**: a consumer following a partition was
//!   handed an offset past the one it expected next (records skipped) or
//!   before it (records delivered twice) — see [`Contiguity`];
//! - **fault to first produce**: after a fault, the time until every
//!   partition has acknowledged a record *sent* after the fault (so an
//!   untouched partition acknowledging at once does not hide a stalled one).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

/// One acknowledged record: where the broker said it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
    pub value: Bytes,
}

/// When one acknowledged record was sent and acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTiming {
    pub partition: u32,
    pub sent: Instant,
    pub acked: Instant,
}

/// One record as read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub offset: u64,
    pub value: Bytes,
}

/// Records per partition, each list in the order read (offset order).
pub type Logs = BTreeMap<u32, Vec<Stored>>;

/// The value producer `producer` sends as its `seq`-th record.
pub fn value_for(producer: u32, seq: u64) -> Bytes {
    Bytes::from(format!("p{producer}-{seq:010}"))
}

/// The (producer, sequence) of a value made by [`value_for`].
pub fn parse_value(value: &[u8]) -> Option<(u32, u64)> {
    let text = std::str::from_utf8(value).ok()?;
    let (producer, seq) = text.strip_prefix('p')?.split_once('-')?;
    Some((producer.parse().ok()?, seq.parse().ok()?))
}

/// Counts found in one run; see the module docs for each definition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub consumer_mismatches: u64,
    /// Records in the final logs.
    pub records: u64,
}

/// Checks acknowledgements and consumed records against the final logs.
pub fn analyse(acks: &[Ack], logs: &Logs, consumed: &Logs) -> Findings {
    let at: HashMap<(u32, u64), &Bytes> = logs
        .iter()
        .flat_map(|(&p, recs)| recs.iter().map(move |r| ((p, r.offset), &r.value)))
        .collect();
    let lost = acks
        .iter()
        .filter(|a| at.get(&(a.partition, a.offset)) != Some(&&a.value))
        .count() as u64;
    let consumer_mismatches = consumed
        .iter()
        .flat_map(|(&p, recs)| recs.iter().map(move |r| (p, r)))
        .filter(|(p, r)| at.get(&(*p, r.offset)) != Some(&&r.value))
        .count() as u64;
    let mut copies: HashMap<&Bytes, u64> = HashMap::new();
    for recs in logs.values() {
        for r in recs {
            *copies.entry(&r.value).or_default() += 1;
        }
    }
    Findings {
        acked: acks.len() as u64,
        lost,
        duplicated: copies.values().map(|n| n - 1).sum(),
        out_of_order: logs.values().map(|recs| out_of_order(recs)).sum(),
        consumer_mismatches,
        records: logs.values().map(|r| r.len() as u64).sum(),
    }
}

/// Records of one partition whose producer sequence is below an earlier
/// one of the same producer (in offset order).
fn out_of_order(records: &[Stored]) -> u64 {
    let mut sorted: Vec<&Stored> = records.iter().collect();
    sorted.sort_by_key(|r| r.offset);
    let mut highest: HashMap<u32, u64> = HashMap::new();
    let mut count = 0;
    for r in sorted {
        let Some((producer, seq)) = parse_value(&r.value) else {
            continue;
        };
        match highest.get_mut(&producer) {
            Some(h) if seq < *h => count += 1,
            Some(h) => *h = seq,
            None => {
                highest.insert(producer, seq);
            }
        }
    }
    count
}

/// After a fault at `fault`, how long until every partition in
/// `0..partitions` acknowledged a record sent at or after it; `None` if
/// some partition never did.
pub fn recovery_time(fault: Instant, partitions: u32, acks: &[AckTiming]) -> Option<Duration> {
    (0..partitions)
        .map(|p| {
            acks.iter()
                .filter(|a| a.partition == p && a.sent >= fault)
                .map(|a| a.acked)
                .min()
        })
        .collect::<Option<Vec<Instant>>>()?
        .into_iter()
        .max()
        .map(|t| t.saturating_duration_since(fault))
}

/// Checks that one consumer's offsets follow each other with no gap or
/// repeat, across batches and stream reopenings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contiguity {
    expected: Option<u64>,
    pub gaps: u64,
    pub repeats: u64,
    /// The first anomaly, for the report.
    pub first: Option<String>,
}

impl Contiguity {
    /// Starts expecting `offset` next (where a stream was opened); keeps
    /// the current expectation if there is one, so a reopened stream must
    /// continue where the last one stopped.
    pub fn expect(&mut self, offset: u64) {
        self.expected.get_or_insert(offset);
    }

    /// Notes one record handed to the consumer.
    pub fn saw(&mut self, offset: u64) {
        let expected = *self.expected.get_or_insert(offset);
        if offset != expected {
            let what = if offset > expected { "gap" } else { "repeat" };
            if offset > expected {
                self.gaps += 1;
            } else {
                self.repeats += 1;
            }
            self.first
                .get_or_insert_with(|| format!("{what}: offset {offset} where {expected} was due"));
        }
        // After a gap, go on from the record seen; after a repeat, still
        // expect the one that was due.
        self.expected = Some(if offset >= expected {
            offset + 1
        } else {
            expected
        });
    }
}

/// Compares replicas' logs: `Ok` if all equal, else which replica first
/// differs from the first one, and where.
pub fn compare_replicas<K: std::fmt::Display, T: PartialEq>(
    replicas: &[(K, Vec<T>)],
) -> Result<(), String> {
    let Some((first, reference)) = replicas.first() else {
        return Ok(());
    };
    for (node, log) in &replicas[1..] {
        if log == reference {
            continue;
        }
        let at = log
            .iter()
            .zip(reference)
            .position(|(a, b)| a != b)
            .unwrap_or(log.len().min(reference.len()));
        return Err(format!(
            "node {node} differs from node {first} at position {at} ({} vs {} records)",
            log.len(),
            reference.len()
        ));
    }
    Ok(())
}

/// The result of one scenario. The first six fields are the required
/// ones; the rest say how the run went.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub replicas_identical: bool,
    /// The slowest recovery over the run's faults; see the module docs.
    pub fault_to_first_produce: Option<Duration>,
    pub scenario: String,
    /// Records handed to the producers.
    pub sent: u64,
    /// Sends that failed: maybe stored, maybe not, never acknowledged.
    pub failed: u64,
    /// Sends with no answer by the end of the run.
    pub unresolved: u64,
    pub records: u64,
    pub consumed: u64,
    pub consumer_mismatches: u64,
    /// Offsets consumers were handed past (gap) or before (repeat) the one
    /// due next, and the first such anomaly per partition.
    pub consumer_gaps: u64,
    pub consumer_repeats: u64,
    pub consumer_anomalies: Vec<String>,
    /// Recovery time after each fault, in order.
    pub recoveries: Vec<Option<Duration>>,
    /// How replicas were compared (`reads` or `disk`) and what was found.
    pub replica_check: String,
    pub replica_detail: Vec<String>,
    /// Nodes that exited on their own.
    pub crashes: Vec<String>,
    /// `panicked at` lines found in any node's log.
    pub panics: Vec<String>,
    pub elapsed: Duration,
}

impl Report {
    /// Fills the counts from [`Findings`].
    pub fn with_findings(mut self, f: &Findings) -> Report {
        self.acked = f.acked;
        self.lost = f.lost;
        self.duplicated = f.duplicated;
        self.out_of_order = f.out_of_order;
        self.records = f.records;
        self.consumer_mismatches = f.consumer_mismatches;
        self
    }

    /// The report as one JSON object (durations in milliseconds).
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: &Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "scenario": self.scenario,
            "acked": self.acked,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "replicas_identical": self.replicas_identical,
            "fault_to_first_produce_ms": ms(&self.fault_to_first_produce),
            "sent": self.sent,
            "failed": self.failed,
            "unresolved": self.unresolved,
            "records": self.records,
            "consumed": self.consumed,
            "consumer_mismatches": self.consumer_mismatches,
            "consumer_gaps": self.consumer_gaps,
            "consumer_repeats": self.consumer_repeats,
            "consumer_anomalies": self.consumer_anomalies,
            "recoveries_ms": self.recoveries.iter().map(ms).collect::<Vec<_>>(),
            "replica_check": self.replica_check,
            "replica_detail": self.replica_detail,
            "crashes": self.crashes,
            "panics": self.panics,
            "elapsed_ms": self.elapsed.as_millis() as u64,
        })
    }

    /// What every scenario requires and this run broke; empty when clean:
    /// something was acknowledged; nothing lost, duplicated or out of
    /// order; replicas identical; consumers saw only committed records,
    /// contiguously; every send answered; a produce succeeded after every
    /// fault; no node crashed or panicked.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |bad: bool, what: String| {
            if bad {
                p.push(what);
            }
        };
        check(self.acked == 0, "nothing was acknowledged".into());
        check(self.lost > 0, format!("lost = {}", self.lost));
        check(
            self.duplicated > 0,
            format!("duplicated = {}", self.duplicated),
        );
        check(
            self.out_of_order > 0,
            format!("out of order = {}", self.out_of_order),
        );
        check(!self.replicas_identical, "replicas differ".into());
        check(
            self.consumer_mismatches > 0,
            format!("consumer mismatches = {}", self.consumer_mismatches),
        );
        check(
            self.consumer_gaps > 0 || self.consumer_repeats > 0,
            format!(
                "consumers saw {} gaps and {} repeats: {:?}",
                self.consumer_gaps, self.consumer_repeats, self.consumer_anomalies
            ),
        );
        check(
            self.unresolved > 0,
            format!("{} sends never answered (unresolved)", self.unresolved),
        );
        check(
            self.recoveries.iter().any(Option::is_none),
            "no produce succeeded after some fault".into(),
        );
        check(
            !self.crashes.is_empty(),
            format!("crashes: {:?}", self.crashes),
        );
        check(
            !self.panics.is_empty(),
            format!("panics in node logs: {:?}", self.panics),
        );
        p
    }

    /// Panics, naming every problem and printing the report, unless the run
    /// is clean (see [`Report::problems`]).
    pub fn assert_clean(&self) {
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "scenario {}: {}\n{}",
            self.scenario,
            problems.join("; "),
            self.to_json()
        );
    }

    /// Prints the report as one JSON line, then [`Report::assert_clean`].
    pub fn print_and_assert(&self) {
        println!("{}", self.to_json());
        self.assert_clean();
    }
}
