//! Commands about services: keys and grants, validate, deploy, services, ps, logs, stop, rm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use nubo_agent::authority::{Document, Grant, Intent, Quota, SignedDocument, SignedGrant};
use nubo_agent::description;
use nubo_agent::model::ServiceDocument;
use nubo_agent::planner::PlannedService;
use nubo_agent::runner::InstanceStatus;
use nubo_net::Identity;

use nubo_proto::service::parse_quantity;

use crate::{AgentTarget, print_json, table};

/// A signing key's public half, as the CLI prints it.
#[derive(serde::Serialize)]
struct KeyCreated {
    public_key: String,
    secret_file: String,
}

/// `nubo key ...`
#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a signing key for deploying services; prints its public key.
    #[command(
        after_help = "Example:\n  nubo key new            # then ask the administrator: nubo grant --namespace web --key <printed key>"
    )]
    New {
        /// Where to keep the secret key.
        #[arg(long, default_value_os_t = default_key_path())]
        out: PathBuf,
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `nubo grant`
#[derive(Args)]
pub struct GrantArgs {
    /// The namespace granted.
    #[arg(long)]
    namespace: String,
    /// The user's public key (from `nubo key new`), hexadecimal.
    #[arg(long)]
    key: String,
    /// Cores the namespace may use in all.
    #[arg(long, default_value_t = 4.0)]
    cpu: f64,
    /// Memory the namespace may use in all.
    #[arg(long, default_value = "4GiB")]
    memory: String,
    /// Instances the namespace may run in all.
    #[arg(long, default_value_t = 20)]
    instances: u64,
    /// Days the grant stays valid.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// The administrator's secret key (default: admin.key in the configuration directory,
    /// where `nubo init` put it).
    #[arg(long, env = "NUBO_KEY")]
    admin_key: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// How a deploy is signed.
#[derive(Args, Clone, Default)]
pub struct Signing {
    /// The signing key (default: the administrator's admin.key in the configuration
    /// directory if there is one, else the key of `nubo key new`).
    #[arg(long, env = "NUBO_KEY")]
    key: Option<PathBuf>,
    /// The grant (text from `nubo grant`, or a file holding it; default: ~/.config/nubo/grant
    /// if it exists). Not needed with the administrator's key.
    #[arg(long)]
    grant: Option<String>,
}

impl Signing {
    /// Signing with the key at `path`.
    pub fn with_key(path: PathBuf) -> Signing {
        Signing {
            key: Some(path),
            grant: None,
        }
    }
}

fn config_dir() -> PathBuf {
    nubo_agent::setup::config_dir()
}

fn default_key_path() -> PathBuf {
    config_dir().join("user.key")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn read_key(path: &Path) -> Result<Identity, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Identity::from_secret(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn unix_millis() -> u64 {
    nubo_agent::clock::unix_now().as_millis() as u64
}

/// `nubo key new`.
pub fn key(command: KeyCommand) -> Result<(), String> {
    let KeyCommand::New { out, force, json } = command;
    if out.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to replace it (deploys signed with it will need the new key's grant)",
            out.display()
        ));
    }
    let identity = Identity::generate().map_err(|e| e.to_string())?;
    let dir = out.parent().unwrap_or(Path::new("."));
    let store = nubo_store::DataDir::create(dir).map_err(|e| e.to_string())?;
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("--out must name a file")?;
    store
        .write_secret(name, &identity.secret())
        .map_err(|e| e.to_string())?;
    if json {
        return print_json(&KeyCreated {
            public_key: hex(&identity.public_key()),
            secret_file: out.display().to_string(),
        });
    }
    outln!("{}", hex(&identity.public_key()));
    eprintln!(
        "secret key in {}; ask the administrator for a grant: nubo grant --namespace NAME --key {}",
        out.display(),
        hex(&identity.public_key())
    );
    Ok(())
}

/// `nubo grant`.
pub fn grant(args: GrantArgs) -> Result<(), String> {
    let path = args
        .admin_key
        .clone()
        .unwrap_or_else(nubo_agent::setup::default_admin_key);
    let admin = read_key(&path).map_err(|e| {
        format!("{e}: only the administrator can grant (with the key `nubo init` wrote; --admin-key PATH)")
    })?;
    let user_key: [u8; 32] = unhex(&args.key)
        .and_then(|b| b.try_into().ok())
        .ok_or("--key is a public key of 64 hexadecimal digits, as `nubo key new` prints")?;
    let memory = parse_quantity(&args.memory)
        .filter(|m| (0.0..1e19).contains(m))
        .ok_or("--memory is a size such as 4GiB")?;
    if !(args.cpu.is_finite() && args.cpu >= 0.0 && args.cpu <= 1e6) {
        return Err("--cpu is a number of cores, such as 2 or 0.5".into());
    }
    let expires = args
        .days
        .checked_mul(86_400)
        .and_then(|s| s.checked_add(nubo_agent::clock::unix_now().as_secs()))
        .ok_or("--days is too large")?;
    let grant = SignedGrant::sign(
        &admin,
        Grant {
            namespace: args.namespace,
            user_key,
            quota: Quota {
                cpu_millis: (args.cpu * 1000.0) as u64,
                memory_bytes: memory as u64,
                instances: args.instances,
            },
            expires_unix_secs: expires,
        },
    );
    if args.json {
        return print_json(&serde_json::json!({
            "grant": grant.encode(),
            "namespace": grant.grant.namespace,
            "expires_unix_secs": grant.grant.expires_unix_secs,
        }));
    }
    outln!("{}", grant.encode());
    eprintln!("give this grant to the user; they deploy with --grant <text or file>");
    Ok(())
}

/// `nubo validate`.
pub fn validate(file: &Path, json: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    match description::parse(&text) {
        Ok(service) => {
            if json {
                return print_json(&service);
            }
            outln!("{}: valid ({})", file.display(), service.key());
            Ok(())
        }
        Err(errors) => {
            if json {
                print_json(&errors)?;
            } else {
                for error in &errors {
                    eprintln!("{}:{error}", file.display());
                }
            }
            Err(format!("{} problem(s) in {}", errors.len(), file.display()))
        }
    }
}

fn signer(
    signing: &Signing,
    target: &AgentTarget,
) -> Result<(Identity, Option<SignedGrant>), String> {
    let admin_path = nubo_agent::setup::default_admin_key();
    // Clouds made before the key moved out of the data directory keep it there.
    let legacy = target.data_dir.join(nubo_agent::setup::ADMIN_KEY_FILE);
    let key_path = match &signing.key {
        Some(path) => path.clone(),
        None if admin_path.exists() => admin_path,
        None if default_key_path().exists() => default_key_path(),
        None if legacy.exists() => {
            eprintln!(
                "warning: signing with {}, which sits in the agent's data directory; move it to {}",
                legacy.display(),
                admin_path.display()
            );
            legacy
        }
        None => {
            return Err(
                "no signing key: create one with `nubo key new`, then ask the administrator for a grant (`nubo grant`)"
                    .into(),
            );
        }
    };
    let identity = read_key(&key_path)?;
    let grant_text = match &signing.grant {
        Some(text) if Path::new(text).exists() => {
            Some(std::fs::read_to_string(text).map_err(|e| format!("{text}: {e}"))?)
        }
        Some(text) => Some(text.clone()),
        None => std::fs::read_to_string(config_dir().join("grant")).ok(),
    };
    let grant = match grant_text {
        Some(text) => Some(SignedGrant::decode(&text).map_err(|e| e.to_string())?),
        None => None,
    };
    Ok((identity, grant))
}

fn current(target: &AgentTarget, key: &str) -> Result<Option<ServiceDocument>, String> {
    match target
        .client()?
        .json::<ServiceDocument>("GET", &format!("/v1/services/{key}"), None)
    {
        Ok(document) => Ok(Some(document)),
        Err(e) if e.contains("HTTP 404") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Signs a document for `key` with the next version and publishes it; returns the version.
pub fn publish(
    target: &AgentTarget,
    signing: &Signing,
    key: String,
    intent: Intent,
    description: String,
) -> Result<u64, String> {
    let previous = current(target, &key)?;
    let (identity, grant) = signer(signing, target)?;
    let version = unix_millis().max(previous.map_or(0, |p| p.version + 1));
    let signed = SignedDocument::sign(
        &identity,
        Document {
            key,
            version,
            intent,
            description,
            signer: identity.public_key(),
            grant,
        },
    );
    let bytes = postcard::to_allocvec(&signed).map_err(|e| e.to_string())?;
    let _: serde_json::Value = target
        .client()?
        .json("POST", "/v1/services", Some(&bytes))?;
    Ok(version)
}

/// Deploys `file`; returns the service's key and version.
pub fn deploy_quietly(
    file: &Path,
    signing: &Signing,
    target: &AgentTarget,
) -> Result<(String, u64), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let service = description::parse(&text).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}:{e}", file.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let key = service.key();
    let version = publish(target, signing, key.clone(), Intent::Run, text)?;
    Ok((key, version))
}

/// The key of the service `name`: `namespace/name` as given, or `default/name`; a name found
/// only in another namespace is suggested.
pub fn resolve_key(target: &AgentTarget, name: &str) -> Result<String, String> {
    if name.contains('/') {
        return Ok(name.to_string());
    }
    let key = format!("default/{name}");
    let plan: Vec<PlannedService> = target.client()?.json("GET", "/v1/services", None)?;
    if plan.iter().any(|p| p.key == key) {
        return Ok(key);
    }
    let similar: Vec<&str> = plan
        .iter()
        .map(|p| p.key.as_str())
        .filter(|k| k.rsplit('/').next() == Some(name))
        .collect();
    Err(match similar.as_slice() {
        [] => format!("no service {key}; `nubo services` lists them (name them namespace/name)"),
        [one] => format!("no service {key}; did you mean {one}?"),
        many => format!("no service {key}; did you mean one of {}?", many.join(", ")),
    })
}

/// `nubo stop` and `nubo rm`.
pub fn change(
    name: &str,
    intent: Intent,
    signing: &Signing,
    target: &AgentTarget,
) -> Result<(), String> {
    let key = resolve_key(target, name)?;
    let document = current(target, &key)?
        .ok_or_else(|| format!("no service {key}; `nubo services` lists them"))?;
    let version = publish(target, signing, key.clone(), intent, document.description)?;
    if target.json {
        return print_json(&serde_json::json!({"service": key, "version": version}));
    }
    let verb = if intent == Intent::Stop {
        "stopped"
    } else {
        "removed"
    };
    outln!("{verb} {key} (version {version})");
    Ok(())
}

/// `nubo services`.
pub fn services(target: &AgentTarget) -> Result<(), String> {
    let plan: Vec<PlannedService> = target.client()?.json("GET", "/v1/services", None)?;
    if target.json {
        return print_json(&plan);
    }
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|p| {
            let phase = match p.batch {
                Some((batch, batches)) => format!("{} {batch}/{batches}", p.phase),
                None => p.phase.clone(),
            };
            let mut problem = p.problem.clone().unwrap_or_default();
            if !p.reasons.is_empty() {
                problem.push_str(&format!(": {}", p.reasons.join("; ")));
            }
            vec![
                p.key.clone(),
                p.version.to_string(),
                p.intent.clone(),
                phase,
                format!("{}/{}", p.ready, p.wanted),
                p.nodes.join(","),
                problem,
            ]
        })
        .collect();
    table::print(
        &[
            "SERVICE", "VERSION", "INTENT", "PHASE", "READY", "NODES", "PROBLEM",
        ],
        &rows,
    );
    Ok(())
}

fn instances(target: &AgentTarget, name: Option<&str>) -> Result<Vec<InstanceStatus>, String> {
    let all: Vec<InstanceStatus> = target.client()?.json("GET", "/v1/ps", None)?;
    Ok(match name {
        Some(name) => {
            let key = resolve_key(target, name)?;
            all.into_iter().filter(|i| i.service == key).collect()
        }
        None => all,
    })
}

/// `nubo ps`.
pub fn ps(target: &AgentTarget, name: Option<&str>) -> Result<(), String> {
    let list = instances(target, name)?;
    if target.json {
        return print_json(&list);
    }
    crate::deploy::print_instances(&list);
    Ok(())
}

/// `nubo drain`: moves every instance off a node (this agent's by default) under the rolling
/// rules, and keeps new ones away; `--undo` lets it take instances again.
pub fn drain(
    target: &AgentTarget,
    node: Option<&str>,
    undo: bool,
    signing: &Signing,
    follow: &crate::deploy::Follow,
) -> Result<(), String> {
    let client = target.client()?;
    let nodes: Vec<nubo_agent::model::NodeInfo> = client.json("GET", "/v1/nodes", None)?;
    let chosen = match node {
        None => nodes.iter().find(|n| n.this_node),
        Some(prefix) => {
            let matches: Vec<_> = nodes.iter().filter(|n| n.id.starts_with(prefix)).collect();
            match matches.as_slice() {
                [one] => Some(*one),
                [] => return Err(format!("no node {prefix}; `nubo nodes` lists them")),
                _ => return Err(format!("{prefix} names several nodes; give more of the id")),
            }
        }
    }
    .ok_or("the agent did not list itself")?;
    let id = chosen.id.clone();
    let short = id[..id.len().min(8)].to_string();
    if chosen.this_node {
        let path = format!("/v1/drain?undo={undo}");
        let _: serde_json::Value = client.json("POST", &path, None)?;
    } else {
        // Another node: only the administrator may drain it.
        let node_id: nubo_proto::NodeId = id.parse().map_err(|_| format!("bad node id {id}"))?;
        let key = nubo_agent::authority::drain_key(node_id);
        let intent = if undo { Intent::Remove } else { Intent::Run };
        publish(target, signing, key, intent, String::new()).map_err(|e| {
            format!(
                "{e} (a node is drained by itself, through its own agent, or by the administrator)"
            )
        })?;
    }
    if undo || follow.detach {
        if target.json {
            return print_json(&serde_json::json!({"node": id, "draining": !undo}));
        }
        outln!("{} {short}", if undo { "undrained" } else { "draining" });
        return Ok(());
    }
    eprintln!(
        "draining {short}: its instances move to other nodes as their replacements become ready…"
    );
    let deadline = std::time::Instant::now() + follow.wait;
    let mut shown = usize::MAX;
    loop {
        let left: Vec<InstanceStatus> = client
            .json::<Vec<InstanceStatus>>("GET", "/v1/ps", None)?
            .into_iter()
            .filter(|i| i.node == short)
            .collect();
        if left.len() != shown {
            shown = left.len();
            eprintln!("  {} instances left on {short}", left.len());
        }
        if left.is_empty() {
            if target.json {
                return print_json(
                    &serde_json::json!({"node": id, "draining": true, "instances": 0}),
                );
            }
            outln!(
                "{short} is drained: it runs no instance and takes no new one (`nubo drain --undo` ends it)"
            );
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let names: Vec<String> = left.iter().map(|i| i.service.clone()).collect();
            return Err(format!(
                "{short} still runs {} after {}s; the drain goes on (`nubo ps`)",
                names.join(", "),
                follow.wait.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// What `nubo logs` shows.
#[derive(Args, Clone, Debug)]
pub struct LogsArgs {
    /// The service (`namespace/name`).
    pub service: String,
    /// Keep printing output as it is written, from instances that start later too.
    #[arg(long, short)]
    pub follow: bool,
    /// The last N lines of each instance.
    #[arg(long, short = 'n')]
    pub tail: Option<u32>,
    /// Only what was written in this last span, e.g. 10m (to within a few seconds).
    #[arg(long, value_parser = parse_since)]
    pub since: Option<Duration>,
    /// Only the instance on this node (an id or its first digits).
    #[arg(long)]
    pub node: Option<String>,
}

fn parse_since(text: &str) -> Result<Duration, String> {
    description::parse_duration(text)
        .ok_or_else(|| "a duration such as 30s, 10m or 2h (at most 30 days)".to_string())
}

/// `nubo logs`: every instance's output, from the nodes that run them, each line prefixed by
/// its node and version.
pub fn logs(target: &AgentTarget, args: &LogsArgs) -> Result<(), String> {
    use std::io::BufRead;
    let key = resolve_key(target, &args.service)?;
    let mut path = format!("/v1/logs/{key}?follow={}", args.follow);
    if let Some(lines) = args.tail {
        path.push_str(&format!("&tail={lines}"));
    }
    if let Some(since) = args.since {
        path.push_str(&format!("&since_secs={}", since.as_secs()));
    }
    let response = target.client()?.stream(&path)?;
    let reader = std::io::BufReader::new(response.into_reader());
    // Sources seen, and whether each is at the start of a line.
    let mut at_line_start: BTreeMap<(String, u64), bool> = BTreeMap::new();
    let mut last: Option<(String, u64)> = None;
    for line in reader.lines() {
        let line = line.map_err(|e| format!("reading the logs: {e}"))?;
        let Ok(piece) = serde_json::from_str::<nubo_agent::api::LogLine>(&line) else {
            continue;
        };
        if args
            .node
            .as_ref()
            .is_some_and(|n| !piece.node.starts_with(n.as_str()))
        {
            continue;
        }
        if target.json {
            outln!("{line}");
            continue;
        }
        let source = (piece.node.clone(), piece.version);
        at_line_start.entry(source.clone()).or_insert(true);
        // Another source speaks in the middle of a line: end that line first.
        if let Some(previous) = &last
            && *previous != source
            && at_line_start.get(previous) == Some(&false)
        {
            outln!();
            at_line_start.insert(previous.clone(), true);
        }
        let mut text = String::new();
        for part in piece.text.split_inclusive('\n') {
            if at_line_start[&source] {
                text.push_str(&format!("{} v{} | ", piece.node, piece.version));
            }
            text.push_str(&crate::output::clean_keeping_tabs(part));
            at_line_start.insert(source.clone(), part.ends_with('\n'));
        }
        out!("{text}");
        last = Some(source);
    }
    if at_line_start.values().any(|start| !start) {
        outln!();
    }
    Ok(())
}

/// `nubo events`.
pub fn events(
    target: &AgentTarget,
    follow: bool,
    service: Option<&str>,
    node: Option<&str>,
    limit: usize,
) -> Result<(), String> {
    use std::io::BufRead;
    let mut path = format!("/v1/events?follow={follow}&limit={limit}");
    if let Some(service) = service {
        let key = if service.contains('/') {
            service.to_string()
        } else {
            resolve_key(target, service)?
        };
        path.push_str(&format!(
            "&service={}",
            crate::client::escape_key(&key).replace('/', "%2F")
        ));
    }
    if let Some(node) = node {
        path.push_str(&format!("&node={}", crate::client::escape_key(node)));
    }
    let response = target.client()?.stream(&path)?;
    for line in std::io::BufReader::new(response.into_reader()).lines() {
        let line = line.map_err(|e| format!("reading the events: {e}"))?;
        if target.json {
            outln!("{line}");
            continue;
        }
        let Ok(event) = serde_json::from_str::<nubo_agent::events::EventRecord>(&line) else {
            continue;
        };
        outln!(
            "{}  {:<9}  {:<16}  {:<8}  {}",
            crate::deploy::utc_text(event.at_unix_ms),
            event.kind,
            crate::output::clean(event.service.as_deref().unwrap_or("-")),
            event.node.as_deref().unwrap_or("-"),
            crate::output::clean(&event.message)
        );
    }
    Ok(())
}
