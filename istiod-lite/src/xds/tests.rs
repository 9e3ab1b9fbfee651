//! The ADS server end to end: a real tonic client over TLS on loopback against [`AdsService`]
//! on the same [`GrpcServer`] the CA uses, with metrics under a local `DebuggingRecorder`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::any::pack;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{Node, Status as ErrorDetail};
use mesh_proto::security::Authorization;
use mesh_proto::workload::{Address, Workload, address};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use prost_types::value::Kind;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::service::Routes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::*;
use crate::auth::token_file::StaticTokens;
use crate::ca::CertificateAuthority;
use crate::ca::store::init_self_signed;
use crate::grpc::{GrpcError, GrpcServer};
use crate::metrics as m;
use crate::serving_cert::{self, ServingCertResolver, ServingCertSpec};

const TOKENS: &str = r#"
tokens:
  "ztunnel-node-a-0123456789": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
  "cart-token-0123456789": { identity: "spiffe://cluster.local/ns/shop/sa/cart", node: node-a }
"#;
const TOKEN: &str = "ztunnel-node-a-0123456789";
const NODE_ID: &str = "ztunnel~10.0.0.5~ztunnel-a.istio-system~istio-system.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

struct Harness {
    address: SocketAddr,
    roots_pem: String,
    feed: watch::Sender<Arc<ResourceSet>>,
    published: watch::Receiver<Arc<Published>>,
    snapshotter: Snapshotter,
    totals: std::sync::Mutex<BTreeMap<(String, Option<String>), f64>>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), GrpcError>>,
    _dir: tempfile::TempDir,
}

fn fast() -> AdsSettings {
    AdsSettings {
        debounce: Duration::from_millis(20),
        max_debounce: Duration::from_millis(200),
        ack_timeout: Duration::from_secs(30),
    }
}

async fn harness(settings: AdsSettings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let material =
        init_self_signed(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
    let authority = CertificateAuthority::new(material).unwrap();
    let spec = ServingCertSpec {
        dns_names: vec!["istiod.istio-system.svc".into()],
        ips: Vec::new(),
        ttl: Duration::from_secs(3600),
    };
    let resolver = Arc::new(ServingCertResolver::new(&authority, &spec).unwrap());
    let tls = serving_cert::tls_config(resolver).unwrap();
    let server = GrpcServer::bind("127.0.0.1:0".parse().unwrap(), tls)
        .await
        .unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let metrics = ::metrics::with_local_recorder(&recorder, XdsMetrics::new);
    let tokens = StaticTokens::from_yaml(TOKENS, "cluster.local").unwrap();
    let (feed, rx) = watch::channel(Arc::new(ResourceSet::new()));
    let shutdown = CancellationToken::new();
    let auth = Arc::new(tokens.authenticator("Kubernetes"));
    let ads = AdsService::new(rx, auth, settings, metrics, shutdown.clone());
    let address = server.address();
    let published = ads.feed.clone();
    let server = tokio::spawn(server.run(Routes::new(ads.into_server()), shutdown.clone()));
    Harness {
        address,
        roots_pem: authority.roots_pem().to_string(),
        feed,
        published,
        snapshotter,
        totals: Default::default(),
        shutdown,
        server,
        _dir: dir,
    }
}

impl Harness {
    async fn channel(&self) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.roots_pem))
            .domain_name("istiod.istio-system.svc");
        Endpoint::from_shared(format!("https://{}", self.address))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn try_connect(&self, token: Option<&str>) -> Result<Proxy, Status> {
        Proxy::open(self.channel().await, token).await
    }

    async fn connect(&self) -> Proxy {
        self.try_connect(Some(TOKEN)).await.unwrap()
    }

    /// Connects and subscribes to both types, returning the proxy and its first two responses.
    async fn ztunnel(
        &self,
        initial: [BTreeMap<String, String>; 2],
    ) -> (Proxy, Vec<DeltaDiscoveryResponse>) {
        let [address, authorization] = initial;
        let mut proxy = self.connect().await;
        let mut first = subscribe(ADDRESS_TYPE_URL, true);
        first.initial_resource_versions = address;
        proxy.send(first).await;
        let mut second = subscribe(AUTHORIZATION_TYPE_URL, false);
        second.initial_resource_versions = authorization;
        proxy.send(second).await;
        let mut responses = vec![proxy.recv().await, proxy.recv().await];
        responses.sort_by_key(|r| r.type_url != ADDRESS_TYPE_URL);
        (proxy, responses)
    }

    /// Feeds `set` and waits until the debouncer has published it to streams.
    async fn publish(&self, set: ResourceSet) {
        let set = Arc::new(set);
        self.feed.send_replace(set.clone());
        let mut published = self.published.clone();
        let done = published.wait_for(|p| Arc::ptr_eq(&p.set, &set));
        tokio::time::timeout(WAIT, done).await.unwrap().unwrap();
    }

    /// Feeds `set` without waiting.
    fn feed(&self, set: ResourceSet) {
        self.feed.send_replace(Arc::new(set));
    }

    // The debugging recorder resets values on every snapshot; fold them into running totals.
    fn totals(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, Option<String>), f64>> {
        let mut totals = self.totals.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let label = key.labels().next().map(|l| l.value().to_string());
            let delta = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(v) => v.len() as f64,
            };
            *totals.entry((key.name().to_string(), label)).or_default() += delta;
        }
        totals
    }

    /// A counter's total, a gauge's value, or a histogram's sample count.
    fn metric(&self, name: &str, label: Option<&str>) -> f64 {
        let key = (name.to_string(), label.map(str::to_string));
        self.totals().get(&key).copied().unwrap_or(0.0)
    }

    fn counter(&self, name: &str, label: Option<&str>) -> u64 {
        self.metric(name, label) as u64
    }

    fn connected(&self) -> f64 {
        self.metric(m::XDS_CONNECTED, None)
    }
}

