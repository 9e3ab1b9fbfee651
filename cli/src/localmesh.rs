//! A local zmesh cluster on the netns testbed, run with the real binaries.
//!
//! * nodes and pods are network namespaces ([`mesh_testbed::Cluster`], prefix `zmesh`);
//! * the cluster's objects (Nodes, Namespaces, ServiceAccounts, Pods, a Service, an
//!   AuthorizationPolicy) are Kubernetes YAML in `STATE_DIR/<cluster>/config/`, rewritten when a
//!   test or an operator changes them ([`Objects`]);
//! * `istiod-lite` (CA and xDS) runs in the fabric namespace on [`CA_IP`], reachable from every
//!   node's underlay address, like an off-node control plane; it watches that directory and
//!   pushes workloads, services and policies to every ztunnel over delta xDS;
//! * per node, `zmesh-cni` (the node agent) watches the same directory, captures the pods of the
//!   ambient namespace and hands them to that node's `ztunnel` over ZDS; both are child
//!   processes started inside the node's namespace.
//!
//! Everything lives in `STATE_DIR/<cluster>/` (configs, logs, the pidfile `zmesh down` reads).
//! Dropping a [`LocalMesh`] kills its processes, deletes its namespaces and that directory.

mod config;
mod control_plane;
mod metrics;
mod observe;
mod process;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_testbed::apps::{self, AppError, HttpReply};
use mesh_testbed::{Cluster, NetnsError, Node, Pod, TestbedError};

pub use config::{
    ECHO_PORT, HTTP_PORT, MESHED_NAMESPACE, Objects, PLAIN_NAMESPACE, POLICY_NAME, PlacedPod,
    PodSpec, SERVICE_APP, SERVICE_NAME, SERVICE_PORT, SERVICE_VIP, ZTUNNEL_IDENTITY, identity,
};
pub use metrics::{Sample, metric, samples};
pub use observe::{XdsSummary, workload};
pub use process::{Binaries, Proc};

/// Prefix of every namespace a local cluster creates (`zmesh down` deletes them).
pub const NETNS_PREFIX: &str = "zmesh";
/// Where istiod-lite (CA and xDS) listens: an address on the fabric bridge.
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
/// istiod's port: CA and xDS.
pub const CA_PORT: u16 = 15012;
/// ztunnel's admin address inside its node's namespace.
pub const ZTUNNEL_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// The node agent's admin address inside its node's namespace.
pub const AGENT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8000);
/// How long each startup step may take.
pub const STARTUP: Duration = Duration::from_secs(20);
/// Drain deadline given to every ztunnel.
pub const DRAIN: Duration = Duration::from_secs(1);

/// What can go wrong running a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum LocalMeshError {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// Creating namespaces failed.
    #[error("testbed: {0}")]
    Testbed(#[from] TestbedError),
    /// Entering a namespace failed.
    #[error("netns: {0}")]
    Netns(#[from] NetnsError),
    /// Talking to an admin endpoint failed.
    #[error("admin request: {0}")]
    App(#[from] AppError),
    /// A binary was not found.
    #[error(
        "{name} binary not found (looked at {looked}): build it with `cargo build -p {name}` \
         or set {env}"
    )]
    MissingBinary {
        /// Binary name.
        name: String,
        /// Paths tried.
        looked: String,
        /// The environment variable that overrides the path.
        env: String,
    },
    /// Something did not become ready in time.
    #[error("{what} not ready within {timeout:?}: {detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        timeout: Duration,
        /// Last observation and relevant log.
        detail: String,
    },
    /// Anything else, described.
    #[error("{0}")]
    Failed(String),
}

impl LocalMeshError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

type Result<T, E = LocalMeshError> = std::result::Result<T, E>;

/// What a local cluster is made of: node names, pods, and the objects' initial state.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Node names.
    pub nodes: Vec<String>,
    /// Pods, each on one of the nodes.
    pub pods: Vec<PodSpec>,
    /// Namespace label, opt-outs, service accounts, policy at start.
    pub objects: Objects,
}

/// The default layout: nodes `n1`, `n2`; a `client` and a `server` pod per node in the ambient
/// namespace (the servers, `app: server` in versions v1 and v2, back the [`SERVICE_NAME`]
/// Service); one unmeshed pod `plain` on `n2`; the [`POLICY_NAME`] policy in place.
pub fn default_layout() -> Layout {
    Layout {
        nodes: vec!["n1".to_string(), "n2".to_string()],
        pods: vec![
            PodSpec::new("client1", "n1", "client", true),
            PodSpec::new("server1", "n1", "server", true),
            PodSpec::new("client2", "n2", "client", true),
            PodSpec::new("server2", "n2", "server", true).with_version("v2"),
            PodSpec::new("plain", "n2", "plain", false),
        ],
        objects: Objects::default(),
    }
}

