//! Rollouts: how a new version of a service replaces the old one without taking it down.
//!
//! There is no deployment controller. Every node computes [`plan`] from the same inputs (the
//! suite's versions of the service, the outcome of earlier updates recorded beside them, the
//! instances every member reports in its roster announcement, and the candidates for
//! placement) and so reaches the same decision; each node then carries out its own part.
//!
//! The nodes placed for the new version are taken in their placement order, in batches of
//! `max_parallel`. A batch is *promoted* (told to run the new version) once every node of the
//! batches before it reports an instance of the new version *ready*: healthy without a break
//! for `min_healthy_time`. A promoted node that runs an old instance starts the new one beside
//! it and stops the old one once the new one is healthy (surge), or, where it cannot (no surge
//! allowed, a fixed port), stops the old one first. A node that runs the service but is no
//! longer placed (a drained node, one that a newcomer outranks) keeps its instance until
//! every placed node is ready, so moving an instance never leaves a gap either.
//!
//! A new version that never becomes healthy within `healthy_deadline` on some node, or keeps
//! failing before it ever was, *fails* there; the node reports it, and records it in the suite.
//! With `auto_revert`, the service then goes back everywhere at once to its last version that
//! completed an update (every placed node ready); otherwise the update stops where it is.
//! Versions whose instances would run the same way (the same fingerprint: only placement
//! changed) replace each other without restarting anything.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::instance::{InstanceFact, InstanceState};
use crate::service::{Candidate, PlacementSpec, place};

/// How a service's new version replaces the old one (a description's `[update]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdatePolicy {
    /// Nodes updated at once (at least 1).
    pub max_parallel: u32,
    /// Of each batch, how many nodes start the new instance before stopping the old one.
    pub max_surge: u32,
    /// How long a new instance must stay healthy before the next batch starts.
    pub min_healthy_time: Duration,
    /// How long a new instance may take to become healthy before the version fails.
    pub healthy_deadline: Duration,
    /// Whether a failed version is replaced by the last one that completed.
    pub auto_revert: bool,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_parallel: 1,
            max_surge: 1,
            min_healthy_time: Duration::from_secs(10),
            healthy_deadline: Duration::from_secs(300),
            auto_revert: true,
        }
    }
}

/// One version of a service, as a rollout needs it.
#[derive(Clone, Copy, Debug)]
pub struct Release<'a> {
    /// The version.
    pub version: u64,
    /// What its instances run (equal fingerprints: an instance of one is an instance of the
    /// other).
    pub fingerprint: u64,
    /// Where it runs.
    pub placement: &'a PlacementSpec,
    /// How it replaces an older version.
    pub policy: UpdatePolicy,
    /// Whether a new instance can run beside an old one on the same node (no fixed port).
    pub surge_possible: bool,
}

/// Everything a rollout decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct RolloutInput<'a> {
    /// The service's key.
    pub key: &'a str,
    /// The version in force.
    pub target: Release<'a>,
    /// The newest older version that completed an update, if any: where a failed target
    /// reverts to.
    pub stable: Option<Release<'a>>,
    /// Whether the target's failure is recorded.
    pub target_failed: bool,
    /// Whether the target's completion is recorded: it can fail no more (an instance that
    /// fails later is a node's trouble, not the version's).
    pub target_complete: bool,
    /// The fingerprint of every version known, by version.
    pub fingerprints: &'a BTreeMap<u64, u64>,
    /// The service's instances that live members report.
    pub facts: &'a [(NodeId, &'a InstanceFact)],
    /// The members placement may choose from.
    pub candidates: &'a [Candidate<'a>],
}

/// What one node must do about the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Run this version (an instance of an equivalent version will do); other instances of
    /// the service stop once it is healthy (`surge`) or before it starts (not `surge`).
    Run {
        /// The version.
        version: u64,
        /// Start before stopping.
        surge: bool,
    },
    /// Keep whatever instances run, start none.
    Keep,
    /// Stop every instance.
    Stop,
}

/// Where a service's rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Every placed node runs the version in force, ready.
    Steady,
    /// Nothing to replace; instances are starting.
    Starting,
    /// Replacing older instances, batch by batch (`batch` counts from 1).
    Rolling {
        /// The batch being updated.
        batch: u32,
        /// Batches in all.
        batches: u32,
    },
    /// The version in force failed: going back to the last one that completed.
    Reverting,
    /// The version in force failed and there is nothing to go back to (or no `auto_revert`):
    /// the update stopped where it was.
    Failed,
}

