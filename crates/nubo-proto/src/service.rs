//! Services as the cloud sees them: what to run, with what resources, and where it may run;
//! and placement, the deterministic choice of the nodes that run each service.
//!
//! Placement is a pure function of the service and the members every node knows from the
//! roster: every node computes the same answer from the same view, so no node needs to tell
//! another what to run, and a node that dies is replaced as soon as the others see it gone.
//! Nodes are ranked by rendezvous hashing (the hash of the service key and the node id), so
//! a join or a departure moves only the instances that must move.

use core::fmt;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::NodeId;

/// What a service needs from a node, per instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Disk in bytes.
    pub disk_bytes: u64,
}

/// How many instances a service wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Count {
    /// Exactly this many (fewer if fewer nodes qualify).
    Replicas(u32),
    /// This fraction of the qualifying nodes, those ranking highest by an attribute.
    Share {
        /// In (0, 1].
        fraction: f64,
        /// The numeric node attribute to rank by (highest first).
        order_by: String,
    },
    /// As many replicas as it takes for at least one to be up with this probability, given
    /// each node's availability.
    Availability {
        /// In (0, 1).
        target: f64,
    },
}

/// A comparison in a constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `in [..]`
    In,
    /// `not in [..]`
    NotIn,
}

/// The right-hand side of a constraint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Operand {
    /// A quoted string.
    Text(String),
    /// A number (sizes like `512MiB` are read as bytes).
    Number(f64),
    /// A list of strings.
    List(Vec<String>),
}

/// A condition on a node attribute, such as `arch == "x86_64"`, `region in ["eu", "sa"]` or
/// `memory_bytes >= 2GiB`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    /// The attribute's name.
    pub attribute: String,
    /// The comparison.
    pub op: Op,
    /// What it is compared with.
    pub operand: Operand,
}

/// Why a constraint could not be read: what and where (a byte offset in the expression).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConstraintError {
    /// Byte offset in the expression.
    pub offset: usize,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl fmt::Display for ConstraintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.offset + 1)
    }
}

/// Parses a size or number: `512`, `1.5`, `512MiB`, `2GB`, `10%` (= 0.1).
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "%" => 0.01,
        _ => return None,
    };
    let value = number * factor;
    value.is_finite().then_some(value)
}

impl Constraint {
    /// Parses `ATTRIBUTE OP VALUE`.
    pub fn parse(text: &str) -> Result<Constraint, ConstraintError> {
        let error = |offset: usize, message: &str| ConstraintError {
            offset,
            message: message.to_string(),
        };
        let start = text.len() - text.trim_start().len();
        let rest = &text[start..];
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        if name_len == 0 {
            return Err(error(
                start,
                "expected an attribute name, e.g. arch == \"x86_64\"",
            ));
        }
        let attribute = rest[..name_len].to_string();
        let after_name = start + name_len;
        let rest = &text[after_name..];
        let op_start = after_name + (rest.len() - rest.trim_start().len());
        let rest = text[op_start..].to_string();
        let (op, op_len) = [
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("<", Op::Lt),
            (">", Op::Gt),
            ("not in", Op::NotIn),
            ("in", Op::In),
        ]
        .iter()
        .find(|(symbol, _)| rest.starts_with(symbol))
        .map(|(symbol, op)| (*op, symbol.len()))
        .ok_or_else(|| error(op_start, "expected one of == != < <= > >= in, not in"))?;
        let value_start = op_start + op_len;
        let value_text = text[value_start..].trim();
        let value_offset =
            value_start + (text[value_start..].len() - text[value_start..].trim_start().len());
        if value_text.is_empty() {
            return Err(error(value_offset, "expected a value after the comparison"));
        }
        let operand = match op {
            Op::In | Op::NotIn => {
                let inner = value_text
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .ok_or_else(|| error(value_offset, "expected a list, e.g. [\"eu\", \"sa\"]"))?;
                let mut items = Vec::new();
                for item in inner.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let unquoted = item
                        .strip_prefix('"')
                        .and_then(|i| i.strip_suffix('"'))
                        .ok_or_else(|| error(value_offset, "list items are quoted strings"))?;
                    items.push(unquoted.to_string());
                }
                Operand::List(items)
            }
            _ => match value_text.strip_prefix('"') {
                Some(quoted) => Operand::Text(
                    quoted
                        .strip_suffix('"')
                        .ok_or_else(|| error(value_offset, "unterminated string"))?
                        .to_string(),
                ),
                None => Operand::Number(parse_quantity(value_text).ok_or_else(|| {
                    error(
                        value_offset,
                        "expected a quoted string or a number like 512MiB",
                    )
                })?),
            },
        };
        if matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge) && !matches!(operand, Operand::Number(_))
        {
            return Err(error(value_offset, "<, <=, > and >= compare numbers"));
        }
        Ok(Constraint {
            attribute,
            op,
            operand,
        })
    }

    /// Whether a node with `attributes` satisfies the constraint. A missing attribute
    /// satisfies only `!=` and `not in`.
    pub fn holds(&self, attributes: &BTreeMap<String, String>) -> bool {
        let Some(value) = attributes.get(&self.attribute) else {
            return matches!(self.op, Op::Ne | Op::NotIn);
        };
        match (&self.operand, self.op) {
            (Operand::List(items), Op::In) => items.iter().any(|i| i == value),
            (Operand::List(items), Op::NotIn) => items.iter().all(|i| i != value),
            (Operand::Text(text), Op::Eq) => value == text,
            (Operand::Text(text), Op::Ne) => value != text,
            (Operand::Number(number), op) => {
                let Some(actual) = parse_quantity(value) else {
                    return op == Op::Ne;
                };
                match op {
                    Op::Eq => actual == *number,
                    Op::Ne => actual != *number,
                    Op::Lt => actual < *number,
                    Op::Le => actual <= *number,
                    Op::Gt => actual > *number,
                    Op::Ge => actual >= *number,
                    Op::In | Op::NotIn => false,
                }
            }
            _ => false,
        }
    }
}

