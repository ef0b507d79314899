//! Control groups: the limits of an instance that hold for every process it starts.
//!
//! On a host with a cgroup v2 hierarchy that offers the `memory`, `cpu` and `pids`
//! controllers, the agent makes a subtree of its own cgroup (moving itself into a leaf, as v2
//! wants no processes beside child groups) and gives each instance a group there. On a hybrid
//! host whose v2 hierarchy has no controllers but whose v1 `memory`, `cpu` and `pids`
//! hierarchies are mounted writable, it makes a group per instance in each, under its own
//! place in that hierarchy. Each group is probed at start (made, limited, removed); what
//! cannot be made is reported, and the agent says which limits it cannot enforce.
//!
//! Under systemd, give the agent a delegated subtree with `Delegate=yes` in its unit (or run
//! it with `systemd-run --property=Delegate=yes`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The limits of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupLimits {
    /// Memory in bytes (every process of the instance together).
    pub memory_bytes: u64,
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Processes and threads at once.
    pub pids: u64,
}

/// Which controllers hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforced {
    /// Memory.
    pub memory: bool,
    /// Cpu time.
    pub cpu: bool,
    /// Processes.
    pub pids: bool,
}

impl Enforced {
    /// Whether every limit holds.
    pub fn all(self) -> bool {
        self.memory && self.cpu && self.pids
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// One v2 directory per instance, under `base`.
    V2 { base: PathBuf },
    /// One directory per controller, each under its base.
    V1 {
        memory: Option<PathBuf>,
        cpu: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
    /// No writable controller.
    None,
}

/// Where this agent's instance groups go, and what they enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    kind: Kind,
    enforced: Enforced,
}

/// A mounted cgroup hierarchy: its mount point, version, and (v1) controllers.
#[derive(Debug)]
struct Mount {
    point: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split_whitespace().nth(4)?;
            let mut after = after.split_whitespace();
            let fstype = after.next()?;
            let options = after.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => Some(Mount {
                    point: PathBuf::from(point),
                    v2: true,
                    controllers: Vec::new(),
                }),
                "cgroup" => Some(Mount {
                    point: PathBuf::from(point),
                    v2: false,
                    controllers: options.split(',').map(str::to_string).collect(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// This process's place in each hierarchy: (controllers, path) from /proc/self/cgroup.
fn own_groups() -> Vec<(Vec<String>, String)> {
    let Ok(text) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((
                controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path.to_string(),
            ))
        })
        .collect()
}

fn relative(path: &str) -> &Path {
    Path::new(path.trim_start_matches('/'))
}

impl Cgroups {
    /// Finds and prepares the groups of agent `agent` (a short id, so that agents sharing a
    /// machine keep apart), probing each controller.
    pub fn detect(agent: &str) -> Cgroups {
        let mounts = mounts();
        let own = own_groups();
        if let Some(v2) = mounts.iter().find(|m| m.v2)
            && let Some(cgroups) = Cgroups::v2(&v2.point, &own, agent)
        {
            return cgroups;
        }
        let v1 = |controller: &str| -> Option<PathBuf> {
            let mount = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
            let place = own
                .iter()
                .find(|(controllers, _)| controllers.iter().any(|c| c == controller))
                .map_or("/", |(_, path)| path.as_str());
            let base = mount
                .point
                .join(relative(place))
                .join(format!("nubo-{agent}"));
            fs::create_dir_all(&base).ok()?;
            Some(base)
        };
        let (memory, cpu, pids) = (v1("memory"), v1("cpu"), v1("pids"));
        let mut cgroups = Cgroups {
            kind: Kind::V1 { memory, cpu, pids },
            enforced: Enforced::default(),
        };
        cgroups.enforced = cgroups.probe();
        if cgroups.enforced == Enforced::default() {
            cgroups.kind = Kind::None;
        }
        cgroups
    }

    fn v2(mount: &Path, own: &[(Vec<String>, String)], agent: &str) -> Option<Cgroups> {
        let place = own
            .iter()
            .find(|(controllers, _)| controllers.is_empty())
            .map_or("/", |(_, path)| path.as_str());
        let parent = mount.join(relative(place));
        let available = fs::read_to_string(parent.join("cgroup.controllers")).ok()?;
        let wanted = ["memory", "cpu", "pids"];
        if !wanted
            .iter()
            .all(|c| available.split_whitespace().any(|a| a == *c))
        {
            return None;
        }
        let enable =
            |dir: &Path| fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu +pids");
        if enable(&parent).is_err() && place != "/" {
            // No processes beside child groups: this agent moves into a leaf first.
            let leaf = parent.join(format!("agent-{agent}"));
            fs::create_dir_all(&leaf).ok()?;
            fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).ok()?;
            enable(&parent).ok()?;
        }
        let base = parent.join(format!("nubo-{agent}"));
        fs::create_dir_all(&base).ok()?;
        enable(&base).ok()?;
        let mut cgroups = Cgroups {
            kind: Kind::V2 { base },
            enforced: Enforced::default(),
        };
        cgroups.enforced = cgroups.probe();
        cgroups.enforced.all().then_some(cgroups)
    }

    /// No cgroups at all (tests, and hosts where none is wanted).
    pub fn none() -> Cgroups {
        Cgroups {
            kind: Kind::None,
            enforced: Enforced::default(),
        }
    }

    /// Makes, limits and removes a probe group: which limits can be set.
    fn probe(&self) -> Enforced {
        let probe = "probe";
        let limits = GroupLimits {
            memory_bytes: 64 << 20,
            cpu_millis: 100,
            pids: 16,
        };
        let enforced = match &self.kind {
            Kind::V2 { base } => {
                let dir = base.join(probe);
                let ok = fs::create_dir_all(&dir).is_ok() && write_v2(&dir, limits).is_ok();
                Enforced {
                    memory: ok,
                    cpu: ok,
                    pids: ok,
                }
            }
            Kind::V1 { memory, cpu, pids } => {
                let try_one = |base: &Option<PathBuf>, write: &dyn Fn(&Path) -> io::Result<()>| {
                    base.as_ref().is_some_and(|b| {
                        let dir = b.join(probe);
                        fs::create_dir_all(&dir).is_ok() && write(&dir).is_ok()
                    })
                };
                Enforced {
                    memory: try_one(memory, &|d| write_v1_memory(d, limits.memory_bytes)),
                    cpu: try_one(cpu, &|d| write_v1_cpu(d, limits.cpu_millis)),
                    pids: try_one(pids, &|d| {
                        fs::write(d.join("pids.max"), limits.pids.to_string())
                    }),
                }
            }
            Kind::None => Enforced::default(),
        };
        self.remove(probe);
        enforced
    }

    /// Which limits hold.
    pub fn enforced(&self) -> Enforced {
        self.enforced
    }

    /// How limits are enforced, for operators.
    pub fn describe(&self) -> String {
        let e = self.enforced;
        let held: Vec<&str> = [("memory", e.memory), ("cpu", e.cpu), ("pids", e.pids)]
            .into_iter()
            .filter_map(|(name, ok)| ok.then_some(name))
            .collect();
        match &self.kind {
            Kind::V2 { .. } => format!("cgroup v2 ({})", held.join(", ")),
            Kind::V1 { .. } => format!("cgroup v1 ({})", held.join(", ")),
            Kind::None => "none: no writable cgroup (each process's own memory only)".into(),
        }
    }

    /// Makes the groups of instance `id` with `limits`; returns the directories the
    /// instance's first process joins (writing its pid into `cgroup.procs` of each).
    pub fn create(&self, id: &str, limits: GroupLimits) -> io::Result<Vec<PathBuf>> {
        match &self.kind {
            Kind::V2 { base } => {
                let dir = base.join(id);
                fs::create_dir_all(&dir)?;
                write_v2(&dir, limits)?;
                Ok(vec![dir])
            }
            Kind::V1 { memory, cpu, pids } => {
                let mut dirs = Vec::new();
                if let (Some(base), true) = (memory, self.enforced.memory) {
                    let dir = base.join(id);
                    fs::create_dir_all(&dir)?;
                    write_v1_memory(&dir, limits.memory_bytes)?;
                    dirs.push(dir);
                }
                if let (Some(base), true) = (cpu, self.enforced.cpu) {
                    let dir = base.join(id);
                    fs::create_dir_all(&dir)?;
                    write_v1_cpu(&dir, limits.cpu_millis)?;
                    dirs.push(dir);
                }
                if let (Some(base), true) = (pids, self.enforced.pids) {
                    let dir = base.join(id);
                    fs::create_dir_all(&dir)?;
                    fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                    dirs.push(dir);
                }
                Ok(dirs)
            }
            Kind::None => Ok(Vec::new()),
        }
    }

    /// Removes the groups of instance `id` (once its processes are gone).
    pub fn remove(&self, id: &str) {
        for base in self.bases() {
            let _ = fs::remove_dir(base.join(id));
        }
    }

    /// Whether the kernel killed a process of instance `id` for want of memory.
    pub fn oom_killed(&self, id: &str) -> bool {
        let count = |file: PathBuf| -> u64 {
            fs::read_to_string(file)
                .ok()
                .and_then(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        match &self.kind {
            Kind::V2 { base } => count(base.join(id).join("memory.events")) > 0,
            Kind::V1 {
                memory: Some(base), ..
            } => count(base.join(id).join("memory.oom_control")) > 0,
            _ => false,
        }
    }

    /// Whether instance `id` was refused a new process for its pids limit.
    pub fn pids_exhausted(&self, id: &str) -> bool {
        let events = match &self.kind {
            Kind::V2 { base } => base.join(id).join("pids.events"),
            Kind::V1 {
                pids: Some(base), ..
            } => base.join(id).join("pids.events"),
            _ => return false,
        };
        fs::read_to_string(events)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("max ")?.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    fn bases(&self) -> Vec<&Path> {
        match &self.kind {
            Kind::V2 { base } => vec![base.as_path()],
            Kind::V1 { memory, cpu, pids } => [memory, cpu, pids]
                .into_iter()
                .flatten()
                .map(PathBuf::as_path)
                .collect(),
            Kind::None => Vec::new(),
        }
    }
}

fn write_v2(dir: &Path, limits: GroupLimits) -> io::Result<()> {
    fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
    let _ = fs::write(dir.join("memory.swap.max"), "0");
    fs::write(
        dir.join("cpu.max"),
        format!("{} 100000", cpu_quota(limits.cpu_millis)),
    )?;
    fs::write(dir.join("pids.max"), limits.pids.to_string())
}

fn write_v1_memory(dir: &Path, bytes: u64) -> io::Result<()> {
    fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string())?;
    // With swap accounting, swap counts too (the file is missing without it).
    let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
    let _ = fs::write(dir.join("memory.swappiness"), "0");
    Ok(())
}

fn write_v1_cpu(dir: &Path, millis: u64) -> io::Result<()> {
    fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
    fs::write(dir.join("cpu.cfs_quota_us"), cpu_quota(millis).to_string())
}

/// Microseconds of cpu per 100 ms period: a thousandth of a core is 100 µs, at least 1 ms.
fn cpu_quota(millis: u64) -> u64 {
    millis.saturating_mul(100).max(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_bounded_below_and_never_overflow() {
        assert_eq!(cpu_quota(250), 25_000);
        assert_eq!(cpu_quota(1), 1000);
        assert_eq!(cpu_quota(u64::MAX), u64::MAX);
    }

    #[test]
    fn without_cgroups_nothing_is_made_and_it_says_so() {
        let none = Cgroups::none();
        assert_eq!(none.enforced(), Enforced::default());
        assert!(none.describe().starts_with("none"));
        assert!(
            none.create(
                "x",
                GroupLimits {
                    memory_bytes: 1,
                    cpu_millis: 1,
                    pids: 1
                }
            )
            .unwrap()
            .is_empty()
        );
    }
}
