//! The cloud's events as this agent sees them: deploys, updates and their steps, placements,
//! instances starting, becoming healthy or ready, failing, restarting and stopping, nodes
//! joining, leaving, failing and draining.
//!
//! Every agent holds the same suite and hears every member's instances, so each derives the
//! whole cloud's events from what changes in them, and `nubo events` on any agent shows them
//! all. Each event names the node it concerns and the agent that saw it, with the time it was
//! seen. The log keeps the last [`EVENTS_MAX`] events, in memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use nubo_proto::instance::InstanceState;
use nubo_proto::roster::MemberState;
use nubo_proto::suite::Suite;
use nubo_proto::{Node, NodeId};
use serde::{Deserialize, Serialize};

use crate::authority::{DRAIN_PREFIX, Intent, SignedDocument, drained_node};
use crate::planner::PlannedService;
use nubo_proto::outcome::{DeployStatus, Outcome, service_of_status};

/// Events kept.
pub const EVENTS_MAX: usize = 10_000;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Its number on the agent that recorded it (increasing).
    pub seq: u64,
    /// When it was seen (Unix milliseconds).
    pub at_unix_ms: u64,
    /// `deploy`, `update`, `placement`, `instance`, `limit`, `node` or `drain`.
    pub kind: String,
    /// The service it concerns.
    pub service: Option<String>,
    /// The node it concerns (short id).
    pub node: Option<String>,
    /// The agent that saw it (short id).
    pub origin: String,
    /// What happened.
    pub message: String,
}

/// Which events a reader wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only those after this number.
    pub after: u64,
    /// Only this service's.
    pub service: Option<String>,
    /// Only those of the nodes whose id starts so.
    pub node: Option<String>,
}

