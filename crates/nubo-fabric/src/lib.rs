//! Running services on a node: the supervision policy ([`policy`], a state machine tested
//! without processes), the exec driver with its limits and logs ([`exec`]) and health probes
//! ([`health`]). The agent decides *what* runs here; this crate knows *how*.

pub mod artifact;
pub mod cgroup;
pub mod docker;
pub mod exec;
pub mod health;
pub mod policy;
pub mod sandbox;
pub mod uids;
