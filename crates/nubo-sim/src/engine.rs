//! The discrete-event engine: one event queue, seeded generators, and windows of simulated
//! time whose nodes run in parallel shards.
//!
//! Nodes are the real [`nubo_proto::Node`] state machines. The engine delivers their transmits
//! after a sampled latency, drops them on loss or partition, reports `peer down` to a sender
//! whose message reached a crashed node, and wakes each node at its `poll_timeout`.
//!
//! Parallel yet deterministic: no message arrives sooner than `latency_min` after it is sent,
//! so within a window that short the nodes cannot affect one another (a conservative
//! "lookahead" window). The machines are dealt to a fixed number of shards, each with its own
//! nodes, queue and generator; a shard runs its window's events in queue order, queues what
//! its nodes send each other at once and what they send the other shards' nodes when those
//! next run, in shard order. Thread scheduling never shows in the result.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use nubo_proto::aggregation::Resources;
use nubo_proto::broadcast::{BroadcastMessage, Gossip};
use nubo_proto::rng::splitmix64;
use nubo_proto::wire::{self, Message};
use nubo_proto::{Config, Event, Node, NodeId, Peer, Rng, Time};

use crate::queue::{CalendarQueue, Entry};
use crate::runner::{RunnerTiming, SimRunner};

/// Index of a node in the simulation (stable across crashes and restarts).
pub type NodeIndex = u32;

/// What one message costs on a real network besides its encoding, counted with traffic: a
/// QUIC packet of one frame (IPv4 20, UDP 8, short header about 22, AEAD tag 16 bytes). The
/// packets QUIC sends of its own (acknowledgements, keep-alives) are not counted.
pub const FRAMING_BYTES: u64 = 66;

/// The port every simulated machine listens on.
const SIM_PORT: u16 = 7946;

/// The address of machine `i` on the simulated network: `10.x.y.z`, the machine's index in
/// the last 24 bits. Nodes learn and pass on one another's addresses as on a real network,
/// and the engine finds where a message goes from its address alone: looking the id up in a
/// table of every machine missed the cache on nearly every message of a large simulation.
fn machine_addr(i: NodeIndex) -> SocketAddr {
    let [_, x, y, z] = i.to_be_bytes();
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, x, y, z), SIM_PORT))
}

/// The machine that [`machine_addr`] gave `addr`, if it is such an address.
fn machine_at(addr: SocketAddr) -> Option<NodeIndex> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let [a, x, y, z] = v4.ip().octets();
    (a == 10 && v4.port() == SIM_PORT).then(|| NodeIndex::from_be_bytes([0, x, y, z]))
}

/// How the simulated network behaves.
///
/// Each pair of machines has its own stable one-way latency, drawn uniformly between
/// `latency_min` and `latency_max` from the pair's identities (as on a real network, where a
/// path's latency depends on where the two machines are); each message adds a jitter of up to
/// `jitter` on top, so messages on one link may be reordered.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// Smallest base latency of a link.
    pub latency_min: Duration,
    /// Largest base latency of a link.
    pub latency_max: Duration,
    /// Largest extra delay of one message.
    pub jitter: Duration,
    /// Probability that a message is silently lost.
    pub loss: f64,
    /// Encode and decode every message through the wire format and check the round trip.
    pub check_wire: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            latency_min: Duration::from_millis(10),
            latency_max: Duration::from_millis(40),
            jitter: Duration::from_millis(5),
            loss: 0.0,
            check_wire: false,
        }
    }
}

/// What an experiment wants to see of a run. Every method has an empty default.
pub trait Observer {
    /// `node` produced `event` at `now`.
    fn on_event(&mut self, _now: Time, _node: NodeIndex, _event: &Event) {}
    /// A copy of a broadcast's payload from `from` reached the live node `to` (pushed,
    /// grafted or repaired; duplicates included).
    fn on_gossip(&mut self, _now: Time, _from: NodeIndex, _to: NodeIndex, _gossip: &Gossip) {}
}

/// Two observers, each seeing everything.
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn on_event(&mut self, now: Time, node: NodeIndex, event: &Event) {
        self.0.on_event(now, node, event);
        self.1.on_event(now, node, event);
    }
    fn on_gossip(&mut self, now: Time, from: NodeIndex, to: NodeIndex, gossip: &Gossip) {
        self.0.on_gossip(now, from, to, gossip);
        self.1.on_gossip(now, from, to, gossip);
    }
}

/// An observer that looks at nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// Counters of the engine itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    /// Events taken off the heap.
    pub events: u64,
    /// Messages handed to the network.
    pub sent: u64,
    /// Messages delivered to a live node.
    pub delivered: u64,
    /// Messages lost to random loss.
    pub lost: u64,
    /// Messages dropped by a partition.
    pub cut: u64,
    /// Messages that reached a crashed node.
    pub to_dead: u64,
}