struct Proxy {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Proxy {
    async fn open(channel: Channel, token: Option<&str>) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(64);
        let outbound = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut request = Request::new(outbound);
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let response = client.delta_aggregated_resources(request).await?;
        Ok(Self {
            tx,
            rx: response.into_inner(),
        })
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.tx.send(request).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(response))) => response,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    async fn recv_status(&mut self) -> Status {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(status)) => status,
            other => panic!("expected the stream to fail, got {other:?}"),
        }
    }

    async fn assert_quiet(&mut self) {
        if let Ok(message) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected silence, got {message:?}");
        }
    }

    async fn ack(&self, response: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, response: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(ErrorDetail {
                code: Code::InvalidArgument as i32,
                message: message.into(),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await;
    }
}

fn node() -> Node {
    let s = |v: &str| prost_types::Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let fields = BTreeMap::from([
        ("NAME".to_string(), s("ztunnel-a")),
        ("NAMESPACE".to_string(), s("istio-system")),
        ("NODE_NAME".to_string(), s("node-a")),
    ]);
    Node {
        id: NODE_ID.into(),
        metadata: Some(prost_types::Struct { fields }),
        ..Default::default()
    }
}

fn subscribe(type_url: &str, with_node: bool) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: with_node.then(node),
        type_url: type_url.into(),
        ..Default::default()
    }
}

