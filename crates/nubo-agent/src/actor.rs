//! The agent's actor: the one task that owns the protocol core.
//!
//! Every input (a network event, a timer, a command from the API) arrives as one [`Input`];
//! after each, the actor drains the core: transmits go to the transport, key-value outcomes to
//! the API requests waiting for them, changed records to disk. Nothing else touches the
//! [`Node`], so the core needs no lock and stays the single-threaded state machine the
//! simulator tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use nubo_net::{Admission, Identity, JoinToken, NetEvent, Transport};
use nubo_proto::kv::{KvError, KvValue, Record, Version};
use nubo_proto::roster::MemberState;
use nubo_proto::suite::SuiteEntry;
use nubo_proto::{Event, Node, NodeId, Peer};
use nubo_store::StateDb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use crate::authority::{Document, Intent, SignedDocument, drain_key};
use crate::clock::{Clock, unix_now};
use crate::events::{EventFilter, EventLog, EventRecord};
use crate::history::HistoryEntry;
use crate::host;
use crate::logs::{AgentMessage, LogFrom, LogReply, LogRequest};
use crate::metrics::{Measured, Snapshot};
use crate::model::{Invite, LocalRecord, NodeInfo, Stats, Status, version_text};
use crate::planner::{ATTR_REFUSES, PlannedService, Planner};
use crate::runner::{Assignment, InstanceStatus, RunnerReport};
use nubo_proto::outcome::{DeployStatus, status_key};

/// How often the peers to rejoin through are saved, resources re-read, and removals past
/// their retention forgotten.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// Most contacts in a join token.
const INVITE_CONTACTS: usize = 8;
/// How often placement is looked at: it is recomputed when the suite, the roster or this
/// node's instances changed since, and at least every [`PLAN_INTERVAL_MAX`].
const PLAN_INTERVAL: Duration = Duration::from_millis(500);
/// Longest time between two plans when nothing seems to change (an update's timing).
const PLAN_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// How long after start the roster is trusted for placement: until then a node would see
/// itself nearly alone and start everything.
const SETTLE: Duration = Duration::from_secs(5);
/// How long a removed service is remembered (its removal stops replays of older versions);
/// a suite saved longer ago than this is provisional when restored.
pub const REMOVED_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a node with provisional suite entries waits for a peer to confirm them before
/// trusting them on its own (it is alone).
const PROVISIONAL_WAIT: Duration = Duration::from_secs(30);
/// How long a log request to another node may go unanswered.
const LOG_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most log requests this node waits on, and serves, at once.
const LOG_REQUESTS_MAX: usize = 64;
/// Longest time-to-live of an invitation.
pub const INVITE_TTL_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

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
    /// quota; answered once the document is saved.
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
    /// Every version of a service the suite holds.
    History {
        /// `namespace/name`.
        key: String,
        /// The versions, oldest first.
        reply: Reply<Vec<HistoryEntry>>,
    },
    /// Every instance of the cloud, as the members report them.
    Ps(Reply<Vec<InstanceStatus>>),
    /// The nodes that report instances of a service: their short id, and how to reach them
    /// (`None`: this node).
    LogTargets {
        /// `namespace/name`.
        key: String,
        /// The nodes.
        reply: Reply<Vec<(String, Option<Peer>)>>,
    },
    /// Part of a service's logs on one node.
    LogFetch {
        /// The node (`None`: this one).
        node: Option<Peer>,
        /// The service.
        service: String,
        /// Which part.
        from: LogFrom,
        /// The answer.
        reply: Reply<Result<LogReply, String>>,
    },
    /// Events this agent saw.
    Events {
        /// Which.
        filter: EventFilter,
        /// At most this many (the newest).
        limit: usize,
        /// The events, oldest first.
        reply: Reply<Vec<EventRecord>>,
    },
    /// The metrics, as Prometheus text.
    Metrics(Reply<String>),
    /// Drain this node (or undo it), signed with the node's own key.
    Drain {
        /// Drain, or undo.
        on: bool,
        /// Why it was refused, if it was.
        reply: Reply<Result<(), String>>,
    },
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

