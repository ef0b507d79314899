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
    /// The administrator's data directory (holding admin.key).
    #[arg(long, env = "NUBO_DATA_DIR", default_value_os_t = crate::default_data_dir())]
    data_dir: PathBuf,
}

/// How a deploy is signed.
#[derive(Args, Clone, Default)]
pub struct Signing {
    /// The signing key (default: the data directory's admin.key if there is one, else the
    /// key of `nubo key new`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The grant (text from `nubo grant`, or a file holding it; default: ~/.config/nubo/grant
    /// if it exists). Not needed with the administrator's key.
    #[arg(long)]
    grant: Option<String>,
}

fn config_dir() -> PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir).join("nubo"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".config/nubo"),
    }
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
    let KeyCommand::New { out, force } = command;
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
    println!("{}", hex(&identity.public_key()));
    eprintln!(
        "secret key in {}; ask the administrator for a grant: nubo grant --namespace NAME --key {}",
        out.display(),
        hex(&identity.public_key())
    );
    Ok(())
}

/// `nubo grant`.
pub fn grant(args: GrantArgs) -> Result<(), String> {
    let admin = read_key(&args.data_dir.join(nubo_agent::setup::ADMIN_KEY_FILE)).map_err(|e| {
        format!("{e}: only the administrator (the data directory of `nubo init`) can grant")
    })?;
    let user_key: [u8; 32] = unhex(&args.key)
        .and_then(|b| b.try_into().ok())
        .ok_or("--key is a public key of 64 hexadecimal digits, as `nubo key new` prints")?;
    let memory = parse_quantity(&args.memory).ok_or("--memory is a size such as 4GiB")?;
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
            expires_unix_secs: nubo_agent::clock::unix_now().as_secs() + args.days * 86_400,
        },
    );
    println!("{}", grant.encode());
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
            println!("{}: valid ({})", file.display(), service.key());
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
    let admin_path = target.data_dir.join(nubo_agent::setup::ADMIN_KEY_FILE);
    let key_path = match &signing.key {
        Some(path) => path.clone(),
        None if admin_path.exists() => admin_path,
        None if default_key_path().exists() => default_key_path(),
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

fn publish(
    target: &AgentTarget,
    signing: &Signing,
    key: String,
    intent: Intent,
    description: String,
) -> Result<u64, String> {
    let (identity, grant) = signer(signing, target)?;
    let previous = current(target, &key)?;
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

/// `nubo deploy`.
pub fn deploy(file: &Path, signing: &Signing, target: &AgentTarget) -> Result<(), String> {
    let (key, version) = deploy_quietly(file, signing, target)?;
    if target.json {
        return print_json(&serde_json::json!({"service": key, "version": version}));
    }
    println!("deployed {key} (version {version}); `nubo ps` shows its instances");
    Ok(())
}

fn service_key(name: &str) -> String {
    if name.contains('/') {
        name.to_string()
    } else {
        format!("default/{name}")
    }
}

/// `nubo stop` and `nubo rm`.
pub fn change(
    name: &str,
    intent: Intent,
    signing: &Signing,
    target: &AgentTarget,
) -> Result<(), String> {
    let key = service_key(name);
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
    println!("{verb} {key} (version {version})");
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
            vec![
                p.key.clone(),
                p.intent.clone(),
                format!("{}/{}", p.nodes.len(), p.wanted),
                p.nodes.join(","),
                p.problem.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table::print(&["SERVICE", "INTENT", "PLACED", "NODES", "PROBLEM"], &rows);
    Ok(())
}

fn instances(target: &AgentTarget, name: Option<&str>) -> Result<Vec<InstanceStatus>, String> {
    let all: Vec<InstanceStatus> = target.client()?.json("GET", "/v1/ps", None)?;
    Ok(match name {
        Some(name) => {
            let key = service_key(name);
            all.into_iter().filter(|i| i.service == key).collect()
        }
        None => all,
    })
}

/// `nubo ps`.
pub fn ps(target: &AgentTarget, name: Option<&str>) -> Result<(), String> {
    let mut list = instances(target, name)?;
    if target.json {
        for instance in &mut list {
            instance.log_tail.clear();
        }
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let addresses: Vec<String> = i
                .ports
                .iter()
                .map(|(name, port)| format!("{name}={}:{port}", i.host))
                .collect();
            vec![
                i.service.clone(),
                i.node.clone(),
                i.state.clone(),
                i.health.clone(),
                addresses.join(" "),
                i.restarts.to_string(),
            ]
        })
        .collect();
    table::print(
        &["SERVICE", "NODE", "STATE", "HEALTH", "ADDRESS", "RESTARTS"],
        &rows,
    );
    Ok(())
}

/// `nubo logs`.
pub fn logs(target: &AgentTarget, name: &str, follow: bool) -> Result<(), String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let list = instances(target, Some(name))?;
        if list.is_empty() && !follow {
            return Err(format!(
                "no instance of {} runs now; `nubo services` says where it is placed",
                service_key(name)
            ));
        }
        for instance in list {
            let before = seen.get(&instance.node).cloned().unwrap_or_default();
            let tail = &instance.log_tail;
            // Print what is new since last time (the tail is a sliding window).
            let fresh = match tail.find(&before) {
                Some(at) if !before.is_empty() => &tail[at + before.len()..],
                _ => tail.as_str(),
            };
            if !fresh.is_empty() {
                if target.json {
                    print_json(&serde_json::json!({"node": instance.node, "log": fresh}))?;
                } else {
                    println!("==> {} on {} <==", instance.service, instance.node);
                    print!("{fresh}");
                    if !fresh.ends_with('\n') {
                        println!();
                    }
                }
            }
            seen.insert(instance.node.clone(), tail.clone());
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// In an instance's working directory: fetches blob `id` as `artifact` through the agent's
/// API (once), and unpacks it if it is a tar archive.
pub fn fetch_artifact(id: &str, agent_dir: &Path) -> Result<(), String> {
    let target = Path::new("artifact");
    if target.exists() {
        return Ok(());
    }
    let client = crate::client::Client::connect(&crate::client::Target {
        data_dir: agent_dir,
        api: None,
        token: None,
    })?;
    let bytes = crate::client::read_body(client.send("GET", &format!("/v1/blobs/{id}"), None)?)?;
    std::fs::write("artifact.partial", &bytes).map_err(|e| format!("writing the artifact: {e}"))?;
    std::fs::rename("artifact.partial", target)
        .map_err(|e| format!("writing the artifact: {e}"))?;
    // A tar archive has "ustar" at offset 257.
    if bytes.get(257..262) == Some(b"ustar") {
        let status = std::process::Command::new("tar")
            .args(["-xf", "artifact"])
            .status()
            .map_err(|e| format!("cannot run tar to unpack the artifact: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_file(target);
            return Err("tar could not unpack the artifact".into());
        }
    }
    eprintln!("nubo: fetched artifact {id} ({} bytes)", bytes.len());
    Ok(())
}
