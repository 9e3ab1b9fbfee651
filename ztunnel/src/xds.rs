//! ztunnel's delta ADS client: workloads, services and policies pushed by istiod(-lite).
//!
//! One `DeltaAggregatedResources` stream carries both types ztunnel needs
//! (`istio.workload.Address`, `istio.security.Authorization`), each subscribed as a wildcard.
//! Every response is converted resource by resource ([`convert`]) and applied to a copy of the
//! current store, which then replaces the shared one in one step ([`apply`]); bad resources are
//! NACKed by name while the rest is applied. On a lost stream the client reconnects with backoff
//! and tells the server what it has (`initial_resource_versions`); the store is never cleared,
//! so a control-plane outage keeps the last config serving.

pub mod apply;
mod backoff;
mod client;
pub mod convert;
mod grpc;
mod status;
#[cfg(test)]
pub(crate) mod testutil;
pub mod version;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::ca_client::AuthToken;
use metrics::{Key, Label, Metadata, Recorder, SharedString, Unit};

pub use backoff::Backoff;
pub use client::XdsClient;
pub use status::{TypeStatus, XdsStatus, XdsStatusSnapshot};

/// Connections to the control plane that ended, by `reason` (upstream's metric and reasons).
pub const XDS_CONNECTION_TERMINATIONS: &str = "ztunnel_xds_connection_terminations_total";
/// NACKs sent (responses with at least one rejected resource), by `type`.
pub const XDS_NACKS: &str = "ztunnel_xds_nacks_total";

// Upstream's node id uses the cluster-local domain literally.
const NODE_DOMAIN_SUFFIX: &str = "svc.cluster.local";
// Upstream's placeholder when INSTANCE_IP is unknown.
const UNKNOWN_INSTANCE_IP: &str = "1.1.1.1";
// Istio's control-plane keepalives: HTTP/2 pings every 30 s (10 s timeout), TCP keepalive 300 s.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(300);
// Upstream's decode limit: a full snapshot of a large mesh is far beyond tonic's 4 MiB default.
const MAX_DECODE_SIZE: usize = 200 * 1024 * 1024;

