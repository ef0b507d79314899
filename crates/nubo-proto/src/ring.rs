//! The structured overlay: nodes on a ring of 2¹²⁸ positions (their ids), each knowing its
//! successors, predecessors and fingers, so that any node can find the owner of any key in
//! about ½·log₂N hops (Chord, Stoica et al., SIGCOMM 2001).
//!
//! The ring is built and kept by gossip rather than by joins and Chord's careful protocol
//! ("Chord on demand", Montresor, Jelasity, Babaoglu 2005): every cycle a node sends its view
//! (successors, predecessors, fingers, and itself) to its first successor, which answers with
//! its own (Chord's stabilisation), and to a random neighbour of the membership layer, which
//! mixes views across the ring (T-Man); an answer carries only what the asker lacks or holds
//! much older. Each node keeps the closest nodes it has heard of on either side, and for each
//! finger the first node at or after its target. While its lists change, a node also swaps
//! views with one of its closest nodes and looks one finger up through the ring each cycle,
//! which makes fingers exact; once they stop changing its cycles slow down fourfold at a time
//! up to `interval_max`. Entries carry the time
//! since their node was last heard from directly; those not refreshed within `stale_after`
//! are dropped, so nodes that died fade from every view, and a node seen failing is refused for
//! a while even if others still mention it.
//!
//! Lookups are greedy: a node answers if the key falls between it and its successor (the
//! owner is the successor, the replicas its successors), else forwards to the closest node
//! preceding the key that it knows. A node that forwarded a lookup to a node that then proves
//! unreachable forwards it again around it; the origin retries a lookup that gets no answer.

use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::rng::Rng;
use crate::time::Time;

/// Most nodes in one view exchange.
pub const VIEW_MAX: usize = 64;
/// Most replicas a lookup answer carries.
pub const REPLICAS_MAX: usize = 16;
/// Most nodes a settling node sends its view to (past that, `settle_after` settles it).
const SETTLING_ASKS_MAX: usize = 16;

/// A position on the ring.
pub type Position = u128;

/// Clockwise distance from `a` to `b`.
pub fn distance(a: Position, b: Position) -> u128 {
    b.wrapping_sub(a)
}

/// Whether `x` lies in the half-open clockwise interval `(a, b]` (all of the ring if `a == b`).
pub fn in_interval(x: Position, a: Position, b: Position) -> bool {
    let span = distance(a, b);
    if span == 0 {
        return true;
    }
    let to_x = distance(a, x);
    to_x != 0 && to_x <= span
}

/// A node in a view, with how long ago someone heard from it directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewEntry {
    /// The node.
    pub peer: Peer,
    /// Milliseconds since the sender (or whom it heard from) heard from it directly.
    pub age_ms: u32,
}

/// Messages of the ring.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RingMessage {
    /// The sender's view; `answer` is false when the receiver should answer with its own.
    View {
        /// Nodes the sender knows, itself first.
        entries: Vec<ViewEntry>,
        /// Whether this answers a view.
        answer: bool,
    },
    /// Find the owner of `key` and answer `origin`.
    Lookup {
        /// Identifies the lookup at its origin.
        id: u64,
        /// Who asked.
        origin: Peer,
        /// The key's position.
        key: Position,
        /// Hops so far.
        hops: u8,
    },
    /// The owner of a key and the nodes after it, which hold its replicas.
    Found {
        /// The lookup answered.
        id: u64,
        /// The key.
        key: Position,
        /// Owner first, then its successors, with how long ago the answerer heard of each.
        replicas: Vec<ViewEntry>,
        /// Hops the lookup took.
        hops: u8,
    },
}

impl RingMessage {
    /// Whether the message respects its bounds.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            RingMessage::View { entries, .. } => entries.len() <= VIEW_MAX,
            RingMessage::Lookup { .. } => true,
            RingMessage::Found { replicas, .. } => replicas.len() <= REPLICAS_MAX,
        }
    }
}

/// Tuning of the ring.
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// Whether this node takes part.
    pub enabled: bool,
    /// Length of the successor (and predecessor) list; the most replicas a key can have.
    pub successors: usize,
    /// Period of view exchanges and finger lookups while the lists change.
    pub interval: Duration,
    /// Longest period once they stop changing: each cycle that changes nothing quadruples
    /// the period up to this, any change brings it back to `interval` (a quiet ring costs
    /// little; a newcomer or a departure is worked in at full speed).
    pub interval_max: Duration,
    /// A node not heard from (directly or through others) for this long is dropped.
    pub stale_after: Duration,
    /// A node seen failing is refused from others' views for this long.
    pub dead_for: Duration,
    /// A lookup with no answer within this time is retried.
    pub lookup_timeout: Duration,
    /// Attempts before a lookup fails.
    pub lookup_attempts: u8,
    /// Most lookups in progress (started here) and most forwarded lookups remembered.
    pub lookups_max: usize,
    /// Hops after which a lookup is dropped (a routing loop while the ring settles).
    pub hops_max: u8,
    /// A node whose closest nodes have not confirmed its view counts as settled anyway this
    /// long after it started (the first node of a cloud has no one to ask; see
    /// [`Ring::is_settled`]).
    pub settle_after: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            enabled: true,
            successors: 8,
            interval: Duration::from_secs(1),
            interval_max: Duration::from_secs(60),
            // Exchanges may be `interval_max` apart and fingers are refreshed one at a time,
            // so entries age slowly; departures reach the ring as news (`Ring::departed`).
            stale_after: Duration::from_secs(600),
            dead_for: Duration::from_secs(30),
            lookup_timeout: Duration::from_secs(2),
            lookup_attempts: 4,
            lookups_max: 4096,
            hops_max: 64,
            settle_after: Duration::from_secs(3),
        }
    }
}

