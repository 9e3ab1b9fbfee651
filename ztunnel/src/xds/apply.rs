//! Applying one delta response to a [`Store`]: every resource is converted on its own, a bad one
//! is rejected (and named in the NACK) while the good ones are applied, and removals remove.

use mesh_proto::any::{self, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use mesh_proto::discovery::Resource;
use mesh_proto::security::Authorization;
use mesh_proto::workload::Address;

use std::sync::Arc;

use super::convert::{self, AddressResource};
use super::version::Version;
use crate::state::Store;
use crate::state::intern::Interner;
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

/// The version of every applied resource, by name (the name shares the store's key).
pub type Versions = imbl::OrdMap<Arc<str>, Version>;

/// Applies one response of type `ty` to `store`: removes `removed`, then converts and inserts
/// `resources`, recording the applied versions in `versions`. Returns the rejected resources; the
/// rest was applied.
///
/// The resources are taken by value and each is freed once converted, so a first snapshot of
/// 10 000 workloads never holds the whole decoded response beside the whole store: the store's
/// allocations reuse the memory of the resources already converted.
pub fn apply(
    store: &mut Store,
    versions: &mut Versions,
    interner: &mut Interner,
    ty: XdsType,
    removed: &[String],
    resources: Vec<Resource>,
) -> Vec<Rejection> {
    for name in removed {
        remove(store, ty, name);
        versions.remove(name.as_str());
    }
    let mut rejected = Vec::new();
    for r in resources {
        match insert(store, interner, ty, &r) {
            Ok(key) => {
                versions.insert(key, Version::from(r.version.as_str()));
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
    interner.purge();
    rejected
}

/// Applies one resource; returns its name as the store keys it.
fn insert(
    store: &mut Store,
    interner: &mut Interner,
    ty: XdsType,
    r: &Resource,
) -> Result<Arc<str>, String> {
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
            match convert::address(&r.name, &a, interner)? {
                AddressResource::Workload(w) => {
                    // A name that changed kind (service → workload) must not leave both behind.
                    store.remove_service(&r.name);
                    Ok(store.insert_workload(*w))
                }
                AddressResource::Service(s) => {
                    store.remove_workload(&r.name);
                    Ok(store.insert_service(s))
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
            Ok(Arc::from(r.name.as_str()))
        }
    }
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
