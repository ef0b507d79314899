//! Planning one service: from the versions the suite holds, their recorded outcomes, the
//! instances reported and the members that could run it, where the service runs, how its
//! rollout stands and what each node must do. A pure function: whoever plans a service (its
//! coordinator, see [`crate::coordination`]) and a test reach the same answer from the same
//! inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::instance::{InstanceFact, InstanceState};
use crate::outcome::{DeployStatus, Outcome};
use crate::rollout::{self, Phase, Release, RolloutInput, Task};
use crate::service::{Candidate, Count, Demand, explain};
use crate::spec::{Intent, ServiceSpec, Usage};

/// Attribute announcing the cores (in thousandths) a node lends.
pub const ATTR_CPU: &str = "nubo.cpu_millis";
/// Attribute announcing the memory a node lends.
pub const ATTR_MEMORY: &str = "nubo.memory_bytes";
/// Attribute saying how a node enforces limits: `enforced`, `unenforced` (it refuses every
/// service) or `unenforced-allowed` (its owner lets services run anyway).
pub const ATTR_LIMITS: &str = "nubo.limits";
/// The attribute naming the drivers a node offers, comma-separated (a node that does not
/// say offers `exec` only).
pub const ATTR_DRIVERS: &str = "nubo.drivers";

/// A member as planning sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    /// The node.
    pub id: NodeId,
    /// What it says of itself.
    pub attributes: &'a BTreeMap<String, String>,
    /// What it can still take for this service: what it lends, less what its other
    /// services use.
    pub capacity: Demand,
    /// Versions of this service it refuses to run (over its owner's limits, or failing
    /// there).
    pub refused: &'a [u64],
}

/// Whether a member offers `driver`.
pub fn offers(attributes: &BTreeMap<String, String>, driver: &str) -> bool {
    match attributes.get(ATTR_DRIVERS) {
        Some(list) => list.split(',').any(|d| d == driver),
        None => driver == "exec",
    }
}

/// Whether a member says it cannot enforce limits (and so runs no `exec` service).
pub fn unenforced(attributes: &BTreeMap<String, String>) -> bool {
    attributes
        .get(ATTR_LIMITS)
        .is_some_and(|v| v == "unenforced")
}

/// Whether a member will not run a service of `driver`: it does not offer the driver, or it
/// must enforce the limits itself and cannot (a container engine enforces its own).
pub fn refuses_driver(attributes: &BTreeMap<String, String>, driver: &str) -> bool {
    !offers(attributes, driver) || (driver == "exec" && unenforced(attributes))
}

/// What a member lends, from its attributes (everything, where it does not say).
pub fn lent(attributes: &BTreeMap<String, String>) -> Demand {
    let read = |name: &str| attributes.get(name).and_then(|v| v.parse().ok());
    Demand {
        cpu_millis: read(ATTR_CPU).unwrap_or(u64::MAX),
        memory_bytes: read(ATTR_MEMORY).unwrap_or(u64::MAX),
        disk_bytes: u64::MAX,
    }
}

/// One service: where it runs and how its rollout stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlannedService {
    /// `namespace/name`.
    pub key: String,
    /// The version in force.
    pub version: u64,
    /// `run`, `stop` or `remove`.
    pub intent: String,
    /// Instances wanted (0 when stopped).
    pub wanted: usize,
    /// The nodes placed, best first (short ids).
    pub nodes: Vec<String>,
    /// Why it does not run as wanted, if it does not.
    pub problem: Option<String>,
    /// What filtered nodes out, each with how many, when fewer nodes qualify than wanted.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// `steady`, `starting`, `rolling`, `reverting`, `failed` or `stopped`.
    #[serde(default)]
    pub phase: String,
    /// The batch being updated and the batches in all, while rolling.
    #[serde(default)]
    pub batch: Option<(u32, u32)>,
    /// The version instances converge to (the one in force, or the one reverted to).
    #[serde(default)]
    pub running_version: u64,
    /// Placed nodes whose instance of that version is ready.
    #[serde(default)]
    pub ready: usize,
    /// Whether the suite records that version as complete.
    #[serde(default)]
    pub recorded: bool,
}

