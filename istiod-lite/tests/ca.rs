//! End-to-end CA tests: mesh-core's certificate client against a real istiod-lite over TLS gRPC on
//! loopback.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use istiod_lite::app::{self, Bound};
use istiod_lite::config::{self, Config};
use istiod_lite::testing::{local_config, write_intermediate_cacerts};
use mesh_core::Identity;
use mesh_core::ca_client::{
    AuthToken, CaClient, CaClientConfig, CaClientError, CertificateProvider,
};
use mesh_core::cert::WorkloadCertificate;
use mesh_core::cert_manager::{CertManagerConfig, CertificateManager};
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const TOKENS: &str = r#"
tokens:
  "ztunnel-node-a-0123456789": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
  "cart-token-0123456789": { identity: "spiffe://cluster.local/ns/shop/sa/cart", node: node-a }
workloads:
  - { identity: "spiffe://cluster.local/ns/shop/sa/web", node: node-a }
  - { identity: "spiffe://cluster.local/ns/shop/sa/db", node: node-b }
"#;
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

async fn start(dir: &Path, extra: &[(&str, String)]) -> Bound {
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let mut source = local_config(dir, &tokens);
    for (k, v) in extra {
        source.insert(k.to_string(), v.clone());
    }
    app::build(Config::from_source(&source).unwrap())
        .await
        .unwrap()
}

fn root_pem(bound: &Bound) -> String {
    std::fs::read_to_string(bound.root_cert_path()).unwrap()
}

fn client_config(bound: &Bound, token: &str) -> CaClientConfig {
    let address = format!("https://127.0.0.1:{}", bound.grpc_address().port());
    let mut config = CaClientConfig::new(address, root_pem(bound));
    config.token = AuthToken::Literal(token.to_string());
    config
}

async fn raw_client(bound: &Bound) -> IstioCertificateServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem(bound)))
        .domain_name("istiod.istio-system.svc");
    let channel =
        Endpoint::from_shared(format!("https://127.0.0.1:{}", bound.grpc_address().port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    IstioCertificateServiceClient::new(channel)
}

fn raw_request(token: &str, csr: String) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: None,
    });
    let value = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn verify_with_webpki(cert: &WorkloadCertificate) {
    let anchors: Vec<_> = cert
        .roots()
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
        .collect();
    let ee = webpki::EndEntityCert::try_from(&cert.chain()[0]).unwrap();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &cert.chain()[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }
}

fn rpc_code(err: &CaClientError) -> Code {
    match err {
        CaClientError::Rpc { code, .. } => *code,
        other => panic!("expected an rpc error, got {other}"),
    }
}

#[tokio::test]
async fn issues_caller_certificate_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    let client = CaClient::new(client_config(&bound, "cart-token-0123456789")).unwrap();
    let cert = client.fetch_certificate(&id(CART)).await.unwrap();
    assert_eq!(cert.identity(), &id(CART));
    assert_eq!(
        cert.chain().len(),
        1,
        "self-signed root signs leaves directly"
    );
    let root = CertificateDer::from_pem_slice(root_pem(&bound).as_bytes()).unwrap();
    assert_eq!(cert.roots(), &[root]);
    verify_with_webpki(&cert);

    // The raw response: [leaf, root], root last and identical to the published root.
    let csr = mesh_core::ca_client::Csr::generate(&id(CART)).unwrap();
    let response = raw_client(&bound)
        .await
        .create_certificate(raw_request("cart-token-0123456789", csr.csr_pem.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.cert_chain.len(), 2);
    assert_eq!(response.cert_chain[1], root_pem(&bound));
    csr.accept_response(&id(CART), &response.cert_chain)
        .unwrap();
}

#[tokio::test]
async fn intermediate_mode_from_cacerts_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    let (root, intermediate) = write_intermediate_cacerts(&cacerts);
    let extra = [(config::CACERTS_DIR, cacerts.display().to_string())];
    let bound = start(dir.path(), &extra).await;
    assert_eq!(
        root_pem(&bound),
        root.cert_pem,
        "clients trust the real root"
    );
    assert!(
        !dir.path().join("ca").exists(),
        "no self-signed root is generated"
    );

    let client = CaClient::new(client_config(&bound, "cart-token-0123456789")).unwrap();
    let cert = client.fetch_certificate(&id(CART)).await.unwrap();
    let intermediate_der =
        CertificateDer::from_pem_slice(intermediate.cert_pem.as_bytes()).unwrap();
    assert_eq!(cert.chain().len(), 2, "[leaf, intermediate]");
    assert_eq!(cert.chain()[1], intermediate_der);
    verify_with_webpki(&cert);
}

