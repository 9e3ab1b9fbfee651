//! Decoding Istio CRDs from YAML as users write them, through the shared parser.

use super::*;
use crate::k8s::{Object, Typed, parse_documents};

fn one<T: Typed + Clone>(text: &str) -> T {
    let parsed = parse_documents(text).unwrap();
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    T::from_object(&parsed.objects[0]).unwrap().as_ref().clone()
}

const FULL_POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/a/sa/b]
        notPrincipals: ['*']
        requestPrincipals: [x]
        notRequestPrincipals: [y]
        namespaces: [a]
        notNamespaces: [b]
        serviceAccounts: [a/b]
        notServiceAccounts: [c]
        ipBlocks: [10.0.0.0/8]
        notIpBlocks: [10.1.0.0/16]
        remoteIpBlocks: [1.2.3.4]
        notRemoteIpBlocks: [5.6.7.8]
    to:
    - operation:
        ports: ['80', 8080]
        notPorts: ['9090']
        hosts: [h]
        notHosts: [nh]
        methods: [GET]
        notMethods: [POST]
        paths: [/a]
        notPaths: [/b]
    when:
    - key: source.ip
      values: [10.0.0.1]
      notValues: [10.0.0.2]
status: {whatever: true}
";

#[test]
fn authorization_policy_decodes_every_modelled_field() {
    let p: AuthorizationPolicy = one(FULL_POLICY);
    assert_eq!(p.metadata.name.as_deref(), Some("allow-web"));
    assert!(p.unknown_fields.is_empty(), "{:?}", p.unknown_fields);
    let spec = &p.spec;
    assert_eq!(spec.action, PolicyAction::Deny);
    let labels = &spec.selector.as_ref().unwrap().match_labels;
    assert_eq!(labels.get("app").map(String::as_str), Some("web"));
    let rule = &spec.rules[0];
    let source = &rule.from[0].source;
    assert_eq!(source.principals, ["cluster.local/ns/a/sa/b"]);
    assert_eq!(source.not_principals, ["*"]);
    assert_eq!(source.request_principals, ["x"]);
    assert_eq!(source.not_request_principals, ["y"]);
    assert_eq!(source.namespaces, ["a"]);
    assert_eq!(source.not_namespaces, ["b"]);
    assert_eq!(source.service_accounts, ["a/b"]);
    assert_eq!(source.not_service_accounts, ["c"]);
    assert_eq!(source.ip_blocks, ["10.0.0.0/8"]);
    assert_eq!(source.not_ip_blocks, ["10.1.0.0/16"]);
    assert_eq!(source.remote_ip_blocks, ["1.2.3.4"]);
    assert_eq!(source.not_remote_ip_blocks, ["5.6.7.8"]);
    let op = &rule.to[0].operation;
    assert_eq!(op.ports, ["80", "8080"], "integers are accepted as strings");
    assert_eq!(op.not_ports, ["9090"]);
    assert_eq!(
        (op.hosts.as_slice(), op.not_hosts.as_slice()),
        (&["h".to_owned()][..], &["nh".to_owned()][..])
    );
    assert_eq!(op.methods, ["GET"]);
    assert_eq!(op.not_methods, ["POST"]);
    assert_eq!(op.paths, ["/a"]);
    assert_eq!(op.not_paths, ["/b"]);
    let when = &rule.when[0];
    assert_eq!(when.key, "source.ip");
    assert_eq!(when.values, ["10.0.0.1"]);
    assert_eq!(when.not_values, ["10.0.0.2"]);
}

#[test]
fn authorization_policy_defaults_and_targets() {
    let p: AuthorizationPolicy =
        one("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n");
    assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
    assert_eq!(p.spec, AuthorizationPolicySpec::default());
    assert_eq!(p.spec.action, PolicyAction::Allow);

    let p: AuthorizationPolicy = one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: n}\n\
         spec:\n  action: CUSTOM\n  provider: {name: ext}\n  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: wp}\n\
         \x20 targetRefs: [{kind: Service, name: s}]\n  rules: [{}]\n",
    );
    assert_eq!(p.spec.action, PolicyAction::Custom);
    assert_eq!(p.spec.provider.as_ref().unwrap().name, "ext");
    assert_eq!(p.spec.target_ref.as_ref().unwrap().name, "wp");
    assert_eq!(p.spec.target_refs[0].kind, "Service");
    assert_eq!(p.spec.rules, [AuthorizationRule::default()]);
}

