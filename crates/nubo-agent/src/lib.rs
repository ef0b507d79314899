//! The nubo agent: one per machine. It drives the protocol core ([`nubo_proto::Node`]) over
//! the QUIC transport, keeps its state in its data directory, and answers the local API.
//!
//! [`run`] wires the parts: load the node's standing (setup), open the state database, bind
//! the transport, restore the records this node held, start the actor, serve the API, and
//! on Ctrl-C or SIGTERM leave the cloud gracefully.

pub mod actor;
pub mod api;
pub mod authority;
pub mod blobs;
pub mod clock;
pub mod description;
pub mod events;
pub mod history;
pub mod host;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod planner;
pub mod runner;
pub mod serve;
pub mod setup;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use nubo_net::{JoinToken, NetError, Transport, TransportConfig};
use nubo_proto::broadcast::BroadcastConfig;
pub use nubo_proto::broadcast::Dissemination;
use nubo_proto::{Config, Node, Peer};
use nubo_store::{DataDir, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{Agent, AgentInfo, NodeKey, REMOVED_RETENTION, RunnerLink};
use crate::clock::Clock;
use crate::description::Driver;
use crate::runner::{NodeLimits, Runner, RunnerConfig};
use crate::setup::SetupError;

/// Capacity of the transport's event channel: readers wait when the actor lags this far.
const NET_EVENTS_MAX: usize = 4096;
/// Capacity of the API's command channel.
const COMMANDS_MAX: usize = 1024;

/// How to run an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where to listen for other nodes (UDP).
    pub listen: SocketAddr,
    /// The address other nodes reach this one at (`host:port`); found from the route to a
    /// contact, or the listening address, when not given.
    pub advertise: Option<String>,
    /// Where to serve the local API (TCP).
    pub api: SocketAddr,
    /// Join this cloud first.
    pub join: Option<JoinToken>,
    /// Attributes announced besides those detected (`region=eu`).
    pub attributes: Vec<(String, String)>,
    /// Create a new cloud if the data directory belongs to none (for the first node of a
    /// cloud started by automation, where running `nubo init` first is awkward).
    pub bootstrap: bool,
    /// Where `bootstrap` writes the administrator's key.
    pub admin_key: PathBuf,
    /// Stop when the parent process exits (for agents started by `nubo demo` or tests).
    pub exit_with_parent: bool,
    /// What this node lends to services (`None`: detected from the machine).
    pub cpu_millis: Option<u64>,
    /// Memory lent to services (`None`: 80% of the machine's).
    pub memory_bytes: Option<u64>,
    /// Most instances at once.
    pub instances_max: usize,
    /// Ports given to instances.
    pub ports: std::ops::RangeInclusive<u16>,
    /// How broadcasts spread.
    pub dissemination: Dissemination,
    /// Serve `/metrics` without the API token.
    pub metrics_public: bool,
    /// Run services even where their limits cannot all be enforced.
    pub allow_unenforced_limits: bool,
    /// The uids instances run as (when the agent is root).
    pub instance_uids: std::ops::RangeInclusive<u32>,
    /// The drivers this node offers (docker is dropped with a warning when no engine
    /// answers).
    pub drivers: Vec<Driver>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data directory is unusable.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The state database is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport could not start.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The API could not start.
    #[error("cannot serve the API on {addr}: {source} (pick another with --api)")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The advertised address is not usable.
    #[error("cannot use --advertise {0}: give host:port that other nodes can reach")]
    Advertise(String),
}

/// Raises the soft limit of open files to the hard one: connections, instances' logs and the
/// database all hold descriptors, and the common default of 1,024 is soon reached.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(%error, soft, hard, "cannot raise the open files limit");
    }
}

