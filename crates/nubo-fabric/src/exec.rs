//! The exec driver: an instance is a process group started through two small stages of the
//! `nubo` binary itself.
//!
//! 1. `nubo instance-exec` (the group leader, started by the agent, root where the agent is)
//!    joins the instance's cgroups, opens the log, makes the instance's mount namespace
//!    ([`sandbox::enter_namespace`]), starts stage 2 as the instance's own user, and then only
//!    copies the instance's output into the log, rotating it as it is written so that it never
//!    grows past its cap, until the instance exits (whose status it exits with). It ignores
//!    SIGTERM, so that a stop reaches the program and its last words still reach the log.
//! 2. `nubo instance-run`, as the instance's user, restricts itself
//!    ([`sandbox::restrict`]: Landlock, `no_new_privs`, process limits) and becomes the
//!    program, in the working directory, with a clean environment.
//!
//! The instance's directory holds `work/` (its working directory, its own user's), and the
//! log files, which only the agent can reach: the instance cannot replace them with a link.
//! Instances do not depend on the agent's pipes, so they survive an agent crash; the next
//! agent recognises them by pid and kernel start time ([`is_same_process`]).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{SigSet, Signal, killpg};
use nix::unistd::Pid;

use crate::sandbox::{self, WORK_DIR};

/// The `PATH` instances get (a description may set another).
pub const INSTANCE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The log file of an instance, in its directory.
pub const LOG_FILE: &str = "output.log";
/// The previous log, after a rotation.
pub const LOG_FILE_OLD: &str = "output.log.1";

/// Resource limits of one instance's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes (each process's data segment; the cgroup holds them all).
    pub memory_bytes: u64,
    /// Largest file it may write: its disk budget.
    pub file_bytes: u64,
    /// Largest log before it is rotated.
    pub log_bytes: u64,
}

/// Everything needed to start an instance.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The instance's directory (the agent's): the log, and `work/`.
    pub dir: PathBuf,
    /// The program.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (added to `PATH`, `HOME` and `TMPDIR`, which it may override).
    pub env: Vec<(String, String)>,
    /// Its limits.
    pub limits: Limits,
    /// The cgroup directories it joins.
    pub cgroups: Vec<PathBuf>,
    /// Its own uid (and gid), when the agent is root.
    pub user: Option<u32>,
    /// The `nubo` executable, to run the stages.
    pub wrapper: PathBuf,
    /// Where the stage-1 wrapper writes: the log file (`output.log`), or another name in the
    /// directory (a health check's output).
    pub log: &'static str,
    /// Run the command as it is, without stage 2 (no user, namespace or Landlock of its
    /// own): a `docker` command, whose container is the sandbox.
    pub direct: bool,
}

impl Launch {
    /// The working directory on the host.
    pub fn work(&self) -> PathBuf {
        work_dir(&self.dir)
    }

    /// Where the instance sees its working directory.
    pub fn work_inside(&self) -> PathBuf {
        if self.user.is_some() {
            PathBuf::from(WORK_DIR)
        } else {
            self.work()
        }
    }
}

/// A started instance.
#[derive(Debug)]
pub struct Started {
    /// The process id (also its process group id).
    pub pid: u32,
    /// The kernel's start time of the process, to recognise it later.
    pub start_ticks: u64,
    /// Its exit status, when it exits (negative: killed by that signal).
    pub exit: tokio::sync::oneshot::Receiver<i32>,
}

/// The log file of an instance directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join(LOG_FILE)
}

/// The working directory of an instance directory.
pub fn work_dir(dir: &Path) -> PathBuf {
    dir.join("work")
}

