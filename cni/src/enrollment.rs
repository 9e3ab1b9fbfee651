//! Which pods belong in the ambient mesh on this node.
//!
//! The rules live in [`mesh_core::k8s::ambient`], shared with the control plane (which must agree
//! on who is enrolled to tell ztunnel to use HBONE); this module adds the node filter and the
//! pod facts the node agent hands to ztunnel.

use mesh_core::k8s::ambient;
use mesh_core::k8s::{Namespace, Pod};
use mesh_proto::zds::WorkloadInfo;

pub use mesh_core::k8s::ambient::{
    DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, DEFAULT_SERVICE_ACCOUNT,
    Decision, SIDECAR_STATUS_ANNOTATION, SkipReason, pod_ips,
};

/// Decides whether `pod` is enrolled on node `node_name`. `namespace` is the pod's namespace
/// object; a missing one counts as a namespace without labels.
pub fn decide(node_name: &str, namespace: Option<&Namespace>, pod: &Pod) -> Decision {
    ambient::decide_on_node(node_name, namespace, pod)
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
    WorkloadInfo {
        name: pod_name(pod).to_owned(),
        namespace: pod_namespace(pod).to_owned(),
        service_account: ambient::service_account(pod).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::k8s::parse_documents;

    // The full decision table is in mesh-core (`k8s/ambient/tests.rs`); this checks the node
    // filter is applied through the shared function.
    #[test]
    fn decide_applies_the_node_filter() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {istio.io/dataplane-mode: ambient}}\n\
                    spec: {nodeName: n1}\nstatus: {podIP: 10.0.0.1}\n";
        let pod: Pod = one(text);
        assert_eq!(decide("n1", None, &pod), Decision::Enroll);
        assert_eq!(
            decide("n2", None, &pod),
            Decision::Skip(SkipReason::OtherNode)
        );
    }

    fn one<T: mesh_core::k8s::Typed + Clone>(text: &str) -> T {
        let parsed = parse_documents(text).unwrap();
        T::from_object(&parsed.objects[0]).unwrap().as_ref().clone()
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
