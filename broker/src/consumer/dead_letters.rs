//! Writing a record to a dead-letter topic from a partition leader's group
//! session. The topic is created (one partition) the first time a group
//! needs it. The record is proposed like any produce and counts as written
//! once applied.
//!
//! Known limit: the dead-letter partition must be led by this node (always
//! so on a single node); elsewhere the write fails with `NOT_LEADER` and the
//! record stays queued, retried every second. Routing to the leader on
//! another node is still to do.

use std::time::Duration;

use covet_protocol::api::TopicConfig;
use covet_protocol::batch::{BatchBuilder, Record};

use crate::driver::NodeHandle;
use crate::error::{BrokerError, Result};
use crate::group::Applied;

/// How long to wait for a dead-letter topic just created to open here.
const TOPIC_OPEN_WAIT: Duration = Duration::from_secs(5);

/// Writes `record` to `topic`'s partition 0, creating the topic if needed.
pub async fn write(node: &NodeHandle, topic: &str, record: Record) -> Result<()> {
    let handle = match node.catalog.topic(topic) {
        Ok(t) => t,
        Err(BrokerError::UnknownTopic(_)) => {
            create(node, topic).await?;
            node.catalog.topic(topic)?
        }
        Err(e) => return Err(e),
    };
    let partition = handle.partition(0)?;
    partition.leading(node.node_id)?;
    let mut builder = BatchBuilder::new();
    builder.push(&record);
    let batch = builder
        .build()
        .ok_or_else(|| BrokerError::Internal("empty dead-letter batch".into()))?;
    let rx = node.submit_batch(topic, partition.group, batch).await?;
    match tokio::time::timeout(crate::driver::APPLY_TIMEOUT, rx).await {
        Ok(Ok(Ok(Applied::Batch { .. }))) => Ok(()),
        Ok(Ok(Ok(_))) => Err(BrokerError::Internal("dead letter answered oddly".into())),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(BrokerError::ShuttingDown),
        Err(_) => Err(BrokerError::Timeout("writing a dead letter".into())),
    }
}

async fn create(node: &NodeHandle, topic: &str) -> Result<()> {
    let config = TopicConfig {
        partitions: 1,
        replication_factor: 0,
        retention_ms: 0,
        retention_bytes: 0,
        max_batch_bytes: crate::service::DEFAULT_MAX_BATCH_BYTES,
    };
    match node.create_topic(topic.to_string(), config).await {
        Ok(_) | Err(BrokerError::TopicExists(_)) => {}
        Err(e) => return Err(e),
    }
    let mut changes = node.catalog.changes();
    let wait = async {
        while node.catalog.topic(topic).is_err() {
            if changes.changed().await.is_err() {
                return Err(BrokerError::ShuttingDown);
            }
        }
        Ok(())
    };
    tokio::time::timeout(TOPIC_OPEN_WAIT, wait)
        .await
        .map_err(|_| BrokerError::Timeout("waiting for the dead-letter topic to open".into()))?
}
