//! The runner: the task that runs this node's share of the suite.
//!
//! The actor decides, service by service, what this node must do ([`Task`]: run a version,
//! keep what runs, or nothing) and hands the set over a watch channel; the runner makes it so,
//! again after every tick, since replacing an instance takes several steps. Each version of a
//! service runs as its own instance, in its own directory with its own artifact (unpacked from
//! a per-node cache, so each blob is fetched once). To run a new version the runner starts its
//! instance and stops the old one once the new one is healthy (surge), or stops the old one
//! first; an old version whose instances would run the same way (same fingerprint) is simply
//! relabelled, and nothing restarts.
//!
//! It supervises each instance ([`Supervisor`]), probes its health after a grace period, caps
//! its log, and reports every instance as an [`InstanceFact`] (starting, healthy, ready once
//! healthy for the update's `min_healthy_time`, failed when not healthy within its
//! `healthy_deadline`), which the actor announces to the cloud. What exceeds the owner's
//! limits is refused, and the refusal is announced so placement picks another node.
//! Instances are recorded in `instances.json`, so that after an agent crash the next agent
//! adopts those still running instead of starting them twice, and cleans up the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nubo_fabric::cgroup::{Cgroups, GroupLimits};
use nubo_fabric::docker;
use nubo_fabric::exec::{self, Launch, Limits};
use nubo_fabric::policy::{Action, Phase, Policy, Supervisor};
use nubo_fabric::uids::UidPool;
use nubo_fabric::{artifact, health};
use nubo_proto::blob::BlobId;
use nubo_proto::instance::{InstanceFact, InstanceState};
use nubo_proto::rollout::Task;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::actor::Command;
use crate::description::{DISK_DEFAULT, Driver, Probe, Service};
use crate::logs::{LogFile, add_checkpoint};

/// How often the runner looks at its instances.
const TICK: Duration = Duration::from_millis(200);
/// Largest log file of an instance before it is rotated.
const LOG_BYTES_MAX: u64 = 1 << 20;
/// How often logs are capped.
const LOG_INTERVAL: Duration = Duration::from_secs(2);
/// Between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a refusal stands once this node is no longer asked to run the version: placement
/// takes the refusing node out, and without this it would be asked again at once (it lends
/// the same capacity on paper), and the service would move back and forth.
const REFUSAL_HOLD: Duration = Duration::from_secs(60);
/// The name of an instance's container (the docker driver): unique on the machine.
fn container_name(cgroup_id: &str) -> String {
    format!("nubo-{cgroup_id}")
}

/// `text` cut to at most `bytes`, at a character boundary.
fn truncated(text: &str, bytes: usize) -> String {
    let mut end = text.len().min(bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Where a health-check command's output goes, in the instance's directory.
const CHECK_LOG: &str = "check.log";
/// How often the runner measures each instance's directory against its disk budget.
const DISK_CHECK: Duration = Duration::from_secs(2);

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

/// What this node must do about one service.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// `namespace/name`.
    pub key: String,
    /// The task.
    pub task: Task,
    /// The description of every version the suite holds, by version: what an instance of any
    /// of them runs (to supervise an instance kept from an older version).
    pub versions: BTreeMap<u64, Arc<Service>>,
}

/// An instance as reported by `nubo ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// `namespace/name`.
    pub service: String,
    /// The node running it (short id).
    pub node: String,
    /// starting, healthy, ready, unhealthy, restarting, stopping or failed.
    pub state: String,
    /// healthy, unhealthy, or unknown (starting, or stopped).
    pub health: String,
    /// Named ports and their numbers.
    pub ports: BTreeMap<String, u16>,
    /// The node's address (where the ports are).
    pub host: String,
    /// Restarts so far.
    pub restarts: u32,
    /// The process id on its node (known on that node only).
    #[serde(default)]
    pub pid: Option<u32>,
    /// How limits are enforced (known on that node only).
    #[serde(default)]
    pub limits: String,
    /// The version of the description it runs.
    pub version: u64,
    /// What last happened to it that an operator should know (a limit it hit), if anything.
    #[serde(default)]
    pub note: String,
}

impl InstanceStatus {
    /// The status of an instance a node reports, at `host`.
    pub fn of_fact(fact: &InstanceFact, node: String, host: String) -> InstanceStatus {
        InstanceStatus {
            service: fact.service.clone(),
            node,
            state: fact.state.name().to_string(),
            health: match fact.state {
                state if state.is_healthy() => "healthy",
                InstanceState::Unhealthy => "unhealthy",
                _ => "unknown",
            }
            .to_string(),
            ports: fact.ports.iter().cloned().collect(),
            host,
            restarts: fact.restarts,
            pid: None,
            limits: String::new(),
            version: fact.version,
            note: fact.note.clone(),
        }
    }
}

/// What the runner did since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunnerCounters {
    /// Instances started (first starts and restarts).
    pub started: u64,
    /// Restarts after an exit or failed checks.
    pub restarts: u64,
    /// Health probes that passed.
    pub probes_ok: u64,
    /// Health probes that failed.
    pub probes_failed: u64,
    /// Services refused (over the owner's limits, or failing here).
    pub refusals: u64,
}

