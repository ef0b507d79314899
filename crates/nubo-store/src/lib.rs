//! A node's on-disk state: its data directory, secret files, and the redb database holding
//! the cloud configuration, known peers and the key-value records this node replicates.
//!
//! Layout of a data directory (mode 0700):
//! - `node.key`: the node's secret key (mode 0600), see [`DataDir::read_secret`];
//! - `state.redb`: configuration, peers and records, see [`StateDb`];
//! - `blobs/`: values of content-addressed records, one file per BLAKE3 hash, checked against
//!   their name when read back.
//!
//! Every write of a secret goes to a temporary file first and is renamed into place, so a
//! crash never leaves half a key.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nubo_proto::NodeId;
use nubo_proto::blob;
use nubo_proto::kv::Record;
use nubo_proto::kv::version::Version;
use nubo_proto::suite::SuiteEntry;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PEERS: TableDefinition<u128, &str> = TableDefinition::new("peers");
const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");
/// Suite entries by key and version: postcard of ([`SuiteEntry`], provisional).
const SUITE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("suite");
/// When the suite was last saved (Unix milliseconds, little endian).
const SUITE_SAVED_AT: &str = "suite_saved_unix_ms";
/// Values at least this large of content-addressed keys are kept as files.
const BLOB_FILE_BYTES_MIN: usize = 4096;
/// The subdirectory of service instances (theirs, not the agent's).
pub const INSTANCES_DIR: &str = "instances";
/// Most peers remembered for rejoining.
pub const PEERS_MAX: usize = 64;

/// Why the on-disk state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("state database: {0}")]
    Database(String),
    /// Stored bytes did not decode.
    #[error("state database holds a damaged entry: {0}")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn db_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

/// A node's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// The data directory at `path`, created (mode 0700) if missing.
    pub fn create(path: &Path) -> Result<DataDir, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io(path))?;
        let dir = DataDir {
            path: path.to_path_buf(),
        };
        dir.make_private()?;
        Ok(dir)
    }

    /// Makes the directory readable by its owner only, whatever it was before: itself and
    /// its subdirectories 0700, its files 0600 (service instances' own directories, under
    /// `instances/`, are theirs and left as they are).
    pub fn make_private(&self) -> Result<(), StoreError> {
        fn walk(dir: &Path, top: bool) -> Result<(), StoreError> {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
            for entry in fs::read_dir(dir).map_err(io(dir))? {
                let entry = entry.map_err(io(dir))?;
                let path = entry.path();
                let kind = entry.file_type().map_err(io(&path))?;
                if kind.is_dir() {
                    if top && entry.file_name() == INSTANCES_DIR {
                        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                            .map_err(io(&path))?;
                    } else {
                        walk(&path, false)?;
                    }
                } else if kind.is_file() {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                        .map_err(io(&path))?;
                }
            }
            Ok(())
        }
        walk(&self.path, true)
    }

    /// The data directory at `path`, which must exist.
    pub fn open(path: &Path) -> Result<DataDir, StoreError> {
        if !path.is_dir() {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such data directory (create one with `nubo init` or `nubo agent --join`)",
                ),
            });
        }
        let dir = DataDir {
            path: path.to_path_buf(),
        };
        dir.make_private()?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a secret file readable by its owner only (mode 0600), atomically.
    pub fn write_secret(&self, name: &str, contents: &[u8]) -> Result<(), StoreError> {
        write_private_file(&self.file(name), contents)
    }

    /// Reads a file of the directory; `None` if it does not exist.
    pub fn read_secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.file(name);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Opens (creating if needed) the state database.
    pub fn open_state(&self) -> Result<StateDb, StoreError> {
        StateDb::open(&self.path)
    }
}

/// Writes a file readable by its owner only (mode 0600), atomically (a temporary file renamed
/// into place, so a crash never leaves half of it); its directory is created, mode 0700, if
/// missing.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), StoreError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io(&temporary))?;
    file.write_all(contents).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    fs::rename(&temporary, path).map_err(io(path))
}

/// A record as kept on disk: inline, or with its value in a blob file.
#[derive(Serialize, Deserialize)]
enum StoredRecord {
    Inline(Record),
    InFile { key: Bytes, version: Version },
}

