//! The QUIC transport: one endpoint per node that both listens and dials, one link per peer.
//!
//! A *link* is a task that owns the outgoing side towards one peer: a bounded queue of frames,
//! the connection in use (dialed by us or accepted from the peer, the newest winning) and one
//! unidirectional stream of frames on it. Every connection, dialed or accepted, also has a
//! reader task that decodes the peer's frames and hands them to the driver.
//!
//! The driver learns that a peer is unreachable ([`NetEvent::PeerDown`]) when a dial fails,
//! when a connection times out or is reset, when a write stalls, when nothing at all comes
//! back from the peer within `answer_timeout` of a frame written (QUIC acknowledges every
//! packet, so a live peer always answers), and when the peer shuts down. There are no QUIC
//! keep-alives: an idle connection costs nothing, and the overlay probes its neighbours
//! itself. A link with no frame either way for a while closes its connection quietly: that is
//! not a failure.
//!
//! Bounds: frames queued per peer (`queue_max`, then dropped and counted), frame size
//! ([`nubo_proto::wire::MESSAGE_BYTES_MAX`]), streams per connection, connections per
//! endpoint (`connections_max`), and the driver's event channel (readers wait when it is full).

use core::net::SocketAddr;
use core::time::Duration;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use nubo_proto::{Message, NodeId, Peer, wire};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, SendStream, VarInt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};

use crate::NetError;
use crate::admission::Admission;
use crate::frame;
use crate::identity::Identity;
use crate::tls;

/// Close code: the link was unused for a while; the peer is fine.
const CLOSE_UNUSED: VarInt = VarInt::from_u32(0);
/// Close code: the node is shutting down.
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(1);
/// Close code: the peer broke the framing (oversized or empty frame).
const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(2);
/// Streams a peer may have open towards us at once (we use one).
const STREAMS_MAX: u32 = 8;

/// Tuning of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Address to listen on (UDP).
    pub listen: SocketAddr,
    /// Frames queued towards one peer before new ones are dropped.
    pub queue_max: usize,
    /// How long a dial may take.
    pub dial_timeout: Duration,
    /// A connection silent for this long is dead (a last resort: links close sooner).
    pub idle_timeout: Duration,
    /// A link with no frame sent or received for this long closes its connection.
    pub unused_close: Duration,
    /// A write that makes no progress for this long marks the peer down.
    pub write_timeout: Duration,
    /// A frame written after which nothing at all comes back from the peer for this long
    /// (QUIC acknowledges every packet within its ack delay, 25 ms) marks the peer down. In a
    /// busy cloud, where traffic keeps links proved and the overlay's probes wait a round,
    /// this is what notices a dead neighbour first.
    pub answer_timeout: Duration,
    /// After a failed dial, wait at least this long before dialing the same peer again...
    pub backoff_min: Duration,
    /// ...doubling up to this.
    pub backoff_max: Duration,
    /// Most connections open at once; more incoming ones are refused.
    pub connections_max: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7700)),
            queue_max: 1024,
            dial_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(300),
            unused_close: Duration::from_secs(180),
            write_timeout: Duration::from_secs(5),
            answer_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            connections_max: 4096,
        }
    }
}

/// What the transport tells its driver.
#[derive(Debug)]
pub enum NetEvent {
    /// A message from an admitted peer, whose identity TLS proved.
    Message {
        /// The sender, with the address it sent from (its listening address).
        from: Peer,
        /// What it sent.
        message: Message,
    },
    /// A peer could not be reached.
    PeerDown(NodeId),
}

/// Counters of the transport since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetCounters {
    /// Frames received and decoded.
    pub frames_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// Bytes received in frames.
    pub bytes_in: u64,
    /// Bytes written in frames.
    pub bytes_out: u64,
    /// Frames that did not decode (garbage, unknown version, out of bounds).
    pub frames_malformed: u64,
    /// Streams closed for an empty or oversized frame.
    pub frames_oversized: u64,
    /// Frames dropped: queue full, peer unreachable, or unencodable.
    pub frames_dropped: u64,
    /// Handshakes refused for a missing or wrong admission credential.
    pub handshakes_refused: u64,
    /// Incoming handshakes that failed for another reason (garbage, timeout, version).
    pub handshakes_failed: u64,
    /// Dials that failed.
    pub dials_failed: u64,
    /// Connections open now.
    pub connections: u64,
    /// Connections opened since start, dialed or accepted (each costs a handshake).
    #[serde(default)]
    pub connections_opened: u64,
}

