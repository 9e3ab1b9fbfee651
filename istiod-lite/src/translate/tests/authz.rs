//! AuthorizationPolicy and PeerAuthentication translation.

use super::*;

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn peer(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn exact(s: &str) -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Exact(s.into())),
    }
}

fn presence() -> StringMatch {
    StringMatch {
        match_type: Some(MatchType::Presence(())),
    }
}

fn cidr(s: &str, length: u32) -> CidrAddr {
    CidrAddr {
        address: ip(s),
        length,
    }
}

fn auth(ns: &str, name: &str, scope: Scope, action: Action, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: scope as i32,
        action: action as i32,
        rules,
        dry_run: false,
        extensions: Vec::new(),
    }
}

fn rule(clauses: Vec<Vec<Match>>) -> Rule {
    Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| Clause { matches })
            .collect(),
    }
}

fn translated(spec: &str) -> (Option<Authorization>, Vec<String>) {
    let t = run(&policy("shop", "p", spec));
    (t.authorizations.get("shop/p").cloned(), t.problems)
}

#[test]
fn l4_fields_map_one_to_one() {
    let spec = "
  action: ALLOW
  rules:
  - from:
    - source: {principals: ['cluster.local/ns/a/sa/b', '*', '*/sa/x', 'cluster.local/*'], notNamespaces: [kube-system]}
    - source: {namespaces: [a], notPrincipals: [x], serviceAccounts: [ns1/sa1, sa2], notServiceAccounts: [ns3/sa3]}
    - source: {ipBlocks: [10.0.0.0/8, 10.1.2.3, 'fd00::/64'], notIpBlocks: [10.9.0.0/16]}
    to:
    - operation: {ports: ['8080', '9090'], notPorts: ['22']}
    when:
    - {key: source.ip, values: [192.0.2.0/24], notValues: [192.0.2.1]}
    - {key: destination.port, values: ['443']}
    - {key: source.namespace, values: [a], notValues: [b]}
    - {key: source.principal, values: ['*']}
    - {key: destination.ip, notValues: [10.0.0.1]}";
    let (got, problems) = translated(spec);
    assert!(problems.is_empty(), "{problems:?}");
    let sm = |t| StringMatch {
        match_type: Some(t),
    };
    let from = vec![
        Match {
            principals: vec![
                exact("cluster.local/ns/a/sa/b"),
                presence(),
                sm(MatchType::Suffix("/sa/x".into())),
                sm(MatchType::Prefix("cluster.local/".into())),
            ],
            not_namespaces: vec![exact("kube-system")],
            ..Match::default()
        },
        Match {
            namespaces: vec![exact("a")],
            not_principals: vec![exact("x")],
            service_accounts: vec![
                ServiceAccountMatch {
                    namespace: "ns1".into(),
                    service_account: "sa1".into(),
                },
                ServiceAccountMatch {
                    namespace: "shop".into(),
                    service_account: "sa2".into(),
                },
            ],
            not_service_accounts: vec![ServiceAccountMatch {
                namespace: "ns3".into(),
                service_account: "sa3".into(),
            }],
            ..Match::default()
        },
        Match {
            source_ips: vec![
                cidr("10.0.0.0", 8),
                cidr("10.1.2.3", 32),
                cidr("fd00::", 64),
            ],
            not_source_ips: vec![cidr("10.9.0.0", 16)],
            ..Match::default()
        },
    ];
    let to = vec![Match {
        destination_ports: vec![8080, 9090],
        not_destination_ports: vec![22],
        ..Match::default()
    }];
    let when = [
        Match {
            source_ips: vec![cidr("192.0.2.0", 24)],
            not_source_ips: vec![cidr("192.0.2.1", 32)],
            ..Match::default()
        },
        Match {
            destination_ports: vec![443],
            ..Match::default()
        },
        Match {
            namespaces: vec![exact("a")],
            not_namespaces: vec![exact("b")],
            ..Match::default()
        },
        Match {
            principals: vec![presence()],
            ..Match::default()
        },
        Match {
            not_destination_ips: vec![cidr("10.0.0.1", 32)],
            ..Match::default()
        },
    ];
    let mut clauses = vec![from, to];
    clauses.extend(when.into_iter().map(|m| vec![m]));
    let want = auth(
        "shop",
        "p",
        Scope::Namespace,
        Action::Allow,
        vec![rule(clauses)],
    );
    assert_eq!(got, Some(want));
}

