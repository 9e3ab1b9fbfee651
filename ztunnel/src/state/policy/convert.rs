//! `istio.security.Authorization` → [`Policy`], field by field. Anything ztunnel could only
//! enforce by guessing (an unknown enum value, an address of the wrong size, a port above
//! 65535, a string match without a kind) rejects the whole policy: a policy silently weakened
//! would admit connections it should refuse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use mesh_proto::security as pb;

use super::{Action, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch};

/// Why a policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorization {policy}: {field}: {reason}")]
pub struct PolicyError {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The offending field, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

type FieldResult<T> = Result<T, (String, String)>;

fn invalid<T>(field: impl Into<String>, reason: impl Into<String>) -> FieldResult<T> {
    Err((field.into(), reason.into()))
}

pub(super) fn policy(p: &pb::Authorization) -> Result<Policy, PolicyError> {
    let key = format!("{}/{}", p.namespace, p.name);
    let err = |(field, reason)| PolicyError {
        policy: key.clone(),
        field,
        reason,
    };
    names(&p.name, &p.namespace).map_err(err)?;
    let scope = match pb::Scope::try_from(p.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(err(("scope".into(), format!("unknown value {}", p.scope)))),
    };
    let action = match pb::Action::try_from(p.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => {
            return Err(err((
                "action".into(),
                format!("unknown value {}", p.action),
            )));
        }
    };
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, &format!("rules[{i}]")))
        .collect::<FieldResult<Vec<_>>>()
        .map_err(err)?;
    // `extensions` carry nothing an L4 proxy acts on (upstream ztunnel ignores them too).
    Ok(Policy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: p.dry_run,
    })
}

fn names(name: &str, namespace: &str) -> FieldResult<()> {
    if name.is_empty() {
        return invalid("name", "must not be empty");
    }
    if namespace.is_empty() {
        return invalid("namespace", "must not be empty");
    }
    Ok(())
}

fn rule(r: &pb::Rule, at: &str) -> FieldResult<Rule> {
    let clauses = r
        .clauses
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let matches = c
                .matches
                .iter()
                .enumerate()
                .map(|(j, m)| one_match(m, &format!("{at}.clauses[{i}].matches[{j}]")))
                .collect::<FieldResult<Vec<_>>>()?;
            Ok(Clause { matches })
        })
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(Rule { clauses })
}

fn one_match(m: &pb::Match, at: &str) -> FieldResult<Match> {
    let f = |name: &str| format!("{at}.{name}");
    Ok(Match {
        namespaces: strings(&m.namespaces, &f("namespaces"))?,
        not_namespaces: strings(&m.not_namespaces, &f("not_namespaces"))?,
        principals: strings(&m.principals, &f("principals"))?,
        not_principals: strings(&m.not_principals, &f("not_principals"))?,
        service_accounts: accounts(&m.service_accounts, &f("service_accounts"))?,
        not_service_accounts: accounts(&m.not_service_accounts, &f("not_service_accounts"))?,
        source_ips: addresses(&m.source_ips, &f("source_ips"))?,
        not_source_ips: addresses(&m.not_source_ips, &f("not_source_ips"))?,
        destination_ips: addresses(&m.destination_ips, &f("destination_ips"))?,
        not_destination_ips: addresses(&m.not_destination_ips, &f("not_destination_ips"))?,
        destination_ports: ports(&m.destination_ports, &f("destination_ports"))?,
        not_destination_ports: ports(&m.not_destination_ports, &f("not_destination_ports"))?,
    })
}

