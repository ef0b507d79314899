//! `nubo`: run an agent, create and join clouds, and talk to the local agent.

#[macro_use]
mod output;
mod client;
mod demo;
mod deploy;
mod services;
mod table;

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nubo_agent::description::Driver;
use nubo_agent::model::{BlobStored, Invite, LocalRecord, NodeInfo, Stats, Status, Written};
use nubo_agent::{AgentOptions, Dissemination, setup};
use nubo_net::JoinToken;

use crate::client::{Client, Target, escape_key, read_body};

#[derive(Parser)]
#[command(
    name = "nubo",
    version,
    about = "A decentralized, self-organizing service cloud",
    long_about = "nubo: machines contributed by a community each run one agent; the agents form a \
peer-to-peer cloud with no central server.\n\nStart here: `nubo demo` runs a local cloud of 5 agents.",
    after_help = "Examples:\n  nubo demo                          # a local 5-node cloud to play with\n  nubo init --data-dir ./n1          # create a cloud\n  nubo agent --data-dir ./n1         # run its first node\n  nubo invite --data-dir ./n1        # a token for the next node\n  nubo agent --data-dir ./n2 --join nubo1_...\n  nubo nodes --data-dir ./n1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach the local agent.
#[derive(Args, Clone)]
pub(crate) struct AgentTarget {
    /// The agent's data directory (its API address and token are read from it).
    #[arg(long, env = "NUBO_DATA_DIR", default_value_os_t = default_data_dir())]
    pub(crate) data_dir: PathBuf,
    /// The API address, overriding the one in the data directory.
    #[arg(long, env = "NUBO_API")]
    api: Option<String>,
    /// The API token, overriding the one in the data directory.
    #[arg(long, env = "NUBO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

impl AgentTarget {
    pub(crate) fn client(&self) -> Result<Client, String> {
        Client::connect(&Target {
            data_dir: &self.data_dir,
            api: self.api.as_deref(),
            token: self.token.as_deref(),
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run this machine's agent.
    #[command(
        after_help = "Examples:\n  nubo agent --data-dir ./n1\n  nubo agent --data-dir ./n2 --join nubo1_... --attr region=eu"
    )]
    Agent(AgentArgs),
    /// Create a new cloud, with this data directory as its first node.
    #[command(after_help = "Example:\n  nubo init --data-dir ./n1 && nubo agent --data-dir ./n1")]
    Init {
        /// Where the node keeps its state.
        #[arg(long, env = "NUBO_DATA_DIR", default_value_os_t = default_data_dir())]
        data_dir: PathBuf,
        /// Where to write the administrator's secret key (never in the data directory: the
        /// node's services would be one step from it).
        #[arg(long, default_value_os_t = setup::default_admin_key())]
        admin_key: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a join token for a new node (ask the running agent).
    #[command(after_help = "Example:\n  nubo invite --ttl-secs 3600")]
    Invite {
        #[command(flatten)]
        target: AgentTarget,
        /// How long the token stays valid, in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl_secs: u64,
    },
    /// This agent's status.
    #[command(after_help = "Example:\n  nubo status --json")]
    Status(AgentTarget),
    /// Every member of the cloud: id, address, state, attributes, last heard.
    #[command(after_help = "Example:\n  nubo nodes")]
    Nodes(AgentTarget),
    /// The cloud's size and resources, as aggregation estimates them.
    #[command(after_help = "Example:\n  nubo stats")]
    Stats(AgentTarget),
    /// The replicated key-value store.
    Kv {
        #[command(subcommand)]
        command: KvCommand,
    },
    /// Blobs: files chunked and stored by content in the key-value store.
    Blob {
        #[command(subcommand)]
        command: BlobCommand,
    },
    /// Check a service description; every problem is reported with line and column.
    #[command(
        after_help = "Example of a description (site.toml):\n\n  name = \"site\"\n  namespace = \"web\"\n  [run]\n  command = \"python3\"\n  args = [\"-m\", \"http.server\", \"${NUBO_PORT_HTTP}\"]\n  [resources]\n  cpu = 0.2\n  memory = \"64MiB\"\n  [placement]\n  replicas = 3                      # or share = \"10%\" + order_by, or availability = 0.999\n  constraints = ['arch == \"x86_64\"']\n  [ports]\n  http = 0\n  [health]\n  type = \"http\"\n  port = \"http\"\n\n  nubo validate site.toml"
    )]
    Validate {
        /// The description.
        file: PathBuf,
        /// Print JSON (the service, or the problems).
        #[arg(long)]
        json: bool,
    },
    /// Sign a service description and deploy it; waits until every wanted instance is ready
    /// (a new version replaces the running one a few instances at a time, see `[update]`).
    #[command(
        after_help = "Examples:\n  nubo deploy site.toml\n  nubo deploy site.toml --wait 5m\n  nubo deploy site.toml --detach\n\nExit status: 0 once every wanted instance is ready; 1 if the version failed (and was\nreverted), cannot be placed, or is not ready within --wait."
    )]
    Deploy {
        /// The description.
        file: PathBuf,
        #[command(flatten)]
        signing: services::Signing,
        #[command(flatten)]
        follow: deploy::Follow,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Deploy an earlier version's description again, as a new version.
    #[command(
        after_help = "Examples:\n  nubo rollback web/site                 # the last version that ran well\n  nubo rollback web/site --to 1764547200000"
    )]
    Rollback {
        /// The service.
        service: String,
        /// The version to go back to (`nubo history` lists them).
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        signing: services::Signing,
        #[command(flatten)]
        follow: deploy::Follow,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Every version of a service: who signed it, what it changed, how its update ended.
    #[command(after_help = "Example:\n  nubo history web/site")]
    History {
        /// The service.
        service: String,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Move every instance off a node without an outage, and keep new ones away.
    #[command(
        after_help = "Examples:\n  nubo drain                  # this agent's node\n  nubo drain 3f2a9c1e         # another node (administrator only)\n  nubo drain --undo"
    )]
    Drain {
        /// The node (an id or its first digits; default: this agent's).
        node: Option<String>,
        /// Take instances again.
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        signing: services::Signing,
        #[command(flatten)]
        follow: deploy::Follow,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Every deployed service and where it is placed.
    #[command(after_help = "Example:\n  nubo services")]
    Services(AgentTarget),
    /// What happened in the cloud: deploys, update steps, placements, instances starting,
    /// failing and stopping, nodes joining, leaving, failing and draining.
    #[command(
        after_help = "Examples:\n  nubo events\n  nubo events --follow --service web/site\n  nubo events --node 3f2a --json"
    )]
    Events {
        /// Keep printing events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only this service's (`namespace/name`).
        #[arg(long)]
        service: Option<String>,
        /// Only the events of this node (an id or its first digits).
        #[arg(long)]
        node: Option<String>,
        /// How many of the latest events to show first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Every instance: service, node, state, health, address, restarts.
    #[command(after_help = "Examples:\n  nubo ps\n  nubo ps web/site --json")]
    Ps {
        /// Only this service (`namespace/name`, or `name` in namespace default).
        service: Option<String>,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// The output of every instance of a service, from the nodes that run them.
    #[command(
        after_help = "Examples:\n  nubo logs web/site\n  nubo logs web/site -f --tail 20\n  nubo logs web/site --since 10m --node 3f2a"
    )]
    Logs {
        #[command(flatten)]
        args: services::LogsArgs,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Stop every instance of a service, keeping its description.
    #[command(after_help = "Example:\n  nubo stop web/site")]
    Stop {
        /// The service.
        service: String,
        #[command(flatten)]
        signing: services::Signing,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Remove a service.
    #[command(after_help = "Example:\n  nubo rm web/site")]
    Rm {
        /// The service.
        service: String,
        #[command(flatten)]
        signing: services::Signing,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Signing keys for deploying services.
    Key {
        #[command(subcommand)]
        command: services::KeyCommand,
    },
    /// Grant a user's key a namespace and a quota (administrator only).
    #[command(
        after_help = "Example:\n  nubo grant --namespace web --key 3b6a...f1 --cpu 2 --memory 2GiB --instances 10"
    )]
    Grant(services::GrantArgs),
    /// Stage 1 of an instance: cgroups, namespace, then its output into its log (used by the
    /// agent to start instances).
    #[command(hide = true)]
    InstanceExec {
        /// Memory limit of each process, in bytes.
        #[arg(long)]
        memory_bytes: u64,
        /// Largest file the instance may write.
        #[arg(long)]
        file_bytes: u64,
        /// The log file.
        #[arg(long)]
        log: PathBuf,
        /// Largest log before rotation.
        #[arg(long)]
        log_bytes: u64,
        /// The working directory.
        #[arg(long)]
        work: PathBuf,
        /// A cgroup directory to enter (repeatable).
        #[arg(long = "cgroup")]
        cgroups: Vec<PathBuf>,
        /// The instance's own uid and gid.
        #[arg(long)]
        user: Option<u32>,
        /// Run the command as it is (a `docker` command: the container is the sandbox).
        #[arg(long, conflicts_with = "user")]
        direct: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stage 2 of an instance: restrictions, then the program (run by stage 1).
    #[command(hide = true)]
    InstanceRun {
        /// Memory limit of the process, in bytes.
        #[arg(long)]
        memory_bytes: u64,
        /// Largest file it may write.
        #[arg(long)]
        file_bytes: u64,
        /// Where it may write.
        #[arg(long)]
        writable: PathBuf,
        /// It runs as its own user (it may read what that user may).
        #[arg(long)]
        own_user: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Start a local cloud of several agents on loopback, to try nubo.
    #[command(
        after_help = "Example:\n  nubo demo --nodes 5    # then follow the printed hints; Ctrl-C stops it"
    )]
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// Where the node keeps its state.
    #[arg(long, env = "NUBO_DATA_DIR", default_value_os_t = default_data_dir())]
    data_dir: PathBuf,
    /// Address to listen on for other nodes (UDP).
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: SocketAddr,
    /// Address other nodes reach this one at (host:port), if not the listening one.
    #[arg(long)]
    advertise: Option<String>,
    /// Address of the local API (TCP); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:7701")]
    api: SocketAddr,
    /// Join the cloud of this token (from `nubo invite`) on first start.
    #[arg(long, env = "NUBO_JOIN")]
    join: Option<String>,
    /// An attribute to announce, NAME=VALUE (repeatable).
    #[arg(long = "attr", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
    /// Cores this node lends to services (default: all of the machine's).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory this node lends to services (default: 80% of the machine's), e.g. 4GiB.
    #[arg(long)]
    memory: Option<String>,
    /// Most service instances this node runs at once.
    #[arg(long, default_value_t = 32)]
    max_instances: usize,
    /// Ports given to service instances, FIRST-LAST.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range)]
    port_range: std::ops::RangeInclusive<u16>,
    /// How broadcasts spread: `pull` (announced, then fetched from the first neighbour that
    /// has it: fewest hops, no duplicates) or `tree` (pushed along a spanning tree: one
    /// transmission per hop, paths about half again as long).
    #[arg(long, default_value_t = Dissemination::default())]
    dissemination: Dissemination,
    /// Serve Prometheus metrics at /metrics on the API address without the API token (for a
    /// scraper on this machine; the API stays on loopback unless --api says otherwise).
    #[arg(long)]
    metrics_public: bool,
    /// Run services even where their limits cannot all be enforced (no writable cgroup):
    /// a service could then take more memory or cpu than it declares.
    #[arg(long)]
    allow_unenforced_limits: bool,
    /// The uids (and gids) instances run as when the agent is root, FIRST-LAST: a range no
    /// user of this machine has.
    #[arg(long, default_value = "3000000-3065535", value_parser = parse_uid_range)]
    instance_uids: std::ops::RangeInclusive<u32>,
    /// The drivers this node offers, comma-separated: `exec` (processes isolated by the
    /// agent) and `docker` (containers of the machine's Docker engine).
    #[arg(long, value_delimiter = ',', default_value = "exec", value_parser = parse_driver)]
    drivers: Vec<Driver>,
    /// Create a new cloud if the data directory belongs to none (instead of `nubo init`).
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
    /// With --bootstrap: where to write the administrator's secret key.
    #[arg(long, default_value_os_t = setup::default_admin_key())]
    admin_key: PathBuf,
    /// Stop when the process that started this agent exits (used by `nubo demo`).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
    /// Log filter: error, warn, info, debug, trace, or per module (`nubo_net=debug`).
    #[arg(long, env = "NUBO_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand)]
enum KvCommand {
    /// Write a value (`-` reads it from standard input).
    #[command(
        after_help = "Examples:\n  nubo kv put greeting hello\n  echo hello | nubo kv put greeting -"
    )]
    Put {
        /// The key.
        key: String,
        /// The value, or `-` for standard input.
        value: String,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Read a value (printed as is).
    #[command(after_help = "Example:\n  nubo kv get greeting")]
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Delete a key.
    #[command(after_help = "Example:\n  nubo kv rm greeting")]
    Rm {
        /// The key.
        key: String,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Whether this node itself holds a replica of a key.
    #[command(after_help = "Example:\n  nubo kv local greeting --json")]
    Local {
        /// The key.
        key: String,
        #[command(flatten)]
        target: AgentTarget,
    },
}

#[derive(Subcommand)]
enum BlobCommand {
    /// Store a file; prints its id.
    #[command(after_help = "Example:\n  nubo blob put site.tar.gz")]
    Put {
        /// The file (`-` for standard input).
        file: PathBuf,
        #[command(flatten)]
        target: AgentTarget,
    },
    /// Fetch a blob by id.
    #[command(after_help = "Example:\n  nubo blob get 3f2a...e1 -o site.tar.gz")]
    Get {
        /// The blob's id.
        id: String,
        /// Write it here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        target: AgentTarget,
    },
}

pub(crate) fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("nubo");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/nubo"),
        None => PathBuf::from("nubo-data"),
    }
}

fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or("a port range is FIRST-LAST, e.g. 20000-29999")?;
    let first: u16 = first.trim().parse().map_err(|_| "not a port number")?;
    let last: u16 = last.trim().parse().map_err(|_| "not a port number")?;
    if first == 0 || first > last {
        return Err("the range must be FIRST-LAST with 0 < FIRST <= LAST".into());
    }
    Ok(first..=last)
}

fn parse_driver(text: &str) -> Result<Driver, String> {
    match text {
        "exec" => Ok(Driver::Exec),
        "docker" => Ok(Driver::Docker),
        other => Err(format!(
            "unknown driver {other:?}: the drivers are exec and docker"
        )),
    }
}

fn parse_uid_range(text: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (first, last) = text
        .split_once('-')
        .ok_or("a uid range is FIRST-LAST, e.g. 3000000-3065535")?;
    let first: u32 = first.trim().parse().map_err(|_| "not a uid")?;
    let last: u32 = last.trim().parse().map_err(|_| "not a uid")?;
    if first < 1000 || first > last {
        return Err("the range must be FIRST-LAST with 1000 <= FIRST <= LAST".into());
    }
    Ok(first..=last)
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or("an attribute is NAME=VALUE, e.g. region=eu")?;
    if name.is_empty() {
        return Err("an attribute needs a name, e.g. region=eu".into());
    }
    Ok((name.to_string(), value.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    outln!("{text}");
    Ok(())
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Agent(args) => agent(args),
        Command::Init {
            data_dir,
            admin_key,
            json,
        } => {
            let report = setup::init(&data_dir, &admin_key).map_err(|e| {
                let legacy = data_dir.join(setup::ADMIN_KEY_FILE);
                match e {
                    setup::SetupError::AlreadyMember { .. } if legacy.exists() => format!(
                        "{e}\nIts administrator's key sits in the data directory, where the node's services could reach it: move it with `mkdir -p {0} && mv {1} {2}` (nubo deploy and nubo grant look there), or anywhere and pass --key",
                        setup::config_dir().display(),
                        legacy.display(),
                        setup::default_admin_key().display()
                    ),
                    e => e.to_string(),
                }
            })?;
            if json {
                return print_json(&report);
            }
            outln!("Created cloud {}", report.cloud_id);
            outln!("  first node   {}", report.node_id);
            outln!("  data dir     {}", report.data_dir);
            outln!(
                "  admin key    {} (secret in {}; keep it off the nodes)",
                report.admin_public_key,
                report.admin_key_file
            );
            outln!();
            outln!("Next: nubo agent --data-dir {}", report.data_dir);
            Ok(())
        }
        Command::Invite { target, ttl_secs } => {
            let invite: Invite =
                target
                    .client()?
                    .json("POST", &format!("/v1/invite?ttl_secs={ttl_secs}"), None)?;
            if target.json {
                return print_json(&invite);
            }
            outln!("{}", invite.token);
            eprintln!(
                "Join with: nubo agent --data-dir DIR --join <token above>   (contacts: {}; valid {} s)",
                invite.contacts.join(", "),
                ttl_secs
            );
            Ok(())
        }
        Command::Status(target) => show(&target, "/v1/status", print_status),
        Command::Nodes(target) => show(&target, "/v1/nodes", |n: &Vec<NodeInfo>| print_nodes(n)),
        Command::Stats(target) => show(&target, "/v1/stats", print_stats),
        Command::Kv { command } => kv(command),
        Command::Blob { command } => blob(command),
        Command::Demo(args) => demo::run(args),
        Command::Validate { file, json } => services::validate(&file, json),
        Command::Deploy {
            file,
            signing,
            follow,
            target,
        } => deploy::deploy(&file, &signing, &target, &follow),
        Command::Rollback {
            service,
            to,
            signing,
            follow,
            target,
        } => deploy::rollback(&service, to, &signing, &target, &follow),
        Command::History { service, target } => deploy::history(&target, &service),
        Command::Drain {
            node,
            undo,
            signing,
            follow,
            target,
        } => services::drain(&target, node.as_deref(), undo, &signing, &follow),
        Command::Services(target) => services::services(&target),
        Command::Ps { service, target } => services::ps(&target, service.as_deref()),
        Command::Logs { args, target } => services::logs(&target, &args),
        Command::Events {
            follow,
            service,
            node,
            limit,
            target,
        } => services::events(&target, follow, service.as_deref(), node.as_deref(), limit),
        Command::Stop {
            service,
            signing,
            target,
        } => services::change(
            &service,
            nubo_agent::authority::Intent::Stop,
            &signing,
            &target,
        ),
        Command::Rm {
            service,
            signing,
            target,
        } => services::change(
            &service,
            nubo_agent::authority::Intent::Remove,
            &signing,
            &target,
        ),
        Command::Key { command } => services::key(command),
        Command::Grant(args) => services::grant(args),
        Command::InstanceExec {
            memory_bytes,
            file_bytes,
            log,
            log_bytes,
            work,
            cgroups,
            user,
            direct,
            command,
        } => {
            let stage = nubo_fabric::exec::Stage1 {
                cgroups,
                user,
                direct,
                work,
                log,
                log_bytes,
                memory_bytes,
                file_bytes,
                command,
            };
            match nubo_fabric::exec::stage1(&stage) {
                Ok(code) => std::process::exit(code),
                Err(error) => Err(format!("cannot start the instance: {error}")),
            }
        }
        Command::InstanceRun {
            memory_bytes,
            file_bytes,
            writable,
            own_user,
            command,
        } => {
            let error =
                nubo_fabric::exec::stage2(&writable, own_user, memory_bytes, file_bytes, &command);
            Err(format!(
                "cannot run {}: {error}",
                command.first().map_or("", String::as_str)
            ))
        }
    }
}

/// Fetches `path` from the agent and prints it as JSON or with `print`.
fn show<T: serde::de::DeserializeOwned + serde::Serialize>(
    target: &AgentTarget,
    path: &str,
    print: impl Fn(&T),
) -> Result<(), String> {
    let value: T = target.client()?.json("GET", path, None)?;
    if target.json {
        return print_json(&value);
    }
    print(&value);
    Ok(())
}

fn agent(args: AgentArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .map_err(|e| format!("--log {}: {e}", args.log))?,
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: log files stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let join = match &args.join {
        Some(text) => Some(
            JoinToken::decode(text, nubo_agent::clock::unix_now().as_secs())
                .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let options = AgentOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        advertise: args.advertise,
        api: args.api,
        join,
        attributes: args.attributes,
        bootstrap: args.bootstrap,
        admin_key: args.admin_key,
        exit_with_parent: args.exit_with_parent,
        cpu_millis: args.cpu.map(|c| (c * 1000.0) as u64),
        memory_bytes: match &args.memory {
            Some(text) => Some(
                nubo_proto::service::parse_quantity(text)
                    .ok_or("--memory is a size such as 4GiB")? as u64,
            ),
            None => None,
        },
        instances_max: args.max_instances,
        ports: args.port_range,
        dissemination: args.dissemination,
        metrics_public: args.metrics_public,
        allow_unenforced_limits: args.allow_unenforced_limits,
        instance_uids: args.instance_uids,
        drivers: args.drivers,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime
        .block_on(nubo_agent::run(options))
        .map_err(|e| e.to_string())
}

/// All of standard input (for `-` in place of a value or a file).
fn read_stdin() -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading standard input: {e}"))?;
    Ok(bytes)
}

fn kv(command: KvCommand) -> Result<(), String> {
    match command {
        KvCommand::Put { key, value, target } => {
            let bytes = if value == "-" {
                read_stdin()?
            } else {
                value.into_bytes()
            };
            let written: Written = target.client()?.json(
                "PUT",
                &format!("/v1/kv/{}", escape_key(&key)),
                Some(&bytes),
            )?;
            if target.json {
                return print_json(&written);
            }
            outln!("stored {} at version {}", written.key, written.version);
            Ok(())
        }
        KvCommand::Get { key, target } => {
            let response =
                target
                    .client()?
                    .send("GET", &format!("/v1/kv/{}", escape_key(&key)), None)?;
            let version = response
                .header(nubo_agent::api::VERSION_HEADER)
                .unwrap_or("")
                .to_string();
            let bytes = read_body(response)?;
            if target.json {
                return print_json(&serde_json::json!({
                    "key": key,
                    "value": String::from_utf8_lossy(&bytes),
                    "version": version,
                }));
            }
            output::write_bytes(&bytes);
            if !bytes.ends_with(b"\n") && !bytes.is_empty() {
                outln!();
            }
            Ok(())
        }
        KvCommand::Rm { key, target } => {
            let written: Written =
                target
                    .client()?
                    .json("DELETE", &format!("/v1/kv/{}", escape_key(&key)), None)?;
            if target.json {
                return print_json(&written);
            }
            outln!("deleted {} at version {}", written.key, written.version);
            Ok(())
        }
        KvCommand::Local { key, target } => {
            let local: LocalRecord = target.client()?.json(
                "GET",
                &format!("/v1/kv-local/{}", escape_key(&key)),
                None,
            )?;
            if target.json {
                return print_json(&local);
            }
            match (local.held, local.deleted) {
                (false, _) => outln!("this node holds no replica of {}", local.key),
                (true, true) => outln!(
                    "this node holds a deletion of {} at {}",
                    local.key,
                    local.version.unwrap_or_default()
                ),
                (true, false) => outln!(
                    "this node holds {} at {}",
                    local.key,
                    local.version.unwrap_or_default()
                ),
            }
            Ok(())
        }
    }
}

fn blob(command: BlobCommand) -> Result<(), String> {
    match command {
        BlobCommand::Put { file, target } => {
            let bytes = if file.as_os_str() == "-" {
                read_stdin()?
            } else {
                std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?
            };
            eprintln!("uploading {} bytes…", bytes.len());
            let stored: BlobStored = target.client()?.json("POST", "/v1/blobs", Some(&bytes))?;
            if target.json {
                return print_json(&stored);
            }
            outln!("{}", stored.id);
            eprintln!("stored {} bytes in {} chunks", stored.size, stored.chunks);
            Ok(())
        }
        BlobCommand::Get { id, output, target } => {
            let response = target
                .client()?
                .send("GET", &format!("/v1/blobs/{id}"), None)?;
            let bytes = read_body(response)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &bytes)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    if target.json {
                        return print_json(&serde_json::json!({
                            "id": id, "size": bytes.len(), "output": path,
                        }));
                    }
                    eprintln!("wrote {} bytes to {}", bytes.len(), path.display());
                }
                None => output::write_bytes(&bytes),
            }
            Ok(())
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

fn print_status(status: &Status) {
    let rows = [
        ("node", status.node_id.clone()),
        ("cloud", status.cloud_id.clone()),
        ("version", status.version.clone()),
        ("listen", status.listen.clone()),
        ("advertise", status.advertise.clone()),
        (
            "uptime",
            format_duration(Duration::from_secs(status.uptime_secs)),
        ),
        (
            "members",
            format!(
                "{} alive of {} known",
                status.members_alive, status.members_known
            ),
        ),
        ("neighbours", status.neighbors.join(" ")),
        ("passive view", status.passive.to_string()),
        (
            "ring",
            format!(
                "predecessor {} successor {}{}",
                status.ring_predecessor.as_deref().unwrap_or("-"),
                status.ring_successor.as_deref().unwrap_or("-"),
                if status.ring_settled {
                    ""
                } else {
                    " (settling: key-value operations wait)"
                }
            ),
        ),
        (
            "kv",
            format!(
                "{} records, {} bytes, {} operations in progress",
                status.kv_records, status.kv_bytes, status.kv_ops
            ),
        ),
        (
            "network",
            format!(
                "{} connections, {} frames in, {} out, {} dropped, {} malformed, {} refused handshakes",
                status.net.connections,
                status.net.frames_in,
                status.net.frames_out,
                status.net.frames_dropped,
                status.net.frames_malformed + status.net.frames_oversized,
                status.net.handshakes_refused
            ),
        ),
        ("disk", format!("{} failed saves", status.persist_failures)),
        ("limits", status.limits.clone()),
        ("isolation", status.isolation.clone()),
    ];
    for (name, value) in rows {
        outln!("{name:<13} {value}");
    }
    for warning in &status.warnings {
        outln!("{:<13} {warning}", "warning");
    }
}

fn print_nodes(nodes: &[NodeInfo]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let attributes: Vec<String> = n
                .attributes
                .iter()
                .filter(|(k, _)| !["os", "version", "memory_bytes"].contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            vec![
                format!("{}{}", short(&n.id), if n.this_node { "*" } else { "" }),
                n.addr.clone().unwrap_or_else(|| "-".into()),
                if n.draining {
                    format!("{}, draining", n.state)
                } else {
                    n.state.clone()
                },
                if n.this_node {
                    "-".into()
                } else {
                    format!("{:.1}s ago", n.last_heard_secs)
                },
                attributes.join(" "),
            ]
        })
        .collect();
    table::print(
        &["ID", "ADDRESS", "STATE", "LAST HEARD", "ATTRIBUTES"],
        &rows,
    );
}

fn print_stats(stats: &Stats) {
    outln!("members alive (roster)   {}", stats.members_alive);
    match (stats.size_estimate, stats.totals, stats.epoch) {
        (Some(size), Some(totals), Some(epoch)) => {
            outln!("size estimate            {size:.1} nodes (aggregation epoch {epoch})");
            outln!(
                "cpu cores                {:.0} total, {:.0} free",
                totals.cores,
                totals.cores_free
            );
            outln!(
                "memory                   {} total, {} free",
                bytes_text(totals.memory_bytes),
                bytes_text(totals.memory_free_bytes)
            );
        }
        _ => outln!(
            "size estimate            not yet (the first aggregation epoch takes about 30 s)"
        ),
    }
    outln!("this node's rank         {:.2}", stats.rank);
}

fn bytes_text(bytes: f64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    format!("{:.1} GiB", bytes / GIB)
}

fn format_duration(span: Duration) -> String {
    let secs = span.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
    }
}
