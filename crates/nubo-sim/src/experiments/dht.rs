//! The replicated key-value store on the ring: lookup hops, lost keys after a mass failure,
//! reads after repair, and reads while nodes come and go.
//!
//! A cloud grows and its ring forms; every node writes `keys-per-node` keys through the real
//! protocol. Then a fraction of the nodes crashes at once: keys whose every copy was on them
//! are lost (expected: fraction^replicas of them). After `repair-rounds` anti-entropy periods,
//! random lookups and reads measure routing and what survived. With `--churn`, nodes then
//! crash and new ones join at the given rate while reads go on, and the run counts the
//! anti-entropy periods until every surviving key is back on its `replicas` nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use nubo_proto::kv::{KvConfig, Version, key_position};
use nubo_proto::ring::{LookupPurpose, Position};
use nubo_proto::{Event, Rng, Time};

use crate::engine::{NetworkConfig, NodeIndex, Observer, Sim};
use crate::experiments::ring::{ring_config, ring_quality};
use crate::kv_tracker::KvTracker;
use crate::report::{Report, peak_rss_mib};
use crate::workload::grow_overlay;

/// Options of `nubo-sim dht`.
#[derive(Args, Clone, Debug)]
pub struct DhtArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 16_384)]
    pub nodes: u32,
    /// Keys written per node.
    #[arg(long, default_value_t = 100)]
    pub keys_per_node: u32,
    /// Copies of each key.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Fraction of the nodes that crash at once after the keys are written.
    #[arg(long, default_value_t = 0.2)]
    pub fail: f64,
    /// Anti-entropy periods between the crash and the measurements.
    #[arg(long, default_value_t = 12)]
    pub repair_rounds: u32,
    /// Nodes replaced (one crashes, one joins) per minute, as a fraction of the cloud.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Minutes of churn.
    #[arg(long, default_value_t = 5)]
    pub churn_minutes: u32,
    /// Lookups measured.
    #[arg(long, default_value_t = 10_000)]
    pub lookups: u32,
    /// Reads measured (after repair, and again during churn).
    #[arg(long, default_value_t = 10_000)]
    pub gets: u32,
    /// Seed from which every random choice derives.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Results of lookups started by the experiment.
#[derive(Default)]
struct LookupTracker {
    /// (tag, owner found or None, hops).
    results: Vec<(u64, Option<Position>, u8)>,
}

impl Observer for LookupTracker {
    fn on_event(&mut self, _now: Time, _node: NodeIndex, event: &Event) {
        if let Event::Lookup(result) = event
            && let LookupPurpose::External(tag) = result.purpose
        {
            let owner = result.replicas.first().map(|p| p.id.0);
            self.results.push((tag, owner, result.hops));
        }
    }
}

type Observers = (KvTracker, LookupTracker);

/// The live nodes in ring order, to find true owners.
struct TrueRing {
    positions: Vec<(Position, NodeIndex)>,
}

impl TrueRing {
    fn of(sim: &Sim) -> TrueRing {
        let mut positions: Vec<(Position, NodeIndex)> = sim
            .alive()
            .into_iter()
            .map(|i| (sim.peer(i).id.0, i))
            .collect();
        positions.sort_unstable();
        TrueRing { positions }
    }

    /// The `count` live nodes at or after `key`.
    fn replicas(
        &self,
        key: Position,
        count: usize,
    ) -> impl Iterator<Item = (Position, NodeIndex)> + '_ {
        let at = self.positions.partition_point(|(p, _)| *p < key);
        let n = self.positions.len();
        (0..count.min(n)).map(move |k| self.positions[(at + k) % n])
    }
}

fn key_of(index: u64) -> Bytes {
    Bytes::from(format!("key-{index}"))
}

/// Runs until no operation is in flight (or `bound` passes).
fn drain(sim: &mut Sim, obs: &mut Observers, bound: Duration) {
    let end = sim.now() + bound;
    while !obs.0.pending.is_empty() && sim.now() < end {
        sim.run_for(Duration::from_millis(200), obs);
    }
    obs.0.clear_pending();
}