/// Where a service may run and how many instances it wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementSpec {
    /// How many.
    pub count: Count,
    /// Conditions every chosen node meets.
    pub constraints: Vec<Constraint>,
    /// Spread instances evenly over the values of this attribute.
    pub spread: Option<String>,
    /// What each instance needs.
    pub demand: Demand,
}

/// A member as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// The node.
    pub id: NodeId,
    /// What it announces.
    pub attributes: &'a BTreeMap<String, String>,
    /// What it lends: the most it will host.
    pub capacity: Demand,
    /// Services it refused to run (owner limits), by key.
    pub refuses: bool,
}

/// The availability assumed for a node when none is measured.
pub const NODE_AVAILABILITY_DEFAULT: f64 = 0.9;
/// Most replicas an availability target can ask for.
pub const AVAILABILITY_REPLICAS_MAX: u32 = 16;

/// Replicas needed so that at least one is up with probability `target`, each up with
/// probability `availability`.
pub fn replicas_for(target: f64, availability: f64) -> u32 {
    let availability = availability.clamp(0.01, 0.999_999);
    let mut replicas = 1;
    while replicas < AVAILABILITY_REPLICAS_MAX
        && 1.0 - (1.0 - availability).powi(replicas as i32) < target
    {
        replicas += 1;
    }
    replicas
}

/// The rendezvous score of `node` for `key`: the nodes with the highest scores host it.
pub fn score(key: &str, node: NodeId) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(key.as_bytes());
    hasher.update(&node.0.to_be_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_be_bytes(first)
}

fn fits(capacity: Demand, demand: Demand) -> bool {
    capacity.cpu_millis >= demand.cpu_millis
        && capacity.memory_bytes >= demand.memory_bytes
        && capacity.disk_bytes >= demand.disk_bytes
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::In => "in",
            Op::NotIn => "not in",
        };
        write!(f, "{} {op} ", self.attribute)?;
        match &self.operand {
            Operand::Text(text) => write!(f, "{text:?}"),
            Operand::Number(number) => write!(f, "{number}"),
            Operand::List(items) => {
                let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
        }
    }
}

/// Why nodes cannot take a service: each filter with the number of candidates it rules out
/// (a node may fail several), in the order placement applies them. Empty when every
/// candidate qualifies.
pub fn explain(spec: &PlacementSpec, candidates: &[Candidate<'_>]) -> Vec<String> {
    let total = candidates.len();
    let mut reasons = Vec::new();
    let mut count = |reason: String, filtered: usize| {
        if filtered > 0 {
            reasons.push(format!("{reason} filtered {filtered} of {total} nodes"));
        }
    };
    count(
        "the node's refusal (over its owner's limits, or the service failed there)".into(),
        candidates.iter().filter(|c| c.refuses).count(),
    );
    let demand = spec.demand;
    type Amount = fn(&Demand) -> u64;
    let resources: [(String, Amount); 3] = [
        (
            format!("cpu {} cores", demand.cpu_millis as f64 / 1000.0),
            |d| d.cpu_millis,
        ),
        (format!("memory {}", bytes_text(demand.memory_bytes)), |d| {
            d.memory_bytes
        }),
        (format!("disk {}", bytes_text(demand.disk_bytes)), |d| {
            d.disk_bytes
        }),
    ];
    for (reason, amount) in resources {
        let short = candidates
            .iter()
            .filter(|c| amount(&c.capacity) < amount(&demand))
            .count();
        count(reason, short);
    }
    for constraint in &spec.constraints {
        count(
            format!("constraint {constraint}"),
            candidates
                .iter()
                .filter(|c| !constraint.holds(c.attributes))
                .count(),
        );
    }
    reasons
}

/// A size in bytes as operators write it (`64MiB`, `500GiB`).
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, size)| bytes >= *size) {
        Some((unit, size)) if bytes.is_multiple_of(*size) => format!("{}{unit}", bytes / size),
        Some((unit, size)) => format!("{:.1}{unit}", bytes as f64 / *size as f64),
        None => format!("{bytes}B"),
    }
}

