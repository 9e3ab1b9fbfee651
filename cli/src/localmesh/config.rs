//! The files a local cluster is described by: the Kubernetes YAML that istiod-lite serves over
//! xDS and the node agents enroll from, and istiod-lite's tokens file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Namespace of the meshed workloads (labelled `istio.io/dataplane-mode=ambient`).
pub const MESHED_NAMESPACE: &str = "demo";
/// Namespace of the unmeshed workloads (no label).
pub const PLAIN_NAMESPACE: &str = "legacy";
/// ztunnel's own identity (the CA lets it impersonate pods on its node).
pub const ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
/// The demo Service: `web.demo`, selecting the pods labelled `app: server`.
pub const SERVICE_NAME: &str = "web";
/// The label value (`app`) the Service selects.
pub const SERVICE_APP: &str = "server";
/// The Service's cluster IP.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service port; its target is the container port named `http`.
pub const SERVICE_PORT: u16 = 80;
/// The container port named `http` (an HTTP app answering with its pod name).
pub const HTTP_PORT: u16 = 8000;
/// The container port named `echo` (a TCP echo app).
pub const ECHO_PORT: u16 = 8080;
/// The AuthorizationPolicy on the Service's pods: only `sa/client` may use the HTTP port; the
/// echo port is open to everyone.
pub const POLICY_NAME: &str = "web-clients-only";

/// A pod of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Pod name (unique in the cluster; also its netns suffix).
    pub name: String,
    /// Node name.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// The `app` label.
    pub app: String,
    /// The `version` label.
    pub version: String,
    /// In the ambient namespace (enrolled) or in the unlabelled one.
    pub meshed: bool,
}

impl PodSpec {
    /// A pod in [`MESHED_NAMESPACE`] (`meshed`) or [`PLAIN_NAMESPACE`], labelled
    /// `app: <service_account>, version: v1`.
    pub fn new(name: &str, node: &str, service_account: &str, meshed: bool) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            service_account: service_account.into(),
            app: service_account.into(),
            version: "v1".into(),
            meshed,
        }
    }

    /// The same pod with another `version` label.
    pub fn with_version(mut self, version: &str) -> Self {
        self.version = version.into();
        self
    }

    /// The Kubernetes namespace of the pod.
    pub fn namespace(&self) -> &'static str {
        if self.meshed {
            MESHED_NAMESPACE
        } else {
            PLAIN_NAMESPACE
        }
    }

    /// The SPIFFE id of the pod's service account.
    pub fn identity(&self) -> String {
        identity(self.namespace(), &self.service_account)
    }

    /// The workload uid istiod-lite gives the pod (`<cluster id>//Pod/<ns>/<name>`).
    pub fn uid(&self) -> String {
        format!("Kubernetes//Pod/{}/{}", self.namespace(), self.name)
    }
}

/// A placed pod: its spec, IP and network namespace name.
#[derive(Debug, Clone)]
pub struct PlacedPod {
    /// What was asked for.
    pub spec: PodSpec,
    /// Its IP.
    pub ip: Ipv4Addr,
    /// Its network namespace (a name in `/run/netns`).
    pub netns: String,
}

/// What the cluster's objects say beyond the pods' placement; each field is something a test
/// (or an operator, by editing the YAML) changes while the pods keep running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objects {
    /// The meshed namespace carries `istio.io/dataplane-mode=ambient`.
    pub ambient: bool,
    /// Pods labelled `istio.io/dataplane-mode=none` (opted out although the namespace is
    /// ambient).
    pub opted_out: BTreeSet<String>,
    /// Pod name → service account replacing the one in its [`PodSpec`].
    pub service_accounts: BTreeMap<String, String>,
    /// The [`POLICY_NAME`] AuthorizationPolicy exists.
    pub policy: bool,
}

impl Objects {
    /// Whether these objects put `pod` in the mesh: in the ambient namespace, not opted out.
    pub fn captures(&self, pod: &PodSpec) -> bool {
        self.ambient && pod.meshed && !self.opted_out.contains(&pod.name)
    }

    /// The service account `pod` runs as.
    pub fn service_account<'a>(&'a self, pod: &'a PodSpec) -> &'a str {
        self.service_accounts
            .get(&pod.name)
            .unwrap_or(&pod.service_account)
    }
}

