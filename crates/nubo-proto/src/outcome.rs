//! What became of a service's updates: an annotation of the service in the suite
//! (`namespace/name#status`), so that every node, also after a restart of the whole cloud,
//! knows which version completed (where a failed one reverts to) and which failed.
//!
//! The node that plans a service records that a version completed (every placed node ready)
//! or that it failed on a node (its instance never became healthy there). Each writes the outcome it saw merged into the
//! status it holds, one version higher; an outcome once recorded for a version is never
//! changed. If two nodes write at once, the suite keeps one of the two documents everywhere
//! and the other writer, not finding its outcome, writes it again.

use std::collections::BTreeMap;

use crate::suite::SuiteEntry;
use serde::{Deserialize, Serialize};

/// The suffix of a status annotation's key.
pub const STATUS_SUFFIX: &str = "#status";
/// Most outcomes kept (the oldest go first).
pub const OUTCOMES_MAX: usize = 32;
/// Longest failure reason, in bytes.
pub const REASON_BYTES_MAX: usize = 256;

/// The key of a service's status annotation.
pub fn status_key(service: &str) -> String {
    format!("{service}{STATUS_SUFFIX}")
}

/// The service a status key annotates.
pub fn service_of_status(key: &str) -> Option<&str> {
    key.strip_suffix(STATUS_SUFFIX)
        .filter(|service| !service.contains('#'))
}

/// How an update to one version ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every node placed for it ran it, ready.
    Complete {
        /// When (Unix milliseconds, the writer's clock).
        at_unix_ms: u64,
    },
    /// It never became healthy on a node.
    Failed {
        /// When (Unix milliseconds, the writer's clock).
        at_unix_ms: u64,
        /// The node (short id).
        node: String,
        /// Why.
        reason: String,
    },
}

/// The outcomes of a service's updates, by version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployStatus {
    /// Version to outcome.
    pub outcomes: BTreeMap<u64, Outcome>,
}

impl DeployStatus {
    /// The status in a suite entry, if the entry holds a valid one for its key.
    pub fn from_entry(entry: &SuiteEntry) -> Option<DeployStatus> {
        service_of_status(&entry.key)?;
        let status: DeployStatus = postcard::from_bytes(&entry.document).ok()?;
        status.is_within_bounds().then_some(status)
    }

    /// Whether it respects its bounds.
    pub fn is_within_bounds(&self) -> bool {
        self.outcomes.len() <= OUTCOMES_MAX
            && self.outcomes.values().all(|o| match o {
                Outcome::Complete { .. } => true,
                Outcome::Failed { node, reason, .. } => {
                    node.len() <= 64 && reason.len() <= REASON_BYTES_MAX
                }
            })
    }

    /// Whether `version` completed.
    pub fn completed(&self, version: u64) -> bool {
        matches!(self.outcomes.get(&version), Some(Outcome::Complete { .. }))
    }

    /// Whether `version` failed.
    pub fn failed(&self, version: u64) -> bool {
        matches!(self.outcomes.get(&version), Some(Outcome::Failed { .. }))
    }

    /// The newest version below `below` that completed.
    pub fn stable_below(&self, below: u64) -> Option<u64> {
        self.outcomes
            .range(..below)
            .rev()
            .find(|(_, o)| matches!(o, Outcome::Complete { .. }))
            .map(|(v, _)| *v)
    }

    /// This status with `outcome` recorded for `version`, unless one is already; `None`
    /// when nothing changes.
    pub fn with(&self, version: u64, mut outcome: Outcome) -> Option<DeployStatus> {
        if self.outcomes.contains_key(&version) {
            return None;
        }
        if let Outcome::Failed { reason, .. } = &mut outcome {
            truncate_at_char(reason, REASON_BYTES_MAX);
        }
        let mut next = self.clone();
        next.outcomes.insert(version, outcome);
        while next.outcomes.len() > OUTCOMES_MAX {
            next.outcomes.pop_first();
        }
        Some(next)
    }

    /// The suite entry carrying this status for `service`, one version above `previous`.
    pub fn to_entry(&self, service: &str, previous: Option<u64>) -> SuiteEntry {
        SuiteEntry {
            key: status_key(service),
            version: previous.map_or(1, |v| v.saturating_add(1)),
            document: postcard::to_allocvec(self).unwrap_or_default().into(),
        }
    }
}

fn truncate_at_char(text: &mut String, bytes: usize) {
    if text.len() > bytes {
        let mut end = bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_recorded_once_and_bounded() {
        let empty = DeployStatus::default();
        let done = empty.with(5, Outcome::Complete { at_unix_ms: 1 }).unwrap();
        assert!(done.with(5, Outcome::Complete { at_unix_ms: 2 }).is_none());
        let failed = done
            .with(
                7,
                Outcome::Failed {
                    at_unix_ms: 3,
                    node: "ab12".into(),
                    reason: "é".repeat(200),
                },
            )
            .unwrap();
        assert!(failed.is_within_bounds());
        assert_eq!(failed.stable_below(7), Some(5));
        assert_eq!(failed.stable_below(5), None);
        assert!(failed.failed(7) && failed.completed(5));
        let entry = failed.to_entry("web/site", Some(4));
        assert_eq!((entry.key.as_str(), entry.version), ("web/site#status", 5));
        assert_eq!(DeployStatus::from_entry(&entry), Some(failed.clone()));
        let mut many = DeployStatus::default();
        for v in 0..40 {
            many = many.with(v, Outcome::Complete { at_unix_ms: v }).unwrap();
        }
        assert_eq!(many.outcomes.len(), OUTCOMES_MAX);
        assert_eq!(many.outcomes.keys().next(), Some(&8));
        assert_eq!(service_of_status("web/site#status"), Some("web/site"));
        assert_eq!(service_of_status("web/site#x#status"), None);
    }
}