/// Everything planning one service depends on.
#[derive(Clone, Copy, Debug)]
pub struct ServiceInput<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    /// The version in force: the newest the suite holds.
    pub version: u64,
    /// Every version of the service the suite holds, the one in force included.
    pub versions: &'a BTreeMap<u64, Arc<ServiceSpec>>,
    /// The outcomes recorded for its updates.
    pub status: &'a DeployStatus,
    /// Its instances, as the members running them report them.
    pub facts: &'a [(NodeId, &'a InstanceFact)],
    /// The members that may run it.
    pub members: &'a [Member<'a>],
    /// Nodes being drained: they take no new instance.
    pub drained: &'a BTreeSet<NodeId>,
    /// What the namespace's services before this one (in key order) want; quotas of
    /// granted deployers count it.
    pub namespace_used: Usage,
    /// The cloud's size as this node estimates it (shares count against it).
    pub size: usize,
}

/// What planning one service decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    /// The service, for operators.
    pub summary: PlannedService,
    /// What each node involved must do; a node not listed runs nothing of the service.
    pub tasks: BTreeMap<NodeId, Task>,
    /// The outcome the planner should record now (it saw it happen), if any.
    pub record: Option<(u64, RecordedOutcome)>,
}

/// An outcome the planner saw, to record in the service's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordedOutcome {
    /// Every placed node ran the version, ready.
    Complete,
    /// The version's instance never became healthy on `node`.
    Failed {
        /// The node.
        node: NodeId,
        /// Why, as the node said.
        reason: String,
    },
}

/// The release of one version.
fn release(version: u64, spec: &ServiceSpec) -> Release<'_> {
    Release {
        version,
        fingerprint: spec.fingerprint,
        placement: &spec.placement,
        policy: spec.update,
        surge_possible: spec.surge_possible,
    }
}

