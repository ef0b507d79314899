//! Building the ring from a random overlay ("Chord on demand"): cycles until every node's
//! successors and fingers are exactly right.

use std::time::{Duration, Instant};

use clap::Args;
use nubo_proto::Config;
use nubo_proto::ring::{Position, RingConfig, distance};

use crate::engine::{NetworkConfig, NoObserver, NodeIndex, Sim};
use crate::experiments::hyparview::overlay_only;
use crate::report::{Report, peak_rss_mib};
use crate::workload::grow_overlay;

/// Options of `nubo-sim ring`.
#[derive(Args, Clone, Debug)]
pub struct RingArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 16_384)]
    pub nodes: u32,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Successor list length.
    #[arg(long, default_value_t = 8)]
    pub successors: usize,
    /// Give up after this many cycles.
    #[arg(long, default_value_t = 200)]
    pub cycles_max: u32,
    /// Print the ring's quality after every cycle.
    #[arg(long)]
    pub verbose: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// The node configuration of ring experiments: the HyParView experiment's overlay with the
/// ring on (the key-value store stays off unless an experiment turns it on).
pub fn ring_config(successors: usize, cycle: Duration) -> Config {
    Config {
        // The parameters these experiments were measured with: a steady period, and entries
        // that fade after 20 s (no liveness news here).
        ring: RingConfig {
            successors,
            interval: cycle,
            interval_max: cycle,
            stale_after: Duration::from_secs(20),
            ..RingConfig::default()
        },
        ..overlay_only(cycle)
    }
}

/// How far the ring is from perfect.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingQuality {
    /// Live nodes whose first successor is the true one.
    pub successors_right: usize,
    /// Live nodes whose whole successor list is the true one.
    pub lists_right: usize,
    /// Live nodes whose every finger is the true successor of its target.
    pub fingers_right: usize,
    /// Live nodes.
    pub alive: usize,
}

impl RingQuality {
    /// Every live node has exact successors and fingers.
    pub fn is_perfect(&self) -> bool {
        self.successors_right == self.alive
            && self.lists_right == self.alive
            && self.fingers_right == self.alive
    }
}

/// Compares every live node's ring state with the true ring of the live nodes.
pub fn ring_quality(sim: &Sim, successors: usize) -> RingQuality {
    let mut positions: Vec<(Position, NodeIndex)> = sim
        .alive()
        .into_iter()
        .map(|i| (sim.peer(i).id.0, i))
        .collect();
    positions.sort_unstable();
    let n = positions.len();
    let true_successor = |key: Position| -> Position {
        let at = positions.partition_point(|(p, _)| *p < key);
        positions[at % n].0
    };
    let mut quality = RingQuality {
        alive: n,
        ..RingQuality::default()
    };
    for (index, &(position, i)) in positions.iter().enumerate() {
        let Some(node) = sim.node(i) else { continue };
        let ring = node.ring();
        let known: Vec<Position> = ring.successors().map(|p| p.id.0).collect();
        let expected: Vec<Position> = (1..=successors.min(n - 1))
            .map(|s| positions[(index + s) % n].0)
            .collect();
        if known.first() == expected.first() {
            quality.successors_right += 1;
        }
        if known == expected {
            quality.lists_right += 1;
        }
        let reach = expected.last().map_or(0, |last| distance(position, *last));
        let lowest = (128 - reach.leading_zeros()).min(127) as u8;
        let fingers_ok = (lowest..=127u8).all(|k| {
            let target = position.wrapping_add(1u128 << k);
            ring.finger(k).map(|p| p.id.0) == Some(true_successor(target))
        });
        if fingers_ok || n <= successors + 1 {
            quality.fingers_right += 1;
        }
    }
    quality
}

/// Runs the experiment and reports it.
pub fn run(args: &RingArgs) -> Report {
    let started = Instant::now();
    let cycle = Duration::from_secs(1);
    let mut sim = Sim::new(
        args.seed,
        ring_config(args.successors, cycle),
        NetworkConfig::default(),
    );
    let mut observer = NoObserver;
    grow_overlay(&mut sim, args.nodes, cycle * 10, &mut observer, |sim| {
        sim.add_node()
    });
    let mut cycles = None;
    let mut last = RingQuality::default();
    for c in 1..=args.cycles_max {
        sim.run_for(cycle, &mut observer);
        last = ring_quality(&sim, args.successors);
        if args.verbose {
            println!(
                "cycle {c}: successor right {} lists right {} fingers right {} of {}",
                last.successors_right, last.lists_right, last.fingers_right, last.alive
            );
        }
        if last.is_perfect() {
            cycles = Some(c);
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let mut report = Report::new(format!(
        "Ring from a random overlay: {} nodes, {} successors (seed {})",
        args.nodes, args.successors, args.seed
    ));
    let n = last.alive.max(1) as f64;
    report
        .add("nodes", args.nodes)
        .add("seed", args.seed)
        .add("successors", args.successors)
        .add(
            "cycles_to_ring",
            cycles.map_or(serde_json::Value::Null, |c| c.into()),
        )
        .add_ratio("successor_right", last.successors_right as f64 / n)
        .add_ratio("successor_lists_right", last.lists_right as f64 / n)
        .add_ratio("fingers_right", last.fingers_right as f64 / n)
        .add("events", sim.stats().events)
        .add_f64("wall_seconds", wall)
        .add_f64("peak_rss_mib", peak_rss_mib());
    report
}
