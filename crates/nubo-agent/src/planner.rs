//! The planner: from the suite and the roster, which nodes run which service. Every agent
//! plans the whole cloud the same way ([`nubo_proto::service::place`]) and runs its own part.

use std::collections::BTreeMap;
use std::sync::Arc;

use nubo_proto::roster::MemberState;
use nubo_proto::service::{Candidate, Count, Demand, place};
use nubo_proto::{Node, NodeId};
use serde::{Deserialize, Serialize};

use crate::authority::{Intent, SignedDocument};
use crate::description::{self, Service};
use crate::runner::Assignment;

/// Attribute announcing the cores (in thousandths) a node lends.
pub const ATTR_CPU: &str = "nubo.cpu_millis";
/// Attribute announcing the memory a node lends.
pub const ATTR_MEMORY: &str = "nubo.memory_bytes";
/// Attribute listing the services a node refuses, comma-separated.
pub const ATTR_REFUSES: &str = "nubo.refuses";

/// One service and where it runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlannedService {
    /// `namespace/name`.
    pub key: String,
    /// Its document's version.
    pub version: u64,
    /// `run`, `stop` or `remove`.
    pub intent: String,
    /// Instances wanted (after constraints; 0 when stopped).
    pub wanted: usize,
    /// The nodes chosen, best first.
    pub nodes: Vec<String>,
    /// Why it does not run, if it does not.
    pub problem: Option<String>,
}

struct Parsed {
    signed: SignedDocument,
    service: Result<Service, String>,
}

/// Plans, remembering parsed descriptions by key and version.
#[derive(Default)]
pub struct Planner {
    cache: BTreeMap<(String, u64), Arc<Parsed>>,
}

fn demand_of(attributes: &BTreeMap<String, String>) -> Demand {
    let read = |name: &str| attributes.get(name).and_then(|v| v.parse().ok());
    Demand {
        cpu_millis: read(ATTR_CPU).unwrap_or(u64::MAX),
        memory_bytes: read(ATTR_MEMORY).unwrap_or(u64::MAX),
        disk_bytes: u64::MAX,
    }
}

impl Planner {
    fn parsed(&mut self, key: &str, version: u64, document: &[u8]) -> Option<Arc<Parsed>> {
        if let Some(parsed) = self.cache.get(&(key.to_string(), version)) {
            return Some(parsed.clone());
        }
        // Entries were checked when they entered the suite; here they are only read.
        let signed: SignedDocument = postcard::from_bytes(document).ok()?;
        let service = description::parse(&signed.document.description)
            .map_err(|errors| errors.first().map(ToString::to_string).unwrap_or_default())
            .and_then(|s| {
                if s.key() == key {
                    Ok(s)
                } else {
                    Err(format!("the description names {}, not {key}", s.key()))
                }
            });
        let parsed = Arc::new(Parsed { signed, service });
        self.cache.retain(|(k, _), _| k != key);
        self.cache
            .insert((key.to_string(), version), parsed.clone());
        Some(parsed)
    }

    /// What the namespace's services other than `except` use in `plan`: cores (thousandths),
    /// memory and instances.
    pub fn usage(&self, plan: &[PlannedService], namespace: &str, except: &str) -> (u64, u64, u64) {
        let mut used = (0, 0, 0);
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
            used.0 += n * service.placement.demand.cpu_millis;
            used.1 += n * service.placement.demand.memory_bytes;
            used.2 += n;
        }
        used
    }

    /// Plans every service; returns the plan and this node's assignments.
    pub fn plan(&mut self, node: &Node) -> (Vec<PlannedService>, Vec<Assignment>) {
        let me = node.id();
        let roster = node.roster();
        let my_attributes: BTreeMap<String, String> =
            roster.me().attributes.iter().cloned().collect();
        let members: Vec<(NodeId, BTreeMap<String, String>)> = std::iter::once((me, my_attributes))
            .chain(
                roster
                    .members()
                    .filter(|m| m.state == MemberState::Alive)
                    .map(|m| {
                        (
                            m.announce.peer.id,
                            m.announce.attributes.iter().cloned().collect(),
                        )
                    }),
            )
            .collect();
        let mut plan = Vec::new();
        let mut mine = Vec::new();
        // Per namespace: (cpu, memory, instances) used so far, services taken in key order.
        let mut used: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        let entries: Vec<(String, u64, bytes::Bytes)> = node
            .suite()
            .entries()
            .map(|e| (e.key.clone(), e.version, e.document.clone()))
            .collect();
        for (key, version, document) in entries {
            let Some(parsed) = self.parsed(&key, version, &document) else {
                continue;
            };
            let intent = parsed.signed.document.intent;
            let mut planned = PlannedService {
                key: key.clone(),
                version,
                intent: match intent {
                    Intent::Run => "run",
                    Intent::Stop => "stop",
                    Intent::Remove => "remove",
                }
                .into(),
                wanted: 0,
                nodes: Vec::new(),
                problem: None,
            };
            if intent != Intent::Run {
                if intent == Intent::Stop {
                    plan.push(planned);
                }
                continue;
            }
            let service = match &parsed.service {
                Ok(service) => service,
                Err(problem) => {
                    planned.problem = Some(problem.clone());
                    plan.push(planned);
                    continue;
                }
            };
            let candidates: Vec<Candidate<'_>> = members
                .iter()
                .map(|(id, attributes)| Candidate {
                    id: *id,
                    attributes,
                    capacity: demand_of(attributes),
                    refuses: attributes
                        .get(ATTR_REFUSES)
                        .is_some_and(|list| list.split(',').any(|k| k == key)),
                })
                .collect();
            let chosen = place(&key, &service.placement, &candidates);
            // Quotas count every service of the namespace, in key order; only granted
            // deployers are held to them (the administrator is not).
            let demand = service.placement.demand;
            let n = chosen.len() as u64;
            let entry = used.entry(service.namespace.clone()).or_default();
            let after = (
                entry.0 + demand.cpu_millis * n,
                entry.1 + demand.memory_bytes * n,
                entry.2 + n,
            );
            if let Some(grant) = &parsed.signed.document.grant {
                let quota = grant.grant.quota;
                if after.0 > quota.cpu_millis
                    || after.1 > quota.memory_bytes
                    || after.2 > quota.instances
                {
                    planned.problem = Some("over the namespace's quota".into());
                    plan.push(planned);
                    continue;
                }
            }
            *entry = after;
            planned.wanted = match service.placement.count {
                Count::Replicas(n) => n as usize,
                _ => chosen.len(),
            };
            if chosen.len() < planned.wanted {
                planned.problem = Some(format!(
                    "only {} of {} nodes qualify",
                    chosen.len(),
                    planned.wanted
                ));
            }
            planned.nodes = chosen.iter().map(NodeId::short).collect();
            if chosen.contains(&me) {
                mine.push(Assignment {
                    key: key.clone(),
                    version,
                    service: service.clone(),
                });
            }
            plan.push(planned);
        }
        (plan, mine)
    }
}
