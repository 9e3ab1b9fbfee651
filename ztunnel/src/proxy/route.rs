//! Where an outbound connection goes: the original destination is a service VIP (pick an
//! endpoint), a known workload's IP, or an unknown address (plain passthrough).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::Identity;
use rand::Rng;

use crate::state::Store;
use crate::state::model::{
    HealthPolicy, HealthStatus, LbMode, LoadBalancing, Scope, Service, Workload,
};

/// Why no upstream could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The service has no healthy endpoint.
    #[error("service {service} has no healthy endpoint")]
    NoHealthyEndpoint {
        /// `ns/hostname`.
        service: String,
    },
    /// `STRICT` load balancing and no eligible endpoint shares every preferred scope with the
    /// client (e.g. `internalTrafficPolicy: Local` and no endpoint on this node).
    #[error(
        "service {service} has no healthy endpoint sharing {scopes:?} with the client (STRICT load balancing)"
    )]
    NoLocalEndpoint {
        /// `ns/hostname`.
        service: String,
        /// The scopes that had to match.
        scopes: Vec<Scope>,
    },
    /// Neither the endpoint nor the service maps the port to a target port.
    #[error("service {service} has no target port for port {port}")]
    NoPortMapping {
        /// `ns/hostname`.
        service: String,
        /// The service port dialled.
        port: u16,
    },
    /// The chosen workload has no address of the destination's family.
    #[error("workload {workload} has no {family} address")]
    NoAddress {
        /// The workload uid.
        workload: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// The upstream of an outbound connection.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// A workload we know: HBONE or plain TCP depending on its protocol.
    Workload {
        /// The destination workload.
        workload: Arc<Workload>,
        /// The service dialled, when the original destination was a VIP.
        service: Option<Arc<Service>>,
        /// The workload's IP and the target port.
        target: SocketAddr,
    },
    /// An address the mesh does not know: plain TCP to it, unchanged.
    Passthrough(SocketAddr),
}

impl Upstream {
    /// The identities the destination may present: the workload's, plus the service's SANs.
    pub fn expected_identities(&self) -> Vec<Identity> {
        let Self::Workload {
            workload, service, ..
        } = self
        else {
            return Vec::new();
        };
        let mut ids = vec![(*workload.identity).clone()];
        for san in service.iter().flat_map(|s| &s.subject_alt_names) {
            if !ids.contains(san) {
                ids.push(san.clone());
            }
        }
        ids
    }
}

/// Resolves `dst` (as the app in `client` dialled it) on the client's network.
pub fn resolve(
    store: &Store,
    client: &Workload,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let network = &*client.network;
    if let Some(service) = store.service_by_vip(network, dst.ip()) {
        return via_service(store, client, service, dst, rng);
    }
    match store.workload_by_ip(network, dst.ip()) {
        Some(workload) => Ok(Upstream::Workload {
            workload,
            service: None,
            target: dst,
        }),
        None => Ok(Upstream::Passthrough(dst)),
    }
}

fn via_service(
    store: &Store,
    client: &Workload,
    service: Arc<Service>,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let lb = &service.load_balancing;
    if lb.mode == LbMode::Passthrough {
        // The operator asked for no endpoint selection: the VIP as dialled, in plain TCP.
        return Ok(Upstream::Passthrough(dst));
    }
    let key = service.key();
    let mut eligible: Vec<Arc<Workload>> = store
        .endpoints(&key)
        .into_iter()
        .filter(|w| lb.health_policy == HealthPolicy::AllowAll || w.status == HealthStatus::Healthy)
        .collect();
    if eligible.is_empty() {
        return Err(RouteError::NoHealthyEndpoint { service: key });
    }
    keep_closest(client, lb, &mut eligible);
    let Some(workload) = pick_weighted(&eligible, rng) else {
        return Err(RouteError::NoLocalEndpoint {
            service: key,
            scopes: lb.routing_preference.clone(),
        });
    };
    let port = target_port(&workload, &service, dst.port())?;
    let ip = address_like(&workload, dst.ip())?;
    Ok(Upstream::Workload {
        workload,
        service: Some(service),
        target: SocketAddr::new(ip, port),
    })
}

