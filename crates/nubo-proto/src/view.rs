//! A bounded set of peers with uniform random selection.

use crate::id::{NodeId, Peer};
use crate::rng::Rng;

/// A set of at most `capacity` peers, kept in insertion order.
///
/// Views are small (a handful to a few dozen entries), so a vector with linear search is both
/// the fastest and the most predictable representation; iteration order is deterministic.
#[derive(Clone, Debug)]
pub struct PeerView {
    peers: Vec<Peer>,
    capacity: usize,
}

impl PeerView {
    /// An empty view holding at most `capacity` peers.
    pub fn new(capacity: usize) -> PeerView {
        PeerView {
            peers: Vec::with_capacity(capacity.min(64)),
            capacity,
        }
    }

    /// The most peers this view holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of peers in the view.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when the view holds no peer.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// True when no peer can be added without removing another.
    pub fn is_full(&self) -> bool {
        self.peers.len() >= self.capacity
    }

    /// True when `id` is in the view.
    pub fn contains(&self, id: NodeId) -> bool {
        self.peers.iter().any(|p| p.id == id)
    }

    /// The entry for `id`, if present.
    pub fn find(&self, id: NodeId) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == id)
    }

    /// Adds `peer` if absent and there is room; returns whether it was added. A known peer
    /// gets its address refreshed when the new entry carries one.
    pub fn insert(&mut self, peer: Peer) -> bool {
        if let Some(known) = self.peers.iter_mut().find(|p| p.id == peer.id) {
            if peer.addr.is_some() {
                known.addr = peer.addr;
            }
            return false;
        }
        if self.is_full() {
            return false;
        }
        self.peers.push(peer);
        true
    }

    /// Removes `id`; returns the removed entry.
    pub fn remove(&mut self, id: NodeId) -> Option<Peer> {
        let index = self.peers.iter().position(|p| p.id == id)?;
        Some(self.peers.remove(index))
    }

    /// A uniformly chosen peer that `exclude` does not reject.
    pub fn random_except(&self, rng: &mut Rng, exclude: impl Fn(NodeId) -> bool) -> Option<Peer> {
        let candidates = self.peers.iter().filter(|p| !exclude(p.id)).count();
        if candidates == 0 {
            return None;
        }
        let pick = rng.index(candidates);
        self.peers
            .iter()
            .filter(|p| !exclude(p.id))
            .nth(pick)
            .copied()
    }

    /// Up to `count` distinct peers chosen uniformly at random, none rejected by `exclude`.
    pub fn sample(
        &self,
        rng: &mut Rng,
        count: usize,
        exclude: impl Fn(NodeId) -> bool,
    ) -> Vec<Peer> {
        let mut candidates: Vec<Peer> = self
            .peers
            .iter()
            .filter(|p| !exclude(p.id))
            .copied()
            .collect();
        rng.shuffle(&mut candidates);
        candidates.truncate(count);
        candidates
    }

    /// The peers, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &Peer> + '_ {
        self.peers.iter()
    }

    /// The ids of the peers, in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers.iter().map(|p| p.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_respects_capacity_and_uniqueness() {
        let mut view = PeerView::new(2);
        assert!(view.insert(Peer::new(NodeId(1))));
        assert!(!view.insert(Peer::new(NodeId(1))));
        assert!(view.insert(Peer::new(NodeId(2))));
        assert!(!view.insert(Peer::new(NodeId(3))));
        assert_eq!(view.len(), 2);
        assert!(view.is_full());
        assert_eq!(view.remove(NodeId(1)).map(|p| p.id), Some(NodeId(1)));
        assert!(!view.contains(NodeId(1)));
    }

    #[test]
    fn sample_excludes_and_bounds() {
        let mut view = PeerView::new(10);
        for i in 0..10 {
            view.insert(Peer::new(NodeId(i)));
        }
        let mut rng = Rng::from_seed(1);
        let picked = view.sample(&mut rng, 4, |id| id.0 % 2 == 0);
        assert_eq!(picked.len(), 4);
        assert!(picked.iter().all(|p| p.id.0 % 2 == 1));
        assert_eq!(view.random_except(&mut rng, |_| true), None);
    }
}
