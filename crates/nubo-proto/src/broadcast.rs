//! Broadcast: Plumtree (Leitão, Pereira, Rodrigues, SRDS 2007) plus anti-entropy.
//!
//! Messages are pushed eagerly along a spanning tree embedded in the active views and announced
//! lazily (`IHave`) on the other links. A duplicate prunes the link it came over; a missing
//! message announced but not received within `graft_timeout` grafts the announcing link back into
//! the tree. Tree repair after failures therefore costs no extra protocol.
//!
//! Anti-entropy covers what the tree cannot: a node that joined late, restarted, or sat in a
//! partition pulls what it lacks from a random neighbour. Every `ae_interval` it sends a digest
//! (count and XOR-hash per bucket of message ids born in the retention window); the neighbour
//! lists its ids in the buckets that differ, and the node asks for those it lacks.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::rng::{Rng, splitmix64};
use crate::time::Time;

/// Largest payload a broadcast may carry.
pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024;
/// Most announcements in one `IHave`.
pub const IHAVE_MAX: usize = 1024;
/// Most ids in one `Graft`, `Ids` or `Want`.
pub const IDS_MAX: usize = 512;
/// Number of buckets in an anti-entropy digest.
pub const DIGEST_BUCKETS: usize = 32;
/// Most messages in one `Repair`.
pub const REPAIR_MESSAGES_MAX: usize = 64;
/// Most payload bytes in one `Repair`.
pub const REPAIR_BYTES_MAX: usize = 512 * 1024;

/// The identity of a broadcast: its origin and a sequence number unique at that origin.
///
/// The origin starts its sequence at the time it starts, so a restarted node never reuses the
/// id of a message it sent before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// The node that broadcast the message.
    pub origin: NodeId,
    /// Sequence number at the origin.
    pub seq: u64,
}

impl MessageId {
    /// A well-mixed 64-bit hash, stable across nodes and versions (used by digests).
    pub fn hash64(&self) -> u64 {
        let mut x = (self.origin.0 as u64) ^ ((self.origin.0 >> 64) as u64).rotate_left(29);
        x ^= self.seq.rotate_left(17);
        splitmix64(&mut x)
    }
}

/// A broadcast message in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gossip {
    /// Identity of the message.
    pub id: MessageId,
    /// When the origin sent it, by the origin's clock; bounds how long it is retained.
    pub born: Time,
    /// Hops travelled on arrival (1 for a message received from its origin).
    pub hops: u16,
    /// The application's bytes.
    pub payload: Bytes,
}

/// An `IHave` entry: "I have message `id`, it would reach you in `hops`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The message announced.
    pub id: MessageId,
    /// Hops it would have on arrival.
    pub hops: u16,
}

/// Count and XOR of id hashes of the messages falling in one digest bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketDigest {
    /// Messages in the bucket.
    pub count: u32,
    /// XOR of their [`MessageId::hash64`].
    pub hash: u64,
}

/// Messages of the broadcast protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum BroadcastMessage {
    /// Eager push of a message.
    Gossip(Gossip),
    /// Lazy push: announcements of messages the sender has.
    IHave(Vec<Announcement>),
    /// Adds the link to the tree again and asks for the listed messages.
    Graft(Vec<MessageId>),
    /// Removes the link from the tree (the receiver's pushes arrive as duplicates).
    Prune,
    /// Anti-entropy: digest of the ids born in `[from, to]`.
    Digest {
        /// Start of the window, inclusive.
        from: Time,
        /// End of the window, inclusive.
        to: Time,
        /// One entry per bucket, [`DIGEST_BUCKETS`] in all.
        buckets: Vec<BucketDigest>,
    },
    /// Anti-entropy: the ids the sender has in the buckets that differed.
    Ids(Vec<MessageId>),
    /// Anti-entropy: the ids the sender lacks.
    Want(Vec<MessageId>),
    /// Anti-entropy: messages sent on request; the receiver announces them lazily.
    Repair(Vec<Gossip>),
}

impl BroadcastMessage {
    /// Whether the message respects the size bounds a receiver enforces.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            BroadcastMessage::Gossip(g) => g.payload.len() <= PAYLOAD_BYTES_MAX,
            BroadcastMessage::IHave(list) => list.len() <= IHAVE_MAX,
            BroadcastMessage::Graft(ids)
            | BroadcastMessage::Ids(ids)
            | BroadcastMessage::Want(ids) => ids.len() <= IDS_MAX,
            BroadcastMessage::Prune => true,
            BroadcastMessage::Digest { buckets, .. } => buckets.len() == DIGEST_BUCKETS,
            BroadcastMessage::Repair(list) => {
                list.len() <= REPAIR_MESSAGES_MAX
                    && list.iter().map(|g| g.payload.len()).sum::<usize>() <= REPAIR_BYTES_MAX
            }
        }
    }
}

