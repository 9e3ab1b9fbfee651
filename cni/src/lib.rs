//! zmesh's node agent: decides which pods are enrolled, programs their in-pod traffic redirection
//! and hands each enrolled pod's network namespace to ztunnel over ZDS.
//!
//! * [`enrollment`]: the pure enrollment decision (Istio ambient's rules);
//! * [`locate`]: finding a pod's network namespace (annotation or pod IP);
//! * [`rules`]: the in-pod capture rules and their loader;
//! * [`reconcile`]: keeps the node's pods in or out of the mesh as the config changes;
//! * [`zds`]: the ZDS server ztunnel connects to;
//! * [`config`], [`admin`], [`app`]: the `zmesh-cni` binary's configuration, admin endpoints
//!   and composition root.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod enrollment;
pub mod locate;
pub mod reconcile;
pub mod rules;
pub mod zds;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