struct MeshNode {
    node: Node,
    ztunnel: Option<Proc>,
    ztunnel_starts: u32,
    agent: Proc,
}

/// A running local cluster.
pub struct LocalMesh {
    // Field order is drop order: processes go before the namespaces they run in.
    nodes: BTreeMap<String, MeshNode>,
    ca: Proc,
    cluster: Cluster,
    node_names: Vec<String>,
    pods: Vec<PlacedPod>,
    objects: Mutex<Objects>,
    testbed_pods: BTreeMap<String, Pod>,
    dir: PathBuf,
    bins: Binaries,
    keep_dir: bool,
}

impl LocalMesh {
    /// Builds the namespaces, writes the objects, starts istiod-lite, and per node the agent and
    /// ztunnel; returns once every ztunnel is ready (xDS received) and the mesh reflects the
    /// objects ([`LocalMesh::wait_settled`]).
    pub async fn start(state_dir: &Path, bins: Binaries, layout: &Layout) -> Result<Self> {
        let cluster = Cluster::new(NETNS_PREFIX)?;
        let dir = state_dir.join(cluster.base_name());
        mkdir(&dir.join("config"))?;
        let (testbed_nodes, placed, testbed_pods) = place(&cluster, &layout.nodes, &layout.pods)?;
        let objects = layout.objects.clone();
        let yaml = config::cluster_yaml(&layout.nodes, &placed, &objects);
        write_atomic(&dir.join("config").join("cluster.yaml"), &yaml)?;
        let ca = control_plane::start(&cluster, &dir, &bins, &layout.nodes).await?;
        let mut mesh = Self {
            nodes: BTreeMap::new(),
            ca,
            cluster,
            node_names: layout.nodes.clone(),
            pods: placed,
            objects: Mutex::new(objects),
            testbed_pods,
            dir,
            bins,
            keep_dir: false,
        };
        for node in testbed_nodes {
            mesh.start_node(node)?;
        }
        for name in &layout.nodes {
            mesh.start_ztunnel(name).await?;
        }
        mesh.wait_settled().await?;
        Ok(mesh)
    }

    fn start_node(&mut self, node: Node) -> Result<()> {
        let name = node.name().to_string();
        let ndir = self.dir.join(&name);
        mkdir(&ndir)?;
        let mut cmd = Command::new(&self.bins.cni);
        cmd.arg("--config-dir").arg(self.dir.join("config"));
        cmd.args(["--node-name", &name]);
        cmd.arg("--zds-socket").arg(ndir.join("zds.sock"));
        cmd.args(["--admin-addr", &AGENT_ADMIN.to_string()]);
        cmd.args(["--poll-interval", "200ms"]);
        let ns = node.open_netns()?;
        let log = ndir.join("zmesh-cni.log");
        let agent = Proc::spawn(
            &format!("zmesh-cni {name}"),
            cmd,
            &ns,
            &log,
            &self.pidfile(),
        )?;
        self.nodes.insert(
            name,
            MeshNode {
                node,
                ztunnel: None,
                ztunnel_starts: 0,
                agent,
            },
        );
        Ok(())
    }

    /// Starts (or restarts after [`LocalMesh::kill_ztunnel`]) the node's ztunnel, configured
    /// over xDS by istiod-lite, and waits until it is ready (first xDS response of each type
    /// applied, connected to its agent and reconciled the pod snapshot).
    pub async fn start_ztunnel(&mut self, node: &str) -> Result<()> {
        let ndir = self.dir.join(node);
        let root = self.root_cert();
        let mut cmd = Command::new(&self.bins.ztunnel);
        cmd.args(["--xds-address", &control_plane::url()]);
        cmd.arg("--xds-root").arg(&root);
        cmd.args(["--node-name", node]);
        cmd.arg("--zds-socket").arg(ndir.join("zds.sock"));
        cmd.args(["--ca-address", &control_plane::url()]);
        cmd.arg("--ca-root").arg(&root);
        cmd.args(["--token", &config::node_token(node)]);
        cmd.args(["--admin-addr", &ZTUNNEL_ADMIN.to_string()]);
        cmd.args(["--drain-timeout", &format!("{}ms", DRAIN.as_millis())]);
        let pidfile = self.pidfile();
        let entry = self.node_mut(node)?;
        // The downward-API variables a ztunnel DaemonSet pod gets: they form its xDS node id.
        cmd.env("POD_NAME", format!("ztunnel-{node}"));
        cmd.env("POD_NAMESPACE", "istio-system");
        cmd.env("INSTANCE_IP", entry.node.ip().to_string());
        entry.ztunnel_starts += 1;
        let log = ndir.join(format!("ztunnel.{}.log", entry.ztunnel_starts));
        let ns = entry.node.open_netns()?;
        let proc = Proc::spawn(&format!("ztunnel {node}"), cmd, &ns, &log, &pidfile)?;
        entry.ztunnel = Some(proc);
        self.wait_ztunnel_ready(node).await
    }

