//! Client for Istio's certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`).
//!
//! For each request the client generates a fresh ECDSA P-256 key and a PKCS#10 CSR whose only SAN is
//! the requested SPIFFE id, sends it over server-authenticated TLS with the caller's bearer token, and
//! checks the answer before anyone can use it: the chain must hold a leaf and a root, the leaf must
//! name exactly the identity asked for, and it must certify the key we generated.
//!
//! [`CertificateProvider`] abstracts "get me a certificate for this identity" so the
//! [`crate::cert_manager::CertificateManager`] can be tested with scripted failures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::cert::{CertError, WorkloadCertificate, parse_pem_certs};
use crate::identity::Identity;

/// The metadata key a trusted node proxy sets to ask for another workload's certificate.
pub const IMPERSONATED_IDENTITY_KEY: &str = "ImpersonatedIdentity";
/// gRPC metadata carrying the bearer token.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// gRPC metadata naming the caller's cluster (Istio sends it on every CA and xDS call).
pub const CLUSTER_ID_HEADER: &str = "clusterid";
/// Istio's default cluster id.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Certificate lifetime asked for when none is configured (Istio's `SECRET_TTL` default).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
// A CA behind a slow network still answers in well under this; a hung call must not stall rotation.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
// Istio's control-plane keepalives: HTTP/2 pings every 30 s (10 s timeout), TCP keepalive 300 s.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(300);

/// Anything that can obtain a certificate for an identity: the real [`CaClient`], or a test double.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Obtains a fresh certificate (with a new key) for `identity`.
    fn fetch_certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>>;
}

/// Where the bearer token for the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthToken {
    /// Send no `authorization` header.
    None,
    /// A literal token.
    Literal(String),
    /// A file holding the token, re-read on every request because projected tokens rotate.
    File(PathBuf),
}

/// Settings of a [`CaClient`].
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// The CA URL, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM of the root(s) that the CA's serving certificate must chain to.
    pub root_cert_pem: String,
    /// TLS server name to verify instead of the URL host (Istio's `ALT_CA_HOSTNAME`).
    pub tls_server_name: Option<String>,
    /// The caller's credential.
    pub token: AuthToken,
    /// Sent as the `clusterid` metadata.
    pub cluster_id: String,
    /// Requested certificate lifetime (`validity_duration`).
    pub cert_ttl: Duration,
    /// Set `ImpersonatedIdentity` to the requested identity (a node proxy asking on behalf of pods).
    pub impersonate: bool,
    /// Deadline of one CA call, connection included.
    pub request_timeout: Duration,
    /// Deadline of the TCP + TLS connect.
    pub connect_timeout: Duration,
}

