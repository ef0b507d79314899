//! Coordination: who runs each service, decided with no node knowing the whole cloud.
//!
//! **One coordinator per service.** The service's key hashes to a position on the ring; the
//! node that owns the position (the first at or after it, as for a key-value record)
//! coordinates the service. It plans the service ([`crate::placement::plan_service`]) from
//! what the nodes concerned report, and tells each of them its task. A ring change moves the
//! role: the old coordinator hands its reports over to the new one, and reporters that ask
//! the wrong node are told to look again.
//!
//! **Reach: who reports.** A node reports a service to its coordinator when it runs (or was
//! told to run) an instance of it, or when it is *in reach*: among the nodes whose
//! rendezvous score for the service is highest, about `reach_min + reach_per_instance ×
//! wanted` of them, which each node tells from its own score and the cloud's size (read from
//! the ring's spacing). Placement ranks by the same score, so the nodes in reach are the
//! ones it would pick first, and in a cloud no larger than the reach every node reports:
//! placement then sees every member, exactly as if it knew the whole cloud. What one node
//! says of itself (its attributes and free capacity, its instances of the service, the
//! versions it refuses) goes in one report per coordinator, sent when it changes.
//!
//! **Quiet when nothing changes.** Every `beat_interval` a reporter sends each of its
//! coordinators a beat naming the last report it sent and the last tasks it received; the
//! coordinator answers only when it lacks the one or the reporter the other. Failures come
//! from [`crate::liveness`]: a departed reporter is dropped at once, a departed coordinator
//! is replaced by the ring's next node, to which the reporters turn. The beats also let a
//! coordinator notice a reporter that died with every overlay neighbour it had (no one was
//! left to report it): a reporter silent for a beat and a quarter is handed to liveness,
//! which probes it before declaring it gone.
//!
//! **A coordinator that just took a service** (a new service, or one it inherited without a
//! hand-over) waits `gather` before deciding, so that it decides with the reports of every
//! node concerned rather than the first few. Until a coordinator decides, nodes keep what
//! they run. A node obeys only the coordinator it reports the service to, so two nodes that
//! both believe they coordinate a service (while their rings disagree) cannot both command
//! one node; once the rings agree, one of them hands over.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::instance::{INSTANCE_FACTS_MAX, InstanceFact};
use crate::kv::key_position;
use crate::outcome::{DeployStatus, Outcome, status_key};
use crate::placement::{
    Member, PlannedService, RecordedOutcome, ServiceInput, ServicePlan, lent, namespace_usage,
    plan_service,
};
use crate::ring::{Position, Ring};
use crate::rollout::Task;
use crate::roster::{ATTRIBUTE_BYTES_MAX, ATTRIBUTES_MAX};
use crate::service::{Demand, score};
use crate::spec::{Document, Intent, ServiceSpec, SpecReader};
use crate::suite::{KEY_BYTES_MAX, Suite, SuiteEntry, annotated};
use crate::time::Time;

/// The suffix of the annotation that widens a service's reach (`ns/name#reach`): a `u8`,
/// each step multiplying the nodes in reach by 4.
pub const REACH_SUFFIX: &str = "#reach";
/// Most widening steps.
pub const REACH_STEPS_MAX: u8 = 10;

/// The key of a service's reach annotation.
pub fn reach_key(service: &str) -> String {
    format!("{service}{REACH_SUFFIX}")
}

/// The widening steps the suite records for `service`.
pub fn reach_steps(suite: &Suite, service: &str) -> u8 {
    suite
        .get(&reach_key(service))
        .and_then(|e| postcard::from_bytes::<u8>(&e.document).ok())
        .map_or(0, |steps| steps.min(REACH_STEPS_MAX))
}

/// How long a size estimate counts (the largest of the window is used).
const SIZE_WINDOW: Duration = Duration::from_secs(60);
/// Most size estimates kept (runs of equal estimates count once).
const SIZE_SAMPLES_MAX: usize = 64;

/// How often per beat interval a coordinator looks for silent reporters.
const WATCHES_PER_BEAT: u32 = 4;

/// Most services in one report, tasks message or list of keys.
pub const SERVICES_MAX: usize = 1024;
/// Most versions one report says a node refuses.
pub const REFUSED_MAX: usize = 16;

/// Tuning of coordination.
#[derive(Clone, Debug)]
pub struct CoordinationConfig {
    /// Whether this node takes part.
    pub enabled: bool,
    /// Nodes in reach of every service, whatever it wants.
    pub reach_min: usize,
    /// Further nodes in reach per instance wanted.
    pub reach_per_instance: usize,
    /// How often a reporter confirms its reports and tasks with each coordinator.
    pub beat_interval: Duration,
    /// How long a coordinator that just took a service waits for reports before deciding.
    pub gather: Duration,
    /// Most reporters kept per service.
    pub reporters_max: usize,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        CoordinationConfig {
            enabled: true,
            reach_min: 16,
            reach_per_instance: 4,
            beat_interval: Duration::from_secs(10),
            gather: Duration::from_secs(1),
            reporters_max: 256,
        }
    }
}

/// What a node says of itself to a coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    /// Its attributes, sorted by name (capacity lent, drivers, region...).
    pub attributes: Vec<(String, String)>,
    /// What it can still take: what it lends less what its instances and tasks use.
    pub free: Demand,
}

impl Card {
    fn is_within_bounds(&self) -> bool {
        self.attributes.len() <= ATTRIBUTES_MAX
            && self.attributes.iter().all(|(name, value)| {
                name.len() <= ATTRIBUTE_BYTES_MAX && value.len() <= ATTRIBUTE_BYTES_MAX
            })
    }
}

/// What a node says of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReport {
    /// The service.
    pub key: String,
    /// In reach: the node may be placed.
    pub candidate: bool,
    /// Its instances of the service.
    pub facts: Vec<InstanceFact>,
    /// Versions of the service it refuses to run.
    pub refused: Vec<u64>,
}

impl ServiceReport {
    fn is_within_bounds(&self) -> bool {
        self.key.len() <= KEY_BYTES_MAX
            && self.facts.len() <= INSTANCE_FACTS_MAX
            && self.facts.iter().all(InstanceFact::is_within_bounds)
            && self.refused.len() <= REFUSED_MAX
    }
}

/// A reporter as a hand-over carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedReport {
    /// The reporter.
    pub peer: Peer,
    /// Its report's sequence number.
    pub seq: u64,
    /// Its card.
    pub card: Card,
    /// Its report of the service.
    pub report: ServiceReport,
}

/// Messages of coordination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordinationMessage {
    /// Everything the sender reports to this coordinator; it replaces what came before.
    Report {
        /// Grows with every report the sender makes.
        seq: u64,
        /// The sender.
        card: Card,
        /// The services.
        services: Vec<ServiceReport>,
    },
    /// The sender's last report to this coordinator and the last tasks it received from it.
    Beat {
        /// The report's sequence number.
        seq: u64,
        /// The tasks' sequence number (0: none).
        tasks_seq: u64,
    },
    /// Send your report again.
    Resend,
    /// The receiver's tasks from this coordinator, replacing earlier ones.
    Tasks {
        /// Grows with every tasks message the coordinator sends.
        seq: u64,
        /// What to do, per service; a service not listed runs nothing here.
        tasks: Vec<(String, Task)>,
    },
    /// The sender does not coordinate these services: ask the ring again.
    NotMine {
        /// The services.
        keys: Vec<String>,
    },
    /// The reports of a service, handed to the node now responsible for it.
    Handover {
        /// The service.
        key: String,
        /// Its reporters.
        reporters: Vec<HandedReport>,
    },
}

impl CoordinationMessage {
    /// Whether every field respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            CoordinationMessage::Report { card, services, .. } => {
                card.is_within_bounds()
                    && services.len() <= SERVICES_MAX
                    && services.iter().all(ServiceReport::is_within_bounds)
            }
            CoordinationMessage::Tasks { tasks, .. } => {
                tasks.len() <= SERVICES_MAX && tasks.iter().all(|(k, _)| k.len() <= KEY_BYTES_MAX)
            }
            CoordinationMessage::NotMine { keys } => {
                keys.len() <= SERVICES_MAX && keys.iter().all(|k| k.len() <= KEY_BYTES_MAX)
            }
            CoordinationMessage::Handover { key, reporters } => {
                key.len() <= KEY_BYTES_MAX
                    && reporters.len() <= SERVICES_MAX
                    && reporters
                        .iter()
                        .all(|r| r.card.is_within_bounds() && r.report.is_within_bounds())
            }
            CoordinationMessage::Beat { .. } | CoordinationMessage::Resend => true,
        }
    }
}

