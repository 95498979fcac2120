//! The steady load a scenario runs under: producers sending unique,
//! sequence-numbered values at a fixed rate, and one consumer per
//! partition following the topic, all recorded for the [`checker`].
//!
//! Each producer task has its own `covet_client::Producer` (so its own
//! idempotent producer id) and sends `p{producer}-{seq:010}` with `seq`
//! counting up, going round the partitions, so within a partition each
//! producer's sequence numbers rise. It never resends a value itself: retrying is the client's
//! job, and an application-level resend could legitimately duplicate. A
//! failed send is counted as `failed` (it may or may not be stored).
//! Unanswered sends are bounded per producer and partition
//! ([`LoadConfig::window`]): a partition whose window is full is skipped
//! until answers come back, so an outage of one partition stalls only that
//! partition's share, and the producer waits only when every window is
//! full.
//!
//! Consumers reopen their stream after any failure, or after
//! [`CONSUMER_IDLE`] without a batch (the node they read from may be
//! paused), resuming after the last record they got. Each checks that the
//! offsets it is handed follow each other with no gap or repeat, across
//! reopenings ([`checker::Contiguity`]).
//!
//! [`checker`]: crate::checker

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use covet_client::{Reason, RecordMetadata, TopicSpec};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod tasks;

use crate::checker::{self, Ack, AckTiming, Contiguity, Logs, Report, Stored};
use crate::cluster::Cluster;
use crate::read::{read_partition, ReadEnd, Source};
use crate::replicas;
use tasks::{connect, consume, produce};

/// A consumer stream that delivers nothing for this long is reopened.
pub const CONSUMER_IDLE: Duration = Duration::from_secs(3);
/// How long producers may take to collect their last answers.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the final read of each partition may take.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long topic creation and its first leaders may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before a consumer or producer tries again after a failure.
const RETRY: Duration = Duration::from_millis(200);

/// Shape of the load.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub topic: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub producers: u32,
    /// Records per second each producer sends.
    pub rate_per_producer: u32,
    /// Records each producer sends at most.
    pub max_per_producer: u64,
    /// Sends each producer may have unanswered per partition.
    pub window: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            topic: "events".into(),
            partitions: 3,
            replication_factor: 3,
            producers: 3,
            rate_per_producer: 100,
            max_per_producer: 10_000,
            window: 100,
        }
    }
}

/// What the tasks record.
struct Shared {
    config: LoadConfig,
    seeds: String,
    acks: Mutex<Vec<(Ack, AckTiming)>>,
    acked: watch::Sender<u64>,
    sent: AtomicU64,
    failed: AtomicU64,
    /// Failed deliveries by error kind.
    errors: Mutex<std::collections::BTreeMap<String, u64>>,
    unresolved: AtomicU64,
    consumed: Mutex<Logs>,
    /// Per partition, whether its consumer saw contiguous offsets.
    contiguity: Mutex<BTreeMap<u32, Contiguity>>,
    faults: Mutex<Vec<Instant>>,
}

impl Shared {
    fn lock_acks(&self) -> std::sync::MutexGuard<'_, Vec<(Ack, AckTiming)>> {
        self.acks.lock().expect("acks lock")
    }

    fn record(
        &self,
        sent: Instant,
        value: bytes::Bytes,
        outcome: covet_client::Result<RecordMetadata>,
    ) {
        match outcome {
            Ok(meta) => {
                let ack = Ack {
                    partition: meta.partition,
                    offset: meta.offset,
                    value,
                };
                let timing = AckTiming {
                    partition: meta.partition,
                    sent,
                    acked: Instant::now(),
                };
                self.lock_acks().push((ack, timing));
                self.acked.send_modify(|n| *n += 1);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                // Tallied by kind, so a failing run says why sends failed.
                let text = e.to_string();
                let kind: String = match text.find("expected") {
                    Some(i) => text[i..].chars().take(30).collect(),
                    None => text.chars().take(60).collect(),
                };
                *self
                    .errors
                    .lock()
                    .expect("errors lock")
                    .entry(kind)
                    .or_default() += 1;
            }
        }
    }
}