fn policy(name: &str, rev: u32) -> (String, prost_types::Any) {
    let body = Authorization {
        name: name.into(),
        namespace: "ns".into(),
        // Any field change makes a new version; destination ports are an easy one to vary.
        rules: vec![mesh_proto::security::Rule {
            clauses: vec![mesh_proto::security::Clause {
                matches: vec![mesh_proto::security::Match {
                    destination_ports: vec![rev],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    (format!("ns/{name}"), pack(&body))
}

fn workload(uid: &str) -> (String, prost_types::Any) {
    let body = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 9]],
            ..Default::default()
        })),
    };
    (uid.to_string(), pack(&body))
}

fn set_of(policies: &[(&str, u32)], workloads: &[&str]) -> ResourceSet {
    let mut set = ResourceSet::new();
    for (name, rev) in policies {
        let (name, body) = policy(name, *rev);
        set.insert(AUTHORIZATION_TYPE_URL, name, body);
    }
    for uid in workloads {
        let (name, body) = workload(uid);
        set.insert(ADDRESS_TYPE_URL, name, body);
    }
    set
}

fn names(response: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
    let mut added: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    added.sort_unstable();
    let mut removed: Vec<_> = response
        .removed_resources
        .iter()
        .map(String::as_str)
        .collect();
    removed.sort_unstable();
    (added, removed)
}

fn versions(response: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    (response.resources.iter())
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}

#[tokio::test]
async fn first_response_per_type_even_when_empty() {
    let h = harness(fast()).await;
    let (proxy, responses) = h.ztunnel(Default::default()).await;
    let types: Vec<_> = responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]);
    for r in &responses {
        assert!(
            r.resources.is_empty() && r.removed_resources.is_empty(),
            "{r:?}"
        );
        assert!(!r.nonce.is_empty());
    }
    assert_ne!(responses[0].nonce, responses[1].nonce, "nonces are unique");
    assert_eq!(h.counter(m::XDS_PUSHES, Some("wads")), 1);
    assert_eq!(h.counter(m::XDS_PUSHES, Some("wdsauthz")), 1);
    assert_eq!(h.connected(), 1.0);
    drop(proxy);
    assert_eventually(|| h.connected() == 0.0).await;
}

