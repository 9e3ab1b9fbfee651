//! Real TLS handshakes over loopback TCP with certificates from the test CA.

use std::time::{Duration, SystemTime};

use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::testing::{IssueOptions, TestCa};

type Side = Result<Option<Identity>, HandshakeError>;

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn tls_for(ca: &TestCa, ident: &str) -> WorkloadTls {
    WorkloadTls::from_certificate(&ca.issue(&id(ident))).unwrap()
}

/// Runs one handshake. The server writes one byte once it accepted the client, and the client
/// reads it: in TLS 1.3 the client only learns that the server rejected its certificate then.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> (Side, Side) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(classify_handshake_error)?;
        assert_eq!(tls.get_ref().1.server_name(), None, "client sent SNI");
        let peer = peer_identity(tls.get_ref().1);
        tls.write_all(b"k")
            .await
            .map_err(classify_handshake_error)?;
        tls.flush().await.map_err(classify_handshake_error)?;
        // Keep the connection open until the client has read the byte.
        let _ = tls.read(&mut [0u8; 1]).await;
        Ok(peer)
    });
    let client_side = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(dummy_server_name(), tcp)
            .await
            .map_err(classify_handshake_error)?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte)
            .await
            .map_err(classify_handshake_error)?;
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        Ok(peer_identity(conn))
    };
    let client_result = client_side.await;
    (server_side.await.unwrap(), client_result)
}

#[tokio::test]
async fn mutual_handshake_exposes_both_identities() {
    let ca = TestCa::with_intermediate("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let client = tls_for(&ca, "spiffe://cluster.local/ns/web/sa/front");
    let client_cfg = client
        .client_config(vec![server.identity().clone()])
        .unwrap();
    let (s, c) = handshake(server.server_config(), client_cfg).await;
    assert_eq!(s.unwrap(), Some(client.identity().clone()));
    assert_eq!(c.unwrap(), Some(server.identity().clone()));
}

#[tokio::test]
async fn client_accepts_any_of_the_expected_identities() {
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let client = tls_for(&ca, "spiffe://cluster.local/ns/web/sa/front");
    let expected = vec![
        id("spiffe://cluster.local/ns/shop/sa/waypoint"),
        server.identity().clone(),
    ];
    let (s, c) = handshake(
        server.server_config(),
        client.client_config(expected).unwrap(),
    )
    .await;
    assert!(s.is_ok() && c.is_ok(), "{s:?} {c:?}");
}

#[tokio::test]
async fn client_rejects_unexpected_server_identity() {
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/impostor");
    let client = tls_for(&ca, "spiffe://cluster.local/ns/web/sa/front");
    let expected = vec![id("spiffe://cluster.local/ns/shop/sa/cart")];
    let (s, c) = handshake(
        server.server_config(),
        client.client_config(expected).unwrap(),
    )
    .await;
    let err = c.unwrap_err();
    assert!(matches!(err, HandshakeError::Identity(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "peer identity rejected: peer identity spiffe://cluster.local/ns/shop/sa/impostor is not \
         one of the expected identities [spiffe://cluster.local/ns/shop/sa/cart]"
    );
    assert!(matches!(s, Err(HandshakeError::Alert(_))), "{s:?}");
}

#[tokio::test]
async fn client_with_no_expected_identity_trusts_nobody() {
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let client = tls_for(&ca, "spiffe://cluster.local/ns/web/sa/front");
    let (_, c) = handshake(
        server.server_config(),
        client.client_config(vec![]).unwrap(),
    )
    .await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("no expected peer identity"), "{err}");
}

#[tokio::test]
async fn server_rejects_client_from_another_trust_domain() {
    // Same root, so only the trust-domain rule can reject it.
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let client = tls_for(&ca, "spiffe://other.td/ns/web/sa/front");
    let cfg = client
        .client_config(vec![server.identity().clone()])
        .unwrap();
    let (s, c) = handshake(server.server_config(), cfg).await;
    let err = s.unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer identity rejected: peer identity spiffe://other.td/ns/web/sa/front is not in our \
         trust domain cluster.local"
    );
    assert!(matches!(c, Err(HandshakeError::Alert(_))), "{c:?}");
}

#[tokio::test]
async fn untrusted_root_is_rejected_on_both_sides() {
    let ca = TestCa::new("cluster.local");
    let rogue = TestCa::new("cluster.local");
    let good = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let bad = tls_for(&rogue, "spiffe://cluster.local/ns/shop/sa/cart");
    // The rogue server presents a cert our client's bundle does not trust.
    let cfg = good.client_config(vec![bad.identity().clone()]).unwrap();
    let (_, c) = handshake(bad.server_config(), cfg).await;
    // Both test roots share a subject name, so webpki finds a candidate issuer whose signature
    // does not match; a root with another name yields "does not lead to a trusted root".
    let untrusted = |err: HandshakeError| {
        let msg = err.to_string();
        assert!(matches!(err, HandshakeError::Certificate(_)), "{msg}");
        assert!(
            msg.ends_with("a certificate in the chain has a bad signature")
                || msg.ends_with("the certificate chain does not lead to a trusted root"),
            "{msg}"
        );
    };
    untrusted(c.unwrap_err());
    // A rogue client (which itself trusts our root) is refused by our server.
    let rogue_cert = rogue.issue(&id("spiffe://cluster.local/ns/web/sa/front"));
    let trusts_us = TrustBundle::new([ca.root_der(), rogue.root_der()]).unwrap();
    let bad = WorkloadTls::new(&rogue_cert, trusts_us).unwrap();
    let cfg = bad.client_config(vec![good.identity().clone()]).unwrap();
    let (s, _) = handshake(good.server_config(), cfg).await;
    untrusted(s.unwrap_err());
}

#[tokio::test]
async fn expired_certificates_are_rejected() {
    let ca = TestCa::new("cluster.local");
    let day = Duration::from_secs(24 * 3600);
    let past = IssueOptions {
        not_before: SystemTime::now() - 2 * day,
        not_after: SystemTime::now() - day,
    };
    let expired_cert = ca.issue_with(&id("spiffe://cluster.local/ns/shop/sa/cart"), &past);
    let expired = WorkloadTls::from_certificate(&expired_cert).unwrap();
    let fresh = tls_for(&ca, "spiffe://cluster.local/ns/web/sa/front");
    let cfg = fresh
        .client_config(vec![expired.identity().clone()])
        .unwrap();
    let (_, c) = handshake(expired.server_config(), cfg).await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("certificate expired"), "{err}");
    let cfg = expired
        .client_config(vec![fresh.identity().clone()])
        .unwrap();
    let (s, _) = handshake(fresh.server_config(), cfg).await;
    let err = s.unwrap_err().to_string();
    assert!(err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn server_requires_a_client_certificate() {
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    let builder = client_builder(server.bundle(), vec![server.identity().clone()]).unwrap();
    let anonymous = Arc::new(finish_client_config(builder.with_no_client_auth()));
    let (s, c) = handshake(server.server_config(), anonymous).await;
    assert_eq!(
        s.unwrap_err().to_string(),
        "peer certificate rejected: the peer presented no certificate, but a client certificate \
         is required"
    );
    assert!(
        matches!(
            c,
            Err(HandshakeError::Alert(AlertDescription::CertificateRequired))
        ),
        "{c:?}"
    );
}

#[tokio::test]
async fn bundle_with_two_roots_accepts_both_during_rotation() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::with_intermediate("cluster.local");
    let bundle = TrustBundle::new([old.root_der(), new.root_der()]).unwrap();
    let server_cert = old.issue(&id("spiffe://cluster.local/ns/shop/sa/cart"));
    let server = WorkloadTls::new(&server_cert, bundle.clone()).unwrap();
    for ca in [&old, &new] {
        let cert = ca.issue(&id("spiffe://cluster.local/ns/web/sa/front"));
        let client = WorkloadTls::new(&cert, bundle.clone()).unwrap();
        let cfg = client
            .client_config(vec![server.identity().clone()])
            .unwrap();
        let (s, c) = handshake(server.server_config(), cfg).await;
        assert_eq!(s.unwrap(), Some(client.identity().clone()));
        assert!(c.is_ok(), "{c:?}");
    }
    // Without the new root, the new CA's client is refused.
    let old_only = WorkloadTls::from_certificate(&server_cert).unwrap();
    let cert = new.issue(&id("spiffe://cluster.local/ns/web/sa/front"));
    let client = WorkloadTls::new(&cert, bundle).unwrap();
    let cfg = client
        .client_config(vec![server.identity().clone()])
        .unwrap();
    let (s, _) = handshake(old_only.server_config(), cfg).await;
    assert!(s.is_err());
}

#[tokio::test]
async fn only_aes_gcm_suites_are_negotiable() {
    let ca = TestCa::new("cluster.local");
    let server = tls_for(&ca, "spiffe://cluster.local/ns/shop/sa/cart");
    // A client that only offers ChaCha20 cannot connect.
    let mut chacha = aws_lc_rs::default_provider();
    chacha.cipher_suites = vec![aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    let client_cert = ca.issue(&id("spiffe://cluster.local/ns/web/sa/front"));
    let cfg = ClientConfig::builder_with_provider(Arc::new(chacha))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::ServerIdentityVerifier::new(
            server.bundle().store(),
            vec![server.identity().clone()],
            provider(),
        )))
        .with_client_auth_cert(client_cert.chain().to_vec(), client_cert.private_key())
        .unwrap();
    let (s, _) = handshake(server.server_config(), Arc::new(finish_client_config(cfg))).await;
    let err = s.unwrap_err().to_string();
    assert!(err.contains("tls handshake failed"), "{err}");
    let suites: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        suites,
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
    );
}