/// Whether `a` and `b` share `scope`. An empty locality field is a value like any other: two
/// workloads on unlabelled nodes share the zone "".
fn shares(a: &Workload, b: &Workload, scope: Scope) -> bool {
    match scope {
        Scope::Region => a.locality.region == b.locality.region,
        Scope::Zone => a.locality.zone == b.locality.zone,
        Scope::Subzone => a.locality.subzone == b.locality.subzone,
        Scope::Node => a.node == b.node,
        Scope::Cluster => a.cluster_id == b.cluster_id,
        Scope::Network => a.network == b.network,
    }
}

/// Keeps the endpoints `lb` lets `client` use: under `STRICT` those sharing every preferred
/// scope; otherwise those sharing the longest prefix of the preference list (with no preference,
/// all of them).
fn keep_closest(client: &Workload, lb: &LoadBalancing, endpoints: &mut Vec<Arc<Workload>>) {
    let prefs = &lb.routing_preference;
    if prefs.is_empty() {
        return;
    }
    let rank = |w: &Workload| prefs.iter().take_while(|s| shares(client, w, **s)).count();
    let wanted = if lb.mode == LbMode::Strict {
        prefs.len()
    } else {
        endpoints.iter().map(|w| rank(w)).max().unwrap_or(0)
    };
    endpoints.retain(|w| rank(w) == wanted);
}

/// Random choice weighted by capacity (every capacity is at least 1 once validated).
fn pick_weighted(candidates: &[Arc<Workload>], rng: &mut impl Rng) -> Option<Arc<Workload>> {
    let total: u64 = candidates
        .iter()
        .map(|w| u64::from(w.capacity.max(1)))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.random_range(0..total);
    for w in candidates {
        let weight = u64::from(w.capacity.max(1));
        if ticket < weight {
            return Some(w.clone());
        }
        ticket -= weight;
    }
    None
}

/// The endpoint's own mapping wins (named ports resolve per pod), then the service's.
fn target_port(workload: &Workload, service: &Service, port: u16) -> Result<u16, RouteError> {
    let from_endpoint = workload
        .services
        .get(service.key().as_str())
        .and_then(|ports| ports.get(&port))
        .copied()
        .filter(|p| *p != 0);
    let from_service = service.ports.get(&port).copied().filter(|p| *p != 0);
    from_endpoint
        .or(from_service)
        .ok_or_else(|| RouteError::NoPortMapping {
            service: service.key(),
            port,
        })
}

