//! A consumer group's acknowledgement state on one partition, as its
//! leader keeps it between group commits (ADR 0009): which records are out
//! with the member, which wait to be delivered again and when, which are
//! acknowledged beyond the committed prefix, and how often each was
//! delivered. No I/O and no clock of its own (callers pass `now`), so
//! every rule here is tested by hand.
//!
//! Offsets of a partition are dense (every offset from the log's start to
//! its high watermark is a record), so the cursor needs no log access: it
//! says which offsets to send, the session reads their batches.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use covet_protocol::internal::{Delivery, GroupCommit};

/// A record delivered and not acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Out with the member; delivered again if not acknowledged by then.
    Out { deadline: Instant },
    /// Waiting to be delivered again, not before `due`.
    Queued { due: Instant },
    /// Being written to the dead-letter topic by the leader.
    Dead,
}

/// What to do with a record next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Deliver `offset`; `count` is its delivery count including this one.
    Deliver { offset: u64, count: u32 },
    /// `offset` was delivered `count` times, the group's limit: write it
    /// to the dead-letter topic, then [`Cursor::ack`] it.
    DeadLetter { offset: u64, count: u32 },
}

/// One group's progress on one partition.
///
/// Every operation is logarithmic in the records pending: with
/// `max_in_flight` in the thousands, a scan per delivered record was most
/// of a leader's work (indexes below).
#[derive(Debug)]
pub struct Cursor {
    /// The end of the contiguous acknowledged prefix.
    committed: u64,
    /// The first offset never delivered (since this cursor was built).
    next_new: u64,
    /// Delivered and not acknowledged.
    pending: BTreeMap<u64, Pending>,
    /// Indexes of `pending`, kept by [`Cursor::put`] and [`Cursor::take`]:
    /// how many records are out, the out ones by ack deadline, the queued
    /// ones by due time until they fall due ([`Cursor::promote`]), then
    /// by offset.
    out: usize,
    deadlines: BTreeSet<(Instant, u64)>,
    waiting: BTreeSet<(Instant, u64)>,
    ready: BTreeSet<u64>,
    /// Acknowledged, beyond `committed`.
    acked: BTreeSet<u64>,
    /// Times each record at or beyond `committed` was delivered, for
    /// records delivered and not acknowledged (kept across sessions and,
    /// through group commits, across leaders).
    counts: BTreeMap<u64, u32>,
    /// Records the current member may hold unacknowledged.
    max_in_flight: usize,
    ack_timeout: Duration,
    max_deliveries: u32,
    /// Something a commit would record changed since the last
    /// [`Cursor::commit_state`].
    changed: bool,
}

/// The most free slots a delivery round waits for
/// ([`Cursor::worth_delivering`]).
pub const MIN_ROUND: usize = 256;

/// The limits a member's session sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_in_flight: usize,
    pub ack_timeout: Duration,
    /// Deliveries after which a record goes to the dead-letter topic
    /// (0: never).
    pub max_deliveries: u32,
}

impl Cursor {
    /// A cursor starting from the group's last commit on this partition
    /// (`None`: the group starts at `start`), for a log that now holds
    /// `[log_start, ..)`. Records the commit counted as delivered come
    /// first, in offset order, with their counts continued.
    pub fn new(commit: Option<&GroupCommit>, start: u64, log_start: u64, limits: Limits) -> Cursor {
        let (committed, counts) = match commit {
            Some(c) => (
                c.committed,
                c.deliveries.iter().map(|d| (d.offset, d.count)).collect(),
            ),
            None => (start, BTreeMap::new()),
        };
        let committed = committed.max(log_start);
        let mut counts: BTreeMap<u64, u32> = counts;
        counts.retain(|&o, _| o >= committed);
        Cursor {
            committed,
            next_new: committed,
            pending: BTreeMap::new(),
            out: 0,
            deadlines: BTreeSet::new(),
            waiting: BTreeSet::new(),
            ready: BTreeSet::new(),
            acked: BTreeSet::new(),
            counts,
            max_in_flight: limits.max_in_flight.max(1),
            ack_timeout: limits.ack_timeout,
            max_deliveries: limits.max_deliveries,
            changed: false,
        }
    }

