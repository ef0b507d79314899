//! A node that restarts with nothing and reads at once must not answer from the few nodes it
//! knows just after joining: every read of a key that exists finds it.

use std::time::Duration;

use bytes::Bytes;
use nubo_proto::Config;
use nubo_proto::kv::KvValue;
use nubo_sim::engine::{NetworkConfig, NodeIndex, Sim};
use nubo_sim::kv_tracker::KvTracker;
use nubo_sim::workload::grow_overlay;

const NODES: u32 = 40;
const KEYS: usize = 60;
/// Milliseconds between the rounds of reads through the restarted node (the first at once).
const PAUSES: [u64; 5] = [0, 50, 200, 500, 1_000];

#[test]
fn a_restarted_node_reads_every_key_from_its_first_instant() {
    for seed in 1..=4 {
        let mut sim = Sim::new(seed, Config::default(), NetworkConfig::default());
        let mut ops = KvTracker::default();
        grow_overlay(
            &mut sim,
            NODES,
            Duration::from_secs(4),
            &mut ops,
            Sim::add_node,
        );
        sim.run_for(Duration::from_secs(30), &mut ops);

        let keys: Vec<Bytes> = (0..KEYS).map(|k| Bytes::from(format!("key-{k}"))).collect();
        for (k, key) in keys.iter().enumerate() {
            let tag = ops.begin(sim.now(), key);
            let node = k as NodeIndex % NODES;
            let value = Some(Bytes::from_static(b"value"));
            assert!(sim.kv_put(node, key.clone(), value, tag, &mut ops));
        }
        sim.run_for(Duration::from_secs(10), &mut ops);
        assert_eq!(
            ops.acked.len(),
            KEYS,
            "seed {seed}: writes not acknowledged"
        );

        // The victim crashes, the others re-replicate, and it comes back empty.
        let victim = 7;
        sim.crash(victim);
        sim.run_for(Duration::from_secs(30), &mut ops);
        sim.restart(victim);
        sim.join(victim, &[0, 1], &mut ops);
        ops.finished.clear();
        // Reads through it from the instant it joins, and while its view grows.
        for pause in PAUSES {
            sim.run_for(Duration::from_millis(pause), &mut ops);
            for key in &keys {
                let tag = ops.begin(sim.now(), key);
                assert!(sim.kv_get(victim, key.clone(), tag, &mut ops));
            }
        }
        sim.run_for(Duration::from_secs(20), &mut ops);

        assert_eq!(
            ops.finished.len(),
            PAUSES.len() * KEYS,
            "seed {seed}: reads unfinished"
        );
        let wrong: Vec<String> = ops
            .finished
            .iter()
            .filter(|op| !matches!(op.result, Ok(KvValue::Read(Some(_)))))
            .map(|op| format!("{:?} at {:?}: {:?}", op.key, op.started, op.result))
            .collect();
        assert!(
            wrong.is_empty(),
            "seed {seed}: {} of {} reads through the restarted node failed: {:#?}",
            wrong.len(),
            ops.finished.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}
