//! A meshed cluster on the netns testbed, with real components:
//!
//! * nodes and pods are network namespaces ([`mesh_testbed::Cluster`]);
//! * the control plane is istiod-lite (CA and delta xDS on one port), run in-process inside the
//!   **fabric** namespace on the bridge address [`CA_IP`] — off every node, like a control plane,
//!   and reachable from each node's underlay address on the same /24. It reads the scenario as
//!   Kubernetes YAML from a config directory ([`objects`]: the namespace, one file per pod and per
//!   service), polled every [`CONFIG_POLL`]; tests change it at runtime with [`Mesh::apply`] /
//!   [`Mesh::delete`] and can stop and restart it ([`Mesh::stop_istiod`], [`Mesh::start_istiod`]);
//! * each node gets a ZDS server (zmesh-cni's, in-process; the socket is a file, so it works
//!   across namespaces) and the **real `ztunnel` binary** as a child process started from a
//!   thread inside the node's namespace, configured over xDS from istiod-lite;
//! * every meshed pod gets the in-pod capture rules and is enrolled over ZDS with its netns fd.
//!
//! The `ztunnel` binary must be built first (`cargo build -p ztunnel`); it is looked up next to
//! the test executable's directory, or at `$MESH_ZTUNNEL_BIN`.

pub mod objects;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_proto::zds::WorkloadInfo;
use mesh_testbed::apps::{self, HttpReply};
use mesh_testbed::{Cluster, NetnsTask, Node, Pod, netns};
use tempfile::TempDir;
use tokio::task::JoinHandle;
/// Prometheus text parsing, shared with `zmesh up` (tested there).
pub use zmesh::localmesh::metric;
use zmesh_cni::rules::{self, Backend, CaptureConfig};
use zmesh_cni::zds::{ZdsHandle, ZdsServer};

/// Namespace of every test workload.
pub const NAMESPACE: &str = "demo";
/// ztunnel's own identity (the CA lets it impersonate pods on its node).
pub const ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
/// Where the CA listens: an address on the fabric bridge.
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
/// The CA port (istiod's).
pub const CA_PORT: u16 = 15012;
/// ztunnel's admin address inside its node's namespace.
pub const ADMIN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// How long startup steps may take.
pub const STARTUP: Duration = Duration::from_secs(20);
/// Drain deadline given to every ztunnel.
pub const DRAIN: Duration = Duration::from_secs(2);
/// How often istiod-lite polls its config directory (a change is seen after two polls agree).
pub const CONFIG_POLL: Duration = Duration::from_millis(50);
/// How long a test waits for a config change to reach the ztunnels.
pub const PROPAGATION: Duration = Duration::from_secs(20);

/// A pod of the scenario.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (unique in the cluster).
    pub name: &'static str,
    /// Node name.
    pub node: &'static str,
    /// Service account.
    pub service_account: &'static str,
    /// Enrolled (capture rules, ZDS; HBONE in xDS through the namespace's ambient label) or not
    /// (pod label `istio.io/dataplane-mode: none`, so xDS says protocol NONE).
    pub meshed: bool,
}

/// A service of the scenario.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Service name (hostname `<name>.demo.svc.cluster.local`).
    pub name: &'static str,
    /// Its VIP.
    pub vip: Ipv4Addr,
    /// Service port.
    pub port: u16,
    /// Target port on the endpoints.
    pub target_port: u16,
    /// Names of the backing pods.
    pub endpoints: Vec<&'static str>,
}

impl ServiceSpec {
    /// The service's FQDN.
    pub fn hostname(&self) -> String {
        format!("{}.{NAMESPACE}.svc.cluster.local", self.name)
    }
}

/// The SPIFFE id of a service account in [`NAMESPACE`].
pub fn identity(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{service_account}")
}

/// The workload uid istiod-lite gives a pod (cluster id `Kubernetes`).
pub fn pod_uid(name: &str) -> String {
    format!("Kubernetes//Pod/{NAMESPACE}/{name}")
}

