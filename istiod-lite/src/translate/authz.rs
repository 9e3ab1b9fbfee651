//! AuthorizationPolicy → `istio.security.Authorization` (istio-ambient-protocol.md §9.2).
//!
//! * Only `ALLOW` and `DENY` reach ztunnel; `CUSTOM` and `AUDIT` policies are skipped with a
//!   problem. Policies with `targetRef`/`targetRefs` attach to waypoints or gateways and are not
//!   sent to ztunnel (no problem: they are valid, just not ours).
//! * Scope: a selector → `WORKLOAD_SELECTOR` (listed on each selected workload); no selector in
//!   the root namespace → `GLOBAL`; otherwise `NAMESPACE`. An empty `matchLabels` counts as no
//!   selector, as in Istio.
//! * Each rule → one `Rule`; its `from` list → one clause (a match per source), its `to` list →
//!   one clause (a match per operation), each `when` → one clause.
//! * L4 fields map one to one: `principals`, `namespaces` (`*` → presence, `*x` → suffix, `x*` →
//!   prefix), `serviceAccounts` (`ns/sa`, or `sa` in the policy's namespace), `ipBlocks`,
//!   `ports`, and `when` keys `source.ip`, `source.namespace`, `source.principal`,
//!   `destination.ip`, `destination.port`.
//! * A field ztunnel cannot enforce (L7: request principals, remote IP blocks, hosts, methods,
//!   paths, other `when` keys), a field with a value we cannot parse (bad CIDR or port), and a
//!   field the decoder did not recognise (`unknown_fields` under `spec.rules[i]`) make the rule
//!   *lossy*. In `ALLOW`, a lossy rule is dropped entirely, so it allows nothing (fails closed).
//!   In `DENY`, the whole field is omitted (never single values, which would narrow the deny),
//!   so the rule denies more; a match left with no field at all then matches everything, which
//!   ztunnel expresses as a clause without matches. Either way the problem names the field.
//! * Annotation `istio.io/dry-run: "true"` sets `dry_run`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use mesh_core::k8s::Snapshot;
use mesh_core::k8s::istio::{
    AuthorizationPolicy, AuthorizationRule, Condition, Operation, PolicyAction, Source,
};
use mesh_proto::security::{
    Action, Address, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};

use super::{TranslateConfig, Translated, problem, selector_matches};

/// A translated selector policy: resource name and `matchLabels`.
type Selected<'a> = (String, &'a BTreeMap<String, String>);

/// Translated selector-scoped policies, by namespace.
#[derive(Default)]
pub(super) struct SelectorPolicies<'a> {
    by_namespace: HashMap<&'a str, Vec<Selected<'a>>>,
}

impl SelectorPolicies<'_> {
    /// Names of the selector policies that select a workload with `labels` in `namespace`:
    /// those of its namespace and those of the root namespace (which select across namespaces).
    pub(super) fn selecting(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        cfg: &TranslateConfig,
    ) -> Vec<String> {
        let mut names = Vec::new();
        let mut scan = |ns: &str| {
            for (name, selector) in self.by_namespace.get(ns).into_iter().flatten() {
                if selector_matches(selector, labels) {
                    names.push(name.clone());
                }
            }
        };
        scan(namespace);
        if namespace != cfg.root_namespace {
            scan(&cfg.root_namespace);
        }
        names
    }
}

/// Translates every AuthorizationPolicy into `out.authorizations`.
pub(super) fn translate_all<'a>(
    snapshot: &'a Snapshot,
    cfg: &TranslateConfig,
    out: &mut Translated,
) -> SelectorPolicies<'a> {
    let mut selectors = SelectorPolicies::default();
    for policy in snapshot.list::<AuthorizationPolicy>() {
        let Some(auth) = translate_policy(policy, cfg, &mut out.problems) else {
            continue;
        };
        let key = format!("{}/{}", auth.namespace, auth.name);
        let selector = policy.spec.selector.as_ref();
        if let Some(labels) = selector.map(|s| &s.match_labels).filter(|l| !l.is_empty()) {
            let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
            selectors
                .by_namespace
                .entry(ns)
                .or_default()
                .push((key.clone(), labels));
        }
        out.authorizations.insert(key, auth);
    }
    selectors
}

