//! Mutual TLS for HBONE, following the Istio ambient contract exactly.
//!
//! * TLS 1.3 only, cipher suites `TLS13_AES_256_GCM_SHA384` and `TLS13_AES_128_GCM_SHA256` (no
//!   ChaCha20), key exchange X25519, secp256r1 and X25519MLKEM768 ([`provider`]).
//! * ALPN is exactly `["h2"]` on both sides.
//! * The server requires a client certificate, verifies its chain against the [`TrustBundle`] and
//!   then requires the client's SPIFFE identity to be in the server's own trust domain. Which
//!   workload the client is, is left to authorization.
//! * The client sends no SNI, never resumes sessions, presents leaf + intermediates, verifies the
//!   server chain against the bundle (ignoring the server name) and requires the server's SPIFFE
//!   identity to be one of an expected set.
//!
//! [`WorkloadTls`] turns a [`WorkloadCertificate`] into ready-to-use configs once, so that new
//! connections only pay for the handshake.

mod verify;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};

use crate::cert::{WorkloadCertificate, identity_from_der};
use crate::identity::Identity;

pub use verify::PeerIdentityError;

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The trust bundle has no root certificate.
    #[error("trust bundle is empty: at least one root certificate is required")]
    EmptyBundle,
    /// A root certificate could not be used as a trust anchor.
    #[error("invalid root certificate in trust bundle: {0}")]
    BadRoot(rustls::Error),
    /// The private key could not be loaded or does not match the leaf.
    #[error("cannot load the private key of {identity}: {source}")]
    Key {
        /// Whose key it is.
        identity: Box<Identity>,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// rustls refused the configuration (should not happen with our fixed provider).
    #[error("cannot build tls config: {0}")]
    Config(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("cannot build client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a TLS handshake failed, with the cause made readable.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's chain verified but its SPIFFE identity was not acceptable.
    #[error("peer identity rejected: {0}")]
    Identity(#[source] Box<PeerIdentityError>),
    /// The peer's certificate was rejected (untrusted, expired, missing, malformed).
    #[error("peer certificate rejected: {0}")]
    Certificate(String),
    /// The peer aborted the handshake with an alert (it rejected us, or we are incompatible).
    #[error("peer aborted the tls handshake with alert {0:?}")]
    Alert(AlertDescription),
    /// Any other TLS or I/O failure during the handshake.
    #[error("tls handshake failed: {0}")]
    Other(#[source] io::Error),
}

/// The crypto provider every HBONE config uses: aws-lc-rs restricted to the HBONE suites and groups.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = aws_lc_rs::default_provider();
            // Both suites of the HBONE contract; AES-128-GCM first. Upstream ztunnel lists AES-256
            // first, but either is accepted by every peer, and AES-128 with SHA-256 (hardware
            // SHA-NI for the handshake's HKDF, fewer AES rounds for the bulk) measured faster
            // here in hbone-bench for both throughput and new connections per second.
            p.cipher_suites = vec![
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            // X25519 first: the client sends a key share only for the first group, and the hybrid
            // share is ~1.2 KB larger and slower. A PQC-only peer still gets X25519MLKEM768 via a
            // HelloRetryRequest.
            p.kx_groups = vec![
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::X25519MLKEM768,
            ];
            Arc::new(p)
        })
        .clone()
}

/// The server name HBONE clients hand to rustls. It is never sent (no SNI) nor checked.
pub fn dummy_server_name() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into())
}

/// The set of trusted roots. Holds several roots during a root rotation, so peers signed by
/// either the old or the new root verify.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    store: Arc<RootCertStore>,
    roots: Arc<[CertificateDer<'static>]>,
}

impl TrustBundle {
    /// Builds a bundle from DER roots (duplicates are dropped). Fails if empty or a root is invalid.
    pub fn new(roots: impl IntoIterator<Item = CertificateDer<'static>>) -> Result<Self, TlsError> {
        let mut unique: Vec<CertificateDer<'static>> = Vec::new();
        for root in roots {
            if !unique.contains(&root) {
                unique.push(root);
            }
        }
        if unique.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let mut store = RootCertStore::empty();
        for root in &unique {
            store.add(root.clone()).map_err(TlsError::BadRoot)?;
        }
        Ok(Self {
            store: Arc::new(store),
            roots: unique.into(),
        })
    }

    /// The roots that came with a workload certificate.
    pub fn from_certificate(cert: &WorkloadCertificate) -> Result<Self, TlsError> {
        Self::new(cert.roots().iter().cloned())
    }