/// The running scenario. Dropping it stops every process and deletes every namespace.
pub struct Mesh {
    /// The namespaces.
    pub cluster: Cluster,
    pods: BTreeMap<String, (Pod, PodSpec)>,
    nodes: BTreeMap<String, MeshNode>,
    services: Vec<ServiceSpec>,
    istiod: Option<NetnsTask<()>>,
    istiod_config: istiod_lite::config::Config,
    dir: TempDir,
}

struct MeshNode {
    zds: ZdsHandle,
    zds_task: JoinHandle<()>,
    ztunnel: Ztunnel,
}

impl Mesh {
    /// Builds the cluster, writes the scenario as Kubernetes YAML, starts istiod-lite on it, one
    /// ZDS server and one ztunnel (xDS from istiod-lite) per node, and enrolls the meshed pods.
    /// Returns once every ztunnel reports ready.
    pub async fn start(nodes: &[&str], pods: &[PodSpec], services: &[ServiceSpec]) -> Result<Self> {
        let cluster = Cluster::new("zt")?;
        let dir = tempfile::tempdir()?;
        let mut testbed_nodes = BTreeMap::new();
        for name in nodes {
            testbed_nodes.insert(name.to_string(), cluster.add_node(name)?);
        }
        let mut placed = BTreeMap::new();
        for spec in pods {
            let node = testbed_nodes
                .get(spec.node)
                .context("pod on an unknown node")?;
            placed.insert(
                spec.name.to_string(),
                (node.add_pod(spec.name)?, spec.clone()),
            );
        }
        write_scenario(dir.path(), &placed, services)?;
        let istiod_config = ca_config(&cluster, dir.path(), nodes)?;
        let mut mesh = Self {
            cluster,
            pods: placed,
            nodes: BTreeMap::new(),
            services: services.to_vec(),
            istiod: None,
            istiod_config,
            dir,
        };
        mesh.start_istiod().await?;
        for (name, node) in &testbed_nodes {
            let started = mesh.start_node(node).await;
            let started = started.with_context(|| format!("starting node {name}"))?;
            mesh.nodes.insert(name.clone(), started);
        }
        mesh.enroll_all().await?;
        for node in mesh.nodes.values() {
            node.ztunnel.wait_ready().await?;
        }
        Ok(mesh)
    }

    async fn start_node(&self, node: &Node) -> Result<MeshNode> {
        let socket = self.dir.path().join(format!("{}.sock", node.name()));
        let server = ZdsServer::bind(&socket)?;
        let zds = server.handle();
        let mut ready = zds.ready_connections();
        let zds_task = tokio::spawn(server.run());
        let ztunnel = Ztunnel::spawn(node, &socket, self.dir.path())?;
        let connected = tokio::time::timeout(STARTUP, ready.wait_for(|n| *n >= 1)).await;
        if !matches!(connected, Ok(Ok(_))) {
            bail!(
                "ztunnel on {} did not connect to its zds socket within {STARTUP:?}; log:\n{}",
                node.name(),
                ztunnel.log()
            );
        }
        Ok(MeshNode {
            zds,
            zds_task,
            ztunnel,
        })
    }

    /// Starts istiod-lite (again) in the fabric namespace, on the same CA directory, root and
    /// config directory. Errors if it is running.
    pub async fn start_istiod(&mut self) -> Result<()> {
        ensure!(self.istiod.is_none(), "istiod-lite is already running");
        let fabric = self.cluster.fabric_netns().to_string();
        let task = start_ca_in_fabric(&fabric, self.istiod_config.clone()).await?;
        self.istiod = Some(task);
        Ok(())
    }

