//! A harness for tests of real agent processes on loopback: start a cloud, call the CLI,
//! wait for conditions, kill and restart agents.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// Agent tests share two cores: run one cloud at a time.
pub static ONE_CLOUD_AT_A_TIME: Mutex<()> = Mutex::new(());

pub const NUBO: &str = env!("CARGO_BIN_EXE_nubo");

/// One agent process and its data directory.
pub struct Agent {
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// The arguments it was started with, and where it listened: a restart listens there
    /// again, as an agent on its usual port does, so that peers that restart with it find it.
    extra: Vec<String>,
    listen: Option<String>,
}

impl Agent {
    /// Starts an agent on `dir`, joining with `token` if given.
    pub fn start(dir: &Path, token: Option<&str>) -> Agent {
        Agent::start_with(dir, token, &[])
    }

    /// Starts an agent with extra arguments.
    pub fn start_with(dir: &Path, token: Option<&str>, extra: &[&str]) -> Agent {
        Agent::launch(dir, token, extra, "127.0.0.1:0")
    }

    fn launch(dir: &Path, token: Option<&str>, extra: &[&str], listen: &str) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut command = Command::new(NUBO);
        command
            .args(["agent", "--listen", listen, "--api", "127.0.0.1:0"])
            .arg("--exit-with-parent")
            // Where this machine has no writable cgroup the tests run anyway; the test of that
            // refusal starts its agents without it.
            .arg("--allow-unenforced-limits")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("NUBO_LOG", "info")
            .env_remove("NUBO_JOIN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(token) = token {
            command.env("NUBO_JOIN", token);
        }
        let mut agent = Agent {
            dir: dir.to_path_buf(),
            child: Some(command.spawn().expect("start an agent")),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            listen: None,
        };
        // A previous run's address file must not be mistaken for this run's.
        agent.wait_for_api();
        agent.listen = agent
            .try_json::<Value>(&["status"])
            .ok()
            .and_then(|s| s["listen"].as_str().map(str::to_string));
        agent
    }

    fn wait_for_api(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.try_json::<Value>(&["status"]).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "agent in {} exited: {status}\n{}",
                    self.dir.display(),
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `nubo ARGS --data-dir DIR --json` and parses its output.
    pub fn try_json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T, String> {
        json_at(&self.dir, args)
    }

    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        self.try_json(args)
            .unwrap_or_else(|e| panic!("nubo {args:?} on {}: {e}", self.dir.display()))
    }

    pub fn status(&self) -> Value {
        self.json(&["status"])
    }

    pub fn members_alive(&self) -> u64 {
        self.try_json::<Value>(&["status"])
            .ok()
            .and_then(|s| s["members_alive"].as_u64())
            .unwrap_or(0)
    }

    /// States of the members this agent knows, by id.
    pub fn member_states(&self) -> Vec<(String, String)> {
        let nodes: Vec<Value> = self.try_json(&["nodes"]).unwrap_or_default();
        nodes
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or("").to_string(),
                    n["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    pub fn node_id(&self) -> String {
        self.status()["node_id"].as_str().unwrap().to_string()
    }

    pub fn holds(&self, key: &str) -> bool {
        self.try_json::<Value>(&["kv", "local", key])
            .is_ok_and(|v| v["held"].as_bool() == Some(true))
    }

    pub fn put(&self, key: &str, value: &str) -> Result<Value, String> {
        self.try_json(&["kv", "put", key, value])
    }

    pub fn get(&self, key: &str) -> Result<String, String> {
        self.try_json::<Value>(&["kv", "get", key])
            .map(|v| v["value"].as_str().unwrap_or("").to_string())
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Process ids of the service instances this agent recorded.
    pub fn instance_pids(&self) -> Vec<i32> {
        self.instance_records()
            .iter()
            .filter_map(|r| r["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }

    /// Process ids this agent recorded for instances of `service`.
    pub fn instance_pids_of(&self, service: &str) -> Vec<i32> {
        self.instance_records()
            .iter()
            .filter(|r| r["key"] == service)
            .filter_map(|r| r["pid"].as_i64())
            .map(|p| p as i32)
            .collect()
    }

    fn instance_records(&self) -> Vec<Value> {
        std::fs::read(self.dir.join("instances/instances.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// The machine dies: `kill -9` of the agent and of every instance it started.
    pub fn kill_host(&mut self) {
        let pids = self.instance_pids();
        self.kill();
        for pid in pids {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Stops the agent gracefully (it stops its instances), or kills it after 5 s.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill_host();
    }

    /// Restarts on the same data directory, with no token.
    /// Instances the agent started keep running, as they would after a real agent crash.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("api.addr"));
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let listen = self.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let fresh = Agent::launch(&self.dir.clone(), None, &extra, &listen);
        // The old value's drop would stop the host's instances: the agent is already gone
        // and the instances must survive it.
        std::mem::forget(std::mem::replace(self, fresh));
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // An agent a test killed did not stop its instances (a restarted one would adopt
        // them): kill what is still running of them, so that no test leaves processes
        // behind. Only processes whose command line names this agent's directory: a
        // recorded pid may have been reused since.
        let dir = self.dir.to_string_lossy().into_owned();
        for pid in self.instance_pids() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A cloud of agents in a temporary directory.
pub struct Cloud {
    // Fields drop in order: the agents (and their instances) go before their directory,
    // which they read to find their instances.
    pub agents: Vec<Agent>,
    pub root: tempfile::TempDir,
}

impl Cloud {
    /// Creates a cloud and starts `n` agents in it.
    pub fn start(n: usize) -> Cloud {
        Cloud::start_with(n, |_| Vec::new())
    }

    /// Creates a cloud of `n` agents, agent `i` (from 1) started with `extra(i)` arguments.
    pub fn start_with(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cloud {
        Cloud::start_prepared(n, extra, |_| {})
    }

    /// Like [`Cloud::start_with`], calling `prepare` on each agent's data directory (created
    /// empty) before the agent first uses it.
    pub fn start_prepared(
        n: usize,
        extra: impl Fn(usize) -> Vec<String>,
        prepare: impl Fn(&Path),
    ) -> Cloud {
        let root = tempfile::Builder::new()
            .prefix("nubo-test-")
            .tempdir()
            .unwrap();
        for i in 1..=n {
            let dir = root.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            prepare(&dir);
        }
        let first_dir = root.path().join("node1");
        let init = Command::new(NUBO)
            .args(["init", "--json", "--data-dir"])
            .arg(&first_dir)
            .arg("--admin-key")
            .arg(root.path().join("admin.key"))
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
        let first_args = extra(1);
        let first: Vec<&str> = first_args.iter().map(String::as_str).collect();
        let mut agents = vec![Agent::start_with(&first_dir, None, &first)];
        let token = agents[0].invite();
        for i in 2..=n {
            let more = extra(i);
            let more: Vec<&str> = more.iter().map(String::as_str).collect();
            agents.push(Agent::start_with(
                &root.path().join(format!("node{i}")),
                Some(&token),
                &more,
            ));
        }
        Cloud { root, agents }
    }

    /// A cloud of `n` agents, agent `i` (from 1) started with `extra(i)` arguments, once every
    /// agent sees all `n` alive.
    pub fn converged(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cloud {
        let cloud = Cloud::start_with(n, extra);
        assert!(
            wait_until(Duration::from_secs(60), || {
                cloud.agents.iter().all(|a| a.members_alive() == n as u64)
            })
            .is_some(),
            "{}",
            cloud.logs()
        );
        cloud
    }

    /// Dumps every agent's log (for a failing test).
    pub fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- {}\n{}", a.dir.display(), a.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Agent {
    pub fn invite(&self) -> String {
        let invite: Value = self.json(&["invite"]);
        invite["token"].as_str().unwrap().to_string()
    }
}

/// `nubo ARGS --data-dir DIR` for `agent`, returning (success, stdout, stderr).
pub fn nubo(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let output = cli_at(&agent.dir)
        .args(args)
        .arg("--data-dir")
        .arg(&agent.dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes `text` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `nubo ARGS --data-dir DIR --json` for the agent of `dir` and parses its output.
pub fn json_at<T: DeserializeOwned>(dir: &Path, args: &[&str]) -> Result<T, String> {
    let output = cli_at(dir)
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .arg("--json")
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
}

/// The CLI for the agent of `dir`, signing with its cloud's administrator key (kept beside the
/// agents' directories, where `Cloud` created it).
pub fn cli_at(dir: &Path) -> Command {
    let mut command = Command::new(NUBO);
    command.env_remove("NUBO_API").env_remove("NUBO_TOKEN");
    match dir.parent().map(|root| root.join("admin.key")) {
        Some(key) if key.exists() => command.env("NUBO_KEY", key),
        _ => command.env_remove("NUBO_KEY"),
    };
    command
}

/// Sends `body` to the agent of `dir` (its address and token from its files); returns the
/// HTTP status and the answer.
pub fn api_at(dir: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let addr = std::fs::read_to_string(dir.join("api.addr")).unwrap();
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let request = ureq::request(method, &format!("http://{}{path}", addr.trim()))
        .set("Authorization", &format!("Bearer {}", token.trim()));
    let result = match body {
        Some(bytes) => request.send_bytes(bytes),
        None => request.call(),
    };
    match result {
        Ok(response) => (
            response.status(),
            response.into_string().unwrap_or_default(),
        ),
        Err(ureq::Error::Status(code, response)) => {
            (code, response.into_string().unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

/// Polls `condition` every 200 ms until it holds; returns how long that took, or `None` at
/// the deadline.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if condition() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
