//! Composition root: builds every component from a [`Config`] in one straight line and returns
//! the bound addresses and the shutdown handle.
//!
//! Two runtimes: the caller's (control: admin, CA and certificate rotation, ZDS, xDS or config reload;
//! meant to be a current-thread runtime) and a multi-thread data-plane runtime created here, on
//! which every pod proxy runs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use mesh_core::ca_client::{AuthToken, CaClient, CaClientConfig};
use mesh_core::cert_manager::{CertManagerConfig, CertificateManager};
use metrics::Recorder;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminServer, AdminState, DumpFn};
use crate::certs::CertSource;
use crate::config::{self, Config, TokenSource};
use crate::inpod::{ProxyManager, ZdsClient, ZdsClientConfig};
use crate::metrics::Metrics;
use crate::proxy::{ProxyInputs, ProxySettings};
use crate::readiness::Readiness;
use crate::state::local::LocalConfig;
use crate::state::{SharedStore, Store};
use crate::xds::{NodeIdentity, XdsClient, XdsClientConfig, XdsMetrics, XdsStatus};

/// A running ztunnel.
pub struct Bound {
    admin_address: SocketAddr,
    shutdown: CancellationToken,
    manager: Arc<ProxyManager>,
    readiness: Readiness,
    metrics: PrometheusHandle,
    tasks: Vec<JoinHandle<()>>,
    data: DataPlane,
    drain_timeout: Duration,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("admin_address", &self.admin_address)
            .finish_non_exhaustive()
    }
}

impl Bound {
    /// Where the admin server listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_handle(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The startup tasks still pending.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The metrics, rendered in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// The pod proxies.
    pub fn proxies(&self) -> &Arc<ProxyManager> {
        &self.manager
    }

    /// Waits for shutdown to be requested, then stops taking new pods, closes every listener at
    /// once, lets open connections run for at most the drain timeout, and stops.
    pub async fn wait_termination(mut self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        info!(timeout = ?self.drain_timeout, "draining");
        // The ZDS client goes first: the node agent then sends new pods to the other ztunnel.
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.manager.shutdown(self.drain_timeout).await;
        self.data.stop();
        info!("shut down");
        Ok(())
    }
}

/// The data-plane runtime; shut down without blocking (dropping a runtime inside another
/// runtime's task would panic).
struct DataPlane(Option<Runtime>);

impl DataPlane {
    fn new(threads: usize) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ztunnel-data")
            .enable_all()
            .build()
            .context("cannot start the data-plane runtime")?;
        Ok(Self(Some(runtime)))
    }

    fn handle(&self) -> Handle {
        self.0
            .as_ref()
            .expect("data plane running")
            .handle()
            .clone()
    }

    fn stop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds and starts every component. Must run on the control runtime.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    info!(config = %serde_json::to_string(&config)?, "starting ztunnel");
    let data = DataPlane::new(config.runtime.worker_threads)?;
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let recorder: Arc<dyn Recorder + Send + Sync> = Arc::new(recorder);
    let metrics = Metrics::new(recorder.clone());
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();

    let ca = CaClient::new(ca_client_config(&config.ca)?).context("invalid ca settings")?;
    let manager = CertificateManager::new(Arc::new(ca), CertManagerConfig::default());
    let certs = Arc::new(CertSource::new(Arc::new(manager), Handle::current()));

    let store = Arc::new(SharedStore::default());
    let xds = start_config_source(&config, &store, &readiness, &recorder, &mut tasks)?;

    let inputs = Arc::new(ProxyInputs {
        store: store.clone(),
        certs: certs.clone(),
        metrics,
        settings: proxy_settings(&config),
        connections: Default::default(),
    });
    let proxies = Arc::new(ProxyManager::new(inputs, data.handle()));
    let zds = ZdsClient::new(
        ZdsClientConfig::new(&config.inpod.zds_socket),
        proxies.clone(),
    );
    tasks.push(tokio::spawn(ready_after_snapshot(
        readiness.register("zds snapshot"),
        zds.snapshots(),
    )));
    tasks.push(tokio::spawn(zds.run()));

    let dump = config_dump(&config, &store, &proxies, &certs, xds);
    let admin_state = AdminState {
        readiness: readiness.clone(),
        dump,
        metrics: prometheus.clone(),
        shutdown: shutdown.clone(),
    };
    let admin = AdminServer::bind(config.admin.addr, admin_state).await?;
    let admin_address = admin.address();
    tasks.push(tokio::spawn(admin.run(shutdown.clone())));
    info!(admin = %admin_address, zds = %config.inpod.zds_socket.display(), "ztunnel started");

    Ok(Bound {
        admin_address,
        shutdown,
        manager: proxies,
        readiness,
        metrics: prometheus,
        tasks,
        data,
        drain_timeout: config.runtime.drain_timeout,
    })
}

fn proxy_settings(config: &Config) -> ProxySettings {
    ProxySettings {
        network: config.node.network.clone(),
        cluster_id: config.node.cluster_id.clone(),
        drain_timeout: config.runtime.drain_timeout,
        ..ProxySettings::default()
    }
}

