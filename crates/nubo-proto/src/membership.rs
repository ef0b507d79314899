//! Overlay membership: HyParView (Leitão, Pereira, Rodrigues, DSN 2007 / TR-07-13).
//!
//! Each node keeps a small symmetric *active view* (its neighbours in the overlay, over which
//! broadcasts travel) and a larger *passive view* (a reserve of known nodes). The active view
//! changes reactively: a failed neighbour is replaced from the passive view at once. The passive
//! view is refreshed by periodic shuffles along random walks.
//!
//! Beyond the paper, three mechanisms make the overlay self-repair on a real network:
//! - probes in turn: every `probe_interval` a node pings the next neighbour it has exchanged
//!   no ping or pong with for a whole round (one interval per neighbour), and a neighbour that
//!   does not answer within `probe_timeout` is treated as failed, which also covers silent
//!   partitions where no transport error ever arrives. A ping received counts as an exchange,
//!   so the two ends of a link settle into one exchange per round between them: SWIM's one
//!   probe per node per interval rather than a keepalive on every link;
//! - symmetry repair: a ping from a node that is not our neighbour is answered with
//!   `Disconnect`, so a lost message never leaves a one-sided link for long;
//! - reconnection: neighbours lost to failure are remembered (bounded) and retried with
//!   exponential backoff at high priority, so two sides of a healed partition join again.
//!
//! And one for cost: a shuffle's reply travels back along the walk, hop by hop over links
//! that are open, instead of straight to the origin (on QUIC, a new connection's handshake
//! costs more than the whole walk).

use core::time::Duration;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::rng::Rng;
use crate::time::Time;
use crate::view::PeerView;

/// Most peers a shuffle may carry; longer lists are rejected by the decoder.
pub const SHUFFLE_PEERS_MAX: usize = 64;
/// Most hops a shuffle's way back may list (walks are at most this long).
pub const SHUFFLE_ROUTE_MAX: usize = 16;

/// Tuning of the membership protocol. Defaults suit a real cloud of up to ~10⁵ nodes.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Largest active view (the paper's `log10(N) + 1`; 5 for 10⁴ nodes).
    pub active_max: usize,
    /// Largest passive view (about 6 × `active_max`).
    pub passive_max: usize,
    /// Active random walk length (ARWL): how far a join spreads.
    pub active_walk_length: u8,
    /// Passive random walk length (PRWL): at which hop a join is recorded in a passive view.
    pub passive_walk_length: u8,
    /// Active-view entries sent in a shuffle (`ka`).
    pub shuffle_active: usize,
    /// Passive-view entries sent in a shuffle (`kp`).
    pub shuffle_passive: usize,
    /// Hops a shuffle travels before it is answered.
    pub shuffle_walk_length: u8,
    /// Period of passive-view shuffles (one "cycle").
    pub shuffle_interval: Duration,
    /// Period of housekeeping: probes, timeouts, refilling the active view, reconnections.
    pub maintain_interval: Duration,
    /// Every this long, the next neighbour that exchanged no ping or pong with us for a whole
    /// round (this interval times the number of neighbours) is pinged.
    pub probe_interval: Duration,
    /// A pinged neighbour that does not answer within this long is treated as failed.
    pub probe_timeout: Duration,
    /// How long a join or neighbour request waits for its reply.
    pub request_timeout: Duration,
    /// Most failed neighbours remembered for reconnection.
    pub lost_max: usize,
    /// First reconnection delay; it doubles per attempt up to `reconnect_backoff_max`.
    pub reconnect_backoff_min: Duration,
    /// Longest reconnection delay.
    pub reconnect_backoff_max: Duration,
    /// A failed neighbour is forgotten this long after it was lost.
    pub lost_expiry: Duration,
}

impl MembershipConfig {
    /// The longest a dead neighbour stays in an active view when no transport error reports
    /// it: a full round of probes, the tick that sends the probe, its timeout and the tick
    /// that notices.
    pub fn silence_bound(&self) -> Duration {
        let round = self
            .probe_interval
            .saturating_mul(u32::try_from(self.active_max).unwrap_or(u32::MAX));
        round
            .saturating_add(self.probe_interval)
            .saturating_add(self.probe_timeout)
            .saturating_add(self.maintain_interval.saturating_mul(2))
    }
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            active_max: 5,
            passive_max: 30,
            active_walk_length: 6,
            passive_walk_length: 3,
            shuffle_active: 3,
            shuffle_passive: 4,
            shuffle_walk_length: 6,
            // A quiet cloud costs little: passive views are refreshed every 60 s (memberlist
            // runs a push-pull every 30 s), one neighbour is probed per second (each link
            // about every 5 s, shared by its two ends), and a probe unanswered for 1 s fails
            // the link (liveness then confirms the node's death before anyone acts).
            shuffle_interval: Duration::from_secs(60),
            maintain_interval: Duration::from_millis(250),
            probe_interval: Duration::from_millis(1_000),
            probe_timeout: Duration::from_millis(1_000),
            request_timeout: Duration::from_millis(1_500),
            lost_max: 16,
            reconnect_backoff_min: Duration::from_secs(1),
            reconnect_backoff_max: Duration::from_secs(30),
            lost_expiry: Duration::from_secs(30 * 60),
        }
    }
}

/// How many more nodes than the cloud's estimated size a full node must know of before it
/// suspects a split overlay ([`Membership::set_size_estimate`]): estimates are noisy, and a
/// few dead entries linger in passive views.
const SPLIT_SUSPICION_RATIO: f64 = 1.5;

/// Shuffle periods between two requests of a node that suspects a split.
pub const SPLIT_PROBE_PERIODS: u32 = 10;

/// Priority of a neighbour request: a node with no neighbour asks at high priority and must be
/// accepted; otherwise the receiver accepts only if it has room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Priority {
    /// Accept only if the active view has room.
    Low,
    /// Accept, evicting a random neighbour if needed.
    High,
}

/// Messages of the membership protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MembershipMessage {
    /// A newcomer asks the receiver to introduce it into the overlay.
    Join,
    /// A join spreading along a random walk.
    ForwardJoin {
        /// The node that joins.
        joiner: Peer,
        /// Hops left.
        ttl: u8,
    },
    /// Asks the receiver to become our neighbour.
    Neighbor {
        /// Whether the receiver must accept.
        priority: Priority,
    },
    /// Answer to `Join` or `Neighbor`.
    NeighborReply {
        /// True when the sender added us to its active view.
        accepted: bool,
    },
    /// The sender removed the receiver from its active view.
    Disconnect {
        /// True when the sender leaves the cloud (do not keep it as a reserve).
        leaving: bool,
    },
    /// A passive-view exchange travelling along a random walk.
    Shuffle {
        /// The node that started the shuffle and waits for the reply.
        origin: Peer,
        /// Hops left.
        ttl: u8,
        /// The origin and a sample of its views.
        peers: Vec<Peer>,
        /// The nodes that forwarded it so far, in order: the reply's way back.
        route: Vec<NodeId>,
    },
    /// Answer to a shuffle, travelling back along its walk over links that are open (a reply
    /// sent straight to the origin would cost a handshake).
    ShuffleReply {
        /// A sample of the replier's passive view.
        peers: Vec<Peer>,
        /// The hops still to go after the receiver, the origin first; empty at the origin.
        route: Vec<NodeId>,
    },
    /// A probe of a neighbour, answered with `Pong` (or `Disconnect` by a non-neighbour).
    Ping,
    /// Answer to `Ping`.
    Pong,
}

