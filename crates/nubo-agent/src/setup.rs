//! Creating, joining and loading a node's membership of a cloud, kept in its data directory.

use std::net::SocketAddr;
use std::path::Path;

use nubo_net::{Admission, CloudId, Identity, JoinToken};
use nubo_proto::{NodeId, Peer};
use nubo_store::{DataDir, StateDb, StoreError};

/// The node's secret key.
pub const IDENTITY_FILE: &str = "node.key";
/// The file name of the cloud administrator's secret key, created by `nubo init` in the
/// administrator's configuration directory, never in an agent's data directory (services on
/// the node would be one step from it).
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// The administrator's and users' configuration directory: `$XDG_CONFIG_HOME/nubo`, else
/// `~/.config/nubo`.
pub fn config_dir() -> std::path::PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME") {
        Some(dir) => std::path::PathBuf::from(dir).join("nubo"),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".config/nubo"),
    }
}

/// Where `nubo init` puts the administrator's key unless told otherwise.
pub fn default_admin_key() -> std::path::PathBuf {
    config_dir().join(ADMIN_KEY_FILE)
}
/// The bearer token of the local API.
pub const API_TOKEN_FILE: &str = "api.token";
/// Where the local API listens, written at start for the CLI.
pub const API_ADDR_FILE: &str = "api.addr";
const META_CLOUD: &str = "cloud";
const META_CONTACTS: &str = "contacts";

/// Why a data directory could not be set up or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Reading or writing the data directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Key material could not be made or read.
    #[error("{0}")]
    Key(String),
    /// The directory belongs to no cloud yet.
    #[error(
        "{0} holds no cloud: create one with `nubo init --data-dir {0}`, or join one with `nubo agent --data-dir {0} --join TOKEN`"
    )]
    NoCloud(String),
    /// The administrator's key file exists already.
    #[error(
        "{0} exists (the administrator's key of another cloud?); give this cloud's key another place with --admin-key PATH"
    )]
    AdminKeyExists(String),
    /// The directory already belongs to a cloud.
    #[error("{path} already belongs to cloud {cloud}; use another --data-dir")]
    AlreadyMember {
        /// The data directory.
        path: String,
        /// Its cloud.
        cloud: CloudId,
    },
}

/// What `nubo init` created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    /// The new cloud.
    pub cloud_id: String,
    /// The first node.
    pub node_id: String,
    /// The administrator's public key (hexadecimal).
    pub admin_public_key: String,
    /// The data directory.
    pub data_dir: String,
    /// Where the administrator's secret key was written.
    pub admin_key_file: String,
}

/// A node's standing in its cloud, as loaded at start.
#[derive(Debug)]
pub struct Standing {
    /// The node's key pair.
    pub identity: Identity,
    /// The cloud and its admission secret.
    pub admission: Admission,
    /// Nodes to contact when (re)joining: the token's and those remembered.
    pub contacts: Vec<Peer>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn load_or_create_identity(data: &DataDir) -> Result<Identity, SetupError> {
    match data.read_secret(IDENTITY_FILE)? {
        Some(bytes) => Identity::from_secret(&bytes)
            .map_err(|e| SetupError::Key(format!("{}: {e}", data.file(IDENTITY_FILE).display()))),
        None => {
            let identity = Identity::generate().map_err(|e| SetupError::Key(e.to_string()))?;
            data.write_secret(IDENTITY_FILE, &identity.secret())?;
            Ok(identity)
        }
    }
}

fn cloud_of(state: &StateDb) -> Result<Option<Admission>, SetupError> {
    match state.meta(META_CLOUD)? {
        Some(bytes) => postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| SetupError::Store(StoreError::Corrupt(format!("cloud: {e}")))),
        None => Ok(None),
    }
}

/// Whether the data directory at `path` belongs to a cloud.
pub fn has_cloud(path: &Path) -> Result<bool, SetupError> {
    if !path.join("state.redb").exists() {
        return Ok(false);
    }
    let data = DataDir::open(path)?;
    Ok(cloud_of(&data.open_state()?)?.is_some())
}

