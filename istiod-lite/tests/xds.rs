//! The composed istiod-lite: delta ADS on the CA's TLS port, fed through `Bound::resources`, and
//! ended cleanly by shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use istiod_lite::app::{self, Bound};
use istiod_lite::config::{self, Config};
use istiod_lite::testing::local_config;
use istiod_lite::xds::ResourceSet;
use mesh_core::ca_client::{AuthToken, CaClient, CaClientConfig, CertificateProvider};
use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, pack};
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node};
use mesh_proto::security::Authorization;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Streaming};

const TOKENS: &str = r#"
tokens:
  "ztunnel-node-a-0123456789": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
"#;
const TOKEN: &str = "ztunnel-node-a-0123456789";
const WAIT: Duration = Duration::from_secs(5);

async fn start(dir: &Path) -> Bound {
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let mut source = local_config(dir, &tokens);
    source.insert(config::XDS_DEBOUNCE.into(), "10ms".into());
    source.insert(config::DRAIN_TIMEOUT.into(), "10s".into());
    app::build(Config::from_source(&source).unwrap())
        .await
        .unwrap()
}

fn root_pem(bound: &Bound) -> String {
    std::fs::read_to_string(bound.root_cert_path()).unwrap()
}

type Stream = (
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
);

async fn open_stream(bound: &Bound) -> Stream {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem(bound)))
        .domain_name("istiod.istio-system.svc");
    let channel = Endpoint::from_shared(format!("https://{}", bound.grpc_address()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let outbound = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut request = tonic::Request::new(outbound);
    let value = format!("Bearer {TOKEN}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    let response = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(request)
        .await
        .unwrap();
    (tx, response.into_inner())
}

async fn recv(stream: &mut Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("response in time")
        .expect("stream open")
        .expect("a response")
}

fn request(type_url: &str, nonce: &str, node: bool) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node.then(|| Node {
            id: "ztunnel~10.0.0.5~ztunnel-a.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn xds_and_ca_share_the_port_and_feed_reaches_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let bound = start(dir.path()).await;
    let (tx, mut rx) = open_stream(&bound).await;
    tx.send(request(ADDRESS_TYPE_URL, "", true)).await.unwrap();
    tx.send(request(AUTHORIZATION_TYPE_URL, "", false))
        .await
        .unwrap();
    for _ in 0..2 {
        let first = recv(&mut rx).await;
        assert!(first.resources.is_empty());
        tx.send(request(&first.type_url, &first.nonce, false))
            .await
            .unwrap();
    }

    let policy = Authorization {
        name: "allow".into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let mut set = ResourceSet::new();
    set.insert(AUTHORIZATION_TYPE_URL, "shop/allow".into(), pack(&policy));
    bound.resources().send_replace(Arc::new(set));
    let update = recv(&mut rx).await;
    assert_eq!(update.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(update.resources[0].name, "shop/allow");

    // The CA answers on the same address.
    let address = format!("https://127.0.0.1:{}", bound.grpc_address().port());
    let mut ca = CaClientConfig::new(address, root_pem(&bound));
    ca.token = AuthToken::Literal(TOKEN.into());
    let identity = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
        .parse()
        .unwrap();
    CaClient::new(ca)
        .unwrap()
        .fetch_certificate(&identity)
        .await
        .unwrap();

    // Shutdown ends the long-lived stream with UNAVAILABLE instead of waiting out the drain.
    let started = tokio::time::Instant::now();
    bound.shutdown_handle().cancel();
    let status = tokio::time::timeout(WAIT, rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(WAIT, bound.wait_termination())
        .await
        .expect("shutdown is prompt")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "did not wait for the 10 s drain"
    );
}
