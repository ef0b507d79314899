//! The planner: from the suite, the roster and the instances every member reports, what each
//! service's rollout stands at and what this node must do. Every agent plans the whole cloud
//! the same way ([`nubo_proto::placement::plan_service`]) and carries out its own part; the
//! first node placed for a version records that it completed, and the node whose instance
//! failed records that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nubo_proto::instance::InstanceFact;
use nubo_proto::outcome::{DeployStatus, Outcome, status_key};
use nubo_proto::placement::{
    Member, RecordedOutcome, ServiceInput, lent, namespace_usage, plan_service,
};
use nubo_proto::roster::MemberState;
use nubo_proto::spec::{Intent, ServiceSpec};
use nubo_proto::suite::SuiteEntry;
use nubo_proto::{Node, NodeId};

pub use nubo_proto::placement::{ATTR_CPU, ATTR_DRIVERS, ATTR_LIMITS, ATTR_MEMORY, PlannedService};

use crate::authority::{DRAIN_PREFIX, SignedDocument, drained_node};
use crate::description::{self, Service};
use crate::runner::Assignment;

/// Attribute listing the versions of services a node refuses, `key@version`, comma-separated.
pub const ATTR_REFUSES: &str = "nubo.refuses";

struct Parsed {
    signed: SignedDocument,
    service: Result<Arc<Service>, String>,
    spec: Arc<ServiceSpec>,
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

/// What placement and rollouts read of a signed document.
pub fn spec_of(
    key: &str,
    signed: &SignedDocument,
    service: &Result<Arc<Service>, String>,
) -> ServiceSpec {
    let document = &signed.document;
    let mut spec = ServiceSpec {
        key: key.to_string(),
        intent: document.intent,
        problem: None,
        placement: nubo_proto::service::PlacementSpec {
            count: nubo_proto::service::Count::Replicas(0),
            constraints: Vec::new(),
            spread: None,
            demand: nubo_proto::service::Demand::default(),
        },
        update: Default::default(),
        fingerprint: 0,
        surge_possible: true,
        driver: "exec".into(),
        quota: document.grant.as_ref().map(|g| g.grant.quota),
    };
    match service {
        Ok(service) => {
            spec.placement = service.placement.clone();
            spec.update = service.update;
            spec.fingerprint = service.fingerprint();
            spec.surge_possible = service.surge_possible();
            spec.driver = service.run.driver.name().into();
        }
        Err(problem) if document.intent == Intent::Run => spec.problem = Some(problem.clone()),
        Err(_) => {}
    }
    spec
}

/// The versions of `key@version` refused, from a member's attributes.
fn refused_versions(attributes: &BTreeMap<String, String>, key: &str) -> Vec<u64> {
    attributes.get(ATTR_REFUSES).map_or_else(Vec::new, |list| {
        list.split(',')
            .filter_map(|item| item.rsplit_once('@'))
            .filter(|(k, _)| *k == key)
            .filter_map(|(_, v)| v.parse().ok())
            .collect()
    })
}

/// A member as planning sees it.
struct Known {
    id: NodeId,
    attributes: BTreeMap<String, String>,
    instances: Vec<InstanceFact>,
}

fn unix_ms() -> u64 {
    crate::clock::unix_now().as_millis() as u64
}

/// Plans, remembering parsed descriptions by key and version.
#[derive(Default)]
pub struct Planner {
    cache: BTreeMap<(String, u64), Arc<Parsed>>,
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
        let spec = Arc::new(spec_of(&entry.key, &signed, &service));
        let parsed = Arc::new(Parsed {
            signed,
            service,
            spec,
        });
        self.cache.insert(id, parsed.clone());
        Some(parsed)
    }

    /// What the namespace's services other than `except` want, as placement counts it for
    /// quotas (shares against a cloud of `size` nodes).
    pub fn usage(
        &self,
        suite: &nubo_proto::suite::Suite,
        except: &str,
        size: usize,
    ) -> nubo_proto::spec::Usage {
        let in_force: Vec<&ServiceSpec> = suite
            .entries()
            .filter(|e| e.key != except)
            .filter_map(|e| self.cache.get(&(e.key.clone(), e.version)))
            .map(|p| p.spec.as_ref())
            .collect();
        let namespace = nubo_proto::spec::namespace_of(except);
        in_force
            .into_iter()
            .filter(|s| s.namespace() == namespace)
            .fold(nubo_proto::spec::Usage::default(), |used, s| {
                used.plus(s.usage(s.wanted(size)))
            })
    }

