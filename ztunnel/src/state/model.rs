//! ztunnel's own view of workloads and services, independent of how they arrive (local file or xDS).

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::Identity;

/// How traffic to a workload is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TunnelProtocol {
    /// The workload is meshed: reach it over HBONE on port 15008.
    Hbone,
    /// The workload is not meshed: plain TCP to its port.
    #[serde(alias = "NONE")]
    Tcp,
}

/// Whether a workload may receive traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum HealthStatus {
    /// Ready to serve.
    #[default]
    Healthy,
    /// Not ready; skipped by load balancing.
    Unhealthy,
}

/// A network address qualified by the network it lives on (`""` is the default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NetworkAddress {
    /// Network name; empty for the default network.
    pub network: String,
    /// The IP.
    pub address: IpAddr,
}

impl std::fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// Service port → target port. A target of 0 means "the named port", resolved per endpoint.
pub type PortMap = BTreeMap<u16, u16>;

/// A workload (a pod): its addresses, identity and the services it backs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Primary key, e.g. `Kubernetes//Pod/ns/name`.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE identity derived from trust domain, namespace and service account.
    pub identity: Identity,
    /// Network the addresses belong to.
    pub network: String,
    /// Pod IPs.
    pub addresses: Vec<IpAddr>,
    /// HBONE when meshed, TCP otherwise.
    pub protocol: TunnelProtocol,
    /// Kubernetes node the workload runs on.
    pub node: String,
    /// Services this workload backs (`ns/hostname`) with per-endpoint port mappings.
    pub services: BTreeMap<String, PortMap>,
    /// Health.
    pub status: HealthStatus,
    /// Load-balancing weight (default 1).
    pub capacity: u32,
    /// Canonical service name for telemetry.
    pub canonical_name: String,
    /// Canonical revision for telemetry.
    pub canonical_revision: String,
    /// Owning controller name (e.g. deployment) for telemetry.
    pub workload_name: String,
    /// Names (`ns/name`) of selector-scoped authorization policies.
    pub authorization_policies: Vec<String>,
}

/// A service: VIPs, ports and the extra identities its endpoints may present.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// FQDN, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs (empty for headless services).
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port.
    pub ports: PortMap,
    /// Extra SPIFFE ids endpoints may present.
    pub subject_alt_names: Vec<Identity>,
}

impl Service {
    /// The xDS resource name and workload-map key: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}