impl EngineStats {
    fn add(&mut self, other: &EngineStats) {
        self.events += other.events;
        self.sent += other.sent;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.cut += other.cut;
        self.to_dead += other.to_dead;
    }
}

/// Messages handed to the network, by kind ([`Message::kind`]), in name order.
pub type KindCounts = std::collections::BTreeMap<&'static str, u64>;

enum Action {
    Deliver {
        from: NodeIndex,
        to: NodeIndex,
        message: Message,
    },
    PeerDown {
        at: NodeIndex,
        incarnation: u32,
        peer: NodeId,
    },
    Wake {
        node: NodeIndex,
    },
}

impl Action {
    /// The machine that handles this action.
    fn target(&self) -> NodeIndex {
        match self {
            Action::Deliver { to, .. } => *to,
            Action::PeerDown { at, .. } => *at,
            Action::Wake { node } => *node,
        }
    }
}

/// What one simulated machine is, whether or not it runs; read by every shard.
struct Machine {
    peer: Peer,
    resources: Resources,
    rank_value: f64,
    attributes: Vec<(String, String)>,
    incarnation: u32,
    group: u16,
    alive: bool,
}

/// The running node of one machine, its simulated runner (when nodes run services), its
/// pending wake-up and what it sent; touched only by its shard.
#[derive(Default)]
struct NodeSlot {
    node: Option<Node>,
    runner: Option<SimRunner>,
    wake: Option<Time>,
    /// Messages and bytes sent while counting ([`Sim::count_traffic`]).
    sent_msgs: u64,
    sent_bytes: u64,
}

/// Logical shards; machine `i` belongs to shard `i % SHARDS`. Fixed, so that a run gives the
/// same result on any machine; the shards of a window run on as many threads as there are
/// shards and cores.
const SHARDS: usize = 2;

/// Smaller simulations run every window on one thread (spawning would cost more).
const PARALLEL_NODES_MIN: usize = 1_000;

/// A simulation of many nodes on one network.
///
/// Time advances in windows no longer than the smallest latency of the network: nothing a node
/// does in a window can reach another node in the same window, so the nodes of a window are
/// independent. The machines are dealt to [`SHARDS`] shards, each with its own nodes, event
/// queue and generator; the shards of a window run in parallel. What a shard sends to another
/// shard's nodes waits in an outbox until the window ends, and what the observer is to see is
/// shown once the window ends, in time order.
pub struct Sim {
    now: Time,
    rng: Rng,
    world: World,
    config: Config,
    shards: Vec<Shard>,
    threads: usize,
    /// Smaller simulations run every window on one thread.
    parallel_nodes_min: usize,
    runner_timing: RunnerTiming,
}

/// More wake-ups of one node at one instant than any protocol needs: a busy loop.
const WAKES_AT_ONCE_MAX: u32 = 10_000;

impl Sim {
    /// An empty simulation whose every random choice derives from `seed`.
    pub fn new(seed: u64, config: Config, network: NetworkConfig) -> Sim {
        let mut rng = Rng::from_seed(seed);
        let shards = (0..SHARDS).map(|k| Shard::new(k, rng.fork())).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(SHARDS);
        Sim {
            now: Time::ZERO,
            rng,
            world: World {
                machines: Vec::new(),
                ids: Vec::new(),
                index: HashMap::new(),
                network,
                blocked: BTreeSet::new(),
                count_traffic: false,
                time_plans: false,
            },
            config,
            shards,
            threads,
            parallel_nodes_min: PARALLEL_NODES_MIN,
            runner_timing: RunnerTiming::default(),
        }
    }

    /// How long simulated instances take to start and stop (for machines booted from now).
    pub fn set_runner_timing(&mut self, timing: RunnerTiming) {
        self.runner_timing = timing;
    }

    /// Starts (or stops) counting the messages and bytes each node sends: every message is
    /// encoded to be measured, which costs time.
    pub fn count_traffic(&mut self, on: bool) {
        self.world.count_traffic = on;
    }

    /// Messages and bytes machine `i` sent while counting, since it last booted.
    pub fn traffic(&self, i: NodeIndex) -> (u64, u64) {
        let slot = &self.shards[i as usize % SHARDS].nodes[i as usize / SHARDS];
        (slot.sent_msgs, slot.sent_bytes)
    }

    /// Bytes sent by kind while counting traffic, since the last reset.
    pub fn bytes_by_kind(&self) -> KindCounts {
        let mut total = KindCounts::new();
        for shard in &self.shards {
            for (kind, bytes) in &shard.kind_bytes {
                *total.entry(kind).or_insert(0) += bytes;
            }
        }
        total
    }

    /// Sets every node's traffic counters back to zero.
    pub fn reset_traffic(&mut self) {
        for shard in &mut self.shards {
            shard.kind_bytes.clear();
            for slot in &mut shard.nodes {
                slot.sent_msgs = 0;
                slot.sent_bytes = 0;
            }
        }
    }

    /// Starts measuring the wall time of every step in which a node planned a service.
    pub fn time_plans(&mut self, on: bool) {
        self.world.time_plans = on;
    }