/// Loads the local file (and watches it) or starts the xDS client; returns the latter's status.
fn start_config_source(
    config: &Config,
    store: &Arc<SharedStore>,
    readiness: &Readiness,
    recorder: &Arc<dyn Recorder + Send + Sync>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<Option<XdsStatus>> {
    if let Some(path) = &config.state.local_config {
        load_local_config(store, path)?;
        if let Some(every) = config.state.poll_interval {
            let watch = watch_local_config(store.clone(), path.clone(), every);
            tasks.push(tokio::spawn(watch));
        }
        return Ok(None);
    }
    let Some(xds) = &config.state.xds else {
        warn!(
            "neither {} nor {} given: no workloads are known, all traffic passes through",
            config::LOCAL_CONFIG,
            config::XDS_ADDRESS
        );
        return Ok(None);
    };
    let client = XdsClient::new(
        xds_client_config(config, xds)?,
        store.clone(),
        readiness,
        XdsMetrics::new(recorder.clone()),
    )
    .context("invalid xds settings")?;
    let status = client.status();
    tasks.push(tokio::spawn(client.run()));
    Ok(Some(status))
}

fn xds_client_config(config: &Config, xds: &config::XdsConfig) -> anyhow::Result<XdsClientConfig> {
    let root = std::fs::read_to_string(&xds.root_cert).with_context(|| {
        format!(
            "cannot read the xds root certificate {} ({} or {})",
            xds.root_cert.display(),
            config::XDS_ROOT,
            config::CA_ROOT
        )
    })?;
    let node = NodeIdentity {
        pod_name: config.node.pod_name.clone(),
        pod_namespace: config.node.pod_namespace.clone(),
        instance_ip: config.node.instance_ip,
        node_name: config.node.node_name.clone(),
        cluster_id: config.node.cluster_id.clone(),
    };
    let mut c = XdsClientConfig::new(&xds.address, root, node);
    c.tls_server_name = xds.server_name.clone();
    c.token = auth_token(&config.ca.token);
    Ok(c)
}

fn auth_token(token: &TokenSource) -> AuthToken {
    match token {
        TokenSource::None => AuthToken::None,
        TokenSource::Literal(t) => AuthToken::Literal(t.clone()),
        TokenSource::File(p) => AuthToken::File(p.clone()),
    }
}

fn ca_client_config(ca: &config::CaConfig) -> anyhow::Result<CaClientConfig> {
    let root = std::fs::read_to_string(&ca.root_cert).with_context(|| {
        format!(
            "cannot read the ca root certificate {} ({})",
            ca.root_cert.display(),
            config::CA_ROOT
        )
    })?;
    let mut c = CaClientConfig::new(&ca.address, root);
    c.tls_server_name = ca.server_name.clone();
    c.token = auth_token(&ca.token);
    c.cert_ttl = ca.cert_ttl;
    // A node proxy asks for its pods' certificates on their behalf.
    c.impersonate = true;
    Ok(c)
}

async fn ready_after_snapshot(
    guard: crate::readiness::ReadyGuard,
    mut snapshots: tokio::sync::watch::Receiver<u64>,
) {
    if snapshots.wait_for(|n| *n >= 1).await.is_ok() {
        info!("first zds snapshot reconciled");
        drop(guard);
    }
}

fn load_local_config(store: &SharedStore, path: &Path) -> anyhow::Result<()> {
    let config = LocalConfig::load(path)?;
    info!(
        path = %path.display(),
        workloads = config.workloads.len(),
        services = config.services.len(),
        "local config loaded"
    );
    store.replace(Store::from_local(config));
    Ok(())
}

/// Reloads the file when its modification time or size changes; a bad edit keeps the old config.
async fn watch_local_config(store: Arc<SharedStore>, path: std::path::PathBuf, every: Duration) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        if let Err(error) = load_local_config(&store, &path) {
            warn!(path = %path.display(), error = %format!("{error:#}"), "local config not reloaded; keeping the previous one");
        }
    }
}

fn config_dump(
    config: &Config,
    store: &Arc<SharedStore>,
    proxies: &Arc<ProxyManager>,
    certs: &Arc<CertSource>,
    xds: Option<XdsStatus>,
) -> DumpFn {
    let (config, store, proxies, certs) = (
        config.clone(),
        store.clone(),
        proxies.clone(),
        certs.clone(),
    );
    Arc::new(move || {
        let snapshot = store.snapshot();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "config": config,
            "workloads": snapshot.workloads().iter().map(|w| &**w).collect::<Vec<_>>(),
            "services": snapshot.services().iter().map(|s| &**s).collect::<Vec<_>>(),
            "pods": proxies.dump(),
            "certificates": certs.dump(),
            "policies": snapshot.policies().iter().map(|p| &**p).collect::<Vec<_>>(),
            "xds": xds.as_ref().map(XdsStatus::snapshot),
        })
    })
}

#[cfg(test)]
mod tests;
