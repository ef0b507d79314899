//! Broadcast: every message reaches every node, once, quickly and cheaply.
//!
//! Two ways of spreading a message, chosen by [`Dissemination`] (measured side by side in
//! docs/BENCHMARKS.md):
//! - **Pull** (the default): a node that has a message announces it (`IHave`) to each
//!   neighbour not known to have it, and a node that lacks it grafts the first announcer at
//!   once. Every node receives each payload once, over the quickest path of the overlay, so
//!   the hop count is about the overlay's distance; each hop costs an announcement and a graft
//!   besides the payload. No tree is kept.
//! - **Tree**: Plumtree's split (Leitão, Pereira, Rodrigues, SRDS 2007). Payloads are pushed
//!   eagerly along a spanning tree of the overlay and announced lazily on the other links; a
//!   node that hears of a message it has not received within `graft_timeout` grafts the
//!   announcing link and gets it from there. One transmission per hop, but paths through a
//!   tree are about half again as long as overlay distances.
//!
//! Two changes to Plumtree, both measured:
//! - the tree is not shaped by prunes on duplicates but built in epochs as a shortest-hop
//!   tree ([`tree`]), so it neither drifts into detours nor tears when messages from many
//!   origins cross;
//! - a message floods the overlay for its first [`BroadcastConfig::flood_hops`] hops before
//!   following the tree, so it enters the tree at several places at once.
//!
//! Anti-entropy covers what pushing cannot: a node that joined late, restarted, or sat in a
//! partition pulls what it lacks from a random neighbour. Every `ae_interval` it sends a
//! summary (count and XOR-hash of the message ids born in the retention window, 20 bytes); a
//! neighbour whose own summary differs says so, and only then gets the digest (the same per
//! bucket), lists its ids in the buckets that differ, and the node asks for those it lacks. A
//! quiet cloud, where every store agrees, pays one summary per round.

mod store;
pub mod tree;

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::rng::{Rng, splitmix64};
use crate::time::Time;
use store::MessageStore;
pub use tree::{Epoch, SpanningTree, TreeConfig, TreeMessage};

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

/// The bit that marks a sequence number as named by content rather than counted by the
/// origin (an origin's counter, started at its start time in microseconds, never reaches it).
const NAMED_SEQ: u64 = 1 << 63;

impl MessageId {
    /// The id of news about `subject` whose content is summed up by `key`: every node that
    /// publishes the same news names it alike, so the copies are one message to the broadcast
    /// (delivered once, stored once). Keys above 2⁶³ - 1 are cut to it.
    pub fn named(subject: NodeId, key: u64) -> MessageId {
        MessageId {
            origin: subject,
            seq: NAMED_SEQ | key.min(NAMED_SEQ - 1),
        }
    }

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
    /// Asks for the listed messages and makes the link a repair link of the tree until the
    /// next epoch (an empty list only adds the link).
    Graft(Vec<MessageId>),
    /// Builds the dissemination tree.
    Tree(TreeMessage),
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
    /// Anti-entropy: the fold of every bucket of the digest of `[from, to]`.
    Summary {
        /// Start of the window, inclusive.
        from: Time,
        /// End of the window, inclusive.
        to: Time,
        /// Count and XOR-hash of all ids born in the window.
        all: BucketDigest,
    },
    /// Anti-entropy: the receiver's summary of `[from, to]` differs from the sender's; it
    /// wants the digest.
    Differs {
        /// Start of the window, inclusive.
        from: Time,
        /// End of the window, inclusive.
        to: Time,
    },
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
            BroadcastMessage::Tree(_)
            | BroadcastMessage::Summary { .. }
            | BroadcastMessage::Differs { .. } => true,
            BroadcastMessage::Digest { buckets, .. } => buckets.len() == DIGEST_BUCKETS,
            BroadcastMessage::Repair(list) => {
                list.len() <= REPAIR_MESSAGES_MAX
                    && list.iter().map(|g| g.payload.len()).sum::<usize>() <= REPAIR_BYTES_MAX
            }
        }
    }
}

/// How a payload travels once it is past its first [`BroadcastConfig::flood_hops`] hops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dissemination {
    /// Announced to every neighbour not known to have it; a node that lacks it grafts the
    /// first announcer at once. Hops as few as the overlay allows (a third fewer than a tree's), no
    /// duplicate payloads, no tree to keep up; each hop costs three transmissions in a row
    /// (announcement, graft, payload) instead of one.
    #[default]
    Pull,
    /// Pushed along the spanning tree, announced on the other links, grafted only after
    /// `graft_timeout` (Plumtree). One transmission per hop along longer paths.
    Tree,
}

impl core::fmt::Display for Dissemination {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Dissemination::Pull => "pull",
            Dissemination::Tree => "tree",
        })
    }
}

impl core::str::FromStr for Dissemination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "pull" => Ok(Dissemination::Pull),
            "tree" => Ok(Dissemination::Tree),
            other => Err(format!("unknown dissemination {other:?}: use pull or tree")),
        }
    }
}

