//! `nubo demo`: a local cloud of several real agents on loopback, in a temporary directory.
//!
//! The first agent creates the cloud; the others join it with a token from its API. The demo
//! waits until every agent sees every other alive, prints what to try, and on Ctrl-C stops
//! the agents (SIGTERM, then SIGKILL after a grace period) and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use nubo_agent::model::{Invite, Status};
use nubo_agent::setup;

use crate::client::{Client, Target};

/// Options of `nubo demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// How many agents to start.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=200))]
    nodes: u16,
    /// Keep the directory (with every agent's log) after stopping.
    #[arg(long)]
    keep: bool,
    /// How long to wait for the cloud to converge, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

struct Agents {
    children: Vec<Child>,
    dirs: Vec<PathBuf>,
    dir: Option<tempfile::TempDir>,
    keep: bool,
}

/// Process groups of the instances the agent of `dir` recorded (what an agent killed with
/// `kill -9` leaves running).
fn recorded_instances(dir: &Path) -> Vec<i32> {
    let Ok(bytes) = std::fs::read(dir.join("instances").join("instances.json")) else {
        return Vec::new();
    };
    serde_json::from_slice::<Vec<serde_json::Value>>(&bytes)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["pid"].as_i64())
        .filter_map(|pid| i32::try_from(pid).ok())
        .filter(|pid| *pid > 1)
        .collect()
}

