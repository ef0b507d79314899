//! The HyParView paper's experiment (TR-07-13 §5): build an overlay, kill a fraction of the
//! nodes at once, then broadcast from random survivors and measure who gets what.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use nubo_proto::Config;
use nubo_proto::aggregation::AggregationConfig;
use nubo_proto::broadcast::{BroadcastConfig, Dissemination, TreeConfig};
use nubo_proto::coordination::CoordinationConfig;
use nubo_proto::kv::KvConfig;
use nubo_proto::liveness::LivenessConfig;
use nubo_proto::membership::MembershipConfig;
use nubo_proto::ring::RingConfig;
use nubo_proto::roster::RosterConfig;
use nubo_proto::slicing::SlicingConfig;
use nubo_proto::suite::SuiteConfig;

use crate::engine::{NetworkConfig, NodeIndex, Sim};
use crate::overlay::overlay_health;
use crate::report::{Report, peak_rss_mib};
use crate::tracker::BroadcastTracker;
use crate::workload::grow_overlay;

/// Options of `nubo-sim hyparview`.
#[derive(Args, Clone, Debug)]
pub struct HyparviewArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 10_000)]
    pub nodes: u32,
    /// Fraction of nodes killed at once after warm-up (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail: f64,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Broadcasts sent from random live nodes after the failure.
    #[arg(long, default_value_t = 1_000)]
    pub broadcasts: u32,
    /// Broadcasts per cycle. The paper sends one at a time; at 1 per cycle each broadcast has
    /// reached everyone before the next starts.
    #[arg(long, default_value_t = 1)]
    pub rate: u32,
    /// Largest active view.
    #[arg(long, default_value_t = 5)]
    pub active: usize,
    /// Largest passive view.
    #[arg(long, default_value_t = 30)]
    pub passive: usize,
    /// Cycles (shuffle periods) of warm-up after every node joined.
    #[arg(long, default_value_t = 50)]
    pub warmup: u32,
    /// Length of a cycle in milliseconds of simulated time.
    #[arg(long, default_value_t = 1_000)]
    pub cycle_ms: u64,
    /// Probability that a message is lost.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// How payloads travel past the first hops: `pull` (announced, then pulled from the first
    /// announcer) or `tree` (pushed along a spanning tree, Plumtree).
    #[arg(long, default_value_t = Dissemination::default())]
    pub dissemination: Dissemination,
    /// Hops over which a broadcast floods the overlay before being pulled or following the tree.
    #[arg(long, default_value_t = BroadcastConfig::default().flood_hops)]
    pub flood_hops: u16,
    /// Smallest base latency of a link, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub latency_min_ms: u64,
    /// Largest base latency of a link, in milliseconds.
    #[arg(long, default_value_t = 40)]
    pub latency_max_ms: u64,
    /// Print one line per broadcast (deliveries, last hop, redundancy, latency) to stderr.
    #[arg(long)]
    pub trace: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// The node configuration of the experiment: the paper's parameters, one cycle per shuffle.
pub fn experiment_config(args: &HyparviewArgs, cycle: Duration) -> Config {
    Config {
        membership: membership_config(args.active, args.passive, cycle),
        broadcast: BroadcastConfig {
            ae_interval: cycle * 5,
            ae_settle: cycle,
            retention: cycle * 120,
            graft_timeout: cycle,
            flood_hops: args.flood_hops,
            dissemination: args.dissemination,
            tree: TreeConfig {
                interval: cycle * 10,
                timeout: cycle * 30,
            },
            graft_retry: cycle / 2,
            ..BroadcastConfig::default()
        },
        ..overlay_only(cycle)
    }
}

/// Membership (the paper's parameters) and broadcast only: every other layer is measured on
/// its own by its experiment, which switches it back on.
pub fn overlay_only(cycle: Duration) -> Config {
    Config {
        membership: membership_config(5, 30, cycle),
        // The anti-entropy period these experiments were measured with.
        broadcast: BroadcastConfig {
            ae_interval: Duration::from_secs(2),
            ..BroadcastConfig::default()
        },
        aggregation: AggregationConfig {
            enabled: false,
            ..AggregationConfig::default()
        },
        slicing: SlicingConfig {
            enabled: false,
            ..SlicingConfig::default()
        },
        ring: RingConfig {
            enabled: false,
            ..RingConfig::default()
        },
        kv: KvConfig {
            enabled: false,
            ..KvConfig::default()
        },
        roster: RosterConfig {
            enabled: false,
            ..RosterConfig::default()
        },
        suite: SuiteConfig {
            enabled: false,
            ..SuiteConfig::default()
        },
        liveness: LivenessConfig {
            enabled: false,
            ..LivenessConfig::default()
        },
        coordination: CoordinationConfig {
            enabled: false,
            ..CoordinationConfig::default()
        },
    }
}

