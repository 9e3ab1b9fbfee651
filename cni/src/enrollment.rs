//! Which pods belong in the ambient mesh: a pure function of the pod, its namespace and the node.
//!
//! The rules are Istio ambient's (`PodRedirectionEnabled` in istio/istio `cni/pkg/util`, plus the
//! node agent's own filters):
//!
//! 1. the pod runs on this node (`spec.nodeName`);
//! 2. it has not terminated (phase `Succeeded` or `Failed`; `Pending`, `Running`, `Unknown` and
//!    no phase at all are live, since hand-written YAML often has no status);
//! 3. the namespace **or** the pod is labelled `istio.io/dataplane-mode=ambient`;
//! 4. the pod has no Istio sidecar (annotation `sidecar.istio.io/status`): ztunnel and a sidecar
//!    on one pod is not supported;
//! 5. the pod is not labelled `istio.io/dataplane-mode=none` (a pod-level opt-out beats the
//!    namespace);
//! 6. the pod is not `hostNetwork` (its "pod netns" is the node's: capturing it would capture
//!    the node);
//! 7. the pod has an IP (`status.podIPs`, else `status.podIP`).

use std::net::IpAddr;

use mesh_core::k8s::{Namespace, Pod};
use mesh_proto::zds::WorkloadInfo;
use serde::Serialize;

/// The label that enrolls a namespace or pod (`ambient`) or opts a pod out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that opts a pod out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Annotation Istio's injector puts on pods with a sidecar.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Service account of pods that name none (what the API server defaults to).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Why a pod is not enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// The pod is scheduled on another node (or not yet scheduled).
    OtherNode,
    /// The pod has terminated (phase `Succeeded` or `Failed`).
    Terminated,
    /// Neither the namespace nor the pod asks for ambient.
    NotAmbient,
    /// The pod runs an Istio sidecar.
    HasSidecar,
    /// The pod is labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// The pod shares the node's network namespace.
    HostNetwork,
    /// The pod has no IP yet.
    NoPodIp,
    /// The pod's IP field is not an IP address.
    InvalidPodIp,
}

/// The outcome for one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Capture the pod's traffic and hand it to ztunnel.
    Enroll,
    /// Leave the pod alone, for this reason.
    Skip(SkipReason),
}

/// Decides whether `pod` is enrolled on node `node_name`. `namespace` is the pod's namespace
/// object; a missing one counts as a namespace without labels.
pub fn decide(node_name: &str, namespace: Option<&Namespace>, pod: &Pod) -> Decision {
    match skip_reason(node_name, namespace, pod) {
        Some(reason) => Decision::Skip(reason),
        None => Decision::Enroll,
    }
}

fn skip_reason(node_name: &str, namespace: Option<&Namespace>, pod: &Pod) -> Option<SkipReason> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node_name) {
        return Some(SkipReason::OtherNode);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Some(SkipReason::Terminated);
    }
    let pod_mode = label(pod.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL);
    let ns_mode = namespace.and_then(|ns| label(ns.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL));
    if pod_mode != Some(DATAPLANE_MODE_AMBIENT) && ns_mode != Some(DATAPLANE_MODE_AMBIENT) {
        return Some(SkipReason::NotAmbient);
    }
    if label(pod.metadata.annotations.as_ref(), SIDECAR_STATUS_ANNOTATION).is_some() {
        return Some(SkipReason::HasSidecar);
    }
    if pod_mode == Some(DATAPLANE_MODE_NONE) {
        return Some(SkipReason::OptedOut);
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Some(SkipReason::HostNetwork);
    }
    match pod_ips(pod) {
        Ok(ips) if ips.is_empty() => Some(SkipReason::NoPodIp),
        Ok(_) => None,
        Err(_) => Some(SkipReason::InvalidPodIp),
    }
}

fn label<'a>(
    map: Option<&'a std::collections::BTreeMap<String, String>>,
    key: &str,
) -> Option<&'a str> {
    map?.get(key).map(String::as_str)
}

