//! What simulated machines are like: the resources they lend.

use nubo_proto::Rng;
use nubo_proto::aggregation::Resources;

use std::time::Duration;

use crate::engine::{NodeIndex, Observer, Sim};

/// Resources of a typical contributed machine: 1-64 cores, 1-64 GiB of memory, 10-1,010 GiB
/// of disk, partly in use.
pub fn random_resources(rng: &mut Rng) -> Resources {
    let cores = (1 + rng.below(64)) as f64;
    let memory_bytes = ((1 + rng.below(64)) << 30) as f64;
    let disk_bytes = ((10 + rng.below(1_000)) << 30) as f64;
    Resources {
        cores,
        memory_bytes,
        disk_bytes,
        cores_free: cores * rng.unit(),
        memory_free_bytes: memory_bytes * rng.unit(),
        disk_free_bytes: disk_bytes * rng.unit(),
    }
}

/// Adds a machine lending random resources, ranked by its free disk.
pub fn add_node(sim: &mut Sim, rng: &mut Rng) -> NodeIndex {
    let node = sim.add_node();
    let resources = random_resources(rng);
    sim.set_resources(node, resources);
    sim.set_rank_value(node, resources.disk_free_bytes);
    node
}

/// Grows a cloud of `nodes` machines made by `add`: they join one at a time, evenly spread
/// over `span`, each through a random machine already there (as in the HyParView paper).
pub fn grow_overlay(
    sim: &mut Sim,
    nodes: u32,
    span: Duration,
    observer: &mut impl Observer,
    mut add: impl FnMut(&mut Sim) -> NodeIndex,
) {
    let spacing = span / nodes.max(1);
    add(sim);
    for i in 1..nodes {
        sim.run_for(spacing, observer);
        let node = add(sim);
        let contact = sim.rng().below(u64::from(i)) as NodeIndex;
        sim.join(node, &[contact], observer);
    }
}