/// Tuning of the broadcast protocol.
#[derive(Clone, Debug)]
pub struct BroadcastConfig {
    /// How payloads travel past the first hops.
    pub dissemination: Dissemination,
    /// The dissemination tree (used with [`Dissemination::Tree`] only).
    pub tree: TreeConfig,
    /// A message is pushed over every overlay link for its first `flood_hops` hops, then
    /// along the tree; every node reached at hop `flood_hops` pushes it down the tree from
    /// where it stands, so the message enters the tree at several places at once. Each extra
    /// hop multiplies the extra copies by the active-view size; 1 (the origin tells all its
    /// neighbours) costs a handful of copies at any cloud size.
    pub flood_hops: u16,
    /// With [`Dissemination::Tree`], wait after the first announcement of a missing message
    /// before grafting (Plumtree's T1, drawn in `[T1, 2·T1)`); above the time a message takes
    /// to cross the tree, or healthy but slow paths get grafted. Pull grafts at once.
    pub graft_timeout: Duration,
    /// Wait for a grafted message before asking the next announcer (T2).
    pub graft_retry: Duration,
    /// At most one batch of `IHave`s leaves per interval: the first announcement after a
    /// quiet spell goes at once, later ones wait for the interval to end and share a message.
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
    /// Most bytes of remembered messages (payloads, plus a fixed cost per message); the
    /// oldest are forgotten first.
    pub store_bytes_max: usize,
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
            dissemination: Dissemination::default(),
            tree: TreeConfig::default(),
            flood_hops: 1,
            graft_timeout: Duration::from_secs(1),
            graft_retry: Duration::from_millis(500),
            ihave_interval: Duration::from_millis(20),
            retention: Duration::from_secs(120),
            // Pushing and announcing deliver nearly everything; anti-entropy repairs what a
            // node missed while cut off, and need not run often.
            ae_interval: Duration::from_secs(10),
            ae_settle: Duration::from_secs(1),
            store_max: 100_000,
            store_bytes_max: 64 << 20,
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
    /// Messages recovered by anti-entropy.
    pub repaired: u64,
    /// Messages rejected as too old or born too far in the future.
    pub rejected: u64,
}

#[derive(Clone, Debug)]
struct Missing {
    announcers: VecDeque<(Peer, u16)>,
    deadline: Time,
}

/// The broadcast state machine of one node.
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
    neighbors: Vec<Peer>,
    /// Kept with [`Dissemination::Tree`] only.
    tree: Option<SpanningTree>,
    store: MessageStore,
    missing: BTreeMap<MessageId, Missing>,
    missing_deadlines: BTreeSet<(Time, MessageId)>,
    lazy_queue: BTreeMap<NodeId, (Peer, Vec<Announcement>)>,
    next_flush: Option<Time>,
    /// Announcements queued before this time wait for it: at most one batch per
    /// `ihave_interval`, but the first after a quiet spell goes at once.
    quiet_from: Time,
    next_ae: Time,
    /// Anti-entropy rounds still to run early, after this node got a neighbour again.
    catch_up: u8,
    /// Ids listed in answers to digests so far: where the next answer starts.
    ids_listed: usize,
    next_expire: Time,
    counters: BroadcastCounters,
    transmits: Vec<(Peer, BroadcastMessage)>,
    deliveries: Vec<Delivery>,
}

impl Broadcast {
    /// The broadcast layer of node `me`, started at `now`.
    pub fn new(me: Peer, config: BroadcastConfig, mut rng: Rng, now: Time) -> Broadcast {
        let ae_offset = Duration::from_micros(rng.below(micros(config.ae_interval).max(1)));
        let tree_rng = rng.fork();
        let tree = (config.dissemination == Dissemination::Tree)
            .then(|| SpanningTree::new(me, config.tree.clone(), tree_rng, now));
        Broadcast {
            me,
            next_seq: now.as_micros(),
            neighbors: Vec::new(),
            tree,
            store: MessageStore::new(config.retention, config.store_max, config.store_bytes_max),
            missing: BTreeMap::new(),
            missing_deadlines: BTreeSet::new(),
            lazy_queue: BTreeMap::new(),
            next_flush: None,
            quiet_from: now,
            next_ae: now + ae_offset,
            catch_up: 0,
            ids_listed: 0,
            next_expire: now + expire_interval(&config),
            counters: BroadcastCounters::default(),
            transmits: Vec::new(),
            deliveries: Vec::new(),
            config,
            rng,
        }
    }

    /// The dissemination tree, for inspection (`None` unless [`Dissemination::Tree`]).
    pub fn tree(&self) -> Option<&SpanningTree> {
        self.tree.as_ref()
    }

