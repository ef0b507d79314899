//! User ids for instances: each instance runs as a uid (and gid of the same number) of its
//! own, taken from a range no real user has, so that instances can touch neither each other
//! nor the agent. Agents sharing a machine share the range: a uid is taken by creating a file
//! named after it in a directory of the machine's (`/run/nubo-uids`), which only one can
//! create; a taken uid whose instance is gone (no process runs as it, and it was taken long
//! enough ago) is taken back.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The uids instances run as, unless the agent is told otherwise.
pub const RANGE_DEFAULT: std::ops::RangeInclusive<u32> = 3_000_000..=3_065_535;
/// How long a taken uid stays taken with no process running as it (the time to start one).
const CLAIM_GRACE: Duration = Duration::from_secs(120);

/// The machine's pool of instance uids.
#[derive(Clone, Debug)]
pub struct UidPool {
    range: std::ops::RangeInclusive<u32>,
    dir: PathBuf,
}

impl UidPool {
    /// The pool over `range`, its claims kept in `/run/nubo-uids` (or under the system's
    /// temporary directory where there is no `/run`).
    pub fn new(range: std::ops::RangeInclusive<u32>) -> io::Result<UidPool> {
        let base = if std::path::Path::new("/run").is_dir() {
            PathBuf::from("/run")
        } else {
            std::env::temp_dir()
        };
        UidPool::at(range, base.join("nubo-uids"))
    }

    /// The pool over `range` with its claims in `dir`.
    pub fn at(range: std::ops::RangeInclusive<u32>, dir: PathBuf) -> io::Result<UidPool> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(UidPool { range, dir })
    }

    /// Takes a uid for `instance` (a name, for whoever reads the claims), starting the search
    /// at `hint` so that an instance tends to get the same uid again.
    pub fn take(&self, instance: &str, hint: u64) -> io::Result<u32> {
        let (first, last) = (u64::from(*self.range.start()), u64::from(*self.range.end()));
        let span = last - first + 1;
        for i in 0..span.min(4096) {
            let uid = (first + hint.wrapping_add(i) % span) as u32;
            let claim = self.dir.join(uid.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&claim)
            {
                Ok(_) => {
                    fs::write(&claim, instance)?;
                    return Ok(uid);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if self.is_stale(uid, &claim) && fs::remove_file(&claim).is_ok() {
                        // Taken back; the next round of the loop may take it (or another).
                        if let Ok(file) = fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&claim)
                        {
                            drop(file);
                            fs::write(&claim, instance)?;
                            return Ok(uid);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no free uid left for instances"))
    }

    /// Gives `uid` back.
    pub fn release(&self, uid: u32) {
        let _ = fs::remove_file(self.dir.join(uid.to_string()));
    }

    /// Marks `uid` as still in use (an instance adopted after an agent restart).
    pub fn keep(&self, uid: u32, instance: &str) {
        let _ = fs::write(self.dir.join(uid.to_string()), instance);
    }

    fn is_stale(&self, uid: u32, claim: &std::path::Path) -> bool {
        let old = fs::metadata(claim)
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > CLAIM_GRACE);
        old && !runs_as(uid)
    }
}

/// Whether any process of the machine runs as `uid`.
pub fn runs_as(uid: u32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            && entry.metadata().is_ok_and(|m| m.uid() == uid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_taken_once_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let pool = UidPool::at(3_000_000..=3_000_002, dir.path().join("claims")).unwrap();
        let a = pool.take("a", 0).unwrap();
        let b = pool.take("b", 0).unwrap();
        let c = pool.take("c", 0).unwrap();
        assert_eq!((a, b, c), (3_000_000, 3_000_001, 3_000_002));
        assert!(pool.take("d", 0).is_err(), "all three are fresh claims");
        pool.release(b);
        assert_eq!(pool.take("d", 0).unwrap(), b);
        // Another pool over the same claims (another agent) sees them taken.
        let other = UidPool::at(3_000_000..=3_000_002, dir.path().join("claims")).unwrap();
        assert!(other.take("e", 1).is_err());
    }
}
