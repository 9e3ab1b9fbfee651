//! L4 authorization policies as ztunnel holds them (converted from `istio.security.Authorization`).
//!
//! Interface shared by the xDS client (which converts and stores policies) and the evaluator.
//! The conversion and the evaluator are being written (issue #4); until then conversion rejects.

use std::sync::Arc;

use mesh_proto::security::Authorization;

/// One authorization policy, keyed by `namespace/name`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Namespace the policy lives in (the root namespace for mesh-wide policies).
    pub namespace: String,
}

impl Policy {
    /// The xDS resource name and store key: `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Converts a wire policy, rejecting one ztunnel cannot enforce faithfully with a message that
    /// names the offending field.
    pub fn from_proto(p: &Authorization) -> Result<Policy, String> {
        Err(format!(
            "authorization {}/{}: policy conversion not implemented yet",
            p.namespace, p.name
        ))
    }
}

/// Shared handle used by the store.
pub type PolicyRef = Arc<Policy>;