    /// Wall times (microseconds) of the steps in which a node planned, with the number of
    /// plans each made, since the last call.
    pub fn take_plan_times(&mut self) -> Vec<(u64, u64)> {
        let mut all = Vec::new();
        for shard in &mut self.shards {
            all.append(&mut shard.plan_times);
        }
        all
    }

    /// The attributes of machine `i`.
    pub fn attributes(&self, i: NodeIndex) -> &[(String, String)] {
        &self.world.machines[i as usize].attributes
    }

    /// The simulated runner of machine `i`, if it runs.
    pub fn runner(&self, i: NodeIndex) -> Option<&SimRunner> {
        self.shards[i as usize % SHARDS].nodes[i as usize / SHARDS]
            .runner
            .as_ref()
    }

    /// Sets the attributes machine `i` announces (kept across restarts).
    pub fn set_attributes(&mut self, i: NodeIndex, attributes: Vec<(String, String)>) {
        self.world.machines[i as usize].attributes = attributes.clone();
        let mut observer = NoObserver;
        self.start(i, &mut observer, |node, now| {
            node.set_attributes(now, attributes);
            true
        });
    }

    /// Publishes a suite entry from machine `i`; false if it is down or the suite refused it.
    pub fn publish(
        &mut self,
        i: NodeIndex,
        entry: nubo_proto::suite::SuiteEntry,
        observer: &mut impl Observer,
    ) -> bool {
        self.start(i, observer, |node, now| node.publish(now, entry))
    }

