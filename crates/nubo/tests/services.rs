//! Deploying services on real agents: placement, health, self-healing after a host dies,
//! limits, authority and quotas, share-based placement, and description errors.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Cloud, NUBO, ONE_CLOUD_AT_A_TIME, nubo, wait_until, write};
use serde_json::Value;

fn site(name: &str, placement: &str) -> String {
    format!(
        r#"name = "{name}"
namespace = "web"

[run]
command = "python3"
args = ["-m", "http.server", "${{NUBO_PORT_HTTP}}", "--bind", "127.0.0.1"]

[resources]
cpu = 0.05
memory = "128MiB"

[placement]
{placement}

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "500ms"
"#
    )
}

fn instances(agent: &Agent, service: &str) -> Vec<Value> {
    agent
        .try_json::<Vec<Value>>(&["ps", service])
        .unwrap_or_default()
}

fn healthy_nodes(agent: &Agent, service: &str) -> BTreeSet<String> {
    instances(agent, service)
        .iter()
        .filter(|i| i["health"] == "healthy")
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect()
}

fn answers_http(instance: &Value) -> bool {
    let port = instance["ports"]["http"].as_u64().unwrap();
    std::net::TcpStream::connect(("127.0.0.1", port as u16))
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(head.starts_with(b"HTTP/1.0 200"))
        })
        .unwrap_or(false)
}

