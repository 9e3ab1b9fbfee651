//! Kubernetes objects as configuration: the typed object model shared by the node agent and the
//! control plane, and a source that serves them from a directory of YAML files.
//!
//! * [`Kind`] / [`Object`] / [`ObjectKey`]: the kinds we understand, as `k8s-openapi` types
//!   (API version feature `v1_34`). Adding a kind (Service, EndpointSlice, ServiceAccount, Node,
//!   or our own CRD types) is one line in the `kinds!` list in `k8s/object.rs`.
//! * [`parse_documents`]: multi-document YAML (or a `v1 List`) into objects. Objects are
//!   recognised by `apiVersion` + `kind`; unknown kinds are skipped with a warning, never an
//!   error, so one config directory can hold manifests for other tools too.
//! * [`Snapshot`]: an immutable, versioned view of every object, with typed lookups and a
//!   [`Snapshot::diff`] that turns two snapshots into add/update/delete [`Change`]s.
//! * [`DirSource`]: watches a directory (by polling) and publishes a new [`Snapshot`] on a
//!   `tokio::sync::watch` channel whenever an object changes. A file that stops parsing keeps
//!   serving its last good objects and reports the error in [`FileStatus`].
//!
//! * (feature `kube`) `KubeSource`: the same [`Snapshot`]s from Kubernetes API watchers
//!   (`kube` crate), one per kind, decoded by the same code as the YAML files. Consumers only see
//!   snapshots and cannot tell the sources apart.
//! * (features `kube` + `testing`) `fake_api`: an in-process fake API server (list, chunked
//!   watch, 410 Gone, 404) that the Kubernetes source is tested against. **No real API server
//!   has been exercised**: the Kubernetes path is tested against this fake and `tower-test`
//!   mocks only.

mod dir;
#[cfg(all(feature = "testing", feature = "kube"))]
pub mod fake_api;
#[cfg(feature = "kube")]
mod kube_source;
mod object;
mod parse;
mod snapshot;

pub use k8s_openapi;
pub use k8s_openapi::api::core::v1::{Namespace, Pod};

pub use dir::{
    DEFAULT_MAX_FILE_SIZE, DEFAULT_POLL_INTERVAL, DirSource, DirSourceConfig, SourceError,
};
#[cfg(feature = "kube")]
pub use kube_source::{
    DEFAULT_DEBOUNCE, DEFAULT_PAGE_SIZE, KubeSource, KubeSourceConfig, KubeSourceError,
    api_resource, infer_client, kubeconfig_client,
};
pub use object::{DecodeError, Kind, Object, ObjectKey, Typed};
pub use parse::{ParseError, ParsedFile, parse_documents};
pub use snapshot::{Change, FileStatus, Snapshot};

/// Namespace given to namespaced objects whose `metadata.namespace` is empty, as `kubectl` does.
pub const DEFAULT_NAMESPACE: &str = "default";
