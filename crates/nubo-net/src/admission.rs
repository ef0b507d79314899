//! Cloud admission: who may talk to the nodes of a cloud, and the join token that lets a new
//! node in.
//!
//! Every cloud has an id and an admission secret, created by `nubo init` and given to each
//! member in its join token. A member proves admission with a *proof*: the secret's keyed
//! BLAKE3 hash of the cloud id and the member's public key. The proof travels in the member's
//! TLS certificate, and TLS proves that the member holds the certificate's key, so a proof
//! seen on the wire is useless to anyone else. A peer without a valid proof is refused during
//! the handshake, before any of its messages is read.

use core::fmt;
use core::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nubo_proto::NodeId;
use serde::{Deserialize, Serialize};

/// Bytes of the admission secret.
pub const SECRET_BYTES: usize = 32;
/// Most contacts a join token carries.
pub const TOKEN_CONTACTS_MAX: usize = 16;
/// What every join token starts with: it names the format's version.
const TOKEN_PREFIX: &str = "nubo1_";
const PROOF_CONTEXT: &[u8] = b"nubo admission v1";

/// The identity of a cloud.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CloudId(pub [u8; 16]);

impl fmt::Display for CloudId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CloudId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloudId({self})")
    }
}

/// What a member must know to be admitted and to admit others: the cloud id and the secret;
/// and the administrator's public key, whose signature grants the right to deploy.
///
/// Contract: [`Admission::verify`] accepts exactly the proofs [`Admission::proof`] makes for
/// the same cloud and secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// The cloud.
    pub cloud: CloudId,
    /// The admission secret.
    pub secret: [u8; SECRET_BYTES],
    /// The cloud administrator's Ed25519 public key.
    pub admin_key: [u8; 32],
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Admission({})", self.cloud)
    }
}

impl Admission {
    /// A new cloud with a random id and secret, administered by the holder of `admin_key`.
    pub fn generate(admin_key: [u8; 32]) -> Result<Admission, getrandom::Error> {
        let mut cloud = [0u8; 16];
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::getrandom(&mut cloud)?;
        getrandom::getrandom(&mut secret)?;
        Ok(Admission {
            cloud: CloudId(cloud),
            secret,
            admin_key,
        })
    }

    /// The proof that the holder of `public_key` is admitted.
    pub fn proof(&self, public_key: &[u8; 32]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.secret);
        hasher.update(PROOF_CONTEXT);
        hasher.update(&self.cloud.0);
        hasher.update(public_key);
        *hasher.finalize().as_bytes()
    }

    /// Whether `proof` admits the holder of `public_key` (compared in constant time).
    pub fn verify(&self, public_key: &[u8; 32], proof: &[u8; 32]) -> bool {
        let expected = blake3::Hash::from(self.proof(public_key));
        expected == blake3::Hash::from(*proof)
    }
}

/// Everything a new node needs to join a cloud, printed by `nubo invite`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The cloud and its admission secret.
    pub admission: Admission,
    /// Members to contact first, with their node ids (a contact's identity is checked).
    pub contacts: Vec<(NodeId, SocketAddr)>,
    /// Seconds since the Unix epoch after which the token is refused by `nubo agent --join`.
    pub expires_unix_secs: u64,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("cloud", &self.admission.cloud)
            .field("contacts", &self.contacts)
            .field("expires_unix_secs", &self.expires_unix_secs)
            .finish()
    }
}

/// Why a join token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It does not start like a token.
    #[error("a join token starts with `{TOKEN_PREFIX}`; get one with `nubo invite` on a member")]
    Prefix,
    /// It is not valid base64 or not a token inside.
    #[error("the join token is damaged (was it cut when copied?)")]
    Malformed,
    /// It has no contact or too many.
    #[error("the join token must name 1 to {TOKEN_CONTACTS_MAX} contacts")]
    Contacts,
    /// It has expired.
    #[error("the join token expired; ask a member for a new one with `nubo invite`")]
    Expired,
}

impl JoinToken {
    /// The token as text.
    pub fn encode(&self) -> String {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A token from its text, checked against the time `now_unix_secs`.
    pub fn decode(text: &str, now_unix_secs: u64) -> Result<JoinToken, TokenError> {
        let body = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::Prefix)?;
        if body.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        let token: JoinToken = postcard::from_bytes(&bytes).map_err(|_| TokenError::Malformed)?;
        if token.contacts.is_empty() || token.contacts.len() > TOKEN_CONTACTS_MAX {
            return Err(TokenError::Contacts);
        }
        if token.expires_unix_secs < now_unix_secs {
            return Err(TokenError::Expired);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_for_their_key_and_cloud() {
        let a = Admission::generate([0; 32]).unwrap();
        let key = [7u8; 32];
        let proof = a.proof(&key);
        assert!(a.verify(&key, &proof));
        assert!(!a.verify(&[8u8; 32], &proof));
        let other = Admission::generate([0; 32]).unwrap();
        assert!(!other.verify(&key, &proof));
        let mut same_secret_other_cloud = a.clone();
        same_secret_other_cloud.cloud.0[0] ^= 1;
        assert!(!same_secret_other_cloud.verify(&key, &proof));
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_say_why() {
        let token = JoinToken {
            admission: Admission::generate([0; 32]).unwrap(),
            contacts: vec![(NodeId(5), "127.0.0.1:7700".parse().unwrap())],
            expires_unix_secs: 1_000,
        };
        let text = token.encode();
        assert_eq!(JoinToken::decode(&text, 999), Ok(token.clone()));
        assert_eq!(JoinToken::decode(&text, 1_001), Err(TokenError::Expired));
        assert_eq!(JoinToken::decode("hello", 0), Err(TokenError::Prefix));
        assert_eq!(
            JoinToken::decode(&text[..text.len() - 5], 0),
            Err(TokenError::Malformed)
        );
        let empty = JoinToken {
            contacts: vec![],
            ..token
        };
        assert_eq!(
            JoinToken::decode(&empty.encode(), 0),
            Err(TokenError::Contacts)
        );
    }
}