/// Why a lookup was made; returned with its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LookupPurpose {
    /// Refreshing finger `k`.
    Finger(u8),
    /// Asked by another layer, with its own tag.
    External(u64),
}

/// The result of a lookup started here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupResult {
    /// Why it was made.
    pub purpose: LookupPurpose,
    /// The key.
    pub key: Position,
    /// Owner first, then its successors; empty if the lookup failed.
    pub replicas: Vec<Peer>,
    /// Hops the successful attempt took.
    pub hops: u8,
}

#[derive(Clone, Copy, Debug)]
struct Known {
    peer: Peer,
    heard: Time,
}

impl Known {
    /// News of the same node heard at `heard`. A restarted node may listen elsewhere: only
    /// news at least as fresh as ours may change its address, so that old gossip never sends
    /// us back to the old one.
    fn refresh(&mut self, peer: Peer, heard: Time) {
        if heard >= self.heard && peer.addr.is_some() {
            self.peer.addr = peer.addr;
        }
        self.heard = self.heard.max(heard);
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    purpose: LookupPurpose,
    key: Position,
    attempt: u8,
    deadline: Time,
}

#[derive(Clone, Copy, Debug)]
struct Forwarded {
    id: u64,
    origin: Peer,
    key: Position,
    hops: u8,
    to: NodeId,
    until: Time,
}

/// Counters of the ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// Lookups answered here (as owner's predecessor or owner).
    pub answered: u64,
    /// Lookups forwarded.
    pub forwarded: u64,
    /// Lookups re-forwarded around an unreachable hop.
    pub rerouted: u64,
    /// Lookup attempts that timed out at their origin.
    pub timeouts: u64,
    /// Lookups dropped (too many hops, nowhere to go).
    pub dropped: u64,
}

/// One node's place on the ring.
///
/// Contract: the owner calls [`Ring::handle_timeout`] no later than [`Ring::poll_timeout`] with
/// a random node from membership, passes ring messages to [`Ring::handle_message`] and
/// unreachable peers to [`Ring::peer_down`], and drains transmits and lookup results.
pub struct Ring {
    me: Peer,
    config: RingConfig,
    successors: Vec<Known>,
    predecessors: Vec<Known>,
    fingers: BTreeMap<u8, Known>,
    dead: BTreeMap<NodeId, Time>,
    pending: BTreeMap<u64, Pending>,
    forwarded: VecDeque<Forwarded>,
    next_id: u64,
    next_cycle: Time,
    /// The period of the next cycle (`interval` to `interval_max`).
    period: Duration,
    /// Counts changes of the lists, so that what is derived from them is computed once.
    changes: u64,
    /// The ids of the lists at the last cycle, to tell whether they changed.
    shape: u64,
    next_finger: u8,
    /// From when the node is settled: `settle_after` from its start, or earlier once its
    /// closest neighbours confirmed its view.
    settled_at: Time,
    /// While unsettled: nodes sent our view to settle, and whether each answered.
    settling: Vec<(NodeId, bool)>,
    counters: RingCounters,
    transmits: Vec<(Peer, RingMessage)>,
    results: Vec<LookupResult>,
    rng: Rng,
}

impl Ring {
    /// The ring state of node `me`, knowing no one yet.
    pub fn new(me: Peer, config: RingConfig, mut rng: Rng, now: Time) -> Ring {
        let offset = Duration::from_micros(rng.below(micros(config.interval).max(1)));
        Ring {
            me,
            successors: Vec::new(),
            predecessors: Vec::new(),
            fingers: BTreeMap::new(),
            dead: BTreeMap::new(),
            pending: BTreeMap::new(),
            forwarded: VecDeque::new(),
            next_id: now.as_micros(),
            next_cycle: now + offset,
            period: config.interval,
            changes: 0,
            shape: 0,
            next_finger: 127,
            settled_at: now + config.settle_after,
            settling: Vec::new(),
            counters: RingCounters::default(),
            transmits: Vec::new(),
            results: Vec::new(),
            rng,
            config,
        }
    }

    /// This node's position.
    pub fn position(&self) -> Position {
        self.me.id.0
    }