/// Frames of one message kind, and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KindTraffic {
    /// Frames.
    pub frames: u64,
    /// Bytes in those frames.
    pub bytes: u64,
}

#[derive(Default)]
struct Counters {
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_malformed: AtomicU64,
    frames_oversized: AtomicU64,
    frames_dropped: AtomicU64,
    handshakes_failed: AtomicU64,
    dials_failed: AtomicU64,
    connections: AtomicU64,
    connections_opened: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

enum LinkInput {
    Frame(Bytes, Option<SocketAddr>),
    Accepted(Connection),
}

struct LinkHandle {
    generation: u64,
    queue: mpsc::Sender<LinkInput>,
    /// Set by readers when a frame arrives from the peer, so the link is not closed unused
    /// while only the peer talks.
    heard: Arc<AtomicBool>,
}

struct Shared {
    me: NodeId,
    endpoint: quinn::Endpoint,
    admission: Admission,
    config: TransportConfig,
    links: Mutex<HashMap<NodeId, LinkHandle>>,
    next_generation: AtomicU64,
    events: mpsc::Sender<NetEvent>,
    counters: Counters,
    /// Frames queued and their bytes, per message kind.
    queued_by_kind: Mutex<BTreeMap<&'static str, KindTraffic>>,
    refused: Arc<AtomicU64>,
}

/// A node's QUIC endpoint and its links to peers.
///
/// Contract: [`Transport::send`] never blocks and never fails loudly: a message that cannot
/// go out is dropped, counted, and (when the peer is unreachable) followed by a
/// [`NetEvent::PeerDown`]. Every message delivered comes from a peer whose admission proof and
/// node id were checked in the TLS handshake.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl Transport {
    /// Listens on `config.listen` as `identity`, admitting peers of `admission`, and delivers
    /// what arrives to `events`. Must be called within a tokio runtime.
    pub fn bind(
        identity: &Identity,
        admission: Admission,
        config: TransportConfig,
        events: mpsc::Sender<NetEvent>,
    ) -> Result<Transport, NetError> {
        let refused = Arc::new(AtomicU64::new(0));
        let (server_tls, client_tls) = tls::configs(identity, &admission, refused.clone())?;
        let tls_error =
            |e: quinn::crypto::rustls::NoInitialCipherSuite| NetError::Tls(e.to_string());
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(None)
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(config.idle_timeout)
                    .map_err(|e| NetError::Tls(e.to_string()))?,
            ))
            .max_concurrent_uni_streams(STREAMS_MAX.into())
            .max_concurrent_bidi_streams(0u32.into());
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server_tls).map_err(tls_error)?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(client_tls).map_err(tls_error)?,
        ));
        client.transport_config(transport);
        let mut endpoint =
            quinn::Endpoint::server(server, config.listen).map_err(|source| NetError::Bind {
                addr: config.listen,
                source,
            })?;
        endpoint.set_default_client_config(client);
        let shared = Arc::new(Shared {
            me: identity.node_id(),
            endpoint,
            admission,
            config,
            links: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            events,
            counters: Counters::default(),
            queued_by_kind: Mutex::new(BTreeMap::new()),
            refused,
        });
        tokio::spawn(accept_loop(shared.clone()));
        Ok(Transport { shared })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared
            .endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Queues `message` for `to`.
    pub fn send(&self, to: Peer, message: &Message) {
        if to.id == self.shared.me {
            return;
        }
        let frame = match frame::encode(message) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(%error, kind = message.kind(), "dropped an unencodable message");
                bump(&self.shared.counters.frames_dropped, 1);
                return;
            }
        };
        {
            let mut by_kind = self
                .shared
                .queued_by_kind
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let traffic = by_kind.entry(message.kind()).or_default();
            traffic.frames = traffic.frames.saturating_add(1);
            traffic.bytes = traffic.bytes.saturating_add(frame.len() as u64);
        }
        self.shared.deliver(to.id, LinkInput::Frame(frame, to.addr));
    }

    /// Frames queued since start and their bytes, per message kind (those dropped before
    /// they left included): where a node's traffic goes.
    pub fn queued_by_kind(&self) -> BTreeMap<&'static str, KindTraffic> {
        self.shared
            .queued_by_kind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counters since start.
    pub fn counters(&self) -> NetCounters {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            frames_in: get(&c.frames_in),
            frames_out: get(&c.frames_out),
            bytes_in: get(&c.bytes_in),
            bytes_out: get(&c.bytes_out),
            frames_malformed: get(&c.frames_malformed),
            frames_oversized: get(&c.frames_oversized),
            frames_dropped: get(&c.frames_dropped),
            handshakes_refused: get(&self.shared.refused),
            handshakes_failed: get(&c.handshakes_failed),
            dials_failed: get(&c.dials_failed),
            connections: get(&c.connections),
            connections_opened: get(&c.connections_opened),
        }
    }

    /// Closes every connection, telling peers we are going, and waits (briefly) until they
    /// know.
    pub async fn close(&self) {
        self.shared.endpoint.close(CLOSE_SHUTDOWN, b"shutting down");
        let _ = timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
    }
}

