//! The wire format: every message of every layer, encoded with postcard behind a version byte.
//!
//! A frame is one byte of [`PROTOCOL_VERSION`] followed by the postcard encoding of a
//! [`Message`]. Decoding never panics: empty, oversized, truncated, trailing or garbage input,
//! an unknown version and a message whose lists exceed their bounds are all errors.

use serde::{Deserialize, Serialize};

use crate::aggregation::AggregationMessage;
use crate::broadcast::{BroadcastMessage, TreeMessage};
use crate::coordination::CoordinationMessage;
use crate::kv::KvMessage;
use crate::liveness::LivenessMessage;
use crate::membership::MembershipMessage;
use crate::ring::RingMessage;
use crate::roster::RosterMessage;
use crate::slicing::SlicingMessage;
use crate::suite::SuiteMessage;

/// Version of the wire format; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u8 = 5;

/// Largest encoded message, version byte included.
pub const MESSAGE_BYTES_MAX: usize = 1024 * 1024;

/// A message between two nodes, tagged by the layer it belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Overlay membership (HyParView).
    Membership(MembershipMessage),
    /// Broadcast (tree push, lazy repair and anti-entropy).
    Broadcast(BroadcastMessage),
    /// Aggregation (push-pull averaging).
    Aggregation(AggregationMessage),
    /// Ordered slicing (attribute samples).
    Slicing(SlicingMessage),
    /// The structured overlay (views and lookups).
    Ring(RingMessage),
    /// The replicated key-value store.
    Kv(KvMessage),
    /// Anti-entropy of the service suite.
    Suite(SuiteMessage),
    /// A message between two agents that the core does not read (a request for an instance's
    /// log and its answer); the driver handles it, bounded by the frame size.
    Agent(bytes::Bytes),
    /// Liveness probes.
    Liveness(LivenessMessage),
    /// Reports and tasks between nodes and the coordinators of their services.
    Coordination(CoordinationMessage),
    /// A sync of the roster between neighbours.
    Roster(RosterMessage),
}

