//! The partition state machine, stepped by hand: no Raft, no sockets.

use bytes::{Bytes, BytesMut};
use covet_protocol::batch::{self, Record};

use super::*;
use crate::state::groups::GroupEntry;

/// A partition's sled tree and the directory of its offset index.
#[derive(Clone)]
struct Store {
    tree: sled::Tree,
    dir: std::sync::Arc<tempfile::TempDir>,
}

fn tree() -> Store {
    let db = sled::Config::new().temporary(true).open().unwrap();
    Store {
        tree: db.open_tree("p1").unwrap(),
        dir: std::sync::Arc::new(tempfile::tempdir().unwrap()),
    }
}

/// A partition state that keeps its index directory alive.
struct Held {
    state: PartitionState,
    _dir: std::sync::Arc<tempfile::TempDir>,
}

impl std::ops::Deref for Held {
    type Target = PartitionState;
    fn deref(&self) -> &PartitionState {
        &self.state
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut PartitionState {
        &mut self.state
    }
}

fn open(s: Store) -> Result<Held> {
    Ok(Held {
        state: PartitionState::open(s.tree, s.dir.path().join("offsets"))?,
        _dir: s.dir,
    })
}

fn stored(base_offset: u64, record_count: u32) -> Accepted {
    Accepted {
        base_offset,
        record_count,
        duplicate: false,
    }
}

/// A batch of `n` records stamped at `base`, all with timestamp `ts`.
fn batch_at(base: u64, n: usize, ts: i64) -> Bytes {
    produced_at(base, n, ts, None)
}

/// Like `batch_at`, from idempotent producer `(id, base sequence)`.
fn produced_at(base: u64, n: usize, ts: i64, producer: Option<(i64, i32)>) -> Bytes {
    produced_in(base, n, ts, producer, 0)
}

fn produced_in(base: u64, n: usize, ts: i64, producer: Option<(i64, i32)>, epoch: i16) -> Bytes {
    let mut b = match producer {
        Some((id, seq)) => batch::BatchBuilder::with_producer(id, epoch, seq),
        None => batch::BatchBuilder::new(),
    };
    for i in 0..n {
        b.push(&Record {
            value: Bytes::from(format!("v{i}")),
            timestamp_ms: ts,
            ..Default::default()
        });
    }
    let mut buf = BytesMut::from(&b.build().unwrap()[..]);
    batch::stamp_base_offset(&mut buf, base);
    buf.freeze()
}

#[test]
fn applies_contiguous_batches_and_rejects_a_stale_offset_without_indexing_it() {
    let mut p = open(tree()).unwrap();
    assert_eq!(p.apply_batch(1, &batch_at(0, 3, 10)).unwrap(), stored(0, 3));
    assert_eq!(p.apply_batch(2, &batch_at(3, 2, 20)).unwrap(), stored(3, 2));
    // Stamped by a leader that assumed a different tail.
    assert!(matches!(
        p.apply_batch(3, &batch_at(4, 2, 30)),
        Err(BrokerError::NotLeader { .. })
    ));
    assert_eq!(p.apply_batch(4, &batch_at(5, 1, 40)).unwrap(), stored(5, 1));
    p.flush_round().unwrap();
    assert_eq!((p.applied(), p.next_offset()), (4, 6));
    let idx = p.index();
    let found: Vec<(u64, u64)> = idx
        .batches_from(0, 10)
        .unwrap()
        .iter()
        .map(|l| (l.base_offset, l.raft_index))
        .collect();
    assert_eq!(
        found,
        vec![(0, 1), (3, 2), (5, 4)],
        "raft index 3 is never served"
    );
    assert_eq!(idx.locate(4).unwrap().map(|l| l.raft_index), Some(2));
    assert_eq!(idx.locate(6).unwrap(), None);
    assert_eq!(
        *p.subscribe().borrow(),
        Progress {
            start_offset: 0,
            high_watermark: 6
        }
    );
}

#[test]
fn reopening_from_sled_keeps_applied_state() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    p.apply_batch(7, &batch_at(0, 4, 1)).unwrap();
    p.flush_round().unwrap();
    // Only a checkpoint writes the applied state to sled.
    p.checkpoint().unwrap();
    drop(p);
    let p = open(t).unwrap();
    assert_eq!((p.applied(), p.next_offset()), (7, 4));
}

