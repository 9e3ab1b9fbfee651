//! Services, endpoints and per-endpoint ports.

use super::*;
use mesh_proto::workload::{AppProtocol, IpFamilies, LoadBalancing, load_balancing};

fn svc(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{{spec}}}\n"
    )
}

const WEB_SPEC: &str = "clusterIP: 10.96.0.10, selector: {app: web}, ports: [\
    {name: http, port: 80, targetPort: http, appProtocol: http}, \
    {name: admin, port: 90, targetPort: 9090}, \
    {name: plain, port: 100}, \
    {name: grpc, port: 110, targetPort: grpc, appProtocol: grpc}]";

#[test]
fn service_and_endpoint_ports() {
    let text = [
        svc("shop", "web", WEB_SPEC),
        pod("shop", "a", "app: web", "", ""),
        // Declares `grpc` too, so it serves one more port than `a`.
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop, labels: {app: web, x: y}}\n\
         spec: {containers: [{name: c, ports: [{name: http, containerPort: 8081}, {name: grpc, containerPort: 7070}]}]}\n\
         status: {podIP: 10.0.0.2}\n"
            .to_owned(),
        pod("shop", "other", "app: api", "", ""),
        pod("elsewhere", "c", "app: web", "", ""),
    ]
    .concat();
    let t = run(&text);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let key = "shop/web.shop.svc.cluster.local";
    let port = |service_port, target_port, proto: AppProtocol| Port {
        service_port,
        target_port,
        app_protocol: proto as i32,
    };
    let want = Service {
        name: "web".into(),
        namespace: "shop".into(),
        hostname: "web.shop.svc.cluster.local".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: ip("10.96.0.10"),
            length: None,
        }],
        ports: vec![
            port(80, 0, AppProtocol::Http11),
            port(90, 9090, AppProtocol::Unknown),
            port(100, 100, AppProtocol::Unknown),
            port(110, 0, AppProtocol::Grpc),
        ],
        ..Service::default()
    };
    assert_eq!(service(&t, key), &want);
    assert_eq!(aliases(&t.addresses[key]), ["/10.96.0.10"]);
    let a = &workload(&t, "shop", "a").services;
    let want_a = PortList {
        ports: vec![
            port(80, 8080, AppProtocol::Http11),
            port(90, 9090, AppProtocol::Unknown),
            port(100, 100, AppProtocol::Unknown),
        ],
    };
    assert_eq!(a, &BTreeMap::from([(key.to_owned(), want_a)]));
    let b = &workload(&t, "shop", "b").services[key];
    let got: Vec<(u32, u32)> = b
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(got, [(80, 8081), (90, 9090), (100, 100), (110, 7070)]);
    assert!(workload(&t, "shop", "other").services.is_empty());
    assert!(
        workload(&t, "elsewhere", "c").services.is_empty(),
        "other namespace"
    );
}

#[test]
fn headless_selectorless_and_external_name_services() {
    let text = [
        svc(
            "shop",
            "db",
            "clusterIP: None, selector: {app: db}, ports: [{port: 5432}]",
        ),
        svc(
            "shop",
            "manual",
            "clusterIP: 10.96.0.11, ports: [{port: 80}]",
        ),
        svc(
            "shop",
            "ext",
            "type: ExternalName, externalName: example.com",
        ),
        svc(
            "shop",
            "all",
            "clusterIP: 10.96.0.12, selector: {}, ports: [{port: 80}]",
        ),
        pod("shop", "db-0", "app: db", "", ""),
    ]
    .concat();
    let t = run(&text);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let db = service(&t, "shop/db.shop.svc.cluster.local");
    assert!(db.addresses.is_empty(), "headless: no VIP");
    assert!(aliases(&t.addresses["shop/db.shop.svc.cluster.local"]).is_empty());
    let services = &workload(&t, "shop", "db-0").services;
    let keys: Vec<&String> = services.keys().collect();
    assert_eq!(
        keys,
        ["shop/db.shop.svc.cluster.local"],
        "empty selector selects nothing"
    );
    assert_eq!(
        services["shop/db.shop.svc.cluster.local"].ports[0].target_port,
        5432
    );
    assert!(
        t.addresses
            .contains_key("shop/manual.shop.svc.cluster.local")
    );
    assert!(!t.addresses.contains_key("shop/ext.shop.svc.cluster.local"));
}

