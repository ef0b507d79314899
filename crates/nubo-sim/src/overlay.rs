//! Whole-overlay checks that no single node can make: connectivity, symmetry, dead links.

use crate::engine::{NodeIndex, Sim};

/// The shape of the overlay formed by the active views of the running nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayHealth {
    /// Running nodes.
    pub alive: usize,
    /// Connected components of the active-view graph (links taken as undirected).
    pub components: usize,
    /// Running nodes with an empty active view.
    pub isolated: usize,
    /// Active-view entries naming a node that does not run.
    pub dead_links: usize,
    /// Active-view entries `a → b` where `b` does not have `a`, as `(a, b)` in index order.
    pub asymmetric: Vec<(NodeIndex, NodeIndex)>,
    /// Largest active view seen.
    pub active_len_max: usize,
    /// Largest passive view seen.
    pub passive_len_max: usize,
}

impl OverlayHealth {
    /// One component, no isolated node, no link to a dead node.
    pub fn is_healed(&self) -> bool {
        self.components <= 1 && self.isolated == 0 && self.dead_links == 0
    }
}

/// Measures the overlay of `sim` now.
pub fn overlay_health(sim: &Sim) -> OverlayHealth {
    let n = sim.len();
    let mut health = OverlayHealth::default();
    let mut parent: Vec<u32> = (0..n as u32).collect();
    for i in 0..n as NodeIndex {
        let Some(node) = sim.node(i) else { continue };
        health.alive += 1;
        let membership = node.membership();
        health.active_len_max = health.active_len_max.max(membership.active().len());
        health.passive_len_max = health.passive_len_max.max(membership.passive().len());
        if membership.active().is_empty() {
            health.isolated += 1;
        }
        for peer in membership.active().ids() {
            let Some(j) = sim.index_of(peer) else {
                health.dead_links += 1;
                continue;
            };
            let Some(other) = sim.node(j) else {
                health.dead_links += 1;
                continue;
            };
            if !other.membership().active().contains(node.id()) {
                health.asymmetric.push((i, j));
            }
            union(&mut parent, i, j);
        }
    }
    let mut roots: Vec<u32> = (0..n as NodeIndex)
        .filter(|&i| sim.is_alive(i))
        .map(|i| find(&mut parent, i))
        .collect();
    roots.sort_unstable();
    roots.dedup();
    health.components = roots.len();
    health
}

fn find(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        let grand = parent[parent[x as usize] as usize];
        parent[x as usize] = grand;
        x = grand;
    }
    x
}

fn union(parent: &mut [u32], a: u32, b: u32) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        parent[ra.max(rb) as usize] = ra.min(rb);
    }
}
