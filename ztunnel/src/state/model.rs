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

/// The services a workload backs (`ns/hostname` → port map), sorted by key.
///
/// A sorted boxed slice rather than a `BTreeMap`: a B-tree node has room for 11 entries, ≈ 0.5 KiB
/// for the one or two services a workload usually backs, and ztunnel holds every workload of the
/// mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadServices(Box<[(String, PortMap)]>);

impl WorkloadServices {
    /// The port map for service `key`.
    pub fn get(&self, key: &str) -> Option<&PortMap> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The service keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Whether the workload backs no service.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, PortMap>> for WorkloadServices {
    fn from(map: BTreeMap<String, PortMap>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl FromIterator<(String, PortMap)> for WorkloadServices {
    /// Sorted by key; a repeated key keeps its last value, like a map.
    fn from_iter<I: IntoIterator<Item = (String, PortMap)>>(iter: I) -> Self {
        iter.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl std::ops::Index<&str> for WorkloadServices {
    type Output = PortMap;

    fn index(&self, key: &str) -> &PortMap {
        self.get(key)
            .unwrap_or_else(|| panic!("workload backs no service {key:?}"))
    }
}

impl serde::Serialize for WorkloadServices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

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
    pub services: WorkloadServices,
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
    /// Region / zone / subzone, for locality-aware load balancing.
    pub locality: Locality,
    /// The cluster the workload runs in (the `CLUSTER` load-balancing scope).
    pub cluster_id: String,
}

/// Where a workload runs (from its node's `topology.kubernetes.io/*` labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    #[serde(default)]
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    #[serde(default)]
    pub zone: String,
    /// `topology.istio.io/subzone`.
    #[serde(default)]
    pub subzone: String,
}

/// A property a client and an endpoint may share; load balancing prefers endpoints that share
/// the scopes of [`LoadBalancing::routing_preference`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same Kubernetes node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// How the routing preference is applied.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LbMode {
    /// No locality preference: every eligible endpoint.
    #[default]
    Standard,
    /// Only endpoints that share every preferred scope with the client (e.g.
    /// `internalTrafficPolicy: Local`); none ⇒ the connection fails.
    Strict,
    /// Endpoints sharing the longest prefix of the preferred scopes; the rest only when none
    /// closer exists (e.g. `trafficDistribution: PreferClose`).
    Failover,
    /// No endpoint selection: plain TCP to the original destination, unchanged.
    Passthrough,
}

/// Which endpoints are eligible by health.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    /// Healthy endpoints only.
    #[default]
    OnlyHealthy,
    /// Unhealthy endpoints too (`publishNotReadyAddresses: true`).
    AllowAll,
}

/// A service's load-balancing settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancing {
    /// Scopes to share with the client, most important first.
    #[serde(default)]
    pub routing_preference: Vec<Scope>,
    /// How the preference applies.
    #[serde(default)]
    pub mode: LbMode,
    /// Which endpoints are eligible by health.
    #[serde(default)]
    pub health_policy: HealthPolicy,
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
    /// Endpoint selection (locality, health).
    pub load_balancing: LoadBalancing,
}

impl Service {
    /// The xDS resource name and workload-map key: `<namespace>/<hostname>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}