#[test]
fn all_vips_dual_stack_and_domain_suffix() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
        spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::a'], externalIPs: [192.0.2.1],\n\
        \x20 ipFamilies: [IPv4, IPv6]}\n\
        status: {loadBalancer: {ingress: [{ip: 198.51.100.1}, {hostname: lb.example.com}]}}\n";
    let cfg = TranslateConfig {
        domain_suffix: "corp.local".into(),
        network: "net".into(),
        ..TranslateConfig::default()
    };
    let t = run_with(text, &cfg);
    let key = "shop/web.shop.svc.corp.local";
    assert_eq!(
        aliases(&t.addresses[key]),
        [
            "net/10.96.0.10",
            "net/fd00::a",
            "net/192.0.2.1",
            "net/198.51.100.1"
        ]
    );
    assert_eq!(service(&t, key).ip_families, IpFamilies::Dual as i32);
}

#[test]
fn bad_ports_and_addresses_are_problems() {
    let text = [
        svc(
            "shop",
            "web",
            "clusterIP: 10.96.0.300, selector: {app: web}, ports: [{port: 0}, {port: 70000}, \
             {port: 80, targetPort: 0}, {port: 81, targetPort: 65536}, {port: 82, targetPort: ''}]",
        ),
        pod("shop", "a", "app: web", "", ""),
    ]
    .concat();
    let t = run(&text);
    assert_eq!(
        t.problems,
        [
            "Service shop/web: spec.ports[0].port 0 is not a valid port; port skipped",
            "Service shop/web: spec.ports[1].port 70000 is not a valid port; port skipped",
            "Service shop/web: spec.ports[2].targetPort 0 is not a valid port; port skipped",
            "Service shop/web: spec.ports[3].targetPort 65536 is not a valid port; port skipped",
            "Service shop/web: service address \"10.96.0.300\" is not an IP address; ignored",
        ]
    );
    let s = service(&t, "shop/web.shop.svc.cluster.local");
    assert!(s.addresses.is_empty());
    let ports: Vec<(u32, u32)> = s
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(ports, [(82, 82)]);
}

#[test]
fn load_balancing_table() {
    use load_balancing::{HealthPolicy, Mode, Scope as S};
    let lb = |scopes: &[S], mode: Mode, health: HealthPolicy| {
        Some(LoadBalancing {
            routing_preference: scopes.iter().map(|s| *s as i32).collect(),
            mode: mode as i32,
            health_policy: health as i32,
        })
    };
    let close = [S::Network, S::Region, S::Zone, S::Subzone];
    let cases = [
        ("", None),
        (
            "trafficDistribution: PreferClose",
            lb(&close, Mode::Failover, HealthPolicy::OnlyHealthy),
        ),
        (
            "trafficDistribution: PreferSameZone",
            lb(&close, Mode::Failover, HealthPolicy::OnlyHealthy),
        ),
        (
            "trafficDistribution: PreferSameNode",
            lb(
                &[S::Network, S::Region, S::Zone, S::Subzone, S::Node],
                Mode::Failover,
                HealthPolicy::OnlyHealthy,
            ),
        ),
        (
            "internalTrafficPolicy: Local",
            lb(&[S::Node], Mode::Strict, HealthPolicy::OnlyHealthy),
        ),
        (
            "internalTrafficPolicy: Local, trafficDistribution: PreferClose",
            lb(&[S::Node], Mode::Strict, HealthPolicy::OnlyHealthy),
        ),
        ("trafficDistribution: Unknown", None),
        (
            "publishNotReadyAddresses: true",
            lb(&[], Mode::UnspecifiedMode, HealthPolicy::AllowAll),
        ),
    ];
    for (spec, want) in cases {
        let t = run(&svc("shop", "web", spec));
        assert_eq!(
            service(&t, "shop/web.shop.svc.cluster.local").load_balancing,
            want,
            "{spec}"
        );
    }
}
