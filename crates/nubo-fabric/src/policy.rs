//! The supervision policy of one instance, as a state machine without processes: what to do
//! when it should start, when it exits, when a health check answers, when it should stop, and
//! when time passes. The driver performs the [`Action`]s and reports back.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Failed health checks in a row after which a running instance that was healthy is
/// restarted. Checks of an instance that was never healthy since its start do not count:
/// it is starting, and an update's deadline judges it.
pub const UNHEALTHY_MAX: u32 = 3;

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Asked to start; the process is being spawned.
    Starting,
    /// The process runs.
    Running,
    /// It exited and waits to be restarted.
    Backoff,
    /// Asked to stop: terminated, killed if it does not exit within the grace period.
    Stopping,
    /// Stopped on purpose.
    Stopped,
    /// It kept failing: no more restarts.
    Failed,
}

impl Phase {
    /// The phase's name, as shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Backoff => "restarting",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start the process.
    Spawn,
    /// Ask the process group to stop (SIGTERM).
    Terminate,
    /// Kill the process group (SIGKILL).
    Kill,
}

/// Restarts and stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Failures in a row before giving up.
    pub attempts: u32,
    /// First restart delay, doubled each failure...
    pub delay: Duration,
    /// ...up to this.
    pub max_delay: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Running healthy this long forgives past failures.
    pub stable_after: Duration,
}

/// One instance's supervisor. Times are durations since any fixed origin.
///
/// Contract: every input returns the actions to perform, in order; `poll_timeout` says when
/// `tick` must run next. An instance asked to stop is never spawned again.
#[derive(Clone, Debug)]
pub struct Supervisor {
    policy: Policy,
    phase: Phase,
    failures: u32,
    unhealthy: u32,
    healthy: Option<bool>,
    restarts: u32,
    deadline: Option<Duration>,
    running_since: Duration,
    last_exit: Option<i32>,
}

impl Supervisor {
    /// A supervisor that starts the instance now.
    pub fn start(policy: Policy) -> (Supervisor, Vec<Action>) {
        let supervisor = Supervisor {
            policy,
            phase: Phase::Starting,
            failures: 0,
            unhealthy: 0,
            healthy: None,
            restarts: 0,
            deadline: None,
            running_since: Duration::ZERO,
            last_exit: None,
        };
        (supervisor, vec![Action::Spawn])
    }

