//! The checker on synthetic runs: each kind of anomaly is reported, once.

use std::time::{Duration, Instant};

use bytes::Bytes;
use covet_cluster_tests::checker::{
    analyse, compare_replicas, parse_value, recovery_time, value_for, Ack, AckTiming, Contiguity,
    Findings, Logs, Report, Stored,
};

fn stored(offset: u64, value: Bytes) -> Stored {
    Stored { offset, value }
}

fn ack(partition: u32, offset: u64, value: Bytes) -> Ack {
    Ack {
        partition,
        offset,
        value,
    }
}

/// Producer 0 wrote seq 0..4 to partition 0 and producer 1 seq 0..3 to
/// partition 1, interleaved with nothing; everything acknowledged.
fn clean_run() -> (Vec<Ack>, Logs) {
    let mut logs = Logs::new();
    let mut acks = Vec::new();
    for (partition, producer, count) in [(0u32, 0u32, 4u64), (1, 1, 3)] {
        let recs: Vec<Stored> = (0..count)
            .map(|seq| stored(seq, value_for(producer, seq)))
            .collect();
        acks.extend(
            recs.iter()
                .map(|r| ack(partition, r.offset, r.value.clone())),
        );
        logs.insert(partition, recs);
    }
    (acks, logs)
}

#[test]
fn values_round_trip() {
    assert_eq!(&value_for(7, 42)[..], b"p7-0000000042");
    assert_eq!(parse_value(&value_for(7, 42)), Some((7, 42)));
    assert_eq!(parse_value(b"hello"), None);
    assert_eq!(parse_value(b"px-1"), None);
}

#[test]
fn a_clean_run_has_no_findings() {
    let (acks, logs) = clean_run();
    let f = analyse(&acks, &logs, &logs);
    assert_eq!(
        f,
        Findings {
            acked: 7,
            records: 7,
            ..Findings::default()
        }
    );
}

#[test]
fn a_lost_record_is_reported() {
    let (acks, mut logs) = clean_run();
    // The log ends before the last acknowledged offset of partition 0.
    logs.get_mut(&0).expect("partition 0").pop();
    let f = analyse(&acks, &logs, &Logs::new());
    assert_eq!((f.lost, f.duplicated, f.out_of_order), (1, 0, 0));
}

#[test]
fn a_record_at_another_offset_than_acknowledged_is_lost() {
    let (mut acks, logs) = clean_run();
    acks[1].offset = 3;
    let f = analyse(&acks, &logs, &Logs::new());
    assert_eq!(f.lost, 1);
}

#[test]
fn a_duplicate_is_reported() {
    let (acks, mut logs) = clean_run();
    // A retry stored p0-1 again, in another partition.
    logs.get_mut(&1)
        .expect("partition 1")
        .push(stored(3, value_for(0, 1)));
    let f = analyse(&acks, &logs, &Logs::new());
    assert_eq!((f.lost, f.duplicated, f.out_of_order), (0, 1, 0));
}

#[test]
fn a_reorder_is_reported() {
    let (mut acks, mut logs) = clean_run();
    // Producer 0's seq 1 and 2 swapped places in partition 0.
    let p0 = logs.get_mut(&0).expect("partition 0");
    p0[1].value = value_for(0, 2);
    p0[2].value = value_for(0, 1);
    for a in &mut acks {
        if a.partition == 0 && (a.offset == 1 || a.offset == 2) {
            a.value = p0[a.offset as usize].value.clone();
        }
    }
    let f = analyse(&acks, &logs, &Logs::new());
    assert_eq!((f.lost, f.duplicated, f.out_of_order), (0, 0, 1));
}

#[test]
fn lost_duplicate_and_reorder_together_are_each_counted() {
    let (acks, mut logs) = clean_run();
    let p0 = logs.get_mut(&0).expect("partition 0");
    // Offset 3 (p0-3) lost: overwritten by a duplicate of p0-0, which is
    // also out of order (seq 0 after seq 2).
    p0[3].value = value_for(0, 0);
    let f = analyse(&acks, &logs, &Logs::new());
    assert_eq!(f.lost, 1);
    assert_eq!(f.duplicated, 1);
    assert_eq!(f.out_of_order, 1);
}

#[test]
fn other_producers_do_not_count_as_reorders() {
    let mut logs = Logs::new();
    logs.insert(
        0,
        vec![
            stored(0, value_for(1, 5)),
            stored(1, value_for(2, 0)),
            stored(2, value_for(1, 6)),
            stored(3, value_for(2, 1)),
        ],
    );
    assert_eq!(analyse(&[], &logs, &Logs::new()).out_of_order, 0);
}