/// The ring position of a service's coordinator.
pub fn service_position(key: &str) -> Position {
    key_position(key.as_bytes())
}

/// Counters of coordination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordinationCounters {
    /// Reports sent.
    pub reports_sent: u64,
    /// Beats sent.
    pub beats_sent: u64,
    /// Services planned (each decision counts).
    pub plans: u64,
    /// Tasks messages sent.
    pub tasks_sent: u64,
    /// Services handed over to another coordinator.
    pub handovers: u64,
    /// Coordinator lookups started.
    pub lookups: u64,
    /// Times this node judged its reach of every service again (the size estimate moved).
    pub reach_judged: u64,
    /// Silent reporters handed to liveness to probe.
    pub suspected: u64,
}

/// Where this node stands with one coordinator.
#[derive(Clone, Debug, Default)]
struct Link {
    peer: Option<Peer>,
    /// The card and the services reported to it, as last sent.
    sent_card: Card,
    sent: Vec<ServiceReport>,
    /// The last report's sequence number (0: to be sent again).
    sent_seq: u64,
    /// The last tasks received from it.
    tasks_seq: u64,
}

/// A reporter, as a coordinator knows it.
#[derive(Clone, Debug)]
struct Reporter {
    peer: Peer,
    seq: u64,
    /// When it last reported or beat: a reporter silent for a beat and a quarter is
    /// suspected, one silent for three beats dropped.
    heard: Time,
    /// It was suspected since it was last heard.
    suspected: bool,
    card: Card,
    attributes: BTreeMap<String, String>,
    services: BTreeMap<String, ServiceReport>,
    /// The tasks last sent to it, with their sequence number.
    tasks_seq: u64,
    tasks: BTreeMap<String, Task>,
}

/// A service this node coordinates.
#[derive(Clone, Debug)]
struct Coordinated {
    /// It is planned, when dirty, from this time on: `gather` after this node got the
    /// service, or when a wider reach's reports are in.
    not_before: Time,
    dirty: bool,
    plan: Option<ServicePlan>,
    /// When this node last widened the service's reach.
    widened: Option<Time>,
}

/// One node's part in coordination: reporter of its own services, coordinator of those its
/// ring position makes it responsible for.
///
/// Contract: set this node's attributes, instances and refusals as they change; tell it of
/// every changed suite key ([`Coordination::suite_changed`]) and every departure; feed it its
/// messages and the results of its lookups; call [`Coordination::handle_timeout`] by
/// [`Coordination::poll_timeout`] and [`Coordination::flush`] after every input, with the
/// node's suite, ring and size estimate; send its transmits, start its lookups, publish its
/// suite writes. [`Coordination::tasks`] says what this node must run.
pub struct Coordination {
    me: Peer,
    config: CoordinationConfig,
    reader: Box<dyn SpecReader>,
    /// Documents of the services this node reports or coordinates, read once, by key and
    /// version.
    documents: BTreeMap<(String, u64), Document>,
    /// The services this node is in reach of.
    candidates: BTreeSet<String>,
    /// Nodes drained: they take no new instance.
    drained: BTreeSet<NodeId>,
    /// Services whose reach is to be judged again (all of them: `all_dirty`).
    dirty: BTreeSet<String>,
    all_dirty: bool,
    attributes: Vec<(String, String)>,
    facts: BTreeMap<String, Vec<InstanceFact>>,
    refused: BTreeMap<String, Vec<u64>>,
    /// The services this node reports, each with its coordinator (`None`: being looked up).
    reporting: BTreeMap<String, Option<Peer>>,
    links: BTreeMap<NodeId, Link>,
    seq: u64,
    /// What this node must do, per service.
    tasks: BTreeMap<String, Task>,
    tasks_changed: bool,
    lookups: Vec<(u64, Position)>,
    waiting: BTreeMap<u64, String>,
    next_lookup: u64,
    next_beat: Time,
    /// When reporters are next checked for silence.
    next_watch: Time,
    /// Silent reporters to probe (through liveness).
    suspects: Vec<Peer>,
    /// When failed lookups are tried again.
    retry_lookups: Time,
    /// Services whose coordinator is looked up again only from a given time.
    lookup_after: BTreeMap<String, Time>,
    /// Nodes the transport could not reach lately, until when lookups pass over them.
    unreachable: BTreeMap<NodeId, Time>,
    reporters: BTreeMap<NodeId, Reporter>,
    coordinated: BTreeMap<String, Coordinated>,
    /// Something this node reports may have changed.
    stale: bool,
    /// Recent size estimates, with when they were made.
    sizes: VecDeque<(Time, usize)>,
    /// The largest of `sizes`.
    sizes_max: Option<usize>,
    /// Some coordinated service may be due for planning.
    planning: bool,
    /// When services still gathering are due.
    plan_wake: Time,
    size: Option<usize>,
    transmits: Vec<(Peer, CoordinationMessage)>,
    /// Messages to this node itself (it coordinates services it reports).
    local: Vec<CoordinationMessage>,
    writes: Vec<SuiteEntry>,
    counters: CoordinationCounters,
}

impl Coordination {
    /// Coordination of `me`, reading documents with `reader`.
    pub fn new(
        me: Peer,
        config: CoordinationConfig,
        reader: Box<dyn SpecReader>,
        now: Time,
    ) -> Coordination {
        let offset = Duration::from_micros(
            (me.id.0 as u64) % u64::try_from(config.beat_interval.as_micros().max(1)).unwrap_or(1),
        );
        Coordination {
            me,
            next_beat: now + offset,
            next_watch: now + config.beat_interval / WATCHES_PER_BEAT,
            suspects: Vec::new(),
            config,
            reader,
            documents: BTreeMap::new(),
            candidates: BTreeSet::new(),
            drained: BTreeSet::new(),
            dirty: BTreeSet::new(),
            all_dirty: true,
            attributes: Vec::new(),
            facts: BTreeMap::new(),
            refused: BTreeMap::new(),
            reporting: BTreeMap::new(),
            links: BTreeMap::new(),
            // Sequence numbers start at the start time, so that a restarted node's reports
            // and tasks are newer than its previous life's.
            seq: now.as_micros(),
            tasks: BTreeMap::new(),
            tasks_changed: false,
            lookups: Vec::new(),
            waiting: BTreeMap::new(),
            next_lookup: 0,
            retry_lookups: Time::MAX,
            lookup_after: BTreeMap::new(),
            unreachable: BTreeMap::new(),
            reporters: BTreeMap::new(),
            coordinated: BTreeMap::new(),
            stale: false,
            sizes: VecDeque::new(),
            sizes_max: None,
            planning: false,
            plan_wake: Time::MAX,
            size: None,
            transmits: Vec::new(),
            local: Vec::new(),
            writes: Vec::new(),
            counters: CoordinationCounters::default(),
        }
    }

    /// Sends a message, to this node itself without the network.
    fn send(&mut self, to: Peer, message: CoordinationMessage) {
        if to.id == self.me.id {
            self.local.push(message);
        } else {
            self.transmits.push((to, message));
        }
    }

    /// Replaces the reader of suite documents.
    pub fn set_reader(&mut self, reader: Box<dyn SpecReader>) {
        self.reader = reader;
        self.documents.clear();
        self.all_dirty = true;
        self.stale = true;
    }

    /// What this node must do, per service: a service not listed runs nothing here.
    pub fn tasks(&self) -> &BTreeMap<String, Task> {
        &self.tasks
    }

    /// Whether the tasks changed since the last call.
    pub fn take_tasks_changed(&mut self) -> bool {
        core::mem::take(&mut self.tasks_changed)
    }