#[test]
fn six_agents_place_heal_limit_refuse_and_share() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut cloud = Cloud::converged(6, |i| vec!["--attr".into(), format!("score={i}")]);
    let work = cloud.root.path().to_path_buf();
    let admin = &cloud.agents[0];
    let short_ids: Vec<String> = cloud
        .agents
        .iter()
        .map(|a| a.node_id()[..8].to_string())
        .collect();

    // replicas = 3: three healthy instances on three nodes, answering HTTP.
    let file = write(&work, "site.toml", &site("site", "replicas = 3"));
    let (ok, _, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{err}");
    let placed = wait_until(Duration::from_secs(60), || {
        healthy_nodes(admin, "web/site").len() == 3
    });
    assert!(
        placed.is_some(),
        "{:?}\n{}",
        instances(admin, "web/site"),
        cloud.logs()
    );
    eprintln!("3 healthy instances {placed:?} after deploying");
    let running = instances(admin, "web/site");
    assert_eq!(running.len(), 3);
    assert!(running.iter().all(answers_http));

    // share = 50% by score: the three nodes with the highest scores (4, 5, 6).
    let file = write(
        &work,
        "top.toml",
        &site("top", "share = \"50%\"\norder_by = \"score\""),
    );
    let (ok, _, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{err}");
    let expected: BTreeSet<String> = short_ids[3..].iter().cloned().collect();
    let shared = wait_until(Duration::from_secs(60), || {
        healthy_nodes(admin, "web/top") == expected
    });
    assert!(
        shared.is_some(),
        "{:?} vs {expected:?}\n{:?}\n{:?}\n{:?}",
        healthy_nodes(admin, "web/top"),
        instances(admin, "web/top"),
        admin.try_json::<Value>(&["services"]),
        admin.try_json::<Value>(&["nodes"]),
    );
    let (ok, _, _) = nubo(admin, &["rm", "web/top"]);
    assert!(ok);
    assert!(
        wait_until(Duration::from_secs(30), || instances(admin, "web/top")
            .is_empty())
        .is_some()
    );

    // An artifact bundle uploaded as a blob is unpacked in the instance's directory.
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("index.html"), "served from an artifact").unwrap();
    let tar = work.join("bundle.tar");
    assert!(
        Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(&bundle)
            .arg("index.html")
            .status()
            .unwrap()
            .success()
    );
    let stored: Value = admin.json(&["blob", "put", tar.to_str().unwrap()]);
    let blob = stored["id"].as_str().unwrap();
    let with_artifact = site("art", "replicas = 1").replace(
        "command = \"python3\"",
        &format!("command = \"python3\"\nartifact = \"{blob}\""),
    );
    let file = write(&work, "art.toml", &with_artifact);
    let (ok, _, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{err}");
    let served = wait_until(Duration::from_secs(60), || {
        instances(admin, "web/art").iter().any(|i| {
            i["health"] == "healthy" && {
                let port = i["ports"]["http"].as_u64().unwrap() as u16;
                let mut body = String::new();
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .and_then(|mut s| {
                        use std::io::{Read, Write};
                        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
                        s.read_to_string(&mut body)
                    })
                    .is_ok()
                    && body.contains("served from an artifact")
            }
        })
    });
    assert!(
        served.is_some(),
        "{:?}\n{}",
        instances(admin, "web/art"),
        cloud.logs()
    );
    nubo(admin, &["rm", "web/art"]);

    // A memory-hungry instance is held to its limit: it cannot get 512 MiB with 64 MiB.
    let hungry = r#"name = "hungry"
namespace = "web"
[run]
command = "python3"
args = ["-c", "import time; x = bytearray(512 * 1024 * 1024); print('got it', flush=True); time.sleep(600)"]
[resources]
memory = "64MiB"
[restart]
attempts = 2
delay = "200ms"
"#;
    let file = write(&work, "hungry.toml", hungry);
    let (ok, _, err) = nubo(admin, &["deploy", &file, "--detach"]);
    assert!(ok, "{err}");
    let held = wait_until(Duration::from_secs(30), || {
        instances(admin, "web/hungry")
            .iter()
            .any(|i| i["restarts"].as_u64().unwrap_or(0) >= 1)
    });
    assert!(held.is_some(), "{:?}", instances(admin, "web/hungry"));
    let (_, logs, _) = nubo(admin, &["logs", "web/hungry"]);
    assert!(!logs.contains("got it"), "{logs}");
    assert!(logs.contains("MemoryError") || logs.is_empty(), "{logs}");
    nubo(admin, &["rm", "web/hungry"]);

    // Authority: a key without a grant, a grant for another namespace, and a deploy over
    // quota are all refused with a reason, and change nothing.
    let user_key = work.join("user.key");
    let output = Command::new(NUBO)
        .args(["key", "new", "--out", user_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let public = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let user = user_key.to_str().unwrap();
    let deploy_as_user = |file: &str, grant: Option<&str>| {
        let mut args = vec!["deploy", file, "--key", user];
        args.extend(grant.map(|g| ["--grant", g]).into_iter().flatten());
        let (ok, _, err) = nubo(admin, &args);
        (ok, err)
    };
    // The administrator grants with its key (beside the agents' directories), no agent needed.
    let grant = |namespace: &str, instances: &str| {
        let output = common::cli_at(&admin.dir)
            .args(["grant", "--namespace", namespace, "--key", &public])
            .args(["--instances", instances])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let file = write(&work, "mine.toml", &site("mine", "replicas = 3"));
    let (ok, err) = deploy_as_user(&file, None);
    assert!(!ok && err.contains("no grant"), "{err}");
    let (ok, err) = deploy_as_user(&file, Some(&grant("db", "2")));
    assert!(!ok && err.contains("namespace db"), "{err}");
    // The namespace already runs 3 instances of web/site: 3 more would make 6.
    let grant_web = grant("web", "5");
    let (ok, err) = deploy_as_user(&file, Some(&grant_web));
    assert!(!ok && err.contains("over the quota"), "{err}");
    let services: Vec<Value> = admin.json(&["services"]);
    assert!(
        services.iter().all(|s| s["key"] != "web/mine"),
        "{services:?}"
    );
    // Within quota, the same user deploys.
    let small = write(&work, "small.toml", &site("mine", "replicas = 2"));
    let (ok, err) = deploy_as_user(&small, Some(&grant_web));
    assert!(ok, "{err}");
    // A grant for a namespace does not reach a node: the user cannot drain one, nor roll
    // back a service of another namespace.
    let (ok, _, err) = nubo(
        admin,
        &[
            "drain",
            &short_ids[2],
            "--key",
            user,
            "--grant",
            &grant_web,
            "--detach",
        ],
    );
    assert!(
        !ok && err.contains("only the node itself or the administrator"),
        "{err}"
    );
    let (ok, _, err) = nubo(
        admin,
        &[
            "rollback",
            "other/site",
            "--key",
            user,
            "--grant",
            &grant_web,
        ],
    );
    assert!(!ok, "{err}");
    let services: Vec<Value> = admin.json(&["services"]);
    assert!(
        services
            .iter()
            .all(|s| !s["key"].as_str().unwrap().starts_with('@')),
        "{services:?}"
    );

    // An agent crashes but its machine does not: the restarted agent adopts its running
    // instance (same process) instead of starting a second one.
    let hosts = healthy_nodes(admin, "web/site");
    let crashed = (1..6)
        .find(|&i| hosts.contains(&short_ids[i]))
        .expect("a site instance on an agent other than the first");
    let before = cloud.agents[crashed].instance_pids_of("web/site");
    assert_eq!(before.len(), 1);
    cloud.agents[crashed].kill();
    cloud.agents[crashed].restart();
    // Process ids are known on their own node: ask the restarted agent.
    let adopted = wait_until(Duration::from_secs(60), || {
        let list = instances(&cloud.agents[crashed], "web/site");
        list.len() == 3
            && list
                .iter()
                .any(|i| i["node"] == short_ids[crashed].as_str() && i["pid"] == before[0])
            && list.iter().all(|i| i["health"] == "healthy")
    });
    assert!(
        adopted.is_some(),
        "{:?}\n{}",
        instances(&cloud.agents[0], "web/site"),
        cloud.logs()
    );
    assert_eq!(
        cloud.agents[crashed].instance_pids_of("web/site"),
        before,
        "not started twice"
    );
    let admin = &cloud.agents[0];

    // Self-healing: the host of one site instance dies; a replacement is healthy elsewhere
    // and the count is exactly 3 again.
    let hosts = healthy_nodes(admin, "web/site");
    let victim = (1..6)
        .find(|&i| hosts.contains(&short_ids[i]))
        .expect("a site instance on an agent other than the first");
    let started = Instant::now();
    cloud.agents[victim].kill_host();
    let healed = wait_until(Duration::from_secs(60), || {
        let nodes = healthy_nodes(&cloud.agents[0], "web/site");
        nodes.len() == 3 && !nodes.contains(&short_ids[victim])
    });
    assert!(
        healed.is_some(),
        "{:?}\n{}",
        instances(&cloud.agents[0], "web/site"),
        cloud.logs()
    );
    eprintln!(
        "replacement healthy {:?} after kill -9 of its host",
        started.elapsed()
    );
    let running = instances(&cloud.agents[0], "web/site");
    assert_eq!(running.len(), 3, "{running:?}");
    assert!(running.iter().all(answers_http));
}

#[test]
fn malformed_descriptions_are_reported_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad =
        site("site", "replicas = 3").replace("memory = \"128MiB\"", "memory = \"lots\"\nswap = 1");
    let file = write(dir.path(), "bad.toml", &bad);
    let output = Command::new(NUBO)
        .args(["validate", &file])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{file}:11:1: unknown field `swap`")),
        "{stderr}"
    );
    let output = Command::new(NUBO)
        .args(["validate", &file.replace("bad", "missing")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let good = write(dir.path(), "good.toml", &site("site", "replicas = 3"));
    let output = Command::new(NUBO)
        .args(["validate", &good, "--json"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let service: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(service["name"], "site");
}

#[test]
fn an_instance_whose_port_was_taken_while_it_was_down_gets_another() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::converged(1, |_| vec![]);
    let work = cloud.root.path().to_path_buf();
    let agent = &cloud.agents[0];
    // The restart waits long enough for the port to be taken meanwhile.
    let description = format!(
        "{}\n[restart]\ndelay = \"3s\"\n",
        site("site", "replicas = 1")
    );
    let file = write(&work, "site.toml", &description);
    let (ok, _, err) = nubo(agent, &["deploy", &file]);
    assert!(ok, "{err}");
    let healthy = || {
        instances(agent, "web/site")
            .into_iter()
            .find(|i| i["health"] == "healthy")
    };
    assert!(wait_until(Duration::from_secs(60), || healthy().is_some()).is_some());
    let first = healthy().unwrap();
    let port = first["ports"]["http"].as_u64().unwrap() as u16;

    // Another process takes the port the moment the instance dies (as another agent on the
    // same machine may hand it out), before the agent restarts the instance.
    let pids = agent.instance_pids_of("web/site");
    assert_eq!(pids.len(), 1);
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let squatter = loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(listener) => break listener,
            Err(error) if Instant::now() > deadline => panic!("cannot take port {port}: {error}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let moved = wait_until(Duration::from_secs(60), || {
        healthy().is_some_and(|i| i["ports"]["http"].as_u64() != Some(u64::from(port)))
    });
    assert!(
        moved.is_some(),
        "{:?}\n{}",
        instances(agent, "web/site"),
        cloud.logs()
    );
    assert!(answers_http(&healthy().unwrap()));
    drop(squatter);
}