impl Default for Objects {
    fn default() -> Self {
        Self {
            ambient: true,
            opted_out: BTreeSet::new(),
            service_accounts: BTreeMap::new(),
            policy: true,
        }
    }
}

/// The SPIFFE id of `namespace/service_account` in `cluster.local`.
pub fn identity(namespace: &str, service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
}

/// The bearer token of a node's ztunnel.
pub fn node_token(node: &str) -> String {
    format!("ztunnel-token-of-{node}-0123456789abcdef")
}

/// istiod-lite's tokens file: one token per node's ztunnel. Which pods run on which node (for
/// the CA's impersonation check) comes from the Pods in the config directory.
pub fn tokens_file(nodes: &[String]) -> String {
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

/// The cluster as Kubernetes YAML: Nodes, Namespaces, ServiceAccounts, Pods, the
/// [`SERVICE_NAME`] Service and (if [`Objects::policy`]) the [`POLICY_NAME`] policy.
pub fn cluster_yaml(nodes: &[String], pods: &[PlacedPod], objects: &Objects) -> String {
    let mut docs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        docs.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n  labels:\n    \
             kubernetes.io/hostname: {node}\n    topology.kubernetes.io/region: local\n    \
             topology.kubernetes.io/zone: local-{}\n",
            i + 1
        ));
    }
    let label = if objects.ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    docs.push(format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESHED_NAMESPACE}{label}\n"
    ));
    docs.push(format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {PLAIN_NAMESPACE}\n"
    ));
    let accounts: BTreeSet<(&str, &str)> = pods
        .iter()
        .map(|p| (p.spec.namespace(), objects.service_account(&p.spec)))
        .collect();
    for (ns, sa) in accounts {
        docs.push(format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {sa}\n  namespace: {ns}\n"
        ));
    }
    for (i, pod) in pods.iter().enumerate() {
        docs.push(pod_yaml(i, pod, objects));
    }
    docs.push(service_yaml());
    if objects.policy {
        docs.push(policy_yaml());
    }
    docs.join("---\n")
}

fn pod_yaml(index: usize, pod: &PlacedPod, objects: &Objects) -> String {
    let spec = &pod.spec;
    let opt_out = if objects.opted_out.contains(&spec.name) {
        "\n    istio.io/dataplane-mode: none"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         uid: 5a1e0000-0000-4000-8000-{index:012}\n  labels:\n    app: {app}\n    \
         version: {version}{opt_out}\n  annotations:\n    zmesh.dev/netns: {netns}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  \
         - name: app\n    image: zmesh.dev/demo-app\n    ports:\n    \
         - {{name: http, containerPort: {HTTP_PORT}}}\n    \
         - {{name: echo, containerPort: {ECHO_PORT}}}\n\
         status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  conditions:\n  \
         - {{type: Ready, status: \"True\"}}\n",
        name = spec.name,
        ns = spec.namespace(),
        app = spec.app,
        version = spec.version,
        netns = pod.netns,
        node = spec.node,
        sa = objects.service_account(spec),
        ip = pod.ip,
    )
}

fn service_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE_NAME}\n  \
         namespace: {MESHED_NAMESPACE}\nspec:\n  type: ClusterIP\n  clusterIP: {SERVICE_VIP}\n  \
         selector:\n    app: {SERVICE_APP}\n  ports:\n  \
         - {{name: http, port: {SERVICE_PORT}, targetPort: http, protocol: TCP}}\n"
    )
}

fn policy_yaml() -> String {
    let client = identity(MESHED_NAMESPACE, "client");
    let principal = client.trim_start_matches("spiffe://");
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  \
         name: {POLICY_NAME}\n  namespace: {MESHED_NAMESPACE}\nspec:\n  selector:\n    \
         matchLabels:\n      app: {SERVICE_APP}\n  action: ALLOW\n  rules:\n  \
         - from:\n    - source:\n        principals: [\"{principal}\"]\n    \
         to:\n    - operation:\n        ports: [\"{HTTP_PORT}\"]\n  \
         - to:\n    - operation:\n        ports: [\"{ECHO_PORT}\"]\n"
    )
}