impl Shared {
    /// Hands `input` to `peer`'s link, starting one if there is none.
    fn deliver(self: &Arc<Self>, peer: NodeId, input: LinkInput) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let input = match links.get(&peer) {
            Some(link) => match link.queue.try_send(input) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    bump(&self.counters.frames_dropped, 1);
                    return;
                }
                // The link just retired: start a new one.
                Err(mpsc::error::TrySendError::Closed(input)) => input,
            },
            None => input,
        };
        let (queue, rx) = mpsc::channel(self.config.queue_max);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let _ = queue.try_send(input);
        let heard = Arc::new(AtomicBool::new(false));
        links.insert(
            peer,
            LinkHandle {
                generation,
                queue,
                heard: heard.clone(),
            },
        );
        tokio::spawn(run_link(self.clone(), peer, generation, rx, heard));
    }

    /// Notes that a frame from `peer` arrived: its link, if any, is in use.
    fn heard(&self, peer: NodeId) {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = links.get(&peer) {
            link.heard.store(true, Ordering::Relaxed);
        }
    }

    fn report_down(&self, peer: NodeId) {
        // Never block a link on the driver; a lost report is repeated by the next failure.
        let _ = self.events.try_send(NetEvent::PeerDown(peer));
    }

    fn retire_link(&self, peer: NodeId, generation: u64) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(&peer).is_some_and(|l| l.generation == generation) {
            links.remove(&peer);
        }
    }

    /// Starts reading what `peer` sends on `connection`.
    fn watch(self: &Arc<Self>, peer: Peer, connection: Connection) {
        bump(&self.counters.connections, 1);
        bump(&self.counters.connections_opened, 1);
        tokio::spawn(read_connection(self.clone(), peer, connection));
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let open = shared.counters.connections.load(Ordering::Relaxed);
        if open >= shared.config.connections_max as u64 {
            bump(&shared.counters.handshakes_failed, 1);
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(error) => {
                    bump(&shared.counters.handshakes_failed, 1);
                    tracing::debug!(%remote, %error, "incoming connection failed");
                    return;
                }
            };
            let connection = match timeout(shared.config.dial_timeout, connecting).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(error)) => {
                    bump(&shared.counters.handshakes_failed, 1);
                    tracing::info!(%remote, %error, "refused an incoming connection");
                    return;
                }
                Err(_) => {
                    bump(&shared.counters.handshakes_failed, 1);
                    return;
                }
            };
            let Some(id) = peer_id(&shared.admission, &connection) else {
                connection.close(CLOSE_PROTOCOL, b"unreadable certificate");
                return;
            };
            let peer = Peer::with_addr(id, remote);
            tracing::debug!(peer = %id.short(), %remote, "accepted a connection");
            shared.watch(peer, connection.clone());
            shared.deliver(id, LinkInput::Accepted(connection));
        });
    }
}