impl CaClientConfig {
    /// A config with Istio's defaults for everything but the address and trust root.
    pub fn new(address: impl Into<String>, root_cert_pem: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            root_cert_pem: root_cert_pem.into(),
            tls_server_name: None,
            token: AuthToken::None,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            cert_ttl: DEFAULT_CERT_TTL,
            impersonate: false,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// Why a certificate could not be obtained from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    /// The configured address is not a usable `https://` URL.
    #[error("invalid ca address {address:?}: {reason}")]
    Address {
        /// The rejected address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured CA root PEM holds no usable certificate.
    #[error("invalid ca root certificate: {0}")]
    RootCert(#[source] CertError),
    /// The TLS settings could not be applied to the channel.
    #[error("cannot configure tls to the ca: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The token file could not be read.
    #[error("cannot read ca auth token file {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The token (or cluster id) cannot be sent as gRPC metadata.
    #[error("{0} is not a valid grpc metadata value")]
    Metadata(&'static str),
    /// Key or CSR generation failed.
    #[error("cannot create a certificate signing request for {identity}: {source}")]
    Csr {
        /// The identity asked for.
        identity: Box<Identity>,
        /// The generator's error.
        source: rcgen::Error,
    },
    /// The CA call failed (transport error or an error status from the CA).
    #[error("ca request for {identity} failed: {code:?}: {message}")]
    Rpc {
        /// The identity asked for.
        identity: Box<Identity>,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The CA answered with a chain that cannot be used.
    #[error("ca response for {identity} is invalid: {source}")]
    Response {
        /// The identity asked for.
        identity: Box<Identity>,
        /// What is wrong with the chain.
        source: CertError,
    },
    /// The CA signed another identity than the one asked for.
    #[error("ca issued a certificate for {actual}, but {expected} was requested")]
    WrongIdentity {
        /// The identity asked for.
        expected: Box<Identity>,
        /// The identity in the returned leaf.
        actual: Box<Identity>,
    },
    /// The returned leaf does not certify the key this client generated.
    #[error("ca returned a certificate for {identity} whose public key is not the one in our csr")]
    KeyMismatch {
        /// The identity asked for.
        identity: Box<Identity>,
    },
}

/// A freshly generated key and the PEM CSR that proves possession of it.
pub struct Csr {
    /// The PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
    /// The PEM PKCS#8 private key.
    pub key_pem: String,
    // Raw public key bytes, to check the returned leaf certifies this key.
    public_key: Vec<u8>,
}

impl std::fmt::Debug for Csr {
    // Never print the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Csr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Generates a P-256 key and a CSR with an empty subject and one URI SAN: `identity`.
    pub fn generate(identity: &Identity) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // The CA decides the subject; Istio's CSRs carry none.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            csr_pem: csr.pem()?,
            key_pem: key.serialize_pem(),
            public_key: key.public_key_raw().to_vec(),
        })
    }

    /// Checks a CA response (`[leaf, intermediates…, roots]`) against this CSR and `identity`.
    pub fn accept_response(
        &self,
        identity: &Identity,
        chain: &[String],
    ) -> Result<WorkloadCertificate, CaClientError> {
        let invalid = |source| CaClientError::Response {
            identity: Box::new(identity.clone()),
            source,
        };
        if chain.len() < 2 {
            return Err(invalid(CertError::Chain(
                "the ca must return at least a leaf and a root",
            )));
        }
        let cert = WorkloadCertificate::from_pem_chain(chain, &self.key_pem).map_err(invalid)?;
        if cert.identity() != identity {
            return Err(CaClientError::WrongIdentity {
                expected: Box::new(identity.clone()),
                actual: Box::new(cert.identity().clone()),
            });
        }
        let (_, leaf) = X509Certificate::from_der(&cert.chain()[0])
            .map_err(|e| invalid(CertError::X509(e.to_string())))?;
        if leaf.public_key().subject_public_key.data.as_ref() != self.public_key.as_slice() {
            return Err(CaClientError::KeyMismatch {
                identity: Box::new(identity.clone()),
            });
        }
        Ok(cert)
    }
}

/// A gRPC client of the CA over server-authenticated TLS.
#[derive(Debug, Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: AuthToken,
    cluster_id: MetadataValue<tonic::metadata::Ascii>,
    cert_ttl: Duration,
    impersonate: bool,
}

impl CaClient {
    /// Builds the client. The connection is made lazily (and re-made after failures) on first use, so
    /// a CA that is down at startup does not fail construction.
    pub fn new(config: CaClientConfig) -> Result<Self, CaClientError> {
        let endpoint = endpoint(&config)?;
        let cluster_id = MetadataValue::try_from(config.cluster_id.as_str())
            .map_err(|_| CaClientError::Metadata("cluster id"))?;
        Ok(Self {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            token: config.token,
            cluster_id,
            cert_ttl: config.cert_ttl,
            impersonate: config.impersonate,
        })
    }

    /// Generates a key and CSR for `identity`, asks the CA to sign it and validates the answer.
    pub async fn create_certificate(
        &self,
        identity: &Identity,
    ) -> Result<WorkloadCertificate, CaClientError> {
        let csr = Csr::generate(identity).map_err(|source| CaClientError::Csr {
            identity: Box::new(identity.clone()),
            source,
        })?;
        let request = self.request(identity, &csr).await?;
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| CaClientError::Rpc {
                identity: Box::new(identity.clone()),
                code: status.code(),
                message: status.message().to_string(),
            })?;
        let cert = csr.accept_response(identity, &response.into_inner().cert_chain)?;
        tracing::debug!(%identity, not_after = ?cert.not_after(), "certificate issued by ca");
        Ok(cert)
    }