/// Runs an agent until Ctrl-C or SIGTERM.
pub async fn run(mut options: AgentOptions) -> Result<(), AgentError> {
    raise_open_files_limit();
    // Instances run in directories of their own: every path handed on must be absolute.
    options.data_dir = std::path::absolute(&options.data_dir).map_err(|source| {
        AgentError::Store(StoreError::Io {
            path: options.data_dir.clone(),
            source,
        })
    })?;
    if let Some(token) = &options.join {
        setup::join(&options.data_dir, token)?;
    } else if options.bootstrap && !setup::has_cloud(&options.data_dir)? {
        let report = setup::init(&options.data_dir, &options.admin_key)?;
        tracing::info!(cloud = %report.cloud_id, "created a new cloud");
    }
    let data = DataDir::open(&options.data_dir)?;
    let mut warnings = Vec::new();
    if data.file(setup::ADMIN_KEY_FILE).exists() {
        let warning = format!(
            "the administrator's key sits in this agent's data directory, where its services could reach it: move it with `mkdir -p {0} && mv {1} {2}`",
            setup::config_dir().display(),
            data.file(setup::ADMIN_KEY_FILE).display(),
            setup::default_admin_key().display()
        );
        tracing::warn!("{warning}");
        warnings.push(warning);
    }
    let state = data.open_state()?;
    let standing = setup::load(&data, &state)?;
    let id = standing.identity.node_id();
    let clock = Clock::start();

    let (net_tx, net_rx) = mpsc::channel(NET_EVENTS_MAX);
    let transport = Transport::bind(
        &standing.identity,
        standing.admission.clone(),
        TransportConfig {
            listen: options.listen,
            ..TransportConfig::default()
        },
        net_tx,
    )?;
    let listen = transport.local_addr();
    let advertise =
        advertised_address(options.advertise.as_deref(), listen, &standing.contacts).await?;

    let mut seed = [0u8; 8];
    getrandom::getrandom(&mut seed).map_err(|e| SetupError::Key(e.to_string()))?;
    let now = clock.now();
    let mut node = Node::new(
        Peer::with_addr(id, advertise),
        Config {
            broadcast: BroadcastConfig {
                dissemination: options.dissemination,
                ..BroadcastConfig::default()
            },
            // The agent still places with its own planner over the roster.
            coordination: nubo_proto::coordination::CoordinationConfig {
                enabled: false,
                ..Default::default()
            },
            // A probe costs three datagrams on QUIC (ping, pong, the pong's acknowledgement):
            // one every 1.5 s rather than every second keeps an idle agent's traffic below
            // memberlist's, and a dead neighbour is still found within a round of 7.5 s.
            membership: nubo_proto::membership::MembershipConfig {
                probe_interval: std::time::Duration::from_millis(1_500),
                ..Default::default()
            },
            // Nothing in the agent ranks by a slicing value yet: slicing would only cost.
            slicing: nubo_proto::slicing::SlicingConfig {
                enabled: false,
                ..Default::default()
            },
            ..Config::default()
        },
        u64::from_le_bytes(seed),
        now,
    );
    let (records, damaged) = state.records()?;
    let restored = records.len();
    for record in &records {
        let _ = node.kv_mut().restore(now, record);
    }
    node.kv_mut().track_changes();
    node.set_suite_check(Box::new(authority::DocumentCheck {
        admin_key: standing.admission.admin_key,
    }));
    let (suite, saved_at, suite_damaged) = state.suite()?;
    // A copy older than the removals the cloud remembers may hold a service removed since.
    let stale = saved_at.is_some_and(|at| {
        clock::unix_now().as_millis() as u64
            > at.saturating_add(REMOVED_RETENTION.as_millis() as u64)
    });
    let suite_restored = suite.len();
    for (entry, provisional) in suite {
        node.suite_mut().restore(entry, provisional || stale);
    }
    // Annotations whose service did not come back go too.
    let orphans: Vec<String> = node
        .suite()
        .entries()
        .filter_map(|e| nubo_proto::suite::annotated(&e.key))
        .filter(|base| node.suite().get(base).is_none())
        .map(str::to_string)
        .collect();
    for base in orphans {
        node.suite_mut().forget(&base);
    }
    node.suite_mut().drain_changed().for_each(drop);
    let cgroups = nubo_fabric::cgroup::Cgroups::detect(&id.short());
    let isolation = nubo_fabric::sandbox::Isolation::of_this_process();
    let uids = match isolation {
        nubo_fabric::sandbox::Isolation::Full => Some(
            nubo_fabric::uids::UidPool::new(options.instance_uids.clone())
                .map_err(|e| SetupError::Key(format!("cannot keep the uids of instances: {e}")))?,
        ),
        nubo_fabric::sandbox::Isolation::LandlockOnly => None,
    };
    tracing::info!(limits = %cgroups.describe(), isolation = isolation.describe(), "how instances are held");
    let machine = host::resources();
    let limits = NodeLimits {
        cpu_millis: options
            .cpu_millis
            .unwrap_or((machine.cores * 1000.0) as u64),
        memory_bytes: options
            .memory_bytes
            .unwrap_or((machine.memory_bytes * 0.8) as u64),
        instances_max: options.instances_max,
        ports: options.ports.clone(),
    };
    let mut attributes = host::attributes();
    attributes.push((planner::ATTR_CPU.into(), limits.cpu_millis.to_string()));
    attributes.push((planner::ATTR_MEMORY.into(), limits.memory_bytes.to_string()));
    attributes.push((
        planner::ATTR_LIMITS.into(),
        if cgroups.enforced().all() {
            "enforced"
        } else if options.allow_unenforced_limits {
            "unenforced-allowed"
        } else {
            "unenforced"
        }
        .into(),
    ));
    let mut drivers = options.drivers.clone();
    if drivers.contains(&Driver::Docker) && !nubo_fabric::docker::available() {
        drivers.retain(|d| *d != Driver::Docker);
        let warning =
            "the docker driver is not offered: no Docker engine answers `docker version` here";
        tracing::warn!("{warning}");
        warnings.push(warning.to_string());
    }
    attributes.push((
        planner::ATTR_DRIVERS.into(),
        drivers
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(","),
    ));
    attributes.extend(options.attributes.iter().cloned());
    node.set_attributes(now, attributes);
    node.set_resources(host::resources());
    if !standing.contacts.is_empty() {
        node.join(now, &standing.contacts);
    }

    let token = setup::api_token(&data)?;
    let listener = tokio::net::TcpListener::bind(options.api)
        .await
        .map_err(|source| AgentError::Api {
            addr: options.api,
            source,
        })?;
    let api_addr = listener.local_addr().map_err(|source| AgentError::Api {
        addr: options.api,
        source,
    })?;
    data.write_secret(setup::API_ADDR_FILE, api_addr.to_string().as_bytes())?;
    let (commands_tx, commands_rx) = mpsc::channel(COMMANDS_MAX);
    let app = api::router(commands_tx.clone(), &token, options.metrics_public);
    tokio::spawn(serve::serve(listener, app));

    tracing::info!(
        node = %id,
        cloud = %standing.admission.cloud,
        %listen,
        %advertise,
        api = %api_addr,
        contacts = standing.contacts.len(),
        records = restored,
        records_damaged = damaged,
        suite = suite_restored,
        suite_damaged,
        suite_stale = stale,
        "agent started"
    );
    let mut info = AgentInfo {
        listen,
        advertise,
        admission: standing.admission.clone(),
        records_damaged_at_start: damaged,
        warnings,
        limits: String::new(),
        isolation: String::new(),
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let exit_with_parent = options.exit_with_parent;
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = parent_exit(), if exit_with_parent => {}
        }
        tracing::info!("shutting down: leaving the cloud");
        let _ = stop_tx.send(());
    });
    if !cgroups.enforced().all() {
        let warning = format!(
            "limits cannot all be enforced here ({}): {}",
            cgroups.describe(),
            if options.allow_unenforced_limits {
                "services run anyway (--allow-unenforced-limits)"
            } else {
                "this node refuses services; grant the agent a writable cgroup (see docs/ARCHITECTURE.md), or start it with --allow-unenforced-limits"
            }
        );
        tracing::warn!("{warning}");
        info.warnings.push(warning);
    }
    info.limits = cgroups.describe();
    info.isolation = isolation.describe().to_string();
    let root = data.file(nubo_store::INSTANCES_DIR);
    let runner = Runner::new(RunnerConfig {
        node: id.short(),
        host: advertise.ip().to_string(),
        root,
        artifacts: data.file("artifacts"),
        wrapper: std::env::current_exe().map_err(|e| SetupError::Key(e.to_string()))?,
        limits,
        commands: commands_tx.clone(),
        cgroups,
        uids,
        allow_unenforced_limits: options.allow_unenforced_limits,
        drivers,
    });
    let (desired_tx, desired_rx) = tokio::sync::watch::channel(None);
    let (report_tx, report_rx) = tokio::sync::watch::channel(Default::default());
    let runner_task = tokio::spawn(runner.run(desired_rx, report_tx));
    let link = RunnerLink {
        desired: desired_tx,
        report: report_rx,
    };
    let key = NodeKey(
        nubo_net::Identity::from_secret(&standing.identity.secret())
            .map_err(|e| SetupError::Key(e.to_string()))?,
    );
    Agent::new(node, transport.clone(), state, clock, info, link, key)
        .run(net_rx, commands_rx, stop_rx)
        .await;
    // The actor dropped the runner's channel: the runner stops the instances and ends.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), runner_task).await;
    // Give the goodbye messages a moment to leave, then close every connection.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    transport.close().await;
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// Returns once the process that started this one has exited (we are adopted by another).
async fn parent_exit() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}

/// The address other nodes should use: the one given, else the listening address if it is
/// specific, else this machine's address on the route to the first contact.
async fn advertised_address(
    given: Option<&str>,
    listen: SocketAddr,
    contacts: &[Peer],
) -> Result<SocketAddr, AgentError> {
    if let Some(given) = given {
        return tokio::net::lookup_host(given)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| AgentError::Advertise(given.to_string()));
    }
    if !listen.ip().is_unspecified() {
        return Ok(listen);
    }
    let routed = contacts.iter().filter_map(|c| c.addr).find_map(|contact| {
        // Connecting a UDP socket sends nothing; it only picks the route.
        let socket = std::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), 0)).ok()?;
        socket.connect(contact).ok()?;
        socket.local_addr().ok().map(|local| local.ip())
    });
    let ip = routed.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    if routed.is_none() {
        tracing::warn!(
            "listening on all interfaces with no contact to find a route to: advertising {ip}; pass --advertise host:port so others can reach this node"
        );
    }
    Ok(SocketAddr::new(ip, listen.port()))
}
