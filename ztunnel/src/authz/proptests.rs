//! Generated policies and connections: the evaluator must agree with a reference model written
//! separately from it, as plain loops over the wording of the reference (§9.1). The value
//! domains are small so that generated policies actually match generated connections often.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use mesh_core::Identity;
use proptest::prelude::*;

use super::tests::workload;
use super::{Connection, Denied, evaluate};
use crate::state::model::Workload;
use crate::state::policy::{
    Action, Clause, Match, Policy, PolicyStore, Rule, Scope, ServiceAccountMatch, StringMatch,
};

const NAMESPACES: [&str; 3] = ["a", "b", "istio-system"];
const ACCOUNTS: [&str; 2] = ["x", "y"];
const POLICY_NAMES: [&str; 3] = ["p0", "p1", "p2"];

fn word() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "a",
        "b",
        "x",
        "y",
        "cluster.local/ns/a/sa/x",
        "cluster.local/",
        "/sa/y",
        "",
    ])
    .prop_map(str::to_string)
}

fn string_match() -> impl Strategy<Value = StringMatch> {
    prop_oneof![
        word().prop_map(StringMatch::Exact),
        word().prop_map(StringMatch::Prefix),
        word().prop_map(StringMatch::Suffix),
        Just(StringMatch::Presence),
    ]
}

fn account() -> impl Strategy<Value = ServiceAccountMatch> {
    (
        prop::sample::select(&NAMESPACES[..]),
        prop::sample::select(&ACCOUNTS[..]),
    )
        .prop_map(|(ns, sa)| ServiceAccountMatch {
            namespace: ns.into(),
            service_account: sa.into(),
        })
}

fn cidr() -> impl Strategy<Value = IpNet> {
    (0u8..4, 29u8..=32).prop_map(|(last, len)| {
        IpNet::new(Ipv4Addr::new(10, 0, 0, last).into(), len).expect("valid prefix")
    })
}

fn port() -> impl Strategy<Value = u16> {
    80u16..83
}

fn list<T: std::fmt::Debug + Clone>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    // Mostly empty, so that matches set only a few groups.
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(s, 1..3)]
}

fn one_match() -> impl Strategy<Value = Match> {
    let strings = (
        list(string_match()),
        list(string_match()),
        list(string_match()),
        list(string_match()),
    );
    let accounts = (list(account()), list(account()));
    let ips = (list(cidr()), list(cidr()), list(cidr()), list(cidr()));
    let ports = (list(port()), list(port()));
    (strings, accounts, ips, ports).prop_map(
        |((ns, not_ns, pr, not_pr), (sa, not_sa), (si, not_si, di, not_di), (dp, not_dp))| Match {
            namespaces: ns,
            not_namespaces: not_ns,
            principals: pr,
            not_principals: not_pr,
            service_accounts: sa,
            not_service_accounts: not_sa,
            source_ips: si,
            not_source_ips: not_si,
            destination_ips: di,
            not_destination_ips: not_di,
            destination_ports: dp,
            not_destination_ports: not_dp,
        },
    )
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let clause = prop::collection::vec(one_match(), 0..3).prop_map(|matches| Clause { matches });
    let rule = prop::collection::vec(clause, 0..3).prop_map(|clauses| Rule { clauses });
    prop::collection::vec(rule, 0..3)
}

fn policy() -> impl Strategy<Value = Policy> {
    let scope = prop::sample::select(vec![
        Scope::Global,
        Scope::Namespace,
        Scope::WorkloadSelector,
    ]);
    let action = prop::sample::select(vec![Action::Allow, Action::Deny]);
    (
        prop::sample::select(&POLICY_NAMES[..]),
        prop::sample::select(&NAMESPACES[..]),
        scope,
        action,
        rules(),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(name, namespace, scope, action, rules, dry_run)| Policy {
            name: name.into(),
            namespace: namespace.into(),
            scope,
            action,
            rules,
            dry_run,
        })
}

#[derive(Debug, Clone)]
struct Conn {
    identity: Option<Identity>,
    src_ip: IpAddr,
    dst: SocketAddr,
}

fn conn() -> impl Strategy<Value = Conn> {
    let identity = prop::option::weighted(
        0.8,
        (
            prop::sample::select(&NAMESPACES[..]),
            prop::sample::select(&ACCOUNTS[..]),
        )
            .prop_map(|(ns, sa)| Identity::new("cluster.local", ns, sa).expect("valid identity")),
    );
    (identity, 0u8..8, 0u8..8, port()).prop_map(|(identity, src, dst, port)| Conn {
        identity,
        src_ip: Ipv4Addr::new(10, 0, 0, src).into(),
        dst: SocketAddr::new(Ipv4Addr::new(10, 0, 0, dst).into(), port),
    })
}

