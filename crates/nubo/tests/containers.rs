//! Clouds in containers on a private Docker network:
//! - 5 nodes; one is cut off (`docker network disconnect`) and reconnected: membership and the
//!   key-value store converge again;
//! - 6 nodes running a service; the cloud is split 3/3 (packet filters inside each
//!   container's network namespace) and healed: each side keeps the service running, and
//!   after healing exactly the requested number of instances remains.
//!
//! The image is built here from `scratch`: the `nubo` binary, `/bin/sleep` (the service) and
//! the shared libraries they link, nothing else (no image is pulled). Where no Docker engine
//! answers (or, for the split, no `iptables`/`nsenter`), a test says so and passes without
//! running.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{NUBO, ONE_CLOUD_AT_A_TIME, wait_until};
use serde_json::Value;

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let output = docker(args);
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Copies `file` into `root` at the same path.
fn copy_into(root: &Path, file: &Path) {
    let target = root.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap();
}

/// Builds an image holding only `nubo`, `sleep` and their shared libraries.
fn build_image(tag: &str) {
    let context = tempfile::tempdir().unwrap();
    let root = context.path().join("rootfs");
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::copy(NUBO, root.join("nubo")).unwrap();
    copy_into(&root, Path::new("/bin/sleep"));
    for program in [NUBO, "/bin/sleep"] {
        let ldd = Command::new("ldd").arg(program).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = line
                .split("=>")
                .last()
                .and_then(|rest| rest.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(path) = path {
                copy_into(&root, Path::new(path));
            }
        }
    }
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY rootfs/ /\nENV HOME=/tmp NUBO_DATA_DIR=/data\nENTRYPOINT [\"/nubo\"]\n",
    )
    .unwrap();
    docker_ok(&["build", "-q", "-t", tag, context.path().to_str().unwrap()]);
}

/// Containers, network and image of one test run, removed on drop.
struct Lab {
    prefix: String,
    subnet: u8,
    image: String,
    nodes: usize,
    /// Agents refuse services whose limits they cannot enforce (no `--allow-unenforced-limits`).
    strict: bool,
}

impl Lab {
    fn name(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn ip(&self, i: usize) -> String {
        format!("172.29.{}.{}", self.subnet, 10 + i)
    }

    fn start(&self, i: usize, join: Option<&str>) {
        let name = self.name(i);
        let ip = self.ip(i);
        let advertise = format!("{ip}:7700");
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "--network",
            &self.prefix,
            "--ip",
            &ip,
            "-e",
            "NUBO_LOG=info",
            &self.image,
            "agent",
            "--listen",
            "0.0.0.0:7700",
            "--advertise",
            &advertise,
        ];
        match join {
            Some(token) => args.extend(["--join", token]),
            None => args.push("--bootstrap"),
        }
        if !self.strict {
            // A container's cgroups are read-only: the tests run the services anyway.
            args.push("--allow-unenforced-limits");
        }
        docker_ok(&args);
    }

    fn cli(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let name = self.name(i);
        let mut full = vec!["exec", &name, "/nubo"];
        full.extend(args);
        full.push("--json");
        let output = docker(&full);
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
    }

    fn alive(&self, i: usize) -> u64 {
        self.cli(i, &["status"])
            .ok()
            .and_then(|s| s["members_alive"].as_u64())
            .unwrap_or(0)
    }

    fn holders(&self, key: &str) -> usize {
        (1..=self.nodes)
            .filter(|&i| {
                self.cli(i, &["kv", "local", key])
                    .is_ok_and(|v| v["held"].as_bool() == Some(true))
            })
            .count()
    }

