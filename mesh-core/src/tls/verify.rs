//! The two certificate verifiers of the HBONE contract and a fixed certificate resolver.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::cert::identity_from_der;
use crate::identity::Identity;

/// Why a peer whose chain verified was still refused because of its SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdentityError {
    /// The leaf has no usable `spiffe://` URI SAN (the reason is the certificate parser's).
    #[error("peer certificate has no usable spiffe identity: {0}")]
    NoIdentity(String),
    /// The peer is in another trust domain than ours.
    #[error("peer identity {peer} is not in our trust domain {expected}")]
    TrustDomain {
        /// The peer's identity.
        peer: Identity,
        /// Our trust domain.
        expected: String,
    },
    /// The peer is not one of the identities we expected at this destination.
    #[error("peer identity {peer} is not one of the expected identities [{}]", list(.expected))]
    Unexpected {
        /// The peer's identity.
        peer: Identity,
        /// What we would have accepted.
        expected: Vec<Identity>,
    },
    /// The caller gave no identity to accept, so no server can be trusted.
    #[error("no expected peer identity was configured for this destination")]
    NoneExpected,
}

fn list(ids: &[Identity]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Wraps our error so rustls carries it to the caller (and we can find it again).
fn reject(err: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Finds our [`PeerIdentityError`] inside a rustls certificate error.
pub(super) fn peer_identity_error(err: &CertificateError) -> Option<PeerIdentityError> {
    let CertificateError::Other(OtherError(inner)) = err else {
        return None;
    };
    inner.downcast_ref::<PeerIdentityError>().cloned()
}

fn peer_id(leaf: &CertificateDer<'_>) -> Result<Identity, rustls::Error> {
    identity_from_der(leaf).map_err(|e| reject(PeerIdentityError::NoIdentity(e.to_string())))
}

/// Server side: WebPKI chain verification, then the same-trust-domain rule.
pub(super) struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainVerifier {
    pub(super) fn new(inner: Arc<dyn ClientCertVerifier>, trust_domain: &str) -> Self {
        Self {
            inner,
            trust_domain: trust_domain.to_string(),
        }
    }
}

impl fmt::Debug for TrustDomainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustDomainVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_id(end_entity)?;
        if peer.trust_domain() != self.trust_domain {
            return Err(reject(PeerIdentityError::TrustDomain {
                peer,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain verification against the bundle (server name ignored), then the peer's
/// SPIFFE identity must be one of the expected ones.
#[derive(Debug)]
pub(super) struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerIdentityVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<Identity>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algs = self.provider.signature_verification_algorithms.all;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algs)?;
        if self.expected.is_empty() {
            return Err(reject(PeerIdentityError::NoneExpected));
        }
        let peer = peer_id(end_entity)?;
        if !self.expected.contains(&peer) {
            return Err(reject(PeerIdentityError::Unexpected {
                peer,
                expected: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Always presents the same certificate, on both the client and the server side.
#[derive(Debug)]
pub(super) struct FixedCert(pub(super) Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
