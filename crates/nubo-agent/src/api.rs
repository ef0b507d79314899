//! The local HTTP API: what the `nubo` CLI talks to.
//!
//! Bound to loopback by default and protected by a bearer token kept in the data directory
//! (`api.token`, mode 0600). Every route turns into one [`Command`] for the actor, or a few
//! for blobs, and waits for its answer; errors are JSON `{"error": "..."}` saying what to do.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes as Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use nubo_proto::blob::{self, Assembly, BlobId, Manifest};
use nubo_proto::kv::{KvError, Record, Version};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::actor::{Command, Reply, ps_key};
use crate::authority::SignedDocument;
use crate::model::{ApiErrorBody, BlobStored, ServiceDocument, Written, version_text};
use crate::runner::InstanceStatus;

/// Most bytes of a blob uploaded in one request.
pub const BLOB_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Chunks moved at once for one blob.
const CHUNKS_IN_FLIGHT: usize = 8;
/// How long an API call waits for the actor.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Header carrying a record's version.
pub const VERSION_HEADER: &str = "x-nubo-version";

#[derive(Clone)]
struct ApiState {
    commands: mpsc::Sender<Command>,
    token: Arc<blake3::Hash>,
}

/// An API error: a status and a message for the operator.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(ApiErrorBody {
            error: self.message,
        });
        (self.status, body).into_response()
    }
}

impl From<KvError> for ApiError {
    fn from(error: KvError) -> ApiError {
        let status = match error {
            KvError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            KvError::Busy | KvError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            KvError::Refused(_) => StatusCode::INSUFFICIENT_STORAGE,
            KvError::Disabled => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, error.to_string())
    }
}

/// The API's routes, answering only callers that present `token`.
pub fn router(commands: mpsc::Sender<Command>, token: &str) -> Router {
    let state = ApiState {
        commands,
        token: Arc::new(blake3::hash(token.as_bytes())),
    };
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/stats", get(stats))
        .route("/v1/invite", post(invite))
        .route("/v1/kv/{*key}", put(kv_put).get(kv_get).delete(kv_delete))
        .route("/v1/kv-local/{*key}", get(kv_local))
        .route(
            "/v1/blobs",
            post(blob_put).layer(DefaultBodyLimit::max(BLOB_BYTES_MAX)),
        )
        .route("/v1/blobs/{id}", get(blob_get))
        .route("/v1/services", post(service_publish).get(services))
        .route("/v1/services/{*key}", get(service_document))
        .route("/v1/ps", get(ps))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| blake3::hash(t.trim().as_bytes()));
    // Hashes compare in constant time.
    if presented.as_ref() != Some(&*state.token) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token: the CLI reads it from the agent's data directory (api.token); pass --data-dir or set NUBO_TOKEN",
        )
        .into_response();
    }
    next.run(request).await
}

/// Sends the actor a command and waits for its answer.
async fn ask<T>(
    state: &ApiState,
    command: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    let gone = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    };
    state
        .commands
        .send(command(reply))
        .await
        .map_err(|_| gone())?;
    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent did not answer in time",
        )),
    }
}

async fn status(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(ask(&state, Command::Status).await?).into_response())
}

async fn nodes(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(ask(&state, Command::Nodes).await?).into_response())
}

async fn stats(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(ask(&state, Command::Stats).await?).into_response())
}

#[derive(serde::Deserialize)]
struct InviteQuery {
    ttl_secs: Option<u64>,
}

async fn invite(
    State(state): State<ApiState>,
    Query(query): Query<InviteQuery>,
) -> Result<Response, ApiError> {
    let ttl = Duration::from_secs(query.ttl_secs.unwrap_or(24 * 3600));
    let invite = ask(&state, |reply| Command::Invite { ttl, reply }).await?;
    Ok(axum::Json(invite).into_response())
}

async fn put_value(
    state: &ApiState,
    key: Bytes,
    value: Option<Bytes>,
) -> Result<Version, ApiError> {
    Ok(ask(state, |reply| Command::KvPut { key, value, reply }).await??)
}

async fn get_value(state: &ApiState, key: Bytes) -> Result<Option<Record>, ApiError> {
    Ok(ask(state, |reply| Command::KvGet { key, reply }).await??)
}

async fn kv_put(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let version = put_value(&state, Bytes::from(key.clone()), Some(body)).await?;
    Ok(axum::Json(Written {
        key,
        version: version_text(&version),
    })
    .into_response())
}

async fn kv_delete(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let version = put_value(&state, Bytes::from(key.clone()), None).await?;
    Ok(axum::Json(Written {
        key,
        version: version_text(&version),
    })
    .into_response())
}

fn not_found(what: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no such {what}"))
}

