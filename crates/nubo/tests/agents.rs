//! Real agent processes on loopback: membership, failure detection, re-replication, restart
//! with the same data directory, and key-value reads through every agent.

mod common;

use std::time::Duration;

use common::{Cloud, ONE_CLOUD_AT_A_TIME, wait_until};

const KEYS: usize = 12;

#[test]
fn eight_agents_converge_notice_a_kill_rereplicate_and_take_back_a_restarted_agent() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cloud = Cloud::start(8);
    let n = cloud.agents.len() as u64;

    let converged = wait_until(Duration::from_secs(60), || {
        cloud.agents.iter().all(|a| a.members_alive() == n)
    });
    assert!(
        converged.is_some(),
        "8 agents did not all see 8 alive:\n{}",
        cloud.logs()
    );
    eprintln!("all 8 agents saw 8 alive after {converged:?}");

    // Writes through one agent are read through every other.
    for k in 0..KEYS {
        let written = cloud.agents[k % 8].put(&format!("key-{k}"), &format!("value-{k}"));
        assert!(
            written.is_ok(),
            "put key-{k}: {written:?}\n{}",
            cloud.logs()
        );
    }
    for agent in &cloud.agents {
        for k in 0..KEYS {
            assert_eq!(
                agent.get(&format!("key-{k}")).as_deref(),
                Ok(format!("value-{k}").as_str()),
                "reading key-{k} through {}",
                agent.dir.display()
            );
        }
    }

    // A blob of three chunks, stored through one agent and fetched through another.
    let content: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = cloud.root.path().join("blob.in");
    std::fs::write(&file, &content).unwrap();
    let stored: serde_json::Value = cloud.agents[2].json(&["blob", "put", file.to_str().unwrap()]);
    assert_eq!(stored["size"], 600_000);
    assert_eq!(stored["chunks"], 3);
    let id = stored["id"].as_str().unwrap();
    let out = cloud.root.path().join("blob.out");
    let _: serde_json::Value =
        cloud.agents[6].json(&["blob", "get", id, "-o", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == content,
        "the blob came back different"
    );
    let stats: serde_json::Value = cloud.agents[5].json(&["stats"]);
    assert_eq!(stats["members_alive"], 8);

    // Kill -9 an agent that holds a replica of key-0.
    let victim = (1..8)
        .find(|&i| cloud.agents[i].holds("key-0"))
        .unwrap_or(1);
    let victim_id = cloud.agents[victim].node_id();
    cloud.agents[victim].kill();
    let noticed = wait_until(Duration::from_secs(30), || {
        cloud.agents.iter().enumerate().all(|(i, a)| {
            i == victim
                || a.member_states()
                    .iter()
                    .any(|(id, state)| id == &victim_id && state == "gone")
        })
    });
    assert!(
        noticed.is_some(),
        "the kill was not noticed by all:\n{}",
        cloud.logs()
    );
    eprintln!("all survivors noticed the kill after {noticed:?}");

    // Every key is back on three live replicas, and still readable everywhere.
    let rereplicated = wait_until(Duration::from_secs(60), || {
        (0..KEYS).all(|k| {
            let key = format!("key-{k}");
            let holders = cloud
                .agents
                .iter()
                .enumerate()
                .filter(|(i, a)| *i != victim && a.holds(&key))
                .count();
            holders >= 3
        })
    });
    assert!(
        rereplicated.is_some(),
        "keys were not re-replicated:\n{}",
        cloud.logs()
    );
    eprintln!("every key back on 3 live replicas after {rereplicated:?}");
    for (i, agent) in cloud.agents.iter().enumerate() {
        if i == victim {
            continue;
        }
        for k in 0..KEYS {
            assert_eq!(
                agent.get(&format!("key-{k}")).as_deref(),
                Ok(format!("value-{k}").as_str())
            );
        }
    }

    // Restarted with its data directory, the agent rejoins, under the same id, with its data.
    cloud.agents[victim].restart();
    assert_eq!(cloud.agents[victim].node_id(), victim_id);
    let records = cloud.agents[victim].status()["kv_records"]
        .as_u64()
        .unwrap();
    assert!(records > 0, "the restarted agent lost its records");
    let rejoined = wait_until(Duration::from_secs(60), || {
        cloud.agents.iter().all(|a| a.members_alive() == n)
    });
    assert!(
        rejoined.is_some(),
        "the restarted agent did not rejoin:\n{}",
        cloud.logs()
    );
    eprintln!("the restarted agent was seen alive by all after {rejoined:?}");
    // Its first reads already find every key: it does not answer from the few nodes it
    // knows just after starting.
    for k in 0..KEYS {
        assert_eq!(
            cloud.agents[victim].get(&format!("key-{k}")).as_deref(),
            Ok(format!("value-{k}").as_str()),
            "reading key-{k} through the restarted agent"
        );
    }
    assert_eq!(cloud.agents[victim].status()["ring_settled"], true);
}