/// Why nothing was saved: the suite could not be written to disk.
const NOT_SAVED: &str = "the agent cannot write its state to disk (is it full?): it holds the change in memory only, though other nodes may have it; free space, then check with `nubo services`";

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
    /// What the operator should fix (shown by `nubo status`).
    pub warnings: Vec<String>,
    /// How instances' limits are enforced.
    pub limits: String,
    /// How instances are isolated.
    pub isolation: String,
}

/// The node's own key, to sign its drain.
pub struct NodeKey(pub Identity);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
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
    pending: HashMap<u64, (Instant, Pending)>,
    next_tag: u64,
    persist_failures: u64,
    next_housekeeping: Instant,
    runner: RunnerLink,
    planner: Planner,
    plan: Vec<PlannedService>,
    next_plan: Instant,
    /// When the last plan was made, and the roster's and suite's changes it saw.
    planned_at: Instant,
    planned_roster: u64,
    suite_touched: bool,
    settled_at: Instant,
    announced_refusals: String,
    key: NodeKey,
    /// Suite keys changed since the last save.
    suite_changed: BTreeSet<String>,
    /// Publications answered once what they changed is saved.
    pending_publish: Vec<Reply<Result<(), String>>>,
    started: Instant,
    /// Log requests sent to other nodes, by id, with their deadline.
    pending_logs: BTreeMap<u64, (Instant, Reply<Result<LogReply, String>>)>,
    /// Log requests of other nodes being read now.
    serving_logs: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    events: EventLog,
    measured: Measured,
    /// Documents refused at the API since start.
    publish_refused: u64,
    /// Nodes drained, as of the last plan.
    drained: BTreeSet<NodeId>,
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
        key: NodeKey,
    ) -> Agent {
        Agent {
            runner,
            planner: Planner::default(),
            plan: Vec::new(),
            next_plan: Instant::now(),
            planned_at: Instant::now(),
            planned_roster: u64::MAX,
            suite_touched: true,
            settled_at: Instant::now() + SETTLE,
            announced_refusals: String::new(),
            key,
            suite_changed: BTreeSet::new(),
            pending_publish: Vec::new(),
            started: Instant::now(),
            pending_logs: BTreeMap::new(),
            serving_logs: Default::default(),
            events: EventLog::new(node.id().short(), node.suite()),
            measured: Measured::default(),
            publish_refused: 0,
            drained: BTreeSet::new(),
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
                .min(
                    self.pending_logs
                        .values()
                        .map(|(deadline, _)| *deadline)
                        .min()
                        .unwrap_or(self.next_plan),
                );
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
            Input::Net(NetEvent::Message {
                from,
                message: nubo_proto::Message::Agent(bytes),
            }) => self.on_agent_message(from, &bytes),
            Input::Net(NetEvent::Message { from, message }) => {
                self.node.handle_message(now, from, message);
            }
            Input::Net(NetEvent::PeerDown(peer)) => self.node.handle_peer_down(now, peer),
            Input::Timer => {
                self.node.handle_timeout(now);
                self.expire_log_requests();
                if Instant::now() >= self.next_housekeeping {
                    self.next_housekeeping = Instant::now() + HOUSEKEEPING_INTERVAL;
                    self.node.set_resources(host::resources());
                    self.save_peers();
                    self.sweep_suite();
                }
                if Instant::now() >= self.next_plan {
                    self.next_plan = Instant::now() + PLAN_INTERVAL;
                    let changed = self.suite_touched
                        || self.planned_roster != self.node.roster().changes()
                        || self.runner.report.has_changed().unwrap_or(false)
                        || self.planned_at.elapsed() >= PLAN_INTERVAL_MAX
                        || Instant::now() < self.settled_at + PLAN_INTERVAL;
                    if changed {
                        self.replan();
                    }
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
                        self.pending
                            .insert(tag, (Instant::now(), Pending::Put(reply)));
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
                        self.pending
                            .insert(tag, (Instant::now(), Pending::Get(reply)));
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
                match result {
                    Ok(()) => {
                        self.replan();
                        self.pending_publish.push(reply);
                    }
                    Err(error) => {
                        self.publish_refused += 1;
                        let _ = reply.send(Err(error));
                    }
                }
            }
            Command::Services(reply) => {
                let _ = reply.send(self.plan.clone());
            }
            Command::SuiteEntry { key, reply } => {
                let _ = reply.send(self.node.suite().get(&key).cloned());
            }
            Command::History { key, reply } => {
                let _ = reply.send(self.history(&key));
            }
            Command::Ps(reply) => {
                let _ = reply.send(self.ps());
            }
            Command::LogTargets { key, reply } => {
                let mut targets = Vec::new();
                if self
                    .node
                    .roster()
                    .me()
                    .instances
                    .iter()
                    .any(|f| f.service == key)
                {
                    targets.push((self.node.id().short(), None));
                }
                targets.extend(
                    self.node
                        .roster()
                        .members()
                        .filter(|m| m.state == MemberState::Alive)
                        .filter(|m| m.announce.instances.iter().any(|f| f.service == key))
                        .map(|m| (m.announce.peer.id.short(), Some(m.announce.peer))),
                );
                let _ = reply.send(targets);
            }
            Command::LogFetch {
                node,
                service,
                from,
                reply,
            } => {
                let id = self.tag();
                let request = LogRequest { id, service, from };
                match node {
                    None => {
                        let files = self.runner.report.borrow().logs.clone();
                        tokio::task::spawn_blocking(move || {
                            let _ = reply.send(Ok(crate::logs::read(&files, &request)));
                        });
                    }
                    Some(_) if self.pending_logs.len() >= LOG_REQUESTS_MAX => {
                        let _ = reply.send(Err("too many log requests at once; try again".into()));
                    }
                    Some(peer) => {
                        let message = AgentMessage::LogRequest(request).encode();
                        self.transport
                            .send(peer, &nubo_proto::Message::Agent(message));
                        self.pending_logs
                            .insert(id, (Instant::now() + LOG_REQUEST_TIMEOUT, reply));
                    }
                }
            }
            Command::Events {
                filter,
                limit,
                reply,
            } => {
                let _ = reply.send(self.events.select(&filter, limit));
            }
            Command::Metrics(reply) => {
                let _ = reply.send(crate::metrics::render(&self.measured, self.snapshot()));
            }
            Command::Drain { on, reply } => {
                let entry = self.drain_document(on);
                if self.node.publish(now, entry) {
                    self.replan();
                    self.pending_publish.push(reply);
                } else {
                    let _ = reply.send(Err("the suite refused the drain".into()));
                }
            }
        }
    }

    /// Every figure the metrics read when scraped.
    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let node = &self.node;
        let roster = node.roster();
        let mut states: BTreeMap<&str, f64> = [("alive", 1.0), ("gone", 0.0), ("left", 0.0)]
            .into_iter()
            .collect();
        for member in roster.members() {
            *states.entry(member.state.name()).or_default() += 1.0;
        }
        s.gauges.push((
            "members",
            "Members of the cloud this node knows of, by state (itself included)",
            by_label("state", &states),
        ));
        s.gauge(
            "neighbors",
            "Overlay neighbours (active view)",
            node.membership().active().len() as f64,
        );
        s.gauge(
            "passive_view",
            "Nodes in the passive view",
            node.membership().passive().len() as f64,
        );
        let m = node.membership().counters();
        s.counter(
            "membership_peers_down",
            "Neighbours lost to transport failures",
            m.peers_down,
        );
        s.counter(
            "membership_peers_timed_out",
            "Neighbours lost to silence",
            m.peers_timed_out,
        );
        s.counter("membership_shuffles", "Shuffles started", m.shuffles);
        let b = node.broadcast_counters();
        s.counter(
            "broadcast_delivered",
            "Broadcasts delivered here",
            b.delivered,
        );
        s.counter(
            "broadcast_duplicates",
            "Broadcast payloads received again",
            b.duplicates,
        );
        s.counter(
            "broadcast_grafts",
            "Grafts sent for missing broadcasts",
            b.grafts,
        );
        s.counter(
            "broadcast_repaired",
            "Broadcasts recovered by anti-entropy",
            b.repaired,
        );
        s.counter(
            "broadcast_rejected",
            "Broadcast messages refused (bounds, origin)",
            b.rejected,
        );
        let r = roster.counters();
        s.counter(
            "roster_announced",
            "Announcements of this node sent",
            r.announced,
        );
        s.counter(
            "roster_reported_gone",
            "Members found dead by a neighbour",
            r.reported_gone,
        );
        s.counter(
            "roster_silent_gone",
            "Members declared gone after a silence",
            r.silent_gone,
        );
        let kv = node.kv();
        s.gauge(
            "kv_records",
            "Key-value records held here",
            kv.store().len() as f64,
        );
        s.gauge(
            "kv_bytes",
            "Bytes of key-value records held here",
            kv.store().bytes() as f64,
        );
        s.gauge(
            "kv_operations_in_flight",
            "Key-value operations coordinated here, in progress",
            kv.ops_in_progress() as f64,
        );
        let k = kv.counters();
        s.counter(
            "kv_stored",
            "Records stored here (writes, repairs, hand-offs)",
            k.stored,
        );
        s.counter(
            "kv_refused",
            "Records refused (bounds, space, bad content)",
            k.refused,
        );
        s.counter(
            "kv_timeouts",
            "Key-value attempts that timed out",
            k.timeouts,
        );
        let suite = node.suite();
        s.gauge(
            "suite_entries",
            "Suite entries held, every version counted",
            suite.len() as f64,
        );
        s.gauge(
            "suite_provisional",
            "Suite entries restored from a stale copy, awaiting a peer",
            suite.provisional() as f64,
        );
        let c = suite.counters();
        s.counter("suite_syncs", "Suite anti-entropy rounds started", c.syncs);
        s.counter(
            "suite_version_lists",
            "Suite version lists sent (differences found)",
            c.version_lists,
        );
        s.counter("suite_taken", "Suite entries taken", c.taken);
        s.counter(
            "suite_refused",
            "Suite entries refused by the signature check",
            c.refused,
        );
        s.counter(
            "deploys_refused",
            "Documents refused at this node's API",
            self.publish_refused,
        );
        let mut phases: BTreeMap<&str, f64> = BTreeMap::new();
        for planned in &self.plan {
            *phases.entry(planned.phase.as_str()).or_default() += 1.0;
        }
        s.gauges.push((
            "services",
            "Services of the suite, by rollout phase",
            by_label("phase", &phases),
        ));
        let report = self.runner.report.borrow();
        let mut by_state: BTreeMap<&str, f64> = BTreeMap::new();
        for fact in &report.facts {
            *by_state.entry(fact.state.name()).or_default() += 1.0;
        }
        s.gauges.push((
            "instances",
            "Service instances on this node, by state",
            by_label("state", &by_state),
        ));
        let rc = report.counters;
        s.counter(
            "instances_started",
            "Instances started on this node",
            rc.started,
        );
        s.counter(
            "instance_restarts",
            "Instance restarts on this node",
            rc.restarts,
        );
        s.counters.push((
            "health_probes",
            "Health probes of this node's instances, by result",
            vec![
                (vec![("result", "ok".to_string())], rc.probes_ok),
                (vec![("result", "failed".to_string())], rc.probes_failed),
            ],
        ));
        s.counter(
            "refusals",
            "Services this node refused (over its limits, failing)",
            rc.refusals,
        );
        s.gauge(
            "services_refused",
            "Services this node refuses now",
            report.refused.len() as f64,
        );
        let net = self.transport.counters();
        s.gauge(
            "connections",
            "Open connections to peers",
            net.connections as f64,
        );
        s.counter("net_frames_in", "Frames received", net.frames_in);
        s.counter("net_frames_out", "Frames sent", net.frames_out);
        s.counter(
            "net_frames_dropped",
            "Frames dropped (queues full)",
            net.frames_dropped,
        );
        s.counter(
            "net_frames_malformed",
            "Frames refused as malformed or oversized",
            net.frames_malformed + net.frames_oversized,
        );
        s.counter(
            "net_handshakes_refused",
            "Handshakes refused (no admission proof)",
            net.handshakes_refused,
        );
        s.counter(
            "persist_failures",
            "Saves to disk that failed",
            self.persist_failures,
        );
        s
    }

    /// A message from another agent: a log request to serve, or the answer to one of ours.
    fn on_agent_message(&mut self, from: Peer, bytes: &[u8]) {
        match AgentMessage::decode(bytes) {
            Some(AgentMessage::LogRequest(request)) => {
                let serving = self.serving_logs.clone();
                if serving.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= LOG_REQUESTS_MAX {
                    serving.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::debug!(peer = %from.id, "too many log requests; one dropped");
                    return;
                }
                let files = self.runner.report.borrow().logs.clone();
                let transport = self.transport.clone();
                tokio::task::spawn_blocking(move || {
                    let reply = AgentMessage::LogReply(crate::logs::read(&files, &request));
                    transport.send(from, &nubo_proto::Message::Agent(reply.encode()));
                    serving.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            Some(AgentMessage::LogReply(reply)) => {
                if let Some((_, waiting)) = self.pending_logs.remove(&reply.id) {
                    let _ = waiting.send(Ok(reply));
                }
            }
            None => tracing::debug!(peer = %from.id, "an agent message that does not decode"),
        }
    }

    /// Answers log requests that went unanswered too long.
    fn expire_log_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .pending_logs
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((_, reply)) = self.pending_logs.remove(&id) {
                let _ = reply.send(Err("the node did not answer in time".into()));
            }
        }
    }

    /// This node's drain (or its undoing), signed with its own key.
    fn drain_document(&self, on: bool) -> SuiteEntry {
        let key = drain_key(self.node.id());
        let previous = self.node.suite().get(&key).map_or(0, |e| e.version);
        let version = (unix_now().as_millis() as u64).max(previous.saturating_add(1));
        let identity = &self.key.0;
        SignedDocument::sign(
            identity,
            Document {
                key,
                version,
                intent: if on { Intent::Run } else { Intent::Remove },
                description: String::new(),
                signer: identity.public_key(),
                grant: None,
            },
        )
        .to_entry()
    }

    /// Every version of `key` the suite holds, with what became of each.
    fn history(&self, key: &str) -> Vec<HistoryEntry> {
        let suite = self.node.suite();
        let documents: Vec<SignedDocument> = suite
            .history(key)
            .filter_map(|e| postcard::from_bytes(&e.document).ok())
            .collect();
        let status = suite
            .get(&status_key(key))
            .and_then(DeployStatus::from_entry)
            .unwrap_or_default();
        let running = self
            .plan
            .iter()
            .find(|p| p.key == key && p.intent == "run")
            .map(|p| p.running_version);
        crate::history::history(&documents, &status, running, &self.info.admission.admin_key)
    }

    /// Every instance of the cloud: this node's from the runner, the others' as they report
    /// them in the roster.
    fn ps(&self) -> Vec<InstanceStatus> {
        let mut list = self.runner.report.borrow().instances.clone();
        for member in self
            .node
            .roster()
            .members()
            .filter(|m| m.state == MemberState::Alive)
        {
            let host = member
                .announce
                .peer
                .addr
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            list.extend(member.announce.instances.iter().map(|fact| {
                InstanceStatus::of_fact(fact, member.announce.peer.id.short(), host.clone())
            }));
        }
        list.sort_by(|a, b| {
            (&a.service, &a.node, a.version).cmp(&(&b.service, &b.node, b.version))
        });
        list
    }

    /// Forgets removals older than [`REMOVED_RETENTION`], trusts provisional entries when no
    /// peer came to confirm them, and notes that the suite on disk is current.
    fn sweep_suite(&mut self) {
        let now_ms = unix_now().as_millis() as u64;
        let horizon = now_ms.saturating_sub(REMOVED_RETENTION.as_millis() as u64);
        let expired: Vec<String> = self
            .node
            .suite()
            .entries()
            .filter(|e| e.version < horizon)
            .filter(|e| {
                postcard::from_bytes::<SignedDocument>(&e.document)
                    .is_ok_and(|s| s.document.intent == Intent::Remove)
            })
            .map(|e| e.key.clone())
            .collect();
        for key in expired {
            tracing::info!(service = %key, "forgetting a removal past its retention");
            self.node.suite_mut().forget(&key);
        }
        if self.node.suite().provisional() > 0
            && self.started.elapsed() >= PROVISIONAL_WAIT
            && self.node.membership().active().is_empty()
        {
            tracing::warn!("no peer confirmed the suite restored from disk; trusting it");
            self.node.suite_mut().confirm_all();
        }
        for key in self.node.suite_mut().drain_changed().collect::<Vec<_>>() {
            self.suite_changed.insert(key);
        }
        if let Err(error) = self.save_suite(true) {
            tracing::warn!(%error, "cannot save the suite");
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
        if signed.document.intent != crate::authority::Intent::Run
            || entry.key.starts_with(crate::authority::DRAIN_PREFIX)
        {
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
            let size = self.node.roster().alive();
            let spec = crate::planner::spec_of(
                &entry.key,
                &signed,
                &Ok(std::sync::Arc::new(service.clone())),
            );
            let used = self
                .planner
                .usage(self.node.suite(), &entry.key, size)
                .plus(spec.usage(spec.wanted(size)));
            if let Some((what, want, allowed)) = used.over(&grant.grant.quota) {
                return Err(format!(
                    "over the quota of namespace {}: {what} would be {want}, the grant allows {allowed}",
                    service.namespace
                ));
            }
        }
        Ok(entry)
    }

    /// Recomputes every rollout; hands this node's part to the runner once the roster
    /// settled, announces this node's instances and refusals, and records the outcomes this
    /// node saw.
    fn replan(&mut self) {
        let now = self.clock.now();
        self.planned_at = Instant::now();
        self.suite_touched = false;
        let report = self.runner.report.borrow_and_update().clone();
        self.node.set_instances(now, report.facts.clone());
        let plan = self.planner.plan(&self.node);
        self.plan = plan.services;
        self.drained = plan.drained;
        self.events.observe(&self.node, &self.plan);
        if Instant::now() >= self.settled_at {
            let mine: Vec<Assignment> = plan.mine;
            self.runner.desired.send_if_modified(|desired| {
                let changed = desired.as_ref() != Some(&mine);
                if changed {
                    *desired = Some(mine);
                }
                changed
            });
            for entry in plan.writes {
                tracing::info!(key = %entry.key, version = entry.version, "recording an update's outcome");
                self.node.publish(now, entry);
            }
        }
        let mut refusals = report
            .refused
            .iter()
            .map(|(key, version)| format!("{key}@{version}"))
            .collect::<Vec<String>>()
            .join(",");
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
            self.node.set_attributes(now, attributes);
        }
        self.planned_roster = self.node.roster().changes();
    }

    /// Saves the suite keys changed since the last save (with `touch`, also when none did,
    /// to note that the copy on disk is current).
    fn save_suite(&mut self, touch: bool) -> Result<(), nubo_store::StoreError> {
        if self.suite_changed.is_empty() && !touch {
            return Ok(());
        }
        let keys: Vec<(String, Vec<(SuiteEntry, bool)>)> = self
            .suite_changed
            .iter()
            .map(|key| (key.clone(), self.node.suite().stored(key)))
            .collect();
        self.state
            .save_suite(&keys, unix_now().as_millis() as u64)?;
        self.suite_changed.clear();
        Ok(())
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        // Tags with the top bit set are reserved by the core.
        self.next_tag & !(1 << 63)
    }

    /// Drains the core after an input: what changed is saved first, then messages leave,
    /// then waiting callers are answered (a deploy is acknowledged only once it is on disk).
    fn drain(&mut self) {
        // Records first: the core holds back every acknowledgement of them until it hears
        // whether they are on disk, and a failed save refuses the writes it would have
        // acknowledged.
        let changes = self.node.kv_mut().drain_changes();
        let records_saved = self.state.save_records(&changes);
        if let Err(error) = &records_saved {
            self.persist_failures += 1;
            tracing::error!(%error, records = changes.len(), "cannot save records; writes they belong to are refused");
        }
        self.node
            .handle_saved(self.clock.now(), records_saved.is_ok());
        let mut outcomes = Vec::new();
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::Kv(outcome) => outcomes.push(outcome),
                Event::SuiteChanged(key) => {
                    self.suite_touched = true;
                    self.events.suite_changed(&key, self.node.suite());
                    self.suite_changed.insert(key);
                }
                Event::NeighborUp(peer) => tracing::debug!(peer = ?peer, "neighbour up"),
                Event::NeighborDown(peer) => tracing::debug!(peer = ?peer, "neighbour down"),
                Event::MemberGone { id, left } => {
                    tracing::info!(node = %id.short(), left, "a member is gone")
                }
                Event::MemberBack(id) => tracing::info!(node = %id.short(), "a member is back"),
                Event::Delivered(_) | Event::Lookup(_) | Event::TasksChanged => {}
            }
        }
        let saved = self.save_suite(false);
        if let Err(error) = &saved {
            self.persist_failures += 1;
            tracing::error!(%error, "cannot save the suite; it stays in memory and on the other nodes");
        }
        while let Some(transmit) = self.node.poll_transmit() {
            self.transport.send(transmit.to, &transmit.message);
        }
        for reply in self.pending_publish.drain(..) {
            let _ = reply.send(
                saved
                    .as_ref()
                    .map(|_| ())
                    .map_err(|_| NOT_SAVED.to_string()),
            );
        }
        for outcome in outcomes {
            let Some((started, pending)) = self.pending.remove(&outcome.tag) else {
                continue;
            };
            let op = if matches!(pending, Pending::Put(_)) {
                "put"
            } else {
                "get"
            };
            self.measured
                .kv_operation(op, outcome.result.is_ok(), started.elapsed().as_secs_f64());
            match pending {
                Pending::Put(reply) => {
                    let _ = reply.send(outcome.result.and_then(|value| match value {
                        KvValue::Written(version) => Ok(version),
                        KvValue::Read(_) => Err(KvError::Disabled),
                    }));
                }
                Pending::Get(reply) => {
                    let _ = reply.send(outcome.result.and_then(|value| match value {
                        KvValue::Read(record) => Ok(record),
                        KvValue::Written(_) => Err(KvError::Disabled),
                    }));
                }
            }
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
            net_by_kind: self
                .transport
                .queued_by_kind()
                .into_iter()
                .map(|(kind, traffic)| (kind.to_string(), traffic))
                .collect(),
            membership: node.membership().counters(),
            warnings: self.info.warnings.clone(),
            limits: self.info.limits.clone(),
            isolation: self.info.isolation.clone(),
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
            draining: self.drained.contains(&me.peer.id),
        }];
        nodes.extend(roster.members().map(|m| NodeInfo {
            id: m.announce.peer.id.to_string(),
            addr: m.announce.peer.addr.map(|a| a.to_string()),
            state: m.state.name().to_string(),
            incarnation: m.announce.incarnation,
            attributes: m.announce.attributes.iter().cloned().collect(),
            last_heard_secs: now.saturating_since(m.last_heard).as_secs_f64(),
            this_node: false,
            draining: self.drained.contains(&m.announce.peer.id),
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

/// Samples of a gauge counted by one label.
fn by_label(
    label: &'static str,
    counts: &BTreeMap<&str, f64>,
) -> Vec<(crate::metrics::Labels, f64)> {
    counts
        .iter()
        .map(|(value, n)| (vec![(label, value.to_string())], *n))
        .collect()
}
