//! The exec driver: an instance is a process group started through `nubo instance-exec`, a
//! small wrapper that applies the limits to itself and then becomes the program.
//!
//! Limits: the memory limit is the wrapper's `RLIMIT_DATA` (heap and private mappings) and,
//! where the cgroup v2 hierarchy is writable, `memory.max` and `cpu.max` of a cgroup the
//! wrapper enters before `exec`. Standard output and error go to one log file, appended to;
//! [`cap_log`] keeps it bounded. The instance runs in its own process group, so stopping it
//! signals everything it started. Because it does not depend on the agent's pipes, it
//! survives an agent crash and can be adopted by the next agent ([`is_same_process`]).

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Where the cgroups of instances go, when the hierarchy is writable.
const CGROUP_ROOT: &str = "/sys/fs/cgroup/nubo";
/// Open files allowed to an instance.
pub const NOFILE_MAX: u64 = 4096;

/// Resource limits of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Thousandths of a core.
    pub cpu_millis: u64,
}

/// Everything needed to start an instance.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The instance's id (a file-name-safe string).
    pub id: String,
    /// Its working directory (created if missing).
    pub dir: PathBuf,
    /// The program.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (added to a minimal one: PATH, HOME).
    pub env: Vec<(String, String)>,
    /// Its limits.
    pub limits: Limits,
    /// The `nubo` executable, to run the wrapper.
    pub wrapper: PathBuf,
}

/// A started instance.
#[derive(Debug)]
pub struct Started {
    /// The process id (also its process group id).
    pub pid: u32,
    /// The kernel's start time of the process, to recognise it later.
    pub start_ticks: u64,
    /// How its limits are enforced: `cgroup` or `rlimit`.
    pub enforcement: &'static str,
    /// Its exit status, when it exits (negative: killed by that signal).
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

/// The log file of an instance directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("output.log")
}

/// Prepares a cgroup for `id` with `limits`; `None` where cgroups are not writable.
fn prepare_cgroup(id: &str, limits: Limits) -> Option<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return None;
    }
    fs::create_dir_all(root).ok()?;
    // Delegate the controllers to our subtree; harmless if already done.
    let _ = fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
    let group = root.join(id);
    fs::create_dir_all(&group).ok()?;
    fs::write(group.join("memory.max"), limits.memory_bytes.to_string()).ok()?;
    let _ = fs::write(group.join("memory.swap.max"), "0");
    let quota = (limits.cpu_millis * 100).max(1000);
    let _ = fs::write(group.join("cpu.max"), format!("{quota} 100000"));
    Some(group)
}

/// Removes an instance's cgroup (after its processes are gone).
pub fn remove_cgroup(id: &str) {
    let _ = fs::remove_dir(Path::new(CGROUP_ROOT).join(id));
}

/// Starts an instance. Its output goes to [`log_path`].
pub fn spawn(launch: &Launch) -> io::Result<Started> {
    fs::create_dir_all(&launch.dir)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(&launch.dir))?;
    let cgroup = prepare_cgroup(&launch.id, launch.limits);
    let mut command = Command::new(&launch.wrapper);
    command
        .arg("instance-exec")
        .arg("--memory-bytes")
        .arg(launch.limits.memory_bytes.to_string());
    if let Some(group) = &cgroup {
        command.arg("--cgroup").arg(group);
    }
    command
        .arg("--")
        .arg(&launch.command)
        .args(&launch.args)
        .current_dir(&launch.dir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("HOME", &launch.dir)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    let child = command.spawn()?;
    let pid = child.id();
    // A reaper thread collects the exit status, so no zombie remains and the agent learns
    // how the instance ended.
    let (exit_tx, exit) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::ExitStatusExt;
        let mut child = child;
        let status = child
            .wait()
            .map(|s| s.code().unwrap_or_else(|| -s.signal().unwrap_or(0)))
            .unwrap_or(-1);
        let _ = exit_tx.send(status);
    });
    Ok(Started {
        pid,
        start_ticks: start_ticks(pid).unwrap_or(0),
        enforcement: if cgroup.is_some() { "cgroup" } else { "rlimit" },
        exit,
    })
}

/// In the wrapper process: enter the cgroup, apply the limits, then become the program.
/// Returns only on failure.
pub fn exec_limited(
    memory_bytes: u64,
    cgroup: Option<&Path>,
    program: &str,
    args: &[String],
) -> io::Error {
    if let Some(group) = cgroup
        && let Err(error) = fs::write(group.join("cgroup.procs"), std::process::id().to_string())
    {
        eprintln!(
            "nubo: cannot enter cgroup {}: {error}; using rlimits only",
            group.display()
        );
    }
    if let Err(error) = setrlimit(Resource::RLIMIT_DATA, memory_bytes, memory_bytes) {
        return io::Error::other(format!("cannot limit memory: {error}"));
    }
    if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, NOFILE_MAX, NOFILE_MAX) {
        return io::Error::other(format!("cannot limit open files: {error}"));
    }
    Command::new(program).args(args).exec()
}

/// The kernel's start time of `pid` (field 22 of /proc/PID/stat), in clock ticks.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    fields.get(19)?.parse().ok()
}

/// Whether `pid` is still the process started at `ticks` (not a zombie, not a reused pid).
pub fn is_same_process(pid: u32, ticks: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    state != Some("Z") && start_ticks(pid) == Some(ticks)
}

/// Sends `signal` to the instance's process group.
pub fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// Keeps a log file under `max_bytes`: beyond it, the file moves to `.1` (replacing the
/// previous one) and starts again empty. The instance keeps appending to the same file.
pub fn cap_log(path: &Path, max_bytes: u64) -> io::Result<()> {
    if fs::metadata(path)?.len() <= max_bytes {
        return Ok(());
    }
    fs::copy(path, path.with_extension("log.1"))?;
    OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// The last `max_bytes` of an instance's log.
pub fn log_tail(dir: &Path, max_bytes: u64) -> String {
    let Ok(bytes) = fs::read(log_path(dir)) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max_bytes as usize);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// A free TCP port in `range` and not in `taken` (ports given to instances that may not
/// listen yet), starting the search at `hint` (so each instance tends to get a stable port).
pub fn free_port(
    range: std::ops::RangeInclusive<u16>,
    hint: u64,
    taken: &std::collections::BTreeSet<u16>,
) -> Option<u16> {
    let (lo, hi) = (*range.start() as u64, *range.end() as u64);
    let span = hi - lo + 1;
    (0..span.min(2000)).find_map(|i| {
        let port = (lo + hint.wrapping_add(i) % span) as u16;
        if taken.contains(&port) {
            return None;
        }
        std::net::TcpListener::bind(("0.0.0.0", port))
            .ok()
            .map(|_| port)
    })
}
