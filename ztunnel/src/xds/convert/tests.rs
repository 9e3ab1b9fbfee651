use super::*;

// Each conversion with its own interner: these tests are about validation, not sharing.
fn workload(w: &pb::Workload) -> Result<Workload, String> {
    super::workload(w, &mut Interner::default())
}

fn address(name: &str, a: &pb::Address) -> Result<AddressResource, String> {
    super::address(name, a, &mut Interner::default())
}

const UID: &str = "Kubernetes//Pod/default/echo-1";

fn good_workload() -> pb::Workload {
    pb::Workload {
        uid: UID.into(),
        name: "echo-1".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1], Ipv6Addr::LOCALHOST.octets().to_vec()],
        network: "net1".into(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        service_account: "echo".into(),
        node: "node1".into(),
        canonical_name: "echo".into(),
        canonical_revision: "v1".into(),
        workload_name: "echo".into(),
        services: BTreeMap::from([(
            "default/echo.default.svc.cluster.local".into(),
            pb::PortList {
                ports: vec![
                    pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    },
                    pb::Port {
                        service_port: 81,
                        target_port: 0,
                        app_protocol: 0,
                    },
                ],
            },
        )]),
        authorization_policies: vec!["default/allow-echo".into()],
        status: pb::WorkloadStatus::Unhealthy as i32,
        capacity: Some(3),
        cluster_id: "c1".into(),
        locality: Some(pb::Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into(),
        }),
        ..Default::default()
    }
}

fn good_service() -> pb::Service {
    pb::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![
            pb::NetworkAddress {
                network: "".into(),
                address: vec![10, 96, 0, 10],
                length: None,
            },
            pb::NetworkAddress {
                network: "net1".into(),
                address: vec![10, 96, 0, 11],
                length: Some(32),
            },
        ],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".into()],
        load_balancing: Some(pb::LoadBalancing {
            routing_preference: vec![
                pb::load_balancing::Scope::Network as i32,
                pb::load_balancing::Scope::Node as i32,
            ],
            mode: pb::load_balancing::Mode::Failover as i32,
            health_policy: pb::load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ..Default::default()
    }
}

fn as_address(w: pb::Workload) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    }
}

fn svc_address(s: pb::Service) -> pb::Address {
    pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    }
}