    /// Takes the limits of a new member session; the records the previous
    /// one held (or was writing to the dead-letter topic) go back to the
    /// queue, due at once.
    pub fn new_session(&mut self, limits: Limits, now: Instant) {
        self.max_in_flight = limits.max_in_flight.max(1);
        self.ack_timeout = limits.ack_timeout;
        self.max_deliveries = limits.max_deliveries;
        for p in self.pending.values_mut() {
            *p = Pending::Queued { due: now };
        }
        self.reindex();
    }

    /// Sets `offset`'s state, keeping the indexes.
    fn put(&mut self, offset: u64, p: Pending) {
        if let Some(old) = self.pending.insert(offset, p) {
            self.unindex(offset, old);
        }
        self.index(offset, p);
    }

    /// Removes `offset`'s state, keeping the indexes.
    fn take(&mut self, offset: u64) -> Option<Pending> {
        let old = self.pending.remove(&offset)?;
        self.unindex(offset, old);
        Some(old)
    }

    fn index(&mut self, offset: u64, p: Pending) {
        match p {
            Pending::Out { deadline } => {
                self.out += 1;
                self.deadlines.insert((deadline, offset));
            }
            Pending::Queued { due } => {
                self.waiting.insert((due, offset));
            }
            Pending::Dead => {}
        }
    }

    fn unindex(&mut self, offset: u64, p: Pending) {
        match p {
            Pending::Out { deadline } => {
                self.out -= 1;
                self.deadlines.remove(&(deadline, offset));
            }
            Pending::Queued { due } => {
                if !self.waiting.remove(&(due, offset)) {
                    self.ready.remove(&offset);
                }
            }
            Pending::Dead => {}
        }
    }

    /// Rebuilds the indexes from `pending`.
    fn reindex(&mut self) {
        self.out = 0;
        self.deadlines.clear();
        self.waiting.clear();
        self.ready.clear();
        let all: Vec<(u64, Pending)> = self.pending.iter().map(|(&o, &p)| (o, p)).collect();
        for (offset, p) in all {
            self.index(offset, p);
        }
    }

    /// Moves the queued records due by `now` to `ready`.
    fn promote(&mut self, now: Instant) {
        while let Some(&(due, offset)) = self.waiting.first() {
            if due > now {
                break;
            }
            self.waiting.pop_first();
            self.ready.insert(offset);
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Records out with the member.
    pub fn in_flight(&self) -> usize {
        self.out
    }

    /// Whether a round of deliveries should start now: the member holds
    /// nothing, or has room for a quarter of its `max_in_flight` (at most
    /// [`MIN_ROUND`]). A member acking record by record would otherwise
    /// get a message per record, each with its own read, as it frees
    /// each slot; a member still holding three quarters of its window has
    /// plenty to do meanwhile. A window of 1 to 4 is used slot by slot.
    pub fn worth_delivering(&self) -> bool {
        let room = self.max_in_flight.saturating_sub(self.out);
        self.out == 0 || room >= (self.max_in_flight / 4).clamp(1, MIN_ROUND)
    }

    /// The next record to deliver or dead-letter, given the high watermark
    /// `end` and the log's start: a queued record that is due first
    /// (oldest offset first), else the next new one. `None` when the member
    /// holds `max_in_flight` records, or nothing is due. A record returned
    /// as `Deliver` counts as out from now.
    pub fn next(&mut self, end: u64, log_start: u64, now: Instant) -> Option<Next> {
        self.skip_trimmed(log_start);
        if self.out >= self.max_in_flight {
            return None;
        }
        self.promote(now);
        let offset = match self.ready.first().copied() {
            Some(o) => o,
            None if self.next_new < end => {
                let o = self.next_new;
                self.next_new += 1;
                o
            }
            None => return None,
        };
        let delivered = self.counts.get(&offset).copied().unwrap_or(0);
        if self.max_deliveries > 0 && delivered >= self.max_deliveries {
            // Held out of the queue (and of timeouts) until the caller,
            // having written it to the dead-letter topic, acks it.
            self.put(offset, Pending::Dead);
            return Some(Next::DeadLetter {
                offset,
                count: delivered,
            });
        }
        let count = delivered.saturating_add(1);
        self.counts.insert(offset, count);
        self.put(
            offset,
            Pending::Out {
                deadline: now + self.ack_timeout,
            },
        );
        self.changed = true;
        Some(Next::Deliver { offset, count })
    }

    /// When an out record times out or, if a delivery round is worth
    /// starting, the next queued record falls due: the session wakes then.
    /// Queued records waiting for credit wait for an ack (which wakes the
    /// session anyway) or a timeout, not for their due time: that is past
    /// for a record due at once, and waking for it would spin.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.deadlines.first().map(|&(t, _)| t);
        if !self.worth_delivering() {
            return timeout;
        }
        let ready = self.ready.first().and_then(|o| match self.pending.get(o) {
            Some(Pending::Queued { due }) => Some(*due),
            _ => None,
        });
        let waiting = self.waiting.first().map(|&(t, _)| t);
        [timeout, ready, waiting].into_iter().flatten().min()
    }

    /// Puts the records whose ack deadline passed back in the queue, due
    /// at once. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired: Vec<u64> = self
            .deadlines
            .iter()
            .take_while(|&&(deadline, _)| deadline <= now)
            .map(|&(_, offset)| offset)
            .collect();
        for &offset in &expired {
            self.put(offset, Pending::Queued { due: now });
        }
        expired.len()
    }