fn target() -> impl Strategy<Value = Workload> {
    let keys: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| POLICY_NAMES.iter().map(move |n| format!("{ns}/{n}")))
        .collect();
    (
        prop::sample::select(&NAMESPACES[..2]),
        prop::sample::subsequence(keys, 0..4),
    )
        .prop_map(|(ns, selected)| {
            let mut w = workload(ns, &[]);
            w.authorization_policies = selected.into_iter().map(std::sync::Arc::from).collect();
            w
        })
}

// ---- The reference model: deliberately naive, sharing no code with the evaluator. ----

/// `true` = allow.
fn model(policies: &[Policy], w: &Workload, c: &Conn) -> bool {
    // The store keeps the last policy inserted under a key.
    let mut by_key: BTreeMap<String, &Policy> = BTreeMap::new();
    for p in policies {
        by_key.insert(format!("{}/{}", p.namespace, p.name), p);
    }
    let mut enforced = Vec::new();
    for (key, p) in &by_key {
        let applies = p.scope == Scope::Global
            || (p.scope == Scope::Namespace && *p.namespace == *w.namespace)
            || w.authorization_policies.iter().any(|p| **p == **key);
        if applies && !p.dry_run {
            enforced.push(*p);
        }
    }
    for p in &enforced {
        if p.action == Action::Deny && model_policy(p, c) {
            return false;
        }
    }
    let mut any_allow = false;
    for p in &enforced {
        if p.action == Action::Allow {
            any_allow = true;
            if model_policy(p, c) {
                return true;
            }
        }
    }
    !any_allow
}

fn model_policy(p: &Policy, c: &Conn) -> bool {
    for rule in &p.rules {
        let mut every_clause = true;
        for clause in &rule.clauses {
            if !model_clause(clause, c) {
                every_clause = false;
            }
        }
        if every_clause {
            return true;
        }
    }
    false
}

fn model_clause(clause: &Clause, c: &Conn) -> bool {
    if clause.matches.is_empty() {
        return true;
    }
    for m in &clause.matches {
        if *m != Match::default() && model_match(m, c) {
            return true;
        }
    }
    false
}

fn model_string(m: &StringMatch, value: Option<String>) -> bool {
    match (m, value) {
        (_, None) => false,
        (StringMatch::Exact(s), Some(v)) => v == *s,
        (StringMatch::Prefix(s), Some(v)) => v.starts_with(s.as_str()),
        (StringMatch::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
        (StringMatch::Presence, Some(v)) => !v.is_empty(),
    }
}

/// A positive list (when set) needs a hit; a negative list (when set) must have none.
fn model_lists<T>(pos: &[T], neg: &[T], hit: impl Fn(&T) -> bool) -> bool {
    let mut ok = true;
    if !pos.is_empty() {
        let mut any = false;
        for v in pos {
            any = any || hit(v);
        }
        ok = ok && any;
    }
    for v in neg {
        if hit(v) {
            ok = false;
        }
    }
    ok
}

fn model_match(m: &Match, c: &Conn) -> bool {
    let ns = || c.identity.as_ref().map(|i| i.namespace().to_string());
    let principal = || {
        c.identity.as_ref().map(|i| {
            format!(
                "{}/ns/{}/sa/{}",
                i.trust_domain(),
                i.namespace(),
                i.service_account()
            )
        })
    };
    let sa_hit = |sa: &ServiceAccountMatch| match &c.identity {
        Some(i) => i.namespace() == sa.namespace && i.service_account() == sa.service_account,
        None => false,
    };
    model_lists(&m.namespaces, &m.not_namespaces, |s| model_string(s, ns()))
        && model_lists(&m.principals, &m.not_principals, |s| {
            model_string(s, principal())
        })
        && model_lists(&m.service_accounts, &m.not_service_accounts, sa_hit)
        && model_lists(&m.source_ips, &m.not_source_ips, |n| n.contains(&c.src_ip))
        && model_lists(&m.destination_ips, &m.not_destination_ips, |n| {
            n.contains(&c.dst.ip())
        })
        && model_lists(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == c.dst.port()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn evaluator_agrees_with_the_reference_model(
        policies in prop::collection::vec(policy(), 0..6),
        w in target(),
        c in conn(),
    ) {
        let mut store = PolicyStore::default();
        for p in &policies {
            store.insert(p.clone());
        }
        let conn = Connection { src_ip: c.src_ip, src_identity: c.identity.as_ref(), dst: c.dst };
        let got = evaluate(&store, &w, &conn);
        prop_assert_eq!(got.is_ok(), model(&policies, &w, &c), "decision: {:?}", got);
        // A DENY verdict names an enforced DENY policy.
        if let Err(Denied::DenyPolicy(key)) = &got {
            let p = store.get(key).expect("named policy exists");
            prop_assert!(p.action == Action::Deny && !p.dry_run);
        }
    }
}
