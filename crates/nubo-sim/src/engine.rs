//! The discrete-event engine: one thread, one event queue, one seeded generator.
//!
//! Nodes are the real [`nubo_proto::Node`] state machines. The engine delivers their transmits
//! after a sampled latency, drops them on loss or partition, reports `peer down` to a sender
//! whose message reached a crashed node, and wakes each node at its `poll_timeout`.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use nubo_proto::aggregation::Resources;
use nubo_proto::rng::splitmix64;
use nubo_proto::wire::{self, Message};
use nubo_proto::{Config, Event, Node, NodeId, Peer, Rng, Time};

use crate::queue::{CalendarQueue, Entry};

/// Index of a node in the simulation (stable across crashes and restarts).
pub type NodeIndex = u32;

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
    /// A message from `from` reached the live node `to`.
    fn on_receive(&mut self, _now: Time, _from: NodeIndex, _to: NodeIndex, _message: &Message) {}
}

/// Two observers, each seeing everything.
impl<A: Observer, B: Observer> Observer for (A, B) {
    fn on_event(&mut self, now: Time, node: NodeIndex, event: &Event) {
        self.0.on_event(now, node, event);
        self.1.on_event(now, node, event);
    }
    fn on_receive(&mut self, now: Time, from: NodeIndex, to: NodeIndex, message: &Message) {
        self.0.on_receive(now, from, to, message);
        self.1.on_receive(now, from, to, message);
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

/// One simulated machine: its identity and, while it runs, its node.
struct Slot {
    peer: Peer,
    resources: Resources,
    rank_value: f64,
    node: Option<Node>,
    incarnation: u32,
    wake: Option<Time>,
    group: u16,
}

/// A simulation of many nodes on one network.
pub struct Sim {
    now: Time,
    rng: Rng,
    seq: u64,
    queue: CalendarQueue,
    actions: Vec<Option<Action>>,
    free_actions: Vec<u32>,
    slots: Vec<Slot>,
    index: HashMap<NodeId, NodeIndex>,
    config: Config,
    network: NetworkConfig,
    blocked: BTreeSet<(u16, u16)>,
    stats: EngineStats,
    last_wake: (NodeIndex, Time),
    wakes_at_once: u32,
    sent_by_kind: KindCounts,
}

/// More wake-ups of one node at one instant than any protocol needs: a busy loop.
const WAKES_AT_ONCE_MAX: u32 = 10_000;

impl Sim {
    /// An empty simulation whose every random choice derives from `seed`.
    pub fn new(seed: u64, config: Config, network: NetworkConfig) -> Sim {
        Sim {
            now: Time::ZERO,
            rng: Rng::from_seed(seed),
            seq: 0,
            queue: CalendarQueue::default(),
            actions: Vec::new(),
            free_actions: Vec::new(),
            slots: Vec::new(),
            index: HashMap::new(),
            config,
            network,
            blocked: BTreeSet::new(),
            stats: EngineStats::default(),
            last_wake: (NodeIndex::MAX, Time::MAX),
            wakes_at_once: 0,
            sent_by_kind: KindCounts::new(),
        }
    }

    /// The simulated time.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The engine's counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Messages sent so far, by kind.
    pub fn sent_by_kind(&self) -> &KindCounts {
        &self.sent_by_kind
    }

    /// The simulation's generator, for experiments' own random choices.
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Number of machines ever added.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no machine was added.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The node running on machine `i`, if it runs.
    pub fn node(&self, i: NodeIndex) -> Option<&Node> {
        self.slots[i as usize].node.as_ref()
    }

    /// The identity of machine `i`.
    pub fn peer(&self, i: NodeIndex) -> Peer {
        self.slots[i as usize].peer
    }

    /// The machine running node `id`.
    pub fn index_of(&self, id: NodeId) -> Option<NodeIndex> {
        self.index.get(&id).copied()
    }

    /// Whether machine `i` runs.
    pub fn is_alive(&self, i: NodeIndex) -> bool {
        self.slots[i as usize].node.is_some()
    }

    /// Indices of the running machines, ascending.
    pub fn alive(&self) -> Vec<NodeIndex> {
        (0..self.slots.len() as NodeIndex)
            .filter(|&i| self.is_alive(i))
            .collect()
    }

    /// Starts a new machine with a fresh identity; it does not join anything yet.
    pub fn add_node(&mut self) -> NodeIndex {
        let mut id = NodeId(self.rng.next_u128());
        while self.index.contains_key(&id) {
            id = NodeId(self.rng.next_u128());
        }
        let index = self.slots.len() as NodeIndex;
        self.slots.push(Slot {
            peer: Peer::new(id),
            resources: Resources::default(),
            rank_value: 0.0,
            node: None,
            incarnation: 0,
            wake: None,
            group: 0,
        });
        self.index.insert(id, index);
        self.boot(index);
        index
    }

    /// Makes machine `i` join the overlay through `contacts`.
    pub fn join(&mut self, i: NodeIndex, contacts: &[NodeIndex], observer: &mut impl Observer) {
        let peers: Vec<Peer> = contacts.iter().map(|&c| self.peer(c)).collect();
        let now = self.now;
        if let Some(node) = self.slots[i as usize].node.as_mut() {
            node.join(now, &peers);
            self.after_step(i, observer);
        }
    }

    /// Broadcasts `payload` from machine `i`.
    pub fn broadcast(
        &mut self,
        i: NodeIndex,
        payload: bytes::Bytes,
        observer: &mut impl Observer,
    ) -> Option<nubo_proto::MessageId> {
        let now = self.now;
        let node = self.slots[i as usize].node.as_mut()?;
        let id = node.broadcast(now, payload).ok()?;
        self.after_step(i, observer);
        Some(id)
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

    /// Runs `operation` on machine `i` if it is up and drains what it produced; false if it
    /// is down or the operation was refused.
    fn start(
        &mut self,
        i: NodeIndex,
        observer: &mut impl Observer,
        operation: impl FnOnce(&mut Node, Time) -> bool,
    ) -> bool {
        let now = self.now;
        let Some(node) = self.slots[i as usize].node.as_mut() else {
            return false;
        };
        let started = operation(node, now);
        self.after_step(i, observer);
        started
    }

    /// Machine `i` leaves gracefully and stops.
    pub fn leave(&mut self, i: NodeIndex, observer: &mut impl Observer) {
        let now = self.now;
        if let Some(node) = self.slots[i as usize].node.as_mut() {
            node.leave(now);
            self.after_step(i, observer);
        }
        self.crash(i);
    }

    /// Sets the resources machine `i` lends (kept across restarts).
    pub fn set_resources(&mut self, i: NodeIndex, resources: Resources) {
        let slot = &mut self.slots[i as usize];
        slot.resources = resources;
        if let Some(node) = slot.node.as_mut() {
            node.set_resources(resources);
        }
    }

    /// Sets the attribute machine `i` is ranked by (kept across restarts).
    pub fn set_rank_value(&mut self, i: NodeIndex, value: f64) {
        let now = self.now;
        let slot = &mut self.slots[i as usize];
        slot.rank_value = value;
        if let Some(node) = slot.node.as_mut() {
            node.set_rank_value(now, value);
        }
    }

    /// The resources machine `i` lends.
    pub fn resources(&self, i: NodeIndex) -> Resources {
        self.slots[i as usize].resources
    }

    /// Machine `i` stops at once, losing all its state.
    pub fn crash(&mut self, i: NodeIndex) {
        let slot = &mut self.slots[i as usize];
        slot.node = None;
        slot.wake = None;
    }

    /// Machine `i` starts again with the same identity and empty state.
    pub fn restart(&mut self, i: NodeIndex) {
        if !self.is_alive(i) {
            self.slots[i as usize].incarnation += 1;
            self.boot(i);
        }
    }

    /// Places machine `i` in partition group `group` (all start in group 0).
    pub fn set_group(&mut self, i: NodeIndex, group: u16) {
        self.slots[i as usize].group = group;
    }

    /// The partition group of machine `i`.
    pub fn group(&self, i: NodeIndex) -> u16 {
        self.slots[i as usize].group
    }

    /// Drops every message from group `from` to group `to` (a one-way cut).
    pub fn block(&mut self, from: u16, to: u16) {
        self.blocked.insert((from, to));
    }

    /// Removes every cut and puts every machine back in group 0.
    pub fn heal(&mut self) {
        self.blocked.clear();
        for slot in &mut self.slots {
            slot.group = 0;
        }
    }

    /// Sets the probability of losing a message.
    pub fn set_loss(&mut self, loss: f64) {
        self.network.loss = loss;
    }

    /// Runs every event up to and including `until`, then sets the clock to `until`.
    pub fn run_until(&mut self, until: Time, observer: &mut impl Observer) {
        while let Some(next) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(Entry { at, slot, .. }) = self.queue.pop() else {
                break;
            };
            let Some(action) = self.actions[slot as usize].take() else {
                continue;
            };
            self.free_actions.push(slot);
            self.now = at;
            self.stats.events += 1;
            self.dispatch(action, observer);
        }
        self.now = until;
    }

    /// Runs for `span` of simulated time.
    pub fn run_for(&mut self, span: Duration, observer: &mut impl Observer) {
        let until = self.now + span;
        self.run_until(until, observer);
    }

    fn boot(&mut self, i: NodeIndex) {
        let seed = self.rng.next_u64();
        let slot = &mut self.slots[i as usize];
        let mut node = Node::new(slot.peer, self.config.clone(), seed, self.now);
        node.set_resources(slot.resources);
        node.set_rank_value(self.now, slot.rank_value);
        slot.node = Some(node);
        slot.wake = None;
        self.schedule_wake(i);
    }

    fn dispatch(&mut self, action: Action, observer: &mut impl Observer) {
        let now = self.now;
        match action {
            Action::Deliver { from, to, message } => {
                if self.slots[to as usize].node.is_none() {
                    self.stats.to_dead += 1;
                    // The sender's transport notices the failure one trip later.
                    let sender = &self.slots[from as usize];
                    if sender.node.is_some() {
                        let action = Action::PeerDown {
                            at: from,
                            incarnation: sender.incarnation,
                            peer: self.slots[to as usize].peer.id,
                        };
                        let delay = self.latency(from, to);
                        self.push(now + delay, action);
                    }
                    return;
                }
                self.stats.delivered += 1;
                observer.on_receive(now, from, to, &message);
                let sender = self.slots[from as usize].peer;
                if let Some(node) = self.slots[to as usize].node.as_mut() {
                    node.handle_message(now, sender, message);
                }
                self.after_step(to, observer);
            }
            Action::PeerDown {
                at,
                incarnation,
                peer,
            } => {
                let slot = &mut self.slots[at as usize];
                if slot.incarnation != incarnation {
                    return;
                }
                if let Some(node) = slot.node.as_mut() {
                    node.handle_peer_down(now, peer);
                    self.after_step(at, observer);
                }
            }
            Action::Wake { node: i } => {
                let slot = &mut self.slots[i as usize];
                if slot.wake != Some(now) {
                    return;
                }
                slot.wake = None;
                // A node whose deadline never moves past `now` would spin here forever.
                if self.last_wake == (i, now) {
                    self.wakes_at_once += 1;
                    assert!(
                        self.wakes_at_once < WAKES_AT_ONCE_MAX,
                        "node {i} asked to be woken at {now} {WAKES_AT_ONCE_MAX} times: its poll_timeout does not advance"
                    );
                } else {
                    self.last_wake = (i, now);
                    self.wakes_at_once = 0;
                }
                if let Some(node) = slot.node.as_mut() {
                    node.handle_timeout(now);
                    self.after_step(i, observer);
                }
            }
        }
    }

    /// Drains node `i`'s outputs into the network and the observer, and schedules its wake-up.
    fn after_step(&mut self, i: NodeIndex, observer: &mut impl Observer) {
        let now = self.now;
        loop {
            let slot = &mut self.slots[i as usize];
            let Some(node) = slot.node.as_mut() else {
                return;
            };
            if let Some(event) = node.poll_event() {
                observer.on_event(now, i, &event);
                continue;
            }
            let Some(transmit) = node.poll_transmit() else {
                break;
            };
            self.send(i, transmit.to.id, transmit.message);
        }
        self.schedule_wake(i);
    }

    fn schedule_wake(&mut self, i: NodeIndex) {
        let now = self.now;
        let slot = &mut self.slots[i as usize];
        let Some(node) = slot.node.as_ref() else {
            return;
        };
        let at = node.poll_timeout().max(now);
        if slot.wake.is_none_or(|w| at < w) {
            slot.wake = Some(at);
            self.push(at, Action::Wake { node: i });
        }
    }

    fn send(&mut self, from: NodeIndex, to: NodeId, message: Message) {
        self.stats.sent += 1;
        *self.sent_by_kind.entry(message.kind()).or_insert(0) += 1;
        let Some(&to) = self.index.get(&to) else {
            return;
        };
        let message = if self.network.check_wire {
            round_trip(message)
        } else {
            message
        };
        let cut = {
            let a = self.slots[from as usize].group;
            let b = self.slots[to as usize].group;
            !self.blocked.is_empty() && self.blocked.contains(&(a, b))
        };
        if cut {
            self.stats.cut += 1;
            return;
        }
        if self.network.loss > 0.0 && self.rng.chance(self.network.loss) {
            self.stats.lost += 1;
            return;
        }
        let delay = self.latency(from, to);
        self.push(self.now + delay, Action::Deliver { from, to, message });
    }

    /// One-way delay of a message from `a` to `b`: the link's base latency plus jitter.
    fn latency(&mut self, a: NodeIndex, b: NodeIndex) -> Duration {
        let min = self.network.latency_min.as_micros() as u64;
        let max = (self.network.latency_max.as_micros() as u64).max(min);
        let mut pair = u64::from(a.min(b)) << 32 | u64::from(a.max(b));
        let base = min + splitmix64(&mut pair) % (max - min + 1);
        let jitter = self.network.jitter.as_micros() as u64;
        Duration::from_micros(base + self.rng.below(jitter + 1))
    }

    fn push(&mut self, at: Time, action: Action) {
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
}

/// Encodes and decodes `message`, panicking if the wire format does not give it back: a bug in
/// the core, which the fuzzer must report with its seed.
fn round_trip(message: Message) -> Message {
    let bytes = wire::encode(&message).expect("a message the core produced must encode");
    let decoded = wire::decode(&bytes).expect("an encoded message must decode");
    assert_eq!(decoded, message, "wire round trip changed a message");
    decoded
}
