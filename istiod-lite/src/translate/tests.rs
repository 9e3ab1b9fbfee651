//! Translation tests: YAML in, expected protos written out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_core::k8s::{Object, parse_documents};
use mesh_proto::security::{
    Action, Address as CidrAddr, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch,
    StringMatch, string_match::MatchType,
};
use mesh_proto::workload::{
    Locality, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, WorkloadStatus,
    WorkloadType, address,
};

use super::*;

mod authz;
mod services;

fn run(yaml: &str) -> Translated {
    run_with(yaml, &TranslateConfig::default())
}

fn run_with(yaml: &str, cfg: &TranslateConfig) -> Translated {
    let parsed = parse_documents(yaml).unwrap();
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    translate(&Snapshot::from_objects(parsed.objects), cfg)
}

fn workload<'a>(t: &'a Translated, ns: &str, name: &str) -> &'a Workload {
    let key = format!("Kubernetes//Pod/{ns}/{name}");
    match t.addresses.get(&key).and_then(|a| a.r#type.as_ref()) {
        Some(address::Type::Workload(w)) => w,
        other => panic!(
            "no workload {key}: {other:?}; have {:?}",
            t.addresses.keys()
        ),
    }
}

fn service<'a>(t: &'a Translated, key: &str) -> &'a Service {
    match t.addresses.get(key).and_then(|a| a.r#type.as_ref()) {
        Some(address::Type::Service(s)) => s,
        other => panic!("no service {key}: {other:?}"),
    }
}

fn ip(s: &str) -> Vec<u8> {
    ip_bytes(s.parse::<IpAddr>().unwrap())
}

fn ns(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n")
}

/// A running, ready pod on n1 with IP 10.0.0.1; `labels`, `spec` and `status` are inline YAML
/// map entries (a `phase` or `podIP` in `status` replaces the default).
fn pod(ns: &str, name: &str, labels: &str, spec: &str, status: &str) -> String {
    let mut status = if status.is_empty() {
        String::new()
    } else {
        format!(", {status}")
    };
    if !status.contains("phase") {
        status += ", phase: Running";
    }
    if !status.contains("podIP") {
        status += ", podIP: 10.0.0.1";
    }
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}], {spec}}}\n\
         status: {{conditions: [{{type: Ready, status: 'True'}}]{status}}}\n"
    )
}

const FULL_POD: &str = "---
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {topology.kubernetes.io/region: r1, topology.kubernetes.io/zone: z1, topology.istio.io/subzone: s1}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-5d8f9-abcde
  namespace: shop
  labels: {app: web, version: v2, pod-template-hash: 5d8f9}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d8f9, uid: u, controller: true}]
spec:
  nodeName: n1
  serviceAccountName: web-sa
  containers: [{name: app}]
status:
  phase: Running
  podIPs: [{ip: 10.0.0.7}, {ip: 'fd00::7'}]
  conditions: [{type: Ready, status: 'True'}]
";

#[test]
fn enrolled_pod_is_a_full_workload() {
    let t = run(&format!("{}{FULL_POD}", ns("shop", true)));
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let want = Workload {
        uid: "Kubernetes//Pod/shop/web-5d8f9-abcde".into(),
        name: "web-5d8f9-abcde".into(),
        namespace: "shop".into(),
        addresses: vec![ip("10.0.0.7"), ip("fd00::7")],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        service_account: "web-sa".into(),
        node: "n1".into(),
        canonical_name: "web".into(),
        canonical_revision: "v2".into(),
        workload_type: WorkloadType::Pod as i32,
        workload_name: "web".into(),
        status: WorkloadStatus::Healthy as i32,
        cluster_id: "Kubernetes".into(),
        locality: Some(Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: "s1".into(),
        }),
        ..Workload::default()
    };
    assert_eq!(workload(&t, "shop", "web-5d8f9-abcde"), &want);
    let resource = &t.addresses["Kubernetes//Pod/shop/web-5d8f9-abcde"];
    assert_eq!(aliases(resource), ["/10.0.0.7", "/fd00::7"]);
}

#[test]
fn config_sets_uid_trust_domain_and_network() {
    let cfg = TranslateConfig {
        trust_domain: "example.org".into(),
        cluster_id: "c2".into(),
        network: "net1".into(),
        ..TranslateConfig::default()
    };
    let t = run_with(&pod("shop", "p", "", "", ""), &cfg);
    let resource = &t.addresses["c2//Pod/shop/p"];
    let Some(address::Type::Workload(w)) = &resource.r#type else {
        panic!("{resource:?}")
    };
    assert_eq!(
        (w.trust_domain.as_str(), w.network.as_str()),
        ("example.org", "net1")
    );
    assert_eq!(w.cluster_id, "c2");
    assert_eq!(w.service_account, "default");
    assert_eq!(aliases(resource), ["net1/10.0.0.1"]);
}

