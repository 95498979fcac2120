//! The schedule: a pure function of the seed and the cluster's shape.

use std::fmt;
use std::time::Duration;

use crate::cluster::NodeId;

/// A tiny, stable PRNG (SplitMix64): the schedule for a seed must never
/// change with a dependency's version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration in `[lo_ms, hi_ms]` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms.saturating_sub(lo_ms) + 1))
    }
}

/// A Raft group a fault can aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Group 0, the metadata group.
    Metadata,
    /// A partition of the load's topic.
    Partition(u32),
}

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Node(NodeId),
    /// The group's leader when the step starts, or `fallback` if the
    /// cluster names none then.
    LeaderOf {
        group: Group,
        fallback: NodeId,
    },
}

/// One fault; each is healed by its step (see [`Step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then a restart on the same data dir.
    Kill9(Target),
    /// A power cut (the process dies and what it had not synced is lost),
    /// then a restart; see [`super::PowerSupply`].
    PowerCut(Target),
    /// SIGSTOP, then SIGCONT.
    Pause(Target),
    /// Every link to and from the node dropped, then passed again.
    Isolate(Target),
    /// The one directed link from `from` to the node `skip` places after it
    /// (counting round the ids) dropped: `from`'s messages to it are lost,
    /// its messages to `from` still arrive.
    OneWay { from: Target, skip: u64 },
    /// Every link out of the node dropped: it hears the others, they do not
    /// hear it.
    Mute(Target),
    /// Every link to and from the node delayed.
    Delay { node: Target, delay: Duration },
    /// `remove-node`, wait until it left every group, then `add-node` and
    /// wait until it is back and caught up in every group.
    Membership(Target),
    /// Nothing: all healed, the load runs undisturbed.
    Quiet,
}

/// A fault, how long it is held before it is healed, and the quiet gap
/// after the heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    pub gap: Duration,
}

/// The faults of one run, derived from a seed; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

impl Schedule {
    /// Steps whose holds and gaps add up to at least `budget`, for a
    /// cluster of nodes `1..=nodes` loading `partitions` partitions. A run
    /// usually stops before the last ones (recoveries take time too).
    pub fn generate(seed: u64, budget: Duration, nodes: u64, partitions: u32) -> Schedule {
        let mut rng = Rng::new(seed);
        let mut steps = Vec::new();
        let mut planned = Duration::ZERO;
        while planned < budget {
            let step = random_step(&mut rng, nodes.max(1), partitions.max(1));
            planned += step.hold + step.gap;
            steps.push(step);
        }
        Schedule { seed, steps }
    }
}

fn random_target(rng: &mut Rng, nodes: u64, partitions: u32) -> Target {
    let fallback = 1 + rng.below(nodes);
    if rng.below(2) == 0 {
        return Target::Node(fallback);
    }
    // The metadata group as often as any one partition.
    let g = rng.below(u64::from(partitions) + 1);
    let group = if g == 0 {
        Group::Metadata
    } else {
        Group::Partition(g as u32 - 1)
    };
    Target::LeaderOf { group, fallback }
}

/// One step, its fault drawn by weight (kills and pauses most often).
fn random_step(rng: &mut Rng, nodes: u64, partitions: u32) -> Step {
    let target = random_target(rng, nodes, partitions);
    // Weights of the faults below, in order.
    const WEIGHTS: [u64; 9] = [14, 10, 14, 12, 12, 6, 12, 10, 10];
    let mut pick = rng.below(WEIGHTS.iter().sum());
    let kind = WEIGHTS
        .iter()
        .position(|&w| {
            let hit = pick < w;
            pick = pick.saturating_sub(w);
            hit
        })
        .unwrap_or(0);
    // Holds are fault windows: some shorter than the 1 s election timeout
    // (a blip the leader should ride out), most well past it.
    let (fault, hold) = match kind {
        0 => (Fault::Kill9(target), rng.millis(500, 6_000)),
        1 => (Fault::PowerCut(target), rng.millis(500, 6_000)),
        2 => (Fault::Pause(target), rng.millis(300, 5_000)),
        3 => (Fault::Isolate(target), rng.millis(500, 6_000)),
        4 => {
            let skip = 1 + rng.below(nodes.saturating_sub(1).max(1));
            let from = target;
            (Fault::OneWay { from, skip }, rng.millis(1_000, 8_000))
        }
        5 => (Fault::Mute(target), rng.millis(1_000, 6_000)),
        6 => {
            let delay = rng.millis(10, 400);
            (
                Fault::Delay {
                    node: target,
                    delay,
                },
                rng.millis(2_000, 8_000),
            )
        }
        7 => (Fault::Membership(target), rng.millis(500, 5_000)),
        _ => (Fault::Quiet, rng.millis(3_000, 8_000)),
    };
    Step {
        fault,
        hold,
        gap: rng.millis(500, 3_000),
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Metadata => write!(f, "the metadata group"),
            Group::Partition(p) => write!(f, "partition {p}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node {n}"),
            Target::LeaderOf { group, fallback } => {
                write!(f, "the leader of {group} (else node {fallback})")
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill9(t) => write!(f, "Kill9 {t}"),
            Fault::PowerCut(t) => write!(f, "PowerCut {t}"),
            Fault::Pause(t) => write!(f, "Pause (SIGSTOP) {t}"),
            Fault::Isolate(t) => write!(f, "Isolate {t}"),
            Fault::OneWay { from, skip } => {
                write!(
                    f,
                    "OneWay: drop the link from {from} to the node {skip} after it"
                )
            }
            Fault::Mute(t) => write!(f, "Mute: drop every link out of {t}"),
            Fault::Delay { node, delay } => {
                write!(f, "Delay every link of {node} by {} ms", delay.as_millis())
            }
            Fault::Membership(t) => write!(f, "Membership: remove-node {t}, then add-node"),
            Fault::Quiet => write!(f, "Quiet"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} for {:.1}s, then {:.1}s gap",
            self.fault,
            self.hold.as_secs_f64(),
            self.gap.as_secs_f64()
        )
    }
}