    /// Successors, closest first.
    pub fn successors(&self) -> impl Iterator<Item = Peer> + '_ {
        self.successors.iter().map(|k| k.peer)
    }

    /// Predecessors, closest first.
    pub fn predecessors(&self) -> impl Iterator<Item = Peer> + '_ {
        self.predecessors.iter().map(|k| k.peer)
    }

    /// The finger of index `k` (the first known node at or after `me + 2^k`).
    pub fn finger(&self, k: u8) -> Option<Peer> {
        self.fingers.get(&k).map(|f| f.peer)
    }

    /// What the ring did so far.
    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    /// Whether this node holds a replica of keys at `key`, as far as it knows: fewer than
    /// `replicas` of the nodes it knows lie between the key and itself. (With fewer than
    /// `replicas` predecessors known, it may claim more than it holds: safe, since holding a
    /// copy too many loses nothing.)
    pub fn is_replica(&self, key: Position, replicas: usize) -> bool {
        let mine = distance(key, self.position());
        let before = self
            .predecessors
            .iter()
            .filter(|p| distance(key, p.peer.id.0) < mine)
            .count();
        before < replicas
    }

    /// How many nodes the cloud has, as the spacing of this node's ring neighbours suggests:
    /// exact when the cloud is small enough for the lists to wrap around (or this node is
    /// alone), else the span from the farthest predecessor to the farthest successor known,
    /// spread evenly (within a few tens of percent). `None` while the lists are neither full
    /// nor known to wrap (a node still joining).
    pub fn size_estimate(&self, now: Time) -> Option<usize> {
        let listed = self.successors.len() + self.predecessors.len();
        let mut ids: Vec<NodeId> = self
            .successors()
            .chain(self.predecessors())
            .map(|p| p.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < listed || (listed == 0 && self.is_settled(now)) {
            return Some(ids.len() + 1);
        }
        let full = self.config.successors;
        if self.successors.len() < full || self.predecessors.len() < full {
            return None;
        }
        let first = self.predecessors.last()?.peer.id.0;
        let last = self.successors.last()?.peer.id.0;
        let span = distance(first, last) as f64;
        if span <= 0.0 {
            return None;
        }
        let estimate = listed as f64 * (u128::MAX as f64) / span;
        Some(estimate.clamp(1.0, 1e12) as usize)
    }

    /// The first `count` nodes at or after `key` that this node knows (itself included): the
    /// key's replicas, exact for keys close behind this node once its lists are right.
    pub fn replicas_of(&self, key: Position, count: usize) -> Vec<Peer> {
        let mut known: Vec<Peer> = core::iter::once(self.me)
            .chain(self.successors())
            .chain(self.predecessors())
            .collect();
        known.sort_by_key(|p| distance(key, p.id.0));
        known.dedup_by_key(|p| p.id);
        known.truncate(count);
        known
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, RingMessage)> {
        self.transmits.drain(..)
    }

    /// Results of lookups started here.
    pub fn drain_results(&mut self) -> std::vec::Drain<'_, LookupResult> {
        self.results.drain(..)
    }

    /// When the next cycle (or lookup deadline) comes.
    pub fn poll_timeout(&self) -> Time {
        if !self.config.enabled {
            return Time::MAX;
        }
        let deadline = self.pending.values().map(|p| p.deadline).min();
        deadline.map_or(self.next_cycle, |d| d.min(self.next_cycle))
    }

    /// Whether this node's view can be trusted to answer lookups. A node that just
    /// (re)started knows only the few nodes it joined through; answering from that view
    /// would name the wrong replicas (and a read would find nothing where the key is). So it
    /// stabilises at once, Chord's way but without waiting for cycles: it sends its view to
    /// its closest known successor and predecessor, learns from their answers of closer
    /// nodes, asks those in turn, and is settled when its first successor and first
    /// predecessor both answered and still are. A node that never gets there (the first node
    /// of a cloud, which has no one to ask) counts as settled after `settle_after`.
    pub fn is_settled(&self, now: Time) -> bool {
        now >= self.settled_at
    }

    /// Learns of `peer`, heard from directly now (a membership neighbour, say). An unsettled
    /// node sends it its view at once rather than at the next cycle, to settle sooner.
    pub fn hear(&mut self, now: Time, peer: Peer) {
        self.hear_of(now, peer, now);
        if self.config.enabled && !self.is_settled(now) {
            self.ask_to_settle(now, peer);
        }
    }

    /// Sends our view to `peer`, once, while settling.
    fn ask_to_settle(&mut self, now: Time, peer: Peer) {
        if peer.id == self.me.id
            || self.settling.iter().any(|(id, _)| *id == peer.id)
            || self.settling.len() >= SETTLING_ASKS_MAX
        {
            return;
        }
        self.settling.push((peer.id, false));
        let view = self.view(now);
        self.transmits.push((
            peer,
            RingMessage::View {
                entries: view,
                answer: false,
            },
        ));
    }

    /// `from` answered our view: settled if our closest nodes on both sides have answered,
    /// else ask whichever of them has not been asked yet.
    fn on_answer_while_settling(&mut self, now: Time, from: NodeId) {
        if let Some(asked) = self.settling.iter_mut().find(|(id, _)| *id == from) {
            asked.1 = true;
        }
        let closest: Vec<Peer> = [self.successors.first(), self.predecessors.first()]
            .into_iter()
            .flatten()
            .map(|k| k.peer)
            .collect();
        let answered = |id: NodeId| self.settling.iter().any(|&(a, yes)| a == id && yes);
        if !closest.is_empty() && closest.iter().all(|p| answered(p.id)) {
            self.settled_at = now;
            self.settling = Vec::new();
            return;
        }
        for peer in closest {
            self.ask_to_settle(now, peer);
        }
    }

    /// Learns of `peer`, which was alive at `heard` (it sent news then, say). News older than
    /// `stale_after` is ignored, like stale entries of views.
    pub fn hear_of(&mut self, now: Time, peer: Peer, heard: Time) {
        if self.config.enabled {
            self.consider(now, peer, heard.min(now));
        }
    }

    /// Starts a lookup of `key`; its result comes out of [`Ring::drain_results`] tagged with
    /// `tag`. Returns false when too many lookups are in progress.
    pub fn lookup(&mut self, now: Time, key: Position, tag: u64) -> bool {
        self.start_lookup(now, key, LookupPurpose::External(tag))
    }

    /// `peer` is unreachable: forget it for a while, and route around it.
    pub fn peer_down(&mut self, now: Time, peer: NodeId) {
        self.forget(peer);
        if self.dead.len() >= self.config.lookups_max {
            self.dead.pop_first();
        }
        self.dead.insert(peer, now + self.config.dead_for);
        let stuck: Vec<Forwarded> = self
            .forwarded
            .iter()
            .filter(|f| f.to == peer)
            .copied()
            .collect();
        self.forwarded.retain(|f| f.to != peer);
        for f in stuck {
            self.counters.rerouted += 1;
            self.route(now, f.id, f.origin, f.key, f.hops);
        }
    }

    /// `peer` is gone for good (liveness said so): it is dropped and kept out of views for
    /// `stale_after`, until [`Ring::revive`].
    pub fn departed(&mut self, now: Time, peer: NodeId) {
        self.peer_down(now, peer);
        self.dead.insert(
            peer,
            now + self.config.stale_after.max(self.config.dead_for),
        );
    }

    /// `peer`, thought gone, is alive: views may name it again.
    pub fn revive(&mut self, peer: NodeId) {
        self.dead.remove(&peer);
    }

    /// Runs a cycle (view exchanges, a finger lookup, expiry) and retries overdue lookups.
    pub fn handle_timeout(&mut self, now: Time, random: Option<Peer>) {
        if !self.config.enabled {
            return;
        }
        self.retry_overdue(now);
        if now < self.next_cycle {
            return;
        }
        self.expire(now);
        // Quiet rings slow down: a cycle that finds the lists as the last one left them
        // quadruples the period.
        let shape = self.shape();
        self.period = if shape == self.shape {
            (self.period * 4).min(self.config.interval_max.max(self.config.interval))
        } else {
            self.config.interval
        };
        let changing = self.period == self.config.interval;
        self.shape = shape;
        self.next_cycle = now + self.period;
        let view = self.view(now);
        if let Some(successor) = self.successors.first().map(|k| k.peer) {
            self.transmits.push((
                successor,
                RingMessage::View {
                    entries: view.clone(),
                    answer: false,
                },
            ));
        }
        // While the lists change, T-Man: one of the nodes closest to us, whose lists overlap
        // ours the most. A quiet ring keeps only the exchange with the successor (which finds
        // a departure or a newcomer next to us) and the random one (which finds the rest).
        let close = self.successors.len() + self.predecessors.len();
        if changing && close > 1 {
            let pick = self.rng.index(close);
            let peer = self
                .successors
                .iter()
                .chain(&self.predecessors)
                .nth(pick)
                .map(|k| k.peer);
            if let Some(peer) =
                peer.filter(|p| Some(p.id) != self.successors.first().map(|k| k.peer.id))
            {
                self.transmits.push((
                    peer,
                    RingMessage::View {
                        entries: view.clone(),
                        answer: false,
                    },
                ));
            }
        }
        if let Some(random) = random.filter(|p| p.id != self.me.id) {
            self.transmits.push((
                random,
                RingMessage::View {
                    entries: view,
                    answer: false,
                },
            ));
        }
        // Fingers are looked up while the ring changes; a quiet ring's views keep them fresh.
        if changing {
            self.refresh_a_finger(now);
        }
    }

    /// Handles a ring message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: RingMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        self.consider(now, from, now);
        match message {
            RingMessage::View { entries, answer } => {
                for entry in &entries {
                    self.consider(now, entry.peer, heard_at(now, entry.age_ms));
                }
                if answer {
                    if !self.is_settled(now) {
                        self.on_answer_while_settling(now, from.id);
                    }
                } else {
                    let entries = self.answer_to(now, &entries);
                    self.transmits.push((
                        from,
                        RingMessage::View {
                            entries,
                            answer: true,
                        },
                    ));
                }
            }
            RingMessage::Lookup {
                id,
                origin,
                key,
                hops,
            } => self.route(now, id, origin, key, hops),
            RingMessage::Found {
                id,
                key,
                replicas,
                hops,
            } => self.on_found(now, id, key, replicas, hops),
        }
    }

    fn on_found(&mut self, now: Time, id: u64, key: Position, entries: Vec<ViewEntry>, hops: u8) {
        // Ages travel with the answer, so that a dead node an answerer still lists is not
        // made to look alive again here.
        for entry in &entries {
            self.consider(now, entry.peer, heard_at(now, entry.age_ms));
        }
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        if pending.key != key {
            return;
        }
        if let LookupPurpose::Finger(k) = pending.purpose
            && let Some(owner) = entries.first()
            && !self.dead.contains_key(&owner.peer.id)
            && owner.peer.id != self.me.id
        {
            self.fingers.insert(
                k,
                Known {
                    peer: owner.peer,
                    heard: heard_at(now, owner.age_ms),
                },
            );
            return;
        }
        let replicas = entries.iter().map(|e| e.peer).collect();
        self.results.push(LookupResult {
            purpose: pending.purpose,
            key,
            replicas,
            hops,
        });
    }

    /// Answers, or forwards towards the owner of `key`, a lookup from `origin`.
    fn route(&mut self, now: Time, id: u64, origin: Peer, key: Position, hops: u8) {
        let me = self.position();
        // The owner itself: the key falls after our closest predecessor.
        if let Some(predecessor) = self.predecessors.first()
            && in_interval(key, predecessor.peer.id.0, me)
        {
            let replicas = self.aged(now, REPLICAS_MAX - 1);
            self.answer(now, origin, id, key, replicas, hops);
            return;
        }
        // The owner is our successor.
        if let Some(successor) = self.successors.first()
            && in_interval(key, me, successor.peer.id.0)
        {
            let replicas = self.aged(now, REPLICAS_MAX).split_off(1);
            self.answer(now, origin, id, key, replicas, hops);
            return;
        }
        if self.successors.is_empty() {
            // Alone (as far as we know): we own everything.
            let replicas = self.aged(now, 0);
            self.answer(now, origin, id, key, replicas, hops);
            return;
        }
        if hops >= self.config.hops_max {
            self.counters.dropped += 1;
            return;
        }
        let Some(next) = self.closest_preceding(key) else {
            self.counters.dropped += 1;
            return;
        };
        self.counters.forwarded += 1;
        if self.forwarded.len() >= self.config.lookups_max {
            self.forwarded.pop_front();
        }
        self.forwarded.push_back(Forwarded {
            id,
            origin,
            key,
            hops,
            to: next.id,
            until: now + self.config.lookup_timeout,
        });
        self.transmits.push((
            next,
            RingMessage::Lookup {
                id,
                origin,
                key,
                hops: hops.saturating_add(1),
            },
        ));
    }

    fn answer(
        &mut self,
        now: Time,
        origin: Peer,
        id: u64,
        key: Position,
        replicas: Vec<ViewEntry>,
        hops: u8,
    ) {
        self.counters.answered += 1;
        if origin.id == self.me.id {
            self.on_found(now, id, key, replicas, hops);
        } else {
            let found = RingMessage::Found {
                id,
                key,
                replicas,
                hops,
            };
            self.transmits.push((origin, found));
        }
    }

    /// The known node closest before `key` (clockwise from us), other than us.
    fn closest_preceding(&self, key: Position) -> Option<Peer> {
        let me = self.position();
        let limit = distance(me, key);
        self.successors
            .iter()
            .chain(self.fingers.values())
            .chain(&self.predecessors)
            .map(|k| k.peer)
            .filter(|p| {
                let d = distance(me, p.id.0);
                d != 0 && d < limit
            })
            .max_by_key(|p| distance(me, p.id.0))
    }

    fn start_lookup(&mut self, now: Time, key: Position, purpose: LookupPurpose) -> bool {
        if self.pending.len() >= self.config.lookups_max {
            return false;
        }
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.pending.insert(
            id,
            Pending {
                purpose,
                key,
                attempt: 1,
                deadline: now + self.config.lookup_timeout,
            },
        );
        let me = self.me;
        self.route(now, id, me, key, 0);
        true
    }

    fn retry_overdue(&mut self, now: Time) {
        let overdue: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let Some(mut pending) = self.pending.remove(&id) else {
                continue;
            };
            self.counters.timeouts += 1;
            if pending.attempt >= self.config.lookup_attempts {
                if let LookupPurpose::External(_) = pending.purpose {
                    self.results.push(LookupResult {
                        purpose: pending.purpose,
                        key: pending.key,
                        replicas: Vec::new(),
                        hops: 0,
                    });
                }
                continue;
            }
            pending.attempt += 1;
            pending.deadline = now + self.config.lookup_timeout;
            self.next_id = self.next_id.wrapping_add(1);
            let new_id = self.next_id;
            let key = pending.key;
            self.pending.insert(new_id, pending);
            let me = self.me;
            self.route(now, new_id, me, key, 0);
        }
        let before = now;
        self.forwarded.retain(|f| f.until > before);
    }

    /// Looks up the next finger whose target lies beyond our successors.
    fn refresh_a_finger(&mut self, now: Time) {
        if self.successors.is_empty() {
            return;
        }
        let lowest = self.lowest_finger();
        let k = if self.next_finger < lowest || self.next_finger > 127 {
            127
        } else {
            self.next_finger
        };
        self.next_finger = if k <= lowest { 127 } else { k - 1 };
        let target = self.position().wrapping_add(1u128 << k);
        self.start_lookup(now, target, LookupPurpose::Finger(k));
        // Fingers that fell below the reach are not needed any more.
        self.fingers.retain(|&f, _| f >= lowest);
    }

    /// Takes `peer`, last heard from at `heard`, into account for every list it may improve.
    /// News already stale is ignored: passing it on would keep dead nodes in views forever.
    fn consider(&mut self, now: Time, peer: Peer, heard: Time) {
        if peer.id == self.me.id
            || self.dead.contains_key(&peer.id)
            || heard < now.saturating_sub(self.config.stale_after)
        {
            return;
        }
        let me = self.position();
        let r = self.config.successors;
        let inserted = insert_sorted(&mut self.successors, peer, heard, r, |p| distance(me, p))
            | insert_sorted(&mut self.predecessors, peer, heard, r, |p| distance(p, me));
        if inserted {
            self.hurry();
        }
        // Every finger this node improves: the first known node at or after its target.
        let lowest = self.lowest_finger();
        for k in lowest..=127u8 {
            let target = me.wrapping_add(1u128 << k);
            let candidate = distance(target, peer.id.0);
            match self.fingers.get_mut(&k) {
                Some(finger) if finger.peer.id == peer.id => finger.refresh(peer, heard),
                Some(finger) if candidate < distance(target, finger.peer.id.0) => {
                    *finger = Known { peer, heard };
                }
                Some(_) => {}
                None => {
                    let best = self.best_known_from(target, Known { peer, heard });
                    self.fingers.insert(k, best);
                }
            }
        }
    }

    /// The known node first at or after `target`: `candidate` or one already listed.
    fn best_known_from(&self, target: Position, candidate: Known) -> Known {
        self.successors
            .iter()
            .chain(&self.predecessors)
            .chain(self.fingers.values())
            .copied()
            .chain([candidate])
            .min_by_key(|k| distance(target, k.peer.id.0))
            .unwrap_or(candidate)
    }

    /// The lowest finger index worth keeping: targets closer than our last successor are
    /// covered by the successor list.
    fn lowest_finger(&self) -> u8 {
        let reach = self
            .successors
            .last()
            .map_or(0, |last| distance(self.position(), last.peer.id.0));
        (128 - reach.leading_zeros()).min(127) as u8
    }

    fn forget(&mut self, peer: NodeId) {
        let before = self.successors.len() + self.predecessors.len();
        self.successors.retain(|k| k.peer.id != peer);
        self.predecessors.retain(|k| k.peer.id != peer);
        self.fingers.retain(|_, k| k.peer.id != peer);
        if self.successors.len() + self.predecessors.len() != before {
            self.hurry();
        }
    }

    /// A number that grows whenever the successor or predecessor lists change.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The lists changed: work it in at full speed.
    fn hurry(&mut self) {
        self.changes = self.changes.wrapping_add(1);
        self.period = self.config.interval;
        // (Equal to the scheduled cycle when the period never grows.)
        let soon = self.next_cycle.min(self.last_cycle_plus_interval());
        self.next_cycle = soon;
    }

    /// When the next cycle would come if the period were `interval`.
    fn last_cycle_plus_interval(&self) -> Time {
        self.next_cycle.saturating_sub(self.period) + self.config.interval
    }

    /// A fingerprint of the ids in the lists.
    fn shape(&self) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for known in self
            .successors
            .iter()
            .chain(&self.predecessors)
            .chain(self.fingers.values())
        {
            for byte in known.peer.id.0.to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    }

    fn expire(&mut self, now: Time) {
        let oldest = now.saturating_sub(self.config.stale_after);
        let before = self.successors.len() + self.predecessors.len();
        self.successors.retain(|k| k.heard >= oldest);
        self.predecessors.retain(|k| k.heard >= oldest);
        if self.successors.len() + self.predecessors.len() != before {
            self.changes = self.changes.wrapping_add(1);
        }
        self.fingers.retain(|_, k| k.heard >= oldest);
        self.dead.retain(|_, until| *until > now);
    }

    /// Ourselves, then up to `successors` of our successors, with ages.
    fn aged(&self, now: Time, successors: usize) -> Vec<ViewEntry> {
        let mut entries = vec![ViewEntry {
            peer: self.me,
            age_ms: 0,
        }];
        entries.extend(self.successors.iter().take(successors).map(|k| ViewEntry {
            peer: k.peer,
            age_ms: age_ms(now, k.heard),
        }));
        entries
    }

    /// Our answer to a view `theirs`: ourselves, then the entries of our view that its sender
    /// lacks or holds much older (by more than a quarter of `stale_after`). A quiet ring's
    /// exchanges then carry a few entries instead of the whole view both ways, and what the
    /// sender holds still never grows stale.
    fn answer_to(&self, now: Time, theirs: &[ViewEntry]) -> Vec<ViewEntry> {
        let slack = u32::try_from((self.config.stale_after / 4).as_millis()).unwrap_or(u32::MAX);
        let mut view = self.view(now);
        let mut index = 0;
        view.retain(|entry| {
            index += 1;
            index == 1
                || theirs
                    .iter()
                    .find(|t| t.peer.id == entry.peer.id)
                    .is_none_or(|t| t.age_ms.saturating_sub(entry.age_ms) > slack)
        });
        view
    }

    /// What we tell others: ourselves, then our lists, with ages.
    pub fn view(&self, now: Time) -> Vec<ViewEntry> {
        let mut entries = vec![ViewEntry {
            peer: self.me,
            age_ms: 0,
        }];
        for known in self
            .successors
            .iter()
            .chain(&self.predecessors)
            .chain(self.fingers.values())
        {
            if entries.len() >= VIEW_MAX {
                break;
            }
            if !entries.iter().any(|e| e.peer.id == known.peer.id) {
                entries.push(ViewEntry {
                    peer: known.peer,
                    age_ms: age_ms(now, known.heard),
                });
            }
        }
        entries
    }
}