/// Tuning of the broadcast protocol.
#[derive(Clone, Debug)]
pub struct BroadcastConfig {
    /// Wait after the first announcement of a missing message before grafting (Plumtree's T1,
    /// drawn in `[T1, 2·T1)`); above the time a message takes to cross the tree, or healthy
    /// but slow paths get grafted and the tree churns.
    pub graft_timeout: Duration,
    /// Wait for a grafted message before asking the next announcer (T2).
    pub graft_retry: Duration,
    /// Duplicates in a row over a link before it is pruned from the tree (1 is the paper's
    /// rule; more keeps the tree whole when messages from many origins are in flight).
    pub prune_threshold: u8,
    /// When a neighbour announces a message we already have with at least this many hops
    /// fewer than our copy took, its link replaces our parent's in the tree (the paper's
    /// optimisation; it shortens a tree that repairs after failures left long). 0 turns it off.
    pub optimization_threshold: u16,
    /// Announcements to the same neighbour within this interval share one `IHave`.
    pub ihave_interval: Duration,
    /// Payloads are kept this long after their birth, to answer grafts and anti-entropy.
    /// Ids are kept twice as long, to recognise late duplicates.
    pub retention: Duration,
    /// Period of anti-entropy rounds.
    pub ae_interval: Duration,
    /// Messages younger than this are left to the tree, not to anti-entropy.
    pub ae_settle: Duration,
    /// Most messages remembered; the oldest are forgotten first.
    pub store_max: usize,
    /// Most missing messages tracked at once.
    pub missing_max: usize,
    /// Most announcers remembered per missing message.
    pub announcers_max: usize,
    /// Messages born further than this in the future are rejected.
    pub clock_skew_max: Duration,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        BroadcastConfig {
            graft_timeout: Duration::from_secs(1),
            graft_retry: Duration::from_millis(500),
            prune_threshold: 1,
            optimization_threshold: 4,
            ihave_interval: Duration::from_millis(20),
            retention: Duration::from_secs(120),
            ae_interval: Duration::from_secs(2),
            ae_settle: Duration::from_secs(1),
            store_max: 100_000,
            missing_max: 10_000,
            announcers_max: 8,
            clock_skew_max: Duration::from_secs(60),
        }
    }
}

/// What the broadcast layer hands to the application.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// Identity of the message.
    pub id: MessageId,
    /// When the origin sent it.
    pub born: Time,
    /// Hops it travelled (0 at the origin).
    pub hops: u16,
    /// The application's bytes.
    pub payload: Bytes,
}

/// Error from [`Broadcast::broadcast`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastError {
    /// The payload exceeds [`PAYLOAD_BYTES_MAX`].
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Size of the rejected payload.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Counters of what the broadcast layer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BroadcastCounters {
    /// Messages delivered to the application (including our own).
    pub delivered: u64,
    /// Eager pushes received that we already had.
    pub duplicates: u64,
    /// Grafts sent.
    pub grafts: u64,
    /// Prunes sent.
    pub prunes: u64,
    /// Messages recovered by anti-entropy.
    pub repaired: u64,
    /// Messages rejected as too old or born too far in the future.
    pub rejected: u64,
}

#[derive(Clone, Debug)]
struct Stored {
    born: Time,
    hops: u16,
    /// The neighbour that brought the first copy (none for our own and repaired messages).
    parent: Option<NodeId>,
    payload: Option<Bytes>,
}

/// The tree state of one neighbour link: in the tree (eager push both ways) or not (lazy
/// announcements both ways). Prunes and grafts keep both ends in agreement.
#[derive(Clone, Copy, Debug)]
struct Link {
    peer: Peer,
    eager: bool,
    /// Duplicates pushed over this link since it last brought a first copy.
    duplicates: u8,
}

#[derive(Clone, Debug)]
struct Missing {
    announcers: VecDeque<(Peer, u16)>,
    deadline: Time,
}