impl MembershipMessage {
    /// Whether the message respects the size bounds a receiver enforces.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            MembershipMessage::Shuffle { peers, route, .. }
            | MembershipMessage::ShuffleReply { peers, route } => {
                peers.len() <= SHUFFLE_PEERS_MAX && route.len() <= SHUFFLE_ROUTE_MAX
            }
            _ => true,
        }
    }
}

/// Most escalations that double the number of refused rounds a node waits for before the
/// next one (so the wait stops growing at 2^8 rounds).
const ESCALATION_DOUBLINGS_MAX: u32 = 8;

/// Changes of the active view, reported to the layers above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A node became our neighbour.
    NeighborUp(Peer),
    /// A node stopped being our neighbour.
    NeighborDown(Peer),
    /// A neighbour failed (unreachable or silent) or left the cloud: it is probably gone, not
    /// merely rearranged out of our view. Follows its `NeighborDown`.
    Departed(Peer),
}

/// A neighbour in the active view: when it last proved the link (a ping or a pong from it),
/// and the deadline of our probe waiting for its answer (a broadcast from it answers too).
#[derive(Clone, Copy, Debug)]
struct Link {
    proved: Time,
    probe_deadline: Option<Time>,
}

/// Why we wait for a reply from a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    Join,
    Neighbor,
    Reconnect,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    peer: Peer,
    kind: RequestKind,
    deadline: Time,
}

/// A neighbour lost to failure, kept to try again later.
#[derive(Clone, Copy, Debug)]
struct Lost {
    peer: Peer,
    lost_at: Time,
    next_try: Time,
    attempts: u32,
}

/// Counters of what the membership layer did, for observability and experiments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipCounters {
    /// Neighbours removed because the transport reported them down.
    pub peers_down: u64,
    /// Neighbours removed because they did not answer a probe within `probe_timeout`.
    pub peers_timed_out: u64,
    /// Requests (join, neighbour, reconnect) that got no reply in time.
    pub requests_timed_out: u64,
    /// Neighbour links re-established with formerly lost nodes.
    pub reconnected: u64,
    /// Shuffles started.
    pub shuffles: u64,
    /// Neighbour requests sent with high priority because every passive node refused.
    pub escalations: u64,
    /// High-priority neighbour requests sent by a full node that knows of more nodes than the
    /// cloud's estimated size holds (a sign that the overlay split; see
    /// [`Membership::set_size_estimate`]).
    pub split_probes: u64,
}

/// The HyParView state machine of one node.
///
/// Contract: the owner calls `handle_*` with the current time, then drains
/// [`Membership::drain_transmits`] and [`Membership::drain_events`]; it calls
/// [`Membership::handle_timeout`] no later than [`Membership::poll_timeout`] (earlier is
/// harmless). The owner reports every broadcast message received through
/// [`Membership::heard_on_link`]: broadcasts travel only between neighbours, so one answers a
/// probe in flight (and repairs a one-sided link), though it does not put off the next one.
pub struct Membership {
    me: Peer,
    config: MembershipConfig,
    rng: Rng,
    active: PeerView,
    links: Vec<(NodeId, Link)>,
    passive: PeerView,
    pending: Vec<Pending>,
    lost: VecDeque<Lost>,
    contacts: Vec<Peer>,
    last_shuffle: Vec<Peer>,
    next_shuffle: Time,
    next_maintain: Time,
    /// When the next neighbour due for a probe is pinged.
    next_probe: Time,
    /// Where in `links` the search for the next neighbour to probe starts.
    rota: usize,
    next_idle_refill: Time,
    /// Passive nodes that refused a low-priority neighbour request since one was last
    /// accepted (at most the passive view's size).
    refused_by: Vec<NodeId>,
    /// Rounds since a request was last accepted in which every passive node refused.
    refused_rounds: u32,
    /// Times this node escalated to high priority because of refusals.
    escalations: u32,
    /// The cloud's size as last estimated by the aggregation layer, if it runs.
    size_estimate: Option<f64>,
    /// When a full node that suspects a split may next ask a passive node to link.
    next_split_probe: Time,
    counters: MembershipCounters,
    transmits: Vec<(Peer, MembershipMessage)>,
    events: Vec<MembershipEvent>,
}

/// Most join contacts kept for rejoining.
const CONTACTS_MAX: usize = 8;

impl Membership {
    /// A node `me` that is not yet part of any overlay.
    pub fn new(me: Peer, config: MembershipConfig, mut rng: Rng, now: Time) -> Membership {
        // Spread periodic work so that nodes started together do not act in lockstep.
        let shuffle_offset = jitter(&mut rng, config.shuffle_interval);
        let maintain_offset = jitter(&mut rng, config.maintain_interval);
        let probe_offset = jitter(&mut rng, config.probe_interval);
        Membership {
            me,
            active: PeerView::new(config.active_max),
            links: Vec::with_capacity(config.active_max),
            passive: PeerView::new(config.passive_max),
            pending: Vec::new(),
            lost: VecDeque::new(),
            contacts: Vec::new(),
            last_shuffle: Vec::new(),
            next_shuffle: now + shuffle_offset,
            next_maintain: now + maintain_offset,
            next_probe: now + probe_offset,
            rota: 0,
            next_idle_refill: now,
            refused_by: Vec::new(),
            refused_rounds: 0,
            escalations: 0,
            size_estimate: None,
            next_split_probe: now,
            counters: MembershipCounters::default(),
            transmits: Vec::new(),
            events: Vec::new(),
            config,
            rng,
        }
    }

    /// How many times a peer joined or left either view: equal counts mean the same views.
    pub fn view_changes(&self) -> u64 {
        self.active.changes().wrapping_add(self.passive.changes())
    }

    /// The neighbours (active view).
    pub fn active(&self) -> &PeerView {
        &self.active
    }

    /// The reserve (passive view).
    pub fn passive(&self) -> &PeerView {
        &self.passive
    }

