//! The gRPC `istio.v1.auth.IstioCertificateService`.
//!
//! Per request: authenticate the caller, decide the identity to certify (the caller's own, or an
//! `ImpersonatedIdentity` that a trusted node agent may ask for when such a pod runs on its node),
//! check the requested lifetime, verify the CSR, sign. The CSR's own subject and SANs are ignored.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::Identity;
use mesh_core::ca_client::IMPERSONATED_IDENTITY_KEY;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use super::authority::{CertificateAuthority, SignError};
use super::csr::{CsrError, parse_csr};
use crate::auth::{AuthError, Authenticator, Caller, Credentials, LocalityError, NodeLocality};
use crate::metrics::{CaMetrics, RejectReason};

// Istio's other metadata key selects an external signer, which this CA does not have.
const CERT_SIGNER_KEY: &str = "CertSigner";

/// Which identities and lifetimes the CA grants.
#[derive(Debug, Clone)]
pub struct SigningPolicy {
    /// Trust domain of every identity signed.
    pub trust_domain: String,
    /// `(namespace, service account)` of node agents allowed to impersonate.
    pub trusted_node_accounts: Vec<(String, String)>,
    /// Lifetime for requests asking for zero or less.
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for.
    pub max_ttl: Duration,
}

impl SigningPolicy {
    /// The lifetime to grant for a requested `validity_duration` (seconds).
    pub fn ttl(&self, requested_secs: i64) -> Result<Duration, CaError> {
        if requested_secs <= 0 {
            return Ok(self.default_ttl);
        }
        let requested = Duration::from_secs(requested_secs.unsigned_abs());
        // Istio rejects (does not clamp) an over-long request, so the caller learns its config is wrong.
        if requested > self.max_ttl {
            return Err(CaError::Ttl(format!(
                "requested validity of {requested_secs}s exceeds the maximum of {}s",
                self.max_ttl.as_secs()
            )));
        }
        Ok(requested)
    }

    fn is_trusted_node_agent(&self, caller: &Identity) -> bool {
        self.trusted_node_accounts
            .iter()
            .any(|(ns, sa)| caller.namespace() == ns && caller.service_account() == sa)
    }
}