    /// Runs the shards of each window on at most `threads` threads (1: all on the caller's).
    /// The result does not depend on it.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.clamp(1, SHARDS);
    }

    /// The simulated time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The engine's counters.
    pub fn stats(&self) -> EngineStats {
        let mut total = EngineStats::default();
        for shard in &self.shards {
            total.add(&shard.stats);
        }
        total
    }

    /// Messages sent so far, by kind.
    pub fn sent_by_kind(&self) -> KindCounts {
        let mut total = KindCounts::new();
        for shard in &self.shards {
            for (kind, count) in &shard.kinds {
                *total.entry(kind).or_insert(0) += count;
            }
        }
        total
    }

    /// The simulation's generator, for experiments' own random choices.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Number of machines ever added.
    pub fn len(&self) -> usize {
        self.world.machines.len()
    }

    /// True when no machine was added.
    pub fn is_empty(&self) -> bool {
        self.world.machines.is_empty()
    }

    /// The node running on machine `i`, if it runs.
    pub fn node(&self, i: NodeIndex) -> Option<&Node> {
        self.shards[i as usize % SHARDS].nodes[i as usize / SHARDS]
            .node
            .as_ref()
    }

    /// The identity of machine `i`.
    pub fn peer(&self, i: NodeIndex) -> Peer {
        self.world.machines[i as usize].peer
    }

    /// The machine running node `id`.
    pub fn index_of(&self, id: NodeId) -> Option<NodeIndex> {
        self.world.index.get(&id).copied()
    }

    /// Whether machine `i` runs.
    pub fn is_alive(&self, i: NodeIndex) -> bool {
        self.world.machines[i as usize].alive
    }

    /// Indices of the running machines, ascending.
    pub fn alive(&self) -> Vec<NodeIndex> {
        (0..self.world.machines.len() as NodeIndex)
            .filter(|&i| self.is_alive(i))
            .collect()
    }

    /// Starts a new machine with a fresh identity; it does not join anything yet.
    pub fn add_node(&mut self) -> NodeIndex {
        let mut id = NodeId(self.rng.next_u128());
        while self.world.index.contains_key(&id) {
            id = NodeId(self.rng.next_u128());
        }
        let index = self.world.machines.len() as NodeIndex;
        assert!(
            index < 1 << 24,
            "the simulated network has addresses for 2^24 machines"
        );
        self.world.machines.push(Machine {
            peer: Peer::with_addr(id, machine_addr(index)),
            resources: Resources::default(),
            rank_value: 0.0,
            attributes: Vec::new(),
            incarnation: 0,
            group: 0,
            alive: false,
        });
        // Machine `i` sits at `i / SHARDS` in its shard, which holds every SHARDS-th machine.
        self.shards[index as usize % SHARDS]
            .nodes
            .push(NodeSlot::default());
        self.world.ids.push(id);
        self.world.index.insert(id, index);
        self.boot(index);
        index
    }

    /// Makes machine `i` join the overlay through `contacts`.
    pub fn join(&mut self, i: NodeIndex, contacts: &[NodeIndex], observer: &mut impl Observer) {
        let peers: Vec<Peer> = contacts.iter().map(|&c| self.peer(c)).collect();
        self.start(i, observer, |node, now| {
            node.join(now, &peers);
            true
        });
    }

    /// Broadcasts `payload` from machine `i`.
    pub fn broadcast(
        &mut self,
        i: NodeIndex,
        payload: bytes::Bytes,
        observer: &mut impl Observer,
    ) -> Option<nubo_proto::MessageId> {
        let mut id = None;
        self.start(i, observer, |node, now| {
            id = node.broadcast(now, payload).ok();
            id.is_some()
        });
        id
    }

    /// Starts a key-value write (`None` deletes) on machine `i`; false if it is down or refused.
    pub fn kv_put(
        &mut self,
        i: NodeIndex,
        key: bytes::Bytes,
        value: Option<bytes::Bytes>,
        tag: u64,
        observer: &mut impl Observer,
    ) -> bool {
        self.start(i, observer, |node, now| {
            node.kv_put(now, key, value, tag).is_ok()
        })
    }

    /// Starts a key-value read on machine `i`; false if it is down or refused.
    pub fn kv_get(
        &mut self,
        i: NodeIndex,
        key: bytes::Bytes,
        tag: u64,
        observer: &mut impl Observer,
    ) -> bool {
        self.start(i, observer, |node, now| node.kv_get(now, key, tag).is_ok())
    }

    /// Starts a ring lookup of `key` on machine `i`; false if it is down or refused.
    pub fn lookup(
        &mut self,
        i: NodeIndex,
        key: nubo_proto::ring::Position,
        tag: u64,
        observer: &mut impl Observer,
    ) -> bool {
        self.start(i, observer, |node, now| node.lookup(now, key, tag))
    }

    /// Runs `operation` on machine `i` if it is up and hands on what it produced; false if it
    /// is down or the operation was refused.
    fn start(
        &mut self,
        i: NodeIndex,
        observer: &mut impl Observer,
        operation: impl FnOnce(&mut Node, Time) -> bool,
    ) -> bool {
        let now = self.now;
        // Outside any window: everything the node does goes to the queue (`end` is now).
        let mut worker = Worker {
            world: &self.world,
            shard: &mut self.shards[i as usize % SHARDS],
            end: now,
        };
        let Some(node) = worker.slot(i).node.as_mut() else {
            return false;
        };
        let started = operation(node, now);
        worker.after_step(now, i);
        self.show(observer);
        started
    }

    /// Machine `i` leaves gracefully and stops.
    pub fn leave(&mut self, i: NodeIndex, observer: &mut impl Observer) {
        self.start(i, observer, |node, now| {
            node.leave(now);
            true
        });
        self.crash(i);
    }

    /// Sets the resources machine `i` lends (kept across restarts).
    pub fn set_resources(&mut self, i: NodeIndex, resources: Resources) {
        self.world.machines[i as usize].resources = resources;
        if let Some(node) = self.slot(i).node.as_mut() {
            node.set_resources(resources);
        }
    }

    /// Sets the attribute machine `i` is ranked by (kept across restarts).
    pub fn set_rank_value(&mut self, i: NodeIndex, value: f64) {
        let now = self.now;
        self.world.machines[i as usize].rank_value = value;
        if let Some(node) = self.slot(i).node.as_mut() {
            node.set_rank_value(now, value);
        }
    }

    /// The resources machine `i` lends.
    pub fn resources(&self, i: NodeIndex) -> Resources {
        self.world.machines[i as usize].resources
    }

    /// Machine `i` stops at once, losing all its state.
    pub fn crash(&mut self, i: NodeIndex) {
        self.world.machines[i as usize].alive = false;
        *self.slot(i) = NodeSlot::default();
    }

    /// Machine `i` starts again with the same identity and empty state.
    pub fn restart(&mut self, i: NodeIndex) {
        if !self.is_alive(i) {
            self.world.machines[i as usize].incarnation += 1;
            self.boot(i);
        }
    }

    /// Places machine `i` in partition group `group` (all start in group 0).
    pub fn set_group(&mut self, i: NodeIndex, group: u16) {
        self.world.machines[i as usize].group = group;
    }

    /// The partition group of machine `i`.
    pub fn group(&self, i: NodeIndex) -> u16 {
        self.world.machines[i as usize].group
    }

    /// Drops every message from group `from` to group `to` (a one-way cut).
    pub fn block(&mut self, from: u16, to: u16) {
        self.world.blocked.insert((from, to));
    }

    /// Removes every cut and puts every machine back in group 0.
    pub fn heal(&mut self) {
        self.world.blocked.clear();
        for machine in &mut self.world.machines {
            machine.group = 0;
        }
    }

    /// Sets the probability of losing a message.
    pub fn set_loss(&mut self, loss: f64) {
        self.world.network.loss = loss;
    }

    /// Runs every event up to and including `until`, then sets the clock to `until`.
    pub fn run_until(&mut self, until: Time, observer: &mut impl Observer) {
        // No message arrives sooner than this after it is sent (see `Worker::latency`).
        let window = self.world.network.latency_min.max(Duration::from_micros(1));
        let past_until = until + Duration::from_micros(1);
        loop {
            self.deliver_outboxes();
            let first = self.shards.iter_mut().filter_map(Shard::first).min();
            let Some(first) = first.filter(|&first| first <= until) else {
                break;
            };
            let end = (first + window).min(past_until);
            self.run_window(end);
            self.show(observer);
        }
        self.now = until;
    }

    /// Runs for `span` of simulated time.
    pub fn run_for(&mut self, span: Duration, observer: &mut impl Observer) {
        let until = self.now + span;
        self.run_until(until, observer);
    }

    fn slot(&mut self, i: NodeIndex) -> &mut NodeSlot {
        self.shards[i as usize % SHARDS].slot(i)
    }

    /// Hands each shard, as its inboxes, what the others sent its nodes (swapping buffers, so
    /// no entry is copied here). Each shard queues its inboxes, in shard order, when it runs.
    fn deliver_outboxes(&mut self) {
        for from in 0..SHARDS {
            for to in 0..SHARDS {
                if from == to || self.shards[from].outboxes[to].is_empty() {
                    continue;
                }
                let mut sent = std::mem::take(&mut self.shards[from].outboxes[to]);
                std::mem::swap(&mut sent, &mut self.shards[to].inboxes[from]);
                // `sent` is now the drained inbox, kept for its capacity.
                self.shards[from].outboxes[to] = sent;
            }
        }
    }

    /// Runs every event due before `end`, each shard on its own nodes.
    fn run_window(&mut self, end: Time) {
        let world = &self.world;
        let workers = self
            .shards
            .iter_mut()
            .map(|shard| Worker { world, shard, end });
        if self.threads > 1 && self.world.machines.len() >= self.parallel_nodes_min {
            std::thread::scope(|scope| {
                let mut workers = workers;
                let first = workers.next();
                for worker in workers {
                    scope.spawn(move || worker.run());
                }
                if let Some(worker) = first {
                    worker.run();
                }
            });
        } else {
            workers.for_each(Worker::run);
        }
    }

    /// Shows the observer what the shards saw, in order of time (shard order among equal
    /// times).
    fn show(&mut self, observer: &mut impl Observer) {
        let mut seen = Vec::new();
        for shard in &mut self.shards {
            seen.append(&mut shard.seen);
        }
        seen.sort_by_key(Seen::at);
        for item in seen {
            match item {
                Seen::Event { at, node, event } => observer.on_event(at, node, &event),
                Seen::Gossip {
                    at,
                    from,
                    to,
                    gossip,
                } => observer.on_gossip(at, from, to, &gossip),
            }
        }
    }

    fn boot(&mut self, i: NodeIndex) {
        let seed = self.rng.next_u64();
        let now = self.now;
        let machine = &mut self.world.machines[i as usize];
        machine.alive = true;
        let mut node = Node::new(machine.peer, self.config.clone(), seed, now);
        node.set_resources(machine.resources);
        node.set_rank_value(now, machine.rank_value);
        if !machine.attributes.is_empty() {
            node.set_attributes(now, machine.attributes.clone());
        }
        let runner = self
            .config
            .coordination
            .enabled
            .then(|| SimRunner::new(self.runner_timing));
        *self.slot(i) = NodeSlot {
            node: Some(node),
            runner,
            ..NodeSlot::default()
        };
        let mut worker = Worker {
            world: &self.world,
            shard: &mut self.shards[i as usize % SHARDS],
            end: now,
        };
        worker.schedule_wake(now, i);
    }
}

