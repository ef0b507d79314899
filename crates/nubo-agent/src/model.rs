//! What the local API answers, shared by the agent (which serialises it) and the CLI (which
//! reads it back and prints it).

use std::collections::BTreeMap;

use nubo_net::{KindTraffic, NetCounters};
use nubo_proto::aggregation::Resources;
use nubo_proto::kv::Version;
use nubo_proto::membership::MembershipCounters;
use serde::{Deserialize, Serialize};

/// `GET /v1/status`: this agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// This node's id.
    pub node_id: String,
    /// The cloud's id.
    pub cloud_id: String,
    /// The agent's version.
    pub version: String,
    /// Where the node listens (UDP, QUIC).
    pub listen: String,
    /// The address other nodes reach it at.
    pub advertise: String,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Members alive, this node included.
    pub members_alive: usize,
    /// Members known, in any state, this node included.
    pub members_known: usize,
    /// Overlay neighbours (short ids).
    pub neighbors: Vec<String>,
    /// Nodes in the passive view.
    pub passive: usize,
    /// The ring successor and predecessor (short ids).
    pub ring_successor: Option<String>,
    /// The ring predecessor.
    pub ring_predecessor: Option<String>,
    /// Whether the ring view has settled since start; key-value operations wait until it
    /// has (a second or so after a start).
    #[serde(default)]
    pub ring_settled: bool,
    /// Key-value records held here, and their bytes.
    pub kv_records: usize,
    /// Bytes of the records held here.
    pub kv_bytes: usize,
    /// Key-value operations in progress.
    pub kv_ops: usize,
    /// Saves to disk that failed since start (the data stays in memory and on replicas).
    pub persist_failures: u64,
    /// Records found damaged on disk at start (their replicas restore them).
    pub records_damaged_at_start: usize,
    /// Transport counters.
    pub net: NetCounters,
    /// Frames queued since start and their bytes, per message kind.
    #[serde(default)]
    pub net_by_kind: BTreeMap<String, KindTraffic>,
    /// What the overlay did since start: neighbours lost, requests unanswered, escalations.
    #[serde(default)]
    pub membership: MembershipCounters,
    /// What the operator should fix.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// How instances' limits are enforced (cgroup v2, v1, or none).
    #[serde(default)]
    pub limits: String,
    /// How instances are isolated from the node and each other.
    #[serde(default)]
    pub isolation: String,
}

/// `GET /v1/nodes`: one member of the cloud.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: Option<String>,
    /// `alive`, `gone` or `left`.
    pub state: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// What it announces about itself.
    pub attributes: BTreeMap<String, String>,
    /// Seconds since it was last heard of (0 for this node).
    pub last_heard_secs: f64,
    /// Whether it is the node answering.
    pub this_node: bool,
    /// Whether it is drained: it takes no new instance and its instances move away.
    #[serde(default)]
    pub draining: bool,
}

/// `GET /v1/stats`: the cloud as aggregation sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Members alive in the roster.
    pub members_alive: usize,
    /// The aggregation epoch of the figures below, once one has completed.
    pub epoch: Option<u64>,
    /// Estimated number of nodes.
    pub size_estimate: Option<f64>,
    /// Sums over all nodes.
    pub totals: Option<Resources>,
    /// Averages over all nodes.
    pub averages: Option<Resources>,
    /// Minimums over all nodes.
    pub minimum: Option<Resources>,
    /// Maximums over all nodes.
    pub maximum: Option<Resources>,
    /// This node's estimated rank by its slicing attribute, in [0, 1].
    pub rank: f64,
}

/// `PUT` or `DELETE /v1/kv/KEY`: the write was stored by a quorum.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Written {
    /// The key.
    pub key: String,
    /// The version written.
    pub version: String,
}

/// `GET /v1/kv-local/KEY`: what this node itself holds of a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalRecord {
    /// The key.
    pub key: String,
    /// Whether this node holds a record (or tombstone) of it.
    pub held: bool,
    /// Its version.
    pub version: Option<String>,
    /// Whether the record is a tombstone.
    pub deleted: bool,
}

/// `POST /v1/invite`: a join token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Invite {
    /// The token for `nubo agent --join`.
    pub token: String,
    /// When it expires (seconds since the Unix epoch).
    pub expires_unix_secs: u64,
    /// The contacts it names.
    pub contacts: Vec<String>,
}

/// `POST /v1/blobs`: a stored blob.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobStored {
    /// The blob's id (the hash of its manifest).
    pub id: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its chunks.
    pub chunks: usize,
}

/// `GET /v1/services/KEY`: a service's current document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceDocument {
    /// `namespace/name`.
    pub key: String,
    /// Its version.
    pub version: u64,
    /// `run`, `stop` or `remove`.
    pub intent: String,
    /// The description as deployed.
    pub description: String,
    /// The signer's public key (hexadecimal).
    pub signer: String,
}

/// Every API error: a message that says what to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong.
    pub error: String,
}

/// A version as text: `millis.counter@writer`.
pub fn version_text(version: &Version) -> String {
    format!(
        "{}.{}@{}",
        version.millis,
        version.counter,
        version.writer.short()
    )
}