impl Drop for Agents {
    fn drop(&mut self) {
        // Read before the agents stop: a graceful agent empties its record.
        let instances: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|d| recorded_instances(d))
            .collect();
        for child in &self.children {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever instances outlived their agent (one killed with -9, say) go too.
        for pid in instances {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(dir) = self.dir.take()
            && self.keep
        {
            let kept = dir.keep();
            eprintln!("Kept {}", kept.display());
        }
    }
}

fn spawn_agent(dir: &Path, join: Option<&str>) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .recursive(true)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = std::fs::File::create(dir.join("agent.log"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut command = std::process::Command::new(exe);
    command
        .arg("agent")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--exit-with-parent",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(token) = join {
        // By environment rather than argument: process lists show arguments to everyone.
        command.env("NUBO_JOIN", token);
    }
    command
        .spawn()
        .map_err(|e| format!("cannot start an agent: {e}"))
}

fn client_of(dir: &Path) -> Result<Client, String> {
    Client::connect(&Target {
        data_dir: dir,
        api: None,
        token: None,
    })
}

/// Waits until the agent in `dir` answers, returning its client.
fn wait_for_api(dir: &Path, child: &mut Child, deadline: Instant) -> Result<Client, String> {
    loop {
        if let Ok(client) = client_of(dir)
            && client.json::<Status>("GET", "/v1/status", None).is_ok()
        {
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the agent in {} exited ({status}); see {}",
                dir.display(),
                dir.join("agent.log").display()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the agent in {} did not start in time",
                dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sample suite: a static web site, three replicas, each page naming its node.
const SAMPLE_SITE: &str = r#"name = "site"
namespace = "web"

[run]
command = "sh"
args = ["-c", "echo \"<h1>nubo demo: served by node $NUBO_NODE</h1>\" > index.html && exec python3 -m http.server $NUBO_PORT_HTTP --bind 127.0.0.1"]

[resources]
cpu = 0.1
memory = "128MiB"

[placement]
replicas = 3

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "1s"
"#;

/// Deploys the sample site and prints where each replica answers. Skipped (with a word)
/// where python3 is missing.
fn deploy_sample(
    root: &Path,
    admin_dir: &Path,
    nodes: usize,
    deadline: Instant,
) -> Result<(), String> {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !python {
        eprintln!("(python3 is not installed: skipping the sample web site)");
        return Ok(());
    }
    let file = root.join("site.toml");
    std::fs::write(&file, SAMPLE_SITE).map_err(|e| format!("{}: {e}", file.display()))?;
    let target = crate::AgentTarget {
        data_dir: admin_dir.to_path_buf(),
        api: None,
        token: None,
        json: false,
    };
    let signing = crate::services::Signing::with_key(root.join(setup::ADMIN_KEY_FILE));
    eprintln!("Deploying the sample suite ({})…", file.display());
    crate::services::deploy_quietly(&file, &signing, &target)?;
    let wanted = nodes.min(3);
    let client = client_of(admin_dir)?;
    let instances = loop {
        let list: Vec<nubo_agent::runner::InstanceStatus> =
            client.json("GET", "/v1/ps", None).unwrap_or_default();
        let healthy: Vec<_> = list.into_iter().filter(|i| i.health == "healthy").collect();
        if healthy.len() >= wanted {
            break healthy;
        }
        if Instant::now() > deadline + Duration::from_secs(30) {
            return Err(
                "the sample site did not become healthy; see `nubo ps` and the agent logs".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    outln!();
    outln!("The sample site web/site runs {wanted} replicas:");
    crate::table::print(
        &["SERVICE", "NODE", "URL"],
        &instances
            .iter()
            .map(|i| {
                vec![
                    i.service.clone(),
                    i.node.clone(),
                    format!(
                        "http://{}:{}/",
                        i.host,
                        i.ports.get("http").copied().unwrap_or(0)
                    ),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// Runs the demo until Ctrl-C.
pub fn run(args: DemoArgs) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("nubo-demo-")
        .tempdir()
        .map_err(|e| format!("cannot make a temporary directory: {e}"))?;
    let root = dir.path().to_path_buf();
    let mut agents = Agents {
        children: Vec::new(),
        dirs: Vec::new(),
        dir: Some(dir),
        keep: args.keep,
    };
    let n = usize::from(args.nodes);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let dirs: Vec<PathBuf> = (1..=n).map(|i| root.join(format!("node{i}"))).collect();
    agents.dirs = dirs.clone();

    let admin_key = root.join(setup::ADMIN_KEY_FILE);
    let report = setup::init(&dirs[0], &admin_key).map_err(|e| e.to_string())?;
    eprintln!("Created cloud {} in {}", report.cloud_id, root.display());
    agents.children.push(spawn_agent(&dirs[0], None)?);
    let first = wait_for_api(&dirs[0], &mut agents.children[0], deadline)?;
    let invite: Invite = first.json("POST", "/v1/invite?ttl_secs=3600", None)?;
    for dir in &dirs[1..] {
        agents.children.push(spawn_agent(dir, Some(&invite.token))?);
    }
    let mut clients = vec![first];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        clients.push(wait_for_api(dir, &mut agents.children[i], deadline)?);
    }
    eprintln!("Started {n} agents; waiting until each sees all {n} alive…");
    let mut shown = usize::MAX;
    let statuses = loop {
        let statuses: Vec<Option<Status>> = clients
            .iter()
            .map(|c| c.json::<Status>("GET", "/v1/status", None).ok())
            .collect();
        let converged = statuses
            .iter()
            .filter(|s| s.as_ref().is_some_and(|s| s.members_alive == n))
            .count();
        if converged != shown {
            shown = converged;
            eprint!("\r  {converged}/{n} agents see the whole cloud");
        }
        if converged == n {
            eprintln!();
            break statuses.into_iter().flatten().collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            eprintln!();
            return Err(format!(
                "the cloud did not converge within {} s; agent logs are in {}/node*/agent.log (use --keep to look at them)",
                args.timeout_secs,
                root.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    outln!();
    outln!("nubo demo: a cloud of {n} agents on loopback");
    outln!();
    crate::table::print(
        &["NODE", "ID", "PID", "LISTEN", "DATA DIR"],
        &statuses
            .iter()
            .zip(&dirs)
            .zip(&agents.children)
            .enumerate()
            .map(|(i, ((s, d), child))| {
                vec![
                    format!("node{}", i + 1),
                    s.node_id[..8].to_string(),
                    child.id().to_string(),
                    s.listen.clone(),
                    d.display().to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "nubo".into());
    deploy_sample(&root, &dirs[0], n, deadline)?;
    outln!();
    outln!("Try, in another terminal:");
    outln!("  export NUBO_DATA_DIR={}", dirs[0].display());
    outln!(
        "  export NUBO_KEY={}   # the administrator's key, kept off the nodes",
        admin_key.display()
    );
    outln!("  {exe} nodes                      # every member, alive or not");
    outln!("  {exe} kv put greeting hello      # replicated on 3 nodes");
    outln!(
        "  {exe} kv get greeting --data-dir {}",
        dirs[n - 1].display()
    );
    outln!("  {exe} stats                      # the cloud's size and resources");
    outln!("  {exe} ps                         # the sample site's instances");
    outln!("  {exe} logs web/site --follow     # their output, from every node");
    outln!("  {exe} events --follow            # what happens, as it happens");
    outln!(
        "  sed -i 's/^cpu = 0.1/cpu = 0.2/' {0} && {exe} deploy {0}   # a rolling update",
        root.join("site.toml").display()
    );
    outln!("  {exe} history web/site           # its versions; `rollback` goes back");
    outln!(
        "  {exe} drain --data-dir {}   # move a node's instances away",
        dirs[n - 1].display()
    );
    outln!("  kill -9 <PID of an agent above>, then `{exe} ps` again");
    outln!();
    outln!(
        "Agent logs: {}/node*/agent.log. Press Ctrl-C to stop.",
        root.display()
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut terminate), Ok(mut hangup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
    });
    eprintln!("\nStopping the agents…");
    drop(agents);
    Ok(())
}