/// Something the observer is to see once the window ends.
enum Seen {
    Event {
        at: Time,
        node: NodeIndex,
        event: Event,
    },
    Gossip {
        at: Time,
        from: NodeIndex,
        to: NodeIndex,
        gossip: Gossip,
    },
}

impl Seen {
    fn at(&self) -> Time {
        match self {
            Seen::Event { at, .. } | Seen::Gossip { at, .. } => *at,
        }
    }
}

/// One shard: every `SHARDS`-th machine's node, the queue of events for them, its own
/// generator (latency jitter, loss) and counters, and what it produced for the others.
struct Shard {
    /// This shard's number: it holds the machines `i` with `i % SHARDS == number`.
    number: usize,
    /// Machine `i` of this shard at `i / SHARDS`.
    nodes: Vec<NodeSlot>,
    queue: CalendarQueue,
    /// The actions the queue's entries point to, and the free places among them.
    actions: Vec<Option<Action>>,
    free_actions: Vec<u32>,
    seq: u64,
    rng: Rng,
    stats: EngineStats,
    kinds: KindCounts,
    /// Bytes sent by kind, while counting traffic.
    kind_bytes: KindCounts,
    last_wake: (NodeIndex, Time),
    wakes_at_once: u32,
    /// This window's actions from the queue, in queue order (time, then insertion).
    due: VecDeque<(Time, u64, Action)>,
    /// Wake-ups made during the window and due in it: `(at, seq, node)`.
    wakes: BinaryHeap<Reverse<(Time, u64, NodeIndex)>>,
    /// By shard: what this shard's nodes sent to that shard's nodes in this window.
    outboxes: Vec<Vec<(Time, Action)>>,
    /// By shard: what that shard sent here, to be queued when this shard next runs.
    inboxes: Vec<Vec<(Time, Action)>>,
    seen: Vec<Seen>,
    /// Wall time (µs) and plans of each step in which a node planned, while timing.
    plan_times: Vec<(u64, u64)>,
}

