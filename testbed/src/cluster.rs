//! A small cluster made of network namespaces: one fabric, nodes, and pods.
//!
//! ```text
//!  netns BASE-fab : bridge fab0 (node underlay 10.99.0.0/24)
//!    ├─ veth nN ↔ BASE-n-NODE:eth0 10.99.0.N   ip_forward=1, bridge cni0 10.100.N.1/24
//!    │              └─ veth pK ↔ BASE-p-NODE.POD:eth0 10.100.N.(10+K)/24, default via 10.100.N.1
//!    └─ ...          every node routes 10.100.M.0/24 via 10.99.0.M for every other node M
//! ```
//!
//! `BASE` is the caller's prefix plus a random id, so clusters never clash on netns names, even
//! outside the sandbox. Each cluster has its own fabric, so concurrent clusters reuse the same
//! addresses safely. Nodes have no default route: nothing a test sends can leave the cluster.
//!
//! Every link is created with `ip -batch -` (one `ip` process per group of operations on one
//! namespace): spawning processes is most of the cost of building a topology.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::netns::{self, NETNS_RUN_DIR, NetnsError, NetnsTask};

/// Longest accepted cluster prefix.
const MAX_PREFIX_LEN: usize = 16;
/// Longest accepted node or pod name.
const MAX_NAME_LEN: usize = 32;
/// Node indexes are the last octet of 10.99.0.N and the third octet of 10.100.N.0/24.
const MAX_NODES: u8 = 254;
/// Pod K gets 10.100.N.(10+K); 254 is the last usable host address of the /24.
const MAX_POD_INDEX: u16 = 244;
const POD_HOST_OFFSET: u16 = 10;

/// Errors from building or tearing down a testbed cluster.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A prefix, node or pod name is not usable in namespace and interface names.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// "prefix", "node" or "pod".
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A node with this name already exists in the cluster.
    #[error("node {0:?} already exists")]
    DuplicateNode(String),
    /// A pod with this name already exists on the node.
    #[error("pod {pod:?} already exists on node {node:?}")]
    DuplicatePod {
        /// Node name.
        node: String,
        /// Pod name.
        pod: String,
    },
    /// The pod is not (or no longer) part of this cluster.
    #[error("pod {pod:?} on node {node:?} is not part of this cluster")]
    UnknownPod {
        /// Node name.
        node: String,
        /// Pod name.
        pod: String,
    },
    /// The address plan ran out.
    #[error("address plan exhausted: {0}")]
    Exhausted(&'static str),
    /// The cluster was already dropped.
    #[error("the cluster has been torn down")]
    TornDown,
    /// `ip` could not be started.
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// An `ip` batch failed.
    #[error("`{command}` failed ({status}): {stderr}; batch was: {batch}")]
    Ip {
        /// The command line.
        command: String,
        /// Exit status.
        status: ExitStatus,
        /// Standard error, trimmed.
        stderr: String,
        /// The batch input, `;`-separated.
        batch: String,
    },
    /// Setting a sysctl inside a namespace failed.
    #[error("cannot set {key} in netns {netns}: {source}")]
    Sysctl {
        /// The sysctl path.
        key: &'static str,
        /// Namespace name.
        netns: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Entering a namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A set of network namespaces forming a small cluster. Dropping it deletes every namespace it
/// created (best effort; the sandbox is the real safety net).
pub struct Cluster {
    shared: Arc<Shared>,
}

struct Shared {
    base: String,
    fabric: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nodes: Vec<NodeRecord>,
    pods: Vec<Pod>,
    nodes_created: u16,
    torn_down: bool,
}

struct NodeRecord {
    name: String,
    index: u8,
    netns: String,
    next_pod: u16,
}

/// A node: a network namespace with an underlay address, a `cni0` bridge for its pods, and
/// routes to every other node's pod CIDR. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    name: String,
    index: u8,
    netns: String,
}

/// A pod: a network namespace with one veth into its node's `cni0` bridge. Plain data; the
/// cluster owns the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    name: String,
    node: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    netns: String,
}

fn validate_name(kind: &'static str, name: &str, max: usize) -> Result<(), TestbedError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > max {
        Some("is too long")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("only lowercase letters, digits and '-' are allowed")
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("must not start or end with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TestbedError::InvalidName {
            kind,
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Runs `ip [-n NETNS] -batch -` with `lines` on stdin.
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), TestbedError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    run_batch(cmd, lines)
}