    async fn request(
        &self,
        identity: &Identity,
        csr: &Csr,
    ) -> Result<tonic::Request<IstioCertificateRequest>, CaClientError> {
        let metadata = self.impersonate.then(|| impersonation_metadata(identity));
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: csr.csr_pem.clone(),
            validity_duration: i64::try_from(self.cert_ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        let headers = request.metadata_mut();
        if let Some(token) = read_token(&self.token).await? {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| CaClientError::Metadata("auth token"))?;
            headers.insert(AUTHORIZATION_HEADER, value);
        }
        headers.insert(CLUSTER_ID_HEADER, self.cluster_id.clone());
        Ok(request)
    }
}

impl CertificateProvider for CaClient {
    fn fetch_certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>> {
        Box::pin(self.create_certificate(identity))
    }
}

/// `{"ImpersonatedIdentity": "<spiffe id>"}` as a protobuf Struct.
pub fn impersonation_metadata(identity: &Identity) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
    };
    prost_types::Struct {
        fields: BTreeMap::from([(IMPERSONATED_IDENTITY_KEY.to_string(), value)]),
    }
}

fn endpoint(config: &CaClientConfig) -> Result<Endpoint, CaClientError> {
    let bad_address = |reason: String| CaClientError::Address {
        address: config.address.clone(),
        reason,
    };
    let uri: http::Uri = config
        .address
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad_address(e.to_string()))?;
    // The CA hands out keys' certificates: never talk to it in plaintext.
    if uri.scheme_str() != Some("https") {
        return Err(bad_address("the scheme must be https".to_string()));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad_address("it has no host".to_string()))?;
    let server_name = config.tls_server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    // Fail now on an unusable root rather than with an opaque handshake error later.
    parse_pem_certs("ca root certificate", &config.root_cert_pem)
        .map_err(CaClientError::RootCert)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.root_cert_pem))
        .domain_name(server_name);
    Ok(Endpoint::from(uri)
        .tls_config(tls)
        .map_err(CaClientError::Tls)?
        .timeout(config.request_timeout)
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .tcp_keepalive(Some(TCP_KEEPALIVE)))
}