#[tokio::test]
async fn rejects_bad_or_missing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    for token in [AuthToken::Literal("wrong-token".into()), AuthToken::None] {
        let mut config = client_config(&bound, "unused");
        config.token = token;
        let err = CaClient::new(config)
            .unwrap()
            .fetch_certificate(&id(CART))
            .await
            .unwrap_err();
        assert_eq!(rpc_code(&err), Code::Unauthenticated, "{err}");
        assert!(
            err.to_string().contains("request authentication failed"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn rejects_malformed_csr_and_long_ttl_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    let mut client = raw_client(&bound).await;
    let status = client
        .create_certificate(raw_request("cart-token-0123456789", "garbage".into()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("CERTIFICATE REQUEST"),
        "{status:?}"
    );

    let mut config = client_config(&bound, "cart-token-0123456789");
    config.cert_ttl = Duration::from_secs(91 * 86400);
    let err = CaClient::new(config)
        .unwrap()
        .fetch_certificate(&id(CART))
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), Code::InvalidArgument, "{err}");
    assert!(
        err.to_string().contains("exceeds the maximum of 7776000s"),
        "{err}"
    );
}

#[tokio::test]
async fn node_agent_impersonates_only_pods_on_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    let mut config = client_config(&bound, "ztunnel-node-a-0123456789");
    config.impersonate = true;
    let ztunnel = CaClient::new(config).unwrap();
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(
        ztunnel.fetch_certificate(&web).await.unwrap().identity(),
        &web
    );
    let db = id("spiffe://cluster.local/ns/shop/sa/db");
    let err = ztunnel.fetch_certificate(&db).await.unwrap_err();
    assert_eq!(rpc_code(&err), Code::PermissionDenied, "{err}");

    let mut config = client_config(&bound, "cart-token-0123456789");
    config.impersonate = true;
    let err = CaClient::new(config)
        .unwrap()
        .fetch_certificate(&web)
        .await
        .unwrap_err();
    assert_eq!(rpc_code(&err), Code::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains("is not a trusted node agent"),
        "{err}"
    );
}

#[tokio::test]
async fn root_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &[]).await;
    let root_before = root_pem(&first);
    let shutdown = first.shutdown_handle();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), first.wait_termination())
        .await
        .expect("shutdown is prompt")
        .unwrap();

    let second = start(dir.path(), &[]).await;
    assert_eq!(root_pem(&second), root_before);
    let client = CaClient::new(client_config(&second, "cart-token-0123456789")).unwrap();
    let cert = client.fetch_certificate(&id(CART)).await.unwrap();
    let root = CertificateDer::from_pem_slice(root_before.as_bytes()).unwrap();
    assert_eq!(cert.roots(), &[root]);
    verify_with_webpki(&cert);
}

#[tokio::test]
async fn bind_conflict_fails_startup() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &[]).await;
    let tokens = dir.path().join("tokens.yaml");
    let mut source = local_config(dir.path(), &tokens);
    source.insert(config::GRPC_ADDR.into(), first.grpc_address().to_string());
    let err = app::build(Config::from_source(&source).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot bind grpc listener"),
        "{err}"
    );
}

async fn handshake(bound: &Bound, version: &'static rustls::SupportedProtocolVersion) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem(bound).as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(bound.grpc_address())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .is_ok()
}

#[tokio::test]
async fn server_speaks_tls13_only() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    assert!(handshake(&bound, &rustls::version::TLS13).await);
    assert!(
        !handshake(&bound, &rustls::version::TLS12).await,
        "TLS 1.2 must be refused"
    );
}

#[tokio::test]
async fn cert_manager_rotates_against_real_ca() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path(), &[]).await;
    let mut config = client_config(&bound, "cart-token-0123456789");
    // Two-second certificates: renewed after about one second.
    config.cert_ttl = Duration::from_secs(2);
    let provider = Arc::new(CaClient::new(config).unwrap());
    let manager = CertificateManager::new(provider, CertManagerConfig::default());
    let first = manager.fetch(&id(CART)).await.unwrap();
    assert!(Arc::ptr_eq(
        &first,
        &manager.fetch(&id(CART)).await.unwrap()
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let current = manager.fetch(&id(CART)).await.unwrap();
        if !Arc::ptr_eq(&first, &current) {
            // X.509 times have one-second resolution, so a quick renewal may share not_after.
            assert_ne!(current.chain()[0], first.chain()[0], "a new leaf");
            assert!(current.not_after() >= first.not_after());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
