//! The docker driver: an instance is a container the node's Docker engine runs, started by
//! `docker run` (attached, so that the exec driver's wrapper pumps its output into the log
//! and a stop reaches it as a signal) with the same ports (the host's network: the
//! `NUBO_PORT_*` a service gets are the host's), the same limits (memory, cpu, pids, the disk
//! budget as a file size limit, a read-only root with a bounded `/tmp`), its own user, no
//! capabilities and `no-new-privileges`, and its working directory mounted at `/work`.
//! Images must be on the node, or come as the service's artifact (an image archive, loaded
//! with `docker load`); nothing is pulled.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where a container finds its working directory.
pub const WORK_IN_CONTAINER: &str = "/work";
/// How long a `docker` command may take before it counts as failed.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a container runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container<'a> {
    /// Its name (unique on the machine).
    pub name: &'a str,
    /// The image.
    pub image: &'a str,
    /// The command and arguments (empty: the image's own).
    pub command: &'a [String],
    /// Its environment.
    pub env: &'a [(String, String)],
    /// The instance's working directory on the host.
    pub work: &'a Path,
    /// Its own uid (and gid), when the node gives one.
    pub user: Option<u32>,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Thousandths of a core.
    pub cpu_millis: u64,
    /// Processes at once.
    pub pids: u64,
    /// Largest file it may write.
    pub file_bytes: u64,
}

/// The arguments of `docker` that run `container` in the foreground.
pub fn run_args(container: &Container<'_>) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--rm",
        "--name",
        container.name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,nosuid,nodev,size=64m",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--workdir",
        WORK_IN_CONTAINER,
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    args.extend([
        "--memory".into(),
        container.memory_bytes.to_string(),
        "--memory-swap".into(),
        container.memory_bytes.to_string(),
        "--cpus".into(),
        format!(
            "{}.{:03}",
            container.cpu_millis / 1000,
            container.cpu_millis % 1000
        ),
        "--pids-limit".into(),
        container.pids.to_string(),
        "--ulimit".into(),
        format!("fsize={}", container.file_bytes),
        "--volume".into(),
        format!("{}:{WORK_IN_CONTAINER}", container.work.display()),
    ]);
    if let Some(uid) = container.user {
        args.extend(["--user".into(), format!("{uid}:{uid}")]);
    }
    args.extend(["--env".into(), format!("HOME={WORK_IN_CONTAINER}")]);
    args.extend(["--env".into(), "TMPDIR=/tmp".into()]);
    for (name, value) in container.env {
        args.extend(["--env".into(), format!("{name}={value}")]);
    }
    args.push(container.image.to_string());
    args.extend(container.command.iter().cloned());
    args
}

/// The arguments of `docker` that run `argv` in the container `name` (a health check).
pub fn exec_args(name: &str, argv: &[String]) -> Vec<String> {
    let mut args = vec!["exec".to_string(), name.to_string()];
    args.extend(argv.iter().cloned());
    args
}

/// Runs `docker ARGS`, within a timeout; its status, or why not.
fn docker(args: &[&str]) -> io::Result<std::process::ExitStatus> {
    let mut child = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + DOCKER_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            return Err(io::Error::other(format!(
                "docker {} took too long",
                args.join(" ")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a Docker engine answers here.
pub fn available() -> bool {
    docker(&["version", "--format", "{{.Server.Version}}"]).is_ok_and(|s| s.success())
}

/// Removes the container `name`, running or not (a stop that had to kill the `docker run`
/// process, or a host that went away, leaves it behind).
pub fn remove(name: &str) {
    let _ = docker(&["rm", "--force", name]);
}

/// Loads an image archive (`docker save`) into the engine.
pub fn load(archive: &Path) -> io::Result<()> {
    let path = archive.to_string_lossy();
    let status = docker(&["load", "--input", &path])?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other("docker load refused the archive"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_gets_the_limits_user_and_environment_of_its_instance() {
        let command = vec!["/bin/busybox".to_string(), "httpd".into()];
        let env = vec![("NUBO_PORT_HTTP".to_string(), "20001".to_string())];
        let args = run_args(&Container {
            name: "nubo-web.site-1-ab12",
            image: "site:1",
            command: &command,
            env: &env,
            work: Path::new("/data/instances/web.site-1/work"),
            user: Some(3_000_001),
            memory_bytes: 64 << 20,
            cpu_millis: 250,
            pids: 128,
            file_bytes: 1 << 30,
        });
        let text = args.join(" ");
        for expected in [
            "run --rm --name nubo-web.site-1-ab12 --network host --read-only",
            "--cap-drop ALL --security-opt no-new-privileges",
            "--memory 67108864 --memory-swap 67108864 --cpus 0.250 --pids-limit 128",
            "--ulimit fsize=1073741824",
            "--volume /data/instances/web.site-1/work:/work",
            "--user 3000001:3000001",
            "--env NUBO_PORT_HTTP=20001 site:1 /bin/busybox httpd",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
        assert_eq!(exec_args("c", &["true".into()]), vec!["exec", "c", "true"]);
    }
}
