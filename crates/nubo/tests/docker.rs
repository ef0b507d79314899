//! The docker driver on real agents: the HTTP service of `services.rs`, served from a
//! container image the test builds from `scratch` with a static busybox. Three replicas
//! become healthy on nodes that offer the driver (never on one that does not), and when a
//! host dies (`kill -9` of its agent and its instances, its containers gone) a replacement
//! is healthy elsewhere. Skipped with a message where no Docker engine answers or no static
//! busybox is installed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Agent, Cloud, ONE_CLOUD_AT_A_TIME, nubo, wait_until, write};
use serde_json::Value;

const BUSYBOX: &str = "/bin/busybox";

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

/// Whether this machine can run the test; says why not.
fn can_run() -> bool {
    if !docker(&["info"]).status.success() {
        eprintln!("skipping: no Docker engine answers here");
        return false;
    }
    let static_busybox = Command::new("ldd").arg(BUSYBOX).output().is_ok_and(|o| {
        !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic")
    });
    if !Path::new(BUSYBOX).exists() || !static_busybox {
        eprintln!("skipping: no static busybox at {BUSYBOX} (apt-get install busybox-static)");
        return false;
    }
    true
}

/// An image holding only a static busybox and one page.
fn build_image(tag: &str) {
    let context = tempfile::tempdir().unwrap();
    let root = context.path().join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    std::fs::write(root.join("www/index.html"), "served from a container\n").unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\n",
    )
    .unwrap();
    let output = docker(&["build", "-q", "-t", tag, context.path().to_str().unwrap()]);
    assert!(
        output.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The image and the containers of one run, removed on drop (also when the test fails).
struct Cleanup {
    image: String,
    nodes: Vec<String>,
}

impl Cleanup {
    /// Removes the containers of `node` (its host went away: they go with it).
    fn remove_containers_of(node: &str) {
        let names = docker(&["ps", "-a", "--format", "{{.Names}}"]);
        for name in String::from_utf8_lossy(&names.stdout).lines() {
            if name.starts_with("nubo-") && name.ends_with(&format!("-{node}")) {
                let _ = docker(&["rm", "-f", name]);
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for node in &self.nodes {
            Self::remove_containers_of(node);
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn site(name: &str, image: &str, replicas: u32) -> String {
    format!(
        r#"name = "{name}"
namespace = "web"

[run]
driver = "docker"
image = "{image}"
command = "/bin/busybox"
args = ["httpd", "-f", "-p", "${{NUBO_PORT_HTTP}}", "-h", "/www"]

[resources]
cpu = 0.05
memory = "64MiB"

[placement]
replicas = {replicas}

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "500ms"
"#
    )
}

fn instances(agent: &Agent) -> Vec<Value> {
    agent
        .try_json::<Vec<Value>>(&["ps", "web/boxed"])
        .unwrap_or_default()
}

fn healthy_nodes(agent: &Agent) -> BTreeSet<String> {
    instances(agent)
        .iter()
        .filter(|i| i["health"] == "healthy")
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect()
}

fn page(instance: &Value) -> String {
    let port = instance["ports"]["http"].as_u64().unwrap();
    std::net::TcpStream::connect(("127.0.0.1", port as u16))
        .and_then(|mut s| {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .unwrap_or_default()
}

#[test]
fn three_containers_serve_and_a_dead_host_is_replaced_on_a_node_with_the_driver() {
    if !can_run() {
        return;
    }
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let image = format!("nubo-test-site:{}", std::process::id());
    build_image(&image);
    // Agents 1-4 (`agents[0..4]`) offer docker; agent 5 offers exec only and must never get
    // an instance.
    let mut cloud = Cloud::converged(5, |i| {
        let drivers = if i <= 4 { "exec,docker" } else { "exec" };
        vec!["--drivers".into(), drivers.into()]
    });
    let short_ids: Vec<String> = cloud
        .agents
        .iter()
        .map(|a| a.node_id()[..8].to_string())
        .collect();
    let _cleanup = Cleanup {
        image: image.clone(),
        nodes: short_ids.clone(),
    };
    let work = cloud.root.path().to_path_buf();
    let admin = &cloud.agents[0];

    let file = write(&work, "boxed.toml", &site("boxed", &image, 3));
    let (ok, _, err) = nubo(admin, &["deploy", &file]);
    assert!(ok, "{err}");
    let placed = wait_until(Duration::from_secs(90), || healthy_nodes(admin).len() == 3);
    assert!(placed.is_some(), "{:?}\n{}", instances(admin), cloud.logs());
    eprintln!("3 healthy containers {placed:?} after deploying");
    let running = instances(admin);
    assert_eq!(running.len(), 3);
    for instance in &running {
        assert!(
            page(instance).contains("served from a container"),
            "{instance}"
        );
        assert_ne!(instance["node"], short_ids[4].as_str(), "exec-only node");
        // The node's own instance says what holds its limits and which uid it runs as.
        if instance["node"] == short_ids[0].as_str() {
            let limits = instance["limits"].as_str().unwrap_or("");
            assert!(limits.starts_with("docker engine; uid "), "{instance}");
        }
    }

    // The host of an instance dies: its agent and instances are killed and its containers
    // go with the machine. A replacement is healthy on the other node with the driver.
    let hosts = healthy_nodes(admin);
    let victim = (1..4)
        .find(|&i| hosts.contains(&short_ids[i]))
        .expect("an instance on an agent other than the first");
    let started = Instant::now();
    cloud.agents[victim].kill_host();
    Cleanup::remove_containers_of(&short_ids[victim]);
    let healed = wait_until(Duration::from_secs(90), || {
        let nodes = healthy_nodes(&cloud.agents[0]);
        nodes.len() == 3 && !nodes.contains(&short_ids[victim])
    });
    assert!(
        healed.is_some(),
        "{:?}\n{:?}\n{:?}\n{}",
        instances(&cloud.agents[0]),
        cloud.agents[0].try_json::<Value>(&["services"]),
        cloud.agents[0].try_json::<Value>(&["nodes"]),
        cloud.logs()
    );
    eprintln!(
        "replacement healthy {:?} after kill -9 of its host",
        started.elapsed()
    );
    let running = instances(&cloud.agents[0]);
    assert_eq!(running.len(), 3, "{running:?}");
    for instance in &running {
        assert!(page(instance).contains("served from a container"));
        assert_ne!(instance["node"], short_ids[4].as_str(), "exec-only node");
    }

    // Four replicas cannot all be placed on the three nodes left with the driver: placement
    // says the exec-only node does not offer it.
    let file = write(&work, "wide.toml", &site("wide", &image, 4));
    let (ok, _, err) = nubo(&cloud.agents[0], &["deploy", "--detach", &file]);
    assert!(ok, "{err}");
    let mut text = String::new();
    let explained = wait_until(Duration::from_secs(30), || {
        text = cloud.agents[0]
            .try_json::<Value>(&["services"])
            .map(|v| v.to_string())
            .unwrap_or_default();
        text.contains("1 nodes do not offer the docker driver")
    });
    assert!(explained.is_some(), "{text}");
    cloud.agents[0].stop();
}
