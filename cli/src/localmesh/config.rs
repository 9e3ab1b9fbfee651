//! The files a local cluster is described by: the node agent's Kubernetes YAML, ztunnel's local
//! workload config and istiod-lite's tokens file.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Namespace of the meshed workloads (labelled `istio.io/dataplane-mode=ambient`).
pub const MESHED_NAMESPACE: &str = "demo";
/// Namespace of the unmeshed workloads (no label).
pub const PLAIN_NAMESPACE: &str = "legacy";
/// ztunnel's own identity (the CA lets it impersonate pods on its node).
pub const ZTUNNEL_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

/// A pod of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// Pod name (unique in the cluster; also its netns suffix).
    pub name: String,
    /// Node name.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// In the ambient namespace (enrolled) or in the unlabelled one.
    pub meshed: bool,
}

impl PodSpec {
    /// A pod in [`MESHED_NAMESPACE`] (`meshed`) or [`PLAIN_NAMESPACE`].
    pub fn new(name: &str, node: &str, service_account: &str, meshed: bool) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            service_account: service_account.into(),
            meshed,
        }
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

    /// The pod uid, shared by the agent's YAML (`metadata.uid`, hence ZDS) and ztunnel's config.
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

/// The SPIFFE id of `namespace/service_account` in `cluster.local`.
pub fn identity(namespace: &str, service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
}

/// The bearer token of a node's ztunnel.
pub fn node_token(node: &str) -> String {
    format!("ztunnel-token-of-{node}-0123456789abcdef")
}

/// istiod-lite's tokens file: one token per node's ztunnel, and every meshed pod's placement.
pub fn tokens_file(nodes: &[String], pods: &[PlacedPod]) -> String {
    let mut s = String::from("tokens:\n");
    for node in nodes {
        let _ = writeln!(
            s,
            "  \"{}\": {{ identity: \"{ZTUNNEL_IDENTITY}\", node: {node} }}",
            node_token(node)
        );
    }
    s.push_str("workloads:\n");
    for pod in pods.iter().filter(|p| p.spec.meshed) {
        let _ = writeln!(
            s,
            "  - {{ identity: \"{}\", node: {} }}",
            pod.spec.identity(),
            pod.spec.node
        );
    }
    s
}

/// The node agent's config: both namespaces (only the meshed one labelled ambient) and every
/// pod with its node, IP and netns annotation.
pub fn agent_config(pods: &[PlacedPod], ambient: bool) -> String {
    let label = if ambient {
        "\n  labels: {istio.io/dataplane-mode: ambient}"
    } else {
        ""
    };
    let mut s = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {MESHED_NAMESPACE}{label}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {PLAIN_NAMESPACE}\n"
    );
    for pod in pods {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  \
             uid: \"{}\"\n  annotations: {{zmesh.dev/netns: {}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {}}}\nstatus: {{podIP: {}}}\n",
            pod.spec.name,
            pod.spec.namespace(),
            pod.spec.uid(),
            pod.netns,
            pod.spec.node,
            pod.spec.service_account,
            pod.ip
        );
    }
    s
}

/// ztunnel's local workload config: meshed pods speak HBONE, the others plain TCP.
/// `overrides` replaces the service account of the named pods (to test identity checks).
pub fn ztunnel_config(pods: &[PlacedPod], overrides: &[(&str, &str)]) -> String {
    let mut s = String::from("workloads:\n");
    for pod in pods {
        let spec = &pod.spec;
        let protocol = if spec.meshed { "HBONE" } else { "TCP" };
        let sa = overrides
            .iter()
            .find(|(name, _)| *name == spec.name)
            .map_or(spec.service_account.as_str(), |(_, sa)| sa);
        let _ = writeln!(
            s,
            "- {{uid: \"{}\", name: {}, namespace: {}, serviceAccount: {sa}, \
             trustDomain: cluster.local, workloadIps: [{}], protocol: {protocol}, node: {}}}",
            spec.uid(),
            spec.name,
            spec.namespace(),
            pod.ip,
            spec.node,
        );
    }
    s.push_str("services: []\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(name: &str, node: &str, meshed: bool, last: u8) -> PlacedPod {
        PlacedPod {
            spec: PodSpec::new(name, node, "sa", meshed),
            ip: Ipv4Addr::new(10, 100, 1, last),
            netns: format!("ns-{name}"),
        }
    }

    #[test]
    fn agent_config_labels_only_the_meshed_namespace() {
        let pods = [placed("a", "n1", true, 11), placed("b", "n1", false, 12)];
        let text = agent_config(&pods, true);
        assert_eq!(text.matches("istio.io/dataplane-mode: ambient").count(), 1);
        assert!(text.contains("zmesh.dev/netns: ns-a"));
        assert!(text.contains("uid: \"Kubernetes//Pod/legacy/b\""));
        assert!(text.contains("podIP: 10.100.1.12"));
        assert!(!agent_config(&pods, false).contains("ambient"));
    }

    #[test]
    fn ztunnel_config_marks_protocols_and_applies_overrides() {
        let pods = [placed("a", "n1", true, 11), placed("b", "n1", false, 12)];
        let text = ztunnel_config(&pods, &[("a", "other")]);
        assert!(text.contains("name: a, namespace: demo, serviceAccount: other"));
        assert!(text.contains("protocol: HBONE"));
        assert!(text.contains("name: b, namespace: legacy, serviceAccount: sa"));
        assert!(text.contains("protocol: TCP"));
    }

    #[test]
    fn tokens_cover_nodes_and_meshed_pods_only() {
        let pods = [placed("a", "n1", true, 11), placed("b", "n1", false, 12)];
        let text = tokens_file(&["n1".into()], &pods);
        assert!(text.contains(&node_token("n1")));
        assert!(text.contains("spiffe://cluster.local/ns/demo/sa/sa"));
        assert!(!text.contains("ns/legacy"));
    }
}