async fn read_token(token: &AuthToken) -> Result<Option<String>, CaClientError> {
    match token {
        AuthToken::None => Ok(None),
        AuthToken::Literal(token) => Ok(Some(token.clone())),
        AuthToken::File(path) => {
            let text = tokio::fs::read_to_string(path).await.map_err(|source| {
                CaClientError::TokenFile {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(Some(text.trim().to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use mesh_proto::ca::IstioCertificateResponse;
    use mesh_proto::ca::istio_certificate_service_server::{
        IstioCertificateService, IstioCertificateServiceServer,
    };
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyUsagePurpose,
    };
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Server, ServerTlsConfig};
    use x509_parser::prelude::{GeneralName, X509CertificationRequest};

    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    /// A tiny CA that signs CSRs with whatever SAN the test wants.
    struct MiniCa {
        issuer: Issuer<'static, KeyPair>,
        root_pem: String,
    }

    impl MiniCa {
        fn new() -> Self {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let root = params.self_signed(&key).unwrap();
            Self {
                issuer: Issuer::new(params, key),
                root_pem: root.pem(),
            }
        }

        fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = sans;
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(1);
            params.not_after = now + time::Duration::hours(1);
            params
        }

        /// Signs the CSR's key for `san` (or a foreign key when `foreign_key`).
        fn sign(&self, csr_pem: &str, san: &str, foreign_key: bool) -> Vec<String> {
            let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
            let params = Self::leaf_params(vec![SanType::URI(san.try_into().unwrap())]);
            let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let leaf = if foreign_key {
                params.signed_by(&other, &self.issuer).unwrap()
            } else {
                params.signed_by(&csr.public_key, &self.issuer).unwrap()
            };
            vec![leaf.pem(), self.root_pem.clone()]
        }

        /// A serving certificate and key for `localhost`.
        fn serving(&self) -> (String, String) {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let params = Self::leaf_params(vec![SanType::DnsName("localhost".try_into().unwrap())]);
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Behaviour {
        Honest,
        WrongIdentity,
        ForeignKey,
        Deny,
    }

    #[derive(Debug, Clone)]
    struct Seen {
        authorization: Option<String>,
        cluster_id: Option<String>,
        request: IstioCertificateRequest,
    }

    struct MockCa {
        ca: Arc<MiniCa>,
        behaviour: Behaviour,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    #[tonic::async_trait]
    impl IstioCertificateService for MockCa {
        async fn create_certificate(
            &self,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
            let header = |k| {
                request
                    .metadata()
                    .get(k)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            let seen = Seen {
                authorization: header(AUTHORIZATION_HEADER),
                cluster_id: header(CLUSTER_ID_HEADER),
                request: request.get_ref().clone(),
            };
            self.seen.lock().unwrap().push(seen);
            let csr = &request.get_ref().csr;
            let requested = csr_uri(csr);
            let chain = match self.behaviour {
                Behaviour::Deny => return Err(tonic::Status::permission_denied("nope")),
                Behaviour::Honest => self.ca.sign(csr, &requested, false),
                Behaviour::ForeignKey => self.ca.sign(csr, &requested, true),
                Behaviour::WrongIdentity => {
                    self.ca
                        .sign(csr, "spiffe://cluster.local/ns/evil/sa/x", false)
                }
            };
            Ok(tonic::Response::new(IstioCertificateResponse {
                cert_chain: chain,
            }))
        }
    }

    fn csr_uri(csr_pem: &str) -> String {
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        let uris: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .flat_map(|ext| match ext {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => san
                    .general_names
                    .iter()
                    .map(|n| match n {
                        GeneralName::URI(u) => u.to_string(),
                        other => panic!("unexpected san {other:?}"),
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(uris.len(), 1, "csr must carry exactly one uri san");
        uris[0].clone()
    }

    use rustls_pki_types::pem::PemObject;

    struct Harness {
        addr: std::net::SocketAddr,
        root_pem: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        _server: tokio::task::JoinHandle<()>,
    }

    async fn start(behaviour: Behaviour) -> Harness {
        let ca = Arc::new(MiniCa::new());
        let (cert, key) = ca.serving();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let service = MockCa {
            ca: ca.clone(),
            behaviour,
            seen: seen.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
        let server = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming(TcpIncoming::from(listener));
        let server = tokio::spawn(async move { server.await.unwrap() });
        Harness {
            addr,
            root_pem: ca.root_pem.clone(),
            seen,
            _server: server,
        }
    }

    fn client_config(h: &Harness) -> CaClientConfig {
        let mut config =
            CaClientConfig::new(format!("https://localhost:{}", h.addr.port()), &h.root_pem);
        config.token = AuthToken::Literal("tok-123".into());
        config.cluster_id = "c1".into();
        config.cert_ttl = Duration::from_secs(3600);
        config
    }

    #[test]
    fn csr_has_one_uri_san_empty_subject_and_p256_key() {
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let csr = Csr::generate(&me).unwrap();
        assert_eq!(csr_uri(&csr.csr_pem), me.to_string());
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr.csr_pem.as_bytes())
                .unwrap();
        let (_, parsed) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        parsed.verify_signature().unwrap();
        let info = &parsed.certification_request_info;
        assert_eq!(info.subject.iter_attributes().count(), 0);
        let curve = info.subject_pki.algorithm.parameters.as_ref().unwrap();
        assert_eq!(
            curve.as_oid().unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        assert!(!format!("{csr:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn accept_response_checks_chain_identity_and_key() {
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let ca = MiniCa::new();
        let csr = Csr::generate(&me).unwrap();

        let good = ca.sign(&csr.csr_pem, &me.to_string(), false);
        assert_eq!(csr.accept_response(&me, &good).unwrap().identity(), &me);

        let err = csr.accept_response(&me, &good[..1]).unwrap_err();
        assert!(
            err.to_string().contains("at least a leaf and a root"),
            "{err}"
        );

        let other = ca.sign(&csr.csr_pem, "spiffe://cluster.local/ns/a/sa/c", false);
        let err = csr.accept_response(&me, &other).unwrap_err();
        assert!(matches!(err, CaClientError::WrongIdentity { .. }), "{err}");

        let foreign = ca.sign(&csr.csr_pem, &me.to_string(), true);
        let err = csr.accept_response(&me, &foreign).unwrap_err();
        assert!(matches!(err, CaClientError::KeyMismatch { .. }), "{err}");

        let junk = vec!["junk".to_string(), ca.root_pem.clone()];
        let err = csr.accept_response(&me, &junk).unwrap_err();
        assert!(matches!(err, CaClientError::Response { .. }), "{err}");
    }

    #[tokio::test]
    async fn fetches_over_tls_with_token_cluster_id_and_ttl() {
        let h = start(Behaviour::Honest).await;
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let client = CaClient::new(client_config(&h)).unwrap();
        let cert = client.fetch_certificate(&me).await.unwrap();
        assert_eq!(cert.identity(), &me);
        assert_eq!(cert.roots().len(), 1);

        let seen = h.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer tok-123"));
        assert_eq!(seen[0].cluster_id.as_deref(), Some("c1"));
        assert_eq!(seen[0].request.validity_duration, 3600);
        assert_eq!(seen[0].request.metadata, None);
    }

    #[tokio::test]
    async fn impersonation_sets_metadata_and_token_file_is_reread() {
        let h = start(Behaviour::Honest).await;
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "first\n").unwrap();
        let mut config = client_config(&h);
        config.impersonate = true;
        config.token = AuthToken::File(token_path.clone());
        let client = CaClient::new(config).unwrap();
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        client.fetch_certificate(&me).await.unwrap();
        std::fs::write(&token_path, "second").unwrap();
        client.fetch_certificate(&me).await.unwrap();

        let seen = h.seen.lock().unwrap().clone();
        assert_eq!(seen[0].authorization.as_deref(), Some("Bearer first"));
        assert_eq!(seen[1].authorization.as_deref(), Some("Bearer second"));
        assert_eq!(seen[0].request.metadata, Some(impersonation_metadata(&me)));

        std::fs::remove_file(&token_path).unwrap();
        let err = client.fetch_certificate(&me).await.unwrap_err();
        assert!(matches!(err, CaClientError::TokenFile { .. }), "{err}");
        assert_eq!(
            h.seen.lock().unwrap().len(),
            2,
            "no request without a token"
        );
    }

    #[tokio::test]
    async fn rejects_response_for_wrong_identity_or_foreign_key() {
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let h = start(Behaviour::WrongIdentity).await;
        let err = CaClient::new(client_config(&h))
            .unwrap()
            .fetch_certificate(&me)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "ca issued a certificate for spiffe://cluster.local/ns/evil/sa/x, but \
                 spiffe://cluster.local/ns/a/sa/b was requested"
            ),
            "{err}"
        );
        let h = start(Behaviour::ForeignKey).await;
        let err = CaClient::new(client_config(&h))
            .unwrap()
            .fetch_certificate(&me)
            .await
            .unwrap_err();
        assert!(matches!(err, CaClientError::KeyMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn maps_ca_errors_and_untrusted_servers() {
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let h = start(Behaviour::Deny).await;
        let err = CaClient::new(client_config(&h))
            .unwrap()
            .fetch_certificate(&me)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                CaClientError::Rpc {
                    code: tonic::Code::PermissionDenied,
                    ..
                }
            ),
            "{err}"
        );
        // A server whose certificate does not chain to our root must be refused.
        let mut config = client_config(&h);
        config.root_cert_pem = MiniCa::new().root_pem;
        let err = CaClient::new(config)
            .unwrap()
            .fetch_certificate(&me)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                CaClientError::Rpc {
                    code: tonic::Code::Unavailable,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            h.seen.lock().unwrap().len() == 1,
            "untrusted server got a request"
        );
    }

    #[test]
    fn rejects_bad_config() {
        let root = MiniCa::new().root_pem;
        let cases: &[(&str, &str, &str)] = &[
            ("http://localhost:15012", &root, "the scheme must be https"),
            ("not a url", &root, "invalid ca address"),
            (
                "https://localhost:15012",
                "not pem",
                "invalid ca root certificate",
            ),
        ];
        for (address, root, want) in cases {
            let err = CaClient::new(CaClientConfig::new(*address, *root)).unwrap_err();
            assert!(err.to_string().contains(want), "{address}: {err}");
        }
        let mut config = CaClientConfig::new("https://localhost:1", root);
        config.cluster_id = "bad\nvalue".into();
        let err = CaClient::new(config).unwrap_err();
        assert!(err.to_string().contains("cluster id"), "{err}");
    }
}