/// A running load; see the module docs.
pub struct Load {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// Stops the producers only (see [`Load::stop_producers`]).
    stop_producing: watch::Sender<bool>,
    producers: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Load {
    /// Creates the topic, waits for a leader of every partition, and starts
    /// the producers and consumers.
    pub async fn start(cluster: &Cluster, config: LoadConfig) -> anyhow::Result<Load> {
        let seeds = cluster.client_addrs();
        create_topic(&seeds, &config).await?;
        for p in 0..config.partitions {
            cluster
                .wait_leader(&config.topic, p, SETUP_TIMEOUT, |_| true)
                .await?;
        }
        let (acked, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            config: config.clone(),
            seeds,
            acks: Mutex::default(),
            acked,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: Mutex::default(),
            unresolved: AtomicU64::new(0),
            consumed: Mutex::default(),
            contiguity: Mutex::default(),
            faults: Mutex::default(),
        });
        let (stop, _) = watch::channel(false);
        let (stop_producing, _) = watch::channel(false);
        let producers = (0..config.producers)
            .map(|id| tokio::spawn(produce(shared.clone(), id, stop_producing.subscribe())))
            .collect();
        let consumers = (0..config.partitions)
            .map(|p| tokio::spawn(consume(shared.clone(), p, stop.subscribe())))
            .collect();
        Ok(Load {
            shared,
            stop,
            stop_producing,
            producers,
            consumers,
            started: Instant::now(),
        })
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> u64 {
        *self.shared.acked.borrow()
    }

    /// A one-line summary for failure messages: sends, failures, and per
    /// partition the records acknowledged in all and since the latest fault
    /// (counted by send time).
    pub fn progress(&self) -> String {
        let fault = self.latest_fault();
        let acks = self.shared.lock_acks();
        let per: Vec<String> = (0..self.shared.config.partitions)
            .map(|p| {
                let mine = acks.iter().filter(|(a, _)| a.partition == p);
                let all = mine.clone().count();
                let since = mine
                    .filter(|(_, t)| fault.is_some_and(|f| t.sent >= f))
                    .count();
                format!("p{p}: {all} acked, {since} since the fault")
            })
            .collect();
        format!(
            "sent {}, failed {} {:?}, {}",
            self.shared.sent.load(Ordering::Relaxed),
            self.shared.failed.load(Ordering::Relaxed),
            self.shared.errors.lock().expect("errors lock"),
            per.join(", ")
        )
    }

    /// Waits until `more` records beyond those acknowledged now are.
    pub async fn wait_acked(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let target = self.acked() + more;
        let mut rx = self.shared.acked.subscribe();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|&n| n >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        if !reached {
            bail!(
                "only {} of {target} records acknowledged within {timeout:?}",
                self.acked()
            );
        }
        Ok(())
    }

    /// Every acknowledgement so far: where each acknowledged record landed.
    pub fn acks(&self) -> Vec<Ack> {
        self.shared
            .lock_acks()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Stops the producers and waits until each collected its last
    /// answers (the consumers go on until [`Load::finish`]): afterwards
    /// [`Load::acks`] is final.
    pub async fn stop_producers(&mut self) -> anyhow::Result<()> {
        let _ = self.stop_producing.send(true);
        for task in std::mem::take(&mut self.producers) {
            task.await.context("a producer task panicked")?;
        }
        Ok(())
    }

    /// Notes that a fault is being injected now.
    pub fn mark_fault(&self) {
        self.shared
            .faults
            .lock()
            .expect("faults lock")
            .push(Instant::now());
    }

    /// Waits until every partition has acknowledged a record sent after
    /// the latest fault, and returns how long that took from the fault.
    pub async fn wait_recovered(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let fault = self.latest_fault().context("no fault was marked")?;
        let partitions = self.shared.config.partitions;
        crate::wait_until(timeout, || async {
            let acks = self.shared.lock_acks();
            let timings: Vec<AckTiming> = acks.iter().map(|(_, t)| *t).collect();
            checker::recovery_time(fault, partitions, &timings)
        })
        .await
        .context("waiting for every partition to accept a produce after the fault")
    }

    fn latest_fault(&self) -> Option<Instant> {
        self.shared
            .faults
            .lock()
            .expect("faults lock")
            .last()
            .copied()
    }

    /// Stops the load, reads every partition back through the cluster,
    /// compares the replicas and reports. Comparing the replicas on disk
    /// kills every node, so the cluster is stopped afterwards (see
    /// [`replicas::check`]).
    pub async fn finish(mut self, cluster: &mut Cluster, scenario: &str) -> anyhow::Result<Report> {
        let _ = self.stop_producing.send(true);
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.producers)
            .into_iter()
            .chain(std::mem::take(&mut self.consumers));
        for task in tasks {
            task.await.context("a load task panicked")?;
        }
        let shared = &self.shared;
        let config = &shared.config;
        let acks: Vec<(Ack, AckTiming)> = shared.lock_acks().clone();
        let FinalRead { logs, ends, notes } = final_read(shared, &acks).await?;
        let consumed = shared.consumed.lock().expect("consumed lock").clone();
        let plain_acks: Vec<Ack> = acks.iter().map(|(a, _)| a.clone()).collect();
        let findings = checker::analyse(&plain_acks, &logs, &consumed);
        let timings: Vec<AckTiming> = acks.iter().map(|(_, t)| *t).collect();
        let faults = shared.faults.lock().expect("faults lock").clone();
        let recoveries: Vec<Option<Duration>> = faults
            .iter()
            .map(|&f| checker::recovery_time(f, config.partitions, &timings))
            .collect();
        let crashes = cluster.take_crashes();
        let replica = replicas::check(cluster, &config.topic, &ends).await;
        let mut detail = notes;
        detail.extend(replica.detail);
        let contiguity = shared.contiguity.lock().expect("contiguity lock").clone();
        Ok(Report {
            scenario: scenario.to_string(),
            replicas_identical: replica.identical,
            fault_to_first_produce: recoveries
                .iter()
                .copied()
                .collect::<Option<Vec<Duration>>>()
                .and_then(|r| r.into_iter().max()),
            sent: shared.sent.load(Ordering::Relaxed),
            failed: shared.failed.load(Ordering::Relaxed),
            unresolved: shared.unresolved.load(Ordering::Relaxed),
            consumed: consumed.values().map(|r| r.len() as u64).sum(),
            recoveries,
            replica_check: replica.method.to_string(),
            replica_detail: detail,
            crashes: crashes
                .into_iter()
                .map(|(id, status)| format!("node {id}: {status}"))
                .collect(),
            panics: cluster.panics(),
            consumer_gaps: contiguity.values().map(|c| c.gaps).sum(),
            consumer_repeats: contiguity.values().map(|c| c.repeats).sum(),
            consumer_anomalies: contiguity
                .iter()
                .filter_map(|(p, c)| Some(format!("partition {p}: {}", c.first.as_ref()?)))
                .collect(),
            elapsed: self.started.elapsed(),
            ..Report::default()
        }
        .with_findings(&findings))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for task in self.producers.iter().chain(&self.consumers) {
            task.abort();
        }
    }
}

/// Every partition as read back through the cluster after the load.
struct FinalRead {
    logs: Logs,
    /// Per partition, the offset after the last record read.
    ends: BTreeMap<u32, u64>,
    /// Reads that did not reach their target, and why.
    notes: Vec<String>,
}

/// Reads every partition from its start to at least its highest
/// acknowledged offset and its high watermark.
async fn final_read(shared: &Shared, acks: &[(Ack, AckTiming)]) -> anyhow::Result<FinalRead> {
    let topic = &shared.config.topic;
    let client = connect(&shared.seeds)
        .await
        .context("connecting for the final read")?;
    let mut out = FinalRead {
        logs: Logs::new(),
        ends: BTreeMap::new(),
        notes: Vec::new(),
    };
    for p in 0..shared.config.partitions {
        let until = acks
            .iter()
            .filter(|(a, _)| a.partition == p)
            .map(|(a, _)| a.offset + 1)
            .max()
            .unwrap_or(0);
        let deadline = tokio::time::Instant::now() + FINAL_READ_TIMEOUT;
        let read = read_partition(&client, Source::Leader, topic, p, until, deadline).await;
        if read.end != ReadEnd::Complete {
            out.notes.push(format!(
                "final read of partition {p} stopped at {} of {}: {:?}",
                read.records.len(),
                read.target,
                read.last_error
            ));
        }
        out.ends
            .insert(p, read.records.last().map_or(0, |r| r.offset + 1));
        out.logs
            .insert(p, read.records.iter().map(stored).collect());
    }
    Ok(out)
}

fn stored(r: &covet_client::ConsumedRecord) -> Stored {
    Stored {
        offset: r.offset,
        value: r.value.clone(),
    }
}

/// Creates the topic (the client retries while the cluster settles); an
/// existing topic is fine.
async fn create_topic(seeds: &str, config: &LoadConfig) -> anyhow::Result<()> {
    let spec = TopicSpec {
        name: config.topic.clone(),
        partitions: config.partitions,
        replication_factor: config.replication_factor,
        ..TopicSpec::default()
    };
    let created = tokio::time::timeout(SETUP_TIMEOUT, async {
        connect(seeds).await?.create_topic(spec).await
    })
    .await
    .with_context(|| format!("creating topic {} timed out", config.topic))?;
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.reason() == Some(Reason::TopicExists) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating topic {}", config.topic)),
    }
}
