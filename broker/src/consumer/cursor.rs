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
#[derive(Debug)]
pub struct Cursor {
    /// The end of the contiguous acknowledged prefix.
    committed: u64,
    /// The first offset never delivered (since this cursor was built).
    next_new: u64,
    /// Delivered and not acknowledged.
    pending: BTreeMap<u64, Pending>,
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
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Records out with the member.
    pub fn in_flight(&self) -> usize {
        self.pending
            .values()
            .filter(|p| matches!(p, Pending::Out { .. }))
            .count()
    }

    /// The next record to deliver or dead-letter, given the high watermark
    /// `end` and the log's start: a queued record that is due first
    /// (oldest offset first), else the next new one. `None` when the member
    /// holds `max_in_flight` records, or nothing is due. A record returned
    /// as `Deliver` counts as out from now.
    pub fn next(&mut self, end: u64, log_start: u64, now: Instant) -> Option<Next> {
        self.skip_trimmed(log_start);
        if self.in_flight() >= self.max_in_flight {
            return None;
        }
        let due = self
            .pending
            .iter()
            .find(|(_, p)| matches!(p, Pending::Queued { due } if *due <= now))
            .map(|(&o, _)| o);
        let offset = match due {
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
            self.pending.insert(offset, Pending::Dead);
            return Some(Next::DeadLetter {
                offset,
                count: delivered,
            });
        }
        let count = delivered.saturating_add(1);
        self.counts.insert(offset, count);
        self.pending.insert(
            offset,
            Pending::Out {
                deadline: now + self.ack_timeout,
            },
        );
        self.changed = true;
        Some(Next::Deliver { offset, count })
    }

    /// When the next queued record falls due or an out record times out:
    /// the session wakes then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter_map(|p| match *p {
                Pending::Out { deadline } => Some(deadline),
                Pending::Queued { due } => Some(due),
                Pending::Dead => None,
            })
            .min()
    }

    /// Puts the records whose ack deadline passed back in the queue, due
    /// at once. Returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        for p in self.pending.values_mut() {
            if matches!(p, Pending::Out { deadline } if *deadline <= now) {
                *p = Pending::Queued { due: now };
                n += 1;
            }
        }
        n
    }

    /// Acknowledges `offset`. Returns false for an offset that is not out
    /// or queued (never delivered, or acknowledged already): ignored.
    pub fn ack(&mut self, offset: u64) -> bool {
        if self.pending.remove(&offset).is_none() {
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

    /// Puts a record whose dead-letter write failed back in the queue,
    /// due at `due`.
    pub fn dead_letter_failed(&mut self, offset: u64, due: Instant) {
        if let Some(p @ Pending::Dead) = self.pending.get_mut(&offset) {
            *p = Pending::Queued { due };
        }
    }

    /// Makes the next [`Cursor::commit_state`] return the state even if
    /// nothing changed since (the last commit failed).
    pub fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Asks for `offset` again after `delay`. False if it is not out.
    pub fn nack(&mut self, offset: u64, delay: Duration, now: Instant) -> bool {
        match self.pending.get_mut(&offset) {
            Some(p @ Pending::Out { .. }) => {
                *p = Pending::Queued { due: now + delay };
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