#[test]
fn a_consumer_seeing_what_the_log_does_not_hold_is_reported() {
    let (acks, logs) = clean_run();
    let mut consumed = logs.clone();
    consumed
        .get_mut(&1)
        .expect("partition 1")
        .push(stored(9, value_for(1, 9)));
    consumed.get_mut(&0).expect("partition 0")[0].value = Bytes::from_static(b"other");
    let f = analyse(&acks, &logs, &consumed);
    assert_eq!(f.consumer_mismatches, 2);
    assert_eq!(f.lost, 0);
}

#[test]
fn recovery_waits_for_every_partition() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let fault = at(1_000);
    let acks = vec![
        // Sent before the fault: does not count even if acked after.
        AckTiming {
            partition: 1,
            sent: at(900),
            acked: at(1_100),
        },
        AckTiming {
            partition: 0,
            sent: at(1_010),
            acked: at(1_050),
        },
        AckTiming {
            partition: 1,
            sent: at(1_200),
            acked: at(2_500),
        },
        AckTiming {
            partition: 1,
            sent: at(1_300),
            acked: at(2_600),
        },
    ];
    assert_eq!(
        recovery_time(fault, 2, &acks),
        Some(Duration::from_millis(1_500))
    );
    assert_eq!(
        recovery_time(fault, 3, &acks),
        None,
        "partition 2 never recovered"
    );
}

#[test]
fn replicas_are_compared_element_by_element() {
    let a = vec![1, 2, 3];
    assert_eq!(compare_replicas(&[(1, a.clone()), (2, a.clone())]), Ok(()));
    let diff = compare_replicas(&[(1, a.clone()), (2, vec![1, 9, 3]), (3, a.clone())])
        .expect_err("node 2 differs");
    assert!(
        diff.contains("node 2") && diff.contains("position 1"),
        "{diff}"
    );
    let short = compare_replicas(&[(1, a.clone()), (3, vec![1, 2])]).expect_err("shorter");
    assert!(short.contains("position 2"), "{short}");
    assert_eq!(compare_replicas::<u64, u8>(&[]), Ok(()));
}

#[test]
fn consumers_must_see_contiguous_offsets() {
    let mut c = Contiguity::default();
    c.expect(0);
    for o in 0..5 {
        c.saw(o);
    }
    // A reopened stream must continue at 5, not where it says it starts.
    c.expect(9);
    c.saw(5);
    assert_eq!((c.gaps, c.repeats), (0, 0));
    c.saw(7);
    assert_eq!((c.gaps, c.repeats), (1, 0));
    c.saw(7);
    c.saw(3);
    assert_eq!((c.gaps, c.repeats), (1, 2));
    assert_eq!(c.first.as_deref(), Some("gap: offset 7 where 6 was due"));
    // After a gap the consumer goes on from the highest offset seen.
    c.saw(8);
    assert_eq!((c.gaps, c.repeats), (1, 2));

    let mut late = Contiguity::default();
    late.expect(0);
    late.saw(1);
    assert_eq!(
        late.gaps, 1,
        "the first record must be the one the stream opened at"
    );
}

#[test]
fn a_report_names_every_problem() {
    let clean = Report {
        acked: 10,
        replicas_identical: true,
        recoveries: vec![Some(Duration::from_millis(800))],
        ..Report::default()
    };
    assert!(clean.problems().is_empty(), "{:?}", clean.problems());
    let bad = Report {
        lost: 1,
        duplicated: 2,
        out_of_order: 3,
        replicas_identical: false,
        recoveries: vec![None],
        ..clean.clone()
    };
    assert_eq!(bad.problems().len(), 5, "{:?}", bad.problems());
    let worse = Report {
        consumer_gaps: 1,
        consumer_repeats: 1,
        unresolved: 2,
        crashes: vec!["node 1: signal 6".into()],
        panics: vec!["node 2: thread 'x' panicked at src/a.rs:1:1".into()],
        ..clean.clone()
    };
    let problems = worse.problems();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("unresolved")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("panicked at")),
        "{problems:?}"
    );
    let caught = std::panic::catch_unwind(|| worse.assert_clean());
    assert!(caught.is_err(), "assert_clean passed a run with problems");
    clean.assert_clean();
    let line = bad.to_json().to_string();
    assert!(!line.contains('\n'));
    assert!(line.contains("\"lost\":1"), "{line}");
}
