//! The pods of one node in a config snapshot, with their enrollment decision.

use std::collections::BTreeMap;

use mesh_core::k8s::{Namespace, Pod, Snapshot};
use mesh_proto::zds::WorkloadInfo;
use tracing::warn;

use crate::enrollment::{
    Decision, SkipReason, decide, pod_ips, pod_name, pod_namespace, pod_uid, workload_info,
};
use crate::locate::{NETNS_ANNOTATION, PodHint};

/// What an enrolled pod is enrolled with; a change means un-enroll and enroll again.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Want {
    pub info: WorkloadInfo,
    pub hint: PodHint,
}

/// One pod of this node.
#[derive(Clone, Debug)]
pub(super) struct NodePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<String>,
    pub decision: Decision,
    pub hint: PodHint,
    /// A problem with the pod's config that the decision does not cover.
    pub error: Option<String>,
}

/// The pods of this node, and the enrolled ones by uid.
#[derive(Debug, Default)]
pub(super) struct NodeView {
    pub pods: Vec<NodePod>,
    pub wanted: BTreeMap<String, Want>,
}

impl NodeView {
    pub fn build(node_name: &str, snapshot: &Snapshot) -> Self {
        let mut view = NodeView::default();
        for pod in snapshot.list::<Pod>() {
            let namespace = snapshot.get::<Namespace>("", pod_namespace(pod));
            let decision = decide(node_name, namespace.map(AsRef::as_ref), pod);
            if decision == Decision::Skip(SkipReason::OtherNode) {
                continue;
            }
            view.add(pod, decision);
        }
        view
    }

    fn add(&mut self, pod: &Pod, decision: Decision) {
        let uid = pod_uid(pod);
        let hint = PodHint {
            annotation: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NETNS_ANNOTATION).cloned()),
            ips: pod_ips(pod).unwrap_or_default(),
        };
        let mut node_pod = NodePod {
            uid: uid.clone(),
            namespace: pod_namespace(pod).to_owned(),
            name: pod_name(pod).to_owned(),
            ips: hint.ips.iter().map(ToString::to_string).collect(),
            decision,
            hint: hint.clone(),
            error: None,
        };
        if decision == Decision::Enroll {
            let other = self
                .pods
                .iter()
                .find(|p| p.uid == uid && p.decision == Decision::Enroll && p.error.is_none());
            if let Some(other) = other {
                // Two objects claiming one uid would fight over one ztunnel entry: the first
                // (by namespace/name) keeps it, the other is reported and left alone.
                let error = format!(
                    "uid {uid} is also used by pod {}/{}",
                    other.namespace, other.name
                );
                warn!(pod = %format!("{}/{}", node_pod.namespace, node_pod.name), %error, "pod not enrolled");
                node_pod.error = Some(error);
            } else {
                let info = workload_info(pod);
                self.wanted.insert(uid, Want { info, hint });
            }
        }
        self.pods.push(node_pod);
    }
}
