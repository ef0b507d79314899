//! The dissemination tree: a breadth-first spanning tree of the overlay, rebuilt in epochs.
//!
//! A root floods a `Beacon` over every overlay link once per `tree_interval`, starting a new
//! epoch. Each node takes as parent the neighbour that offers the fewest hops to the root
//! (first arrival breaks ties, so among equally short paths the fastest wins), tells it with
//! `Adopt`, and passes the beacon on whenever its own distance improves: distributed
//! Bellman-Ford within one epoch, converging to a shortest-hop tree.
//!
//! Why epochs rather than Plumtree's prune-on-duplicate: a tree shaped by whichever duplicates
//! happened to arrive drifts into long detours when messages from many origins are in flight
//! or after failures, and two prunes racing on one cycle cut it. Here duplicates never change
//! the tree; the tree is rebuilt from scratch every epoch, so damage never accumulates.
//!
//! Between epochs a node that loses its parent re-attaches to the neighbour with the best
//! recent offer, and the broadcast layer grafts links on demand (see `repair` links). A node
//! that hears no beacon for `tree_timeout` starts an epoch itself: the root needs no election,
//! and when two partitions heal, the higher epoch (then the lower root id) wins everywhere.

use core::cmp::Ordering;
use core::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::rng::Rng;
use crate::time::Time;

/// One generation of the tree: a number and the root that started it.
///
/// Epochs are totally ordered: a higher number is newer; at equal numbers the lower root id
/// wins, so two roots that start the same number at once agree on one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// Generation number; each root's refresh adds one.
    pub number: u64,
    /// The node that started this generation.
    pub root: NodeId,
}

impl Ord for Epoch {
    fn cmp(&self, other: &Self) -> Ordering {
        self.number
            .cmp(&other.number)
            .then_with(|| other.root.cmp(&self.root))
    }
}

impl PartialOrd for Epoch {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Messages that build the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TreeMessage {
    /// "Through me, the root of `epoch` is `hops` away from you."
    Beacon {
        /// The tree generation.
        epoch: Epoch,
        /// Hops from the receiver to the root through the sender.
        hops: u16,
    },
    /// "You are (or, with `adopt == false`, are no longer) my parent in `epoch`."
    Adopt {
        /// The tree generation.
        epoch: Epoch,
        /// Whether the sender takes the receiver as parent.
        adopt: bool,
        /// Increases with every `Adopt` the sender sends, so that a late one never overrides
        /// a newer decision when messages are reordered.
        seq: u64,
    },
}

/// Tuning of the tree.
#[derive(Clone, Debug)]
pub struct TreeConfig {
    /// How often the root starts a new epoch.
    pub interval: Duration,
    /// A node that hears no beacon for this long (plus a random part of `interval`) starts an
    /// epoch itself.
    pub timeout: Duration,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(90),
        }
    }
}

/// What one neighbour is to us in the tree.
#[derive(Clone, Copy, Debug)]
struct TreeLink {
    peer: Peer,
    /// Its latest beacon: the epoch and our distance to the root through it.
    offer: Option<(Epoch, u16)>,
    /// The epoch number in which it took us as parent. Kept across one epoch change, so
    /// that messages keep flowing while the new tree forms; an explicit release clears it.
    child: Option<u64>,
    /// The epoch number in which it was grafted to repair a gap; kept like `child`.
    repair: Option<u64>,
    /// The `seq` of the latest `Adopt` it sent us.
    adopt_seq: u64,
}

/// One node's view of the dissemination tree.
///
/// Contract: the owner reports neighbour changes, passes every [`TreeMessage`] to
/// [`SpanningTree::handle_message`], calls [`SpanningTree::handle_timeout`] no later than
/// [`SpanningTree::poll_timeout`], and sends what [`SpanningTree::drain_transmits`] yields.
pub struct SpanningTree {
    me: Peer,
    config: TreeConfig,
    rng: Rng,
    epoch: Option<Epoch>,
    hops: u16,
    parent: Option<NodeId>,
    links: Vec<TreeLink>,
    last_beacon: Time,
    takeover_at: Time,
    next_refresh: Time,
    transmits: Vec<(Peer, TreeMessage)>,
    epochs_started: u64,
    adopt_seq: u64,
}