/// Why the xDS client could not be built or a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// The configured address is not a usable `https://` URL.
    #[error("invalid xds address {address:?}: {reason}")]
    Address {
        /// The rejected address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The root PEM holds no usable certificate.
    #[error("invalid xds root certificate: {0}")]
    RootCert(#[source] mesh_core::cert::CertError),
    /// The TLS settings could not be applied.
    #[error("cannot configure tls to the xds server: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The TCP/TLS/HTTP2 connection failed.
    #[error("cannot connect to the xds server {address}: {source}")]
    Connect {
        /// The server address.
        address: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The token file could not be read.
    #[error("cannot read xds auth token file {path}: {source}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// A value cannot be sent as gRPC metadata.
    #[error("{0} is not a valid grpc metadata value")]
    Metadata(&'static str),
}

/// Who this ztunnel is, as told to the control plane (Istio's node id and metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeIdentity {
    /// `POD_NAME` of the ztunnel pod.
    pub pod_name: String,
    /// `POD_NAMESPACE` of the ztunnel pod.
    pub pod_namespace: String,
    /// `INSTANCE_IP` of the ztunnel pod.
    pub instance_ip: Option<IpAddr>,
    /// Kubernetes node name.
    pub node_name: Option<String>,
    /// Cluster id (`CLUSTER_ID` metadata and `clusterid` header).
    pub cluster_id: String,
}

impl NodeIdentity {
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`, which istiod parses as `type~ip~id~domain`.
    pub fn node_id(&self) -> String {
        let ip = self
            .instance_ip
            .map_or_else(|| UNKNOWN_INSTANCE_IP.to_string(), |ip| ip.to_string());
        let ns = &self.pod_namespace;
        format!(
            "ztunnel~{ip}~{}.{ns}~{ns}.{NODE_DOMAIN_SUFFIX}",
            self.pod_name
        )
    }

    /// The `Node` sent on the first request of each type.
    pub fn node(&self) -> mesh_proto::discovery::Node {
        let s = |v: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
        };
        let mut fields = BTreeMap::from([
            ("NAME".to_string(), s(&self.pod_name)),
            ("NAMESPACE".to_string(), s(&self.pod_namespace)),
            ("CLUSTER_ID".to_string(), s(&self.cluster_id)),
        ]);
        if let Some(ip) = self.instance_ip {
            fields.insert("INSTANCE_IPS".into(), s(&ip.to_string()));
        }
        if let Some(node) = &self.node_name {
            fields.insert("NODE_NAME".into(), s(node));
        }
        mesh_proto::discovery::Node {
            id: self.node_id(),
            metadata: Some(prost_types::Struct { fields }),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        }
    }
}

/// Settings of an [`XdsClient`].
#[derive(Debug, Clone)]
pub struct XdsClientConfig {
    /// `https://host:port` of the ADS server.
    pub address: String,
    /// PEM of the root(s) the server's certificate must chain to.
    pub root_cert_pem: String,
    /// TLS name to verify instead of the URL host.
    pub tls_server_name: Option<String>,
    /// Bearer token (re-read from its file on every connection: projected tokens rotate).
    pub token: AuthToken,
    /// Node id and metadata.
    pub node: NodeIdentity,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Deadline of the TCP + TLS connect.
    pub connect_timeout: Duration,
}

impl XdsClientConfig {
    /// Defaults for everything but the address, trust root and node.
    pub fn new(
        address: impl Into<String>,
        root_cert_pem: impl Into<String>,
        node: NodeIdentity,
    ) -> Self {
        Self {
            address: address.into(),
            root_cert_pem: root_cert_pem.into(),
            tls_server_name: None,
            token: AuthToken::None,
            node,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a stream ended; the `reason` label of [`XDS_CONNECTION_TERMINATIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// The connection or the stream could not be opened.
    ConnectionError,
    /// The stream failed with a gRPC error.
    Error,
    /// The server ended the stream cleanly.
    Complete,
}

impl Termination {
    /// The label value (upstream's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectionError => "ConnectionError",
            Self::Error => "Error",
            Self::Complete => "Complete",
        }
    }
}

/// The xDS client's counters, recorded into the app's recorder.
#[derive(Clone)]
pub struct XdsMetrics {
    recorder: Arc<dyn Recorder + Send + Sync>,
}

impl std::fmt::Debug for XdsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XdsMetrics")
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl XdsMetrics {
    /// Counters recorded into `recorder` (describes them first).
    pub fn new(recorder: Arc<dyn Recorder + Send + Sync>) -> Self {
        recorder.describe_counter(
            XDS_CONNECTION_TERMINATIONS.into(),
            Some(Unit::Count),
            SharedString::const_str("xDS connections to the control plane that ended (unstable)"),
        );
        recorder.describe_counter(
            XDS_NACKS.into(),
            Some(Unit::Count),
            SharedString::const_str("xDS responses NACKed for rejected resources (unstable)"),
        );
        Self { recorder }
    }

    fn count(&self, name: &'static str, label: Label) {
        let key = Key::from_parts(name, vec![label]);
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Records a stream that ended.
    pub fn terminated(&self, why: Termination) {
        self.count(
            XDS_CONNECTION_TERMINATIONS,
            Label::new("reason", why.as_str()),
        );
    }

    /// Records a NACK for `ty`.
    pub fn nacked(&self, ty: apply::XdsType) {
        self.nacked_label(ty.label());
    }

    fn nacked_label(&self, ty: &'static str) {
        self.count(XDS_NACKS, Label::new("type", ty));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_metadata_follow_istio() {
        let n = NodeIdentity {
            pod_name: "ztunnel-abc".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: Some("10.0.0.7".parse().unwrap()),
            node_name: Some("node1".into()),
            cluster_id: "Kubernetes".into(),
        };
        assert_eq!(
            n.node_id(),
            "ztunnel~10.0.0.7~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let node = n.node();
        let meta = node.metadata.unwrap().fields;
        let get = |k: &str| match &meta[k].kind {
            Some(prost_types::value::Kind::StringValue(v)) => v.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("NAME"), "ztunnel-abc");
        assert_eq!(get("NAMESPACE"), "istio-system");
        assert_eq!(get("INSTANCE_IPS"), "10.0.0.7");
        assert_eq!(get("NODE_NAME"), "node1");
        assert_eq!(get("CLUSTER_ID"), "Kubernetes");
        assert!(node.cluster.is_empty());
        let unknown = NodeIdentity::default();
        assert_eq!(unknown.node_id(), "ztunnel~1.1.1.1~.~.svc.cluster.local");
        assert!(
            !unknown
                .node()
                .metadata
                .unwrap()
                .fields
                .contains_key("NODE_NAME")
        );
    }
}
