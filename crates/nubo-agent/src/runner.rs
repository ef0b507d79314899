//! The runner: the task that runs this node's share of the suite.
//!
//! The actor computes which services this node should run (placement, from the suite and the
//! roster) and hands the set over a watch channel; the runner makes it so. It starts what is
//! missing, within the owner's limits (what exceeds them is refused, and the refusal is
//! announced so placement picks another node), stops what is no longer wanted, supervises
//! each instance ([`nubo_fabric::policy::Supervisor`]), probes its health, caps its log, and
//! reports every instance's state back. Instances are recorded in `instances.json`, so that
//! after an agent crash the next agent adopts those still running instead of starting them
//! twice, and cleans up the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nubo_fabric::exec::{self, Launch, Limits};
use nubo_fabric::health;
use nubo_fabric::policy::{Action, Phase, Policy, Supervisor};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::description::{Probe, Service};

/// How often the runner looks at its instances.
const TICK: Duration = Duration::from_millis(200);
/// Largest log file of an instance before it is rotated.
const LOG_BYTES_MAX: u64 = 1 << 20;
/// Bytes of each instance's log shown by `nubo logs`.
pub const LOG_TAIL_BYTES: u64 = 4096;
/// How often logs are capped and their ends read for `nubo logs`.
const LOG_INTERVAL: Duration = Duration::from_secs(2);
/// Between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What the node's owner lends to the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Bytes of memory.
    pub memory_bytes: u64,
    /// Instances at once.
    pub instances_max: usize,
    /// Ports given to instances.
    pub ports: std::ops::RangeInclusive<u16>,
}

/// One service this node should run.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// `namespace/name`.
    pub key: String,
    /// The document's version.
    pub version: u64,
    /// The service.
    pub service: Service,
}

/// An instance as reported by `nubo ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// `namespace/name`.
    pub service: String,
    /// The node running it.
    pub node: String,
    /// starting, running, restarting, stopping, stopped, failed.
    pub state: String,
    /// healthy, unhealthy, or unknown (no check yet or none configured).
    pub health: String,
    /// Named ports and their numbers.
    pub ports: BTreeMap<String, u16>,
    /// The node's address (where the ports are).
    pub host: String,
    /// Restarts so far.
    pub restarts: u32,
    /// The process id on its node.
    pub pid: Option<u32>,
    /// How limits are enforced.
    pub limits: String,
    /// The version of the description it runs.
    pub version: u64,
    /// The end of its log.
    pub log_tail: String,
}

/// What the runner reports to the actor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunnerReport {
    /// Every instance on this node.
    pub instances: Vec<InstanceStatus>,
    /// Services this node will not run (over its limits, or failing here).
    pub refused: BTreeSet<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    key: String,
    version: u64,
    pid: u32,
    start_ticks: u64,
    ports: BTreeMap<String, u16>,
}

struct Instance {
    assignment: Assignment,
    supervisor: Supervisor,
    pid: Option<u32>,
    start_ticks: u64,
    exit: Option<oneshot::Receiver<i32>>,
    ports: BTreeMap<String, u16>,
    dir: PathBuf,
    enforcement: &'static str,
    next_probe: Instant,
    probing: bool,
    /// The end of its log, refreshed with the log housekeeping.
    log_tail: String,
}

/// The runner's fixed facts.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This node's short id.
    pub node: String,
    /// Where instances are reached.
    pub host: String,
    /// `DATA_DIR/instances`.
    pub root: PathBuf,
    /// The `nubo` executable (for the wrapper).
    pub wrapper: PathBuf,
    /// The owner's limits.
    pub limits: NodeLimits,
}

/// The runner task's state.
pub struct Runner {
    config: RunnerConfig,
    instances: BTreeMap<String, Instance>,
    refused: BTreeSet<String>,
    adopted: BTreeMap<String, Record>,
    origin: Instant,
    /// Health answers (service key, healthy) from the probe tasks.
    probe_tx: mpsc::Sender<(String, bool)>,
    probe_rx: mpsc::Receiver<(String, bool)>,
    next_log_cap: Instant,
}

fn policy_of(service: &Service) -> Policy {
    Policy {
        attempts: service.restart.attempts,
        delay: service.restart.delay,
        max_delay: service.restart.max_delay,
        grace: STOP_GRACE,
        stable_after: Duration::from_secs(60),
    }
}

fn instance_id(node: &str, key: &str) -> String {
    format!("{}-{node}", key.replace('/', "."))
}

/// `${NAME}` in `text` replaced by the value of NAME in `env`.
fn substitute(text: &str, env: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (name, value) in env {
        out = out.replace(&format!("${{{name}}}"), value);
    }
    out
}

