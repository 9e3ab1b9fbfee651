//! Applying one delta response to a [`Store`]: every resource is converted on its own, a bad one
//! is rejected (and named in the NACK) while the good ones are applied, and removals remove.

use mesh_proto::any::{self, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_proto::discovery::{DeltaDiscoveryResponse, Resource};
use mesh_proto::security::Authorization;
use mesh_proto::workload::Address;

use super::convert::{self, AddressResource};
use crate::state::Store;
use crate::state::policy::Policy;

/// The resource types ztunnel subscribes to, in subscription order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XdsType {
    /// `istio.workload.Address`: workloads and services.
    Address,
    /// `istio.security.Authorization`: L4 policies.
    Authorization,
}

impl XdsType {
    /// Every type, in the order ztunnel subscribes.
    pub const ALL: [XdsType; 2] = [XdsType::Address, XdsType::Authorization];

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Address => ADDRESS_TYPE_URL,
            Self::Authorization => AUTHORIZATION_TYPE_URL,
        }
    }

    /// A short name for metric labels and readiness.
    pub fn label(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Authorization => "authorization",
        }
    }

    /// The type with this URL, if ztunnel subscribes to it.
    pub fn from_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }
}

/// A resource that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The resource name.
    pub name: String,
    /// What is wrong with it (already names the resource and the field).
    pub reason: String,
}

/// Applies `response` (of type `ty`) to `store`, recording the applied versions in `versions`.
/// Returns the rejected resources; the rest was applied.
pub fn apply(
    store: &mut Store,
    versions: &mut imbl::OrdMap<String, String>,
    ty: XdsType,
    response: &DeltaDiscoveryResponse,
) -> Vec<Rejection> {
    for name in &response.removed_resources {
        remove(store, ty, name);
        versions.remove(name);
    }
    let mut rejected = Vec::new();
    for r in &response.resources {
        match insert(store, ty, r) {
            Ok(()) => {
                versions.insert(r.name.clone(), r.version.clone());
            }
            // A rejected update keeps the previous version of the resource (and its recorded
            // version, so a reconnect asks for it again).
            Err(reason) => {
                // The control plane must be able to tell which resource a reason is about.
                let reason = if reason.contains(&r.name) {
                    reason
                } else {
                    format!("{:?}: {reason}", r.name)
                };
                rejected.push(Rejection {
                    name: r.name.clone(),
                    reason,
                });
            }
        }
    }
    rejected
}

fn insert(store: &mut Store, ty: XdsType, r: &Resource) -> Result<(), String> {
    if r.name.is_empty() {
        return Err("resource with an empty name".into());
    }
    let payload = r
        .resource
        .as_ref()
        .ok_or_else(|| format!("{:?}: resource has no payload", r.name))?;
    match ty {
        XdsType::Address => {
            let a: Address = any::unpack(payload).map_err(|e| format!("{:?}: {e}", r.name))?;
            match convert::address(&r.name, &a)? {
                AddressResource::Workload(w) => {
                    // A name that changed kind (service → workload) must not leave both behind.
                    store.remove_service(&r.name);
                    store.insert_workload(*w);
                }
                AddressResource::Service(s) => {
                    store.remove_workload(&r.name);
                    store.insert_service(s);
                }
            }
        }
        XdsType::Authorization => {
            let a: Authorization =
                any::unpack(payload).map_err(|e| format!("{:?}: {e}", r.name))?;
            let policy = Policy::from_proto(&a)?;
            if policy.key() != r.name {
                return Err(format!(
                    "authorization {:?}: resource name does not match <namespace>/<name> {:?}",
                    r.name,
                    policy.key()
                ));
            }
            store.insert_policy(policy);
        }
    }
    Ok(())
}

fn remove(store: &mut Store, ty: XdsType, name: &str) {
    match ty {
        // Like upstream: a workload uid first, else a service `namespace/hostname`.
        XdsType::Address => {
            if store.remove_workload(name).is_none() {
                store.remove_service(name);
            }
        }
        XdsType::Authorization => {
            store.remove_policy(name);
        }
    }
}

/// The NACK message: every rejected resource and why, semicolon-joined like upstream.
pub fn nack_message(rejected: &[Rejection]) -> String {
    rejected
        .iter()
        .map(|r| r.reason.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
