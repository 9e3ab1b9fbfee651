//! The client against a real tonic ADS server over TLS on loopback, scripted by each test.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_proto::security::Authorization;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tonic::Status;

use super::*;
use crate::xds::NodeIdentity;
use crate::xds::testutil::{self, AdsServer, Pki, WAIT};

const TOKEN: &str = "t0k3n";

struct Harness {
    pki: Pki,
    server: Option<AdsServer>,
    store: Arc<SharedStore>,
    readiness: Readiness,
    metrics: Counters,
    status: XdsStatus,
    client: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.client.abort();
    }
}

impl Harness {
    fn srv(&mut self) -> &mut AdsServer {
        self.server.as_mut().expect("server running")
    }
}

fn client_config(pki: &Pki, addr: SocketAddr) -> XdsClientConfig {
    let node = NodeIdentity {
        pod_name: "ztunnel-1".into(),
        pod_namespace: "istio-system".into(),
        instance_ip: Some("10.0.0.7".parse().unwrap()),
        node_name: Some("node1".into()),
        cluster_id: "c1".into(),
    };
    let mut c = XdsClientConfig::new(format!("https://{addr}"), &pki.root_pem, node);
    c.tls_server_name = Some("localhost".into());
    c.token = AuthToken::Literal(TOKEN.into());
    c.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    c
}

async fn start() -> Harness {
    start_with(AuthToken::Literal(TOKEN.into())).await
}

/// A server and a running client that authenticates with `token`.
async fn start_with(token: AuthToken) -> Harness {
    let pki = Pki::new();
    let server = AdsServer::start(&pki, "127.0.0.1:0".parse().unwrap()).await;
    let mut config = client_config(&pki, server.addr);
    config.token = token;
    let store = Arc::new(SharedStore::default());
    let readiness = Readiness::default();
    let recorder = DebuggingRecorder::new();
    let metrics = Counters::new(recorder.snapshotter());
    let xds_metrics = XdsMetrics::new(Arc::new(recorder));
    let client = XdsClient::new(config, store.clone(), &readiness, xds_metrics).unwrap();
    let status = client.status();
    let client = tokio::spawn(client.run());
    Harness {
        pki,
        server: Some(server),
        store,
        readiness,
        metrics,
        status,
        client,
    }
}

/// Counter totals; the debugging recorder's snapshots drain counters, so this accumulates.
struct Counters {
    snapshotter: Snapshotter,
    totals: std::sync::Mutex<BTreeMap<(String, String), u64>>,
}

impl Counters {
    fn new(snapshotter: Snapshotter) -> Self {
        Self {
            snapshotter,
            totals: Default::default(),
        }
    }
}

fn counter(c: &Counters, name: &str, label: &str) -> u64 {
    let mut totals = c.totals.lock().unwrap();
    for (k, _, _, v) in c.snapshotter.snapshot().into_vec() {
        let DebugValue::Counter(n) = v else { continue };
        for l in k.key().labels() {
            let key = (k.key().name().to_string(), l.value().to_string());
            *totals.entry(key).or_default() += n;
        }
    }
    totals
        .get(&(name.to_string(), label.to_string()))
        .copied()
        .unwrap_or_default()
}