/// Live copies of each written key, from the stores of live nodes.
fn live_copies(sim: &Sim) -> BTreeMap<Bytes, usize> {
    let mut copies: BTreeMap<Bytes, usize> = BTreeMap::new();
    for i in sim.alive() {
        if let Some(node) = sim.node(i) {
            for (_, key, _) in node.kv().store().range(0, 0) {
                *copies.entry(key.clone()).or_insert(0) += 1;
            }
        }
    }
    copies
}

/// Keys (of those in `acked`) that hold their acknowledged version on every one of their
/// `replicas` true replicas among live nodes.
fn fully_replicated(
    sim: &Sim,
    acked: &BTreeMap<Bytes, Version>,
    keys: &[Bytes],
    replicas: usize,
) -> usize {
    let ring = TrueRing::of(sim);
    keys.iter()
        .filter(|key| {
            let Some(version) = acked.get(*key) else {
                return true;
            };
            ring.replicas(key_position(key), replicas).all(|(_, i)| {
                sim.node(i)
                    .and_then(|n| n.kv().store().version(key))
                    .is_some_and(|v| v >= *version)
            })
        })
        .count()
}

/// What a batch of reads found.
struct Reads {
    /// Reads that returned the acknowledged version.
    ok: usize,
    /// Reads made.
    count: usize,
    /// Reads of keys with a live copy.
    of_surviving: usize,
    /// Reads of keys with a live copy that did not return the acknowledged version.
    surviving_failed: usize,
}

/// Reads `count` random keys of `keys` from random live nodes, `per_second` at a time.
fn read_sample(
    sim: &mut Sim,
    rng: &mut Rng,
    obs: &mut Observers,
    keys: &[Bytes],
    copies: &BTreeMap<Bytes, usize>,
    count: u32,
    per_second: u32,
) -> Reads {
    let first = obs.0.finished.len();
    let mut issued = 0;
    while issued < count {
        let alive = sim.alive();
        for _ in 0..per_second.min(count - issued) {
            let (Some(&node), Some(key)) = (rng.choose(&alive), rng.choose(keys)) else {
                break;
            };
            let tag = obs.0.begin(sim.now(), key);
            if !sim.kv_get(node, key.clone(), tag, obs) {
                obs.0.abandon(tag);
            }
            issued += 1;
        }
        sim.run_for(Duration::from_secs(1), obs);
    }
    drain(sim, obs, Duration::from_secs(60));
    let done = &obs.0.finished[first..];
    let surviving = |f: &&crate::kv_tracker::FinishedOp| copies.contains_key(&f.key);
    Reads {
        ok: done.iter().filter(|f| f.read_is_fresh()).count(),
        count: count as usize,
        of_surviving: done.iter().filter(surviving).count(),
        surviving_failed: done
            .iter()
            .filter(surviving)
            .filter(|f| !f.read_is_fresh())
            .count(),
    }
}

