//! The agent's actor: the one task that owns the protocol core.
//!
//! Every input (a network event, a timer, a command from the API) arrives as one [`Input`];
//! after each, the actor drains the core: transmits go to the transport, key-value outcomes to
//! the API requests waiting for them, changed records to disk. Nothing else touches the
//! [`Node`], so the core needs no lock and stays the single-threaded state machine the
//! simulator tests.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use nubo_net::{Admission, JoinToken, NetEvent, Transport};
use nubo_proto::kv::{KvError, KvValue, Record, Version};
use nubo_proto::roster::MemberState;
use nubo_proto::suite::SuiteEntry;
use nubo_proto::{Event, Node, NodeId, Peer};
use nubo_store::StateDb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use crate::clock::{Clock, unix_now};
use crate::host;
use crate::model::{Invite, LocalRecord, NodeInfo, Stats, Status, version_text};
use crate::planner::{ATTR_REFUSES, PlannedService, Planner};
use crate::runner::{Assignment, InstanceStatus, RunnerReport};

/// How often the peers to rejoin through are saved, and resources re-read.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Most contacts in a join token.
const INVITE_CONTACTS: usize = 8;
/// How often placement is recomputed.
const PLAN_INTERVAL: Duration = Duration::from_millis(500);
/// How long after start the roster is trusted for placement: until then a node would see
/// itself nearly alone and start everything.
const SETTLE: Duration = Duration::from_secs(5);
/// How often this node's instance list is published to the key-value store.
const PS_INTERVAL: Duration = Duration::from_secs(2);

/// The key under which a node publishes its instances.
pub fn ps_key(node: NodeId) -> Bytes {
    Bytes::from(format!("nubo/ps/{node}"))
}

/// Where an API caller waits for its answer.
pub type Reply<T> = oneshot::Sender<T>;

/// A command from the local API.
#[derive(Debug)]
pub enum Command {
    /// This agent's status.
    Status(Reply<Status>),
    /// The members of the cloud.
    Nodes(Reply<Vec<NodeInfo>>),
    /// The cloud's aggregate figures.
    Stats(Reply<Stats>),
    /// Write (or, with `None`, delete) a key.
    KvPut {
        /// The key.
        key: Bytes,
        /// The value.
        value: Option<Bytes>,
        /// The version written, or why not.
        reply: Reply<Result<Version, KvError>>,
    },
    /// Read a key.
    KvGet {
        /// The key.
        key: Bytes,
        /// The newest record, or why not.
        reply: Reply<Result<Option<Record>, KvError>>,
    },
    /// What this node itself holds of a key.
    KvLocal {
        /// The key.
        key: Bytes,
        /// The answer.
        reply: Reply<LocalRecord>,
    },
    /// A join token valid for a while.
    Invite {
        /// How long it stays valid.
        ttl: Duration,
        /// The token.
        reply: Reply<Invite>,
    },
    /// Publish a signed service document, after checking signature, grant, version and
    /// quota.
    Publish {
        /// The signed document (postcard).
        document: Bytes,
        /// Why it was refused, if it was.
        reply: Reply<Result<(), String>>,
    },
    /// The plan: every service and where it runs.
    Services(Reply<Vec<PlannedService>>),
    /// The suite entry of a key.
    SuiteEntry {
        /// `namespace/name`.
        key: String,
        /// The entry.
        reply: Reply<Option<SuiteEntry>>,
    },
    /// This node's instances.
    Instances(Reply<Vec<InstanceStatus>>),
}

/// Everything the actor reacts to.
#[derive(Debug)]
pub enum Input {
    /// From the transport.
    Net(NetEvent),
    /// From the local API.
    Command(Command),
    /// The core's timer came due.
    Timer,
}

enum Pending {
    Put(Reply<Result<Version, KvError>>),
    Get(Reply<Result<Option<Record>, KvError>>),
}

