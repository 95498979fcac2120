//! The nemesis: a seeded random schedule of faults run against a cluster
//! under steady load, with the checker at the end.
//!
//! [`Schedule::generate`] turns a seed into a list of [`Step`]s, each a
//! [`Fault`] held for a while and then healed, followed by a gap: kill -9
//! and restart, power cut and restart, SIGSTOP and SIGCONT, a full
//! partition of one node, one directed link dropped, every link out of one
//! node dropped, delayed links, `remove-node` then `add-node`, and quiet
//! stretches with no fault. The schedule is a pure function of the seed and
//! the cluster's shape, so a failing run is reproduced by its seed (the
//! processes' timing is not reproducible, the schedule is). A fault aimed at
//! "the leader of" a group names a fallback node, used when no leader is
//! known at that moment, so resolving a target needs no randomness either.
//!
//! [`run`] executes a schedule: one fault at a time, so a majority always
//! exists and the load can progress; after each heal it requires every
//! partition to acknowledge a record sent after the heal. It stops starting
//! steps once its time budget is spent, heals everything, waits until every
//! group has a leader, lists every node and has every replica caught up,
//! then stops the load and requires from the checker lost = 0, duplicated =
//! 0, out of order = 0, no unresolved send, identical replicas, no crash and
//! no `panicked at` in any node's log. Each step is printed as it runs (and
//! written into every node's log), with the time since the start and the
//! wall-clock time the node logs use; every failure message names the seed.
//!
//! Environment:
//! - `COVET_NEMESIS_SEED`: the seed (default: taken from the clock); always
//!   printed first as `nemesis seed = N`;
//! - `COVET_NEMESIS_SECS`: how long faults are injected, in seconds
//!   (default [`DEFAULT_SECS`]; e.g. 600 for a soak run). Setup, the final
//!   convergence and the checker come on top.
//!
//! Power cuts go through a [`PowerSupply`]; [`FusePower`] cuts nodes whose
//! data dirs are on the power-loss filesystem (`covet-powerfs`), losing
//! every write they had not synced.

mod runner;
mod schedule;

pub use runner::run;
pub use schedule::{Fault, Group, Rng, Schedule, Step, Target};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::future::BoxFuture;

use crate::cluster::{Cluster, NodeId};
use crate::workload::LoadConfig;

/// Default fault-injection time in seconds; with setup and the final check
/// a run takes about two minutes.
pub const DEFAULT_SECS: u64 = 90;
/// Bound on every recovery: progress after a heal, a membership change
/// taking effect, a node catching up.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// Records acknowledged before the first fault.
const WARMUP_ACKS: u64 = 300;
/// Records acknowledged after everything healed, before the load stops.
const TAIL_ACKS: u64 = 600;
/// Pause between two membership or status probes.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How a `PowerCut` step cuts a node's power and brings it back. On the
/// power-loss filesystem, with each node's data dir a mount of its own,
/// `cut` drops the mount's unsynced writes (after which every file
/// operation of the node fails) and then SIGKILLs the node; `restore`
/// mounts the backing directory again on the data dir. The runner calls
/// `restore` before restarting a node it cut, in the step or in the final
/// heal.
pub trait PowerSupply: Send + Sync {
    /// Stops the node as a power cut would: the process dies at once and
    /// every write it had not synced is lost.
    fn cut<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Makes the node's data dir usable again; the runner restarts the node
    /// right after.
    fn restore<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Power cuts on the power-loss filesystem, for a cluster started with
/// [`Cluster::start_powered`]: `cut` SIGKILLs the node, drops every write
/// and directory entry it had not synced (or, as the seed picks, lets the
/// unsynced writes land with the last one torn, or a random subset of
/// them), and mounts what survived again, so `restore` has nothing left to
/// do.
#[derive(Debug, Default)]
pub struct FusePower {
    seed: u64,
    cuts: AtomicU64,
}

impl FusePower {
    /// Cuts whose faults follow from `seed` (the run's seed).
    pub fn new(seed: u64) -> FusePower {
        FusePower {
            seed,
            cuts: AtomicU64::new(0),
        }
    }
}

impl PowerSupply for FusePower {
    fn cut<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let n = self.cuts.fetch_add(1, Ordering::Relaxed);
        let seed = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Box::pin(async move {
            let stats = cluster.power_cut(&[node], seed).await?;
            for (id, s) in stats {
                println!("nemesis: power cut of node {id}: {s:?}");
            }
            Ok(())
        })
    }

    fn restore<'a>(&'a self, _: &'a mut Cluster, _: NodeId) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a run is given.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub seed: u64,
    /// How long faults are injected.
    pub budget: Duration,
    pub load: LoadConfig,
}

impl NemesisConfig {
    /// The seed and budget from the environment (see the module docs), and
    /// the default load, sending for as long as the run lasts.
    pub fn from_env() -> anyhow::Result<NemesisConfig> {
        let seed = match std::env::var("COVET_NEMESIS_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("COVET_NEMESIS_SEED={s} is not a u64"))?,
            Err(_) => clock_seed(),
        };
        let secs = match std::env::var("COVET_NEMESIS_SECS") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("COVET_NEMESIS_SECS={s} is not a number of seconds"))?,
            Err(_) => DEFAULT_SECS,
        };
        Ok(NemesisConfig {
            seed,
            budget: Duration::from_secs(secs),
            load: LoadConfig {
                max_per_producer: u64::MAX,
                ..LoadConfig::default()
            },
        })
    }
}

fn clock_seed() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Mixed once so that seeds taken a second apart do not look alike.
    Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
}
