//! Which pods belong in the ambient mesh: a pure function of the pod and its namespace, shared
//! by the node agent (which captures the pods on its node) and the control plane (which tells
//! ztunnel to reach enrolled pods over HBONE).
//!
//! The rules are Istio ambient's (`PodRedirectionEnabled` in istio/istio `cni/pkg/util`, plus the
//! node agent's own filters):
//!
//! 1. (node agent only, [`decide_on_node`]) the pod runs on this node (`spec.nodeName`);
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

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::{Namespace, Pod};

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
    /// The pod is scheduled on another node (or not yet scheduled); only [`decide_on_node`]
    /// gives this reason.
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
    /// The pod is in the mesh: its traffic is captured and handed to ztunnel.
    Enroll,
    /// The pod is not in the mesh, for this reason.
    Skip(SkipReason),
}

/// Decides whether `pod` is in the ambient mesh, wherever it runs. `namespace` is the pod's
/// namespace object; a missing one counts as a namespace without labels.
pub fn decide(namespace: Option<&Namespace>, pod: &Pod) -> Decision {
    match skip_reason(namespace, pod) {
        Some(reason) => Decision::Skip(reason),
        None => Decision::Enroll,
    }
}

/// [`decide`] for the node agent of `node_name`: pods scheduled elsewhere are
/// [`SkipReason::OtherNode`] (checked first).
pub fn decide_on_node(node_name: &str, namespace: Option<&Namespace>, pod: &Pod) -> Decision {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if node != Some(node_name) {
        return Decision::Skip(SkipReason::OtherNode);
    }
    decide(namespace, pod)
}

/// Whether `pod` is labelled, or its namespace is, `istio.io/dataplane-mode=ambient` (rule 3
/// alone).
pub fn wants_ambient(namespace: Option<&Namespace>, pod: &Pod) -> bool {
    let pod_mode = label(pod.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL);
    let ns_mode = namespace.and_then(|ns| label(ns.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL));
    pod_mode == Some(DATAPLANE_MODE_AMBIENT) || ns_mode == Some(DATAPLANE_MODE_AMBIENT)
}

fn skip_reason(namespace: Option<&Namespace>, pod: &Pod) -> Option<SkipReason> {
    if is_terminated(pod) {
        return Some(SkipReason::Terminated);
    }
    if !wants_ambient(namespace, pod) {
        return Some(SkipReason::NotAmbient);
    }
    if label(pod.metadata.annotations.as_ref(), SIDECAR_STATUS_ANNOTATION).is_some() {
        return Some(SkipReason::HasSidecar);
    }
    if label(pod.metadata.labels.as_ref(), DATAPLANE_MODE_LABEL) == Some(DATAPLANE_MODE_NONE) {
        return Some(SkipReason::OptedOut);
    }
    if is_host_network(pod) {
        return Some(SkipReason::HostNetwork);
    }
    match pod_ips(pod) {
        Ok(ips) if ips.is_empty() => Some(SkipReason::NoPodIp),
        Ok(_) => None,
        Err(_) => Some(SkipReason::InvalidPodIp),
    }
}

/// Whether the pod has terminated (phase `Succeeded` or `Failed`).
pub fn is_terminated(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether the pod shares the node's network namespace (`spec.hostNetwork`).
pub fn is_host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

fn label<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
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

/// The pod's service account: `spec.serviceAccountName`, else the deprecated
/// `spec.serviceAccount` the API server still fills in, else [`DEFAULT_SERVICE_ACCOUNT`].
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .filter(|sa| !sa.is_empty())
                .or(s.service_account.as_deref())
        })
        .filter(|sa| !sa.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

#[cfg(test)]
mod tests;