/// The workload's first address of the same family as the dialled VIP.
fn address_like(workload: &Workload, vip: IpAddr) -> Result<IpAddr, RouteError> {
    workload
        .addresses
        .iter()
        .find(|a| a.is_ipv4() == vip.is_ipv4())
        .copied()
        .ok_or_else(|| RouteError::NoAddress {
            workload: workload.uid.to_string(),
            family: if vip.is_ipv4() { "IPv4" } else { "IPv6" },
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::state::local::LocalConfig;

    const CONFIG: &str = r#"
workloads:
- {uid: a, name: a, namespace: ns, workloadIps: [10.0.0.1], protocol: HBONE, capacity: 3,
   services: {ns/echo.ns.svc.cluster.local: {80: 9090}}}
- {uid: b, name: b, namespace: ns, serviceAccount: b, workloadIps: [10.0.0.2], protocol: HBONE,
   services: {ns/echo.ns.svc.cluster.local: {}}}
- {uid: sick, name: sick, namespace: ns, workloadIps: [10.0.0.3], protocol: HBONE, status: Unhealthy,
   services: {ns/lonely.ns.svc.cluster.local: {}}}
- {uid: client, name: client, namespace: ns, workloadIps: [10.0.0.9], protocol: HBONE}
services:
- {name: echo, namespace: ns, hostname: echo.ns.svc.cluster.local, vips: [/10.96.0.1],
   ports: {80: 8080, 81: 0}, subjectAltNames: [spiffe://cluster.local/ns/ns/sa/extra]}
- {name: lonely, namespace: ns, hostname: lonely.ns.svc.cluster.local, vips: [/10.96.0.2], ports: {80: 80}}
"#;

    fn store() -> Store {
        Store::from_local(LocalConfig::parse(CONFIG).unwrap())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn client(store: &Store) -> Arc<Workload> {
        store.workload("client").unwrap()
    }

    #[test]
    fn vip_picks_endpoints_weighted_by_capacity_with_their_target_ports() {
        let store = store();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = BTreeMap::new();
        for _ in 0..4000 {
            let up = resolve(&store, &client(&store), addr("10.96.0.1:80"), &mut rng).unwrap();
            let Upstream::Workload { target, .. } = up else {
                panic!("expected a workload")
            };
            *seen.entry(target).or_insert(0) += 1;
        }
        // a (capacity 3) maps 80 -> 9090 itself; b falls back to the service's 8080.
        let a = seen[&addr("10.0.0.1:9090")];
        let b = seen[&addr("10.0.0.2:8080")];
        assert_eq!(a + b, 4000);
        assert!((2700..3300).contains(&a), "a got {a} of 4000");
    }

    #[test]
    fn expected_identities_include_service_sans() {
        let store = store();
        let mut rng = StdRng::seed_from_u64(1);
        let up = resolve(&store, &client(&store), addr("10.96.0.1:80"), &mut rng).unwrap();
        let ids: Vec<String> = up
            .expected_identities()
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[1], "spiffe://cluster.local/ns/ns/sa/extra");
    }

    #[test]
    fn pod_ips_and_unknown_addresses() {
        let store = store();
        let mut rng = StdRng::seed_from_u64(1);
        match resolve(&store, &client(&store), addr("10.0.0.2:7000"), &mut rng).unwrap() {
            Upstream::Workload {
                workload,
                service,
                target,
            } => {
                assert_eq!(&*workload.uid, "b");
                assert!(service.is_none());
                assert_eq!(target, addr("10.0.0.2:7000"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let up = resolve(&store, &client(&store), addr("192.0.2.1:80"), &mut rng).unwrap();
        assert!(matches!(up, Upstream::Passthrough(a) if a == addr("192.0.2.1:80")));
        assert!(up.expected_identities().is_empty());
        // Another network does not see the default network's pods.
        let mut elsewhere = (*client(&store)).clone();
        elsewhere.network = "other".into();
        let up = resolve(&store, &elsewhere, addr("10.0.0.2:7000"), &mut rng).unwrap();
        assert!(matches!(up, Upstream::Passthrough(_)));
    }

    #[test]
    fn failures_name_the_service_and_port() {
        let store = store();
        let mut rng = StdRng::seed_from_u64(1);
        let err = resolve(&store, &client(&store), addr("10.96.0.2:80"), &mut rng).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service ns/lonely.ns.svc.cluster.local has no healthy endpoint"
        );
        // Port 81 maps to 0 (a named port) and neither endpoint resolves it.
        let err = resolve(&store, &client(&store), addr("10.96.0.1:81"), &mut rng).unwrap_err();
        assert_eq!(
            err,
            RouteError::NoPortMapping {
                service: "ns/echo.ns.svc.cluster.local".into(),
                port: 81
            }
        );
    }

    /// A client on node n1 (zone z1) and three endpoints: on its node, on another node of its
    /// zone, in another zone. `lb` is the service's `loadBalancing` YAML (or empty).
    fn locality_store(lb: &str, unhealthy: &[&str]) -> Store {
        let mut yaml = String::from("workloads:\n");
        yaml += "- {uid: client, name: client, namespace: ns, workloadIps: [10.1.0.1], \
                 protocol: HBONE, node: n1, locality: {region: r, zone: z1}}\n";
        for (uid, ip, node, zone) in [
            ("same-node", "10.1.0.2", "n1", "z1"),
            ("same-zone", "10.1.0.3", "n2", "z1"),
            ("other-zone", "10.1.0.4", "n3", "z2"),
        ] {
            let status = if unhealthy.contains(&uid) {
                "Unhealthy"
            } else {
                "Healthy"
            };
            yaml += &format!(
                "- {{uid: {uid}, name: {uid}, namespace: ns, workloadIps: [{ip}], protocol: HBONE, \
                 node: {node}, locality: {{region: r, zone: {zone}}}, status: {status}, \
                 services: {{ns/svc.ns.svc.cluster.local: {{}}}}}}\n"
            );
        }
        yaml += "services:\n- {name: svc, namespace: ns, hostname: svc.ns.svc.cluster.local, \
                 vips: [/10.96.1.1], ports: {80: 8080}";
        if !lb.is_empty() {
            yaml += &format!(", loadBalancing: {lb}");
        }
        yaml += "}\n";
        Store::from_local(LocalConfig::parse(&yaml).unwrap())
    }

    /// The endpoints 300 connections from the client reach, or the routing error.
    fn reached(lb: &str, unhealthy: &[&str]) -> Result<Vec<String>, RouteError> {
        let store = locality_store(lb, unhealthy);
        let client = store.workload("client").unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            match resolve(&store, &client, addr("10.96.1.1:80"), &mut rng)? {
                Upstream::Workload { workload, .. } => seen.insert(workload.uid.to_string()),
                Upstream::Passthrough(dst) => seen.insert(format!("passthrough {dst}")),
            };
        }
        Ok(seen.into_iter().collect())
    }

    const PREFER_SAME_NODE: &str =
        "{routingPreference: [NETWORK, REGION, ZONE, SUBZONE, NODE], mode: FAILOVER}";
    const PREFER_CLOSE: &str =
        "{routingPreference: [NETWORK, REGION, ZONE, SUBZONE], mode: FAILOVER}";
    const LOCAL_ONLY: &str = "{routingPreference: [NODE], mode: STRICT}";

    #[test]
    fn without_a_preference_every_healthy_endpoint_is_used() {
        assert_eq!(
            reached("", &[]).unwrap(),
            ["other-zone", "same-node", "same-zone"]
        );
        assert_eq!(
            reached("", &["same-zone"]).unwrap(),
            ["other-zone", "same-node"]
        );
    }

    #[test]
    fn failover_prefers_the_closest_endpoints_and_falls_back_in_order() {
        assert_eq!(reached(PREFER_SAME_NODE, &[]).unwrap(), ["same-node"]);
        assert_eq!(
            reached(PREFER_SAME_NODE, &["same-node"]).unwrap(),
            ["same-zone"]
        );
        assert_eq!(
            reached(PREFER_SAME_NODE, &["same-node", "same-zone"]).unwrap(),
            ["other-zone"]
        );
        assert_eq!(
            reached(PREFER_CLOSE, &[]).unwrap(),
            ["same-node", "same-zone"]
        );
        assert_eq!(
            reached(PREFER_CLOSE, &["same-node", "same-zone"]).unwrap(),
            ["other-zone"]
        );
    }

    #[test]
    fn strict_never_leaves_the_preferred_scope() {
        assert_eq!(reached(LOCAL_ONLY, &[]).unwrap(), ["same-node"]);
        let err = reached(LOCAL_ONLY, &["same-node"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service ns/svc.ns.svc.cluster.local has no healthy endpoint sharing [Node] with \
             the client (STRICT load balancing)"
        );
    }

    #[test]
    fn health_policy_and_passthrough() {
        let all = ["same-node", "same-zone", "other-zone"];
        assert_eq!(
            reached("", &all).unwrap_err(),
            RouteError::NoHealthyEndpoint {
                service: "ns/svc.ns.svc.cluster.local".into()
            }
        );
        assert_eq!(
            reached("{healthPolicy: ALLOW_ALL}", &all).unwrap(),
            ["other-zone", "same-node", "same-zone"]
        );
        // Under ALLOW_ALL, unhealthy endpoints are ranked by locality like any other.
        assert_eq!(
            reached(
                "{healthPolicy: ALLOW_ALL, routingPreference: [NODE], mode: FAILOVER}",
                &all
            )
            .unwrap(),
            ["same-node"]
        );
        assert_eq!(
            reached("{mode: PASSTHROUGH}", &[]).unwrap(),
            ["passthrough 10.96.1.1:80"]
        );
    }
}