#[test]
fn tunnel_and_network_mode_table() {
    let cases = [
        (
            "ambient namespace",
            true,
            "",
            "",
            TunnelProtocol::Hbone,
            NetworkMode::Standard,
        ),
        (
            "plain namespace",
            false,
            "",
            "",
            TunnelProtocol::None,
            NetworkMode::Standard,
        ),
        (
            "pod label",
            false,
            "istio.io/dataplane-mode: ambient",
            "",
            TunnelProtocol::Hbone,
            NetworkMode::Standard,
        ),
        (
            "pod opt-out",
            true,
            "istio.io/dataplane-mode: none",
            "",
            TunnelProtocol::None,
            NetworkMode::Standard,
        ),
        (
            "host network",
            true,
            "",
            "hostNetwork: true",
            TunnelProtocol::None,
            NetworkMode::HostNetwork,
        ),
    ];
    for (name, ambient, labels, spec, tunnel, mode) in cases {
        let t = run(&format!(
            "{}{}",
            ns("shop", ambient),
            pod("shop", "p", labels, spec, "")
        ));
        let w = workload(&t, "shop", "p");
        assert_eq!(w.tunnel_protocol, tunnel as i32, "{name}");
        assert_eq!(w.network_mode, mode as i32, "{name}");
        let want_aliases = if mode == NetworkMode::HostNetwork {
            0
        } else {
            1
        };
        let resource = &t.addresses[&w.uid];
        assert_eq!(
            aliases(resource).len(),
            want_aliases,
            "{name}: host network is not indexed by IP"
        );
        assert_eq!(w.addresses, [ip("10.0.0.1")], "{name}");
    }
}

#[test]
fn status_table() {
    let cases = [
        (
            "conditions: [{type: Ready, status: 'True'}]",
            "",
            WorkloadStatus::Healthy,
        ),
        (
            "conditions: [{type: Ready, status: 'False'}]",
            "",
            WorkloadStatus::Unhealthy,
        ),
        (
            "conditions: [{type: PodScheduled, status: 'True'}]",
            "",
            WorkloadStatus::Unhealthy,
        ),
        ("conditions: []", "", WorkloadStatus::Unhealthy),
        (
            "conditions: [{type: Ready, status: 'True'}]",
            "deletionTimestamp: '2024-01-01T00:00:00Z'",
            WorkloadStatus::Unhealthy,
        ),
    ];
    for (status, meta, want) in cases {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop, {meta}}}\n\
             status: {{podIP: 10.0.0.1, {status}}}\n"
        );
        let t = run(&text);
        assert_eq!(
            workload(&t, "shop", "p").status,
            want as i32,
            "{status} {meta}"
        );
    }
}

#[test]
fn skipped_pods_and_bad_ips() {
    let text = [
        pod("shop", "done", "", "", "phase: Succeeded"),
        pod("shop", "failed", "", "", "phase: Failed"),
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: noip, namespace: shop}\n".to_owned(),
        pod("shop", "empty", "", "", "podIP: ''"),
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: shop}\nstatus: {podIP: 10.0.0.300}\n".to_owned(),
        pod("shop", "live", "", "", ""),
    ]
    .concat();
    let t = run(&text);
    let keys: Vec<&String> = t.addresses.keys().collect();
    assert_eq!(keys, ["Kubernetes//Pod/shop/live"]);
    assert_eq!(
        t.problems,
        ["Pod shop/bad: pod IP \"10.0.0.300\" is not an IP address; pod skipped"]
    );
}

