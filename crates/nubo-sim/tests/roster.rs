//! The roster of a cloud whose members all join at once through one contact: every member
//! lists every other alive within a few seconds, and a member that joins later pulls the
//! whole roster from its first neighbour instead of waiting for announcements (which come
//! only when something changes).

use std::time::Duration;

use nubo_proto::Config;
use nubo_proto::roster::MemberState;
use nubo_sim::engine::{NetworkConfig, NoObserver, NodeIndex, Sim};

/// How many members each node lists alive, itself included.
fn alive_counts(sim: &Sim) -> Vec<usize> {
    sim.alive()
        .into_iter()
        .map(|i| sim.node(i).map_or(0, |n| n.roster().alive()))
        .collect()
}

#[test]
fn members_joining_at_once_all_see_each_other_and_a_late_one_pulls_the_roster() {
    for seed in 1..=3 {
        let mut sim = Sim::new(seed, Config::default(), NetworkConfig::default());
        let first = sim.add_node();
        sim.run_for(Duration::from_secs(2), &mut NoObserver);
        let nodes: u32 = 40;
        for _ in 1..nodes {
            let node = sim.add_node();
            sim.join(node, &[first], &mut NoObserver);
            sim.run_for(Duration::from_millis(10), &mut NoObserver);
        }
        sim.run_for(Duration::from_secs(3), &mut NoObserver);
        let counts = alive_counts(&sim);
        assert!(
            counts.iter().all(|&c| c == nodes as usize),
            "seed {seed}: members alive per node 3 s after the joins: {counts:?}"
        );

        // Long after every announcement (the roster says nothing while nothing changes), a
        // newcomer joins through another member and lists everyone at once.
        sim.run_for(Duration::from_secs(300), &mut NoObserver);
        let late = sim.add_node();
        sim.join(late, &[5 as NodeIndex], &mut NoObserver);
        sim.run_for(Duration::from_secs(2), &mut NoObserver);
        let roster = sim.node(late).unwrap().roster();
        assert!(roster.is_synced(), "seed {seed}");
        let alive = roster
            .members()
            .filter(|m| m.state == MemberState::Alive)
            .count();
        assert_eq!(alive, nodes as usize, "seed {seed}");
        let counts = alive_counts(&sim);
        assert!(
            counts.iter().all(|&c| c == nodes as usize + 1),
            "seed {seed}: {counts:?}"
        );
    }
}
