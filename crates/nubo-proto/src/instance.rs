//! What a node says about the service instances it runs: one [`InstanceFact`] per instance,
//! carried in its roster announcement, so that every node sees every instance of the cloud
//! and decides an update's next step from the same facts.

use serde::{Deserialize, Serialize};

use crate::suite::KEY_BYTES_MAX;

/// Most instances one node reports.
pub const INSTANCE_FACTS_MAX: usize = 64;
/// Most named ports of one instance.
pub const PORTS_MAX: usize = 8;
/// Longest port name.
pub const PORT_NAME_BYTES_MAX: usize = 63;
/// Longest note.
pub const NOTE_BYTES_MAX: usize = 200;

/// Where an instance is in its life, as far as an update cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum InstanceState {
    /// Being prepared or started, or running but not yet healthy.
    Starting,
    /// Healthy (or, without a health check, running), for less than the update's
    /// `min_healthy_time`.
    Healthy,
    /// Healthy without a break for at least `min_healthy_time`: an update may move on.
    Ready,
    /// It was healthy and its checks now fail.
    Unhealthy,
    /// It exited and waits to be started again.
    Restarting,
    /// Being stopped.
    Stopping,
    /// It never became healthy within the update's `healthy_deadline`, or kept failing before
    /// it ever was: the version fails on this node.
    Failed,
}

impl InstanceState {
    /// The state's name, as shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Restarting => "restarting",
            InstanceState::Stopping => "stopping",
            InstanceState::Failed => "failed",
        }
    }

    /// Whether the instance answers as it should.
    pub fn is_healthy(self) -> bool {
        matches!(self, InstanceState::Healthy | InstanceState::Ready)
    }
}

/// One instance, as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct InstanceFact {
    /// The service's key, `namespace/name`.
    pub service: String,
    /// The version of the description it runs.
    pub version: u64,
    /// Its state.
    pub state: InstanceState,
    /// How often it was restarted.
    pub restarts: u32,
    /// Its named ports on the node's address.
    pub ports: Vec<(String, u16)>,
    /// What it last hit that an operator should know (a limit), or nothing.
    pub note: String,
}

impl InstanceFact {
    /// Whether every field respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        self.service.len() <= KEY_BYTES_MAX
            && self.note.len() <= NOTE_BYTES_MAX
            && self.ports.len() <= PORTS_MAX
            && self
                .ports
                .iter()
                .all(|(name, _)| name.len() <= PORT_NAME_BYTES_MAX)
    }
}
