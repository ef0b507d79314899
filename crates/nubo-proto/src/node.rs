//! A node of the cloud: every protocol layer composed behind one sans-IO interface.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::aggregation::{Aggregation, AggregationConfig, CloudStats, Partners, Resources};
use crate::broadcast::{Broadcast, BroadcastConfig, BroadcastError, Delivery, MessageId};
use crate::coordination::{Coordination, CoordinationConfig};
use crate::id::{NodeId, Peer};
use crate::kv::{Kv, KvConfig, KvError, KvOutcome};
use crate::liveness::{Liveness, LivenessConfig, LivenessEvent, LivenessNews};
use crate::membership::{Membership, MembershipConfig, MembershipEvent};
use crate::ring::{LookupPurpose, LookupResult, Position, Ring, RingConfig};
use crate::rng::Rng;
use crate::rollout::Task;
use crate::roster::{Roster, RosterConfig, RosterNews};
use crate::slicing::{Slicing, SlicingConfig};
use crate::spec::{PlainReader, SpecReader};
use crate::suite::{AcceptAll, Suite, SuiteCheck, SuiteConfig, SuiteEntry};
use crate::time::Time;
use crate::wire::Message;

/// Configuration of every layer of a node.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Overlay membership (HyParView).
    pub membership: MembershipConfig,
    /// Broadcast (tree push, lazy repair and anti-entropy).
    pub broadcast: BroadcastConfig,
    /// Aggregation (push-pull averaging).
    pub aggregation: AggregationConfig,
    /// Ordered slicing.
    pub slicing: SlicingConfig,
    /// The structured overlay.
    pub ring: RingConfig,
    /// The replicated key-value store.
    pub kv: KvConfig,
    /// The list of members.
    pub roster: RosterConfig,
    /// The service suite.
    pub suite: SuiteConfig,
    /// Which members are gone.
    pub liveness: LivenessConfig,
    /// Who runs each service.
    pub coordination: CoordinationConfig,
}

/// Lookup tags with this bit set belong to the key-value store.
const KV_LOOKUP: u64 = 1 << 63;
/// Lookup tags with this bit set belong to coordination.
const COORDINATION_LOOKUP: u64 = 1 << 62;
/// Bits of a lookup tag reserved by the core.
const RESERVED_LOOKUP: u64 = KV_LOOKUP | COORDINATION_LOOKUP;

/// First byte of a broadcast payload: whose it is. The application's payloads and the
/// roster's news share one broadcast layer.
const PAYLOAD_APPLICATION: u8 = 0;
const PAYLOAD_ROSTER: u8 = 1;
const PAYLOAD_SUITE: u8 = 2;
const PAYLOAD_LIVENESS: u8 = 3;

/// A message the driver must send.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    /// The receiver, with its address when known.
    pub to: Peer,
    /// What to send.
    pub message: Message,
}

/// Something the application or the operator should know about.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A node became our neighbour in the overlay.
    NeighborUp(Peer),
    /// A node stopped being our neighbour.
    NeighborDown(Peer),
    /// A broadcast reached this node (exactly once per message id while it is remembered).
    Delivered(Delivery),
    /// A lookup started with [`Node::lookup`] ended (with no replicas if it failed).
    Lookup(LookupResult),
    /// A key-value operation started with [`Node::kv_put`] or [`Node::kv_get`] ended.
    Kv(KvOutcome),
    /// The suite entry of this key changed.
    SuiteChanged(String),
    /// A member is gone (`left`: on purpose), as liveness decided or heard.
    MemberGone {
        /// The member.
        id: NodeId,
        /// It left on purpose.
        left: bool,
    },
    /// A member thought gone is alive.
    MemberBack(NodeId),
    /// What this node must run changed: see [`Node::tasks`].
    TasksChanged,
}

