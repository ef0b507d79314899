//! Aggregation at scale: how fast push-pull averaging converges (the variance shrink factor
//! ρ per cycle, 1/(2√e) ≈ 0.303 in theory) and how close every node's estimate of the cloud's
//! size is at the end of each epoch, with crashes, churn and message loss.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use nubo_proto::aggregation::{AggregationConfig, Partners};
use nubo_proto::{Config, Time};

use crate::engine::{NetworkConfig, NoObserver, Sim};
use crate::experiments::hyparview::overlay_only;
use crate::report::{Report, peak_rss_mib};
use crate::workload::{add_node, grow_overlay};

/// Options of `nubo-sim aggregate`.
#[derive(Args, Clone, Debug)]
pub struct AggregateArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: u32,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Cycles to run after the first epoch begins (one cycle = one exchange per node, 1 s).
    #[arg(long, default_value_t = 90)]
    pub cycles: u32,
    /// Cycles per epoch.
    #[arg(long, default_value_t = 30)]
    pub epoch_cycles: u16,
    /// Fraction of the nodes to crash at once.
    #[arg(long, default_value_t = 0.0)]
    pub crash: f64,
    /// When to crash them, in cycles after the first epoch begins.
    #[arg(long, default_value_t = 5)]
    pub crash_at_cycle: u32,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Nodes that leave, and as many that join, per node and per cycle.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// The size estimates that live nodes published for one epoch.
#[derive(Default)]
struct EpochResult {
    errors: Vec<f64>,
    live: usize,
}

/// Runs the experiment and reports it.
pub fn run(args: &AggregateArgs) -> Report {
    let started = Instant::now();
    let cycle = Duration::from_secs(1);
    let config = Config {
        aggregation: AggregationConfig {
            interval: cycle,
            epoch_cycles: args.epoch_cycles,
            // The published convergence is for uniformly random partners.
            partners: Partners::Known,
            ..AggregationConfig::default()
        },
        ..overlay_only(cycle)
    };
    let mut sim = Sim::new(args.seed, config, NetworkConfig::default());
    let mut rng = sim.rng().fork();
    let mut observer = NoObserver;
    grow_overlay(&mut sim, args.nodes, cycle * 10, &mut observer, |sim| {
        add_node(sim, &mut rng)
    });
    sim.set_loss(args.loss);

    // The first epoch begins when the first node's epoch 0 ends; measure from there.
    let first_start = sim
        .node(0)
        .map(|n| n.aggregation().epoch_start())
        .unwrap_or(Time::ZERO)
        + cycle * u32::from(args.epoch_cycles);
    sim.run_until(first_start + cycle / 2, &mut observer);

    let mut variances: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let mut results: BTreeMap<u64, EpochResult> = BTreeMap::new();
    let mut published: Vec<u64> = vec![0; args.nodes as usize];
    let mut crash_epoch = None;
    let churn_per_cycle = args.churn * f64::from(args.nodes);
    let mut churn_debt = 0.0;

    for c in 0..args.cycles {
        if args.crash > 0.0 && c == args.crash_at_cycle {
            let mut alive = sim.alive();
            sim.rng().shuffle(&mut alive);
            let victims = (args.crash * alive.len() as f64).round() as usize;
            for &victim in alive.iter().take(victims) {
                sim.crash(victim);
            }
            crash_epoch = Some(current_epoch(&sim));
        }
        churn_debt += churn_per_cycle;
        while churn_debt >= 1.0 {
            churn_debt -= 1.0;
            let alive = sim.alive();
            if let Some(&leaving) = sim.rng().choose(&alive) {
                sim.crash(leaving);
            }
            let node = add_node(&mut sim, &mut rng);
            published.push(0);
            if let Some(&contact) = sim.rng().choose(&alive) {
                sim.join(node, &[contact], &mut observer);
            }
        }
        let until = sim.now() + cycle;
        sim.run_until(until, &mut observer);
        sample_variance(&sim, &mut variances);
        collect_published(&sim, &mut published, &mut results);
    }

    let rhos = shrink_factors(&variances, args.epoch_cycles);
    let rho_avg = geometric_mean(&rhos);
    // Epochs whose results every node has published: all but the current one.
    let current = current_epoch(&sim);
    let complete: Vec<(&u64, &EpochResult)> = results
        .iter()
        .filter(|(e, r)| **e + 1 < current && !r.errors.is_empty())
        .collect();
    let last = complete.last();
    let after_crash = crash_epoch.and_then(|crashed| complete.iter().find(|(e, _)| **e > crashed));
    let wall = started.elapsed().as_secs_f64();
    let stats = sim.stats();

    let mut report = Report::new(format!(
        "Aggregation: {} nodes, {} cycles, epochs of {} cycles (seed {})",
        args.nodes, args.cycles, args.epoch_cycles, args.seed
    ));
    report
        .add("nodes", args.nodes)
        .add("seed", args.seed)
        .add("crash", args.crash)
        .add("loss", args.loss)
        .add("churn", args.churn)
        .add_f64("rho_avg", rho_avg)
        .add("rho_cycles_measured", rhos.len());
    match last {
        Some((epoch, result)) => {
            report
                .add("epoch", **epoch)
                .add("live_nodes", result.live)
                .add_ratio("count_error_p50", percentile(&result.errors, 0.5))
                .add_ratio("count_error_p95", percentile(&result.errors, 0.95))
                .add_ratio("count_error_max", percentile(&result.errors, 1.0))
                .add_ratio(
                    "nodes_with_result",
                    result.errors.len() as f64 / result.live.max(1) as f64,
                );
        }
        None => {
            report.add("count_error_p95", serde_json::Value::Null);
        }
    }
    if let Some((epoch, result)) = after_crash {
        report.add("first_epoch_after_crash", **epoch).add_ratio(
            "count_error_p95_after_crash",
            percentile(&result.errors, 0.95),
        );
    }
    let per_epoch: serde_json::Map<String, serde_json::Value> = complete
        .iter()
        .map(|(e, r)| {
            let p95 = percentile(&r.errors, 0.95);
            (e.to_string(), serde_json::json!((p95 * 1e6).round() / 1e6))
        })
        .collect();
    report
        .add(
            "count_error_p95_by_epoch",
            serde_json::Value::Object(per_epoch),
        )
        .add("simulated_seconds", sim.now().as_micros() / 1_000_000)
        .add("events", stats.events)
        .add_f64("wall_seconds", wall)
        .add_f64("peak_rss_mib", peak_rss_mib());
    report
}

