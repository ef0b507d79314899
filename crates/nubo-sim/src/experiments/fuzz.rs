//! Swarm testing: every option of a run derives from its seed; a safety phase injects faults
//! (crashes, restarts, joins, leaves, partitions, loss) while checking invariants that must
//! always hold; a liveness phase heals everything and checks that the cloud converges.
//!
//! A run with seed `S` is reproduced exactly by `nubo-sim fuzz --seed S --runs 1`.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use nubo_proto::aggregation::{AggregationConfig, Partners};
use nubo_proto::broadcast::{BroadcastConfig, Dissemination, TreeConfig};
use nubo_proto::coordination::CoordinationConfig;
use nubo_proto::kv::{KvConfig, KvValue};
use nubo_proto::liveness::LivenessConfig;
use nubo_proto::membership::MembershipConfig;
use nubo_proto::ring::RingConfig;
use nubo_proto::roster::RosterConfig;
use nubo_proto::slicing::SlicingConfig;
use nubo_proto::suite::SuiteConfig;
use nubo_proto::{Config, Rng};

use crate::engine::{NetworkConfig, NodeIndex, Sim};
use crate::experiments::cloud;
use crate::experiments::ring::ring_quality;
use crate::kv_tracker::KvTracker;
use crate::overlay::overlay_health;
use crate::report::Report;
use crate::tracker::BroadcastTracker;
use crate::workload;
use nubo_proto::service::Count;
use nubo_proto::spec::ServiceSpec;

/// Adds a machine lending random resources, with attributes (a region) drawn from a
/// generator of its own, so that the run's other choices stay as they were.
fn add_node(sim: &mut Sim, rng: &mut Rng) -> NodeIndex {
    let node = workload::add_node(sim, rng);
    let mut own = Rng::from_seed(0xA77E ^ u64::from(node));
    sim.set_attributes(node, cloud::machine_attributes(&mut own));
    node
}
use nubo_proto::slicing::node_key;

/// How big and long each run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// Small clouds and short phases: 100 seeds in well under a minute (CI).
    Fast,
    /// Larger clouds and longer fault phases.
    Full,
}

impl Profile {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Fast => "fast",
            Profile::Full => "full",
        }
    }
}

/// Options of `nubo-sim fuzz`.
#[derive(Args, Clone, Debug)]
pub struct FuzzArgs {
    /// Seed of the first run; run `i` uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of runs.
    #[arg(long, default_value_t = 100)]
    pub runs: u64,
    /// Size of the runs.
    #[arg(long, value_enum, default_value_t = Profile::Fast)]
    pub profile: Profile,
    /// Print what each run does.
    #[arg(long)]
    pub verbose: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Everything a run is made of, derived from its seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The run's seed.
    pub seed: u64,
    /// Nodes at the start.
    pub nodes: u32,
    /// Node configuration.
    pub config: Config,
    /// Network configuration.
    pub network: NetworkConfig,
    /// Length of the fault phase.
    pub safety: Duration,
    /// Length of the healing phase before the liveness checks.
    pub settle: Duration,
    /// Mean time between faults.
    pub fault_interval: Duration,
    /// Largest fraction of the nodes down at once.
    pub down_max: f64,
}

