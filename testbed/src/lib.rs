//! Network-namespace testbed for zmesh.
//!
//! A [`Cluster`] of nodes and pods built from Linux network namespaces, veth pairs and bridges
//! (layout in [`cluster`]), plus the pieces tests and the `zmesh up` demo need around it:
//! running code inside a namespace ([`netns`]), test apps and clients ([`apps`]), and the
//! sandbox/privilege checks ([`sandbox`]). See `shared/reference/testbed.md` for the verified
//! kernel facts behind it.
//!
//! This is a leaf library: it must not depend on mesh-core or any component crate.
#![forbid(unsafe_code)]

pub mod apps;
pub mod cluster;
pub mod netns;
pub mod sandbox;

pub use cluster::{Cluster, Node, Pod, TestbedError};
pub use netns::{NetnsError, NetnsTask, run_in_netns, run_in_netns_async, spawn_in_netns};
pub use sandbox::{require_netns, require_netns_tools};