/// The paper's membership parameters with views of the given sizes, one cycle per shuffle.
pub fn membership_config(active: usize, passive: usize, cycle: Duration) -> MembershipConfig {
    MembershipConfig {
        active_max: active,
        passive_max: passive,
        active_walk_length: 6,
        passive_walk_length: 3,
        shuffle_active: 3,
        shuffle_passive: 4,
        shuffle_walk_length: 6,
        shuffle_interval: cycle,
        maintain_interval: cycle,
        probe_interval: cycle,
        probe_timeout: cycle * 2,
        request_timeout: cycle,
        ..MembershipConfig::default()
    }
}

/// Runs the experiment and reports it.
pub fn run(args: &HyparviewArgs) -> Report {
    let started = Instant::now();
    let cycle = Duration::from_millis(args.cycle_ms);
    let config = experiment_config(args, cycle);
    let network = NetworkConfig {
        loss: args.loss,
        latency_min: Duration::from_millis(args.latency_min_ms),
        latency_max: Duration::from_millis(args.latency_max_ms),
        ..NetworkConfig::default()
    };
    let mut sim = Sim::new(args.seed, config, network);
    let mut tracker = BroadcastTracker::new(false);

    grow_overlay(&mut sim, args.nodes, cycle * 10, &mut tracker, |sim| {
        sim.add_node()
    });
    sim.run_for(cycle * args.warmup, &mut tracker);
    let before = overlay_health(&sim);

    // Kill the given fraction at once.
    let mut victims: Vec<NodeIndex> = sim.alive();
    sim.rng().shuffle(&mut victims);
    let killed = ((args.fail.clamp(0.0, 1.0)) * f64::from(args.nodes)).round() as usize;
    for &victim in victims.iter().take(killed) {
        sim.crash(victim);
    }
    let failed_at = sim.now();
    let survivors = sim.alive();

    // Broadcast from random survivors; watch the overlay heal cycle by cycle.
    let interval = cycle / args.rate.max(1);
    let mut healed_cycles: Option<u32> = None;
    let mut health_checks = 0u32;
    let mut next_check = failed_at + cycle;
    let check_cycles_max = (args.broadcasts / args.rate.max(1)).max(30);
    for _ in 0..args.broadcasts {
        if survivors.is_empty() {
            break;
        }
        let origin = survivors[sim.rng().index(survivors.len())];
        if args.trace {
            trace_tree(&sim);
        }
        let payload = Bytes::from_static(b"hyparview experiment");
        if let Some(id) = sim.broadcast(origin, payload, &mut tracker) {
            tracker.track(id, sim.now(), origin);
        }
        let until = sim.now() + interval;
        while next_check <= until && health_checks < check_cycles_max {
            sim.run_until(next_check, &mut tracker);
            health_checks += 1;
            if healed_cycles.is_none() || args.trace {
                let health = overlay_health(&sim);
                if args.trace {
                    eprintln!("cycle {health_checks} after the failure: {health:?}");
                }
                if healed_cycles.is_none() && health.is_healed() {
                    healed_cycles = Some(health_checks);
                }
            }
            next_check += cycle;
        }
        sim.run_until(until, &mut tracker);
    }
    while healed_cycles.is_none() && health_checks < check_cycles_max {
        sim.run_until(next_check, &mut tracker);
        health_checks += 1;
        if overlay_health(&sim).is_healed() {
            healed_cycles = Some(health_checks);
        }
        next_check += cycle;
    }
    // Let grafts and anti-entropy finish.
    sim.run_for(cycle * 5, &mut tracker);
    let after = overlay_health(&sim);

    if args.trace {
        trace_tree(&sim);
        for (i, r) in tracker.records.iter().enumerate() {
            eprintln!(
                "broadcast {i}: delivered {} hops_max {} rmr {:.3} last_ms {}",
                r.delivered,
                r.hops_max,
                r.rmr(),
                r.last_delivery.saturating_since(r.sent_at).as_millis()
            );
        }
    }
    let live = survivors.len().max(1) as f64;
    let records = &tracker.records;
    let reliabilities: Vec<f64> = records
        .iter()
        .map(|r| f64::from(r.delivered) / live)
        .collect();
    let reliability_avg = mean(&reliabilities);
    let reliability_min = reliabilities.iter().copied().fold(1.0, f64::min);
    let complete = reliabilities.iter().filter(|&&r| r >= 1.0).count();
    let rmr_avg = mean(&records.iter().map(|r| r.rmr()).collect::<Vec<_>>());
    let ldh_max = records.iter().map(|r| r.hops_max).max().unwrap_or(0);
    // Broadcasts sent while the overlay was still broken take detours and wait for repairs;
    // the steady state is what the ones sent after healing see.
    let healed_at = healed_cycles.map(|c| failed_at + cycle * c);
    let ldh_max_after_healing = healed_at.and_then(|at| {
        records
            .iter()
            .filter(|r| r.sent_at >= at)
            .map(|r| r.hops_max)
            .max()
    });
    let ldh_avg = mean(
        &records
            .iter()
            .map(|r| f64::from(r.hops_max))
            .collect::<Vec<_>>(),
    );
    let latency_ms: Vec<f64> = records
        .iter()
        .map(|r| r.last_delivery.saturating_since(r.sent_at).as_secs_f64() * 1e3)
        .collect();
    let (repaired, grafts) = survivors
        .iter()
        .filter_map(|&i| sim.node(i))
        .map(|n| n.broadcast_layer().counters())
        .fold((0, 0), |(r, g), c| (r + c.repaired, g + c.grafts));
    let escalations: u64 = survivors
        .iter()
        .filter_map(|&i| sim.node(i))
        .map(|n| n.membership().counters().escalations)
        .sum();
    let wall = started.elapsed().as_secs_f64();
    let stats = sim.stats();

    let mut report = Report::new(format!(
        "HyParView + broadcast by {}: {} nodes, {:.0}% killed, {} broadcasts (seed {})",
        args.dissemination,
        args.nodes,
        args.fail * 100.0,
        records.len(),
        args.seed
    ));
    report
        .add("nodes", args.nodes)
        .add("fail", args.fail)
        .add("dissemination", args.dissemination.to_string())
        .add("seed", args.seed)
        .add("survivors", survivors.len())
        .add("broadcasts", records.len());
    report
        .add_ratio("reliability_avg", reliability_avg)
        .add_ratio("reliability_min", reliability_min)
        .add("broadcasts_complete", complete)
        .add_f64("rmr_avg", rmr_avg)
        .add("ldh_max", ldh_max)
        .add(
            "ldh_max_after_healing",
            ldh_max_after_healing.map_or(serde_json::Value::Null, |h| h.into()),
        )
        .add_f64("ldh_avg", ldh_avg)
        .add_f64("last_delivery_ms_avg", mean(&latency_ms))
        .add(
            "healed_cycles",
            healed_cycles.map_or(serde_json::Value::Null, |c| c.into()),
        )
        .add("grafts", grafts)
        .add("repaired_by_anti_entropy", repaired)
        .add("escalations", escalations)
        .add("components_before", before.components)
        .add("components_after", after.components)
        .add("isolated_after", after.isolated)
        .add("dead_links_after", after.dead_links)
        .add("asymmetric_links_after", after.asymmetric.len())
        .add("simulated_seconds", sim.now().as_micros() / 1_000_000)
        .add("events", stats.events)
        .add("messages_delivered", stats.delivered)
        .add(
            "messages_sent_by_kind",
            serde_json::to_value(sim.sent_by_kind()).unwrap_or_default(),
        )
        .add_f64("events_per_second", stats.events as f64 / wall.max(1e-9))
        .add_f64("wall_seconds", wall)
        .add_f64("peak_rss_mib", peak_rss_mib());
    report
}

/// Prints the shape of the dissemination tree (nothing when broadcasts are pulled): nodes
/// without a parent, parents that do not count the node as a child, epochs and depths.
fn trace_tree(sim: &Sim) {
    let mut orphans = 0;
    let mut unacknowledged = 0;
    let mut epochs = std::collections::BTreeMap::new();
    let mut depths = std::collections::BTreeMap::new();
    for i in sim.alive() {
        let Some(tree) = sim.node(i).unwrap().broadcast_layer().tree() else {
            return;
        };
        *epochs.entry(tree.epoch().map(|e| e.number)).or_insert(0) += 1;
        *depths.entry(tree.hops()).or_insert(0) += 1;
        let Some(parent) = tree.parent() else {
            orphans += 1;
            continue;
        };
        let acknowledged = sim
            .index_of(parent)
            .and_then(|j| sim.node(j))
            .and_then(|p| p.broadcast_layer().tree())
            .is_some_and(|t| t.children().any(|c| c == sim.peer(i).id));
        if !acknowledged {
            unacknowledged += 1;
        }
    }
    eprintln!(
        "{}: orphans {orphans} unacknowledged {unacknowledged} epochs {epochs:?} depths {depths:?}",
        sim.now()
    );
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}
