//! The composition root in process: admin endpoints, readiness after the first ZDS snapshot,
//! config reload, a CA that is down, and shutdown through `/quitquitquit`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use mesh_core::testing::TestCa;
use mesh_core::zds::ZdsListener;
use mesh_proto::zds::{SnapshotSent, WorkloadRequest, WorkloadResponse, workload_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

const ONE_POD: &str =
    "workloads: [{uid: a, name: a, namespace: ns, workloadIps: [10.0.0.1], protocol: HBONE}]";
const TWO_PODS: &str =
    "workloads: [{uid: a, name: a, namespace: ns, workloadIps: [10.0.0.1], protocol: HBONE},
  {uid: b, name: b, namespace: ns, workloadIps: [10.0.0.2], protocol: TCP}]";

fn test_config(dir: &Path) -> Config {
    std::fs::write(
        dir.join("root.pem"),
        TestCa::new("cluster.local").root_pem(),
    )
    .unwrap();
    std::fs::write(dir.join("workloads.yaml"), ONE_POD).unwrap();
    let path = |f: &str| dir.join(f).display().to_string();
    let pairs = [
        (config::ADMIN_ADDR, "127.0.0.1:0".to_string()),
        (config::ZDS_SOCKET, path("zds.sock")),
        // Nothing listens there: the CA is down for the whole test.
        (config::CA_ADDRESS, "https://127.0.0.1:1".to_string()),
        (config::CA_ROOT, path("root.pem")),
        (config::LOCAL_CONFIG, path("workloads.yaml")),
        (config::LOCAL_CONFIG_POLL, "20ms".to_string()),
        (config::WORKER_THREADS, "1".to_string()),
    ];
    let source: HashMap<String, String> =
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Config::from_source(&source).unwrap()
}

async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Plays the node agent: accepts ztunnel, reads its hello, sends an empty snapshot.
async fn empty_snapshot(listener: &ZdsListener) {
    let sock = listener.accept().await.unwrap();
    sock.recv_datagram().await.unwrap();
    let done = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    sock.send(&done, None).await.unwrap();
    let ack: WorkloadResponse = sock.recv_datagram().await.unwrap().decode("ack").unwrap();
    assert!(ack.payload.is_some());
    // Keep the connection open for the rest of the test.
    std::mem::forget(sock);
}

#[tokio::test]
async fn admin_readiness_dump_reload_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let zds = ZdsListener::bind(&config.inpod.zds_socket).unwrap();
    let bound = build(config).await.unwrap();
    let admin = bound.admin_address();

    let (status, body) = get(admin, "GET", "/healthz/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: waiting for zds snapshot\n")
    );
    empty_snapshot(&zds).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(admin, "GET", "/healthz/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (status, body) = get(admin, "GET", "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["workloads"].as_array().unwrap().len(), 1);
    assert_eq!(dump["pods"], serde_json::json!([]));
    assert_eq!(dump["config"]["ca"]["address"], "https://127.0.0.1:1");

    // An edit is picked up; a broken edit keeps the last good config.
    std::fs::write(dir.path().join("workloads.yaml"), TWO_PODS).unwrap();
    wait_for_workloads(admin, 2).await;
    std::fs::write(dir.path().join("workloads.yaml"), "workloads: [{uid: }]").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    wait_for_workloads(admin, 2).await;

    assert_eq!(get(admin, "GET", "/metrics").await.0, 200);
    let (status, body) = get(admin, "GET", "/nope").await;
    assert_eq!(status, 404);
    assert!(body.contains("/config_dump"), "{body}");
    assert_eq!(get(admin, "GET", "/quitquitquit").await.0, 405);
    assert_eq!(get(admin, "POST", "/quitquitquit").await.0, 200);
    tokio::time::timeout(Duration::from_secs(5), bound.wait_termination())
        .await
        .expect("shutdown within the deadline")
        .unwrap();
}