#[test]
fn workload_name_and_canonical_labels_table() {
    let owner = |kind: &str, name: &str| {
        format!(
            "ownerReferences: [{{apiVersion: v1, kind: {kind}, name: {name}, uid: u, controller: true}}]"
        )
    };
    let cases = [
        ("", String::new(), "p", "p", "latest"),
        (
            "pod-template-hash: abc",
            owner("ReplicaSet", "web-abc"),
            "web",
            "web",
            "latest",
        ),
        (
            "",
            owner("ReplicaSet", "web-abc"),
            "web-abc",
            "web-abc",
            "latest",
        ),
        (
            "",
            owner("Job", "backup-28374650"),
            "backup",
            "backup",
            "latest",
        ),
        ("", owner("Job", "migrate"), "migrate", "migrate", "latest"),
        ("", owner("StatefulSet", "db"), "db", "db", "latest"),
        ("app: a, version: v1", String::new(), "p", "a", "v1"),
        (
            "app: a, app.kubernetes.io/name: k, app.kubernetes.io/version: kv",
            String::new(),
            "p",
            "k",
            "kv",
        ),
        (
            "app: a, service.istio.io/canonical-name: c, service.istio.io/canonical-revision: cr",
            String::new(),
            "p",
            "c",
            "cr",
        ),
    ];
    for (labels, meta, workload_name, canonical, revision) in cases {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: shop, labels: {{{labels}}}, {meta}}}\n\
             status: {{podIP: 10.0.0.1}}\n"
        );
        let t = run(&text);
        let w = workload(&t, "shop", "p");
        let got = (
            w.workload_name.as_str(),
            w.canonical_name.as_str(),
            w.canonical_revision.as_str(),
        );
        assert_eq!(got, (workload_name, canonical, revision), "{labels} {meta}");
    }
}

#[test]
fn missing_node_or_node_without_topology_has_no_locality() {
    let text = format!(
        "{}---\napiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\n",
        pod("shop", "p", "", "", "")
    );
    assert_eq!(workload(&run(&text), "shop", "p").locality, None);
    assert_eq!(
        workload(&run(&pod("shop", "p", "", "", "")), "shop", "p").locality,
        None
    );
}

#[test]
fn aliases_of_services_and_empty_resources() {
    let svc = Address {
        r#type: Some(address::Type::Service(Service {
            addresses: vec![NetworkAddress {
                network: "n".into(),
                address: ip("10.96.0.1"),
                length: None,
            }],
            ..Service::default()
        })),
    };
    assert_eq!(aliases(&svc), ["n/10.96.0.1"]);
    assert!(aliases(&Address::default()).is_empty());
}

#[test]
fn empty_snapshot_translates_to_nothing() {
    let t = translate(&Snapshot::default(), &TranslateConfig::default());
    assert_eq!(t, Translated::default());
}

/// 10 000 pods in 100 namespaces, 1 000 services (10 per namespace, each selecting 10 pods),
/// policies; prints the release-mode figure. Run:
/// `cargo test -p istiod-lite --release translate::tests::scale -- --ignored --nocapture`.
#[test]
#[ignore]
fn scale_10k_pods_1k_services() {
    use mesh_core::k8s::k8s_openapi::api::core::v1 as core;
    let mut objects = Vec::new();
    for n in 0..100 {
        let text = ns(&format!("ns{n}"), n % 2 == 0);
        objects.extend(parse_documents(&text).unwrap().objects);
        for s in 0..10 {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{s}, namespace: ns{n}}}\n\
                 spec: {{clusterIP: 10.96.{n}.{s}, selector: {{app: app{s}}}, ports: [{{port: 80, targetPort: http}}]}}\n\
                 ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: p{s}, namespace: ns{n}}}\n\
                 spec: {{selector: {{matchLabels: {{app: app{s}}}}}, rules: [{{from: [{{source: {{namespaces: [ns1]}}}}]}}]}}\n"
            );
            objects.extend(parse_documents(&text).unwrap().objects);
        }
    }
    let template: core::Pod = {
        let parsed = parse_documents(&pod("x", "x", "", "", "")).unwrap();
        core::Pod::clone(mesh_core::k8s::Typed::from_object(&parsed.objects[0]).unwrap())
    };
    for i in 0..10_000u32 {
        let mut p = template.clone();
        p.metadata.name = Some(format!("pod{i}"));
        p.metadata.namespace = Some(format!("ns{}", i % 100));
        p.metadata.labels = Some(BTreeMap::from([(
            "app".into(),
            format!("app{}", (i / 100) % 10),
        )]));
        let status = p.status.as_mut().unwrap();
        status.pod_ip = Some(format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255));
        objects.push(Object::Pod(std::sync::Arc::new(p)));
    }
    let snapshot = Snapshot::from_objects(objects);
    let cfg = TranslateConfig::default();
    let mut best = std::time::Duration::MAX;
    let mut t = Translated::default();
    for _ in 0..5 {
        drop(std::mem::take(&mut t)); // not part of the measurement
        let start = std::time::Instant::now();
        t = translate(&snapshot, &cfg);
        best = best.min(start.elapsed());
    }
    assert_eq!(t.addresses.len(), 11_000);
    let w = workload(&t, "ns3", "pod3");
    assert_eq!(w.services.len(), 1);
    assert_eq!(w.authorization_policies.len(), 1);
    println!("translate: 10000 pods, 1000 services, 1000 policies: best of 5 = {best:?}");
}
