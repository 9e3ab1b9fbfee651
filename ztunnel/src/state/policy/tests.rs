use mesh_proto::security as pb;
use pb::string_match::MatchType;

use super::*;

fn sm(t: MatchType) -> pb::StringMatch {
    pb::StringMatch {
        match_type: Some(t),
    }
}

fn addr(bytes: &[u8], length: u32) -> pb::Address {
    pb::Address {
        address: bytes.to_vec(),
        length,
    }
}

fn wire(m: pb::Match) -> pb::Authorization {
    pb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: pb::Scope::WorkloadSelector as i32,
        action: pb::Action::Deny as i32,
        rules: vec![pb::Rule {
            clauses: vec![pb::Clause { matches: vec![m] }],
        }],
        dry_run: true,
        extensions: vec![],
    }
}

#[test]
fn converts_every_field() {
    let m = pb::Match {
        namespaces: vec![sm(MatchType::Exact("a".into()))],
        not_namespaces: vec![sm(MatchType::Prefix("kube-".into()))],
        principals: vec![sm(MatchType::Suffix("/sa/client".into()))],
        not_principals: vec![sm(MatchType::Presence(()))],
        source_ips: vec![addr(&[10, 0, 0, 0], 8)],
        not_source_ips: vec![addr(&[10, 1, 2, 3], 32)],
        destination_ips: vec![addr(&[0xfd; 16], 64)],
        not_destination_ips: vec![addr(&[192, 168, 0, 0], 0)],
        destination_ports: vec![8080],
        not_destination_ports: vec![9090, 1],
        service_accounts: vec![pb::ServiceAccountMatch {
            namespace: "a".into(),
            service_account: "client".into(),
        }],
        not_service_accounts: vec![],
        extensions: vec![],
    };
    let p = Policy::from_proto(&wire(m)).unwrap();
    assert_eq!(p.key(), "ns/p");
    assert_eq!(
        (p.scope, p.action, p.dry_run),
        (Scope::WorkloadSelector, Action::Deny, true)
    );
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.namespaces, [StringMatch::Exact("a".into())]);
    assert_eq!(m.not_namespaces, [StringMatch::Prefix("kube-".into())]);
    assert_eq!(m.principals, [StringMatch::Suffix("/sa/client".into())]);
    assert_eq!(m.not_principals, [StringMatch::Presence]);
    assert_eq!(m.source_ips, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
    assert_eq!(m.not_source_ips, ["10.1.2.3/32".parse::<IpNet>().unwrap()]);
    assert_eq!(m.destination_ips[0].prefix_len(), 64);
    assert_eq!(
        m.not_destination_ips,
        ["192.168.0.0/0".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        (
            m.destination_ports.as_slice(),
            m.not_destination_ports.as_slice()
        ),
        (&[8080][..], &[9090, 1][..])
    );
    assert_eq!(m.service_accounts[0].service_account, "client");
    assert!(!m.is_empty());
    assert!(Match::default().is_empty());
}

#[test]
fn ipv4_mapped_prefixes_become_ipv4() {
    let mut mapped = [0u8; 16];
    mapped[10..].copy_from_slice(&[0xff, 0xff, 10, 1, 0, 0]);
    let m = pb::Match {
        source_ips: vec![addr(&mapped, 112), addr(&mapped, 64)],
        ..Default::default()
    };
    let p = Policy::from_proto(&wire(m)).unwrap();
    let ips = &p.rules[0].clauses[0].matches[0].source_ips;
    assert_eq!(ips[0], "10.1.0.0/16".parse::<IpNet>().unwrap());
    // Shorter than /96 it also covers non-mapped addresses: kept as IPv6.
    assert!(matches!(ips[1], IpNet::V6(_)));
    let yaml: Vec<String> = vec!["::ffff:10.0.0.1".into()];
    let parsed: Vec<IpNet> = yaml
        .iter()
        .map(|s| convert::parse_cidr(s).unwrap())
        .collect();
    assert_eq!(parsed, ["10.0.0.1/32".parse::<IpNet>().unwrap()]);
}

#[test]
fn scopes_and_actions_map_and_empty_rules_are_kept() {
    for (scope, want) in [
        (pb::Scope::Global, Scope::Global),
        (pb::Scope::Namespace, Scope::Namespace),
        (pb::Scope::WorkloadSelector, Scope::WorkloadSelector),
    ] {
        let mut w = wire(pb::Match::default());
        w.scope = scope as i32;
        w.action = pb::Action::Allow as i32;
        w.rules.clear();
        let p = Policy::from_proto(&w).unwrap();
        assert_eq!((p.scope, p.action), (want, Action::Allow));
        assert!(p.rules.is_empty());
    }
}

#[test]
fn malformed_input_is_rejected_naming_the_field() {
    let at = "rules[0].clauses[0].matches[0]";
    let cases: Vec<(pb::Authorization, String)> = vec![
        (
            {
                let mut w = wire(pb::Match::default());
                w.name.clear();
                w
            },
            "/: name: must not be empty".into(),
        ),
        (
            {
                let mut w = wire(pb::Match::default());
                w.namespace.clear();
                w
            },
            "namespace: must not be empty".into(),
        ),
        (
            {
                let mut w = wire(pb::Match::default());
                w.scope = 7;
                w
            },
            "ns/p: scope: unknown value 7".into(),
        ),
        (
            {
                let mut w = wire(pb::Match::default());
                w.action = 2;
                w
            },
            "action: unknown value 2".into(),
        ),
        (
            wire(pb::Match {
                source_ips: vec![addr(&[10, 0, 0, 0], 8), addr(&[10, 0, 0, 0], 33)],
                ..Default::default()
            }),
            format!("{at}.source_ips[1]: prefix length 33 is out of range for 10.0.0.0 (max 32)"),
        ),
        (
            wire(pb::Match {
                not_destination_ips: vec![addr(&[0; 16], 129)],
                ..Default::default()
            }),
            format!("{at}.not_destination_ips[0]: prefix length 129"),
        ),
        (
            wire(pb::Match {
                destination_ips: vec![addr(&[1, 2, 3], 24)],
                ..Default::default()
            }),
            format!("{at}.destination_ips[0]: address has 3 bytes, want 4 (IPv4) or 16 (IPv6)"),
        ),
        (
            wire(pb::Match {
                not_source_ips: vec![addr(&[1, 2, 3, 4], 1 << 20)],
                ..Default::default()
            }),
            format!("{at}.not_source_ips[0]: prefix length 1048576"),
        ),
        (
            wire(pb::Match {
                destination_ports: vec![70000],
                ..Default::default()
            }),
            format!("{at}.destination_ports[0]: port 70000 is not in 1..=65535"),
        ),
        (
            wire(pb::Match {
                not_destination_ports: vec![80, 0],
                ..Default::default()
            }),
            format!("{at}.not_destination_ports[1]: port 0"),
        ),
        (
            wire(pb::Match {
                principals: vec![pb::StringMatch { match_type: None }],
                ..Default::default()
            }),
            format!(
                "{at}.principals[0]: string match sets none of exact, prefix, suffix, presence"
            ),
        ),
        (
            wire(pb::Match {
                not_service_accounts: vec![pb::ServiceAccountMatch {
                    namespace: "a".into(),
                    service_account: String::new(),
                }],
                ..Default::default()
            }),
            format!(
                "{at}.not_service_accounts[0]: service account match needs a namespace and a name"
            ),
        ),
    ];
    for (w, want) in cases {
        let err = Policy::from_proto(&w).unwrap_err();
        assert!(err.contains(&want), "want {want:?} in {err:?}");
        assert!(err.starts_with("authorization "), "{err}");
    }
}

#[test]
fn the_index_follows_scope_and_replacement() {
    let mut store = PolicyStore::default();
    let policy = |name: &str, ns: &str, scope| Policy {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action: Action::Allow,
        rules: vec![],
        dry_run: false,
    };
    store.insert(policy("g", "istio-system", Scope::Global));
    store.insert(policy("n", "a", Scope::Namespace));
    store.insert(policy("s", "a", Scope::WorkloadSelector));
    assert_eq!(store.global_keys().collect::<Vec<_>>(), ["istio-system/g"]);
    assert_eq!(store.namespace_keys("a").collect::<Vec<_>>(), ["a/n"]);
    assert!(store.namespace_keys("b").next().is_none());
    assert!(!store.none_for_namespace("b"));
    // Re-scoping a policy moves it between indexes.
    store.insert(policy("n", "a", Scope::WorkloadSelector));
    assert!(store.namespace_keys("a").next().is_none());
    store.remove("istio-system/g").unwrap();
    assert!(store.none_for_namespace("a"));
    assert!(store.remove("istio-system/g").is_none());
    assert_eq!(store.all().len(), 2);
    assert!(store.get("a/s").is_some() && !store.is_empty());
}

#[test]
fn string_matches_never_match_an_absent_value() {
    let cases = [
        (StringMatch::Exact("a".into()), Some("a"), true),
        (StringMatch::Exact("a".into()), Some("ab"), false),
        (StringMatch::Prefix("a".into()), Some("ab"), true),
        (StringMatch::Prefix("b".into()), Some("ab"), false),
        (StringMatch::Suffix("b".into()), Some("ab"), true),
        (StringMatch::Suffix("a".into()), Some("ab"), false),
        (StringMatch::Presence, Some("x"), true),
        (StringMatch::Presence, Some(""), false),
        (StringMatch::Presence, None, false),
        (StringMatch::Prefix(String::new()), None, false),
    ];
    for (m, v, want) in cases {
        assert_eq!(m.matches(v), want, "{m:?} on {v:?}");
    }
}

#[test]
fn serde_round_trips_and_validate_checks_what_serde_cannot() {
    let yaml = r#"
name: allow-a
namespace: b
scope: Namespace
action: Allow
rules:
- - - principals: [{exact: cluster.local/ns/a/sa/client}, presence]
      sourceIps: [10.0.0.0/8, 10.1.1.1]
      notDestinationPorts: [22]
"#;
    let p: Policy = serde_yaml::from_str(yaml).unwrap();
    p.validate().unwrap();
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals[1], StringMatch::Presence);
    assert_eq!(m.source_ips[1], "10.1.1.1/32".parse::<IpNet>().unwrap());
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["rules"][0][0][0]["sourceIps"][0], "10.0.0.0/8");
    let back: Policy = serde_json::from_value(json).unwrap();
    assert_eq!(back, p);

    let bad_cidr = yaml.replace("10.0.0.0/8", "10.0.0.0/40");
    let err = serde_yaml::from_str::<Policy>(&bad_cidr)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"10.0.0.0/40\" is not an IP address or CIDR prefix"),
        "{err}"
    );
    let mut p = p;
    p.rules[0].clauses[0].matches[0].destination_ports = vec![0];
    let err = p.validate().unwrap_err().to_string();
    assert!(
        err.contains("rules[0].clauses[0].matches[0].destination_ports[0]: port 0"),
        "{err}"
    );
    p.name.clear();
    assert_eq!(p.validate().unwrap_err().field, "name");
    for (bad, want) in [
        ("[{exact: a, prefix: b}]", "string match with 2 keys"),
        ("[{regex: a}]", "string match kind \"regex\""),
        ("[present]", "string match \"present\""),
    ] {
        let err = serde_yaml::from_str::<Vec<StringMatch>>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{bad}: {err}");
    }
}