/// The Plumtree and anti-entropy state machine of one node.
///
/// Contract: the owner reports neighbour changes from membership
/// ([`Broadcast::neighbor_up`], [`Broadcast::neighbor_down`]), passes every broadcast message to
/// [`Broadcast::handle_message`], calls [`Broadcast::handle_timeout`] no later than
/// [`Broadcast::poll_timeout`], and after each call drains transmits and deliveries.
pub struct Broadcast {
    me: Peer,
    config: BroadcastConfig,
    rng: Rng,
    next_seq: u64,
    links: Vec<Link>,
    latest_parent: Option<NodeId>,
    store: BTreeMap<MessageId, Stored>,
    by_born: BTreeSet<(Time, MessageId)>,
    missing: BTreeMap<MessageId, Missing>,
    missing_deadlines: BTreeSet<(Time, MessageId)>,
    lazy_queue: BTreeMap<NodeId, (Peer, Vec<Announcement>)>,
    next_flush: Option<Time>,
    next_ae: Time,
    next_expire: Time,
    counters: BroadcastCounters,
    transmits: Vec<(Peer, BroadcastMessage)>,
    deliveries: Vec<Delivery>,
}

impl Broadcast {
    /// The broadcast layer of node `me`, started at `now`.
    pub fn new(me: Peer, config: BroadcastConfig, mut rng: Rng, now: Time) -> Broadcast {
        let ae_offset = Duration::from_micros(rng.below(micros(config.ae_interval).max(1)));
        Broadcast {
            me,
            next_seq: now.as_micros(),
            links: Vec::new(),
            latest_parent: None,
            store: BTreeMap::new(),
            by_born: BTreeSet::new(),
            missing: BTreeMap::new(),
            missing_deadlines: BTreeSet::new(),
            lazy_queue: BTreeMap::new(),
            next_flush: None,
            next_ae: now + ae_offset,
            next_expire: now + expire_interval(&config),
            counters: BroadcastCounters::default(),
            transmits: Vec::new(),
            deliveries: Vec::new(),
            config,
            rng,
        }
    }