    /// Stops istiod-lite abruptly, like a crashed control plane: its runtime is dropped, so every
    /// xDS stream and CA connection is cut at once. Errors if it is not running.
    pub async fn stop_istiod(&mut self) -> Result<()> {
        let mut task = self.istiod.take().context("istiod-lite is not running")?;
        task.abort();
        // Dropping joins the task's thread, which closes every socket it owned.
        tokio::task::spawn_blocking(move || drop(task)).await?;
        Ok(())
    }

    /// Whether istiod-lite is running.
    pub fn istiod_running(&self) -> bool {
        self.istiod.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// istiod-lite's config directory.
    pub fn config_dir(&self) -> PathBuf {
        config_dir(self.dir.path())
    }

    /// Writes (or replaces) `<config dir>/<name>.yaml` atomically; istiod-lite picks it up within
    /// a few [`CONFIG_POLL`]s. See [`objects`] for the files the mesh starts with.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        objects::write(&self.config_dir(), name, yaml)
    }

    /// Deletes `<config dir>/<name>.yaml`.
    pub fn delete(&self, name: &str) -> Result<()> {
        objects::remove(&self.config_dir(), name)
    }

    /// The YAML the mesh wrote for a pod (to re-apply it changed).
    pub fn pod_yaml(&self, name: &str) -> Result<String> {
        let (pod, spec) = self.pods.get(name).context("unknown pod")?;
        Ok(objects::pod_yaml(spec, pod.ip(), &self.services))
    }

    async fn enroll_all(&self) -> Result<()> {
        let meshed: Vec<String> = self
            .pods
            .values()
            .filter(|(_, spec)| spec.meshed)
            .map(|(_, spec)| spec.name.to_string())
            .collect();
        for name in meshed {
            self.enroll(&name).await?;
        }
        Ok(())
    }

    /// Applies the capture rules in the pod and sends its netns to its node's ztunnel.
    pub async fn enroll(&self, pod_name: &str) -> Result<()> {
        let (pod, spec) = self.pods.get(pod_name).context("unknown pod")?;
        rules::apply(
            &pod.netns_path(),
            Backend::Iptables,
            &CaptureConfig::default(),
        )
        .with_context(|| format!("capture rules for {pod_name}"))?;
        let info = WorkloadInfo {
            name: spec.name.to_string(),
            namespace: NAMESPACE.to_string(),
            service_account: spec.service_account.to_string(),
        };
        let node = &self.nodes[spec.node];
        let uid = pod_uid(pod_name);
        let added = node.zds.add_workload(&uid, info, proc_netns(pod)?);
        added.await.map_err(|e| {
            anyhow::anyhow!(
                "enrolling {pod_name}: {e} ({e:?}); ztunnel log:\n{}",
                node.ztunnel.log()
            )
        })
    }

    /// Removes a pod from its ztunnel (the capture rules stay, as when a pod is being deleted).
    pub async fn unenroll(&self, pod_name: &str) -> Result<()> {
        let (_, spec) = self.pods.get(pod_name).context("unknown pod")?;
        self.nodes[spec.node]
            .zds
            .del_workload(&pod_uid(pod_name))
            .await?;
        Ok(())
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> &Pod {
        &self.pods[name].0
    }

    /// The ztunnel of a node.
    pub fn ztunnel(&self, node: &str) -> &Ztunnel {
        &self.nodes[node].ztunnel
    }

    /// The ztunnel of a node, mutably (to stop it).
    pub fn ztunnel_mut(&mut self, node: &str) -> &mut Ztunnel {
        &mut self.nodes.get_mut(node).expect("known node").ztunnel
    }

    /// The fabric namespace (the link between nodes).
    pub fn fabric(&self) -> Result<File> {
        Ok(netns::open(
            &PathBuf::from(netns::NETNS_RUN_DIR).join(self.cluster.fabric_netns()),
        )?)
    }

    /// A scratch directory that lives as long as the mesh.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for (name, node) in &mut self.nodes {
            node.zds_task.abort();
            if panicking {
                eprintln!("---- ztunnel log of {name} ----\n{}", node.ztunnel.log());
            }
            node.ztunnel.kill();
        }
    }
}