/// Polls `check` until it holds, for at most [`WAIT`].
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn subscribes_wildcard_and_is_ready_after_the_first_response_of_each_type() {
    let mut h = start().await;
    let mut conn = h.srv().conn().await;
    let auth = conn.metadata.get("authorization").unwrap();
    assert_eq!(auth, &format!("Bearer {TOKEN}"));
    assert_eq!(conn.metadata.get("clusterid").unwrap(), "c1");
    let (a, b) = conn.initial().await;
    for r in [&a, &b] {
        let node = r.node.as_ref().expect("node on the first request");
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.7~ztunnel-1.istio-system~istio-system.svc.cluster.local"
        );
        assert!(r.resource_names_subscribe.is_empty() && r.initial_resource_versions.is_empty());
    }
    assert_eq!(h.readiness.pending(), ["xds address", "xds authorization"]);

    let ack = conn
        .exchange(
            ADDRESS_TYPE_URL,
            "n1",
            vec![testutil::workload("a", [10, 0, 0, 1], "v1")],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none(), "{ack:?}");
    assert_eq!(h.readiness.pending(), ["xds authorization"]);
    assert!(
        h.store
            .snapshot()
            .workload_by_ip("", ip("10.0.0.1"))
            .is_some()
    );
    // An empty first response still counts.
    let ack = conn
        .exchange(AUTHORIZATION_TYPE_URL, "n2", vec![], &[])
        .await;
    assert!(ack.error_detail.is_none());
    assert!(h.readiness.is_ready());

    let status = h.status.snapshot();
    assert!(status.connected && status.connections == 1, "{status:?}");
    let address = &status.types[ADDRESS_TYPE_URL];
    assert_eq!(address.last_nonce.as_deref(), Some("n1"));
    assert!(address.last_acked && address.last_nack_error.is_none());
    assert_eq!(address.last_acked_nonce.as_deref(), Some("n1"));
    assert_eq!(address.system_version, "sys-n1");
    assert_eq!(address.versions["a"].to_string(), "v1");
}

#[tokio::test]
async fn bad_resources_are_nacked_by_name_while_the_rest_is_applied() {
    let mut h = start().await;
    let mut conn = h.srv().conn().await;
    conn.initial().await;
    let resources = vec![
        testutil::workload("a", [10, 0, 0, 1], "v1"),
        testutil::bad_workload("b", "v1"),
        testutil::service("echo", [10, 96, 0, 1], "v1"),
    ];
    let nack = conn.exchange(ADDRESS_TYPE_URL, "n1", resources, &[]).await;
    let detail = nack.error_detail.expect("a nack");
    assert!(
        detail.message.contains("workload \"b\": addresses[0]"),
        "{}",
        detail.message
    );
    assert!(!detail.message.contains("\"a\""), "{}", detail.message);
    let store = h.store.snapshot();
    assert!(store.workload("a").is_some() && store.workload("b").is_none());
    assert!(store.service_by_vip("", ip("10.96.0.1")).is_some());

    let mut bad = testutil::policy("ns", "bad", "v1");
    let mut p: Authorization = mesh_proto::any::unpack(bad.resource.as_ref().unwrap()).unwrap();
    p.action = 42;
    bad.resource = Some(mesh_proto::any::pack(&p));
    let nack = conn
        .exchange(AUTHORIZATION_TYPE_URL, "n2", vec![bad], &[])
        .await;
    assert!(nack.error_detail.unwrap().message.contains("ns/bad"));
    // A NACKed first response still makes the type ready: the good part is applied.
    assert!(h.readiness.is_ready());

    assert_eq!(counter(&h.metrics, crate::xds::XDS_NACKS, "address"), 1);
    assert_eq!(
        counter(&h.metrics, crate::xds::XDS_NACKS, "authorization"),
        1
    );
    let status = h.status.snapshot();
    let address = &status.types[ADDRESS_TYPE_URL];
    assert!(!address.last_acked && address.last_acked_nonce.is_none());
    assert!(
        address
            .last_nack_error
            .as_deref()
            .unwrap()
            .contains("\"b\"")
    );
    assert!(!address.versions.contains_key("b"));

    // A later good response is ACKed; the last NACK error stays visible.
    let ack = conn
        .exchange(
            ADDRESS_TYPE_URL,
            "n3",
            vec![testutil::workload("b", [10, 0, 0, 2], "v2")],
            &[],
        )
        .await;
    assert!(ack.error_detail.is_none());
    assert!(h.store.snapshot().workload("b").is_some());
}

