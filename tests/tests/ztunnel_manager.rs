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
use mesh_core::ca_client::{CaClientError, CertificateProvider};
use mesh_core::cert_manager::{CertManagerConfig, CertificateManager};
use mesh_core::testing::TestCa;
use mesh_core::zds::NetnsFd;
use mesh_proto::zds::WorkloadInfo;
use mesh_testbed::apps::{self, App};
use mesh_testbed::{Cluster, Pod, require_netns_tools};
use mesh_tests::mesh::proc_netns;
use metrics_util::debugging::DebuggingRecorder;
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

fn manager(store: Store) -> ProxyManager {
    let provider = Arc::new(TestCaProvider(TestCa::new("cluster.local")));
    let certs = CertificateManager::new(provider, CertManagerConfig::default());
    let inputs = ProxyInputs {
        store: Arc::new(SharedStore::new(store)),
        certs: Arc::new(CertSource::new(Arc::new(certs), Handle::current())),
        metrics: Metrics::new(Arc::new(DebuggingRecorder::new())),
        settings: ProxySettings {
            drain_timeout: DRAIN,
            ..ProxySettings::default()
        },
    };
    ProxyManager::new(Arc::new(inputs), Handle::current())
}

fn store(pods: &[&Pod]) -> Result<Store> {
    let mut yaml = String::from("workloads:\n");
    for pod in pods {
        let name = pod.name();
        yaml.push_str(&format!(
            "- {{uid: {name}, name: {name}, namespace: ns, workloadIps: [{}], protocol: HBONE}}\n",
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
    let manager = manager(store(&[&a, &b])?);

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

    // A re-add with another namespace replaces the proxy: the old pod's listeners close.
    manager
        .add(add("uid-a", &a, "a")?)
        .await
        .map_err(anyhow::Error::msg)?;
    manager
        .add(add("uid-a", &b, "b")?)
        .await
        .map_err(anyhow::Error::msg)?;
    ensure!(
        !hbone_listening(&client, &a).await?,
        "old namespace still served after replace"
    );
    ensure!(
        hbone_listening(&client, &b).await?,
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
        !hbone_listening(&client, &b).await?,
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