impl Shard {
    fn new(number: usize, rng: Rng) -> Shard {
        Shard {
            number,
            nodes: Vec::new(),
            queue: CalendarQueue::default(),
            actions: Vec::new(),
            free_actions: Vec::new(),
            seq: 0,
            rng,
            stats: EngineStats::default(),
            kinds: KindCounts::new(),
            kind_bytes: KindCounts::new(),
            last_wake: (NodeIndex::MAX, Time::MAX),
            wakes_at_once: 0,
            due: VecDeque::new(),
            wakes: BinaryHeap::new(),
            outboxes: (0..SHARDS).map(|_| Vec::new()).collect(),
            inboxes: (0..SHARDS).map(|_| Vec::new()).collect(),
            seen: Vec::new(),
            plan_times: Vec::new(),
        }
    }

    /// Machine `i`'s place, which must be in this shard.
    fn slot(&mut self, i: NodeIndex) -> &mut NodeSlot {
        &mut self.nodes[i as usize / SHARDS]
    }

    /// When the earliest event queued here or waiting in the inboxes is due.
    fn first(&mut self) -> Option<Time> {
        let queued = self.queue.peek().map(|e| e.at);
        let inbound = self.inboxes.iter().flatten().map(|&(at, _)| at);
        queued.into_iter().chain(inbound).min()
    }

    fn enqueue(&mut self, at: Time, action: Action) {
        self.seq += 1;
        let slot = match self.free_actions.pop() {
            Some(slot) => {
                self.actions[slot as usize] = Some(action);
                slot
            }
            None => {
                self.actions.push(Some(action));
                (self.actions.len() - 1) as u32
            }
        };
        self.queue.push(Entry {
            at,
            seq: self.seq,
            slot,
        });
    }

    /// Queues the inboxes (in shard order), then takes every action due before `end`.
    fn take_due(&mut self, end: Time) {
        for from in 0..SHARDS {
            let mut inbox = std::mem::take(&mut self.inboxes[from]);
            for (at, action) in inbox.drain(..) {
                self.enqueue(at, action);
            }
            self.inboxes[from] = inbox;
        }
        while let Some(entry) = self.queue.peek() {
            if entry.at >= end {
                break;
            }
            let Some(Entry { at, seq, slot }) = self.queue.pop() else {
                break;
            };
            if let Some(action) = self.actions[slot as usize].take() {
                self.free_actions.push(slot);
                self.due.push_back((at, seq, action));
            }
        }
    }
}

/// What every shard reads and none changes during a window: the machines, the network.
struct World {
    machines: Vec<Machine>,
    /// The id of each machine: the same as in `machines`, packed densely so that checking the
    /// id behind an address stays in the cache.
    ids: Vec<NodeId>,
    index: HashMap<NodeId, NodeIndex>,
    network: NetworkConfig,
    blocked: BTreeSet<(u16, u16)>,
    count_traffic: bool,
    time_plans: bool,
}

impl World {
    /// The machine a message to `peer` reaches: the one at its address if that machine has its
    /// id, else the machine with its id (nodes may know a peer by id only).
    fn machine_of(&self, peer: Peer) -> Option<NodeIndex> {
        let at_addr = peer
            .addr
            .and_then(machine_at)
            .filter(|&i| self.ids.get(i as usize) == Some(&peer.id));
        at_addr.or_else(|| self.index.get(&peer.id).copied())
    }
}

/// One shard at work on its nodes until `end`.
struct Worker<'a> {
    world: &'a World,
    shard: &'a mut Shard,
    end: Time,
}