    /// A supervisor of a process already running (adopted after an agent restart).
    pub fn adopt(policy: Policy, now: Duration) -> Supervisor {
        let (mut supervisor, _) = Supervisor::start(policy);
        supervisor.phase = Phase::Running;
        supervisor.running_since = now;
        supervisor
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The last health check's answer, if any since the last start.
    pub fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The last exit status (negative: killed by that signal).
    pub fn last_exit(&self) -> Option<i32> {
        self.last_exit
    }

    /// The process was spawned.
    pub fn spawned(&mut self, now: Duration) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Running;
            self.running_since = now;
            self.healthy = None;
            self.unhealthy = 0;
        }
    }

    /// Spawning failed (e.g. no such program): counts as an exit.
    pub fn spawn_failed(&mut self, now: Duration) -> Vec<Action> {
        self.phase = Phase::Running;
        self.exited(now, -1)
    }

    /// The process exited with `status`.
    pub fn exited(&mut self, now: Duration, status: i32) -> Vec<Action> {
        self.last_exit = Some(status);
        self.healthy = None;
        match self.phase {
            Phase::Stopping => {
                self.phase = Phase::Stopped;
                self.deadline = None;
            }
            Phase::Running | Phase::Starting => {
                if now.saturating_sub(self.running_since) >= self.policy.stable_after {
                    self.failures = 0;
                }
                self.failures += 1;
                if self.failures > self.policy.attempts {
                    self.phase = Phase::Failed;
                    self.deadline = None;
                } else {
                    let doubling = 2u32.saturating_pow(self.failures - 1);
                    let delay = self
                        .policy
                        .delay
                        .saturating_mul(doubling)
                        .min(self.policy.max_delay);
                    self.phase = Phase::Backoff;
                    self.deadline = Some(now + delay);
                }
            }
            Phase::Backoff | Phase::Stopped | Phase::Failed => {}
        }
        Vec::new()
    }

    /// A health check answered.
    pub fn health(&mut self, now: Duration, ok: bool) -> Vec<Action> {
        if self.phase != Phase::Running || (!ok && self.healthy.is_none()) {
            return Vec::new();
        }
        self.healthy = Some(ok);
        if ok {
            self.unhealthy = 0;
            if now.saturating_sub(self.running_since) >= self.policy.stable_after {
                self.failures = 0;
            }
            return Vec::new();
        }
        self.unhealthy += 1;
        if self.unhealthy >= UNHEALTHY_MAX {
            // Restart it: its exit will schedule the next start.
            self.unhealthy = 0;
            return vec![Action::Terminate];
        }
        Vec::new()
    }

    /// The instance should stop.
    pub fn stop(&mut self, now: Duration) -> Vec<Action> {
        match self.phase {
            Phase::Starting | Phase::Running => {
                self.phase = Phase::Stopping;
                self.deadline = Some(now + self.policy.grace);
                vec![Action::Terminate]
            }
            Phase::Backoff | Phase::Failed => {
                self.phase = Phase::Stopped;
                self.deadline = None;
                Vec::new()
            }
            Phase::Stopping | Phase::Stopped => Vec::new(),
        }
    }

    /// When `tick` must run next.
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.deadline
    }

    /// Time passed.
    pub fn tick(&mut self, now: Duration) -> Vec<Action> {
        match (self.phase, self.deadline) {
            (Phase::Backoff, Some(at)) if now >= at => {
                self.phase = Phase::Starting;
                self.deadline = None;
                self.restarts += 1;
                vec![Action::Spawn]
            }
            (Phase::Stopping, Some(at)) if now >= at => {
                self.deadline = None;
                vec![Action::Kill]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        attempts: 2,
        delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(3),
        grace: Duration::from_secs(5),
        stable_after: Duration::from_secs(60),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn crashes_restart_with_doubling_delay_then_give_up() {
        let (mut s, actions) = Supervisor::start(POLICY);
        assert_eq!(actions, vec![Action::Spawn]);
        s.spawned(secs(0));
        assert_eq!(s.exited(secs(1), 1), vec![]);
        assert_eq!(s.phase(), Phase::Backoff);
        assert_eq!(s.poll_timeout(), Some(secs(2)));
        assert_eq!(s.tick(secs(1)), vec![]);
        assert_eq!(s.tick(secs(2)), vec![Action::Spawn]);
        s.spawned(secs(2));
        s.exited(secs(3), 1);
        assert_eq!(s.poll_timeout(), Some(secs(5)), "the delay doubled");
        assert_eq!(s.tick(secs(5)), vec![Action::Spawn]);
        s.spawned(secs(5));
        s.exited(secs(6), 1);
        assert_eq!(s.phase(), Phase::Failed);
        assert_eq!(s.restarts(), 2);
        assert_eq!(s.last_exit(), Some(1));
        assert_eq!(s.tick(secs(100)), vec![]);
    }

    #[test]
    fn a_long_healthy_run_forgives_earlier_failures() {
        let (mut s, _) = Supervisor::start(POLICY);
        s.spawned(secs(0));
        s.exited(secs(1), 1);
        s.tick(secs(2));
        s.spawned(secs(2));
        assert_eq!(s.health(secs(100), true), vec![]);
        assert_eq!(s.healthy(), Some(true));
        s.exited(secs(101), 1);
        assert_eq!(s.poll_timeout(), Some(secs(102)), "first failure again");
    }

    #[test]
    fn unhealthy_instances_are_restarted() {
        let (mut s, _) = Supervisor::start(POLICY);
        s.spawned(secs(0));
        for t in 1..10 {
            assert_eq!(s.health(secs(t), false), vec![], "still starting");
        }
        assert_eq!(s.healthy(), None);
        assert_eq!(s.health(secs(10), true), vec![]);
        assert_eq!(s.health(secs(1), false), vec![]);
        assert_eq!(s.health(secs(2), false), vec![]);
        assert_eq!(s.health(secs(3), false), vec![Action::Terminate]);
        s.exited(secs(4), -15);
        assert_eq!(s.phase(), Phase::Backoff);
    }

    #[test]
    fn stopping_terminates_then_kills_after_the_grace_period() {
        let (mut s, _) = Supervisor::start(POLICY);
        s.spawned(secs(0));
        assert_eq!(s.stop(secs(10)), vec![Action::Terminate]);
        assert_eq!(s.tick(secs(14)), vec![]);
        assert_eq!(s.tick(secs(15)), vec![Action::Kill]);
        s.exited(secs(15), -9);
        assert_eq!(s.phase(), Phase::Stopped);
        assert_eq!(s.tick(secs(100)), vec![], "never spawned again");
        // Stopping an instance waiting to restart needs no signal.
        let (mut t, _) = Supervisor::start(POLICY);
        t.spawned(secs(0));
        t.exited(secs(1), 1);
        assert_eq!(t.stop(secs(1)), vec![]);
        assert_eq!(t.phase(), Phase::Stopped);
        assert_eq!(t.tick(secs(10)), vec![]);
    }
}
