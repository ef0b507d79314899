//! What the core reads in the suite: each entry is a signed document the driver understands
//! (a TOML description in the agent, a plain encoding in the simulator), and the core needs
//! only what placement and rollouts use of it. A [`SpecReader`], installed by the driver,
//! turns an entry into a [`Document`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::rollout::UpdatePolicy;
use crate::service::{Count, Demand, NODE_AVAILABILITY_DEFAULT, PlacementSpec, replicas_for};
use crate::suite::SuiteEntry;

/// What a service document asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Run the service as described.
    Run,
    /// Keep the description but run no instance.
    Stop,
    /// Remove the service.
    Remove,
}

impl Intent {
    /// The intent's name, as shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            Intent::Run => "run",
            Intent::Stop => "stop",
            Intent::Remove => "remove",
        }
    }
}

/// The most a namespace may use across all its services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Bytes of memory.
    pub memory_bytes: u64,
    /// Instances.
    pub instances: u64,
}

/// One version of a service, as placement and rollouts read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// `namespace/name`.
    pub key: String,
    /// Run, stop or remove.
    pub intent: Intent,
    /// Why this version cannot run (its description does not read), if it cannot.
    pub problem: Option<String>,
    /// Where and how many.
    pub placement: PlacementSpec,
    /// How it replaces an older version.
    pub update: UpdatePolicy,
    /// What its instances run: equal fingerprints run the same instance.
    pub fingerprint: u64,
    /// Whether a new instance can start beside an old one on a node (no fixed port).
    pub surge_possible: bool,
    /// The driver that runs it (`exec`, `docker`).
    pub driver: String,
    /// The quota of the grant it was deployed under; `None` for the administrator's.
    pub quota: Option<Quota>,
}

impl ServiceSpec {
    /// The namespace: the key up to its first `/`.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.key)
    }

    /// Instances it wants in a cloud of `size` nodes (shares counted against that size).
    pub fn wanted(&self, size: usize) -> u64 {
        if self.intent != Intent::Run || self.problem.is_some() {
            return 0;
        }
        match &self.placement.count {
            Count::Replicas(n) => u64::from(*n),
            Count::Availability { target } => {
                u64::from(replicas_for(*target, NODE_AVAILABILITY_DEFAULT))
            }
            Count::Share { fraction, .. } => {
                let wanted = (fraction * size as f64).ceil();
                if wanted.is_finite() && wanted > 0.0 {
                    wanted.min(u64::MAX as f64) as u64
                } else {
                    0
                }
            }
        }
    }

    /// What `instances` instances of it use, saturating.
    pub fn usage(&self, instances: u64) -> Usage {
        let demand: Demand = self.placement.demand;
        Usage {
            cpu_millis: demand.cpu_millis.saturating_mul(instances),
            memory_bytes: demand.memory_bytes.saturating_mul(instances),
            instances,
        }
    }
}

/// The namespace of a service key: the key up to its first `/`.
pub fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or(key, |(namespace, _)| namespace)
}

/// Resources counted against a quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Bytes of memory.
    pub memory_bytes: u64,
    /// Instances.
    pub instances: u64,
}

impl Usage {
    /// Both together, saturating.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            instances: self.instances.saturating_add(other.instances),
        }
    }

    /// The first figure over `quota`: its name, the usage and the limit.
    pub fn over(&self, quota: &Quota) -> Option<(&'static str, u64, u64)> {
        [
            ("cpu (millicores)", self.cpu_millis, quota.cpu_millis),
            ("memory (bytes)", self.memory_bytes, quota.memory_bytes),
            ("instances", self.instances, quota.instances),
        ]
        .into_iter()
        .find(|(_, used, allowed)| used > allowed)
    }
}

/// What one suite entry says.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    /// A version of a service.
    Service(Arc<ServiceSpec>),
    /// A node is drained (`on`), or no longer.
    Drain {
        /// The node.
        node: NodeId,
        /// Drained, or the drain undone.
        on: bool,
    },
    /// Nothing placement reads (a document that does not decode, an annotation).
    Other,
}

/// Reads suite entries for the core. The driver installs one: the agent reads signed TOML
/// descriptions, the simulator its own encoding. Entries passed the suite's check before
/// they are read, so a reader only interprets them.
pub trait SpecReader: Send {
    /// What `entry` says.
    fn read(&self, entry: &SuiteEntry) -> Document;
}

/// A reader of entries whose document is the postcard encoding of a [`SimpleDocument`]: the
/// simulator's, and tests'.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainReader;

/// A document in its plain encoding (see [`PlainReader`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SimpleDocument {
    /// A service version.
    Service(Box<ServiceSpec>),
    /// A drain.
    Drain {
        /// The node.
        node: NodeId,
        /// Drained, or not.
        on: bool,
    },
}

impl SimpleDocument {
    /// The suite entry carrying this document under `key` at `version`.
    pub fn to_entry(&self, key: &str, version: u64) -> SuiteEntry {
        SuiteEntry {
            key: key.to_string(),
            version,
            document: postcard::to_allocvec(self).unwrap_or_default().into(),
        }
    }
}

impl SpecReader for PlainReader {
    fn read(&self, entry: &SuiteEntry) -> Document {
        if crate::suite::annotated(&entry.key).is_some() {
            return Document::Other;
        }
        match postcard::from_bytes::<SimpleDocument>(&entry.document) {
            Ok(SimpleDocument::Service(spec)) if spec.key == entry.key => {
                Document::Service(Arc::new(*spec))
            }
            Ok(SimpleDocument::Drain { node, on }) => Document::Drain { node, on },
            _ => Document::Other,
        }
    }
}