/// Plans one service; see the module documentation.
pub fn plan_service(input: &ServiceInput<'_>) -> ServicePlan {
    let key = input.key;
    let mut summary = PlannedService {
        key: key.to_string(),
        version: input.version,
        phase: "stopped".into(),
        ..PlannedService::default()
    };
    let stopped = |summary| ServicePlan {
        summary,
        tasks: input
            .facts
            .iter()
            .map(|(node, _)| (*node, Task::Stop))
            .collect(),
        record: None,
    };
    let Some(spec) = input.versions.get(&input.version) else {
        summary.intent = "remove".into();
        return stopped(summary);
    };
    summary.intent = spec.intent.name().into();
    if spec.intent != Intent::Run {
        return stopped(summary);
    }
    if let Some(problem) = &spec.problem {
        summary.problem = Some(problem.clone());
        return stopped(summary);
    }
    // Quotas count what the namespace's services want, in key order; only granted
    // deployers are held to them (the administrator is not).
    if let Some(quota) = &spec.quota {
        let after = input
            .namespace_used
            .plus(spec.usage(spec.wanted(input.size)));
        if let Some((what, used, allowed)) = after.over(quota) {
            summary.problem = Some(format!(
                "over the namespace's quota: {what} would be {used}, the grant allows {allowed}"
            ));
            return stopped(summary);
        }
    }
    let runnable: BTreeMap<u64, &ServiceSpec> = input
        .versions
        .iter()
        .filter(|(_, s)| s.intent == Intent::Run && s.problem.is_none())
        .map(|(v, s)| (*v, s.as_ref()))
        .collect();
    let fingerprints: BTreeMap<u64, u64> =
        runnable.iter().map(|(v, s)| (*v, s.fingerprint)).collect();
    let status = input.status;
    let target = release(input.version, spec);
    // Where a failed target goes back to: the newest older version recorded complete, or,
    // if newer, one that instances run ready now (its completion may not be recorded yet
    // when the next version comes).
    let running_ready = input
        .facts
        .iter()
        .filter(|(_, f)| {
            f.version < input.version
                && f.state == InstanceState::Ready
                && !status.failed(f.version)
        })
        .map(|(_, f)| f.version)
        .filter(|v| runnable.contains_key(v))
        .max();
    let stable = status
        .stable_below(input.version)
        .max(running_ready)
        .and_then(|v| runnable.get(&v).map(|s| release(v, s)));
    let candidates = |version: u64| -> Vec<Candidate<'_>> {
        input
            .members
            .iter()
            .filter(|m| !input.drained.contains(&m.id))
            .map(|m| Candidate {
                id: m.id,
                attributes: m.attributes,
                capacity: m.capacity,
                refuses: refuses_driver(m.attributes, &spec.driver) || m.refused.contains(&version),
            })
            .collect()
    };
    let decide = |candidates: &[Candidate<'_>]| {
        rollout::plan(&RolloutInput {
            key,
            target,
            stable,
            target_failed: status.failed(input.version),
            target_complete: status.completed(input.version),
            fingerprints: &fingerprints,
            facts: input.facts,
            candidates,
        })
    };
    // A refusal holds for the version refused: place again if the rollout goes back.
    let mut chosen = candidates(input.version);
    let mut rollout = decide(&chosen);
    if rollout.version != input.version {
        chosen = candidates(rollout.version);
        rollout = decide(&chosen);
    }
    let effective = runnable.get(&rollout.version).copied().unwrap_or(spec);
    summary.wanted = match effective.placement.count {
        Count::Replicas(n) => n as usize,
        _ => rollout.placed.len(),
    };
    if rollout.placed.len() < summary.wanted {
        summary.problem = Some(format!(
            "only {} of {} wanted instances can be placed",
            rollout.placed.len(),
            summary.wanted
        ));
        summary.reasons = explain(&effective.placement, &chosen);
        if !input.drained.is_empty() {
            summary
                .reasons
                .push(format!("{} nodes are draining", input.drained.len()));
        }
        let driver = spec.driver.as_str();
        let without = input
            .members
            .iter()
            .filter(|m| !offers(m.attributes, driver))
            .count();
        if without > 0 {
            summary.reasons.push(format!(
                "{without} nodes do not offer the {driver} driver (their owners may add it with --drivers)"
            ));
        }
        let cannot = input
            .members
            .iter()
            .filter(|m| driver == "exec" && unenforced(m.attributes))
            .count();
        if cannot > 0 {
            summary.reasons.push(format!(
                "{cannot} nodes cannot enforce limits (their owners may start them with --allow-unenforced-limits)"
            ));
        }
    }
    summary.phase = match rollout.phase {
        Phase::Steady => "steady",
        Phase::Starting => "starting",
        Phase::Rolling { .. } => "rolling",
        Phase::Reverting => "reverting",
        Phase::Failed => "failed",
    }
    .into();
    if let Phase::Rolling { batch, batches } = rollout.phase {
        summary.batch = Some((batch, batches));
    }
    if rollout.target_failed && summary.problem.is_none() {
        summary.problem = Some(match status.outcomes.get(&input.version) {
            Some(Outcome::Failed { node, reason, .. }) => {
                format!("version {} failed on {node}: {reason}", input.version)
            }
            _ => format!("version {} failed", input.version),
        });
    }
    summary.running_version = rollout.version;
    summary.ready = rollout.ready;
    summary.recorded = status.completed(rollout.version);
    summary.nodes = rollout.placed.iter().map(NodeId::short).collect();
    // The outcome seen now and not recorded yet: completion of the version converged to, or
    // the failure of the version in force on a node that reports it.
    let record = if rollout.complete && !status.completed(rollout.version) {
        Some((rollout.version, RecordedOutcome::Complete))
    } else if !status.failed(input.version) && !status.completed(input.version) {
        input
            .facts
            .iter()
            .find(|(_, f)| {
                f.state == InstanceState::Failed
                    && (f.version == input.version
                        || fingerprints.get(&f.version) == Some(&spec.fingerprint))
            })
            .map(|(node, f)| {
                (
                    input.version,
                    RecordedOutcome::Failed {
                        node: *node,
                        reason: f.note.clone(),
                    },
                )
            })
    } else {
        None
    };
    ServicePlan {
        summary,
        tasks: rollout.tasks,
        record,
    }
}

