//! The whole node at scale: membership, broadcast, the ring, the key-value store,
//! aggregation, liveness, the suite and coordination, with a simulated runner on every
//! machine that starts and stops instances with a delay.
//!
//! A cloud grows and settles; its idle traffic is measured. Then `services` services are
//! deployed at once (from random nodes), and the run waits until every one runs its wanted
//! instances; idle traffic is measured again with the services running. Then a fraction of
//! the nodes is killed at once: the run measures how long until every service again runs
//! exactly its wanted instances on live nodes that satisfy its constraints
//! (`placement_agreement_s`), and how many instances were missing or doubled meanwhile. With
//! `--churn`, nodes are then replaced at that rate for `--churn-minutes`; with `--partition`,
//! the cloud is cut in two halves for that many seconds and healed. The run ends by checking
//! the final placement.
//!
//! Ground truth comes from the simulated runners: the instances machines actually run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clap::Args;
use nubo_proto::aggregation::AggregationConfig;
use nubo_proto::coordination::CoordinationConfig;
use nubo_proto::kv::KvConfig;
use nubo_proto::liveness::LivenessConfig;
use nubo_proto::placement::{ATTR_CPU, ATTR_MEMORY};
use nubo_proto::ring::RingConfig;
use nubo_proto::rollout::UpdatePolicy;
use nubo_proto::roster::RosterConfig;
use nubo_proto::service::{Constraint, Count, Demand, PlacementSpec};
use nubo_proto::slicing::SlicingConfig;
use nubo_proto::spec::{Intent, ServiceSpec, SimpleDocument};
use nubo_proto::suite::{SuiteConfig, SuiteEntry};
use nubo_proto::{Config, Rng};

use crate::engine::{NetworkConfig, NoObserver, NodeIndex, Sim};
use crate::report::{Report, peak_rss_mib};
use crate::workload::grow_overlay;

/// Options of `nubo-sim cloud`.
#[derive(Args, Clone, Debug)]
pub struct CloudArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 1_000)]
    pub nodes: u32,
    /// Services deployed.
    #[arg(long, default_value_t = 100)]
    pub services: u32,
    /// Fraction of the nodes killed at once once the services run (0 to 1).
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    pub fail: f64,
    /// Nodes replaced (one crashes, one joins) per minute after the kill, as a fraction of
    /// the cloud (0 to 1000).
    #[arg(long, default_value_t = 0.0, value_parser = parse_churn)]
    pub churn: f64,
    /// Minutes of churn.
    #[arg(long, default_value_t = 2)]
    pub churn_minutes: u32,
    /// Seconds the cloud is cut in two halves at the end (0: no partition).
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    /// Seconds over which idle traffic is measured.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u32,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Parses a fraction between 0 and 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number: give a fraction such as 0.1"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{text} is not between 0 and 1"));
    }
    Ok(value)
}

/// Most nodes replaced per minute, as a fraction of the cloud.
const CHURN_MAX: f64 = 1_000.0;

/// Parses a churn rate (a fraction of the cloud per minute, 0 to [`CHURN_MAX`]).
fn parse_churn(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number: give a rate such as 0.01"))?;
    if !(0.0..=CHURN_MAX).contains(&value) {
        return Err(format!("{text} is not between 0 and {CHURN_MAX}"));
    }
    Ok(value)
}

/// Time between two replacements when `churn` of `nodes` are replaced per minute (at
/// least one a minute, at most one a millisecond).
fn churn_spacing(nodes: u32, churn: f64) -> Result<Duration, String> {
    let per_minute = (f64::from(nodes) * churn).max(1.0);
    Duration::try_from_secs_f64(60.0 / per_minute)
        .map(|spacing| spacing.max(Duration::from_millis(1)))
        .map_err(|e| format!("churn {churn} of {nodes} nodes has no spacing: {e}"))
}

