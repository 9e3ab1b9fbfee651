//! `istio.workload.Address` (as istiod sends it) → ztunnel's model [`Workload`] / [`Service`].
//!
//! Every field ztunnel relies on is validated, like the local config file; an error names the
//! resource and the field so a NACK tells the control plane exactly what it got wrong. Fields
//! ztunnel does not implement yet (waypoints, network gateways, extensions, ...) are
//! ignored, as an older upstream ztunnel ignores fields it does not know.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use mesh_core::Identity;
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;
use mesh_proto::workload as pb;

use crate::state::intern::Interner;
use crate::state::model::{
    HealthPolicy, HealthStatus, LbMode, LoadBalancing, Locality, NetworkAddress, PortMap, Scope,
    Service, TunnelProtocol, Workload, WorkloadServices,
};

/// One converted `Address` resource.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    /// A workload, keyed by uid (boxed: it is far larger than a service).
    Workload(Box<Workload>),
    /// A service, keyed by `namespace/hostname`.
    Service(Service),
}

/// Converts the `Address` resource named `name`. The name must be the workload's uid or the
/// service's `namespace/hostname`, since removals arrive by name. Repeated values (namespace,
/// node, identity, ...) are shared through `interner`.
pub fn address(
    name: &str,
    a: &pb::Address,
    interner: &mut Interner,
) -> Result<AddressResource, String> {
    match &a.r#type {
        Some(pb::address::Type::Workload(w)) => {
            let w = workload(w, interner).map_err(|e| format!("workload {name:?}: {e}"))?;
            if *w.uid != *name {
                return Err(format!(
                    "workload {name:?}: resource name does not match uid {:?}",
                    w.uid
                ));
            }
            Ok(AddressResource::Workload(Box::new(w)))
        }
        Some(pb::address::Type::Service(s)) => {
            let s = service(s).map_err(|e| format!("service {name:?}: {e}"))?;
            if s.key() != name {
                return Err(format!(
                    "service {name:?}: resource name does not match <namespace>/<hostname> {:?}",
                    s.key()
                ));
            }
            Ok(AddressResource::Service(s))
        }
        None => Err(format!(
            "address {name:?}: type: neither workload nor service is set"
        )),
    }
}

