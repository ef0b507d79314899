//! The planner: from the suite, the roster and the instances every member reports, what each
//! service's rollout stands at and what this node must do. Every agent plans the whole cloud
//! the same way ([`nubo_proto::rollout::plan`]) and carries out its own part; the first node
//! placed for a version records in the suite that it completed, and a node whose new instance
//! failed records that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nubo_proto::instance::InstanceFact;
use nubo_proto::rollout::{self, Phase, Release, RolloutInput};
use nubo_proto::roster::MemberState;
use nubo_proto::service::{Candidate, Count, Demand, explain};
use nubo_proto::suite::SuiteEntry;
use nubo_proto::{Node, NodeId};
use serde::{Deserialize, Serialize};

use crate::authority::{DRAIN_PREFIX, Intent, SignedDocument, drained_node};
use crate::description::{self, Driver, Service};
use crate::runner::{Assignment, Failure};
use crate::status::{DeployStatus, Outcome, status_key};

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
/// Attribute listing the versions of services a node refuses, `key@version`, comma-separated.
pub const ATTR_REFUSES: &str = "nubo.refuses";

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

struct Parsed {
    signed: SignedDocument,
    service: Result<Arc<Service>, String>,
}

/// What a planning round decided.
#[derive(Default)]
pub struct Plan {
    /// Every service.
    pub services: Vec<PlannedService>,
    /// This node's part.
    pub mine: Vec<Assignment>,
    /// Status annotations to publish (outcomes this node records).
    pub writes: Vec<SuiteEntry>,
    /// Nodes being drained.
    pub drained: BTreeSet<NodeId>,
}

/// Plans, remembering parsed descriptions by key and version.
#[derive(Default)]
pub struct Planner {
    cache: BTreeMap<(String, u64), Arc<Parsed>>,
}

/// Whether a member says it cannot enforce limits and will not run services.
fn unenforced(attributes: &BTreeMap<String, String>) -> bool {
    attributes
        .get(ATTR_LIMITS)
        .is_some_and(|v| v == "unenforced")
}

/// Whether a member offers `driver`.
fn offers(attributes: &BTreeMap<String, String>, driver: Driver) -> bool {
    match attributes.get(ATTR_DRIVERS) {
        Some(list) => list.split(',').any(|d| d == driver.name()),
        None => driver == Driver::Exec,
    }
}

/// Whether a member will not run a service of `driver`: it does not offer the driver, or the
/// node must enforce the limits itself and cannot (a container engine enforces its own).
fn refuses_driver(attributes: &BTreeMap<String, String>, driver: Driver) -> bool {
    !offers(attributes, driver) || (driver == Driver::Exec && unenforced(attributes))
}

fn demand_of(attributes: &BTreeMap<String, String>) -> Demand {
    let read = |name: &str| attributes.get(name).and_then(|v| v.parse().ok());
    Demand {
        cpu_millis: read(ATTR_CPU).unwrap_or(u64::MAX),
        memory_bytes: read(ATTR_MEMORY).unwrap_or(u64::MAX),
        disk_bytes: u64::MAX,
    }
}

/// A member as planning sees it.
struct Member {
    id: NodeId,
    attributes: BTreeMap<String, String>,
    instances: Vec<InstanceFact>,
}

fn unix_ms() -> u64 {
    crate::clock::unix_now().as_millis() as u64
}

impl Planner {
    fn parsed(&mut self, entry: &SuiteEntry) -> Option<Arc<Parsed>> {
        let id = (entry.key.clone(), entry.version);
        if let Some(parsed) = self.cache.get(&id) {
            return Some(parsed.clone());
        }
        // Entries were checked when they entered the suite; here they are only read.
        let signed: SignedDocument = postcard::from_bytes(&entry.document).ok()?;
        let service = description::parse(&signed.document.description)
            .map_err(|errors| errors.first().map(ToString::to_string).unwrap_or_default())
            .and_then(|s| {
                if s.key() == entry.key {
                    Ok(Arc::new(s))
                } else {
                    Err(format!(
                        "the description names {}, not {}",
                        s.key(),
                        entry.key
                    ))
                }
            });
        let parsed = Arc::new(Parsed { signed, service });
        self.cache.insert(id, parsed.clone());
        Some(parsed)
    }

    /// What the namespace's services other than `except` use in `plan`: cores (thousandths),
    /// memory and instances.
    pub fn usage(&self, plan: &[PlannedService], namespace: &str, except: &str) -> (u64, u64, u64) {
        let mut used = (0u64, 0u64, 0u64);
        for planned in plan {
            if planned.key == except || !planned.key.starts_with(&format!("{namespace}/")) {
                continue;
            }
            let Some(Ok(service)) = self
                .cache
                .get(&(planned.key.clone(), planned.version))
                .map(|p| &p.service)
            else {
                continue;
            };
            let n = planned.nodes.len() as u64;
            let demand = service.placement.demand;
            used.0 = used.0.saturating_add(n.saturating_mul(demand.cpu_millis));
            used.1 = used.1.saturating_add(n.saturating_mul(demand.memory_bytes));
            used.2 = used.2.saturating_add(n);
        }
        used
    }

