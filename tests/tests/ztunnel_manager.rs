//! ztunnel's proxy manager in process against real pod namespaces: listeners appear inside the
//! pod on add, move when the pod's sandbox is replaced, disappear on delete and on a snapshot
//! that no longer names the pod; a deleted pod's open connections survive until the drain
//! deadline and are then cut.
//!
//! Needs root; run inside the sandbox:
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test ztunnel_manager`

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::future::BoxFuture;
use mesh_core::Identity;
use mesh_core::WorkloadCertificate;
use mesh_core::ca_client::{CaClient, CaClientConfig};
use mesh_core::ca_client::{CaClientError, CertificateProvider};
use mesh_core::cert_manager::{CertManagerConfig, CertificateManager};
use mesh_core::testing::TestCa;
use mesh_core::zds::NetnsFd;
use mesh_proto::zds::WorkloadInfo;
use mesh_testbed::apps::{self, App};
use mesh_testbed::{Cluster, Pod, require_netns_tools};
use mesh_tests::mesh::proc_netns;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;
use zmesh_cni::rules::{self, Backend, CaptureConfig};
use ztunnel::certs::CertSource;
use ztunnel::inpod::{AddKind, ProxyManager, WorkloadAdd, WorkloadProxyManager};
use ztunnel::metrics::Metrics;
use ztunnel::proxy::{ProxyInputs, ProxySettings};
use ztunnel::state::local::LocalConfig;
use ztunnel::state::{SharedStore, Store};

const APP_PORT: u16 = 8080;
const DRAIN: Duration = Duration::from_millis(800);
/// How long a connection that must not be accepted is given.
const QUIET: Duration = Duration::from_secs(2);

struct TestCaProvider(TestCa);

impl CertificateProvider for TestCaProvider {
    fn fetch_certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>> {
        Box::pin(std::future::ready(Ok(self.0.issue(identity))))
    }
}

fn manager_with(
    store: Store,
    provider: Arc<dyn CertificateProvider>,
) -> (ProxyManager, Snapshotter) {
    let certs = CertificateManager::new(provider, CertManagerConfig::default());
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let inputs = ProxyInputs {
        store: Arc::new(SharedStore::new(store)),
        certs: Arc::new(CertSource::new(Arc::new(certs), Handle::current())),
        metrics: Metrics::new(Arc::new(recorder)),
        settings: ProxySettings {
            drain_timeout: DRAIN,
            ..ProxySettings::default()
        },
        connections: Default::default(),
    };
    (
        ProxyManager::new(Arc::new(inputs), Handle::current()),
        snapshotter,
    )
}

fn store(pods: &[&Pod]) -> Result<Store> {
    store_with(pods, &[])
}

/// Meshed `pods` and unmeshed `plain` pods.
fn store_with(pods: &[&Pod], plain: &[&Pod]) -> Result<Store> {
    let mut yaml = String::from("workloads:\n");
    let meshed = pods.iter().map(|p| (p, "HBONE"));
    for (pod, protocol) in meshed.chain(plain.iter().map(|p| (p, "TCP"))) {
        let name = pod.name();
        yaml.push_str(&format!(
            "- {{uid: {name}, name: {name}, namespace: ns, workloadIps: [{}], protocol: {protocol}}}\n",
            pod.ip()
        ));
    }
    Ok(Store::from_local(LocalConfig::parse(&yaml)?))
}

fn add(uid: &str, pod: &Pod, name: &str) -> Result<WorkloadAdd> {
    Ok(WorkloadAdd {
        uid: uid.to_string(),
        info: Some(WorkloadInfo {
            name: name.to_string(),
            namespace: "ns".to_string(),
            service_account: "default".to_string(),
        }),
        netns: NetnsFd::new(proc_netns(pod)?)?,
        // The manager compares namespaces itself; the client's classification is advisory.
        kind: AddKind::New,
    })
}

/// Whether something accepts TCP on `pod`'s HBONE port. With no listener, the TPROXY rule
/// drops the SYN, so "not listening" shows as a connect that does not complete.
async fn hbone_listening(from: &Pod, pod: &Pod) -> Result<bool> {
    let addr = SocketAddr::from((pod.ip(), 15008));
    let ns = from.open_netns()?;
    let connect = apps::connect(&ns, addr);
    Ok(matches!(
        tokio::time::timeout(QUIET, connect).await,
        Ok(Ok(_))
    ))
}

/// Whether `pod`'s HBONE listener is gone. A drain closes it asynchronously, so this retries
/// while connections are still accepted, for a few seconds.
async fn hbone_closed(from: &Pod, pod: &Pod) -> Result<bool> {
    let addr = SocketAddr::from((pod.ip(), 15008));
    let ns = from.open_netns()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let connect = apps::connect(&ns, addr);
        // Dropped SYN (TPROXY with no socket) or a refusal: nobody listens.
        if !matches!(
            tokio::time::timeout(Duration::from_millis(500), connect).await,
            Ok(Ok(_))
        ) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

fn echo(pod: &Pod) -> Result<App> {
    let addr = SocketAddr::from(([0, 0, 0, 0], APP_PORT));
    Ok(apps::start_echo(&pod.open_netns()?, addr)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_proxies_follow_zds_requests() -> Result<()> {
    if !require_netns_tools(&["iptables-restore", "iptables-save"]) {
        return Ok(());
    }
    let cluster = Cluster::new("ztm")?;
    let node = cluster.add_node("n1")?;
    let (a, b, client) = (
        node.add_pod("a")?,
        node.add_pod("b")?,
        node.add_pod("client")?,
    );
    for pod in [&a, &b] {
        rules::apply(
            &pod.netns_path(),
            Backend::Iptables,
            &CaptureConfig::default(),
        )?;
    }
    let _apps = (echo(&a)?, echo(&b)?);
    let provider = Arc::new(TestCaProvider(TestCa::new("cluster.local")));
    let (manager, metrics) = manager_with(store(&[&a, &b])?, provider);

    manager
        .add(add("uid-a", &a, "a")?)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        hbone_listening(&client, &a).await?,
        "no listener in pod a after add"
    );
    // Plaintext to the app goes through the pod's 15006 and keeps the client's address.
    let app = SocketAddr::from((a.ip(), APP_PORT));
    let reply = apps::echo_roundtrip(&client.open_netns()?, app, b"hi").await?;
    ensure!(reply.peer.ip() == client.ip(), "app saw {}", reply.peer);

    // Adding the same pod again changes nothing.
    manager
        .add(add("uid-a", &a, "a")?)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(manager.len() == 1);

    drain_keeps_open_connections_until_the_deadline(&manager, &client, app).await?;

    replace_then_snapshot(&manager, &client, &a, &b).await?;
    // Three starts (add, re-add after delete, replace) and three stops (delete, replace, snapshot).
    // One snapshot: the debugging recorder only reports what changed since the previous one.
    let snapshot = metrics.snapshot().into_vec();
    let started = value(&snapshot, "workload_manager_proxies_started_total");
    let stopped = value(&snapshot, "workload_manager_proxies_stopped_total");
    let active = value(&snapshot, "workload_manager_active_proxy_count");
    ensure!(
        (started, stopped, active) == (3, 3, 0),
        "started {started}, stopped {stopped}, active {active}"
    );
    Ok(())
}

/// A re-add with another namespace replaces the proxy; a snapshot without the pod removes it.
async fn replace_then_snapshot(
    manager: &ProxyManager,
    client: &Pod,
    a: &Pod,
    b: &Pod,
) -> Result<()> {
    // A re-add with another namespace replaces the proxy: the old pod's listeners close.
    manager
        .add(add("uid-a", a, "a")?)
        .await
        .map_err(anyhow::Error::msg)?;
    manager
        .add(add("uid-a", b, "b")?)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        hbone_closed(client, a).await?,
        "old namespace still served after replace"
    );
    ensure!(
        hbone_listening(client, b).await?,
        "new namespace not served after replace"
    );
    let dump = manager.dump();
    ensure!(dump.len() == 1 && dump[0].info.name == "b", "{dump:?}");

    // A snapshot that no longer names the pod removes it.
    manager
        .snapshot_sent(HashSet::new())
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(manager.is_empty(), "{:?}", manager.dump());
    ensure!(
        hbone_closed(client, b).await?,
        "pod b still served after the snapshot"
    );
    Ok(())
}

async fn drain_keeps_open_connections_until_the_deadline(
    manager: &ProxyManager,
    client: &Pod,
    app: SocketAddr,
) -> Result<()> {
    let mut open = apps::connect(&client.open_netns()?, app).await?;
    open.write_all(b"before\n").await?;
    read_until(&mut open, "before\n").await?;
    manager
        .del("uid-a".to_string())
        .await
        .map_err(anyhow::Error::msg)?;
    let deleted_at = Instant::now();
    // The open connection keeps working until the deadline, and is cut after it.
    open.write_all(b"during drain\n").await?;
    read_until(&mut open, "during drain\n").await?;
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(DRAIN * 4, open.read_to_end(&mut rest)).await;
    ensure!(cut.is_ok(), "the connection outlived the drain deadline");
    let lived = deleted_at.elapsed();
    ensure!(
        lived >= DRAIN / 2,
        "cut after {lived:?}, before the {DRAIN:?} deadline"
    );
    // New connections are not accepted any more.
    let ns = client.open_netns()?;
    let fresh = apps::echo_roundtrip(&ns, app, b"x");
    let fresh = tokio::time::timeout(QUIET, fresh).await;
    ensure!(
        !matches!(fresh, Ok(Ok(_))),
        "a deleted pod accepted a new connection"
    );
    Ok(())
}

/// Reads until `want` arrived (or fails: EOF, error, 5 s without it).
async fn read_until(stream: &mut tokio::net::TcpStream, want: &str) -> Result<()> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .context("read timed out")??;
        ensure!(
            n > 0,
            "connection closed before {want:?}; got {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

/// With the CA down, meshed connections fail clearly (counted with `NO_CERTIFICATE`) while
/// traffic that needs no certificate keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_fails_meshed_connections_only() -> Result<()> {
    if !require_netns_tools(&["iptables-restore", "iptables-save"]) {
        return Ok(());
    }
    let cluster = Cluster::new("ztca")?;
    let node = cluster.add_node("n1")?;
    let (client, server, plain) = (node.add_pod("c")?, node.add_pod("s")?, node.add_pod("p")?);
    rules::apply(
        &client.netns_path(),
        Backend::Iptables,
        &CaptureConfig::default(),
    )?;
    let _apps = (echo(&server)?, echo(&plain)?);
    // Nothing listens on port 1: every certificate request fails.
    let root = TestCa::new("cluster.local").root_pem();
    let ca = CaClient::new(CaClientConfig::new("https://127.0.0.1:1", root))?;
    let (manager, metrics) =
        manager_with(store_with(&[&client, &server], &[&plain])?, Arc::new(ca));
    manager
        .add(add("uid-c", &client, "c")?)
        .await
        .map_err(anyhow::Error::msg)?;

    let ns = client.open_netns()?;
    let meshed = apps::echo_roundtrip(&ns, SocketAddr::from((server.ip(), APP_PORT)), b"x").await;
    ensure!(
        meshed.is_err(),
        "a meshed connection worked without a certificate: {meshed:?}"
    );
    let failed = counter(
        &metrics,
        "istio_tcp_connections_closed_total",
        "NO_CERTIFICATE",
    );
    ensure!(failed >= 1, "no NO_CERTIFICATE close recorded");
    let reply = apps::echo_roundtrip(&ns, SocketAddr::from((plain.ip(), APP_PORT)), b"y").await?;
    ensure!(
        reply.peer.ip() == client.ip(),
        "passthrough peer {}",
        reply.peer
    );
    Ok(())
}

type Sample = (
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
);

/// The value of the unlabelled counter or gauge `name`.
fn value(snapshot: &[Sample], name: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == name)
        .map(|(.., value)| match value {
            DebugValue::Counter(v) => *v,
            DebugValue::Gauge(v) => v.into_inner() as u64,
            _ => 0,
        })
        .sum()
}

/// Sum of `name` counters whose `response_flags` is `flags`.
fn counter(snapshotter: &Snapshotter, name: &str, flags: &str) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| {
            key.key()
                .labels()
                .any(|l| l.key() == "response_flags" && l.value() == flags)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(v) => v,
            _ => 0,
        })
        .sum()
}