    /// Acknowledges `offset`. Returns false for an offset that is not out
    /// or queued (never delivered, or acknowledged already): ignored.
    pub fn ack(&mut self, offset: u64) -> bool {
        if self.take(offset).is_none() {
            return false;
        }
        self.counts.remove(&offset);
        self.acked.insert(offset);
        while self.acked.remove(&self.committed) {
            self.committed += 1;
        }
        self.changed = true;
        true
    }

    /// Takes back `offset`, which the member never handed to its
    /// application: queued again, due now, and this delivery not counted.
    /// False if it is not out.
    pub fn returned(&mut self, offset: u64, now: Instant) -> bool {
        if !matches!(self.pending.get(&offset), Some(Pending::Out { .. })) {
            return false;
        }
        if let Some(count) = self.counts.get_mut(&offset) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(&offset);
            }
        }
        self.put(offset, Pending::Queued { due: now });
        self.changed = true;
        true
    }

    /// Restarts the ack deadline of `offset` from `now`. False if it is
    /// not out.
    pub fn extend(&mut self, offset: u64, now: Instant) -> bool {
        match self.pending.get(&offset) {
            Some(Pending::Out { .. }) => {
                let deadline = now + self.ack_timeout;
                self.put(offset, Pending::Out { deadline });
                true
            }
            _ => false,
        }
    }

    /// Puts a record whose dead-letter write failed back in the queue,
    /// due at `due`.
    pub fn dead_letter_failed(&mut self, offset: u64, due: Instant) {
        if let Some(Pending::Dead) = self.pending.get(&offset) {
            self.put(offset, Pending::Queued { due });
        }
    }

    /// Makes the next [`Cursor::commit_state`] return the state even if
    /// nothing changed since (the last commit failed).
    pub fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Asks for `offset` again after `delay`. False if it is not out.
    pub fn nack(&mut self, offset: u64, delay: Duration, now: Instant) -> bool {
        match self.pending.get(&offset) {
            Some(Pending::Out { .. }) => {
                self.put(offset, Pending::Queued { due: now + delay });
                true
            }
            _ => false,
        }
    }

    /// Records below the log's start are gone: retention removed them
    /// before they were handled, and nothing can be delivered there.
    fn skip_trimmed(&mut self, log_start: u64) {
        if self.committed >= log_start {
            return;
        }
        self.committed = log_start;
        self.next_new = self.next_new.max(log_start);
        self.pending = self.pending.split_off(&log_start);
        self.reindex();
        self.acked = self.acked.split_off(&log_start);
        self.counts = self.counts.split_off(&log_start);
        while self.acked.remove(&self.committed) {
            self.committed += 1;
        }
        self.changed = true;
    }

    /// The group commit recording this cursor (committed offset, delivery
    /// counts of records delivered and not acknowledged), if anything
    /// changed since the last call.
    pub fn commit_state(&mut self, group: &str) -> Option<GroupCommit> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(GroupCommit {
            group: group.to_string(),
            committed: self.committed,
            deliveries: self
                .counts
                .range(self.committed..)
                .map(|(&offset, &count)| Delivery { offset, count })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_in_flight: 3,
        ack_timeout: Duration::from_secs(30),
        max_deliveries: 3,
    };

    fn delivered(c: &mut Cursor, end: u64, now: Instant) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while let Some(Next::Deliver { offset, count }) = c.next(end, 0, now) {
            out.push((offset, count));
        }
        out
    }

    #[test]
    fn holds_at_most_max_in_flight_and_commits_the_contiguous_prefix() {
        let now = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        assert_eq!(delivered(&mut c, 10, now), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(c.next(10, 0, now), None, "three out: no credit");
        // Out of order: 1 acked first does not move the prefix.
        assert!(c.ack(1));
        assert_eq!(c.committed(), 0);
        assert_eq!(delivered(&mut c, 10, now), vec![(3, 1)]);
        assert!(c.ack(0));
        assert_eq!(c.committed(), 2, "0 and 1 acked");
        assert!(!c.ack(1), "twice is ignored");
        assert!(!c.ack(9), "never delivered is ignored");
        let commit = c.commit_state("g").unwrap();
        assert_eq!(commit.committed, 2);
        let counts: Vec<_> = commit.deliveries.iter().map(|d| d.offset).collect();
        assert_eq!(counts, vec![2, 3]);
        assert!(c.commit_state("g").is_none(), "nothing changed since");
    }

    #[test]
    fn a_nack_redelivers_after_its_delay_with_the_count_raised() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        assert_eq!(delivered(&mut c, 2, t0), vec![(0, 1), (1, 1)]);
        assert!(c.nack(0, Duration::from_secs(5), t0));
        assert_eq!(c.next(2, 0, t0), None, "not due yet, nothing new");
        assert_eq!(c.next_deadline(), Some(t0 + Duration::from_secs(5)));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            c.next(2, 0, t1),
            Some(Next::Deliver {
                offset: 0,
                count: 2
            })
        );
    }

    #[test]
    fn an_ack_timeout_redelivers_and_the_limit_dead_letters() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        let mut now = t0;
        for round in 1..=3 {
            assert_eq!(
                c.next(1, 0, now),
                Some(Next::Deliver {
                    offset: 0,
                    count: round
                })
            );
            now += Duration::from_secs(31);
            assert_eq!(c.expire(now), 1);
        }
        assert_eq!(
            c.next(1, 0, now),
            Some(Next::DeadLetter {
                offset: 0,
                count: 3
            })
        );
        assert_eq!(c.next(1, 0, now), None, "held until dead-lettered");
        // A slow dead-letter write does not time out into a second one.
        assert_eq!(c.expire(now + Duration::from_secs(3600)), 0);
        assert_eq!(c.next_deadline(), None);
        assert!(c.ack(0));
        assert_eq!(c.committed(), 1);
    }

    #[test]
    fn counts_survive_a_commit_and_a_new_cursor_delivers_those_records_first() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        delivered(&mut c, 5, t0);
        assert!(c.ack(0));
        let commit = c.commit_state("g").unwrap();
        // A new leader (or a restart) builds its cursor from the commit.
        let mut d = Cursor::new(Some(&commit), 0, 0, LIMITS);
        assert_eq!(d.committed(), 1);
        assert_eq!(delivered(&mut d, 5, t0), vec![(1, 2), (2, 2), (3, 1)]);
    }

    #[test]
    fn a_new_session_takes_back_what_the_old_one_held() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        delivered(&mut c, 5, t0);
        assert_eq!(c.in_flight(), 3);
        c.new_session(
            Limits {
                max_in_flight: 2,
                ..LIMITS
            },
            t0,
        );
        assert_eq!(c.in_flight(), 0);
        assert_eq!(delivered(&mut c, 5, t0), vec![(0, 2), (1, 2)]);
    }

    #[test]
    fn queued_records_without_credit_do_not_wake_the_session() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        delivered(&mut c, 5, t0);
        let limits = Limits {
            max_in_flight: 2,
            ..LIMITS
        };
        c.new_session(limits, t0);
        assert_eq!(delivered(&mut c, 5, t0), vec![(0, 2), (1, 2)]);
        // Record 2 is due (since t0) but the member has no credit for it:
        // the session sleeps until an ack or a timeout, not until t0.
        assert_eq!(c.next_deadline(), Some(t0 + LIMITS.ack_timeout));
        assert!(c.ack(0));
        assert_eq!(c.next_deadline(), Some(t0), "credit again: record 2 is due");
        assert_eq!(delivered(&mut c, 5, t0), vec![(2, 2)]);
    }

    /// Many operations in a pseudo-random order: the indexes always agree
    /// with the records' states.
    #[test]
    fn the_indexes_follow_every_operation() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut now = t0;
        for _ in 0..5_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let offset = seed % 40;
            match seed % 7 {
                0 | 1 => {
                    c.next(40, 0, now);
                }
                2 => {
                    c.ack(offset);
                }
                3 => {
                    c.nack(offset, Duration::from_secs(seed % 3), now);
                }
                4 => {
                    now += Duration::from_secs(seed % 20);
                    c.expire(now);
                }
                5 => c.dead_letter_failed(offset, now),
                _ => {
                    if seed % 50 == 0 {
                        c.new_session(LIMITS, now);
                    }
                }
            }
            let out: Vec<u64> = c
                .pending
                .iter()
                .filter(|(_, p)| matches!(p, Pending::Out { .. }))
                .map(|(&o, _)| o)
                .collect();
            assert_eq!(c.out, out.len());
            assert_eq!(c.deadlines.len(), out.len());
            assert!(c.deadlines.iter().all(|(_, o)| out.contains(o)));
            let queued = c
                .pending
                .values()
                .filter(|p| matches!(p, Pending::Queued { .. }))
                .count();
            assert_eq!(c.waiting.len() + c.ready.len(), queued);
            assert!(c.out <= LIMITS.max_in_flight);
        }
    }

    #[test]
    fn a_round_starts_when_a_quarter_of_the_window_is_free() {
        let t0 = Instant::now();
        let limits = Limits {
            max_in_flight: 8,
            ..LIMITS
        };
        let mut c = Cursor::new(None, 0, 0, limits);
        assert!(c.worth_delivering(), "nothing out");
        while c.next(100, 0, t0).is_some() {}
        assert_eq!(c.in_flight(), 8);
        assert!(c.ack(0));
        assert!(!c.worth_delivering(), "one slot free of 8");
        assert!(c.ack(1));
        assert!(c.worth_delivering(), "two slots free of 8");
        // A window of 4 or less is used slot by slot.
        let mut d = Cursor::new(None, 0, 0, LIMITS);
        while d.next(100, 0, t0).is_some() {}
        assert!(d.ack(0));
        assert!(d.worth_delivering());
    }

    #[test]
    fn an_extended_record_times_out_an_ack_timeout_after_the_extension() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        delivered(&mut c, 1, t0);
        let t1 = t0 + Duration::from_secs(20);
        assert!(c.extend(0, t1));
        assert_eq!(c.expire(t0 + LIMITS.ack_timeout), 0, "extended");
        assert_eq!(c.next_deadline(), Some(t1 + LIMITS.ack_timeout));
        assert_eq!(c.expire(t1 + LIMITS.ack_timeout), 1);
        assert!(!c.extend(0, t1), "queued, not out: nothing to extend");
        assert!(!c.extend(7, t1), "never delivered");
    }

    #[test]
    fn a_returned_record_comes_again_with_its_count_unchanged() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        assert_eq!(delivered(&mut c, 2, t0), vec![(0, 1), (1, 1)]);
        assert!(c.returned(1, t0));
        assert!(!c.returned(1, t0), "queued, not out");
        assert_eq!(delivered(&mut c, 2, t0), vec![(1, 1)]);
        assert!(c.ack(1));
        assert!(!c.returned(1, t0), "acknowledged");
    }

    #[test]
    fn records_retention_removed_are_skipped() {
        let t0 = Instant::now();
        let mut c = Cursor::new(None, 0, 0, LIMITS);
        delivered(&mut c, 10, t0);
        assert_eq!(
            c.next(10, 5, t0),
            Some(Next::Deliver {
                offset: 5,
                count: 1
            })
        );
        assert_eq!(c.committed(), 5);
        let commit = c.commit_state("g").unwrap();
        assert!(commit.deliveries.iter().all(|d| d.offset >= 5));
    }
}
