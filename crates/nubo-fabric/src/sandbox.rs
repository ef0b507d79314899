//! What keeps an instance inside its own directory, in layers, each guarding against what the
//! others might miss:
//!
//! - **Its own user** (an unprivileged uid and gid per instance, when the agent is root):
//!   the agent's files (mode 0600, directories 0700), other instances' directories and
//!   processes, and the agent's `/proc` entries (its environment) are another user's.
//! - **Its own mount namespace** (when the agent is root): a private, size-bounded `/tmp`, and
//!   its working directory bind-mounted at [`WORK_DIR`] inside it; the agent's data directory,
//!   wherever it is, is not on the instance's paths at all (under `/tmp` it is hidden by the
//!   private one).
//! - **Landlock** (any user, kernel 5.13 and later): it may write only under `/tmp` (its own,
//!   in its namespace) or its working directory, and `/dev/null`; it reads what its user may.
//! - **`no_new_privs`**: no set-user-id program gives it more rights.
//! - **Resource limits** of the process: data segment, open files, largest file (the disk
//!   budget; a sparse file cannot pretend to be small), on top of the cgroup limits that hold
//!   for all its processes together.

use std::io;
use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};

/// Where an instance finds its working directory inside its own mount namespace.
pub const WORK_DIR: &str = "/tmp/work";
/// Size of an instance's private `/tmp` (its working directory is not counted: it is mounted
/// from the disk).
pub const TMP_BYTES: u64 = 64 << 20;
/// Open files allowed to an instance.
pub const NOFILE_MAX: u64 = 4096;

/// How strongly instances are isolated on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Own user, own mount namespace, Landlock, `no_new_privs`.
    Full,
    /// The agent is not root: Landlock and `no_new_privs` only (same user as the agent).
    LandlockOnly,
}

impl Isolation {
    /// This process's isolation level: full when it may change users, mount and give files
    /// away (root with CAP_SYS_ADMIN, CAP_SETUID, CAP_SETGID and CAP_CHOWN; a container's root
    /// usually lacks the first).
    pub fn of_this_process() -> Isolation {
        const CHOWN: u32 = 0;
        const SETGID: u32 = 6;
        const SETUID: u32 = 7;
        const SYS_ADMIN: u32 = 21;
        let effective = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            })
            .unwrap_or(0);
        let has = |cap: u32| effective & (1 << cap) != 0;
        if nix::unistd::geteuid().is_root()
            && [CHOWN, SETGID, SETUID, SYS_ADMIN].into_iter().all(has)
        {
            Isolation::Full
        } else {
            Isolation::LandlockOnly
        }
    }

    /// In words, for `nubo status`.
    pub fn describe(self) -> &'static str {
        match self {
            Isolation::Full => {
                "own user, own mount namespace with a private /tmp, Landlock, no_new_privs"
            }
            Isolation::LandlockOnly => {
                "Landlock and no_new_privs only (the agent may not change users or mount: instances run as its user)"
            }
        }
    }
}

/// In the wrapper, as root: a mount namespace of the instance's own, with a private `/tmp`
/// and `work` mounted at [`WORK_DIR`]. Mounts made here do not leak to the host.
pub fn enter_namespace(work: &Path) -> io::Result<()> {
    let fail = |what: &str, error: nix::Error| io::Error::other(format!("{what}: {error}"));
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| fail("cannot make a mount namespace", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail("cannot make mounts private", e))?;
    // Held open, in this namespace: the private /tmp may hide its path (it may lie there).
    let held = std::fs::File::open(work)?;
    let source = {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", held.as_raw_fd())
    };
    let options = format!("size={TMP_BYTES},mode=1777");
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| fail("cannot mount a private /tmp", e))?;
    std::fs::create_dir(WORK_DIR)?;
    mount(
        Some(source.as_str()),
        WORK_DIR,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| fail("cannot mount the working directory", e))
}

/// What an instance sharing the agent's user may read: the system's files, not the home or
/// data directories where the agent keeps its secrets.
const SYSTEM_DIRS: [&str; 11] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc", "/opt", "/proc", "/sys", "/dev",
];

/// In the instance's process, just before it becomes the program: Landlock (writes only under
/// `writable` and to `/dev/null`; reads everywhere its user may when `own_user`, else only the
/// system's directories and `writable`), `no_new_privs`, and the process limits. Returns
/// whether Landlock is enforced (kernels before 5.13 have none).
pub fn restrict(
    writable: &Path,
    own_user: bool,
    memory_bytes: u64,
    file_bytes: u64,
) -> io::Result<bool> {
    let abi = ABI::V5;
    let fail = |error: landlock::RulesetError| io::Error::other(format!("landlock: {error}"));
    let path =
        |p: &Path| PathFd::new(p).map_err(|e| io::Error::other(format!("{}: {e}", p.display())));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    let readable: Vec<&str> = if own_user {
        vec!["/"]
    } else {
        SYSTEM_DIRS.to_vec()
    };
    for dir in readable {
        if let Ok(fd) = path(Path::new(dir)) {
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, AccessFs::from_read(abi)))
                .map_err(fail)?;
        }
    }
    ruleset = ruleset
        .add_rule(PathBeneath::new(path(writable)?, AccessFs::from_all(abi)))
        .map_err(fail)?;
    if let Ok(null) = path(Path::new("/dev/null")) {
        ruleset = ruleset
            .add_rule(PathBeneath::new(
                null,
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))
            .map_err(fail)?;
    }
    let status = ruleset.restrict_self().map_err(fail)?;
    if !status.no_new_privs {
        nix::sys::prctl::set_no_new_privs()
            .map_err(|e| io::Error::other(format!("no_new_privs: {e}")))?;
    }
    let limit = |resource, value: u64, what: &str| {
        setrlimit(resource, value, value)
            .map_err(|e| io::Error::other(format!("cannot limit {what}: {e}")))
    };
    limit(Resource::RLIMIT_DATA, memory_bytes, "memory")?;
    limit(Resource::RLIMIT_NOFILE, NOFILE_MAX, "open files")?;
    limit(Resource::RLIMIT_FSIZE, file_bytes, "file size")?;
    Ok(status.ruleset != RulesetStatus::NotEnforced)
}