#[test]
fn time_index_finds_the_first_batch_at_or_after_a_timestamp() {
    let mut p = open(tree()).unwrap();
    for (i, ts) in [100, 200, 150, 300].into_iter().enumerate() {
        p.apply_batch(i as u64 + 1, &batch_at(i as u64 * 10, 10, ts))
            .unwrap();
    }
    p.flush_round().unwrap();
    let idx = p.index();
    assert_eq!(idx.offset_for_time(50).unwrap(), Some(0));
    assert_eq!(idx.offset_for_time(100).unwrap(), Some(0));
    assert_eq!(idx.offset_for_time(101).unwrap(), Some(10));
    // The batch at 150 does not raise the running max: 250 lands after it.
    assert_eq!(idx.offset_for_time(250).unwrap(), Some(30));
    assert_eq!(idx.offset_for_time(301).unwrap(), None);
}

#[test]
fn snapshot_and_restore_keep_offsets_and_time_seeks_of_what_remains() {
    let mut p = open(tree()).unwrap();
    for i in 0..6u64 {
        p.apply_batch(i + 1, &batch_at(i * 5, 5, 1000 * (i as i64 + 1)))
            .unwrap();
    }
    p.flush_round().unwrap();
    // Compact through raft index 3: batches at offsets 0, 5, 10 go.
    let snap = p.snapshot_at(3).unwrap();
    assert_eq!(
        (snap.start_offset, snap.next_offset, snap.applied_index),
        (15, 15, 3)
    );
    assert_eq!(
        snap.max_timestamp, 3000,
        "the running max as of index 3, not now"
    );

    // A node whose sled lost everything restores, then replays 4..=6.
    let mut q = open(tree()).unwrap();
    q.restore(&snap.encode_to_vec()).unwrap();
    assert_eq!((q.applied(), q.next_offset()), (3, 15));
    for i in 3..6u64 {
        q.apply_batch(i + 1, &batch_at(i * 5, 5, 1000 * (i as i64 + 1)))
            .unwrap();
    }
    q.flush_round().unwrap();
    assert_eq!(q.next_offset(), 30);
    assert_eq!(
        *q.subscribe().borrow(),
        Progress {
            start_offset: 15,
            high_watermark: 30
        }
    );
    let idx = q.index();
    assert_eq!(
        idx.offset_for_time(1).unwrap(),
        Some(15),
        "older times land on the start"
    );
    assert_eq!(idx.offset_for_time(4000).unwrap(), Some(15));
    assert_eq!(idx.offset_for_time(5000).unwrap(), Some(20));
    assert_eq!(idx.offset_for_time(6000).unwrap(), Some(25));
}

#[test]
fn trimming_drops_index_keys_below_the_start_and_repoints_time() {
    let mut p = open(tree()).unwrap();
    for i in 0..4u64 {
        p.apply_batch(i + 1, &batch_at(i * 10, 10, 100 * (i as i64 + 1)))
            .unwrap();
    }
    p.flush_round().unwrap();
    p.trim_to(20).unwrap();
    let idx = p.index();
    assert_eq!(idx.locate(5).unwrap(), None);
    assert_eq!(
        idx.batches_from(0, 10)
            .unwrap()
            .first()
            .map(|l| l.base_offset),
        Some(20)
    );
    assert_eq!(idx.offset_for_time(0).unwrap(), Some(20));
    assert_eq!(idx.offset_for_time(350).unwrap(), Some(30));
    assert_eq!(p.subscribe().borrow().start_offset, 20);
    // Trimming backwards is a no-op.
    p.trim_to(10).unwrap();
    assert_eq!(p.subscribe().borrow().start_offset, 20);
}