/// The pod's IPs: `status.podIPs` if set, else `status.podIP`. An entry that is not an IP
/// address is returned as the error.
pub fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, String> {
    let Some(status) = pod.status.as_ref() else {
        return Ok(Vec::new());
    };
    let listed: Vec<&str> = match status.pod_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(|ip| ip.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .filter(|ip| !ip.is_empty())
        .map(|ip| ip.trim().parse().map_err(|_| ip.to_owned()))
        .collect()
}

/// The uid ztunnel knows the pod by: `metadata.uid`, or `<namespace>/<name>` when the YAML has
/// none (hand-written standalone config).
pub fn pod_uid(pod: &Pod) -> String {
    match pod.metadata.uid.as_deref() {
        Some(uid) if !uid.is_empty() => uid.to_owned(),
        _ => format!("{}/{}", pod_namespace(pod), pod_name(pod)),
    }
}

/// The pod's namespace (parsing fills in `default`).
pub fn pod_namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

/// The pod's name.
pub fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// What ztunnel is told about the pod: name, namespace and service account.
pub fn workload_info(pod: &Pod) -> WorkloadInfo {
    let spec = pod.spec.as_ref();
    // `serviceAccount` is the deprecated alias the API server still fills in.
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .or(s.service_account.as_deref())
        })
        .filter(|sa| !sa.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    WorkloadInfo {
        name: pod_name(pod).to_owned(),
        namespace: pod_namespace(pod).to_owned(),
        service_account: service_account.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::k8s::parse_documents;

    const NODE: &str = "n1";

    fn namespace(mode: Option<&str>) -> Namespace {
        let labels = mode.map_or(String::new(), |m| {
            format!("labels: {{{DATAPLANE_MODE_LABEL}: {m}}}")
        });
        let text = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, {labels}}}\n");
        one(&text)
    }

    fn one<T: mesh_core::k8s::Typed + Clone>(text: &str) -> T {
        let parsed = parse_documents(text).unwrap();
        T::from_object(&parsed.objects[0]).unwrap().as_ref().clone()
    }

    /// A pod built from YAML fragments, so cases read like the config users write.
    struct P<'a> {
        mode: Option<&'a str>,
        node: &'a str,
        host_network: bool,
        ip: &'a str,
        phase: &'a str,
        sidecar: bool,
    }

    const BASE: P<'static> = P {
        mode: None,
        node: NODE,
        host_network: false,
        ip: "podIP: 10.0.0.5",
        phase: "Running",
        sidecar: false,
    };

    fn pod(p: &P<'_>) -> Pod {
        let labels = p
            .mode
            .map_or(String::new(), |m| format!("{DATAPLANE_MODE_LABEL}: {m}"));
        let annotations = if p.sidecar {
            format!("{SIDECAR_STATUS_ANNOTATION}: '{{}}'")
        } else {
            String::new()
        };
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, labels: {{{labels}}}, \
             annotations: {{{annotations}}}}}\nspec: {{nodeName: {}, hostNetwork: {}}}\n\
             status: {{phase: {}, {}}}\n",
            p.node, p.host_network, p.phase, p.ip
        );
        one(&text)
    }

    #[test]
    fn decision_table() {
        use Decision::{Enroll, Skip};
        use SkipReason::*;
        let amb = Some("ambient");
        let cases: &[(&str, Option<&str>, P<'_>, Decision)] = &[
            ("namespace ambient", amb, BASE, Enroll),
            ("pod ambient", None, P { mode: amb, ..BASE }, Enroll),
            ("both ambient", amb, P { mode: amb, ..BASE }, Enroll),
            ("nothing", None, BASE, Skip(NotAmbient)),
            ("namespace none", Some("none"), BASE, Skip(NotAmbient)),
            (
                "namespace other value",
                Some("sidecar"),
                BASE,
                Skip(NotAmbient),
            ),
            (
                "pod opt-out wins",
                amb,
                P {
                    mode: Some("none"),
                    ..BASE
                },
                Skip(OptedOut),
            ),
            (
                "pod opt-out alone",
                None,
                P {
                    mode: Some("none"),
                    ..BASE
                },
                Skip(NotAmbient),
            ),
            (
                "pod other value in ambient ns",
                amb,
                P {
                    mode: Some("x"),
                    ..BASE
                },
                Enroll,
            ),
            ("other node", amb, P { node: "n2", ..BASE }, Skip(OtherNode)),
            (
                "host network",
                amb,
                P {
                    host_network: true,
                    ..BASE
                },
                Skip(HostNetwork),
            ),
            (
                "sidecar",
                amb,
                P {
                    sidecar: true,
                    ..BASE
                },
                Skip(HasSidecar),
            ),
            ("no ip", amb, P { ip: "", ..BASE }, Skip(NoPodIp)),
            (
                "empty ip",
                amb,
                P {
                    ip: "podIP: ''",
                    ..BASE
                },
                Skip(NoPodIp),
            ),
            (
                "bad ip",
                amb,
                P {
                    ip: "podIP: 10.0.0",
                    ..BASE
                },
                Skip(InvalidPodIp),
            ),
            (
                "podIPs preferred",
                amb,
                P {
                    ip: "podIPs: [{ip: 'fd00::5'}]",
                    ..BASE
                },
                Enroll,
            ),
            (
                "pending",
                amb,
                P {
                    phase: "Pending",
                    ..BASE
                },
                Enroll,
            ),
            (
                "unknown phase",
                amb,
                P {
                    phase: "Unknown",
                    ..BASE
                },
                Enroll,
            ),
            (
                "no phase",
                amb,
                P {
                    phase: "''",
                    ..BASE
                },
                Enroll,
            ),
            (
                "succeeded",
                amb,
                P {
                    phase: "Succeeded",
                    ..BASE
                },
                Skip(Terminated),
            ),
            (
                "failed",
                amb,
                P {
                    phase: "Failed",
                    ..BASE
                },
                Skip(Terminated),
            ),
            (
                "terminated and not ambient",
                None,
                P {
                    phase: "Failed",
                    ..BASE
                },
                Skip(Terminated),
            ),
            (
                "other node and host network",
                amb,
                P {
                    node: "x",
                    host_network: true,
                    ..BASE
                },
                Skip(OtherNode),
            ),
        ];
        for (name, ns_mode, p, want) in cases {
            let ns = namespace(*ns_mode);
            assert_eq!(decide(NODE, Some(&ns), &pod(p)), *want, "{name}");
        }
    }

    #[test]
    fn missing_namespace_counts_as_unlabelled() {
        assert_eq!(
            decide(NODE, None, &pod(&BASE)),
            Decision::Skip(SkipReason::NotAmbient)
        );
        let labelled = pod(&P {
            mode: Some("ambient"),
            ..BASE
        });
        assert_eq!(decide(NODE, None, &labelled), Decision::Enroll);
    }

    #[test]
    fn unscheduled_pod_is_other_node() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {istio.io/dataplane-mode: ambient}}\n";
        let pod: Pod = one(text);
        assert_eq!(
            decide(NODE, None, &pod),
            Decision::Skip(SkipReason::OtherNode)
        );
    }

    #[test]
    fn ips_uid_and_workload_info() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n\
                    spec: {serviceAccount: legacy}\n\
                    status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n";
        let pod: Pod = one(text);
        let ips: Vec<String> = pod_ips(&pod)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
        assert_eq!(pod_uid(&pod), "shop/p");
        let info = workload_info(&pod);
        assert_eq!((info.name.as_str(), info.namespace.as_str()), ("p", "shop"));
        assert_eq!(info.service_account, "legacy");

        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, uid: 1234-abcd}\n\
                    spec: {serviceAccountName: web, serviceAccount: legacy}\n";
        let pod: Pod = one(text);
        assert_eq!(pod_uid(&pod), "1234-abcd");
        assert_eq!(workload_info(&pod).service_account, "web");
        assert!(pod_ips(&pod).unwrap().is_empty());

        let pod: Pod =
            one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n");
        assert_eq!(pod_ips(&pod), Err("nope".to_owned()));
        assert_eq!(workload_info(&pod).service_account, DEFAULT_SERVICE_ACCOUNT);
    }
}