    /// Neighbours lost to failure and waiting to be retried.
    pub fn lost(&self) -> impl Iterator<Item = Peer> + '_ {
        self.lost.iter().map(|l| l.peer)
    }

    /// A node chosen uniformly from both views: a random sample of the cloud for protocols
    /// that talk to random peers (the passive view is refreshed by shuffles).
    pub fn random_peer(&mut self) -> Option<Peer> {
        let total = self.active.len() + self.passive.len();
        if total == 0 {
            return None;
        }
        let pick = self.rng.index(total);
        if pick < self.active.len() {
            self.active.iter().nth(pick)
        } else {
            self.passive.iter().nth(pick - self.active.len())
        }
    }

    /// Up to `count` distinct members to ask for help, `except` excluded: neighbours first
    /// (they are alive), then nodes of the passive view.
    pub fn helpers(&mut self, count: usize, except: NodeId) -> Vec<Peer> {
        let mut chosen = self.active.sample(&mut self.rng, count, |id| id == except);
        let more = count.saturating_sub(chosen.len());
        if more > 0 {
            chosen.extend(self.passive.sample(&mut self.rng, more, |id| id == except));
        }
        chosen
    }

    /// A neighbour chosen uniformly: unlike the passive view, the active view is watched by
    /// probes, so a message to it is rarely lost to a dead node.
    pub fn random_neighbor(&mut self) -> Option<Peer> {
        self.active.random_except(&mut self.rng, |_| false)
    }

    /// What the layer did so far.
    pub fn counters(&self) -> MembershipCounters {
        self.counters
    }

    /// The configuration in force.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Messages to send, in order.
    pub fn drain_transmits(&mut self) -> std::vec::IntoIter<(Peer, MembershipMessage)> {
        // The buffer goes with the drain (why: `pop_and_free_when_drained` in node.rs).
        std::mem::take(&mut self.transmits).into_iter()
    }

    /// Active-view changes, in order.
    pub fn drain_events(&mut self) -> std::vec::IntoIter<MembershipEvent> {
        std::mem::take(&mut self.events).into_iter()
    }

    /// The next time [`Membership::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Time {
        self.next_shuffle.min(self.next_maintain)
    }

    /// Joins the overlay through `contacts` (tried one at a time until one answers). The
    /// contacts are remembered to rejoin if the node ever finds itself alone.
    ///
    /// Every contact is also remembered like a lost neighbour: each is asked once to become a
    /// neighbour, retried with backoff while it does not answer. Contacts come from an
    /// invitation or from the peers a restarted agent remembers, and if the overlay ever split
    /// while they were away, this request is what joins the pieces again.
    pub fn join(&mut self, now: Time, contacts: &[Peer]) {
        let me = self.me.id;
        for contact in contacts.iter().filter(|c| c.id != me) {
            if self.contacts.len() < CONTACTS_MAX && !self.contacts.contains(contact) {
                self.contacts.push(*contact);
                self.remember_lost(now, *contact);
            }
        }
        self.try_join(now);
    }

    /// Leaves the overlay gracefully: every neighbour is told not to keep us as a reserve.
    pub fn leave(&mut self) {
        let neighbours: Vec<Peer> = self.active.iter().collect();
        for peer in neighbours {
            self.send(peer, MembershipMessage::Disconnect { leaving: true });
            self.remove_active(peer.id);
        }
        self.pending.clear();
        self.lost.clear();
        self.contacts.clear();
    }

    /// Handles a membership message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: MembershipMessage) {
        if from.id == self.me.id {
            return;
        }
        match message {
            MembershipMessage::Join => self.on_join(now, from),
            MembershipMessage::ForwardJoin { joiner, ttl } => {
                self.on_forward_join(now, from, joiner, ttl)
            }
            MembershipMessage::Neighbor { priority } => self.on_neighbor(now, from, priority),
            MembershipMessage::NeighborReply { accepted } => {
                self.on_neighbor_reply(now, from, accepted)
            }
            MembershipMessage::Disconnect { leaving } => self.on_disconnect(now, from, leaving),
            MembershipMessage::Shuffle {
                origin,
                ttl,
                peers,
                route,
            } => self.on_shuffle(from, origin, ttl, peers, route),
            MembershipMessage::ShuffleReply { peers, route } => self.on_shuffle_reply(peers, route),
            MembershipMessage::Ping => {
                if self.note_link(now, from, true) {
                    self.send(from, MembershipMessage::Pong);
                }
            }
            MembershipMessage::Pong => {
                self.note_link(now, from, true);
            }
        }
    }

    /// The transport could not reach `peer` (dial failed, connection lost).
    pub fn handle_peer_down(&mut self, now: Time, peer: NodeId) {
        if self.active.contains(peer) {
            self.counters.peers_down += 1;
            self.fail_neighbor(now, peer);
        } else if let Some(request) = self.take_pending(peer) {
            self.fail_request(now, request);
        } else {
            self.passive.remove(peer);
        }
    }

    /// Runs the periodic work that is due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        if now >= self.next_maintain {
            self.next_maintain = now + self.config.maintain_interval;
            self.maintain(now);
        }
        if now >= self.next_shuffle {
            self.next_shuffle = now + self.config.shuffle_interval;
            self.shuffle();
        }
    }

    fn on_join(&mut self, now: Time, joiner: Peer) {
        self.passive.remove(joiner.id);
        self.take_pending(joiner.id);
        if !self.active.contains(joiner.id) {
            self.add_active(now, joiner);
        }
        self.send(joiner, MembershipMessage::NeighborReply { accepted: true });
        // Seed the newcomer's passive view, so that it is not lost if we fail right away.
        let count = self.config.shuffle_active + self.config.shuffle_passive;
        let reserve = self
            .passive
            .sample(&mut self.rng, count, |id| id == joiner.id);
        if !reserve.is_empty() {
            self.send(
                joiner,
                MembershipMessage::ShuffleReply {
                    peers: reserve,
                    route: Vec::new(),
                },
            );
        }
        let ttl = self.config.active_walk_length;
        let others: Vec<Peer> = self.active.iter().filter(|p| p.id != joiner.id).collect();
        for peer in others {
            self.send(peer, MembershipMessage::ForwardJoin { joiner, ttl });
        }
    }

    fn on_forward_join(&mut self, now: Time, from: Peer, joiner: Peer, ttl: u8) {
        if joiner.id == self.me.id {
            return;
        }
        if ttl == 0 || self.active.len() <= 1 {
            if !self.active.contains(joiner.id) && !self.is_pending(joiner.id) {
                self.request(now, joiner, RequestKind::Neighbor, Priority::High);
            }
            return;
        }
        if ttl == self.config.passive_walk_length {
            self.add_passive(joiner);
        }
        let next = self
            .active
            .random_except(&mut self.rng, |id| id == from.id || id == joiner.id);
        match next {
            Some(next) => self.send(
                next,
                MembershipMessage::ForwardJoin {
                    joiner,
                    ttl: ttl - 1,
                },
            ),
            None => {
                if !self.active.contains(joiner.id) && !self.is_pending(joiner.id) {
                    self.request(now, joiner, RequestKind::Neighbor, Priority::High);
                }
            }
        }
    }

    fn on_neighbor(&mut self, now: Time, from: Peer, priority: Priority) {
        if self.active.contains(from.id) {
            self.send(from, MembershipMessage::NeighborReply { accepted: true });
            return;
        }
        let accept = priority == Priority::High || !self.active.is_full();
        if accept {
            self.take_pending(from.id);
            self.passive.remove(from.id);
            self.add_active(now, from);
        } else {
            self.add_passive(from);
        }
        self.send(from, MembershipMessage::NeighborReply { accepted: accept });
    }

    fn on_neighbor_reply(&mut self, now: Time, from: Peer, accepted: bool) {
        let request = self.take_pending(from.id);
        if !accepted {
            // Still a good reserve; another candidate is tried at the next maintenance.
            if !self.refused_by.contains(&from.id) {
                if self.refused_by.len() >= self.config.passive_max {
                    self.refused_by.remove(0);
                }
                self.refused_by.push(from.id);
            }
            self.add_passive(from);
            return;
        }
        self.refused_by.clear();
        self.refused_rounds = 0;
        if self.active.contains(from.id) {
            return;
        }
        if request.is_none() && self.active.is_full() {
            // A late acceptance of a request we gave up on: do not evict for it.
            self.send(from, MembershipMessage::Disconnect { leaving: false });
            self.add_passive(from);
            return;
        }
        if let Some(Pending {
            kind: RequestKind::Reconnect,
            ..
        }) = request
        {
            self.counters.reconnected += 1;
        }
        self.add_active(now, from);
    }

    fn on_disconnect(&mut self, now: Time, from: Peer, leaving: bool) {
        self.take_pending(from.id);
        if self.remove_active(from.id).is_some() {
            if !leaving {
                self.add_passive(from);
            }
            self.refill(now);
        }
        if leaving {
            self.passive.remove(from.id);
            self.lost.retain(|l| l.peer.id != from.id);
            self.events.push(MembershipEvent::Departed(from));
        }
    }

    fn on_shuffle(
        &mut self,
        from: Peer,
        origin: Peer,
        ttl: u8,
        peers: Vec<Peer>,
        mut route: Vec<NodeId>,
    ) {
        if origin.id == self.me.id {
            return;
        }
        // The way back ends with the node it came from, or it came from the origin itself.
        if route.last().copied().unwrap_or(origin.id) != from.id {
            return;
        }
        if ttl > 1 && self.active.len() > 1 && route.len() < SHUFFLE_ROUTE_MAX {
            let next = self
                .active
                .random_except(&mut self.rng, |id| id == from.id || id == origin.id);
            if let Some(next) = next {
                route.push(self.me.id);
                let forwarded = MembershipMessage::Shuffle {
                    origin,
                    ttl: ttl - 1,
                    peers,
                    route,
                };
                self.send(next, forwarded);
                return;
            }
        }
        let reply = self
            .passive
            .sample(&mut self.rng, peers.len(), |id| id == origin.id);
        // The way back is the origin, then the forwarders; the last of them (or the origin)
        // is the node it came from, and the reply tells it the hops after it.
        route.insert(0, origin.id);
        route.pop();
        self.send(
            from,
            MembershipMessage::ShuffleReply {
                peers: reply.clone(),
                route,
            },
        );
        self.add_all_passive(peers, &reply);
    }

    /// A shuffle's reply: ours when its route is done, else passed one hop back along it,
    /// only to a neighbour (no node can make us open links to others).
    fn on_shuffle_reply(&mut self, peers: Vec<Peer>, mut route: Vec<NodeId>) {
        let Some(next) = route.pop() else {
            let sent = std::mem::take(&mut self.last_shuffle);
            self.add_all_passive(peers, &sent);
            return;
        };
        if let Some(next) = self.active.find(next) {
            self.send(next, MembershipMessage::ShuffleReply { peers, route });
        }
    }

    /// Notes a broadcast message from `from` (broadcasts only travel between neighbours) and
    /// says whether `from` is our neighbour. See [`Membership::note_link`]; a broadcast does
    /// not count as a probe exchange: if it did, a neighbour that talked until it died would
    /// be probed only a whole round after its last word, and a chatty node's death would be
    /// found later than a quiet one's.
    pub fn heard_on_link(&mut self, now: Time, from: Peer) -> bool {
        self.note_link(now, from, false)
    }

    /// Notes a message that only travels between neighbours from `from`, and says whether
    /// `from` is our neighbour. From a neighbour, it answers a probe in flight; a ping or a
    /// pong (`exchange`) also proves the link for a round, so that the two ends of a link
    /// share one exchange per round. Otherwise, unless we are asking `from` to be our
    /// neighbour, the sender believes in a link we do not have: the asymmetry is repaired
    /// with a `Disconnect`.
    fn note_link(&mut self, now: Time, from: Peer, exchange: bool) -> bool {
        if let Some(link) = self.link_mut(from.id) {
            if exchange {
                link.proved = now;
            }
            link.probe_deadline = None;
            return true;
        }
        if !self.is_pending(from.id) {
            self.send(from, MembershipMessage::Disconnect { leaving: false });
        }
        false
    }

    /// Pings the next neighbour in the rota that has not proved its link for a whole round.
    fn probe(&mut self, now: Time) {
        let count = self.links.len();
        let round = self
            .config
            .probe_interval
            .saturating_mul(u32::try_from(count).unwrap_or(u32::MAX));
        for step in 0..count {
            let index = (self.rota + step) % count;
            let (id, link) = &mut self.links[index];
            if link.probe_deadline.is_none() && now.saturating_since(link.proved) >= round {
                link.probe_deadline = Some(now + self.config.probe_timeout);
                let id = *id;
                self.rota = index + 1;
                if let Some(peer) = self.active.find(id) {
                    self.send(peer, MembershipMessage::Ping);
                }
                return;
            }
        }
    }

    fn maintain(&mut self, now: Time) {
        // Neighbours that did not answer a probe in time, then the next probe.
        let unanswered: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(_, link)| link.probe_deadline.is_some_and(|deadline| deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in unanswered {
            self.counters.peers_timed_out += 1;
            self.fail_neighbor(now, id);
        }
        if now >= self.next_probe {
            self.next_probe = now + self.config.probe_interval;
            self.probe(now);
        }
        // Requests that got no answer.
        let mut expired = Vec::new();
        self.pending.retain(|p| {
            let keep = p.deadline > now;
            if !keep {
                expired.push(*p);
            }
            keep
        });
        for request in expired {
            self.counters.requests_timed_out += 1;
            self.fail_request(now, request);
        }
        // Forget old losses, then retry one that is due.
        let expiry = self.config.lost_expiry;
        self.lost
            .retain(|l| now.saturating_since(l.lost_at) < expiry);
        self.reconnect_one(now);
        // Losses refill at once; a view that is merely short (the reserve answered "full") is
        // retried once per shuffle period, not on every tick.
        if self.active.is_empty() || now >= self.next_idle_refill {
            self.next_idle_refill = now + self.config.shuffle_interval;
            self.refill(now);
        }
        if self.active.is_empty() && self.pending.is_empty() {
            self.try_join(now);
        }
        self.probe_for_split(now);
    }

    /// Sets the cloud's estimated size (from aggregation, when it runs), which lets a node
    /// notice that the overlay split into pieces that no rule of HyParView joins again.
    ///
    /// After faults, a small overlay can settle into pieces whose every active view is full
    /// (two complete graphs of four nodes, with active views of three): no node is short of a
    /// neighbour, so none asks anyone, though each one's passive view names nodes of the other
    /// piece. Such a node knows of more nodes than its piece's estimate counts. When it knows
    /// of half as many again as the estimate, it asks a random passive node, at most once per
    /// [`SPLIT_PROBE_PERIODS`] shuffle periods, with high priority, to become a neighbour: the
    /// link crosses the split if the node is on the other side, and each end drops a random
    /// link to make room, whose other ends, now short, find new neighbours by the usual rules.
    /// A node that does not answer moves from the passive view to the lost ones, which purges
    /// dead entries that would keep the count high. In a large cloud a node knows of far fewer
    /// nodes than the estimate, and nothing changes.
    pub fn set_size_estimate(&mut self, size: Option<f64>) {
        self.size_estimate = size;
    }

    fn probe_for_split(&mut self, now: Time) {
        let Some(size) = self.size_estimate else {
            return;
        };
        if !self.active.is_full() || now < self.next_split_probe {
            return;
        }
        let known = 1 + self.active.len() + self.passive.len();
        if (known as f64) <= size * SPLIT_SUSPICION_RATIO {
            return;
        }
        self.next_split_probe = now
            + self
                .config
                .shuffle_interval
                .saturating_mul(SPLIT_PROBE_PERIODS);
        let pending = &self.pending;
        let Some(candidate) = self
            .passive
            .random_except(&mut self.rng, |id| pending.iter().any(|p| p.peer.id == id))
        else {
            return;
        };
        self.counters.split_probes += 1;
        self.request(now, candidate, RequestKind::Neighbor, Priority::High);
    }

    fn shuffle(&mut self) {
        let Some(target) = self.active.random_except(&mut self.rng, |_| false) else {
            return;
        };
        let mut peers = vec![self.me];
        peers.extend(
            self.active
                .sample(&mut self.rng, self.config.shuffle_active, |id| {
                    id == target.id
                }),
        );
        peers.extend(
            self.passive
                .sample(&mut self.rng, self.config.shuffle_passive, |_| false),
        );
        peers.truncate(SHUFFLE_PEERS_MAX);
        self.last_shuffle = peers.clone();
        self.counters.shuffles += 1;
        let message = MembershipMessage::Shuffle {
            origin: self.me,
            ttl: self.config.shuffle_walk_length,
            peers,
            route: Vec::new(),
        };
        self.send(target, message);
    }

    /// Sends low-priority neighbour requests (high priority when alone) to passive nodes until
    /// the active view plus outstanding requests would be full.
    fn refill(&mut self, now: Time) {
        let outstanding = self
            .pending
            .iter()
            .filter(|p| p.kind != RequestKind::Join)
            .count();
        let mut wanted = self
            .config
            .active_max
            .saturating_sub(self.active.len() + outstanding);
        while wanted > 0 {
            let pending: Vec<NodeId> = self.pending.iter().map(|p| p.peer.id).collect();
            // Every passive node is asked once before any is asked again.
            let refused_by = &self.refused_by;
            let fresh = self.passive.random_except(&mut self.rng, |id| {
                pending.contains(&id) || refused_by.contains(&id)
            });
            let (candidate, priority) = match fresh {
                Some(candidate) => {
                    // A node with one neighbour or none asks with high priority: with low
                    // priority, two nodes linked only to each other stay a separate island for
                    // good once every other node's active view is full (as happens after a
                    // partition of a small cloud).
                    let priority = if self.active.len() <= 1 {
                        Priority::High
                    } else {
                        Priority::Low
                    };
                    (candidate, priority)
                }
                None => {
                    let Some(candidate) = self
                        .passive
                        .random_except(&mut self.rng, |id| pending.contains(&id))
                    else {
                        break;
                    };
                    (candidate, self.end_refused_round())
                }
            };
            self.request(now, candidate, RequestKind::Neighbor, priority);
            wanted -= 1;
        }
    }

    /// Every passive node refused us since a request was last accepted: starts another round
    /// and says with which priority to ask in it. After a number of such rounds, doubling with
    /// each escalation, the node asks with high priority (the receiver makes room). Without
    /// this, two cliques whose members are all full but one (as after a partition heals) would
    /// never link up; the doubling keeps a cloud whose size leaves one node short for good from
    /// evicting neighbours forever, and asking everyone first keeps a large cloud, where some
    /// node always has room, from escalating at all.
    fn end_refused_round(&mut self) -> Priority {
        self.refused_by.clear();
        self.refused_rounds += 1;
        let bar = 1 << self.escalations.min(ESCALATION_DOUBLINGS_MAX);
        if self.refused_rounds < bar {
            return Priority::Low;
        }
        self.refused_rounds = 0;
        self.escalations += 1;
        self.counters.escalations += 1;
        Priority::High
    }

    fn reconnect_one(&mut self, now: Time) {
        let due = self
            .lost
            .iter()
            .position(|l| l.next_try <= now && !self.active.contains(l.peer.id));
        let Some(index) = due else { return };
        let entry = &mut self.lost[index];
        if self.pending.iter().any(|p| p.peer.id == entry.peer.id) {
            return;
        }
        entry.attempts += 1;
        let backoff = backoff(
            self.config.reconnect_backoff_min,
            self.config.reconnect_backoff_max,
            entry.attempts,
        );
        entry.next_try = now + backoff;
        let peer = entry.peer;
        self.request(now, peer, RequestKind::Reconnect, Priority::High);
    }

    fn try_join(&mut self, now: Time) {
        if self.pending.iter().any(|p| p.kind == RequestKind::Join) {
            return;
        }
        let candidates: Vec<Peer> = self
            .contacts
            .iter()
            .filter(|c| !self.active.contains(c.id))
            .copied()
            .collect();
        if let Some(contact) = self.rng.choose(&candidates).copied() {
            if self.pending.len() >= self.pending_max() {
                return;
            }
            self.pending.push(Pending {
                peer: contact,
                kind: RequestKind::Join,
                deadline: now + self.config.request_timeout,
            });
            self.send(contact, MembershipMessage::Join);
        }
    }

    fn request(&mut self, now: Time, peer: Peer, kind: RequestKind, priority: Priority) {
        if self.pending.len() >= self.pending_max() {
            return;
        }
        self.pending.push(Pending {
            peer,
            kind,
            deadline: now + self.config.request_timeout,
        });
        self.send(peer, MembershipMessage::Neighbor { priority });
    }

    fn fail_request(&mut self, now: Time, request: Pending) {
        match request.kind {
            RequestKind::Neighbor => {
                // Unreachable now, maybe only for now (a partition): keep it among the nodes
                // to retry with backoff rather than forget it, or a node cut off from
                // everyone it knows would forget them all and stay alone after healing.
                if self.passive.remove(request.peer.id).is_some() {
                    self.remember_lost(now, request.peer);
                }
                self.refill(now);
            }
            RequestKind::Reconnect => {}
            RequestKind::Join => self.try_join(now),
        }
    }

    fn fail_neighbor(&mut self, now: Time, id: NodeId) {
        let Some(peer) = self.remove_active(id) else {
            return;
        };
        self.events.push(MembershipEvent::Departed(peer));
        self.remember_lost(now, peer);
        self.refill(now);
    }

    /// Remembers `peer` to ask it again, after backoff, to become a neighbour.
    fn remember_lost(&mut self, now: Time, peer: Peer) {
        if self.lost.iter().any(|l| l.peer.id == peer.id) {
            return;
        }
        if self.lost.len() >= self.config.lost_max {
            self.lost.pop_front();
        }
        self.lost.push_back(Lost {
            peer,
            lost_at: now,
            next_try: now + self.config.reconnect_backoff_min,
            attempts: 0,
        });
    }

    fn add_active(&mut self, now: Time, peer: Peer) {
        if peer.id == self.me.id || self.active.contains(peer.id) {
            return;
        }
        if self.active.is_full()
            && let Some(evicted) = self.active.random_except(&mut self.rng, |_| false)
        {
            self.send(evicted, MembershipMessage::Disconnect { leaving: false });
            self.remove_active(evicted.id);
            self.add_passive(evicted);
        }
        self.passive.remove(peer.id);
        self.lost.retain(|l| l.peer.id != peer.id);
        self.active.insert(peer);
        self.links.push((
            peer.id,
            Link {
                proved: now,
                probe_deadline: None,
            },
        ));
        self.events.push(MembershipEvent::NeighborUp(peer));
    }

    fn remove_active(&mut self, id: NodeId) -> Option<Peer> {
        let peer = self.active.remove(id)?;
        self.links.retain(|(link, _)| *link != id);
        self.events.push(MembershipEvent::NeighborDown(peer));
        Some(peer)
    }

    /// Adds `peer` to the passive view; when full, evicts a random entry.
    fn add_passive(&mut self, peer: Peer) {
        self.add_all_passive([peer], &[]);
    }

    /// Adds `peers` to the passive view one after the other (neither ourselves nor
    /// neighbours). When the view is full, each newcomer replaces the first of `prefer_evict`
    /// still in the view (the peers just sent away in a shuffle), else a random entry.
    fn add_all_passive(&mut self, peers: impl IntoIterator<Item = Peer>, prefer_evict: &[Peer]) {
        // Which of `prefer_evict` the view holds, kept up to date as peers come and go: a
        // shuffle answer adds several peers, and searching the view again for every candidate
        // at every eviction was a large share of the time of big simulations.
        let mut held: Vec<bool> = prefer_evict
            .iter()
            .map(|p| self.passive.contains(p.id))
            .collect();
        let mark = |held: &mut [bool], id: NodeId, value: bool| {
            for (held, candidate) in held.iter_mut().zip(prefer_evict) {
                if candidate.id == id {
                    *held = value;
                }
            }
        };
        for peer in peers {
            if peer.id == self.me.id || self.active.contains(peer.id) {
                continue;
            }
            if self.passive.contains(peer.id) {
                self.passive.insert(peer);
                continue;
            }
            if self.passive.is_full() {
                let victim = held
                    .iter()
                    .position(|&h| h)
                    .map(|i| prefer_evict[i])
                    .or_else(|| self.passive.random_except(&mut self.rng, |_| false));
                if let Some(victim) = victim {
                    self.passive.remove(victim.id);
                    mark(&mut held, victim.id, false);
                }
            }
            if self.passive.insert(peer) {
                mark(&mut held, peer.id, true);
            }
        }
    }

    fn send(&mut self, to: Peer, message: MembershipMessage) {
        self.transmits.push((to, message));
    }

    /// Room for a full refill, a join and a reconnection, plus a few joins walking to us.
    fn pending_max(&self) -> usize {
        2 * self.config.active_max + 2
    }

    fn is_pending(&self, id: NodeId) -> bool {
        self.pending.iter().any(|p| p.peer.id == id)
    }

    fn take_pending(&mut self, id: NodeId) -> Option<Pending> {
        let index = self.pending.iter().position(|p| p.peer.id == id)?;
        Some(self.pending.remove(index))
    }

    fn link_mut(&mut self, id: NodeId) -> Option<&mut Link> {
        self.links
            .iter_mut()
            .find(|(link, _)| *link == id)
            .map(|(_, link)| link)
    }
}

