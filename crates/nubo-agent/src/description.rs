//! Service descriptions: the TOML file a user writes, read into a [`Service`].
//!
//! ```toml
//! name = "site"
//! namespace = "web"
//!
//! [run]
//! command = "python3"
//! args = ["-m", "http.server", "${NUBO_PORT_HTTP}"]
//!
//! [resources]
//! cpu = 0.2
//! memory = "64MiB"                   # every process of the instance together
//! disk = "1GiB"                      # its working directory (default 1GiB)
//! pids = 512                         # processes and threads at once (default 512)
//!
//! [placement]
//! replicas = 3                       # or share = "10%" with order_by, or availability = 0.999
//! constraints = ['arch == "x86_64"']
//! spread = "region"
//!
//! [ports]
//! http = 0                           # 0: any free port of the node's range
//!
//! [health]
//! type = "http"                      # http, tcp or command
//! port = "http"
//! interval = "2s"
//! grace = "2s"                       # first check after this; failures before the first
//!                                    # success never count as unhealthy
//!
//! [update]                           # how a new version replaces the running one
//! max_parallel = 1                   # nodes updated at once
//! max_surge = 1                      # of those, how many start the new instance first
//! min_healthy_time = "10s"           # healthy this long before the next batch
//! healthy_deadline = "5m"            # not healthy by then: the version failed
//! auto_revert = true                 # a failed version goes back to the last good one
//! ```
//!
//! Unknown keys are errors. Every error names its line and column and says what would be
//! right. Every agent reads the same text the same way, so the text is what is signed.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use nubo_proto::rollout::UpdatePolicy;
use nubo_proto::service::{Constraint, Count, Demand, PlacementSpec, parse_quantity};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Longest service or namespace name.
pub const NAME_BYTES_MAX: usize = 63;
/// Most ports per service.
pub const PORTS_MAX: usize = 8;
/// Processes and threads an instance may run at once, unless its description says.
pub const PIDS_DEFAULT: u64 = 512;
/// The disk budget of an instance whose description names none.
pub const DISK_DEFAULT: u64 = 1 << 30;
/// Longest duration a description may give (30 days): timers stay far from overflow.
pub const DURATION_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// One problem in a description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DescriptionError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and what would be right.
    pub message: String,
}

impl std::fmt::Display for DescriptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// How an instance is run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// How it runs: a process of the node, or a container.
    pub driver: Driver,
    /// The container image (the docker driver): present on the node, or loaded from the
    /// artifact (an image archive, `docker save`).
    pub image: Option<String>,
    /// The program (for the docker driver, the container's command; empty: the image's).
    pub command: String,
    /// Its arguments; `${NAME}` is replaced by the instance's environment variable NAME.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// A blob to place in the instance's directory as `artifact` before starting.
    pub artifact: Option<String>,
}

/// How an instance runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Driver {
    /// A process group of the node, isolated by the node's own means.
    #[default]
    Exec,
    /// A Docker container, started by the node's Docker engine.
    Docker,
}

impl Driver {
    /// Its name, as descriptions and nodes say it.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Exec => "exec",
            Driver::Docker => "docker",
        }
    }
}

/// How an instance's health is checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// An HTTP GET of `path` on the named port answers 2xx or 3xx.
    Http {
        /// The named port.
        port: String,
        /// The path.
        path: String,
    },
    /// A TCP connection to the named port succeeds.
    Tcp {
        /// The named port.
        port: String,
    },
    /// The command exits with status 0.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// A health check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// What to check.
    pub probe: Probe,
    /// How often.
    pub interval: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// How long after a start the first check runs; until the first success, failures do
    /// not make the instance unhealthy.
    pub grace: Duration,
}