/// Facts about this agent fixed at start.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    /// Where the node listens.
    pub listen: SocketAddr,
    /// Where others reach it.
    pub advertise: SocketAddr,
    /// The cloud.
    pub admission: Admission,
    /// Records found damaged on disk at start.
    pub records_damaged_at_start: usize,
}

/// The actor's link to the runner.
pub struct RunnerLink {
    /// Where this node's assignments go (`None` until the roster has settled).
    pub desired: watch::Sender<Option<Vec<Assignment>>>,
    /// What the runner reports.
    pub report: watch::Receiver<RunnerReport>,
}

/// The actor. Build it with [`Agent::new`] and drive it with [`Agent::run`].
pub struct Agent {
    node: Node,
    transport: Transport,
    state: StateDb,
    clock: Clock,
    info: AgentInfo,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    persist_failures: u64,
    next_housekeeping: Instant,
    runner: RunnerLink,
    planner: Planner,
    plan: Vec<PlannedService>,
    next_plan: Instant,
    settled_at: Instant,
    announced_refusals: String,
    next_ps: Instant,
    published_ps: String,
}

impl Agent {
    /// An actor owning `node`, sending through `transport`, saving to `state`.
    pub fn new(
        node: Node,
        transport: Transport,
        state: StateDb,
        clock: Clock,
        info: AgentInfo,
        runner: RunnerLink,
    ) -> Agent {
        Agent {
            runner,
            planner: Planner::default(),
            plan: Vec::new(),
            next_plan: Instant::now(),
            settled_at: Instant::now() + SETTLE,
            announced_refusals: String::new(),
            next_ps: Instant::now() + PS_INTERVAL,
            published_ps: String::new(),
            node,
            transport,
            state,
            clock,
            info,
            pending: HashMap::new(),
            next_tag: 1,
            persist_failures: 0,
            next_housekeeping: Instant::now() + HOUSEKEEPING_INTERVAL,
        }
    }

    /// Runs until `shutdown` fires (or every input source is gone), then leaves the cloud
    /// gracefully: the last announcement says so and neighbours are told.
    pub async fn run(
        mut self,
        mut net: mpsc::Receiver<NetEvent>,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        self.drain();
        loop {
            let deadline = self
                .clock
                .instant_of(self.node.poll_timeout())
                .min(self.next_housekeeping)
                .min(self.next_plan)
                .min(self.next_ps);
            let input = tokio::select! {
                _ = &mut shutdown => break,
                event = net.recv() => match event {
                    Some(event) => Input::Net(event),
                    None => break,
                },
                command = commands.recv() => match command {
                    Some(command) => Input::Command(command),
                    None => break,
                },
                _ = sleep_until(deadline) => Input::Timer,
            };
            self.handle(input);
            self.drain();
        }
        let now = self.clock.now();
        self.node.leave(now);
        self.drain();
        self.save_peers();
    }

    /// Feeds one input to the core.
    pub fn handle(&mut self, input: Input) {
        let now = self.clock.now();
        match input {
            Input::Net(NetEvent::Message { from, message }) => {
                self.node.handle_message(now, from, message);
            }
            Input::Net(NetEvent::PeerDown(peer)) => self.node.handle_peer_down(now, peer),
            Input::Timer => {
                self.node.handle_timeout(now);
                if Instant::now() >= self.next_housekeeping {
                    self.next_housekeeping = Instant::now() + HOUSEKEEPING_INTERVAL;
                    self.node.set_resources(host::resources());
                    self.save_peers();
                }
                if Instant::now() >= self.next_plan {
                    self.next_plan = Instant::now() + PLAN_INTERVAL;
                    self.replan();
                }
                if Instant::now() >= self.next_ps {
                    self.next_ps = Instant::now() + PS_INTERVAL;
                    self.publish_instances();
                }
            }
            Input::Command(command) => self.command(command),
        }
    }

