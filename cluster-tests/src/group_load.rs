//! A consumer group under test: members that handle and acknowledge every
//! record, recording each handling, and a sampler that asks every node to
//! describe the group, recording what each answers. What they record is
//! what [`crate::group_check`] judges.
//!
//! A [`Member`] is a `covet_client::GroupConsumer` driven by a
//! `Membership`, on a tokio runtime of the caller's choosing: the test's
//! own, or one of its own ([`Member::start_isolated`]) that can be shut
//! down at once, so that the member dies as a killed process would,
//! heartbeats, sessions and unsent acknowledgements included.
//!
//! The [`Sampler`] asks every node at once every [`SAMPLE_EVERY`], each
//! call bounded by [`SAMPLE_TIMEOUT`], and waits for all before the next
//! round: one call in flight per node, so a node's answers are recorded in
//! the order it gave them. A node that is down simply gives no sample.
//! Each answer is tagged with the node's incarnation, which the test raises
//! before it kills or cuts the node ([`Sampler::restarting`]), so that
//! going backwards within one process and staleness after a restart are
//! told apart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use covet_client::{Client, GroupConsumerConfig, Membership};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::NodeId;
use crate::group_check::{Handled, Sample};

/// How often the sampler asks every node.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bound on one describe call of the sampler.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a member keeps trying to connect and join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two tries to join.
const RETRY: Duration = Duration::from_millis(200);

/// What every member of a run records, shared.
#[derive(Debug, Default)]
pub struct GroupLog {
    handled: Mutex<Vec<Handled>>,
    /// Errors that ended a partition's session, as `next` returned them.
    errors: Mutex<Vec<String>>,
}

impl GroupLog {
    /// Every handling so far, in order.
    pub fn handled(&self) -> Vec<Handled> {
        self.handled.lock().expect("handled lock").clone()
    }

    /// How many handlings so far.
    pub fn handlings(&self) -> usize {
        self.handled.lock().expect("handled lock").len()
    }

    /// Handlings so far on each partition that has any.
    pub fn per_partition(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for h in self.handled.lock().expect("handled lock").iter() {
            *out.entry(h.partition).or_default() += 1;
        }
        out
    }

    /// Every session-ending error so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }
}

/// A run's [`GroupLog`], shared by its members.
pub type HandledLog = Arc<GroupLog>;

/// How a member joins and consumes.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub group: String,
    pub topics: Vec<String>,
    pub session_timeout: Duration,
    pub max_in_flight: u32,
}

/// One member handling and acknowledging every record; see the module
/// docs.
pub struct Member {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    /// The member's own runtime, when it has one.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Member {
    /// Starts a member on the current runtime; it joins in the
    /// background.
    pub fn start(seeds: &str, config: MemberConfig, log: HandledLog) -> Member {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(seeds.to_string(), config, log, stopped));
        Member {
            stop,
            task,
            runtime: None,
        }
    }

    /// Starts a member on a runtime of its own (one worker thread), which
    /// [`Member::kill`] shuts down.
    pub fn start_isolated(
        seeds: &str,
        config: MemberConfig,
        log: HandledLog,
    ) -> anyhow::Result<Member> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("building the member's runtime")?;
        let (stop, stopped) = watch::channel(false);
        let task = runtime.spawn(run(seeds.to_string(), config, log, stopped));
        Ok(Member {
            stop,
            task,
            runtime: Some(runtime),
        })
    }

    /// Stops handling records and leaves the group gracefully (what was
    /// acknowledged is committed).
    pub async fn leave(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let outcome = (&mut self.task).await.context("the member's task")?;
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        outcome
    }

    /// Ends the member at once, as kill -9 of its process would: nothing
    /// more is sent, acknowledged or committed on its behalf. Only for a
    /// member started with [`Member::start_isolated`] (others are simply
    /// aborted, which leaves their background heartbeats running).
    pub fn kill(mut self) {
        self.task.abort();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Connects and joins (trying again until [`JOIN_TIMEOUT`]), then handles
/// records until told to stop, then leaves.
async fn run(
    seeds: String,
    config: MemberConfig,
    log: HandledLog,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let (mut consumer, membership) = loop {
        match join(&seeds, &config).await {
            Ok(joined) => break joined,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context("joining within the deadline"))
            }
            Err(_) => tokio::time::sleep(RETRY).await,
        }
    };
    loop {
        let next = tokio::select! {
            _ = stopped.changed() => break,
            n = consumer.next() => n,
        };
        match next {
            Some(Ok(r)) => {
                log.handled.lock().expect("handled lock").push(Handled {
                    partition: r.partition,
                    offset: r.offset,
                    value: r.value.clone(),
                    delivery_count: r.delivery_count,
                });
                r.ack();
            }
            // A session ended (fenced by a newer generation, or failed
            // for good): recorded for the report; the partition comes back
            // with the member's next assignment.
            Some(Err(e)) => log.errors.lock().expect("errors lock").push(e.to_string()),
            None => break,
        }
    }
    membership.leave().await.context("leaving the group")
}