#[test]
fn idempotent_producer_retries_are_answered_with_the_original_offset_and_not_stored() {
    let mut p = open(tree()).unwrap();
    assert_eq!(
        p.apply_batch(1, &produced_at(0, 3, 1, Some((7, 0))))
            .unwrap(),
        stored(0, 3)
    );
    // The retry was stamped with a new offset by a leader that did not know.
    let retry = p
        .apply_batch(2, &produced_at(3, 3, 1, Some((7, 0))))
        .unwrap();
    assert_eq!(
        retry,
        Accepted {
            base_offset: 0,
            record_count: 3,
            duplicate: true
        }
    );
    assert_eq!(
        p.applied_duplicate(&produced_at(9, 3, 1, Some((7, 0)))),
        Some((0, 3))
    );
    // A batch ahead of its predecessor is refused, retriably.
    assert!(matches!(
        p.apply_batch(3, &produced_at(3, 2, 1, Some((7, 5)))),
        Err(BrokerError::OutOfOrderSequence {
            expected: 3,
            got: 5,
            ..
        })
    ));
    assert_eq!(
        p.apply_batch(4, &produced_at(3, 2, 1, Some((7, 3))))
            .unwrap(),
        stored(3, 2)
    );
    // Another producer has its own sequence.
    assert_eq!(
        p.apply_batch(5, &produced_at(5, 1, 1, Some((8, 0))))
            .unwrap(),
        stored(5, 1)
    );
    p.flush_round().unwrap();
    assert_eq!(p.next_offset(), 6);
    let found: Vec<u64> = p
        .index()
        .batches_from(0, 10)
        .unwrap()
        .iter()
        .map(|l| l.raft_index)
        .collect();
    assert_eq!(
        found,
        vec![1, 4, 5],
        "the duplicate and the refused batch are never served"
    );
}

#[test]
fn dedup_table_survives_reopen_and_snapshot_restore_replays_later_batches() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 0))))
        .unwrap();
    p.apply_batch(2, &produced_at(2, 2, 1, Some((7, 2))))
        .unwrap();
    p.apply_batch(3, &produced_at(4, 2, 1, Some((7, 4))))
        .unwrap();
    p.flush_round().unwrap();
    p.checkpoint().unwrap();
    drop(p);
    let p = open(t).unwrap();
    assert_eq!(
        p.applied_duplicate(&produced_at(6, 2, 1, Some((7, 2)))),
        Some((2, 2))
    );

    // A snapshot at raft index 1, restored elsewhere, then entries 2 and 3
    // replayed: both are accepted again, not taken for retries.
    let snap = p.snapshot_at(1).unwrap();
    let mut q = open(tree()).unwrap();
    q.restore(&snap.encode_to_vec()).unwrap();
    assert_eq!(
        q.apply_batch(2, &produced_at(2, 2, 1, Some((7, 2))))
            .unwrap(),
        stored(2, 2)
    );
    assert_eq!(
        q.apply_batch(3, &produced_at(4, 2, 1, Some((7, 4))))
            .unwrap(),
        stored(4, 2)
    );
    q.flush_round().unwrap();
    assert_eq!(q.next_offset(), 6);
}

#[test]
fn a_new_producer_epoch_skips_a_sequence_gap_but_never_goes_back() {
    let mut p = open(tree()).unwrap();
    p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 0))))
        .unwrap();
    // Sequences 2..4 were given up on; the same epoch cannot skip them.
    assert!(matches!(
        p.apply_batch(2, &produced_at(2, 2, 1, Some((7, 4)))),
        Err(BrokerError::OutOfOrderSequence { .. })
    ));
    assert_eq!(
        p.apply_batch(3, &produced_in(2, 2, 1, Some((7, 4)), 1))
            .unwrap(),
        stored(2, 2)
    );
    // The old epoch is behind now, and so is anything before sequence 6.
    assert!(p
        .apply_batch(4, &produced_in(4, 1, 1, Some((7, 6)), 0))
        .is_err());
    assert!(p
        .apply_batch(5, &produced_in(4, 1, 1, Some((7, 5)), 2))
        .is_err());
    assert_eq!(
        p.apply_batch(6, &produced_in(4, 1, 1, Some((7, 6)), 1))
            .unwrap(),
        stored(4, 1)
    );
}

