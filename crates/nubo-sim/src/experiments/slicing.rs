//! Ordered slicing under churn: how many nodes misreport their slice (Sliver, IEEE ToC 2009:
//! < 10% on a 3,000-node trace with 20 slices).

use std::time::{Duration, Instant};

use clap::Args;
use nubo_proto::Config;
use nubo_proto::slicing::{SlicingConfig, node_key};

use crate::engine::{NetworkConfig, NoObserver, NodeIndex, Sim};
use crate::experiments::hyparview::overlay_only;
use crate::report::{Report, peak_rss_mib};
use crate::workload::grow_overlay;

/// Options of `nubo-sim slicing`.
#[derive(Args, Clone, Debug)]
pub struct SlicingArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: u32,
    /// Number of equal slices.
    #[arg(long, default_value_t = 20)]
    pub slices: u32,
    /// Nodes that leave, and as many that join, per node and per cycle.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Leaving nodes are picked in proportion to how low their value is (as when unreliable
    /// machines, ranked by uptime, are the ones that go), instead of uniformly.
    #[arg(long)]
    pub correlated_churn: bool,
    /// Fraction of the nodes whose value changes each cycle.
    #[arg(long, default_value_t = 0.0)]
    pub drift: f64,
    /// Cycles to run after the overlay is built (one cycle = 1 s).
    #[arg(long, default_value_t = 200)]
    pub cycles: u32,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// How well the live nodes know their slices at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Accuracy {
    /// Fraction of nodes whose estimated slice differs from their true slice.
    misreporting: f64,
    /// Mean distance between estimated and true slice (slice disorder per node).
    sdm: f64,
    /// Mean fraction of the live nodes' values a node knows.
    coverage: f64,
}

/// Runs the experiment and reports it.
pub fn run(args: &SlicingArgs) -> Report {
    let started = Instant::now();
    let cycle = Duration::from_secs(1);
    let config = Config {
        slicing: SlicingConfig::default(),
        ..overlay_only(cycle)
    };
    let mut sim = Sim::new(args.seed, config, NetworkConfig::default());
    let mut rng = sim.rng().fork();
    let mut observer = NoObserver;
    grow_overlay(&mut sim, args.nodes, cycle * 10, &mut observer, |sim| {
        let node = sim.add_node();
        let value = rng.unit();
        sim.set_rank_value(node, value);
        node
    });

    let mut history = Vec::with_capacity(args.cycles as usize);
    let churn_per_cycle = args.churn * f64::from(args.nodes);
    let mut churn_debt = 0.0;
    let mut values: Vec<f64> = (0..sim.len() as NodeIndex)
        .map(|i| value_of(&sim, i))
        .collect();
    for _ in 0..args.cycles {
        churn_debt += churn_per_cycle;
        while churn_debt >= 1.0 {
            churn_debt -= 1.0;
            let alive = sim.alive();
            let leaving = if args.correlated_churn {
                pick_low(&alive, &values, &mut rng)
            } else {
                rng.choose(&alive).copied()
            };
            if let Some(leaving) = leaving {
                sim.crash(leaving);
            }
            let node = sim.add_node();
            let value = rng.unit();
            sim.set_rank_value(node, value);
            values.push(value);
            if let Some(&contact) = rng.choose(&alive) {
                sim.join(node, &[contact], &mut observer);
            }
        }
        if args.drift > 0.0 {
            for i in sim.alive() {
                if rng.chance(args.drift) {
                    let value = rng.unit();
                    sim.set_rank_value(i, value);
                    values[i as usize] = value;
                }
            }
        }
        let until = sim.now() + cycle;
        sim.run_until(until, &mut observer);
        history.push(accuracy(&sim, &values, args.slices));
    }

    let last = history.last().copied().unwrap_or_default();
    let last50 = &history[history.len().saturating_sub(50)..];
    let max_last50 = last50.iter().map(|a| a.misreporting).fold(0.0, f64::max);
    let mean_last50 =
        last50.iter().map(|a| a.misreporting).sum::<f64>() / last50.len().max(1) as f64;
    let wall = started.elapsed().as_secs_f64();
    let mut report = Report::new(format!(
        "Slicing: {} nodes, {} slices, churn {} per cycle{}, {} cycles (seed {})",
        args.nodes,
        args.slices,
        args.churn,
        if args.correlated_churn {
            " (correlated)"
        } else {
            ""
        },
        args.cycles,
        args.seed
    ));
    let sent = sim.sent_by_kind();
    let samples_messages = sent.get("slice_push").copied().unwrap_or(0)
        + sent.get("slice_answer").copied().unwrap_or(0);
    report
        .add("nodes", args.nodes)
        .add("slices", args.slices)
        .add("churn", args.churn)
        .add("correlated_churn", args.correlated_churn)
        .add("drift", args.drift)
        .add("seed", args.seed)
        .add_ratio("misreporting_final", last.misreporting)
        .add_ratio("misreporting_max_last50", max_last50)
        .add_ratio("misreporting_mean_last50", mean_last50)
        .add_f64("sdm", last.sdm)
        .add_ratio("coverage", last.coverage)
        .add("live_nodes", sim.alive().len())
        .add(
            "slicing_messages_per_node_per_cycle",
            serde_json::json!(
                (samples_messages as f64 / sim.len() as f64 / f64::from(args.cycles) * 100.0)
                    .round()
                    / 100.0
            ),
        )
        .add("events", sim.stats().events)
        .add_f64("wall_seconds", wall)
        .add_f64("peak_rss_mib", peak_rss_mib());
    report
}

fn value_of(sim: &Sim, i: NodeIndex) -> f64 {
    sim.node(i).map_or(0.0, |n| n.slicing().value())
}

/// A live node picked with probability proportional to `1 - value` (values in `[0, 1)`).
fn pick_low(alive: &[NodeIndex], values: &[f64], rng: &mut nubo_proto::Rng) -> Option<NodeIndex> {
    let total: f64 = alive.iter().map(|&i| 1.0 - values[i as usize]).sum();
    let mut target = rng.unit() * total;
    for &i in alive {
        target -= 1.0 - values[i as usize];
        if target <= 0.0 {
            return Some(i);
        }
    }
    alive.last().copied()
}

/// Compares every live node's slice estimate with its true slice among the live nodes.
fn accuracy(sim: &Sim, values: &[f64], slices: u32) -> Accuracy {
    let mut ranked: Vec<(f64, u64, NodeIndex)> = sim
        .alive()
        .into_iter()
        .filter_map(|i| {
            sim.node(i)
                .map(|n| (values[i as usize], node_key(n.id()), i))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let n = ranked.len();
    if n == 0 {
        return Accuracy::default();
    }
    let (mut wrong, mut distance, mut coverage) = (0usize, 0u64, 0.0);
    for (position, &(_, _, i)) in ranked.iter().enumerate() {
        let Some(node) = sim.node(i) else { continue };
        let truth = ((position as u64 * u64::from(slices)) / n as u64) as u32;
        let estimate = node.slicing().slice(slices);
        if estimate != truth {
            wrong += 1;
        }
        distance += u64::from(estimate.abs_diff(truth));
        coverage += node.slicing().known() as f64 / (n - 1).max(1) as f64;
    }
    Accuracy {
        misreporting: wrong as f64 / n as f64,
        sdm: distance as f64 / n as f64,
        coverage: coverage / n as f64,
    }
}