fn run_batch(mut cmd: Command, lines: &[String]) -> Result<(), TestbedError> {
    let command = netns::describe(&cmd);
    let spawn_err = |source| TestbedError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut input = lines.join("\n");
    input.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        // The batch is a few hundred bytes, far below the pipe buffer, so this cannot block.
        // A write error means `ip` died early; its exit status and stderr tell why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    if output.status.success() {
        return Ok(());
    }
    Err(TestbedError::Ip {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        batch: lines.join("; "),
    })
}

fn node_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, index)
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

fn set_ip_forward(netns_name: &str) -> Result<(), TestbedError> {
    const KEY: &str = "/proc/sys/net/ipv4/ip_forward";
    let ns = netns::open(&netns_path(netns_name))?;
    // /proc/sys/net resolves against the calling thread's namespace, so writing it from a
    // thread inside the node is a `sysctl` without spawning a process.
    netns::run_in_netns(&ns, || std::fs::write(KEY, "1"))?.map_err(|source| TestbedError::Sysctl {
        key: KEY,
        netns: netns_name.to_owned(),
        source,
    })
}

impl Cluster {
    /// Creates the fabric namespace (`PREFIX-ID-fab`) with bridge `fab0`.
    ///
    /// `prefix` (1–16 chars of `[a-z0-9-]`) makes the namespaces recognisable in `ip netns list`.
    pub fn new(prefix: &str) -> Result<Cluster, TestbedError> {
        validate_name("prefix", prefix, MAX_PREFIX_LEN)?;
        let base = format!("{prefix}-{:08x}", rand::random::<u32>());
        let fabric = format!("{base}-fab");
        ip_batch(None, &[format!("netns add {fabric}")])?;
        let cluster = Cluster {
            shared: Arc::new(Shared {
                base,
                fabric: fabric.clone(),
                state: Mutex::new(State::default()),
            }),
        };
        // From here on, Drop removes the fabric if the rest fails.
        ip_batch(
            Some(&fabric),
            &[
                "link set lo up".into(),
                "link add fab0 type bridge".into(),
                "link set fab0 up".into(),
            ],
        )?;
        Ok(cluster)
    }

    /// The unique base of every namespace name in this cluster (`PREFIX-ID`).
    pub fn base_name(&self) -> &str {
        &self.shared.base
    }

    /// Name of the fabric namespace.
    pub fn fabric_netns(&self) -> &str {
        &self.shared.fabric
    }

    /// Adds node number N (N = 1, 2, … in creation order) with IP 10.99.0.N and pod CIDR
    /// 10.100.N.0/24, and routes between it and every existing node.
    pub fn add_node(&self, name: &str) -> Result<Node, TestbedError> {
        validate_name("node", name, MAX_NAME_LEN)?;
        let mut state = self.shared.lock()?;
        if state.nodes.iter().any(|n| n.name == name) {
            return Err(TestbedError::DuplicateNode(name.to_owned()));
        }
        // Indexes are never reused (see `Node::add_pod` for why), even after a failed add.
        let index = u8::try_from(state.nodes_created + 1)
            .ok()
            .filter(|i| *i <= MAX_NODES)
            .ok_or(TestbedError::Exhausted("at most 254 nodes per cluster"))?;
        state.nodes_created += 1;
        let netns = format!("{}-n-{name}", self.shared.base);
        create_netns_with_veth(&netns, &format!("n{index}"), &self.shared.fabric)?;
        state.nodes.push(NodeRecord {
            name: name.to_owned(),
            index,
            netns: netns.clone(),
            next_pod: 1,
        });
        if let Err(e) = self.configure_node(index, &netns, &state.nodes) {
            let _ = ip_batch(None, &[format!("netns del {netns}")]);
            state.nodes.pop();
            return Err(e);
        }
        Ok(Node {
            shared: self.shared.clone(),
            name: name.to_owned(),
            index,
            netns,
        })
    }

    fn configure_node(
        &self,
        index: u8,
        netns: &str,
        nodes: &[NodeRecord],
    ) -> Result<(), TestbedError> {
        ip_batch(
            Some(&self.shared.fabric),
            &[format!("link set n{index} master fab0 up")],
        )?;
        ip_batch(Some(netns), &node_setup(index, nodes))?;
        for other in nodes.iter().filter(|n| n.index != index) {
            ip_batch(Some(&other.netns), &[pod_route(index)])?;
        }
        set_ip_forward(netns)
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<Node> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.nodes.iter().find(|n| n.name == name).map(|n| Node {
            shared: self.shared.clone(),
            name: n.name.clone(),
            index: n.index,
            netns: n.netns.clone(),
        })
    }