fn duplicate(base_offset: u64, record_count: u32) -> Accepted {
    Accepted {
        base_offset,
        record_count,
        duplicate: true,
    }
}

fn out_of_order(r: Result<Accepted>) -> bool {
    matches!(r, Err(BrokerError::OutOfOrderSequence { .. }))
}

/// Issue 6, first scenario: a new producer's first batch (sequence 0) went
/// to a leader that was deposed, and its next batch (sequence 3) to the new
/// leader. The overtaking batch must wait for the first one, not be taken
/// as the producer's start, which would leave the first one refused as out
/// of order forever (failed, although healthy).
#[test]
fn a_batch_overtaking_a_new_producers_first_batch_waits_for_it() {
    // The deposed leader's entry did not survive: the new leader's log
    // holds the overtaking batch first, then the retries.
    let mut p = open(tree()).unwrap();
    assert!(out_of_order(
        p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 3))))
    ));
    assert_eq!(
        p.apply_batch(2, &produced_at(0, 3, 1, Some((7, 0))))
            .unwrap(),
        stored(0, 3)
    );
    assert_eq!(
        p.apply_batch(3, &produced_at(3, 2, 1, Some((7, 3))))
            .unwrap(),
        stored(3, 2)
    );
    p.flush_round().unwrap();
    let found: Vec<(u64, u64)> = p
        .index()
        .batches_from(0, 10)
        .unwrap()
        .iter()
        .map(|l| (l.base_offset, l.raft_index))
        .collect();
    assert_eq!(found, vec![(0, 2), (3, 3)], "stored once each, in order");

    // The deposed leader's entry survived and the new leader committed it
    // first: the overtaking batch follows it, and the first batch's retry
    // is answered with its original offsets.
    let mut q = open(tree()).unwrap();
    assert_eq!(
        q.apply_batch(1, &produced_at(0, 3, 1, Some((7, 0))))
            .unwrap(),
        stored(0, 3)
    );
    assert_eq!(
        q.apply_batch(2, &produced_at(3, 2, 1, Some((7, 3))))
            .unwrap(),
        stored(3, 2)
    );
    assert_eq!(
        q.applied_duplicate(&produced_at(5, 3, 1, Some((7, 0)))),
        Some((0, 3))
    );
    assert_eq!(
        q.apply_batch(3, &produced_at(5, 3, 1, Some((7, 0))))
            .unwrap(),
        duplicate(0, 3)
    );
}

/// Issue 6, second scenario, as the partition sees it: the batch at
/// sequence 2 was refused before it was proposed (too large), so the next
/// one, in flight in the same epoch, is refused as out of order; once the
/// producer moves to epoch 1 it is accepted, skipping the gap, and the
/// rest follow in order.
#[test]
fn a_new_epoch_skips_a_refused_batch_and_the_next_ones_follow() {
    let mut p = open(tree()).unwrap();
    assert_eq!(
        p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 0))))
            .unwrap(),
        stored(0, 2)
    );
    assert!(out_of_order(
        p.apply_batch(2, &produced_at(2, 1, 1, Some((7, 4))))
    ));
    assert_eq!(
        p.apply_batch(3, &produced_in(2, 1, 1, Some((7, 4)), 1))
            .unwrap(),
        stored(2, 1)
    );
    assert_eq!(
        p.apply_batch(4, &produced_in(3, 1, 1, Some((7, 5)), 1))
            .unwrap(),
        stored(3, 1)
    );
    // The refused attempt of sequence 4, still in a log somewhere in epoch
    // 0, is the stored batch and is answered as such.
    assert_eq!(
        p.apply_batch(5, &produced_in(4, 1, 1, Some((7, 4)), 0))
            .unwrap(),
        duplicate(2, 1)
    );
    // A batch of the old epoch the producer gave up on is refused.
    assert!(out_of_order(
        p.apply_batch(6, &produced_in(4, 1, 1, Some((7, 6)), 0))
    ));
}