async fn kv_get(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let record = get_value(&state, Bytes::from(key)).await?;
    let Some(Record {
        value: Some(value),
        version,
        ..
    }) = record
    else {
        return Err(not_found("key"));
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&version_text(&version)) {
        headers.insert(VERSION_HEADER, v);
    }
    Ok((headers, value).into_response())
}

async fn kv_local(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let key = Bytes::from(key);
    let local = ask(&state, |reply| Command::KvLocal { key, reply }).await?;
    Ok(axum::Json(local).into_response())
}

async fn blob_put(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    let (manifest, chunks) = blob::split(&body)
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?;
    let mut in_flight = JoinSet::new();
    for (hash, bytes) in chunks {
        if in_flight.len() >= CHUNKS_IN_FLIGHT
            && let Some(done) = in_flight.join_next().await
        {
            done.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        }
        let state = state.clone();
        in_flight
            .spawn(async move { put_value(&state, blob::content_key(&hash), Some(bytes)).await });
    }
    while let Some(done) = in_flight.join_next().await {
        done.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    }
    // The manifest goes last: a blob is readable only once all its chunks are stored.
    let id = manifest.id();
    put_value(&state, id.key(), Some(manifest.encode())).await?;
    Ok(axum::Json(BlobStored {
        id: id.to_string(),
        size: manifest.size,
        chunks: manifest.chunks.len(),
    })
    .into_response())
}

async fn blob_get(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: BlobId = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "a blob id is 64 hexadecimal digits, as `nubo blob put` prints",
        )
    })?;
    let Some(Record {
        value: Some(bytes), ..
    }) = get_value(&state, id.key()).await?
    else {
        return Err(not_found("blob"));
    };
    let manifest = Manifest::decode(&bytes)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut assembly = Assembly::new(manifest.clone());
    let missing: Vec<usize> = assembly.missing().collect();
    let mut in_flight = JoinSet::new();
    let mut next = missing.into_iter();
    loop {
        while in_flight.len() < CHUNKS_IN_FLIGHT
            && let Some(index) = next.next()
        {
            let state = state.clone();
            let key = blob::content_key(&manifest.chunks[index]);
            in_flight.spawn(async move { (index, get_value(&state, key).await) });
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        let (index, record) =
            done.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let Some(Record {
            value: Some(chunk), ..
        }) = record?
        else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("chunk {index} of the blob is not available; try again later"),
            ));
        };
        assembly
            .add(index, chunk)
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    }
    let content = assembly.finish().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the blob is incomplete; try again later",
        )
    })?;
    Ok(content.into_response())
}

async fn service_publish(State(state): State<ApiState>, body: Body) -> Result<Response, ApiError> {
    let document = Bytes::from(body.to_vec());
    ask(&state, |reply| Command::Publish { document, reply })
        .await?
        .map_err(|reason| {
            ApiError::new(StatusCode::FORBIDDEN, format!("deploy refused: {reason}"))
        })?;
    Ok(axum::Json(serde_json::json!({"published": true})).into_response())
}

async fn services(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(ask(&state, Command::Services).await?).into_response())
}

async fn service_document(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let entry = ask(&state, |reply| Command::SuiteEntry {
        key: key.clone(),
        reply,
    })
    .await?
    .ok_or_else(|| not_found("service (see `nubo services`)"))?;
    let signed: SignedDocument = postcard::from_bytes(&entry.document)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "damaged document"))?;
    let document = signed.document;
    Ok(axum::Json(ServiceDocument {
        key: document.key,
        version: document.version,
        intent: format!("{:?}", document.intent).to_lowercase(),
        description: document.description,
        signer: document.signer.iter().map(|b| format!("{b:02x}")).collect(),
    })
    .into_response())
}

/// Every instance of the cloud: this node's from the runner, the others' from what each node
/// publishes in the key-value store.
async fn ps(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let nodes = ask(&state, Command::Nodes).await?;
    let mut instances: Vec<InstanceStatus> = ask(&state, Command::Instances).await?;
    let mut reads = JoinSet::new();
    for node in nodes.iter().filter(|n| !n.this_node && n.state == "alive") {
        let Ok(id) = node.id.parse() else {
            continue;
        };
        let state = state.clone();
        reads.spawn(async move { get_value(&state, ps_key(id)).await });
    }
    while let Some(done) = reads.join_next().await {
        if let Ok(Ok(Some(Record {
            value: Some(bytes), ..
        }))) = done
            && let Ok(list) = serde_json::from_slice::<Vec<InstanceStatus>>(&bytes)
        {
            instances.extend(list);
        }
    }
    instances.sort_by(|a, b| (&a.service, &a.node).cmp(&(&b.service, &b.node)));
    Ok(axum::Json(instances).into_response())
}
