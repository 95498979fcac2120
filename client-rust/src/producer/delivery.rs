//! A batch's shared outcome and the per-record future that reads it.
//!
//! Records of one batch share one [`BatchAck`]: acknowledging a batch of
//! ten thousand records is one store and one pass over the wakers of the
//! deliveries that are waiting, not ten thousand completions. A
//! [`Delivery`] is a small hand-written future over it (the ack, the
//! record's index, the slot of its waker): creating one allocates nothing
//! but a reference count.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use super::RecordMetadata;
use crate::Result;

/// The outcome of one batch, shared by the deliveries of its records.
pub(crate) struct BatchAck {
    topic: Arc<str>,
    partition: u32,
    /// The batch's base offset, or why it failed; set once.
    outcome: OnceLock<Result<u64>>,
    /// Wakers of deliveries polled before the outcome was known; taken
    /// (and woken) by `complete`.
    wakers: Mutex<Vec<Waker>>,
}

impl BatchAck {
    pub(crate) fn new(topic: Arc<str>, partition: u32) -> BatchAck {
        BatchAck {
            topic,
            partition,
            outcome: OnceLock::new(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Records the outcome (the first one wins) and wakes every waiting
    /// delivery.
    pub(crate) fn complete(&self, outcome: Result<u64>) {
        if self.outcome.set(outcome).is_err() {
            return;
        }
        // Taken under the lock after the outcome is set: a delivery that
        // registers under the lock either does so before (and is woken
        // here) or sees the outcome (see `Delivery::poll`).
        let wakers = std::mem::take(&mut *self.wakers.lock().expect("batch ack lock"));
        for w in wakers {
            w.wake();
        }
    }

    fn metadata(&self, index: u32) -> Option<Result<RecordMetadata>> {
        Some(match self.outcome.get()? {
            Ok(base) => Ok(RecordMetadata {
                topic: self.topic.clone(),
                partition: self.partition,
                offset: base + u64::from(index),
            }),
            Err(e) => Err(e.clone()),
        })
    }
}

/// Resolves when the record is acknowledged (or failed).
pub struct Delivery {
    ack: Arc<BatchAck>,
    /// The record's place in its batch.
    index: u32,
    /// Where this delivery's waker sits in `ack.wakers`, once registered.
    waker_slot: Option<usize>,
}

impl Delivery {
    pub(crate) fn new(ack: Arc<BatchAck>, index: u32) -> Delivery {
        Delivery {
            ack,
            index,
            waker_slot: None,
        }
    }
}

impl Future for Delivery {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(done) = this.ack.metadata(this.index) {
            return Poll::Ready(done);
        }
        let mut wakers = this.ack.wakers.lock().expect("batch ack lock");
        // Checked again under the lock, which `complete` takes after
        // setting the outcome: no completion slips in between.
        if let Some(done) = this.ack.metadata(this.index) {
            return Poll::Ready(done);
        }
        // The vector only grows until `complete` takes it, which happens
        // after the outcome is set, so a slot stays this delivery's.
        match this.waker_slot.filter(|&i| i < wakers.len()) {
            Some(i) => {
                if !wakers[i].will_wake(cx.waker()) {
                    wakers[i] = cx.waker().clone();
                }
            }
            None => {
                this.waker_slot = Some(wakers.len());
                wakers.push(cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::task::{waker, ArcWake};

    use super::*;
    use crate::Error;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(d: &mut Delivery, w: &Arc<Count>) -> Poll<Result<RecordMetadata>> {
        let w = waker(w.clone());
        Pin::new(d).poll(&mut Context::from_waker(&w))
    }

    #[test]
    fn waiting_deliveries_are_woken_once_with_their_offsets() {
        let ack = Arc::new(BatchAck::new("t".into(), 3));
        let (mut a, mut b) = (Delivery::new(ack.clone(), 0), Delivery::new(ack.clone(), 1));
        let (wa, wb, other) = (Arc::default(), Arc::default(), Arc::default());
        assert!(poll(&mut a, &wa).is_pending());
        assert!(poll(&mut b, &wb).is_pending());
        // Polled again by another task: the waker is replaced, not added.
        assert!(poll(&mut b, &other).is_pending());
        assert_eq!(ack.wakers.lock().unwrap().len(), 2);
        ack.complete(Ok(40));
        assert_eq!(wa.0.load(Ordering::SeqCst), 1);
        assert_eq!(wb.0.load(Ordering::SeqCst), 0, "the replaced waker");
        assert_eq!(other.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(Ok(meta)) = poll(&mut b, &other) else {
            panic!("resolved");
        };
        assert_eq!((&*meta.topic, meta.partition, meta.offset), ("t", 3, 41));
        // A second outcome is ignored.
        ack.complete(Err(Error::Closed));
        assert!(matches!(poll(&mut a, &wa), Poll::Ready(Ok(m)) if m.offset == 40));
    }

    #[test]
    fn a_delivery_made_after_the_outcome_resolves_at_once() {
        let ack = Arc::new(BatchAck::new("t".into(), 0));
        ack.complete(Err(Error::Closed));
        let mut d = Delivery::new(ack.clone(), 5);
        assert!(matches!(
            poll(&mut d, &Arc::default()),
            Poll::Ready(Err(Error::Closed))
        ));
        assert!(ack.wakers.lock().unwrap().is_empty());
    }
}