/// A batch whose outcome the producer did not learn (a broken stream) and
/// that it resends re-stamped in a new epoch is the stored batch: answered
/// with its offsets, not stored twice.
#[test]
fn a_stored_batch_resent_in_a_new_epoch_is_a_duplicate() {
    let mut p = open(tree()).unwrap();
    p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 0))))
        .unwrap();
    p.apply_batch(2, &produced_at(2, 2, 1, Some((7, 2))))
        .unwrap();
    assert_eq!(
        p.applied_duplicate(&produced_in(4, 2, 1, Some((7, 2)), 1)),
        Some((2, 2))
    );
    assert_eq!(
        p.apply_batch(3, &produced_in(4, 2, 1, Some((7, 2)), 1))
            .unwrap(),
        duplicate(2, 2)
    );
    // Not an epoch change: the next batch of epoch 0 is still accepted.
    assert_eq!(
        p.apply_batch(4, &produced_at(4, 1, 1, Some((7, 4))))
            .unwrap(),
        stored(4, 1)
    );
}

/// A producer's first batch in a new epoch may start anywhere: its earlier
/// batches here were all given up on.
#[test]
fn an_unknown_producer_starts_at_zero_or_in_a_new_epoch() {
    let mut p = open(tree()).unwrap();
    assert!(out_of_order(
        p.apply_batch(1, &produced_at(0, 1, 1, Some((7, 5))))
    ));
    assert_eq!(
        p.apply_batch(2, &produced_in(0, 1, 1, Some((7, 5)), 1))
            .unwrap(),
        stored(0, 1)
    );
    assert_eq!(
        p.apply_batch(3, &produced_at(1, 1, 1, Some((8, 0))))
            .unwrap(),
        stored(1, 1)
    );
}

/// A snapshot keeps what answers retries of batches stored before its
/// point, so a follower restored from it answers them like the leader.
#[test]
fn a_restored_snapshot_still_answers_retries_of_earlier_batches() {
    let mut p = open(tree()).unwrap();
    p.apply_batch(1, &produced_at(0, 2, 1, Some((7, 0))))
        .unwrap();
    p.apply_batch(2, &produced_at(2, 2, 1, Some((7, 2))))
        .unwrap();
    p.flush_round().unwrap();
    let snap = p.snapshot_at(1).unwrap();
    let mut q = open(tree()).unwrap();
    q.restore(&snap.encode_to_vec()).unwrap();
    assert_eq!(
        q.apply_batch(2, &produced_at(2, 2, 1, Some((7, 2))))
            .unwrap(),
        stored(2, 2)
    );
    assert_eq!(
        q.apply_batch(3, &produced_at(4, 2, 1, Some((7, 0))))
            .unwrap(),
        duplicate(0, 2)
    );
}

/// Issue 7: a batch from a producer id nobody owned yet (a stranger's)
/// is stored; the real producer later handed that id sends a different
/// batch with the same sequence. It must be refused (every time it is
/// retried), never acknowledged at the stranger's offset, where it was
/// never stored. Before the fix it was answered as a duplicate of the
/// stranger's batch. The stranger's own resend, even re-stamped in a new
/// epoch, is still the stored batch. Snapshots keep the identities.
#[test]
fn a_different_batch_with_a_remembered_sequence_is_refused_not_acknowledged() {
    let mut p = open(tree()).unwrap();
    let stranger = produced_at(0, 1, 5, Some((0, 0)));
    assert_eq!(p.apply_batch(1, &stranger).unwrap(), stored(0, 1));
    let real = produced_at(1, 1, 6, Some((0, 0)));
    assert_eq!(p.applied_duplicate(&real), None, "not answered at once");
    for index in 2..5 {
        let refused = p.apply_batch(index, &real).unwrap_err();
        assert_eq!(refused.reason().as_str(), "DUPLICATE_SEQUENCE");
    }
    assert_eq!(
        p.apply_batch(5, &produced_in(1, 1, 5, Some((0, 0)), 1))
            .unwrap(),
        duplicate(0, 1)
    );
    p.flush_round().unwrap();
    assert_eq!(p.next_offset(), 1, "nothing stored after the stranger");

    let snap = p.snapshot_at(5).unwrap();
    let mut q = open(tree()).unwrap();
    q.restore(&snap.encode_to_vec()).unwrap();
    assert_eq!(q.applied_duplicate(&real), None);
    assert_eq!(
        q.apply_batch(6, &real).unwrap_err().reason().as_str(),
        "DUPLICATE_SEQUENCE"
    );
    assert_eq!(q.applied_duplicate(&stranger), Some((0, 1)));
}