impl SpanningTree {
    /// The tree state of node `me`, with no epoch yet.
    pub fn new(me: Peer, mut config: TreeConfig, mut rng: Rng, now: Time) -> SpanningTree {
        // A silent root is only noticed after it missed at least one refresh.
        config.timeout = config.timeout.max(config.interval * 2);
        let takeover_at = now + config.timeout + jitter(&mut rng, config.interval);
        SpanningTree {
            me,
            rng,
            epoch: None,
            hops: u16::MAX,
            parent: None,
            links: Vec::new(),
            last_beacon: now,
            takeover_at,
            next_refresh: Time::MAX,
            transmits: Vec::new(),
            epochs_started: 0,
            // Start from the clock so that a restarted node's adoptions are newer than those
            // its neighbours remember from before.
            adopt_seq: now.as_micros(),
            config,
        }
    }

    /// The current epoch, if any beacon reached us.
    pub fn epoch(&self) -> Option<Epoch> {
        self.epoch
    }

    /// Our parent in the current epoch.
    pub fn parent(&self) -> Option<NodeId> {
        self.parent
    }

    /// Our distance to the root in hops (`u16::MAX` when detached).
    pub fn hops(&self) -> u16 {
        self.hops
    }

    /// Epochs this node started as root.
    pub fn epochs_started(&self) -> u64 {
        self.epochs_started
    }

    /// Whether messages travel to `peer` eagerly: it is our parent, our child, or a repair link.
    pub fn is_tree_link(&self, peer: NodeId) -> bool {
        self.parent == Some(peer)
            || self
                .links
                .iter()
                .any(|l| l.peer.id == peer && (l.child.is_some() || l.repair.is_some()))
    }

    /// Neighbours that took us as parent (in this epoch or the previous one).
    pub fn children(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links
            .iter()
            .filter(|l| l.child.is_some())
            .map(|l| l.peer.id)
    }

    /// Marks the link to `peer` as a repair link until the next epoch.
    pub fn mark_repair(&mut self, peer: NodeId) {
        let number = self.epoch.map_or(0, |e| e.number);
        if let Some(link) = self.link_mut(peer) {
            link.repair = Some(number);
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, TreeMessage)> {
        self.transmits.drain(..)
    }

    /// When [`SpanningTree::handle_timeout`] next has work: the root refreshes its epoch,
    /// every other node watches for the root going silent.
    pub fn poll_timeout(&self) -> Time {
        if self.is_root() {
            self.next_refresh
        } else {
            self.takeover_at
        }
    }

    /// Whether this node started the current epoch.
    pub fn is_root(&self) -> bool {
        self.epoch.is_some_and(|e| e.root == self.me.id)
    }

    /// `peer` became a neighbour: offer it our place in the tree so that it can attach at once.
    pub fn neighbor_up(&mut self, peer: Peer) {
        self.links.retain(|l| l.peer.id != peer.id);
        self.links.push(TreeLink {
            peer,
            offer: None,
            child: None,
            repair: None,
            adopt_seq: 0,
        });
        if let Some(epoch) = self.epoch
            && self.hops != u16::MAX
        {
            let hops = self.hops.saturating_add(1);
            self.transmits
                .push((peer, TreeMessage::Beacon { epoch, hops }));
        }
    }

    /// `peer` is no longer a neighbour; if it was our parent, re-attach through the best offer.
    /// With no usable offer the tree is torn here: rebuild it soon rather than at the next
    /// refresh (after a random wait, so that of many torn nodes only the first rebuilds).
    pub fn neighbor_down(&mut self, now: Time, peer: NodeId) {
        self.links.retain(|l| l.peer.id != peer);
        if self.parent == Some(peer) {
            self.parent = None;
            self.reattach();
            if self.parent.is_none() && !self.is_root() {
                let soon = now + jitter(&mut self.rng, self.config.interval / 2);
                self.takeover_at = self.takeover_at.min(soon);
            }
        }
    }

    /// Handles a tree message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: TreeMessage) {
        match message {
            TreeMessage::Beacon { epoch, hops } => self.on_beacon(now, from, epoch, hops),
            TreeMessage::Adopt { epoch, adopt, seq } => {
                let current = self.epoch;
                if let Some(link) = self.link_mut(from.id) {
                    if seq <= link.adopt_seq {
                        return;
                    }
                    link.adopt_seq = seq;
                    if !adopt {
                        link.child = None;
                    } else if current.is_some_and(|c| epoch >= c) {
                        // An adoption may arrive before the beacon of its epoch reaches us
                        // along another path; the child knows best whom it follows.
                        link.child = Some(epoch.number);
                    }
                }
            }
        }
    }