#[cfg(test)]
mod tests {
    use istiod_lite::translate::{TranslateConfig, Translated, translate};
    use mesh_core::k8s::{Snapshot, parse_documents};
    use mesh_proto::workload::{TunnelProtocol, Workload, WorkloadStatus, address};

    use super::*;

    fn placed(name: &str, node: &str, meshed: bool, last: u8) -> PlacedPod {
        PlacedPod {
            spec: PodSpec::new(name, node, "sa", meshed),
            ip: Ipv4Addr::new(10, 100, 1, last),
            netns: format!("ns-{name}"),
        }
    }

    fn translated(text: &str) -> Translated {
        let parsed = parse_documents(text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        let snapshot = Snapshot::from_objects(parsed.objects);
        translate(&snapshot, &TranslateConfig::default())
    }

    fn workload(t: &Translated, ns: &str, name: &str) -> Workload {
        match &t.addresses[&format!("Kubernetes//Pod/{ns}/{name}")].r#type {
            Some(address::Type::Workload(w)) => w.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn cluster_yaml_labels_only_the_meshed_namespace() {
        let pods = [placed("a", "n1", true, 11), placed("b", "n1", false, 12)];
        let objects = Objects::default();
        let text = cluster_yaml(&["n1".into()], &pods, &objects);
        assert_eq!(text.matches("istio.io/dataplane-mode: ambient").count(), 1);
        assert!(text.contains("zmesh.dev/netns: ns-a"));
        assert!(text.contains("podIP: 10.100.1.12"));
        let off = Objects {
            ambient: false,
            ..Objects::default()
        };
        assert!(!cluster_yaml(&["n1".into()], &pods, &off).contains("ambient"));
    }

    #[test]
    fn cluster_yaml_translates_to_workloads_a_service_and_a_policy() {
        let pods = [
            placed("a", "n1", true, 11),
            placed("b", "n2", true, 12),
            placed("c", "n2", false, 13),
        ];
        let mut objects = Objects::default();
        objects.service_accounts.insert("b".into(), "other".into());
        let nodes = ["n1".to_string(), "n2".to_string()];
        let mut server = pods.clone();
        for p in &mut server[..2] {
            p.spec.app = SERVICE_APP.into();
        }
        let t = translated(&cluster_yaml(&nodes, &server, &objects));
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let a = workload(&t, "demo", "a");
        assert_eq!(a.tunnel_protocol, TunnelProtocol::Hbone as i32);
        assert_eq!(a.status, WorkloadStatus::Healthy as i32);
        assert_eq!(
            (a.node.as_str(), a.canonical_revision.as_str()),
            ("n1", "v1")
        );
        assert_eq!(a.locality.unwrap().zone, "local-1");
        // The service's named target port resolves to the container port on each endpoint.
        let key = format!("demo/{SERVICE_NAME}.demo.svc.cluster.local");
        let ports = &a.services[&key].ports[0];
        assert_eq!((ports.service_port, ports.target_port), (80, 8000));
        let b = workload(&t, "demo", "b");
        assert_eq!(
            (b.service_account.as_str(), b.node.as_str()),
            ("other", "n2")
        );
        assert!(b.services.contains_key(&key));
        let c = workload(&t, "legacy", "c");
        assert_eq!(c.tunnel_protocol, TunnelProtocol::None as i32);
        assert!(t.addresses.contains_key(&key));
        assert!(
            t.authorizations
                .contains_key(&format!("demo/{POLICY_NAME}"))
        );

        objects.opted_out.insert("a".into());
        objects.policy = false;
        let t = translated(&cluster_yaml(&nodes, &server, &objects));
        let a = workload(&t, "demo", "a");
        assert_eq!(a.tunnel_protocol, TunnelProtocol::None as i32);
        assert!(t.authorizations.is_empty());
    }

    #[test]
    fn tokens_cover_every_node() {
        let text = tokens_file(&["n1".into(), "n2".into()]);
        assert!(text.contains(&node_token("n1")) && text.contains(&node_token("n2")));
        assert!(text.contains(ZTUNNEL_IDENTITY));
    }
}
