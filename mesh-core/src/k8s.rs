//! Kubernetes objects as configuration: the typed object model shared by the node agent and the
//! control plane, and a source that serves them from a directory of YAML files.
//!
//! * [`Kind`] / [`Object`] / [`ObjectKey`]: the kinds we understand. Built-in kinds are
//!   `k8s-openapi` types (API version feature `v1_34`): `v1` Namespace, Pod, Service,
//!   ServiceAccount, Node and `discovery.k8s.io/v1` EndpointSlice. Istio's `security.istio.io/v1`
//!   [`AuthorizationPolicy`] and [`PeerAuthentication`] are our own serde types in [`istio`]
//!   that keep the paths of fields they do not model (`unknown_fields`), so a consumer can
//!   report "unsupported field" instead of silently ignoring a constraint. Adding a kind is one
//!   line in the `kinds!` list in `k8s/object.rs`.
//! * [`ambient`]: the enrollment decision (`istio.io/dataplane-mode`), a pure function of a
//!   Namespace and a Pod shared by the node agent and the control plane.
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

pub mod ambient;
mod dir;
#[cfg(all(feature = "testing", feature = "kube"))]
pub mod fake_api;
pub mod istio;
#[cfg(feature = "kube")]
mod kube_source;
mod object;
mod parse;
mod snapshot;

pub use k8s_openapi;
pub use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

pub use istio::{AuthorizationPolicy, PeerAuthentication};

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