#[test]
fn scope_table() {
    let cases = [
        ("shop", "{}", Scope::Namespace),
        (
            "shop",
            "{selector: {matchLabels: {app: web}}}",
            Scope::WorkloadSelector,
        ),
        ("shop", "{selector: {matchLabels: {}}}", Scope::Namespace),
        ("istio-system", "{}", Scope::Global),
        (
            "istio-system",
            "{selector: {matchLabels: {app: web}}}",
            Scope::WorkloadSelector,
        ),
    ];
    for (ns, spec, want) in cases {
        let t = run(&policy(ns, "p", spec));
        let got = &t.authorizations[&format!("{ns}/p")];
        assert_eq!(got.scope, want as i32, "{ns} {spec}");
        assert!(
            got.rules.is_empty(),
            "a policy without rules matches nothing"
        );
    }
}

#[test]
fn empty_rule_matches_everything_and_dry_run() {
    let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\n\
                spec: {action: DENY, rules: [{}]}\n";
    let t = run(text);
    let mut want = auth(
        "shop",
        "p",
        Scope::Namespace,
        Action::Deny,
        vec![rule(vec![])],
    );
    want.dry_run = true;
    assert_eq!(t.authorizations["shop/p"], want);
}

#[test]
fn l7_fields_drop_allow_rules_and_are_omitted_from_deny() {
    let rules = "
  rules:
  - from: [{source: {principals: [a], requestPrincipals: ['*']}}]
  - to: [{operation: {ports: ['80'], methods: [GET]}}]
  - when: [{key: 'request.headers[x]', values: [y]}]
  - from: [{source: {remoteIpBlocks: [1.2.3.4]}}]
  - from: [{source: {principals: [ok]}}]";
    let (allow, problems) = translated(&format!("\n  action: ALLOW{rules}"));
    let keep = rule(vec![vec![Match {
        principals: vec![exact("ok")],
        ..Match::default()
    }]]);
    assert_eq!(
        allow,
        Some(auth(
            "shop",
            "p",
            Scope::Namespace,
            Action::Allow,
            vec![keep.clone()]
        ))
    );
    assert_eq!(
        problems,
        [
            "AuthorizationPolicy shop/p: rule 0 dropped (ALLOW fails closed): rules[0].from[0].source.requestPrincipals is not enforceable at L4",
            "AuthorizationPolicy shop/p: rule 1 dropped (ALLOW fails closed): rules[1].to[0].operation.methods is not enforceable at L4",
            "AuthorizationPolicy shop/p: rule 2 dropped (ALLOW fails closed): rules[2].when[0]: key \"request.headers[x]\" is not enforceable at L4",
            "AuthorizationPolicy shop/p: rule 3 dropped (ALLOW fails closed): rules[3].from[0].source.remoteIpBlocks is not enforceable at L4",
        ]
    );

    let (deny, problems) = translated(&format!("\n  action: DENY{rules}"));
    let want = vec![
        // The L7 part is omitted; the L4 part stays.
        rule(vec![vec![Match {
            principals: vec![exact("a")],
            ..Match::default()
        }]]),
        rule(vec![vec![Match {
            destination_ports: vec![80],
            ..Match::default()
        }]]),
        // Nothing L4 left: the clause matches everything.
        rule(vec![vec![]]),
        rule(vec![vec![]]),
        keep,
    ];
    assert_eq!(
        deny,
        Some(auth("shop", "p", Scope::Namespace, Action::Deny, want))
    );
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "AuthorizationPolicy shop/p: rule 0: omitted from DENY (denies more broadly): "
        ),
        "{}",
        problems[0]
    );
}

#[test]
fn an_allow_policy_whose_only_rule_is_dropped_still_exists_and_denies() {
    let (got, problems) = translated("{rules: [{to: [{operation: {paths: [/admin]}}]}]}");
    assert_eq!(
        got,
        Some(auth("shop", "p", Scope::Namespace, Action::Allow, vec![]))
    );
    assert_eq!(problems.len(), 1);
}

