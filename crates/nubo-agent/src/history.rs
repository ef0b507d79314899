//! A service's history: every version the suite holds, who signed it, what it changed and how
//! its update ended, for `nubo history` and `nubo rollback`.

use serde::{Deserialize, Serialize};

use crate::authority::{Intent, SignedDocument};
use crate::description::{self, Service};
use nubo_proto::outcome::{DeployStatus, Outcome};

/// One version of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The version (milliseconds since the Unix epoch when it was signed).
    pub version: u64,
    /// `run`, `stop` or `remove`.
    pub intent: String,
    /// The signer's public key, hexadecimal.
    pub signer: String,
    /// Whether the signer was the administrator.
    pub by_administrator: bool,
    /// What changed from the version before (placement, resources, artifact, program…).
    pub changes: Vec<String>,
    /// `running`, `deploying` (not yet complete), `replaced`, `reverted`, `failed`, `stopped` or
    /// `removed`.
    pub outcome: String,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// The description as deployed.
    pub description: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What differs between two descriptions, in words.
pub fn changes(old: &Service, new: &Service) -> Vec<String> {
    let mut changed = Vec::new();
    let mut compare = |what: &str, a: String, b: String| {
        if a != b {
            changed.push(format!("{what} {a} -> {b}"));
        }
    };
    compare(
        "count",
        format!("{:?}", old.placement.count),
        format!("{:?}", new.placement.count),
    );
    let constraints = |s: &Service| {
        let list: Vec<String> = s
            .placement
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("[{}]", list.join(", "))
    };
    compare("constraints", constraints(old), constraints(new));
    compare(
        "spread",
        format!("{:?}", old.placement.spread),
        format!("{:?}", new.placement.spread),
    );
    let (a, b) = (old.placement.demand, new.placement.demand);
    compare(
        "cpu",
        format!("{}", a.cpu_millis as f64 / 1000.0),
        format!("{}", b.cpu_millis as f64 / 1000.0),
    );
    compare(
        "memory",
        nubo_proto::service::bytes_text(a.memory_bytes),
        nubo_proto::service::bytes_text(b.memory_bytes),
    );
    let short = |artifact: &Option<String>| {
        artifact.as_ref().map_or_else(
            || "none".to_string(),
            |id| id[..id.len().min(12)].to_string(),
        )
    };
    compare(
        "artifact",
        short(&old.run.artifact),
        short(&new.run.artifact),
    );
    let program = |s: &Service| format!("{} {}", s.run.command, s.run.args.join(" "));
    compare("command", program(old), program(new));
    if old.run.env != new.run.env {
        changed.push("environment changed".into());
    }
    if old.ports != new.ports {
        changed.push("ports changed".into());
    }
    if old.health != new.health {
        changed.push("health check changed".into());
    }
    if old.restart != new.restart {
        changed.push("restart policy changed".into());
    }
    if old.update != new.update {
        changed.push("update settings changed".into());
    }
    changed
}

/// The history of a service from its suite entries (oldest first), its status, and the
/// version its instances converge to now.
pub fn history(
    entries: &[SignedDocument],
    status: &DeployStatus,
    running_version: Option<u64>,
    admin_key: &[u8; 32],
) -> Vec<HistoryEntry> {
    let latest = entries.last().map(|s| s.document.version);
    let mut previous: Option<Service> = None;
    let mut out = Vec::new();
    for signed in entries {
        let document = &signed.document;
        let service = description::parse(&document.description).ok();
        let changes = match (&previous, &service, document.intent) {
            (Some(old), Some(new), Intent::Run) => changes(old, new),
            (None, Some(_), Intent::Run) => vec!["first version held".to_string()],
            _ => Vec::new(),
        };
        let v = document.version;
        let (outcome, failure) = match (document.intent, status.outcomes.get(&v)) {
            (Intent::Stop, _) => ("stopped", None),
            (Intent::Remove, _) => ("removed", None),
            (Intent::Run, Some(Outcome::Failed { node, reason, .. })) => {
                let reverted = service.as_ref().is_some_and(|s| s.update.auto_revert)
                    && status.stable_below(v).is_some();
                (
                    if reverted { "reverted" } else { "failed" },
                    Some(format!("on {node}: {reason}")),
                )
            }
            (Intent::Run, _) if Some(v) == running_version => {
                if status.completed(v) || Some(v) != latest {
                    ("running", None)
                } else {
                    ("deploying", None)
                }
            }
            (Intent::Run, _) => ("replaced", None),
        };
        out.push(HistoryEntry {
            version: v,
            intent: format!("{:?}", document.intent).to_lowercase(),
            signer: hex(&document.signer),
            by_administrator: &document.signer == admin_key,
            changes,
            outcome: outcome.to_string(),
            failure,
            description: document.description.clone(),
        });
        if document.intent == Intent::Run && service.is_some() {
            previous = service;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = "name = \"site\"\nnamespace = \"web\"\n[run]\ncommand = \"python3\"\n[resources]\ncpu = 0.2\n[placement]\nreplicas = 3\n";

    #[test]
    fn changes_are_told_in_words() {
        let old = description::parse(SITE).unwrap();
        let new = description::parse(
            &SITE
                .replace("cpu = 0.2", "cpu = 0.25")
                .replace("replicas = 3", "replicas = 5"),
        )
        .unwrap();
        assert_eq!(
            changes(&old, &new),
            vec!["count Replicas(3) -> Replicas(5)", "cpu 0.2 -> 0.25"]
        );
        assert!(changes(&old, &old).is_empty());
    }
}
