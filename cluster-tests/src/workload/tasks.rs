//! The load's tasks: producers, consumers, and their connection helpers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use covet_client::{Client, ProducerConfig, Record, StartPosition};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::watch;

use super::{stored, Shared, CONSUMER_IDLE, DRAIN_TIMEOUT, RETRY};
use crate::checker;
use crate::CLIENT_CALL_TIMEOUT;

/// `Client::connect`, bounded by [`CLIENT_CALL_TIMEOUT`].
pub(super) async fn connect(seeds: &str) -> covet_client::Result<Client> {
    tokio::time::timeout(CLIENT_CALL_TIMEOUT, Client::connect(seeds))
        .await
        .unwrap_or_else(|_| Err(covet_client::Error::Transport("connect timed out".into())))
}

/// Connects, trying again until it works or the load stops.
async fn connect_until_stopped(seeds: &str, stop: &mut watch::Receiver<bool>) -> Option<Client> {
    while !*stop.borrow() {
        match connect(seeds).await {
            Ok(c) => return Some(c),
            Err(_) => pause(stop).await,
        }
    }
    None
}

/// One producer; see the module docs.
pub(super) async fn produce(shared: Arc<Shared>, id: u32, mut stop: watch::Receiver<bool>) {
    let config = &shared.config;
    let Some(client) = connect_until_stopped(&shared.seeds, &mut stop).await else {
        return;
    };
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(2),
        ..ProducerConfig::default()
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1) / config.rate_per_producer.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = FuturesUnordered::new();
    let mut window = Window::new(config.partitions, config.window);
    let mut seq = 0;
    while seq < config.max_per_producer && !*stop.borrow() {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some((partition, sent, value, outcome)) = pending.next(), if !pending.is_empty() => {
                window.answered(partition);
                shared.record(sent, value, outcome);
            }
            _ = tick.tick(), if window.has_room() => {
                let Some(partition) = window.take() else { continue };
                let value = checker::value_for(id, seq);
                seq += 1;
                shared.sent.fetch_add(1, Ordering::Relaxed);
                let record = Record { value: value.clone(), ..Record::default() };
                let sent = Instant::now();
                let send = producer.send_to(&config.topic, partition, record);
                match tokio::time::timeout(CLIENT_CALL_TIMEOUT, send).await {
                    Ok(Ok(delivery)) => pending.push(async move {
                        (partition, sent, value, delivery.await)
                    }),
                    _ => {
                        window.answered(partition);
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    while !pending.is_empty() {
        match tokio::time::timeout_at(deadline, pending.next()).await {
            Ok(Some((_, sent, value, outcome))) => shared.record(sent, value, outcome),
            Ok(None) => break,
            Err(_) => {
                shared
                    .unresolved
                    .fetch_add(pending.len() as u64, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// Unanswered sends per partition, each bounded, and whose turn it is: the
/// producer goes round the partitions, skipping those whose window is full,
/// so a stalled partition does not stop the load on the others.
struct Window {
    open: Vec<usize>,
    limit: usize,
    turn: usize,
}

impl Window {
    fn new(partitions: u32, limit: usize) -> Window {
        Window {
            open: vec![0; partitions.max(1) as usize],
            limit: limit.max(1),
            turn: 0,
        }
    }

    fn has_room(&self) -> bool {
        self.open.iter().any(|&n| n < self.limit)
    }

    /// The next partition with room, counted as holding one more send.
    fn take(&mut self) -> Option<u32> {
        let n = self.open.len();
        let p = (0..n)
            .map(|i| (self.turn + i) % n)
            .find(|&p| self.open[p] < self.limit)?;
        self.open[p] += 1;
        self.turn = p + 1;
        Some(p as u32)
    }

    fn answered(&mut self, partition: u32) {
        if let Some(n) = self.open.get_mut(partition as usize) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One partition's consumer; see the module docs.
pub(super) async fn consume(shared: Arc<Shared>, partition: u32, mut stop: watch::Receiver<bool>) {
    let topic = &shared.config.topic;
    let Some(client) = connect_until_stopped(&shared.seeds, &mut stop).await else {
        return;
    };
    let mut next = 0u64;
    while !*stop.borrow() {
        let from = if next == 0 {
            StartPosition::Earliest
        } else {
            StartPosition::Offset(next)
        };
        let open = client.open_partition(topic, partition, from, 1_000);
        let opened = tokio::select! {
            _ = stop.changed() => return,
            o = tokio::time::timeout(CLIENT_CALL_TIMEOUT, open) => o,
        };
        let Ok(Ok(mut stream)) = opened else {
            pause(&mut stop).await;
            continue;
        };
        shared
            .contiguity
            .lock()
            .expect("contiguity lock")
            .entry(partition)
            .or_default()
            .expect(stream.position());
        loop {
            let batch = tokio::select! {
                _ = stop.changed() => return,
                b = tokio::time::timeout(CONSUMER_IDLE, stream.next_batch()) => b,
            };
            let Ok(Ok(Some(records))) = batch else { break };
            next = stream.position();
            let n = records.len() as u64;
            {
                let mut contiguity = shared.contiguity.lock().expect("contiguity lock");
                let c = contiguity.entry(partition).or_default();
                for r in &records {
                    c.saw(r.offset);
                }
            }
            shared
                .consumed
                .lock()
                .expect("consumed lock")
                .entry(partition)
                .or_default()
                .extend(records.iter().map(stored));
            if stream.grant(n).await.is_err() {
                break;
            }
        }
    }
}

/// Waits [`RETRY`] before trying again, or less if the load stops.
async fn pause(stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        Ok(()) = stop.changed() => {}
        () = tokio::time::sleep(RETRY) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn window_goes_round_and_skips_full_partitions() {
        let mut w = Window::new(3, 2);
        let firsts: Vec<u32> = (0..3).filter_map(|_| w.take()).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        assert_eq!(w.take(), Some(0));
        // Partition 0 is full now; partition 1 takes one more, then 2.
        assert_eq!(w.take(), Some(1));
        assert_eq!(w.take(), Some(2));
        assert!(!w.has_room());
        assert_eq!(w.take(), None);
        w.answered(1);
        assert!(w.has_room());
        assert_eq!(w.take(), Some(1));
        assert_eq!(w.take(), None);
    }
}
