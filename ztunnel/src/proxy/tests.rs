//! Enforcement in the inbound paths, in process: the denial happens before ztunnel connects to
//! the app, so these need no privileges (the admitted path is covered by the netns e2e test
//! `tests/tests/ztunnel_authz_e2e.rs`).

use std::sync::Arc;

use futures::future::BoxFuture;
use http::HeaderMap;
use mesh_core::WorkloadCertificate;
use mesh_core::ca_client::{CaClientError, CertificateProvider};
use mesh_core::cert_manager::{CertManagerConfig, CertificateManager};
use mesh_core::hbone::ConnectTarget;
use mesh_core::hbone::server::{ConnectHandler, InboundRequest};
use mesh_core::testing::TestCa;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::AsyncReadExt;

use super::*;
use crate::state::local::LocalConfig;

struct Ca(TestCa);

impl CertificateProvider for Ca {
    fn fetch_certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>> {
        Box::pin(std::future::ready(Ok(self.0.issue(identity))))
    }
}

/// The pod `server` in namespace `b` at 127.0.0.1, under an ALLOW-only-`client` policy and a
/// STRICT-style DENY of plaintext.
fn pod() -> (Arc<PodContext>, Snapshotter) {
    let yaml = r#"
workloads:
- {uid: s, name: server, namespace: b, serviceAccount: server, workloadIps: [127.0.0.1], protocol: HBONE}
policies:
- {name: allow-client, namespace: b, scope: Namespace, action: Allow,
   rules: [[[{principals: [{exact: cluster.local/ns/a/sa/client}]}]]]}
- {name: strict, namespace: b, scope: Namespace, action: Deny,
   rules: [[[{notPrincipals: [presence]}]]]}
"#;
    let store = Store::from_local(LocalConfig::parse(yaml).unwrap());
    let provider = Arc::new(Ca(TestCa::new("cluster.local")));
    let certs = CertificateManager::new(provider, CertManagerConfig::default());
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let inputs = ProxyInputs {
        store: Arc::new(SharedStore::new(store)),
        certs: Arc::new(CertSource::new(Arc::new(certs), Handle::current())),
        metrics: Metrics::new(Arc::new(recorder)),
        settings: ProxySettings::default(),
        connections: ConnectionTracker::default(),
    };
    let info = PodInfo {
        uid: "s".into(),
        name: "server".into(),
        namespace: "b".into(),
        service_account: "server".into(),
    };
    let netns = NetnsHandle::current().unwrap();
    let ctx = PodContext {
        info,
        netns,
        inputs: Arc::new(inputs),
    };
    (Arc::new(ctx), snapshotter)
}

/// Label sets (`k=v`) of the closed-connection counters.
fn closed(s: &Snapshotter) -> Vec<Vec<String>> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, v)| {
            k.key().name() == crate::metrics::TCP_CONNECTIONS_CLOSED
                && matches!(v, DebugValue::Counter(1))
        })
        .map(|(k, _, _, _)| {
            k.key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn hbone_denial_answers_401_and_records_deny() {
    let (ctx, metrics) = pod();
    let handler = InboundHandler::new(ctx.clone());
    let request = InboundRequest {
        target: ConnectTarget::parse("127.0.0.1:8080").unwrap(),
        headers: HeaderMap::new(),
        peer_identity: Arc::new("spiffe://cluster.local/ns/a/sa/intruder".parse().unwrap()),
        peer_addr: "127.0.0.1:40000".parse().unwrap(),
        local_addr: "127.0.0.1:15008".parse().unwrap(),
        local_identity: "spiffe://cluster.local/ns/b/sa/server".parse().unwrap(),
    };
    let Err(rejection) = handler.handle(request).await else {
        panic!("intruder admitted");
    };
    assert_eq!(rejection.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(
        rejection.reason(),
        "no allow policy matched (applicable: b/allow-client)"
    );
    assert!(ctx.inputs.connections.is_empty());
    let closed = closed(&metrics);
    assert_eq!(closed.len(), 1, "{closed:?}");
    for want in [
        "response_flags=DENY",
        "connection_security_policy=mutual_tls",
        "source_principal=spiffe://cluster.local/ns/a/sa/intruder",
        "destination_workload=server",
    ] {
        assert!(closed[0].contains(&want.to_string()), "{want}: {closed:?}");
    }
}

#[tokio::test]
async fn plaintext_denial_closes_the_connection_and_records_deny() {
    let (ctx, metrics) = pod();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = listener.accept().await.unwrap();
    inbound_passthrough::handle(ctx.clone(), accepted, peer).await;
    // Closed without a byte: the app was never connected.
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(ctx.inputs.connections.is_empty());
    let closed = closed(&metrics);
    assert_eq!(closed.len(), 1, "{closed:?}");
    for want in [
        "response_flags=DENY",
        "connection_security_policy=unknown",
        "reporter=destination",
    ] {
        assert!(closed[0].contains(&want.to_string()), "{want}: {closed:?}");
    }
}