    fn logs(&self) -> String {
        (1..=self.nodes)
            .map(|i| {
                let output = docker(&["logs", "--tail", "30", &self.name(i)]);
                format!(
                    "--- {}\n{}",
                    self.name(i),
                    String::from_utf8_lossy(&output.stderr)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 1..=self.nodes {
            let _ = docker(&["rm", "-f", &self.name(i)]);
        }
        let _ = docker(&["network", "rm", &self.prefix]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn docker_runs() -> bool {
    let runs = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!("skipping: no Docker engine answers here (the loopback tests still ran)");
    }
    runs
}

/// Builds the image, the network and a cloud of `nodes` containers, formed.
fn lab(nodes: usize, tag: &str) -> Lab {
    lab_with(nodes, tag, false)
}

fn lab_with(nodes: usize, tag: &str, strict: bool) -> Lab {
    let id = std::process::id();
    let lab = Lab {
        prefix: format!("nubo-test-{id}-{tag}"),
        subnet: ((id + tag.len() as u32 * 37) % 200) as u8 + 20,
        image: format!("nubo-test-{tag}:{id}"),
        nodes,
        strict,
    };
    build_image(&lab.image);
    docker_ok(&[
        "network",
        "create",
        "--subnet",
        &format!("172.29.{}.0/24", lab.subnet),
        &lab.prefix,
    ]);
    lab.start(1, None);
    assert!(
        wait_until(Duration::from_secs(30), || lab.cli(1, &["status"]).is_ok()).is_some(),
        "{}",
        lab.logs()
    );
    let token = lab.cli(1, &["invite"]).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 2..=nodes {
        lab.start(i, Some(&token));
    }
    let n = nodes as u64;
    let formed = wait_until(Duration::from_secs(90), || {
        (1..=nodes).all(|i| lab.alive(i) == n)
    });
    assert!(formed.is_some(), "the cloud did not form:\n{}", lab.logs());
    eprintln!("{nodes} containers saw each other alive after {formed:?}");
    lab
}

#[test]
fn a_node_cut_off_from_a_containerised_cloud_rejoins_and_catches_up() {
    if !docker_runs() {
        return;
    }
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let lab = lab(5, "cut");
    let n = 5;
    lab.cli(1, &["kv", "put", "before", "cut"]).unwrap();

    // Cut node 3 off.
    docker_ok(&["network", "disconnect", &lab.prefix, &lab.name(3)]);
    let noticed = wait_until(Duration::from_secs(60), || {
        lab.alive(1) == n - 1 && lab.alive(3) == 1
    });
    assert!(
        noticed.is_some(),
        "the cut was not noticed:\n{}",
        lab.logs()
    );
    eprintln!("both sides noticed the cut after {noticed:?}");
    lab.cli(1, &["kv", "put", "during", "cut"]).unwrap();

    // Reconnect it at the same address.
    docker_ok(&[
        "network",
        "connect",
        "--ip",
        &lab.ip(3),
        &lab.prefix,
        &lab.name(3),
    ]);
    let healed = wait_until(Duration::from_secs(120), || {
        (1..=5).all(|i| lab.alive(i) == n)
    });
    assert!(
        healed.is_some(),
        "membership did not converge:\n{}",
        lab.logs()
    );
    eprintln!("membership converged {healed:?} after reconnecting");
    let caught_up = wait_until(Duration::from_secs(60), || {
        lab.holders("before") >= 3
            && lab.holders("during") >= 3
            && lab
                .cli(3, &["kv", "get", "during"])
                .is_ok_and(|v| v["value"] == "cut")
    });
    assert!(
        caught_up.is_some(),
        "the store did not converge:\n{}",
        lab.logs()
    );
    eprintln!("the store converged {caught_up:?} after membership");
}

impl Lab {
    fn pid(&self, i: usize) -> String {
        docker_ok(&["inspect", "-f", "{{.State.Pid}}", &self.name(i)])
    }

    /// Drops, inside container `i`'s network namespace, every packet from `from`. Returns
    /// whether the filter could be installed.
    fn drop_from(&self, i: usize, from: usize) -> bool {
        Command::new("nsenter")
            .args([
                "-t",
                &self.pid(i),
                "-n",
                "iptables",
                "-A",
                "INPUT",
                "-s",
                &self.ip(from),
                "-j",
                "DROP",
            ])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn heal(&self, i: usize) {
        let status = Command::new("nsenter")
            .args(["-t", &self.pid(i), "-n", "iptables", "-F", "INPUT"])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Instances of the sleeper service running in container `i` (its `sleep` processes).
    fn sleepers(&self, i: usize) -> usize {
        let output = docker(&["top", &self.name(i)]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            // The program itself, not the wrapper that started it (its arguments name it too).
            .filter(|l| l.contains("/bin/sleep 100000") && !l.contains("instance-"))
            .count()
    }

    fn total_sleepers(&self) -> usize {
        (1..=self.nodes).map(|i| self.sleepers(i)).sum()
    }
}

fn can_filter_packets() -> bool {
    let ok = ["iptables", "nsenter"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("skipping: iptables and nsenter are needed to split the cloud");
    }
    ok
}

#[test]
fn a_containerised_cloud_split_three_three_keeps_serving_and_heals_to_the_requested_count() {
    if !docker_runs() || !can_filter_packets() {
        return;
    }
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let lab = lab(6, "split");
    let description = r#"name = "sleeper"
namespace = "test"
[run]
command = "/bin/sleep"
args = ["100000"]
[resources]
cpu = 0.01
memory = "16MiB"
[placement]
replicas = 2
"#;
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), description).unwrap();
    docker_ok(&[
        "cp",
        file.path().to_str().unwrap(),
        &format!("{}:/tmp/sleeper.toml", lab.name(1)),
    ]);
    lab.cli(1, &["deploy", "/tmp/sleeper.toml"]).unwrap();
    let placed = wait_until(Duration::from_secs(60), || lab.total_sleepers() == 2);
    assert!(
        placed.is_some(),
        "{} instances\n{}",
        lab.total_sleepers(),
        lab.logs()
    );

    // Split {1,2,3} from {4,5,6}.
    if !lab.drop_from(1, 4) {
        eprintln!(
            "skipping the split: packet filters cannot be installed in the containers' namespaces here"
        );
        return;
    }
    for a in 1..=3 {
        for b in 4..=6 {
            assert!(
                lab.drop_from(a, b) && lab.drop_from(b, a),
                "iptables in the containers"
            );
        }
    }
    let split = wait_until(Duration::from_secs(60), || {
        lab.alive(1) == 3 && lab.alive(4) == 3
    });
    assert!(
        split.is_some(),
        "the sides did not see the split:\n{}",
        lab.logs()
    );
    // Each side keeps serving: it runs the service on its own members.
    let side =
        |nodes: std::ops::RangeInclusive<usize>| nodes.map(|i| lab.sleepers(i)).sum::<usize>();
    let served = wait_until(Duration::from_secs(60), || {
        side(1..=3) == 2 && side(4..=6) == 2
    });
    assert!(
        served.is_some(),
        "{} + {} instances during the split\n{}",
        side(1..=3),
        side(4..=6),
        lab.logs()
    );
    eprintln!("split seen after {split:?}; both sides run 2 instances after {served:?}");

    for i in 1..=6 {
        lab.heal(i);
    }
    let merged = wait_until(Duration::from_secs(120), || {
        (1..=6).all(|i| lab.alive(i) == 6)
    });
    assert!(
        merged.is_some(),
        "membership did not merge:\n{}",
        lab.logs()
    );
    let exact = wait_until(Duration::from_secs(60), || lab.total_sleepers() == 2);
    assert!(
        exact.is_some(),
        "{} instances after healing\n{}",
        lab.total_sleepers(),
        lab.logs()
    );
    // And it stays so.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lab.total_sleepers(), 2);
    eprintln!("merged after {merged:?}; exactly 2 instances {exact:?} later");
}

#[test]
fn a_node_that_cannot_enforce_limits_says_so_and_refuses_services() {
    if !docker_runs() {
        return;
    }
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let lab = lab_with(1, "strict", true);
    let status = lab.cli(1, &["status"]).unwrap();
    let limits = status["limits"].as_str().unwrap_or("");
    if !limits.starts_with("none") {
        eprintln!("skipping: this container runtime gives writable cgroups ({limits})");
        return;
    }
    assert!(
        status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("cannot all be enforced")),
        "{status}"
    );
    let description = "name = \"sleeper\"\nnamespace = \"test\"\n[run]\ncommand = \"/bin/sleep\"\nargs = [\"100000\"]\n";
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), description).unwrap();
    docker_ok(&[
        "cp",
        file.path().to_str().unwrap(),
        &format!("{}:/tmp/sleeper.toml", lab.name(1)),
    ]);
    let refused = lab
        .cli(1, &["deploy", "/tmp/sleeper.toml", "--wait", "20s"])
        .unwrap_err();
    assert!(refused.contains("cannot enforce limits"), "{refused}");
    assert_eq!(lab.sleepers(1), 0);
}