    /// Starts a new epoch if we are the root and it is time, or if the root went silent.
    pub fn handle_timeout(&mut self, now: Time) {
        if now >= self.poll_timeout() {
            self.start_epoch(now);
        }
    }

    fn on_beacon(&mut self, now: Time, from: Peer, epoch: Epoch, hops: u16) {
        let Some(link) = self.link_mut(from.id) else {
            // Only neighbours may be parents.
            return;
        };
        link.offer = Some((epoch, hops));
        let current = self.epoch;
        if current.is_some_and(|c| epoch < c) {
            // The sender lags behind: tell it about the newer epoch.
            if self.hops != u16::MAX
                && let Some(c) = current
            {
                let offer = self.hops.saturating_add(1);
                self.transmits.push((
                    from,
                    TreeMessage::Beacon {
                        epoch: c,
                        hops: offer,
                    },
                ));
            }
            return;
        }
        let newer = current.is_none_or(|c| epoch > c);
        if newer {
            self.enter_epoch(epoch, u16::MAX);
        }
        self.last_beacon = now;
        self.takeover_at = now + self.config.timeout + jitter(&mut self.rng, self.config.interval);
        if hops < self.hops {
            self.adopt_parent(epoch, from, hops);
            self.flood_beacon(epoch, Some(from.id));
        }
    }

    fn adopt_parent(&mut self, epoch: Epoch, parent: Peer, hops: u16) {
        if let Some(old) = self.parent
            && old != parent.id
        {
            self.release(epoch, old);
        }
        if let Some(link) = self.link_mut(parent.id) {
            // A parent cannot also be our child.
            link.child = None;
        }
        self.parent = Some(parent.id);
        self.hops = hops;
        self.adopt_seq += 1;
        let seq = self.adopt_seq;
        self.transmits.push((
            parent,
            TreeMessage::Adopt {
                epoch,
                adopt: true,
                seq,
            },
        ));
    }

    /// After losing our parent, attach to the neighbour with the best offer of the current
    /// epoch that cannot be below us (an offer of at most our distance plus one).
    fn reattach(&mut self) {
        let Some(epoch) = self.epoch else { return };
        let limit = self.hops.saturating_add(1);
        let best = self
            .links
            .iter()
            .filter(|l| l.child.is_none())
            .filter_map(|l| match l.offer {
                Some((e, hops)) if e == epoch && hops <= limit => Some((hops, l.peer)),
                _ => None,
            })
            .min_by_key(|(hops, _)| *hops);
        match best {
            Some((hops, peer)) => self.adopt_parent(epoch, peer, hops),
            None => self.hops = u16::MAX,
        }
    }

    fn start_epoch(&mut self, now: Time) {
        let number = self.epoch.map_or(1, |e| e.number + 1);
        let epoch = Epoch {
            number,
            root: self.me.id,
        };
        self.epochs_started += 1;
        self.enter_epoch(epoch, 0);
        if let Some(old) = self.parent.take() {
            self.release(epoch, old);
        }
        self.last_beacon = now;
        self.next_refresh = now + self.config.interval;
        self.takeover_at = now + self.config.timeout + jitter(&mut self.rng, self.config.interval);
        self.flood_beacon(epoch, None);
    }

    /// Moves to a newer epoch at distance `hops` (unknown until a parent is adopted). The
    /// parent is kept until a new one is chosen, so that it can be released; children and
    /// repair links of the previous epoch stay in the tree until the epoch after.
    fn enter_epoch(&mut self, epoch: Epoch, hops: u16) {
        self.epoch = Some(epoch);
        self.hops = hops;
        self.next_refresh = Time::MAX;
        let oldest_kept = epoch.number.saturating_sub(1);
        for link in &mut self.links {
            if link.child.is_some_and(|n| n < oldest_kept) {
                link.child = None;
            }
            if link.repair.is_some_and(|n| n < oldest_kept) {
                link.repair = None;
            }
        }
    }