    /// Plans every service.
    pub fn plan(&mut self, node: &Node) -> Plan {
        let me = node.id();
        let roster = node.roster();
        let known: Vec<Known> = std::iter::once(Known {
            id: me,
            attributes: roster.me().attributes.iter().cloned().collect(),
            instances: roster.me().instances.clone(),
        })
        .chain(
            roster
                .members()
                .filter(|m| m.state == MemberState::Alive)
                .map(|m| Known {
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
        for member in &known {
            for fact in &member.instances {
                facts
                    .entry(fact.service.as_str())
                    .or_default()
                    .push((member.id, fact));
            }
        }
        let services: Vec<SuiteEntry> = suite
            .entries()
            .filter(|e| nubo_proto::suite::annotated(&e.key).is_none())
            .filter(|e| !e.key.starts_with(DRAIN_PREFIX))
            .cloned()
            .collect();
        // Only the versions the suite still holds stay parsed.
        self.cache
            .retain(|(key, version), _| suite.history(key).any(|e| e.version == *version));
        let in_force: Vec<Arc<ServiceSpec>> = services
            .iter()
            .filter_map(|e| self.parsed(e).map(|p| p.spec.clone()))
            .collect();
        let size = known.len();
        for entry in services {
            let Some(parsed) = self.parsed(&entry) else {
                continue;
            };
            let key = entry.key.clone();
            if parsed.signed.document.intent == Intent::Remove {
                continue;
            }
            // Every version held: what its instances run.
            let mut specs: BTreeMap<u64, Arc<ServiceSpec>> = BTreeMap::new();
            let mut versions: BTreeMap<u64, Arc<Service>> = BTreeMap::new();
            let history: Vec<SuiteEntry> = suite.history(&key).cloned().collect();
            for old in &history {
                if let Some(p) = self.parsed(old) {
                    specs.insert(old.version, p.spec.clone());
                    if p.signed.document.intent == Intent::Run
                        && let Ok(s) = &p.service
                    {
                        versions.insert(old.version, s.clone());
                    }
                }
            }
            let status = suite
                .get(&status_key(&key))
                .and_then(DeployStatus::from_entry)
                .unwrap_or_default();
            let refusals: Vec<Vec<u64>> = known
                .iter()
                .map(|m| refused_versions(&m.attributes, &key))
                .collect();
            let members: Vec<Member<'_>> = known
                .iter()
                .zip(&refusals)
                .map(|(m, refused)| Member {
                    id: m.id,
                    attributes: &m.attributes,
                    capacity: lent(&m.attributes),
                    refused,
                })
                .collect();
            let service_facts = facts.get(key.as_str()).map_or(&[][..], Vec::as_slice);
            let planned = plan_service(&ServiceInput {
                key: &key,
                version: entry.version,
                versions: &specs,
                status: &status,
                facts: service_facts,
                members: &members,
                drained: &plan.drained,
                namespace_used: namespace_usage(in_force.iter().map(Arc::as_ref), &key, size),
                size,
            });
            // Outcomes this node records: completion by the first node placed, a failure by
            // the node it happened on.
            let previous = suite.get(&status_key(&key)).map(|e| e.version);
            let outcome = match &planned.record {
                Some((version, RecordedOutcome::Complete))
                    if planned.summary.nodes.first() == Some(&me.short()) =>
                {
                    Some((
                        *version,
                        Outcome::Complete {
                            at_unix_ms: unix_ms(),
                        },
                    ))
                }
                Some((version, RecordedOutcome::Failed { node, reason })) if *node == me => Some((
                    *version,
                    Outcome::Failed {
                        at_unix_ms: unix_ms(),
                        node: me.short(),
                        reason: reason.clone(),
                    },
                )),
                _ => None,
            };
            if let Some((version, outcome)) = outcome
                && let Some(next) = status.with(version, outcome)
            {
                plan.writes.push(next.to_entry(&key, previous));
            }
            if let Some(task) = planned.tasks.get(&me) {
                plan.mine.push(Assignment {
                    key: key.clone(),
                    task: *task,
                    versions,
                });
            }
            plan.services.push(planned.summary);
        }
        plan
    }
}