#[tokio::test]
async fn ack_then_updates_carry_only_changes_and_removals() {
    let h = harness(fast()).await;
    h.publish(set_of(&[("keep", 1), ("edit", 1), ("gone", 1)], &["w1"]))
        .await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    assert_eq!(names(&responses[0]).0, ["w1"]);
    let first = &responses[1];
    assert_eq!(names(first).0, ["ns/edit", "ns/gone", "ns/keep"]);
    assert!(
        first
            .resources
            .iter()
            .all(|r| r.resource.as_ref().unwrap().type_url == AUTHORIZATION_TYPE_URL)
    );
    for r in &responses {
        proxy.ack(r).await;
    }
    h.publish(set_of(&[("keep", 1), ("edit", 2), ("new", 1)], &["w1"]))
        .await;
    let update = proxy.recv().await;
    assert_eq!(update.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(names(&update), (vec!["ns/edit", "ns/new"], vec!["ns/gone"]));
    assert_ne!(update.nonce, first.nonce);
    proxy.ack(&update).await;
    proxy.assert_quiet().await; // nothing for Address, which did not change
    assert_eq!(
        h.metric(m::XDS_PUSH_TIME, Some("wdsauthz")),
        1.0,
        "one latency sample"
    );
}

#[tokio::test]
async fn nack_is_counted_and_the_stream_kept_without_resend() {
    let h = harness(fast()).await;
    h.publish(set_of(&[("p", 1)], &[])).await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    proxy.ack(&responses[0]).await;
    proxy.nack(&responses[1], "ns/p: unsupported field").await;
    proxy.assert_quiet().await;
    assert_eq!(h.counter(m::XDS_REJECTS, Some("wdsauthz")), 1);
    // The stream still works: the next change arrives.
    h.publish(set_of(&[("p", 2)], &[])).await;
    let update = proxy.recv().await;
    assert_eq!(names(&update).0, ["ns/p"]);
}

/// The first change after a quiet period is pushed at once; the rest of the burst waits for the
/// feed to go quiet and is pushed together.
#[tokio::test]
async fn a_burst_of_changes_is_two_pushes() {
    let settings = AdsSettings {
        // Long enough that a loaded test machine does not split the burst.
        debounce: Duration::from_millis(300),
        max_debounce: Duration::from_secs(3),
        ..fast()
    };
    let h = harness(settings).await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    for r in &responses {
        proxy.ack(r).await;
    }
    let mut policies = Vec::new();
    for i in 0..5 {
        policies.push((format!("p{i}"), 1));
        let named: Vec<(&str, u32)> = policies.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        h.feed(set_of(&named, &[]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = proxy.recv().await;
    assert_eq!(names(&first).0, ["ns/p0"]);
    proxy.ack(&first).await;
    let rest = proxy.recv().await;
    assert_eq!(names(&rest).0, ["ns/p1", "ns/p2", "ns/p3", "ns/p4"]);
    proxy.ack(&rest).await;
    proxy.assert_quiet().await;
    assert_eq!(h.counter(m::XDS_PUSHES, Some("wdsauthz")), 3);
}

#[tokio::test]
async fn changes_wait_for_the_outstanding_ack_and_coalesce() {
    let h = harness(fast()).await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    proxy.ack(&responses[0]).await;
    // Authorization is left unacknowledged: two changes must wait, then go out as one.
    h.publish(set_of(&[("a", 1)], &[])).await;
    h.publish(set_of(&[("a", 1), ("b", 1)], &[])).await;
    proxy.assert_quiet().await;
    proxy.ack(&responses[1]).await;
    let update = proxy.recv().await;
    assert_eq!(names(&update).0, ["ns/a", "ns/b"]);
}

#[tokio::test]
async fn reconnect_with_initial_versions_gets_only_differences() {
    let h = harness(fast()).await;
    h.publish(set_of(&[("a", 1), ("b", 1), ("c", 1)], &["w1"]))
        .await;
    let (proxy, responses) = h.ztunnel(Default::default()).await;
    let held = [versions(&responses[0]), versions(&responses[1])];
    assert_eq!((held[0].len(), held[1].len()), (1, 3));
    drop(proxy);
    h.publish(set_of(&[("a", 1), ("b", 2), ("d", 1)], &["w1"]))
        .await;
    let (_proxy, responses) = h.ztunnel(held).await;
    assert_eq!(names(&responses[0]), (vec![], vec![]), "address unchanged");
    assert_eq!(names(&responses[1]), (vec!["ns/b", "ns/d"], vec!["ns/c"]));
}

#[tokio::test]
async fn unauthenticated_streams_are_refused() {
    let h = harness(fast()).await;
    for token in [None, Some("not-a-known-token-000000")] {
        let status = match h.try_connect(token).await {
            Err(status) => status,
            Ok(mut proxy) => proxy.recv_status().await,
        };
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(status.message(), "request authentication failed");
    }
    assert_eq!(h.connected(), 0.0);
}

#[tokio::test]
async fn a_token_from_another_namespace_cannot_pose_as_the_proxy() {
    let h = harness(fast()).await;
    let mut proxy = h.try_connect(Some("cart-token-0123456789")).await.unwrap();
    proxy.send(subscribe(ADDRESS_TYPE_URL, true)).await;
    let status = proxy.recv_status().await;
    assert_eq!(status.code(), Code::PermissionDenied);
    let want = "spiffe://cluster.local/ns/shop/sa/cart may not connect as proxy";
    assert!(status.message().contains(want), "{status:?}");
    assert_eq!(h.connected(), 0.0);
}

#[tokio::test]
async fn a_first_request_without_a_usable_node_is_refused() {
    let h = harness(fast()).await;
    let cases = [
        (None, "must carry node"),
        (
            Some("ztunnel~10.0.0.5~no-namespace~d"),
            "is not \"<type>~<ip>",
        ),
    ];
    for (id, want) in cases {
        let mut proxy = h.connect().await;
        let mut request = subscribe(ADDRESS_TYPE_URL, id.is_some());
        if let (Some(node), Some(id)) = (request.node.as_mut(), id) {
            node.id = id.into();
        }
        proxy.send(request).await;
        let status = proxy.recv_status().await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(want), "{status:?}");
    }
    let long = format!("type.googleapis.com/{}", "x".repeat(300));
    for (type_url, want) in [("", "empty type_url"), (long.as_str(), "at most 256")] {
        let mut proxy = h.connect().await;
        proxy.send(subscribe(type_url, true)).await;
        let status = proxy.recv_status().await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(want), "{status:?}");
    }
}

#[tokio::test]
async fn a_proxy_that_never_acks_is_closed() {
    let settings = AdsSettings {
        ack_timeout: Duration::from_millis(300),
        ..fast()
    };
    let h = harness(settings).await;
    let mut proxy = h.connect().await;
    proxy.send(subscribe(AUTHORIZATION_TYPE_URL, true)).await;
    let response = proxy.recv().await;
    let status = proxy.recv_status().await;
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("no ACK or NACK"), "{status:?}");
    assert!(status.message().contains(&response.nonce), "{status:?}");
    assert_eq!(h.counter(m::XDS_ACK_TIMEOUTS, Some("wdsauthz")), 1);
    // A stream that never sends its first request is closed too.
    let mut silent = h.connect().await;
    let status = silent.recv_status().await;
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("no request within"), "{status:?}");
}

