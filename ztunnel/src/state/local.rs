//! The local workload/service file: ztunnel's stand-in for xDS when it runs without a control plane
//! (like upstream's `LOCAL_XDS_PATH`). Every field is validated; errors name the entry and field.
//!
//! ```yaml
//! workloads:
//! - uid: Kubernetes//Pod/default/client
//!   name: client
//!   namespace: default
//!   serviceAccount: client          # default "default"
//!   trustDomain: cluster.local      # default "cluster.local"
//!   workloadIps: [10.100.1.11]
//!   protocol: HBONE                 # or TCP (unmeshed)
//!   node: node1
//!   locality: {region: r1, zone: z1} # optional, for locality-aware load balancing
//!   services: {default/echo.default.svc.cluster.local: {80: 8080}}
//! services:
//! - name: echo
//!   namespace: default
//!   hostname: echo.default.svc.cluster.local
//!   vips: [/10.96.0.10]             # <network>/<ip>
//!   ports: {80: 8080}
//!   loadBalancing:                  # optional; default: any healthy endpoint
//!     routingPreference: [NETWORK, REGION, ZONE, SUBZONE, NODE]
//!     mode: FAILOVER                # STANDARD | STRICT | FAILOVER | PASSTHROUGH
//!     healthPolicy: ONLY_HEALTHY    # or ALLOW_ALL
//! policies:                         # L4 authorization (see `state::policy`)
//! - name: allow-client
//!   namespace: default
//!   scope: Namespace                # Global | Namespace | WorkloadSelector
//!   action: Allow                   # Allow | Deny
//!   rules:                          # rules (OR) > clauses (AND) > matches (OR)
//!   - - - principals: [{exact: cluster.local/ns/default/sa/client}]
//!         notDestinationPorts: [22]
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_core::Identity;
use mesh_core::identity::DEFAULT_TRUST_DOMAIN;

use super::model::{
    HealthStatus, LoadBalancing, Locality, NetworkAddress, PortMap, Service, TunnelProtocol,
    Workload,
};
use super::policy::Policy;

/// Why the local config was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// The file could not be read.
    #[error("cannot read local config {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown fields.
    #[error("invalid local config YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A value is invalid; `at` names the entry and field.
    #[error("invalid local config at {at}: {reason}")]
    Invalid {
        /// Where, e.g. `workloads[1].workloadIps[0]`.
        at: String,
        /// What is wrong.
        reason: String,
    },
}

/// A validated local config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalConfig {
    /// Workloads, in file order.
    pub workloads: Vec<Workload>,
    /// Services, in file order.
    pub services: Vec<Service>,
    /// Authorization policies, in file order.
    pub policies: Vec<Policy>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    policies: Vec<Policy>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    uid: String,
    name: String,
    namespace: String,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_ips: Vec<String>,
    protocol: TunnelProtocol,
    #[serde(default)]
    node: String,
    #[serde(default)]
    services: BTreeMap<String, PortMap>,
    #[serde(default)]
    status: HealthStatus,
    #[serde(default)]
    capacity: Option<u32>,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    locality: Locality,
    #[serde(default)]
    cluster_id: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: PortMap,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    load_balancing: LoadBalancing,
}

