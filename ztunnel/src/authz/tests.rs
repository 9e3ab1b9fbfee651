//! Table tests: one per evaluation rule of the reference (§9.1).

use crate::state::model::{HealthStatus, TunnelProtocol};
use crate::state::policy::{Rule, Scope, ServiceAccountMatch, StringMatch};

use super::*;

pub(super) fn workload(ns: &str, selected: &[&str]) -> Workload {
    Workload {
        uid: format!("{ns}/server").into(),
        name: "server".into(),
        namespace: ns.into(),
        identity: Identity::new("cluster.local", ns, "server").unwrap().into(),
        network: "".into(),
        addresses: vec!["10.0.0.2".parse().unwrap()],
        protocol: TunnelProtocol::Hbone,
        node: "".into(),
        services: Default::default(),
        status: HealthStatus::Healthy,
        capacity: 1,
        canonical_name: "".into(),
        canonical_revision: "".into(),
        workload_name: "".into(),
        authorization_policies: selected.iter().map(|s| std::sync::Arc::from(*s)).collect(),
        locality: Default::default(),
        cluster_id: "".into(),
    }
}

fn policy(key: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Policy {
    let (ns, name) = key.split_once('/').unwrap();
    Policy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action,
        rules,
        dry_run: false,
    }
}

/// One rule, one clause, one match.
fn rule(m: Match) -> Vec<Rule> {
    vec![Rule {
        clauses: vec![Clause { matches: vec![m] }],
    }]
}

fn from_sa(sa: &str) -> Match {
    Match {
        principals: vec![StringMatch::Exact(format!("cluster.local/ns/a/sa/{sa}"))],
        ..Match::default()
    }
}