    /// Plans every service; `failures` are the versions that failed on this node.
    pub fn plan(&mut self, node: &Node, failures: &[Failure]) -> Plan {
        let me = node.id();
        let roster = node.roster();
        let members: Vec<Member> = std::iter::once(Member {
            id: me,
            attributes: roster.me().attributes.iter().cloned().collect(),
            instances: roster.me().instances.clone(),
        })
        .chain(
            roster
                .members()
                .filter(|m| m.state == MemberState::Alive)
                .map(|m| Member {
                    id: m.announce.peer.id,
                    attributes: m.announce.attributes.iter().cloned().collect(),
                    instances: m.announce.instances.clone(),
                }),
        )
        .collect();
        let mut plan = Plan::default();
        let suite = node.suite();
        for entry in suite.entries().filter(|e| e.key.starts_with(DRAIN_PREFIX)) {
            if let Some(parsed) = self.parsed(entry)
                && parsed.signed.document.intent == Intent::Run
                && let Some(id) = drained_node(&entry.key)
            {
                plan.drained.insert(id);
            }
        }
        let mut facts: BTreeMap<&str, Vec<(NodeId, &InstanceFact)>> = BTreeMap::new();
        for member in &members {
            for fact in &member.instances {
                facts
                    .entry(fact.service.as_str())
                    .or_default()
                    .push((member.id, fact));
            }
        }
        // Per namespace: (cpu, memory, instances) used so far, services taken in key order.
        let mut used: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        let services: Vec<SuiteEntry> = suite
            .entries()
            .filter(|e| nubo_proto::suite::annotated(&e.key).is_none())
            .filter(|e| !e.key.starts_with(DRAIN_PREFIX))
            .cloned()
            .collect();
        // Only the versions the suite still holds stay parsed.
        self.cache
            .retain(|(key, version), _| suite.history(key).any(|e| e.version == *version));
        for entry in services {
            let Some(parsed) = self.parsed(&entry) else {
                continue;
            };
            let key = entry.key.clone();
            let intent = parsed.signed.document.intent;
            let mut planned = PlannedService {
                key: key.clone(),
                version: entry.version,
                intent: match intent {
                    Intent::Run => "run",
                    Intent::Stop => "stop",
                    Intent::Remove => "remove",
                }
                .into(),
                phase: "stopped".into(),
                ..PlannedService::default()
            };
            let service_facts = facts.get(key.as_str()).map_or(&[][..], Vec::as_slice);
            if intent != Intent::Run {
                if intent == Intent::Stop {
                    plan.services.push(planned);
                }
                continue;
            }
            let service = match &parsed.service {
                Ok(service) => service.clone(),
                Err(problem) => {
                    planned.problem = Some(problem.clone());
                    plan.services.push(planned);
                    continue;
                }
            };
            // Every version held: what its instances run.
            let mut versions: BTreeMap<u64, Arc<Service>> = BTreeMap::new();
            let history: Vec<SuiteEntry> = suite.history(&key).cloned().collect();
            for old in &history {
                if let Some(p) = self.parsed(old)
                    && p.signed.document.intent == Intent::Run
                    && let Ok(s) = &p.service
                {
                    versions.insert(old.version, s.clone());
                }
            }
            let fingerprints: BTreeMap<u64, u64> = versions
                .iter()
                .map(|(v, s)| (*v, s.fingerprint()))
                .collect();
            let status = suite
                .get(&status_key(&key))
                .and_then(DeployStatus::from_entry)
                .unwrap_or_default();
            fn release(version: u64, service: &Service) -> Release<'_> {
                Release {
                    version,
                    fingerprint: service.fingerprint(),
                    placement: &service.placement,
                    policy: service.update,
                    surge_possible: service.surge_possible(),
                }
            }
            let target = release(entry.version, &service);
            // Where a failed target goes back to: the newest older version recorded complete,
            // or, if newer, one that instances run ready now (its completion may not be
            // recorded yet when the next version comes).
            let failed_before = |v: u64| status.failed(v);
            let running_ready = service_facts
                .iter()
                .filter(|(_, f)| {
                    f.version < entry.version
                        && f.state == nubo_proto::instance::InstanceState::Ready
                        && !failed_before(f.version)
                })
                .map(|(_, f)| f.version)
                .filter(|v| versions.contains_key(v))
                .max();
            let stable = status
                .stable_below(entry.version)
                .max(running_ready)
                .and_then(|v| versions.get(&v).map(|s| (v, s.clone())));
            let candidates_refusing = |version: u64| -> Vec<Candidate<'_>> {
                let refusal = format!("{key}@{version}");
                members
                    .iter()
                    .filter(|m| !plan.drained.contains(&m.id))
                    .map(|m| Candidate {
                        id: m.id,
                        attributes: &m.attributes,
                        capacity: demand_of(&m.attributes),
                        refuses: refuses_driver(&m.attributes, service.run.driver)
                            || m.attributes
                                .get(ATTR_REFUSES)
                                .is_some_and(|list| list.split(',').any(|k| k == refusal)),
                    })
                    .collect()
            };
            let decide = |candidates: &[Candidate<'_>]| {
                rollout::plan(&RolloutInput {
                    key: &key,
                    target,
                    stable: stable.as_ref().map(|(v, s)| release(*v, s)),
                    target_failed: status.failed(entry.version),
                    target_complete: status.completed(entry.version),
                    fingerprints: &fingerprints,
                    facts: service_facts,
                    candidates,
                })
            };
            // A refusal holds for the version refused: place again if the rollout goes back.
            let mut candidates = candidates_refusing(entry.version);
            let mut rollout = decide(&candidates);
            if rollout.version != entry.version {
                candidates = candidates_refusing(rollout.version);
                rollout = decide(&candidates);
            }
            let effective = versions.get(&rollout.version).unwrap_or(&service).clone();
            // Quotas count every service of the namespace, in key order; only granted
            // deployers are held to them (the administrator is not).
            let demand = effective.placement.demand;
            let n = rollout.placed.len() as u64;
            let entry_used = used.entry(service.namespace.clone()).or_default();
            let after = (
                entry_used
                    .0
                    .saturating_add(demand.cpu_millis.saturating_mul(n)),
                entry_used
                    .1
                    .saturating_add(demand.memory_bytes.saturating_mul(n)),
                entry_used.2.saturating_add(n),
            );
            if let Some(grant) = &parsed.signed.document.grant {
                let quota = grant.grant.quota;
                if after.0 > quota.cpu_millis
                    || after.1 > quota.memory_bytes
                    || after.2 > quota.instances
                {
                    planned.problem = Some("over the namespace's quota".into());
                    plan.services.push(planned);
                    continue;
                }
            }
            *entry_used = after;
            planned.wanted = match effective.placement.count {
                Count::Replicas(n) => n as usize,
                _ => rollout.placed.len(),
            };
            if rollout.placed.len() < planned.wanted {
                planned.problem = Some(format!(
                    "only {} of {} wanted instances can be placed",
                    rollout.placed.len(),
                    planned.wanted
                ));
                planned.reasons = explain(&effective.placement, &candidates);
                if !plan.drained.is_empty() {
                    planned
                        .reasons
                        .push(format!("{} nodes are draining", plan.drained.len()));
                }
                let driver = service.run.driver;
                let without = members
                    .iter()
                    .filter(|m| !offers(&m.attributes, driver))
                    .count();
                if without > 0 {
                    planned.reasons.push(format!(
                        "{without} nodes do not offer the {} driver (their owners may add it with --drivers)",
                        driver.name()
                    ));
                }
                let cannot = members
                    .iter()
                    .filter(|m| driver == Driver::Exec && unenforced(&m.attributes))
                    .count();
                if cannot > 0 {
                    planned.reasons.push(format!(
                        "{cannot} nodes cannot enforce limits (their owners may start them with --allow-unenforced-limits)"
                    ));
                }
            }
            planned.phase = match rollout.phase {
                Phase::Steady => "steady",
                Phase::Starting => "starting",
                Phase::Rolling { .. } => "rolling",
                Phase::Reverting => "reverting",
                Phase::Failed => "failed",
            }
            .into();
            if let Phase::Rolling { batch, batches } = rollout.phase {
                planned.batch = Some((batch, batches));
            }
            if rollout.target_failed && planned.problem.is_none() {
                planned.problem = Some(match status.outcomes.get(&entry.version) {
                    Some(Outcome::Failed { node, reason, .. }) => {
                        format!("version {} failed on {node}: {reason}", entry.version)
                    }
                    _ => format!("version {} failed", entry.version),
                });
            }
            planned.running_version = rollout.version;
            planned.ready = rollout.ready;
            planned.recorded = status.completed(rollout.version);
            planned.nodes = rollout.placed.iter().map(NodeId::short).collect();
            // Outcomes this node records.
            let previous = suite.get(&status_key(&key)).map(|e| e.version);
            if rollout.complete
                && rollout.placed.first() == Some(&me)
                && let Some(next) = status.with(
                    rollout.version,
                    Outcome::Complete {
                        at_unix_ms: unix_ms(),
                    },
                )
            {
                plan.writes.push(next.to_entry(&key, previous));
            } else if let Some(failure) = failures
                .iter()
                .find(|f| f.key == key && f.version == entry.version)
                && let Some(next) = status.with(
                    entry.version,
                    Outcome::Failed {
                        at_unix_ms: unix_ms(),
                        node: me.short(),
                        reason: failure.reason.clone(),
                    },
                )
            {
                plan.writes.push(next.to_entry(&key, previous));
            }
            if let Some(task) = rollout.tasks.get(&me) {
                plan.mine.push(Assignment {
                    key: key.clone(),
                    task: *task,
                    versions,
                });
            }
            plan.services.push(planned);
        }
        plan
    }
}