/// Regions machines are spread over; a fifth of the services want one of them.
const REGIONS: [&str; 5] = ["eu", "us", "sa", "as", "af"];

/// The configuration of every node: the defaults of a real agent, slicing (which the
/// placement of these services does not use) and the full roster left out.
pub fn cloud_config() -> Config {
    Config {
        aggregation: AggregationConfig::default(),
        ring: RingConfig::default(),
        kv: KvConfig::default(),
        slicing: SlicingConfig {
            enabled: false,
            ..SlicingConfig::default()
        },
        roster: RosterConfig {
            enabled: false,
            ..RosterConfig::default()
        },
        suite: SuiteConfig::default(),
        liveness: LivenessConfig::default(),
        coordination: CoordinationConfig::default(),
        ..Config::default()
    }
}

/// A machine's attributes: what it lends and where it is.
pub fn machine_attributes(rng: &mut Rng) -> Vec<(String, String)> {
    let cores = 1 + rng.below(16);
    let memory_gib = 1 + rng.below(32);
    vec![
        (ATTR_CPU.into(), (cores * 1000).to_string()),
        (ATTR_MEMORY.into(), (memory_gib << 30).to_string()),
        ("region".into(), REGIONS[rng.index(REGIONS.len())].into()),
    ]
}

/// Service `j`: 1 to 5 replicas, a fifth of them held to one region, small demands.
pub fn service_spec(j: u32, rng: &mut Rng) -> ServiceSpec {
    let constraints = if rng.chance(0.2) {
        let region = REGIONS[rng.index(REGIONS.len())];
        vec![
            Constraint::parse(&format!("region == \"{region}\""))
                .unwrap_or_else(|_| unreachable!()),
        ]
    } else {
        Vec::new()
    };
    ServiceSpec {
        key: format!("ns{}/svc{j}", j % 10),
        intent: Intent::Run,
        problem: None,
        placement: PlacementSpec {
            count: Count::Replicas(1 + rng.below(5) as u32),
            constraints,
            spread: None,
            demand: Demand {
                cpu_millis: 100,
                memory_bytes: 64 << 20,
                disk_bytes: 0,
            },
        },
        update: UpdatePolicy {
            min_healthy_time: Duration::from_secs(1),
            ..UpdatePolicy::default()
        },
        fingerprint: u64::from(j),
        surge_possible: true,
        driver: "exec".into(),
        quota: None,
    }
}

/// The suite entry deploying `spec` at `version`.
pub fn entry_of(spec: &ServiceSpec, version: u64) -> SuiteEntry {
    SimpleDocument::Service(Box::new(spec.clone())).to_entry(&spec.key, version)
}

/// How the actual instances compare with what the services want.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// Instances wanted and not running on a live node.
    pub missing: u64,
    /// Instances running beyond those wanted (a node counts once per service).
    pub doubled: u64,
    /// Nodes running two instances of one service at once.
    pub twice_on_a_node: u64,
    /// Instances on nodes that do not satisfy their service's constraints.
    pub misplaced: u64,
    /// Instances running but not (yet) healthy.
    pub not_up: u64,
}

impl Placement {
    /// Every service runs exactly its wanted instances, all up, where they may run.
    pub fn is_exact(&self) -> bool {
        *self
            == Placement {
                ..Placement::default()
            }
    }
}

