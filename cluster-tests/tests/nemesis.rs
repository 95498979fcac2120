//! The nemesis run (see `covet_cluster_tests::nemesis`): a seeded random
//! schedule of kill -9, power cuts, SIGSTOP, full and one-way partitions,
//! delays and membership changes against a 3-node cluster under load, with
//! the checker at the end. About two minutes by default.
//!
//! Reproduce a failure with the seed it printed, and soak for longer:
//!
//! ```text
//! COVET_NEMESIS_SEED=1234 COVET_NEMESIS_SECS=600 \
//!     cargo test -p covet-cluster-tests --test nemesis -- --nocapture
//! ```
//!
//! The schedule's own tests here need no cluster.

use std::time::Duration;

use covet_cluster_tests::nemesis::{
    self, Fault, FusePower, Group, NemesisConfig, Schedule, Target,
};
use covet_cluster_tests::Cluster;

const NODES: u64 = 3;
const PARTITIONS: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_against_three_nodes() {
    let config = match NemesisConfig::from_env() {
        Ok(c) => c,
        Err(e) => panic!("nemesis configuration: {e:#}"),
    };
    assert_eq!(config.load.partitions, PARTITIONS);
    let cluster = match Cluster::start_powered(NODES as usize, &[]).await {
        Ok(c) => c,
        Err(e) => panic!(
            "nemesis seed = {}: starting the cluster: {e:#}",
            config.seed
        ),
    };
    let power = FusePower::new(config.seed);
    let report = nemesis::run(cluster, config, &power).await;
    assert!(report.acked > 0);
}

fn schedule(seed: u64) -> Schedule {
    Schedule::generate(seed, Duration::from_secs(120), NODES, PARTITIONS)
}

#[test]
fn the_schedule_is_a_function_of_the_seed() {
    assert_eq!(schedule(7), schedule(7));
    assert_ne!(schedule(7).steps, schedule(8).steps);
}

#[test]
fn the_schedule_covers_the_budget_and_names_only_real_nodes_and_groups() {
    for seed in 0..200 {
        let s = schedule(seed);
        let planned: Duration = s.steps.iter().map(|st| st.hold + st.gap).sum();
        assert!(
            planned >= Duration::from_secs(120),
            "seed {seed}: {planned:?}"
        );
        let last = s.steps.last().map_or(Duration::ZERO, |st| st.hold + st.gap);
        assert!(
            planned - last < Duration::from_secs(120),
            "seed {seed}: too many steps"
        );
        for step in &s.steps {
            assert!(step.hold <= Duration::from_secs(8), "seed {seed}: {step}");
            assert!(step.gap <= Duration::from_secs(3), "seed {seed}: {step}");
            for t in targets(&step.fault) {
                let (node, group) = match t {
                    Target::Node(n) => (n, None),
                    Target::LeaderOf { group, fallback } => (fallback, Some(group)),
                };
                assert!((1..=NODES).contains(&node), "seed {seed}: {step}");
                if let Some(Group::Partition(p)) = group {
                    assert!(p < PARTITIONS, "seed {seed}: {step}");
                }
            }
            if let Fault::OneWay { skip, .. } = step.fault {
                assert!((1..NODES).contains(&skip), "seed {seed}: {step}");
            }
        }
    }
}

#[test]
fn every_kind_of_fault_turns_up_within_a_few_seeds() {
    let mut seen = [false; 9];
    for seed in 0..20 {
        for step in schedule(seed).steps {
            seen[kind(&step.fault)] = true;
        }
    }
    assert_eq!(seen, [true; 9]);
}

#[test]
fn power_cuts_are_named_as_such_in_the_printed_schedule() {
    let cut = (0..50)
        .flat_map(|seed| schedule(seed).steps)
        .find(|s| matches!(s.fault, Fault::PowerCut(_)))
        .map(|s| s.to_string());
    assert!(cut.is_some_and(|line| line.starts_with("PowerCut ")));
}

fn targets(fault: &Fault) -> Vec<Target> {
    match fault {
        Fault::Kill9(t)
        | Fault::PowerCut(t)
        | Fault::Pause(t)
        | Fault::Isolate(t)
        | Fault::Mute(t)
        | Fault::Membership(t) => vec![*t],
        Fault::OneWay { from, .. } => vec![*from],
        Fault::Delay { node, .. } => vec![*node],
        Fault::Quiet => vec![],
    }
}

fn kind(fault: &Fault) -> usize {
    match fault {
        Fault::Kill9(_) => 0,
        Fault::PowerCut(_) => 1,
        Fault::Pause(_) => 2,
        Fault::Isolate(_) => 3,
        Fault::OneWay { .. } => 4,
        Fault::Mute(_) => 5,
        Fault::Delay { .. } => 6,
        Fault::Membership(_) => 7,
        Fault::Quiet => 8,
    }
}