/// Inserts or refreshes `peer` in `list`, kept sorted by `key` and at most `max` long.
fn insert_sorted(
    list: &mut Vec<Known>,
    peer: Peer,
    heard: Time,
    max: usize,
    key: impl Fn(Position) -> u128,
) -> bool {
    if let Some(known) = list.iter_mut().find(|k| k.peer.id == peer.id) {
        known.refresh(peer, heard);
        return false;
    }
    let d = key(peer.id.0);
    let at = list.partition_point(|k| key(k.peer.id.0) < d);
    if at >= max {
        return false;
    }
    list.insert(at, Known { peer, heard });
    list.truncate(max);
    true
}

/// Milliseconds from `heard` to `now`, saturated.
fn age_ms(now: Time, heard: Time) -> u32 {
    u32::try_from(now.saturating_since(heard).as_millis()).unwrap_or(u32::MAX)
}

/// When something heard `age_ms` milliseconds before `now` was heard.
fn heard_at(now: Time, age_ms: u32) -> Time {
    now.saturating_sub(Duration::from_millis(u64::from(age_ms)))
}

fn micros(span: Duration) -> u64 {
    u64::try_from(span.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node at ring position `k`/256 of the way round.
    fn peer(k: u128) -> Peer {
        Peer::new(NodeId(k << 120))
    }

    /// A settled node that knows `knows`.
    fn ring(me: u128, knows: &[u128]) -> Ring {
        let config = RingConfig {
            successors: 3,
            settle_after: Duration::ZERO,
            stale_after: Duration::from_secs(20),
            ..RingConfig::default()
        };
        let mut ring = Ring::new(peer(me), config, Rng::from_seed(1), Time::ZERO);
        for &k in knows {
            ring.hear(Time::ZERO, peer(k));
        }
        ring
    }

    fn ids(peers: impl Iterator<Item = Peer>) -> Vec<u128> {
        peers.map(|p| p.id.0 >> 120).collect()
    }

    #[test]
    fn a_new_node_stabilises_at_once_until_its_closest_nodes_confirm_its_view() {
        let config = RingConfig {
            successors: 3,
            ..RingConfig::default()
        };
        let mut ring = Ring::new(peer(100), config, Rng::from_seed(1), Time::ZERO);
        let now = Time::from_millis(5);
        assert!(!ring.is_settled(now));
        ring.hear(now, peer(110));
        let me = ViewEntry {
            peer: peer(100),
            age_ms: 0,
        };
        let known = ViewEntry {
            peer: peer(110),
            age_ms: 0,
        };
        assert_eq!(
            ring.drain_transmits().collect::<Vec<_>>(),
            vec![(
                peer(110),
                RingMessage::View {
                    entries: vec![me, known],
                    answer: false
                }
            )]
        );
        // A view sent to it settles nothing (it answers, and now knows 120).
        let later = Time::from_millis(20);
        let answer = |entries: Vec<ViewEntry>| RingMessage::View {
            entries,
            answer: true,
        };
        ring.handle_message(
            later,
            peer(120),
            RingMessage::View {
                entries: vec![],
                answer: false,
            },
        );
        ring.drain_transmits().for_each(drop);
        assert!(!ring.is_settled(later));
        // 110 answers with a node closer than itself: 105 is now the first successor, and
        // 120 the first predecessor (the ring wraps); neither has confirmed, so both are asked.
        let closer = ViewEntry {
            peer: peer(105),
            age_ms: 0,
        };
        ring.handle_message(later, peer(110), answer(vec![closer]));
        assert!(!ring.is_settled(later));
        assert_eq!(ids(ring.successors()), vec![105, 110, 120]);
        let asked: Vec<u128> = ring
            .drain_transmits()
            .map(|(to, _)| to.id.0 >> 120)
            .collect();
        assert_eq!(asked, vec![105, 120]);
        // Settled once both closest nodes answered.
        ring.handle_message(later, peer(105), answer(vec![]));
        assert!(!ring.is_settled(later));
        assert_eq!(ring.drain_transmits().count(), 0);
        ring.handle_message(later, peer(120), answer(vec![]));
        assert!(ring.is_settled(later));
        // Once settled, news of a neighbour sends nothing out of cycle.
        ring.hear(later, peer(130));
        assert_eq!(ring.drain_transmits().count(), 0);
        // A node alone settles anyway after `settle_after`.
        let alone = Ring::new(
            peer(1),
            RingConfig::default(),
            Rng::from_seed(1),
            Time::ZERO,
        );
        assert!(!alone.is_settled(Time::from_millis(2_999)));
        assert!(alone.is_settled(Time::from_secs(3)));
    }

    #[test]
    fn a_restarted_node_s_new_address_is_not_undone_by_older_news() {
        let mut ring = ring(100, &[]);
        let old = Peer {
            addr: Some("127.0.0.1:1000".parse().unwrap()),
            ..peer(110)
        };
        let new = Peer {
            addr: Some("127.0.0.1:2000".parse().unwrap()),
            ..peer(110)
        };
        let now = Time::from_secs(10);
        ring.hear(now, new);
        ring.hear_of(now, old, Time::from_secs(9));
        assert_eq!(ring.successors().next(), Some(new));
        ring.hear_of(now, old, now);
        assert_eq!(ring.successors().next(), Some(old));
    }

    #[test]
    fn intervals_wrap_around_the_ring() {
        assert!(in_interval(5, 1, 10));
        assert!(in_interval(10, 1, 10));
        assert!(!in_interval(1, 1, 10));
        assert!(!in_interval(11, 1, 10));
        assert!(in_interval(u128::MAX, 10, 1));
        assert!(in_interval(0, 10, 1));
        assert!(!in_interval(5, 10, 1));
        assert!(in_interval(7, 3, 3), "a == b covers the whole ring");
    }

    #[test]
    fn keeps_the_closest_nodes_on_each_side() {
        let ring = ring(100, &[10, 250, 120, 90, 110, 95, 130, 200]);
        assert_eq!(ids(ring.successors()), vec![110, 120, 130]);
        assert_eq!(ids(ring.predecessors()), vec![95, 90, 10]);
        // Finger 127 targets the opposite side of the ring: position 228.
        assert_eq!(ring.finger(127).map(|p| p.id.0 >> 120), Some(250));
        // Finger 126 targets 164: the first node at or after it is 200.
        assert_eq!(ring.finger(126).map(|p| p.id.0 >> 120), Some(200));
    }

    #[test]
    fn forwards_a_lookup_to_the_closest_node_before_the_key() {
        let mut ring = ring(100, &[110, 120, 130, 200, 250, 90]);
        let origin = peer(7);
        let key = 210u128 << 120;
        ring.handle_message(
            Time::ZERO,
            origin,
            RingMessage::Lookup {
                id: 9,
                origin,
                key,
                hops: 2,
            },
        );
        let sent: Vec<_> = ring.drain_transmits().collect();
        assert_eq!(
            sent,
            vec![(
                peer(200),
                RingMessage::Lookup {
                    id: 9,
                    origin,
                    key,
                    hops: 3
                }
            )]
        );
        assert_eq!(ring.counters().forwarded, 1);
    }

    #[test]
    fn answers_with_the_successors_when_the_key_is_just_ahead() {
        let mut ring = ring(100, &[110, 120, 130, 90]);
        let origin = peer(7);
        let key = (105u128 << 120) + 1;
        ring.handle_message(
            Time::from_secs(1),
            origin,
            RingMessage::Lookup {
                id: 4,
                origin,
                key,
                hops: 1,
            },
        );
        let sent: Vec<_> = ring.drain_transmits().collect();
        let [
            (
                to,
                RingMessage::Found {
                    id, replicas, hops, ..
                },
            ),
        ] = &sent[..]
        else {
            panic!("expected one answer, got {sent:?}");
        };
        assert_eq!((to.id, *id, *hops), (origin.id, 4, 1));
        assert_eq!(ids(replicas.iter().map(|e| e.peer)), vec![110, 120, 130]);
        assert!(replicas.iter().all(|e| e.age_ms == 1000));
    }

    #[test]
    fn the_owner_answers_with_itself_first() {
        let mut ring = ring(100, &[110, 120, 90]);
        assert!(ring.lookup(Time::ZERO, 95u128 << 120 | 1, 77));
        assert_eq!(ring.drain_transmits().count(), 0);
        let results: Vec<_> = ring.drain_results().collect();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].purpose, LookupPurpose::External(77));
        // With three other nodes in the whole ring, all are successors.
        assert_eq!(
            ids(results[0].replicas.iter().copied()),
            vec![100, 110, 120, 90]
        );
    }

    #[test]
    fn reroutes_around_a_hop_that_proves_unreachable() {
        let mut ring = ring(100, &[110, 120, 130, 200, 250, 90]);
        let origin = peer(7);
        let key = 210u128 << 120;
        let lookup = RingMessage::Lookup {
            id: 1,
            origin,
            key,
            hops: 0,
        };
        ring.handle_message(Time::ZERO, origin, lookup);
        ring.drain_transmits().for_each(drop);
        ring.peer_down(Time::from_millis(10), peer(200).id);
        let sent: Vec<_> = ring.drain_transmits().collect();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, peer(130), "the next closest node before the key");
        assert_eq!(ring.counters().rerouted, 1);
        // The dead node is refused while others still mention it.
        ring.hear(Time::from_millis(20), peer(200));
        assert!(!ring.successors().any(|p| p == peer(200)));
        assert!((0..128).all(|k| ring.finger(k) != Some(peer(200))));
    }

    #[test]
    fn a_lookup_without_answer_is_retried_then_fails_empty() {
        let config = RingConfig {
            lookup_attempts: 2,
            lookup_timeout: Duration::from_secs(1),
            interval: Duration::from_secs(100),
            settle_after: Duration::ZERO,
            ..RingConfig::default()
        };
        let mut ring = Ring::new(peer(100), config, Rng::from_seed(1), Time::ZERO);
        ring.hear(Time::ZERO, peer(110));
        ring.hear(Time::ZERO, peer(200));
        // Owned by 200; 110 is the closest node before it.
        assert!(ring.lookup(Time::ZERO, 150u128 << 120, 5));
        assert_eq!(ring.drain_transmits().count(), 1);
        assert_eq!(
            ring.poll_timeout().min(Time::from_secs(1)),
            Time::from_secs(1)
        );
        ring.handle_timeout(Time::from_secs(1), None);
        let retried: Vec<_> = ring.drain_transmits().collect();
        assert!(
            retried
                .iter()
                .any(|(to, m)| *to == peer(110) && matches!(m, RingMessage::Lookup { .. }))
        );
        assert_eq!(ring.drain_results().count(), 0);
        ring.handle_timeout(Time::from_secs(2), None);
        let results: Vec<_> = ring.drain_results().collect();
        assert_eq!(results.len(), 1);
        assert!(results[0].replicas.is_empty());
        assert_eq!(ring.counters().timeouts, 2);
    }

    #[test]
    fn stale_news_is_ignored_and_silent_nodes_expire() {
        let mut ring = ring(100, &[110]);
        let stale = ViewEntry {
            peer: peer(105),
            age_ms: 60_000,
        };
        ring.handle_message(
            Time::from_secs(100),
            peer(110),
            RingMessage::View {
                entries: vec![stale],
                answer: true,
            },
        );
        assert_eq!(ids(ring.successors()), vec![110]);
        // News told by others counts from when it was sent: old news is ignored too.
        let now = Time::from_secs(100);
        ring.hear_of(now, peer(104), now.saturating_sub(Duration::from_secs(21)));
        ring.hear_of(now, peer(103), now.saturating_sub(Duration::from_secs(19)));
        assert_eq!(ids(ring.successors()), vec![103, 110]);
        // 110 is never heard from again: after `stale_after` it is gone.
        ring.handle_timeout(Time::from_secs(130), None);
        assert_eq!(ring.successors().count(), 0);
    }

    #[test]
    fn a_view_is_answered_with_what_its_sender_lacks_or_holds_much_older() {
        // stale_after is 20 s: an entry the sender holds more than 5 s older is sent again.
        let mut ring = ring(100, &[110, 120, 90]);
        let now = Time::ZERO;
        let entry = |k: u128, age_ms: u32| ViewEntry {
            peer: peer(k),
            age_ms,
        };
        // The sender (80) knows 110 as fresh, 120 as 6 s old, and 90 not at all.
        ring.handle_message(
            now,
            peer(80),
            RingMessage::View {
                entries: vec![entry(80, 0), entry(110, 1_000), entry(120, 6_000)],
                answer: false,
            },
        );
        let sent: Vec<(u128, Vec<u128>)> = ring
            .drain_transmits()
            .map(|(to, m)| match m {
                RingMessage::View { entries, answer } => {
                    assert!(answer);
                    (
                        to.id.0 >> 120,
                        entries.iter().map(|e| e.peer.id.0 >> 120).collect(),
                    )
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sent, vec![(80, vec![100, 120, 90])]);
    }

    #[test]
    fn replicas_are_the_first_nodes_after_the_key() {
        let ring = ring(100, &[90, 80, 70, 110]);
        // Keys just after 90 are owned by 100: a replica with any count.
        assert!(ring.is_replica(91u128 << 120, 1));
        // Keys after 80 are owned by 90, then 100 holds the second copy.
        assert!(!ring.is_replica(81u128 << 120, 1));
        assert!(ring.is_replica(81u128 << 120, 2));
        // Keys after 70: 80, 90, then 100.
        assert!(!ring.is_replica(71u128 << 120, 2));
        assert!(ring.is_replica(71u128 << 120, 3));
    }
}