/// A uniformly random fraction of `period`.
fn jitter(rng: &mut Rng, period: Duration) -> Duration {
    let micros = u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(rng.below(micros))
}

/// `min · 2^(attempts-1)`, capped at `max`.
fn backoff(min: Duration, max: Duration, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    min.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u128) -> Peer {
        Peer::new(NodeId(n))
    }

    fn config() -> MembershipConfig {
        MembershipConfig {
            active_max: 3,
            passive_max: 4,
            ..MembershipConfig::default()
        }
    }

    fn node(me: u128) -> Membership {
        Membership::new(peer(me), config(), Rng::from_seed(me as u64), Time::ZERO)
    }

    fn transmits(m: &mut Membership) -> Vec<(NodeId, MembershipMessage)> {
        m.drain_transmits().map(|(p, msg)| (p.id, msg)).collect()
    }

    fn events(m: &mut Membership) -> Vec<MembershipEvent> {
        m.drain_events().collect()
    }

    /// The neighbour requests among the drained transmits: (to, priority).
    fn neighbour_requests(m: &mut Membership) -> Vec<(u128, Priority)> {
        transmits(m)
            .into_iter()
            .filter_map(|(to, msg)| match msg {
                MembershipMessage::Neighbor { priority } => Some((to.0, priority)),
                _ => None,
            })
            .collect()
    }

    /// A node whose active view holds exactly `neighbours`, with every output drained.
    fn with_active(me: u128, neighbours: &[u128]) -> Membership {
        let mut m = node(me);
        for &n in neighbours {
            m.handle_message(
                Time::ZERO,
                peer(n),
                MembershipMessage::Neighbor {
                    priority: Priority::Low,
                },
            );
        }
        transmits(&mut m);
        events(&mut m);
        m
    }

    #[test]
    fn joiner_sends_join_and_adds_contact_on_reply() {
        let mut m = node(1);
        m.join(Time::ZERO, &[peer(2)]);
        assert_eq!(
            transmits(&mut m),
            vec![(NodeId(2), MembershipMessage::Join)]
        );
        m.handle_message(
            Time::ZERO,
            peer(2),
            MembershipMessage::NeighborReply { accepted: true },
        );
        assert_eq!(events(&mut m), vec![MembershipEvent::NeighborUp(peer(2))]);
        assert!(m.active().contains(NodeId(2)));
        assert!(transmits(&mut m).is_empty());
    }

    #[test]
    fn contact_accepts_join_and_forwards_it_to_every_other_neighbour() {
        let mut m = with_active(1, &[2, 3]);
        m.handle_message(Time::ZERO, peer(9), MembershipMessage::Join);
        assert_eq!(events(&mut m), vec![MembershipEvent::NeighborUp(peer(9))]);
        let walk = config().active_walk_length;
        assert_eq!(
            transmits(&mut m),
            vec![
                (
                    NodeId(9),
                    MembershipMessage::NeighborReply { accepted: true }
                ),
                (
                    NodeId(2),
                    MembershipMessage::ForwardJoin {
                        joiner: peer(9),
                        ttl: walk
                    }
                ),
                (
                    NodeId(3),
                    MembershipMessage::ForwardJoin {
                        joiner: peer(9),
                        ttl: walk
                    }
                ),
            ]
        );
    }

    #[test]
    fn forward_join_ends_with_a_high_priority_request_when_ttl_is_zero() {
        let mut m = with_active(1, &[2, 3]);
        m.handle_message(
            Time::ZERO,
            peer(2),
            MembershipMessage::ForwardJoin {
                joiner: peer(9),
                ttl: 0,
            },
        );
        assert_eq!(
            transmits(&mut m),
            vec![(
                NodeId(9),
                MembershipMessage::Neighbor {
                    priority: Priority::High
                }
            )]
        );
        // The link exists once the joiner accepts.
        m.handle_message(
            Time::ZERO,
            peer(9),
            MembershipMessage::NeighborReply { accepted: true },
        );
        assert_eq!(events(&mut m), vec![MembershipEvent::NeighborUp(peer(9))]);
    }

    #[test]
    fn forward_join_at_passive_walk_length_is_recorded_and_forwarded() {
        let mut m = with_active(1, &[2, 3]);
        let ttl = config().passive_walk_length;
        m.handle_message(
            Time::ZERO,
            peer(2),
            MembershipMessage::ForwardJoin {
                joiner: peer(9),
                ttl,
            },
        );
        assert!(m.passive().contains(NodeId(9)));
        // Forwarded to the only neighbour that is neither the sender nor the joiner.
        assert_eq!(
            transmits(&mut m),
            vec![(
                NodeId(3),
                MembershipMessage::ForwardJoin {
                    joiner: peer(9),
                    ttl: ttl - 1
                }
            )]
        );
    }

    #[test]
    fn low_priority_request_is_refused_when_full_and_high_priority_evicts() {
        let mut m = with_active(1, &[2, 3, 4]);
        m.handle_message(
            Time::ZERO,
            peer(5),
            MembershipMessage::Neighbor {
                priority: Priority::Low,
            },
        );
        assert_eq!(
            transmits(&mut m),
            vec![(
                NodeId(5),
                MembershipMessage::NeighborReply { accepted: false }
            )]
        );
        assert!(m.passive().contains(NodeId(5)));
        assert!(events(&mut m).is_empty());

        m.handle_message(
            Time::ZERO,
            peer(6),
            MembershipMessage::Neighbor {
                priority: Priority::High,
            },
        );
        let sent = transmits(&mut m);
        assert_eq!(sent.len(), 2);
        let (evicted, disconnect) = &sent[0];
        assert_eq!(
            *disconnect,
            MembershipMessage::Disconnect { leaving: false }
        );
        assert!([NodeId(2), NodeId(3), NodeId(4)].contains(evicted));
        assert_eq!(
            sent[1],
            (
                NodeId(6),
                MembershipMessage::NeighborReply { accepted: true }
            )
        );
        assert_eq!(
            events(&mut m),
            vec![
                MembershipEvent::NeighborDown(Peer::new(*evicted)),
                MembershipEvent::NeighborUp(peer(6)),
            ]
        );
        assert_eq!(m.active().len(), 3);
        assert!(m.passive().contains(*evicted));
    }

    #[test]
    fn failed_neighbour_is_replaced_from_the_passive_view() {
        let mut m = with_active(1, &[2]);
        m.handle_message(
            Time::ZERO,
            peer(7),
            MembershipMessage::ShuffleReply {
                peers: vec![peer(7)],
                route: Vec::new(),
            },
        );
        assert!(m.passive().contains(NodeId(7)));
        m.handle_peer_down(Time::ZERO, NodeId(2));
        assert_eq!(
            events(&mut m),
            vec![
                MembershipEvent::NeighborDown(peer(2)),
                MembershipEvent::Departed(peer(2))
            ]
        );
        // Alone now, so the request is high priority.
        assert_eq!(
            transmits(&mut m),
            vec![(
                NodeId(7),
                MembershipMessage::Neighbor {
                    priority: Priority::High
                }
            )]
        );
    }

    /// Runs `m`'s periodic work at `at` and returns what it sent.
    fn tick(m: &mut Membership, at: Time) -> Vec<(NodeId, MembershipMessage)> {
        m.handle_timeout(at);
        transmits(m)
    }

    fn secs(s: u64) -> Time {
        Time::ZERO + Duration::from_secs(s)
    }

    #[test]
    fn neighbours_are_probed_in_turn_once_per_round_and_a_silent_one_fails() {
        // Two neighbours: a round is two probe intervals (2 s).
        let mut m = with_active(1, &[2, 3]);
        assert!(
            tick(&mut m, secs(1)).is_empty(),
            "no link is a round old yet"
        );
        assert_eq!(
            tick(&mut m, secs(2)),
            vec![(NodeId(2), MembershipMessage::Ping)]
        );
        m.handle_message(secs(2), peer(2), MembershipMessage::Pong);
        assert_eq!(
            tick(&mut m, secs(3)),
            vec![(NodeId(3), MembershipMessage::Ping)]
        );
        assert!(events(&mut m).is_empty());
        // 3 never answers: its link fails when the probe times out. With one neighbour left
        // a round is one interval, and 2 (proved at 2 s) is due.
        assert_eq!(
            tick(&mut m, secs(4)),
            vec![(NodeId(2), MembershipMessage::Ping)]
        );
        assert_eq!(
            events(&mut m),
            vec![
                MembershipEvent::NeighborDown(peer(3)),
                MembershipEvent::Departed(peer(3))
            ]
        );
        assert_eq!(m.counters().peers_timed_out, 1);
        assert_eq!(
            m.active().iter().map(|p| p.id).collect::<Vec<_>>(),
            [NodeId(2)]
        );
    }

    #[test]
    fn a_neighbour_that_probed_us_is_not_probed_in_the_same_round() {
        let mut m = with_active(1, &[2, 3]);
        m.handle_message(
            Time::ZERO + Duration::from_millis(1_500),
            peer(2),
            MembershipMessage::Ping,
        );
        assert_eq!(
            transmits(&mut m),
            vec![(NodeId(2), MembershipMessage::Pong)]
        );
        assert_eq!(
            tick(&mut m, secs(2)),
            vec![(NodeId(3), MembershipMessage::Ping)]
        );
        // A broadcast answers the probe in flight, but does not put off the next one.
        m.heard_on_link(secs(2), peer(3));
        assert_eq!(
            tick(&mut m, secs(3)),
            vec![(NodeId(3), MembershipMessage::Ping)]
        );
        assert!(events(&mut m).is_empty());
    }

    #[test]
    fn a_ping_from_a_stranger_is_answered_with_disconnect() {
        let mut m = with_active(1, &[2]);
        m.handle_message(Time::ZERO, peer(8), MembershipMessage::Ping);
        assert_eq!(
            transmits(&mut m),
            vec![(NodeId(8), MembershipMessage::Disconnect { leaving: false })]
        );
        m.handle_message(Time::ZERO, peer(2), MembershipMessage::Ping);
        assert_eq!(
            transmits(&mut m),
            vec![(NodeId(2), MembershipMessage::Pong)]
        );
    }

    #[test]
    fn shuffle_is_answered_at_the_end_of_its_walk_and_integrated() {
        let mut m = with_active(1, &[2]);
        for n in [10, 11] {
            m.handle_message(
                Time::ZERO,
                peer(n),
                MembershipMessage::ShuffleReply {
                    peers: vec![peer(n)],
                    route: Vec::new(),
                },
            );
        }
        let offered = vec![peer(20), peer(21)];
        let shuffle = |route: Vec<u128>| MembershipMessage::Shuffle {
            origin: peer(20),
            ttl: 3,
            peers: offered.clone(),
            route: route.into_iter().map(NodeId).collect(),
        };
        // A shuffle whose way back does not end with its sender is dropped.
        m.handle_message(Time::ZERO, peer(2), shuffle(vec![5, 6]));
        assert!(transmits(&mut m).is_empty());
        // 20 started it, 5 and then 2 forwarded it. Only one neighbour, so the walk ends
        // here: the reply goes back to 2, which is told the hops after it (5, then 20).
        m.handle_message(Time::ZERO, peer(2), shuffle(vec![5, 2]));
        let sent = transmits(&mut m);
        assert_eq!(sent.len(), 1);
        let (to, MembershipMessage::ShuffleReply { peers, route }) = &sent[0] else {
            panic!("expected a shuffle reply, got {sent:?}");
        };
        assert_eq!(*to, NodeId(2));
        assert_eq!(*route, vec![NodeId(20), NodeId(5)]);
        assert_eq!(peers.len(), 2);
        assert!(
            peers
                .iter()
                .all(|p| [NodeId(10), NodeId(11)].contains(&p.id))
        );
        // The passive view (capacity 4) now holds the offered nodes.
        assert!(m.passive().contains(NodeId(20)) && m.passive().contains(NodeId(21)));
        assert!(m.passive().len() <= 4);
    }

    #[test]
    fn a_shuffle_reply_goes_back_hop_by_hop_and_only_to_neighbours() {
        let mut m = with_active(1, &[2]);
        let reply = |route: Vec<u128>| MembershipMessage::ShuffleReply {
            peers: vec![peer(30)],
            route: route.into_iter().map(NodeId).collect(),
        };
        m.handle_message(Time::ZERO, peer(9), reply(vec![7, 2]));
        assert_eq!(
            transmits(&mut m),
            vec![(
                NodeId(2),
                MembershipMessage::ShuffleReply {
                    peers: vec![peer(30)],
                    route: vec![NodeId(7)],
                }
            )]
        );
        assert!(
            !m.passive().contains(NodeId(30)),
            "not ours: passed on only"
        );
        // A next hop that is not a neighbour: dropped, no link is opened for it.
        m.handle_message(Time::ZERO, peer(9), reply(vec![8]));
        assert!(transmits(&mut m).is_empty());
        // The end of the way back: integrated here.
        m.handle_message(Time::ZERO, peer(2), reply(vec![]));
        assert!(m.passive().contains(NodeId(30)));
    }

    #[test]
    fn a_full_node_that_knows_of_more_nodes_than_the_cloud_holds_asks_a_passive_one() {
        // Active view full (3 of 3), passive view 10-13: this node knows of 8 nodes.
        let split = |estimate: Option<f64>| {
            let mut m = with_active(1, &[2, 3, 4]);
            m.add_all_passive([10, 11, 12, 13].map(peer), &[]);
            m.set_size_estimate(estimate);
            m
        };
        let second = Duration::from_secs(1);
        let at = |t: Duration| Time::ZERO + t;
        let tick = |m: &mut Membership, now: Time| {
            for n in [2, 3, 4] {
                m.handle_message(now, peer(n), MembershipMessage::Pong);
            }
            m.handle_timeout(now);
        };
        // An estimate of 4 nodes: one high-priority request to a passive node...
        let mut m = split(Some(4.0));
        tick(&mut m, at(second));
        let sent = neighbour_requests(&mut m);
        assert_eq!(sent.len(), 1);
        assert!((10..=13).contains(&sent[0].0));
        assert_eq!(sent[0].1, Priority::High);
        assert_eq!(m.counters().split_probes, 1);
        // ... then none until SPLIT_PROBE_PERIODS shuffle periods have passed.
        let period = m.config.shuffle_interval * SPLIT_PROBE_PERIODS;
        m.handle_message(
            at(second),
            peer(sent[0].0),
            MembershipMessage::NeighborReply { accepted: false },
        );
        tick(&mut m, at(second + period / 2));
        assert!(neighbour_requests(&mut m).is_empty());
        tick(&mut m, at(second + period));
        assert_eq!(neighbour_requests(&mut m).len(), 1);
        // Knowing of no more than half as many again as the estimate, or having no estimate,
        // a full node asks no one.
        for estimate in [Some(8.0), Some(6.0), None] {
            let mut m = split(estimate);
            tick(&mut m, at(second));
            assert!(neighbour_requests(&mut m).is_empty(), "{estimate:?}");
            assert_eq!(m.counters().split_probes, 0);
        }
    }

    #[test]
    fn a_full_passive_view_evicts_the_peers_sent_away_first_in_their_order() {
        // Passive view of 4, full: 1, 2, 4, 5 (no neighbours).
        let mut m = node(100);
        let ids = |m: &Membership| m.passive.ids().map(|id| id.0).collect::<Vec<_>>();
        m.add_all_passive([1, 2, 4, 5].map(peer), &[]);
        assert_eq!(ids(&m), vec![1, 2, 4, 5]);
        // 9 is not held: 6 replaces 4, then 7 replaces 1.
        m.add_all_passive([6, 7].map(peer), &[9, 4, 1].map(peer));
        assert_eq!(ids(&m), vec![2, 5, 6, 7]);
        // A newcomer that is itself to be evicted first goes first: 3 replaces 2 (3 is not
        // held yet), then 8 replaces 3; known peers and ourselves change nothing.
        m.add_all_passive([3, 5, 100, 8].map(peer), &[3, 2].map(peer));
        assert_eq!(ids(&m), vec![5, 6, 7, 8]);
        // Nothing to prefer: a random entry makes room.
        m.add_all_passive([10].map(peer), &[]);
        assert_eq!(m.passive.len(), 4);
        assert!(m.passive.contains(NodeId(10)));
    }

    #[test]
    fn a_node_refused_by_every_passive_node_asks_with_high_priority() {
        // Active view 2 of 3: one neighbour wanted. Passive view: 10, 11.
        let mut m = with_active(1, &[2, 3]);
        m.add_passive(peer(10));
        m.add_passive(peer(11));
        let refuse = |m: &mut Membership, from: u128| {
            m.handle_message(
                Time::ZERO,
                peer(from),
                MembershipMessage::NeighborReply { accepted: false },
            );
        };
        // Time passes; the two neighbours stay in touch.
        let tick = |m: &mut Membership, now: Time| {
            m.handle_message(now, peer(2), MembershipMessage::Pong);
            m.handle_message(now, peer(3), MembershipMessage::Pong);
            m.handle_timeout(now);
        };
        // A short view asks once per shuffle period; each passive node is asked once, with
        // low priority, before any is asked again.
        let mut now = Time::ZERO;
        let mut asked = Vec::new();
        for _ in 0..2 {
            now += config().shuffle_interval;
            tick(&mut m, now);
            let requests = neighbour_requests(&mut m);
            assert_eq!(requests.len(), 1, "{requests:?}");
            let (to, priority) = requests[0];
            assert_eq!(priority, Priority::Low);
            asked.push(to);
            refuse(&mut m, to);
        }
        asked.sort_unstable();
        assert_eq!(asked, vec![10, 11]);
        // Everyone refused: the next request makes the receiver find room.
        now += config().shuffle_interval;
        tick(&mut m, now);
        let requests = neighbour_requests(&mut m);
        assert!(
            matches!(requests[..], [(10 | 11, Priority::High)]),
            "{requests:?}"
        );
        refuse(&mut m, requests[0].0);
        assert_eq!(m.counters().escalations, 1);
        // The next escalation waits for two full rounds of refusals (the refused escalation
        // began the first), not one.
        let mut priorities = Vec::new();
        for _ in 0..5 {
            now += config().shuffle_interval;
            tick(&mut m, now);
            for (to, priority) in neighbour_requests(&mut m) {
                priorities.push(priority);
                refuse(&mut m, to);
            }
        }
        assert_eq!(
            priorities,
            vec![
                Priority::Low,
                Priority::Low,
                Priority::Low,
                Priority::High,
                Priority::Low
            ]
        );
    }

    #[test]
    fn lost_neighbour_is_retried_at_high_priority_after_backoff() {
        let mut m = with_active(1, &[2, 3]);
        m.handle_peer_down(Time::ZERO, NodeId(2));
        transmits(&mut m);
        events(&mut m);
        let retry = Time::ZERO + config().reconnect_backoff_min;
        m.handle_timeout(retry);
        let sent = transmits(&mut m);
        assert!(
            sent.contains(&(
                NodeId(2),
                MembershipMessage::Neighbor {
                    priority: Priority::High
                }
            )),
            "{sent:?}"
        );
        m.handle_message(
            retry,
            peer(2),
            MembershipMessage::NeighborReply { accepted: true },
        );
        assert_eq!(events(&mut m), vec![MembershipEvent::NeighborUp(peer(2))]);
        assert_eq!(m.counters().reconnected, 1);
    }

    #[test]
    fn views_never_exceed_their_bounds() {
        let mut m = node(1);
        for n in 2..100 {
            m.handle_message(Time::ZERO, peer(n), MembershipMessage::Join);
            m.handle_message(
                Time::ZERO,
                peer(n),
                MembershipMessage::ShuffleReply {
                    peers: vec![peer(n + 1000), peer(n + 2000)],
                    route: Vec::new(),
                },
            );
            assert!(m.active().len() <= 3);
            assert!(m.passive().len() <= 4);
        }
    }
}