/// The epoch most live nodes take part in.
fn current_epoch(sim: &Sim) -> u64 {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for i in sim.alive() {
        if let Some(node) = sim.node(i) {
            *counts.entry(node.aggregation().epoch().0).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or(0, |(e, _)| e)
}

/// Records the variance, across the nodes taking part in the current epoch, of the running
/// average of cores.
fn sample_variance(sim: &Sim, variances: &mut BTreeMap<u64, Vec<f64>>) {
    let epoch = current_epoch(sim);
    let values: Vec<f64> = sim
        .alive()
        .into_iter()
        .filter_map(|i| sim.node(i))
        .filter(|n| n.aggregation().epoch() == (epoch, true))
        .map(|n| n.aggregation().running_average(0))
        .collect();
    if values.len() < 2 {
        return;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    variances.entry(epoch).or_default().push(variance);
}

/// Ratios of successive variances within each epoch, from its first full cycle on, while the
/// variance is still far above floating-point noise.
fn shrink_factors(variances: &BTreeMap<u64, Vec<f64>>, epoch_cycles: u16) -> Vec<f64> {
    let mut rhos = Vec::new();
    for series in variances.values() {
        // Only epochs observed from their start (a full epoch of samples).
        if series.len() + 1 < usize::from(epoch_cycles) {
            continue;
        }
        let floor = series[0] * 1e-20;
        for pair in series.windows(2).take(20) {
            if pair[0] > floor && pair[1] > 0.0 {
                rhos.push(pair[1] / pair[0]);
            }
        }
    }
    rhos
}

/// Notes every node's newly published result.
fn collect_published(sim: &Sim, published: &mut [u64], results: &mut BTreeMap<u64, EpochResult>) {
    let alive = sim.alive();
    let live = alive.len();
    for i in alive {
        let Some(stats) = sim.node(i).and_then(|n| n.cloud_stats()) else {
            continue;
        };
        let seen = &mut published[i as usize];
        if stats.epoch > *seen {
            *seen = stats.epoch;
            let result = results.entry(stats.epoch).or_default();
            result.live = live;
            result
                .errors
                .push((stats.size - live as f64).abs() / live as f64);
        }
    }
}

fn geometric_mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    (values.iter().map(|v| v.ln()).sum::<f64>() / values.len() as f64).exp()
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