    async fn wait_ztunnel_ready(&self, node: &str) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let last = self.ztunnel_admin(node, "/healthz/ready").await;
            match &last {
                Ok(r) if r.status == 200 => return Ok(()),
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => {
                    return Err(LocalMeshError::Timeout {
                        what: format!("ztunnel on {node}"),
                        timeout: STARTUP,
                        detail: format!("{last:?}; log:\n{}", self.ztunnel_log(node)),
                    });
                }
            }
        }
    }

    /// SIGKILLs the node's ztunnel (pods and agent keep running).
    pub fn kill_ztunnel(&mut self, node: &str) -> Result<()> {
        let entry = self.node_mut(node)?;
        match entry.ztunnel.take() {
            Some(mut proc) => {
                proc.kill();
                Ok(())
            }
            None => Err(LocalMeshError::Failed(format!(
                "no ztunnel running on {node}"
            ))),
        }
    }

    /// While `cut`, everything istiod-lite sends to `node` is dropped (an nftables rule in the
    /// node's namespace): its ztunnel keeps serving its last config. `false` removes the rule.
    pub fn partition(&self, node: &str, cut: bool) -> Result<()> {
        control_plane::partition(self.node(node)?.netns_name(), cut)
    }

    /// The objects as last written.
    pub fn objects(&self) -> Objects {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Changes the objects and rewrites the config directory; istiod-lite and the agents pick
    /// the change up on their next poll (see [`LocalMesh::wait_settled`]).
    pub fn update_objects(&self, change: impl FnOnce(&mut Objects)) -> Result<()> {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut objects);
        let yaml = config::cluster_yaml(&self.node_names, &self.pods, &objects);
        write_atomic(&self.dir.join("config").join("cluster.yaml"), &yaml)
    }

    /// Waits until the whole mesh reflects the objects: every agent enrolled exactly the pods
    /// they put in the mesh, and every ztunnel (over xDS) holds each pod's workload with the
    /// right identity and tunnel protocol (HBONE for pods in the mesh, TCP for the others).
    pub async fn wait_settled(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP;
        loop {
            let objects = self.objects();
            let mut pending = Vec::new();
            for name in self.nodes.keys() {
                pending.extend(self.unsettled_pods(name, &objects).await);
                match self.config_dump(name).await {
                    Ok(dump) => pending.extend(observe::unsettled_workloads(
                        name, &dump, &self.pods, &objects,
                    )),
                    Err(e) => pending.push(format!("{name}: ztunnel /config_dump: {e}")),
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalMeshError::Timeout {
                    what: "the mesh to reflect the objects".into(),
                    timeout: STARTUP,
                    detail: format!("still different: {pending:#?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn unsettled_pods(&self, node: &str, objects: &Objects) -> Vec<String> {
        let status = match self.agent_status(node).await {
            Ok(s) => s,
            Err(e) => return vec![format!("{node}: agent status: {e}")],
        };
        let pods = status["pods"].as_array().cloned().unwrap_or_default();
        let mut pending = Vec::new();
        for pod in self.pods.iter().filter(|p| p.spec.node == node) {
            let want = objects.captures(&pod.spec);
            let seen = pods.iter().find(|p| p["name"] == pod.spec.name.as_str());
            let enabled = seen.is_some_and(|p| p["redirection"] == "enabled");
            let gone = seen.is_none_or(|p| p["redirection"].is_null());
            if (want && !enabled) || (!want && !gone) {
                pending.push(format!(
                    "{node} agent: {}: {}",
                    pod.spec.name,
                    seen.cloned().unwrap_or_default()
                ));
            }
        }
        pending
    }

    /// GET on the node's ztunnel admin server.
    pub async fn ztunnel_admin(&self, node: &str, path: &str) -> Result<HttpReply> {
        let ns = self.node(node)?.open_netns()?;
        Ok(apps::http_get(&ns, ZTUNNEL_ADMIN, path).await?)
    }

    /// The node's ztunnel `/config_dump` (workloads, services, policies, pods, certificates,
    /// xDS state).
    pub async fn config_dump(&self, node: &str) -> Result<serde_json::Value> {
        let reply = self.ztunnel_admin(node, "/config_dump").await?;
        serde_json::from_str(&reply.body).map_err(|e| {
            LocalMeshError::Failed(format!("{node}: ztunnel /config_dump is not JSON: {e}"))
        })
    }

    /// The node's ztunnel metrics (Prometheus text).
    pub async fn metrics(&self, node: &str) -> Result<String> {
        let reply = self.ztunnel_admin(node, "/metrics").await?;
        if reply.status != 200 {
            return Err(LocalMeshError::Failed(format!(
                "{node}: /metrics answered {}",
                reply.status
            )));
        }
        Ok(reply.body)
    }

    /// The node agent's `/status`.
    pub async fn agent_status(&self, node: &str) -> Result<serde_json::Value> {
        let ns = self.node(node)?.open_netns()?;
        let reply = apps::http_get(&ns, AGENT_ADMIN, "/status").await?;
        serde_json::from_str(&reply.body)
            .map_err(|e| LocalMeshError::Failed(format!("{node}: agent /status is not JSON: {e}")))
    }

    /// The current ztunnel log of a node.
    pub fn ztunnel_log(&self, node: &str) -> String {
        let proc = self.nodes.get(node).and_then(|n| n.ztunnel.as_ref());
        proc.map(Proc::log).unwrap_or_default()
    }

    /// Every log file: `(process, path)`.
    pub fn logs(&self) -> Vec<(String, PathBuf)> {
        let mut logs = vec![(self.ca.name().to_string(), self.ca.log_path().to_path_buf())];
        for node in self.nodes.values() {
            let agent = &node.agent;
            logs.push((agent.name().to_string(), agent.log_path().to_path_buf()));
            if let Some(zt) = &node.ztunnel {
                logs.push((zt.name().to_string(), zt.log_path().to_path_buf()));
            }
        }
        logs
    }

    /// Processes that exited although they should run.
    pub fn exited(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        let procs = self
            .nodes
            .values_mut()
            .flat_map(|n| std::iter::once(&mut n.agent).chain(n.ztunnel.as_mut()));
        for proc in std::iter::once(&mut self.ca).chain(procs) {
            if let Some(status) = proc.exited() {
                dead.push(format!("{} exited with {status}", proc.name()));
            }
        }
        dead
    }

    /// Records the calling process in the pidfile, so `zmesh down` stops it first.
    pub fn record_supervisor(&self, name: &str) -> Result<()> {
        process::record_self(&self.pidfile(), name)
    }

    /// Keeps the state directory (configs, logs) when the mesh is dropped.
    pub fn keep_dir(&mut self, keep: bool) {
        self.keep_dir = keep;
    }

    /// The pods with their IPs.
    pub fn pods(&self) -> &[PlacedPod] {
        &self.pods
    }

    /// A placed pod by name.
    pub fn pod(&self, name: &str) -> Result<&PlacedPod> {
        self.pods
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| LocalMeshError::Failed(format!("no pod named {name:?}")))
    }

    /// A pod's network namespace.
    pub fn pod_netns(&self, name: &str) -> Result<File> {
        let pod = self.testbed_pods.get(name);
        let pod = pod.ok_or_else(|| LocalMeshError::Failed(format!("no pod named {name:?}")))?;
        Ok(pod.open_netns()?)
    }

    /// Every node with its network namespace name.
    pub fn node_netns(&self) -> Vec<(String, String)> {
        let nodes = self.nodes.iter();
        nodes
            .map(|(name, n)| (name.clone(), n.node.netns_name().to_string()))
            .collect()
    }

    /// The cluster's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The testbed cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn node(&self, name: &str) -> Result<&Node> {
        let node = self.nodes.get(name).map(|n| &n.node);
        node.ok_or_else(|| LocalMeshError::Failed(format!("no node named {name:?}")))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut MeshNode> {
        let node = self.nodes.get_mut(name);
        node.ok_or_else(|| LocalMeshError::Failed(format!("no node named {name:?}")))
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("pids")
    }

    fn root_cert(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }

    /// Stops ztunnels (graceful), agents and istiod-lite, then deletes the namespaces.
    pub fn shutdown(mut self) {
        for node in self.nodes.values_mut() {
            if let Some(zt) = node.ztunnel.as_mut() {
                let _ = zt.terminate(DRAIN + Duration::from_secs(2));
            }
            let _ = node.agent.terminate(Duration::from_secs(2));
        }
        let _ = self.ca.terminate(Duration::from_secs(2));
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, path) in self.logs() {
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                eprintln!("---- {name} ({}) ----\n{log}", path.display());
            }
        }
        self.nodes.clear();
        self.ca.kill();
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

type Placement = (Vec<Node>, Vec<PlacedPod>, BTreeMap<String, Pod>);

fn place(cluster: &Cluster, nodes: &[String], pods: &[PodSpec]) -> Result<Placement> {
    let mut testbed_nodes = Vec::new();
    for name in nodes {
        testbed_nodes.push(cluster.add_node(name)?);
    }
    let mut placed = Vec::new();
    let mut testbed_pods = BTreeMap::new();
    for spec in pods {
        let node = testbed_nodes.iter().find(|n| n.name() == spec.node);
        let node = node.ok_or_else(|| {
            LocalMeshError::Failed(format!(
                "pod {} is on unknown node {}",
                spec.name, spec.node
            ))
        })?;
        let pod = node.add_pod(&spec.name)?;
        placed.push(PlacedPod {
            spec: spec.clone(),
            ip: pod.ip(),
            netns: pod.netns_name().to_string(),
        });
        testbed_pods.insert(spec.name.clone(), pod);
    }
    Ok((testbed_nodes, placed, testbed_pods))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LocalMeshError::io(format!("creating {}", dir.display()), e))
}

/// Writes through a temporary file and a rename, so pollers never read half a file.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| LocalMeshError::io(format!("writing {}", path.display()), e))
}

/// Removes clusters left behind under `state_dir`: stops the recorded processes (the `zmesh up`
/// process first, so it can clean up itself), deletes every `zmesh-*` namespace and the state
/// directories. Returns what was done, one line each.
pub fn down(state_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(LocalMeshError::io(
                format!("reading {}", state_dir.display()),
                e,
            ));
        }
    };
    for dir in entries.iter().filter(|d| d.is_dir()) {
        for stopped in process::stop_recorded(&dir.join("pids"), Duration::from_secs(5)) {
            done.push(format!("stopped {stopped}"));
        }
        // The stopped `zmesh up` may have removed its directory itself already.
        match std::fs::remove_dir_all(dir) {
            Ok(()) => done.push(format!("removed {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LocalMeshError::io(format!("removing {}", dir.display()), e)),
        }
    }
    for name in leftover_netns()? {
        let out = Command::new("ip").args(["netns", "delete", &name]).output();
        let out = out.map_err(|e| LocalMeshError::io("running ip netns delete", e))?;
        if !out.status.success() && leftover_netns()?.contains(&name) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(LocalMeshError::Failed(format!(
                "deleting netns {name}: {stderr}"
            )));
        }
        if out.status.success() {
            done.push(format!("deleted netns {name}"));
        }
    }
    Ok(done)
}

fn leftover_netns() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let out = out.map_err(|e| LocalMeshError::io("running ip netns list", e))?;
    let prefix = format!("{NETNS_PREFIX}-");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_names_a_state_dir_it_cannot_read() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = down(file.path()).unwrap_err().to_string();
        assert!(err.contains(&file.path().display().to_string()), "{err}");
    }

    #[test]
    fn default_layout_has_meshed_pods_and_service_endpoints_on_both_nodes() {
        let Layout {
            nodes,
            pods,
            objects,
        } = default_layout();
        assert_eq!(nodes, ["n1", "n2"]);
        for node in &nodes {
            let on_node = pods.iter().filter(|p| &p.node == node);
            assert_eq!(on_node.clone().filter(|p| p.meshed).count(), 2);
            assert_eq!(on_node.filter(|p| p.app == SERVICE_APP).count(), 1);
        }
        assert_eq!(pods.iter().filter(|p| !p.meshed).count(), 1);
        assert!(objects.ambient && objects.policy);
    }
}