fn store(policies: Vec<Policy>) -> PolicyStore {
    let mut s = PolicyStore::default();
    policies.into_iter().for_each(|p| s.insert(p));
    s
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// Decides a connection from `src_ip` (identity `src`, if any) to 10.0.0.2:`port`.
fn check(
    s: &PolicyStore,
    w: &Workload,
    src: Option<&str>,
    src_ip: &str,
    port: u16,
) -> Result<(), Denied> {
    let identity = src.map(id);
    let conn = Connection {
        src_ip: src_ip.parse().unwrap(),
        src_identity: identity.as_ref(),
        dst: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
    };
    evaluate(s, w, &conn)
}

const CLIENT: Option<&str> = Some("spiffe://cluster.local/ns/a/sa/client");
const OTHER: Option<&str> = Some("spiffe://cluster.local/ns/a/sa/other");

#[test]
fn no_policies_allow_everything() {
    let s = PolicyStore::default();
    assert_eq!(check(&s, &workload("b", &[]), None, "10.0.0.9", 80), Ok(()));
    assert_eq!(
        check(&s, &workload("b", &["b/missing"]), CLIENT, "10.0.0.9", 80),
        Ok(())
    );
}

#[test]
fn an_allow_policy_admits_its_match_and_refuses_the_rest() {
    let s = store(vec![policy(
        "b/allow",
        Scope::Namespace,
        Action::Allow,
        rule(from_sa("client")),
    )]);
    let w = workload("b", &[]);
    assert_eq!(check(&s, &w, CLIENT, "10.0.0.9", 80), Ok(()));
    assert_eq!(
        check(&s, &w, OTHER, "10.0.0.9", 80),
        Err(Denied::NoAllowMatch("b/allow".into()))
    );
    assert!(check(&s, &w, None, "10.0.0.9", 80).is_err());
    // Another namespace's NAMESPACE policy does not apply.
    assert_eq!(
        check(&s, &workload("c", &[]), OTHER, "10.0.0.9", 80),
        Ok(())
    );
}

#[test]
fn deny_wins_over_allow_and_any_allow_suffices() {
    let s = store(vec![
        policy(
            "b/allow-all",
            Scope::Namespace,
            Action::Allow,
            vec![Rule::default()],
        ),
        policy(
            "b/allow-client",
            Scope::Namespace,
            Action::Allow,
            rule(from_sa("client")),
        ),
        policy(
            "b/deny-client",
            Scope::Namespace,
            Action::Deny,
            rule(from_sa("client")),
        ),
    ]);
    let w = workload("b", &[]);
    assert_eq!(
        check(&s, &w, CLIENT, "10.0.0.9", 80),
        Err(Denied::DenyPolicy("b/deny-client".into()))
    );
    assert_eq!(check(&s, &w, OTHER, "10.0.0.9", 80), Ok(()));
}

#[test]
fn dry_run_policies_are_never_enforced() {
    let mut deny = policy(
        "b/deny",
        Scope::Namespace,
        Action::Deny,
        vec![Rule::default()],
    );
    deny.dry_run = true;
    let mut allow = policy(
        "b/allow",
        Scope::Namespace,
        Action::Allow,
        rule(from_sa("client")),
    );
    allow.dry_run = true;
    let s = store(vec![deny, allow]);
    // The dry-run DENY matches everything and the dry-run ALLOW does not match OTHER: both ignored.
    assert_eq!(
        check(&s, &workload("b", &[]), OTHER, "10.0.0.9", 80),
        Ok(())
    );
}

#[test]
fn global_namespace_and_selected_policies_apply() {
    let s = store(vec![
        policy(
            "istio-system/deny-22",
            Scope::Global,
            Action::Deny,
            rule(Match {
                destination_ports: vec![22],
                ..Match::default()
            }),
        ),
        policy(
            "b/deny-client",
            Scope::WorkloadSelector,
            Action::Deny,
            rule(from_sa("client")),
        ),
    ]);
    // Global: every namespace.
    assert!(check(&s, &workload("c", &[]), CLIENT, "10.0.0.9", 22).is_err());
    assert_eq!(
        check(&s, &workload("c", &[]), CLIENT, "10.0.0.9", 80),
        Ok(())
    );
    // Selector: only when the workload lists it; unknown names are skipped.
    assert_eq!(
        check(&s, &workload("b", &[]), CLIENT, "10.0.0.9", 80),
        Ok(())
    );
    let selected = workload("b", &["b/deny-client", "b/unknown"]);
    assert_eq!(
        check(&s, &selected, CLIENT, "10.0.0.9", 80),
        Err(Denied::DenyPolicy("b/deny-client".into()))
    );
    let names: Vec<_> = applicable(&s, &selected).iter().map(|p| p.key()).collect();
    assert_eq!(names, ["b/deny-client", "istio-system/deny-22"]);
}

#[test]
fn empty_rules_clauses_and_matches_follow_the_reference() {
    let w = workload("b", &[]);
    let deny = |rules| store(vec![policy("b/d", Scope::Namespace, Action::Deny, rules)]);
    // No rules: never matches.
    assert_eq!(check(&deny(vec![]), &w, CLIENT, "10.0.0.9", 80), Ok(()));
    // A rule without clauses matches everything.
    assert!(check(&deny(vec![Rule::default()]), &w, CLIENT, "10.0.0.9", 80).is_err());
    // A clause without matches matches.
    let no_matches = vec![Rule {
        clauses: vec![Clause::default()],
    }];
    assert!(check(&deny(no_matches), &w, CLIENT, "10.0.0.9", 80).is_err());
    // A match with no field set is skipped: never matches.
    assert_eq!(
        check(&deny(rule(Match::default())), &w, CLIENT, "10.0.0.9", 80),
        Ok(())
    );
    // ...but an empty match beside a real one does not hide it.
    let mixed = vec![Rule {
        clauses: vec![Clause {
            matches: vec![Match::default(), from_sa("client")],
        }],
    }];
    assert!(check(&deny(mixed), &w, CLIENT, "10.0.0.9", 80).is_err());
    // An ALLOW policy with no rules denies everything.
    let allow_none = store(vec![policy("b/a", Scope::Namespace, Action::Allow, vec![])]);
    assert!(check(&allow_none, &w, CLIENT, "10.0.0.9", 80).is_err());
}

#[test]
fn rules_or_clauses_and_matches_or_groups_and() {
    let w = workload("b", &[]);
    let port = |p| Match {
        destination_ports: vec![p],
        ..Match::default()
    };
    let deny = |rules| store(vec![policy("b/d", Scope::Namespace, Action::Deny, rules)]);
    // Clauses AND: client AND port 80.
    let and = vec![Rule {
        clauses: vec![
            Clause {
                matches: vec![from_sa("client")],
            },
            Clause {
                matches: vec![port(80)],
            },
        ],
    }];
    assert!(check(&deny(and.clone()), &w, CLIENT, "10.0.0.9", 80).is_err());
    assert!(check(&deny(and.clone()), &w, CLIENT, "10.0.0.9", 81).is_ok());
    assert!(check(&deny(and), &w, OTHER, "10.0.0.9", 80).is_ok());
    // Matches OR; rules OR.
    let or = vec![Rule {
        clauses: vec![Clause {
            matches: vec![from_sa("client"), port(80)],
        }],
    }];
    assert!(check(&deny(or.clone()), &w, OTHER, "10.0.0.9", 80).is_err());
    assert!(check(&deny(or), &w, OTHER, "10.0.0.9", 81).is_ok());
    let rules = [rule(from_sa("client")), rule(port(80))].concat();
    assert!(check(&deny(rules), &w, OTHER, "10.0.0.9", 80).is_err());
    // Groups within one match AND.
    let both = Match {
        destination_ports: vec![80],
        ..from_sa("client")
    };
    assert!(check(&deny(rule(both.clone())), &w, OTHER, "10.0.0.9", 80).is_ok());
    assert!(check(&deny(rule(both)), &w, CLIENT, "10.0.0.9", 80).is_err());
}

#[test]
fn each_attribute_and_its_negation() {
    let w = workload("b", &[]);
    let hits = |m: Match, src: Option<&str>, ip: &str, port: u16| {
        let s = store(vec![policy("b/d", Scope::Namespace, Action::Deny, rule(m))]);
        check(&s, &w, src, ip, port).is_err()
    };
    let exact = |v: &str| vec![StringMatch::Exact(v.into())];
    let net = |v: &str| vec![v.parse::<IpNet>().unwrap()];
    let sa = |ns: &str, name: &str| {
        vec![ServiceAccountMatch {
            namespace: ns.into(),
            service_account: name.into(),
        }]
    };
    let foreign = Some("spiffe://other.domain/ns/a/sa/client");
    let cases: Vec<(Match, Option<&str>, &str, u16, bool)> = vec![
        (
            Match {
                namespaces: exact("a"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                namespaces: exact("x"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                namespaces: vec![StringMatch::Presence],
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_namespaces: exact("a"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_namespaces: exact("x"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                not_namespaces: exact("x"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                principals: vec![StringMatch::Prefix("cluster.local/ns/a/".into())],
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                principals: vec![StringMatch::Exact(
                    "spiffe://cluster.local/ns/a/sa/client".into(),
                )],
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                service_accounts: sa("a", "client"),
                ..Match::default()
            },
            foreign,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                service_accounts: sa("b", "client"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                service_accounts: sa("a", "client"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_service_accounts: sa("a", "client"),
                ..Match::default()
            },
            CLIENT,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_service_accounts: sa("a", "client"),
                ..Match::default()
            },
            OTHER,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                source_ips: net("10.0.0.0/24"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                source_ips: net("10.0.0.0/24"),
                ..Match::default()
            },
            None,
            "::ffff:10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                source_ips: net("10.0.1.0/24"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                source_ips: net("::/0"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_source_ips: net("10.0.0.9/32"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_source_ips: net("10.0.0.9/32"),
                ..Match::default()
            },
            None,
            "10.0.0.8",
            80,
            true,
        ),
        (
            Match {
                destination_ips: net("10.0.0.2/32"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            true,
        ),
        (
            Match {
                not_destination_ips: net("10.0.0.0/8"),
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                destination_ports: vec![80, 443],
                ..Match::default()
            },
            None,
            "10.0.0.9",
            443,
            true,
        ),
        (
            Match {
                not_destination_ports: vec![80],
                ..Match::default()
            },
            None,
            "10.0.0.9",
            80,
            false,
        ),
        (
            Match {
                not_destination_ports: vec![80],
                ..Match::default()
            },
            None,
            "10.0.0.9",
            81,
            true,
        ),
    ];
    for (i, (m, src, ip, port, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            hits(m.clone(), src, ip, port),
            want,
            "case {i}: {m:?} from {src:?} {ip}:{port}"
        );
    }
}

#[test]
fn strict_peer_authentication_refuses_plaintext_only() {
    // What istiod sends for PeerAuthentication STRICT.
    let strict = policy(
        "istio-system/istio_converted_static_strict",
        Scope::WorkloadSelector,
        Action::Deny,
        rule(Match {
            not_principals: vec![StringMatch::Presence],
            ..Match::default()
        }),
    );
    let s = store(vec![strict]);
    let w = workload("b", &["istio-system/istio_converted_static_strict"]);
    assert_eq!(
        check(&s, &w, None, "10.0.0.9", 80),
        Err(Denied::DenyPolicy(
            "istio-system/istio_converted_static_strict".into()
        ))
    );
    assert_eq!(check(&s, &w, CLIENT, "10.0.0.9", 80), Ok(()));
    // Not selected: plaintext passes.
    assert_eq!(check(&s, &workload("b", &[]), None, "10.0.0.9", 80), Ok(()));
}
