//! The Covet side of `covet bench`: the Rust client's producer and
//! `Subscription::next`, exactly as an application (and the Python client)
//! uses them.

use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use covet_client::{
    Client, GroupConsumerConfig, Membership, Producer, ProducerConfig, Reason, Record,
    StartPosition, SubscriptionOptions, TopicSpec,
};
use covet_protocol::batch::BatchBuilder;
use futures::{FutureExt, StreamExt};

use super::group::Member;
use super::{AckFuture, Setup, ValueStream};
use crate::cli::Conn;

/// The producer remembers at most this many batches per partition.
const MAX_BATCHES_IN_FLIGHT: usize = 128;
/// A benchmark member's session timeout: the client's default.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Covet {
    client: Client,
    producer: Producer,
    topic: String,
    window: u64,
}

impl Covet {
    pub async fn open(conn: &Conn, setup: &Setup) -> anyhow::Result<Covet> {
        let client = conn.connect().await?;
        let mut spec = TopicSpec::new(setup.topic.clone()).partitions(setup.partitions);
        spec.replication_factor = setup.replication_factor;
        match client.create_topic(spec).await {
            Ok(_) => {}
            Err(e) if e.reason() == Some(Reason::TopicExists) => {}
            Err(e) => return Err(e.into()),
        }
        let producer = client.producer(producer_config(setup));
        Ok(Covet {
            client,
            producer,
            topic: setup.topic.clone(),
            window: setup.window,
        })
    }

    pub async fn publish(&mut self, value: Bytes) -> anyhow::Result<AckFuture> {
        let record = Record {
            value,
            ..Record::default()
        };
        let delivery = self.producer.send(&self.topic, record).await?;
        Ok(delivery
            .map(|r| r.map(drop).map_err(anyhow::Error::from))
            .boxed())
    }

    pub async fn subscribe(&self, from_start: bool) -> anyhow::Result<ValueStream> {
        let from = if from_start {
            StartPosition::Earliest
        } else {
            StartPosition::Latest
        };
        let mut options = SubscriptionOptions::new(self.topic.clone(), from);
        options.window = self.window;
        let sub = self.client.subscribe(options).await?;
        Ok(futures::stream::unfold(sub, |mut sub| async move {
            let item = sub.next().await?;
            Some((item.map(|r| r.value).map_err(anyhow::Error::from), sub))
        })
        .boxed())
    }
}

impl Covet {
    /// Joins `group` on the topic; each record is acknowledged as it is
    /// handed out, as a handler that finished at once would.
    pub async fn group_member(
        self,
        group: &str,
        member: usize,
        max_in_flight: u32,
    ) -> anyhow::Result<Member> {
        let config = GroupConsumerConfig {
            max_in_flight,
            // The harness takes nothing until the group settled, and acks
            // every record it takes at once: a partition released while it
            // settles has nothing worth waiting for.
            release_grace: Duration::ZERO,
            ..GroupConsumerConfig::new(group, format!("bench-{member}"))
        };
        let consumer = self.client.group_consumer(config)?;
        let membership = Membership::join(
            self.client.clone(),
            group,
            vec![self.topic.clone()],
            SESSION_TIMEOUT,
            Arc::new(consumer.assigner()),
        )
        .await?;
        let assigner = consumer.assigner();
        let handled = futures::stream::unfold(
            (consumer, membership),
            |(mut consumer, membership)| async move {
                let handled = consumer
                    .next()
                    .await?
                    .map_err(anyhow::Error::from)
                    .map(|r| {
                        let at = (r.partition, r.offset);
                        r.ack();
                        at
                    });
                Some((handled, (consumer, membership)))
            },
        )
        .boxed();
        Ok(Member {
            handled,
            owned: Some(Box::new(move || assigner.owned().len())),
        })
    }
}

/// The harness enforces the record window; the producer runs with its
/// default batch window (what a user gets), over which natural batching
/// spreads the outstanding records. Only the one-record-per-batch preload
/// needs many batches in flight.
fn producer_config(setup: &Setup) -> ProducerConfig {
    let defaults = ProducerConfig::default();
    let batches = if setup.one_record_batches {
        MAX_BATCHES_IN_FLIGHT
    } else {
        defaults.max_in_flight
    };
    let mut config = ProducerConfig {
        linger: setup.linger,
        max_in_flight: setup.in_flight.clamp(1, batches),
        // Room for the whole window, whatever the record size.
        buffer_bytes: defaults
            .buffer_bytes
            .max(setup.in_flight.saturating_mul(setup.record_size + 64)),
        ..defaults
    };
    if setup.one_record_batches {
        // A batch is closed once it reaches this size, so each holds one.
        let record = Record {
            value: Bytes::from(vec![0; setup.record_size]),
            timestamp_ms: 1,
            ..Record::default()
        };
        config.max_batch_bytes = BatchBuilder::new().encoded_len_with(&record);
        config.linger = Duration::ZERO;
    }
    if setup.big_batches {
        config.max_batch_bytes = 1 << 20;
        config.linger = Duration::from_millis(5);
    }
    config
}