/// Compares what every live machine runs with what each service wants.
pub fn placement(sim: &Sim, services: &[ServiceSpec]) -> Placement {
    let alive = sim.alive();
    let mut running: BTreeMap<&str, Vec<(NodeIndex, bool)>> = BTreeMap::new();
    let mut result = Placement::default();
    for &i in &alive {
        let Some(runner) = sim.runner(i) else {
            continue;
        };
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for (key, _, up) in runner.running() {
            if !seen.insert(key) {
                result.twice_on_a_node += 1;
                continue;
            }
            running.entry(key).or_default().push((i, up));
        }
    }
    let attributes: BTreeMap<NodeIndex, BTreeMap<String, String>> = alive
        .iter()
        .map(|&i| (i, sim.attributes(i).iter().cloned().collect()))
        .collect();
    for spec in services {
        let Count::Replicas(replicas) = spec.placement.count else {
            continue;
        };
        let eligible = attributes
            .values()
            .filter(|a| spec.placement.constraints.iter().all(|c| c.holds(a)))
            .count() as u64;
        let wanted = u64::from(replicas).min(eligible);
        let nodes = running
            .get(spec.key.as_str())
            .map_or(&[][..], Vec::as_slice);
        let count = nodes.len() as u64;
        result.missing += wanted.saturating_sub(count);
        result.doubled += count.saturating_sub(wanted);
        result.not_up += nodes.iter().filter(|(_, up)| !up).count() as u64;
        result.misplaced += nodes
            .iter()
            .filter(|(i, _)| {
                !spec
                    .placement
                    .constraints
                    .iter()
                    .all(|c| attributes.get(i).is_some_and(|a| c.holds(a)))
            })
            .count() as u64;
    }
    result
}

