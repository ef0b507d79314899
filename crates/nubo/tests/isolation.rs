//! A contributed machine is safe from the services it runs: a hostile service, deployed by a
//! user granted one namespace (and again by the administrator), cannot read or write any
//! agent's files, touch another instance's directory or processes, or read the agent's
//! environment; and the limits of an instance hold for every process it starts (a fork bomb,
//! children together over the memory limit, output at full speed, a directory past its disk
//! budget).
//!
//! The isolation needs the agent to run as root (as CI does); elsewhere the tests say so and
//! check what an unprivileged agent gives.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, Cloud, ONE_CLOUD_AT_A_TIME, nubo, wait_until, write};
use serde_json::Value;

/// Tries everything a hostile service might, prints `OK <what>` for each attempt that fails
/// and `FAIL <what>` for each that works, then keeps running.
const PROBE: &str = r#"
import os, signal, sys, time
results = []
def attempt(name, action):
    try:
        action()
        results.append("FAIL " + name)
    except Exception as error:
        results.append("OK " + name + ": " + type(error).__name__)
def write_into(directory):
    with open(os.path.join(directory, "planted"), "w") as f:
        f.write("x")
for d in os.environ["PROBE_DATA_DIRS"].split(":"):
    for name in ["node.key", "api.token", "state.redb", "api.addr"]:
        attempt("read " + d + "/" + name, lambda d=d, name=name: open(os.path.join(d, name), "rb").read())
    attempt("list " + d, lambda d=d: os.listdir(d))
    attempt("write " + d, lambda d=d: write_into(d))
attempt("read the admin key", lambda: open(os.environ["PROBE_ADMIN_KEY"], "rb").read())
attempt("write the victim's directory", lambda: write_into(os.environ["PROBE_VICTIM_DIR"]))
for pid in os.environ["PROBE_VICTIM_PIDS"].split(","):
    attempt("kill " + pid, lambda pid=pid: os.kill(int(pid), signal.SIGKILL))
for pid in os.environ["PROBE_AGENT_PIDS"].split(","):
    attempt("read the environment of " + pid, lambda pid=pid: open("/proc/" + pid + "/environ", "rb").read())
print("UID", os.getuid(), flush=True)
for line in results:
    print(line, flush=True)
print("DONE", flush=True)
while True:
    time.sleep(60)
"#;

fn description(name: &str, namespace: &str, run: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nnamespace = \"{namespace}\"\n\n[run]\n{run}\n\n[resources]\ncpu = 0.05\nmemory = \"128MiB\"\n{extra}\n"
    )
}

fn instances(agent: &Agent, service: &str) -> Vec<Value> {
    agent
        .try_json::<Vec<Value>>(&["ps", service])
        .unwrap_or_default()
}

fn logs(agent: &Agent, service: &str) -> String {
    let (_, out, _) = nubo(agent, &["logs", service, "--tail", "500"]);
    out
}