#[test]
fn bad_values_are_lossy_fields() {
    let cases = [
        (
            "{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}",
            "rules[0].from[0].source.ipBlocks: invalid value \"10.0.0.0/33\"",
        ),
        (
            "{source: {notIpBlocks: [nope]}}",
            "rules[0].from[0].source.notIpBlocks: invalid value \"nope\"",
        ),
        (
            "{source: {serviceAccounts: [a/b/c]}}",
            "rules[0].from[0].source.serviceAccounts: invalid value \"a/b/c\"",
        ),
        (
            "{source: {notServiceAccounts: ['/x']}}",
            "rules[0].from[0].source.notServiceAccounts: invalid value \"/x\"",
        ),
    ];
    for (from, want) in cases {
        let (got, problems) = translated(&format!("{{rules: [{{from: [{from}]}}]}}"));
        assert_eq!(got.unwrap().rules, [], "{from}");
        assert_eq!(problems.len(), 1, "{from}");
        assert!(problems[0].ends_with(want), "{}", problems[0]);
        // In DENY the whole field goes (never single values), leaving a match-everything clause.
        let (got, _) = translated(&format!("{{action: DENY, rules: [{{from: [{from}]}}]}}"));
        assert_eq!(got.unwrap().rules, [rule(vec![vec![]])], "{from}");
    }
    let ports = [
        (
            "{operation: {ports: ['0']}}",
            "rules[0].to[0].operation.ports: invalid value \"0\"",
        ),
        (
            "{operation: {notPorts: ['http']}}",
            "rules[0].to[0].operation.notPorts: invalid value \"http\"",
        ),
        (
            "{operation: {ports: ['65536']}}",
            "rules[0].to[0].operation.ports: invalid value \"65536\"",
        ),
    ];
    for (to, want) in ports {
        let (got, problems) = translated(&format!("{{rules: [{{to: [{to}]}}]}}"));
        assert_eq!(got.unwrap().rules, [], "{to}");
        assert!(problems[0].ends_with(want), "{}", problems[0]);
    }
    let (got, problems) =
        translated("{rules: [{when: [{key: destination.port, values: [x]}, {key: source.ip}]}]}");
    assert_eq!(got.unwrap().rules, []);
    assert!(problems[0].ends_with(
        "rules[0].when[0].values: invalid value \"x\"; rules[0].when[1]: neither values nor notValues"
    ), "{}", problems[0]);
}

#[test]
fn partial_deny_keeps_other_fields_of_the_same_match() {
    let (got, _) = translated(
        "{action: DENY, rules: [{from: [{source: {namespaces: [a], ipBlocks: [bad]}}, {source: {principals: [p]}}]}]}",
    );
    let want = rule(vec![vec![
        Match {
            namespaces: vec![exact("a")],
            ..Match::default()
        },
        Match {
            principals: vec![exact("p")],
            ..Match::default()
        },
    ]]);
    assert_eq!(got.unwrap().rules, [want]);
}

#[test]
fn empty_source_in_allow_matches_nothing_and_in_deny_everything() {
    let (allow, _) = translated("{rules: [{from: [{source: {}}]}]}");
    assert_eq!(allow.unwrap().rules, [rule(vec![vec![Match::default()]])]);
    let (deny, _) = translated("{action: DENY, rules: [{from: [{source: {}}]}]}");
    assert_eq!(deny.unwrap().rules, [rule(vec![vec![]])]);
}

#[test]
fn unsupported_actions_targets_and_unknown_fields() {
    let text = [
        policy(
            "shop",
            "custom",
            "{action: CUSTOM, provider: {name: ext}, rules: [{}]}",
        ),
        policy("shop", "audit", "{action: AUDIT, rules: [{}]}"),
        policy(
            "shop",
            "waypoint",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]}",
        ),
        policy("shop", "single", "{targetRef: {kind: Service, name: s}}"),
        policy(
            "shop",
            "unknown",
            "{future: 1, rules: [{from: [{source: {principal: [a]}}]}, {}]}",
        ),
    ]
    .concat();
    let t = run(&text);
    let keys: Vec<&String> = t.authorizations.keys().collect();
    assert_eq!(keys, ["shop/unknown"]);
    assert_eq!(
        t.problems,
        [
            "AuthorizationPolicy shop/audit: action AUDIT is not supported by ztunnel; policy not applied",
            "AuthorizationPolicy shop/custom: action CUSTOM is not supported by ztunnel; policy not applied",
            "AuthorizationPolicy shop/unknown: unsupported fields ignored: spec.future",
            "AuthorizationPolicy shop/unknown: rule 0 dropped (ALLOW fails closed): unknown field spec.rules.0.from.0.source.principal",
        ]
    );
    assert_eq!(t.authorizations["shop/unknown"].rules, [rule(vec![])]);
}