/// Makes an instance's directory: its own (the agent's, 0700: the instance reaches `work/`
/// through its mount namespace, never by this path) and `work/` inside, owned by `user` when
/// there is one.
pub fn prepare_dir(dir: &Path, user: Option<u32>) -> io::Result<()> {
    fs::create_dir_all(work_dir(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    give(&work_dir(dir), user)
}

/// Gives `path` and everything under it to `user` (when there is one); the top is made 0700.
pub fn give(path: &Path, user: Option<u32>) -> io::Result<()> {
    let Some(uid) = user else {
        return Ok(());
    };
    fn walk(path: &Path, uid: u32) -> io::Result<()> {
        let id = Some(uid);
        std::os::unix::fs::lchown(path, id, id)?;
        if fs::symlink_metadata(path)?.is_dir() {
            for entry in fs::read_dir(path)? {
                walk(&entry?.path(), uid)?;
            }
        }
        Ok(())
    }
    walk(path, uid)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// Starts an instance; its output goes to its log through the stage-1 wrapper.
pub fn spawn(launch: &Launch) -> io::Result<Started> {
    let work = launch.work();
    let inside = launch.work_inside();
    let tmp = if launch.user.is_some() {
        PathBuf::from("/tmp")
    } else {
        // Without a namespace of its own, its temporary files stay in its directory.
        let tmp = work.join(".tmp");
        fs::create_dir_all(&tmp)?;
        tmp
    };
    let mut command = Command::new(&launch.wrapper);
    command
        .arg("instance-exec")
        .arg("--memory-bytes")
        .arg(launch.limits.memory_bytes.to_string())
        .arg("--file-bytes")
        .arg(launch.limits.file_bytes.to_string())
        .arg("--log")
        .arg(launch.dir.join(launch.log))
        .arg("--log-bytes")
        .arg(launch.limits.log_bytes.to_string())
        .arg("--work")
        .arg(&work);
    for group in &launch.cgroups {
        command.arg("--cgroup").arg(group);
    }
    if launch.direct {
        command.arg("--direct");
    } else if let Some(uid) = launch.user {
        command.arg("--user").arg(uid.to_string());
    }
    command
        .arg("--")
        .arg(&launch.command)
        .args(&launch.args)
        .current_dir(&launch.dir)
        .env_clear()
        .env("PATH", INSTANCE_PATH)
        .env("HOME", &inside)
        .env("TMPDIR", &tmp)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
        exit,
    })
}

/// What stage 1 is told.
#[derive(Clone, Debug)]
pub struct Stage1 {
    /// Cgroup directories to join.
    pub cgroups: Vec<PathBuf>,
    /// The instance's uid (and gid): with it, a mount namespace of its own too.
    pub user: Option<u32>,
    /// Run the command as it is (see [`Launch::direct`]).
    pub direct: bool,
    /// The working directory on the host.
    pub work: PathBuf,
    /// The log file.
    pub log: PathBuf,
    /// Largest log before rotation.
    pub log_bytes: u64,
    /// Memory per process.
    pub memory_bytes: u64,
    /// Largest file.
    pub file_bytes: u64,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Stage 1, in the wrapper process: returns the exit status to leave with.
pub fn stage1(stage: &Stage1) -> io::Result<i32> {
    // Stops are for the program; this process carries its output to the end.
    let mut blocked = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        blocked.add(signal);
    }
    blocked
        .thread_block()
        .map_err(|e| io::Error::other(format!("cannot block signals: {e}")))?;
    for group in &stage.cgroups {
        fs::write(group.join("cgroup.procs"), std::process::id().to_string()).map_err(|e| {
            io::Error::other(format!("cannot enter cgroup {}: {e}", group.display()))
        })?;
    }
    let log = Log::open(&stage.log, stage.log_bytes)?;
    let (program, args) = stage
        .command
        .split_first()
        .ok_or_else(|| io::Error::other("no program given"))?;
    if stage.direct {
        let mut command = Command::new(program);
        command.args(args);
        return pump(command, log);
    }
    let inside = match stage.user {
        Some(_) => {
            sandbox::enter_namespace(&stage.work)?;
            PathBuf::from(WORK_DIR)
        }
        None => stage.work.clone(),
    };
    let writable = match stage.user {
        Some(_) => PathBuf::from("/tmp"),
        None => stage.work.clone(),
    };
    // /proc/self/exe reaches this binary even where its path is hidden or not traversable.
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("instance-run")
        .arg("--memory-bytes")
        .arg(stage.memory_bytes.to_string())
        .arg("--file-bytes")
        .arg(stage.file_bytes.to_string())
        .arg("--writable")
        .arg(&writable);
    if stage.user.is_some() {
        command.arg("--own-user");
    }
    command
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir(&inside);
    if let Some(uid) = stage.user {
        // std drops the supplementary groups of root when it changes the uid.
        command.uid(uid).gid(uid);
    }
    pump(command, log)
}

/// Starts `command` with its output piped into `log`, copies it there until the command
/// exits, and returns the status to leave with (128 + the signal that killed it, if one did).
fn pump(mut command: Command, mut log: Log) -> io::Result<i32> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            log.write(format!("nubo: cannot start the instance: {error}\n").as_bytes());
            return Err(error);
        }
    };
    let log = Arc::new(Mutex::new(log));
    let pumps: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut source| {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            while let Ok(n) = source.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(&buffer[..n]);
            }
        })
    })
    .collect();
    let status = child.wait()?;
    for pump in pumps {
        let _ = pump.join();
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

/// Stage 2, in the instance's process: restricts itself and becomes the program. Returns only
/// on failure.
pub fn stage2(
    writable: &Path,
    own_user: bool,
    memory_bytes: u64,
    file_bytes: u64,
    command: &[String],
) -> io::Error {
    let Some((program, args)) = command.split_first() else {
        return io::Error::other("no program given");
    };
    if let Err(error) = sandbox::restrict(writable, own_user, memory_bytes, file_bytes) {
        return error;
    }
    Command::new(program).args(args).exec()
}

/// A log file written as output arrives, rotated when it would pass its cap: the file moves
/// to `output.log.1` (replacing the previous one) and a new one starts. The directory is
/// reached through a descriptor opened at start, so later mounts do not hide it, and files
/// are opened without following links.
struct Log {
    dir: fs::File,
    name: String,
    file: Option<fs::File>,
    written: u64,
    cap: u64,
}

impl Log {
    fn open(path: &Path, cap: u64) -> io::Result<Log> {
        let parent = path.parent().unwrap_or(Path::new("."));
        let dir = fs::File::open(parent)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("the log has no file name"))?
            .to_string();
        let mut log = Log {
            dir,
            name,
            file: None,
            written: 0,
            cap: cap.max(4096),
        };
        log.reopen(false)?;
        Ok(log)
    }

    fn path(&self, name: &str) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.dir.as_raw_fd()))
    }

    fn reopen(&mut self, truncate: bool) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(!truncate)
            .write(true)
            .truncate(truncate)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(self.path(&self.name))?;
        self.written = file.metadata().map_or(0, |m| m.len());
        self.file = Some(file);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.written.saturating_add(bytes.len() as u64) > self.cap {
            let old = format!("{}.1", self.name);
            let _ = fs::rename(self.path(&self.name), self.path(&old));
            if self.reopen(true).is_err() {
                self.file = None;
            }
        }
        if let Some(file) = self.file.as_mut()
            && file.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
        }
    }
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
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    let _ = killpg(Pid::from_raw(pid), signal);
}