    /// Neighbours messages are pushed to: our links in the tree (none when pulling).
    pub fn eager(&self) -> impl Iterator<Item = Peer> + '_ {
        self.neighbors
            .iter()
            .filter(|p| self.is_tree_link(p.id))
            .copied()
    }

    /// Neighbours messages are only announced to.
    pub fn lazy(&self) -> impl Iterator<Item = Peer> + '_ {
        self.neighbors
            .iter()
            .filter(|p| !self.is_tree_link(p.id))
            .copied()
    }

    fn is_tree_link(&self, peer: NodeId) -> bool {
        self.tree.as_ref().is_some_and(|t| t.is_tree_link(peer))
    }

    /// What the layer did so far.
    pub fn counters(&self) -> BroadcastCounters {
        self.counters
    }

    /// Bytes the store of delivered messages holds, as its bound counts them.
    pub fn stored_bytes(&self) -> usize {
        self.store.bytes()
    }

    /// Number of messages remembered (with or without payload).
    pub fn stored(&self) -> usize {
        self.store.len()
    }

    /// Whether message `id` was delivered here and is still remembered.
    pub fn has(&self, id: &MessageId) -> bool {
        self.store.contains(id)
    }

    /// Messages to send, in order.
    pub fn drain_transmits(&mut self) -> std::vec::IntoIter<(Peer, BroadcastMessage)> {
        if let Some(tree) = &mut self.tree {
            let built = tree
                .drain_transmits()
                .map(|(to, m)| (to, BroadcastMessage::Tree(m)));
            self.transmits.extend(built);
        }
        // The buffer goes with the drain (why: `pop_and_free_when_drained` in node.rs).
        std::mem::take(&mut self.transmits).into_iter()
    }

    /// Messages delivered, in order.
    pub fn drain_deliveries(&mut self) -> std::vec::IntoIter<Delivery> {
        std::mem::take(&mut self.deliveries).into_iter()
    }

    /// Whether deliveries wait to be drained.
    pub fn has_deliveries(&self) -> bool {
        !self.deliveries.is_empty()
    }

    /// The next time [`Broadcast::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Time {
        let mut next = self.next_ae.min(self.next_expire);
        if let Some(tree) = &self.tree {
            next = next.min(tree.poll_timeout());
        }
        if let Some(flush) = self.next_flush {
            next = next.min(flush);
        }
        if let Some((deadline, _)) = self.missing_deadlines.first() {
            next = next.min(*deadline);
        }
        next
    }

    /// `peer` became a neighbour. It hears of the messages of the last moments (a wave that
    /// passed while links were being rewired, as when many nodes join at once, would
    /// otherwise miss it until anti-entropy). A node that had no neighbour (it just joined,
    /// or was cut off) missed whatever spread meanwhile: it runs anti-entropy soon, twice,
    /// rather than within `ae_interval`.
    pub fn neighbor_up(&mut self, now: Time, peer: Peer) {
        self.neighbors.retain(|p| p.id != peer.id);
        if self.neighbors.is_empty() {
            self.catch_up = CATCH_UP_ROUNDS;
            self.next_ae = self.next_ae.min(now + catch_up_delay(&self.config));
        }
        self.neighbors.push(peer);
        let since = now.saturating_sub(catch_up_delay(&self.config).saturating_mul(2));
        for (id, hops) in self.store.born_since(since, IHAVE_MAX) {
            let hops = hops.saturating_add(1);
            self.announce(now, peer, Announcement { id, hops });
        }
        if let Some(tree) = &mut self.tree {
            tree.neighbor_up(peer);
        }
    }

    /// `peer` is no longer a neighbour.
    pub fn neighbor_down(&mut self, now: Time, peer: NodeId) {
        self.neighbors.retain(|p| p.id != peer);
        self.lazy_queue.remove(&peer);
        if let Some(tree) = &mut self.tree {
            tree.neighbor_down(now, peer);
        }
    }

    /// Broadcasts `payload` to every node; it is also delivered locally, with 0 hops.
    pub fn broadcast(&mut self, now: Time, payload: Bytes) -> Result<MessageId, BroadcastError> {
        let id = MessageId {
            origin: self.me.id,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.publish(now, id, payload)
    }

    /// Broadcasts `payload` under an id named by its content (see [`MessageId::named`]), so
    /// that nodes publishing the same news at once spread one message, not one each. Nothing
    /// is sent if a message of that id was already delivered here.
    pub fn broadcast_named(
        &mut self,
        now: Time,
        id: MessageId,
        payload: Bytes,
    ) -> Result<MessageId, BroadcastError> {
        if self.store.contains(&id) {
            return Ok(id);
        }
        self.publish(now, id, payload)
    }

    fn publish(
        &mut self,
        now: Time,
        id: MessageId,
        payload: Bytes,
    ) -> Result<MessageId, BroadcastError> {
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(BroadcastError::PayloadTooLarge {
                len: payload.len(),
                max: PAYLOAD_BYTES_MAX,
            });
        }
        let gossip = Gossip {
            id,
            born: now,
            hops: 0,
            payload,
        };
        self.deliver(&gossip);
        self.push(now, &gossip, None, &[]);
        Ok(id)
    }

    /// Handles a broadcast message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: BroadcastMessage) {
        match message {
            BroadcastMessage::Gossip(gossip) => self.on_gossip(now, from, gossip),
            BroadcastMessage::IHave(announcements) => self.on_ihave(now, from, announcements),
            BroadcastMessage::Graft(ids) => self.on_graft(from, ids),
            BroadcastMessage::Tree(message) => {
                // A node spreading by pulls keeps no tree and ignores those of its neighbours.
                if let Some(tree) = &mut self.tree {
                    tree.handle_message(now, from, message);
                }
            }
            BroadcastMessage::Digest {
                from: start,
                to: end,
                buckets,
            } => self.on_digest(from, start, end, &buckets),
            BroadcastMessage::Ids(ids) => self.on_ids(from, ids),
            BroadcastMessage::Want(ids) => self.on_want(from, ids),
            BroadcastMessage::Repair(messages) => self.on_repair(now, from, messages),
            BroadcastMessage::Summary {
                from: start,
                to: end,
                all,
            } => {
                if fold(&self.store.digest(start, end)) != all {
                    self.send(
                        from,
                        BroadcastMessage::Differs {
                            from: start,
                            to: end,
                        },
                    );
                }
            }
            BroadcastMessage::Differs {
                from: start,
                to: end,
            } => {
                // Only a window that our own rounds could have asked about: a peer cannot make
                // us compute digests of the future or of what we no longer hold (ids are kept
                // twice the retention).
                let oldest = now.saturating_sub(self.config.retention.saturating_mul(2));
                if start <= end && start >= oldest && end <= now {
                    let buckets = self.store.digest(start, end).to_vec();
                    self.send(
                        from,
                        BroadcastMessage::Digest {
                            from: start,
                            to: end,
                            buckets,
                        },
                    );
                }
            }
        }
    }

    /// Runs the timed work due at `now`: grafts, batched announcements, the tree's epochs,
    /// anti-entropy and expiry.
    pub fn handle_timeout(&mut self, now: Time) {
        while let Some(&(deadline, id)) = self.missing_deadlines.first() {
            if deadline > now {
                break;
            }
            self.missing_deadlines.pop_first();
            self.graft_next(now, id);
        }
        if self.next_flush.is_some_and(|t| t <= now) {
            self.flush_announcements(now);
        }
        if let Some(tree) = &mut self.tree
            && tree.poll_timeout() <= now
        {
            tree.handle_timeout(now);
        }
        if now >= self.next_ae {
            self.next_ae = if self.catch_up > 0 {
                self.catch_up -= 1;
                now + catch_up_delay(&self.config)
            } else {
                now + self.config.ae_interval
            };
            self.start_anti_entropy(now);
        }
        if now >= self.next_expire {
            self.next_expire = now + expire_interval(&self.config);
            self.store.expire(now);
        }
    }

    fn on_gossip(&mut self, now: Time, from: Peer, gossip: Gossip) {
        if self.store.contains(&gossip.id) {
            // Duplicates are expected where copies entering the tree at different places
            // meet; they never change the tree.
            self.counters.duplicates += 1;
            return;
        }
        if !self.acceptable(now, gossip.born) {
            self.counters.rejected += 1;
            return;
        }
        let holders = self.deliver(&gossip);
        self.push(now, &gossip, Some(from.id), &holders);
    }

    fn on_ihave(&mut self, now: Time, from: Peer, announcements: Vec<Announcement>) {
        for Announcement { id, hops } in announcements {
            if self.store.contains(&id) {
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
            let deadline = match self.config.dissemination {
                Dissemination::Pull => now,
                Dissemination::Tree => {
                    // Spread over [T, 2T) so that the nodes cut off together do not all graft
                    // at once.
                    let timeout = self.config.graft_timeout;
                    let spread = Duration::from_micros(self.rng.below(micros(timeout).max(1)));
                    now + timeout + spread
                }
            };
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

    fn on_graft(&mut self, from: Peer, ids: Vec<MessageId>) {
        if let Some(tree) = &mut self.tree {
            tree.mark_repair(from.id);
        }
        for id in ids {
            if let Some(gossip) = self.store.forwardable(&id) {
                self.send(from, BroadcastMessage::Gossip(gossip));
            }
        }
    }

    fn on_digest(&mut self, from: Peer, start: Time, end: Time, theirs: &[BucketDigest]) {
        let ours = self.store.digest(start, end);
        let mut differing = [false; DIGEST_BUCKETS];
        for (flag, (a, b)) in differing.iter_mut().zip(ours.iter().zip(theirs)) {
            *flag = a != b;
        }
        if !differing.contains(&true) {
            return;
        }
        // More ids may differ than one answer lists: each answer starts where the last left
        // off, so a node that lacks many gets them all over a few rounds.
        let ids = self
            .store
            .ids_in_buckets(start, end, &differing, IDS_MAX, self.ids_listed);
        self.ids_listed = self.ids_listed.wrapping_add(ids.len());
        if !ids.is_empty() {
            self.send(from, BroadcastMessage::Ids(ids));
        }
    }

    fn on_ids(&mut self, from: Peer, ids: Vec<MessageId>) {
        let wanted: Vec<MessageId> = ids
            .into_iter()
            .filter(|id| !self.store.contains(id))
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
            let Some(gossip) = self.store.forwardable(&id) else {
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
            if self.store.contains(&gossip.id) {
                continue;
            }
            if !self.acceptable(now, gossip.born) {
                self.counters.rejected += 1;
                continue;
            }
            self.counters.repaired += 1;
            let holders = self.deliver(&gossip);
            // Announce rather than push: most neighbours have it already.
            let announcement = Announcement {
                id: gossip.id,
                hops: gossip.hops.saturating_add(1),
            };
            for peer in self.targets(Some(from.id), &holders) {
                self.announce(now, peer, announcement);
            }
        }
    }

    /// Forwards `gossip` (as received, or fresh from us), skipping `except` and the `holders`
    /// that announced it to us: to every neighbour while it is within `flood_hops` of its
    /// origin; then pushed to tree links and announced on the others (tree), or announced to
    /// all (pull).
    fn push(&mut self, now: Time, gossip: &Gossip, except: Option<NodeId>, holders: &[NodeId]) {
        let flooding = gossip.hops < self.config.flood_hops;
        let forwarded = Gossip {
            hops: gossip.hops.saturating_add(1),
            ..gossip.clone()
        };
        let announcement = Announcement {
            id: gossip.id,
            hops: forwarded.hops,
        };
        for peer in self.targets(except, holders) {
            if flooding || self.is_tree_link(peer.id) {
                self.send(peer, BroadcastMessage::Gossip(forwarded.clone()));
            } else {
                self.announce(now, peer, announcement);
            }
        }
    }

    /// The neighbours a message is passed on to: all but its sender and those that announced
    /// it to us.
    fn targets(&self, except: Option<NodeId>, holders: &[NodeId]) -> Vec<Peer> {
        self.neighbors
            .iter()
            .filter(|p| Some(p.id) != except && !holders.contains(&p.id))
            .copied()
            .collect()
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
            self.next_flush = Some(now.max(self.quiet_from));
        }
    }

    fn flush_announcements(&mut self, now: Time) {
        self.next_flush = None;
        self.quiet_from = now + self.config.ihave_interval;
        let queued = std::mem::take(&mut self.lazy_queue);
        for (_, (peer, list)) in queued {
            if !list.is_empty() {
                self.send(peer, BroadcastMessage::IHave(list));
            }
        }
    }

    fn graft_next(&mut self, now: Time, id: MessageId) {
        let Some(missing) = self.missing.get_mut(&id) else {
            return;
        };
        let neighbors = &self.neighbors;
        missing
            .announcers
            .retain(|(peer, _)| neighbors.iter().any(|p| p.id == peer.id));
        // Prefer an announcer already in the tree (a parent, a child, or grafted for another
        // missing message): several concurrent misses then heal through one link.
        let tree = self.tree.as_ref();
        let in_tree = missing
            .announcers
            .iter()
            .position(|(peer, _)| tree.is_some_and(|t| t.is_tree_link(peer.id)));
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
        if let Some(tree) = &mut self.tree {
            tree.mark_repair(peer.id);
        }
        self.counters.grafts += 1;
        self.send(peer, BroadcastMessage::Graft(vec![id]));
    }

    fn start_anti_entropy(&mut self, now: Time) {
        let Some(peer) = self.rng.choose(&self.neighbors).copied() else {
            return;
        };
        let end = now.saturating_sub(self.config.ae_settle);
        let start = now.saturating_sub(self.config.retention) + self.config.ae_settle;
        if start > end {
            return;
        }
        let all = fold(&self.store.digest(start, end));
        self.send(
            peer,
            BroadcastMessage::Summary {
                from: start,
                to: end,
                all,
            },
        );
    }

    /// A message born at `born` can be deduplicated reliably and is not from the future.
    fn acceptable(&self, now: Time, born: Time) -> bool {
        self.store.is_recent(now, born) && born <= now + self.config.clock_skew_max
    }

    /// Delivers `gossip` and returns the neighbours that announced it (they need no copy).
    fn deliver(&mut self, gossip: &Gossip) -> Vec<NodeId> {
        let mut holders = Vec::new();
        if let Some(missing) = self.missing.remove(&gossip.id) {
            self.missing_deadlines
                .remove(&(missing.deadline, gossip.id));
            holders.extend(missing.announcers.iter().map(|(peer, _)| peer.id));
        }
        self.store.insert(gossip);
        self.counters.delivered += 1;
        self.deliveries.push(Delivery {
            id: gossip.id,
            born: gossip.born,
            hops: gossip.hops,
            payload: gossip.payload.clone(),
        });
        holders
    }

    fn send(&mut self, to: Peer, message: BroadcastMessage) {
        self.transmits.push((to, message));
    }
}

/// The digest of a window folded into one bucket: equal stores fold equal.
fn fold(buckets: &[BucketDigest]) -> BucketDigest {
    buckets
        .iter()
        .fold(BucketDigest::default(), |all, b| BucketDigest {
            count: all.count.wrapping_add(b.count),
            hash: all.hash ^ b.hash,
        })
}

fn micros(span: Duration) -> u64 {
    u64::try_from(span.as_micros()).unwrap_or(u64::MAX)
}

/// Anti-entropy rounds that follow the first early one after a node got a neighbour again.
const CATCH_UP_ROUNDS: u8 = 1;

/// Wait before an early anti-entropy round: what spread before the node had a neighbour is
/// then old enough to be compared (`ae_settle`), and its first neighbours are in place.
fn catch_up_delay(config: &BroadcastConfig) -> Duration {
    config.ae_settle.saturating_mul(2)
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

    fn config(dissemination: Dissemination, flood_hops: u16) -> BroadcastConfig {
        BroadcastConfig {
            dissemination,
            flood_hops,
            graft_timeout: Duration::from_millis(100),
            graft_retry: Duration::from_millis(50),
            ihave_interval: Duration::from_millis(10),
            ..BroadcastConfig::default()
        }
    }

    /// A node spreading by tree (Plumtree).
    fn node(me: u128, neighbours: &[u128], flood_hops: u16) -> Broadcast {
        node_with(me, neighbours, config(Dissemination::Tree, flood_hops))
    }

    /// A node spreading by pulls.
    fn pull_node(me: u128, neighbours: &[u128], flood_hops: u16) -> Broadcast {
        node_with(me, neighbours, config(Dissemination::Pull, flood_hops))
    }

    fn node_with(me: u128, neighbours: &[u128], config: BroadcastConfig) -> Broadcast {
        let mut b = Broadcast::new(peer(me), config, Rng::from_seed(7), Time::ZERO);
        // Anti-entropy rounds and tree epochs start only where a test asks for them.
        b.next_ae = Time::MAX;
        for &n in neighbours {
            b.neighbor_up(Time::ZERO, peer(n));
        }
        b
    }

    /// Makes `parent` our parent in a tree rooted elsewhere.
    fn attach(b: &mut Broadcast, parent: u128) {
        let epoch = Epoch {
            number: 1,
            root: NodeId(999),
        };
        b.handle_message(
            Time::ZERO,
            peer(parent),
            BroadcastMessage::Tree(TreeMessage::Beacon { epoch, hops: 1 }),
        );
    }

    /// Transmits other than tree-building ones.
    fn transmits(b: &mut Broadcast) -> Vec<(NodeId, BroadcastMessage)> {
        b.drain_transmits()
            .filter(|(_, m)| !matches!(m, BroadcastMessage::Tree(_)))
            .map(|(p, m)| (p.id, m))
            .collect()
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

    /// Broadcasts from node 1, whose neighbours are 2 and 3, checks that both get the payload
    /// (the first hop always floods) and returns the copy they got.
    fn broadcast_from_1_to_2_and_3(origin: &mut Broadcast) -> Gossip {
        let id = origin
            .broadcast(Time::ZERO, Bytes::from_static(b"hello"))
            .unwrap();
        let first = Gossip {
            id,
            ..gossip(1, 0, 1)
        };
        assert_eq!(
            transmits(origin),
            vec![
                (NodeId(2), BroadcastMessage::Gossip(first.clone())),
                (NodeId(3), BroadcastMessage::Gossip(first.clone())),
            ]
        );
        first
    }

    #[test]
    fn news_named_alike_by_two_nodes_is_one_message() {
        let news = || Bytes::from_static(b"9 is gone");
        let id = MessageId::named(NodeId(9), 4);
        assert_eq!(id.origin, NodeId(9));
        assert_eq!(MessageId::named(NodeId(9), u64::MAX).seq, u64::MAX);

        // Node 1 declares it first and floods it to 2 and 3.
        let mut first = node(1, &[2, 3], 2);
        assert_eq!(first.broadcast_named(Time::ZERO, id, news()), Ok(id));
        let sent = transmits(&mut first);
        assert_eq!(sent.len(), 2);
        let BroadcastMessage::Gossip(copy) = &sent[0].1 else {
            panic!("expected a gossip, got {sent:?}");
        };
        assert_eq!(copy.id, id);

        // Node 2 got it before its own probe ended: publishing the same news sends nothing
        // and delivers nothing a second time.
        let mut second = node(2, &[1, 3], 2);
        second.handle_message(Time::ZERO, peer(1), BroadcastMessage::Gossip(copy.clone()));
        assert_eq!(second.drain_deliveries().count(), 1);
        transmits(&mut second);
        assert_eq!(second.broadcast_named(Time::ZERO, id, news()), Ok(id));
        assert_eq!(transmits(&mut second), vec![]);
        assert_eq!(second.drain_deliveries().count(), 0);

        // Node 3 hears both copies (one published by each): the second is a duplicate.
        let mut third = node(3, &[1, 2], 2);
        for from in [1, 2] {
            third.handle_message(
                Time::ZERO,
                peer(from),
                BroadcastMessage::Gossip(copy.clone()),
            );
        }
        assert_eq!(third.drain_deliveries().count(), 1);
        assert_eq!(third.counters.duplicates, 1);
    }

    #[test]
    fn a_broadcast_floods_its_first_hops_then_follows_the_tree() {
        // The origin floods to every neighbour.
        let mut origin = node(1, &[2, 3], 2);
        broadcast_from_1_to_2_and_3(&mut origin);
        assert_eq!(
            origin
                .drain_deliveries()
                .map(|d| d.hops)
                .collect::<Vec<_>>(),
            vec![0]
        );

        // One hop away (below flood_hops): still flooding, to everyone but the sender.
        let mut near = node(2, &[1, 4, 5], 2);
        attach(&mut near, 4);
        transmits(&mut near);
        near.handle_message(
            Time::ZERO,
            peer(1),
            BroadcastMessage::Gossip(gossip(1, 0, 1)),
        );
        assert_eq!(
            transmits(&mut near),
            vec![
                (NodeId(4), BroadcastMessage::Gossip(gossip(1, 0, 2))),
                (NodeId(5), BroadcastMessage::Gossip(gossip(1, 0, 2))),
            ]
        );

        // At flood_hops: pushed along the tree (to the parent 4), announced to 5.
        let mut far = node(3, &[1, 4, 5], 2);
        attach(&mut far, 4);
        transmits(&mut far);
        far.handle_message(
            Time::ZERO,
            peer(1),
            BroadcastMessage::Gossip(gossip(1, 0, 2)),
        );
        assert_eq!(
            transmits(&mut far),
            vec![(NodeId(4), BroadcastMessage::Gossip(gossip(1, 0, 3)))]
        );
        far.handle_timeout(Time::from_millis(10));
        let announcement = Announcement {
            id: gossip(1, 0, 0).id,
            hops: 3,
        };
        assert_eq!(
            transmits(&mut far),
            vec![(NodeId(5), BroadcastMessage::IHave(vec![announcement]))]
        );
    }

    #[test]
    fn duplicates_are_counted_and_change_nothing() {
        let mut b = node(1, &[2, 3], 0);
        attach(&mut b, 2);
        transmits(&mut b);
        b.handle_message(
            Time::ZERO,
            peer(2),
            BroadcastMessage::Gossip(gossip(9, 1, 3)),
        );
        assert_eq!(b.drain_deliveries().count(), 1);
        transmits(&mut b);
        b.handle_message(
            Time::ZERO,
            peer(3),
            BroadcastMessage::Gossip(gossip(9, 1, 3)),
        );
        assert_eq!(b.drain_deliveries().count(), 0);
        assert!(transmits(&mut b).is_empty());
        assert_eq!(b.counters().duplicates, 1);
        assert_eq!(b.eager().map(|p| p.id).collect::<Vec<_>>(), vec![NodeId(2)]);
    }

    #[test]
    fn announcements_to_the_same_neighbour_are_batched() {
        let mut b = node(1, &[2, 3], 0);
        attach(&mut b, 2);
        transmits(&mut b);
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
            "3 is off the tree and 2 sent them"
        );
        // After a quiet spell the batch leaves at once...
        assert_eq!(b.poll_timeout(), Time::ZERO);
        b.handle_timeout(Time::ZERO);
        let announcement = |seq| Announcement {
            id: gossip(9, seq, 0).id,
            hops: 2,
        };
        assert_eq!(
            transmits(&mut b),
            vec![(
                NodeId(3),
                BroadcastMessage::IHave(vec![announcement(1), announcement(2)])
            )]
        );
        // ...and the next waits for the end of the interval.
        for seq in [3, 4] {
            b.handle_message(
                Time::from_millis(4),
                peer(2),
                BroadcastMessage::Gossip(gossip(9, seq, 1)),
            );
        }
        assert_eq!(b.poll_timeout(), Time::from_millis(10));
        b.handle_timeout(Time::from_millis(10));
        assert_eq!(
            transmits(&mut b),
            vec![(
                NodeId(3),
                BroadcastMessage::IHave(vec![announcement(3), announcement(4)])
            )]
        );
    }

    #[test]
    fn pulling_grafts_the_first_announcer_at_once_and_announces_to_the_others() {
        let mut b = pull_node(2, &[1, 3, 4], 1);
        assert!(b.tree().is_none());
        let id = gossip(9, 1, 0).id;
        b.handle_message(
            Time::ZERO,
            peer(3),
            BroadcastMessage::IHave(vec![Announcement { id, hops: 3 }]),
        );
        assert_eq!(b.poll_timeout(), Time::ZERO);
        b.handle_timeout(Time::ZERO);
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Graft(vec![id]))]
        );
        // A second announcer is remembered, not asked.
        b.handle_message(
            Time::from_millis(1),
            peer(4),
            BroadcastMessage::IHave(vec![Announcement { id, hops: 2 }]),
        );
        b.handle_timeout(Time::from_millis(1));
        assert!(transmits(&mut b).is_empty());
        // The payload arrives: delivered, announced to 1 only (3 sent it, 4 has it).
        b.handle_message(
            Time::from_millis(5),
            peer(3),
            BroadcastMessage::Gossip(gossip(9, 1, 3)),
        );
        assert_eq!(
            b.drain_deliveries().map(|d| d.hops).collect::<Vec<_>>(),
            vec![3]
        );
        b.handle_timeout(Time::from_millis(5));
        assert_eq!(
            transmits(&mut b),
            vec![(
                NodeId(1),
                BroadcastMessage::IHave(vec![Announcement { id, hops: 4 }])
            )]
        );
        assert_eq!(b.eager().count(), 0);
        assert_eq!(b.counters().grafts, 1);
    }

    #[test]
    fn a_pulled_broadcast_is_pushed_by_its_origin_then_announced() {
        let mut origin = pull_node(1, &[2, 3], 1);
        let first = broadcast_from_1_to_2_and_3(&mut origin);
        let id = first.id;
        let mut next = pull_node(2, &[1, 4, 5], 1);
        next.handle_message(Time::ZERO, peer(1), BroadcastMessage::Gossip(first));
        next.handle_timeout(Time::ZERO);
        let announcement = BroadcastMessage::IHave(vec![Announcement { id, hops: 2 }]);
        assert_eq!(
            transmits(&mut next),
            vec![(NodeId(4), announcement.clone()), (NodeId(5), announcement)]
        );
    }

    #[test]
    fn a_pull_goes_to_the_next_announcer_when_the_first_does_not_answer() {
        let mut b = pull_node(1, &[2, 3], 1);
        let id = gossip(9, 1, 0).id;
        for from in [2, 3] {
            b.handle_message(
                Time::ZERO,
                peer(from),
                BroadcastMessage::IHave(vec![Announcement { id, hops: 2 }]),
            );
        }
        b.handle_timeout(Time::ZERO);
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(2), BroadcastMessage::Graft(vec![id]))]
        );
        assert_eq!(b.poll_timeout(), Time::from_millis(50));
        b.handle_timeout(Time::from_millis(50));
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Graft(vec![id]))]
        );
    }

    #[test]
    fn a_node_spreading_by_pulls_ignores_tree_messages() {
        let mut b = pull_node(1, &[2], 1);
        attach(&mut b, 2);
        assert!(b.drain_transmits().next().is_none());
        assert!(b.tree().is_none());
    }

    #[test]
    fn a_missing_message_is_grafted_from_a_tree_link_first_then_the_others() {
        let mut b = node(1, &[2, 3], 0);
        attach(&mut b, 3);
        transmits(&mut b);
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
            deadline >= Time::from_millis(100) && deadline < Time::from_millis(200),
            "{deadline}"
        );
        b.handle_timeout(deadline);
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(3), BroadcastMessage::Graft(vec![id]))]
        );
        // No answer within T2: ask the other announcer, whose link then carries messages.
        b.handle_timeout(deadline + Duration::from_millis(50));
        assert_eq!(
            transmits(&mut b),
            vec![(NodeId(2), BroadcastMessage::Graft(vec![id]))]
        );
        assert!(b.eager().any(|p| p.id == NodeId(2)));
        assert_eq!(b.counters().grafts, 2);
    }

    #[test]
    fn a_graft_is_answered_and_makes_a_repair_link() {
        let mut b = node(1, &[2, 3], 0);
        attach(&mut b, 2);
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
        let mut full = node(1, &[2], 0);
        let mut behind = node(2, &[1], 0);
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

        // `behind` sends its summary; `full` says it differs; `behind` sends its digest;
        // `full` lists what differs; `behind` asks; `full` repairs.
        behind.next_ae = now;
        behind.handle_timeout(now);
        let (_, summary) = transmits(&mut behind).pop().unwrap();
        assert!(matches!(summary, BroadcastMessage::Summary { .. }));
        full.handle_message(now, peer(2), summary);
        let (_, differs) = transmits(&mut full).pop().unwrap();
        assert!(matches!(differs, BroadcastMessage::Differs { .. }));
        behind.handle_message(now, peer(1), differs);
        let (_, digest) = transmits(&mut behind).pop().unwrap();
        assert!(matches!(digest, BroadcastMessage::Digest { .. }));
        full.handle_message(now, peer(2), digest);
        let (_, ids) = transmits(&mut full).pop().unwrap();
        assert!(matches!(&ids, BroadcastMessage::Ids(listed) if !listed.is_empty()));
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
    fn equal_stores_cost_one_summary_and_a_window_no_round_asks_about_is_ignored() {
        let mut a = node(1, &[2], 0);
        let mut b = node(2, &[1], 0);
        let now = Time::from_millis(10_000);
        for n in [&mut a, &mut b] {
            let mut g = gossip(9, 1, 1);
            g.born = Time::from_millis(5_000);
            n.handle_message(g.born, peer(7), BroadcastMessage::Gossip(g));
            transmits(n);
        }
        a.next_ae = now;
        a.handle_timeout(now);
        let (_, summary) = transmits(&mut a).pop().unwrap();
        b.handle_message(now, peer(1), summary);
        assert!(transmits(&mut b).is_empty(), "equal stores: no answer");
        // Windows that reach into the future, start before what the store keeps, or are
        // reversed.
        let later = Time::from_millis(1_000_000);
        let kept = a.config.retention * 2;
        for (from, to) in [
            (later, later + Duration::from_secs(1)),
            (later.saturating_sub(kept + Duration::from_secs(1)), later),
            (later, later.saturating_sub(Duration::from_secs(1))),
        ] {
            a.handle_message(later, peer(2), BroadcastMessage::Differs { from, to });
            assert!(transmits(&mut a).is_empty(), "{from:?}..{to:?}");
        }
    }

    #[test]
    fn old_and_future_messages_are_rejected() {
        let mut b = node(1, &[2], 0);
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
    fn oversized_payload_is_refused() {
        let mut b = node(1, &[2], 0);
        let payload = Bytes::from(vec![0u8; PAYLOAD_BYTES_MAX + 1]);
        assert!(matches!(
            b.broadcast(Time::ZERO, payload),
            Err(BroadcastError::PayloadTooLarge { .. })
        ));
    }
}