    fn command(&mut self, command: Command) {
        let now = self.clock.now();
        match command {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Nodes(reply) => {
                let _ = reply.send(self.nodes());
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::KvPut { key, value, reply } => {
                let tag = self.tag();
                match self.node.kv_put(now, key, value, tag) {
                    Ok(()) => {
                        self.pending.insert(tag, Pending::Put(reply));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Command::KvGet { key, reply } => {
                let tag = self.tag();
                match self.node.kv_get(now, key, tag) {
                    Ok(()) => {
                        self.pending.insert(tag, Pending::Get(reply));
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Command::KvLocal { key, reply } => {
                let record = self.node.kv().store().get(&key);
                let _ = reply.send(LocalRecord {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    held: record.is_some(),
                    version: record.as_ref().map(|r| version_text(&r.version)),
                    deleted: record.is_some_and(|r| r.value.is_none()),
                });
            }
            Command::Invite { ttl, reply } => {
                let _ = reply.send(self.invite(ttl));
            }
            Command::Publish { document, reply } => {
                let result = self.check_document(&document).and_then(|entry| {
                    if self.node.publish(now, entry) {
                        Ok(())
                    } else {
                        Err("the suite refused the document".to_string())
                    }
                });
                if result.is_ok() {
                    self.replan();
                }
                let _ = reply.send(result);
            }
            Command::Services(reply) => {
                let _ = reply.send(self.plan.clone());
            }
            Command::SuiteEntry { key, reply } => {
                let _ = reply.send(self.node.suite().get(&key).cloned());
            }
            Command::Instances(reply) => {
                let _ = reply.send(self.runner.report.borrow().instances.clone());
            }
        }
    }

    /// Checks a document before publishing it: signature and grant, a version newer than
    /// the one held, a description that reads, and the namespace's quota.
    fn check_document(&mut self, bytes: &[u8]) -> Result<SuiteEntry, String> {
        let signed: crate::authority::SignedDocument =
            postcard::from_bytes(bytes).map_err(|_| "not a signed service document".to_string())?;
        let entry = signed.to_entry();
        crate::authority::SignedDocument::from_entry(
            &entry,
            &self.info.admission.admin_key,
            unix_now().as_secs(),
        )
        .map_err(|e| e.to_string())?;
        if let Some(held) = self.node.suite().get(&entry.key)
            && held.version >= entry.version
        {
            return Err(format!(
                "version {} is not newer than the deployed version {}",
                entry.version, held.version
            ));
        }
        if signed.document.intent != crate::authority::Intent::Run {
            return Ok(entry);
        }
        let service =
            crate::description::parse(&signed.document.description).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        if service.key() != entry.key {
            return Err(format!(
                "the description names {}, not {}",
                service.key(),
                entry.key
            ));
        }
        if let Some(grant) = &signed.document.grant {
            let alive = self.node.roster().alive();
            let (cpu, memory, instances) =
                self.planner
                    .usage(&self.plan, &service.namespace, &entry.key);
            let n = match &service.placement.count {
                nubo_proto::service::Count::Replicas(n) => u64::from(*n),
                nubo_proto::service::Count::Availability { target } => {
                    u64::from(nubo_proto::service::replicas_for(
                        *target,
                        nubo_proto::service::NODE_AVAILABILITY_DEFAULT,
                    ))
                }
                nubo_proto::service::Count::Share { fraction, .. } => {
                    (fraction * alive as f64).ceil() as u64
                }
            };
            let demand = service.placement.demand;
            let quota = grant.grant.quota;
            let over = [
                (
                    "cpu (millicores)",
                    cpu + n * demand.cpu_millis,
                    quota.cpu_millis,
                ),
                (
                    "memory (bytes)",
                    memory + n * demand.memory_bytes,
                    quota.memory_bytes,
                ),
                ("instances", instances + n, quota.instances),
            ]
            .into_iter()
            .find(|(_, want, allowed)| want > allowed);
            if let Some((what, want, allowed)) = over {
                return Err(format!(
                    "over the quota of namespace {}: {what} would be {want}, the grant allows {allowed}",
                    service.namespace
                ));
            }
        }
        Ok(entry)
    }

    /// Recomputes placement; hands this node's part to the runner once the roster settled,
    /// and announces the services this node refuses.
    fn replan(&mut self) {
        let (plan, mine) = self.planner.plan(&self.node);
        self.plan = plan;
        if Instant::now() >= self.settled_at {
            self.runner.desired.send_if_modified(|desired| {
                let changed = desired.as_ref() != Some(&mine);
                if changed {
                    *desired = Some(mine);
                }
                changed
            });
        }
        let refused: Vec<String> = self
            .runner
            .report
            .borrow()
            .refused
            .iter()
            .cloned()
            .collect();
        let mut refusals = refused.join(",");
        // Attribute values are bounded; a node refusing that many services is full anyway.
        while refusals.len() > nubo_proto::roster::ATTRIBUTE_BYTES_MAX {
            refusals.truncate(refusals.rfind(',').unwrap_or(0));
        }
        if refusals != self.announced_refusals {
            self.announced_refusals = refusals.clone();
            let mut attributes: Vec<(String, String)> = self
                .node
                .roster()
                .me()
                .attributes
                .iter()
                .filter(|(k, _)| k != ATTR_REFUSES)
                .cloned()
                .collect();
            if !refusals.is_empty() {
                attributes.push((ATTR_REFUSES.to_string(), refusals));
            }
            let now = self.clock.now();
            self.node.set_attributes(now, attributes);
        }
    }

    /// Writes this node's instances (with the end of their logs) to the key-value store, when
    /// they changed, for `nubo ps` and `nubo logs` on any node.
    fn publish_instances(&mut self) {
        let instances = self.runner.report.borrow().instances.clone();
        let Ok(text) = serde_json::to_string(&instances) else {
            return;
        };
        if text == self.published_ps {
            return;
        }
        let now = self.clock.now();
        let tag = self.tag();
        if self
            .node
            .kv_put(
                now,
                ps_key(self.node.id()),
                Some(Bytes::from(text.clone())),
                tag,
            )
            .is_ok()
        {
            self.published_ps = text;
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        // Tags with the top bit set are reserved by the core.
        self.next_tag & !(1 << 63)
    }

    /// Drains the core after an input.
    fn drain(&mut self) {
        while let Some(transmit) = self.node.poll_transmit() {
            self.transport.send(transmit.to, &transmit.message);
        }
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::Kv(outcome) => match self.pending.remove(&outcome.tag) {
                    Some(Pending::Put(reply)) => {
                        let _ = reply.send(outcome.result.and_then(|value| match value {
                            KvValue::Written(version) => Ok(version),
                            KvValue::Read(_) => Err(KvError::Disabled),
                        }));
                    }
                    Some(Pending::Get(reply)) => {
                        let _ = reply.send(outcome.result.and_then(|value| match value {
                            KvValue::Read(record) => Ok(record),
                            KvValue::Written(_) => Err(KvError::Disabled),
                        }));
                    }
                    None => {}
                },
                Event::NeighborUp(peer) => tracing::debug!(peer = ?peer, "neighbour up"),
                Event::NeighborDown(peer) => tracing::debug!(peer = ?peer, "neighbour down"),
                Event::Delivered(_) | Event::Lookup(_) | Event::SuiteChanged(_) => {}
            }
        }
        let changes = self.node.kv_mut().drain_changes();
        if let Err(error) = self.state.save_records(&changes) {
            self.persist_failures += 1;
            tracing::error!(%error, records = changes.len(), "cannot save records; they stay in memory and on their other replicas");
        }
    }

    /// Remembers some live members to rejoin through after a restart.
    fn save_peers(&mut self) {
        let mut peers: Vec<(NodeId, SocketAddr)> = self
            .node
            .membership()
            .active()
            .iter()
            .chain(self.alive_members())
            .filter_map(|p| p.addr.map(|addr| (p.id, addr)))
            .collect();
        peers.dedup_by_key(|(id, _)| *id);
        if peers.is_empty() {
            return;
        }
        if let Err(error) = self.state.set_peers(&peers) {
            self.persist_failures += 1;
            tracing::warn!(%error, "cannot save known peers");
        }
    }

    fn alive_members(&self) -> impl Iterator<Item = Peer> + '_ {
        self.node
            .roster()
            .members()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.announce.peer)
    }

    fn status(&self) -> Status {
        let node = &self.node;
        let roster = node.roster();
        Status {
            node_id: node.id().to_string(),
            cloud_id: self.info.admission.cloud.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen: self.info.listen.to_string(),
            advertise: self.info.advertise.to_string(),
            uptime_secs: self.clock.uptime().as_secs(),
            members_alive: roster.alive(),
            members_known: 1 + roster.members().count(),
            neighbors: node
                .membership()
                .active()
                .iter()
                .map(|p| p.id.short())
                .collect(),
            passive: node.membership().passive().len(),
            ring_successor: node.ring().successors().next().map(|p| p.id.short()),
            ring_predecessor: node.ring().predecessors().next().map(|p| p.id.short()),
            ring_settled: node.ring().is_settled(self.clock.now()),
            kv_records: node.kv().store().len(),
            kv_bytes: node.kv().store().bytes(),
            kv_ops: node.kv().ops_in_progress(),
            persist_failures: self.persist_failures,
            records_damaged_at_start: self.info.records_damaged_at_start,
            net: self.transport.counters(),
        }
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        let now = self.clock.now();
        let roster = self.node.roster();
        let me = roster.me();
        let mut nodes = vec![NodeInfo {
            id: me.peer.id.to_string(),
            addr: Some(self.info.advertise.to_string()),
            state: MemberState::Alive.name().to_string(),
            incarnation: me.incarnation,
            attributes: me.attributes.iter().cloned().collect::<BTreeMap<_, _>>(),
            last_heard_secs: 0.0,
            this_node: true,
        }];
        nodes.extend(roster.members().map(|m| NodeInfo {
            id: m.announce.peer.id.to_string(),
            addr: m.announce.peer.addr.map(|a| a.to_string()),
            state: m.state.name().to_string(),
            incarnation: m.announce.incarnation,
            attributes: m.announce.attributes.iter().cloned().collect(),
            last_heard_secs: now.saturating_since(m.last_heard).as_secs_f64(),
            this_node: false,
        }));
        nodes
    }

    fn stats(&self) -> Stats {
        let cloud = self.node.cloud_stats();
        Stats {
            members_alive: self.node.roster().alive(),
            epoch: cloud.map(|c| c.epoch),
            size_estimate: cloud.map(|c| c.size),
            totals: cloud.map(|c| c.totals),
            averages: cloud.map(|c| c.averages),
            minimum: cloud.map(|c| c.minimum),
            maximum: cloud.map(|c| c.maximum),
            rank: self.node.slicing().rank(),
        }
    }

    fn invite(&self, ttl: Duration) -> Invite {
        let mut contacts = vec![(self.node.id(), self.info.advertise)];
        contacts.extend(
            self.alive_members()
                .filter_map(|p| p.addr.map(|addr| (p.id, addr)))
                .take(INVITE_CONTACTS - 1),
        );
        let expires_unix_secs = (unix_now() + ttl).as_secs();
        let token = JoinToken {
            admission: self.info.admission.clone(),
            contacts: contacts.clone(),
            expires_unix_secs,
        };
        Invite {
            token: token.encode(),
            expires_unix_secs,
            contacts: contacts
                .iter()
                .map(|(id, addr)| format!("{}@{addr}", id.short()))
                .collect(),
        }
    }
}
