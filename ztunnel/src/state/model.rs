//! ztunnel's own view of workloads and services, independent of how they arrive (local file or xDS).

use std::borrow::Borrow;
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

/// A small map that is built once and then only read: a boxed slice of pairs sorted by key.
///
/// ztunnel holds every workload of the mesh, and each carries a map of the services it backs and,
/// per service, a map of ports, usually with one or two entries. A `BTreeMap` allocates a node with
/// room for eleven entries for each; this allocates exactly the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortedMap<K, V>(Box<[(K, V)]>);

/// Service port → target port. A target of 0 means "the named port", resolved per endpoint.
pub type PortMap = SortedMap<u16, u16>;

/// The services a workload backs (`ns/hostname` → port map), sorted by key.
pub type WorkloadServices = SortedMap<Arc<str>, PortMap>;

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        Self(Box::new([]))
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    /// The value for `key`.
    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.0
            .binary_search_by(|(k, _)| k.borrow().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    /// Sorted by key; a repeated key keeps its last value, like a map.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        iter.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for SortedMap<K, V> {
    fn from(map: BTreeMap<K, V>) -> Self {
        Self(map.into_iter().collect())
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for SortedMap<K, V> {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<K, V, Q> std::ops::Index<&Q> for SortedMap<K, V>
where
    K: Ord + Borrow<Q>,
    Q: Ord + std::fmt::Debug + ?Sized,
{
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        self.get(key)
            .unwrap_or_else(|| panic!("no entry for {key:?}"))
    }
}

impl<K: serde::Serialize, V: serde::Serialize> serde::Serialize for SortedMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, K, V> serde::Deserialize<'de> for SortedMap<K, V>
where
    K: serde::Deserialize<'de> + Ord,
    V: serde::Deserialize<'de>,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<K, V>::deserialize(d).map(Self::from)
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