    /// Every pod currently in the cluster.
    pub fn pods(&self) -> Vec<Pod> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pods.clone()
    }

    /// Deletes the pod's namespace (and with it its veth pair). Anything still holding the
    /// namespace (open fds, running [`NetnsTask`]s) keeps it alive: stop those first.
    pub fn remove_pod(&self, pod: &Pod) -> Result<(), TestbedError> {
        let mut state = self.shared.lock()?;
        let position =
            state
                .pods
                .iter()
                .position(|p| p == pod)
                .ok_or_else(|| TestbedError::UnknownPod {
                    node: pod.node.clone(),
                    pod: pod.name.clone(),
                })?;
        ip_batch(None, &[format!("netns del {}", pod.netns)])?;
        state.pods.remove(position);
        Ok(())
    }

    /// Names of every namespace this cluster currently owns (fabric, nodes, pods).
    pub fn netns_names(&self) -> Vec<String> {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.all_netns(&self.shared.fabric)
    }
}

fn node_setup(index: u8, nodes: &[NodeRecord]) -> Vec<String> {
    let mut lines = vec![
        "link set lo up".to_owned(),
        format!("addr add {}/24 dev eth0", node_ip(index)),
        "link set eth0 up".to_owned(),
        "link add cni0 type bridge".to_owned(),
        format!("addr add 10.100.{index}.1/24 dev cni0"),
        "link set cni0 up".to_owned(),
    ];
    lines.extend(
        nodes
            .iter()
            .filter(|n| n.index != index)
            .map(|n| pod_route(n.index)),
    );
    lines
}

/// The route another node needs to reach node `index`'s pods.
fn pod_route(index: u8) -> String {
    format!("route add 10.100.{index}.0/24 via {}", node_ip(index))
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>, TestbedError> {
        // A panic while holding the lock leaves the bookkeeping usable; keep going.
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.torn_down {
            return Err(TestbedError::TornDown);
        }
        Ok(state)
    }
}

impl State {
    fn all_netns(&self, fabric: &str) -> Vec<String> {
        let mut names: Vec<String> = self.pods.iter().map(|p| p.netns.clone()).collect();
        names.extend(self.nodes.iter().map(|n| n.netns.clone()));
        names.push(fabric.to_owned());
        names
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let names = {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.torn_down = true;
            state.all_netns(&self.shared.fabric)
        };
        let lines: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
        let mut cmd = Command::new("ip");
        // -force: keep deleting the rest when one name is already gone.
        cmd.args(["-force", "-batch", "-"]);
        if let Err(e) = run_batch(cmd, &lines) {
            tracing::warn!(error = %e, "testbed cleanup incomplete");
        }
    }
}

impl Node {
    /// Node name as given to [`Cluster::add_node`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Node number N (1-based).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Underlay address 10.99.0.N.
    pub fn ip(&self) -> Ipv4Addr {
        node_ip(self.index)
    }

    /// Pod network 10.100.N.0 (prefix length 24).
    pub fn pod_cidr(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 100, self.index, 0), 24)
    }

    /// Address of the node's `cni0` bridge, the pods' default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 100, self.index, 1)
    }

    /// Namespace name.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// Namespace path (`/run/netns/NAME`).
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Opens the node's namespace.
    pub fn open_netns(&self) -> Result<File, TestbedError> {
        Ok(netns::open(&self.netns_path())?)
    }

    /// Runs `f` on a thread inside the node's namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R, TestbedError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        Ok(netns::run_in_netns(&self.open_netns()?, f)?)
    }

    /// Starts `factory()` on its own thread and runtime inside the node's namespace.
    pub fn spawn<F, Fut>(&self, factory: F) -> Result<NetnsTask<Fut::Output>, TestbedError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        Ok(netns::spawn_in_netns(&self.open_netns()?, factory)?)
    }

    /// Adds a pod: namespace, veth into `cni0`, address 10.100.N.(10+K), default route.
    pub fn add_pod(&self, name: &str) -> Result<Pod, TestbedError> {
        validate_name("pod", name, MAX_NAME_LEN)?;
        let mut state = self.shared.lock()?;
        if state
            .pods
            .iter()
            .any(|p| p.node == self.name && p.name == name)
        {
            return Err(TestbedError::DuplicatePod {
                node: self.name.clone(),
                pod: name.to_owned(),
            });
        }
        let record = state
            .nodes
            .iter_mut()
            .find(|n| n.name == self.name)
            .ok_or(TestbedError::TornDown)?;
        // Pod numbers are never reused: a deleted pod's host-side veth disappears
        // asynchronously, so reusing its name right away can fail with "File exists".
        let k = record.next_pod;
        if k > MAX_POD_INDEX {
            return Err(TestbedError::Exhausted("at most 244 pods per node"));
        }
        record.next_pod += 1;
        let pod = Pod {
            name: name.to_owned(),
            node: self.name.clone(),
            ip: Ipv4Addr::new(10, 100, self.index, (POD_HOST_OFFSET + k) as u8),
            gateway: self.gateway(),
            netns: format!("{}-p-{}.{name}", self.shared.base, self.name),
        };
        create_netns_with_veth(&pod.netns, &format!("p{k}"), &self.netns)?;
        state.pods.push(pod.clone());
        if let Err(e) = configure_pod(&pod, &self.netns, k) {
            let _ = ip_batch(None, &[format!("netns del {}", pod.netns)]);
            state.pods.pop();
            return Err(e);
        }
        Ok(pod)
    }
}

