//! A bounded set of peers with uniform random selection.

use core::net::SocketAddr;

use crate::id::{NodeId, Peer};
use crate::rng::Rng;

/// A set of at most `capacity` peers, kept in insertion order.
///
/// Views are small (a handful to a few dozen entries), so vectors with linear search are both
/// the fastest and the most predictable representation; iteration order is deterministic. Ids
/// and addresses live in separate vectors so that searches scan ids only.
#[derive(Clone, Debug)]
pub struct PeerView {
    ids: Vec<NodeId>,
    addrs: Vec<Option<SocketAddr>>,
    capacity: usize,
    /// Peers added or removed so far.
    changes: u64,
}

impl PeerView {
    /// An empty view holding at most `capacity` peers.
    pub fn new(capacity: usize) -> PeerView {
        PeerView {
            ids: Vec::new(),
            addrs: Vec::new(),
            capacity,
            changes: 0,
        }
    }

    /// How many times a peer was added or removed: equal counts mean the same peers.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The most peers this view holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of peers in the view.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the view holds no peer.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// True when no peer can be added without removing another.
    pub fn is_full(&self) -> bool {
        self.ids.len() >= self.capacity
    }

    /// True when `id` is in the view.
    pub fn contains(&self, id: NodeId) -> bool {
        self.ids.contains(&id)
    }

    /// The entry for `id`, if present.
    pub fn find(&self, id: NodeId) -> Option<Peer> {
        let index = self.position(id)?;
        Some(self.at(index))
    }

    /// Adds `peer` if absent and there is room; returns whether it was added. A known peer
    /// gets its address refreshed when the new entry carries one.
    pub fn insert(&mut self, peer: Peer) -> bool {
        if let Some(index) = self.position(peer.id) {
            if peer.addr.is_some() {
                self.addrs[index] = peer.addr;
            }
            return false;
        }
        if self.is_full() {
            return false;
        }
        self.ids.push(peer.id);
        self.addrs.push(peer.addr);
        self.changes += 1;
        true
    }

    /// Removes `id`; returns the removed entry.
    pub fn remove(&mut self, id: NodeId) -> Option<Peer> {
        let index = self.position(id)?;
        let peer = self.at(index);
        self.ids.remove(index);
        self.addrs.remove(index);
        self.changes += 1;
        Some(peer)
    }

    /// A uniformly chosen peer that `exclude` does not reject.
    pub fn random_except(&self, rng: &mut Rng, exclude: impl Fn(NodeId) -> bool) -> Option<Peer> {
        let candidates = self.ids.iter().filter(|&&id| !exclude(id)).count();
        if candidates == 0 {
            return None;
        }
        let pick = rng.index(candidates);
        let index = self
            .ids
            .iter()
            .enumerate()
            .filter(|&(_, &id)| !exclude(id))
            .nth(pick)?
            .0;
        Some(self.at(index))
    }

    /// Up to `count` distinct peers chosen uniformly at random, none rejected by `exclude`.
    pub fn sample(
        &self,
        rng: &mut Rng,
        count: usize,
        exclude: impl Fn(NodeId) -> bool,
    ) -> Vec<Peer> {
        // Shuffles the candidates' places, not the peers themselves (a tenth of the bytes to
        // move): the same draws pick the same peers.
        let mut candidates: Vec<usize> = (0..self.ids.len())
            .filter(|&i| !exclude(self.ids[i]))
            .collect();
        rng.shuffle(&mut candidates);
        candidates.truncate(count);
        candidates.into_iter().map(|i| self.at(i)).collect()
    }

    /// The peers, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = Peer> + '_ {
        (0..self.ids.len()).map(|i| self.at(i))
    }

    /// The ids of the peers, in insertion order.
    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.ids.iter().copied()
    }

    fn position(&self, id: NodeId) -> Option<usize> {
        self.ids.iter().position(|&known| known == id)
    }

    fn at(&self, index: usize) -> Peer {
        Peer {
            id: self.ids[index],
            addr: self.addrs[index],
        }
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