impl LocalConfig {
    /// Reads and validates a local config file.
    pub fn load(path: &Path) -> Result<Self, LocalConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates a local config from YAML text.
    pub fn parse(yaml: &str) -> Result<Self, LocalConfigError> {
        let raw: RawConfig = serde_yaml::from_str(yaml)?;
        let services = raw
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| convert_service(s, &format!("services[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let workloads = raw
            .workloads
            .into_iter()
            .enumerate()
            .map(|(i, w)| convert_workload(w, &format!("workloads[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        check_policies(&raw.policies)?;
        let cfg = LocalConfig {
            workloads,
            services,
            policies: raw.policies,
        };
        cfg.check_references()?;
        Ok(cfg)
    }

    fn check_references(&self) -> Result<(), LocalConfigError> {
        let mut uids = HashSet::new();
        let mut ips = HashSet::new();
        let keys: HashSet<String> = self.services.iter().map(Service::key).collect();
        for (i, w) in self.workloads.iter().enumerate() {
            if !uids.insert(&w.uid) {
                return Err(invalid(
                    format!("workloads[{i}].uid"),
                    format!("duplicate uid {:?}", w.uid),
                ));
            }
            for ip in &w.addresses {
                if !ips.insert((&w.network, ip)) {
                    return Err(invalid(
                        format!("workloads[{i}].workloadIps"),
                        format!("address {ip} is already used by another workload"),
                    ));
                }
            }
            if let Some(k) = w.services.keys().find(|k| !keys.contains(&***k)) {
                return Err(invalid(
                    format!("workloads[{i}].services"),
                    format!(
                        "unknown service {k:?} (expected <namespace>/<hostname> of a listed service)"
                    ),
                ));
            }
        }
        let mut seen = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if !seen.insert(s.key()) {
                return Err(invalid(
                    format!("services[{i}]"),
                    format!("duplicate service {:?}", s.key()),
                ));
            }
        }
        Ok(())
    }
}

fn check_policies(policies: &[Policy]) -> Result<(), LocalConfigError> {
    let mut keys = HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        p.validate()
            .map_err(|e| invalid(format!("policies[{i}].{}", e.field), e.reason))?;
        if !keys.insert(p.key()) {
            let reason = format!("duplicate policy {:?}", p.key());
            return Err(invalid(format!("policies[{i}]"), reason));
        }
    }
    Ok(())
}

fn invalid(at: String, reason: String) -> LocalConfigError {
    LocalConfigError::Invalid { at, reason }
}

fn non_empty(at: &str, field: &str, v: &str) -> Result<(), LocalConfigError> {
    if v.is_empty() {
        return Err(invalid(format!("{at}.{field}"), "must not be empty".into()));
    }
    Ok(())
}

fn convert_workload(w: RawWorkload, at: &str) -> Result<Workload, LocalConfigError> {
    non_empty(at, "uid", &w.uid)?;
    non_empty(at, "name", &w.name)?;
    let td = w
        .trust_domain
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
    let sa = w.service_account.unwrap_or_else(|| "default".into());
    let identity = Identity::new(td, &w.namespace, sa)
        .map_err(|e| invalid(format!("{at}.identity"), e.to_string()))?;
    let addresses = w
        .workload_ips
        .iter()
        .enumerate()
        .map(|(j, ip)| {
            ip.parse::<IpAddr>().map_err(|_| {
                invalid(
                    format!("{at}.workloadIps[{j}]"),
                    format!("{ip:?} is not an IP address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if w.capacity == Some(0) {
        return Err(invalid(
            format!("{at}.capacity"),
            "must be at least 1".into(),
        ));
    }
    Ok(Workload {
        uid: w.uid.into(),
        name: w.name.into(),
        namespace: w.namespace.into(),
        identity: identity.into(),
        network: w.network.into(),
        addresses,
        protocol: w.protocol,
        node: w.node.into(),
        services: w
            .services
            .into_iter()
            .map(|(k, ports)| (k.into(), ports))
            .collect(),
        status: w.status,
        capacity: w.capacity.unwrap_or(1),
        canonical_name: w.canonical_name.into(),
        canonical_revision: w.canonical_revision.into(),
        workload_name: w.workload_name.into(),
        authorization_policies: w
            .authorization_policies
            .into_iter()
            .map(Arc::from)
            .collect(),
        locality: w.locality.into(),
        cluster_id: w.cluster_id.into(),
    })
}

fn convert_service(s: RawService, at: &str) -> Result<Service, LocalConfigError> {
    non_empty(at, "name", &s.name)?;
    non_empty(at, "namespace", &s.namespace)?;
    non_empty(at, "hostname", &s.hostname)?;
    let vips = s
        .vips
        .iter()
        .enumerate()
        .map(|(j, v)| parse_network_address(v).map_err(|r| invalid(format!("{at}.vips[{j}]"), r)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = s.ports.keys().find(|p| **p == 0) {
        return Err(invalid(
            format!("{at}.ports"),
            format!("service port {p} is not valid"),
        ));
    }
    let subject_alt_names = s
        .subject_alt_names
        .iter()
        .enumerate()
        .map(|(j, v)| {
            v.parse::<Identity>()
                .map_err(|e| invalid(format!("{at}.subjectAltNames[{j}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        ports: s.ports,
        subject_alt_names,
        load_balancing: s.load_balancing,
    })
}

/// Parses `<network>/<ip>` (the network may be empty: `/10.96.0.1`); a bare IP means the default network.
pub fn parse_network_address(v: &str) -> Result<NetworkAddress, String> {
    let (network, ip) = v.rsplit_once('/').unwrap_or(("", v));
    let address = ip
        .parse::<IpAddr>()
        .map_err(|_| format!("{v:?} is not <network>/<ip>"))?;
    Ok(NetworkAddress {
        network: network.to_string(),
        address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: [10.100.1.11]
  protocol: HBONE
  node: node1
- uid: Kubernetes//Pod/default/echo
  name: echo
  namespace: default
  workloadIps: [10.100.2.11]
  protocol: TCP
  node: node2
  capacity: 3
  services: {default/echo.default.svc.cluster.local: {80: 8080}}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: [/10.96.0.10, 10.96.0.11]
  ports: {80: 8080}
"#;

    #[test]
    fn parses_a_good_file_with_defaults() {
        let cfg = LocalConfig::parse(GOOD).unwrap();
        assert_eq!(cfg.workloads.len(), 2);
        let client = &cfg.workloads[0];
        assert_eq!(
            client.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(client.capacity, 1);
        assert_eq!(client.status, HealthStatus::Healthy);
        let echo = &cfg.workloads[1];
        assert_eq!(echo.identity.service_account(), "default");
        assert_eq!(echo.protocol, TunnelProtocol::Tcp);
        assert_eq!(echo.capacity, 3);
        assert_eq!(cfg.services[0].vips[1].to_string(), "/10.96.0.11");
        assert_eq!(cfg.services[0].ports[&80], 8080);
    }

    #[test]
    fn rejects_bad_input_naming_the_place() {
        let cases: &[(&str, &str)] = &[
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, bogus: 1}]",
                "unknown field `bogus`",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: QUIC}]",
                "unknown variant `QUIC`",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, workloadIps: [1.2.3]}]",
                "workloads[0].workloadIps[0]",
            ),
            (
                "workloads: [{uid: '', name: a, namespace: n, protocol: HBONE}]",
                "workloads[0].uid: must not be empty",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: 'N S', protocol: HBONE}]",
                "workloads[0].identity",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, trustDomain: BAD}]",
                "invalid trust domain",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, capacity: 0}]",
                "workloads[0].capacity",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE}, {uid: a, name: b, namespace: n, protocol: HBONE}]",
                "workloads[1].uid: duplicate uid",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, workloadIps: [1.1.1.1]}, {uid: b, name: b, namespace: n, protocol: HBONE, workloadIps: [1.1.1.1]}]",
                "already used",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, services: {n/x: {80: 80}}}]",
                "unknown service \"n/x\"",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, vips: [net/not-ip]}]",
                "services[0].vips[0]",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, ports: {0: 80}}]",
                "services[0].ports",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, subjectAltNames: [x]}]",
                "services[0].subjectAltNames[0]",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h}, {name: s, namespace: n, hostname: h}]",
                "duplicate service",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, ports: {80: 70000}}]",
                "invalid value",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, loadBalancing: {routingPreference: [ZONE, GALAXY]}}]",
                "unknown variant `GALAXY`",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, loadBalancing: {mode: NEAREST}}]",
                "unknown variant `NEAREST`",
            ),
            (
                "workloads: [{uid: a, name: a, namespace: n, protocol: HBONE, locality: {planet: earth}}]",
                "unknown field `planet`",
            ),
            ("workloads: {", "invalid local config YAML"),
        ];
        for (yaml, want) in cases {
            let err = LocalConfig::parse(yaml).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml}\n  got: {err}\n  want: {want}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = LocalConfig::load(Path::new("/nonexistent/zmesh.yaml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read local config /nonexistent/zmesh.yaml")
        );
    }

    #[test]
    fn policies_are_parsed_validated_and_stored() {
        let yaml = r#"
workloads:
- {uid: s, name: s, namespace: b, workloadIps: [10.0.0.2], protocol: HBONE,
   authorizationPolicies: [b/strict]}
policies:
- name: strict
  namespace: b
  scope: WorkloadSelector
  action: Deny
  rules: [[[{notPrincipals: [presence]}]]]
- {name: allow, namespace: b, scope: Namespace, action: Allow, dryRun: true}
"#;
        let cfg = LocalConfig::parse(yaml).unwrap();
        assert_eq!(cfg.policies.len(), 2);
        assert!(cfg.policies[1].dry_run && cfg.policies[1].rules.is_empty());
        let store = crate::state::Store::from_local(cfg);
        assert_eq!(store.policy("b/strict").unwrap().name, "strict");
        assert_eq!(store.policy_store().namespace_keys("b").count(), 1);

        let cases = [
            (
                yaml.replace("name: strict", "name: allow"),
                "policies[1]: duplicate policy \"b/allow\"",
            ),
            (
                yaml.replace("name: strict", "name: \"\""),
                "policies[0].name: must not be empty",
            ),
            (yaml.replace("presence", "[22]"), "policies[0].rules"),
            (
                yaml.replace("action: Deny", "action: Audit"),
                "unknown variant `Audit`",
            ),
            (
                yaml.replace("notPrincipals", "notPrincipal"),
                "unknown field `notPrincipal`",
            ),
            (
                yaml.replace("{notPrincipals: [presence]}", "{destinationPorts: [0]}"),
                "policies[0].rules[0].clauses[0].matches[0].destination_ports[0]: port 0",
            ),
        ];
        for (bad, want) in cases {
            let err = LocalConfig::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }
}