/// One node's protocol state: the deterministic core of nubo.
///
/// # Driving contract
/// The driver (the simulator or the real agent) owns the clock, the randomness seed and all I/O.
/// 1. Create the node with [`Node::new`], giving its identity, configuration, a seed and `now`.
/// 2. Feed every input through a `handle_*` method (or [`Node::join`], [`Node::broadcast`],
///    [`Node::leave`]), always with the current time; time never goes backwards.
/// 3. After each input, drain [`Node::poll_transmit`] until `None` and send each message, and
///    drain [`Node::poll_event`] until `None`.
/// 4. Call [`Node::handle_timeout`] once the time returned by [`Node::poll_timeout`] has come
///    (calling it early is harmless), then drain again.
/// 5. Report a peer that cannot be reached (dial failure, connection lost) with
///    [`Node::handle_peer_down`].
/// 6. A driver that keeps key-value records on disk turns on [`Kv::track_changes`]; after each
///    input it saves [`Kv::drain_changes`] *before* sending anything, then reports the result
///    with [`Node::handle_saved`]. Messages that acknowledge those records leave only then,
///    so no replica acknowledges what a crash would lose.
///
/// The node never reads a clock, never draws OS randomness and never performs I/O; the same
/// inputs with the same seed produce the same outputs, bit for bit.
pub struct Node {
    me: Peer,
    membership: Membership,
    broadcast: Broadcast,
    aggregation: Aggregation,
    slicing: Slicing,
    ring: Ring,
    kv: Kv,
    roster: Roster,
    suite: Suite,
    liveness: Liveness,
    coordination: Coordination,
    /// The size estimate, with what it was computed from: the ring's changes and
    /// settledness, the membership views' changes and the departures' changes.
    size_cache: Option<(SizeInputs, Option<usize>)>,
    enabled: Enabled,
    /// Whether the broadcast layer was handed anything since the last flush. Most inputs
    /// (membership shuffles above all) never reach it, and then neither its outputs nor its
    /// deadline need a look (its state lies in cache lines of its own, and large simulations
    /// are bound by memory latency).
    broadcast_touched: bool,
    /// The broadcast layer's deadline as of the last flush that found it touched.
    broadcast_deadline: Time,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

/// What the size estimate is computed from, by change counts (see `Node::size_estimate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SizeInputs {
    ring: u64,
    settled: bool,
    views: u64,
    departed: u64,
}

/// Which optional layers run (membership and broadcast always do). Kept in the node itself so
/// that the state of a switched-off layer is never touched: each layer lives in its own cache
/// lines, and visiting all of them after every input was a measurable share of the time of
/// large simulations, which are bound by memory latency.
#[derive(Clone, Copy, Debug)]
struct Enabled {
    aggregation: bool,
    slicing: bool,
    ring: bool,
    kv: bool,
    roster: bool,
    suite: bool,
    liveness: bool,
    coordination: bool,
}

impl Enabled {
    fn from_config(config: &Config) -> Enabled {
        Enabled {
            aggregation: config.aggregation.enabled,
            slicing: config.slicing.enabled,
            ring: config.ring.enabled,
            kv: config.kv.enabled,
            roster: config.roster.enabled,
            suite: config.suite.enabled,
            liveness: config.liveness.enabled,
            coordination: config.coordination.enabled,
        }
    }
}

/// Takes the next output of `queue`; a queue drained is freed rather than kept. A node's
/// outputs are short and taken at once; a kept buffer would wait, cold, until the node's next
/// input, while a fresh one comes from the allocator's recently freed blocks, still in the
/// cache. In a simulation of many nodes, the writes into every node's own idle buffers were a
/// large share of the misses of the cache.
fn pop_and_free_when_drained<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let next = queue.pop_front();
    if queue.is_empty() {
        *queue = VecDeque::new();
    }
    next
}

