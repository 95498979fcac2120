//! Writing a record to a dead-letter topic from a partition leader's group
//! session. The dead-letter partition may be led by any node, so the
//! leader writes through a client of its own cluster (connected to its own
//! client address, routed to the leader like any producer). The topic is
//! created (one partition) the first time a group needs it. A record counts
//! as written once its produce is acknowledged.

use std::time::Duration;

use covet_client::{Client, Producer, ProducerConfig, Reason, Record, TopicSpec};
use tokio::sync::OnceCell;

use crate::error::{BrokerError, Result};

/// How long one dead-letter write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// This node's producer for dead letters, made on first use.
pub struct DeadLetters {
    seed: String,
    producer: OnceCell<(Client, Producer)>,
}

fn failed(e: covet_client::Error) -> BrokerError {
    BrokerError::Internal(format!("dead-letter write: {e}"))
}

impl DeadLetters {
    /// Dead letters written through the broker at `seed` (this node's
    /// client address).
    pub fn new(seed: String) -> DeadLetters {
        DeadLetters {
            seed,
            producer: OnceCell::new(),
        }
    }

    /// Writes `record` to `topic`'s partition 0, creating the topic if
    /// needed.
    pub async fn write(&self, topic: &str, record: Record) -> Result<()> {
        let (client, producer) = self
            .producer
            .get_or_try_init(|| async {
                let client = Client::connect(&self.seed).await.map_err(failed)?;
                let producer = client.producer(ProducerConfig {
                    linger: Duration::ZERO,
                    ..Default::default()
                });
                Ok::<_, BrokerError>((client, producer))
            })
            .await?;
        let send = async {
            match client.describe_topic(topic).await {
                Ok(_) => {}
                Err(e) if e.reason() == Some(Reason::UnknownTopic) => {
                    match client.create_topic(TopicSpec::new(topic)).await {
                        Ok(_) => {}
                        Err(e) if e.reason() == Some(Reason::TopicExists) => {}
                        Err(e) => return Err(failed(e)),
                    }
                }
                Err(e) => return Err(failed(e)),
            }
            let delivery = producer.send_to(topic, 0, record).await.map_err(failed)?;
            producer.flush().await.map_err(failed)?;
            delivery.await.map_err(failed)?;
            Ok(())
        };
        tokio::time::timeout(WRITE_TIMEOUT, send)
            .await
            .map_err(|_| BrokerError::Timeout("writing a dead letter".into()))?
    }
}
