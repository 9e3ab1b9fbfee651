//! A meshed cluster on the netns testbed, with real components:
//!
//! * nodes and pods are network namespaces ([`mesh_testbed::Cluster`]);
//! * the CA is istiod-lite, run in-process inside the **fabric** namespace on the bridge address
//!   [`CA_IP`] — off every node, like a control plane, and reachable from each node's underlay
//!   address on the same /24;
//! * each node gets a ZDS server (zmesh-cni's, in-process; the socket is a file, so it works
//!   across namespaces) and the **real `ztunnel` binary** as a child process started from a
//!   thread inside the node's namespace;
//! * every meshed pod gets the in-pod capture rules and is enrolled over ZDS with its netns fd.
//!
//! The `ztunnel` binary must be built first (`cargo build -p ztunnel`); it is looked up next to
//! the test executable's directory, or at `$MESH_ZTUNNEL_BIN`.

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

/// A pod of the scenario.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (unique in the cluster).
    pub name: &'static str,
    /// Node name.
    pub node: &'static str,
    /// Service account.
    pub service_account: &'static str,
    /// Enrolled (capture rules, ZDS, protocol HBONE) or not (protocol TCP).
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

/// The workload uid of a pod in the local config.
pub fn pod_uid(name: &str) -> String {
    format!("Kubernetes//Pod/{NAMESPACE}/{name}")
}

/// The running scenario. Dropping it stops every process and deletes every namespace.
pub struct Mesh {
    /// The namespaces.
    pub cluster: Cluster,
    pods: BTreeMap<String, (Pod, PodSpec)>,
    nodes: BTreeMap<String, MeshNode>,
    _ca: NetnsTask<()>,
    dir: TempDir,
}

struct MeshNode {
    zds: ZdsHandle,
    zds_task: JoinHandle<()>,
    ztunnel: Ztunnel,
}

impl Mesh {
    /// Builds the cluster, starts the CA, one ZDS server and one ztunnel per node, and enrolls
    /// the meshed pods. Returns once every ztunnel reports ready.
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
        let ca = start_ca(&cluster, dir.path(), nodes, pods).await?;
        let workloads = dir.path().join("workloads.yaml");
        std::fs::write(&workloads, local_config(&placed, services))?;
        let mut mesh = Self {
            cluster,
            pods: placed,
            nodes: BTreeMap::new(),
            _ca: ca,
            dir,
        };
        for (name, node) in &testbed_nodes {
            let started = mesh.start_node(node, &workloads).await;
            let started = started.with_context(|| format!("starting node {name}"))?;
            mesh.nodes.insert(name.clone(), started);
        }
        mesh.enroll_all().await?;
        for node in mesh.nodes.values() {
            node.ztunnel.wait_ready().await?;
        }
        Ok(mesh)
    }

    async fn start_node(&self, node: &Node, workloads: &Path) -> Result<MeshNode> {
        let socket = self.dir.path().join(format!("{}.sock", node.name()));
        let server = ZdsServer::bind(&socket)?;
        let zds = server.handle();
        let mut ready = zds.ready_connections();
        let zds_task = tokio::spawn(server.run());
        let ztunnel = Ztunnel::spawn(node, &socket, workloads, self.dir.path())?;
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

async fn start_ca(
    cluster: &Cluster,
    dir: &Path,
    nodes: &[&str],
    pods: &[PodSpec],
) -> Result<NetnsTask<()>> {
    let fabric = cluster.fabric_netns().to_string();
    let addr = format!("{CA_IP}/24");
    let out = Command::new("ip")
        .args(["-n", &fabric, "addr", "add", &addr, "dev", "fab0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "cannot address fab0: {stderr}");
    let tokens = dir.join("tokens.yaml");
    std::fs::write(&tokens, tokens_file(nodes, pods))?;
    start_ca_in_fabric(&fabric, ca_config(dir, &tokens)?).await
}

fn ca_config(dir: &Path, tokens: &Path) -> Result<istiod_lite::config::Config> {
    let mut env = HashMap::new();
    let mut set = |k: &str, v: String| env.insert(k.to_string(), v);
    set("ISTIOD_GRPC_ADDR", format!("{CA_IP}:{CA_PORT}"));
    set("ISTIOD_SERVING_IPS", CA_IP.to_string());
    set("ISTIOD_CA_DIR", dir.join("ca").display().to_string());
    set("ISTIOD_ROOT_CERT_OUT", root_cert(dir).display().to_string());
    set("ISTIOD_TOKENS_FILE", tokens.display().to_string());
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

fn tokens_file(nodes: &[&str], pods: &[PodSpec]) -> String {
    let mut s = String::from("tokens:\n");
    for node in nodes {
        let _ = writeln!(
            s,
            "  \"{}\": {{ identity: \"{ZTUNNEL_IDENTITY}\", node: {node} }}",
            node_token(node)
        );
    }
    s.push_str("workloads:\n");
    for pod in pods.iter().filter(|p| p.meshed) {
        let _ = writeln!(
            s,
            "  - {{ identity: \"{}\", node: {} }}",
            identity(pod.service_account),
            pod.node
        );
    }
    s
}

fn local_config(pods: &BTreeMap<String, (Pod, PodSpec)>, services: &[ServiceSpec]) -> String {
    let mut s = String::from("workloads:\n");
    for (pod, spec) in pods.values() {
        let protocol = if spec.meshed { "HBONE" } else { "TCP" };
        let backs: Vec<String> = services
            .iter()
            .filter(|svc| svc.endpoints.contains(&spec.name))
            .map(|svc| {
                format!(
                    "{NAMESPACE}/{}: {{{}: {}}}",
                    svc.hostname(),
                    svc.port,
                    svc.target_port
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "- {{uid: \"{}\", name: {}, namespace: {NAMESPACE}, serviceAccount: {}, \
             trustDomain: cluster.local, workloadIps: [{}], protocol: {protocol}, node: {}, \
             services: {{{}}}}}",
            pod_uid(spec.name),
            spec.name,
            spec.service_account,
            pod.ip(),
            spec.node,
            backs.join(", ")
        );
    }
    s.push_str("services:\n");
    for svc in services {
        let _ = writeln!(
            s,
            "- {{name: {}, namespace: {NAMESPACE}, hostname: {}, vips: [/{}], ports: {{{}: {}}}}}",
            svc.name,
            svc.hostname(),
            svc.vip,
            svc.port,
            svc.target_port
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
    fn spawn(node: &Node, zds: &Path, workloads: &Path, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("ztunnel-{}.log", node.name()));
        let out = File::create(&log)?;
        let mut cmd = Command::new(ztunnel_binary()?);
        cmd.arg("--local-config").arg(workloads);
        // Polled so a test can change the config (e.g. add policies) while the mesh runs.
        cmd.args(["--local-config-poll", "200ms", "--node-name", node.name()]);
        cmd.arg("--zds-socket").arg(zds);
        cmd.args(["--ca-address", &format!("https://{CA_IP}:{CA_PORT}")]);
        cmd.arg("--ca-root").arg(root_cert(dir));
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