fn config_dir(dir: &Path) -> PathBuf {
    dir.join("config")
}

fn write_scenario(
    dir: &Path,
    pods: &BTreeMap<String, (Pod, PodSpec)>,
    services: &[ServiceSpec],
) -> Result<()> {
    let config = config_dir(dir);
    std::fs::create_dir(&config)?;
    objects::write(
        &config,
        objects::NAMESPACE_FILE,
        &objects::namespace_yaml(true),
    )?;
    for (pod, spec) in pods.values() {
        let yaml = objects::pod_yaml(spec, pod.ip(), services);
        objects::write(&config, &objects::pod_file(spec.name), &yaml)?;
    }
    for svc in services {
        objects::write(
            &config,
            &objects::service_file(svc.name),
            &objects::service_yaml(svc),
        )?;
    }
    Ok(())
}

// Addresses the fabric bridge and writes the tokens; the config is reused by every (re)start.
fn ca_config(cluster: &Cluster, dir: &Path, nodes: &[&str]) -> Result<istiod_lite::config::Config> {
    let fabric = cluster.fabric_netns().to_string();
    let addr = format!("{CA_IP}/24");
    let out = Command::new("ip")
        .args(["-n", &fabric, "addr", "add", &addr, "dev", "fab0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "cannot address fab0: {stderr}");
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, tokens_file(nodes))?;
    let mut env = HashMap::new();
    let mut set = |k: &str, v: String| env.insert(k.to_string(), v);
    set("ISTIOD_GRPC_ADDR", format!("{CA_IP}:{CA_PORT}"));
    set("ISTIOD_SERVING_IPS", CA_IP.to_string());
    set("ISTIOD_CA_DIR", dir.join("ca").display().to_string());
    set("ISTIOD_ROOT_CERT_OUT", root_cert(dir).display().to_string());
    set("ISTIOD_TOKENS_FILE", tokens.display().to_string());
    // With a config directory, "may this ztunnel impersonate that pod" is answered from the pods
    // in the YAML (namespace, service account, nodeName), not from the tokens file.
    set("ISTIOD_CONFIG_DIR", config_dir(dir).display().to_string());
    set(
        "ISTIOD_CONFIG_POLL",
        format!("{}ms", CONFIG_POLL.as_millis()),
    );
    set("ISTIOD_DRAIN_TIMEOUT", "1s".to_string());
    Ok(istiod_lite::config::Config::from_source(&env)?)
}

async fn start_ca_in_fabric(
    fabric: &str,
    config: istiod_lite::config::Config,
) -> Result<NetnsTask<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fabric_ns = netns::open(&PathBuf::from(netns::NETNS_RUN_DIR).join(fabric))?;
    let task = netns::spawn_in_netns(&fabric_ns, move || async move {
        match istiod_lite::app::build(config).await {
            Ok(bound) => {
                let _ = tx.send(Ok(()));
                let _ = bound.wait_termination().await;
            }
            Err(e) => {
                let _ = tx.send(Err(format!("{e:#}")));
            }
        }
    })?;
    match tokio::time::timeout(STARTUP, rx).await {
        Ok(Ok(Ok(()))) => Ok(task),
        Ok(Ok(Err(e))) => bail!("istiod-lite failed to start: {e}"),
        _ => bail!("istiod-lite did not start within {STARTUP:?}"),
    }
}

fn root_cert(dir: &Path) -> PathBuf {
    dir.join("root-cert.pem")
}

fn node_token(node: &str) -> String {
    format!("ztunnel-token-of-{node}-0123456789abcdef")
}

fn tokens_file(nodes: &[&str]) -> String {
    let mut s = String::from("tokens:\n");
    for node in nodes {
        let _ = writeln!(
            s,
            "  \"{}\": {{ identity: \"{ZTUNNEL_IDENTITY}\", node: {node} }}",
            node_token(node)
        );
    }
    s
}

