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
use nubo_proto::blob::BlobId;
use nubo_proto::kv::{KvError, Record, Version};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{Command, INVITE_TTL_MAX, Reply};
use crate::authority::SignedDocument;
use crate::blobs::{self, BlobError};
use crate::model::{ApiErrorBody, BlobStored, ServiceDocument, Written, version_text};

/// Most bytes of a blob uploaded in one request.
pub const BLOB_BYTES_MAX: usize = 256 * 1024 * 1024;
/// How long an API call waits for the actor.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Header carrying a record's version.
pub const VERSION_HEADER: &str = "x-nubo-version";

#[derive(Clone)]
struct ApiState {
    commands: mpsc::Sender<Command>,
    token: Arc<blake3::Hash>,
    /// Whether `/metrics` answers without the token.
    metrics_public: bool,
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

impl From<BlobError> for ApiError {
    fn from(error: BlobError) -> ApiError {
        match error {
            BlobError::Kv(error) => error.into(),
            BlobError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "no such blob"),
            BlobError::Unavailable(_) | BlobError::Agent => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
            BlobError::Invalid(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, error.to_string())
            }
        }
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

/// The API's routes, answering only callers that present `token` (and, with
/// `metrics_public`, anyone asking for `/metrics`).
pub fn router(commands: mpsc::Sender<Command>, token: &str, metrics_public: bool) -> Router {
    let state = ApiState {
        commands,
        token: Arc::new(blake3::hash(token.as_bytes())),
        metrics_public,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/events", get(events))
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
        .route("/v1/history/{*key}", get(history))
        .route("/v1/ps", get(ps))
        .route("/v1/drain", post(drain))
        .route("/v1/logs/{*key}", get(logs))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if state.metrics_public && request.uri().path() == "/metrics" {
        return next.run(request).await;
    }
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
    if ttl > INVITE_TTL_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("ttl_secs is at most {} (a year)", INVITE_TTL_MAX.as_secs()),
        ));
    }
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
    let record = get_value(&state, Bytes::from(key.clone())).await?;
    let Some(Record {
        value: Some(value),
        version,
        ..
    }) = record
    else {
        return Err(not_found(&format!("key {key:?}")));
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
    let manifest = blobs::store(&state.commands, &body).await?;
    Ok(axum::Json(BlobStored {
        id: manifest.id().to_string(),
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
    Ok(blobs::fetch(&state.commands, id).await?.into_response())
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
    .ok_or_else(|| not_found(&format!("service {key} (see `nubo services`)")))?;
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

/// Every instance of the cloud, as its members report them.
async fn ps(State(state): State<ApiState>) -> Result<Response, ApiError> {
    Ok(axum::Json(ask(&state, Command::Ps).await?).into_response())
}

async fn history(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let list = ask(&state, |reply| Command::History {
        key: key.clone(),
        reply,
    })
    .await?;
    if list.is_empty() {
        return Err(not_found(&format!("service {key} (see `nubo services`)")));
    }
    Ok(axum::Json(list).into_response())
}

#[derive(serde::Deserialize)]
struct DrainQuery {
    undo: Option<bool>,
}

/// Drains this node (`?undo=true`: undoes it).
async fn drain(
    State(state): State<ApiState>,
    Query(query): Query<DrainQuery>,
) -> Result<Response, ApiError> {
    let on = !query.undo.unwrap_or(false);
    ask(&state, |reply| Command::Drain { on, reply })
        .await?
        .map_err(|reason| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason))?;
    Ok(axum::Json(serde_json::json!({"draining": on})).into_response())
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    /// The last lines of each instance (default 100, unless `since_secs`).
    tail: Option<u32>,
    /// What reached the logs in the last seconds.
    since_secs: Option<u64>,
    /// Keep streaming new output.
    follow: Option<bool>,
}

/// One line of the `/v1/logs` stream: output of one instance.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    /// The node (short id).
    pub node: String,
    /// The instance's version.
    pub version: u64,
    /// The output, as text (invalid UTF-8 replaced).
    pub text: String,
}

/// How often a followed log is asked for more.
const LOG_POLL: Duration = Duration::from_millis(500);
/// How often a followed log looks for instances that started since.
const LOG_TARGETS_REFRESH: Duration = Duration::from_secs(3);

/// A service's logs from every node that runs it, as a stream of JSON lines ([`LogLine`]);
/// with `follow`, new output keeps coming as it is written, from instances that start later
/// too.
async fn logs(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    use crate::logs::LogFrom;
    let follow = query.follow.unwrap_or(false);
    let targets = ask(&state, |reply| Command::LogTargets {
        key: key.clone(),
        reply,
    })
    .await?;
    if targets.is_empty() && !follow {
        return Err(not_found(&format!(
            "instance of {key} that runs now (`nubo services` says where it is placed)"
        )));
    }
    let first = match (query.since_secs, query.tail) {
        (Some(secs), _) => LogFrom::Since {
            unix_ms: (crate::clock::unix_now().as_millis() as u64)
                .saturating_sub(secs.saturating_mul(1000)),
        },
        (None, lines) => LogFrom::Tail {
            lines: lines.unwrap_or(100).min(crate::logs::TAIL_LINES_MAX),
        },
    };
    let (lines, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        // Where each instance's log was read up to: node -> version -> offset.
        let mut ends: std::collections::BTreeMap<String, Vec<(u64, u64)>> = Default::default();
        let mut targets = targets;
        let mut refreshed = tokio::time::Instant::now();
        loop {
            for (node, peer) in &targets {
                let from = match ends.get(node) {
                    Some(offsets) => LogFrom::Offsets(offsets.clone()),
                    None => first.clone(),
                };
                let fetched = ask(&state, |reply| Command::LogFetch {
                    node: *peer,
                    service: key.clone(),
                    from,
                    reply,
                })
                .await;
                let Ok(Ok(reply)) = fetched else {
                    continue;
                };
                let offsets = ends.entry(node.clone()).or_default();
                for piece in reply.pieces {
                    offsets.retain(|(v, _)| *v != piece.version);
                    offsets.push((piece.version, piece.end()));
                    if piece.data.is_empty() {
                        continue;
                    }
                    let line = LogLine {
                        node: node.clone(),
                        version: piece.version,
                        text: String::from_utf8_lossy(&piece.data).into_owned(),
                    };
                    let mut json = serde_json::to_vec(&line).unwrap_or_default();
                    json.push(b'\n');
                    if lines.send(Bytes::from(json)).await.is_err() {
                        return;
                    }
                }
            }
            if !follow {
                return;
            }
            tokio::time::sleep(LOG_POLL).await;
            if lines.is_closed() {
                return;
            }
            if refreshed.elapsed() >= LOG_TARGETS_REFRESH {
                refreshed = tokio::time::Instant::now();
                if let Ok(fresh) = ask(&state, |reply| Command::LogTargets {
                    key: key.clone(),
                    reply,
                })
                .await
                {
                    // A node seen for the first time is read from its start.
                    for (node, _) in &fresh {
                        ends.entry(node.clone()).or_default();
                    }
                    targets = fresh;
                }
            }
        }
    });
    Ok(ndjson(receiver))
}

/// The agent's metrics in the Prometheus (OpenMetrics) text format.
async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let text = ask(&state, Command::Metrics).await?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(response)
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// Only events after this number.
    after: Option<u64>,
    service: Option<String>,
    node: Option<String>,
    /// How many of the latest to start with (default 100).
    limit: Option<usize>,
    follow: Option<bool>,
}