/// Bytes the files under `dir` take on disk (blocks allocated, so a sparse file counts what it
/// holds), not following links.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return 0;
    };
    let own = meta.blocks().saturating_mul(512);
    if !meta.is_dir() {
        return own;
    }
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| disk_usage(&e.path()))
                .fold(own, u64::saturating_add)
        })
        .unwrap_or(own)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_rotates_as_it_is_written_and_never_follows_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut log = Log::open(&path, 10_000).unwrap();
        for _ in 0..100 {
            log.write(&[b'x'; 1000]);
            assert!(fs::metadata(&path).unwrap().len() <= 10_000);
        }
        assert_eq!(
            fs::metadata(dir.path().join(LOG_FILE_OLD)).unwrap().len(),
            10_000
        );
        // A link where the log goes is not followed.
        let outside = dir.path().join("outside");
        fs::write(&outside, "untouched").unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&outside, &path).unwrap();
        assert!(Log::open(&path, 10_000).is_err());
        assert_eq!(fs::read_to_string(&outside).unwrap(), "untouched");
    }

    #[test]
    fn disk_usage_counts_blocks_not_apparent_size() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        fs::write(dir.path().join("real"), vec![1u8; 64 * 1024]).unwrap();
        let used = disk_usage(dir.path());
        assert!((64 * 1024..1 << 20).contains(&used), "{used}");
    }
}