impl Node {
    /// A node with identity `me`, not yet part of any overlay.
    pub fn new(me: Peer, config: Config, seed: u64, now: Time) -> Node {
        let mut rng = Rng::from_seed(seed);
        let enabled = Enabled::from_config(&config);
        // Layers draw their generators in a fixed order: membership first, then broadcast.
        let membership = Membership::new(me, config.membership, rng.fork(), now);
        let broadcast = Broadcast::new(me, config.broadcast, rng.fork(), now);
        let broadcast_deadline = broadcast.poll_timeout();
        Node {
            me,
            membership,
            broadcast,
            aggregation: Aggregation::new(me, config.aggregation, rng.fork(), now),
            slicing: Slicing::new(me.id, config.slicing, now),
            ring: Ring::new(me, config.ring, rng.fork(), now),
            kv: Kv::new(me, config.kv, now),
            roster: Roster::new(me, config.roster, now),
            suite: Suite::new(config.suite, Box::new(AcceptAll), now),
            liveness: Liveness::new(me, config.liveness, now),
            coordination: Coordination::new(me, config.coordination, Box::new(PlainReader), now),
            size_cache: None,
            enabled,
            broadcast_touched: false,
            broadcast_deadline,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This node's identity.
    pub fn id(&self) -> NodeId {
        self.me.id
    }

    /// This node with its advertised address.
    pub fn peer(&self) -> Peer {
        self.me
    }

    /// The membership layer, for inspection.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The broadcast layer, for inspection.
    pub fn broadcast_layer(&self) -> &Broadcast {
        &self.broadcast
    }

    /// The aggregation layer, for inspection.
    pub fn aggregation(&self) -> &Aggregation {
        &self.aggregation
    }

    /// What this node knows of the whole cloud (size, totals, extremes), from the last epoch of
    /// aggregation it took part in.
    pub fn cloud_stats(&self) -> Option<&CloudStats> {
        self.aggregation.stats()
    }

    /// Sets the resources this node lends; they count from the next aggregation epoch.
    pub fn set_resources(&mut self, resources: Resources) {
        self.aggregation.set_resources(resources);
    }

    /// The slicing layer: this node's rank, slice and top shares.
    pub fn slicing(&self) -> &Slicing {
        &self.slicing
    }

    /// Sets the attribute this node is ranked by (e.g. an uptime-based reliability score).
    pub fn set_rank_value(&mut self, now: Time, value: f64) {
        self.slicing.set_value(now, value);
    }

    /// The structured overlay, for inspection.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Starts finding the owner (and replicas) of ring position `key`; the result comes as
    /// an [`Event::Lookup`] carrying `tag`. Returns false when too many lookups are in
    /// progress, or when `tag` has one of its two top bits set (reserved).
    pub fn lookup(&mut self, now: Time, key: Position, tag: u64) -> bool {
        if tag & RESERVED_LOOKUP != 0 {
            return false;
        }
        let started = self.ring.lookup(now, key, tag);
        self.flush(now);
        started
    }

    /// The key-value store's part on this node, for inspection.
    pub fn kv(&self) -> &Kv {
        &self.kv
    }

    /// The key-value store's part on this node, for a driver that persists it: see
    /// [`Kv::track_changes`], [`Kv::drain_changes`] and [`Kv::restore`].
    pub fn kv_mut(&mut self) -> &mut Kv {
        &mut self.kv
    }

    /// The records of the last [`Kv::drain_changes`] were saved (`ok`) or could not be: the
    /// acknowledgements that waited for them leave, or become refusals.
    pub fn handle_saved(&mut self, now: Time, ok: bool) {
        self.kv.saved(now, ok);
        self.flush(now);
    }

    /// Starts writing `value` under `key` (`None` deletes it); the outcome comes as an
    /// [`Event::Kv`] carrying `tag`.
    pub fn kv_put(
        &mut self,
        now: Time,
        key: Bytes,
        value: Option<Bytes>,
        tag: u64,
    ) -> Result<(), KvError> {
        let started = self.kv.put(now, key, value, tag);
        self.flush(now);
        started
    }

    /// Starts reading `key`; the outcome comes as an [`Event::Kv`] carrying `tag`.
    pub fn kv_get(&mut self, now: Time, key: Bytes, tag: u64) -> Result<(), KvError> {
        let started = self.kv.get(now, key, tag);
        self.flush(now);
        started
    }

    /// The members of the cloud as this node knows them.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Sets the attributes this node announces to the cloud.
    pub fn set_attributes(&mut self, now: Time, attributes: Vec<(String, String)>) {
        if self.enabled.coordination {
            self.coordination.set_attributes(attributes.clone());
        }
        self.roster.set_attributes(now, attributes);
        self.flush(now);
    }

    /// Sets the service instances this node reports to the cloud.
    pub fn set_instances(&mut self, now: Time, instances: Vec<crate::instance::InstanceFact>) {
        if self.enabled.coordination {
            self.coordination.set_instances(&instances);
        }
        self.roster.set_instances(now, instances);
        self.flush(now);
    }

    /// Sets the versions of services this node refuses to run (over its owner's limits, or
    /// failing here): coordinators place them elsewhere.
    pub fn set_refusals(&mut self, now: Time, refusals: &[(String, u64)]) {
        self.coordination.set_refusals(refusals);
        self.flush(now);
    }

    /// What this node must run, per service (a service not listed runs nothing here), as its
    /// coordinators decided.
    pub fn tasks(&self) -> &BTreeMap<String, Task> {
        self.coordination.tasks()
    }

    /// The coordination layer: services coordinated here, with their plans, and the
    /// services this node reports.
    pub fn coordination(&self) -> &Coordination {
        &self.coordination
    }

    /// Sets how suite documents are read (the agent reads signed TOML descriptions).
    pub fn set_spec_reader(&mut self, reader: Box<dyn SpecReader>) {
        self.coordination.set_reader(reader);
    }

    /// Liveness: members known to be gone, probes in progress.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// The cloud's size as this node estimates it: from its ring neighbours' spacing, else
    /// from aggregation.
    pub fn size_estimate(&self, now: Time) -> Option<usize> {
        // A ring that seems to wrap around within fewer nodes than membership knows alive
        // only means this node has not met its ring neighbours yet.
        let from_ring = if self.enabled.ring && self.ring.is_settled(now) {
            // Counting the live ones checks each view member against the departures; an
            // estimate above the views' whole size needs no count (every large cloud).
            let views = self.membership.active().len() + self.membership.passive().len();
            self.ring
                .size_estimate(now)
                .filter(|&n| n > views || n > self.live_known())
        } else {
            None
        };
        from_ring.or_else(|| {
            self.aggregation
                .stats()
                .map(|stats| stats.size.round().clamp(1.0, 1e12) as usize)
        })
    }

    /// What the broadcast layer did since start.
    pub fn broadcast_counters(&self) -> crate::broadcast::BroadcastCounters {
        self.broadcast.counters()
    }

    /// The service suite.
    pub fn suite(&self) -> &Suite {
        &self.suite
    }

    /// The service suite, to restore, forget or confirm entries; what changes is reported
    /// (`Event::SuiteChanged`) after the next input.
    pub fn suite_mut(&mut self) -> &mut Suite {
        &mut self.suite
    }

    /// Sets the check every suite entry must pass (signatures, grants).
    pub fn set_suite_check(&mut self, check: Box<dyn SuiteCheck>) {
        self.suite.set_check(check);
    }

    /// Publishes a suite entry to the cloud: taken here, then broadcast. Returns false if the
    /// check refused it or a version at least as new is held.
    pub fn publish(&mut self, now: Time, entry: SuiteEntry) -> bool {
        let taken = self.offer_and_broadcast(now, entry);
        self.flush(now);
        taken
    }

    /// Takes a suite entry and broadcasts it, if the suite takes it.
    fn offer_and_broadcast(&mut self, now: Time, entry: SuiteEntry) -> bool {
        if !self.suite.offer(entry.clone()) {
            return false;
        }
        if let Ok(payload) = postcard::to_extend(&entry, vec![PAYLOAD_SUITE]) {
            // If the broadcast layer is full, anti-entropy still spreads the entry.
            let _ = self.broadcast_mut().broadcast(now, Bytes::from(payload));
        }
        true
    }

    /// Joins the overlay through one of `contacts`.
    pub fn join(&mut self, now: Time, contacts: &[Peer]) {
        self.membership.join(now, contacts);
        self.flush(now);
    }

    /// Leaves the overlay gracefully.
    pub fn leave(&mut self, now: Time) {
        self.roster.leave();
        self.publish_roster_news(now);
        self.liveness.leave();
        self.publish_liveness_news(now);
        self.membership.leave();
        self.flush(now);
    }

    /// Broadcasts `payload` to every node of the cloud.
    pub fn broadcast(&mut self, now: Time, payload: Bytes) -> Result<MessageId, BroadcastError> {
        let mut tagged = Vec::with_capacity(payload.len() + 1);
        tagged.push(PAYLOAD_APPLICATION);
        tagged.extend_from_slice(&payload);
        let id = self.broadcast_mut().broadcast(now, Bytes::from(tagged))?;
        self.flush(now);
        Ok(id)
    }

    /// Handles a message received from `from` (whose identity the transport authenticated).
    pub fn handle_message(&mut self, now: Time, from: Peer, message: Message) {
        if from.id == self.me.id {
            return;
        }
        let on = self.enabled;
        if on.liveness {
            self.liveness.heard_from(now, from);
        }
        match message {
            Message::Membership(m) => self.membership.handle_message(now, from, m),
            Message::Broadcast(m) => {
                self.membership.heard_on_link(now, from);
                self.broadcast_mut().handle_message(now, from, m);
            }
            Message::Aggregation(m) if on.aggregation => {
                self.aggregation.handle_message(now, from, m)
            }
            Message::Slicing(m) if on.slicing => self.slicing.handle_message(now, from, m),
            Message::Ring(m) if on.ring => self.ring.handle_message(now, from, m),
            Message::Kv(m) if on.kv => self.kv.handle_message(now, from, m),
            Message::Suite(m) if on.suite => self.suite.handle_message(from, m),
            Message::Roster(m) if on.roster => self.roster.handle_message(now, from, m),
            Message::Liveness(m) if on.liveness => self.liveness.handle_message(now, from, m),
            Message::Coordination(m) if on.coordination => {
                let liveness = &self.liveness;
                self.coordination
                    .handle_message(now, from, m, &self.ring, &|id| liveness.is_departed(id))
            }
            // A layer switched off here ignores its messages (the sender's is on).
            _ => {}
        }
        self.flush(now);
    }

    /// The transport could not reach `peer`.
    pub fn handle_peer_down(&mut self, now: Time, peer: NodeId) {
        // A neighbour lost this way is suspected through membership (`Departed`); any other
        // member the transport cannot reach is suspected here, so that a node cut off from
        // the cloud finds every member it knows gone, not only its neighbours.
        if self.enabled.liveness && !self.membership.active().contains(peer) {
            let known = self
                .membership
                .passive()
                .find(peer)
                .or_else(|| {
                    self.roster
                        .members()
                        .find(|m| m.announce.peer.id == peer)
                        .map(|m| m.announce.peer)
                })
                .or_else(|| self.coordination.peer(peer));
            if let Some(suspect) = known {
                self.suspect(now, suspect);
            }
        }
        self.membership.handle_peer_down(now, peer);
        if self.enabled.aggregation {
            self.aggregation.peer_down(peer);
        }
        if self.enabled.ring {
            self.ring.peer_down(now, peer);
        }
        if self.enabled.kv {
            self.kv.peer_down(now, peer);
        }
        if self.enabled.coordination {
            self.coordination.peer_down(now, peer);
        }
        self.flush(now);
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if self.membership.poll_timeout() <= now {
            self.membership.handle_timeout(now);
        }
        if self.broadcast_deadline <= now {
            self.broadcast_mut().handle_timeout(now);
        }
        let on = self.enabled;
        if on.aggregation && self.aggregation.poll_timeout() <= now {
            let peer = match self.aggregation.config().partners {
                Partners::Neighbours => self.membership.random_neighbor(),
                Partners::Known => self.membership.random_peer(),
            };
            self.aggregation.handle_timeout(now, peer);
            // The size estimate lets membership notice an overlay that split for good.
            let size = self.aggregation.stats().map(|stats| stats.size);
            self.membership.set_size_estimate(size);
        }
        if on.ring && self.ring.poll_timeout() <= now {
            // A neighbour: its link is open and watched, so the exchange costs no handshake.
            let random = self.membership.random_neighbor();
            self.ring.handle_timeout(now, random);
        }
        if on.kv && self.kv.poll_timeout() <= now {
            self.kv.handle_timeout(now, &self.ring);
        }
        if on.slicing && self.slicing.poll_timeout() <= now {
            // Each value goes out only a few times: spend them on live neighbours.
            let peer = self.membership.random_neighbor();
            self.slicing.handle_timeout(now, peer);
        }
        if on.roster && self.roster.poll_timeout() <= now {
            let neighbor = self.membership.random_neighbor();
            self.roster.handle_timeout(now, neighbor);
        }
        if on.suite && self.suite.poll_timeout() <= now {
            let neighbor = self.membership.random_neighbor();
            self.suite.handle_timeout(now, neighbor);
        }
        if on.liveness && self.liveness.poll_timeout() <= now {
            self.liveness.handle_timeout(now);
        }
        if on.coordination && self.coordination.poll_timeout() <= now {
            self.coordination.handle_timeout(now, &self.ring);
        }
        self.flush(now);
    }

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Time {
        let on = self.enabled;
        let optional = |enabled: bool, deadline: &dyn Fn() -> Time| {
            if enabled { deadline() } else { Time::MAX }
        };
        self.membership
            .poll_timeout()
            .min(self.broadcast_deadline)
            .min(optional(on.aggregation, &|| {
                self.aggregation.poll_timeout()
            }))
            .min(optional(on.slicing, &|| self.slicing.poll_timeout()))
            .min(optional(on.ring, &|| self.ring.poll_timeout()))
            .min(optional(on.kv, &|| self.kv.poll_timeout()))
            .min(optional(on.roster, &|| self.roster.poll_timeout()))
            .min(optional(on.suite, &|| self.suite.poll_timeout()))
            .min(optional(on.liveness, &|| self.liveness.poll_timeout()))
            .min(optional(on.coordination, &|| {
                self.coordination.poll_timeout()
            }))
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        pop_and_free_when_drained(&mut self.transmits)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        pop_and_free_when_drained(&mut self.events)
    }

    /// Moves the layers' outputs into the node's queues, routing membership changes to the
    /// broadcast layer first so that it never pushes to a former neighbour.
    fn flush(&mut self, now: Time) {
        let on = self.enabled;
        for event in self.membership.drain_events() {
            match event {
                MembershipEvent::NeighborUp(peer) => {
                    self.broadcast_touched = true;
                    self.broadcast.neighbor_up(now, peer);
                    if on.slicing {
                        self.slicing.neighbor_up(peer);
                    }
                    if on.ring {
                        self.ring.hear(now, peer);
                    }
                    if on.roster {
                        self.roster.neighbor_up(now, peer);
                    }
                    self.events.push_back(Event::NeighborUp(peer));
                }
                MembershipEvent::NeighborDown(peer) => {
                    self.broadcast_touched = true;
                    self.broadcast.neighbor_down(now, peer.id);
                    self.events.push_back(Event::NeighborDown(peer));
                }
                MembershipEvent::Departed(peer) => {
                    if on.slicing {
                        self.slicing.departed(now, peer.id);
                    }
                    if on.liveness {
                        self.suspect(now, peer);
                    }
                }
            }
        }
        // Roster news may answer a delivery (a refutation) and is itself broadcast, so
        // deliveries are sorted out before the broadcast layer's transmits are taken.
        let deliveries: Vec<Delivery> = if self.broadcast_touched {
            self.broadcast.drain_deliveries().collect()
        } else {
            Vec::new()
        };
        for mut delivery in deliveries {
            let Some((&kind, rest)) = delivery.payload.split_first() else {
                continue;
            };
            match kind {
                PAYLOAD_APPLICATION => {
                    delivery.payload = delivery.payload.slice(1..);
                    self.events.push_back(Event::Delivered(delivery));
                }
                PAYLOAD_ROSTER if on.roster => {
                    if let Ok(news) = postcard::from_bytes::<RosterNews>(rest)
                        && let Some(peer) = self.roster.handle_news(now, news)
                        && on.ring
                    {
                        // A node that just started knows few ring neighbours; the roster
                        // fills in the rest as soon as its news arrives, so that its first
                        // lookups already find the true owners of keys.
                        self.ring.hear_of(now, peer, delivery.born);
                    }
                }
                PAYLOAD_SUITE if on.suite => {
                    if let Some(entry) = SuiteEntry::decode_shared(&delivery.payload, 1) {
                        self.suite.offer(entry);
                    }
                }
                PAYLOAD_LIVENESS if on.liveness => {
                    if let Ok(news) = postcard::from_bytes::<LivenessNews>(rest) {
                        self.liveness.handle_news(now, news);
                    }
                }
                _ => {}
            }
        }
        if on.roster {
            self.publish_roster_news(now);
        }
        if on.liveness {
            self.flush_liveness(now);
        }
        if on.suite {
            self.note_suite_changes();
        }
        if on.coordination {
            self.flush_coordination(now);
            // Outcomes it recorded changed the suite.
            self.note_suite_changes();
        }
        self.transmits
            .extend(self.membership.drain_transmits().map(|(to, m)| Transmit {
                to,
                message: Message::Membership(m),
            }));
        if self.broadcast_touched {
            // Deliveries of what was broadcast during this flush (roster news) are collected
            // by the next one.
            self.broadcast_touched = self.broadcast.has_deliveries();
            self.transmits
                .extend(self.broadcast.drain_transmits().map(|(to, m)| Transmit {
                    to,
                    message: Message::Broadcast(m),
                }));
            self.broadcast_deadline = self.broadcast.poll_timeout();
        }
        if on.aggregation {
            self.transmits
                .extend(self.aggregation.drain_transmits().map(|(to, m)| Transmit {
                    to,
                    message: Message::Aggregation(m),
                }));
        }
        if on.slicing {
            self.transmits
                .extend(self.slicing.drain_transmits().map(|(to, m)| Transmit {
                    to,
                    message: Message::Slicing(m),
                }));
        }
        if on.ring || on.kv {
            self.flush_ring_and_kv(now);
        }
        if on.suite {
            self.transmits
                .extend(self.suite.drain_transmits().map(|(to, m)| Transmit {
                    to,
                    message: Message::Suite(m),
                }));
        }
        if on.roster {
            self.transmits
                .extend(self.roster.drain_transmits().map(|(to, m)| Transmit {
                    to,
                    message: Message::Roster(m),
                }));
        }
    }

    /// Moves the outputs of the ring and of the key-value store, which talk to each other.
    fn flush_ring_and_kv(&mut self, now: Time) {
        // Lookups of the key-value store go to the ring; their results come back to it, and
        // answering them locally may start more lookups.
        loop {
            // Until the ring has settled, lookups wait: its view would name wrong replicas.
            let lookups: Vec<(u64, Position)> = if self.ring.is_settled(now) {
                self.kv.drain_lookups().collect()
            } else {
                Vec::new()
            };
            for (op, position) in &lookups {
                if !self.ring.lookup(now, *position, KV_LOOKUP | op) {
                    self.kv.on_lookup(now, *op, &[], 0);
                }
            }
            let coordination: Vec<(u64, Position)> =
                if self.enabled.coordination && self.ring.is_settled(now) {
                    self.coordination.drain_lookups().collect()
                } else {
                    Vec::new()
                };
            for (tag, position) in &coordination {
                if !self.ring.lookup(now, *position, COORDINATION_LOOKUP | tag) {
                    self.coordination.on_lookup(now, *tag, &[]);
                }
            }
            let results: Vec<LookupResult> = self.ring.drain_results().collect();
            if lookups.is_empty() && coordination.is_empty() && results.is_empty() {
                break;
            }
            for result in results {
                match result.purpose {
                    LookupPurpose::External(tag) if tag & KV_LOOKUP != 0 => {
                        self.kv
                            .on_lookup(now, tag & !KV_LOOKUP, &result.replicas, result.hops);
                    }
                    LookupPurpose::External(tag) if tag & COORDINATION_LOOKUP != 0 => {
                        // Routing nodes may not have heard of a departure yet.
                        let live: Vec<Peer> = result
                            .replicas
                            .iter()
                            .filter(|p| !self.liveness.is_departed(p.id))
                            .copied()
                            .collect();
                        self.coordination
                            .on_lookup(now, tag & !COORDINATION_LOOKUP, &live);
                    }
                    _ => self.events.push_back(Event::Lookup(result)),
                }
            }
        }
        self.transmits
            .extend(self.ring.drain_transmits().map(|(to, m)| Transmit {
                to,
                message: Message::Ring(m),
            }));
        self.transmits
            .extend(self.kv.drain_transmits().map(|(to, m)| Transmit {
                to,
                message: Message::Kv(m),
            }));
        self.events.extend(self.kv.drain_outcomes().map(Event::Kv));
    }

    /// The broadcast layer, noted as touched so that the next flush collects its outputs.
    fn broadcast_mut(&mut self) -> &mut Broadcast {
        self.broadcast_touched = true;
        &mut self.broadcast
    }

    /// Nodes of the membership views not known to be gone.
    fn live_known(&self) -> usize {
        let membership = &self.membership;
        membership
            .active()
            .ids()
            .chain(membership.passive().ids())
            .filter(|id| !self.liveness.is_departed(*id))
            .count()
    }

    /// Tells coordination and the driver which suite keys changed.
    fn note_suite_changes(&mut self) {
        let coordination = self.enabled.coordination;
        for key in self.suite.drain_changed() {
            if coordination {
                self.coordination.suite_changed(&key);
            }
            self.events.push_back(Event::SuiteChanged(key));
        }
    }

    /// Broadcasts liveness news and routes its events to the layers above.
    fn flush_liveness(&mut self, now: Time) {
        self.publish_liveness_news(now);
        let on = self.enabled;
        let events: Vec<LivenessEvent> = self.liveness.drain_events().collect();
        for event in events {
            match event {
                LivenessEvent::Gone(id, left) => {
                    if on.ring {
                        self.ring.departed(now, id);
                    }
                    if on.roster {
                        self.roster.member_gone(now, id, left);
                    }
                    if on.kv {
                        self.kv.peer_down(now, id);
                    }
                    if on.coordination {
                        self.coordination.departed(id);
                    }
                    self.events.push_back(Event::MemberGone { id, left });
                }
                LivenessEvent::Back(id) => {
                    // Coordinators it takes back hand their services over when their rings
                    // see it; their reporters are told to look again.
                    if on.ring {
                        self.ring.revive(id);
                    }
                    if on.roster
                        && let Some(peer) = self.roster.member_back(now, id)
                        && on.ring
                    {
                        self.ring.hear(now, peer);
                    }
                    self.events.push_back(Event::MemberBack(id));
                }
            }
        }
        self.take_liveness_transmits();
    }

    /// Has liveness probe `peer`, directly and through neighbours as helpers.
    fn suspect(&mut self, now: Time, peer: Peer) {
        let wanted = self.liveness.helpers_wanted();
        let helpers = self.membership.helpers(wanted, peer.id);
        self.liveness.suspect(now, peer, &helpers);
    }

    /// Moves liveness's probes and answers to the transmits.
    fn take_liveness_transmits(&mut self) {
        self.transmits
            .extend(self.liveness.drain_transmits().map(|(to, m)| Transmit {
                to,
                message: Message::Liveness(m),
            }));
    }

    /// Broadcasts what liveness has to say.
    fn publish_liveness_news(&mut self, now: Time) {
        let news: Vec<LivenessNews> = self.liveness.drain_news().collect();
        for item in news {
            if let Ok(payload) = postcard::to_extend(&item, vec![PAYLOAD_LIVENESS]) {
                let payload = Bytes::from(payload);
                // A full broadcast store only delays the news: anti-entropy spreads it.
                let _ = match item.named_id() {
                    Some(named) => self.broadcast_mut().broadcast_named(now, named, payload),
                    None => self.broadcast_mut().broadcast(now, payload),
                };
            }
        }
    }

    /// Moves coordination's outputs: lookups go to the ring (next round of the ring's
    /// loop), recorded outcomes into the suite, messages out.
    fn flush_coordination(&mut self, now: Time) {
        // The estimate changes only with the ring's lists (or the aggregation's epoch, read
        // along when it is recomputed).
        let inputs = SizeInputs {
            ring: self.ring.changes(),
            settled: self.ring.is_settled(now),
            views: self.membership.view_changes(),
            departed: self.liveness.departed_changes(),
        };
        let size = match self.size_cache {
            Some((cached, size)) if cached == inputs => size,
            _ => {
                let size = self.size_estimate(now);
                self.size_cache = Some((inputs, size));
                size
            }
        };
        self.coordination.flush(now, &self.suite, &self.ring, size);
        let writes: Vec<SuiteEntry> = self.coordination.drain_writes().collect();
        for entry in writes {
            self.offer_and_broadcast(now, entry);
        }
        if self.enabled.liveness {
            let suspects: Vec<Peer> = self.coordination.drain_suspects().collect();
            for suspect in suspects {
                self.suspect(now, suspect);
            }
            // Liveness was flushed before coordination: its probes leave now, not with the
            // next input.
            self.take_liveness_transmits();
        }
        self.transmits
            .extend(self.coordination.drain_transmits().map(|(to, m)| Transmit {
                to,
                message: Message::Coordination(m),
            }));
        if self.coordination.take_tasks_changed() {
            self.events.push_back(Event::TasksChanged);
        }
    }

    /// Broadcasts what the roster has to say.
    fn publish_roster_news(&mut self, now: Time) {
        let news: Vec<RosterNews> = self.roster.drain_news().collect();
        for item in news {
            if let Ok(payload) = postcard::to_extend(&item, vec![PAYLOAD_ROSTER]) {
                // A full broadcast store only delays the news to the next announcement.
                let _ = self.broadcast_mut().broadcast(now, Bytes::from(payload));
            }
        }
    }
}
