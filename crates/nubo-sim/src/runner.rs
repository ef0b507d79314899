//! A simulated runner: what a machine's agent does with its node's tasks, without processes.
//!
//! It keeps the node's instances and moves each through its life on the simulated clock:
//! an instance started is *starting* for `start_delay`, then *healthy*, and *ready* once it
//! has been healthy for its update's `min_healthy_time`; an instance stopped is *stopping*
//! for `stop_delay`, then gone. Tasks are carried out as the agent's runner does: `Run` starts
//! the version (or relabels an instance whose fingerprint equals it) and stops the others once
//! it is healthy (with surge) or at once (without), `Keep` changes nothing, and a service with
//! no task, or `Stop`, stops. Its facts go back to the node, which reports them.

use std::collections::BTreeMap;
use std::time::Duration;

use nubo_proto::Time;
use nubo_proto::instance::{InstanceFact, InstanceState};
use nubo_proto::rollout::Task;
use nubo_proto::spec::{Document, PlainReader, ServiceSpec, SpecReader};
use nubo_proto::suite::Suite;

/// How long instances take to start and to stop.
#[derive(Clone, Copy, Debug)]
pub struct RunnerTiming {
    /// From start to healthy.
    pub start_delay: Duration,
    /// From stop to gone.
    pub stop_delay: Duration,
}

