//! `nubo deploy`, `nubo rollback` and `nubo history`: publishing a version of a service and
//! following its rollout until every wanted instance is ready, or saying why it is not.

use std::time::{Duration, Instant};

use clap::Args;
use nubo_agent::authority::Intent;
use nubo_agent::history::HistoryEntry;
use nubo_agent::planner::PlannedService;
use nubo_agent::runner::InstanceStatus;

use crate::services::{Signing, deploy_quietly, publish, resolve_key};
use crate::{AgentTarget, print_json, table};

/// How long a command follows a rollout.
#[derive(Args, Clone, Debug)]
pub struct Follow {
    /// Do not wait: return once the new version is published.
    #[arg(long)]
    pub detach: bool,
    /// How long to wait for every wanted instance to be ready before giving up (the update
    /// goes on), e.g. 30s, 2m.
    #[arg(long, default_value = "2m", value_parser = parse_wait)]
    pub wait: Duration,
}

impl Default for Follow {
    fn default() -> Follow {
        Follow {
            detach: false,
            wait: Duration::from_secs(120),
        }
    }
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    nubo_agent::description::parse_duration(text)
        .ok_or_else(|| "a duration such as 30s or 2m (at most 30 days)".to_string())
}

/// Polls between two looks at a rollout.
const POLL: Duration = Duration::from_millis(500);
/// Looks in a row that find no node for the service before it is called unplaceable.
const UNPLACEABLE_POLLS: u32 = 4;

/// `nubo deploy`.
pub fn deploy(
    file: &std::path::Path,
    signing: &Signing,
    target: &AgentTarget,
    follow: &Follow,
) -> Result<(), String> {
    let (key, version) = deploy_quietly(file, signing, target)?;
    follow_rollout(target, &key, version, follow, "deployed")
}

/// `nubo rollback`: deploys an earlier version's description as a new version.
pub fn rollback(
    name: &str,
    to: Option<u64>,
    signing: &Signing,
    target: &AgentTarget,
    follow: &Follow,
) -> Result<(), String> {
    let key = resolve_key(target, name)?;
    let history = fetch_history(target, &key)?;
    let current = history.last().map_or(0, |h| h.version);
    let chosen = match to {
        Some(version) => history
            .iter()
            .find(|h| h.version == version)
            .ok_or_else(|| {
                format!("{key} has no version {version}; `nubo history {key}` lists those kept")
            })?,
        None => history
            .iter()
            .rev()
            .filter(|h| h.version < current && h.intent == "run")
            .find(|h| !matches!(h.outcome.as_str(), "failed" | "reverted"))
            .ok_or_else(|| {
                format!(
                    "{key} has no earlier version that ran well; `nubo history {key}` lists them"
                )
            })?,
    };
    if chosen.intent != "run" {
        return Err(format!(
            "version {} of {key} {} the service; pick a version that runs it",
            chosen.version,
            if chosen.intent == "stop" {
                "stops"
            } else {
                "removes"
            }
        ));
    }
    let version = publish(
        target,
        signing,
        key.clone(),
        Intent::Run,
        chosen.description.clone(),
    )?;
    eprintln!(
        "rolling {key} back to the description of version {} as version {version}",
        chosen.version
    );
    follow_rollout(target, &key, version, follow, "rolled back")
}

fn fetch_history(target: &AgentTarget, key: &str) -> Result<Vec<HistoryEntry>, String> {
    target
        .client()?
        .json("GET", &format!("/v1/history/{key}"), None)
}

