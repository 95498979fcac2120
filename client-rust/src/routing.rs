//! Finding the right node: seeds, per-node connections, the metadata
//! cache, and retrying calls that went to a node that does not lead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{MetadataRequest, MetadataResponse};
use covet_protocol::Reason;
use futures::stream::{FuturesUnordered, StreamExt};
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

/// Largest message the client sends or accepts.
const MAX_MESSAGE_BYTES: usize = 65 << 20;
/// How long a call keeps retrying through leader changes.
pub(crate) const RETRY_DEADLINE: Duration = Duration::from_secs(30);
/// How long a call may wait for the node's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one node gets to answer a metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the rest get once a majority of nodes has answered.
const MAJORITY_GRACE: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

pub(crate) type Rpc = CovetClient<Channel>;

/// What the client knows of the cluster.
pub(crate) struct Router {
    seeds: Vec<String>,
    /// Connections by node id (0: a seed whose id is not known yet).
    nodes: Mutex<HashMap<u64, (String, Rpc)>>,
    metadata: Mutex<Option<Arc<MetadataResponse>>>,
}

fn endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| Error::InvalidArgument(format!("bad broker address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        // Bounds unary calls and the start of streams (until the response
        // headers), never a stream's life: a paused node cannot hold a call.
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        // Large batches on one stream would stall on HTTP/2's small default
        // windows.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        // A node that stops answering (paused, cut off) is noticed within
        // seconds, so calls and streams fail over instead of hanging.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true))
}

fn rpc(channel: Channel) -> Rpc {
    CovetClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl Router {
    /// Connects to the cluster: asks every seed for metadata at once.
    pub(crate) async fn connect(seeds: &str) -> Result<Router> {
        let list: Vec<String> = seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if list.is_empty() {
            return Err(Error::InvalidArgument("no broker address given".into()));
        }
        let router = Router {
            seeds: list,
            nodes: Mutex::new(HashMap::new()),
            metadata: Mutex::new(None),
        };
        router.refresh().await?;
        Ok(router)
    }

    /// Asks every known node (and the seeds) for metadata at once and
    /// merges the answers: a node cut off from the others still answers,
    /// but with an old term, so for each partition (and for the metadata
    /// group) the answer naming a leader in the highest term wins. Waits for
    /// all answers, or a short grace once a majority has answered, or the
    /// timeout: a paused node cannot hold a refresh up.
    pub(crate) async fn refresh(&self) -> Result<Arc<MetadataResponse>> {
        let mut asks: FuturesUnordered<_> = self
            .candidates()
            .into_iter()
            .map(|(addr, known)| async move {
                let ask = async {
                    let mut client = match known {
                        Some(c) => c,
                        None => match endpoint(&addr)?.connect().await {
                            Ok(ch) => rpc(ch),
                            Err(e) => return Err(Error::Transport(source_chain(&e))),
                        },
                    };
                    let resp = client.metadata(MetadataRequest { topics: vec![] }).await?;
                    Ok((client, resp.into_inner()))
                };
                let outcome = match tokio::time::timeout(METADATA_TIMEOUT, ask).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Transport(format!(
                        "no answer within {METADATA_TIMEOUT:?}"
                    ))),
                };
                (addr, outcome)
            })
            .collect();
        let majority = asks.len() / 2 + 1;
        let mut answers = Vec::new();
        let mut last = String::new();
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                Some(deadline) => tokio::time::timeout_at(deadline, asks.next())
                    .await
                    .ok()
                    .flatten(),
                None => asks.next().await,
            };
            match next {
                None => break,
                Some((addr, Ok((client, meta)))) => {
                    answers.push((addr, client, meta));
                    if answers.len() >= majority && grace.is_none() {
                        grace = Some(tokio::time::Instant::now() + MAJORITY_GRACE);
                    }
                }
                Some((addr, Err(e))) => last = format!("{addr}: {e}"),
            }
        }
        if answers.is_empty() {
            return Err(Error::Connect {
                seeds: self.seeds.join(","),
                message: last,
            });
        }
        let merged = Arc::new(merge(answers.iter().map(|(_, _, m)| m)));
        for (addr, client, meta) in answers {
            self.learn(&meta, &addr, client);
        }
        *self.metadata.lock().expect("metadata lock") = Some(merged.clone());
        Ok(merged)
    }

    /// Addresses to ask, with a connection when one is open: known nodes
    /// first, then the seeds.
    fn candidates(&self) -> Vec<(String, Option<Rpc>)> {
        let mut out: Vec<(String, Option<Rpc>)> = Vec::new();
        {
            let nodes = self.nodes.lock().expect("nodes lock");
            for (addr, c) in nodes.values() {
                if !out.iter().any(|(a, _)| a == addr) {
                    out.push((addr.clone(), Some(c.clone())));
                }
            }
        }
        for s in &self.seeds {
            if !out.iter().any(|(a, _)| a == s) {
                out.push((s.clone(), None));
            }
        }
        out
    }

    fn learn(&self, meta: &MetadataResponse, addr: &str, client: Rpc) {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        nodes.insert(meta.node_id, (addr.to_string(), client));
        for n in &meta.nodes {
            let stale = nodes.get(&n.id).is_some_and(|(a, _)| *a != n.address);
            if !n.address.is_empty() && (stale || !nodes.contains_key(&n.id)) {
                if let Ok(ep) = endpoint(&n.address) {
                    nodes.insert(n.id, (n.address.clone(), rpc(ep.connect_lazy())));
                }
            }
        }
    }

    /// The cached metadata (refreshed when missing).
    pub(crate) async fn metadata(&self) -> Result<Arc<MetadataResponse>> {
        let cached = self.metadata.lock().expect("metadata lock").clone();
        match cached {
            Some(m) => Ok(m),
            None => self.refresh().await,
        }
    }

    /// A connection to node `id`, if its address is known.
    pub(crate) fn node(&self, id: u64) -> Option<Rpc> {
        self.nodes
            .lock()
            .expect("nodes lock")
            .get(&id)
            .map(|(_, c)| c.clone())
    }

    /// Any live connection (the node that answered metadata last).
    pub(crate) async fn any(&self) -> Result<Rpc> {
        let meta = self.metadata().await?;
        self.node(meta.node_id)
            .ok_or_else(|| Error::Transport("no connection to any broker".into()))
    }

    /// The node that leads `partition` of `topic` per the cache.
    pub(crate) async fn leader(&self, topic: &str, partition: u32) -> Result<(u64, Rpc)> {
        let meta = self.metadata().await?;
        let leader = meta
            .topics
            .iter()
            .find(|t| t.name == topic)
            .and_then(|t| t.partitions.get(partition as usize))
            .map(|p| p.leader)
            .unwrap_or(0);
        match self.node(leader) {
            Some(c) if leader != 0 => Ok((leader, c)),
            _ => Err(Error::Broker {
                reason: Reason::NotLeader,
                message: format!("no known leader for {topic}/{partition}"),
                leader_hint: 0,
            }),
        }
    }

    /// The metadata leader's connection, or any node when it is unknown.
    pub(crate) async fn controller(&self) -> Result<Rpc> {
        let meta = self.metadata().await?;
        match self.node(meta.controller) {
            Some(c) => Ok(c),
            None => self.any().await,
        }
    }

    /// Runs `call` until it succeeds, fails for good, or the deadline
    /// passes; retriable failures refresh the metadata and back off.
    pub(crate) async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_DEADLINE;
        let mut backoff = BACKOFF_MIN;
        loop {
            match call().await {
                Err(e) if e.is_retriable() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    let _ = self.refresh().await;
                }
                other => return other,
            }
        }
    }
}