/// Converts a wire workload. Errors name the field, e.g. `addresses[1]: ...`.
pub fn workload(w: &pb::Workload, interner: &mut Interner) -> Result<Workload, String> {
    non_empty("uid", &w.uid)?;
    non_empty("name", &w.name)?;
    non_empty("namespace", &w.namespace)?;
    // Istiod elides the defaults (cluster.local, "default") to keep resources small.
    let td = or_default(&w.trust_domain, DEFAULT_TRUST_DOMAIN);
    let sa = or_default(&w.service_account, "default");
    let identity = Identity::new(td, &w.namespace, sa).map_err(|e| format!("identity: {e}"))?;
    let addresses = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| ip(b).map_err(|e| format!("addresses[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let capacity = match w.capacity {
        None => 1,
        Some(0) => return Err("capacity: must be at least 1".into()),
        Some(c) => c,
    };
    for (i, p) in w.authorization_policies.iter().enumerate() {
        namespaced("authorization_policies", i, p)?;
    }
    let name: Arc<str> = Arc::from(w.name.as_str());
    // A pod without a controller is its own workload: share the name rather than intern it.
    let workload_name = if w.workload_name == w.name {
        name.clone()
    } else {
        interner.str(&w.workload_name)
    };
    let (region, zone, subzone) = w.locality.as_ref().map_or(("", "", ""), |l| {
        (l.region.as_str(), l.zone.as_str(), l.subzone.as_str())
    });
    let locality = Locality {
        region: interner.str(region),
        zone: interner.str(zone),
        subzone: interner.str(subzone),
    };
    let locality = interner.locality(locality);
    let mut s = |v: &str| interner.str(v);
    Ok(Workload {
        uid: Arc::from(w.uid.as_str()),
        name,
        namespace: s(&w.namespace),
        network: s(&w.network),
        addresses,
        protocol: tunnel_protocol(w.tunnel_protocol)?,
        node: s(&w.node),
        services: workload_services(&w.services, &mut s)?,
        status: health(w.status)?,
        capacity,
        canonical_name: s(&w.canonical_name),
        canonical_revision: s(&w.canonical_revision),
        workload_name,
        authorization_policies: w.authorization_policies.iter().map(|p| s(p)).collect(),
        locality,
        cluster_id: s(&w.cluster_id),
        identity: interner.identity(identity),
    })
}

/// Converts a wire service. Errors name the field, e.g. `ports[0].service_port: ...`.
pub fn service(s: &pb::Service) -> Result<Service, String> {
    non_empty("name", &s.name)?;
    non_empty("namespace", &s.namespace)?;
    non_empty("hostname", &s.hostname)?;
    let vips = s
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| vip(a).map_err(|e| format!("addresses[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<Identity>()
                .map_err(|e| format!("subject_alt_names[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports: port_map("ports", &s.ports)?,
        subject_alt_names,
        load_balancing: match &s.load_balancing {
            Some(lb) => load_balancing(lb).map_err(|e| format!("load_balancing.{e}"))?,
            None => LoadBalancing::default(),
        },
    })
}

/// Unknown enum values are refused: guessing could send traffic across zones (or nowhere) against
/// the operator's intent.
fn load_balancing(lb: &pb::LoadBalancing) -> Result<LoadBalancing, String> {
    use pb::load_balancing::{HealthPolicy as PbHealth, Mode as PbMode, Scope as PbScope};
    let routing_preference = lb
        .routing_preference
        .iter()
        .enumerate()
        .map(|(i, v)| match PbScope::try_from(*v) {
            Ok(PbScope::Region) => Ok(Scope::Region),
            Ok(PbScope::Zone) => Ok(Scope::Zone),
            Ok(PbScope::Subzone) => Ok(Scope::Subzone),
            Ok(PbScope::Node) => Ok(Scope::Node),
            Ok(PbScope::Cluster) => Ok(Scope::Cluster),
            Ok(PbScope::Network) => Ok(Scope::Network),
            Ok(PbScope::UnspecifiedScope) | Err(_) => {
                Err(format!("routing_preference[{i}]: unknown scope {v}"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match PbMode::try_from(lb.mode) {
        Ok(PbMode::UnspecifiedMode) => LbMode::Standard,
        Ok(PbMode::Strict) => LbMode::Strict,
        Ok(PbMode::Failover) => LbMode::Failover,
        Ok(PbMode::Passthrough) => LbMode::Passthrough,
        Err(_) => return Err(format!("mode: unknown value {}", lb.mode)),
    };
    let health_policy = match PbHealth::try_from(lb.health_policy) {
        Ok(PbHealth::OnlyHealthy) => HealthPolicy::OnlyHealthy,
        Ok(PbHealth::AllowAll) => HealthPolicy::AllowAll,
        Err(_) => return Err(format!("health_policy: unknown value {}", lb.health_policy)),
    };
    Ok(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}

fn non_empty(field: &str, v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    Ok(())
}

fn or_default<'a>(v: &'a str, default: &'a str) -> &'a str {
    if v.is_empty() { default } else { v }
}

/// `ns/name` with both parts non-empty.
fn namespaced(field: &str, i: usize, v: &str) -> Result<(), String> {
    match v.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(()),
        _ => Err(format!("{field}[{i}]: {v:?} is not <namespace>/<name>")),
    }
}

/// Raw address bytes: 4 (IPv4) or 16 (IPv6).
fn ip(b: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(format!(
        "an ip address is 4 or 16 bytes, got {} bytes",
        b.len()
    ))
}

fn vip(a: &pb::NetworkAddress) -> Result<NetworkAddress, String> {
    let address = ip(&a.address)?;
    let full = if address.is_ipv4() { 32 } else { 128 };
    // CIDR VIPs (istio 1.30+) need prefix matching the store does not do: refuse rather than
    // silently matching only the first address of the range.
    if let Some(len) = a.length.filter(|l| *l != full) {
        return Err(format!(
            "cidr vip {address}/{len} is not supported (only /{full})"
        ));
    }
    Ok(NetworkAddress {
        network: a.network.clone(),
        address,
    })
}

fn tunnel_protocol(v: i32) -> Result<TunnelProtocol, String> {
    match pb::TunnelProtocol::try_from(v) {
        Ok(pb::TunnelProtocol::None) => Ok(TunnelProtocol::Tcp),
        Ok(pb::TunnelProtocol::Hbone) => Ok(TunnelProtocol::Hbone),
        // Upstream ztunnel rejects it too: sidecar-style mTLS is not something ztunnel speaks.
        Ok(pb::TunnelProtocol::LegacyIstioMtls) => {
            Err("tunnel_protocol: LEGACY_ISTIO_MTLS is not supported".into())
        }
        Err(_) => Err(format!("tunnel_protocol: unknown value {v}")),
    }
}

fn health(v: i32) -> Result<HealthStatus, String> {
    match pb::WorkloadStatus::try_from(v) {
        Ok(pb::WorkloadStatus::Healthy) => Ok(HealthStatus::Healthy),
        Ok(pb::WorkloadStatus::Unhealthy) => Ok(HealthStatus::Unhealthy),
        Err(_) => Err(format!("status: unknown value {v}")),
    }
}

fn workload_services(
    services: &BTreeMap<String, pb::PortList>,
    intern: &mut impl FnMut(&str) -> Arc<str>,
) -> Result<WorkloadServices, String> {
    services
        .iter()
        .map(|(key, list)| {
            match key.split_once('/') {
                Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {}
                _ => {
                    return Err(format!(
                        "services[{key:?}]: key is not <namespace>/<hostname>"
                    ));
                }
            }
            let ports = port_map(&format!("services[{key:?}].ports"), &list.ports)?;
            Ok((intern(key), ports))
        })
        .collect()
}

/// Service port (1..=65535) → target port (0 = the named port, resolved per endpoint).
fn port_map(field: &str, ports: &[pb::Port]) -> Result<PortMap, String> {
    let mut pairs = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let service_port = u16::try_from(p.service_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                format!(
                    "{field}[{i}].service_port: {} is not a port (1-65535)",
                    p.service_port
                )
            })?;
        let target_port = u16::try_from(p.target_port).map_err(|_| {
            format!(
                "{field}[{i}].target_port: {} is not a port (0-65535)",
                p.target_port
            )
        })?;
        // A Kubernetes service may list one port twice (TCP and UDP); the first one wins.
        if !pairs.iter().any(|(port, _)| *port == service_port) {
            pairs.push((service_port, target_port));
        }
    }
    Ok(pairs.into_iter().collect())
}

#[cfg(test)]
mod tests;
