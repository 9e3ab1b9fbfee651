//! ztunnel's own view of workloads and services, independent of how they arrive (local file or xDS).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

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
///
/// A sorted boxed slice: every workload carries one per service it backs, usually with one or two
/// ports, where a `BTreeMap` would allocate a node with room for eleven.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortMap(Box<[(u16, u16)]>);

impl PortMap {
    /// The target of service port `port`.
    pub fn get(&self, port: &u16) -> Option<&u16> {
        self.0
            .binary_search_by_key(port, |(p, _)| *p)
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// (service port, target port) pairs in service-port order.
    pub fn iter(&self) -> impl Iterator<Item = (&u16, &u16)> {
        self.0.iter().map(|(p, t)| (p, t))
    }

    /// The service ports, in order.
    pub fn keys(&self) -> impl Iterator<Item = &u16> {
        self.0.iter().map(|(p, _)| p)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no port is mapped.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(u16, u16)> for PortMap {
    /// Sorted by service port; a repeated service port keeps its first target (a Kubernetes
    /// service may list one port twice, for TCP and UDP).
    fn from_iter<I: IntoIterator<Item = (u16, u16)>>(iter: I) -> Self {
        let mut map = BTreeMap::new();
        for (port, target) in iter {
            map.entry(port).or_insert(target);
        }
        Self(map.into_iter().collect())
    }
}

impl<const N: usize> From<[(u16, u16); N]> for PortMap {
    fn from(pairs: [(u16, u16); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl std::ops::Index<&u16> for PortMap {
    type Output = u16;

    fn index(&self, port: &u16) -> &u16 {
        self.get(port)
            .unwrap_or_else(|| panic!("no mapping for port {port}"))
    }
}

impl serde::Serialize for PortMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for PortMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<u16, u16>::deserialize(d)?;
        Ok(map.into_iter().collect())
    }
}

/// The services a workload backs (`ns/hostname` → port map), sorted by key.
///
/// A sorted boxed slice rather than a `BTreeMap`: a B-tree node has room for 11 entries, ≈ 0.5 KiB
/// for the one or two services a workload usually backs, and ztunnel holds every workload of the
/// mesh.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkloadServices(Box<[(Arc<str>, PortMap)]>);

impl WorkloadServices {
    /// The port map for service `key`.
    pub fn get(&self, key: &str) -> Option<&PortMap> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The service keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Whether the workload backs no service.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<Arc<str>, PortMap>> for WorkloadServices {
    fn from(map: BTreeMap<Arc<str>, PortMap>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl FromIterator<(Arc<str>, PortMap)> for WorkloadServices {
    /// Sorted by key; a repeated key keeps its last value, like a map.
    fn from_iter<I: IntoIterator<Item = (Arc<str>, PortMap)>>(iter: I) -> Self {
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
    pub uid: Arc<str>,
    /// Pod name.
    pub name: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
    /// SPIFFE identity derived from trust domain, namespace and service account (shared by the
    /// workloads of one service account).
    pub identity: Arc<Identity>,
    /// Network the addresses belong to.
    pub network: Arc<str>,
    /// Pod IPs.
    pub addresses: Vec<IpAddr>,
    /// HBONE when meshed, TCP otherwise.
    pub protocol: TunnelProtocol,
    /// Kubernetes node the workload runs on.
    pub node: Arc<str>,
    /// Services this workload backs (`ns/hostname`) with per-endpoint port mappings.
    pub services: WorkloadServices,
    /// Health.
    pub status: HealthStatus,
    /// Load-balancing weight (default 1).
    pub capacity: u32,
    /// Canonical service name for telemetry.
    pub canonical_name: Arc<str>,
    /// Canonical revision for telemetry.
    pub canonical_revision: Arc<str>,
    /// Owning controller name (e.g. deployment) for telemetry.
    pub workload_name: Arc<str>,
    /// Names (`ns/name`) of selector-scoped authorization policies (shared: a mesh-wide STRICT
    /// PeerAuthentication puts the same policy on every workload).
    pub authorization_policies: Box<[Arc<str>]>,
    /// Region / zone / subzone, for locality-aware load balancing (shared by the workloads of
    /// one locality).
    pub locality: Arc<Locality>,
    /// The cluster the workload runs in (the `CLUSTER` load-balancing scope).
    pub cluster_id: Arc<str>,
}

/// Where a workload runs (from its node's `topology.kubernetes.io/*` labels).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    #[serde(default)]
    pub region: Arc<str>,
    /// `topology.kubernetes.io/zone`.
    #[serde(default)]
    pub zone: Arc<str>,
    /// `topology.istio.io/subzone`.
    #[serde(default)]
    pub subzone: Arc<str>,
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