#[test]
fn trust_bundle_rejects_empty_and_garbage_and_dedups() {
    assert!(matches!(TrustBundle::new([]), Err(TlsError::EmptyBundle)));
    let err = TrustBundle::new([CertificateDer::from(vec![1, 2, 3])]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid root certificate in trust bundle"),
        "{err}"
    );
    let ca = TestCa::new("td");
    let bundle = TrustBundle::new([ca.root_der(), ca.root_der()]).unwrap();
    assert_eq!(bundle.roots().len(), 1);
    let other = TrustBundle::new([TestCa::new("td").root_der()]).unwrap();
    assert_eq!(bundle.merge(&other).unwrap().roots().len(), 2);
}

#[test]
fn mismatched_private_key_is_rejected() {
    let ca = TestCa::new("td");
    let a = ca.issue(&id("spiffe://td/ns/a/sa/a"));
    let b = ca.issue(&id("spiffe://td/ns/b/sa/b"));
    let PrivateKeyDer::Pkcs8(key_b) = b.private_key() else {
        panic!("test keys are pkcs8")
    };
    let mixed = WorkloadCertificate::new(
        a.chain().to_vec(),
        a.roots().to_vec(),
        key_b.secret_pkcs8_der().to_vec(),
    )
    .unwrap();
    let err = WorkloadTls::from_certificate(&mixed)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot load the private key of spiffe://td/ns/a/sa/a"),
        "{err}"
    );
}