/// One policy, or `None` when it is not for ztunnel (problems say why when it is an error).
pub(super) fn translate_policy(
    policy: &AuthorizationPolicy,
    cfg: &TranslateConfig,
    problems: &mut Vec<String>,
) -> Option<Authorization> {
    let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let mut report = |msg: String| problems.push(problem("AuthorizationPolicy", ns, name, msg));
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return None;
    }
    let action = match spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
        other => {
            report(format!(
                "action {other} is not supported by ztunnel; policy not applied"
            ));
            return None;
        }
    };
    let outside_rules: Vec<&str> = policy
        .unknown_fields
        .iter()
        .filter(|f| rule_index(f).is_none())
        .map(String::as_str)
        .collect();
    if !outside_rules.is_empty() {
        report(format!(
            "unsupported fields ignored: {}",
            outside_rules.join(", ")
        ));
    }
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let unknown = policy
                .unknown_fields
                .iter()
                .filter(|f| rule_index(f) == Some(i));
            translate_rule(i, rule, action, ns, unknown, &mut report)
        })
        .collect();
    Some(Authorization {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        scope: scope(policy, cfg) as i32,
        action: action as i32,
        rules,
        dry_run: policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("istio.io/dry-run"))
            .is_some_and(|v| v == "true"),
        extensions: Vec::new(),
    })
}

fn scope(policy: &AuthorizationPolicy, cfg: &TranslateConfig) -> Scope {
    let selector = policy.spec.selector.as_ref();
    if selector.is_some_and(|s| !s.match_labels.is_empty()) {
        Scope::WorkloadSelector
    } else if policy.metadata.namespace.as_deref() == Some(cfg.root_namespace.as_str()) {
        Scope::Global
    } else {
        Scope::Namespace
    }
}

/// The rule index of an unknown-field path under `spec.rules.<i>.`.
fn rule_index(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("spec.rules.")?;
    rest.split('.').next()?.parse().ok()
}

/// Collects what a rule could not express.
#[derive(Default)]
struct Lossy(Vec<String>);

fn translate_rule<'f>(
    i: usize,
    rule: &AuthorizationRule,
    action: Action,
    ns: &str,
    unknown: impl Iterator<Item = &'f String>,
    report: &mut impl FnMut(String),
) -> Option<Rule> {
    let mut lossy = Lossy::default();
    lossy
        .0
        .extend(unknown.map(|f| format!("unknown field {f}")));
    let mut clauses = Vec::new();
    if !rule.from.is_empty() {
        let matches = rule.from.iter().enumerate();
        let matches = matches.map(|(j, f)| {
            source_match(
                &f.source,
                ns,
                &format!("rules[{i}].from[{j}].source"),
                &mut lossy,
            )
        });
        clauses.push(matches.collect::<Vec<_>>());
    }
    if !rule.to.is_empty() {
        let matches = rule.to.iter().enumerate();
        let matches = matches.map(|(j, t)| {
            operation_match(
                &t.operation,
                &format!("rules[{i}].to[{j}].operation"),
                &mut lossy,
            )
        });
        clauses.push(matches.collect());
    }
    for (j, c) in rule.when.iter().enumerate() {
        clauses.push(vec![condition_match(
            c,
            &format!("rules[{i}].when[{j}]"),
            &mut lossy,
        )]);
    }
    if !lossy.0.is_empty() {
        let what = lossy.0.join("; ");
        if action == Action::Allow {
            report(format!("rule {i} dropped (ALLOW fails closed): {what}"));
            return None;
        }
        report(format!(
            "rule {i}: omitted from DENY (denies more broadly): {what}"
        ));
    }
    let clauses = clauses
        .into_iter()
        .map(|matches| {
            // A match with nothing left would never match in ztunnel; in DENY it stands for
            // "any source/operation", which a clause without matches expresses.
            // In ALLOW an empty match stays: it never matches, which fails closed.
            let widen = action == Action::Deny && matches.iter().any(|m| *m == Match::default());
            let matches = if widen { Vec::new() } else { matches };
            Clause { matches }
        })
        .collect();
    Some(Rule { clauses })
}

fn source_match(src: &Source, ns: &str, at: &str, lossy: &mut Lossy) -> Match {
    unsupported(lossy, at, "requestPrincipals", &src.request_principals);
    unsupported(
        lossy,
        at,
        "notRequestPrincipals",
        &src.not_request_principals,
    );
    unsupported(lossy, at, "remoteIpBlocks", &src.remote_ip_blocks);
    unsupported(lossy, at, "notRemoteIpBlocks", &src.not_remote_ip_blocks);
    Match {
        principals: string_matches(&src.principals),
        not_principals: string_matches(&src.not_principals),
        namespaces: string_matches(&src.namespaces),
        not_namespaces: string_matches(&src.not_namespaces),
        service_accounts: parsed(lossy, at, "serviceAccounts", &src.service_accounts, |v| {
            service_account(v, ns)
        }),
        not_service_accounts: parsed(
            lossy,
            at,
            "notServiceAccounts",
            &src.not_service_accounts,
            |v| service_account(v, ns),
        ),
        source_ips: parsed(lossy, at, "ipBlocks", &src.ip_blocks, cidr),
        not_source_ips: parsed(lossy, at, "notIpBlocks", &src.not_ip_blocks, cidr),
        ..Match::default()
    }
}