#[test]
fn unknown_fields_are_kept_with_their_paths() {
    let p: AuthorizationPolicy = one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n\
         spec:\n  futureField: 1\n  selector: {matchLabels: {a: b}, matchExpressions: []}\n\
         \x20 rules:\n  - from: [{source: {principal: [x]}}]\n    to: [{operation: {port: ['1']}}]\n\
         \x20   unless: []\n",
    );
    assert_eq!(
        p.unknown_fields,
        [
            "spec.futureField",
            "spec.selector.matchExpressions",
            "spec.rules.0.from.0.source.principal",
            "spec.rules.0.to.0.operation.port",
            "spec.rules.0.unless",
        ]
    );
    let pa: PeerAuthentication = one(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n\
         spec: {mtls: {mode: STRICT, extra: 1}}\n",
    );
    assert_eq!(pa.unknown_fields, ["spec.mtls.extra"]);
}

#[test]
fn peer_authentication_decodes() {
    let pa: PeerAuthentication = one(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n\
         \x20 portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    '9090': {mode: DISABLE}\n    '1': {}\n",
    );
    assert!(pa.unknown_fields.is_empty(), "{:?}", pa.unknown_fields);
    assert_eq!(pa.spec.mtls.as_ref().unwrap().mode, MtlsMode::Strict);
    let ports: Vec<(&str, MtlsMode)> = pa
        .spec
        .port_level_mtls
        .iter()
        .map(|(k, v)| (k.as_str(), v.mode))
        .collect();
    assert_eq!(
        ports,
        [
            ("1", MtlsMode::Unset),
            ("8080", MtlsMode::Permissive),
            ("9090", MtlsMode::Disable)
        ]
    );
    let pa: PeerAuthentication =
        one("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n");
    assert_eq!(pa.spec, PeerAuthenticationSpec::default());
}

#[test]
fn bad_documents_name_the_field() {
    let ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n";
    let pa = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\n";
    let cases = [
        (format!("{ap}spec: {{action: ALOW}}\n"), "spec.action: unknown variant `ALOW`"),
        (format!("{ap}spec: {{rules: {{}}}}\n"), "spec.rules: invalid type: map"),
        (
            format!("{ap}spec: {{rules: [{{when: [{{values: [a]}}]}}]}}\n"),
            "spec.rules[0].when[0]: missing field `key`",
        ),
        (
            format!("{ap}spec: {{rules: [{{to: [{{operation: {{ports: [[1]]}}}}]}}]}}\n"),
            "spec.rules[0].to[0].operation.ports[0]: invalid type: sequence, expected a string or an integer",
        ),
        (
            format!("{ap}spec: {{selector: {{matchLabels: [a]}}}}\n"),
            "spec.selector.matchLabels: invalid type: sequence",
        ),
        (format!("{pa}spec: {{mtls: {{mode: strict}}}}\n"), "spec.mtls.mode: unknown variant `strict`"),
        (
            format!("{pa}spec: {{portLevelMtls: {{80: STRICT}}}}\n"),
            "spec.portLevelMtls.80: invalid type: string \"STRICT\", expected struct PeerMtls",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, labels: [x]}\n"
                .to_owned(),
            "metadata.labels: invalid type: sequence",
        ),
    ];
    for (text, want) in cases {
        let err = parse_documents(&text).unwrap_err().to_string();
        assert!(err.contains(want), "{text}\n=> {err}");
    }
}

#[test]
fn serialises_with_type_and_round_trips() {
    let p: AuthorizationPolicy = one(FULL_POLICY);
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["apiVersion"], "security.istio.io/v1");
    assert_eq!(json["kind"], "AuthorizationPolicy");
    assert_eq!(json["spec"]["action"], "DENY");
    let back: AuthorizationPolicy = serde_json::from_value(json).unwrap();
    assert_eq!(back, p);
    let object = Object::AuthorizationPolicy(std::sync::Arc::new(p));
    assert_eq!(
        object.key().to_string(),
        "AuthorizationPolicy shop/allow-web"
    );
    assert_eq!(object.label("x"), None);
}