const EXPIRY: i64 = crate::state::producers::PRODUCER_IDLE_EXPIRY_MS;
const T0: i64 = 1_700_000_000_000;

/// The log of the cap-and-expiry scenario below: (raft index, batch).
fn cap_and_expiry_log() -> Vec<(u64, Bytes)> {
    vec![
        (1, produced_at(0, 1, T0, Some((1, 0)))),
        (2, produced_at(1, 1, T0, Some((2, 0)))),
        // A third producer does not fit.
        (3, produced_at(2, 1, T0, Some((3, 0)))),
        // Producer 2 writes again a little later.
        (4, produced_at(2, 1, T0 + 1, Some((2, 1)))),
        // The partition's time moves 7 days (and 1 ms) past producer 1's
        // last batch, not past producer 2's.
        (5, batch_at(3, 1, T0 + EXPIRY + 1)),
        // Producer 1 expired: producer 3 fits now.
        (6, produced_at(4, 1, T0 + EXPIRY + 1, Some((3, 0)))),
        // Producer 1's next batch is judged as a new producer's: out of
        // order in epoch 0, and refused for room in a new epoch.
        (7, produced_at(5, 1, T0, Some((1, 1)))),
        (8, produced_in(5, 1, T0, Some((1, 1)), 1)),
        (9, produced_at(5, 1, T0, Some((2, 2)))),
    ]
}

fn capped(t: Store) -> Held {
    let mut p = open(t).unwrap();
    p.producers.limits.max_producers = 2;
    p
}

fn outcome(r: Result<Accepted>) -> String {
    match r {
        Ok(a) => format!("{a:?}"),
        Err(e) => e.reason().as_str().to_string(),
    }
}

/// Issue 7: the producer table is bounded (a new producer beyond the cap
/// is refused with PRODUCER_TABLE_FULL, the ones there keep going) and an
/// idle producer expires when the partition's time is 7 days past its last
/// batch, making room. Expired entries go when the log is compacted past
/// their expiry. A replica restored from a snapshot taken before all this
/// decides every later entry alike.
#[test]
fn the_producer_table_is_capped_and_idle_producers_expire() {
    let t = tree();
    let mut p = capped(t.clone());
    let outcomes: Vec<String> = cap_and_expiry_log()
        .into_iter()
        .map(|(i, b)| outcome(p.apply_batch(i, &b)))
        .collect();
    assert_eq!(
        outcomes,
        [
            format!("{:?}", stored(0, 1)),
            format!("{:?}", stored(1, 1)),
            "PRODUCER_TABLE_FULL".into(),
            format!("{:?}", stored(2, 1)),
            format!("{:?}", stored(3, 1)),
            format!("{:?}", stored(4, 1)),
            "OUT_OF_ORDER_SEQUENCE".into(),
            "PRODUCER_TABLE_FULL".into(),
            format!("{:?}", stored(5, 1)),
        ]
    );
    // Producer 1's retry is no longer answered from the table.
    assert_eq!(
        p.applied_duplicate(&produced_at(6, 1, T0, Some((1, 0)))),
        None
    );
    p.flush_round().unwrap();
    assert_eq!(p.producers.entries(), 3, "expired, not yet forgotten");

    // Snapshots before each entry, restored and replayed: the same
    // decisions.
    for at in 1..=9u64 {
        let snap = p.snapshot_at(at - 1).unwrap();
        let mut q = capped(tree());
        q.restore(&snap.encode_to_vec()).unwrap();
        let replayed: Vec<String> = cap_and_expiry_log()
            .into_iter()
            .filter(|(i, _)| *i >= at)
            .map(|(i, b)| outcome(q.apply_batch(i, &b)))
            .collect();
        assert_eq!(replayed, outcomes[at as usize - 1..], "snapshot at {at}");
    }

    // Compaction past the time producer 1 expired forgets it.
    p.trim_to(4).unwrap();
    assert_eq!(p.producers.entries(), 2);
    let reopened = open(t).unwrap();
    assert_eq!(reopened.producers.entries(), 2);
}