#[tokio::test]
async fn removals_remove_and_unknown_types_are_nacked() {
    let mut h = start().await;
    let mut conn = h.srv().conn().await;
    conn.initial().await;
    let add = vec![
        testutil::workload("a", [10, 0, 0, 1], "v1"),
        testutil::workload("b", [10, 0, 0, 2], "v1"),
    ];
    conn.exchange(ADDRESS_TYPE_URL, "n1", add, &[]).await;
    let before = h.store.version();
    let ack = conn.exchange(ADDRESS_TYPE_URL, "n2", vec![], &["a"]).await;
    assert!(ack.error_detail.is_none());
    // The whole response was applied in one replace.
    assert_eq!(h.store.version(), before + 1);
    let store = h.store.snapshot();
    assert!(store.workload("a").is_none() && store.workload("b").is_some());
    assert!(
        !h.status.snapshot().types[ADDRESS_TYPE_URL]
            .versions
            .contains_key("a")
    );

    let other = "type.googleapis.com/istio.workload.Workload";
    let nack = conn.exchange(other, "n3", vec![], &[]).await;
    let msg = nack.error_detail.unwrap().message;
    assert!(msg.contains("unsupported type url"), "{msg}");
    assert_eq!(counter(&h.metrics, crate::xds::XDS_NACKS, "unknown"), 1);
}

#[tokio::test]
async fn reconnects_with_initial_resource_versions_and_keeps_the_store() {
    let mut h = start().await;
    let mut conn = h.srv().conn().await;
    conn.initial().await;
    let resources = vec![
        testutil::workload("a", [10, 0, 0, 1], "v1"),
        testutil::service("echo", [10, 96, 0, 1], "v7"),
    ];
    conn.exchange(ADDRESS_TYPE_URL, "n1", resources, &[]).await;
    conn.exchange(AUTHORIZATION_TYPE_URL, "n2", vec![], &[])
        .await;
    // The server ends the stream cleanly.
    drop(conn);
    let mut conn = h.srv().conn().await;
    let (a, b) = conn.initial().await;
    let want = BTreeMap::from([
        ("a".to_string(), "v1".to_string()),
        (
            "default/echo.default.svc.cluster.local".to_string(),
            "v7".to_string(),
        ),
    ]);
    assert_eq!(a.initial_resource_versions, want);
    assert!(a.node.is_some() && b.node.is_some());
    assert!(b.initial_resource_versions.is_empty());
    assert!(h.store.snapshot().workload("a").is_some());
    assert!(h.readiness.is_ready());
    assert_eq!(
        counter(
            &h.metrics,
            crate::xds::XDS_CONNECTION_TERMINATIONS,
            "Complete"
        ),
        1
    );

    // A gRPC error from the server is counted as an error and also reconnects.
    conn.responses
        .unbounded_send(Err(Status::unavailable("going away")))
        .unwrap();
    let mut conn = h.srv().conn().await;
    conn.initial().await;
    assert_eq!(
        counter(&h.metrics, crate::xds::XDS_CONNECTION_TERMINATIONS, "Error"),
        1
    );
    eventually("third stream", || h.status.snapshot().connections == 3).await;
}

#[tokio::test]
async fn keeps_the_last_config_while_the_server_is_down_and_resyncs_after() {
    let mut h = start().await;
    let mut conn = h.srv().conn().await;
    conn.initial().await;
    conn.exchange(
        ADDRESS_TYPE_URL,
        "n1",
        vec![testutil::workload("a", [10, 0, 0, 1], "v1")],
        &[],
    )
    .await;
    let addr = h.srv().addr;
    drop(conn);
    h.server.take().unwrap().stop().await;

    // Down for a while: attempts keep coming at the (bounded) backoff, and the store is intact.
    let down = tokio::time::Instant::now();
    eventually("several failed connects", || {
        counter(
            &h.metrics,
            crate::xds::XDS_CONNECTION_TERMINATIONS,
            "ConnectionError",
        ) >= 4
    })
    .await;
    // 4 attempts at most 50 ms apart (plus connect time) on loopback: well under a second.
    assert!(
        down.elapsed() < Duration::from_secs(2),
        "{:?}",
        down.elapsed()
    );
    let status = h.status.snapshot();
    assert!(!status.connected);
    assert!(
        status
            .last_error
            .unwrap()
            .contains("cannot connect to the xds server")
    );
    assert!(h.store.snapshot().workload("a").is_some());

    // Back on the same address: the client resynchronises.
    let mut server = AdsServer::start(&h.pki, addr).await;
    let mut conn = server.conn().await;
    let (a, _) = conn.initial().await;
    assert_eq!(a.initial_resource_versions["a"], "v1");
    conn.exchange(
        ADDRESS_TYPE_URL,
        "m1",
        vec![testutil::workload("c", [10, 0, 0, 3], "v1")],
        &["a"],
    )
    .await;
    let store = h.store.snapshot();
    assert!(store.workload("a").is_none() && store.workload("c").is_some());
    assert!(h.status.snapshot().connected);
}