/// Creates a new cloud with this data directory's node as its first member; the
/// administrator's key goes to `admin_key`, outside the data directory.
pub fn init(path: &Path, admin_key: &Path) -> Result<InitReport, SetupError> {
    if admin_key.exists() {
        return Err(SetupError::AdminKeyExists(admin_key.display().to_string()));
    }
    let data = DataDir::create(path)?;
    let mut state = data.open_state()?;
    if let Some(admission) = cloud_of(&state)? {
        return Err(SetupError::AlreadyMember {
            path: path.display().to_string(),
            cloud: admission.cloud,
        });
    }
    let identity = load_or_create_identity(&data)?;
    let admin = Identity::generate().map_err(|e| SetupError::Key(e.to_string()))?;
    nubo_store::write_private_file(admin_key, &admin.secret())?;
    let admission =
        Admission::generate(admin.public_key()).map_err(|e| SetupError::Key(e.to_string()))?;
    let encoded = postcard::to_allocvec(&admission)
        .map_err(|e| SetupError::Store(StoreError::Corrupt(e.to_string())))?;
    state.set_meta(META_CLOUD, &encoded)?;
    Ok(InitReport {
        cloud_id: admission.cloud.to_string(),
        node_id: identity.node_id().to_string(),
        admin_public_key: hex(&admin.public_key()),
        data_dir: path.display().to_string(),
        admin_key_file: admin_key.display().to_string(),
    })
}

/// Makes this data directory a member of the token's cloud (creating it if needed). Joining
/// the cloud it already belongs to only adds the token's contacts.
pub fn join(path: &Path, token: &JoinToken) -> Result<(), SetupError> {
    let data = DataDir::create(path)?;
    let mut state = data.open_state()?;
    match cloud_of(&state)? {
        Some(admission) if admission.cloud != token.admission.cloud => {
            return Err(SetupError::AlreadyMember {
                path: path.display().to_string(),
                cloud: admission.cloud,
            });
        }
        Some(_) => {}
        None => {
            let encoded = postcard::to_allocvec(&token.admission)
                .map_err(|e| SetupError::Store(StoreError::Corrupt(e.to_string())))?;
            state.set_meta(META_CLOUD, &encoded)?;
        }
    }
    load_or_create_identity(&data)?;
    let encoded = postcard::to_allocvec(&token.contacts)
        .map_err(|e| SetupError::Store(StoreError::Corrupt(e.to_string())))?;
    state.set_meta(META_CONTACTS, &encoded)?;
    Ok(())
}

/// Loads the node's standing from its data directory and open state.
pub fn load(data: &DataDir, state: &StateDb) -> Result<Standing, SetupError> {
    let admission =
        cloud_of(state)?.ok_or_else(|| SetupError::NoCloud(data.path().display().to_string()))?;
    let identity = load_or_create_identity(data)?;
    let mut contacts: Vec<(NodeId, SocketAddr)> = match state.meta(META_CONTACTS)? {
        Some(bytes) => postcard::from_bytes(&bytes).unwrap_or_default(),
        None => Vec::new(),
    };
    contacts.extend(state.peers()?);
    contacts.sort();
    contacts.dedup_by_key(|(id, _)| *id);
    contacts.retain(|(id, _)| *id != identity.node_id());
    Ok(Standing {
        identity,
        admission,
        contacts: contacts
            .into_iter()
            .map(|(id, addr)| Peer::with_addr(id, addr))
            .collect(),
    })
}

/// The API token, created on first use.
pub fn api_token(data: &DataDir) -> Result<String, SetupError> {
    if let Some(bytes) = data.read_secret(API_TOKEN_FILE)? {
        return Ok(String::from_utf8_lossy(&bytes).trim().to_string());
    }
    let mut random = [0u8; 24];
    getrandom::getrandom(&mut random).map_err(|e| SetupError::Key(e.to_string()))?;
    let token = hex(&random);
    data.write_secret(API_TOKEN_FILE, token.as_bytes())?;
    Ok(token)
}
