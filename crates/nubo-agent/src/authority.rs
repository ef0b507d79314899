//! Who may deploy what: grants signed by the cloud's administrator, and service documents
//! signed by their deployer.
//!
//! The administrator (the holder of `admin.key`, created by `nubo init`) may deploy anything.
//! Anyone else needs a [`Grant`]: the administrator's signature on a namespace, the user's
//! public key, a quota and an expiry. A [`Document`] (one service's description, or its
//! removal) carries its signer's key, the grant if any, and the signature over both; every
//! agent checks it before the document enters its suite. Quotas are checked when deploying
//! and again, deterministically, when placing (services of a namespace are admitted in key
//! order while they fit).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nubo_net::{Identity, node_id_of, verify_signature};
use nubo_proto::NodeId;
use nubo_proto::suite::{SuiteCheck, SuiteEntry};

use nubo_proto::outcome::DeployStatus;
use serde::{Deserialize, Serialize};

const GRANT_PREFIX: &str = "nubogrant1_";
const GRANT_CONTEXT: &[u8] = b"nubo grant v1";
const DOCUMENT_CONTEXT: &[u8] = b"nubo document v1";
/// Prefix of the suite keys that drain nodes: `@drain/<node id>`.
pub const DRAIN_PREFIX: &str = "@drain/";

/// The suite key that drains `node`.
pub fn drain_key(node: NodeId) -> String {
    format!("{DRAIN_PREFIX}{node}")
}

/// The node a drain key names.
pub fn drained_node(key: &str) -> Option<NodeId> {
    key.strip_prefix(DRAIN_PREFIX)?.parse().ok()
}

pub use nubo_proto::spec::{Intent, Quota};

/// The administrator's permission for one user key to deploy in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The namespace.
    pub namespace: String,
    /// The user's public key.
    pub user_key: [u8; 32],
    /// What the namespace may use.
    pub quota: Quota,
    /// Seconds since the Unix epoch after which the grant is void.
    pub expires_unix_secs: u64,
}

/// A grant with the administrator's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGrant {
    /// The grant.
    pub grant: Grant,
    /// The administrator's signature of it (64 bytes).
    pub signature: Vec<u8>,
}

/// Why a grant or a document was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// The text is not a grant.
    #[error(
        "not a grant (a grant starts with `{GRANT_PREFIX}`; the administrator makes one with `nubo grant`)"
    )]
    GrantFormat,
    /// The bytes are not a document.
    #[error("not a signed service document")]
    DocumentFormat,
    /// A signature does not verify.
    #[error("the {0} signature does not verify")]
    BadSignature(&'static str),
    /// The signer is neither the administrator nor holds a grant.
    #[error(
        "the signing key is not the administrator's and carries no grant; ask the administrator for one (`nubo grant`)"
    )]
    NoGrant,
    /// The grant is for another key or namespace.
    #[error("the grant is for {what}, not for this {target}")]
    GrantMismatch {
        /// What the grant names.
        what: String,
        /// What the document needs.
        target: &'static str,
    },
    /// The grant has expired.
    #[error("the grant expired; ask the administrator for a new one")]
    Expired,
}

fn grant_bytes(grant: &Grant) -> Vec<u8> {
    let mut bytes = GRANT_CONTEXT.to_vec();
    bytes.extend(postcard::to_allocvec(grant).unwrap_or_default());
    bytes
}

fn signature_of(bytes: &[u8]) -> Option<[u8; 64]> {
    bytes.try_into().ok()
}

impl SignedGrant {
    /// The administrator signs `grant`.
    pub fn sign(admin: &Identity, grant: Grant) -> SignedGrant {
        let signature = admin.sign(&grant_bytes(&grant)).to_vec();
        SignedGrant { grant, signature }
    }

    /// Whether the administrator `admin_key` signed it.
    pub fn verify(&self, admin_key: &[u8; 32]) -> bool {
        signature_of(&self.signature)
            .is_some_and(|s| verify_signature(admin_key, &grant_bytes(&self.grant), &s))
    }

    /// The grant as text.
    pub fn encode(&self) -> String {
        format!(
            "{GRANT_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(postcard::to_allocvec(self).unwrap_or_default())
        )
    }

    /// A grant from its text.
    pub fn decode(text: &str) -> Result<SignedGrant, AuthorityError> {
        let body = text
            .trim()
            .strip_prefix(GRANT_PREFIX)
            .ok_or(AuthorityError::GrantFormat)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| AuthorityError::GrantFormat)?;
        postcard::from_bytes(&bytes).map_err(|_| AuthorityError::GrantFormat)
    }
}

