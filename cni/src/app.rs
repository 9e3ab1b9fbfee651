//! Composition root of `zmesh-cni`: builds every component from a [`Config`], in one straight
//! line, and runs them until a signal or a shutdown request.
//!
//! Shutdown leaves every capture rule in place and sends ztunnel no deletes: pods stay captured
//! (and served by ztunnel) while the agent restarts or upgrades, as upstream Istio does. The next
//! agent re-applies the rules atomically and re-announces every pod.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use futures::FutureExt;
use futures::future::BoxFuture;
use mesh_core::k8s::{
    DEFAULT_MAX_FILE_SIZE, DirSource, DirSourceConfig, Kind, KubeSource, KubeSourceConfig,
    Snapshot, infer_client, kubeconfig_client,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::admin::{AdminServer, AdminState};
use crate::config::{Config, SourceConfig};
use crate::locate::Locator;
use crate::reconcile::{AgentStatus, HostDataplane, Reconciler, ReconcilerConfig};
use crate::rules::CaptureConfig;
use crate::zds::ZdsServer;

/// The running agent: bound addresses, status, and the only way to wait for its end.
pub struct Bound {
    admin_addr: SocketAddr,
    zds_path: PathBuf,
    status: watch::Receiver<Arc<AgentStatus>>,
    shutdown: CancellationToken,
    tasks: JoinSet<&'static str>,
}

/// A started config source: its snapshots, the task that feeds them, and what to wait for
/// before the first reconcile pass.
struct Source {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    run: BoxFuture<'static, ()>,
    ready: BoxFuture<'static, ()>,
}

/// Opens the configured source. The directory is loaded before this returns; the Kubernetes
/// source is ready once Namespaces and this node's Pods are listed.
async fn open_source(config: &Config) -> anyhow::Result<Source> {
    match &config.source {
        SourceConfig::Dir { dir, poll_interval } => {
            let source = DirSource::new(DirSourceConfig {
                dir: dir.clone(),
                poll_interval: *poll_interval,
                max_file_size: DEFAULT_MAX_FILE_SIZE,
            })
            .context("loading the config directory")?;
            Ok(Source {
                snapshots: source.subscribe(),
                run: source.run().boxed(),
                ready: std::future::ready(()).boxed(),
            })
        }
        SourceConfig::Kube { kubeconfig } => {
            let client = match kubeconfig {
                Some(path) => kubeconfig_client(path).await,
                None => infer_client().await,
            }
            .context("connecting to the kubernetes api")?;
            // Enrollment needs namespaces (labels) and this node's pods only.
            let source = KubeSource::new(
                client,
                KubeSourceConfig {
                    kinds: vec![Kind::Namespace, Kind::Pod],
                    pod_node_name: Some(config.node_name.clone()),
                    ..KubeSourceConfig::default()
                },
            );
            let ready = source.ready();
            let ready = async move {
                info!("waiting for the kubernetes api: listing namespaces and this node's pods");
                ready.await;
            };
            Ok(Source {
                snapshots: source.subscribe(),
                run: source.run().boxed(),
                ready: ready.boxed(),
            })
        }
    }
}

/// Builds and starts the agent. Fails loudly on anything that would stop it from working: an
/// unreadable config directory or kubeconfig, a ZDS socket or admin port that cannot be bound.
pub async fn build(config: &Config) -> anyhow::Result<Bound> {
    let source = open_source(config).await?;
    let zds = ZdsServer::bind(&config.zds_socket).context("binding the zds socket")?;
    let zds_path = zds.path();
    let locator =
        Locator::new(&config.capture.netns_dir).context("inspecting our own network namespace")?;
    let dataplane = HostDataplane::new(locator, config.capture.backend, CaptureConfig::default());
    let reconciler = Reconciler::new(
        ReconcilerConfig::new(&config.node_name),
        Arc::new(dataplane),
        zds.handle(),
    );
    let status = reconciler.status();
    let admin_state = AdminState {
        status: status.clone(),
        zds: zds.handle(),
    };
    let admin = AdminServer::bind(config.admin_addr, admin_state).await?;
    let admin_addr = admin.address();
    let mut tasks = JoinSet::new();
    tasks.spawn(named("config source", source.run));
    tasks.spawn(named("zds server", zds.run()));
    // No pass before the source is complete: a pass over a partial view would take pods out of
    // the mesh. Until then `/healthz/ready` says not ready.
    let (ready, snapshots) = (source.ready, source.snapshots);
    let reconcile = async move {
        ready.await;
        reconciler.run(snapshots).await;
    };
    tasks.spawn(named("reconciler", reconcile));
    tasks.spawn(named("admin server", admin.run()));
    Ok(Bound {
        admin_addr,
        zds_path,
        status,
        shutdown: CancellationToken::new(),
        tasks,
    })
}

async fn named(name: &'static str, task: impl Future<Output = ()>) -> &'static str {
    task.await;
    name
}

impl Bound {
    /// The admin server's address.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The ZDS socket path.
    pub fn zds_path(&self) -> &Path {
        &self.zds_path
    }

    /// The reconciler's status after each pass.
    pub fn status(&self) -> watch::Receiver<Arc<AgentStatus>> {
        self.status.clone()
    }

    /// A token that ends [`Bound::wait_termination`] when cancelled (as a signal would).
    pub fn shutdown_handle(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until SIGTERM, SIGINT or the shutdown token, then stops every task. Returns an
    /// error if a component stopped on its own first.
    pub async fn wait_termination(self) -> anyhow::Result<()> {
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        self.run_until(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        })
        .await
    }

    /// Runs until `stop` completes or the shutdown token is cancelled, then stops every task.
    /// Returns an error if a component stopped on its own first.
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            () = stop => Ok(()),
            () = self.shutdown.cancelled() => Ok(()),
            Some(ended) = self.tasks.join_next() => Err(match ended {
                Ok(name) => anyhow!("{name} stopped unexpectedly"),
                Err(e) => anyhow!("a component failed: {e}"),
            }),
        };
        if let Err(e) = &outcome {
            error!(error = %e, "shutting down");
        }
        self.tasks.shutdown().await;
        info!("zmesh-cni stopped; capture rules stay in place and ztunnel keeps serving the pods");
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(dir: &Path, config_dir: &Path) -> Config {
        let env = |_: &str| None;
        let args = [
            "zmesh-cni".to_owned(),
            format!("--config-dir={}", config_dir.display()),
            "--node-name=n1".to_owned(),
            format!("--zds-socket={}", dir.join("zds.sock").display()),
            format!("--netns-dir={}", dir.display()),
            "--admin-addr=127.0.0.1:0".to_owned(),
        ];
        Config::parse(args, &env).unwrap()
    }

    #[tokio::test]
    async fn starts_serves_and_stops_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let bound = build(&config(dir.path(), dir.path())).await.unwrap();
        assert!(bound.zds_path().ends_with("zds.sock"));
        let mut status = bound.status();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            status.wait_for(|s| s.ready),
        )
        .await
        .unwrap()
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(bound.admin_address())
            .await
            .unwrap();
        stream
            .write_all(b"GET /status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.contains("\"node\": \"n1\""), "{reply}");
        let token = bound.shutdown_handle();
        token.cancel();
        bound.run_until(std::future::pending()).await.unwrap();
    }

    fn kube_config(dir: &Path, kubeconfig: &Path) -> Config {
        let env = |_: &str| None;
        let args = [
            "zmesh-cni".to_owned(),
            "--config-source=kube".to_owned(),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--node-name=n1".to_owned(),
            format!("--zds-socket={}", dir.join("zds.sock").display()),
            format!("--netns-dir={}", dir.display()),
            "--admin-addr=127.0.0.1:0".to_owned(),
        ];
        Config::parse(args, &env).unwrap()
    }

    fn write_kubeconfig(path: &Path, server: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"{server}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        );
        std::fs::write(path, text).unwrap();
    }

    // Against the in-repo fake API server: no real API server is exercised.
    #[tokio::test]
    async fn enrolls_from_the_kubernetes_api() {
        use mesh_core::k8s::fake_api::FakeApiServer;
        let fake = FakeApiServer::start().await.unwrap();
        fake.register_kinds(&[Kind::Namespace, Kind::Pod]);
        let pod = |name: &str, node: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{nodeName: {node}, containers: [{{name: a, image: a}}]}}\n---\n"
            )
        };
        let namespace = "apiVersion: v1\nkind: Namespace\n\
             metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n";
        fake.apply_yaml(&format!(
            "{namespace}{}{}",
            pod("here", "n1"),
            pod("there", "n2")
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, &fake.uri().to_string());
        let bound = build(&kube_config(dir.path(), &kubeconfig)).await.unwrap();
        let mut status = bound.status();
        let wait = std::time::Duration::from_secs(10);
        let ready = tokio::time::timeout(wait, status.wait_for(|s| s.ready)).await;
        let names: Vec<String> = ready
            .unwrap()
            .unwrap()
            .pods
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(names, ["here"], "only this node's pods");
        let requests = fake.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.contains("fieldSelector=spec.nodeName%3Dn1")),
            "{requests:?}"
        );
        fake.apply_yaml(&pod("later", "n1")).unwrap();
        let seen = status.wait_for(|s| s.pod("shop", "later").is_some());
        tokio::time::timeout(wait, seen).await.unwrap().unwrap();
        bound.shutdown_handle().cancel();
        bound.run_until(std::future::pending()).await.unwrap();
    }

    #[tokio::test]
    async fn startup_failures_say_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        let err = build(&config(dir.path(), &missing)).await.err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("loading the config directory: cannot read config directory"),
            "{text}"
        );
        assert!(text.contains("no-such-dir"), "{text}");

        std::fs::write(dir.path().join("zds.sock"), "not a socket").unwrap();
        let err = build(&config(dir.path(), dir.path())).await.err().unwrap();
        let text = format!("{err:#}");
        assert!(text.starts_with("binding the zds socket"), "{text}");
        assert!(text.contains("is not a socket"), "{text}");

        let err = build(&kube_config(dir.path(), &missing))
            .await
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("connecting to the kubernetes api: cannot use kubeconfig"),
            "{text}"
        );
        assert!(text.contains("no-such-dir"), "{text}");
    }
}