fn strings(v: &[pb::StringMatch], at: &str) -> FieldResult<Vec<StringMatch>> {
    use pb::string_match::MatchType;
    v.iter()
        .enumerate()
        .map(|(i, s)| match &s.match_type {
            Some(MatchType::Exact(x)) => Ok(StringMatch::Exact(x.clone())),
            Some(MatchType::Prefix(x)) => Ok(StringMatch::Prefix(x.clone())),
            Some(MatchType::Suffix(x)) => Ok(StringMatch::Suffix(x.clone())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => invalid(
                format!("{at}[{i}]"),
                "string match sets none of exact, prefix, suffix, presence",
            ),
        })
        .collect()
}

fn accounts(v: &[pb::ServiceAccountMatch], at: &str) -> FieldResult<Vec<ServiceAccountMatch>> {
    v.iter()
        .enumerate()
        .map(|(i, sa)| {
            let m = ServiceAccountMatch {
                namespace: sa.namespace.clone(),
                service_account: sa.service_account.clone(),
            };
            check_account(&m, &format!("{at}[{i}]"))?;
            Ok(m)
        })
        .collect()
}

fn check_account(m: &ServiceAccountMatch, at: &str) -> FieldResult<()> {
    if m.namespace.is_empty() || m.service_account.is_empty() {
        return invalid(at, "service account match needs a namespace and a name");
    }
    Ok(())
}

fn addresses(v: &[pb::Address], at: &str) -> FieldResult<Vec<IpNet>> {
    v.iter()
        .enumerate()
        .map(|(i, a)| address(a).or_else(|reason| invalid(format!("{at}[{i}]"), reason)))
        .collect()
}

fn address(a: &pb::Address) -> Result<IpNet, String> {
    let ip: IpAddr = match a.address.len() {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(a.address.as_slice()).unwrap_or_default()).into(),
        16 => Ipv6Addr::from(<[u8; 16]>::try_from(a.address.as_slice()).unwrap_or_default()).into(),
        n => return Err(format!("address has {n} bytes, want 4 (IPv4) or 16 (IPv6)")),
    };
    // A length of 0 is a real /0 (match all), as upstream ztunnel reads it; istiod always sets
    // the length of a single address to 32 or 128.
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(a.length)
        .ok()
        .and_then(|len| IpNet::new(ip, len).ok())
        .map(canonical)
        .ok_or_else(|| {
            format!(
                "prefix length {} is out of range for {ip} (max {max})",
                a.length
            )
        })
}

/// Connections are matched on canonical addresses (an IPv4-mapped IPv6 peer is IPv4), so a
/// prefix inside `::ffff:0:0/96` is turned into the IPv4 prefix it covers.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(v4.into(), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

fn ports(v: &[u32], at: &str) -> FieldResult<Vec<u16>> {
    v.iter()
        .enumerate()
        .map(|(i, &p)| match u16::try_from(p) {
            Ok(port) if port != 0 => Ok(port),
            _ => invalid(
                format!("{at}[{i}]"),
                format!("port {p} is not in 1..=65535"),
            ),
        })
        .collect()
}

/// Parses `10.0.0.0/8`, or a bare IP as a host prefix.
pub(super) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(canonical(net));
    }
    s.parse::<IpAddr>()
        .map(|ip| canonical(IpNet::from(ip)))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR prefix"))
}

/// Checks a policy that did not come through [`policy`] (the local config).
pub(super) fn validate(p: &Policy) -> Result<(), PolicyError> {
    let err = |(field, reason)| PolicyError {
        policy: p.key(),
        field,
        reason,
    };
    names(&p.name, &p.namespace).map_err(err)?;
    for (i, r) in p.rules.iter().enumerate() {
        for (j, c) in r.clauses.iter().enumerate() {
            for (k, m) in c.matches.iter().enumerate() {
                let at = format!("rules[{i}].clauses[{j}].matches[{k}]");
                validate_match(m, &at).map_err(err)?;
            }
        }
    }
    Ok(())
}

fn validate_match(m: &Match, at: &str) -> FieldResult<()> {
    let groups = [
        ("service_accounts", &m.service_accounts),
        ("not_service_accounts", &m.not_service_accounts),
    ];
    for (name, list) in groups {
        for (i, sa) in list.iter().enumerate() {
            check_account(sa, &format!("{at}.{name}[{i}]"))?;
        }
    }
    let ports = [
        ("destination_ports", &m.destination_ports),
        ("not_destination_ports", &m.not_destination_ports),
    ];
    for (name, list) in ports {
        if let Some(i) = list.iter().position(|&p| p == 0) {
            return invalid(format!("{at}.{name}[{i}]"), "port 0 is not in 1..=65535");
        }
    }
    Ok(())
}
