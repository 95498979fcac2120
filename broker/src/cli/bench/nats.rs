//! The NATS JetStream side of `covet bench` (feature `nats-bench`), driven
//! through async-nats the way its documentation recommends for throughput:
//! asynchronous publishes whose acknowledgements are awaited later, and
//! consumers without acknowledgements for reading.
//!
//! Covet's partitions map to streams: `--partitions N` creates N file
//! streams (`<topic>-<i>` on subject `<topic>.<i>`), each its own log and,
//! in a cluster, its own Raft group, as a Covet partition is. Records go to
//! them in turn.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::Context;
use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::group::{HandledStream, Member};
use super::{AckFuture, NatsConsumer, Setup, ValueStream};
use crate::cli::Conn;

/// Acknowledgements the context lets wait at once; the harness enforces
/// the benchmark's own window below it.
const MAX_ACKS_IN_FLIGHT: usize = 1 << 20;

pub struct Nats {
    js: Context,
    streams: Vec<(String, String)>,
    next: usize,
    consumer: NatsConsumer,
    batch: usize,
}

impl Nats {
    pub async fn open(conn: &Conn, setup: &Setup) -> anyhow::Result<Nats> {
        let servers = conn
            .broker
            .split(',')
            .map(|s| s.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("'{}' is not a list of NATS server URLs", conn.broker))?;
        let client = async_nats::connect(servers)
            .await
            .context("connecting to NATS")?;
        let js = ContextBuilder::new()
            .timeout(Duration::from_secs(30))
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client);
        let mut streams = Vec::new();
        for i in 0..setup.partitions.max(1) {
            let name = format!("{}-{i}", stream_name(&setup.topic));
            let subject = format!("{}.{i}", setup.topic);
            let config = StreamConfig {
                name: name.clone(),
                subjects: vec![subject.clone()],
                storage: StorageType::File,
                num_replicas: setup.replication_factor.max(1) as usize,
                ..Default::default()
            };
            js.get_or_create_stream(config)
                .await
                .with_context(|| format!("creating stream {name}"))?;
            streams.push((name, subject));
        }
        Ok(Nats {
            js,
            streams,
            next: 0,
            consumer: setup.nats_consumer,
            batch: setup.nats_batch,
        })
    }

    pub async fn publish(&mut self, value: Bytes) -> anyhow::Result<AckFuture> {
        let (_, subject) = &self.streams[self.next % self.streams.len()];
        self.next = self.next.wrapping_add(1);
        let ack = self.js.publish(subject.clone(), value).await?;
        Ok(async move { ack.await.map(drop).map_err(anyhow::Error::from) }.boxed())
    }

    pub async fn subscribe(&self, from_start: bool) -> anyhow::Result<ValueStream> {
        let deliver_policy = if from_start {
            DeliverPolicy::All
        } else {
            DeliverPolicy::New
        };
        let mut all = Vec::new();
        for (name, _) in &self.streams {
            let stream = self.js.get_stream(name).await?;
            let values: ValueStream = match self.consumer {
                NatsConsumer::Ordered => stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy,
                        ..Default::default()
                    })
                    .await?
                    .messages()
                    .await?
                    .map_ok(|m| m.message.payload)
                    .map_err(anyhow::Error::from)
                    .boxed(),
                NatsConsumer::Pull => stream
                    .create_consumer(pull::Config {
                        deliver_policy,
                        ack_policy: AckPolicy::None,
                        inactive_threshold: Duration::from_secs(60),
                        ..Default::default()
                    })
                    .await?
                    .stream()
                    .max_messages_per_batch(self.batch)
                    .messages()
                    .await?
                    .map_ok(|m| m.message.payload)
                    .map_err(anyhow::Error::from)
                    .boxed(),
            };
            all.push(values);
        }
        Ok(futures::stream::select_all(all).boxed())
    }
}

impl Nats {
    /// Pulls from the durable consumer `group` of every stream (created by
    /// the first member) and acknowledges each message as it comes.
    pub async fn group_member(self, group: &str, max_in_flight: u32) -> anyhow::Result<Member> {
        let mut all = Vec::new();
        for (index, (name, _)) in self.streams.iter().enumerate() {
            let index = index as u32;
            let stream = self.js.get_stream(name).await?;
            let config = pull::Config {
                durable_name: Some(group.to_string()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                max_ack_pending: i64::from(max_in_flight),
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            };
            let consumer = stream
                .get_or_create_consumer(group, config)
                .await
                .with_context(|| format!("creating consumer {group} on {name}"))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.batch.min(max_in_flight as usize).max(1))
                .messages()
                .await?;
            let handled: HandledStream = messages
                .map_err(anyhow::Error::from)
                .and_then(move |m| async move {
                    let sequence = m.info().map_err(|e| anyhow::anyhow!(e))?.stream_sequence;
                    m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                    Ok((index, sequence))
                })
                .boxed();
            all.push(handled);
        }
        Ok(Member {
            handled: futures::stream::select_all(all).boxed(),
            owned: None,
        })
    }
}

/// Stream names may not hold `.`, `*`, `>` or whitespace.
fn stream_name(topic: &str) -> String {
    topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