/// Issue 8: the applied state in sled no longer grows with the data
/// written (it held one key per batch, which sled keeps in memory): after
/// thousands of batches from two producers the tree holds the state key
/// and one key per producer.
#[test]
fn sled_holds_no_key_per_batch() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    for i in 0..5_000u64 {
        let producer = Some((1 + (i % 2) as i64, (i / 2) as i32));
        p.apply_batch(10 + i, &produced_at(i, 1, i as i64, producer))
            .unwrap();
        if i % 100 == 99 {
            p.flush_round().unwrap();
        }
    }
    p.flush_round().unwrap();
    p.checkpoint().unwrap();
    assert_eq!(t.tree.len(), 3, "state key and two producers");
    let index = p.index();
    assert_eq!(index.locate(4_321).unwrap().unwrap().raft_index, 4_331);
    assert_eq!(index.offset_for_time(2_500).unwrap(), Some(2_500));
}

/// What was applied after the last checkpoint is replayed from the log on
/// restart: the index is cut back to the checkpoint and re-appended alike,
/// and dedup decisions after the replay are the same.
#[test]
fn a_restart_replays_from_the_checkpoint_and_indexes_alike() {
    let t = tree();
    let log: Vec<(u64, Bytes)> = (0..20u64)
        .map(|i| {
            (
                6 + i,
                produced_at(i * 2, 2, 100 + i as i64, Some((9, (i * 2) as i32))),
            )
        })
        .collect();
    let mut p = open(t.clone()).unwrap();
    for (i, b) in &log[..12] {
        p.apply_batch(*i, b).unwrap();
    }
    p.flush_round().unwrap();
    p.checkpoint().unwrap();
    for (i, b) in &log[12..] {
        p.apply_batch(*i, b).unwrap();
    }
    p.flush_round().unwrap();
    let full = p.index().batches_from(0, usize::MAX).unwrap();
    drop(p);

    let mut q = open(t).unwrap();
    assert_eq!((q.applied(), q.next_offset()), (17, 24));
    assert_eq!(q.index().batches_from(0, usize::MAX).unwrap(), full[..12]);
    for (i, b) in &log[12..] {
        q.apply_batch(*i, b).unwrap();
    }
    q.flush_round().unwrap();
    assert_eq!(q.index().batches_from(0, usize::MAX).unwrap(), full);
    // A retry of a batch applied before and after the checkpoint alike is
    // answered with its offset.
    assert_eq!(q.applied_duplicate(&log[3].1), Some((6, 2)));
    assert_eq!(q.applied_duplicate(&log[15].1), Some((30, 2)));
}

/// An offset index shorter than the checkpoint says (lost or damaged)
/// cannot be trusted: the state starts over, to be rebuilt from the
/// snapshot and the log.
#[test]
fn an_index_shorter_than_its_checkpoint_rebuilds_the_state() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    for i in 0..10u64 {
        p.apply_batch(6 + i, &batch_at(i, 1, 1)).unwrap();
    }
    p.flush_round().unwrap();
    p.checkpoint().unwrap();
    drop(p);
    let path = t.dir.path().join("offsets");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let q = open(t).unwrap();
    assert_eq!((q.applied(), q.next_offset()), (0, 0));
    assert_eq!(q.index().locate(0).unwrap(), None);
}

/// Retention frees the index's dead prefix (a hole where the filesystem
/// can punch one); a restart finds the live entries without reading it.
#[test]
fn a_trimmed_index_reopens_past_its_dead_prefix() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    for i in 0..1_000u64 {
        p.apply_batch(6 + i, &batch_at(i, 1, i as i64)).unwrap();
    }
    p.flush_round().unwrap();
    p.trim_to(700).unwrap();
    drop(p);
    let q = open(t).unwrap();
    let index = q.index();
    assert_eq!(index.locate(699).unwrap(), None);
    assert_eq!(index.locate(700).unwrap().unwrap().raft_index, 706);
    assert_eq!(index.offset_for_time(0).unwrap(), Some(700));
    assert_eq!(index.batches_from(0, 2).unwrap()[0].base_offset, 700);
}