impl Scenario {
    /// The scenario of seed `seed`.
    pub fn from_seed(seed: u64, profile: Profile) -> Scenario {
        let mut rng = Rng::from_seed(seed ^ 0xF022_5EED);
        let (nodes_min, nodes_max, safety_s) = match profile {
            Profile::Fast => (6, 40, 40),
            Profile::Full => (16, 250, 180),
        };
        let nodes = nodes_min + rng.below(u64::from(nodes_max - nodes_min + 1)) as u32;
        let active_max = 3 + rng.index(4);
        let passive_max = active_max * (2 + rng.index(5));
        let cycle = Duration::from_millis(200 + rng.below(1_800));
        let latency_min = Duration::from_millis(1 + rng.below(20));
        let latency_max = latency_min + Duration::from_millis(rng.below(80));
        let loss = if rng.chance(0.5) {
            0.0
        } else {
            rng.unit() * 0.05
        };
        let successors = 3 + rng.index(6);
        let replicas = 1 + rng.index(4.min(successors + 1));
        let write_quorum = 1 + rng.index(replicas);
        let config = Config {
            membership: MembershipConfig {
                active_max,
                passive_max,
                active_walk_length: 2 + rng.below(5) as u8,
                passive_walk_length: 1 + rng.below(2) as u8,
                shuffle_active: 1 + rng.index(active_max),
                shuffle_passive: 1 + rng.index(passive_max / 2 + 1),
                shuffle_walk_length: 1 + rng.below(6) as u8,
                shuffle_interval: cycle,
                maintain_interval: cycle / 4,
                // A round of probes takes half a cycle.
                probe_interval: cycle / (2 * active_max as u32),
                probe_timeout: latency_max * 4 + cycle / 4,
                request_timeout: cycle,
                lost_max: 4 + rng.index(16),
                reconnect_backoff_min: cycle,
                reconnect_backoff_max: cycle * 8,
                lost_expiry: Duration::from_secs(3_600),
            },
            broadcast: BroadcastConfig {
                graft_timeout: latency_max * 2 + Duration::from_millis(rng.below(400)),
                graft_retry: latency_max * 2,
                ihave_interval: Duration::from_millis(rng.below(50)),
                retention: Duration::from_secs(3_600),
                ae_interval: cycle * (1 + rng.below(4) as u32),
                ae_settle: latency_max * 4,
                flood_hops: rng.below(4) as u16,
                tree: TreeConfig {
                    interval: cycle * (2 + rng.below(20) as u32),
                    timeout: cycle * (4 + rng.below(40) as u32),
                },
                dissemination: if rng.below(2) == 0 {
                    Dissemination::Pull
                } else {
                    Dissemination::Tree
                },
                ..BroadcastConfig::default()
            },
            aggregation: AggregationConfig {
                enabled: true,
                interval: cycle,
                epoch_cycles: 20 + rng.below(30) as u16,
                count_instances: 1 + rng.index(8),
                // Uniform partners: the check below holds every node to 10% of the truth one
                // epoch after healing, and exchanges only between neighbours mix slowly
                // across the few links that join two sides of a healed partition (seed 23
                // of the fast profile: 28.4 nodes estimated, 23 alive).
                partners: Partners::Known,
            },
            slicing: SlicingConfig {
                enabled: true,
                interval: cycle,
                refresh: cycle * (5 + rng.below(20) as u32),
                window: cycle * (60 + rng.below(40) as u32),
                forwards: 2 + rng.below(2) as u8,
                batch_max: 64 + rng.index(512),
                samples_max: 10_000,
                snapshot_below: 1 + rng.index(8),
                digest_interval: cycle * (5 + rng.below(30) as u32),
            },
            ring: RingConfig {
                enabled: true,
                successors,
                interval: cycle,
                interval_max: cycle,
                stale_after: cycle * (10 + rng.below(20) as u32),
                dead_for: cycle * (5 + rng.below(30) as u32),
                lookup_timeout: latency_max * 40,
                lookup_attempts: 4,
                lookups_max: 1024,
                hops_max: 64,
                settle_after: cycle * 3,
            },
            kv: KvConfig {
                enabled: true,
                replicas,
                write_quorum,
                // Reads see acknowledged writes: W + R > r.
                read_quorum: replicas + 1 - write_quorum,
                op_timeout: latency_max * 60 + cycle,
                op_attempts: 3,
                ops_max: 256,
                sync_interval: cycle * (2 + rng.below(8) as u32),
                sync_buckets: 1 + rng.index(64),
                handoff_scan: 1 + rng.index(64),
                tombstone_ttl: Duration::from_secs(3600),
                budget_bytes: if rng.chance(0.2) { 600 } else { 1 << 24 },
                key_max: 64,
                value_max: 256,
            },
            // The full roster gave way to liveness and coordination.
            roster: RosterConfig {
                enabled: false,
                ..RosterConfig::default()
            },
            suite: SuiteConfig {
                enabled: true,
                sync_interval: cycle * (2 + rng.below(8) as u32),
                ..SuiteConfig::default()
            },
            liveness: LivenessConfig {
                enabled: true,
                helpers: 1 + rng.index(3),
                probe_timeout: latency_max * 6 + cycle / 2,
                ..LivenessConfig::default()
            },
            coordination: CoordinationConfig {
                enabled: true,
                reach_min: 2 + rng.index(16),
                reach_per_instance: 1 + rng.index(4),
                beat_interval: cycle * (2 + rng.below(10) as u32),
                gather: latency_max * 6 + cycle / 2,
                reporters_max: 16 + rng.index(240),
            },
        };
        Scenario {
            seed,
            nodes,
            config,
            network: NetworkConfig {
                latency_min,
                latency_max,
                jitter: Duration::from_millis(rng.below(10)),
                loss,
                check_wire: true,
            },
            safety: Duration::from_secs(safety_s / 2 + rng.below(safety_s / 2)),
            settle: cycle * 60,
            fault_interval: Duration::from_millis(300 + rng.below(3_000)),
            down_max: 0.1 + rng.unit() * 0.4,
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Invariant violations, empty when the run passed.
    pub violations: Vec<String>,
    /// Faults injected.
    pub faults: u32,
    /// Broadcasts checked.
    pub broadcasts: usize,
    /// Simulated events.
    pub events: u64,
    /// Key-value operations that ended.
    pub kv_ops: usize,
}

/// Runs one scenario to the end and reports every violated invariant.
pub fn run_scenario(scenario: &Scenario, verbose: bool) -> Outcome {
    let mut outcome = Outcome::default();
    let mut sim = Sim::new(
        scenario.seed,
        scenario.config.clone(),
        scenario.network.clone(),
    );
    let mut obs = (BroadcastTracker::new(true), KvTracker::default());
    let mut rng = Rng::from_seed(scenario.seed ^ 0xFA17);
    let log = |msg: String| {
        if verbose {
            println!("{msg}");
        }
    };

    log(format!("scenario: {scenario:#?}"));
    // Bootstrap: each node joins through one or two nodes already there.
    add_node(&mut sim, &mut rng);
    for i in 1..scenario.nodes {
        sim.run_for(Duration::from_millis(rng.below(200)), &mut obs);
        let node = add_node(&mut sim, &mut rng);
        let contacts = [
            rng.below(u64::from(i)) as NodeIndex,
            rng.below(u64::from(i)) as NodeIndex,
        ];
        sim.join(node, &contacts, &mut obs.0);
    }
    sim.run_for(scenario.config.membership.shuffle_interval * 10, &mut obs);
    let mut services = deploy_services(&mut sim, &mut rng, &mut obs);
    log(format!(
        "{} deployed {:?}",
        sim.now(),
        services.iter().map(|s| &s.key).collect::<Vec<_>>()
    ));
    let update_at = sim.now() + scenario.safety / 2;

    // Safety phase: faults and broadcasts, invariants checked all along.
    let end = sim.now() + scenario.safety;
    while sim.now() < end {
        let gap = Duration::from_micros(rng.below(scenario.fault_interval.as_micros() as u64 * 2));
        let step_end = (sim.now() + gap).min(end);
        while sim.now() < step_end {
            let next = (sim.now() + Duration::from_millis(250)).min(step_end);
            sim.run_until(next, &mut obs);
            check_safety(&sim, &obs.0, &mut outcome);
            check_placement_safety(&sim, &services, &mut outcome);
            if !outcome.violations.is_empty() {
                return finish(outcome, &sim);
            }
        }
        if sim.now() >= update_at
            && !services.is_empty()
            && services.iter().all(|s| s.fingerprint < 1_000)
        {
            let which = rng.index(services.len());
            let mut next = services[which].clone();
            next.fingerprint += 1_000;
            publish_from_random(&mut sim, &mut rng, &mut obs, &next, 2);
            log(format!("{} updated {} to version 2", sim.now(), next.key));
            services[which] = next;
        }
        if let Some(fault) = inject_fault(&mut sim, &mut rng, &mut obs.0, scenario) {
            outcome.faults += 1;
            log(format!("{} {fault}", sim.now()));
        }
        if rng.chance(0.7) {
            broadcast_from_random(&mut sim, &mut rng, &mut obs.0);
        }
        for _ in 0..rng.below(4) {
            kv_op_from_random(&mut sim, &mut rng, &mut obs);
        }
    }
    // Writes acknowledged so far whose version some live node still holds must survive.
    let durable: Vec<(Bytes, nubo_proto::kv::Version)> = obs
        .1
        .acked
        .iter()
        .filter(|(key, version)| {
            sim.alive().into_iter().any(|i| {
                sim.node(i)
                    .and_then(|n| n.kv().store().version(key))
                    .is_some_and(|v| v >= **version)
            })
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();

    // Liveness phase: heal everything, wait, then everything must have converged.
    sim.heal();
    sim.set_loss(0.0);
    log(format!("{} heal", sim.now()));
    sim.run_for(scenario.settle, &mut obs);
    check_safety(&sim, &obs.0, &mut outcome);
    let health = overlay_health(&sim);
    if verbose {
        for i in sim.alive() {
            let Some(m) = sim.node(i).map(|n| n.membership()) else {
                continue;
            };
            let idx = |id| sim.index_of(id);
            log(format!(
                "node {i}: active {:?} passive {:?} lost {:?}",
                m.active().ids().map(idx).collect::<Vec<_>>(),
                m.passive().ids().map(idx).collect::<Vec<_>>(),
                m.lost().map(|p| idx(p.id)).collect::<Vec<_>>()
            ));
        }
    }
    if health.components > 1 || health.isolated > 0 {
        outcome.violations.push(format!(
            "overlay not connected after healing: {} components, {} isolated of {} nodes",
            health.components, health.isolated, health.alive
        ));
    }
    if health.dead_links > 0 {
        outcome.violations.push(format!(
            "{} active-view links to dead nodes after healing",
            health.dead_links
        ));
    }
    if !health.asymmetric.is_empty() {
        // A link is one-sided while the messages that make or break it are in flight (an
        // eviction's `Disconnect`, a reply to a request), and a side whose `Disconnect` was
        // lost learns it at its next probe, or drops a silent link when the probe goes
        // unanswered: only a link still one-sided after that is a fault.
        let grace = scenario.config.membership.silence_bound() + scenario.network.latency_max * 4;
        sim.run_for(grace, &mut obs);
        let later = overlay_health(&sim);
        let lasting: Vec<&(NodeIndex, NodeIndex)> = health
            .asymmetric
            .iter()
            .filter(|link| later.asymmetric.contains(link))
            .collect();
        if let Some((a, b)) = lasting.first() {
            outcome.violations.push(format!(
                "{} asymmetric active-view links after healing, still one-sided {} ms later \
                 (e.g. {a} has {b}, not the reverse)",
                lasting.len(),
                grace.as_millis()
            ));
        }
    }
    // Broadcasts sent after healing reach every live node.
    let first_after_heal = obs.0.records.len();
    for _ in 0..5 {
        broadcast_from_random(&mut sim, &mut rng, &mut obs.0);
        sim.run_for(Duration::from_millis(100), &mut obs);
    }
    sim.run_for(
        scenario.config.broadcast.graft_timeout * 4 + Duration::from_secs(2),
        &mut obs,
    );
    let alive = sim.alive();
    for record in &obs.0.records[first_after_heal..] {
        let missing: Vec<NodeIndex> = alive
            .iter()
            .copied()
            .filter(|i| !record.delivered_by.contains(i))
            .collect();
        if !missing.is_empty() {
            outcome.violations.push(format!(
                "broadcast {:?} sent after healing missed by {} of {} live nodes (e.g. {:?})",
                record.id,
                missing.len(),
                alive.len(),
                &missing[..missing.len().min(5)]
            ));
        }
    }
    // Anti-entropy: whatever one live node delivered, every live node delivers.
    sim.run_for(scenario.config.broadcast.ae_interval * 20, &mut obs);
    // Aggregation: two more epochs, so that the last complete one began well after healing.
    let epoch = scenario.config.aggregation.interval
        * u32::from(2 * scenario.config.aggregation.epoch_cycles + 2);
    sim.run_for(epoch, &mut obs);
    check_aggregation(&sim, &mut outcome);
    check_slicing(&sim, &mut outcome);
    check_ring(&sim, scenario.config.ring.successors, &mut outcome);
    check_placement(
        &mut sim,
        &mut obs,
        scenario,
        &services,
        verbose,
        &mut outcome,
    );
    check_kv(
        &mut sim,
        &mut rng,
        &mut obs,
        scenario,
        &durable,
        &mut outcome,
    );
    let succeeded = obs.1.finished.iter().filter(|f| f.result.is_ok()).count();
    log(format!(
        "kv: {} operations ended ({succeeded} succeeded), {} acknowledged writes checked",
        obs.1.finished.len(),
        durable.len()
    ));
    outcome.kv_ops = obs.1.finished.len();
    for record in &obs.0.records[..first_after_heal] {
        if record.delivered_by.iter().any(|i| sim.is_alive(*i)) {
            let missing: Vec<NodeIndex> = alive
                .iter()
                .copied()
                .filter(|i| !record.delivered_by.contains(i))
                .collect();
            if !missing.is_empty() {
                outcome.violations.push(format!(
                    "broadcast {:?} delivered by some live nodes but not by {} others (e.g. {:?})",
                    record.id,
                    missing.len(),
                    &missing[..missing.len().min(5)]
                ));
            }
        }
    }
    outcome.broadcasts = obs.0.records.len();
    finish(outcome, &sim)
}

/// What a run watches: broadcasts and key-value operations.
type Observers = (BroadcastTracker, KvTracker);

/// Services of a run: one to four, one to three replicas, some held to a region.
fn deploy_services(sim: &mut Sim, rng: &mut Rng, obs: &mut Observers) -> Vec<ServiceSpec> {
    let count = 1 + rng.below(4) as u32;
    let services: Vec<ServiceSpec> = (0..count)
        .map(|j| {
            let mut spec = cloud::service_spec(j, rng);
            spec.placement.count = Count::Replicas(1 + rng.below(3) as u32);
            spec
        })
        .collect();
    for spec in &services {
        publish_from_random(sim, rng, obs, spec, 1);
    }
    services
}

fn publish_from_random(
    sim: &mut Sim,
    rng: &mut Rng,
    obs: &mut Observers,
    spec: &ServiceSpec,
    version: u64,
) {
    let alive = sim.alive();
    if alive.is_empty() {
        return;
    }
    let from = alive[rng.index(alive.len())];
    sim.publish(from, cloud::entry_of(spec, version), &mut obs.0);
}

/// At every instant: no instance runs where its service's constraints forbid it.
fn check_placement_safety(sim: &Sim, services: &[ServiceSpec], outcome: &mut Outcome) {
    let state = cloud::placement(sim, services);
    if state.misplaced > 0 {
        outcome.violations.push(format!(
            "{} instances run on nodes their constraints rule out",
            state.misplaced
        ));
    }
}

/// After healing: every service runs exactly its wanted instances (all up, at its newest
/// version) on live nodes that satisfy its constraints, and none twice on one node.
fn check_placement(
    sim: &mut Sim,
    obs: &mut Observers,
    scenario: &Scenario,
    services: &[ServiceSpec],
    verbose: bool,
    outcome: &mut Outcome,
) {
    let coordination = &scenario.config.coordination;
    // A beat repairs what a lost message left behind; a gather settles a new coordinator.
    let bound = coordination.beat_interval * 4 + coordination.gather * 8 + Duration::from_secs(10);
    let end = sim.now() + bound;
    let mut state = cloud::placement(sim, services);
    while !state.is_exact() && sim.now() < end {
        sim.run_for(Duration::from_millis(250), obs);
        state = cloud::placement(sim, services);
    }
    // The newest version a live node holds (a simulated node keeps nothing on disk, so an
    // update whose only holder crashed before spreading it is lost, as it would be).
    let newest = |key: &str| {
        sim.alive()
            .into_iter()
            .filter_map(|i| sim.node(i))
            .filter_map(|n| n.suite().get(key).map(|e| e.version))
            .max()
            .unwrap_or(0)
    };
    let stale: Vec<String> = sim
        .alive()
        .into_iter()
        .filter_map(|i| sim.runner(i).map(|r| (i, r)))
        .flat_map(|(i, runner)| {
            runner
                .running()
                .filter(|(key, version, _)| *version != newest(key))
                .map(move |(key, version, _)| format!("{key}@{version} on {i}"))
        })
        .collect();
    if !state.is_exact() || !stale.is_empty() {
        if verbose {
            cloud::explain_placement(sim, services);
        }
        outcome.violations.push(format!(
            "placement not exact {} ms after healing: {state:?}; old versions running: {stale:?}",
            bound.as_millis()
        ));
    }
}

fn finish(mut outcome: Outcome, sim: &Sim) -> Outcome {
    outcome.events = sim.stats().events;
    outcome
}

/// Invariants that hold at every instant, faults or not.
fn check_safety(sim: &Sim, tracker: &BroadcastTracker, outcome: &mut Outcome) {
    for i in sim.alive() {
        let Some(node) = sim.node(i) else { continue };
        let membership = node.membership();
        let config = membership.config();
        if membership.active().len() > config.active_max {
            outcome.violations.push(format!(
                "node {i} has {} active peers, more than {}",
                membership.active().len(),
                config.active_max
            ));
        }
        if membership.passive().len() > config.passive_max {
            outcome.violations.push(format!(
                "node {i} has {} passive peers, more than {}",
                membership.passive().len(),
                config.passive_max
            ));
        }
        if membership.active().contains(node.id()) || membership.passive().contains(node.id()) {
            outcome
                .violations
                .push(format!("node {i} lists itself in its views"));
        }
        if membership
            .active()
            .ids()
            .any(|id| membership.passive().contains(id))
        {
            outcome
                .violations
                .push(format!("node {i} has a peer in both views"));
        }
    }
    if tracker.duplicates > 0 {
        outcome
            .violations
            .push(format!("{} duplicate deliveries", tracker.duplicates));
    }
}

/// After healing and a full epoch: every node's size and core count estimates are close to
/// the truth, and all nodes are in nearly the same epoch.
fn check_aggregation(sim: &Sim, outcome: &mut Outcome) {
    let alive = sim.alive();
    let size = alive.len() as f64;
    let cores: f64 = alive.iter().map(|&i| sim.resources(i).cores).sum();
    let epochs: Vec<u64> = alive
        .iter()
        .filter_map(|&i| sim.node(i))
        .map(|n| n.aggregation().epoch().0)
        .collect();
    let (low, high) = (
        epochs.iter().min().copied().unwrap_or(0),
        epochs.iter().max().copied().unwrap_or(0),
    );
    if high > low + 1 {
        outcome.violations.push(format!(
            "aggregation epochs diverge after healing: {low}..{high}"
        ));
    }
    for &i in &alive {
        let Some(stats) = sim.node(i).and_then(|n| n.cloud_stats()) else {
            outcome
                .violations
                .push(format!("node {i} has no aggregation result after healing"));
            continue;
        };
        if stats.epoch + 1 < low {
            outcome.violations.push(format!(
                "node {i} took no part in the last epoch: its result is from epoch {} (now {low})",
                stats.epoch
            ));
            continue;
        }
        let size_error = (stats.size - size).abs() / size;
        let cores_error = (stats.totals.cores - cores).abs() / cores;
        if size_error > 0.1 || cores_error > 0.1 {
            let taking_part = alive
                .iter()
                .filter_map(|&j| sim.node(j))
                .filter(|n| n.aggregation().epoch().1)
                .count();

            outcome.violations.push(format!(
                "node {i} estimates {:.1} nodes and {:.0} cores in epoch {}; there are {size} and {cores} ({taking_part} taking part in epochs {low}..{high})",
                stats.size, stats.totals.cores, stats.epoch
            ));
            return;
        }
    }
}

/// After healing: every node's rank estimate is close to its true rank among live nodes (a
/// window after healing, values of departed nodes have expired).
fn check_slicing(sim: &Sim, outcome: &mut Outcome) {
    let mut ranked: Vec<(f64, u64, NodeIndex)> = sim
        .alive()
        .into_iter()
        .filter_map(|i| {
            sim.node(i)
                .map(|n| (n.slicing().value(), node_key(n.id()), i))
        })
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let n = ranked.len() as f64;
    for (position, &(_, _, i)) in ranked.iter().enumerate() {
        let Some(node) = sim.node(i) else { continue };
        let truth = position as f64 / n;
        let estimate = node.slicing().rank();
        // Rumours are probabilistic: allow 10%, or one node's worth in a tiny cloud.
        if (estimate - truth).abs() > (0.1f64).max(1.0 / (n - 1.0).max(1.0) + 0.01) {
            outcome.violations.push(format!(
                "node {i} estimates its rank at {estimate:.3}, it is {truth:.3} (knows {} values of {n})",
                node.slicing().known()
            ));
            return;
        }
    }
}

/// After healing: every live node's first successor is the next live node on the ring, so
/// successor pointers form one ring of all live nodes.
fn check_ring(sim: &Sim, successors: usize, outcome: &mut Outcome) {
    let quality = ring_quality(sim, successors);
    if quality.successors_right == quality.alive {
        return;
    }
    let mut alive: Vec<(u128, NodeIndex)> = sim
        .alive()
        .into_iter()
        .map(|i| (sim.peer(i).id.0, i))
        .collect();
    alive.sort_unstable();
    let index_of = |p: nubo_proto::Peer| sim.index_of(p.id);
    let example = alive.iter().enumerate().find_map(|(at, &(_, i))| {
        let expected = alive[(at + 1) % alive.len()].1;
        let node = sim.node(i)?;
        let known: Vec<_> = node.ring().successors().map(index_of).collect();
        (known.first().copied().flatten() != Some(expected)).then(|| {
            format!(
                "node {i} has successors {known:?}, expected {expected}; view {:?}",
                node.ring()
                    .view(sim.now())
                    .iter()
                    .map(|e| (index_of(e.peer), e.age_ms))
                    .collect::<Vec<_>>()
            )
        })
    });
    outcome.violations.push(format!(
        "after healing only {} of {} live nodes have the right successor ({} the right list); {}",
        quality.successors_right,
        quality.alive,
        quality.lists_right,
        example.unwrap_or_default()
    ));
}

/// Keys the fuzzer writes: few, so that writes collide.
fn fuzz_key(rng: &mut Rng) -> Bytes {
    Bytes::from(format!("k{}", rng.below(12)))
}

/// One random put, delete or get from a random live node.
fn kv_op_from_random(sim: &mut Sim, rng: &mut Rng, obs: &mut (BroadcastTracker, KvTracker)) {
    let alive = sim.alive();
    let Some(&node) = rng.choose(&alive) else {
        return;
    };
    let key = fuzz_key(rng);
    let tag = obs.1.begin(sim.now(), &key);
    let started = match rng.below(10) {
        0..=5 => {
            let value = Bytes::from(rng.next_u64().to_le_bytes().to_vec());
            sim.kv_put(node, key, Some(value), tag, obs)
        }
        6 => sim.kv_put(node, key, None, tag, obs),
        _ => sim.kv_get(node, key, tag, obs),
    };
    if !started {
        obs.1.abandon(tag);
    }
}

/// Runs until operation `tag` ended (or a generous bound passed); returns how it ended.
fn wait_for(
    sim: &mut Sim,
    obs: &mut (BroadcastTracker, KvTracker),
    scenario: &Scenario,
    tag: u64,
) -> Option<Result<KvValue, nubo_proto::kv::KvError>> {
    let config = &scenario.config.kv;
    let bound = sim.now() + config.op_timeout * (u32::from(config.op_attempts) + 2);
    while obs.1.pending.contains_key(&tag) && sim.now() < bound {
        sim.run_for(Duration::from_millis(50), obs);
    }
    if obs.1.pending.contains_key(&tag) {
        return None;
    }
    obs.1.finished.last().map(|f| f.result.clone())
}

/// After healing: every write acknowledged during the faults whose version survived on some
/// live node is still readable (nothing acknowledged is lost while a copy lives), and a read
/// that starts after a write was acknowledged sees it (W + R > r).
fn check_kv(
    sim: &mut Sim,
    rng: &mut Rng,
    obs: &mut (BroadcastTracker, KvTracker),
    scenario: &Scenario,
    durable: &[(Bytes, nubo_proto::kv::Version)],
    outcome: &mut Outcome,
) {
    obs.1.clear_pending();
    // With tiny budgets replicas may be unable to take a copy: only the read check holds.
    let durable = if scenario.config.kv.budget_bytes < 4096 {
        &[]
    } else {
        durable
    };
    for (key, version) in durable {
        let alive = sim.alive();
        let Some(&node) = rng.choose(&alive) else {
            return;
        };
        let tag = obs.1.begin(sim.now(), key);
        if !sim.kv_get(node, key.clone(), tag, obs) {
            outcome
                .violations
                .push(format!("node {node} refused a read after healing"));
            return;
        }
        match wait_for(sim, obs, scenario, tag) {
            Some(Ok(KvValue::Read(Some(record)))) if record.version >= *version => {}
            other => {
                outcome.violations.push(format!(
                    "write of {key:?} at {version:?}, acknowledged and held by a live node, read after healing from node {node} as {other:?}"
                ));
                return;
            }
        }
    }
    for round in 0..4u64 {
        let alive = sim.alive();
        let (Some(&writer), Some(&reader)) = (rng.choose(&alive), rng.choose(&alive)) else {
            return;
        };
        let key = fuzz_key(rng);
        let value = Bytes::from(round.to_le_bytes().to_vec());
        let tag = obs.1.begin(sim.now(), &key);
        sim.kv_put(writer, key.clone(), Some(value), tag, obs);
        let written = match wait_for(sim, obs, scenario, tag) {
            Some(Ok(KvValue::Written(version))) => version,
            // A replica over its budget refuses, and says so: not a violation.
            Some(Err(nubo_proto::kv::KvError::Refused(_))) => continue,
            other => {
                outcome.violations.push(format!(
                    "write of {key:?} from node {writer} after healing ended as {other:?}"
                ));
                return;
            }
        };
        let tag = obs.1.begin(sim.now(), &key);
        sim.kv_get(reader, key.clone(), tag, obs);
        match wait_for(sim, obs, scenario, tag) {
            Some(Ok(KvValue::Read(Some(record)))) if record.version >= written => {}
            other => {
                outcome.violations.push(format!(
                    "read of {key:?} from node {reader} after a write at {written:?} from node {writer} acknowledged: {other:?}"
                ));
                return;
            }
        }
    }
}

fn broadcast_from_random(sim: &mut Sim, rng: &mut Rng, tracker: &mut BroadcastTracker) {
    let alive = sim.alive();
    let Some(&origin) = rng.choose(&alive) else {
        return;
    };
    let payload = Bytes::from(rng.next_u64().to_le_bytes().to_vec());
    let now = sim.now();
    if let Some(id) = sim.broadcast(origin, payload, tracker) {
        tracker.track(id, now, origin);
    }
}

/// Injects one random fault and says what it was.
fn inject_fault(
    sim: &mut Sim,
    rng: &mut Rng,
    tracker: &mut BroadcastTracker,
    scenario: &Scenario,
) -> Option<String> {
    let alive = sim.alive();
    let down = sim.len() - alive.len();
    let may_stop = (down + 1) as f64 <= scenario.down_max * sim.len() as f64 && alive.len() > 2;
    match rng.below(8) {
        0 | 1 if may_stop => {
            let victim = *rng.choose(&alive)?;
            sim.crash(victim);
            Some(format!("crash {victim}"))
        }
        2 => {
            let dead: Vec<NodeIndex> = (0..sim.len() as NodeIndex)
                .filter(|&i| !sim.is_alive(i))
                .collect();
            let node = *rng.choose(&dead)?;
            sim.restart(node);
            tracker.forget_node(node);
            // A restarted agent rejoins through the peers it remembers on disk.
            let contacts: Vec<NodeIndex> =
                (0..8).filter_map(|_| rng.choose(&alive).copied()).collect();
            sim.join(node, &contacts, tracker);
            Some(format!("restart {node} via {contacts:?}"))
        }
        3 => {
            // A newcomer (placed in group 0) has an invitation naming several nodes it can
            // reach (with one or two, a newcomer whose contacts all crash or leave before
            // answering, and a newcomer that joins through it, make an island no protocol can
            // find), as `nubo invite` names several live members.
            let mut reachable: Vec<NodeIndex> = alive
                .iter()
                .copied()
                .filter(|&i| sim.group(i) == 0)
                .collect();
            // Distinct contacts, at least three: a newcomer that knows a single node is
            // stranded for good when that node crashes or leaves before answering.
            if reachable.len() < 3 {
                return None;
            }
            let node = add_node(sim, rng);
            let mut contacts = Vec::new();
            while contacts.len() < 4 && !reachable.is_empty() {
                let pick = rng.index(reachable.len());
                contacts.push(reachable.swap_remove(pick));
            }
            sim.join(node, &contacts, tracker);
            Some(format!("join {node} via {contacts:?}"))
        }
        4 if may_stop => {
            let node = *rng.choose(&alive)?;
            sim.leave(node, tracker);
            Some(format!("leave {node}"))
        }
        5 => {
            let groups = 2 + rng.below(2) as u16;
            let mut text = format!("partition into {groups}");
            for i in 0..sim.len() as NodeIndex {
                sim.set_group(i, rng.below(u64::from(groups)) as u16);
            }
            if rng.chance(0.3) {
                sim.block(0, 1);
                text.push_str(" (one-way 0->1)");
            } else {
                for a in 0..groups {
                    for b in 0..groups {
                        if a != b {
                            sim.block(a, b);
                        }
                    }
                }
            }
            Some(text)
        }
        6 => {
            sim.heal();
            Some("heal partitions".to_owned())
        }
        _ => {
            let loss = if rng.chance(0.5) {
                0.0
            } else {
                rng.unit() * 0.2
            };
            sim.set_loss(loss);
            Some(format!("loss {loss:.3}"))
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs the requested seeds and reports them.
pub fn run(args: &FuzzArgs) -> (Report, bool) {
    let mut failing = Vec::new();
    let mut events = 0u64;
    let mut faults = 0u64;
    let mut kv_ops = 0u64;
    for i in 0..args.runs {
        let seed = args.seed.wrapping_add(i);
        let scenario = Scenario::from_seed(seed, args.profile);
        // A panic in the core or the engine is a failure of this seed, not of the whole run.
        let outcome = std::panic::catch_unwind(|| run_scenario(&scenario, args.verbose))
            .unwrap_or_else(|panic| Outcome {
                violations: vec![format!("panicked: {}", panic_message(&panic))],
                ..Outcome::default()
            });
        events += outcome.events;
        kv_ops += outcome.kv_ops as u64;
        faults += u64::from(outcome.faults);
        if outcome.violations.is_empty() {
            if args.verbose {
                println!(
                    "seed {seed}: ok ({} nodes, {} faults)",
                    scenario.nodes, outcome.faults
                );
            }
        } else {
            let mut text = format!(
                "seed {seed} FAILED ({} nodes, {} faults); reproduce: nubo-sim fuzz --seed {seed} --runs 1 --profile {} --verbose",
                scenario.nodes,
                outcome.faults,
                args.profile.name()
            );
            for violation in outcome.violations.iter().take(5) {
                let _ = write!(text, "\n  - {violation}");
            }
            eprintln!("{text}");
            failing.push(seed);
        }
    }
    let mut report = Report::new(format!(
        "fuzz: {} runs from seed {} ({} profile)",
        args.runs,
        args.seed,
        args.profile.name()
    ));
    report
        .add("runs", args.runs)
        .add("passed", args.runs - failing.len() as u64)
        .add("failing_seeds", failing.clone())
        .add("faults", faults)
        .add("kv_operations", kv_ops)
        .add("events", events);
    (report, failing.is_empty())
}