async fn wait_for_workloads(admin: SocketAddr, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dump: serde_json::Value =
            serde_json::from_str(&get(admin, "GET", "/config_dump").await.1).unwrap();
        if dump["workloads"].as_array().map(Vec::len) == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "config never had {n} workloads: {dump}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn startup_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.ca.root_cert = dir.path().join("missing.pem");
    let err = build(config).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot read the ca root certificate"),
        "{err:#}"
    );

    let mut config = test_config(dir.path());
    std::fs::write(dir.path().join("workloads.yaml"), "workloads: [{uid: x}]").unwrap();
    config.state.poll_interval = None;
    let err = build(config).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("invalid local config"),
        "{err:#}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = test_config(dir.path());
    config.admin.addr = taken.local_addr().unwrap();
    let err = build(config).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot bind the admin server"),
        "{err:#}"
    );
}

/// ztunnel configured from xDS: not ready until both types answered, then `/config_dump` shows
/// the pushed workloads and the connection state, and `/metrics` the NACK counter.
#[tokio::test]
async fn xds_config_source_readiness_dump_and_metrics() {
    use crate::xds::testutil::{self, AdsServer, Pki};
    use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let mut ads = AdsServer::start(&pki, "127.0.0.1:0".parse().unwrap()).await;
    std::fs::write(dir.path().join("xds-root.pem"), &pki.root_pem).unwrap();
    let mut config = test_config(dir.path());
    config.state.local_config = None;
    config.state.xds = Some(config::XdsConfig {
        address: format!("https://{}", ads.addr),
        root_cert: dir.path().join("xds-root.pem"),
        server_name: Some("localhost".into()),
    });
    let zds = ZdsListener::bind(&config.inpod.zds_socket).unwrap();
    let bound = build(config).await.unwrap();
    let admin = bound.admin_address();
    empty_snapshot(&zds).await;

    let mut conn = ads.conn().await;
    conn.initial().await;
    let (status, body) = get(admin, "GET", "/healthz/ready").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("xds address") && body.contains("xds authorization"),
        "{body}"
    );
    let resources = vec![
        testutil::workload("a", [10, 0, 0, 1], "v1"),
        testutil::bad_workload("b", "v1"),
    ];
    let nack = conn.exchange(ADDRESS_TYPE_URL, "n1", resources, &[]).await;
    assert!(nack.error_detail.is_some());
    conn.exchange(AUTHORIZATION_TYPE_URL, "n2", vec![], &[])
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(admin, "GET", "/healthz/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let dump: serde_json::Value =
        serde_json::from_str(&get(admin, "GET", "/config_dump").await.1).unwrap();
    assert_eq!(dump["workloads"][0]["uid"], "a");
    let xds = &dump["xds"];
    assert_eq!(xds["connected"], true, "{xds}");
    assert_eq!(xds["types"][ADDRESS_TYPE_URL]["last_nonce"], "n1");
    assert_eq!(xds["types"][ADDRESS_TYPE_URL]["versions"]["a"], "v1");
    let nack_error = xds["types"][ADDRESS_TYPE_URL]["last_nack_error"]
        .as_str()
        .unwrap();
    assert!(nack_error.contains("workload \"b\""), "{nack_error}");
    assert_eq!(xds["types"][AUTHORIZATION_TYPE_URL]["last_acked"], true);

    let metrics = get(admin, "GET", "/metrics").await.1;
    assert!(
        metrics.contains("ztunnel_xds_nacks_total{type=\"address\"} 1"),
        "{metrics}"
    );
    // The control plane goes away: the termination is counted and the config stays.
    drop(conn);
    ads.stop().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = get(admin, "GET", "/metrics").await.1;
        if metrics.contains("ztunnel_xds_connection_terminations_total{reason=\"ConnectionError\"}")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_workloads(admin, 1).await;
    bound.shutdown_handle().cancel();
    tokio::time::timeout(Duration::from_secs(5), bound.wait_termination())
        .await
        .expect("shutdown within the deadline")
        .unwrap();
}

#[tokio::test]
async fn an_unreadable_xds_root_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.state.local_config = None;
    config.state.xds = Some(config::XdsConfig {
        address: "https://127.0.0.1:1".into(),
        root_cert: dir.path().join("missing.pem"),
        server_name: None,
    });
    let err = build(config).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot read the xds root certificate"),
        "{err:#}"
    );
}