/// The nodes that should run the service `key`, best first. Deterministic: the same
/// candidates (in any order) give the same answer.
pub fn place(key: &str, spec: &PlacementSpec, candidates: &[Candidate<'_>]) -> Vec<NodeId> {
    let mut eligible: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| !c.refuses && fits(c.capacity, spec.demand))
        .filter(|c| spec.constraints.iter().all(|k| k.holds(c.attributes)))
        .collect();
    eligible.sort_by_key(|c| (core::cmp::Reverse(score(key, c.id)), c.id));
    let wanted = match &spec.count {
        Count::Replicas(n) => *n as usize,
        Count::Availability { target } => replicas_for(*target, NODE_AVAILABILITY_DEFAULT) as usize,
        Count::Share { fraction, order_by } => {
            let wanted = (fraction * eligible.len() as f64).ceil() as usize;
            // The top of the ranking by the attribute, ties broken by id.
            let value = |c: &Candidate<'_>| {
                c.attributes
                    .get(order_by)
                    .and_then(|v| parse_quantity(v))
                    .unwrap_or(f64::NEG_INFINITY)
            };
            eligible.sort_by(|a, b| value(b).total_cmp(&value(a)).then(a.id.cmp(&b.id)));
            eligible.truncate(wanted);
            return eligible.iter().map(|c| c.id).collect();
        }
    };
    let Some(spread) = &spec.spread else {
        return eligible.iter().take(wanted).map(|c| c.id).collect();
    };
    // Spread: take, each time, the best remaining node of the least-used value.
    let mut groups: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for c in &eligible {
        let value = c.attributes.get(spread).map_or("", String::as_str);
        groups.entry(value).or_default().push(c.id);
    }
    let mut taken: BTreeMap<&str, usize> = groups.keys().map(|k| (*k, 0)).collect();
    let mut chosen = Vec::new();
    while chosen.len() < wanted {
        let next = groups
            .iter()
            .filter(|(value, nodes)| taken[*value] < nodes.len())
            .min_by_key(|(value, nodes)| {
                let first = nodes[taken[*value]];
                (taken[*value], core::cmp::Reverse(score(key, first)), first)
            })
            .map(|(value, _)| *value);
        let Some(value) = next else {
            break;
        };
        let index = taken[value];
        chosen.push(groups[value][index]);
        if let Some(t) = taken.get_mut(value) {
            *t += 1;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BIG: Demand = Demand {
        cpu_millis: 64_000,
        memory_bytes: 1 << 40,
        disk_bytes: 1 << 40,
    };

    fn spec(count: Count) -> PlacementSpec {
        PlacementSpec {
            count,
            constraints: vec![],
            spread: None,
            demand: Demand::default(),
        }
    }

    #[test]
    fn constraints_parse_and_evaluate() {
        let node = attrs(&[
            ("arch", "x86_64"),
            ("region", "eu"),
            ("memory_free", "1073741824"),
        ]);
        for (text, expected) in [
            ("arch == \"x86_64\"", true),
            ("arch != \"x86_64\"", false),
            ("region in [\"eu\", \"sa\"]", true),
            ("region not in [\"eu\"]", false),
            ("memory_free >= 512MiB", true),
            ("memory_free > 2GiB", false),
            ("gpu == \"yes\"", false),
            ("gpu != \"yes\"", true),
        ] {
            let constraint = Constraint::parse(text).unwrap();
            assert_eq!(constraint.holds(&node), expected, "{text}");
        }
        assert_eq!(
            Constraint::parse("region   in [\"eu\",\"sa\"]")
                .unwrap()
                .to_string(),
            "region in [\"eu\", \"sa\"]"
        );
        assert_eq!(
            Constraint::parse("mem >= 2KiB").unwrap().to_string(),
            "mem >= 2048"
        );
        let bad = Constraint::parse("arch ~ \"x\"").unwrap_err();
        assert_eq!(bad.offset, 5);
        assert!(Constraint::parse("memory >= \"big\"").is_err());
        assert!(Constraint::parse("region in \"eu\"").is_err());
        assert_eq!(parse_quantity("10%"), Some(0.1));
        assert_eq!(parse_quantity("2KiB"), Some(2048.0));
        assert_eq!(parse_quantity("lots"), None);
    }

    #[test]
    fn placement_is_deterministic_and_moves_little_when_a_node_leaves() {
        let empty = BTreeMap::new();
        let nodes: Vec<Candidate<'_>> = (1..=10)
            .map(|i| Candidate {
                id: NodeId(i),
                attributes: &empty,
                capacity: BIG,
                refuses: false,
            })
            .collect();
        let three = spec(Count::Replicas(3));
        let chosen = place("web/site", &three, &nodes);
        assert_eq!(chosen.len(), 3);
        let mut reversed = nodes.clone();
        reversed.reverse();
        assert_eq!(place("web/site", &three, &reversed), chosen);
        // Remove one chosen node: the other two stay.
        let without: Vec<_> = nodes
            .iter()
            .filter(|c| c.id != chosen[0])
            .cloned()
            .collect();
        let after = place("web/site", &three, &without);
        assert_eq!(after.len(), 3);
        assert!(after.contains(&chosen[1]) && after.contains(&chosen[2]));
        // More replicas than nodes: every node.
        assert_eq!(
            place("web/site", &spec(Count::Replicas(50)), &nodes).len(),
            10
        );
    }

    #[test]
    fn refusals_capacity_constraints_share_and_spread_are_respected() {
        let regions: Vec<BTreeMap<String, String>> = (0..6)
            .map(|i| {
                attrs(&[
                    ("region", ["eu", "sa", "us"][i % 3]),
                    ("score", &i.to_string()),
                ])
            })
            .collect();
        let mut nodes: Vec<Candidate<'_>> = regions
            .iter()
            .enumerate()
            .map(|(i, a)| Candidate {
                id: NodeId(i as u128 + 1),
                attributes: a,
                capacity: BIG,
                refuses: false,
            })
            .collect();
        nodes[0].refuses = true;
        nodes[1].capacity = Demand::default();
        let mut s = spec(Count::Replicas(6));
        s.demand.memory_bytes = 1;
        let chosen = place("k", &s, &nodes);
        assert_eq!(chosen.len(), 4);
        assert!(!chosen.contains(&NodeId(1)) && !chosen.contains(&NodeId(2)));

        s.constraints = vec![Constraint::parse("region == \"eu\"").unwrap()];
        assert_eq!(place("k", &s, &nodes), vec![NodeId(4)]);

        let share = spec(Count::Share {
            fraction: 0.5,
            order_by: "score".into(),
        });
        nodes[0].refuses = false;
        nodes[1].capacity = BIG;
        assert_eq!(
            place("k", &share, &nodes),
            vec![NodeId(6), NodeId(5), NodeId(4)]
        );

        let mut spread = spec(Count::Replicas(3));
        spread.spread = Some("region".into());
        let chosen = place("k", &spread, &nodes);
        let mut seen: Vec<&str> = chosen
            .iter()
            .map(|id| regions[(id.0 - 1) as usize]["region"].as_str())
            .collect();
        seen.sort();
        assert_eq!(seen, vec!["eu", "sa", "us"]);
    }

    #[test]
    fn an_unplaceable_service_is_explained_filter_by_filter() {
        let regions: Vec<BTreeMap<String, String>> = (0..6)
            .map(|i| attrs(&[("region", ["eu", "sa"][i % 2])]))
            .collect();
        let mut nodes: Vec<Candidate<'_>> = regions
            .iter()
            .enumerate()
            .map(|(i, a)| Candidate {
                id: NodeId(i as u128 + 1),
                attributes: a,
                capacity: Demand {
                    cpu_millis: 2000,
                    memory_bytes: 4 << 30,
                    disk_bytes: u64::MAX,
                },
                refuses: false,
            })
            .collect();
        nodes[0].refuses = true;
        let mut s = spec(Count::Replicas(2));
        s.demand.memory_bytes = 500 << 30;
        s.constraints = vec![Constraint::parse("region == \"mars\"").unwrap()];
        assert!(place("k", &s, &nodes).is_empty());
        assert_eq!(
            explain(&s, &nodes),
            vec![
                "the node's refusal (over its owner's limits, or the service failed there) filtered 1 of 6 nodes",
                "memory 500GiB filtered 6 of 6 nodes",
                "constraint region == \"mars\" filtered 6 of 6 nodes",
            ]
        );
        assert_eq!(bytes_text(64 << 20), "64MiB");
        assert_eq!(bytes_text(1536 << 20), "1.5GiB");
        assert_eq!(bytes_text(100), "100B");
    }

    #[test]
    fn availability_targets_become_replica_counts() {
        assert_eq!(replicas_for(0.9, 0.9), 1);
        assert_eq!(replicas_for(0.999, 0.9), 3);
        assert_eq!(replicas_for(0.99999, 0.5), 16);
    }
}