#[tokio::test]
async fn an_untrusted_server_is_never_believed() {
    let pki = Pki::new();
    let mut server = AdsServer::start(&pki, "127.0.0.1:0".parse().unwrap()).await;
    // The client trusts another root.
    let config = client_config(&Pki::new(), server.addr);
    let store = Arc::new(SharedStore::default());
    let readiness = Readiness::default();
    let recorder = DebuggingRecorder::new();
    let metrics = Counters::new(recorder.snapshotter());
    let client = XdsClient::new(
        config,
        store,
        &readiness,
        XdsMetrics::new(Arc::new(recorder)),
    )
    .unwrap();
    let status = client.status();
    let task = tokio::spawn(client.run());
    eventually("tls failures", || {
        counter(
            &metrics,
            crate::xds::XDS_CONNECTION_TERMINATIONS,
            "ConnectionError",
        ) >= 2
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(50), server.conn())
            .await
            .is_err()
    );
    assert!(!readiness.is_ready());
    assert_eq!(status.snapshot().connections, 0);
    task.abort();
}

#[test]
fn bad_settings_are_clear_errors() {
    let pki = Pki::new();
    let node = NodeIdentity::default();
    let cases = [
        (
            "http://127.0.0.1:15012",
            pki.root_pem.clone(),
            "the scheme must be https",
        ),
        ("not a url", pki.root_pem.clone(), "invalid xds address"),
        (
            "https://127.0.0.1:15012",
            "garbage".to_string(),
            "invalid xds root certificate",
        ),
    ];
    for (address, root, want) in cases {
        let config = XdsClientConfig::new(address, root, node.clone());
        let recorder = Arc::new(DebuggingRecorder::new());
        let err = XdsClient::new(
            config,
            Arc::new(SharedStore::default()),
            &Readiness::default(),
            XdsMetrics::new(recorder),
        )
        .unwrap_err();
        assert!(err.to_string().contains(want), "{address}: {err}");
    }
    let bad_cluster = NodeIdentity {
        cluster_id: "bad\nvalue".into(),
        ..Default::default()
    };
    let config = XdsClientConfig::new("https://127.0.0.1:15012", pki.root_pem, bad_cluster);
    let err = XdsClient::new(
        config,
        Arc::new(SharedStore::default()),
        &Readiness::default(),
        XdsMetrics::new(Arc::new(DebuggingRecorder::new())),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cluster id is not a valid grpc metadata value")
    );
}

#[tokio::test]
async fn a_missing_token_file_fails_the_connection_clearly() {
    let h = start_with(AuthToken::File("/nonexistent/istio-token".into())).await;
    eventually("token error", || {
        h.status
            .snapshot()
            .last_error
            .is_some_and(|e| e.contains("cannot read xds auth token file /nonexistent/istio-token"))
    })
    .await;
}

#[tokio::test]
async fn a_refused_stream_is_a_connection_error_naming_the_status() {
    let h = start_with(AuthToken::Literal("refused-token".into())).await;
    eventually("refusal reported", || {
        h.status.snapshot().last_error.is_some_and(|e| {
            e.contains("Unauthenticated") && e.contains("token refused by the test server")
        })
    })
    .await;
    eventually("counted as a connection error", || {
        counter(
            &h.metrics,
            crate::xds::XDS_CONNECTION_TERMINATIONS,
            "ConnectionError",
        ) >= 1
    })
    .await;
    assert!(!h.readiness.is_ready());
    assert!(!h.status.snapshot().connected);
}
