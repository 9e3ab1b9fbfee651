//! What the agent reports about itself and every pod on its node (`/status`).
//!
//! Istio's agent records its progress on the pod itself (annotation
//! `ambient.istio.io/redirection: enabled|pending`). A config directory cannot be patched, so we
//! keep the same information here instead: [`Redirection`] is that annotation's value, extended
//! with the failure states Istio only logs.

use mesh_core::k8s::FileStatus;
use serde::Serialize;

use crate::enrollment::SkipReason;

/// Where an enrolled pod's redirection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Redirection {
    /// Rules are installed and ztunnel acknowledged the pod.
    Enabled,
    /// Rules are installed; ztunnel has not (yet) acknowledged the pod. Its traffic is captured
    /// but not served (fail closed) until a ztunnel takes it.
    Pending,
    /// The pod could not be captured (namespace not found, rules failed); nothing is installed
    /// and ztunnel was not told. Retried with backoff.
    Failed,
    /// The pod left the mesh but its rules could not be removed yet. Retried with backoff.
    Removing,
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodReport {
    /// The uid ztunnel knows the pod by.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Pod IPs from its status.
    pub ips: Vec<String>,
    /// Whether the pod should be in the mesh.
    pub enrolled: bool,
    /// Why not, when it should not.
    pub skip_reason: Option<SkipReason>,
    /// The redirection state, for pods the agent is acting on.
    pub redirection: Option<Redirection>,
    /// Where the pod's network namespace was found.
    pub netns: Option<String>,
    /// The namespace's inode (what ztunnel sees).
    pub netns_inode: Option<u64>,
    /// The last error, if the pod is not where it should be.
    pub error: Option<String>,
    /// Consecutive failures so far.
    pub failures: u32,
}

/// The configuration the agent is acting on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConfigReport {
    /// Version of the config snapshot of the last reconcile pass.
    pub version: u64,
    /// Per-file status (errors, warnings).
    pub files: Vec<FileStatus>,
    /// Source-level errors.
    pub errors: Vec<String>,
}

/// The agent's view of its node after the last reconcile pass.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AgentStatus {
    /// This node's name.
    pub node: String,
    /// Whether the first reconcile pass has completed.
    pub ready: bool,
    /// The configuration in use.
    pub config: ConfigReport,
    /// Every pod on this node (plus pods being removed that left the config).
    pub pods: Vec<PodReport>,
}

impl AgentStatus {
    /// The report for pod `namespace/name`, if any.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodReport> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}
