//! TLS for QUIC: each node presents a self-signed certificate of its Ed25519 key carrying its
//! admission proof; each side checks the other's proof and, when dialing, that the key belongs
//! to the node id it meant to reach.
//!
//! There is no certificate authority: trust comes from the admission secret (is this peer
//! admitted?) and from the node id being the hash of the key (is it who it claims to be?).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ed25519_dalek::pkcs8::EncodePrivateKey;
use nubo_proto::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::NetError;
use crate::admission::Admission;
use crate::identity::{Identity, node_id_of};

/// The ALPN protocol: the transport's protocol version. A peer speaking another version fails
/// the handshake.
pub const ALPN: &[u8] = b"nubo/5";
/// Object identifier of the certificate extension carrying the admission proof.
const PROOF_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 59_846, 1, 1];
const PROOF_OID_TEXT: &str = "1.3.6.1.4.1.59846.1.1";
const ED25519_OID_TEXT: &str = "1.3.101.112";

/// Why a peer's certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a certificate we can read, or not an Ed25519 key.
    #[error("unreadable certificate or not an Ed25519 key")]
    Certificate,
    /// The certificate carries no admission proof.
    #[error("no admission proof: the peer was not admitted to this cloud")]
    NoProof,
    /// The proof is not for this cloud or this key.
    #[error("wrong admission proof: the peer belongs to another cloud or its credential is forged")]
    WrongProof,
    /// The key is not the node we dialed.
    #[error("the peer is {found}, not the node {expected} we dialed")]
    WrongNode {
        /// Who we meant to reach.
        expected: NodeId,
        /// Who answered.
        found: NodeId,
    },
}

/// The TLS server name under which a node is dialed: its id.
pub fn server_name(id: NodeId) -> String {
    format!("n{id}")
}

fn node_of_server_name(name: &ServerName<'_>) -> Option<NodeId> {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().strip_prefix('n')?.parse().ok(),
        _ => None,
    }
}

/// Reads a peer's certificate: its node id, if its admission proof holds.
pub fn check_certificate(admission: &Admission, der: &[u8]) -> Result<NodeId, Refusal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| Refusal::Certificate)?;
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID_TEXT {
        return Err(Refusal::Certificate);
    }
    let public_key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| Refusal::Certificate)?;
    let extension = cert
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == PROOF_OID_TEXT)
        .ok_or(Refusal::NoProof)?;
    // The proof is stored as a DER octet string of 32 bytes.
    let proof: [u8; 32] = extension
        .value
        .strip_prefix(&[0x04, 0x20])
        .and_then(|p| p.try_into().ok())
        .ok_or(Refusal::WrongProof)?;
    if !admission.verify(&public_key, &proof) {
        return Err(Refusal::WrongProof);
    }
    Ok(node_id_of(&public_key))
}

/// A self-signed certificate of `identity` carrying `proof`, and its private key.
pub fn certificate(
    identity: &Identity,
    proof: &[u8; 32],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), rcgen::Error> {
    let pkcs8 = identity
        .signing_key()
        .to_pkcs8_der()
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let key_der = PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec());
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![server_name(identity.node_id())])?;
    let mut content = vec![0x04, 0x20];
    content.extend_from_slice(proof);
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(PROOF_OID, content));
    let cert = params.self_signed(&key_pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(key_der)))
}

/// Checks peers' certificates against the cloud's admission, counting refusals.
#[derive(Debug)]
pub struct PeerVerifier {
    admission: Admission,
    algorithms: WebPkiSupportedAlgorithms,
    refused: Arc<AtomicU64>,
}

impl PeerVerifier {
    /// A verifier for `admission` that adds every refusal to `refused`.
    pub fn new(
        admission: Admission,
        provider: &CryptoProvider,
        refused: Arc<AtomicU64>,
    ) -> PeerVerifier {
        PeerVerifier {
            admission,
            algorithms: provider.signature_verification_algorithms,
            refused,
        }
    }

    /// A verifier for `admission` with the ring provider's algorithms and its own counter.
    pub fn for_cloud(admission: Admission) -> Arc<PeerVerifier> {
        let provider = rustls::crypto::ring::default_provider();
        Arc::new(PeerVerifier::new(admission, &provider, Arc::default()))
    }

    fn check(&self, der: &[u8], expected: Option<NodeId>) -> Result<NodeId, rustls::Error> {
        let result = check_certificate(&self.admission, der).and_then(|found| match expected {
            Some(expected) if expected != found => Err(Refusal::WrongNode { expected, found }),
            _ => Ok(found),
        });
        result.map_err(|refusal| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%refusal, "refused a peer's credential");
            rustls::Error::General(refusal.to_string())
        })
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = node_of_server_name(server_name);
        if expected.is_none() {
            return Err(rustls::Error::General("not a node's server name".into()));
        }
        self.check(end_entity, expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, None)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// TLS configurations of a node: as a server (accepting) and as a client (dialing). Both
/// require the peer's certificate and check it with [`PeerVerifier`].
pub fn configs(
    identity: &Identity,
    admission: &Admission,
    refused: Arc<AtomicU64>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), NetError> {
    let proof = admission.proof(&identity.public_key());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PeerVerifier::new(admission.clone(), &provider, refused));
    let (cert, key) = certificate(identity, &proof).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(vec![cert], key)
        .map_err(tls_error)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let client = client_config(identity, &proof, verifier)?;
    Ok((server, client))
}

/// A client configuration presenting `proof` (any proof: tests use it to impersonate a
/// node with a forged credential) and checking servers with `verifier`.
pub fn client_config(
    identity: &Identity,
    proof: &[u8; 32],
    verifier: Arc<PeerVerifier>,
) -> Result<rustls::ClientConfig, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = certificate(identity, proof).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(tls_error)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(client)
}

fn tls_error(error: rustls::Error) -> NetError {
    NetError::Tls(error.to_string())
}

/// The node id in a connection's peer certificate (already checked in the handshake).
pub fn peer_node_id(admission: &Admission, certificates: &[CertificateDer<'_>]) -> Option<NodeId> {
    certificates
        .first()
        .and_then(|der| check_certificate(admission, der).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_node_only_with_a_valid_proof() {
        let admission = Admission::generate([0; 32]).unwrap();
        let me = Identity::generate().unwrap();
        let (cert, _) = certificate(&me, &admission.proof(&me.public_key())).unwrap();
        assert_eq!(check_certificate(&admission, &cert), Ok(me.node_id()));

        let stranger = Admission::generate([0; 32]).unwrap();
        assert_eq!(
            check_certificate(&stranger, &cert),
            Err(Refusal::WrongProof)
        );
        // A proof made for another key does not transfer.
        let other = Identity::generate().unwrap();
        let (stolen, _) = certificate(&me, &admission.proof(&other.public_key())).unwrap();
        assert_eq!(
            check_certificate(&admission, &stolen),
            Err(Refusal::WrongProof)
        );
        assert_eq!(
            check_certificate(&admission, b"garbage"),
            Err(Refusal::Certificate)
        );
    }

    #[test]
    fn server_names_carry_the_node_id() {
        let id = NodeId(0xabc);
        let name = ServerName::try_from(server_name(id)).unwrap();
        assert_eq!(node_of_server_name(&name), Some(id));
    }
}