/// How often a followed event stream looks for new events.
const EVENTS_POLL: Duration = Duration::from_millis(250);

/// The events this agent saw, as JSON lines; with `follow`, new ones as they come.
async fn events(
    State(state): State<ApiState>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    use crate::events::EventFilter;
    let mut filter = EventFilter {
        after: query.after.unwrap_or(0),
        service: query.service,
        node: query.node,
    };
    let follow = query.follow.unwrap_or(false);
    let limit = query.limit.unwrap_or(100).min(crate::events::EVENTS_MAX);
    let first = ask(&state, |reply| Command::Events {
        filter: filter.clone(),
        limit,
        reply,
    })
    .await?;
    let (lines, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut batch = first;
        loop {
            for event in batch {
                filter.after = event.seq;
                let mut json = serde_json::to_vec(&event).unwrap_or_default();
                json.push(b'\n');
                if lines.send(Bytes::from(json)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            tokio::time::sleep(EVENTS_POLL).await;
            if lines.is_closed() {
                return;
            }
            let Ok(next) = ask(&state, |reply| Command::Events {
                filter: filter.clone(),
                limit: crate::events::EVENTS_MAX,
                reply,
            })
            .await
            else {
                return;
            };
            batch = next;
        }
    });
    Ok(ndjson(receiver))
}

/// A streamed answer of JSON lines from `receiver`.
fn ndjson(receiver: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), receiver))
    });
    let mut response = axum::body::Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}