/// Creates namespace `netns` with an `eth0` veth whose peer `peer` lives in `peer_netns`.
fn create_netns_with_veth(netns: &str, peer: &str, peer_netns: &str) -> Result<(), TestbedError> {
    let created = ip_batch(
        None,
        &[
            format!("netns add {netns}"),
            format!("link add eth0 netns {netns} type veth peer name {peer} netns {peer_netns}"),
        ],
    );
    if created.is_err() {
        // The namespace may exist even though the veth failed.
        let _ = ip_batch(None, &[format!("netns del {netns}")]);
    }
    created
}

fn configure_pod(pod: &Pod, node_netns: &str, k: u16) -> Result<(), TestbedError> {
    ip_batch(Some(node_netns), &[format!("link set p{k} master cni0 up")])?;
    ip_batch(
        Some(&pod.netns),
        &[
            "link set lo up".to_owned(),
            format!("addr add {}/24 dev eth0", pod.ip),
            "link set eth0 up".to_owned(),
            format!("route add default via {}", pod.gateway),
        ],
    )
}

impl Pod {
    /// Pod name as given to [`Node::add_pod`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pod IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Name of the node the pod runs on.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pod's default gateway (its node's `cni0` address).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// Namespace name.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// Namespace path (`/run/netns/NAME`).
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// Opens the pod's namespace; the fd keeps the namespace alive while it is open.
    pub fn open_netns(&self) -> Result<File, TestbedError> {
        Ok(netns::open(&self.netns_path())?)
    }

    /// Runs `f` on a thread inside the pod's namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R, TestbedError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        Ok(netns::run_in_netns(&self.open_netns()?, f)?)
    }

    /// Starts `factory()` on its own thread and runtime inside the pod's namespace.
    pub fn spawn<F, Fut>(&self, factory: F) -> Result<NetnsTask<Fut::Output>, TestbedError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        Ok(netns::spawn_in_netns(&self.open_netns()?, factory)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_validation_table() {
        let cases: &[(&str, bool)] = &[
            ("n1", true),
            ("client-a", true),
            ("a", true),
            ("", false),
            ("Upper", false),
            ("has space", false),
            ("dot.ted", false),
            ("-lead", false),
            ("trail-", false),
            ("slash/x", false),
            (&"x".repeat(33), false),
            (&"x".repeat(32), true),
        ];
        for (name, ok) in cases {
            let result = validate_name("pod", name, MAX_NAME_LEN);
            assert_eq!(result.is_ok(), *ok, "{name:?}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains("invalid pod name"), "{e}");
            }
        }
    }

    #[test]
    fn bad_prefix_is_rejected_before_touching_the_system() {
        let err = Cluster::new("Bad Prefix").err().expect("must fail");
        assert!(err.to_string().contains("invalid prefix name"), "{err}");
        let err = Cluster::new("a-very-long-prefix-x")
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("too long"), "{err}");
    }

    #[test]
    fn node_setup_routes_to_every_other_node() {
        let nodes = [1u8, 2, 3].map(|index| NodeRecord {
            name: format!("n{index}"),
            index,
            netns: format!("x-n{index}"),
            next_pod: 1,
        });
        let lines = node_setup(3, &nodes);
        assert!(lines.contains(&"addr add 10.99.0.3/24 dev eth0".to_owned()));
        assert!(lines.contains(&"addr add 10.100.3.1/24 dev cni0".to_owned()));
        assert!(lines.contains(&"route add 10.100.1.0/24 via 10.99.0.1".to_owned()));
        assert!(lines.contains(&"route add 10.100.2.0/24 via 10.99.0.2".to_owned()));
        assert!(!lines.iter().any(|l| l.contains("10.100.3.0/24 via")));
    }

    #[test]
    fn failing_batch_error_names_command_and_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat >/dev/null; echo nope >&2; exit 1"]);
        let err = run_batch(cmd, &["link set x up".into()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c") && text.contains("nope"), "{text}");
        assert!(text.contains("link set x up"), "{text}");
    }
}