impl EventFilter {
    fn matches(&self, event: &EventRecord) -> bool {
        event.seq > self.after
            && self
                .service
                .as_ref()
                .is_none_or(|s| event.service.as_ref() == Some(s))
            && self.node.as_ref().is_none_or(|n| {
                event
                    .node
                    .as_ref()
                    .is_some_and(|e| e.starts_with(n.as_str()))
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rollout {
    phase: String,
    batch: Option<(u32, u32)>,
    running: u64,
    nodes: BTreeSet<String>,
    /// Why instances cannot all be placed (empty when they can).
    reasons: Vec<String>,
}

/// The event log and what it last saw.
pub struct EventLog {
    origin: String,
    events: VecDeque<EventRecord>,
    next_seq: u64,
    versions: BTreeMap<String, u64>,
    outcomes: BTreeSet<(String, u64)>,
    instances: BTreeMap<(String, String, u64), (InstanceState, u32, String)>,
    members: BTreeMap<NodeId, MemberState>,
    rollouts: BTreeMap<String, Rollout>,
    primed: bool,
}

fn unix_ms() -> u64 {
    crate::clock::unix_now().as_millis() as u64
}

fn version_short(version: u64) -> String {
    version.to_string()
}

impl EventLog {
    /// A log of the agent `origin`, taking what the suite holds now as known (no events).
    pub fn new(origin: String, suite: &Suite) -> EventLog {
        let mut log = EventLog {
            origin,
            events: VecDeque::new(),
            next_seq: 1,
            versions: BTreeMap::new(),
            outcomes: BTreeSet::new(),
            instances: BTreeMap::new(),
            members: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            primed: false,
        };
        for entry in suite.entries() {
            log.versions.insert(entry.key.clone(), entry.version);
            if let Some(service) = service_of_status(&entry.key)
                && let Some(status) = DeployStatus::from_entry(entry)
            {
                for version in status.outcomes.keys() {
                    log.outcomes.insert((service.to_string(), *version));
                }
            }
        }
        log
    }

    /// Records an event.
    pub fn push(
        &mut self,
        kind: &str,
        service: Option<&str>,
        node: Option<String>,
        message: String,
    ) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(EventRecord {
            seq: self.next_seq,
            at_unix_ms: unix_ms(),
            kind: kind.to_string(),
            service: service.map(str::to_string),
            node,
            origin: self.origin.clone(),
            message,
        });
        self.next_seq += 1;
    }

    /// The events `filter` selects, oldest first, at most `limit` (the newest).
    pub fn select(&self, filter: &EventFilter, limit: usize) -> Vec<EventRecord> {
        let matching: Vec<&EventRecord> =
            self.events.iter().filter(|e| filter.matches(e)).collect();
        matching[matching.len().saturating_sub(limit)..]
            .iter()
            .map(|e| (*e).clone())
            .collect()
    }

    /// The suite entry of `key` changed: a deploy, a stop, a removal, a drain, an outcome.
    pub fn suite_changed(&mut self, key: &str, suite: &Suite) {
        let Some(entry) = suite.get(key) else {
            return;
        };
        if self.versions.get(key) == Some(&entry.version) {
            return;
        }
        self.versions.insert(key.to_string(), entry.version);
        if let Some(service) = service_of_status(key) {
            let Some(status) = DeployStatus::from_entry(entry) else {
                return;
            };
            for (version, outcome) in &status.outcomes {
                if !self.outcomes.insert((service.to_string(), *version)) {
                    continue;
                }
                let message = match outcome {
                    Outcome::Complete { .. } => {
                        format!(
                            "version {} complete: every placed node ready",
                            version_short(*version)
                        )
                    }
                    Outcome::Failed { node, reason, .. } => {
                        format!(
                            "version {} failed on {node}: {reason}",
                            version_short(*version)
                        )
                    }
                };
                self.push("update", Some(service), None, message);
            }
            return;
        }
        let Ok(signed) = postcard::from_bytes::<SignedDocument>(&entry.document) else {
            return;
        };
        let signer: String = signed.document.signer[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if key.starts_with(DRAIN_PREFIX) {
            let node = drained_node(key).map(|n| n.short());
            let message = match signed.document.intent {
                Intent::Run => "draining: its instances move elsewhere, it takes no new one",
                _ => "drain ended: it takes instances again",
            };
            self.push("drain", None, node, message.to_string());
            return;
        }
        let verb = match signed.document.intent {
            Intent::Run => "deployed",
            Intent::Stop => "stopped",
            Intent::Remove => "removed",
        };
        self.push(
            "deploy",
            Some(key),
            None,
            format!(
                "version {} {verb} (signed by {signer}…)",
                version_short(entry.version)
            ),
        );
    }

    /// Compares members, their instances and every rollout with what was last seen, and
    /// records what changed.
    pub fn observe(&mut self, node: &Node, plan: &[PlannedService]) {
        // A deploy before the update steps it starts.
        let changed: Vec<String> = node
            .suite()
            .entries()
            .filter(|e| self.versions.get(&e.key) != Some(&e.version))
            .map(|e| e.key.clone())
            .collect();
        for key in changed {
            self.suite_changed(&key, node.suite());
        }
        let roster = node.roster();
        let mut members = BTreeMap::new();
        let mut instances = BTreeMap::new();
        let mut take = |id: NodeId, facts: &[nubo_proto::instance::InstanceFact]| {
            for fact in facts {
                instances.insert(
                    (id.short(), fact.service.clone(), fact.version),
                    (fact.state, fact.restarts, fact.note.clone()),
                );
            }
        };
        take(node.id(), &roster.me().instances);
        for member in roster.members() {
            members.insert(member.announce.peer.id, member.state);
            if member.state == MemberState::Alive {
                take(member.announce.peer.id, &member.announce.instances);
            }
        }
        let rollouts: BTreeMap<String, Rollout> = plan
            .iter()
            .map(|p| {
                (
                    p.key.clone(),
                    Rollout {
                        phase: p.phase.clone(),
                        batch: p.batch,
                        running: p.running_version,
                        nodes: p.nodes.iter().cloned().collect(),
                        reasons: p.reasons.clone(),
                    },
                )
            })
            .collect();
        // Causes before effects: an instance's news before the update step it allows.
        if self.primed {
            self.diff_members(&members);
            self.diff_instances(&instances);
            self.diff_rollouts(&rollouts);
        }
        self.primed = true;
        self.members = members;
        self.instances = instances;
        self.rollouts = rollouts;
    }

    fn diff_members(&mut self, members: &BTreeMap<NodeId, MemberState>) {
        for (id, state) in members {
            let before = self.members.get(id).copied();
            let message = match (before, state) {
                (None, MemberState::Alive) => "joined",
                (Some(MemberState::Alive), MemberState::Gone) => "failed: unreachable",
                (Some(MemberState::Alive), MemberState::Left) => "left the cloud",
                (Some(MemberState::Gone | MemberState::Left), MemberState::Alive) => "is back",
                _ => continue,
            };
            self.push("node", None, Some(id.short()), message.to_string());
        }
    }

    fn diff_rollouts(&mut self, rollouts: &BTreeMap<String, Rollout>) {
        for (key, now) in rollouts {
            let before = self.rollouts.get(key).cloned();
            let same_step = before.as_ref().is_some_and(|b| {
                b.phase == now.phase && b.batch == now.batch && b.running == now.running
            });
            if !same_step {
                let message = match (now.phase.as_str(), now.batch) {
                    ("rolling", Some((batch, batches))) => Some(format!(
                        "update to version {}: batch {batch} of {batches}",
                        version_short(now.running)
                    )),
                    ("reverting", _) => Some(format!(
                        "reverting to version {}",
                        version_short(now.running)
                    )),
                    ("failed", _) => Some(format!(
                        "update to version {} failed; it stopped where it was",
                        version_short(now.running)
                    )),
                    ("steady", _) if before.is_some() => {
                        Some(format!("steady at version {}", version_short(now.running)))
                    }
                    // The last old instances gone: still the same update.
                    ("starting", _) if before.as_ref().is_none_or(|b| b.running != now.running) => {
                        Some(format!("starting version {}", version_short(now.running)))
                    }
                    _ => None,
                };
                if let Some(message) = message {
                    self.push("update", Some(key), None, message);
                }
            }
            if before.as_ref().map(|b| &b.nodes) != Some(&now.nodes) && !now.nodes.is_empty() {
                let nodes: Vec<&str> = now.nodes.iter().map(String::as_str).collect();
                self.push(
                    "placement",
                    Some(key),
                    None,
                    format!("placed on {}", nodes.join(", ")),
                );
            }
            if !now.reasons.is_empty() && before.as_ref().map(|b| &b.reasons) != Some(&now.reasons)
            {
                let message = format!("cannot place every instance: {}", now.reasons.join("; "));
                self.push("placement", Some(key), None, message);
            }
        }
    }

    fn diff_instances(
        &mut self,
        instances: &BTreeMap<(String, String, u64), (InstanceState, u32, String)>,
    ) {
        for ((node, service, version), (state, restarts, note)) in instances {
            let id = (node.clone(), service.clone(), *version);
            let message = match self.instances.get(&id) {
                None => Some(format!(
                    "instance of version {} {}",
                    version_short(*version),
                    state.name()
                )),
                Some((before, _, _)) if before != state => Some(format!(
                    "instance of version {} {}",
                    version_short(*version),
                    state.name()
                )),
                _ => None,
            };
            if let Some(message) = message {
                self.push("instance", Some(service), Some(node.clone()), message);
            }
            if !note.is_empty()
                && self
                    .instances
                    .get(&id)
                    .is_none_or(|(_, _, before)| before != note)
            {
                let message = format!("instance of version {}: {note}", version_short(*version));
                self.push("limit", Some(service), Some(node.clone()), message);
            }
            if let Some((_, before, _)) = self.instances.get(&id)
                && restarts > before
            {
                self.push(
                    "instance",
                    Some(service),
                    Some(node.clone()),
                    format!(
                        "instance of version {} restarted ({restarts} restarts)",
                        version_short(*version)
                    ),
                );
            }
        }
        let gone: Vec<(String, String, u64)> = self
            .instances
            .keys()
            .filter(|id| !instances.contains_key(*id))
            .cloned()
            .collect();
        for (node, service, version) in gone {
            // An instance of a node that failed is not known to have stopped.
            let message = format!("instance of version {} stopped", version_short(version));
            self.push("instance", Some(&service), Some(node), message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubo_proto::suite::{AcceptAll, SuiteConfig};
    use nubo_proto::{Config, Peer, Time};

    #[test]
    fn a_rollout_and_instances_become_events_in_order() {
        let suite = Suite::new(SuiteConfig::default(), Box::new(AcceptAll), Time::ZERO);
        let mut log = EventLog::new("me".into(), &suite);
        let mut node = Node::new(Peer::new(NodeId(1)), Config::default(), 1, Time::ZERO);
        let mut plan = vec![PlannedService {
            key: "web/site".into(),
            phase: "steady".into(),
            running_version: 1,
            nodes: vec!["a".into()],
            ..PlannedService::default()
        }];
        log.observe(&node, &plan);
        assert!(
            log.select(&EventFilter::default(), 100).is_empty(),
            "priming records nothing"
        );
        plan[0].phase = "rolling".into();
        plan[0].batch = Some((1, 2));
        plan[0].running_version = 2;
        let fact = |state| nubo_proto::instance::InstanceFact {
            service: "web/site".into(),
            version: 2,
            state,
            restarts: 0,
            ports: vec![],
            note: String::new(),
        };
        node.set_instances(Time::ZERO, vec![fact(InstanceState::Starting)]);
        log.observe(&node, &plan);
        node.set_instances(Time::ZERO, vec![fact(InstanceState::Ready)]);
        log.observe(&node, &plan);
        node.set_instances(Time::ZERO, vec![]);
        log.observe(&node, &plan);
        let messages: Vec<String> = log
            .select(&EventFilter::default(), 100)
            .iter()
            .map(|e| e.message.clone())
            .collect();
        assert_eq!(
            messages,
            vec![
                "instance of version 2 starting",
                "update to version 2: batch 1 of 2",
                "instance of version 2 ready",
                "instance of version 2 stopped",
            ]
        );
        let filtered = log.select(
            &EventFilter {
                after: 2,
                service: Some("web/site".into()),
                node: Some(NodeId(1).short()[..3].to_string()),
            },
            100,
        );
        assert_eq!(filtered.len(), 2);
        assert_eq!(log.select(&EventFilter::default(), 1).len(), 1);
    }
}