/// One service's description (TOML text) or its removal, as deployed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// `namespace/name`.
    pub key: String,
    /// Higher replaces lower (milliseconds since the Unix epoch when deployed).
    pub version: u64,
    /// What to do with the service.
    pub intent: Intent,
    /// The description as written (kept for `stop`, so it can be started again).
    pub description: String,
    /// The signer's public key.
    pub signer: [u8; 32],
    /// The signer's grant, unless the signer is the administrator.
    pub grant: Option<SignedGrant>,
}

/// A document and its signer's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDocument {
    /// The document.
    pub document: Document,
    /// The signature over it (64 bytes).
    pub signature: Vec<u8>,
}

fn document_bytes(document: &Document) -> Vec<u8> {
    let mut bytes = DOCUMENT_CONTEXT.to_vec();
    bytes.extend(postcard::to_allocvec(document).unwrap_or_default());
    bytes
}

impl SignedDocument {
    /// `signer` signs `document`.
    pub fn sign(signer: &Identity, document: Document) -> SignedDocument {
        let signature = signer.sign(&document_bytes(&document)).to_vec();
        SignedDocument {
            document,
            signature,
        }
    }

    /// The suite entry that carries it.
    pub fn to_entry(&self) -> SuiteEntry {
        SuiteEntry {
            key: self.document.key.clone(),
            version: self.document.version,
            document: postcard::to_allocvec(self).unwrap_or_default().into(),
        }
    }

    /// The signed document in a suite entry, checked: signature, grant, key and version.
    pub fn from_entry(
        entry: &SuiteEntry,
        admin_key: &[u8; 32],
        now_unix_secs: u64,
    ) -> Result<SignedDocument, AuthorityError> {
        let signed: SignedDocument =
            postcard::from_bytes(&entry.document).map_err(|_| AuthorityError::DocumentFormat)?;
        if signed.document.key != entry.key || signed.document.version != entry.version {
            return Err(AuthorityError::DocumentFormat);
        }
        signed.verify(admin_key, now_unix_secs)?;
        Ok(signed)
    }

    /// Checks the signature and the signer's right to write this key: a service's key, the
    /// administrator or a granted user; a drain key, the administrator or the node itself.
    pub fn verify(&self, admin_key: &[u8; 32], now_unix_secs: u64) -> Result<(), AuthorityError> {
        let document = &self.document;
        let valid = signature_of(&self.signature)
            .is_some_and(|s| verify_signature(&document.signer, &document_bytes(document), &s));
        if !valid {
            return Err(AuthorityError::BadSignature("document's"));
        }
        if &document.signer == admin_key {
            return Ok(());
        }
        if document.key.starts_with(DRAIN_PREFIX) {
            return match drained_node(&document.key) {
                Some(node) if node_id_of(&document.signer) == node => Ok(()),
                _ => Err(AuthorityError::GrantMismatch {
                    what: "another node".into(),
                    target: "drain (only the node itself or the administrator drains a node)",
                }),
            };
        }
        let grant = document.grant.as_ref().ok_or(AuthorityError::NoGrant)?;
        if !grant.verify(admin_key) {
            return Err(AuthorityError::BadSignature("grant's"));
        }
        if grant.grant.user_key != document.signer {
            return Err(AuthorityError::GrantMismatch {
                what: "another key".into(),
                target: "signer",
            });
        }
        let namespace = document.key.split('/').next().unwrap_or("");
        if grant.grant.namespace != namespace {
            return Err(AuthorityError::GrantMismatch {
                what: format!("namespace {}", grant.grant.namespace),
                target: "namespace",
            });
        }
        if grant.grant.expires_unix_secs < now_unix_secs {
            return Err(AuthorityError::Expired);
        }
        Ok(())
    }
}

/// The agent's suite check: only documents that verify enter the suite. Service and drain
/// documents must be signed by someone allowed to write their key; an update's status (an
/// annotation, written by the nodes) must be well formed.
pub struct DocumentCheck {
    /// The administrator's key.
    pub admin_key: [u8; 32],
}