/// What the runner reports to the actor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunnerReport {
    /// Every instance on this node, in detail.
    pub instances: Vec<InstanceStatus>,
    /// Every instance on this node, as the cloud is told.
    pub facts: Vec<InstanceFact>,
    /// Versions of services this node will not run (over its limits, or failing here).
    pub refused: BTreeSet<(String, u64)>,
    /// Each instance's log file.
    pub logs: Vec<LogFile>,
    /// What the runner did since start.
    pub counters: RunnerCounters,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    key: String,
    version: u64,
    id: String,
    pid: u32,
    start_ticks: u64,
    ports: BTreeMap<String, u16>,
    #[serde(default)]
    uid: Option<u32>,
}

struct Instance {
    key: String,
    version: u64,
    service: Arc<Service>,
    id: String,
    dir: PathBuf,
    supervisor: Supervisor,
    pid: Option<u32>,
    start_ticks: u64,
    exit: Option<oneshot::Receiver<i32>>,
    ports: BTreeMap<String, u16>,
    /// Its own uid (when the agent is root).
    uid: Option<u32>,
    /// What it last hit (a limit), for operators.
    note: String,
    next_probe: Instant,
    probing: bool,
    created: Instant,
    healthy_since: Option<Instant>,
    ever_healthy: bool,
    failed: Option<String>,
    retiring: bool,
    prepared: bool,
    preparing: bool,
    /// When output reached the log: (Unix milliseconds, size).
    checkpoints: Vec<(u64, u64)>,
}

impl Instance {
    fn fact_state(&self) -> InstanceState {
        if self.failed.is_some() {
            return InstanceState::Failed;
        }
        match self.supervisor.phase() {
            Phase::Stopping | Phase::Stopped => InstanceState::Stopping,
            Phase::Backoff => InstanceState::Restarting,
            Phase::Failed => InstanceState::Failed,
            Phase::Starting => InstanceState::Starting,
            Phase::Running => match self.healthy_since {
                Some(since) if since.elapsed() >= self.service.update.min_healthy_time => {
                    InstanceState::Ready
                }
                Some(_) => InstanceState::Healthy,
                None if self.ever_healthy && self.supervisor.healthy() == Some(false) => {
                    InstanceState::Unhealthy
                }
                None => InstanceState::Starting,
            },
        }
    }

    fn is_healthy(&self) -> bool {
        self.healthy_since.is_some() && self.supervisor.phase() == Phase::Running
    }

    fn is_gone(&self) -> bool {
        matches!(self.supervisor.phase(), Phase::Stopped)
    }

    fn holds_resources(&self) -> bool {
        !matches!(self.supervisor.phase(), Phase::Stopped | Phase::Failed)
    }
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
    /// `DATA_DIR/artifacts`: blobs fetched once, by id.
    pub artifacts: PathBuf,
    /// The `nubo` executable (for the wrapper).
    pub wrapper: PathBuf,
    /// The owner's limits.
    pub limits: NodeLimits,
    /// The actor, to fetch artifacts through.
    pub commands: mpsc::Sender<Command>,
    /// The cgroups instances go in.
    pub cgroups: Cgroups,
    /// The uids instances run as (when the agent is root).
    pub uids: Option<UidPool>,
    /// Run services even though their limits cannot all be enforced here.
    pub allow_unenforced_limits: bool,
    /// The drivers this node offers.
    pub drivers: Vec<Driver>,
}

/// The runner task's state.
pub struct Runner {
    config: RunnerConfig,
    wanted: BTreeMap<String, Assignment>,
    instances: BTreeMap<String, Instance>,
    /// Refused versions, with when the refusal was made.
    refused: BTreeMap<String, (u64, Instant)>,
    adopted: BTreeMap<String, Record>,
    origin: Instant,
    /// Health answers (instance id, healthy) from the probe tasks.
    probe_tx: mpsc::Sender<(String, bool)>,
    probe_rx: mpsc::Receiver<(String, bool)>,
    /// Artifacts prepared (instance id, outcome) by the preparing tasks.
    prepared_tx: mpsc::Sender<(String, Result<(), String>)>,
    prepared_rx: mpsc::Receiver<(String, Result<(), String>)>,
    next_log_cap: Instant,
    next_disk_check: Instant,
    counters: RunnerCounters,
    /// What `instances.json` holds, as last written: reconciling runs several times a second
    /// and rewrote the same file each time (most of an idle agent's system calls).
    saved: Option<Vec<u8>>,
}