impl Message {
    /// Whether every list in the message respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            Message::Membership(m) => m.is_within_bounds(),
            Message::Broadcast(m) => m.is_within_bounds(),
            Message::Aggregation(m) => m.is_within_bounds(),
            Message::Slicing(m) => m.is_within_bounds(),
            Message::Ring(m) => m.is_within_bounds(),
            Message::Kv(m) => m.is_within_bounds(),
            Message::Suite(m) => m.is_within_bounds(),
            Message::Agent(_) | Message::Liveness(_) => true,
            Message::Coordination(m) => m.is_within_bounds(),
            Message::Roster(m) => m.is_within_bounds(),
        }
    }

    /// A short name of the message kind, for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Membership(m) => match m {
                MembershipMessage::Join => "join",
                MembershipMessage::ForwardJoin { .. } => "forward_join",
                MembershipMessage::Neighbor { .. } => "neighbor",
                MembershipMessage::NeighborReply { .. } => "neighbor_reply",
                MembershipMessage::Disconnect { .. } => "disconnect",
                MembershipMessage::Shuffle { .. } => "shuffle",
                MembershipMessage::ShuffleReply { .. } => "shuffle_reply",
                MembershipMessage::Ping => "ping",
                MembershipMessage::Pong => "pong",
            },
            Message::Broadcast(m) => match m {
                BroadcastMessage::Gossip(_) => "gossip",
                BroadcastMessage::IHave(_) => "ihave",
                BroadcastMessage::Graft(_) => "graft",
                BroadcastMessage::Tree(TreeMessage::Beacon { .. }) => "beacon",
                BroadcastMessage::Tree(TreeMessage::Adopt { .. }) => "adopt",
                BroadcastMessage::Digest { .. } => "digest",
                BroadcastMessage::Ids(_) => "ids",
                BroadcastMessage::Want(_) => "want",
                BroadcastMessage::Repair(_) => "repair",
                BroadcastMessage::Summary { .. } => "summary",
                BroadcastMessage::Differs { .. } => "differs",
            },
            Message::Aggregation(m) => match m {
                AggregationMessage::Push { .. } => "aggregate_push",
                AggregationMessage::Pull { .. } => "aggregate_pull",
                AggregationMessage::Busy { .. } => "aggregate_busy",
            },
            Message::Slicing(m) => match m {
                SlicingMessage::Push(_) => "slice_push",
                SlicingMessage::Answer(_) => "slice_answer",
                SlicingMessage::Digest(_) => "slice_digest",
                SlicingMessage::DigestReply(_) => "slice_digest_reply",
                SlicingMessage::Known(_) => "slice_known",
            },
            Message::Ring(m) => match m {
                RingMessage::View { .. } => "ring_view",
                RingMessage::Lookup { .. } => "ring_lookup",
                RingMessage::Found { .. } => "ring_found",
            },
            Message::Kv(m) => match m {
                KvMessage::Put { .. } => "kv_put",
                KvMessage::PutAck { .. } => "kv_put_ack",
                KvMessage::Get { .. } => "kv_get",
                KvMessage::GetReply { .. } => "kv_get_reply",
                KvMessage::Digest { .. } => "kv_digest",
                KvMessage::Keys { .. } => "kv_keys",
                KvMessage::Want(_) => "kv_want",
                KvMessage::Records { .. } => "kv_records",
                KvMessage::Stored(_) => "kv_stored",
            },
            Message::Suite(m) => match m {
                SuiteMessage::Digest { .. } => "suite_digest",
                SuiteMessage::Versions { .. } => "suite_versions",
                SuiteMessage::Want(_) => "suite_want",
                SuiteMessage::Entries(_) => "suite_entries",
            },
            Message::Agent(_) => "agent",
            Message::Liveness(m) => match m {
                LivenessMessage::Ping { .. } => "live_ping",
                LivenessMessage::Pong { .. } => "live_pong",
                LivenessMessage::Check { .. } => "live_check",
                LivenessMessage::Reached { .. } => "live_reached",
                LivenessMessage::Declared { .. } => "live_declared",
            },
            Message::Coordination(m) => match m {
                CoordinationMessage::Report { .. } => "coord_report",
                CoordinationMessage::Beat { .. } => "coord_beat",
                CoordinationMessage::Resend => "coord_resend",
                CoordinationMessage::Tasks { .. } => "coord_tasks",
                CoordinationMessage::NotMine { .. } => "coord_not_mine",
                CoordinationMessage::Handover { .. } => "coord_handover",
            },
            Message::Roster(m) => match m {
                RosterMessage::Pull { .. } => "roster_pull",
                RosterMessage::Members { .. } => "roster_members",
            },
        }
    }
}

/// Why bytes could not be decoded into a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty message")]
    Empty,
    /// More than [`MESSAGE_BYTES_MAX`] bytes.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer speaks another version of the protocol.
    #[error("unknown protocol version {found} (this node speaks {expected})")]
    UnknownVersion {
        /// Version found in the message.
        found: u8,
        /// Version this node speaks.
        expected: u8,
    },
    /// The bytes are not a valid encoding of a message.
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    /// A valid message followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// A list in the message is longer than its bound.
    #[error("message exceeds a size bound")]
    OutOfBounds,
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoding would exceed [`MESSAGE_BYTES_MAX`], or a list exceeds its bound.
    #[error("message exceeds the size limit")]
    TooLarge,
    /// Serialisation failed.
    #[error("cannot encode message: {0}")]
    Serialize(postcard::Error),
}

/// Encodes `message` as one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, EncodeError> {
    if !message.is_within_bounds() {
        return Err(EncodeError::TooLarge);
    }
    let bytes =
        postcard::to_extend(message, vec![PROTOCOL_VERSION]).map_err(EncodeError::Serialize)?;
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(EncodeError::TooLarge);
    }
    Ok(bytes)
}

/// Decodes one frame produced by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MESSAGE_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: MESSAGE_BYTES_MAX,
        });
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion {
            found: version,
            expected: PROTOCOL_VERSION,
        });
    }
    let (message, rest): (Message, &[u8]) =
        postcard::take_from_bytes(body).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    if !message.is_within_bounds() {
        return Err(DecodeError::OutOfBounds);
    }
    Ok(message)
}