#[tokio::test]
async fn replayed_and_stale_nonces_do_not_cause_resends() {
    let h = harness(fast()).await;
    h.publish(set_of(&[("a", 1)], &[])).await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    for r in &responses {
        proxy.ack(r).await;
    }
    // Replays of the ACK, an invented nonce, and the first request again.
    proxy.ack(&responses[1]).await;
    let mut invented = responses[1].clone();
    invented.nonce = "not-a-nonce".into();
    proxy.ack(&invented).await;
    proxy.send(subscribe(AUTHORIZATION_TYPE_URL, true)).await;
    proxy.assert_quiet().await;
    assert_eq!(h.counter(m::XDS_EXPIRED_NONCE, Some("wdsauthz")), 2);
    assert_eq!(h.counter(m::XDS_PUSHES, Some("wdsauthz")), 1);
}

#[tokio::test]
async fn unknown_type_urls_are_served_empty_and_do_not_break_the_stream() {
    let h = harness(fast()).await;
    let (mut proxy, responses) = h.ztunnel(Default::default()).await;
    for r in &responses {
        proxy.ack(r).await;
    }
    proxy
        .send(subscribe("type.googleapis.com/example.Unknown", false))
        .await;
    let response = proxy.recv().await;
    assert_eq!(response.type_url, "type.googleapis.com/example.Unknown");
    assert!(response.resources.is_empty());
    proxy.ack(&response).await;
    h.publish(set_of(&[("a", 1)], &[])).await;
    assert_eq!(proxy.recv().await.type_url, AUTHORIZATION_TYPE_URL);
    assert_eq!(h.counter(m::XDS_PUSHES, Some("other")), 1);
    // Up to 16 types per stream; the 17th ends it.
    for i in 3..MAX_TYPES_PER_STREAM {
        proxy
            .send(subscribe(&format!("type.googleapis.com/x.T{i}"), false))
            .await;
        assert!(proxy.recv().await.resources.is_empty());
    }
    proxy
        .send(subscribe("type.googleapis.com/x.TooMany", false))
        .await;
    let status = proxy.recv_status().await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("too many type urls"),
        "{status:?}"
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let h = harness(fast()).await;
    let (mut proxy, _) = h.ztunnel(Default::default()).await;
    h.shutdown.cancel();
    let status = proxy.recv_status().await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("shutting down"), "{status:?}");
    tokio::time::timeout(WAIT, h.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_hundred_streams_all_receive_an_update() {
    let h = harness(fast()).await;
    let channel = h.channel().await;
    let mut proxies = Vec::new();
    for _ in 0..100 {
        let mut proxy = Proxy::open(channel.clone(), Some(TOKEN)).await.unwrap();
        proxy.send(subscribe(AUTHORIZATION_TYPE_URL, true)).await;
        let first = proxy.recv().await;
        proxy.ack(&first).await;
        proxies.push(proxy);
    }
    assert_eventually(|| h.connected() == 100.0).await;
    h.publish(set_of(&[("a", 1)], &[])).await;
    let updates = futures::future::join_all(proxies.iter_mut().map(|p| p.recv())).await;
    assert!(updates.iter().all(|u| names(u).0 == ["ns/a"]));
    assert_eq!(h.counter(m::XDS_PUSHES, Some("wdsauthz")), 200);
}

async fn assert_eventually(mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