/// Prints, for every service not placed exactly, who runs it, whom each reports to and who
/// believes it coordinates it.
pub fn explain_placement(sim: &Sim, services: &[ServiceSpec]) {
    for spec in services {
        let runners: Vec<NodeIndex> = sim
            .alive()
            .into_iter()
            .filter(|&i| {
                sim.runner(i)
                    .is_some_and(|r| r.running().any(|(k, _, _)| k == spec.key))
            })
            .collect();
        let Count::Replicas(replicas) = spec.placement.count else {
            continue;
        };
        let eligible = sim
            .alive()
            .into_iter()
            .filter(|&i| {
                let a: BTreeMap<String, String> = sim.attributes(i).iter().cloned().collect();
                spec.placement.constraints.iter().all(|c| c.holds(&a))
            })
            .count() as u32;
        let versions: BTreeSet<u64> = runners
            .iter()
            .filter_map(|&i| sim.runner(i))
            .flat_map(|r| {
                r.running()
                    .filter(|(k, _, _)| *k == spec.key)
                    .map(|(_, v, _)| v)
                    .collect::<Vec<_>>()
            })
            .collect();
        let newest = sim
            .alive()
            .into_iter()
            .filter_map(|i| sim.node(i))
            .filter_map(|n| n.suite().get(&spec.key).map(|e| e.version))
            .max()
            .unwrap_or(0);
        if runners.len() as u32 == replicas.min(eligible) && versions.iter().all(|v| *v == newest) {
            continue;
        }
        println!("(newest version {newest}, running {versions:?})");
        println!("(eligible: {eligible})");
        for i in sim.alive() {
            let a: BTreeMap<String, String> = sim.attributes(i).iter().cloned().collect();
            if spec.placement.constraints.iter().all(|c| c.holds(&a)) {
                let node = sim.node(i).unwrap();
                println!(
                    "  eligible node {i}: candidate {}, size {:?}, reach steps {}, reports to {:?}",
                    node.coordination().candidates().any(|k| k == spec.key),
                    node.size_estimate(sim.now()),
                    nubo_proto::coordination::reach_steps(node.suite(), &spec.key),
                    node.coordination()
                        .reporting()
                        .find(|(k, _)| *k == spec.key)
                        .map(|(_, c)| c.and_then(|p| sim.index_of(p.id)))
                );
            }
        }
        let position = nubo_proto::coordination::service_position(&spec.key);
        let mut ring: Vec<(u128, NodeIndex)> = sim
            .alive()
            .into_iter()
            .map(|i| (sim.peer(i).id.0, i))
            .collect();
        ring.sort_unstable();
        let at = ring.partition_point(|(p, _)| *p < position) % ring.len();
        let owner = ring[at].1;
        println!(
            "{} wants {replicas}, runs on {runners:?}; true owner {owner} (then {:?})",
            spec.key,
            (1..4)
                .map(|k| ring[(at + k) % ring.len()].1)
                .collect::<Vec<_>>()
        );
        for i in sim.alive() {
            let node = sim.node(i).unwrap();
            if node.ring().is_replica(position, 1) {
                let preds: Vec<_> = node
                    .ring()
                    .predecessors()
                    .filter_map(|p| sim.index_of(p.id))
                    .collect();
                println!(
                    "  node {i} ({}) thinks it owns the key; its predecessors {preds:?}",
                    node.id().short()
                );
            }
        }
        for &i in &runners {
            let node = sim.node(i).unwrap();
            let to = node
                .coordination()
                .reporting()
                .find(|(k, _)| *k == spec.key)
                .map(|(_, c)| c.map(|p| sim.index_of(p.id)));
            let alive = to.flatten().flatten().map(|c| sim.is_alive(c));
            if to == Some(None) {
                let departed: Vec<_> = node
                    .liveness()
                    .departed()
                    .map(|(id, left, since)| (sim.index_of(id), left, since))
                    .collect();
                println!(
                    "    (looking up; ring settled {}, departed {departed:?})",
                    node.ring().is_settled(sim.now())
                );
            }
            let guess: Vec<_> = node
                .ring()
                .replicas_of(position, 3)
                .iter()
                .map(|p| sim.index_of(p.id))
                .collect();
            println!("    (its ring's guess of the owners: {guess:?})");
            let running: Vec<(u64, bool)> = sim
                .runner(i)
                .map(|r| {
                    r.running()
                        .filter(|(k, _, _)| *k == spec.key)
                        .map(|(_, v, up)| (v, up))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  node {i} ({}) reports to {to:?} (alive {alive:?}), task {:?}, runs {running:?}",
                node.id().short(),
                node.tasks().get(&spec.key)
            );
        }
        for i in sim.alive() {
            let node = sim.node(i).unwrap();
            if let Some((_, plan)) = node
                .coordination()
                .coordinated()
                .find(|(k, _)| *k == spec.key)
            {
                println!(
                    "  node {i} coordinates it: {:?}",
                    plan.map(|p| (&p.nodes, &p.phase, p.version, p.running_version, &p.problem))
                );
                for (peer, fact) in node.coordination().instances_of(&spec.key) {
                    let at = sim.index_of(peer.id);
                    if at.is_some_and(|a| !sim.is_alive(a)) {
                        let knowing = sim
                            .alive()
                            .into_iter()
                            .filter(|&j| {
                                sim.node(j)
                                    .is_some_and(|n| n.liveness().is_departed(peer.id))
                            })
                            .count();
                        println!(
                            "    (a dead reporter: {knowing} live nodes hold it gone, the coordinator {})",
                            node.liveness().is_departed(peer.id)
                        );
                    }
                    println!(
                        "    reported by {at:?} ({}, alive {:?}): {:?} v{}",
                        peer.id.short(),
                        at.map(|a| sim.is_alive(a)),
                        fact.state,
                        fact.version
                    );
                }
            }
        }
    }
}

/// What a run of changes looked like: the worst moment and the time to exactness.
#[derive(Clone, Copy, Debug, Default)]
struct Recovery {
    seconds: Option<f64>,
    missing_max: u64,
    doubled_max: u64,
}

/// Says on stderr which phase a long run has reached, how long it took and what it holds.
fn progress(started: Instant, sim: &Sim, phase: &str) {
    eprintln!(
        "nubo-sim cloud: {phase} (simulated {:.0} s, wall {:.0} s, {} messages delivered, memory {:.2} GiB)",
        sim.now().as_micros() as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        sim.stats().delivered,
        rss_bytes() / f64::from(1u32 << 30)
    );
}

/// Prints what a node holds on average (a trace for `NUBO_SIM_DEBUG`).
fn held_per_node(sim: &Sim) {
    let alive = sim.alive();
    let n = alive.len().max(1) as f64;
    let (mut stored, mut stored_bytes, mut suite) = (0usize, 0usize, 0usize);
    let mut declared = 0u64;
    for &i in &alive {
        let node = sim.node(i).unwrap();
        declared += node.liveness().counters().declared;
        stored += node.broadcast_layer().stored();
        stored_bytes += node.broadcast_layer().stored_bytes();
        suite += node.suite().len();
    }
    println!(
        "per node: {:.0} broadcasts stored ({:.0} bytes counted), {:.0} suite entries; {declared} members declared gone so far",
        stored as f64 / n,
        stored_bytes as f64 / n,
        suite as f64 / n
    );
}

/// Whether `NUBO_SIM_DEBUG` asks for a trace of the run.
fn debugging() -> bool {
    std::env::var_os("NUBO_SIM_DEBUG").is_some()
}

/// Runs until the placement is exact (checked every 250 ms) or `bound` passes.
fn recover(sim: &mut Sim, services: &[ServiceSpec], bound: Duration) -> Recovery {
    let start = sim.now();
    let mut recovery = Recovery::default();
    let step = Duration::from_millis(250);
    loop {
        let state = placement(sim, services);
        recovery.missing_max = recovery.missing_max.max(state.missing);
        recovery.doubled_max = recovery
            .doubled_max
            .max(state.doubled + state.twice_on_a_node);
        if state.is_exact() {
            recovery.seconds = Some(sim.now().saturating_since(start).as_secs_f64());
            return recovery;
        }
        if sim.now().saturating_since(start) >= bound {
            return recovery;
        }
        if debugging() && sim.now().saturating_since(start).subsec_millis() == 0 {
            println!(
                "  +{:?}: missing {}, doubled {}, twice {}, misplaced {}, not up {}",
                sim.now().saturating_since(start),
                state.missing,
                state.doubled,
                state.twice_on_a_node,
                state.misplaced,
                state.not_up
            );
            if sim.now().saturating_since(start) == Duration::from_secs(20) {
                explain_placement(sim, services);
            }
        }
        sim.run_for(step, &mut NoObserver);
    }
}

/// Traffic per live node over `span`: (messages/s mean, max; bytes/s mean, max), and the
/// kinds of message that carried the most bytes.
fn traffic(sim: &mut Sim, span: Duration) -> (f64, f64, f64, f64, String) {
    sim.reset_traffic();
    sim.count_traffic(true);
    sim.run_for(span, &mut NoObserver);
    sim.count_traffic(false);
    let alive = sim.alive();
    let seconds = span.as_secs_f64().max(1e-9);
    let per_node: Vec<(f64, f64)> = alive
        .iter()
        .map(|&i| {
            let (msgs, bytes) = sim.traffic(i);
            (msgs as f64 / seconds, bytes as f64 / seconds)
        })
        .collect();
    let n = per_node.len().max(1) as f64;
    let msgs_mean = per_node.iter().map(|p| p.0).sum::<f64>() / n;
    let bytes_mean = per_node.iter().map(|p| p.1).sum::<f64>() / n;
    let msgs_max = per_node.iter().map(|p| p.0).fold(0.0, f64::max);
    let bytes_max = per_node.iter().map(|p| p.1).fold(0.0, f64::max);
    let mut kinds: Vec<(u64, &str)> = sim
        .bytes_by_kind()
        .into_iter()
        .map(|(kind, bytes)| (bytes, kind))
        .collect();
    kinds.sort_by(|a, b| b.cmp(a));
    let top: Vec<String> = kinds
        .iter()
        .take(12)
        .map(|(bytes, kind)| format!("{kind} {:.0}", *bytes as f64 / n / seconds))
        .collect();
    (msgs_mean, msgs_max, bytes_mean, bytes_max, top.join(", "))
}

/// Resident memory of this process now, in bytes (0 if unknown).
fn rss_bytes() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib * 1024.0)
}