/// `nubo history`.
pub fn history(target: &AgentTarget, name: &str) -> Result<(), String> {
    let key = resolve_key(target, name)?;
    let list = fetch_history(target, &key)?;
    if target.json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            let mut outcome = h.outcome.clone();
            if let Some(failure) = &h.failure {
                outcome.push_str(&format!(" ({failure})"));
            }
            vec![
                h.version.to_string(),
                utc_text(h.version),
                if h.by_administrator {
                    "administrator".to_string()
                } else {
                    h.signer[..h.signer.len().min(12)].to_string()
                },
                h.intent.clone(),
                outcome,
                h.changes.join("; "),
            ]
        })
        .collect();
    table::print(
        &[
            "VERSION",
            "DEPLOYED (UTC)",
            "SIGNER",
            "INTENT",
            "OUTCOME",
            "CHANGES",
        ],
        &rows,
    );
    Ok(())
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS`, in UTC.
pub fn utc_text(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// One line saying where a rollout stands, with each instance.
fn progress_line(planned: &PlannedService, instances: &[InstanceStatus]) -> String {
    let mut line = match (planned.phase.as_str(), planned.batch) {
        ("rolling", Some((batch, batches))) => format!("rolling, batch {batch} of {batches}"),
        (phase, _) => phase.to_string(),
    };
    line.push_str(&format!(
        ": {} of {} ready at version {}",
        planned.ready, planned.wanted, planned.running_version
    ));
    let states: Vec<String> = instances
        .iter()
        .map(|i| format!("{} v{} {}", i.node, i.version, i.state))
        .collect();
    if !states.is_empty() {
        line.push_str(&format!(" [{}]", states.join(", ")));
    }
    line
}

fn reasons_text(planned: &PlannedService) -> String {
    planned
        .reasons
        .iter()
        .map(|r| format!("\n  {r}"))
        .collect::<String>()
}

/// Follows the rollout of `version` of `key` until it completes, fails or `follow.wait`
/// passes, printing its progress; the outcome decides the exit status.
pub fn follow_rollout(
    target: &AgentTarget,
    key: &str,
    version: u64,
    follow: &Follow,
    verb: &str,
) -> Result<(), String> {
    if follow.detach {
        if target.json {
            return print_json(&serde_json::json!({"service": key, "version": version}));
        }
        outln!("{verb} {key} (version {version}); `nubo services` follows its rollout");
        return Ok(());
    }
    eprintln!("{verb} {key} version {version}; waiting until every wanted instance is ready…");
    let client = target.client()?;
    let deadline = Instant::now() + follow.wait;
    let mut shown = String::new();
    let mut unplaceable = 0;
    // Polls spent waiting for a failure's reason to be recorded.
    let mut failed_polls = 0;
    loop {
        let plan: Vec<PlannedService> = client.json("GET", "/v1/services", None)?;
        let instances: Vec<InstanceStatus> = client
            .json::<Vec<InstanceStatus>>("GET", "/v1/ps", None)?
            .into_iter()
            .filter(|i| i.service == key)
            .collect();
        let planned = plan.iter().find(|p| p.key == key && p.version >= version);
        if let Some(planned) = planned {
            if planned.version > version {
                eprintln!(
                    "version {} of {key} was deployed meanwhile; no longer following {version}",
                    planned.version
                );
                return Ok(());
            }
            let line = progress_line(planned, &instances);
            if line != shown {
                eprintln!("  {line}");
                shown = line;
            }
            let finish = |outcome: &str, ok: bool| -> Result<(), String> {
                if target.json {
                    print_json(&serde_json::json!({
                        "service": key,
                        "version": version,
                        "outcome": outcome,
                        "plan": planned,
                        "instances": instances,
                    }))?;
                }
                if ok { Ok(()) } else { Err(outcome.to_string()) }
            };
            if planned.intent != "run" {
                return finish("the service is not running (stopped or removed)", true);
            }
            match planned.phase.as_str() {
                // Done once the suite records it (the next deploy can then go back to it) and
                // every instance carries the version (relabelled ones too).
                "steady"
                    if planned.running_version == version
                        && planned.recorded
                        && instances.iter().all(|i| i.version == version) =>
                {
                    if !target.json {
                        print_instances(
                            &instances
                                .iter()
                                .filter(|i| i.version == version)
                                .cloned()
                                .collect::<Vec<_>>(),
                        );
                        if let Some(problem) = &planned.problem {
                            eprintln!("warning: {problem}{}", reasons_text(planned));
                        }
                    }
                    return finish("complete", true);
                }
                "reverting" | "failed"
                    if planned.problem.as_ref().is_some_and(|p| p.contains(" on "))
                        || failed_polls >= UNPLACEABLE_POLLS =>
                {
                    let problem = planned
                        .problem
                        .clone()
                        .unwrap_or_else(|| format!("version {version} failed"));
                    let what = if planned.phase == "reverting" {
                        format!(
                            "{problem}; reverted to version {} (`nubo history {key}`)",
                            planned.running_version
                        )
                    } else {
                        format!(
                            "{problem}; the update stopped where it was (`nubo rollback {key}` goes back)"
                        )
                    };
                    return finish(&what, false);
                }
                "reverting" | "failed" => failed_polls += 1,
                _ => {}
            }
            if planned.nodes.is_empty() && !planned.reasons.is_empty() {
                unplaceable += 1;
                if unplaceable >= UNPLACEABLE_POLLS {
                    let what = format!(
                        "{key} cannot be placed on any node:{}\nIt stays deployed and starts once nodes qualify; `nubo rm {key}` removes it.",
                        reasons_text(planned)
                    );
                    return finish(&what, false);
                }
            } else {
                unplaceable = 0;
            }
        }
        if Instant::now() >= deadline {
            let what = match planned {
                Some(planned) => format!(
                    "not every instance was ready within {}s: {}{}; the update goes on (`nubo services`)",
                    follow.wait.as_secs(),
                    progress_line(planned, &instances),
                    reasons_text(planned)
                ),
                None => format!(
                    "version {version} of {key} did not show up in the plan within {}s",
                    follow.wait.as_secs()
                ),
            };
            if target.json {
                print_json(
                    &serde_json::json!({"service": key, "version": version, "outcome": what}),
                )?;
            }
            return Err(what);
        }
        std::thread::sleep(POLL);
    }
}

/// Where an instance answers: `name=host:port` for each of its ports.
pub fn addresses(instance: &InstanceStatus) -> String {
    instance
        .ports
        .iter()
        .map(|(name, port)| format!("{name}={}:{port}", instance.host))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The instances, their state and where each answers.
pub fn print_instances(list: &[InstanceStatus]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.service.clone(),
                i.node.clone(),
                i.version.to_string(),
                i.state.clone(),
                i.health.clone(),
                addresses(i),
                i.restarts.to_string(),
            ]
        })
        .collect();
    table::print(
        &[
            "SERVICE", "NODE", "VERSION", "STATE", "HEALTH", "ADDRESS", "RESTARTS",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(1_796_083_115_000), "2026-11-30 23:58:35");
        assert_eq!(utc_text(951_782_400_000), "2000-02-29 00:00:00");
    }
}
