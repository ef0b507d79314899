//! A node's identity: an Ed25519 key pair, and the node id derived from its public key.

use core::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use nubo_proto::NodeId;

/// Length of a secret key in bytes.
pub const SECRET_KEY_BYTES: usize = 32;

/// A node's (or a user's) Ed25519 key pair.
///
/// Contract: the node id is the first 16 bytes of the BLAKE3 hash of the public key, read as a
/// big-endian number, so no one can claim an id without holding the matching secret key.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

/// Why key material was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system's randomness failed.
    #[error("cannot draw randomness from the operating system: {0}")]
    Random(getrandom::Error),
    /// The bytes are not a key.
    #[error("a secret key is {SECRET_KEY_BYTES} bytes, found {0}")]
    Length(usize),
}

impl Identity {
    /// A new key pair from the operating system's randomness.
    pub fn generate() -> Result<Identity, KeyError> {
        let mut secret = [0u8; SECRET_KEY_BYTES];
        getrandom::getrandom(&mut secret).map_err(KeyError::Random)?;
        Ok(Identity {
            key: SigningKey::from_bytes(&secret),
        })
    }

    /// The key pair of a stored secret key.
    pub fn from_secret(bytes: &[u8]) -> Result<Identity, KeyError> {
        let secret: [u8; SECRET_KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Identity {
            key: SigningKey::from_bytes(&secret),
        })
    }

    /// The secret key, to store.
    pub fn secret(&self) -> [u8; SECRET_KEY_BYTES] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The node id of this key.
    pub fn node_id(&self) -> NodeId {
        node_id_of(&self.public_key())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.node_id())
    }
}

/// The node id belonging to an Ed25519 public key.
pub fn node_id_of(public_key: &[u8; 32]) -> NodeId {
    let hash = blake3::hash(public_key);
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    NodeId(u128::from_be_bytes(first))
}

/// Whether `signature` is `public_key`'s signature of `message`.
pub fn verify_signature(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    key.verify(message, &Signature::from_bytes(signature))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_secret_gives_back_the_same_identity() {
        let a = Identity::generate().unwrap();
        let b = Identity::from_secret(&a.secret()).unwrap();
        assert_eq!(a.node_id(), b.node_id());
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.node_id(), Identity::generate().unwrap().node_id());
        assert!(Identity::from_secret(&[0u8; 5]).is_err());
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_message() {
        let a = Identity::generate().unwrap();
        let signature = a.sign(b"hello");
        assert!(verify_signature(&a.public_key(), b"hello", &signature));
        assert!(!verify_signature(&a.public_key(), b"hellO", &signature));
        let b = Identity::generate().unwrap();
        assert!(!verify_signature(&b.public_key(), b"hello", &signature));
    }
}