impl Runner {
    /// A runner; instances recorded by a previous agent are adopted if still running.
    pub fn new(config: RunnerConfig) -> Runner {
        let _ = std::fs::create_dir_all(&config.root);
        let records: Vec<Record> = std::fs::read(config.root.join("instances.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut adopted = BTreeMap::new();
        for record in records {
            if exec::is_same_process(record.pid, record.start_ticks) {
                tracing::info!(service = %record.key, pid = record.pid, "found a running instance of the previous agent");
                adopted.insert(record.key.clone(), record);
            } else {
                exec::remove_cgroup(&instance_id(&config.node, &record.key));
            }
        }
        let (probe_tx, probe_rx) = mpsc::channel(256);
        Runner {
            config,
            instances: BTreeMap::new(),
            refused: BTreeSet::new(),
            adopted,
            origin: Instant::now(),
            probe_tx,
            probe_rx,
            next_log_cap: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs until `desired` closes, then stops every instance.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Vec<Assignment>>>,
        report: watch::Sender<RunnerReport>,
    ) {
        let mut ticker = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let wanted = desired.borrow_and_update().clone();
                    if let Some(wanted) = wanted {
                        self.reconcile(wanted);
                    }
                }
                Some((key, ok)) = self.probe_rx.recv() => {
                    let now = self.now();
                    if let Some(instance) = self.instances.get_mut(&key) {
                        instance.probing = false;
                        let actions = instance.supervisor.health(now, ok);
                        self.perform(&key, actions);
                    }
                }
                _ = ticker.tick() => self.tick(),
            }
            let _ = report.send_if_modified(|r| {
                let fresh = self.report();
                let changed = *r != fresh;
                *r = fresh;
                changed
            });
        }
        let now = self.now();
        let keys: Vec<String> = self.instances.keys().cloned().collect();
        for key in keys {
            if let Some(instance) = self.instances.get_mut(&key) {
                let actions = instance.supervisor.stop(now);
                self.perform(&key, actions);
            }
        }
    }

