//! A write is acknowledged only once it is on disk: agents whose disks are full refuse it,
//! say why, lose nothing and take writes again once there is room.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Agent, Cloud, ONE_CLOUD_AT_A_TIME, cli_at, wait_until};

/// A small tmpfs mounted on a directory for the test's life.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path) -> Option<SmallDisk> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| SmallDisk(dir.to_path_buf()))
    }

    /// Fills the disk with one file until nothing more fits.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0xA5u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        let small = [0u8; 512];
        while file.write_all(&small).is_ok() {}
        let _ = file.sync_all();
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `nubo kv put KEY -` with `value` on standard input; the error text if it failed.
fn put_from_stdin(agent: &Agent, key: &str, value: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut child = cli_at(&agent.dir)
        .args(["kv", "put", key, "-", "--data-dir"])
        .arg(&agent.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(value).unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn a_write_that_full_disks_cannot_save_fails_and_succeeds_once_there_is_room() {
    let _one = ONE_CLOUD_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let disks = std::sync::Mutex::new(Vec::new());
    let probe = tempfile::tempdir().unwrap();
    match SmallDisk::mount(probe.path()) {
        Some(disk) => drop(disk),
        None => {
            eprintln!("skipped: this machine does not let the test mount a tmpfs (needs root)");
            return;
        }
    }
    let cloud = Cloud::start_prepared(
        3,
        |_| Vec::new(),
        |dir| disks.lock().unwrap().push(SmallDisk::mount(dir).unwrap()),
    );
    let disks = disks.into_inner().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || {
            cloud.agents.iter().all(|a| a.members_alive() == 3)
                && cloud.agents[0].put("before", "1").is_ok()
        })
        .is_some(),
        "{}",
        cloud.logs()
    );

    // Every key has three replicas here, and a write needs two of them to save it. The value
    // is large, so that no page the database file already has can take it.
    disks[1].fill();
    disks[2].fill();
    let large = vec![b'x'; 300 * 1024];
    let refused = put_from_stdin(&cloud.agents[0], "during", &large);
    let error = refused.expect_err("a write two full disks cannot save was acknowledged");
    assert!(
        error.contains("could not save it to disk"),
        "the refusal does not say why: {error}"
    );
    // Nothing held before is lost, and reads still work.
    for agent in &cloud.agents {
        assert_eq!(agent.get("before").as_deref(), Ok("1"));
    }

    // With room again, the agents (still running) take writes and keep them.
    disks[1].free();
    disks[2].free();
    let written = wait_until(Duration::from_secs(30), || {
        cloud.agents[0].put("after", "3").is_ok()
    });
    assert!(
        written.is_some(),
        "writes were not taken once the disks had room:\n{}",
        cloud.logs()
    );
    for agent in &cloud.agents {
        assert_eq!(agent.get("after").as_deref(), Ok("3"));
        let status = agent.status();
        assert!(status["persist_failures"].as_u64().is_some());
    }
    let failures: Vec<u64> = cloud
        .agents
        .iter()
        .map(|a| a.status()["persist_failures"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        failures[1] + failures[2] >= 1,
        "the failed saves were not counted: {failures:?}"
    );
    drop(cloud);
    drop(disks);
}