/// Why a request was refused; maps to a gRPC status and a metrics reason.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The caller could not be authenticated.
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
    /// The request metadata is malformed.
    #[error("invalid request metadata: {0}")]
    Metadata(String),
    /// The caller may not have a certificate for the identity asked for.
    #[error("{0}")]
    Denied(String),
    /// The requested lifetime is out of range.
    #[error("invalid validity_duration: {0}")]
    Ttl(String),
    /// The CSR is unusable.
    #[error("invalid csr: {0}")]
    Csr(#[from] CsrError),
    /// Pod placement could not be checked.
    #[error(transparent)]
    Locality(#[from] LocalityError),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] SignError),
}

impl CaError {
    /// The metrics reason.
    pub fn reason(&self) -> RejectReason {
        match self {
            Self::Auth(AuthError::Backend(_)) | Self::Locality(_) => {
                RejectReason::BackendUnavailable
            }
            Self::Auth(_) => RejectReason::Unauthenticated,
            Self::Metadata(_) => RejectReason::InvalidMetadata,
            Self::Denied(_) => RejectReason::PermissionDenied,
            Self::Ttl(_) => RejectReason::InvalidTtl,
            Self::Csr(_) => RejectReason::InvalidCsr,
            Self::Sign(_) => RejectReason::SigningFailed,
        }
    }

    /// The status returned to the caller.
    pub fn to_status(&self) -> Status {
        match self {
            // Say nothing about why: the detail helps attackers probe tokens. It is logged instead.
            Self::Auth(AuthError::Backend(_)) => Status::unavailable("authentication unavailable"),
            Self::Auth(_) => Status::unauthenticated("request authentication failed"),
            Self::Locality(_) => Status::unavailable("workload placement lookup unavailable"),
            Self::Metadata(_) | Self::Ttl(_) | Self::Csr(_) => {
                Status::invalid_argument(self.to_string())
            }
            Self::Denied(_) => Status::permission_denied(self.to_string()),
            Self::Sign(_) => Status::internal("certificate signing failed"),
        }
    }
}

/// The certificate service.
pub struct CaService {
    authority: Arc<CertificateAuthority>,
    authenticator: Arc<dyn Authenticator>,
    locality: Arc<dyn NodeLocality>,
    policy: SigningPolicy,
    metrics: CaMetrics,
}

impl CaService {
    /// Assembles the service.
    pub fn new(
        authority: Arc<CertificateAuthority>,
        authenticator: Arc<dyn Authenticator>,
        locality: Arc<dyn NodeLocality>,
        policy: SigningPolicy,
        metrics: CaMetrics,
    ) -> Self {
        Self {
            authority,
            authenticator,
            locality,
            policy,
            metrics,
        }
    }

    /// Handles one request, returning `[leaf, intermediates…, roots]`.
    pub async fn handle(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<(Identity, Vec<String>), CaError> {
        let credentials = Credentials::from_metadata(request.metadata())?;
        let caller = self.authenticator.authenticate(&credentials).await?;
        let request = request.into_inner();
        let identity = self.decide_identity(&caller, &request).await?;
        let ttl = self.policy.ttl(request.validity_duration)?;
        let key = parse_csr(&request.csr)?;
        let chain = self.authority.sign_workload(&key, &identity, ttl)?;
        tracing::info!(caller = %caller.identity, %identity, ttl_secs = ttl.as_secs(), "certificate issued");
        Ok((identity, chain))
    }

    async fn decide_identity(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<Identity, CaError> {
        let Some(target) = impersonated_identity(request)? else {
            return Ok(caller.identity.clone());
        };
        if !self.policy.is_trusted_node_agent(&caller.identity) {
            return Err(CaError::Denied(format!(
                "{} is not a trusted node agent and may not impersonate {target}",
                caller.identity
            )));
        }
        if target.trust_domain() != self.policy.trust_domain {
            return Err(CaError::Denied(format!(
                "{target} is outside the trust domain {:?} of this ca",
                self.policy.trust_domain
            )));
        }
        let node = caller.node.as_deref().ok_or_else(|| {
            CaError::Denied(format!(
                "{} has no known node, so it may not impersonate {target}",
                caller.identity
            ))
        })?;
        let (ns, sa) = (target.namespace(), target.service_account());
        if !self.locality.has_workload_on_node(ns, sa, node).await? {
            return Err(CaError::Denied(format!(
                "no pod running as {target} is on node {node:?} of {}",
                caller.identity
            )));
        }
        Ok(target)
    }
}

/// Reads `ImpersonatedIdentity` from the request's metadata Struct.
fn impersonated_identity(request: &IstioCertificateRequest) -> Result<Option<Identity>, CaError> {
    let Some(metadata) = &request.metadata else {
        return Ok(None);
    };
    if metadata.fields.contains_key(CERT_SIGNER_KEY) {
        return Err(CaError::Metadata(format!(
            "{CERT_SIGNER_KEY} is not supported: this ca has a single signer"
        )));
    }
    let Some(value) = metadata.fields.get(IMPERSONATED_IDENTITY_KEY) else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => s.parse().map(Some).map_err(|e| {
            CaError::Metadata(format!(
                "{IMPERSONATED_IDENTITY_KEY} is not a valid identity: {e}"
            ))
        }),
        _ => Err(CaError::Metadata(format!(
            "{IMPERSONATED_IDENTITY_KEY} must be a string"
        ))),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        match self.handle(request).await {
            Ok((_, cert_chain)) => {
                self.metrics.issued();
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(error) => {
                let reason = error.reason();
                self.metrics.rejected(reason);
                tracing::warn!(?peer, reason = reason.as_str(), %error, "certificate request rejected");
                Err(error.to_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures::future::BoxFuture;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use rcgen::{
        CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, SanType,
    };
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tonic::Code;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    use super::*;
    use crate::auth::token_file::StaticTokens;
    use crate::ca::store::init_self_signed;

    const TOKENS: &str = r#"
tokens:
  "ztunnel-a-000000000": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
  "ztunnel-nonode-0000": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel" }
  "cart-0000000000000": { identity: "spiffe://cluster.local/ns/shop/sa/cart", node: node-a }
workloads:
  - { identity: "spiffe://cluster.local/ns/shop/sa/web", node: node-a }
  - { identity: "spiffe://cluster.local/ns/shop/sa/db", node: node-b }
"#;
    const MAX_TTL: Duration = Duration::from_secs(48 * 3600);

    struct Fixture {
        service: CaService,
        snapshotter: Snapshotter,
        _dir: tempfile::TempDir,
    }

    fn fixture_with(locality: Option<Arc<dyn NodeLocality>>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let material = init_self_signed(
            dir.path(),
            "cluster.local",
            Duration::from_secs(86400 * 365),
        )
        .unwrap();
        let tokens = StaticTokens::from_yaml(TOKENS, "cluster.local").unwrap();
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let metrics = metrics::with_local_recorder(&recorder, CaMetrics::new);
        let policy = SigningPolicy {
            trust_domain: "cluster.local".into(),
            trusted_node_accounts: vec![("istio-system".into(), "ztunnel".into())],
            default_ttl: Duration::from_secs(86400),
            max_ttl: MAX_TTL,
        };
        let service = CaService::new(
            Arc::new(CertificateAuthority::new(material).unwrap()),
            Arc::new(tokens.authenticator("Kubernetes")),
            locality.unwrap_or_else(|| Arc::new(tokens.node_locality())),
            policy,
            metrics,
        );
        Fixture {
            service,
            snapshotter,
            _dir: dir,
        }
    }

    fn fixture() -> Fixture {
        fixture_with(None)
    }

    impl Fixture {
        async fn call(
            &self,
            request: Request<IstioCertificateRequest>,
        ) -> Result<Vec<String>, Status> {
            self.service
                .create_certificate(request)
                .await
                .map(|r| r.into_inner().cert_chain)
        }

        fn counter(&self, name: &str, reason: Option<&str>) -> u64 {
            self.snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .find_map(|(key, _, _, value)| {
                    let key = key.key();
                    let labels: Vec<_> = key.labels().map(|l| l.value().to_string()).collect();
                    let matches =
                        key.name() == name && labels.first().map(String::as_str) == reason;
                    match value {
                        DebugValue::Counter(n) if matches => Some(n),
                        _ => None,
                    }
                })
                .unwrap_or(0)
        }
    }

    fn csr_for(alg: &'static rcgen::SignatureAlgorithm, sans: Vec<SanType>) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn csr() -> String {
        csr_for(&PKCS_ECDSA_P256_SHA256, Vec::new())
    }

    struct Req {
        token: Option<&'static str>,
        cluster: Option<&'static str>,
        csr: String,
        ttl: i64,
        metadata: Option<prost_types::Struct>,
    }

    impl Req {
        fn new(token: &'static str) -> Self {
            Self {
                token: Some(token),
                cluster: Some("Kubernetes"),
                csr: csr(),
                ttl: 3600,
                metadata: None,
            }
        }

        fn impersonate(mut self, id: &str) -> Self {
            self.metadata = Some(struct_of(
                IMPERSONATED_IDENTITY_KEY,
                Kind::StringValue(id.into()),
            ));
            self
        }

        fn build(self) -> Request<IstioCertificateRequest> {
            let mut request = Request::new(IstioCertificateRequest {
                csr: self.csr,
                validity_duration: self.ttl,
                metadata: self.metadata,
            });
            if let Some(token) = self.token {
                let value = format!("Bearer {token}").parse().unwrap();
                request.metadata_mut().insert("authorization", value);
            }
            if let Some(cluster) = self.cluster {
                request
                    .metadata_mut()
                    .insert("clusterid", cluster.parse().unwrap());
            }
            request
        }
    }

    fn struct_of(key: &str, kind: Kind) -> prost_types::Struct {
        let value = prost_types::Value { kind: Some(kind) };
        prost_types::Struct {
            fields: BTreeMap::from([(key.to_string(), value)]),
        }
    }

    fn leaf(chain: &[String]) -> (Vec<String>, i64) {
        let der = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                other => format!("{other:?}"),
            })
            .collect();
        let v = cert.validity();
        (sans, v.not_after.timestamp() - v.not_before.timestamp())
    }

    fn assert_status(result: Result<Vec<String>, Status>, code: Code, want: &str) {
        let status = result.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(want),
            "{:?} should contain {want:?}",
            status.message()
        );
    }

    #[tokio::test]
    async fn issues_caller_identity_and_ignores_csr_sans() {
        let f = fixture();
        let mut req = Req::new("cart-0000000000000");
        req.csr = csr_for(
            &PKCS_ECDSA_P256_SHA256,
            vec![
                SanType::URI(
                    "spiffe://cluster.local/ns/kube-system/sa/admin"
                        .try_into()
                        .unwrap(),
                ),
                SanType::DnsName("evil.example".try_into().unwrap()),
            ],
        );
        let chain = f.call(req.build()).await.unwrap();
        assert_eq!(chain.len(), 2);
        let (sans, life) = leaf(&chain);
        assert_eq!(sans, vec!["uri:spiffe://cluster.local/ns/shop/sa/cart"]);
        assert_eq!(
            life,
            3600 + 60,
            "requested ttl plus the one-minute backdate"
        );
        assert_eq!(f.counter(crate::metrics::CERTIFICATES_ISSUED, None), 1);
    }

    #[tokio::test]
    async fn missing_or_bad_credentials_are_unauthenticated_and_opaque() {
        let f = fixture();
        let mut no_token = Req::new("x");
        no_token.token = None;
        let cases = vec![
            no_token,
            Req::new("not-a-known-token"),
            Req {
                cluster: Some("other-cluster"),
                ..Req::new("cart-0000000000000")
            },
        ];
        for req in cases {
            let status = f.call(req.build()).await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            assert_eq!(status.message(), "request authentication failed");
        }
        let reason = Some("unauthenticated");
        assert_eq!(f.counter(crate::metrics::REQUESTS_REJECTED, reason), 3);
        assert_eq!(f.counter(crate::metrics::CERTIFICATES_ISSUED, None), 0);
    }

    #[tokio::test]
    async fn ttl_default_max_and_over_max() {
        let f = fixture();
        for requested in [0, -5] {
            let req = Req {
                ttl: requested,
                ..Req::new("cart-0000000000000")
            };
            let (_, life) = leaf(&f.call(req.build()).await.unwrap());
            assert_eq!(life, 86400 + 60, "ttl {requested} means the 24 h default");
        }
        let at_max = Req {
            ttl: MAX_TTL.as_secs() as i64,
            ..Req::new("cart-0000000000000")
        };
        f.call(at_max.build()).await.unwrap();
        let over = Req {
            ttl: MAX_TTL.as_secs() as i64 + 1,
            ..Req::new("cart-0000000000000")
        };
        assert_status(
            f.call(over.build()).await,
            Code::InvalidArgument,
            "requested validity of 172801s exceeds the maximum of 172800s",
        );
        assert_eq!(
            f.counter(crate::metrics::REQUESTS_REJECTED, Some("invalid_ttl")),
            1
        );
    }

    #[tokio::test]
    async fn bad_csrs_are_invalid_argument_naming_the_problem() {
        let f = fixture();
        let cases = [
            ("garbage".to_string(), "not a PEM \"CERTIFICATE REQUEST\""),
            (String::new(), "the csr is empty"),
            (
                csr_for(&PKCS_ECDSA_P384_SHA384, Vec::new()),
                "EC P-384; only ECDSA P-256",
            ),
        ];
        for (csr, want) in cases {
            let req = Req {
                csr,
                ..Req::new("cart-0000000000000")
            };
            assert_status(f.call(req.build()).await, Code::InvalidArgument, want);
        }
        assert_eq!(
            f.counter(crate::metrics::REQUESTS_REJECTED, Some("invalid_csr")),
            3
        );
    }

    #[tokio::test]
    async fn impersonation_needs_trusted_node_agent_and_local_pod() {
        let f = fixture();
        // A workload may not impersonate, even an identity on its own node.
        let req =
            Req::new("cart-0000000000000").impersonate("spiffe://cluster.local/ns/shop/sa/web");
        assert_status(
            f.call(req.build()).await,
            Code::PermissionDenied,
            "spiffe://cluster.local/ns/shop/sa/cart is not a trusted node agent",
        );
        // ztunnel on node-a gets web (on node-a) …
        let req =
            Req::new("ztunnel-a-000000000").impersonate("spiffe://cluster.local/ns/shop/sa/web");
        let (sans, _) = leaf(&f.call(req.build()).await.unwrap());
        assert_eq!(sans, vec!["uri:spiffe://cluster.local/ns/shop/sa/web"]);
        // … but not db, which runs on node-b.
        let req =
            Req::new("ztunnel-a-000000000").impersonate("spiffe://cluster.local/ns/shop/sa/db");
        assert_status(
            f.call(req.build()).await,
            Code::PermissionDenied,
            "is on node \"node-a\"",
        );
        // A node agent without a known node cannot prove locality.
        let req =
            Req::new("ztunnel-nonode-0000").impersonate("spiffe://cluster.local/ns/shop/sa/web");
        assert_status(
            f.call(req.build()).await,
            Code::PermissionDenied,
            "has no known node",
        );
        // Other trust domains are never signed.
        let req = Req::new("ztunnel-a-000000000").impersonate("spiffe://other.td/ns/shop/sa/web");
        assert_status(
            f.call(req.build()).await,
            Code::PermissionDenied,
            "outside the trust domain",
        );
        let reason = Some("permission_denied");
        assert_eq!(f.counter(crate::metrics::REQUESTS_REJECTED, reason), 4);
    }

    #[tokio::test]
    async fn malformed_metadata_is_invalid_argument() {
        let f = fixture();
        let cases = [
            (
                struct_of(IMPERSONATED_IDENTITY_KEY, Kind::NumberValue(1.0)),
                "must be a string",
            ),
            (
                struct_of(IMPERSONATED_IDENTITY_KEY, Kind::StringValue("web".into())),
                "is not a valid identity",
            ),
            (
                struct_of("CertSigner", Kind::StringValue("x".into())),
                "CertSigner is not supported",
            ),
        ];
        for (metadata, want) in cases {
            let req = Req {
                metadata: Some(metadata),
                ..Req::new("ztunnel-a-000000000")
            };
            assert_status(f.call(req.build()).await, Code::InvalidArgument, want);
        }
        // Unknown keys are ignored.
        let req = Req {
            metadata: Some(struct_of("Other", Kind::BoolValue(true))),
            ..Req::new("cart-0000000000000")
        };
        f.call(req.build()).await.unwrap();
    }

    struct BrokenLocality;

    impl NodeLocality for BrokenLocality {
        fn has_workload_on_node<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a str,
        ) -> BoxFuture<'a, Result<bool, LocalityError>> {
            Box::pin(async { Err(LocalityError("api server unreachable".into())) })
        }
    }

    #[tokio::test]
    async fn placement_backend_failure_is_unavailable() {
        let f = fixture_with(Some(Arc::new(BrokenLocality)));
        let req =
            Req::new("ztunnel-a-000000000").impersonate("spiffe://cluster.local/ns/shop/sa/web");
        assert_status(
            f.call(req.build()).await,
            Code::Unavailable,
            "placement lookup unavailable",
        );
        let reason = Some("backend_unavailable");
        assert_eq!(f.counter(crate::metrics::REQUESTS_REJECTED, reason), 1);
    }
}
