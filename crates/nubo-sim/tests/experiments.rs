//! The experiments run end to end at a small size, with generous correctness bounds. The
//! numbers themselves are measured by the `nubo-sim` subcommands and recorded in
//! docs/BENCHMARKS.md.

use nubo_proto::broadcast::Dissemination;
use nubo_sim::experiments::hyparview::{HyparviewArgs, run};

fn args(nodes: u32, fail: f64, dissemination: Dissemination) -> HyparviewArgs {
    HyparviewArgs {
        dissemination,
        nodes,
        fail,
        seed: 3,
        broadcasts: 20,
        rate: 1,
        active: 5,
        passive: 30,
        warmup: 20,
        cycle_ms: 1_000,
        loss: 0.0,
        flood_hops: 1,
        latency_min_ms: 10,
        latency_max_ms: 40,
        trace: false,
        json: true,
    }
}

fn number(report: &serde_json::Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

#[test]
fn broadcast_reaches_everyone_in_a_stable_overlay_with_little_redundancy() {
    let tree = run(&args(500, 0.0, Dissemination::Tree)).to_json();
    assert_eq!(number(&tree, "reliability_min"), 1.0, "{tree}");
    // The first broadcast floods (RMR ≈ 3) and builds the tree; the rest follow it.
    assert!(number(&tree, "rmr_avg") < 0.25, "{tree}");
    assert_eq!(number(&tree, "components_after"), 1.0);

    let pull = run(&args(500, 0.0, Dissemination::Pull)).to_json();
    assert_eq!(number(&pull, "reliability_min"), 1.0, "{pull}");
    // Only the origin's first hop can duplicate.
    assert!(number(&pull, "rmr_avg") < 0.01, "{pull}");
    // Paths through the overlay are shorter than paths through a tree.
    assert!(
        number(&pull, "ldh_max") <= number(&tree, "ldh_max"),
        "{pull}\n{tree}"
    );
}

#[test]
fn broadcast_survives_the_loss_of_most_nodes() {
    for dissemination in [Dissemination::Pull, Dissemination::Tree] {
        let report = run(&args(500, 0.8, dissemination)).to_json();
        assert!(
            number(&report, "reliability_avg") >= 0.99,
            "{dissemination}: {report}"
        );
        assert_eq!(number(&report, "dead_links_after"), 0.0, "{report}");
    }
}

#[test]
fn aggregation_estimates_the_size_and_survives_a_crash_of_half_the_cloud() {
    use nubo_sim::experiments::aggregate::{AggregateArgs, run};
    let args = AggregateArgs {
        nodes: 300,
        seed: 2,
        cycles: 90,
        epoch_cycles: 30,
        crash: 0.5,
        crash_at_cycle: 5,
        loss: 0.0,
        churn: 0.0,
        json: true,
    };
    let report = run(&args).to_json();
    let rho = number(&report, "rho_avg");
    assert!(rho > 0.2 && rho < 0.4, "{report}");
    assert!(
        number(&report, "count_error_p95_after_crash") < 0.05,
        "{report}"
    );
    assert!(number(&report, "count_error_p95") < 0.05, "{report}");
}

#[test]
fn slicing_puts_most_nodes_in_their_slice_under_churn() {
    use nubo_sim::experiments::slicing::{SlicingArgs, run};
    let args = SlicingArgs {
        nodes: 400,
        slices: 10,
        churn: 0.002,
        correlated_churn: true,
        drift: 0.001,
        cycles: 120,
        seed: 3,
        json: true,
    };
    let report = run(&args).to_json();
    assert!(
        number(&report, "misreporting_mean_last50") < 0.15,
        "{report}"
    );
    assert!(number(&report, "sdm") < 0.3, "{report}");
}

#[test]
fn ring_forms_from_a_random_overlay() {
    use nubo_sim::experiments::ring::{RingArgs, run};
    let args = RingArgs {
        nodes: 256,
        seed: 2,
        successors: 4,
        cycles_max: 60,
        verbose: false,
        json: true,
    };
    let report = run(&args).to_json();
    assert!(report["cycles_to_ring"].is_u64(), "{report}");
}

#[test]
fn dht_keeps_every_key_with_a_surviving_copy() {
    use nubo_sim::experiments::dht::{DhtArgs, run};
    let args = DhtArgs {
        nodes: 256,
        keys_per_node: 10,
        replicas: 3,
        fail: 0.2,
        repair_rounds: 12,
        churn: 0.02,
        churn_minutes: 1,
        lookups: 500,
        gets: 500,
        seed: 3,
        json: true,
    };
    let report = run(&args).to_json();
    assert_eq!(number(&report, "lookup_success"), 1.0, "{report}");
    assert_eq!(number(&report, "gets_of_surviving_failed"), 0.0, "{report}");
    assert_eq!(
        number(&report, "fully_replicated_after_repair"),
        1.0,
        "{report}"
    );
    assert!(
        number(&report, "get_success_during_churn") > 0.95,
        "{report}"
    );
    assert!(report["rounds_to_full_after_churn"].is_u64(), "{report}");
}

#[test]
fn a_cloud_places_its_services_heals_a_mass_failure_churn_and_a_partition_exactly() {
    use nubo_sim::experiments::cloud::{CloudArgs, run};
    let report = run(&CloudArgs {
        nodes: 150,
        services: 30,
        fail: 0.2,
        churn: 0.05,
        churn_minutes: 1,
        partition: 20,
        idle_seconds: 10,
        seed: 5,
        json: true,
    })
    .to_json();
    assert!(number(&report, "deploy_s") <= 30.0, "{report}");
    assert!(number(&report, "placement_agreement_s") <= 30.0, "{report}");
    assert!(number(&report, "churn_settled_s") <= 60.0, "{report}");
    assert!(number(&report, "healed_s") <= 90.0, "{report}");
    for key in [
        "instances_missing_final",
        "instances_doubled_final",
        "instances_misplaced_final",
    ] {
        assert_eq!(number(&report, key), 0.0, "{key}: {report}");
    }
    // Quiet when nothing changes: a few messages a second per node.
    assert!(number(&report, "idle_msgs_per_node_s") < 20.0, "{report}");
}

#[test]
fn a_node_that_dies_with_all_its_neighbours_is_found_and_replaced() {
    use std::time::Duration;

    use nubo_sim::engine::{NetworkConfig, NoObserver, Sim};
    use nubo_sim::experiments::cloud::{
        cloud_config, entry_of, machine_attributes, placement, service_spec,
    };
    use nubo_sim::workload::grow_overlay;

    let mut sim = Sim::new(7, cloud_config(), NetworkConfig::default());
    let mut rng = sim.rng().fork();
    grow_overlay(
        &mut sim,
        60,
        Duration::from_secs(5),
        &mut NoObserver,
        |sim| {
            let node = sim.add_node();
            sim.set_attributes(node, machine_attributes(&mut rng));
            node
        },
    );
    sim.run_for(Duration::from_secs(30), &mut NoObserver);
    let services: Vec<_> = (0..20).map(|j| service_spec(j, &mut rng)).collect();
    for spec in &services {
        let alive = sim.alive();
        let from = alive[rng.index(alive.len())];
        sim.publish(from, entry_of(spec, 1), &mut NoObserver);
    }
    sim.run_for(Duration::from_secs(30), &mut NoObserver);
    assert!(placement(&sim, &services).is_exact(), "deployed");

    // A node that runs an instance dies at once with every overlay neighbour it has: no
    // live node watches it through the overlay. Its services' coordinators survive (a new
    // coordinator would plan without it from the start).
    let neighbours_of = |sim: &Sim, i| -> Vec<_> {
        sim.node(i)
            .unwrap()
            .membership()
            .active()
            .iter()
            .filter_map(|p| sim.index_of(p.id))
            .collect()
    };
    let coordinator_of = |sim: &Sim, key: &str| {
        sim.alive().into_iter().find(|&c| {
            sim.node(c)
                .is_some_and(|n| n.coordination().coordinated().any(|(k, _)| k == key))
        })
    };
    let victim = sim
        .alive()
        .into_iter()
        .find(|&i| {
            let dying: Vec<_> = neighbours_of(&sim, i).into_iter().chain([i]).collect();
            let runner = sim.runner(i).unwrap();
            runner.running().next().is_some()
                && runner.running().all(|(key, _, _)| {
                    coordinator_of(&sim, key).is_some_and(|c| !dying.contains(&c))
                })
        })
        .expect("a node runs an instance of services coordinated elsewhere");
    let id = sim.peer(victim).id;
    let neighbours = neighbours_of(&sim, victim);
    assert!(!neighbours.is_empty());
    sim.crash(victim);
    for &n in &neighbours {
        sim.crash(n);
    }
    // No neighbour is left to report it. In a cloud this small a node that holds it in its
    // passive view usually tries it first; in a large one its coordinators notice its
    // missing beats (unit-tested in coordination). Either way it is probed, declared gone
    // and its instances replaced well before a reporter silent for three beats (30 s) is
    // dropped.
    let mut settled = None;
    for quarter in 1..=96u32 {
        sim.run_for(Duration::from_millis(250), &mut NoObserver);
        if placement(&sim, &services).is_exact() {
            settled = Some(quarter);
            break;
        }
    }
    let seconds = settled.map(|q| f64::from(q) / 4.0);
    assert!(
        seconds.is_some_and(|s| s <= 24.0),
        "placement exact after {seconds:?} s"
    );
    let knowing = sim
        .alive()
        .into_iter()
        .filter(|&i| sim.node(i).is_some_and(|n| n.liveness().is_departed(id)))
        .count();
    assert_eq!(
        knowing,
        sim.alive().len(),
        "every live node holds the victim gone"
    );
}