    /// Neighbours we push messages to: our links in the tree.
    pub fn eager(&self) -> impl Iterator<Item = Peer> + '_ {
        self.links.iter().filter(|l| l.eager).map(|l| l.peer)
    }

    /// Neighbours we only announce messages to.
    pub fn lazy(&self) -> impl Iterator<Item = Peer> + '_ {
        self.links.iter().filter(|l| !l.eager).map(|l| l.peer)
    }

    /// What the layer did so far.
    pub fn counters(&self) -> BroadcastCounters {
        self.counters
    }

    /// Number of messages remembered (with or without payload).
    pub fn stored(&self) -> usize {
        self.store.len()
    }

    /// Whether message `id` was delivered here and is still remembered.
    pub fn has(&self, id: &MessageId) -> bool {
        self.store.contains_key(id)
    }

    /// Messages to send, in order.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, BroadcastMessage)> {
        self.transmits.drain(..)
    }

    /// Messages delivered, in order.
    pub fn drain_deliveries(&mut self) -> std::vec::Drain<'_, Delivery> {
        self.deliveries.drain(..)
    }

    /// The next time [`Broadcast::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Time {
        let mut next = self.next_ae.min(self.next_expire);
        if let Some(flush) = self.next_flush {
            next = next.min(flush);
        }
        if let Some((deadline, _)) = self.missing_deadlines.first() {
            next = next.min(*deadline);
        }
        next
    }

    /// `peer` became a neighbour: the link joins the tree (a cycle it closes is pruned by the
    /// first duplicate it carries).
    pub fn neighbor_up(&mut self, peer: Peer) {
        self.links.retain(|l| l.peer.id != peer.id);
        self.links.push(Link {
            peer,
            eager: true,
            duplicates: 0,
        });
    }

    /// `peer` is no longer a neighbour.
    pub fn neighbor_down(&mut self, peer: NodeId) {
        self.links.retain(|l| l.peer.id != peer);
        self.lazy_queue.remove(&peer);
        if self.latest_parent == Some(peer) {
            self.latest_parent = None;
        }
    }

    /// Broadcasts `payload` to every node; it is also delivered locally, with 0 hops.
    pub fn broadcast(&mut self, now: Time, payload: Bytes) -> Result<MessageId, BroadcastError> {
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(BroadcastError::PayloadTooLarge {
                len: payload.len(),
                max: PAYLOAD_BYTES_MAX,
            });
        }
        let id = MessageId {
            origin: self.me.id,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let gossip = Gossip {
            id,
            born: now,
            hops: 0,
            payload,
        };
        self.deliver(&gossip, None);
        self.push(now, &gossip, None);
        Ok(id)
    }

    /// Handles a broadcast message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: BroadcastMessage) {
        match message {
            BroadcastMessage::Gossip(gossip) => self.on_gossip(now, from, gossip),
            BroadcastMessage::IHave(announcements) => self.on_ihave(now, from, announcements),
            BroadcastMessage::Graft(ids) => self.on_graft(from, ids),
            BroadcastMessage::Prune => self.on_prune(from),
            BroadcastMessage::Digest {
                from: start,
                to: end,
                buckets,
            } => self.on_digest(from, start, end, &buckets),
            BroadcastMessage::Ids(ids) => self.on_ids(from, ids),
            BroadcastMessage::Want(ids) => self.on_want(from, ids),
            BroadcastMessage::Repair(messages) => self.on_repair(now, from, messages),
        }
    }

    /// Runs the timed work due at `now`: grafts, batched announcements, anti-entropy, expiry.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(&(deadline, id)) = self.missing_deadlines.first() {
            if deadline > now {
                break;
            }
            self.missing_deadlines.pop_first();
            self.graft_next(now, id);
        }
        if self.next_flush.is_some_and(|t| t <= now) {
            self.flush_announcements();
        }
        if now >= self.next_ae {
            self.next_ae = now + self.config.ae_interval;
            self.start_anti_entropy(now);
        }
        if now >= self.next_expire {
            self.next_expire = now + expire_interval(&self.config);
            self.expire(now);
        }
    }

    fn on_gossip(&mut self, now: Time, from: Peer, gossip: Gossip) {
        if self.store.contains_key(&gossip.id) {
            self.counters.duplicates += 1;
            // With several messages in flight from different origins, each could prune a
            // different link of the same cycle and cut this node off the tree: never prune the
            // link that brought our latest first copy, and allow a threshold of duplicates.
            if self.latest_parent == Some(from.id) {
                return;
            }
            let threshold = self.config.prune_threshold;
            if let Some(link) = self.link_mut(from.id)
                && link.eager
            {
                link.duplicates = link.duplicates.saturating_add(1);
                if link.duplicates < threshold {
                    return;
                }
                link.eager = false;
                link.duplicates = 0;
                self.counters.prunes += 1;
                self.send(from, BroadcastMessage::Prune);
            }
            return;
        }
        if !self.acceptable(now, gossip.born) {
            self.counters.rejected += 1;
            return;
        }
        self.deliver(&gossip, Some(from.id));
        if let Some(link) = self.link_mut(from.id) {
            link.duplicates = 0;
            self.latest_parent = Some(from.id);
        }
        self.push(now, &gossip, Some(from.id));
    }

    fn on_ihave(&mut self, now: Time, from: Peer, announcements: Vec<Announcement>) {
        for Announcement { id, hops } in announcements {
            if let Some(stored) = self.store.get(&id) {
                let (received, parent) = (stored.hops, stored.parent);
                self.consider_shortcut(from, hops, received, parent);
                continue;
            }
            if let Some(missing) = self.missing.get_mut(&id) {
                if missing.announcers.len() < self.config.announcers_max
                    && !missing.announcers.iter().any(|(p, _)| p.id == from.id)
                {
                    missing.announcers.push_back((from, hops));
                }
                continue;
            }
            if self.missing.len() >= self.config.missing_max {
                continue;
            }
            // Spread over [T, 2T) so that the nodes cut off together do not all graft at once.
            let spread =
                Duration::from_micros(self.rng.below(micros(self.config.graft_timeout).max(1)));
            let deadline = now + self.config.graft_timeout + spread;
            self.missing.insert(
                id,
                Missing {
                    announcers: VecDeque::from([(from, hops)]),
                    deadline,
                },
            );
            self.missing_deadlines.insert((deadline, id));
        }
    }

    /// The tree optimisation: `from` announced with `announced` hops a message that reached
    /// us in `received` hops from `parent`. If it is much closer to the origin, its link joins
    /// the tree and our parent's leaves it.
    fn consider_shortcut(
        &mut self,
        from: Peer,
        announced: u16,
        received: u16,
        parent: Option<NodeId>,
    ) {
        let threshold = self.config.optimization_threshold;
        if threshold == 0 || announced.saturating_add(threshold) > received {
            return;
        }
        let Some(parent) = parent.filter(|p| *p != from.id) else {
            return;
        };
        let Some(parent_peer) = self.link_mut(parent).map(|l| l.peer) else {
            return;
        };
        let Some(link) = self.link_mut(from.id) else {
            return;
        };
        if link.eager {
            return;
        }
        link.eager = true;
        link.duplicates = 0;
        self.send(from, BroadcastMessage::Graft(Vec::new()));
        if let Some(link) = self.link_mut(parent) {
            link.eager = false;
        }
        self.counters.prunes += 1;
        self.send(parent_peer, BroadcastMessage::Prune);
        self.latest_parent = Some(from.id);
    }

    fn on_graft(&mut self, from: Peer, ids: Vec<MessageId>) {
        if let Some(link) = self.link_mut(from.id) {
            link.eager = true;
        }
        for id in ids {
            if let Some(gossip) = self.stored_gossip(&id) {
                self.send(from, BroadcastMessage::Gossip(gossip));
            }
        }
    }

    fn on_prune(&mut self, from: Peer) {
        if let Some(link) = self.link_mut(from.id) {
            link.eager = false;
        }
    }

    fn on_digest(&mut self, from: Peer, start: Time, end: Time, theirs: &[BucketDigest]) {
        let ours = self.digest(start, end);
        let differing: Vec<bool> = ours.iter().zip(theirs).map(|(a, b)| a != b).collect();
        if !differing.iter().any(|d| *d) {
            return;
        }
        let ids: Vec<MessageId> = self
            .by_born
            .range((start, MIN_ID)..=(end, MAX_ID))
            .map(|(_, id)| *id)
            .filter(|id| differing[bucket_of(id)])
            .filter(|id| self.store.get(id).is_some_and(|s| s.payload.is_some()))
            .take(IDS_MAX)
            .collect();
        if !ids.is_empty() {
            self.send(from, BroadcastMessage::Ids(ids));
        }
    }

    fn on_ids(&mut self, from: Peer, ids: Vec<MessageId>) {
        let wanted: Vec<MessageId> = ids
            .into_iter()
            .filter(|id| !self.store.contains_key(id))
            .take(IDS_MAX)
            .collect();
        if !wanted.is_empty() {
            self.send(from, BroadcastMessage::Want(wanted));
        }
    }

    fn on_want(&mut self, from: Peer, ids: Vec<MessageId>) {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for id in ids {
            let Some(gossip) = self.stored_gossip(&id) else {
                continue;
            };
            if batch.len() == REPAIR_MESSAGES_MAX || bytes + gossip.payload.len() > REPAIR_BYTES_MAX
            {
                self.send(from, BroadcastMessage::Repair(std::mem::take(&mut batch)));
                bytes = 0;
            }
            bytes += gossip.payload.len();
            batch.push(gossip);
        }
        if !batch.is_empty() {
            self.send(from, BroadcastMessage::Repair(batch));
        }
    }

    fn on_repair(&mut self, now: Time, from: Peer, messages: Vec<Gossip>) {
        for gossip in messages {
            if self.store.contains_key(&gossip.id) {
                continue;
            }
            if !self.acceptable(now, gossip.born) {
                self.counters.rejected += 1;
                continue;
            }
            self.counters.repaired += 1;
            self.deliver(&gossip, None);
            // Announce rather than push: neighbours that have it would otherwise prune us.
            let announcement = Announcement {
                id: gossip.id,
                hops: gossip.hops.saturating_add(1),
            };
            let targets: Vec<Peer> = self
                .links
                .iter()
                .map(|l| l.peer)
                .filter(|p| p.id != from.id)
                .collect();
            for peer in targets {
                self.announce(now, peer, announcement);
            }
        }
    }

    /// Pushes `gossip` (as received, or fresh from us) to tree neighbours and announces it to
    /// the others, skipping `except`.
    fn push(&mut self, now: Time, gossip: &Gossip, except: Option<NodeId>) {
        let forwarded = Gossip {
            hops: gossip.hops.saturating_add(1),
            ..gossip.clone()
        };
        let targets: Vec<Link> = self
            .links
            .iter()
            .filter(|l| Some(l.peer.id) != except)
            .copied()
            .collect();
        let announcement = Announcement {
            id: gossip.id,
            hops: forwarded.hops,
        };
        for link in targets {
            if link.eager {
                self.send(link.peer, BroadcastMessage::Gossip(forwarded.clone()));
            } else {
                self.announce(now, link.peer, announcement);
            }
        }
    }

    fn announce(&mut self, now: Time, peer: Peer, announcement: Announcement) {
        let entry = self
            .lazy_queue
            .entry(peer.id)
            .or_insert_with(|| (peer, Vec::new()));
        entry.1.push(announcement);
        if entry.1.len() >= IHAVE_MAX {
            let (peer, list) = self
                .lazy_queue
                .remove(&peer.id)
                .unwrap_or((peer, Vec::new()));
            self.send(peer, BroadcastMessage::IHave(list));
        }
        if self.next_flush.is_none() {
            self.next_flush = Some(now + self.config.ihave_interval);
        }
    }

    fn flush_announcements(&mut self) {
        self.next_flush = None;
        let queued = std::mem::take(&mut self.lazy_queue);
        for (_, (peer, list)) in queued {
            let list: Vec<Announcement> = list
                .into_iter()
                .filter(|a| self.store.contains_key(&a.id))
                .collect();
            if !list.is_empty() {
                self.send(peer, BroadcastMessage::IHave(list));
            }
        }
    }

    fn graft_next(&mut self, now: Time, id: MessageId) {
        let Some(missing) = self.missing.get_mut(&id) else {
            return;
        };
        missing
            .announcers
            .retain(|(peer, _)| self.links.iter().any(|l| l.peer.id == peer.id));
        // Prefer an announcer already in the tree (grafted for another missing message): asking
        // it costs no new tree link, and several concurrent misses then heal the tree through
        // one graft instead of creating a cycle per message.
        let in_tree = missing
            .announcers
            .iter()
            .position(|(peer, _)| self.links.iter().any(|l| l.peer.id == peer.id && l.eager));
        let Some((peer, _)) = in_tree
            .and_then(|i| missing.announcers.remove(i))
            .or_else(|| missing.announcers.pop_front())
        else {
            // Nobody left to ask; anti-entropy will find it if it still exists.
            self.missing.remove(&id);
            return;
        };
        let deadline = now + self.config.graft_retry;
        missing.deadline = deadline;
        self.missing_deadlines.insert((deadline, id));
        if let Some(link) = self.link_mut(peer.id) {
            link.eager = true;
            link.duplicates = 0;
        }
        self.counters.grafts += 1;
        self.send(peer, BroadcastMessage::Graft(vec![id]));
    }

    fn start_anti_entropy(&mut self, now: Time) {
        let Some(peer) = self.rng.choose(&self.links).map(|l| l.peer) else {
            return;
        };
        let end = now.saturating_sub(self.config.ae_settle);
        let start = now.saturating_sub(self.config.retention) + self.config.ae_settle;
        if start > end {
            return;
        }
        let buckets = self.digest(start, end).to_vec();
        self.send(
            peer,
            BroadcastMessage::Digest {
                from: start,
                to: end,
                buckets,
            },
        );
    }

    fn digest(&self, start: Time, end: Time) -> [BucketDigest; DIGEST_BUCKETS] {
        let mut buckets = [BucketDigest::default(); DIGEST_BUCKETS];
        if start > end {
            return buckets;
        }
        for (_, id) in self.by_born.range((start, MIN_ID)..=(end, MAX_ID)) {
            let bucket = &mut buckets[bucket_of(id)];
            bucket.count = bucket.count.wrapping_add(1);
            bucket.hash ^= id.hash64();
        }
        buckets
    }

    fn expire(&mut self, now: Time) {
        let forget_before = now.saturating_sub(self.config.retention.saturating_mul(2));
        while let Some(&(born, id)) = self.by_born.first() {
            if born >= forget_before && self.by_born.len() <= self.config.store_max {
                break;
            }
            self.by_born.pop_first();
            self.store.remove(&id);
        }
        let drop_payload_before = now.saturating_sub(self.config.retention);
        for (_, id) in self.by_born.range(..(drop_payload_before, MIN_ID)) {
            if let Some(stored) = self.store.get_mut(id) {
                stored.payload = None;
            }
        }
    }

    /// A message born at `born` can be deduplicated reliably and is not from the future.
    fn acceptable(&self, now: Time, born: Time) -> bool {
        let oldest = now.saturating_sub(self.config.retention.saturating_mul(2));
        born >= oldest && born <= now + self.config.clock_skew_max
    }

    fn deliver(&mut self, gossip: &Gossip, parent: Option<NodeId>) {
        if let Some(missing) = self.missing.remove(&gossip.id) {
            self.missing_deadlines
                .remove(&(missing.deadline, gossip.id));
        }
        self.store.insert(
            gossip.id,
            Stored {
                born: gossip.born,
                hops: gossip.hops,
                parent,
                payload: Some(gossip.payload.clone()),
            },
        );
        self.by_born.insert((gossip.born, gossip.id));
        if self.store.len() > self.config.store_max
            && let Some((_, oldest)) = self.by_born.pop_first()
        {
            self.store.remove(&oldest);
        }
        self.counters.delivered += 1;
        self.deliveries.push(Delivery {
            id: gossip.id,
            born: gossip.born,
            hops: gossip.hops,
            payload: gossip.payload.clone(),
        });
    }

    fn stored_gossip(&self, id: &MessageId) -> Option<Gossip> {
        let stored = self.store.get(id)?;
        Some(Gossip {
            id: *id,
            born: stored.born,
            hops: stored.hops.saturating_add(1),
            payload: stored.payload.clone()?,
        })
    }

    fn link_mut(&mut self, id: NodeId) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.peer.id == id)
    }

    fn send(&mut self, to: Peer, message: BroadcastMessage) {
        self.transmits.push((to, message));
    }
}

