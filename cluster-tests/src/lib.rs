//! `covet-cluster-tests`: multi-process fault tests for Covet clusters.
//!
//! This crate owns the machinery that proves the cluster's promise — an
//! acknowledged record is never lost, duplicated or reordered, and every
//! replica ends with the same committed log — by breaking real `covet
//! broker` processes on loopback and checking what survives:
//!
//! - [`proxy`]: a fault-injecting TCP proxy on every directed link between
//!   two nodes (pass, drop, delay; one-way and full partitions);
//! - [`cluster`]: [`Cluster`] starts n nodes in temp dirs on fixed ports
//!   with a proxy per link, and kills (SIGKILL), pauses (SIGSTOP/SIGCONT),
//!   terminates (SIGTERM), restarts, wipes and partitions them;
//! - [`workload`]: [`Load`], rate-paced producers of unique,
//!   sequence-numbered values and a consumer per partition, all recorded;
//! - [`checker`]: pure functions from that record to a [`Report`] (acked,
//!   lost, duplicated, out of order, consumer mismatches, gaps and repeats,
//!   unanswered sends, crashes and panics in node logs, time from fault to
//!   first produce), printed as one JSON line per scenario;
//!   [`Report::assert_clean`] is the one verdict every scenario uses;
//! - [`group_load`] and [`group_check`]: a consumer group under test
//!   (members that handle and acknowledge every record, and a sampler of
//!   every node's `describe`) and the pure checks of what they recorded
//!   (every acknowledged record handled, committed offsets monotonic and
//!   within the high watermark, lag 0 on every node at the end);
//! - [`replicas`]: the byte-for-byte comparison of replicas' committed logs
//!   (every assigned replica must serve its partition, reach lag 0 and hold
//!   everything up to the highest commit).
//!
//! The scenarios live in `tests/scenarios.rs` (consumer groups under faults
//! in `tests/group_faults.rs`); the proxy and the checkers have their own
//! tests in `tests/`.
//!
//! Invariants of the harness:
//! - no fixed sleep is used to synchronise: readiness is a node's `ready`
//!   line, leader changes and recovery are polled for with a deadline
//!   ([`wait_until`]); fixed durations only shape fault windows;
//! - every child process is killed when its [`Cluster`] drops; a failing
//!   test prints every node's last log lines and keeps the cluster's
//!   directory;
//! - memory is bounded: proxy queues, unanswered sends per producer and
//!   consumer credit all have fixed limits.
//!
//! Known limits: the `covet` binary is found next to the test executable
//! (built on first use, see [`covet_bin`]) or through `COVET_BIN`; node ports
//! are picked free below the kernel's ephemeral range and released before
//! the nodes bind them, so another process could in principle take one
//! first.

mod bin_path;
pub mod checker;
pub mod cluster;
pub mod group_check;
pub mod group_load;
pub mod nemesis;
mod node;
pub mod power;
pub mod proxy;
pub mod read;
pub mod replicas;
pub mod workload;

use std::future::Future;
use std::time::Duration;

pub use bin_path::covet_bin;
pub use checker::Report;
pub use cluster::{Cluster, NodeId};
pub use node::{log_tail, READY_TIMEOUT};
pub use proxy::{Mode, Proxy};
pub use workload::{Load, LoadConfig};

/// Bound on one `covet_client` call; longer than the client's own retry
/// deadline (30 s), so the client gets to ride out a leader change first.
pub const CLIENT_CALL_TIMEOUT: Duration = Duration::from_secs(40);

/// How often [`wait_until`] probes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Probes until `probe` yields a value or `timeout` passes (probing at
/// least once). A bounded poll for conditions that have no event to wait on,
/// such as "the cluster has a new leader".
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `Some(())` when every group any node reports has a leader view and every
/// leader view (a stale one included) satisfies `ok`: for polling with
/// [`wait_until`] until a membership change reached every group.
pub fn every_group(
    views: &[covet_client::ClusterStatusResponse],
    ok: impl Fn(&covet_client::GroupStatus) -> bool,
) -> Option<()> {
    let all = || views.iter().flat_map(|v| v.groups.iter());
    let leader_views: Vec<&covet_client::GroupStatus> =
        all().filter(|g| g.role == "leader").collect();
    let groups: std::collections::BTreeSet<u64> = all()
        .filter(|g| g.role != "faulted")
        .map(|g| g.group)
        .collect();
    let led: std::collections::BTreeSet<u64> = leader_views.iter().map(|g| g.group).collect();
    (led == groups && leader_views.iter().all(|g| ok(g))).then_some(())
}