impl Worker<'_> {
    fn slot(&mut self, i: NodeIndex) -> &mut NodeSlot {
        self.shard.slot(i)
    }

    fn run(mut self) {
        self.shard.take_due(self.end);
        loop {
            let queued = self.shard.due.front().map(|&(at, seq, _)| (at, seq));
            let woken = self
                .shard
                .wakes
                .peek()
                .map(|&Reverse((at, seq, _))| (at, seq));
            let (at, action) = match (queued, woken) {
                (None, None) => break,
                (Some(q), Some(w)) if w < q => self.pop_wake(),
                (None, Some(_)) => self.pop_wake(),
                _ => match self.shard.due.pop_front() {
                    Some((at, _, action)) => (at, action),
                    None => break,
                },
            };
            self.shard.stats.events += 1;
            self.dispatch(at, action);
        }
    }

    fn pop_wake(&mut self) -> (Time, Action) {
        let Some(Reverse((at, _, node))) = self.shard.wakes.pop() else {
            unreachable!("peeked before");
        };
        (at, Action::Wake { node })
    }

    fn dispatch(&mut self, now: Time, action: Action) {
        if !self.world.time_plans {
            return self.dispatch_untimed(now, action);
        }
        let node = action.target();
        let plans = |worker: &mut Self| {
            worker
                .slot(node)
                .node
                .as_ref()
                .map_or(0, |n| n.coordination().counters().plans)
        };
        let before = plans(self);
        let started = std::time::Instant::now();
        self.dispatch_untimed(now, action);
        let elapsed = started.elapsed().as_micros() as u64;
        let made = plans(self).saturating_sub(before);
        if made > 0 {
            self.shard.plan_times.push((elapsed, made));
        }
    }

    fn dispatch_untimed(&mut self, now: Time, action: Action) {
        match action {
            Action::Deliver { from, to, message } => {
                if self.slot(to).node.is_none() {
                    self.shard.stats.to_dead += 1;
                    // The sender's transport notices the failure one trip later.
                    let sender = &self.world.machines[from as usize];
                    if sender.alive {
                        let action = Action::PeerDown {
                            at: from,
                            incarnation: sender.incarnation,
                            peer: self.world.machines[to as usize].peer.id,
                        };
                        let delay = self.latency(from, to);
                        self.push(now + delay, action);
                    }
                    return;
                }
                self.shard.stats.delivered += 1;
                self.see_gossip(now, from, to, &message);
                let sender = self.world.machines[from as usize].peer;
                if let Some(node) = self.slot(to).node.as_mut() {
                    node.handle_message(now, sender, message);
                }
                self.after_step(now, to);
            }
            Action::PeerDown {
                at,
                incarnation,
                peer,
            } => {
                if self.world.machines[at as usize].incarnation != incarnation {
                    return;
                }
                if let Some(node) = self.slot(at).node.as_mut() {
                    node.handle_peer_down(now, peer);
                    self.after_step(now, at);
                }
            }
            Action::Wake { node: i } => {
                let slot = self.slot(i);
                if slot.wake != Some(now) {
                    return;
                }
                slot.wake = None;
                // A node whose deadline never moves past `now` would spin here forever.
                if self.shard.last_wake == (i, now) {
                    self.shard.wakes_at_once += 1;
                    assert!(
                        self.shard.wakes_at_once < WAKES_AT_ONCE_MAX,
                        "node {i} asked to be woken at {now} {WAKES_AT_ONCE_MAX} times: its poll_timeout does not advance"
                    );
                } else {
                    self.shard.last_wake = (i, now);
                    self.shard.wakes_at_once = 0;
                }
                let slot = self.slot(i);
                if let (Some(node), Some(runner)) = (slot.node.as_mut(), slot.runner.as_mut())
                    && runner.poll() <= now
                    && runner.tick(now, node.suite())
                {
                    node.set_instances(now, runner.facts());
                }
                if let Some(node) = self.slot(i).node.as_mut() {
                    node.handle_timeout(now);
                    self.after_step(now, i);
                }
            }
        }
    }

    /// Keeps, for the observer, every copy of a broadcast payload that reached a node.
    fn see_gossip(&mut self, at: Time, from: NodeIndex, to: NodeIndex, message: &Message) {
        let gossips: &[Gossip] = match message {
            Message::Broadcast(BroadcastMessage::Gossip(gossip)) => std::slice::from_ref(gossip),
            Message::Broadcast(BroadcastMessage::Repair(list)) => list,
            _ => return,
        };
        for gossip in gossips {
            self.shard.seen.push(Seen::Gossip {
                at,
                from,
                to,
                gossip: gossip.clone(),
            });
        }
    }

    /// Drains node `i`'s outputs into the network and the observer, and schedules its wake-up.
    fn after_step(&mut self, now: Time, i: NodeIndex) {
        loop {
            let Some(node) = self.slot(i).node.as_mut() else {
                return;
            };
            if let Some(event) = node.poll_event() {
                // Like an agent's runner, which looks again at every tick: a task may name a
                // version the node's suite receives only later.
                if matches!(event, Event::TasksChanged | Event::SuiteChanged(_)) {
                    let slot = self.slot(i);
                    if let (Some(node), Some(runner)) = (slot.node.as_mut(), slot.runner.as_mut())
                        && runner.set_tasks(now, node.tasks(), node.suite())
                    {
                        node.set_instances(now, runner.facts());
                    }
                }
                self.shard.seen.push(Seen::Event {
                    at: now,
                    node: i,
                    event,
                });
                continue;
            }
            let Some(transmit) = node.poll_transmit() else {
                break;
            };
            self.send(now, i, transmit.to, transmit.message);
        }
        self.schedule_wake(now, i);
    }

    fn schedule_wake(&mut self, now: Time, i: NodeIndex) {
        let slot = self.slot(i);
        let Some(node) = slot.node.as_ref() else {
            return;
        };
        let runner = slot.runner.as_ref().map_or(Time::MAX, SimRunner::poll);
        let at = node.poll_timeout().min(runner).max(now);
        if slot.wake.is_none_or(|w| at < w) {
            slot.wake = Some(at);
            self.push(at, Action::Wake { node: i });
        }
    }

    fn send(&mut self, now: Time, from: NodeIndex, to: Peer, message: Message) {
        self.shard.stats.sent += 1;
        *self.shard.kinds.entry(message.kind()).or_insert(0) += 1;
        if self.world.count_traffic {
            let bytes = wire::encode(&message).map_or(0, |b| b.len() as u64) + FRAMING_BYTES;
            *self.shard.kind_bytes.entry(message.kind()).or_insert(0) += bytes;
            let slot = self.slot(from);
            slot.sent_msgs += 1;
            slot.sent_bytes += bytes;
        }
        let Some(to) = self.world.machine_of(to) else {
            return;
        };
        let message = if self.world.network.check_wire {
            round_trip(message)
        } else {
            message
        };
        let blocked = &self.world.blocked;
        if !blocked.is_empty() {
            let a = self.world.machines[from as usize].group;
            let b = self.world.machines[to as usize].group;
            if blocked.contains(&(a, b)) {
                self.shard.stats.cut += 1;
                return;
            }
        }
        let loss = self.world.network.loss;
        if loss > 0.0 && self.shard.rng.chance(loss) {
            self.shard.stats.lost += 1;
            return;
        }
        let delay = self.latency(from, to);
        self.push(now + delay, Action::Deliver { from, to, message });
    }

    /// One-way delay of a message from `a` to `b`: the link's base latency plus jitter, never
    /// less than the window (`latency_min`, at least 1 µs).
    fn latency(&mut self, a: NodeIndex, b: NodeIndex) -> Duration {
        let network = &self.world.network;
        let min = (network.latency_min.as_micros() as u64).max(1);
        let max = (network.latency_max.as_micros() as u64).max(min);
        let mut pair = u64::from(a.min(b)) << 32 | u64::from(a.max(b));
        let base = min + splitmix64(&mut pair) % (max - min + 1);
        let jitter = network.jitter.as_micros() as u64;
        Duration::from_micros(base + self.shard.rng.below(jitter + 1))
    }

    /// Runs `action` later in this window if it is due before its end (only a node's own
    /// wake-up can be: messages take at least the window to arrive), or hands it to the merge.
    fn push(&mut self, at: Time, action: Action) {
        match action {
            Action::Wake { node } if at < self.end => {
                self.shard.seq += 1;
                let seq = self.shard.seq;
                self.shard.wakes.push(Reverse((at, seq, node)));
            }
            action => {
                debug_assert!(at >= self.end, "a message due within its window");
                let to = action.target() as usize % SHARDS;
                if to == self.shard.number {
                    self.shard.enqueue(at, action);
                } else {
                    self.shard.outboxes[to].push((at, action));
                }
            }
        }
    }
}

