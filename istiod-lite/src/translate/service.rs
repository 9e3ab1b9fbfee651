//! Service → `istio.workload.Service`, and each selected pod's per-endpoint ports.

use std::net::IpAddr;

use mesh_core::k8s::k8s_openapi::api::core::v1::{Pod, ServicePort, ServiceSpec};
use mesh_core::k8s::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::k8s::{Service, Snapshot};
use mesh_proto::workload::{
    self as wl, AppProtocol, IpFamilies, LoadBalancing, NetworkAddress, PortList, load_balancing,
};

use super::index::PodIndex;
use super::workload::PodEntry;
use super::{TranslateConfig, Translated, ip_bytes, problem};

/// Where a service port sends traffic on an endpoint.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    /// A fixed port number.
    Number(u32),
    /// A container port name, resolved per pod.
    Named(String),
}

/// One valid service port.
struct PortSpec {
    port: u32,
    target: Target,
    app_protocol: AppProtocol,
}

/// Translates every Service and records it on the workloads it selects.
pub(super) fn translate_all(
    snapshot: &Snapshot,
    cfg: &TranslateConfig,
    index: &PodIndex<'_>,
    pods: &mut [PodEntry<'_>],
    out: &mut Translated,
) {
    for svc in snapshot.list::<Service>() {
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let mut report = |msg: String| out.problems.push(problem("Service", ns, name, msg));
        let ports = ports(&spec, &mut report);
        let hostname = format!("{name}.{ns}.svc.{}", cfg.domain_suffix);
        let key = format!("{ns}/{hostname}");
        let service = wl::Service {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            hostname,
            addresses: vips(svc, &cfg.network, &mut report),
            ports: ports.iter().map(service_port).collect(),
            ip_families: ip_families(&spec) as i32,
            load_balancing: load_balancing(&spec),
            ..wl::Service::default()
        };
        if let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) {
            for i in index.select(pods, ns, selector) {
                let entry = &mut pods[i];
                let list = endpoint_ports(&ports, entry.pod);
                entry.workload.services.insert(key.clone(), list);
            }
        }
        let resource = wl::Address {
            r#type: Some(wl::address::Type::Service(service)),
        };
        out.addresses.insert(key, resource);
    }
}

// A named target port is 0 here: ztunnel resolves it per endpoint.
fn service_port(p: &PortSpec) -> wl::Port {
    wl::Port {
        service_port: p.port,
        target_port: match p.target {
            Target::Number(n) => n,
            Target::Named(_) => 0,
        },
        app_protocol: p.app_protocol as i32,
    }
}

fn ports(spec: &ServiceSpec, report: &mut impl FnMut(String)) -> Vec<PortSpec> {
    let mut out = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Some(port) = valid_port(p.port) else {
            report(format!(
                "spec.ports[{i}].port {} is not a valid port; port skipped",
                p.port
            ));
            continue;
        };
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => match valid_port(*n) {
                Some(n) => Target::Number(n),
                None => {
                    report(format!(
                        "spec.ports[{i}].targetPort {n} is not a valid port; port skipped"
                    ));
                    continue;
                }
            },
            Some(IntOrString::String(s)) if s.is_empty() => Target::Number(port),
            Some(IntOrString::String(s)) => Target::Named(s.clone()),
        };
        out.push(PortSpec {
            port,
            target,
            app_protocol: app_protocol(p),
        });
    }
    out
}

fn valid_port(n: i32) -> Option<u32> {
    u16::try_from(n).ok().filter(|&n| n != 0).map(u32::from)
}

fn app_protocol(p: &ServicePort) -> AppProtocol {
    match p
        .app_protocol
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("http") => AppProtocol::Http11,
        Some("http2" | "kubernetes.io/h2c") => AppProtocol::Http2,
        Some("grpc") => AppProtocol::Grpc,
        Some("tcp") => AppProtocol::Tcp,
        Some("tls") => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    }
}

/// The ports this pod serves for the service: named targets resolved against its containers;
/// a name the pod does not declare leaves that port out.
fn endpoint_ports(ports: &[PortSpec], pod: &Pod) -> PortList {
    let resolve = |name: &str| -> Option<u32> {
        let containers = &pod.spec.as_ref()?.containers;
        containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| valid_port(p.container_port))
    };
    let ports = ports
        .iter()
        .filter_map(|p| {
            let target_port = match &p.target {
                Target::Number(n) => *n,
                Target::Named(name) => resolve(name)?,
            };
            Some(wl::Port {
                service_port: p.port,
                target_port,
                app_protocol: p.app_protocol as i32,
            })
        })
        .collect();
    PortList { ports }
}

/// Cluster IPs, external IPs and load-balancer ingress IPs, without duplicates. Headless
/// (`None`) and empty entries are not addresses.
fn vips(svc: &Service, network: &str, report: &mut impl FnMut(String)) -> Vec<NetworkAddress> {
    let spec = svc.spec.as_ref();
    let status = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
    let cluster_ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    let candidates = spec
        .and_then(|s| s.cluster_ip.clone())
        .into_iter()
        .chain(cluster_ips)
        .chain(
            spec.and_then(|s| s.external_ips.clone())
                .into_iter()
                .flatten(),
        )
        .chain(
            status
                .and_then(|s| s.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.clone()),
        );
    let mut seen: Vec<IpAddr> = Vec::new();
    for raw in candidates {
        if raw.is_empty() || raw == "None" {
            continue;
        }
        match raw.parse::<IpAddr>() {
            Ok(ip) if !seen.contains(&ip) => seen.push(ip),
            Ok(_) => {}
            Err(_) => report(format!(
                "service address {raw:?} is not an IP address; ignored"
            )),
        }
    }
    seen.into_iter()
        .map(|ip| NetworkAddress {
            network: network.to_owned(),
            address: ip_bytes(ip),
            length: None,
        })
        .collect()
}

fn ip_families(spec: &ServiceSpec) -> IpFamilies {
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let v4 = families.iter().any(|f| f == "IPv4");
    let v6 = families.iter().any(|f| f == "IPv6");
    match (v4, v6) {
        (true, true) => IpFamilies::Dual,
        (true, false) => IpFamilies::Ipv4Only,
        (false, true) => IpFamilies::Ipv6Only,
        (false, false) => IpFamilies::Automatic,
    }
}

fn load_balancing(spec: &ServiceSpec) -> Option<LoadBalancing> {
    use load_balancing::{HealthPolicy, Mode, Scope};
    let close = [Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone];
    // `internalTrafficPolicy: Local` is a restriction and wins over a mere preference.
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let (scopes, mode): (Vec<Scope>, Mode) = match spec.traffic_distribution.as_deref() {
        _ if local_only => (vec![Scope::Node], Mode::Strict),
        Some("PreferClose" | "PreferSameZone") => (close.to_vec(), Mode::Failover),
        Some("PreferSameNode") => ([&close[..], &[Scope::Node]].concat(), Mode::Failover),
        _ => (Vec::new(), Mode::UnspecifiedMode),
    };
    let health = if spec.publish_not_ready_addresses == Some(true) {
        HealthPolicy::AllowAll
    } else {
        HealthPolicy::OnlyHealthy
    };
    if scopes.is_empty() && health == HealthPolicy::OnlyHealthy {
        return None;
    }
    Some(LoadBalancing {
        routing_preference: scopes.into_iter().map(|s| s as i32).collect(),
        mode: mode as i32,
        health_policy: health as i32,
    })
}