impl SuiteCheck for DocumentCheck {
    fn accepts(&self, entry: &SuiteEntry) -> bool {
        if nubo_proto::suite::annotated(&entry.key).is_some() {
            let valid = DeployStatus::from_entry(entry).is_some();
            if !valid {
                tracing::warn!(key = %entry.key, "refused a malformed status annotation");
            }
            return valid;
        }
        let now = crate::clock::unix_now().as_secs();
        match SignedDocument::from_entry(entry, &self.admin_key, now) {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "refused a service document");
                false
            }
        }
    }

    fn ends_history(&self, entry: &SuiteEntry) -> bool {
        nubo_proto::suite::annotated(&entry.key).is_none()
            && postcard::from_bytes::<SignedDocument>(&entry.document)
                .is_ok_and(|s| s.document.intent == Intent::Remove)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(key: &str, signer: &Identity, grant: Option<SignedGrant>) -> Document {
        Document {
            key: key.into(),
            version: 1,
            intent: Intent::Run,
            description: "name = \"site\"".into(),
            signer: signer.public_key(),
            grant,
        }
    }

    fn grant(admin: &Identity, user: &Identity, namespace: &str, expires: u64) -> SignedGrant {
        SignedGrant::sign(
            admin,
            Grant {
                namespace: namespace.into(),
                user_key: user.public_key(),
                quota: Quota {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                    instances: 4,
                },
                expires_unix_secs: expires,
            },
        )
    }

    #[test]
    fn the_administrator_and_granted_users_may_deploy_others_not() {
        let admin = Identity::generate().unwrap();
        let user = Identity::generate().unwrap();
        let key = admin.public_key();
        let by_admin = SignedDocument::sign(&admin, document("any/thing", &admin, None));
        assert_eq!(by_admin.verify(&key, 0), Ok(()));

        let g = grant(&admin, &user, "web", 100);
        let by_user = SignedDocument::sign(&user, document("web/site", &user, Some(g.clone())));
        assert_eq!(by_user.verify(&key, 50), Ok(()));
        assert_eq!(by_user.verify(&key, 101), Err(AuthorityError::Expired));
        let elsewhere = SignedDocument::sign(&user, document("db/pg", &user, Some(g.clone())));
        assert!(matches!(
            elsewhere.verify(&key, 50),
            Err(AuthorityError::GrantMismatch { .. })
        ));
        let ungranted = SignedDocument::sign(&user, document("web/site", &user, None));
        assert_eq!(ungranted.verify(&key, 50), Err(AuthorityError::NoGrant));
        // A grant the user signed for itself is worthless.
        let forged = grant(&user, &user, "web", 100);
        let self_granted = SignedDocument::sign(&user, document("web/site", &user, Some(forged)));
        assert_eq!(
            self_granted.verify(&key, 50),
            Err(AuthorityError::BadSignature("grant's"))
        );
        // Tampering with a signed document breaks its signature.
        let mut tampered = by_user.clone();
        tampered.document.key = "web/other".into();
        assert_eq!(
            tampered.verify(&key, 50),
            Err(AuthorityError::BadSignature("document's"))
        );
        assert_eq!(SignedGrant::decode(&g.encode()), Ok(g));
    }

    #[test]
    fn a_node_drains_itself_the_administrator_any_node_nobody_else() {
        let admin = Identity::generate().unwrap();
        let node = Identity::generate().unwrap();
        let other = Identity::generate().unwrap();
        let key = drain_key(node.node_id());
        assert_eq!(drained_node(&key), Some(node.node_id()));
        for (signer, allowed) in [(&node, true), (&admin, true), (&other, false)] {
            let signed = SignedDocument::sign(signer, document(&key, signer, None));
            assert_eq!(
                signed.verify(&admin.public_key(), 0).is_ok(),
                allowed,
                "{:?}",
                signed.verify(&admin.public_key(), 0)
            );
        }
        let check = DocumentCheck {
            admin_key: admin.public_key(),
        };
        let mut removal = document("web/site", &admin, None);
        removal.intent = Intent::Remove;
        let removal = SignedDocument::sign(&admin, removal).to_entry();
        assert!(check.accepts(&removal) && check.ends_history(&removal));
        let run = SignedDocument::sign(&admin, document("web/site", &admin, None)).to_entry();
        assert!(!check.ends_history(&run));
        let status = nubo_proto::outcome::DeployStatus::default().to_entry("web/site", None);
        assert!(check.accepts(&status));
        let garbage = SuiteEntry {
            key: "web/site#status".into(),
            version: 1,
            document: bytes::Bytes::from_static(b"\xff\xff\xff"),
        };
        assert!(!check.accepts(&garbage));
    }

    #[test]
    fn entries_round_trip_and_must_match_their_document() {
        let admin = Identity::generate().unwrap();
        let signed = SignedDocument::sign(&admin, document("web/site", &admin, None));
        let entry = signed.to_entry();
        assert_eq!(
            SignedDocument::from_entry(&entry, &admin.public_key(), 0),
            Ok(signed)
        );
        let mut moved = entry.clone();
        moved.key = "web/other".into();
        assert_eq!(
            SignedDocument::from_entry(&moved, &admin.public_key(), 0),
            Err(AuthorityError::DocumentFormat)
        );
    }
}
