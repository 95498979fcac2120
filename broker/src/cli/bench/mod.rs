//! `covet bench`: throughput and latency of a running broker, Covet's or,
//! for comparison, NATS JetStream's. Figures are printed as one JSON line
//! per run, never asserted: they belong in docs/benchmarks.md.
//!
//! `produce` and `consume` are the first, Covet-only benchmarks
//! ([`classic`]). `pub`, `read` and `e2e` drive either system through the
//! same loops ([`drive`], [`e2e`]) behind one small interface ([`Backend`]), so both
//! see the same payloads, windows and schedules: a closed loop with a window
//! of outstanding publishes, an open loop on an absolute schedule whose
//! latency is taken from each record's intended send time (so a stalled
//! broker cannot hide its stall by slowing the sender: no coordinated
//! omission), a read of everything from the start, and publish→deliver
//! latency from a subscriber on the tail. Every run is bounded in records
//! and in time (`--duration-s`). The NATS side is compiled only with the
//! `nats-bench` feature; `scripts/bench-vs-nats.sh` starts the brokers.

mod classic;
mod covet;
mod drive;
mod e2e;
mod group;
#[cfg(feature = "nats-bench")]
mod nats;
mod stats;

use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use super::Conn;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Produce records as fast as the producer allows (Covet only).
    Produce(classic::ProduceArgs),
    /// Consume records from the start of a topic (Covet only).
    Consume(classic::ConsumeArgs),
    /// Publish with a window of outstanding publishes, or at a set rate;
    /// throughput and publish→acknowledgement latency.
    Pub(PubArgs),
    /// Preload records, then time reading all of them from the start.
    Read(ReadArgs),
    /// Publish→deliver latency: a subscriber on the tail while a publisher
    /// publishes at a set rate.
    E2e(E2eArgs),
    /// Preload, read once plainly, then consume as a group with every
    /// record acknowledged: 1 or more members against the plain read.
    Group(group::GroupArgs),
}

/// Which broker the benchmark talks to.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Covet,
    /// NATS JetStream (needs the `nats-bench` build feature).
    Nats,
}

/// What every `pub`, `read` and `e2e` run shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The system under test.
    #[arg(long, value_enum, default_value_t = BackendKind::Covet)]
    backend: BackendKind,
    /// Covet topic, or NATS subject and stream name.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Records at most.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Seconds at most for each timed phase (a run stops publishing at this
    /// bound and reports what was acknowledged).
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Seconds at most to wait for outstanding acknowledgements once
    /// publishing stopped; what is still unacknowledged then is reported
    /// as not acknowledged.
    #[arg(long, default_value_t = 30.0)]
    drain_s: f64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 128)]
    record_size: usize,
    /// Covet partitions; with NATS, this many streams (one subject each),
    /// published to in turn.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Replicas (0: Covet's default; 1 for NATS).
    #[arg(long, default_value_t = 0)]
    replication_factor: u32,
    /// Covet seed brokers; with `--backend nats`, the NATS server URL(s),
    /// comma separated.
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct PubArgs {
    #[command(flatten)]
    common: Common,
    /// Publishes outstanding at once (1: send, await its acknowledgement,
    /// send the next).
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Covet producer linger in milliseconds (NATS has none).
    #[arg(long, default_value_t = 0.0)]
    linger_ms: f64,
    /// Records per second on an absolute schedule (open loop); 0 means a
    /// closed loop limited by `--in-flight`.
    #[arg(long, default_value_t = 0)]
    rate: u64,
}

#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    common: Common,
    /// Preload in large batches (Covet: 1 MiB, linger 5 ms) instead of one
    /// record per batch. NATS stores every message alone either way.
    #[arg(long)]
    preload_batch: bool,
    /// Covet credit window per partition, in records.
    #[arg(long, default_value_t = 20_000)]
    window: u64,
    /// How NATS reads: an ordered consumer, or a pull consumer without
    /// acknowledgements fetching `--nats-batch` messages per request.
    #[arg(long, value_enum, default_value_t = NatsConsumer::Pull)]
    nats_consumer: NatsConsumer,
    #[arg(long, default_value_t = 10_000)]
    nats_batch: usize,
}