fn peer_id(admission: &Admission, connection: &Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certificates = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::peer_node_id(admission, &certificates)
}

/// Whether a connection's end means the peer is gone (rather than idle or closed by us).
fn is_failure(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::TimedOut | ConnectionError::Reset => true,
        ConnectionError::ApplicationClosed(close) => close.error_code == CLOSE_SHUTDOWN,
        ConnectionError::ConnectionClosed(_) | ConnectionError::TransportError(_) => true,
        _ => false,
    }
}

async fn read_connection(shared: Arc<Shared>, peer: Peer, connection: Connection) {
    loop {
        match connection.accept_uni().await {
            Ok(stream) => {
                tokio::spawn(read_stream(
                    shared.clone(),
                    peer,
                    stream,
                    connection.clone(),
                ));
            }
            Err(error) => {
                if is_failure(&error) {
                    tracing::debug!(peer = %peer.id.short(), %error, "connection lost");
                    shared.report_down(peer.id);
                }
                break;
            }
        }
    }
    shared.counters.connections.fetch_sub(1, Ordering::Relaxed);
}

async fn read_stream(
    shared: Arc<Shared>,
    peer: Peer,
    mut stream: quinn::RecvStream,
    connection: Connection,
) {
    let mut header = [0u8; frame::HEADER_BYTES];
    loop {
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let Some(len) = frame::body_len(header) else {
            bump(&shared.counters.frames_oversized, 1);
            tracing::warn!(peer = %peer.id.short(), len = u32::from_be_bytes(header), "closed a connection that sent an empty or oversized frame");
            connection.close(CLOSE_PROTOCOL, b"frame size");
            return;
        };
        let mut body = vec![0u8; len];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        bump(&shared.counters.frames_in, 1);
        bump(
            &shared.counters.bytes_in,
            (frame::HEADER_BYTES + len) as u64,
        );
        shared.heard(peer.id);
        match wire::decode(&body) {
            Ok(message) => {
                let event = NetEvent::Message {
                    from: peer,
                    message,
                };
                if shared.events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                bump(&shared.counters.frames_malformed, 1);
                tracing::debug!(peer = %peer.id.short(), %error, "dropped a malformed frame");
            }
        }
    }
}

/// A frame written on a connection, waiting for any sign of life from the peer.
#[derive(Clone, Copy)]
struct Awaiting {
    /// Datagrams received on the connection when the frame was written.
    received: u64,
    /// By when one more must have arrived.
    deadline: Instant,
}

/// Dial backoff of one link.
struct Backoff {
    delay: Duration,
    until: Option<Instant>,
    reported: Option<Instant>,
}