/// A percentile of `values` (sorted here), 0 when empty.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((values.len() - 1) as f64 * p).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// Adds a machine with random attributes.
fn add_machine(sim: &mut Sim, rng: &mut Rng) -> NodeIndex {
    let node = sim.add_node();
    sim.set_attributes(node, machine_attributes(rng));
    node
}

/// Runs the experiment and reports it.
pub fn run(args: &CloudArgs) -> Report {
    let started = Instant::now();
    let mut sim = Sim::new(args.seed, cloud_config(), NetworkConfig::default());
    let mut rng = sim.rng().fork();
    let nodes = args.nodes.max(2);
    // Joins spread over ten seconds per ten thousand nodes (a cloud that grows this fast
    // is the hard case for the overlay), then the ring and the size estimates settle.
    let join_span = Duration::from_secs(10 + u64::from(nodes) / 1_000);
    grow_overlay(&mut sim, nodes, join_span, &mut NoObserver, |sim| {
        add_machine(sim, &mut rng)
    });
    progress(started, &sim, "grown");
    sim.run_for(Duration::from_secs(40), &mut NoObserver);
    progress(started, &sim, "settled");
    if debugging() {
        let mut small = 0;
        for i in sim.alive() {
            let node = sim.node(i).unwrap();
            let est = node.ring().size_estimate(sim.now());
            if est.is_some_and(|n| n < 100) {
                small += 1;
                if small < 4 {
                    println!(
                        "node {i}: ring estimate {est:?}, successors {}, predecessors {}, settled {}",
                        node.ring().successors().count(),
                        node.ring().predecessors().count(),
                        node.ring().is_settled(sim.now())
                    );
                }
            }
        }
        println!("nodes with a ring estimate under 100: {small}");
    }
    let idle_span = Duration::from_secs(u64::from(args.idle_seconds.max(1)));
    let lookups_now = |sim: &Sim| -> u64 {
        sim.alive()
            .into_iter()
            .filter_map(|i| sim.node(i))
            .map(|n| n.coordination().counters().lookups)
            .sum()
    };
    if debugging() {
        println!("lookups after growing: {}", lookups_now(&sim));
    }
    let empty = traffic(&mut sim, idle_span);
    progress(
        started,
        &sim,
        &format!(
            "idle: {:.0} B/s and {:.1} messages/s per node; deploying",
            empty.2, empty.0
        ),
    );

    // Deploy every service at once, from random nodes.
    let services: Vec<ServiceSpec> = (0..args.services)
        .map(|j| service_spec(j, &mut rng))
        .collect();
    sim.time_plans(true);
    for spec in &services {
        let alive = sim.alive();
        let from = alive[rng.index(alive.len())];
        sim.publish(from, entry_of(spec, 1), &mut NoObserver);
    }
    let deployed = recover(&mut sim, &services, Duration::from_secs(180));
    progress(started, &sim, "deployed");
    if debugging() {
        println!("lookups after deploying: {}", lookups_now(&sim));
        held_per_node(&sim);
    }
    sim.run_for(Duration::from_secs(15), &mut NoObserver);
    let idle = traffic(&mut sim, idle_span);
    progress(
        started,
        &sim,
        &format!(
            "idle with services: {:.0} B/s and {:.1} messages/s per node; killing",
            idle.2, idle.0
        ),
    );
    let state_bytes_per_node = rss_bytes() / f64::from(nodes);
    if debugging() {
        println!("lookups after idling: {}", lookups_now(&sim));
        held_per_node(&sim);
    }

    // Kill a fraction at once.
    let mut alive = sim.alive();
    rng.shuffle(&mut alive);
    let killed = ((f64::from(nodes) * args.fail).round() as usize).min(alive.len() - 1);
    if debugging() {
        let mut sizes = BTreeMap::new();
        for &i in &alive {
            *sizes
                .entry(sim.node(i).map_or(0, |n| n.membership().active().len()))
                .or_insert(0) += 1;
        }
        println!("active view sizes: {sizes:?}");
        for &i in alive.iter().take(killed) {
            let id = sim.peer(i).id;
            let watchers: Vec<_> = alive
                .iter()
                .skip(killed)
                .filter(|&&j| {
                    sim.node(j)
                        .is_some_and(|n| n.membership().active().contains(id))
                })
                .collect();
            let own = sim.node(i).map_or(0, |n| n.membership().active().len());
            if watchers.len() <= 1 {
                println!("killed {i}: watched by live nodes {watchers:?}, own active view {own}");
            }
        }
    }
    for &i in alive.iter().take(killed) {
        sim.crash(i);
    }
    sim.reset_traffic();
    sim.count_traffic(true);
    let kill_start = sim.now();
    let after_kill = recover(&mut sim, &services, Duration::from_secs(120));
    progress(started, &sim, "recovered from the kill");
    if debugging() {
        held_per_node(&sim);
    }
    let kill_span = sim
        .now()
        .saturating_since(kill_start)
        .max(Duration::from_secs(1));
    sim.count_traffic(false);
    let kill_bytes = {
        let alive = sim.alive();
        let total: u64 = alive.iter().map(|&i| sim.traffic(i).1).sum();
        total as f64 / alive.len().max(1) as f64 / kill_span.as_secs_f64()
    };

    // Churn: one node crashes and a new one joins, at the given rate.
    let mut churn_recovery = Recovery::default();
    let spacing = if args.churn > 0.0 {
        // Arguments are checked when parsed; a caller that built them by hand hears of a
        // rate that cannot be spaced, and the run goes on without churn.
        churn_spacing(nodes, args.churn)
            .inspect_err(|error| eprintln!("nubo-sim cloud: no churn: {error}"))
            .ok()
    } else {
        None
    };
    if let Some(spacing) = spacing {
        let end = sim.now() + Duration::from_secs(60 * u64::from(args.churn_minutes));
        while sim.now() < end {
            let alive = sim.alive();
            let victim = alive[rng.index(alive.len())];
            sim.crash(victim);
            let alive = sim.alive();
            let contact = alive[rng.index(alive.len())];
            let newcomer = add_machine(&mut sim, &mut rng);
            sim.join(newcomer, &[contact], &mut NoObserver);
            sim.run_for(spacing, &mut NoObserver);
        }
        churn_recovery = recover(&mut sim, &services, Duration::from_secs(120));
        progress(started, &sim, "churn over");
    }

    // A partition in two halves, then healing.
    let mut healed = Recovery::default();
    if args.partition > 0 {
        let alive = sim.alive();
        for &i in alive.iter().filter(|&&i| i % 2 == 1) {
            sim.set_group(i, 1);
        }
        sim.block(0, 1);
        sim.block(1, 0);
        sim.run_for(
            Duration::from_secs(u64::from(args.partition)),
            &mut NoObserver,
        );
        sim.heal();
        healed = recover(&mut sim, &services, Duration::from_secs(180));
        progress(started, &sim, "partition healed");
    }

    sim.run_for(Duration::from_secs(20), &mut NoObserver);
    let last = placement(&sim, &services);
    if debugging() {
        explain_placement(&sim, &services);
    }
    let mut per_plan: Vec<f64> = Vec::new();
    let mut plans_total = 0u64;
    let mut plan_micros_total = 0u64;
    for (micros, plans) in sim.take_plan_times() {
        plans_total += plans;
        plan_micros_total += micros;
        per_plan.push(micros as f64 / plans.max(1) as f64 / 1_000.0);
    }
    let simulated = sim.now().as_micros() as f64 / 1e6;
    let (mut judged, mut lookups, mut reports) = (0u64, 0u64, 0u64);
    for i in sim.alive() {
        if let Some(node) = sim.node(i) {
            let c = node.coordination().counters();
            judged += c.reach_judged;
            lookups += c.lookups;
            reports += c.reports_sent;
        }
    }
    let seconds = |r: Recovery| r.seconds.unwrap_or(f64::NAN);

    let mut report = Report::new(format!(
        "cloud: {nodes} nodes, {} services, {:.0}% killed, seed {}",
        args.services,
        args.fail * 100.0,
        args.seed
    ));
    report
        .add("nodes", nodes)
        .add("services", args.services)
        .add("killed", killed as u64)
        .add_f64("idle_msgs_per_node_s", idle.0)
        .add_f64("idle_msgs_per_node_s_max", idle.1)
        .add_f64("idle_bytes_per_node_s", idle.2)
        .add_f64("idle_bytes_per_node_s_max", idle.3)
        .add_f64("idle_bytes_per_node_s_no_services", empty.2)
        .add("idle_bytes_by_kind", idle.4.clone())
        .add_f64("state_bytes_per_node", state_bytes_per_node)
        .add_f64("deploy_s", seconds(deployed))
        .add_f64("placement_agreement_s", seconds(after_kill))
        .add("instances_missing_max", after_kill.missing_max)
        .add("instances_doubled_max", after_kill.doubled_max)
        .add_f64("recovery_bytes_per_node_s", kill_bytes);
    if args.churn > 0.0 {
        report
            .add_f64("churn_settled_s", seconds(churn_recovery))
            .add("churn_missing_max", churn_recovery.missing_max)
            .add("churn_doubled_max", churn_recovery.doubled_max);
    }
    if args.partition > 0 {
        report
            .add_f64("healed_s", seconds(healed))
            .add("heal_doubled_max", healed.doubled_max);
    }
    report
        .add("instances_missing_final", last.missing)
        .add(
            "instances_doubled_final",
            last.doubled + last.twice_on_a_node,
        )
        .add("instances_misplaced_final", last.misplaced)
        .add("plans", plans_total)
        .add("reach_judged", judged)
        .add("coordinator_lookups", lookups)
        .add("reports_sent", reports)
        .add_f64("planner_ms_per_change_p50", percentile(&mut per_plan, 0.5))
        .add_f64("planner_ms_per_change_p99", percentile(&mut per_plan, 0.99))
        .add_f64(
            "planner_ms_per_node_per_simulated_s",
            plan_micros_total as f64 / 1_000.0 / f64::from(nodes) / simulated.max(1e-9),
        )
        .add_f64("simulated_s", simulated)
        .add("events", sim.stats().events)
        .add_f64("wall_s", started.elapsed().as_secs_f64())
        .add_f64("peak_memory_gib", peak_rss_mib() / 1024.0);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_fractions_out_of_range_are_refused_with_a_reason() {
        assert_eq!(parse_fraction("0.1"), Ok(0.1));
        assert_eq!(parse_churn("1.5"), Ok(1.5));
        for bad in ["-0.1", "NaN", "inf", "ten", "1e300"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
            assert!(parse_churn(bad).is_err(), "{bad}");
        }
        assert!(parse_fraction("1.5").is_err());
        assert_eq!(churn_spacing(1_000, 0.0), Ok(Duration::from_secs(60)));
        assert_eq!(churn_spacing(1_000, 0.01), Ok(Duration::from_secs(6)));
        assert_eq!(
            churn_spacing(1_000, CHURN_MAX),
            Ok(Duration::from_millis(1))
        );
        // A NaN rate (only a caller that skips parsing can pass one) counts as the
        // slowest churn: `max(1.0)` drops the NaN.
        assert_eq!(churn_spacing(1_000, f64::NAN), Ok(Duration::from_secs(60)));
    }
}