/// One view from several nodes' answers: each partition's and the metadata
/// group's leader from the answer with the highest term that names one;
/// topics as the answer with the newest metadata knows them; every node
/// address anyone knows.
fn merge<'a>(answers: impl Iterator<Item = &'a MetadataResponse> + Clone) -> MetadataResponse {
    let newest = answers
        .clone()
        .max_by_key(|m| (m.controller_term, m.controller != 0))
        .cloned()
        .unwrap_or_default();
    let mut merged = newest;
    for m in answers.clone() {
        for n in &m.nodes {
            match merged.nodes.iter_mut().find(|x| x.id == n.id) {
                Some(x) if x.address.is_empty() => x.address = n.address.clone(),
                Some(_) => {}
                None => merged.nodes.push(n.clone()),
            }
        }
    }
    // A topic one node already applied and the newest answer not yet (a
    // topic just created) is still a topic: take the union, so a producer
    // that bootstraps right after `create_topic` does not fail with
    // UNKNOWN_TOPIC. (A topic just deleted may linger the same way; its
    // partitions' leaders refuse it.)
    for m in answers.clone() {
        for t in &m.topics {
            if !merged.topics.iter().any(|x| x.name == t.name) {
                merged.topics.push(t.clone());
            }
        }
    }
    for t in merged.topics.iter_mut() {
        for p in t.partitions.iter_mut() {
            let best = answers
                .clone()
                .filter_map(|m| m.topics.iter().find(|x| x.name == t.name))
                .filter_map(|x| x.partitions.get(p.partition as usize))
                .filter(|x| x.leader != 0)
                .max_by_key(|x| (x.leader_term, x.high_watermark));
            if let Some(b) = best {
                *p = b.clone();
            }
        }
    }
    merged
}

/// The error and its causes on one line; tonic's top-level transport error
/// alone says only "transport error".
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use covet_protocol::api::{MetadataResponse, PartitionInfo, TopicInfo};

    use super::merge;

    fn answer(node: u64, term: u64, topics: &[&str]) -> MetadataResponse {
        MetadataResponse {
            node_id: node,
            controller: 1,
            controller_term: term,
            topics: topics
                .iter()
                .map(|t| TopicInfo {
                    name: t.to_string(),
                    partitions: vec![PartitionInfo {
                        partition: 0,
                        leader: node,
                        leader_term: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_topic_the_newest_answer_has_not_applied_yet_is_kept() {
        // Node 2 answers with the newest controller term but has not yet
        // applied the topic node 1 already serves.
        let answers = [answer(1, 5, &["old", "new"]), answer(2, 6, &["old"])];
        let merged = merge(answers.iter());
        let mut names: Vec<&str> = merged.topics.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["new", "old"]);
    }
}
