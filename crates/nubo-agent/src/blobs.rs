//! Reading and writing blobs through the actor: chunks are key-value records, moved a few at
//! a time; the manifest goes last on writing (a blob is readable only once whole) and first on
//! reading. Used by the API and by the runner (artifacts).

use bytes::Bytes;
use nubo_proto::blob::{self, Assembly, BlobId, Manifest};
use nubo_proto::kv::{KvError, Record, Version};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::actor::{Command, Reply};

/// Chunks moved at once for one blob.
const CHUNKS_IN_FLIGHT: usize = 8;
/// How long a blob operation waits for the actor's answer to one step.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a blob could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store refused or failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// No such blob.
    #[error("no such blob")]
    NotFound,
    /// A chunk is missing or the blob does not hold together.
    #[error("{0}; try again later")]
    Unavailable(String),
    /// The blob is too large or its manifest is damaged.
    #[error("{0}")]
    Invalid(String),
    /// The agent is stopping or did not answer.
    #[error("the agent did not answer (shutting down?)")]
    Agent,
}

async fn ask<T>(
    commands: &mpsc::Sender<Command>,
    command: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, BlobError> {
    let (reply, answer) = oneshot::channel();
    commands
        .send(command(reply))
        .await
        .map_err(|_| BlobError::Agent)?;
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(value)) => Ok(value),
        _ => Err(BlobError::Agent),
    }
}

/// Writes `value` under `key` in the replicated store.
pub async fn put(
    commands: &mpsc::Sender<Command>,
    key: Bytes,
    value: Option<Bytes>,
) -> Result<Version, BlobError> {
    Ok(ask(commands, |reply| Command::KvPut { key, value, reply }).await??)
}

/// Reads `key` from the replicated store.
pub async fn get(
    commands: &mpsc::Sender<Command>,
    key: Bytes,
) -> Result<Option<Record>, BlobError> {
    Ok(ask(commands, |reply| Command::KvGet { key, reply }).await??)
}

/// Stores `content` as a blob; returns its manifest.
pub async fn store(
    commands: &mpsc::Sender<Command>,
    content: &[u8],
) -> Result<Manifest, BlobError> {
    let (manifest, chunks) = blob::split(content).map_err(|e| BlobError::Invalid(e.to_string()))?;
    let mut in_flight = JoinSet::new();
    for (hash, bytes) in chunks {
        if in_flight.len() >= CHUNKS_IN_FLIGHT
            && let Some(done) = in_flight.join_next().await
        {
            done.map_err(|e| BlobError::Unavailable(e.to_string()))??;
        }
        let commands = commands.clone();
        in_flight.spawn(async move { put(&commands, blob::content_key(&hash), Some(bytes)).await });
    }
    while let Some(done) = in_flight.join_next().await {
        done.map_err(|e| BlobError::Unavailable(e.to_string()))??;
    }
    put(commands, manifest.id().key(), Some(manifest.encode())).await?;
    Ok(manifest)
}

/// Reads the blob `id` whole, every chunk checked against its hash.
pub async fn fetch(commands: &mpsc::Sender<Command>, id: BlobId) -> Result<Bytes, BlobError> {
    let Some(Record {
        value: Some(bytes), ..
    }) = get(commands, id.key()).await?
    else {
        return Err(BlobError::NotFound);
    };
    let manifest = Manifest::decode(&bytes).map_err(|e| BlobError::Invalid(e.to_string()))?;
    let mut assembly = Assembly::new(manifest.clone());
    let mut next = assembly.missing().collect::<Vec<_>>().into_iter();
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.len() < CHUNKS_IN_FLIGHT
            && let Some(index) = next.next()
        {
            let commands = commands.clone();
            let key = blob::content_key(&manifest.chunks[index]);
            in_flight.spawn(async move { (index, get(&commands, key).await) });
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        let (index, record) = done.map_err(|e| BlobError::Unavailable(e.to_string()))?;
        let Some(Record {
            value: Some(chunk), ..
        }) = record?
        else {
            return Err(BlobError::Unavailable(format!(
                "chunk {index} of the blob is not available"
            )));
        };
        assembly
            .add(index, chunk)
            .map_err(|e| BlobError::Unavailable(e.to_string()))?;
    }
    assembly
        .finish()
        .map(Bytes::from)
        .ok_or_else(|| BlobError::Unavailable("the blob is incomplete".into()))
}