#[test]
fn a_full_workload_converts_every_field() {
    let AddressResource::Workload(w) = address(UID, &as_address(good_workload())).unwrap() else {
        panic!("not a workload");
    };
    assert_eq!(&*w.uid, UID);
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    assert_eq!(
        w.addresses,
        [
            "10.0.0.1".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(&*w.network, "net1");
    assert_eq!(w.protocol, TunnelProtocol::Hbone);
    assert_eq!(w.status, HealthStatus::Unhealthy);
    assert_eq!(w.capacity, 3);
    assert_eq!(&*w.node, "node1");
    assert_eq!(
        (
            &*w.canonical_name,
            &*w.canonical_revision,
            &*w.workload_name
        ),
        ("echo", "v1", "echo")
    );
    let ports = &w.services["default/echo.default.svc.cluster.local"];
    assert!(
        w.services
            .get("default/other.default.svc.cluster.local")
            .is_none()
    );
    assert_eq!(ports, &PortMap::from([(80, 8080), (81, 0)]));
    assert_eq!(&*w.authorization_policies[0], "default/allow-echo");
    assert_eq!(w.authorization_policies.len(), 1);
    assert_eq!(
        *w.locality,
        Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: "s".into()
        }
    );
    assert_eq!(&*w.cluster_id, "c1");
}

#[test]
fn workload_defaults_match_istiod_elisions() {
    let w = workload(&pb::Workload {
        uid: "u".into(),
        name: "p".into(),
        namespace: "ns".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/ns/sa/default"
    );
    assert_eq!(w.protocol, TunnelProtocol::Tcp);
    assert_eq!(w.status, HealthStatus::Healthy);
    assert_eq!(w.capacity, 1);
    assert!(w.addresses.is_empty() && w.services.is_empty());
    let td = workload(&pb::Workload {
        trust_domain: "example.org".into(),
        ..good_workload()
    })
    .unwrap();
    assert_eq!(td.identity.trust_domain(), "example.org");
}

#[test]
fn a_full_service_converts_every_field() {
    let name = "default/echo.default.svc.cluster.local";
    let AddressResource::Service(s) = address(name, &svc_address(good_service())).unwrap() else {
        panic!("not a service");
    };
    assert_eq!(s.key(), name);
    assert_eq!(s.vips[0].to_string(), "/10.96.0.10");
    assert_eq!(s.vips[1].to_string(), "net1/10.96.0.11");
    assert_eq!(s.ports, PortMap::from([(80, 8080)]));
    assert_eq!(s.subject_alt_names[0].service_account(), "echo");
    assert_eq!(
        s.load_balancing,
        LoadBalancing {
            routing_preference: vec![Scope::Network, Scope::Node],
            mode: LbMode::Failover,
            health_policy: HealthPolicy::AllowAll,
        }
    );
    // No load_balancing: any healthy endpoint.
    let plain = service(&pb::Service {
        load_balancing: None,
        ..good_service()
    })
    .unwrap();
    assert_eq!(plain.load_balancing, LoadBalancing::default());
}

#[test]
fn duplicate_service_ports_keep_the_first_mapping() {
    let p = |sp, tp| pb::Port {
        service_port: sp,
        target_port: tp,
        app_protocol: 0,
    };
    let s = service(&pb::Service {
        ports: vec![p(53, 5353), p(53, 53)],
        ..good_service()
    })
    .unwrap();
    assert_eq!(s.ports, PortMap::from([(53, 5353)]));
}

type WorkloadEdit = fn(&mut pb::Workload);

#[test]
fn bad_workloads_are_rejected_naming_the_field() {
    let port = |sp, tp| pb::PortList {
        ports: vec![pb::Port {
            service_port: sp,
            target_port: tp,
            app_protocol: 0,
        }],
    };
    let cases: Vec<(WorkloadEdit, &str)> = vec![
        (|w| w.uid.clear(), "uid: must not be empty"),
        (|w| w.name.clear(), "name: must not be empty"),
        (|w| w.namespace.clear(), "namespace: must not be empty"),
        (|w| w.namespace = "Bad NS".into(), "identity: "),
        (|w| w.service_account = "a/b".into(), "identity: "),
        (|w| w.trust_domain = "BAD!".into(), "identity: "),
        (
            |w| w.addresses[1] = vec![1, 2, 3],
            "addresses[1]: an ip address is 4 or 16 bytes, got 3",
        ),
        (
            |w| w.addresses.push(vec![]),
            "addresses[2]: an ip address is 4 or 16 bytes, got 0",
        ),
        (
            |w| w.tunnel_protocol = pb::TunnelProtocol::LegacyIstioMtls as i32,
            "tunnel_protocol: LEGACY_ISTIO_MTLS is not supported",
        ),
        (
            |w| w.tunnel_protocol = 7,
            "tunnel_protocol: unknown value 7",
        ),
        (|w| w.status = 9, "status: unknown value 9"),
        (|w| w.capacity = Some(0), "capacity: must be at least 1"),
        (
            |w| w.authorization_policies.push("nons".into()),
            "authorization_policies[1]: \"nons\" is not <namespace>/<name>",
        ),
        (
            |w| w.authorization_policies.push("/x".into()),
            "authorization_policies[1]",
        ),
    ];
    for (edit, want) in cases {
        let mut w = good_workload();
        edit(&mut w);
        let err = workload(&w).unwrap_err();
        assert!(err.contains(want), "got: {err}\nwant: {want}");
    }
    let services: Vec<(pb::PortList, &str, &str)> = vec![
        (
            port(0, 80),
            "k/h",
            "services[\"k/h\"].ports[0].service_port: 0 is not a port",
        ),
        (port(70000, 80), "k/h", "service_port: 70000 is not a port"),
        (port(80, 65536), "k/h", "target_port: 65536 is not a port"),
        (
            port(80, 80),
            "nohost",
            "services[\"nohost\"]: key is not <namespace>/<hostname>",
        ),
    ];
    for (list, key, want) in services {
        let mut w = good_workload();
        w.services = BTreeMap::from([(key.to_string(), list)]);
        let err = workload(&w).unwrap_err();
        assert!(err.contains(want), "got: {err}\nwant: {want}");
    }
}

type ServiceEdit = fn(&mut pb::Service);

#[test]
fn bad_services_are_rejected_naming_the_field() {
    let cases: Vec<(ServiceEdit, &str)> = vec![
        (|s| s.name.clear(), "name: must not be empty"),
        (|s| s.namespace.clear(), "namespace: must not be empty"),
        (|s| s.hostname.clear(), "hostname: must not be empty"),
        (
            |s| s.addresses[1].address = vec![1; 5],
            "addresses[1]: an ip address is 4 or 16 bytes, got 5",
        ),
        (
            |s| s.addresses[0].length = Some(24),
            "addresses[0]: cidr vip 10.96.0.10/24 is not supported (only /32)",
        ),
        (
            |s| s.ports[0].service_port = 0,
            "ports[0].service_port: 0 is not a port",
        ),
        (
            |s| s.ports[0].target_port = 99999,
            "ports[0].target_port: 99999 is not a port",
        ),
        (
            |s| s.subject_alt_names.push("not-spiffe".into()),
            "subject_alt_names[1]: ",
        ),
        (
            |s| s.load_balancing.as_mut().unwrap().routing_preference[1] = 42,
            "load_balancing.routing_preference[1]: unknown scope 42",
        ),
        (
            |s| s.load_balancing.as_mut().unwrap().routing_preference[0] = 0,
            "load_balancing.routing_preference[0]: unknown scope 0",
        ),
        (
            |s| s.load_balancing.as_mut().unwrap().mode = 9,
            "load_balancing.mode: unknown value 9",
        ),
        (
            |s| s.load_balancing.as_mut().unwrap().health_policy = 7,
            "load_balancing.health_policy: unknown value 7",
        ),
    ];
    for (edit, want) in cases {
        let mut s = good_service();
        edit(&mut s);
        let err = service(&s).unwrap_err();
        assert!(err.contains(want), "got: {err}\nwant: {want}");
    }
}

#[test]
fn resource_names_must_match_and_errors_name_the_resource() {
    let cases: Vec<(&str, pb::Address, &str)> = vec![
        (
            "other",
            as_address(good_workload()),
            "workload \"other\": resource name does not match uid",
        ),
        (
            "default/other",
            svc_address(good_service()),
            "service \"default/other\": resource name does not match",
        ),
        (
            "x",
            pb::Address { r#type: None },
            "address \"x\": type: neither workload nor service",
        ),
        (
            UID,
            as_address(pb::Workload {
                capacity: Some(0),
                ..good_workload()
            }),
            "workload \"Kubernetes//Pod/default/echo-1\": capacity",
        ),
        (
            "default/echo.default.svc.cluster.local",
            svc_address(pb::Service {
                name: String::new(),
                ..good_service()
            }),
            "service \"default/echo.default.svc.cluster.local\": name: must not be empty",
        ),
    ];
    for (name, a, want) in cases {
        let err = address(name, &a).unwrap_err();
        assert!(err.contains(want), "got: {err}\nwant: {want}");
    }
}
