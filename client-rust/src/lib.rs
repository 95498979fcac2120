//! `covet-client`: the async Rust client for Covet.
//!
//! It owns connecting to a cluster from a list of seed brokers, topic
//! administration, a batching producer ([`Producer`]) and credit-paced
//! consumption ([`Subscription`], [`PartitionStream`]). The `covet` command
//! line and the Python package are built on it; it holds the only client-side
//! copy of the protocol logic.
//!
//! Known limits: the client talks to the first seed that answers and does
//! not yet follow partition leaders across a cluster, and the producer does
//! not retry (it has no idempotence yet, so a retry could duplicate).

mod consumer;
mod error;
pub mod partitioner;
mod producer;

use std::time::Duration;

use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::*;
use tonic::transport::{Channel, Endpoint};

pub use consumer::{
    ConsumedRecord, PartitionStream, StartPosition, Subscription, SubscriptionOptions,
};
pub use covet_protocol::api::{PartitionInfo, TopicConfig, TopicInfo};
pub use covet_protocol::batch::{Header, Record};
pub use covet_protocol::Reason;
pub use error::{Error, Result};
pub use producer::{Delivery, Producer, ProducerConfig, RecordMetadata};

/// The broker address used when none is given.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7420";
/// Largest message the client sends or accepts.
const MAX_MESSAGE_BYTES: usize = 65 << 20;

/// Settings for creating a topic.
#[derive(Debug, Clone, Default)]
pub struct TopicSpec {
    pub name: String,
    /// 0 means the broker's default.
    pub partitions: u32,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub max_batch_bytes: Option<u32>,
    /// 0 means the broker's default.
    pub replication_factor: u32,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>) -> Self {
        TopicSpec {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }
}

/// A connection to a Covet cluster; cheap to clone.
#[derive(Clone)]
pub struct Client {
    rpc: CovetClient<Channel>,
}

impl Client {
    /// Connects to the first reachable broker of a comma-separated seed list
    /// (`HOST:PORT[,HOST:PORT...]`).
    pub async fn connect(seeds: &str) -> Result<Client> {
        let list: Vec<&str> = seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if list.is_empty() {
            return Err(Error::InvalidArgument("no broker address given".into()));
        }
        let mut last = String::new();
        for seed in &list {
            let uri = if seed.contains("://") {
                seed.to_string()
            } else {
                format!("http://{seed}")
            };
            let endpoint = Endpoint::from_shared(uri)
                .map_err(|e| Error::InvalidArgument(format!("bad broker address {seed}: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                // Large batches on one stream would stall on HTTP/2's small
                // default windows.
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(32 << 20)
                .http2_keep_alive_interval(Duration::from_secs(20));
            match endpoint.connect().await {
                Ok(channel) => {
                    let rpc = CovetClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    return Ok(Client { rpc });
                }
                Err(e) => last = format!("{seed}: {}", source_chain(&e)),
            }
        }
        Err(Error::Connect {
            seeds: list.join(","),
            message: last,
        })
    }

    pub(crate) fn rpc(&self) -> CovetClient<Channel> {
        self.rpc.clone()
    }

    /// Nodes and topics.
    pub async fn metadata(&self) -> Result<MetadataResponse> {
        Ok(self
            .rpc()
            .metadata(MetadataRequest { topics: vec![] })
            .await?
            .into_inner())
    }

    pub async fn create_topic(&self, spec: TopicSpec) -> Result<TopicInfo> {
        let req = CreateTopicRequest {
            name: spec.name,
            partitions: spec.partitions,
            retention_ms: spec.retention_ms,
            retention_bytes: spec.retention_bytes,
            max_batch_bytes: spec.max_batch_bytes,
            replication_factor: spec.replication_factor,
        };
        Ok(self.rpc().create_topic(req).await?.into_inner())
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.rpc()
            .delete_topic(DeleteTopicRequest {
                name: name.to_string(),
            })
            .await?;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        Ok(self
            .rpc()
            .list_topics(ListTopicsRequest {})
            .await?
            .into_inner()
            .topics)
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        Ok(self
            .rpc()
            .describe_topic(DescribeTopicRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner())
    }

    /// A batching producer; see [`ProducerConfig`].
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::start(self.clone(), config)
    }

    /// Opens one partition at a position with an initial credit (records).
    pub async fn open_partition(
        &self,
        topic: &str,
        partition: u32,
        from: StartPosition,
        credit: u64,
    ) -> Result<PartitionStream> {
        PartitionStream::open(self, topic, partition, from, credit).await
    }

    /// Follows several partitions (all by default), merged into one stream.
    pub async fn subscribe(&self, options: SubscriptionOptions) -> Result<Subscription> {
        Subscription::open(self, options).await
    }
}

/// The error and its causes on one line; tonic's top-level transport error
/// alone says only "transport error".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}
