//! Identities of nodes and how to reach them.

use core::fmt;
use core::net::SocketAddr;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

/// The identity of a node: 128 bits, also its position on the ring.
///
/// In a real cloud it is derived from the node's public key, so no node can claim another's id;
/// in the simulator it is drawn from the seeded generator. Ordering is numeric.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u128);

impl NodeId {
    /// The first 8 hexadecimal digits, enough to tell nodes apart in logs and tables.
    pub fn short(&self) -> String {
        format!("{:08x}", (self.0 >> 96) as u32)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Error parsing a [`NodeId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a node id is 32 hexadecimal digits")]
pub struct ParseNodeIdError;

impl FromStr for NodeId {
    type Err = ParseNodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            return Err(ParseNodeIdError);
        }
        u128::from_str_radix(s, 16)
            .map(NodeId)
            .map_err(|_| ParseNodeIdError)
    }
}

/// A node together with the address it can be reached at.
///
/// The address is what the node advertises; `None` when it is not known (the simulator needs
/// none, and a node may learn an id before its address). Equality and ordering consider the
/// id only, so a view never holds the same node twice under two addresses.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct Peer {
    /// Who the node is.
    pub id: NodeId,
    /// Where it listens, if known.
    pub addr: Option<SocketAddr>,
}

impl Peer {
    /// A peer with no known address.
    pub const fn new(id: NodeId) -> Peer {
        Peer { id, addr: None }
    }

    /// A peer reachable at `addr`.
    pub const fn with_addr(id: NodeId, addr: SocketAddr) -> Peer {
        Peer {
            id,
            addr: Some(addr),
        }
    }
}

impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Peer {}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{}@{addr}", self.id.short()),
            None => write!(f, "{}", self.id.short()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_text() {
        let id = NodeId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(id.short(), "01234567");
        assert!("xyz".parse::<NodeId>().is_err());
        assert!(
            "g123456789abcdef0011223344556677"
                .parse::<NodeId>()
                .is_err()
        );
    }

    #[test]
    fn peers_compare_by_id() {
        let a = Peer::new(NodeId(1));
        let b = Peer::with_addr(NodeId(1), "127.0.0.1:9".parse().unwrap());
        assert_eq!(a, b);
    }
}