/// The pod's namespace opened through `/proc` (`net:[inode]`): mesh-core's ZDS `NetnsFd`
/// rejects fds opened through the `/run/netns/NAME` bind mount, whose `/proc/self/fd` link is
/// the path rather than `net:[...]`.
pub fn proc_netns(pod: &Pod) -> Result<File> {
    let ns = pod.open_netns()?;
    Ok(netns::run_in_netns(&ns, || {
        File::open("/proc/thread-self/ns/net")
    })??)
}

/// The `ztunnel` binary to run.
pub fn ztunnel_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_ZTUNNEL_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> (tests) or target/<profile>/<bin> (benchmarks).
    let dir = exe.parent().context("cannot locate the target directory")?;
    let candidates = [dir.join("ztunnel"), dir.join("../ztunnel")];
    let bin = candidates.iter().find(|b| b.exists());
    let bin = bin.with_context(|| {
        format!(
            "ztunnel binary not found next to {} or in its parent: build it first with \
             `cargo build -p ztunnel` (same profile), or set MESH_ZTUNNEL_BIN",
            dir.display()
        )
    })?;
    Ok(bin.clone())
}

/// A `ztunnel` process running inside a node's namespace.
pub struct Ztunnel {
    child: Option<Child>,
    log: PathBuf,
    netns: File,
}

impl Ztunnel {
    fn spawn(node: &Node, zds: &Path, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("ztunnel-{}.log", node.name()));
        let out = File::create(&log)?;
        let mut cmd = Command::new(ztunnel_binary()?);
        cmd.args(["--node-name", node.name()]);
        cmd.arg("--zds-socket").arg(zds);
        let istiod = format!("https://{CA_IP}:{CA_PORT}");
        cmd.args(["--ca-address", &istiod]);
        cmd.arg("--ca-root").arg(root_cert(dir));
        // Delta ADS on the CA's port, trusting the same root (the serving cert has CA_IP as SAN).
        cmd.args(["--xds-address", &istiod]);
        cmd.arg("--xds-root").arg(root_cert(dir));
        cmd.args(["--token", &node_token(node.name())]);
        cmd.args(["--admin-addr", &ADMIN_ADDR.to_string()]);
        cmd.args(["--drain-timeout", &format!("{}ms", DRAIN.as_millis())]);
        cmd.env("ZTUNNEL_LOG", "info");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let netns = node.open_netns()?;
        // A child forked from a thread inside the node's namespace starts there.
        let child = netns::run_in_netns(&netns, move || cmd.spawn())?.context("spawn ztunnel")?;
        Ok(Self {
            child: Some(child),
            log,
            netns,
        })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin server.
    pub async fn admin(&self, path: &str) -> Result<HttpReply> {
        Ok(apps::http_get(&self.netns, ADMIN_ADDR, path).await?)
    }

    /// The Prometheus metrics text.
    pub async fn metrics(&self) -> Result<String> {
        let reply = self.admin("/metrics").await?;
        ensure!(reply.status == 200, "/metrics answered {}", reply.status);
        Ok(reply.body)
    }

    /// `/config_dump` as JSON.
    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.admin("/config_dump").await?.body,
        )?)
    }

    /// Polls `/config_dump` until `pred` holds, for at most [`PROPAGATION`]; `what` names the
    /// expectation in the error, which shows the last dump.
    pub async fn wait_config(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + PROPAGATION;
        loop {
            let dump = self.config_dump().await;
            if let Ok(dump) = &dump
                && pred(dump)
            {
                return Ok(dump.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel: {what} not seen within {PROPAGATION:?}; last config_dump: {dump:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            match self.admin("/healthz/ready").await {
                Ok(r) if r.status == 200 => return Ok(()),
                other if Instant::now() > deadline => {
                    bail!("ztunnel not ready: {other:?}; log:\n{}", self.log())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("ztunnel already stopped")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "ztunnel still running {timeout:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
    }
}