async fn join(
    seeds: &str,
    config: &MemberConfig,
) -> anyhow::Result<(covet_client::GroupConsumer, Membership)> {
    let client = Client::connect(seeds).await?;
    let mut consumer_config = GroupConsumerConfig::new(config.group.clone(), "m");
    consumer_config.max_in_flight = config.max_in_flight;
    let consumer = client.group_consumer(consumer_config)?;
    let membership = Membership::join(
        client,
        &config.group,
        config.topics.clone(),
        config.session_timeout,
        Arc::new(consumer.assigner()),
    )
    .await?;
    Ok((consumer, membership))
}

/// Polls every node's `describe` of a group; see the module docs.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    /// Each node's incarnation, raised by [`Sampler::restarting`].
    incarnations: Arc<Mutex<BTreeMap<NodeId, u32>>>,
    task: JoinHandle<()>,
}

impl Sampler {
    /// Starts asking `nodes` through `client` about `group`.
    pub fn start(client: Client, nodes: Vec<NodeId>, group: &str) -> Sampler {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let incarnations: Arc<Mutex<BTreeMap<NodeId, u32>>> = Arc::default();
        let (record, runs) = (samples.clone(), incarnations.clone());
        let group = group.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let asks = nodes.iter().map(|&n| {
                    // Read before asking: an answer on its way when the
                    // node is killed belongs to the run that gave it.
                    let run = runs.lock().expect("incarnations lock").get(&n).copied();
                    let (client, group) = (&client, &group);
                    async move {
                        let mut answer = describe(client, n, group).await?;
                        for s in &mut answer {
                            s.incarnation = run.unwrap_or(0);
                        }
                        Some(answer)
                    }
                });
                for answer in futures::future::join_all(asks).await.into_iter().flatten() {
                    record.lock().expect("samples lock").extend(answer);
                }
            }
        });
        Sampler {
            samples,
            incarnations,
            task,
        }
    }

    /// Notes that `node` is about to be killed or cut (call before):
    /// its answers from then on belong to its next run.
    pub fn restarting(&self, node: NodeId) {
        *self
            .incarnations
            .lock()
            .expect("incarnations lock")
            .entry(node)
            .or_default() += 1;
    }

    /// Every sample so far, in the order taken.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples lock").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `node`'s answer to describing `group`, one sample per partition it
/// holds progress of (incarnation 0); `None` if it did not answer in
/// time.
pub async fn describe(client: &Client, node: NodeId, group: &str) -> Option<Vec<Sample>> {
    let answer = tokio::time::timeout(SAMPLE_TIMEOUT, client.describe_group_on(node, group))
        .await
        .ok()?
        .ok()?;
    Some(
        answer
            .partitions
            .iter()
            .map(|p| Sample {
                node,
                incarnation: 0,
                partition: p.partition,
                committed: p.committed,
                high_watermark: p.high_watermark,
                lag: p.lag,
            })
            .collect(),
    )
}