    fn release(&mut self, epoch: Epoch, old_parent: NodeId) {
        if let Some(link) = self.links.iter().find(|l| l.peer.id == old_parent) {
            let peer = link.peer;
            self.adopt_seq += 1;
            let seq = self.adopt_seq;
            self.transmits.push((
                peer,
                TreeMessage::Adopt {
                    epoch,
                    adopt: false,
                    seq,
                },
            ));
        }
    }

    fn flood_beacon(&mut self, epoch: Epoch, except: Option<NodeId>) {
        let hops = self.hops.saturating_add(1);
        for link in &self.links {
            if Some(link.peer.id) != except {
                self.transmits
                    .push((link.peer, TreeMessage::Beacon { epoch, hops }));
            }
        }
    }

    fn link_mut(&mut self, id: NodeId) -> Option<&mut TreeLink> {
        self.links.iter_mut().find(|l| l.peer.id == id)
    }
}

/// A uniformly random fraction of `period`.
fn jitter(rng: &mut Rng, period: Duration) -> Duration {
    let micros = u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(rng.below(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u128) -> Peer {
        Peer::new(NodeId(n))
    }

    fn epoch(number: u64, root: u128) -> Epoch {
        Epoch {
            number,
            root: NodeId(root),
        }
    }

    fn config() -> TreeConfig {
        TreeConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }

    fn tree(me: u128, neighbours: &[u128]) -> SpanningTree {
        let mut t = SpanningTree::new(peer(me), config(), Rng::from_seed(1), Time::ZERO);
        for &n in neighbours {
            t.neighbor_up(peer(n));
        }
        t
    }

    fn sent(t: &mut SpanningTree) -> Vec<(NodeId, TreeMessage)> {
        t.drain_transmits().map(|(p, m)| (p.id, m)).collect()
    }

    fn beacon(number: u64, root: u128, hops: u16) -> TreeMessage {
        TreeMessage::Beacon {
            epoch: epoch(number, root),
            hops,
        }
    }

    #[test]
    fn epochs_order_by_number_then_lower_root() {
        assert!(epoch(2, 9) > epoch(1, 1));
        assert!(epoch(1, 1) > epoch(1, 2));
        assert_eq!(epoch(3, 3).max(epoch(3, 4)), epoch(3, 3));
    }

    #[test]
    fn first_beacon_makes_its_sender_parent_and_is_passed_on() {
        let mut t = tree(1, &[2, 3, 4]);
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 3));
        assert_eq!(t.parent(), Some(NodeId(2)));
        assert_eq!(t.hops(), 3);
        let seq = Time::ZERO.as_micros() + 1;
        assert_eq!(
            sent(&mut t),
            vec![
                (
                    NodeId(2),
                    TreeMessage::Adopt {
                        epoch: epoch(1, 9),
                        adopt: true,
                        seq
                    }
                ),
                (NodeId(3), beacon(1, 9, 4)),
                (NodeId(4), beacon(1, 9, 4)),
            ]
        );
        assert!(t.is_tree_link(NodeId(2)));
        assert!(!t.is_tree_link(NodeId(3)));
    }

    #[test]
    fn a_shorter_offer_in_the_same_epoch_switches_parent() {
        let mut t = tree(1, &[2, 3]);
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 5));
        sent(&mut t);
        t.handle_message(Time::ZERO, peer(3), beacon(1, 9, 2));
        assert_eq!(t.parent(), Some(NodeId(3)));
        let messages = sent(&mut t);
        assert!(matches!(
            messages[0],
            (NodeId(2), TreeMessage::Adopt { adopt: false, .. })
        ));
        assert!(matches!(
            messages[1],
            (NodeId(3), TreeMessage::Adopt { adopt: true, .. })
        ));
        assert_eq!(messages[2], (NodeId(2), beacon(1, 9, 3)));
        // An equal or longer offer changes nothing.
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 2));
        assert!(sent(&mut t).is_empty());
    }

    #[test]
    fn a_lagging_neighbour_is_told_about_the_newer_epoch() {
        let mut t = tree(1, &[2, 3]);
        t.handle_message(Time::ZERO, peer(2), beacon(5, 9, 1));
        sent(&mut t);
        t.handle_message(Time::ZERO, peer(3), beacon(4, 7, 1));
        assert_eq!(sent(&mut t), vec![(NodeId(3), beacon(5, 9, 2))]);
        assert_eq!(t.epoch(), Some(epoch(5, 9)));
    }

    #[test]
    fn silence_makes_a_node_root_and_the_root_refreshes() {
        let mut t = tree(1, &[2]);
        let deadline = t.poll_timeout();
        assert!(deadline >= Time::ZERO + config().timeout);
        t.handle_timeout(deadline);
        assert!(t.is_root());
        assert_eq!(sent(&mut t), vec![(NodeId(2), beacon(1, 1, 1))]);
        assert_eq!(t.poll_timeout(), deadline + config().interval);
        t.handle_timeout(deadline + config().interval);
        assert_eq!(sent(&mut t), vec![(NodeId(2), beacon(2, 1, 1))]);
        assert_eq!(t.epochs_started(), 2);
    }

    #[test]
    fn losing_the_parent_reattaches_through_the_best_offer_that_is_not_below() {
        let mut t = tree(1, &[2, 3, 4]);
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 2));
        t.handle_message(Time::ZERO, peer(3), beacon(1, 9, 3));
        // 4 is our child: it offers us a path through ourselves.
        t.handle_message(
            Time::ZERO,
            peer(4),
            TreeMessage::Adopt {
                epoch: epoch(1, 9),
                adopt: true,
                seq: 1,
            },
        );
        t.handle_message(Time::ZERO, peer(4), beacon(1, 9, 4));
        sent(&mut t);
        t.neighbor_down(Time::ZERO, NodeId(2));
        assert_eq!(t.parent(), Some(NodeId(3)));
        assert_eq!(t.hops(), 3);
        assert!(matches!(
            sent(&mut t)[..],
            [(NodeId(3), TreeMessage::Adopt { adopt: true, .. })]
        ));
    }

    #[test]
    fn a_late_release_does_not_undo_a_newer_adoption() {
        let mut t = tree(1, &[2]);
        t.handle_timeout(t.poll_timeout());
        let e = t.epoch().unwrap();
        t.handle_message(
            Time::ZERO,
            peer(2),
            TreeMessage::Adopt {
                epoch: e,
                adopt: true,
                seq: 7,
            },
        );
        t.handle_message(
            Time::ZERO,
            peer(2),
            TreeMessage::Adopt {
                epoch: e,
                adopt: false,
                seq: 6,
            },
        );
        assert!(t.is_tree_link(NodeId(2)));
        t.handle_message(
            Time::ZERO,
            peer(2),
            TreeMessage::Adopt {
                epoch: e,
                adopt: false,
                seq: 8,
            },
        );
        assert!(!t.is_tree_link(NodeId(2)));
    }

    #[test]
    fn a_new_neighbour_gets_an_offer() {
        let mut t = tree(1, &[2]);
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 1));
        sent(&mut t);
        t.neighbor_up(peer(5));
        assert_eq!(sent(&mut t), vec![(NodeId(5), beacon(1, 9, 2))]);
    }

    #[test]
    fn children_survive_one_epoch_change_then_go() {
        let mut t = tree(1, &[2, 3]);
        t.handle_message(Time::ZERO, peer(2), beacon(1, 9, 1));
        t.handle_message(
            Time::ZERO,
            peer(3),
            TreeMessage::Adopt {
                epoch: epoch(1, 9),
                adopt: true,
                seq: 1,
            },
        );
        t.handle_message(Time::ZERO, peer(2), beacon(2, 9, 1));
        assert!(t.is_tree_link(NodeId(3)), "kept while the new tree forms");
        t.handle_message(Time::ZERO, peer(2), beacon(3, 9, 1));
        assert!(!t.is_tree_link(NodeId(3)));
    }
}