    /// The services this node coordinates, with their last plan.
    pub fn coordinated(&self) -> impl Iterator<Item = (&str, Option<&PlannedService>)> + '_ {
        self.coordinated
            .iter()
            .map(|(k, c)| (k.as_str(), c.plan.as_ref().map(|p| &p.summary)))
    }

    /// The instances of a service this node coordinates, by node, as reported.
    pub fn instances_of(&self, key: &str) -> Vec<(Peer, &InstanceFact)> {
        self.reporters
            .values()
            .filter_map(|r| r.services.get(key).map(|s| (r.peer, s)))
            .flat_map(|(peer, s)| s.facts.iter().map(move |f| (peer, f)))
            .collect()
    }

    /// The services this node is in reach of (it may be placed).
    pub fn candidates(&self) -> impl Iterator<Item = &str> + '_ {
        self.candidates.iter().map(String::as_str)
    }

    /// Nodes drained, as the suite says.
    pub fn drained(&self) -> &BTreeSet<NodeId> {
        &self.drained
    }

    /// The services this node reports, with the coordinator of each (`None`: being looked
    /// up).
    pub fn reporting(&self) -> impl Iterator<Item = (&str, Option<Peer>)> + '_ {
        self.reporting.iter().map(|(k, c)| (k.as_str(), *c))
    }

    /// Counters since start.
    pub fn counters(&self) -> CoordinationCounters {
        self.counters
    }

    /// Sets this node's attributes (bounded as roster attributes are).
    pub fn set_attributes(&mut self, mut attributes: Vec<(String, String)>) {
        attributes.retain(|(name, value)| {
            name.len() <= ATTRIBUTE_BYTES_MAX && value.len() <= ATTRIBUTE_BYTES_MAX
        });
        attributes.sort();
        attributes.dedup_by(|a, b| a.0 == b.0);
        attributes.truncate(ATTRIBUTES_MAX);
        if attributes != self.attributes {
            self.attributes = attributes;
            self.stale = true;
        }
    }

    /// This node's attributes.
    pub fn attributes(&self) -> &[(String, String)] {
        &self.attributes
    }

    /// Sets the instances this node runs (of every service).
    pub fn set_instances(&mut self, instances: &[InstanceFact]) {
        let mut facts: BTreeMap<String, Vec<InstanceFact>> = BTreeMap::new();
        for fact in instances.iter().filter(|f| f.is_within_bounds()) {
            let list = facts.entry(fact.service.clone()).or_default();
            if list.len() < INSTANCE_FACTS_MAX {
                list.push(fact.clone());
            }
        }
        for list in facts.values_mut() {
            list.sort();
        }
        if facts != self.facts {
            self.facts = facts;
            self.stale = true;
        }
    }

    /// Sets the versions of services this node refuses to run.
    pub fn set_refusals(&mut self, refusals: &[(String, u64)]) {
        let mut refused: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (key, version) in refusals {
            let list = refused.entry(key.clone()).or_default();
            if list.len() < REFUSED_MAX {
                list.push(*version);
            }
        }
        if refused != self.refused {
            self.refused = refused;
            self.stale = true;
        }
    }

    /// A suite key changed: its documents are read again.
    pub fn suite_changed(&mut self, key: &str) {
        let base = annotated(key).unwrap_or(key);
        if let Some(coordinated) = self.coordinated.get_mut(base) {
            coordinated.dirty = true;
            self.planning = true;
        }
        self.dirty.insert(base.to_string());
        self.stale = true;
    }

    /// A member is gone: a reporter's reports are dropped, a coordinator's services are
    /// looked up again.
    pub fn departed(&mut self, id: NodeId) {
        if let Some(reporter) = self.reporters.remove(&id) {
            for key in reporter.services.keys() {
                if let Some(c) = self.coordinated.get_mut(key) {
                    c.dirty = true;
                    self.planning = true;
                }
            }
        }
        if self.links.remove(&id).is_some() {
            for coordinator in self.reporting.values_mut() {
                if coordinator.is_some_and(|c| c.id == id) {
                    *coordinator = None;
                }
            }
            self.stale = true;
        }
    }

    /// `peer` could not be reached (its transport failed): the services it coordinates for
    /// this node go to the next node of the ring, and lookups pass over it for `gather`.
    /// (Its reports here stay until liveness decides.)
    pub fn peer_down(&mut self, now: Time, peer: NodeId) {
        self.unreachable.retain(|_, until| *until > now);
        self.unreachable.insert(peer, now + self.config.gather);
        let mut changed = false;
        for coordinator in self.reporting.values_mut() {
            if coordinator.is_some_and(|c| c.id == peer) {
                *coordinator = None;
                changed = true;
            }
        }
        if changed {
            if let Some(link) = self.links.get_mut(&peer) {
                link.sent_seq = 0;
            }
            self.stale = true;
        }
    }

    fn document(&mut self, entry: &SuiteEntry) -> Document {
        let id = (entry.key.clone(), entry.version);
        if let Some(document) = self.documents.get(&id) {
            return document.clone();
        }
        let document = self.reader.read(entry);
        self.documents.insert(id, document.clone());
        document
    }

    fn spec(&mut self, entry: &SuiteEntry) -> Option<Arc<ServiceSpec>> {
        match self.document(entry) {
            Document::Service(spec) => Some(spec),
            _ => None,
        }
    }

    /// The share of the cloud in reach of a service wanting `wanted` instances, widened
    /// `steps` times.
    fn reach_fraction(&self, wanted: u64, steps: u8) -> f64 {
        let Some(size) = self.size else {
            return 0.0;
        };
        let reach = ((self.config.reach_min as f64)
            + (self.config.reach_per_instance as f64) * (wanted as f64))
            * 4f64.powi(i32::from(steps.min(REACH_STEPS_MAX)));
        reach / size.max(1) as f64
    }

    /// Whether this node is in reach of `key`, a service wanting `wanted` instances whose
    /// reach was widened `steps` times.
    fn in_reach(&self, key: &str, wanted: u64, steps: u8) -> bool {
        if self.size.is_none() {
            return false;
        }
        let fraction = self.reach_fraction(wanted, steps);
        if fraction >= 1.0 {
            return true;
        }
        let threshold = (1.0 - fraction) * u64::MAX as f64;
        score(key, self.me.id) as f64 >= threshold
    }

    /// Judges again whether this node is in reach of the services marked dirty.
    fn judge_reach(&mut self, suite: &Suite) {
        let keys: Vec<String> = if core::mem::take(&mut self.all_dirty) {
            self.dirty.clear();
            suite
                .entries()
                .filter(|e| annotated(&e.key).is_none())
                .map(|e| e.key.clone())
                .chain(self.candidates.iter().cloned())
                .collect()
        } else {
            core::mem::take(&mut self.dirty).into_iter().collect()
        };
        let size = self.size.unwrap_or(1);
        for key in keys {
            let candidate = match suite.get(&key).map(|e| self.reader.read(e)) {
                Some(Document::Service(spec)) => {
                    spec.intent == Intent::Run
                        && spec.problem.is_none()
                        && self.in_reach(&key, spec.wanted(size), reach_steps(suite, &key))
                }
                Some(Document::Drain { node, on }) => {
                    let changed = if on {
                        self.drained.insert(node)
                    } else {
                        self.drained.remove(&node)
                    };
                    if changed {
                        // Every service may have to move off (or may come back to) it.
                        for c in self.coordinated.values_mut() {
                            c.dirty = true;
                        }
                        self.planning = true;
                    }
                    false
                }
                _ => false,
            };
            if candidate {
                self.candidates.insert(key);
            } else {
                self.candidates.remove(&key);
            }
        }
    }

    /// Which services this node reports, and the reports each coordinator gets.
    fn refresh(&mut self, now: Time, suite: &Suite) {
        self.stale = false;
        self.lookup_after.retain(|_, at| *at > now);
        self.judge_reach(suite);
        let involved: BTreeSet<String> = self
            .candidates
            .iter()
            .chain(self.facts.keys())
            .chain(self.tasks.keys())
            .cloned()
            .collect();
        self.reporting.retain(|k, _| involved.contains(k));
        for key in &involved {
            if !self.reporting.contains_key(key) {
                self.reporting.insert(key.clone(), None);
            }
        }
        // Look up the coordinators not known.
        let missing: Vec<String> = self
            .reporting
            .iter()
            .filter(|(_, c)| c.is_none())
            .map(|(k, _)| k.clone())
            .filter(|k| !self.waiting.values().any(|w| w == k))
            .filter(|k| !self.lookup_after.contains_key(k))
            .collect();
        for key in missing {
            self.next_lookup += 1;
            self.counters.lookups += 1;
            self.waiting.insert(self.next_lookup, key.clone());
            self.lookups
                .push((self.next_lookup, service_position(&key)));
        }
        // One report per coordinator.
        let mut by_coordinator: BTreeMap<NodeId, (Peer, Vec<ServiceReport>)> = BTreeMap::new();
        for (key, coordinator) in &self.reporting {
            let Some(coordinator) = coordinator else {
                continue;
            };
            by_coordinator
                .entry(coordinator.id)
                .or_insert_with(|| (*coordinator, Vec::new()))
                .1
                .push(ServiceReport {
                    key: key.clone(),
                    candidate: self.candidates.contains(key),
                    facts: self.facts.get(key).cloned().unwrap_or_default(),
                    refused: self.refused.get(key).cloned().unwrap_or_default(),
                });
        }
        // Coordinators no longer reported to hear that they have nothing from this node.
        for (id, link) in &self.links {
            if !by_coordinator.contains_key(id)
                && !link.sent.is_empty()
                && let Some(peer) = link.peer
            {
                by_coordinator.insert(*id, (peer, Vec::new()));
            }
        }
        let card = self.card(suite);
        for (id, (peer, services)) in by_coordinator {
            let link = self.links.entry(id).or_default();
            link.peer = Some(peer);
            if link.sent_seq != 0 && link.sent == services && link.sent_card == card {
                continue;
            }
            self.seq += 1;
            link.sent = services.clone();
            link.sent_card = card.clone();
            link.sent_seq = self.seq;
            self.counters.reports_sent += 1;
            let report = CoordinationMessage::Report {
                seq: self.seq,
                card: card.clone(),
                services,
            };
            self.send(peer, report);
        }
        self.links.retain(|_, l| !l.sent.is_empty());
        // Documents are kept for the services this node reports or coordinates.
        let coordinated = &self.coordinated;
        let reporting = &self.reporting;
        self.documents
            .retain(|(k, _), _| reporting.contains_key(k) || coordinated.contains_key(k));
    }

    /// This node's card: attributes, and what it lends less what its services use.
    fn card(&mut self, suite: &Suite) -> Card {
        let attributes: BTreeMap<String, String> = self.attributes.iter().cloned().collect();
        let mut free = lent(&attributes);
        let keys: BTreeSet<String> = self
            .facts
            .keys()
            .chain(self.tasks.keys())
            .cloned()
            .collect();
        for key in keys {
            let version = self
                .facts
                .get(&key)
                .and_then(|f| f.iter().map(|f| f.version).max())
                .or_else(|| suite.get(&key).map(|e| e.version));
            let Some(entry) =
                version.and_then(|v| suite.history(&key).find(|e| e.version == v).cloned())
            else {
                continue;
            };
            if let Some(spec) = self.spec(&entry) {
                let demand = spec.placement.demand;
                free.cpu_millis = free.cpu_millis.saturating_sub(demand.cpu_millis);
                free.memory_bytes = free.memory_bytes.saturating_sub(demand.memory_bytes);
                free.disk_bytes = free.disk_bytes.saturating_sub(demand.disk_bytes);
            }
        }
        Card {
            attributes: self.attributes.clone(),
            free,
        }
    }

    /// Lookups to start on the ring: `(tag, position)`.
    pub fn drain_lookups(&mut self) -> std::vec::Drain<'_, (u64, Position)> {
        self.lookups.drain(..)
    }

    /// A lookup ended: `replicas` (owner first) of the position, with the nodes known to
    /// be gone left out; empty if it failed, which is retried after `gather`.
    pub fn on_lookup(&mut self, now: Time, tag: u64, replicas: &[Peer]) {
        let Some(key) = self.waiting.remove(&tag) else {
            return;
        };
        let reachable = replicas.iter().find(|p| {
            self.unreachable
                .get(&p.id)
                .is_none_or(|until| *until <= now)
        });
        match (reachable, self.reporting.get_mut(&key)) {
            (Some(owner), Some(slot)) => {
                *slot = Some(*owner);
                self.stale = true;
                // Tasks this coordinator sent while the service was reported elsewhere were
                // not taken for it: the next beat asks for them again.
                if let Some(link) = self.links.get_mut(&owner.id) {
                    link.tasks_seq = 0;
                }
            }
            _ => {
                let later = now + self.config.gather;
                self.lookup_after.insert(key, later);
                self.retry_lookups = self.retry_lookups.min(later);
            }
        }
    }

    /// Handles a coordination message; `departed` tells the members known to be gone.
    pub fn handle_message(
        &mut self,
        now: Time,
        from: Peer,
        message: CoordinationMessage,
        ring: &Ring,
        departed: &dyn Fn(NodeId) -> bool,
    ) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            CoordinationMessage::Report {
                seq,
                card,
                services,
            } => self.on_report(now, from, seq, card, services, ring),
            CoordinationMessage::Beat { seq, tasks_seq } => {
                if let Some(r) = self.reporters.get_mut(&from.id) {
                    r.heard = now;
                    r.suspected = false;
                }
                match self.reporters.get(&from.id) {
                    Some(r) if r.seq == seq => {
                        if r.tasks_seq != tasks_seq {
                            let tasks = r.tasks.clone();
                            self.send_tasks(from, tasks);
                        }
                    }
                    _ => self.send(from, CoordinationMessage::Resend),
                }
            }
            CoordinationMessage::Resend => {
                if let Some(link) = self.links.get_mut(&from.id) {
                    // Sent again with the next refresh.
                    link.sent_seq = 0;
                    self.stale = true;
                }
            }
            CoordinationMessage::Tasks { seq, tasks } => self.on_tasks(from, seq, tasks),
            CoordinationMessage::NotMine { keys } => {
                for key in keys {
                    if let Some(slot) = self.reporting.get_mut(&key)
                        && slot.is_some_and(|c| c.id == from.id)
                    {
                        *slot = None;
                    }
                }
                self.stale = true;
            }
            CoordinationMessage::Handover { key, reporters } => {
                self.on_handover(now, key, reporters, ring, departed)
            }
        }
    }

    fn on_report(
        &mut self,
        now: Time,
        from: Peer,
        seq: u64,
        card: Card,
        services: Vec<ServiceReport>,
        ring: &Ring,
    ) {
        let known = self.reporters.get(&from.id).map(|r| r.seq);
        if known.is_some_and(|s| s > seq) {
            return;
        }
        let mut mine = BTreeMap::new();
        let mut not_mine = Vec::new();
        for report in services {
            if ring.is_replica(service_position(&report.key), 1) {
                mine.insert(report.key.clone(), report);
            } else {
                not_mine.push(report.key);
            }
        }
        // A report taken only in part is kept under sequence number 0, so that the reporter's
        // next beat asks for it again and the answer repeats what is not taken here (should
        // this answer be lost).
        let seq = if not_mine.is_empty() { seq } else { 0 };
        if !not_mine.is_empty() {
            self.send(from, CoordinationMessage::NotMine { keys: not_mine });
        }
        let previous = self.reporters.remove(&from.id);
        let mut touched: BTreeSet<String> = mine.keys().cloned().collect();
        if let Some(previous) = &previous {
            touched.extend(previous.services.keys().cloned());
        }
        for key in &touched {
            self.take(now, key);
        }
        let (tasks_seq, mut tasks) =
            previous.map_or((0, BTreeMap::new()), |p| (p.tasks_seq, p.tasks));
        // A service no longer reported has no task here any more.
        tasks.retain(|k, _| mine.contains_key(k));
        let attributes = card.attributes.iter().cloned().collect();
        self.reporters.insert(
            from.id,
            Reporter {
                peer: from,
                seq,
                heard: now,
                suspected: false,
                card,
                attributes,
                services: mine,
                tasks_seq,
                tasks,
            },
        );
        self.trim(&touched);
    }

    /// Marks `key` as coordinated here (from `now`, if new) and to be planned.
    fn take(&mut self, now: Time, key: &str) {
        self.coordinated
            .entry(key.to_string())
            .or_insert_with(|| Coordinated {
                not_before: now + self.config.gather,
                dirty: true,
                plan: None,
                widened: None,
            })
            .dirty = true;
        self.planning = true;
    }

    /// Keeps at most `reporters_max` reporters per service: those with instances, then the
    /// best-ranked candidates.
    fn trim(&mut self, keys: &BTreeSet<String>) {
        for key in keys {
            let mut ranked: Vec<(bool, u64, NodeId)> = self
                .reporters
                .values()
                .filter_map(|r| r.services.get(key).map(|s| (r, s)))
                .map(|(r, s)| {
                    (
                        s.facts.is_empty(),
                        u64::MAX - score(key, r.peer.id),
                        r.peer.id,
                    )
                })
                .collect();
            if ranked.len() <= self.config.reporters_max {
                continue;
            }
            ranked.sort();
            for (_, _, id) in ranked.into_iter().skip(self.config.reporters_max) {
                if let Some(r) = self.reporters.get_mut(&id) {
                    r.services.remove(key);
                }
            }
        }
        self.reporters
            .retain(|_, r| !r.services.is_empty() || !r.tasks.is_empty());
    }

    fn on_tasks(&mut self, from: Peer, seq: u64, tasks: Vec<(String, Task)>) {
        let Some(link) = self.links.get_mut(&from.id) else {
            return;
        };
        if seq <= link.tasks_seq {
            return;
        }
        link.tasks_seq = seq;
        let given: BTreeMap<String, Task> = tasks.into_iter().collect();
        // Tasks count only for the services this node reports to that coordinator.
        let mut changed = false;
        for (key, coordinator) in &self.reporting {
            if coordinator.is_some_and(|c| c.id == from.id) {
                let next = given.get(key).copied();
                if self.tasks.get(key).copied() != next {
                    changed = true;
                    match next {
                        Some(task) => self.tasks.insert(key.clone(), task),
                        None => self.tasks.remove(key),
                    };
                }
            }
        }
        if changed {
            self.tasks_changed = true;
            self.stale = true;
        }
    }

    fn on_handover(
        &mut self,
        now: Time,
        key: String,
        handed: Vec<HandedReport>,
        ring: &Ring,
        departed: &dyn Fn(NodeId) -> bool,
    ) {
        if !ring.is_replica(service_position(&key), 1) {
            return;
        }
        for h in handed {
            // The old coordinator may not have heard of a departure this node has.
            if h.report.key != key || departed(h.peer.id) {
                continue;
            }
            let reporter = self.reporters.entry(h.peer.id).or_insert_with(|| Reporter {
                peer: h.peer,
                seq: 0,
                heard: now,
                suspected: false,
                card: h.card.clone(),
                attributes: h.card.attributes.iter().cloned().collect(),
                services: BTreeMap::new(),
                tasks_seq: 0,
                tasks: BTreeMap::new(),
            });
            if reporter.seq <= h.seq && !reporter.services.contains_key(&key) {
                reporter.services.insert(key.clone(), h.report);
            }
        }
        // Handed-over reports are complete: no need to wait.
        self.coordinated
            .entry(key.clone())
            .or_insert_with(|| Coordinated {
                not_before: now,
                dirty: true,
                plan: None,
                widened: None,
            })
            .dirty = true;
        self.planning = true;
    }

    fn send_tasks(&mut self, to: Peer, tasks: BTreeMap<String, Task>) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(r) = self.reporters.get_mut(&to.id) {
            r.tasks_seq = seq;
            r.tasks = tasks.clone();
        }
        self.counters.tasks_sent += 1;
        let message = CoordinationMessage::Tasks {
            seq,
            tasks: tasks.into_iter().collect(),
        };
        self.send(to, message);
    }

    /// When [`Coordination::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Time {
        if !self.config.enabled {
            return Time::MAX;
        }
        self.next_beat
            .min(self.next_watch)
            .min(self.plan_wake)
            .min(self.retry_lookups)
    }

    /// Beats to every coordinator when due; hands over services this node no longer
    /// coordinates.
    pub fn handle_timeout(&mut self, now: Time, ring: &Ring) {
        if !self.config.enabled {
            return;
        }
        if now >= self.retry_lookups {
            self.retry_lookups = Time::MAX;
            self.stale = true;
        }
        if now >= self.next_watch {
            self.next_watch = now + self.config.beat_interval / WATCHES_PER_BEAT;
            self.suspect_silent(now);
        }
        if now >= self.next_beat {
            self.next_beat = now + self.config.beat_interval;
            let beats: Vec<(Peer, u64, u64)> = self
                .links
                .values()
                .filter_map(|l| l.peer.map(|p| (p, l.sent_seq, l.tasks_seq)))
                .collect();
            for (peer, seq, tasks_seq) in beats {
                if peer.id != self.me.id {
                    self.counters.beats_sent += 1;
                    self.transmits
                        .push((peer, CoordinationMessage::Beat { seq, tasks_seq }));
                }
            }
            self.stale = true;
            self.hand_over(ring);
            self.drop_silent(now);
        }
    }

    /// Suspects reporters that missed a beat (by a quarter of an interval): their overlay
    /// neighbours normally report a death, but a node whose neighbours all died with it has
    /// no one else to notice. Liveness probes a suspect before anyone acts on it.
    fn suspect_silent(&mut self, now: Time) {
        // A beat and a quarter: one beat missed, with slack for delays.
        let silence = self.config.beat_interval.saturating_mul(5) / 4;
        let me = self.me.id;
        for reporter in self.reporters.values_mut() {
            if reporter.peer.id != me && !reporter.suspected && reporter.heard + silence < now {
                reporter.suspected = true;
                self.counters.suspected += 1;
                self.suspects.push(reporter.peer);
            }
        }
    }

    /// Silent reporters, for liveness to probe.
    pub fn drain_suspects(&mut self) -> std::vec::Drain<'_, Peer> {
        self.suspects.drain(..)
    }

    /// The address of a node this node reports to or hears from, if it knows one.
    pub fn peer(&self, id: NodeId) -> Option<Peer> {
        self.reporters
            .get(&id)
            .map(|r| r.peer)
            .or_else(|| self.links.get(&id).and_then(|l| l.peer))
    }

    /// Drops reporters silent for three beats (gone without the news reaching this node, or
    /// reporting elsewhere now); their services are planned again.
    fn drop_silent(&mut self, now: Time) {
        let silence = self.config.beat_interval * 3;
        let me = self.me.id;
        let silent: Vec<NodeId> = self
            .reporters
            .values()
            .filter(|r| r.peer.id != me && r.heard + silence < now)
            .map(|r| r.peer.id)
            .collect();
        for id in silent {
            self.departed(id);
        }
    }

    /// Hands each service this node no longer owns to its owner, and tells its reporters.
    fn hand_over(&mut self, ring: &Ring) {
        let gone: Vec<String> = self
            .coordinated
            .keys()
            .filter(|k| !ring.is_replica(service_position(k), 1))
            .cloned()
            .collect();
        for key in gone {
            self.coordinated.remove(&key);
            let owner = ring.replicas_of(service_position(&key), 1).first().copied();
            let mut handed = Vec::new();
            let mut told = Vec::new();
            for reporter in self.reporters.values_mut() {
                if let Some(report) = reporter.services.remove(&key) {
                    handed.push(HandedReport {
                        peer: reporter.peer,
                        seq: reporter.seq,
                        card: reporter.card.clone(),
                        report,
                    });
                    told.push(reporter.peer);
                    // What is kept of its report is no longer all of it: its next beat gets a
                    // `Resend`, and the answer to that says again that the service moved
                    // (should the word sent now be lost).
                    reporter.seq = 0;
                }
                reporter.tasks.remove(&key);
            }
            if let Some(owner) = owner
                && owner.id != self.me.id
                && !handed.is_empty()
            {
                self.counters.handovers += 1;
                handed.truncate(SERVICES_MAX);
                self.transmits.push((
                    owner,
                    CoordinationMessage::Handover {
                        key: key.clone(),
                        reporters: handed,
                    },
                ));
            }
            for peer in told {
                self.send(
                    peer,
                    CoordinationMessage::NotMine {
                        keys: vec![key.clone()],
                    },
                );
            }
        }
        self.reporters
            .retain(|_, r| !r.services.is_empty() || !r.tasks.is_empty());
    }

    /// After every input: refreshes what this node reports and plans the services that
    /// changed. `size` is the cloud's size as this node estimates it.
    pub fn flush(&mut self, now: Time, suite: &Suite, ring: &Ring, size: Option<usize>) {
        if !self.config.enabled {
            return;
        }
        // Reach needs the size's order of magnitude. The estimate jumps while the ring's
        // lists are repaired (a node that knows few nodes takes the cloud for small), so the
        // size used is the largest estimate of the last `SIZE_WINDOW`, and reach is judged
        // again only when that halves or doubles: nodes at the edge of a service's reach do
        // not come and go.
        // This runs after every input: a run of equal estimates is one sample (the newest
        // time), and the maximum is computed again only when the samples change.
        if let Some(estimate) = size {
            let mut changed = false;
            while self
                .sizes
                .front()
                .is_some_and(|(at, _)| *at + SIZE_WINDOW <= now)
            {
                self.sizes.pop_front();
                changed = true;
            }
            match self.sizes.back_mut() {
                Some(newest) if newest.1 == estimate => newest.0 = now,
                _ => {
                    if self.sizes.len() >= SIZE_SAMPLES_MAX {
                        self.sizes.pop_front();
                    }
                    self.sizes.push_back((now, estimate));
                    changed = true;
                }
            }
            if changed {
                self.sizes_max = self.sizes.iter().map(|(_, s)| *s).max();
            }
        }
        let size = self.sizes_max.or(self.size);
        let moved = match (size, self.size) {
            (Some(a), Some(b)) => a.max(b) >= 2 * a.min(b).max(1),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if moved {
            self.size = size;
            self.counters.reach_judged += 1;
            self.all_dirty = true;
            self.stale = true;
        }
        // Reports, plans and tasks between this node and itself settle within one flush.
        for _ in 0..4 {
            if self.stale {
                self.refresh(now, suite);
            }
            if ring.is_settled(now) {
                self.plan(now, suite);
            } else if self.planning {
                // Plans wait until the ring has settled; look again a little later.
                self.plan_wake = now + self.config.gather;
            }
            if self.local.is_empty() {
                break;
            }
            for message in core::mem::take(&mut self.local) {
                self.handle_message(now, self.me, message, ring, &|_| false);
            }
        }
    }

    /// Plans every service due, sending each node whose tasks changed its new ones.
    fn plan(&mut self, now: Time, suite: &Suite) {
        if !self.planning {
            return;
        }
        self.plan_wake = self
            .coordinated
            .values()
            .filter(|c| c.dirty && now < c.not_before)
            .map(|c| c.not_before)
            .min()
            .unwrap_or(Time::MAX);
        self.planning = self.plan_wake != Time::MAX;
        let due: Vec<String> = self
            .coordinated
            .iter()
            .filter(|(_, c)| c.dirty && now >= c.not_before)
            .map(|(k, _)| k.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let size = self.size.unwrap_or(1);
        let mut touched: BTreeSet<NodeId> = BTreeSet::new();
        for key in due {
            if let Some(c) = self.coordinated.get_mut(&key) {
                c.dirty = false;
            }
            let Some(plan) = self.plan_one(&key, suite, size) else {
                self.coordinated.remove(&key);
                continue;
            };
            self.counters.plans += 1;
            self.record(&key, &plan, suite, now);
            self.widen_if_short(&key, &plan, suite, now);
            for reporter in self.reporters.values_mut() {
                if !reporter.services.contains_key(&key) {
                    continue;
                }
                let next = plan.tasks.get(&reporter.peer.id).copied();
                let current = reporter.tasks.get(&key).copied();
                if next != current {
                    match next {
                        Some(task) => reporter.tasks.insert(key.clone(), task),
                        None => reporter.tasks.remove(&key),
                    };
                    touched.insert(reporter.peer.id);
                }
            }
            if let Some(c) = self.coordinated.get_mut(&key) {
                c.plan = Some(plan);
            }
        }
        for id in touched {
            if let Some(r) = self.reporters.get(&id) {
                let (peer, tasks) = (r.peer, r.tasks.clone());
                self.send_tasks(peer, tasks);
            }
        }
    }

    /// Plans one service; `None` when the suite no longer holds it and nothing runs.
    fn plan_one(&mut self, key: &str, suite: &Suite, size: usize) -> Option<ServicePlan> {
        let history: Vec<SuiteEntry> = suite.history(key).cloned().collect();
        let mut versions: BTreeMap<u64, Arc<ServiceSpec>> = BTreeMap::new();
        for entry in &history {
            if let Some(spec) = self.spec(entry) {
                versions.insert(entry.version, spec);
            }
        }
        let running = self
            .reporters
            .values()
            .any(|r| r.services.get(key).is_some_and(|s| !s.facts.is_empty()));
        let version = match suite.get(key) {
            Some(entry) => entry.version,
            None if !running => return None,
            None => 0,
        };
        // A quota counts what the namespace's other services want: read only when one
        // applies.
        let namespace_used = match versions.get(&version).and_then(|s| s.quota) {
            Some(_) => {
                let prefix = format!("{}/", crate::spec::namespace_of(key));
                let others: Vec<SuiteEntry> = suite
                    .entries()
                    .filter(|e| e.key.starts_with(&prefix) && annotated(&e.key).is_none())
                    .cloned()
                    .collect();
                let specs: Vec<Arc<ServiceSpec>> = others
                    .iter()
                    .filter_map(|e| match self.reader.read(e) {
                        Document::Service(spec) => Some(spec),
                        _ => None,
                    })
                    .collect();
                namespace_usage(specs.iter().map(Arc::as_ref), key, size)
            }
            None => Default::default(),
        };
        let reporters: Vec<(&Reporter, &ServiceReport)> = self
            .reporters
            .values()
            .filter_map(|r| r.services.get(key).map(|s| (r, s)))
            .collect();
        let status = suite
            .get(&status_key(key))
            .and_then(DeployStatus::from_entry)
            .unwrap_or_default();
        let facts: Vec<(NodeId, &InstanceFact)> = reporters
            .iter()
            .flat_map(|(r, s)| s.facts.iter().map(move |f| (r.peer.id, f)))
            .collect();
        let members: Vec<Member<'_>> = reporters
            .iter()
            .filter(|(_, s)| s.candidate || !s.facts.is_empty())
            .map(|(r, s)| {
                // What the node can take for this service: its free capacity, plus what
                // its own instance of the service already uses.
                let mut capacity = r.card.free;
                if let Some(own) = s
                    .facts
                    .iter()
                    .filter_map(|f| versions.get(&f.version))
                    .map(|spec| spec.placement.demand)
                    .next()
                {
                    capacity.cpu_millis = capacity.cpu_millis.saturating_add(own.cpu_millis);
                    capacity.memory_bytes = capacity.memory_bytes.saturating_add(own.memory_bytes);
                    capacity.disk_bytes = capacity.disk_bytes.saturating_add(own.disk_bytes);
                }
                Member {
                    id: r.peer.id,
                    attributes: &r.attributes,
                    capacity,
                    refused: &s.refused,
                }
            })
            .collect();
        Some(plan_service(&ServiceInput {
            key,
            version,
            versions: &versions,
            status: &status,
            facts: &facts,
            members: &members,
            drained: &self.drained,
            namespace_used,
            size,
        }))
    }

    /// A service placed short of what it wants, while some nodes are out of its reach,
    /// widens its reach: more nodes report, and the next plan has more candidates.
    fn widen_if_short(&mut self, key: &str, plan: &ServicePlan, suite: &Suite, now: Time) {
        if plan.summary.nodes.len() >= plan.summary.wanted || plan.summary.intent != "run" {
            return;
        }
        let steps = reach_steps(suite, key);
        let wanted = plan.summary.wanted as u64;
        // Other nodes may take the cloud for several times larger than this node does (size
        // estimates differ): widen until the reach is well beyond this node's estimate.
        if steps >= REACH_STEPS_MAX || self.reach_fraction(wanted, steps) >= 4.0 {
            return;
        }
        // Once per wait: the wider reach's reports take a moment to come.
        let wait = self.config.gather * 4;
        let Some(coordinated) = self.coordinated.get_mut(key) else {
            return;
        };
        if let Some(at) = coordinated.widened
            && at + wait > now
        {
            // Plan again once the reports of the last widening had time to come.
            coordinated.dirty = true;
            coordinated.not_before = at + wait;
            self.planning = true;
            self.plan_wake = self.plan_wake.min(at + wait);
            return;
        }
        coordinated.widened = Some(now);
        let previous = suite.get(&reach_key(key)).map(|e| e.version);
        self.writes.push(SuiteEntry {
            key: reach_key(key),
            version: previous.map_or(1, |v| v.saturating_add(1)),
            document: postcard::to_allocvec(&(steps + 1))
                .unwrap_or_default()
                .into(),
        });
    }

    /// Records in the suite the outcome a plan saw.
    fn record(&mut self, key: &str, plan: &ServicePlan, suite: &Suite, now: Time) {
        let Some((version, outcome)) = &plan.record else {
            return;
        };
        let status = suite
            .get(&status_key(key))
            .and_then(DeployStatus::from_entry)
            .unwrap_or_default();
        let at_unix_ms = now.as_micros() / 1_000;
        let outcome = match outcome {
            RecordedOutcome::Complete => Outcome::Complete { at_unix_ms },
            RecordedOutcome::Failed { node, reason } => Outcome::Failed {
                at_unix_ms,
                node: node.short(),
                reason: reason.clone(),
            },
        };
        if let Some(next) = status.with(*version, outcome) {
            let previous = suite.get(&status_key(key)).map(|e| e.version);
            self.writes.push(next.to_entry(key, previous));
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, CoordinationMessage)> {
        self.transmits.drain(..)
    }

    /// Suite entries to publish (recorded outcomes).
    pub fn drain_writes(&mut self) -> std::vec::Drain<'_, SuiteEntry> {
        self.writes.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::test_spec;
    use crate::ring::RingConfig;
    use crate::rng::Rng;
    use crate::spec::{PlainReader, SimpleDocument};
    use crate::suite::{AcceptAll, SuiteConfig};

    const KEY: &str = "web/site";

    const ROOMY: Demand = Demand {
        cpu_millis: 64_000,
        memory_bytes: 1 << 40,
        disk_bytes: 1 << 40,
    };

    fn peer(id: u128) -> Peer {
        Peer::new(NodeId(id))
    }

    /// The ring of `me`, settled at once, knowing `knows`.
    fn ring(me: u128, knows: &[u128]) -> Ring {
        let config = RingConfig {
            settle_after: Duration::ZERO,
            ..RingConfig::default()
        };
        let mut ring = Ring::new(peer(me), config, Rng::from_seed(1), Time::ZERO);
        for &k in knows {
            ring.hear(Time::ZERO, peer(k));
        }
        ring.drain_transmits().for_each(drop);
        ring
    }

    fn suite(replicas: u32) -> Suite {
        let spec = test_spec(KEY, replicas, 7);
        let mut suite = Suite::new(SuiteConfig::default(), Box::new(AcceptAll), Time::ZERO);
        suite.offer(SimpleDocument::Service(Box::new(spec)).to_entry(KEY, 1));
        suite
    }

    fn coordination(me: u128) -> Coordination {
        Coordination::new(
            peer(me),
            CoordinationConfig::default(),
            Box::new(PlainReader),
            Time::ZERO,
        )
    }

    fn report(seq: u64, candidate: bool) -> CoordinationMessage {
        CoordinationMessage::Report {
            seq,
            card: Card {
                attributes: vec![],
                free: ROOMY,
            },
            services: vec![ServiceReport {
                key: KEY.into(),
                candidate,
                facts: vec![],
                refused: vec![],
            }],
        }
    }

    /// Answers this node's lookups with `owner`.
    fn answer_lookups(c: &mut Coordination, now: Time, owner: Peer) {
        let tags: Vec<u64> = c.drain_lookups().map(|(tag, _)| tag).collect();
        for tag in tags {
            c.on_lookup(now, tag, &[owner]);
        }
    }

    /// The nodes that got a `Run` task, and the other messages sent.
    fn runs(c: &mut Coordination) -> (Vec<NodeId>, Vec<(Peer, CoordinationMessage)>) {
        let mut run = Vec::new();
        let mut other = Vec::new();
        for (to, message) in c.drain_transmits() {
            match &message {
                CoordinationMessage::Tasks { tasks, .. }
                    if tasks
                        .iter()
                        .any(|(k, t)| k == KEY && matches!(t, Task::Run { version: 1, .. })) =>
                {
                    run.push(to.id)
                }
                _ => other.push((to, message)),
            }
        }
        (run, other)
    }

    /// A coordinator alone on its ring, with nodes 2 and 3 reporting one service of one
    /// replica to it: it decides only after `gather`, and tasks the best-ranked of the three.
    fn gathered() -> (Coordination, Ring, Suite, NodeId) {
        let me = 1;
        let ring = ring(me, &[]);
        let suite = suite(1);
        let mut c = coordination(me);
        let t0 = Time::from_millis(10);
        c.flush(t0, &suite, &ring, Some(3));
        answer_lookups(&mut c, t0, peer(me));
        c.flush(t0, &suite, &ring, Some(3));
        for id in [2, 3] {
            c.handle_message(t0, peer(id), report(5, true), &ring, &|_| false);
        }
        c.flush(t0, &suite, &ring, Some(3));
        assert_eq!(runs(&mut c), (vec![], vec![]), "nothing before gathering");
        assert!(c.tasks().is_empty());
        let t1 = t0 + CoordinationConfig::default().gather;
        c.flush(
            t1.saturating_sub(Duration::from_millis(1)),
            &suite,
            &ring,
            Some(3),
        );
        assert_eq!(runs(&mut c), (vec![], vec![]), "nothing before gathering");
        c.flush(t1, &suite, &ring, Some(3));
        let best = [1, 2, 3]
            .into_iter()
            .map(NodeId)
            .max_by_key(|id| score(KEY, *id))
            .unwrap();
        (c, ring, suite, best)
    }

    #[test]
    fn a_coordinator_gathers_reports_then_tasks_the_best_ranked_node() {
        let (mut c, _, _, best) = gathered();
        let (run, other) = runs(&mut c);
        assert!(other.is_empty(), "{other:?}");
        if best == NodeId(1) {
            assert!(run.is_empty());
            assert!(matches!(
                c.tasks().get(KEY),
                Some(Task::Run { version: 1, .. })
            ));
        } else {
            assert_eq!(run, vec![best]);
            assert!(c.tasks().is_empty());
        }
        assert_eq!(c.counters().plans, 1);
        let planned = c.coordinated().collect::<Vec<_>>();
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].0, KEY);
    }

    #[test]
    fn beats_are_answered_only_with_what_the_reporter_lacks() {
        let (mut c, ring, suite, _) = gathered();
        c.drain_transmits().for_each(drop);
        let t = Time::from_secs(3);
        // Node 2's report (seq 5) is known: a beat naming it and tasks it never got is
        // answered with its tasks, whatever they are; one naming the tasks it has, not at all.
        c.handle_message(
            t,
            peer(2),
            CoordinationMessage::Beat {
                seq: 5,
                tasks_seq: 0,
            },
            &ring,
            &|_| false,
        );
        let sent: Vec<_> = c.drain_transmits().collect();
        let tasks_seq = match sent.as_slice() {
            [(to, CoordinationMessage::Tasks { seq, .. })] if to.id == NodeId(2) => *seq,
            other => panic!("expected tasks for node 2, got {other:?}"),
        };
        c.handle_message(
            t,
            peer(2),
            CoordinationMessage::Beat { seq: 5, tasks_seq },
            &ring,
            &|_| false,
        );
        assert_eq!(c.drain_transmits().count(), 0);
        // A beat naming a report the coordinator does not have asks for it again.
        c.handle_message(
            t,
            peer(3),
            CoordinationMessage::Beat {
                seq: 9,
                tasks_seq: 0,
            },
            &ring,
            &|_| false,
        );
        assert_eq!(
            c.drain_transmits().collect::<Vec<_>>(),
            vec![(peer(3), CoordinationMessage::Resend)]
        );
        c.flush(t, &suite, &ring, Some(3));
        assert_eq!(c.drain_transmits().count(), 0);
    }

    #[test]
    fn a_reporter_that_misses_a_beat_is_suspected_once() {
        // Reports came in at 10 ms; node 3 beats on time, node 2 falls silent.
        let (mut c, ring, _, _) = gathered();
        let beat = CoordinationConfig::default().beat_interval;
        let mut suspected = Vec::new();
        let mut t = Time::from_millis(10);
        let end = Time::from_millis(10) + beat * 3;
        while t < end {
            t = c.poll_timeout().min(end);
            if t >= Time::from_millis(10) + beat && t < Time::from_millis(10) + beat * 2 {
                c.handle_message(
                    t,
                    peer(3),
                    CoordinationMessage::Beat {
                        seq: 5,
                        tasks_seq: 0,
                    },
                    &ring,
                    &|_| false,
                );
            }
            c.handle_timeout(t, &ring);
            suspected.extend(c.drain_suspects().map(|p| (p.id, t)));
        }
        // Node 2 is suspected at the first watch after a beat and a quarter of silence (the
        // watch runs every quarter beat), and only once; node 3, heard within a beat, is not
        // before its own silence grows as long.
        let silent_since = Time::from_millis(10) + beat.saturating_mul(5) / 4;
        let suspects: Vec<NodeId> = suspected.iter().map(|(id, _)| *id).collect();
        assert_eq!(suspects.iter().filter(|id| **id == NodeId(2)).count(), 1);
        let (_, at) = suspected.iter().find(|(id, _)| *id == NodeId(2)).unwrap();
        assert!(
            *at > silent_since && *at <= silent_since + beat / 4,
            "suspected at {at:?}"
        );
        let node3 = suspected.iter().find(|(id, _)| *id == NodeId(3));
        assert!(
            node3.is_none_or(
                |(_, at)| *at > Time::from_millis(10) + beat + beat.saturating_mul(5) / 4
            ),
            "node 3 suspected at {node3:?}"
        );
        assert_eq!(c.counters().suspected as usize, suspected.len());
        assert_eq!(c.peer(NodeId(2)), Some(peer(2)));
    }

    #[test]
    fn a_departed_node_is_replaced_by_the_next_best_ranked() {
        let (mut c, ring, suite, best) = gathered();
        c.drain_transmits().for_each(drop);
        // The scores of this key put a reporter, not the coordinator itself, first.
        assert_ne!(best, NodeId(1));
        let t = Time::from_secs(3);
        c.departed(best);
        c.flush(t, &suite, &ring, Some(3));
        let next = [1, 2, 3]
            .into_iter()
            .map(NodeId)
            .filter(|id| *id != best)
            .max_by_key(|id| score(KEY, *id))
            .unwrap();
        let (run, other) = runs(&mut c);
        assert!(other.is_empty(), "{other:?}");
        if next == NodeId(1) {
            assert!(run.is_empty());
            assert!(matches!(
                c.tasks().get(KEY),
                Some(Task::Run { version: 1, .. })
            ));
        } else {
            assert_eq!(run, vec![next]);
        }
    }

    #[test]
    fn a_node_that_turns_to_a_coordinator_again_asks_for_its_tasks() {
        let position = service_position(KEY);
        let (first, second) = (position.wrapping_add(1), position.wrapping_add(2));
        let me = position.wrapping_add(1_000);
        let ring = ring(me, &[first, second]);
        // A second service stays with the first coordinator throughout, so this node keeps
        // its link to it.
        let mut suite = suite(1);
        let other = "web/other";
        suite.offer(SimpleDocument::Service(Box::new(test_spec(other, 1, 7))).to_entry(other, 1));
        let mut c = coordination(me);
        let t = Time::from_millis(10);
        let turn_to = |c: &mut Coordination, owner: u128| {
            c.flush(t, &suite, &ring, Some(3));
            answer_lookups(c, t, peer(owner));
            c.flush(t, &suite, &ring, Some(3));
            c.drain_transmits().for_each(drop);
        };
        let tasks = |seq, task| CoordinationMessage::Tasks {
            seq,
            tasks: vec![(KEY.to_string(), task)],
        };
        let not_mine = || CoordinationMessage::NotMine {
            keys: vec![KEY.into()],
        };
        let run = Task::Run {
            version: 1,
            surge: true,
        };
        turn_to(&mut c, first);
        c.handle_message(t, peer(first), tasks(10, run), &ring, &|_| false);
        assert_eq!(c.tasks().get(KEY), Some(&run));
        // The service moves to the second coordinator; the first's `Stop`, sent meanwhile,
        // is not taken for it.
        c.handle_message(t, peer(first), not_mine(), &ring, &|_| false);
        turn_to(&mut c, second);
        c.handle_message(t, peer(first), tasks(11, Task::Stop), &ring, &|_| false);
        assert_eq!(c.tasks().get(KEY), Some(&run));
        // Back to the first: its next beat asks for the tasks again (sequence 0), which
        // brings the `Stop`.
        c.handle_message(t, peer(second), not_mine(), &ring, &|_| false);
        turn_to(&mut c, first);
        let (now, beat) = loop {
            let now = c.poll_timeout();
            assert!(now < t + Duration::from_secs(60), "no beat");
            c.handle_timeout(now, &ring);
            c.flush(now, &suite, &ring, Some(3));
            if let Some((_, message)) = c.drain_transmits().find(|(to, m)| {
                to.id == NodeId(first) && matches!(m, CoordinationMessage::Beat { .. })
            }) {
                break (now, message);
            }
        };
        assert!(
            matches!(beat, CoordinationMessage::Beat { tasks_seq: 0, .. }),
            "{beat:?}"
        );
        c.handle_message(now, peer(first), tasks(12, Task::Stop), &ring, &|_| false);
        assert_eq!(c.tasks().get(KEY), Some(&Task::Stop));
    }

    #[test]
    fn a_report_to_a_node_that_does_not_own_the_service_is_sent_on() {
        // The owner of the service is the first node at or after its position.
        let position = service_position(KEY);
        let owner = position.wrapping_add(1);
        let me = position.wrapping_add(1_000);
        let ring = ring(me, &[owner]);
        assert!(!ring.is_replica(position, 1));
        let suite = suite(1);
        let mut c = coordination(me);
        c.flush(Time::ZERO, &suite, &ring, Some(2));
        c.drain_lookups().for_each(drop);
        c.handle_message(Time::ZERO, peer(3), report(1, true), &ring, &|_| false);
        c.flush(Time::from_secs(2), &suite, &ring, Some(2));
        assert_eq!(
            c.drain_transmits().collect::<Vec<_>>(),
            vec![(
                peer(3),
                CoordinationMessage::NotMine {
                    keys: vec![KEY.into()]
                }
            )]
        );
        assert_eq!(c.coordinated().count(), 0);
    }

    #[test]
    fn a_report_out_of_bounds_is_ignored() {
        let ring = ring(1, &[]);
        let mut c = coordination(1);
        let services = (0..=SERVICES_MAX)
            .map(|i| ServiceReport {
                key: format!("web/s{i}"),
                candidate: true,
                facts: vec![],
                refused: vec![],
            })
            .collect();
        let message = CoordinationMessage::Report {
            seq: 1,
            card: Card::default(),
            services,
        };
        assert!(!message.is_within_bounds());
        c.handle_message(Time::ZERO, peer(2), message, &ring, &|_| false);
        c.flush(Time::from_secs(2), &suite(1), &ring, Some(2));
        assert_eq!(c.coordinated().count(), 0);
    }
}