#[test]
fn selector_policies_are_listed_on_selected_workloads() {
    let text = [
        policy("shop", "web-only", "{selector: {matchLabels: {app: web}}}"),
        policy("shop", "ns-wide", "{}"),
        policy(
            "shop",
            "dropped",
            "{selector: {matchLabels: {app: web}}, action: CUSTOM}",
        ),
        policy(
            "other",
            "web-other",
            "{selector: {matchLabels: {app: web}}}",
        ),
        policy(
            "istio-system",
            "mesh-web",
            "{selector: {matchLabels: {app: web}}}",
        ),
        policy("istio-system", "mesh-wide", "{}"),
        pod("shop", "web", "app: web", "", ""),
        pod("shop", "api", "app: api", "", ""),
    ]
    .concat();
    let t = run(&text);
    assert_eq!(
        workload(&t, "shop", "web").authorization_policies,
        ["istio-system/mesh-web", "shop/web-only"]
    );
    assert!(
        workload(&t, "shop", "api")
            .authorization_policies
            .is_empty()
    );
    assert_eq!(
        t.authorizations["istio-system/mesh-wide"].scope,
        Scope::Global as i32
    );
}

fn strict_static() -> Authorization {
    let m = Match {
        not_principals: vec![presence()],
        ..Match::default()
    };
    auth(
        "istio-system",
        "istio_converted_static_strict",
        Scope::WorkloadSelector,
        Action::Deny,
        vec![rule(vec![vec![m]])],
    )
}

#[test]
fn peer_authentication_mode_table() {
    const STATIC: &str = "istio-system/istio_converted_static_strict";
    let mesh_strict = peer("istio-system", "mesh", "{mtls: {mode: STRICT}}");
    let mesh_permissive = peer("istio-system", "mesh", "{mtls: {mode: PERMISSIVE}}");
    let ns_strict = peer("shop", "ns", "{mtls: {mode: STRICT}}");
    let ns_permissive = peer("shop", "ns", "{mtls: {mode: PERMISSIVE}}");
    let ns_unset = peer("shop", "ns", "{}");
    let web_permissive = peer(
        "shop",
        "web",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}}",
    );
    let web_strict = peer(
        "shop",
        "web",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
    );
    let web_disable = peer(
        "shop",
        "web",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
    );
    let web_unset = peer("shop", "web", "{selector: {matchLabels: {app: web}}}");
    let cases: &[(&str, Vec<&String>, bool)] = &[
        ("nothing", vec![], false),
        ("mesh permissive", vec![&mesh_permissive], false),
        ("mesh strict", vec![&mesh_strict], true),
        ("namespace strict", vec![&ns_strict], true),
        (
            "namespace permissive beats mesh",
            vec![&mesh_strict, &ns_permissive],
            false,
        ),
        (
            "namespace unset inherits mesh",
            vec![&mesh_strict, &ns_unset],
            true,
        ),
        (
            "workload permissive beats namespace",
            vec![&ns_strict, &web_permissive],
            false,
        ),
        (
            "workload disable beats namespace",
            vec![&ns_strict, &web_disable],
            false,
        ),
        ("workload strict", vec![&web_strict], true),
        (
            "workload unset inherits",
            vec![&ns_strict, &web_unset],
            true,
        ),
    ];
    for (name, objects, strict) in cases {
        let mut text: String = objects.iter().map(|s| s.as_str()).collect();
        text += &pod("shop", "web", "app: web", "", "");
        text += &pod("shop", "api", "app: api", "", "");
        let t = run(&text);
        assert!(t.problems.is_empty(), "{name}: {:?}", t.problems);
        let want: &[&str] = if *strict { &[STATIC] } else { &[] };
        assert_eq!(
            workload(&t, "shop", "web").authorization_policies,
            want,
            "{name}"
        );
        if *strict {
            assert_eq!(t.authorizations[STATIC], strict_static(), "{name}");
        }
    }
}