/// Runs the experiment and reports it.
pub fn run(args: &DhtArgs) -> Report {
    let started = Instant::now();
    let cycle = Duration::from_secs(1);
    let mut config = ring_config(args.replicas.max(8), cycle);
    config.kv = KvConfig {
        replicas: args.replicas,
        write_quorum: args.replicas.div_ceil(2).max(1),
        read_quorum: args.replicas / 2 + 1,
        ..KvConfig::default()
    };
    let sync = config.kv.sync_interval;
    let mut sim = Sim::new(args.seed, config, NetworkConfig::default());
    let mut rng = Rng::from_seed(args.seed ^ 0xD47);
    let mut obs: Observers = (KvTracker::default(), LookupTracker::default());
    grow_overlay(&mut sim, args.nodes, cycle * 10, &mut obs, |sim| {
        sim.add_node()
    });
    for _ in 0..300 {
        sim.run_for(cycle, &mut obs);
        if ring_quality(&sim, args.replicas.max(8)).is_perfect() {
            break;
        }
    }

    // Write every key once, from random nodes, each node writing about one key a second.
    let total = u64::from(args.nodes) * u64::from(args.keys_per_node);
    let keys: Vec<Bytes> = (0..total).map(key_of).collect();
    let alive = sim.alive();
    for chunk in keys.chunks(args.nodes as usize) {
        for key in chunk {
            let node = *rng.choose(&alive).unwrap_or(&0);
            let tag = obs.0.begin(sim.now(), key);
            let value = Bytes::from(rng.next_u64().to_le_bytes().to_vec());
            if !sim.kv_put(node, key.clone(), Some(value), tag, &mut obs) {
                obs.0.abandon(tag);
            }
        }
        sim.run_for(cycle, &mut obs);
    }
    drain(&mut sim, &mut obs, Duration::from_secs(60));
    let acked = obs.0.acked.clone();
    let writes_acked = acked.len();

    // The crash.
    let mut alive = sim.alive();
    rng.shuffle(&mut alive);
    let victims = (args.fail * alive.len() as f64).round() as usize;
    for &victim in &alive[..victims] {
        sim.crash(victim);
    }
    let copies = live_copies(&sim);
    let lost = keys.iter().filter(|k| !copies.contains_key(*k)).count();
    let surviving: Vec<Bytes> = keys
        .iter()
        .filter(|k| copies.contains_key(*k))
        .cloned()
        .collect();
    let expected_lost = total as f64 * args.fail.powi(args.replicas as i32);

    // Repair, then count keys back on all their replicas.
    let mut rounds_to_full = None;
    for round in 1..=args.repair_rounds {
        sim.run_for(sync, &mut obs);
        if rounds_to_full.is_none()
            && fully_replicated(&sim, &acked, &surviving, args.replicas) == surviving.len()
        {
            rounds_to_full = Some(round);
        }
    }
    let full_after_repair = fully_replicated(&sim, &acked, &surviving, args.replicas);

    // Lookups of random keys from random live nodes.
    let truth = TrueRing::of(&sim);
    let mut expected_owner = BTreeMap::new();
    let alive = sim.alive();
    for tag in 0..u64::from(args.lookups) {
        let key: Position = rng.next_u128();
        let node = *rng.choose(&alive).unwrap_or(&0);
        expected_owner.insert(tag, truth.replicas(key, 1).next().map(|(p, _)| p));
        sim.lookup(node, key, tag, &mut obs);
        if tag % 1000 == 999 {
            sim.run_for(Duration::from_millis(100), &mut obs);
        }
    }
    sim.run_for(Duration::from_secs(20), &mut obs);
    let results = std::mem::take(&mut obs.1.results);
    let correct = results
        .iter()
        .filter(|(tag, owner, _)| owner.is_some() && expected_owner.get(tag) == Some(owner))
        .count();
    let mut hops: Vec<u8> = results
        .iter()
        .filter(|r| r.1.is_some())
        .map(|r| r.2)
        .collect();
    hops.sort_unstable();
    let hops_mean = hops.iter().map(|&h| f64::from(h)).sum::<f64>() / hops.len().max(1) as f64;
    let hops_p99 = hops.get(hops.len() * 99 / 100).copied().unwrap_or(0);

    // Reads of random written keys after repair: every key with a surviving copy must read.
    let reads = read_sample(
        &mut sim, &mut rng, &mut obs, &keys, &copies, args.gets, 1000,
    );

    let mut report = Report::new(format!(
        "Key-value store: {} nodes, {} keys, {} replicas, {:.0}% crash (seed {})",
        args.nodes,
        total,
        args.replicas,
        args.fail * 100.0,
        args.seed
    ));
    report
        .add("nodes", args.nodes)
        .add("keys", total)
        .add("replicas", args.replicas)
        .add("writes_acked", writes_acked)
        .add_f64("hops_mean", hops_mean)
        .add("hops_p99", hops_p99)
        .add_f64("hops_bound", 0.5 * f64::from(args.nodes).log2() + 1.0)
        .add_ratio(
            "lookup_success",
            correct as f64 / f64::from(args.lookups.max(1)),
        )
        .add("keys_lost", lost)
        .add_f64("keys_lost_expected", expected_lost)
        .add_ratio(
            "surviving_fraction",
            surviving.len() as f64 / total.max(1) as f64,
        )
        .add_ratio(
            "get_success_after_repair",
            reads.ok as f64 / reads.count.max(1) as f64,
        )
        .add_ratio(
            "surviving_fraction_of_reads",
            reads.of_surviving as f64 / reads.count.max(1) as f64,
        )
        .add("gets_of_surviving_failed", reads.surviving_failed)
        .add_ratio(
            "fully_replicated_after_repair",
            full_after_repair as f64 / surviving.len().max(1) as f64,
        )
        .add(
            "repair_rounds_to_full",
            rounds_to_full.map_or(serde_json::Value::Null, |r| r.into()),
        );

    if args.churn > 0.0 {
        churn_phase(
            args,
            &mut sim,
            &mut rng,
            &mut obs,
            &keys,
            &acked,
            &mut report,
        );
    }
    report
        .add("events", sim.stats().events)
        .add_f64("wall_seconds", started.elapsed().as_secs_f64())
        .add_f64("peak_rss_mib", peak_rss_mib());
    report
}