/// The bytes an instance may keep in its directory (and the largest file it may write).
fn disk_budget(service: &Service) -> u64 {
    match service.placement.demand.disk_bytes {
        0 => DISK_DEFAULT,
        bytes => bytes,
    }
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

fn instance_id(key: &str, version: u64) -> String {
    format!("{}-{version}", key.replace('/', "."))
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
        let _ = std::fs::set_permissions(
            &config.root,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        );
        let records: Vec<Record> = std::fs::read(config.root.join("instances.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut adopted = BTreeMap::new();
        for record in records {
            if exec::is_same_process(record.pid, record.start_ticks) {
                tracing::info!(service = %record.key, version = record.version, pid = record.pid, "found a running instance of the previous agent");
                if let (Some(pool), Some(uid)) = (&config.uids, record.uid) {
                    pool.keep(uid, &record.id);
                }
                adopted.insert(record.id.clone(), record);
            } else {
                config.cgroups.remove(&record.id);
                if let (Some(pool), Some(uid)) = (&config.uids, record.uid) {
                    pool.release(uid);
                }
            }
        }
        // Directories of instances that did not survive are gone with them.
        if let Ok(entries) = std::fs::read_dir(&config.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !adopted.contains_key(&name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let (probe_tx, probe_rx) = mpsc::channel(256);
        let (prepared_tx, prepared_rx) = mpsc::channel(64);
        Runner {
            config,
            wanted: BTreeMap::new(),
            instances: BTreeMap::new(),
            refused: BTreeMap::new(),
            adopted,
            origin: Instant::now(),
            probe_tx,
            probe_rx,
            prepared_tx,
            prepared_rx,
            next_log_cap: Instant::now(),
            next_disk_check: Instant::now(),
            counters: RunnerCounters::default(),
            saved: None,
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
        let mut settled = false;
        loop {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let wanted = desired.borrow_and_update().clone();
                    if let Some(wanted) = wanted {
                        settled = true;
                        self.wanted = wanted.into_iter().map(|a| (a.key.clone(), a)).collect();
                        self.reconcile();
                    }
                }
                Some((id, ok)) = self.probe_rx.recv() => self.on_probe(&id, ok),
                Some((id, outcome)) = self.prepared_rx.recv() => self.on_prepared(&id, outcome),
                _ = ticker.tick() => {
                    self.tick();
                    if settled {
                        self.reconcile();
                    }
                }
            }
            let _ = report.send_if_modified(|r| {
                let fresh = self.report();
                let changed = *r != fresh;
                *r = fresh;
                changed
            });
        }
        let now = self.now();
        let ids: Vec<String> = self.instances.keys().cloned().collect();
        for id in ids {
            if let Some(instance) = self.instances.get_mut(&id) {
                let actions = instance.supervisor.stop(now);
                self.perform(&id, actions);
            }
        }
    }

    /// Makes the instances match what is wanted, one step at a time.
    fn reconcile(&mut self) {
        // Adopt the survivors of a previous agent that something still wants here.
        let adopted: Vec<Record> = self.adopted.values().cloned().collect();
        for record in adopted {
            self.adopted.remove(&record.id);
            let service = self
                .wanted
                .get(&record.key)
                .filter(|a| a.task != Task::Stop)
                .and_then(|a| a.versions.get(&record.version).cloned());
            match service {
                Some(service) => self.adopt(record, service),
                None => {
                    tracing::info!(service = %record.key, pid = record.pid, "stopping an instance of the previous agent that is no longer wanted here");
                    exec::signal_group(record.pid, Signal::SIGTERM);
                }
            }
        }
        // A refusal holds for the version refused, while it is asked for, and a while after.
        self.refused.retain(|key, (version, since)| {
            since.elapsed() < REFUSAL_HOLD
                || matches!(self.wanted.get(key), Some(Assignment { task: Task::Run { version: v, .. }, .. }) if v == version)
        });
        let mut retire = Vec::new();
        let mut start = Vec::new();
        let keys: BTreeSet<String> = self
            .instances
            .values()
            .map(|i| i.key.clone())
            .chain(self.wanted.keys().cloned())
            .collect();
        for key in keys {
            let live: Vec<String> = self
                .instances
                .iter()
                .filter(|(_, i)| i.key == key && !i.retiring)
                .map(|(id, _)| id.clone())
                .collect();
            let Some(assignment) = self.wanted.get(&key) else {
                retire.extend(live);
                continue;
            };
            let (version, surge) = match assignment.task {
                Task::Stop => {
                    retire.extend(live);
                    continue;
                }
                Task::Keep => continue,
                Task::Run { version, surge } => (version, surge),
            };
            let Some(service) = assignment.versions.get(&version).cloned() else {
                continue;
            };
            // The instance of the wanted version, or one that runs the same way (relabelled).
            let fingerprint = service.fingerprint();
            let current = live
                .iter()
                .find(|id| self.instances[*id].version == version)
                .or_else(|| {
                    live.iter()
                        .find(|id| self.instances[*id].service.fingerprint() == fingerprint)
                })
                .cloned();
            if let Some(id) = &current
                && let Some(instance) = self.instances.get_mut(id)
                && instance.version != version
            {
                tracing::info!(service = %key, from = instance.version, to = version, "the new version runs as the old one does: relabelled, not restarted");
                instance.version = version;
                instance.service = service.clone();
            }
            let current_healthy = current
                .as_ref()
                .is_some_and(|id| self.instances[id].is_healthy());
            for id in live.iter().filter(|id| Some(*id) != current.as_ref()) {
                if !surge || current_healthy {
                    retire.push(id.clone());
                }
            }
            if current.is_none() && self.refused.get(&key).map(|(v, _)| *v) != Some(version) {
                let others_running = self
                    .instances
                    .values()
                    .any(|i| i.key == key && !i.is_gone());
                if surge || !others_running {
                    start.push((key.clone(), version, service));
                }
            }
        }
        for id in retire {
            self.retire(&id);
        }
        for (key, version, service) in start {
            self.begin(key, version, service);
        }
        self.save();
    }

    /// Stops an instance for good: once stopped it goes, with its directory.
    fn retire(&mut self, id: &str) {
        let now = self.now();
        if let Some(instance) = self.instances.get_mut(id) {
            tracing::info!(service = %instance.key, version = instance.version, "stopping an instance");
            instance.retiring = true;
            let actions = instance.supervisor.stop(now);
            self.perform(id, actions);
        }
    }

    /// Cores and memory held by instances that are not stopped.
    fn committed(&self) -> (u64, u64) {
        self.instances
            .values()
            .filter(|i| i.holds_resources())
            .fold((0, 0), |(c, m), i| {
                let d = i.service.placement.demand;
                (
                    c.saturating_add(d.cpu_millis),
                    m.saturating_add(d.memory_bytes),
                )
            })
    }

    /// Starts an instance of `version` of `key`, within the owner's limits; a surge that does
    /// not fit beside the old instance becomes a replacement (the old one stops first).
    fn begin(&mut self, key: String, version: u64, service: Arc<Service>) {
        if !self.config.drivers.contains(&service.run.driver) {
            if self.refused.get(&key).map(|(v, _)| *v) != Some(version) {
                tracing::warn!(service = %key, driver = service.run.driver.name(), "refusing: this node does not offer the driver");
                self.counters.refusals += 1;
                self.refused.insert(key, (version, Instant::now()));
            }
            return;
        }
        // A container's limits are the engine's to enforce.
        if service.run.driver == Driver::Exec
            && !self.config.cgroups.enforced().all()
            && !self.config.allow_unenforced_limits
        {
            if self.refused.get(&key).map(|(v, _)| *v) != Some(version) {
                tracing::warn!(service = %key, "refusing: this node cannot enforce its limits (its owner may allow it with --allow-unenforced-limits)");
                self.counters.refusals += 1;
                self.refused.insert(key, (version, Instant::now()));
            }
            return;
        }
        let demand = service.placement.demand;
        let (cpu, memory) = self.committed();
        let limits = &self.config.limits;
        let fits = |cpu: u64, memory: u64, count: usize| {
            cpu.saturating_add(demand.cpu_millis) <= limits.cpu_millis
                && memory.saturating_add(demand.memory_bytes) <= limits.memory_bytes
                && count < limits.instances_max
        };
        let running = self
            .instances
            .values()
            .filter(|i| i.holds_resources())
            .count();
        if !fits(cpu, memory, running) {
            let (own_cpu, own_memory, own) = self
                .instances
                .values()
                .filter(|i| i.key == key && i.holds_resources())
                .fold((0u64, 0u64, 0usize), |(c, m, n), i| {
                    let d = i.service.placement.demand;
                    (c + d.cpu_millis, m + d.memory_bytes, n + 1)
                });
            if own > 0 && fits(cpu - own_cpu, memory - own_memory, running - own) {
                tracing::info!(service = %key, "no room for the new instance beside the old: stopping the old one first");
                let ids: Vec<String> = self
                    .instances
                    .iter()
                    .filter(|(_, i)| i.key == key && !i.retiring)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in ids {
                    self.retire(&id);
                }
            } else {
                tracing::info!(service = %key, "refusing: it would exceed this node's limits");
                self.counters.refusals += 1;
                self.refused.insert(key, (version, Instant::now()));
            }
            return;
        }
        let id = instance_id(&key, version);
        let dir = self.config.root.join(&id);
        // A fresh directory: nothing of an earlier instance of this version is reused.
        let _ = std::fs::remove_dir_all(&dir);
        let uid = match &self.config.uids {
            Some(pool) => {
                let hint = nubo_proto::service::score(
                    &format!("{id}@{}", self.config.node),
                    nubo_proto::NodeId(0),
                );
                match pool.take(&format!("{id}@{}", self.config.node), hint) {
                    Ok(uid) => Some(uid),
                    Err(error) => {
                        tracing::warn!(service = %key, %error, "refusing: no uid for the instance");
                        self.refused.insert(key, (version, Instant::now()));
                        return;
                    }
                }
            }
            None => None,
        };
        if let Err(error) = exec::prepare_dir(&dir, uid) {
            tracing::warn!(service = %key, %error, "cannot make the instance's directory");
        }
        let taken: BTreeSet<u16> = self
            .instances
            .values()
            .flat_map(|i| i.ports.values().copied())
            .collect();
        // Each node starts its search elsewhere, so agents sharing a machine rarely race for
        // one port.
        let hint = nubo_proto::service::score(
            &format!("{key}@{}", self.config.node),
            nubo_proto::NodeId(0),
        );
        let mut ports = BTreeMap::new();
        for (i, (name, wanted)) in service.ports.iter().enumerate() {
            let port = if *wanted != 0 {
                *wanted
            } else {
                exec::free_port(
                    self.config.limits.ports.clone(),
                    hint.wrapping_add(i as u64 * 7919),
                    &taken,
                )
                .unwrap_or(0)
            };
            ports.insert(name.clone(), port);
        }
        let (supervisor, actions) = Supervisor::start(policy_of(&service));
        tracing::info!(service = %key, version, "starting an instance");
        self.instances.insert(
            id.clone(),
            Instance {
                key,
                version,
                prepared: service.run.artifact.is_none(),
                service,
                id: id.clone(),
                dir,
                supervisor,
                pid: None,
                start_ticks: 0,
                exit: None,
                ports,
                uid,
                note: String::new(),
                next_probe: Instant::now(),
                probing: false,
                created: Instant::now(),
                healthy_since: None,
                ever_healthy: false,
                failed: None,
                retiring: false,
                preparing: false,
                checkpoints: Vec::new(),
            },
        );
        self.perform(&id, actions);
    }

    fn adopt(&mut self, record: Record, service: Arc<Service>) {
        tracing::info!(service = %record.key, version = record.version, pid = record.pid, "adopted a running instance");
        let now = self.now();
        let dir = self.config.root.join(&record.id);
        let healthy_since = service.health.is_none().then(Instant::now);
        self.instances.insert(
            record.id.clone(),
            Instance {
                key: record.key,
                version: record.version,
                supervisor: Supervisor::adopt(policy_of(&service), now),
                service,
                id: record.id,
                dir,
                pid: Some(record.pid),
                start_ticks: record.start_ticks,
                exit: None,
                ports: record.ports,
                uid: record.uid,
                note: String::new(),
                next_probe: Instant::now(),
                probing: false,
                created: Instant::now(),
                healthy_since,
                ever_healthy: true,
                failed: None,
                retiring: false,
                prepared: true,
                preparing: false,
                checkpoints: Vec::new(),
            },
        );
    }

    fn environment(&self, instance: &Instance) -> Vec<(String, String)> {
        let service = &instance.service;
        let mut env: Vec<(String, String)> = vec![
            ("NUBO_SERVICE".into(), service.name.clone()),
            ("NUBO_NAMESPACE".into(), service.namespace.clone()),
            (
                "NUBO_INSTANCE".into(),
                format!("{}-{}", instance.id, self.config.node),
            ),
            ("NUBO_VERSION".into(), instance.version.to_string()),
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

    /// How to start `instance` (or, with `check`, a health-check command in its context):
    /// its cgroups made with its limits, its own user, its environment.
    fn launch(
        &self,
        instance: &Instance,
        log: &'static str,
        check: Option<&[String]>,
    ) -> std::io::Result<Launch> {
        let env = self.environment(instance);
        let service = &instance.service;
        let demand = service.placement.demand;
        let limits = Limits {
            memory_bytes: demand.memory_bytes,
            file_bytes: disk_budget(service),
            log_bytes: LOG_BYTES_MAX,
        };
        if service.run.driver == Driver::Docker {
            // The container is the sandbox: the wrapper runs `docker` as it is, and the
            // engine applies the limits.
            let name = container_name(&self.cgroup_id(instance));
            let args = match check {
                Some(argv) => docker::exec_args(&name, argv),
                None => {
                    let mut command: Vec<String> = Vec::new();
                    if !service.run.command.is_empty() {
                        command.push(service.run.command.clone());
                    }
                    command.extend(service.run.args.iter().map(|a| substitute(a, &env)));
                    docker::run_args(&docker::Container {
                        name: &name,
                        image: service.run.image.as_deref().unwrap_or_default(),
                        command: &command,
                        env: &env,
                        work: &exec::work_dir(&instance.dir),
                        user: instance.uid,
                        memory_bytes: demand.memory_bytes,
                        cpu_millis: demand.cpu_millis,
                        pids: service.pids_max,
                        file_bytes: limits.file_bytes,
                    })
                }
            };
            return Ok(Launch {
                dir: instance.dir.clone(),
                command: "docker".into(),
                args,
                env: Vec::new(),
                limits,
                cgroups: Vec::new(),
                user: None,
                wrapper: self.config.wrapper.clone(),
                log,
                direct: true,
            });
        }
        let cgroups = self.config.cgroups.create(
            &self.cgroup_id(instance),
            GroupLimits {
                memory_bytes: demand.memory_bytes,
                cpu_millis: demand.cpu_millis,
                pids: service.pids_max,
            },
        )?;
        let (command, args) = match check {
            Some(argv) => {
                let (program, args) = argv
                    .split_first()
                    .ok_or_else(|| std::io::Error::other("an empty check command"))?;
                (program.clone(), args.to_vec())
            }
            None => (
                service.run.command.clone(),
                service
                    .run
                    .args
                    .iter()
                    .map(|a| substitute(a, &env))
                    .collect(),
            ),
        };
        Ok(Launch {
            dir: instance.dir.clone(),
            command,
            args,
            env,
            limits,
            cgroups,
            user: instance.uid,
            wrapper: self.config.wrapper.clone(),
            log,
            direct: false,
        })
    }

    /// The name of an instance's cgroups: unique on the machine (agents share it).
    fn cgroup_id(&self, instance: &Instance) -> String {
        format!("{}-{}", instance.id, self.config.node)
    }

    /// Fetches (once per node) and unpacks the instance's artifact, in a task of its own.
    fn prepare(&mut self, id: &str) {
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        let Some(blob) = instance.service.run.artifact.clone() else {
            return;
        };
        instance.preparing = true;
        let work = exec::work_dir(&instance.dir);
        let limit = disk_budget(&instance.service);
        let uid = instance.uid;
        let image = instance.service.run.driver == Driver::Docker;
        let cache = self.config.artifacts.clone();
        let commands = self.config.commands.clone();
        let done = self.prepared_tx.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let outcome = if image {
                load_image(&blob, &cache, &commands).await
            } else {
                prepare_artifact(&blob, &cache, &work, limit, &commands)
                    .await
                    .and_then(|()| {
                        // Unpacked by the agent: the instance's files become its own.
                        exec::give(&work, uid)
                            .map_err(|e| format!("cannot give the files over: {e}"))
                    })
            };
            let _ = done.send((id, outcome)).await;
        });
    }

    fn on_prepared(&mut self, id: &str, outcome: Result<(), String>) {
        let now = self.now();
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        instance.preparing = false;
        match outcome {
            Ok(()) => {
                instance.prepared = true;
                if instance.supervisor.phase() == Phase::Starting {
                    self.perform(id, vec![Action::Spawn]);
                }
            }
            Err(error) => {
                tracing::warn!(service = %instance.key, %error, "cannot prepare the artifact");
                instance.note = error.clone();
                let _ = std::fs::write(
                    exec::log_path(&instance.dir),
                    format!("nubo: cannot prepare the artifact: {error}\n"),
                );
                let more = instance.supervisor.spawn_failed(now);
                self.perform(id, more);
            }
        }
    }

    fn on_probe(&mut self, id: &str, ok: bool) {
        let now = self.now();
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        instance.probing = false;
        if ok {
            self.counters.probes_ok += 1;
        } else {
            self.counters.probes_failed += 1;
        }
        let actions = instance.supervisor.health(now, ok);
        if ok {
            instance.ever_healthy = true;
            instance.healthy_since.get_or_insert_with(Instant::now);
        } else if instance.supervisor.healthy() == Some(false) {
            instance.healthy_since = None;
        }
        self.perform(id, actions);
    }

    /// Before a restart: a port the instance was given from the node's range (`0` in its
    /// description) that something else holds now is exchanged for a free one. Two agents on
    /// one machine may hand out the same port at the same moment; the instance that loses
    /// the race would otherwise fail on it at every restart.
    fn reassign_held_ports(&mut self, id: &str) {
        let taken: BTreeSet<u16> = self
            .instances
            .iter()
            .filter(|(other, _)| other.as_str() != id)
            .flat_map(|(_, i)| i.ports.values().copied())
            .collect();
        let range = self.config.limits.ports.clone();
        let node = self.config.node.to_string();
        let Some(instance) = self.instances.get_mut(id) else {
            return;
        };
        let service = instance.service.clone();
        for (i, (name, wanted)) in service.ports.iter().enumerate() {
            let Some(current) = instance.ports.get(name).copied() else {
                continue;
            };
            if *wanted != 0 || std::net::TcpListener::bind(("0.0.0.0", current)).is_ok() {
                continue;
            }
            let hint = nubo_proto::service::score(
                &format!("{}@{node}#{}", instance.key, instance.supervisor.restarts()),
                nubo_proto::NodeId(0),
            );
            if let Some(port) =
                exec::free_port(range.clone(), hint.wrapping_add(i as u64 * 7919), &taken)
            {
                tracing::info!(service = %instance.key, port = %name, from = current, to = port, "the instance's port is held by something else: it gets another");
                instance.ports.insert(name.clone(), port);
            }
        }
    }

    fn perform(&mut self, id: &str, actions: Vec<Action>) {
        for action in actions {
            let Some(instance) = self.instances.get(id) else {
                return;
            };
            match action {
                Action::Spawn => {
                    if !instance.prepared {
                        if !instance.preparing {
                            self.prepare(id);
                        }
                        continue;
                    }
                    if instance.supervisor.restarts() > 0 {
                        self.reassign_held_ports(id);
                    }
                    let Some(instance) = self.instances.get(id) else {
                        return;
                    };
                    let launch = self.launch(instance, exec::LOG_FILE, None);
                    let now = self.now();
                    let result = launch.and_then(|launch| exec::spawn(&launch));
                    let Some(instance) = self.instances.get_mut(id) else {
                        return;
                    };
                    match result {
                        Ok(started) => {
                            self.counters.started += 1;
                            if instance.supervisor.restarts() > 0 {
                                self.counters.restarts += 1;
                            }
                            tracing::info!(service = %instance.key, version = instance.version, pid = started.pid, "started an instance");
                            instance.pid = Some(started.pid);
                            instance.start_ticks = started.start_ticks;
                            instance.exit = Some(started.exit);
                            instance.supervisor.spawned(now);
                            match &instance.service.health {
                                Some(check) => {
                                    instance.healthy_since = None;
                                    instance.next_probe = Instant::now() + check.grace;
                                }
                                None => {
                                    instance.ever_healthy = true;
                                    instance.healthy_since = Some(Instant::now());
                                }
                            }
                        }
                        Err(error) => {
                            tracing::warn!(service = %instance.key, %error, "cannot start an instance");
                            let more = instance.supervisor.spawn_failed(now);
                            self.perform(id, more);
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
                    // Killing `docker run` leaves its container: it goes too.
                    if instance.service.run.driver == Driver::Docker {
                        let name = container_name(&self.cgroup_id(instance));
                        std::thread::spawn(move || docker::remove(&name));
                    }
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        let ids: Vec<String> = self.instances.keys().cloned().collect();
        for id in ids {
            let Some(instance) = self.instances.get_mut(&id) else {
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
                let cgroup = format!("{}-{}", instance.id, self.config.node);
                let service = &instance.service;
                // Killed for memory; or stopped at the disk budget (a file past it gets
                // SIGXFSZ, exit 128 + 25, or EFBIG, which most programs die of).
                if self.config.cgroups.oom_killed(&cgroup) && code == 128 + 9 {
                    instance.note = format!(
                        "killed: over its memory limit of {}",
                        nubo_proto::service::bytes_text(service.placement.demand.memory_bytes)
                    );
                } else if code != 0
                    && exec::disk_usage(&exec::work_dir(&instance.dir)) >= disk_budget(service)
                {
                    instance.note = format!(
                        "stopped: its directory reached its disk budget of {}",
                        nubo_proto::service::bytes_text(disk_budget(service))
                    );
                }
                if !instance.note.is_empty() {
                    tracing::warn!(service = %instance.key, version = instance.version, note = %instance.note, "an instance hit a limit");
                }
                tracing::info!(service = %instance.key, version = instance.version, code, "an instance exited");
                instance.exit = None;
                instance.pid = None;
                instance.healthy_since = None;
                actions.extend(instance.supervisor.exited(now, code));
            }
            actions.extend(instance.supervisor.tick(now));
            // A version that does not become healthy in time fails here.
            if instance.failed.is_none() && !instance.ever_healthy && !instance.retiring {
                let deadline = instance.service.update.healthy_deadline;
                if instance.supervisor.phase() == Phase::Failed {
                    instance.failed = Some(format!(
                        "it exited {} times without becoming healthy (last status {})",
                        instance.supervisor.restarts() + 1,
                        instance.supervisor.last_exit().unwrap_or(-1)
                    ));
                } else if instance.created.elapsed() >= deadline {
                    instance.failed = Some(format!(
                        "not healthy within the healthy_deadline of {}s",
                        deadline.as_secs()
                    ));
                }
                if let Some(reason) = &instance.failed {
                    tracing::warn!(service = %instance.key, version = instance.version, %reason, "the version failed on this node");
                }
            }
            // Health probes.
            if instance.supervisor.phase() == Phase::Running
                && !instance.probing
                && Instant::now() >= instance.next_probe
                && let Some(check) = instance.service.health.clone()
            {
                instance.probing = true;
                instance.next_probe = Instant::now() + check.interval;
                let ports = instance.ports.clone();
                let sender = self.probe_tx.clone();
                let probe_id = id.clone();
                // A check command runs as the instance does: its user, namespace and limits.
                let launch = match &check.probe {
                    Probe::Command { argv } => {
                        Some(self.launch(&self.instances[&id], CHECK_LOG, Some(argv.as_slice())))
                    }
                    _ => None,
                };
                tokio::spawn(async move {
                    let ok = match (&check.probe, launch) {
                        (Probe::Http { port, path }, _) => {
                            health::http(ports.get(port).copied().unwrap_or(0), path, check.timeout)
                                .await
                        }
                        (Probe::Tcp { port }, _) => {
                            health::tcp(ports.get(port).copied().unwrap_or(0), check.timeout).await
                        }
                        (Probe::Command { .. }, Some(Ok(launch))) => {
                            run_check(&launch, check.timeout).await
                        }
                        (Probe::Command { .. }, _) => false,
                    };
                    let _ = sender.send((probe_id, ok)).await;
                });
            }
            self.perform(&id, actions);
            let Some(instance) = self.instances.get(&id) else {
                continue;
            };
            match instance.supervisor.phase() {
                Phase::Stopped => {
                    self.config.cgroups.remove(&self.cgroup_id(instance));
                    if instance.service.run.driver == Driver::Docker {
                        let name = container_name(&self.cgroup_id(instance));
                        std::thread::spawn(move || docker::remove(&name));
                    }
                    if instance.retiring {
                        let _ = std::fs::remove_dir_all(&instance.dir);
                        if let (Some(pool), Some(uid)) = (&self.config.uids, instance.uid) {
                            pool.release(uid);
                        }
                    }
                    self.instances.remove(&id);
                    self.save();
                }
                // The version wanted here keeps failing: let another node try.
                Phase::Failed
                    if !instance.retiring
                        && matches!(
                            self.wanted.get(&instance.key).map(|a| a.task),
                            Some(Task::Run { version, .. }) if version == instance.version
                        ) =>
                {
                    let (key, version) = (instance.key.clone(), instance.version);
                    if self.refused.get(&key).map(|(v, _)| *v) != Some(version) {
                        self.refused.insert(key.clone(), (version, Instant::now()));
                        self.counters.refusals += 1;
                        tracing::warn!(service = %key, "an instance failed too often; refusing the service here");
                    }
                }
                _ => {}
            }
        }
        if Instant::now() >= self.next_log_cap {
            self.next_log_cap = Instant::now() + LOG_INTERVAL;
            let now_ms = crate::clock::unix_now().as_millis() as u64;
            for instance in self.instances.values_mut() {
                let path = exec::log_path(&instance.dir);
                if let Ok(meta) = std::fs::metadata(&path) {
                    add_checkpoint(&mut instance.checkpoints, now_ms, meta.len());
                }
            }
        }
        if Instant::now() >= self.next_disk_check {
            self.next_disk_check = Instant::now() + DISK_CHECK;
            self.check_disk();
        }
    }

    fn report(&self) -> RunnerReport {
        let mut report = RunnerReport {
            refused: self
                .refused
                .iter()
                .map(|(k, (v, _))| (k.clone(), *v))
                .collect(),
            counters: self.counters,
            ..RunnerReport::default()
        };
        for instance in self.instances.values() {
            let fact = InstanceFact {
                service: instance.key.clone(),
                version: instance.version,
                state: instance.fact_state(),
                restarts: instance.supervisor.restarts(),
                ports: instance.ports.clone().into_iter().collect(),
                // A failed instance says why: the planner records it as the version's
                // failure here.
                note: truncated(
                    instance.failed.as_ref().unwrap_or(&instance.note),
                    nubo_proto::instance::NOTE_BYTES_MAX,
                ),
            };
            let mut status =
                InstanceStatus::of_fact(&fact, self.config.node.clone(), self.config.host.clone());
            status.pid = instance.pid;
            let held_by = match instance.service.run.driver {
                Driver::Exec => self.config.cgroups.describe(),
                Driver::Docker => "docker engine".to_string(),
            };
            status.limits = match instance.uid {
                Some(uid) => format!("{held_by}; uid {uid}"),
                None => held_by,
            };
            report.instances.push(status);
            report.facts.push(fact);
            report.logs.push(LogFile {
                key: instance.key.clone(),
                version: instance.version,
                path: exec::log_path(&instance.dir),
                checkpoints: instance.checkpoints.clone(),
            });
        }
        report
    }

    /// Stops every running instance whose directory holds more than its disk budget.
    fn check_disk(&mut self) {
        let over: Vec<(String, u64, u64)> = self
            .instances
            .iter()
            .filter(|(_, i)| i.pid.is_some() && !i.retiring)
            .filter_map(|(id, i)| {
                let budget = disk_budget(&i.service);
                let used = exec::disk_usage(&exec::work_dir(&i.dir));
                (used > budget).then(|| (id.clone(), used, budget))
            })
            .collect();
        for (id, used, budget) in over {
            if let Some(instance) = self.instances.get_mut(&id) {
                instance.note = format!(
                    "stopped: its directory holds {}, past its disk budget of {}",
                    nubo_proto::service::bytes_text(used),
                    nubo_proto::service::bytes_text(budget)
                );
                tracing::warn!(service = %instance.key, note = %instance.note, "an instance hit a limit");
                if let Some(pid) = instance.pid {
                    exec::signal_group(pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Records running instances for the next agent to adopt, if they changed.
    fn save(&mut self) {
        let records: Vec<Record> = self
            .instances
            .values()
            .filter_map(|i| {
                i.pid.map(|pid| Record {
                    key: i.key.clone(),
                    version: i.version,
                    id: i.id.clone(),
                    pid,
                    start_ticks: i.start_ticks,
                    ports: i.ports.clone(),
                    uid: i.uid,
                })
            })
            .chain(self.adopted.values().cloned())
            .collect();
        let path = self.config.root.join("instances.json");
        let temporary = self.config.root.join(".instances.json.tmp");
        let Ok(bytes) = serde_json::to_vec(&records) else {
            return;
        };
        if self.saved.as_ref() == Some(&bytes) {
            return;
        }
        // A write that fails is tried again at the next reconciliation.
        if std::fs::write(&temporary, &bytes).is_ok() && std::fs::rename(&temporary, &path).is_ok()
        {
            self.saved = Some(bytes);
        }
    }
}

/// Runs a health-check command in its instance's context; whether it exits 0 within `limit`
/// (it is killed otherwise).
async fn run_check(launch: &Launch, limit: Duration) -> bool {
    let Ok(started) = exec::spawn(launch) else {
        return false;
    };
    match tokio::time::timeout(limit, started.exit).await {
        Ok(Ok(code)) => code == 0,
        _ => {
            exec::signal_group(started.pid, Signal::SIGKILL);
            false
        }
    }
}

/// The bytes of blob `blob` (hex id), from `cache`, where it is fetched into first unless it
/// is there already; and its path there.
async fn fetch_cached(
    blob: &str,
    cache: &std::path::Path,
    commands: &mpsc::Sender<Command>,
) -> Result<(Vec<u8>, PathBuf), String> {
    let id: BlobId = blob
        .parse()
        .map_err(|_| format!("{blob} is not a blob id"))?;
    let cached = cache.join(blob);
    if let Ok(bytes) = tokio::fs::read(&cached).await
        && nubo_proto::blob::id_of(&bytes) == Some(id)
    {
        return Ok((bytes, cached));
    }
    let bytes = crate::blobs::fetch(commands, id)
        .await
        .map_err(|e| format!("cannot fetch artifact {blob}: {e}"))?;
    tokio::fs::create_dir_all(cache)
        .await
        .map_err(|e| format!("{}: {e}", cache.display()))?;
    let private = |mode| std::os::unix::fs::PermissionsExt::from_mode(mode);
    let _ = tokio::fs::set_permissions(cache, private(0o700)).await;
    let temporary = cache.join(format!(".{blob}.partial"));
    tokio::fs::write(&temporary, &bytes)
        .await
        .map_err(|e| format!("{}: {e}", temporary.display()))?;
    let _ = tokio::fs::set_permissions(&temporary, private(0o600)).await;
    tokio::fs::rename(&temporary, &cached)
        .await
        .map_err(|e| format!("{}: {e}", cached.display()))?;
    tracing::info!(artifact = %blob, bytes = bytes.len(), "fetched an artifact");
    Ok((bytes.to_vec(), cached))
}

/// Puts blob `blob` (hex id) in `dir`, unpacked, fetching it into `cache` first unless it is
/// there already.
async fn prepare_artifact(
    blob: &str,
    cache: &std::path::Path,
    dir: &std::path::Path,
    limit: u64,
    commands: &mpsc::Sender<Command>,
) -> Result<(), String> {
    let (bytes, _) = fetch_cached(blob, cache, commands).await?;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        artifact::unpack(&bytes, &dir, limit)
    })
    .await
    .map_err(|e| e.to_string())?
    .map(|_| ())
    .map_err(|e| format!("cannot unpack the artifact: {e}"))
}

/// Loads blob `blob` (an image archive) into the node's Docker engine.
async fn load_image(
    blob: &str,
    cache: &std::path::Path,
    commands: &mpsc::Sender<Command>,
) -> Result<(), String> {
    let (_, path) = fetch_cached(blob, cache, commands).await?;
    tokio::task::spawn_blocking(move || docker::load(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot load the image: {e}"))
}