/// What the services of `namespace` before `key` (in key order) want, from the versions in
/// force: the part of the namespace's quota already spoken for when `key` is planned.
pub fn namespace_usage<'a>(
    in_force: impl IntoIterator<Item = &'a ServiceSpec>,
    key: &str,
    size: usize,
) -> Usage {
    let namespace = crate::spec::namespace_of(key);
    in_force
        .into_iter()
        .filter(|s| s.namespace() == namespace && s.key.as_str() < key)
        .fold(Usage::default(), |used, s| {
            used.plus(s.usage(s.wanted(size)))
        })
}

/// A service of `replicas` instances of 0.1 core and 1 MiB each, for tests.
#[cfg(test)]
pub(crate) fn test_spec(key: &str, replicas: u32, fingerprint: u64) -> ServiceSpec {
    ServiceSpec {
        key: key.into(),
        intent: Intent::Run,
        problem: None,
        placement: crate::service::PlacementSpec {
            count: Count::Replicas(replicas),
            constraints: vec![],
            spread: None,
            demand: Demand {
                cpu_millis: 100,
                memory_bytes: 1 << 20,
                disk_bytes: 0,
            },
        },
        update: crate::rollout::UpdatePolicy::default(),
        fingerprint,
        surge_possible: true,
        driver: "exec".into(),
        quota: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Quota;

    const BIG: Demand = Demand {
        cpu_millis: 64_000,
        memory_bytes: 1 << 40,
        disk_bytes: 1 << 40,
    };

    fn fact(version: u64, state: InstanceState, note: &str) -> InstanceFact {
        InstanceFact {
            service: "web/site".into(),
            version,
            state,
            restarts: 0,
            ports: vec![],
            note: note.into(),
        }
    }

    struct World {
        attributes: Vec<BTreeMap<String, String>>,
        refused: Vec<Vec<u64>>,
    }

    impl World {
        fn new(n: usize) -> World {
            World {
                attributes: vec![BTreeMap::new(); n],
                refused: vec![vec![]; n],
            }
        }

        fn members(&self) -> Vec<Member<'_>> {
            self.attributes
                .iter()
                .zip(&self.refused)
                .enumerate()
                .map(|(i, (attributes, refused))| Member {
                    id: NodeId(i as u128 + 1),
                    attributes,
                    capacity: BIG,
                    refused,
                })
                .collect()
        }
    }

    fn plan(
        world: &World,
        versions: &BTreeMap<u64, Arc<ServiceSpec>>,
        status: &DeployStatus,
        facts: &[(NodeId, InstanceFact)],
    ) -> ServicePlan {
        let facts: Vec<(NodeId, &InstanceFact)> = facts.iter().map(|(n, f)| (*n, f)).collect();
        let members = world.members();
        plan_service(&ServiceInput {
            key: "web/site",
            version: *versions.keys().last().unwrap(),
            versions,
            status,
            facts: &facts,
            members: &members,
            drained: &BTreeSet::new(),
            namespace_used: Usage::default(),
            size: world.attributes.len(),
        })
    }

    #[test]
    fn a_new_service_is_placed_then_recorded_complete_once_every_instance_is_ready() {
        let world = World::new(5);
        let versions: BTreeMap<u64, Arc<ServiceSpec>> =
            [(1, Arc::new(test_spec("web/site", 3, 10)))].into();
        let status = DeployStatus::default();
        let first = plan(&world, &versions, &status, &[]);
        assert_eq!(first.summary.phase, "starting");
        assert_eq!(first.summary.nodes.len(), 3);
        assert_eq!(first.tasks.len(), 3);
        assert_eq!(first.record, None);
        let ready: Vec<(NodeId, InstanceFact)> = first
            .tasks
            .keys()
            .map(|n| (*n, fact(1, InstanceState::Ready, "")))
            .collect();
        let done = plan(&world, &versions, &status, &ready);
        assert_eq!(done.summary.phase, "steady");
        assert_eq!(done.record, Some((1, RecordedOutcome::Complete)));
        let recorded = status.with(1, Outcome::Complete { at_unix_ms: 5 }).unwrap();
        assert_eq!(plan(&world, &versions, &recorded, &ready).record, None);
    }

    #[test]
    fn a_failure_a_node_reports_is_recorded_with_its_reason_and_refusals_move_instances() {
        let mut world = World::new(4);
        let versions: BTreeMap<u64, Arc<ServiceSpec>> = [
            (1, Arc::new(test_spec("web/site", 2, 10))),
            (2, Arc::new(test_spec("web/site", 2, 20))),
        ]
        .into();
        let status = DeployStatus::default()
            .with(1, Outcome::Complete { at_unix_ms: 1 })
            .unwrap();
        let placed: Vec<NodeId> = plan(&world, &versions, &status, &[])
            .tasks
            .keys()
            .copied()
            .collect();
        let facts = vec![(placed[0], fact(2, InstanceState::Failed, "exited 3"))];
        let failed = plan(&world, &versions, &status, &facts);
        assert_eq!(
            failed.record,
            Some((
                2,
                RecordedOutcome::Failed {
                    node: placed[0],
                    reason: "exited 3".into()
                }
            ))
        );
        assert_eq!(failed.summary.phase, "reverting");
        // A node refusing version 1 is not placed for it.
        let refuser = (placed[0].0 - 1) as usize;
        world.refused[refuser] = vec![1];
        let moved = plan(&world, &versions, &status, &facts);
        assert!(matches!(
            moved.tasks.get(&placed[0]),
            None | Some(Task::Keep)
        ));
    }

    #[test]
    fn quotas_count_what_the_namespace_wants_in_key_order() {
        let world = World::new(5);
        let mut granted = test_spec("web/site", 3, 10);
        granted.quota = Some(Quota {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            instances: 4,
        });
        let before = test_spec("web/a", 2, 1);
        let used = namespace_usage([&before, &test_spec("web/z", 9, 1)], "web/site", 5);
        assert_eq!(used.instances, 2);
        let versions: BTreeMap<u64, Arc<ServiceSpec>> = [(1, Arc::new(granted))].into();
        let members = world.members();
        let input = ServiceInput {
            key: "web/site",
            version: 1,
            versions: &versions,
            status: &DeployStatus::default(),
            facts: &[],
            members: &members,
            drained: &BTreeSet::new(),
            namespace_used: used,
            size: 5,
        };
        let over = plan_service(&input);
        assert_eq!(
            over.summary.problem.as_deref(),
            Some("over the namespace's quota: instances would be 5, the grant allows 4")
        );
        assert!(over.tasks.is_empty());
        let fits = plan_service(&ServiceInput {
            namespace_used: Usage::default(),
            ..input
        });
        assert_eq!(fits.tasks.len(), 3);
    }

    #[test]
    fn an_unplaceable_service_says_why() {
        let mut world = World::new(3);
        world.attributes[0].insert(ATTR_DRIVERS.into(), "docker".into());
        world.attributes[1].insert(ATTR_LIMITS.into(), "unenforced".into());
        let versions: BTreeMap<u64, Arc<ServiceSpec>> =
            [(1, Arc::new(test_spec("web/site", 3, 10)))].into();
        let p = plan(&world, &versions, &DeployStatus::default(), &[]);
        assert_eq!(
            p.summary.problem.as_deref(),
            Some("only 1 of 3 wanted instances can be placed")
        );
        assert!(
            p.summary
                .reasons
                .iter()
                .any(|r| r.starts_with("1 nodes do not offer the exec driver"))
        );
        assert!(
            p.summary
                .reasons
                .iter()
                .any(|r| r.starts_with("1 nodes cannot enforce limits"))
        );
    }
}