/// When to restart an instance that exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// Restarts in a row before giving up (the node then refuses the service).
    pub attempts: u32,
    /// Wait before the first restart, doubling each time...
    pub delay: Duration,
    /// ...up to this.
    pub max_delay: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            attempts: 10,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// A service as every agent understands it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
    /// How to run it.
    pub run: Run,
    /// Where and how many.
    pub placement: PlacementSpec,
    /// Named ports and the number wanted (0: any free one).
    pub ports: BTreeMap<String, u16>,
    /// Its health check.
    pub health: Option<Health>,
    /// Its restart policy.
    pub restart: RestartPolicy,
    /// Most processes and threads its instance runs at once.
    pub pids_max: u64,
    /// Free-form attributes for discovery.
    pub discovery: BTreeMap<String, String>,
    /// How a new version replaces the running one.
    pub update: UpdatePolicy,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A hash of everything that shapes a running instance (program, artifact, environment,
    /// resources, ports, health check, restart policy), and of nothing else: two versions
    /// with equal fingerprints run the same instance, so changing only placement, discovery
    /// or update settings restarts nothing.
    pub fn fingerprint(&self) -> u64 {
        let shape = (
            &self.run,
            self.placement.demand,
            &self.ports,
            &self.health,
            self.restart,
            self.pids_max,
        );
        let bytes = postcard::to_allocvec(&shape).unwrap_or_default();
        let hash = blake3::hash(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }

    /// Whether a new instance can start beside an old one on the same node: not when a port
    /// is fixed.
    pub fn surge_possible(&self) -> bool {
        self.ports.values().all(|port| *port == 0)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    run: RawRun,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    placement: RawPlacement,
    ports: Option<Spanned<BTreeMap<String, u16>>>,
    health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    discovery: BTreeMap<String, String>,
    #[serde(default)]
    update: RawUpdate,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    max_parallel: Option<Spanned<u32>>,
    max_surge: Option<Spanned<u32>>,
    min_healthy_time: Option<Spanned<String>>,
    healthy_deadline: Option<Spanned<String>>,
    auto_revert: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    driver: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    artifact: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<Spanned<f64>>,
    memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    pids: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    replicas: Option<Spanned<u32>>,
    share: Option<Spanned<String>>,
    order_by: Option<Spanned<String>>,
    availability: Option<Spanned<f64>>,
    #[serde(default)]
    constraints: Vec<Spanned<String>>,
    spread: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    port: Option<String>,
    path: Option<String>,
    command: Option<Vec<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    attempts: Option<u32>,
    delay: Option<Spanned<String>>,
    max_delay: Option<Spanned<String>>,
}

/// Line and column (1-based) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A duration such as `500ms`, `2s`, `1m`, at most [`DURATION_MAX`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    let millis = value * scale * 1000.0;
    // Checked before converting: a float beyond the range would not fit a Duration.
    (millis.is_finite() && millis >= 0.0 && millis <= DURATION_MAX.as_millis() as f64)
        .then(|| Duration::from_millis(millis.round() as u64))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
}

struct Problems<'a> {
    text: &'a str,
    list: Vec<DescriptionError>,
}

impl Problems<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = position(self.text, span.start);
        self.list.push(DescriptionError {
            line,
            column,
            message: message.into(),
        });
    }
}