/// A rollout decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rollout {
    /// The version the service converges to: the target, or the one it reverts to.
    pub version: u64,
    /// Where the rollout stands.
    pub phase: Phase,
    /// The nodes placed for that version, best first.
    pub placed: Vec<NodeId>,
    /// What each node involved must do; a node not listed runs nothing of the service.
    pub tasks: BTreeMap<NodeId, Task>,
    /// Placed nodes whose instance of that version is ready.
    pub ready: usize,
    /// Every placed node is ready: instances elsewhere stop, and the version has completed.
    pub complete: bool,
    /// The target failed.
    pub target_failed: bool,
}

/// The rollout of one service: see the module documentation.
pub fn plan(input: &RolloutInput<'_>) -> Rollout {
    let target = input.target;
    let equivalent_to = |release: &Release<'_>, version: u64| {
        version == release.version || input.fingerprints.get(&version) == Some(&release.fingerprint)
    };
    let target_failed = !input.target_complete
        && (input.target_failed
            || input.facts.iter().any(|(_, f)| {
                f.state == InstanceState::Failed && equivalent_to(&target, f.version)
            }));
    let (release, reverting) = match input.stable {
        Some(stable) if target_failed && target.policy.auto_revert => (stable, true),
        _ => (target, false),
    };
    let policy = release.policy;
    let placed = place(input.key, release.placement, input.candidates);

    let mut on_release: BTreeSet<NodeId> = BTreeSet::new();
    let mut ready: BTreeSet<NodeId> = BTreeSet::new();
    let mut other: BTreeSet<NodeId> = BTreeSet::new();
    for (node, fact) in input.facts {
        if equivalent_to(&release, fact.version) {
            on_release.insert(*node);
            if fact.state == InstanceState::Ready {
                ready.insert(*node);
            }
        } else {
            other.insert(*node);
        }
    }
    let complete = !placed.is_empty() && placed.iter().all(|n| ready.contains(n));
    let parallel = policy.max_parallel.max(1) as usize;
    let batches = placed.len().div_ceil(parallel);
    // The first batch with a node not ready yet; every batch up to it is promoted.
    let current = placed
        .iter()
        .position(|n| !ready.contains(n))
        .map_or(batches, |i| i / parallel);
    let (phase, promoted): (Phase, Box<dyn Fn(usize, NodeId) -> bool>) = if reverting {
        (Phase::Reverting, Box::new(|_, _| true))
    } else if complete {
        (Phase::Steady, Box::new(|_, _| true))
    } else if target_failed {
        // Stopped where it was: nodes already on the target keep it, nodes with nothing run
        // it, nodes with an older instance keep that.
        let stay = |_, n: NodeId| on_release.contains(&n) || !other.contains(&n);
        (Phase::Failed, Box::new(stay))
    } else if other.is_empty() {
        (Phase::Starting, Box::new(|_, _| true))
    } else {
        (
            Phase::Rolling {
                batch: current as u32 + 1,
                batches: batches as u32,
            },
            Box::new(move |i: usize, _| i / parallel <= current),
        )
    };

    let mut tasks = BTreeMap::new();
    for (i, node) in placed.iter().enumerate() {
        let task = if promoted(i, *node) {
            let surge =
                release.surge_possible && (reverting || (i % parallel) < policy.max_surge as usize);
            Task::Run {
                version: release.version,
                surge,
            }
        } else {
            Task::Keep
        };
        tasks.insert(*node, task);
    }
    for (node, _) in input.facts {
        tasks
            .entry(*node)
            .or_insert(if complete { Task::Stop } else { Task::Keep });
    }
    Rollout {
        version: release.version,
        phase,
        ready: placed.iter().filter(|n| ready.contains(n)).count(),
        placed,
        tasks,
        complete,
        target_failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Count, Demand};

    const BIG: Demand = Demand {
        cpu_millis: 64_000,
        memory_bytes: 1 << 40,
        disk_bytes: 1 << 40,
    };

    fn spec(replicas: u32) -> PlacementSpec {
        PlacementSpec {
            count: Count::Replicas(replicas),
            constraints: vec![],
            spread: None,
            demand: Demand::default(),
        }
    }

    fn release(version: u64, fingerprint: u64, placement: &PlacementSpec) -> Release<'_> {
        Release {
            version,
            fingerprint,
            placement,
            policy: UpdatePolicy::default(),
            surge_possible: true,
        }
    }

    fn fact(version: u64, state: InstanceState) -> InstanceFact {
        InstanceFact {
            service: "web/site".into(),
            version,
            state,
            restarts: 0,
            ports: vec![],
            note: String::new(),
        }
    }

    struct World {
        attributes: BTreeMap<String, String>,
        nodes: Vec<NodeId>,
        fingerprints: BTreeMap<u64, u64>,
    }

    impl World {
        fn new(n: u128) -> World {
            World {
                attributes: BTreeMap::new(),
                nodes: (1..=n).map(NodeId).collect(),
                // Versions 1 and 2 differ; 3 runs as 2 does.
                fingerprints: [(1, 10), (2, 20), (3, 20)].into_iter().collect(),
            }
        }

        fn candidates(&self) -> Vec<Candidate<'_>> {
            self.nodes
                .iter()
                .map(|id| Candidate {
                    id: *id,
                    attributes: &self.attributes,
                    capacity: BIG,
                    refuses: false,
                })
                .collect()
        }

        fn plan(
            &self,
            target: Release<'_>,
            stable: Option<Release<'_>>,
            failed: bool,
            facts: &[(NodeId, InstanceFact)],
        ) -> Rollout {
            let facts: Vec<(NodeId, &InstanceFact)> = facts.iter().map(|(n, f)| (*n, f)).collect();
            let candidates = self.candidates();
            plan(&RolloutInput {
                key: "web/site",
                target,
                stable,
                target_failed: failed,
                target_complete: false,
                fingerprints: &self.fingerprints,
                facts: &facts,
                candidates: &candidates,
            })
        }
    }

    fn run(version: u64, surge: bool) -> Task {
        Task::Run { version, surge }
    }

    #[test]
    fn a_new_service_starts_everywhere_at_once_and_settles() {
        let world = World::new(5);
        let three = spec(3);
        let r = world.plan(release(1, 10, &three), None, false, &[]);
        assert_eq!(r.phase, Phase::Starting);
        assert_eq!(r.placed.len(), 3);
        assert!(r.placed.iter().all(|n| r.tasks[n] == run(1, true)));
        assert_eq!(r.tasks.len(), 3);
        let facts: Vec<_> = r
            .placed
            .iter()
            .map(|n| (*n, fact(1, InstanceState::Ready)))
            .collect();
        let r = world.plan(release(1, 10, &three), None, false, &facts);
        assert_eq!((r.phase, r.ready, r.complete), (Phase::Steady, 3, true));
    }

    #[test]
    fn an_update_promotes_one_batch_at_a_time_as_the_previous_becomes_ready() {
        let world = World::new(5);
        let three = spec(3);
        let v2 = release(2, 20, &three);
        let placed = world.plan(v2, None, false, &[]).placed;
        let (a, b, c) = (placed[0], placed[1], placed[2]);
        let mut facts = vec![
            (a, fact(1, InstanceState::Ready)),
            (b, fact(1, InstanceState::Ready)),
            (c, fact(1, InstanceState::Ready)),
        ];
        let r = world.plan(v2, None, false, &facts);
        assert_eq!(
            r.phase,
            Phase::Rolling {
                batch: 1,
                batches: 3
            }
        );
        assert_eq!(r.tasks[&a], run(2, true));
        assert_eq!((r.tasks[&b], r.tasks[&c]), (Task::Keep, Task::Keep));
        // The new instance on the first node is healthy, not yet for long enough.
        facts.push((a, fact(2, InstanceState::Healthy)));
        assert_eq!(world.plan(v2, None, false, &facts).tasks[&b], Task::Keep);
        facts[3].1.state = InstanceState::Ready;
        facts.remove(0);
        let r = world.plan(v2, None, false, &facts);
        assert_eq!(
            r.phase,
            Phase::Rolling {
                batch: 2,
                batches: 3
            }
        );
        assert_eq!((r.tasks[&b], r.tasks[&c]), (run(2, true), Task::Keep));
        facts.retain(|(n, _)| *n != b);
        facts.push((b, fact(2, InstanceState::Ready)));
        facts.retain(|(n, _)| *n != c);
        facts.push((c, fact(2, InstanceState::Ready)));
        let r = world.plan(v2, None, false, &facts);
        assert_eq!((r.phase, r.complete, r.ready), (Phase::Steady, true, 3));

        // Two at a time, the second of each batch without surge.
        let mut wide = v2;
        wide.policy.max_parallel = 2;
        let old: Vec<_> = placed
            .iter()
            .map(|n| (*n, fact(1, InstanceState::Ready)))
            .collect();
        let r = world.plan(wide, None, false, &old);
        assert_eq!(
            r.phase,
            Phase::Rolling {
                batch: 1,
                batches: 2
            }
        );
        assert_eq!(
            (r.tasks[&a], r.tasks[&b], r.tasks[&c]),
            (run(2, true), run(2, false), Task::Keep)
        );
        // A fixed port rules surge out.
        let mut fixed = v2;
        fixed.surge_possible = false;
        assert_eq!(
            world.plan(fixed, None, false, &old).tasks[&a],
            run(2, false)
        );
    }

    #[test]
    fn a_change_of_placement_only_restarts_nothing() {
        let world = World::new(5);
        let (three, five) = (spec(3), spec(5));
        let placed = world.plan(release(2, 20, &three), None, false, &[]).placed;
        let facts: Vec<_> = placed
            .iter()
            .map(|n| (*n, fact(2, InstanceState::Ready)))
            .collect();
        // Version 3 runs as version 2 does, on five nodes: nothing to replace.
        let r = world.plan(release(3, 20, &five), None, false, &facts);
        assert_eq!(r.phase, Phase::Starting);
        assert_eq!(r.ready, 3);
        assert!(r.tasks.values().all(|t| *t == run(3, true)));
        assert_eq!(r.tasks.len(), 5);
    }

    #[test]
    fn a_failed_version_reverts_everywhere_to_the_last_complete_one() {
        let world = World::new(5);
        let three = spec(3);
        let (v1, v2) = (release(1, 10, &three), release(2, 20, &three));
        let placed = world.plan(v2, None, false, &[]).placed;
        let (a, b, c) = (placed[0], placed[1], placed[2]);
        let facts = vec![
            (a, fact(2, InstanceState::Failed)),
            (a, fact(1, InstanceState::Ready)),
            (b, fact(1, InstanceState::Ready)),
            (c, fact(1, InstanceState::Ready)),
        ];
        let r = world.plan(v2, Some(v1), false, &facts);
        assert!(r.target_failed);
        assert_eq!((r.phase, r.version), (Phase::Reverting, 1));
        let placed_v1 = r.placed.clone();
        assert!(placed_v1.iter().all(|n| r.tasks[n] == run(1, true)));
        // Recorded in the suite, the failure holds once the failed instance is gone.
        let r = world.plan(v2, Some(v1), true, &facts[1..]);
        assert_eq!(
            (r.phase, r.version, r.complete),
            (Phase::Reverting, 1, true)
        );
        // Without auto_revert, or with nothing to go back to, the update stops where it is.
        let mut manual = v2;
        manual.policy.auto_revert = false;
        for (target, stable) in [(manual, Some(v1)), (v2, None)] {
            let r = world.plan(target, stable, true, &facts[1..]);
            assert_eq!((r.phase, r.version), (Phase::Failed, 2));
            assert_eq!(r.tasks[&b], Task::Keep, "keeps its old instance");
        }
    }

    #[test]
    fn an_instance_no_longer_placed_stops_only_once_its_replacement_is_ready() {
        let mut world = World::new(4);
        let three = spec(3);
        let v1 = release(1, 10, &three);
        let placed = world.plan(v1, None, false, &[]).placed;
        let mut facts: Vec<_> = placed
            .iter()
            .map(|n| (*n, fact(1, InstanceState::Ready)))
            .collect();
        // The first node is drained: it is no candidate any more.
        let drained = placed[0];
        world.nodes.retain(|n| *n != drained);
        let r = world.plan(v1, None, false, &facts);
        let newcomer = *r.placed.iter().find(|n| !placed.contains(n)).unwrap();
        assert_eq!(r.tasks[&drained], Task::Keep);
        assert_eq!(r.tasks[&newcomer], run(1, true));
        facts.push((newcomer, fact(1, InstanceState::Healthy)));
        assert_eq!(
            world.plan(v1, None, false, &facts).tasks[&drained],
            Task::Keep
        );
        facts.last_mut().unwrap().1.state = InstanceState::Ready;
        let r = world.plan(v1, None, false, &facts);
        assert_eq!((r.tasks[&drained], r.complete), (Task::Stop, true));
    }
}