/// Process ids of the instance whose wrapper is `leader`: the wrapper and its children.
fn family(leader: u32) -> Vec<u32> {
    let mut pids = vec![leader];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(leader) {
            pids.push(pid);
        }
    }
    pids
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_hostile_service_reaches_no_agent_file_no_other_instance_and_no_agent_environment() {
    if !is_root() {
        eprintln!("skipping: instances get users of their own only under a root agent");
        return;
    }
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::converged(2, |_| Vec::new());
    let work = cloud.root.path().to_path_buf();
    let admin = &cloud.agents[0];

    // The victim: another namespace's service, keeping a secret in its directory.
    let victim = description(
        "victim",
        "web",
        "command = \"sh\"\nargs = [\"-c\", \"echo secret > data && exec sleep 100000\"]",
        "[placement]\nreplicas = 1",
    );
    let file = write(&work, "victim.toml", &victim);
    let (ok, _, err) = nubo(admin, &["deploy", &file, "--detach"]);
    assert!(ok, "{err}");
    let host = wait_until(Duration::from_secs(60), || {
        instances(admin, "web/victim")
            .iter()
            .any(|i| i["state"] == "healthy" || i["state"] == "ready")
    });
    assert!(
        host.is_some(),
        "{:?}\n{}",
        instances(admin, "web/victim"),
        cloud.logs()
    );
    let victim_node = instances(admin, "web/victim")[0]["node"]
        .as_str()
        .unwrap()
        .to_string();
    let victim_agent = cloud
        .agents
        .iter()
        .find(|a| a.node_id().starts_with(&victim_node))
        .unwrap();
    let leader = victim_agent.instance_pids_of("web/victim")[0] as u32;
    let victim_pids: Vec<String> = family(leader).iter().map(u32::to_string).collect();
    let victim_dir = std::fs::read_dir(victim_agent.dir.join("instances"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("web.victim-"))
        .unwrap()
        .path()
        .join("work");
    // Ready means started: the shell may not have written its secret yet.
    let written = wait_until(Duration::from_secs(30), || victim_dir.join("data").exists());
    assert!(written.is_some(), "the victim never wrote its secret");

    let probe_blob: Value = {
        let path = write(&work, "probe.py", PROBE);
        admin.json(&["blob", "put", &path])
    };
    let data_dirs: Vec<String> = cloud
        .agents
        .iter()
        .map(|a| a.dir.display().to_string())
        .collect();
    let agent_pids: Vec<String> = cloud
        .agents
        .iter()
        .map(|a| a.child.as_ref().unwrap().id().to_string())
        .collect();
    let probe = |namespace: &str| {
        description(
            "probe",
            namespace,
            &format!(
                "command = \"python3\"\nargs = [\"artifact\"]\nartifact = \"{}\"\n[run.env]\nPROBE_DATA_DIRS = \"{}\"\nPROBE_ADMIN_KEY = \"{}\"\nPROBE_VICTIM_DIR = \"{}\"\nPROBE_VICTIM_PIDS = \"{}\"\nPROBE_AGENT_PIDS = \"{}\"",
                probe_blob["id"].as_str().unwrap(),
                data_dirs.join(":"),
                work.join("admin.key").display(),
                victim_dir.display(),
                victim_pids.join(","),
                agent_pids.join(","),
            ),
            "[placement]\nreplicas = 2",
        )
    };

    // A user granted namespace team only, then the administrator's own service.
    let user_key = work.join("user.key");
    let output = common::cli_at(&admin.dir)
        .args(["key", "new", "--out", user_key.to_str().unwrap()])
        .output()
        .unwrap();
    let public = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let grant = common::cli_at(&admin.dir)
        .args(["grant", "--namespace", "team", "--key", &public])
        .output()
        .unwrap();
    let grant = String::from_utf8_lossy(&grant.stdout).trim().to_string();
    for (namespace, signing) in [
        (
            "team",
            vec!["--key", user_key.to_str().unwrap(), "--grant", &grant],
        ),
        ("web", vec![]),
    ] {
        let file = write(&work, &format!("probe-{namespace}.toml"), &probe(namespace));
        let mut args = vec!["deploy", file.as_str(), "--detach"];
        args.extend(signing.iter().copied());
        let (ok, _, err) = nubo(admin, &args);
        assert!(ok, "{err}");
        let service = format!("{namespace}/probe");
        let done = wait_until(Duration::from_secs(60), || {
            logs(admin, &service).matches("DONE").count() >= 2
        });
        let text = logs(admin, &service);
        assert!(done.is_some(), "{text}\n{}", cloud.logs());
        let attempts = text.lines().filter(|l| l.contains(" | OK ")).count();
        assert!(attempts >= 2 * 17, "{attempts} attempts:\n{text}");
        assert!(
            !text.contains(" | FAIL "),
            "{service} reached something:\n{text}"
        );
        for line in text.lines().filter(|l| l.contains(" | UID ")) {
            let uid: u32 = line.rsplit(' ').next().unwrap().parse().unwrap();
            assert_ne!(uid, 0, "{service} runs as its own user, not the agent's");
        }
        // It keeps running, and so does the victim, untouched.
        let running = instances(admin, &service);
        assert!(
            running
                .iter()
                .all(|i| i["restarts"] == 0 && i["state"] != "failed"),
            "{running:?}"
        );
    }
    let victim_now = instances(admin, "web/victim");
    assert_eq!(victim_now[0]["restarts"], 0, "{victim_now:?}");
    for dir in &data_dirs {
        assert!(!Path::new(dir).join("planted").exists());
    }
    assert!(!victim_dir.join("planted").exists());
}

#[test]
fn an_instances_limits_hold_for_every_process_it_starts() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let cloud = Cloud::converged(1, |_| Vec::new());
    let work = cloud.root.path().to_path_buf();
    let agent = &cloud.agents[0];
    let status = agent.status();
    let limits = status["limits"].as_str().unwrap_or("").to_string();
    eprintln!("limits: {limits}; isolation: {}", status["isolation"]);
    let enforced = limits.contains("memory, cpu, pids");
    let deploy = |name: &str, run: &str, extra: &str| {
        let file = write(
            &work,
            &format!("{name}.toml"),
            &description(name, "lim", run, extra),
        );
        let (ok, _, err) = nubo(agent, &["deploy", &file, "--detach"]);
        assert!(ok, "{err}");
    };

    // Output at full speed: the log stays under its cap (1 MiB, one old file kept).
    deploy(
        "chatty",
        "command = \"sh\"\nargs = [\"-c\", \"exec yes 0123456789012345678901234567890123456789\"]",
        "",
    );
    // A file past the disk budget: the writer is stopped, with that reason.
    deploy(
        "filler",
        "command = \"python3\"\nargs = [\"-c\", \"f = open('big', 'wb')\\nwhile True: f.write(bytes(1 << 20))\"]",
        "disk = \"20MiB\"\n[restart]\nattempts = 1\ndelay = \"200ms\"",
    );
    // Many files past the disk budget: the instance is stopped, with that reason.
    deploy(
        "hoarder",
        "command = \"python3\"\nargs = [\"-c\", \"import time\\nfor i in range(40):\\n    open('f%d' % i, 'wb').write(bytes(1 << 20))\\ntime.sleep(600)\"]",
        "disk = \"20MiB\"",
    );
    let note = |service: &str| -> String {
        instances(agent, service)
            .first()
            .and_then(|i| i["note"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let stopped = wait_until(Duration::from_secs(60), || {
        note("lim/filler").contains("disk budget") && note("lim/hoarder").contains("disk budget")
    });
    assert!(
        stopped.is_some(),
        "{:?}\n{:?}\n{}",
        instances(agent, "lim/filler"),
        instances(agent, "lim/hoarder"),
        cloud.logs()
    );
    eprintln!(
        "filler: {}\nhoarder: {}",
        note("lim/filler"),
        note("lim/hoarder")
    );
    let instance_dir = |prefix: &str| {
        std::fs::read_dir(agent.dir.join("instances"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .unwrap()
    };
    let chatty = instance_dir("lim.chatty-");
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        for name in ["output.log", "output.log.1"] {
            let size = std::fs::metadata(chatty.join(name)).map_or(0, |m| m.len());
            assert!(size <= 1 << 20, "{name} holds {size} bytes");
        }
    }
    assert!(
        std::fs::metadata(chatty.join("output.log.1")).is_ok(),
        "it rotated"
    );
    nubo(agent, &["rm", "lim/chatty"]);

    if !enforced {
        eprintln!("skipping the cgroup limits: {limits}");
        return;
    }
    // A fork bomb is held by the pids limit.
    deploy(
        "bomb",
        "command = \"python3\"\nargs = [\"-c\", \"import os, time\\nn = 0\\ntry:\\n    while True:\\n        if os.fork() == 0:\\n            time.sleep(600)\\n            os._exit(0)\\n        n += 1\\nexcept OSError:\\n    print('forks refused after', n, flush=True)\\ntime.sleep(600)\"]",
        "pids = 32",
    );
    let held = wait_until(Duration::from_secs(60), || {
        logs(agent, "lim/bomb").contains("forks refused after")
    });
    assert!(held.is_some(), "{}", logs(agent, "lim/bomb"));
    let text = logs(agent, "lim/bomb");
    let forks: u32 = text
        .split("forks refused after ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(forks < 32, "{forks} forks with pids = 32");
    let (ok, _, err) = nubo(agent, &["rm", "lim/bomb"]);
    assert!(ok, "{err}");

    // 8 children of 64 MiB each in a 128 MiB service: held to 128 MiB in all.
    deploy(
        "greedy",
        "command = \"python3\"\nargs = [\"-c\", \"import os, time\\nfor i in range(8):\\n    if os.fork() == 0:\\n        b = bytearray(64 << 20)\\n        b[::4096] = b'x' * (len(b) // 4096)\\n        print('child', i, 'holds 64 MiB', flush=True)\\n        time.sleep(600)\\n        os._exit(0)\\n    time.sleep(0.3)\\ntime.sleep(600)\"]",
        "",
    );
    let uid_of = || -> Option<u32> {
        // The wrapper is root; the program, its child, runs as the instance's user.
        let leader = agent.instance_pids_of("lim/greedy").first().copied()? as u32;
        let child = family(leader).into_iter().find(|p| *p != leader)?;
        let child_status = std::fs::read_to_string(format!("/proc/{child}/status")).ok()?;
        child_status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next())
            .and_then(|u| u.parse().ok())
    };
    let uid = wait_until(Duration::from_secs(30), || uid_of().is_some())
        .and_then(|_| uid_of())
        .expect("the greedy instance runs");
    let resident = |uid: u32| -> u64 {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
            .filter(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|u| u.split_whitespace().next())
                    == Some(uid.to_string().as_str())
            })
            .filter_map(|s| {
                let pid = s
                    .lines()
                    .find_map(|l| l.strip_prefix("Pid:"))?
                    .trim()
                    .to_string();
                // Proportional: pages shared by forked children count once in all.
                let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
                rollup
                    .lines()
                    .find_map(|l| l.strip_prefix("Pss:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .sum::<u64>()
            * 1024
    };
    let mut most = 0;
    for _ in 0..30 {
        most = most.max(resident(uid));
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "the greedy instance's processes held at most {} MiB",
        most >> 20
    );
    assert!(most <= 136 << 20, "{} MiB resident", most >> 20);
    let children = logs(agent, "lim/greedy").matches("holds 64 MiB").count();
    assert!(children < 8, "all 8 children got their 64 MiB");
}