/// Nodes crash and join at the churn rate while reads go on; then the rounds until every
/// surviving key is back on all its replicas.
fn churn_phase(
    args: &DhtArgs,
    sim: &mut Sim,
    rng: &mut Rng,
    obs: &mut Observers,
    keys: &[Bytes],
    acked: &BTreeMap<Bytes, Version>,
    report: &mut Report,
) {
    let sync = sim
        .node(sim.alive()[0])
        .map_or(Duration::from_secs(5), |n| n.kv().config().sync_interval);
    let per_second = args.churn * f64::from(args.nodes) / 60.0;
    let mut owed = 0.0;
    let first = obs.0.finished.len();
    let mut replaced = 0u32;
    let mut lost_during = 0usize;
    let mut reads = 0usize;
    for _second in 0..args.churn_minutes * 60 {
        owed += per_second;
        while owed >= 1.0 {
            owed -= 1.0;
            let alive = sim.alive();
            if let Some(&victim) = rng.choose(&alive) {
                sim.crash(victim);
            }
            let newcomer = sim.add_node();
            let contact = *rng.choose(&alive).unwrap_or(&0);
            sim.join(newcomer, &[contact], obs);
            replaced += 1;
        }
        // Reads of keys that still have a live copy (a key whose every copy crashed is lost,
        // not unavailable).
        let alive = sim.alive();
        for _ in 0..args.gets / (args.churn_minutes * 60).max(1) {
            let (Some(&node), Some(key)) = (rng.choose(&alive), rng.choose(keys)) else {
                break;
            };
            let has_copy = alive
                .iter()
                .filter_map(|&i| sim.node(i))
                .any(|n| n.kv().store().version(key).is_some());
            if !has_copy {
                lost_during += 1;
                continue;
            }
            let tag = obs.0.begin(sim.now(), key);
            if sim.kv_get(node, key.clone(), tag, obs) {
                reads += 1;
            } else {
                obs.0.abandon(tag);
            }
        }
        sim.run_for(Duration::from_secs(1), obs);
    }
    drain(sim, obs, Duration::from_secs(60));
    let ok = obs.0.finished[first..]
        .iter()
        .filter(|f| f.read_is_fresh())
        .count();
    let copies = live_copies(sim);
    let surviving: Vec<Bytes> = keys
        .iter()
        .filter(|k| copies.contains_key(*k))
        .cloned()
        .collect();
    let mut rounds = None;
    for round in 1..=60u32 {
        if fully_replicated(sim, acked, &surviving, args.replicas) == surviving.len() {
            rounds = Some(round - 1);
            break;
        }
        sim.run_for(sync, obs);
    }
    report
        .add("churn_replaced", replaced)
        .add_ratio("get_success_during_churn", ok as f64 / reads.max(1) as f64)
        .add("gets_during_churn", reads)
        .add("keys_lost_during_churn", keys.len() - surviving.len())
        .add("reads_skipped_lost", lost_during)
        .add(
            "rounds_to_full_after_churn",
            rounds.map_or(serde_json::Value::Null, |r| r.into()),
        );
}
