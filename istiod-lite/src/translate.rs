//! Translation of Kubernetes objects into the xDS resources ztunnel consumes: pure functions
//! from a [`Snapshot`] to `istio.workload.Address` (Workload and Service) and
//! `istio.security.Authorization` resources, following istiod's ambient semantics
//! (istio-ambient-protocol.md §5.4, §5.5, §9.2). No IO; bad objects become [`Translated::problems`]
//! and never stop the rest of the snapshot from translating.
//!
//! # Workloads (one per Pod)
//! * Resource name = `uid` = `<cluster_id>//Pod/<namespace>/<name>`; aliases (see [`aliases`]) =
//!   `<network>/<ip>` per pod IP, none for `hostNetwork` pods (their IP is the node's, so they
//!   are not indexed by IP; `network_mode` = `HOST_NETWORK`).
//! * Skipped: terminated pods (phase `Succeeded`/`Failed`), pods without an IP; a pod IP that is
//!   not an address is a problem.
//! * `addresses` = raw 4/16-byte pod IPs; `tunnel_protocol` = `HBONE` exactly when the shared
//!   enrollment rule ([`mesh_core::k8s::ambient::decide`]) enrolls the pod, else `NONE`.
//! * `trust_domain` is elided when `cluster.local` (as istiod); `service_account` is the pod's
//!   (or `default`); `node`, `cluster_id`, `network` and `workload_type = POD` are filled in;
//!   `locality` comes from the Node's `topology.kubernetes.io/{region,zone}` and
//!   `topology.istio.io/subzone` labels.
//! * `canonical_name` / `canonical_revision` follow Istio's label precedence
//!   (`service.istio.io/canonical-*`, `app.kubernetes.io/*`, `app`/`version`, then the workload
//!   name / `latest`). `workload_name` is the owner: a ReplicaSet's Deployment (the
//!   `pod-template-hash` suffix removed), a Job's CronJob (a numeric suffix removed), any other
//!   owner's name, else the pod name.
//! * `status` = `HEALTHY` when the pod's `Ready` condition is `True` and it is not being
//!   deleted, else `UNHEALTHY`.
//! * `services` maps `<ns>/<hostname>` of every Service selecting the pod to the ports this
//!   endpoint serves: target ports, with named target ports resolved against the pod's container
//!   ports (a name the pod does not declare leaves that port out for this pod).
//! * `authorization_policies` lists the selector-scoped policies that select the pod (from its
//!   namespace and the root namespace) and the PeerAuthentication-derived policies below.
//!
//! # Services
//! * Resource name `<ns>/<hostname>`, hostname `<name>.<ns>.svc.<domain_suffix>`; aliases are
//!   `<network>/<vip>` per address. VIPs are cluster IPs, external IPs and load-balancer ingress
//!   IPs; headless services (`clusterIP: None`) have none. `ExternalName` services are skipped.
//! * Ports: `target_port` = the numeric target port, the service port when unset, and `0` for a
//!   named target port (resolved per endpoint, in the workload's `services`).
//! * Endpoints come from the Service's pod selector, evaluated here against the pods in the
//!   snapshot (indexed by namespace and label, so the cost is proportional to the matches, not to
//!   services × pods). EndpointSlices are **not** read: every field they carry for pods is
//!   derivable from the pods themselves, and deriving it keeps one source of truth; Services
//!   without a selector therefore have no endpoints.
//! * `ip_families` from `spec.ipFamilies`; `load_balancing` from `spec.trafficDistribution`
//!   (`PreferClose`/`PreferSameZone` → network, region, zone, subzone failover; `PreferSameNode`
//!   adds node) or `internalTrafficPolicy: Local` (strict node); `health_policy = ALLOW_ALL`
//!   when `publishNotReadyAddresses`.
//!
//! # Authorization
//! Details in `translate/authz.rs` and `translate/peer_authn.rs`. ALLOW/DENY only (CUSTOM, AUDIT and
//! `targetRef(s)` policies are not for ztunnel), L4 fields mapped one to one, L7 or unknown
//! fields make an ALLOW rule disappear (fails closed) and are omitted from a DENY rule (applies
//! more broadly), each with a problem. PeerAuthentication `STRICT` becomes the static DENY policy
//! `<root ns>/istio_converted_static_strict` (`not_principals: [presence]`) referenced from the
//! affected workloads; selector policies with `portLevelMtls` become per-policy DENY policies
//! `<ns>/converted_peer_authentication_<name>` restricted by destination port.