fn operation_match(op: &Operation, at: &str, lossy: &mut Lossy) -> Match {
    unsupported(lossy, at, "hosts", &op.hosts);
    unsupported(lossy, at, "notHosts", &op.not_hosts);
    unsupported(lossy, at, "methods", &op.methods);
    unsupported(lossy, at, "notMethods", &op.not_methods);
    unsupported(lossy, at, "paths", &op.paths);
    unsupported(lossy, at, "notPaths", &op.not_paths);
    Match {
        destination_ports: parsed(lossy, at, "ports", &op.ports, port),
        not_destination_ports: parsed(lossy, at, "notPorts", &op.not_ports, port),
        ..Match::default()
    }
}

fn condition_match(c: &Condition, at: &str, lossy: &mut Lossy) -> Match {
    let (yes, no) = (&c.values, &c.not_values);
    let mut m = Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.source_ips = parsed(lossy, at, "values", yes, cidr);
            m.not_source_ips = parsed(lossy, at, "notValues", no, cidr);
        }
        "destination.ip" => {
            m.destination_ips = parsed(lossy, at, "values", yes, cidr);
            m.not_destination_ips = parsed(lossy, at, "notValues", no, cidr);
        }
        "destination.port" => {
            m.destination_ports = parsed(lossy, at, "values", yes, port);
            m.not_destination_ports = parsed(lossy, at, "notValues", no, port);
        }
        "source.namespace" => {
            m.namespaces = string_matches(yes);
            m.not_namespaces = string_matches(no);
        }
        "source.principal" => {
            m.principals = string_matches(yes);
            m.not_principals = string_matches(no);
        }
        key => lossy
            .0
            .push(format!("{at}: key {key:?} is not enforceable at L4")),
    }
    if yes.is_empty() && no.is_empty() {
        lossy.0.push(format!("{at}: neither values nor notValues"));
    }
    m
}

fn unsupported(lossy: &mut Lossy, at: &str, field: &str, values: &[String]) {
    if !values.is_empty() {
        lossy
            .0
            .push(format!("{at}.{field} is not enforceable at L4"));
    }
}

/// Every value parsed, or nothing (and a lossy entry) if any value is bad: dropping one value
/// of a list would narrow it.
fn parsed<T>(
    lossy: &mut Lossy,
    at: &str,
    field: &str,
    values: &[String],
    parse: impl Fn(&str) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match parse(v) {
            Some(x) => out.push(x),
            None => {
                lossy.0.push(format!("{at}.{field}: invalid value {v:?}"));
                return Vec::new();
            }
        }
    }
    out
}

/// Istio wildcards: `*` any non-empty value, `*x` suffix, `x*` prefix, else exact.
pub(super) fn string_match(v: &str) -> StringMatch {
    let match_type = if v == "*" {
        MatchType::Presence(())
    } else if let Some(suffix) = v.strip_prefix('*') {
        MatchType::Suffix(suffix.to_owned())
    } else if let Some(prefix) = v.strip_suffix('*') {
        MatchType::Prefix(prefix.to_owned())
    } else {
        MatchType::Exact(v.to_owned())
    };
    StringMatch {
        match_type: Some(match_type),
    }
}

fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|v| string_match(v)).collect()
}

fn service_account(v: &str, policy_ns: &str) -> Option<ServiceAccountMatch> {
    let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
    let ok = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
    (ok(ns) && ok(sa)).then(|| ServiceAccountMatch {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
    })
}

/// An IP (full-length prefix) or CIDR.
fn cidr(v: &str) -> Option<Address> {
    let (ip, len) = match v.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len.parse::<u32>().ok()?)),
        None => (v.parse::<IpAddr>().ok()?, None),
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let length = len.unwrap_or(max);
    (length <= max).then(|| Address {
        address: super::ip_bytes(ip),
        length,
    })
}

fn port(v: &str) -> Option<u32> {
    v.parse::<u16>().ok().filter(|&p| p != 0).map(u32::from)
}