/// Encodes and decodes `message`, panicking if the wire format does not give it back: a bug in
/// the core, which the fuzzer must report with its seed.
fn round_trip(message: Message) -> Message {
    let bytes = wire::encode(&message)
        .unwrap_or_else(|e| panic!("a message the core produced must encode: {e:?}: {message:?}"));
    let decoded = wire::decode(&bytes).expect("an encoded message must decode");
    assert_eq!(decoded, message, "wire round trip changed a message");
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::BroadcastTracker;
    use crate::workload::grow_overlay;

    /// A run of 200 nodes (join, warm-up, a crash, broadcasts) on `threads` threads, every
    /// window split between threads: what it sent, and every node's neighbours.
    fn run(threads: usize) -> (KindCounts, Vec<Vec<NodeId>>, Vec<u32>) {
        let mut sim = Sim::new(7, Config::default(), NetworkConfig::default());
        sim.set_threads(threads);
        sim.parallel_nodes_min = 0;
        let mut tracker = BroadcastTracker::new(true);
        grow_overlay(&mut sim, 200, Duration::from_secs(2), &mut tracker, |sim| {
            sim.add_node()
        });
        sim.run_for(Duration::from_secs(5), &mut tracker);
        sim.crash(3);
        for origin in [0, 50, 199] {
            let id = sim.broadcast(origin, bytes::Bytes::from_static(b"x"), &mut tracker);
            tracker.track(id.expect("a live node broadcasts"), sim.now(), origin);
            sim.run_for(Duration::from_secs(1), &mut tracker);
        }
        let views = sim
            .alive()
            .into_iter()
            .map(|i| sim.node(i).unwrap().membership().active().ids().collect())
            .collect();
        let delivered = tracker.records.iter().map(|r| r.delivered).collect();
        (sim.sent_by_kind(), views, delivered)
    }

    #[test]
    fn a_run_does_not_depend_on_the_number_of_threads() {
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one.2, vec![199, 199, 199], "every live node delivers");
    }
}