const MIN_ID: MessageId = MessageId {
    origin: NodeId(0),
    seq: 0,
};
const MAX_ID: MessageId = MessageId {
    origin: NodeId(u128::MAX),
    seq: u64::MAX,
};

fn bucket_of(id: &MessageId) -> usize {
    (id.hash64() % DIGEST_BUCKETS as u64) as usize
}

fn micros(span: Duration) -> u64 {
    u64::try_from(span.as_micros()).unwrap_or(u64::MAX)
}

fn expire_interval(config: &BroadcastConfig) -> Duration {
    (config.retention / 8).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u128) -> Peer {
        Peer::new(NodeId(n))
    }

    fn config() -> BroadcastConfig {
        BroadcastConfig {
            graft_timeout: Duration::from_millis(100),
            graft_retry: Duration::from_millis(50),
            ihave_interval: Duration::from_millis(10),
            ..BroadcastConfig::default()
        }
    }

    fn node(me: u128, neighbours: &[u128]) -> Broadcast {
        let mut b = Broadcast::new(peer(me), config(), Rng::from_seed(7), Time::ZERO);
        // Anti-entropy rounds start only where a test asks for one.
        b.next_ae = Time::MAX;
        for &n in neighbours {
            b.neighbor_up(peer(n));
        }
        b
    }

    fn transmits(b: &mut Broadcast) -> Vec<(NodeId, BroadcastMessage)> {
        b.drain_transmits().map(|(p, m)| (p.id, m)).collect()
    }

    fn gossip(origin: u128, seq: u64, hops: u16) -> Gossip {
        Gossip {
            id: MessageId {
                origin: NodeId(origin),
                seq,
            },
            born: Time::ZERO,
            hops,
            payload: Bytes::from_static(b"hello"),
        }
    }

    fn at_millis(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    #[test]
    fn broadcast_is_delivered_locally_and_pushed_to_every_tree_neighbour() {
        let mut b = node(1, &[2, 3]);
        let id = b
            .broadcast(Time::ZERO, Bytes::from_static(b"hello"))
            .unwrap();
        let expected = Gossip {
            id,
            ..gossip(1, 0, 1)
        };
        assert_eq!(
            transmits(&mut b),
            vec![
                (NodeId(2), BroadcastMessage::Gossip(expected.clone())),
                (NodeId(3), BroadcastMessage::Gossip(expected)),
            ]
        );
        let delivered: Vec<Delivery> = b.drain_deliveries().collect();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].hops, 0);
    }

    #[test]
    fn first_copy_is_forwarded_and_a_duplicate_prunes_its_link() {
        let mut b = node(1, &[2, 3, 4]);
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 3)),
        );
        assert_eq!(
            transmits(&mut b),
            vec![
                (NodeId(3), BroadcastMessage::Gossip(gossip(9, 1, 4))),
                (NodeId(4), BroadcastMessage::Gossip(gossip(9, 1, 4))),
            ]
        );
        assert_eq!(b.drain_deliveries().count(), 1);
        b.handle_message(
            Time::ZERO,
            peer(3),
            BroadcastMessage::Gossip(gossip(9, 1, 2)),
        );
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Prune)]
        );
        assert_eq!(b.drain_deliveries().count(), 0);
        assert_eq!(b.lazy().map(|p| p.id).collect::<Vec<_>>(), vec![NodeId(3)]);
        // The link that brought the first copy is never pruned by a late duplicate.
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 3)),
        );
        assert!(transmits(&mut b).is_empty());
    }

    #[test]
    fn lazy_links_get_batched_announcements() {
        let mut b = node(1, &[2, 3]);
        b.handle_message(Time::ZERO, peer(3), BroadcastMessage::Prune);
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 1)),
        );
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 2, 1)),
        );
        assert!(
            transmits(&mut b).is_empty(),
            "3 is lazy and 2 sent the messages"
        );
        assert_eq!(b.poll_timeout(), at_millis(10));
        b.handle_timeout(at_millis(10));
        let announcements = vec![
            Announcement {
                id: gossip(9, 1, 0).id,
                hops: 2,
            },
            Announcement {
                id: gossip(9, 2, 0).id,
                hops: 2,
            },
        ];
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::IHave(announcements))]
        );
    }

    #[test]
    fn missing_message_is_grafted_from_its_announcer_then_the_next_one() {
        let mut b = node(1, &[2, 3]);
        let id = gossip(9, 1, 0).id;
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::IHave(vec![Announcement { id, hops: 2 }]),
        );
        b.handle_message(
            Time::ZERO,
            peer(3),
            BroadcastMessage::IHave(vec![Announcement { id, hops: 4 }]),
        );
        assert!(transmits(&mut b).is_empty());
        // The graft timer is drawn in [T, 2T).
        let deadline = b.poll_timeout();
        assert!(
            deadline >= at_millis(100) && deadline < at_millis(200),
            "{deadline}"
        );
        b.handle_timeout(deadline);
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(2), BroadcastMessage::Graft(vec![id]))]
        );
        // No answer within T2: ask the other announcer.
        b.handle_timeout(deadline + Duration::from_millis(50));
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Graft(vec![id]))]
        );
        assert_eq!(b.counters().grafts, 2);
    }

    #[test]
    fn graft_is_answered_with_the_message_and_puts_the_link_in_the_tree() {
        let mut b = node(1, &[2, 3]);
        b.handle_message(Time::ZERO, peer(3), BroadcastMessage::Prune);
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 1)),
        );
        transmits(&mut b);
        b.handle_message(
            Time::ZERO,
            peer(3),
            BroadcastMessage::Graft(vec![gossip(9, 1, 0).id]),
        );
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Gossip(gossip(9, 1, 2)))]
        );
        assert!(b.eager().any(|p| p.id == NodeId(3)));
    }

    #[test]
    fn anti_entropy_recovers_what_a_neighbour_missed() {
        let mut full = node(1, &[2]);
        let mut behind = node(2, &[1]);
        let now = Time::from_millis(10_000);
        for seq in 0..3 {
            let mut g = gossip(9, seq, 1);
            g.born = Time::from_millis(5_000);
            full.handle_message(g.born, peer(7), BroadcastMessage::Gossip(g.clone()));
            if seq == 0 {
                behind.handle_message(g.born, peer(7), BroadcastMessage::Gossip(g));
            }
        }
        transmits(&mut full);
        transmits(&mut behind);
        behind.drain_deliveries().count();

        // `behind` sends its digest; `full` lists what differs; `behind` asks; `full` repairs.
        behind.next_ae = now;
        behind.handle_timeout(now);
        let mut to_full = transmits(&mut behind);
        assert!(matches!(
            to_full.last(),
            Some((NodeId(1), BroadcastMessage::Digest { .. }))
        ));
        let (_, digest) = to_full.pop().unwrap();
        full.handle_message(now, peer(2), digest);
        let (_, ids) = transmits(&mut full).pop().unwrap();
        let BroadcastMessage::Ids(listed) = &ids else {
            panic!("{ids:?}")
        };
        assert!(!listed.is_empty());
        behind.handle_message(now, peer(1), ids);
        let (_, want) = transmits(&mut behind).pop().unwrap();
        assert_eq!(
            want,
            BroadcastMessage::Want(vec![gossip(9, 1, 0).id, gossip(9, 2, 0).id])
        );
        full.handle_message(now, peer(2), want);
        let (_, repair) = transmits(&mut full).pop().unwrap();
        behind.handle_message(now, peer(1), repair);
        let recovered: Vec<u64> = behind.drain_deliveries().map(|d| d.id.seq).collect();
        assert_eq!(recovered, vec![1, 2]);
        assert_eq!(behind.counters().repaired, 2);
    }

    #[test]
    fn old_and_future_messages_are_rejected() {
        let mut b = node(1, &[2]);
        let now = Time::from_millis(1_000_000);
        let mut old = gossip(9, 1, 1);
        old.born = Time::from_millis(1);
        b.handle_message(now, peer(2), BroadcastMessage::Gossip(old));
        let mut future = gossip(9, 2, 1);
        future.born = now + Duration::from_secs(3_600);
        b.handle_message(now, peer(2), BroadcastMessage::Gossip(future));
        assert_eq!(b.drain_deliveries().count(), 0);
        assert_eq!(b.counters().rejected, 2);
    }

    #[test]
    fn payloads_expire_after_retention_and_ids_after_twice_that() {
        let mut b = node(1, &[2]);
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 1)),
        );
        let retention = config().retention;
        b.handle_timeout(Time::ZERO + retention + Duration::from_secs(1));
        assert!(b.has(&gossip(9, 1, 0).id));
        assert!(b.stored_gossip(&gossip(9, 1, 0).id).is_none());
        b.handle_timeout(Time::ZERO + retention * 2 + Duration::from_secs(1));
        assert!(!b.has(&gossip(9, 1, 0).id));
    }

    #[test]
    fn oversized_payload_is_refused() {
        let mut b = node(1, &[2]);
        let payload = Bytes::from(vec![0u8; PAYLOAD_BYTES_MAX + 1]);
        assert!(matches!(
            b.broadcast(Time::ZERO, payload),
            Err(BroadcastError::PayloadTooLarge { .. })
        ));
    }
}