async fn run_link(
    shared: Arc<Shared>,
    peer: NodeId,
    generation: u64,
    mut inputs: mpsc::Receiver<LinkInput>,
    heard: Arc<AtomicBool>,
) {
    let config = shared.config.clone();
    let mut addr: Option<SocketAddr> = None;
    let mut connection: Option<Connection> = None;
    let mut stream: Option<SendStream> = None;
    let mut backoff = Backoff {
        delay: config.backoff_min,
        until: None,
        reported: None,
    };
    let mut unused_at = Instant::now() + config.unused_close;
    let mut awaiting: Option<Awaiting> = None;
    loop {
        let wake = awaiting.map_or(unused_at, |a| a.deadline.min(unused_at));
        let input = match timeout_at(wake, inputs.recv()).await {
            Ok(Some(input)) => input,
            Ok(None) => break,
            Err(_) => {
                let now = Instant::now();
                if let Some(waited) = awaiting.filter(|a| now >= a.deadline) {
                    awaiting = None;
                    let answered = connection
                        .as_ref()
                        .is_none_or(|c| c.stats().udp_rx.datagrams > waited.received);
                    if !answered {
                        tracing::debug!(peer = %peer.short(), "no answer to a frame; dropping the connection");
                        if let Some(c) = connection.take() {
                            c.close(CLOSE_UNUSED, b"no answer");
                        }
                        stream = None;
                        shared.report_down(peer);
                    }
                }
                if now >= unused_at {
                    if !heard.swap(false, Ordering::Relaxed) {
                        break;
                    }
                    unused_at = now + config.unused_close;
                }
                continue;
            }
        };
        unused_at = Instant::now() + config.unused_close;
        let (bytes, to) = match input {
            LinkInput::Accepted(accepted) => {
                // The newest connection wins: after a restart the peer's new connection
                // replaces the one to its previous life.
                addr = Some(accepted.remote_address());
                connection = Some(accepted);
                stream = None;
                awaiting = None;
                continue;
            }
            LinkInput::Frame(bytes, to) => (bytes, to),
        };
        if to.is_some() {
            addr = to;
        }
        if connection
            .as_ref()
            .is_some_and(|c| c.close_reason().is_some())
        {
            connection = None;
            stream = None;
        }
        if connection.is_none() {
            let now = Instant::now();
            if backoff.until.is_some_and(|until| now < until) {
                bump(&shared.counters.frames_dropped, 1);
                // Remind the driver, at most once per backoff period.
                if backoff.reported.is_none_or(|at| now >= at + backoff.delay) {
                    backoff.reported = Some(now);
                    shared.report_down(peer);
                }
                continue;
            }
            match dial(&shared, peer, addr).await {
                Ok(dialed) => {
                    backoff.delay = config.backoff_min;
                    backoff.until = None;
                    shared.watch(Peer { id: peer, addr }, dialed.clone());
                    connection = Some(dialed);
                    awaiting = None;
                }
                Err(reason) => {
                    bump(&shared.counters.dials_failed, 1);
                    bump(&shared.counters.frames_dropped, 1);
                    tracing::debug!(peer = %peer.short(), ?addr, %reason, "dial failed");
                    let now = Instant::now();
                    backoff.until = Some(now + backoff.delay);
                    backoff.reported = Some(now);
                    backoff.delay = (backoff.delay * 2).min(config.backoff_max);
                    shared.report_down(peer);
                    continue;
                }
            }
        }
        let Some(open) = connection.as_ref() else {
            continue;
        };
        if stream.is_none() {
            stream = match timeout(config.write_timeout, open.open_uni()).await {
                Ok(Ok(opened)) => Some(opened),
                _ => None,
            };
        }
        let written = match stream.as_mut() {
            Some(s) => matches!(
                timeout(config.write_timeout, s.write_all(&bytes)).await,
                Ok(Ok(()))
            ),
            None => false,
        };
        if written {
            bump(&shared.counters.frames_out, 1);
            bump(&shared.counters.bytes_out, bytes.len() as u64);
            if awaiting.is_none() {
                awaiting = Some(Awaiting {
                    received: open.stats().udp_rx.datagrams,
                    deadline: Instant::now() + config.answer_timeout,
                });
            }
        } else {
            bump(&shared.counters.frames_dropped, 1);
            tracing::debug!(peer = %peer.short(), "write failed; dropping the connection");
            if let Some(c) = connection.take() {
                c.close(CLOSE_UNUSED, b"write stalled");
            }
            stream = None;
            shared.report_down(peer);
        }
    }
    shared.retire_link(peer, generation);
    if let Some(c) = connection {
        c.close(CLOSE_UNUSED, b"unused");
    }
}

async fn dial(
    shared: &Shared,
    peer: NodeId,
    addr: Option<SocketAddr>,
) -> Result<Connection, String> {
    let addr = addr.ok_or("no known address")?;
    let connecting = shared
        .endpoint
        .connect(addr, &tls::server_name(peer))
        .map_err(|e| e.to_string())?;
    match timeout(shared.config.dial_timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".into()),
    }
}