    /// A bundle trusting the roots of both `self` and `other` (for root rotation).
    pub fn merge(&self, other: &TrustBundle) -> Result<Self, TlsError> {
        Self::new(self.roots.iter().chain(other.roots.iter()).cloned())
    }

    /// The roots, in DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    fn store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }
}

/// A workload's certificate and trust bundle turned into HBONE TLS configs.
///
/// The key is parsed and the server config built once, here; client configs (which embed the
/// expected peer identities) are cheap to build per destination.
#[derive(Debug)]
pub struct WorkloadTls {
    identity: Identity,
    key: Arc<CertifiedKey>,
    bundle: TrustBundle,
    server: Arc<ServerConfig>,
}

impl WorkloadTls {
    /// Prepares `cert` for TLS, trusting the roots in `bundle`.
    pub fn new(cert: &WorkloadCertificate, bundle: TrustBundle) -> Result<Self, TlsError> {
        let identity = cert.identity().clone();
        let key = CertifiedKey::from_der(cert.chain().to_vec(), cert.private_key(), &provider())
            .map_err(|source| TlsError::Key {
                identity: Box::new(identity.clone()),
                source,
            })?;
        let key = Arc::new(key);
        let server = Arc::new(server_config(
            key.clone(),
            &bundle,
            identity.trust_domain(),
        )?);
        Ok(Self {
            identity,
            key,
            bundle,
            server,
        })
    }

    /// Prepares `cert` for TLS, trusting the roots that came with it.
    pub fn from_certificate(cert: &WorkloadCertificate) -> Result<Self, TlsError> {
        Self::new(cert, TrustBundle::from_certificate(cert)?)
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The trusted roots.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The HBONE server config: client certificate required, same trust domain as ours.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// An HBONE client config that accepts a server presenting one of `expected` identities.
    pub fn client_config(&self, expected: Vec<Identity>) -> Result<Arc<ClientConfig>, TlsError> {
        let resolver = Arc::new(verify::FixedCert(self.key.clone()));
        let builder = client_builder(&self.bundle, expected)?;
        let config = finish_client_config(builder.with_client_cert_resolver(resolver));
        Ok(Arc::new(config))
    }
}

type ClientBuilder = rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>;

fn client_builder(
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<ClientBuilder, TlsError> {
    let verifier = Arc::new(verify::ServerIdentityVerifier::new(
        bundle.store(),
        expected,
        provider(),
    ));
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn finish_client_config(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config
}

fn server_config(
    key: Arc<CertifiedKey>,
    bundle: &TrustBundle,
    trust_domain: &str,
) -> Result<ServerConfig, TlsError> {
    // Root hints are dropped: HBONE clients always present their one certificate, and the hints
    // would only make every CertificateRequest larger.
    let webpki = WebPkiClientVerifier::builder_with_provider(bundle.store(), provider())
        .clear_root_hint_subjects()
        .build()?;
    let verifier = Arc::new(verify::TrustDomainVerifier::new(webpki, trust_domain));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(verify::FixedCert(key)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE clients never resume, so tickets would be wasted work and bytes on every handshake.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// The identity in the peer's first `spiffe://` URI SAN, once the handshake has completed.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    identity_from_der(leaf).ok()
}

/// Turns the `io::Error` a tokio-rustls handshake returned into a readable [`HandshakeError`].
pub fn classify_handshake_error(err: io::Error) -> HandshakeError {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return HandshakeError::Other(err);
    };
    match tls {
        rustls::Error::InvalidCertificate(cert_err) => {
            match verify::peer_identity_error(cert_err) {
                Some(identity) => HandshakeError::Identity(Box::new(identity)),
                None => HandshakeError::Certificate(describe_certificate_error(cert_err)),
            }
        }
        rustls::Error::NoCertificatesPresented => HandshakeError::Certificate(
            "the peer presented no certificate, but a client certificate is required".into(),
        ),
        rustls::Error::AlertReceived(alert) => HandshakeError::Alert(*alert),
        _ => HandshakeError::Other(err),
    }
}

fn describe_certificate_error(err: &CertificateError) -> String {
    match err {
        CertificateError::UnknownIssuer => {
            "the certificate chain does not lead to a trusted root".into()
        }
        CertificateError::BadSignature => "a certificate in the chain has a bad signature".into(),
        CertificateError::Expired => "the certificate has expired".into(),
        CertificateError::NotValidYet => "the certificate is not valid yet".into(),
        CertificateError::BadEncoding => "the certificate is malformed".into(),
        CertificateError::Revoked => "the certificate is revoked".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
