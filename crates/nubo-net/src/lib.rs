//! nubo's network edge: node identity, cloud admission, and the QUIC transport that carries
//! the protocol core's messages between admitted nodes.
//!
//! This is the only crate that knows of QUIC and TLS. The protocol core sees a peer only
//! through the messages delivered from it and the reports that it is unreachable.

pub mod admission;
pub mod frame;
pub mod identity;
pub mod tls;
pub mod transport;

pub use admission::{Admission, CloudId, JoinToken, TokenError};
pub use identity::{Identity, node_id_of, verify_signature};
pub use transport::{KindTraffic, NetCounters, NetEvent, Transport, TransportConfig};

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source} (is another agent using this port?)")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built.
    #[error("cannot set up TLS: {0}")]
    Tls(String),
}