    /// Makes the running set match `wanted`.
    fn reconcile(&mut self, wanted: Vec<Assignment>) {
        let now = self.now();
        let wanted: BTreeMap<String, Assignment> =
            wanted.into_iter().map(|a| (a.key.clone(), a)).collect();
        // Stop what is no longer wanted here, or wanted at another version.
        let stale: Vec<String> = self
            .instances
            .iter()
            .filter(|(key, i)| {
                wanted
                    .get(*key)
                    .is_none_or(|a| a.version != i.assignment.version)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(instance) = self.instances.get_mut(&key) {
                let actions = instance.supervisor.stop(now);
                self.perform(&key, actions);
            }
        }
        // Adopted processes that are no longer wanted are stopped.
        let orphans: Vec<Record> = self
            .adopted
            .values()
            .filter(|r| wanted.get(&r.key).is_none_or(|a| a.version != r.version))
            .cloned()
            .collect();
        for record in orphans {
            tracing::info!(service = %record.key, pid = record.pid, "stopping an instance of the previous agent that is no longer wanted here");
            exec::signal_group(record.pid, Signal::SIGTERM);
            self.adopted.remove(&record.key);
        }
        self.refused.retain(|key| wanted.contains_key(key));
        // Start what is missing, within the owner's limits.
        let (mut cpu, mut memory) = self.committed();
        for (key, assignment) in wanted {
            if self.instances.contains_key(&key) || self.refused.contains(&key) {
                continue;
            }
            let demand = assignment.service.placement.demand;
            let count = self.instances.len();
            if cpu + demand.cpu_millis > self.config.limits.cpu_millis
                || memory + demand.memory_bytes > self.config.limits.memory_bytes
                || count >= self.config.limits.instances_max
            {
                tracing::info!(service = %key, "refusing: it would exceed this node's limits");
                self.refused.insert(key);
                continue;
            }
            cpu += demand.cpu_millis;
            memory += demand.memory_bytes;
            self.begin(assignment);
        }
        self.save();
    }

    fn committed(&self) -> (u64, u64) {
        self.instances
            .values()
            .filter(|i| !matches!(i.supervisor.phase(), Phase::Stopped | Phase::Failed))
            .fold((0, 0), |(c, m), i| {
                let d = i.assignment.service.placement.demand;
                (c + d.cpu_millis, m + d.memory_bytes)
            })
    }

    fn begin(&mut self, assignment: Assignment) {
        let key = assignment.key.clone();
        let now = self.now();
        let dir = self.config.root.join(instance_id(&self.config.node, &key));
        let policy = policy_of(&assignment.service);
        if let Some(record) = self.adopted.remove(&key) {
            tracing::info!(service = %key, pid = record.pid, "adopted a running instance");
            self.instances.insert(
                key,
                Instance {
                    assignment,
                    supervisor: Supervisor::adopt(policy, now),
                    pid: Some(record.pid),
                    start_ticks: record.start_ticks,
                    exit: None,
                    ports: record.ports,
                    dir,
                    enforcement: "adopted",
                    next_probe: Instant::now(),
                    probing: false,
                    log_tail: String::new(),
                },
            );
            return;
        }
        // Each node starts its search elsewhere, so agents sharing a machine rarely race for
        // one port.
        let hint = nubo_proto::service::score(
            &format!("{key}@{}", self.config.node),
            nubo_proto::NodeId(0),
        );
        let mut ports = BTreeMap::new();
        for (i, (name, wanted)) in assignment.service.ports.iter().enumerate() {
            let port = if *wanted != 0 {
                *wanted
            } else {
                exec::free_port(self.config.limits.ports.clone(), hint + i as u64 * 7919)
                    .unwrap_or(0)
            };
            ports.insert(name.clone(), port);
        }
        let (supervisor, actions) = Supervisor::start(policy);
        self.instances.insert(
            key.clone(),
            Instance {
                assignment,
                supervisor,
                pid: None,
                start_ticks: 0,
                exit: None,
                ports,
                dir,
                enforcement: "",
                next_probe: Instant::now(),
                probing: false,
                log_tail: String::new(),
            },
        );
        self.perform(&key, actions);
    }

    fn environment(&self, instance: &Instance) -> Vec<(String, String)> {
        let service = &instance.assignment.service;
        let mut env: Vec<(String, String)> = vec![
            ("NUBO_SERVICE".into(), service.name.clone()),
            ("NUBO_NAMESPACE".into(), service.namespace.clone()),
            (
                "NUBO_INSTANCE".into(),
                instance_id(&self.config.node, &instance.assignment.key),
            ),
            ("NUBO_NODE".into(), self.config.node.clone()),
            ("NUBO_HOST".into(), self.config.host.clone()),
        ];
        for (name, port) in &instance.ports {
            env.push((
                format!("NUBO_PORT_{}", name.to_uppercase().replace('-', "_")),
                port.to_string(),
            ));
        }
        if let Some(port) = instance.ports.values().next() {
            env.push(("NUBO_PORT".into(), port.to_string()));
        }
        let base = env.clone();
        env.extend(
            service
                .run
                .env
                .iter()
                .map(|(k, v)| (k.clone(), substitute(v, &base))),
        );
        env
    }

    fn perform(&mut self, key: &str, actions: Vec<Action>) {
        for action in actions {
            let Some(instance) = self.instances.get(key) else {
                return;
            };
            match action {
                Action::Spawn => {
                    let env = self.environment(instance);
                    let service = &instance.assignment.service;
                    let launch = Launch {
                        id: instance_id(&self.config.node, key),
                        dir: instance.dir.clone(),
                        command: service.run.command.clone(),
                        args: service
                            .run
                            .args
                            .iter()
                            .map(|a| substitute(a, &env))
                            .collect(),
                        env,
                        limits: Limits {
                            memory_bytes: service.placement.demand.memory_bytes,
                            cpu_millis: service.placement.demand.cpu_millis,
                        },
                        wrapper: self.config.wrapper.clone(),
                        artifact: service.run.artifact.clone().map(|blob| {
                            (
                                blob,
                                self.config
                                    .root
                                    .parent()
                                    .map(Path::to_path_buf)
                                    .unwrap_or_default(),
                            )
                        }),
                    };
                    let now = self.now();
                    let result = exec::spawn(&launch);
                    let Some(instance) = self.instances.get_mut(key) else {
                        return;
                    };
                    match result {
                        Ok(started) => {
                            tracing::info!(service = %key, pid = started.pid, "started an instance");
                            instance.pid = Some(started.pid);
                            instance.start_ticks = started.start_ticks;
                            instance.exit = Some(started.exit);
                            instance.enforcement = started.enforcement;
                            instance.next_probe = Instant::now() + Duration::from_millis(300);
                            instance.supervisor.spawned(now);
                        }
                        Err(error) => {
                            tracing::warn!(service = %key, %error, "cannot start an instance");
                            let more = instance.supervisor.spawn_failed(now);
                            self.perform(key, more);
                        }
                    }
                    self.save();
                }
                Action::Terminate => {
                    if let Some(pid) = instance.pid {
                        exec::signal_group(pid, Signal::SIGTERM);
                    }
                }
                Action::Kill => {
                    if let Some(pid) = instance.pid {
                        exec::signal_group(pid, Signal::SIGKILL);
                    }
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        let keys: Vec<String> = self.instances.keys().cloned().collect();
        for key in keys {
            let Some(instance) = self.instances.get_mut(&key) else {
                continue;
            };
            // Exits: from our own children's reapers, or (adopted) by the pid going away.
            let mut status = None;
            if let Some(exit) = instance.exit.as_mut() {
                match exit.try_recv() {
                    Ok(code) => status = Some(code),
                    Err(oneshot::error::TryRecvError::Closed) => status = Some(-1),
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
            } else if let Some(pid) = instance.pid
                && !exec::is_same_process(pid, instance.start_ticks)
            {
                status = Some(-1);
            }
            let mut actions = Vec::new();
            if let Some(code) = status {
                tracing::info!(service = %key, code, "an instance exited");
                instance.exit = None;
                instance.pid = None;
                actions.extend(instance.supervisor.exited(now, code));
            }
            actions.extend(instance.supervisor.tick(now));
            // Health probes.
            if instance.supervisor.phase() == Phase::Running
                && !instance.probing
                && Instant::now() >= instance.next_probe
                && let Some(check) = instance.assignment.service.health.clone()
            {
                instance.probing = true;
                instance.next_probe = Instant::now() + check.interval;
                let ports = instance.ports.clone();
                let dir = instance.dir.clone();
                let sender = self.probe_tx.clone();
                let probe_key = key.clone();
                tokio::spawn(async move {
                    let ok = match &check.probe {
                        Probe::Http { port, path } => {
                            health::http(ports.get(port).copied().unwrap_or(0), path, check.timeout)
                                .await
                        }
                        Probe::Tcp { port } => {
                            health::tcp(ports.get(port).copied().unwrap_or(0), check.timeout).await
                        }
                        Probe::Command { argv } => health::command(argv, &dir, check.timeout).await,
                    };
                    let _ = sender.send((probe_key, ok)).await;
                });
            }
            self.perform(&key, actions);
            let Some(instance) = self.instances.get(&key) else {
                continue;
            };
            match instance.supervisor.phase() {
                Phase::Stopped => {
                    exec::remove_cgroup(&instance_id(&self.config.node, &key));
                    self.instances.remove(&key);
                    self.save();
                }
                // It keeps failing here: let another node try.
                Phase::Failed if self.refused.insert(key.clone()) => {
                    tracing::warn!(service = %key, "an instance failed too often; refusing the service here");
                }
                _ => {}
            }
        }
        if Instant::now() >= self.next_log_cap {
            self.next_log_cap = Instant::now() + LOG_INTERVAL;
            for instance in self.instances.values_mut() {
                let _ = exec::cap_log(&exec::log_path(&instance.dir), LOG_BYTES_MAX);
                instance.log_tail = exec::log_tail(&instance.dir, LOG_TAIL_BYTES);
            }
        }
    }

    fn report(&self) -> RunnerReport {
        RunnerReport {
            instances: self
                .instances
                .iter()
                .map(|(key, i)| InstanceStatus {
                    service: key.clone(),
                    node: self.config.node.clone(),
                    state: i.supervisor.phase().name().to_string(),
                    health: match (i.supervisor.healthy(), &i.assignment.service.health) {
                        (_, None) => "none".into(),
                        (Some(true), _) => "healthy".into(),
                        (Some(false), _) => "unhealthy".into(),
                        (None, _) => "unknown".into(),
                    },
                    ports: i.ports.clone(),
                    host: self.config.host.clone(),
                    restarts: i.supervisor.restarts(),
                    pid: i.pid,
                    limits: i.enforcement.to_string(),
                    version: i.assignment.version,
                    log_tail: i.log_tail.clone(),
                })
                .collect(),
            refused: self.refused.clone(),
        }
    }

    /// Records running instances for the next agent to adopt.
    fn save(&self) {
        let records: Vec<Record> = self
            .instances
            .iter()
            .filter_map(|(key, i)| {
                i.pid.map(|pid| Record {
                    key: key.clone(),
                    version: i.assignment.version,
                    pid,
                    start_ticks: i.start_ticks,
                    ports: i.ports.clone(),
                })
            })
            .chain(self.adopted.values().cloned())
            .collect();
        let path = self.config.root.join("instances.json");
        let temporary = self.config.root.join(".instances.json.tmp");
        if let Ok(bytes) = serde_json::to_vec(&records)
            && std::fs::write(&temporary, bytes).is_ok()
        {
            let _ = std::fs::rename(&temporary, &path);
        }
    }
}