/// Reads a description; on failure, every problem found.
pub fn parse(text: &str) -> Result<Service, Vec<DescriptionError>> {
    let raw: RawService = toml::from_str(text).map_err(|e| {
        let (line, column) = position(text, e.span().map_or(0, |s| s.start));
        vec![DescriptionError {
            line,
            column,
            message: format!(
                "{} (see the example in `nubo validate --help`)",
                e.message().trim_end()
            ),
        }]
    })?;
    let mut problems = Problems {
        text,
        list: Vec::new(),
    };
    let name_hint = "names are 1-63 characters of a-z, 0-9 and '-'";
    if !valid_name(raw.name.get_ref()) {
        problems.at(raw.name.span(), format!("invalid name: {name_hint}"));
    }
    let namespace = match &raw.namespace {
        Some(ns) => {
            if !valid_name(ns.get_ref()) {
                problems.at(ns.span(), format!("invalid namespace: {name_hint}"));
            }
            ns.get_ref().clone()
        }
        None => "default".to_string(),
    };
    let driver = match raw
        .run
        .driver
        .as_ref()
        .map(|d| (d.get_ref().as_str(), d.span()))
    {
        None | Some(("exec", _)) => Driver::Exec,
        Some(("docker", _)) => Driver::Docker,
        Some((_, span)) => {
            problems.at(span, "unknown driver: \"exec\" or \"docker\"");
            Driver::Exec
        }
    };
    let command = raw
        .run
        .command
        .as_ref()
        .map(|c| c.get_ref().trim().to_string())
        .unwrap_or_default();
    match (driver, &raw.run.image) {
        (Driver::Exec, Some(image)) => {
            problems.at(image.span(), "image goes with driver = \"docker\"");
        }
        (Driver::Exec, None) if command.is_empty() => {
            let span = raw.run.command.as_ref().map_or(0..0, |c| c.span());
            problems.at(span, "the command is empty: [run] command = \"program\"");
        }
        (Driver::Docker, None) => problems.at(
            raw.run.driver.as_ref().map_or(0..0, |d| d.span()),
            "the docker driver needs image = \"name:tag\"",
        ),
        (Driver::Docker, Some(image)) => {
            let valid = !image.get_ref().is_empty()
                && image.get_ref().len() <= 255
                && image
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "./:_-@".contains(c))
                && !image.get_ref().starts_with('-');
            if !valid {
                problems.at(image.span(), "an image is a name such as \"nginx:1.27\"");
            }
        }
        _ => {}
    }
    if let Some(artifact) = &raw.run.artifact
        && (artifact.get_ref().len() != 64
            || !artifact.get_ref().chars().all(|c| c.is_ascii_hexdigit()))
    {
        problems.at(
            artifact.span(),
            "an artifact is a blob id (64 hexadecimal digits, from `nubo blob put`)",
        );
    }

    let mut demand = Demand {
        cpu_millis: 100,
        memory_bytes: 64 << 20,
        disk_bytes: 0,
    };
    if let Some(cpu) = &raw.resources.cpu {
        if !(cpu.get_ref().is_finite() && *cpu.get_ref() > 0.0 && *cpu.get_ref() <= 1024.0) {
            problems.at(cpu.span(), "cpu is a number of cores, such as 0.5");
        } else {
            demand.cpu_millis = (cpu.get_ref() * 1000.0).round() as u64;
        }
    }
    for (field, target) in [
        (&raw.resources.memory, &mut demand.memory_bytes),
        (&raw.resources.disk, &mut demand.disk_bytes),
    ] {
        if let Some(size) = field {
            match parse_quantity(size.get_ref()) {
                Some(bytes) if bytes >= 0.0 => *target = bytes as u64,
                _ => problems.at(size.span(), "expected a size such as \"256MiB\" or \"2GB\""),
            }
        }
    }

    let mut pids_max = PIDS_DEFAULT;
    if let Some(pids) = &raw.resources.pids {
        match *pids.get_ref() {
            1..=65_536 => pids_max = *pids.get_ref(),
            _ => problems.at(pids.span(), "pids is 1 to 65536"),
        }
    }

    let p = &raw.placement;
    let chosen = [
        p.replicas.is_some(),
        p.share.is_some(),
        p.availability.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    let mut count = Count::Replicas(1);
    if chosen > 1 {
        let span = p
            .share
            .as_ref()
            .map(|s| s.span())
            .or(p.availability.as_ref().map(|a| a.span()))
            .unwrap_or(0..0);
        problems.at(span, "give one of replicas, share or availability");
    }
    if let Some(replicas) = &p.replicas {
        if *replicas.get_ref() == 0 || *replicas.get_ref() > 1000 {
            problems.at(replicas.span(), "replicas is 1 to 1000");
        }
        count = Count::Replicas(*replicas.get_ref());
    }
    if let Some(share) = &p.share {
        let fraction = share
            .get_ref()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .map(|n| n / 100.0);
        match (fraction, &p.order_by) {
            (Some(f), Some(order_by)) if f > 0.0 && f <= 1.0 => {
                count = Count::Share {
                    fraction: f,
                    order_by: order_by.get_ref().clone(),
                };
            }
            (Some(f), None) if f > 0.0 && f <= 1.0 => problems.at(
                share.span(),
                "share needs order_by, the node attribute to rank by (e.g. order_by = \"cpus\")",
            ),
            _ => problems.at(share.span(), "share is a percentage such as \"10%\""),
        }
    } else if let Some(order_by) = &p.order_by {
        problems.at(order_by.span(), "order_by goes with share");
    }
    if let Some(availability) = &p.availability {
        let a = *availability.get_ref();
        if !(a > 0.0 && a < 1.0) {
            problems.at(
                availability.span(),
                "availability is between 0 and 1, e.g. 0.999",
            );
        }
        count = Count::Availability { target: a };
    }
    let mut constraints = Vec::new();
    for expression in &p.constraints {
        match Constraint::parse(expression.get_ref()) {
            Ok(c) => constraints.push(c),
            Err(e) => {
                // Point inside the string: its opening quote, then the offending character.
                let span = expression.span();
                let at = span.start + 1 + e.offset;
                problems.at(at..at, format!("constraint: {}", e.message));
            }
        }
    }

    let ports: BTreeMap<String, u16> = raw
        .ports
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default();
    let ports_span = raw.ports.as_ref().map_or(0..0, |p| p.span());
    if ports.len() > PORTS_MAX {
        problems.at(ports_span.clone(), format!("at most {PORTS_MAX} ports"));
    }
    for port in ports.keys() {
        if !valid_name(port) {
            problems.at(
                ports_span.clone(),
                format!("port name {port:?}: {name_hint}"),
            );
        }
    }

    let health = raw.health.as_ref().and_then(|h| {
        let span = h.span();
        let h = h.get_ref();
        let duration = |field: &Option<Spanned<String>>,
                        default: Duration,
                        problems: &mut Problems<'_>| match field {
            Some(text) => parse_duration(text.get_ref()).unwrap_or_else(|| {
                problems.at(
                    text.span(),
                    "expected a duration such as \"2s\" or \"500ms\" (at most 30 days)",
                );
                default
            }),
            None => default,
        };
        let interval = duration(&h.interval, Duration::from_secs(2), &mut problems);
        let timeout = duration(&h.timeout, Duration::from_secs(1), &mut problems);
        let grace = duration(&h.grace, Duration::from_secs(2), &mut problems);
        if interval.is_zero() {
            problems.at(span.clone(), "interval must be more than 0s");
        }
        let named_port = |problems: &mut Problems<'_>| match &h.port {
            Some(port) if ports.contains_key(port) => Some(port.clone()),
            Some(port) => {
                problems.at(
                    span.clone(),
                    format!("health port {port:?} is not in [ports]"),
                );
                None
            }
            None => {
                problems.at(
                    span.clone(),
                    "this health check needs port = \"<name in [ports]>\"",
                );
                None
            }
        };
        let probe = match h.kind.get_ref().as_str() {
            "http" => named_port(&mut problems).map(|port| Probe::Http {
                port,
                path: h.path.clone().unwrap_or_else(|| "/".into()),
            }),
            "tcp" => named_port(&mut problems).map(|port| Probe::Tcp { port }),
            "command" => match &h.command {
                Some(argv) if !argv.is_empty() => Some(Probe::Command { argv: argv.clone() }),
                _ => {
                    problems.at(
                        span.clone(),
                        "a command check needs command = [\"program\", \"arg\"]",
                    );
                    None
                }
            },
            _ => {
                problems.at(h.kind.span(), "type is \"http\", \"tcp\" or \"command\"");
                None
            }
        };
        probe.map(|probe| Health {
            probe,
            interval,
            timeout,
            grace,
        })
    });

    let mut restart = RestartPolicy::default();
    if let Some(attempts) = raw.restart.attempts {
        restart.attempts = attempts;
    }
    for (field, target) in [
        (&raw.restart.delay, &mut restart.delay),
        (&raw.restart.max_delay, &mut restart.max_delay),
    ] {
        if let Some(text) = field {
            match parse_duration(text.get_ref()) {
                Some(d) => *target = d,
                None => problems.at(
                    text.span(),
                    "expected a duration such as \"2s\" (at most 30 days)",
                ),
            }
        }
    }

    let mut update = UpdatePolicy::default();
    let u = &raw.update;
    if let Some(parallel) = &u.max_parallel {
        match *parallel.get_ref() {
            1..=1000 => update.max_parallel = *parallel.get_ref(),
            _ => problems.at(parallel.span(), "max_parallel is 1 to 1000"),
        }
    }
    if let Some(surge) = &u.max_surge {
        match *surge.get_ref() {
            0..=1000 => update.max_surge = *surge.get_ref(),
            _ => problems.at(surge.span(), "max_surge is 0 to 1000"),
        }
    }
    for (field, target) in [
        (&u.min_healthy_time, &mut update.min_healthy_time),
        (&u.healthy_deadline, &mut update.healthy_deadline),
    ] {
        if let Some(text) = field {
            match parse_duration(text.get_ref()) {
                Some(d) => *target = d,
                None => problems.at(
                    text.span(),
                    "expected a duration such as \"10s\" or \"5m\" (at most 30 days)",
                ),
            }
        }
    }
    if update.healthy_deadline <= update.min_healthy_time {
        let span = u
            .healthy_deadline
            .as_ref()
            .or(u.min_healthy_time.as_ref())
            .map_or(0..0, |s| s.span());
        problems.at(
            span,
            "healthy_deadline must be longer than min_healthy_time",
        );
    }
    if let Some(auto_revert) = u.auto_revert {
        update.auto_revert = auto_revert;
    }

    if !problems.list.is_empty() {
        problems.list.sort_by_key(|e| (e.line, e.column));
        return Err(problems.list);
    }
    Ok(Service {
        namespace,
        name: raw.name.into_inner(),
        run: Run {
            driver,
            image: raw.run.image.map(Spanned::into_inner),
            command,
            args: raw.run.args,
            env: raw.run.env,
            artifact: raw.run.artifact.map(Spanned::into_inner),
        },
        placement: PlacementSpec {
            count,
            constraints,
            spread: raw.placement.spread,
            demand,
        },
        ports,
        health,
        restart,
        pids_max,
        discovery: raw.discovery,
        update,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = r#"name = "site"
namespace = "web"

[run]
command = "python3"
args = ["-m", "http.server", "${NUBO_PORT_HTTP}"]

[resources]
cpu = 0.2
memory = "64MiB"

[placement]
replicas = 3
constraints = ['arch == "x86_64"']

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "1s"
"#;

    #[test]
    fn a_good_description_reads_into_a_service() {
        let service = parse(SITE).unwrap();
        assert_eq!(service.key(), "web/site");
        assert_eq!(service.placement.count, Count::Replicas(3));
        assert_eq!(service.placement.demand.cpu_millis, 200);
        assert_eq!(service.placement.demand.memory_bytes, 64 << 20);
        assert_eq!(
            service.health.unwrap().probe,
            Probe::Http {
                port: "http".into(),
                path: "/".into()
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported_with_line_and_column() {
        let unknown = SITE.replace("cpu = 0.2", "cpu = 0.2\ncpus = 4");
        let errors = parse(&unknown).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].line, errors[0].column), (10, 1));
        assert!(
            errors[0].message.contains("unknown field `cpus`"),
            "{}",
            errors[0].message
        );

        let bad = SITE
            .replace("memory = \"64MiB\"", "memory = \"lots\"")
            .replace("arch == ", "arch ~~ ")
            .replace("type = \"http\"", "type = \"ping\"");
        let errors = parse(&bad).unwrap_err();
        let at: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(at, vec![(10, 10), (14, 22), (20, 8)], "{errors:?}");
        assert!(errors[0].message.contains("256MiB"));

        let syntax = parse("name = \"x\"\n[run\ncommand = 1").unwrap_err();
        assert_eq!(syntax[0].line, 2);
    }

    #[test]
    fn placement_forms_are_exclusive_and_share_needs_an_attribute() {
        let both = SITE.replace(
            "replicas = 3",
            "replicas = 3\nshare = \"10%\"\norder_by = \"cpus\"",
        );
        assert!(parse(&both).is_err());
        let share = SITE.replace("replicas = 3", "share = \"50%\"\norder_by = \"cpus\"");
        assert_eq!(
            parse(&share).unwrap().placement.count,
            Count::Share {
                fraction: 0.5,
                order_by: "cpus".into()
            }
        );
        let no_order = SITE.replace("replicas = 3", "share = \"50%\"");
        assert!(
            parse(&no_order).unwrap_err()[0]
                .message
                .contains("order_by")
        );
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), None);
        assert_eq!(parse_duration("1e30s"), None, "no panic, no overflow");
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("NaNs"), None);
        assert_eq!(parse_duration("30d"), None);
        assert_eq!(parse_duration("720h"), Some(DURATION_MAX));
    }

    #[test]
    fn update_settings_read_with_defaults_and_checks() {
        let service = parse(SITE).unwrap();
        assert_eq!(service.update, UpdatePolicy::default());
        let custom = format!(
            "{SITE}\n[update]\nmax_parallel = 2\nmax_surge = 0\nmin_healthy_time = \"1s\"\nhealthy_deadline = \"20s\"\nauto_revert = false\n"
        );
        let update = parse(&custom).unwrap().update;
        assert_eq!(
            update,
            UpdatePolicy {
                max_parallel: 2,
                max_surge: 0,
                min_healthy_time: Duration::from_secs(1),
                healthy_deadline: Duration::from_secs(20),
                auto_revert: false,
            }
        );
        let backwards =
            format!("{SITE}\n[update]\nmin_healthy_time = \"1m\"\nhealthy_deadline = \"30s\"\n");
        let errors = parse(&backwards).unwrap_err();
        assert!(errors[0].message.contains("longer than"), "{errors:?}");
        let zero = format!("{SITE}\n[update]\nmax_parallel = 0\n");
        assert!(parse(&zero).is_err());
        let huge = SITE.replace("interval = \"1s\"", "interval = \"1e30s\"");
        assert!(parse(&huge).unwrap_err()[0].message.contains("30 days"));
    }

    #[test]
    fn only_what_shapes_an_instance_changes_its_fingerprint() {
        let base = parse(SITE).unwrap();
        let more = parse(&SITE.replace("replicas = 3", "replicas = 5")).unwrap();
        assert_eq!(base.fingerprint(), more.fingerprint());
        let tuned = parse(&format!("{SITE}\n[update]\nmax_parallel = 3\n")).unwrap();
        assert_eq!(base.fingerprint(), tuned.fingerprint());
        let bigger = parse(&SITE.replace("cpu = 0.2", "cpu = 0.25")).unwrap();
        assert_ne!(base.fingerprint(), bigger.fingerprint());
        let other = parse(&SITE.replace("http.server", "http.server2")).unwrap();
        assert_ne!(base.fingerprint(), other.fingerprint());
        assert!(base.surge_possible());
        assert!(
            !parse(&SITE.replace("http = 0", "http = 8080"))
                .unwrap()
                .surge_possible()
        );
    }
}