mod authz;
mod index;
mod peer_authn;
mod service;
mod workload;

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::k8s::Snapshot;
use mesh_proto::security::Authorization;
use mesh_proto::workload::{Address, NetworkMode, address};

/// Deployment-wide facts the translation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TranslateConfig {
    /// SPIFFE trust domain of the mesh (elided from workloads when `cluster.local`).
    pub trust_domain: String,
    /// Cluster id; prefixes workload uids.
    pub cluster_id: String,
    /// Network of every workload and VIP (`""` = the default network).
    pub network: String,
    /// Istio root namespace: its namespace-wide policies apply mesh-wide.
    pub root_namespace: String,
    /// DNS suffix of service hostnames (`<svc>.<ns>.svc.<suffix>`).
    pub domain_suffix: String,
}

impl Default for TranslateConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            network: String::new(),
            root_namespace: "istio-system".into(),
            domain_suffix: "cluster.local".into(),
        }
    }
}

/// The xDS resources of one snapshot, keyed by resource name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translated {
    /// `istio.workload.Address` resources: workloads by uid, services by `<ns>/<hostname>`.
    pub addresses: BTreeMap<String, Address>,
    /// `istio.security.Authorization` resources by `<ns>/<name>`.
    pub authorizations: BTreeMap<String, Authorization>,
    /// Per-object problems, each starting with the object (`Service shop/web: ...`).
    pub problems: Vec<String>,
}

/// Translates every object of `snapshot`.
pub fn translate(snapshot: &Snapshot, cfg: &TranslateConfig) -> Translated {
    let mut out = Translated::default();
    let policies = authz::translate_all(snapshot, cfg, &mut out);
    let peer = peer_authn::PeerAuthn::new(snapshot, cfg, &mut out.problems);
    let mut pods = workload::translate_pods(snapshot, cfg, &mut out.problems);
    let index = index::PodIndex::new(&pods);
    service::translate_all(snapshot, cfg, &index, &mut pods, &mut out);
    for pod in pods {
        let mut wl = pod.workload;
        wl.authorization_policies = policies.selecting(&wl.namespace, pod.labels, cfg);
        wl.authorization_policies
            .extend(peer.policies_for(&wl.namespace, pod.labels, &mut out));
        wl.authorization_policies.sort();
        wl.authorization_policies.dedup();
        let key = wl.uid.clone();
        let resource = Address {
            r#type: Some(address::Type::Workload(wl)),
        };
        out.addresses.insert(key, resource);
    }
    out
}

/// The uid (and xDS resource name) of the workload of pod `namespace/name`.
pub fn workload_uid(cfg: &TranslateConfig, namespace: &str, name: &str) -> String {
    format!("{}//Pod/{namespace}/{name}", cfg.cluster_id)
}

/// The xDS aliases of an address resource: `<network>/<ip>` per workload IP (none for
/// host-network workloads, which are not indexed by IP) or per service VIP.
pub fn aliases(resource: &Address) -> Vec<String> {
    match &resource.r#type {
        Some(address::Type::Workload(wl)) => {
            if wl.network_mode == NetworkMode::HostNetwork as i32 {
                return Vec::new();
            }
            wl.addresses
                .iter()
                .filter_map(|a| ip_from_bytes(a))
                .map(|ip| format!("{}/{ip}", wl.network))
                .collect()
        }
        Some(address::Type::Service(svc)) => svc
            .addresses
            .iter()
            .filter_map(|a| ip_from_bytes(&a.address).map(|ip| format!("{}/{ip}", a.network)))
            .collect(),
        None => Vec::new(),
    }
}

/// The raw bytes of `ip` as the protos carry it (4 or 16).
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Whether every `selector` label is on the object (`labels`). An empty selector matches.
fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// `<Kind> <ns>/<name>: <message>`, the form of every problem.
fn problem(kind: &str, namespace: &str, name: &str, message: impl std::fmt::Display) -> String {
    format!("{kind} {namespace}/{name}: {message}")
}

#[cfg(test)]
mod tests;