impl Default for RunnerTiming {
    fn default() -> Self {
        RunnerTiming {
            start_delay: Duration::from_millis(500),
            stop_delay: Duration::from_millis(200),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Life {
    Starting { healthy_at: Time },
    Healthy { since: Time, ready_at: Time },
    Ready,
    Stopping { gone_at: Time },
}

#[derive(Clone, Debug)]
struct Instance {
    version: u64,
    fingerprint: u64,
    life: Life,
}

impl Instance {
    fn state(&self) -> InstanceState {
        match self.life {
            Life::Starting { .. } => InstanceState::Starting,
            Life::Healthy { .. } => InstanceState::Healthy,
            Life::Ready => InstanceState::Ready,
            Life::Stopping { .. } => InstanceState::Stopping,
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.life, Life::Healthy { .. } | Life::Ready)
    }

    fn next(&self) -> Option<Time> {
        match self.life {
            Life::Starting { healthy_at } => Some(healthy_at),
            Life::Healthy { ready_at, .. } => Some(ready_at),
            Life::Ready => None,
            Life::Stopping { gone_at } => Some(gone_at),
        }
    }
}

/// One machine's simulated runner.
#[derive(Clone, Debug, Default)]
pub struct SimRunner {
    timing: RunnerTiming,
    /// By service, its instances (a service runs at most two at once, during a surge).
    instances: BTreeMap<String, Vec<Instance>>,
    tasks: BTreeMap<String, Task>,
    /// Instances started since boot.
    pub started: u64,
}

impl SimRunner {
    /// A runner with no instance.
    pub fn new(timing: RunnerTiming) -> SimRunner {
        SimRunner {
            timing,
            ..SimRunner::default()
        }
    }

    /// What the node reports.
    pub fn facts(&self) -> Vec<InstanceFact> {
        self.instances
            .iter()
            .flat_map(|(key, list)| {
                list.iter().map(move |i| InstanceFact {
                    service: key.clone(),
                    version: i.version,
                    state: i.state(),
                    restarts: 0,
                    ports: Vec::new(),
                    note: String::new(),
                })
            })
            .collect()
    }

    /// Instances by service: `(service, version, up)`, stopping ones left out.
    pub fn running(&self) -> impl Iterator<Item = (&str, u64, bool)> + '_ {
        self.instances.iter().flat_map(|(key, list)| {
            list.iter()
                .filter(|i| !matches!(i.life, Life::Stopping { .. }))
                .map(move |i| (key.as_str(), i.version, i.is_up()))
        })
    }

    /// When the runner next has something to do.
    pub fn poll(&self) -> Time {
        self.instances
            .values()
            .flatten()
            .filter_map(Instance::next)
            .min()
            .unwrap_or(Time::MAX)
    }

    /// Takes the node's tasks and carries them out; true if the facts changed.
    pub fn set_tasks(&mut self, now: Time, tasks: &BTreeMap<String, Task>, suite: &Suite) -> bool {
        self.tasks = tasks.clone();
        self.reconcile(now, suite)
    }

    /// Moves instances along their lives; true if the facts changed.
    pub fn tick(&mut self, now: Time, suite: &Suite) -> bool {
        let mut changed = false;
        for (key, list) in self.instances.iter_mut() {
            let min_healthy = min_healthy_time(suite, key);
            for instance in list.iter_mut() {
                match instance.life {
                    Life::Starting { healthy_at } if healthy_at <= now => {
                        instance.life = Life::Healthy {
                            since: now,
                            ready_at: now + min_healthy,
                        };
                        changed = true;
                    }
                    Life::Healthy { ready_at, .. } if ready_at <= now => {
                        instance.life = Life::Ready;
                        changed = true;
                    }
                    _ => {}
                }
            }
            let before = list.len();
            list.retain(|i| !matches!(i.life, Life::Stopping { gone_at } if gone_at <= now));
            changed |= list.len() != before;
        }
        self.instances.retain(|_, list| !list.is_empty());
        // A new instance that became healthy lets its surge's old one stop.
        changed |= self.reconcile(now, suite);
        changed
    }

    fn reconcile(&mut self, now: Time, suite: &Suite) -> bool {
        let mut changed = false;
        let keys: Vec<String> = self
            .instances
            .keys()
            .chain(self.tasks.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for key in keys {
            let task = self.tasks.get(&key).copied();
            let list = self.instances.entry(key.clone()).or_default();
            match task {
                Some(Task::Keep) => {}
                None | Some(Task::Stop) => {
                    for instance in list.iter_mut() {
                        if !matches!(instance.life, Life::Stopping { .. }) {
                            instance.life = Life::Stopping {
                                gone_at: now + self.timing.stop_delay,
                            };
                            changed = true;
                        }
                    }
                }
                Some(Task::Run { version, surge }) => {
                    let Some(spec) = spec_of(suite, &key, version) else {
                        continue;
                    };
                    let live = |i: &Instance| !matches!(i.life, Life::Stopping { .. });
                    let has = list
                        .iter()
                        .position(|i| live(i) && i.version == version)
                        .or_else(|| {
                            list.iter()
                                .position(|i| live(i) && i.fingerprint == spec.fingerprint)
                        });
                    let target = match has {
                        Some(index) => {
                            if list[index].version != version {
                                list[index].version = version;
                                changed = true;
                            }
                            index
                        }
                        None => {
                            if !surge {
                                for instance in list.iter_mut().filter(|i| live(i)) {
                                    instance.life = Life::Stopping {
                                        gone_at: now + self.timing.stop_delay,
                                    };
                                }
                            }
                            list.push(Instance {
                                version,
                                fingerprint: spec.fingerprint,
                                life: Life::Starting {
                                    healthy_at: now + self.timing.start_delay,
                                },
                            });
                            self.started += 1;
                            changed = true;
                            list.len() - 1
                        }
                    };
                    // The others stop once the one wanted is healthy.
                    if list[target].is_up() {
                        for (i, instance) in list.iter_mut().enumerate() {
                            if i != target && live(instance) {
                                instance.life = Life::Stopping {
                                    gone_at: now + self.timing.stop_delay,
                                };
                                changed = true;
                            }
                        }
                    }
                }
            }
        }
        self.instances.retain(|_, list| !list.is_empty());
        changed
    }
}

fn spec_of(suite: &Suite, key: &str, version: u64) -> Option<std::sync::Arc<ServiceSpec>> {
    let entry = suite.history(key).find(|e| e.version == version)?;
    match PlainReader.read(entry) {
        Document::Service(spec) => Some(spec),
        _ => None,
    }
}

fn min_healthy_time(suite: &Suite, key: &str) -> Duration {
    suite
        .get(key)
        .and_then(|e| match PlainReader.read(e) {
            Document::Service(spec) => Some(spec.update.min_healthy_time),
            _ => None,
        })
        .unwrap_or(Duration::ZERO)
}