/// The redb database of a node, plus its blob files.
///
/// Contract: [`StateDb::save_records`] is durable when it returns (an Immediate commit; blob
/// files are synced first), so whatever it saved survives `kill -9`. A blob file whose content
/// no longer matches its hash is skipped on load, never served. A write that fails (a full
/// disk) leaves the database as its last successful write left it; the database is then
/// closed and opened again, so that writes succeed once the cause is gone.
pub struct StateDb {
    /// `None` between a failed write and a successful reopening.
    db: Option<Database>,
    path: PathBuf,
    blobs: PathBuf,
}

/// Opens the database file, saying what to check when another process holds it.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    Database::create(path).map_err(|error| match error {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Database(format!(
            "{} is in use (is another agent running with this data directory?)",
            path.display()
        )),
        other => db_error(other),
    })
}

impl StateDb {
    fn open(dir: &Path) -> Result<StateDb, StoreError> {
        let path = dir.join("state.redb");
        let db = open_database(&path)?;
        // It holds the cloud's secret.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
        let blobs = dir.join("blobs");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&blobs)
            .map_err(io(&blobs))?;
        let state = StateDb {
            db: Some(db),
            path,
            blobs,
        };
        // Create the tables, so that readers never meet a missing one.
        let tx = state.db()?.begin_write().map_err(db_error)?;
        tx.open_table(META).map_err(db_error)?;
        tx.open_table(PEERS).map_err(db_error)?;
        tx.open_table(RECORDS).map_err(db_error)?;
        tx.open_table(SUITE).map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        Ok(state)
    }

    /// The open database.
    fn db(&self) -> Result<&Database, StoreError> {
        self.db.as_ref().ok_or_else(|| {
            StoreError::Database(format!(
                "{} is closed after a failed write and could not be opened again yet",
                self.path.display()
            ))
        })
    }

    /// Runs a write; if it fails, closes and reopens the database (redb refuses every write
    /// after an I/O error until then), so that the next write can succeed.
    fn write<T>(
        &mut self,
        write: impl FnOnce(&StateDb) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = write(self);
        if result.is_err() {
            self.db = None;
            self.db = open_database(&self.path).ok();
        }
        result
    }

    /// A configuration entry.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(META).map_err(db_error)?;
        Ok(table
            .get(name)
            .map_err(db_error)?
            .map(|v| v.value().to_vec()))
    }

    /// Sets a configuration entry.
    pub fn set_meta(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|state| {
            let tx = state.db()?.begin_write().map_err(db_error)?;
            tx.open_table(META)
                .map_err(db_error)?
                .insert(name, value)
                .map_err(db_error)?;
            tx.commit().map_err(db_error)
        })
    }

    /// The peers remembered for rejoining after a restart.
    pub fn peers(&self) -> Result<Vec<(NodeId, SocketAddr)>, StoreError> {
        let tx = self.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(PEERS).map_err(db_error)?;
        let mut peers = Vec::new();
        for entry in table.iter().map_err(db_error)? {
            let (id, addr) = entry.map_err(db_error)?;
            if let Ok(addr) = addr.value().parse() {
                peers.push((NodeId(id.value()), addr));
            }
        }
        Ok(peers)
    }

    /// Replaces the remembered peers (at most [`PEERS_MAX`] are kept).
    pub fn set_peers(&mut self, peers: &[(NodeId, SocketAddr)]) -> Result<(), StoreError> {
        self.write(|state| state.write_peers(peers))
    }

    fn write_peers(&self, peers: &[(NodeId, SocketAddr)]) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(db_error)?;
        {
            let mut table = tx.open_table(PEERS).map_err(db_error)?;
            table.retain(|_, _| false).map_err(db_error)?;
            for (id, addr) in peers.iter().take(PEERS_MAX) {
                table
                    .insert(id.0, addr.to_string().as_str())
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    /// Every record saved, blob values read back from their files. Records whose file is
    /// missing or damaged are left out (their replicas still hold them) and counted.
    pub fn records(&self) -> Result<(Vec<Record>, usize), StoreError> {
        let tx = self.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(RECORDS).map_err(db_error)?;
        let mut records = Vec::new();
        let mut damaged = 0;
        for entry in table.iter().map_err(db_error)? {
            let (_, stored) = entry.map_err(db_error)?;
            match postcard::from_bytes::<StoredRecord>(stored.value()) {
                Ok(StoredRecord::Inline(record)) => records.push(record),
                Ok(StoredRecord::InFile { key, version }) => match fs::read(self.blob_path(&key)) {
                    Ok(value) if blob::verify(&key, &value) => records.push(Record {
                        key,
                        version,
                        value: Some(Bytes::from(value)),
                    }),
                    _ => damaged += 1,
                },
                Err(_) => damaged += 1,
            }
        }
        Ok((records, damaged))
    }

    /// Saves changed records (`None`: removed), durably.
    pub fn save_records(&mut self, changes: &[(Bytes, Option<Record>)]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.write(|state| state.write_records(changes))
    }

    fn write_records(&self, changes: &[(Bytes, Option<Record>)]) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(db_error)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(db_error)?;
            for (key, record) in changes {
                let previous = table
                    .remove(key.as_ref())
                    .map_err(db_error)?
                    .map(|v| v.value().to_vec());
                let had_file = previous.is_some_and(|bytes| {
                    matches!(
                        postcard::from_bytes::<StoredRecord>(&bytes),
                        Ok(StoredRecord::InFile { .. })
                    )
                });
                let Some(record) = record else {
                    if had_file {
                        let _ = fs::remove_file(self.blob_path(key));
                    }
                    continue;
                };
                let stored = match &record.value {
                    Some(value)
                        if blob::is_content_key(key) && value.len() >= BLOB_FILE_BYTES_MIN =>
                    {
                        self.write_blob(key, value)?;
                        StoredRecord::InFile {
                            key: key.clone(),
                            version: record.version,
                        }
                    }
                    _ => StoredRecord::Inline(record.clone()),
                };
                let bytes = postcard::to_allocvec(&stored)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                table
                    .insert(key.as_ref(), bytes.as_slice())
                    .map_err(db_error)?;
            }
        }
        tx.commit().map_err(db_error)
    }

    /// Replaces the saved versions of each key with the ones given (none: the key is gone),
    /// and records `now_unix_ms` as the time of the save, durably.
    pub fn save_suite(
        &mut self,
        keys: &[(String, Vec<(SuiteEntry, bool)>)],
        now_unix_ms: u64,
    ) -> Result<(), StoreError> {
        self.write(|state| state.write_suite(keys, now_unix_ms))
    }

    fn write_suite(
        &self,
        keys: &[(String, Vec<(SuiteEntry, bool)>)],
        now_unix_ms: u64,
    ) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(db_error)?;
        {
            let mut table = tx.open_table(SUITE).map_err(db_error)?;
            for (key, versions) in keys {
                table
                    .extract_from_if((key.as_str(), 0)..=(key.as_str(), u64::MAX), |_, _| true)
                    .map_err(db_error)?
                    .for_each(drop);
                for (entry, provisional) in versions {
                    let bytes = postcard::to_allocvec(&(entry, *provisional))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    table
                        .insert((key.as_str(), entry.version), bytes.as_slice())
                        .map_err(db_error)?;
                }
            }
            tx.open_table(META)
                .map_err(db_error)?
                .insert(SUITE_SAVED_AT, now_unix_ms.to_le_bytes().as_slice())
                .map_err(db_error)?;
        }
        tx.commit().map_err(db_error)
    }

    /// Every saved suite entry (with its provisional flag), the time of the last save (Unix
    /// milliseconds, `None` if never), and how many saved entries did not decode.
    #[allow(clippy::type_complexity)]
    pub fn suite(&self) -> Result<(Vec<(SuiteEntry, bool)>, Option<u64>, usize), StoreError> {
        let tx = self.db()?.begin_read().map_err(db_error)?;
        let table = tx.open_table(SUITE).map_err(db_error)?;
        let mut entries = Vec::new();
        let mut damaged = 0;
        for row in table.iter().map_err(db_error)? {
            let (_, bytes) = row.map_err(db_error)?;
            match postcard::from_bytes::<(SuiteEntry, bool)>(bytes.value()) {
                Ok(entry) => entries.push(entry),
                Err(_) => damaged += 1,
            }
        }
        let saved_at = tx
            .open_table(META)
            .map_err(db_error)?
            .get(SUITE_SAVED_AT)
            .map_err(db_error)?
            .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes));
        Ok((entries, saved_at, damaged))
    }

    fn blob_path(&self, key: &[u8]) -> PathBuf {
        let hash = key.strip_prefix(blob::CONTENT_PREFIX).unwrap_or(key);
        let name: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        self.blobs.join(name)
    }

    fn write_blob(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let path = self.blob_path(key);
        if fs::metadata(&path).is_ok_and(|m| m.len() == value.len() as u64) {
            return Ok(());
        }
        let temporary = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(io(&temporary))?;
        file.write_all(value).map_err(io(&temporary))?;
        file.sync_all().map_err(io(&temporary))?;
        fs::rename(&temporary, &path).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(millis: u64) -> Version {
        Version {
            millis,
            counter: 0,
            writer: NodeId(1),
        }
    }

    #[test]
    fn a_data_directory_is_made_private_whatever_it_was() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(path.join("state.redb"), "x").unwrap();
        fs::set_permissions(path.join("state.redb"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir(path.join("blobs")).unwrap();
        fs::write(path.join("blobs").join("ab"), "y").unwrap();
        let data = DataDir::open(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(data.path()), 0o700);
        assert_eq!(mode(&path.join("state.redb")), 0o600);
        assert_eq!(mode(&path.join("blobs")), 0o700);
        assert_eq!(mode(&path.join("blobs").join("ab")), 0o600);
        let state = data.open_state();
        assert!(state.is_err(), "not a database");
        fs::remove_file(path.join("state.redb")).unwrap();
        data.open_state().unwrap();
        assert_eq!(mode(&path.join("state.redb")), 0o600);
    }

    #[test]
    fn secrets_are_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::create(&dir.path().join("node")).unwrap();
        assert_eq!(data.read_secret("node.key").unwrap(), None);
        data.write_secret("node.key", b"secret").unwrap();
        assert_eq!(data.read_secret("node.key").unwrap().unwrap(), b"secret");
        let mode = fs::metadata(data.file("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn suite_entries_survive_reopening_and_are_replaced_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::create(dir.path()).unwrap();
        let entry = |key: &str, version: u64| SuiteEntry {
            key: key.into(),
            version,
            document: Bytes::from(format!("{key}@{version}")),
        };
        {
            let mut state = data.open_state().unwrap();
            assert_eq!(state.suite().unwrap(), (vec![], None, 0));
            state
                .save_suite(
                    &[
                        (
                            "web/a".into(),
                            vec![(entry("web/a", 1), false), (entry("web/a", 2), false)],
                        ),
                        ("web/b".into(), vec![(entry("web/b", 5), true)]),
                    ],
                    1_000,
                )
                .unwrap();
            state
                .save_suite(
                    &[
                        ("web/a".into(), vec![(entry("web/a", 3), false)]),
                        ("web/c".into(), vec![]),
                    ],
                    2_000,
                )
                .unwrap();
        }
        let state = data.open_state().unwrap();
        assert_eq!(
            state.suite().unwrap(),
            (
                vec![(entry("web/a", 3), false), (entry("web/b", 5), true)],
                Some(2_000),
                0
            )
        );
    }

    #[test]
    fn records_peers_and_blobs_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::create(dir.path()).unwrap();
        let content = vec![7u8; 10_000];
        let (manifest, chunks) = blob::split(&content).unwrap();
        let chunk_key = blob::content_key(&chunks[0].0);
        let small = Record {
            key: Bytes::from("a"),
            version: version(1),
            value: Some(Bytes::from("x")),
        };
        let big = Record {
            key: chunk_key.clone(),
            version: version(2),
            value: Some(chunks[0].1.clone()),
        };
        {
            let mut state = data.open_state().unwrap();
            state.set_meta("cloud", b"c").unwrap();
            state
                .set_peers(&[(NodeId(9), "127.0.0.1:7700".parse().unwrap())])
                .unwrap();
            state
                .save_records(&[
                    (small.key.clone(), Some(small.clone())),
                    (big.key.clone(), Some(big.clone())),
                    (Bytes::from("gone"), None),
                ])
                .unwrap();
        }
        let mut state = data.open_state().unwrap();
        assert_eq!(state.meta("cloud").unwrap().unwrap(), b"c");
        assert_eq!(state.peers().unwrap().len(), 1);
        let (mut records, damaged) = state.records().unwrap();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(damaged, 0);
        assert_eq!(records.len(), 2);
        assert!(records.contains(&small) && records.contains(&big));
        // A damaged blob file is not served; removing the record removes its file.
        fs::write(state.blob_path(&chunk_key), b"tampered").unwrap();
        assert_eq!(state.records().unwrap(), (vec![small.clone()], 1));
        state.save_records(&[(chunk_key.clone(), None)]).unwrap();
        assert!(!state.blob_path(&chunk_key).exists());
        assert_eq!(manifest.chunks.len(), 1);
    }
}