fn group_commit(group: &str, committed: u64, deliveries: &[(u64, u32)]) -> GroupEntry {
    GroupEntry::Commit(covet_protocol::internal::GroupCommit {
        group: group.into(),
        committed,
        deliveries: deliveries
            .iter()
            .map(|&(offset, count)| covet_protocol::internal::Delivery { offset, count })
            .collect(),
    })
}

fn committed_of(p: &PartitionState, group: &str) -> Option<(u64, usize)> {
    p.groups()
        .get(group)
        .map(|s| (s.committed, s.deliveries.len()))
}

#[test]
fn group_offsets_are_checked_against_the_log_and_survive_a_checkpointed_reopen() {
    let t = tree();
    let mut p = open(t.clone()).unwrap();
    p.apply_batch(1, &batch_at(0, 10, 1)).unwrap();
    // Beyond the high watermark: refused, nothing recorded.
    p.mark_applied(2);
    assert!(p.apply_group(group_commit("g", 11, &[])).is_err());
    assert_eq!(committed_of(&p, "g"), None);
    p.mark_applied(3);
    p.apply_group(group_commit("g", 6, &[(6, 2), (8, 1)]))
        .unwrap();
    p.flush_round().unwrap();
    p.checkpoint().unwrap();
    drop(p);
    let mut p = open(t.clone()).unwrap();
    assert_eq!(p.applied(), 3);
    assert_eq!(committed_of(&p, "g"), Some((6, 2)));
    // A deletion reaches sled at the next checkpoint too.
    p.mark_applied(4);
    p.apply_group(GroupEntry::Delete(covet_protocol::internal::GroupDelete {
        group: "g".into(),
    }))
    .unwrap();
    p.checkpoint().unwrap();
    drop(p);
    assert_eq!(committed_of(&open(t).unwrap(), "g"), None);
}

#[test]
fn a_snapshot_carries_group_offsets_and_replaying_later_entries_converges() {
    let mut p = open(tree()).unwrap();
    let log: Vec<(u64, Option<Bytes>, Option<GroupEntry>)> = vec![
        (1, Some(batch_at(0, 5, 1)), None),
        (2, None, Some(group_commit("a", 3, &[(3, 1)]))),
        (3, Some(batch_at(5, 5, 2)), None),
        (4, None, Some(group_commit("a", 7, &[]))),
        (5, None, Some(group_commit("b", 2, &[]))),
        (6, Some(batch_at(10, 5, 3)), None),
        (
            7,
            None,
            Some(GroupEntry::Reset(covet_protocol::internal::GroupReset {
                group: "a".into(),
                offset: 1,
            })),
        ),
    ];
    let apply =
        |p: &mut PartitionState, entry: &(u64, Option<Bytes>, Option<GroupEntry>)| match entry {
            (i, Some(b), _) => {
                p.apply_batch(*i, b).unwrap();
            }
            (i, None, Some(g)) => {
                p.mark_applied(*i);
                p.apply_group(g.clone()).unwrap();
            }
            _ => unreachable!(),
        };
    for e in &log {
        apply(&mut p, e);
    }
    p.flush_round().unwrap();
    // Compacted through index 4: the snapshot holds the groups as now.
    let snap = p.snapshot_at(4).unwrap();
    assert_eq!(snap.groups.len(), 2);
    let mut q = open(tree()).unwrap();
    q.restore(&snap.encode_to_vec()).unwrap();
    for e in &log[4..] {
        apply(&mut q, e);
    }
    q.flush_round().unwrap();
    assert_eq!(q.groups().snapshot(), p.groups().snapshot());
    assert_eq!(committed_of(&q, "a"), Some((1, 0)));
    assert_eq!(committed_of(&q, "b"), Some((2, 0)));
}