#[test]
fn port_level_mtls_becomes_a_converted_policy() {
    let deny_on = |ports: Vec<u32>, not_ports: Vec<u32>| {
        let m = Match {
            not_principals: vec![presence()],
            destination_ports: ports,
            not_destination_ports: not_ports,
            ..Match::default()
        };
        auth(
            "shop",
            "converted_peer_authentication_web",
            Scope::WorkloadSelector,
            Action::Deny,
            vec![rule(vec![vec![m]])],
        )
    };
    let sel = "selector: {matchLabels: {app: web}}";
    let cases = [
        (
            format!(
                "{{{sel}, mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: PERMISSIVE}}, 9090: {{mode: STRICT}}}}}}"
            ),
            Some(deny_on(vec![], vec![8080])),
        ),
        (
            format!(
                "{{{sel}, mtls: {{mode: PERMISSIVE}}, portLevelMtls: {{8080: {{mode: STRICT}}, 9090: {{mode: DISABLE}}}}}}"
            ),
            Some(deny_on(vec![8080], vec![])),
        ),
        (
            format!("{{{sel}, portLevelMtls: {{8080: {{mode: STRICT}}, 9090: {{}}}}}}"),
            Some(deny_on(vec![8080], vec![])),
        ),
        (
            format!(
                "{{{sel}, mtls: {{mode: PERMISSIVE}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}"
            ),
            None,
        ),
    ];
    for (spec, want) in cases {
        let t = run(&format!(
            "{}{}",
            peer("shop", "web", &spec),
            pod("shop", "web", "app: web", "", "")
        ));
        assert!(t.problems.is_empty(), "{spec}: {:?}", t.problems);
        let got = t
            .authorizations
            .get("shop/converted_peer_authentication_web");
        assert_eq!(got, want.as_ref(), "{spec}");
        let listed = workload(&t, "shop", "web").authorization_policies.clone();
        let expect: Vec<String> = want
            .iter()
            .map(|_| "shop/converted_peer_authentication_web".to_owned())
            .collect();
        assert_eq!(listed, expect, "{spec}");
    }
    // Strict with only strict ports is the static policy.
    let spec =
        format!("{{{sel}, mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: STRICT}}}}}}");
    let t = run(&format!(
        "{}{}",
        peer("shop", "web", &spec),
        pod("shop", "web", "app: web", "", "")
    ));
    assert_eq!(
        workload(&t, "shop", "web").authorization_policies,
        ["istio-system/istio_converted_static_strict"]
    );
}

#[test]
fn peer_authentication_bad_input_is_reported() {
    let spec = "{selector: {matchLabels: {app: web}}, portLevelMtls: {'0': {mode: STRICT}, http: {mode: STRICT}, 80: {mode: STRICT}}, extra: x}";
    let t = run(&format!(
        "{}{}",
        peer("shop", "web", spec),
        pod("shop", "web", "app: web", "", "")
    ));
    assert_eq!(
        t.problems,
        [
            "PeerAuthentication shop/web: unsupported fields ignored: spec.extra",
            "PeerAuthentication shop/web: portLevelMtls key \"0\" is not a valid port; ignored",
            "PeerAuthentication shop/web: portLevelMtls key \"http\" is not a valid port; ignored",
        ]
    );
    let got = &t.authorizations["shop/converted_peer_authentication_web"];
    assert_eq!(got.rules[0].clauses[0].matches[0].destination_ports, [80]);
}

#[test]
fn oldest_peer_authentication_wins() {
    let older = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                 metadata: {name: z, namespace: shop, creationTimestamp: '2020-01-01T00:00:00Z'}\n\
                 spec: {mtls: {mode: STRICT}}\n";
    let newer = "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
                 metadata: {name: a, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z'}\n\
                 spec: {mtls: {mode: PERMISSIVE}}\n";
    let t = run(&format!("{older}{newer}{}", pod("shop", "p", "", "", "")));
    assert_eq!(workload(&t, "shop", "p").authorization_policies.len(), 1);
}