#[derive(Args, Debug)]
pub struct E2eArgs {
    #[command(flatten)]
    common: Common,
    /// Records per second published.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Covet producer linger in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    linger_ms: f64,
    /// Covet credit window per partition, in records.
    #[arg(long, default_value_t = 20_000)]
    window: u64,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsConsumer {
    Pull,
    Ordered,
}

/// How a backend is opened for one phase of a run.
#[derive(Debug, Clone)]
pub struct Setup {
    pub topic: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub record_size: usize,
    /// Publishes the harness keeps outstanding.
    pub in_flight: usize,
    pub linger: Duration,
    /// Covet: close every batch after one record.
    pub one_record_batches: bool,
    /// Covet: 1 MiB batches and 5 ms linger (the read preload's option).
    pub big_batches: bool,
    pub window: u64,
    pub nats_consumer: NatsConsumer,
    pub nats_batch: usize,
}

impl Setup {
    fn new(c: &Common) -> Setup {
        Setup {
            topic: c.topic.clone(),
            partitions: c.partitions.max(1),
            replication_factor: c.replication_factor,
            record_size: c.record_size,
            in_flight: 1,
            linger: Duration::ZERO,
            one_record_batches: false,
            big_batches: false,
            window: 20_000,
            nats_consumer: NatsConsumer::Pull,
            nats_batch: 10_000,
        }
    }
}

/// Resolves when the broker acknowledged one publish.
pub type AckFuture = BoxFuture<'static, anyhow::Result<()>>;
/// Values of consumed records, in order per partition.
pub type ValueStream = BoxStream<'static, anyhow::Result<Bytes>>;

/// Either system, behind the three operations the loops need.
pub enum Backend {
    Covet(covet::Covet),
    // Boxed: the JetStream context is several times the size of Covet's
    // handles.
    #[cfg(feature = "nats-bench")]
    Nats(Box<nats::Nats>),
}

impl Backend {
    async fn open(kind: BackendKind, conn: &Conn, setup: &Setup) -> anyhow::Result<Backend> {
        match kind {
            BackendKind::Covet => Ok(Backend::Covet(covet::Covet::open(conn, setup).await?)),
            #[cfg(feature = "nats-bench")]
            BackendKind::Nats => Ok(Backend::Nats(Box::new(
                nats::Nats::open(conn, setup).await?,
            ))),
            #[cfg(not(feature = "nats-bench"))]
            BackendKind::Nats => anyhow::bail!(
                "this covet was built without the NATS backend: \
                 build with `cargo build --release -p covet-broker --features nats-bench` \
                 (scripts/bench-vs-nats.sh does)"
            ),
        }
    }

    /// Queues one record (partitions in turn); the returned future
    /// resolves on its acknowledgement.
    async fn publish(&mut self, value: Bytes) -> anyhow::Result<AckFuture> {
        match self {
            Backend::Covet(b) => b.publish(value).await,
            #[cfg(feature = "nats-bench")]
            Backend::Nats(b) => b.publish(value).await,
        }
    }

    /// Values from the start of every partition, or only those published
    /// after the call.
    async fn subscribe(&self, from_start: bool) -> anyhow::Result<ValueStream> {
        match self {
            Backend::Covet(b) => b.subscribe(from_start).await,
            #[cfg(feature = "nats-bench")]
            Backend::Nats(b) => b.subscribe(from_start).await,
        }
    }

    /// Opens a connection of its own and joins consumer group `group` on
    /// the topic as member number `member`; the stream yields each record
    /// handed out, already acknowledged.
    async fn group_member(
        kind: BackendKind,
        conn: &Conn,
        setup: &Setup,
        group: &str,
        member: usize,
        max_in_flight: u32,
    ) -> anyhow::Result<group::Member> {
        match Backend::open(kind, conn, setup).await? {
            Backend::Covet(b) => b.group_member(group, member, max_in_flight).await,
            #[cfg(feature = "nats-bench")]
            Backend::Nats(b) => b.group_member(group, max_in_flight).await,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Covet(_) => "covet",
            #[cfg(feature = "nats-bench")]
            Backend::Nats(_) => "nats",
        }
    }
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Produce(a) => classic::produce(a).await,
        BenchCommand::Consume(a) => classic::consume(a).await,
        BenchCommand::Pub(a) => drive::publish(a).await,
        BenchCommand::Read(a) => drive::read(a).await,
        BenchCommand::E2e(a) => e2e::e2e(a).await,
        BenchCommand::Group(a) => group::group(a).await,
    }
}
