//! Wire-compatibility tests against golden bytes written by hand from the field numbers in
//! `istio-ambient-protocol.md` (§4.2, §5.3–§5.5, §6.2).
//!
//! Every expected byte string below is spelled out literally: tag byte(s) = (field << 3) | wire
//! type, then a varint or a length prefix and the payload. None is produced by our own encoder, so
//! a wrong field number, type or packing in a `.proto` file makes these tests fail. Fields are
//! written in ascending field-number order, which is what protobuf encoders (Go's included) emit.

use std::collections::BTreeMap;
use std::fmt::Debug;

use mesh_proto::any::{ADDRESS_TYPE_URL, AnyError, unpack};
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status,
};
use mesh_proto::security::{
    self, Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
    string_match::MatchType,
};
use mesh_proto::workload::{
    self, AppProtocol, ApplicationTunnel, GatewayAddress, IpFamilies, LoadBalancing, Locality,
    NamespacedHostname, NetworkAddress, NetworkMode, Port, PortList, Service, TunnelProtocol,
    Visibility, WeightedWaypoint, Workload, WorkloadStatus, WorkloadType, application_tunnel,
    gateway_address, load_balancing,
};
use mesh_proto::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo,
    WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prost::Message;
use prost_types::{Any, Struct, Value, value::Kind};

/// Concatenates literal byte pieces into one golden buffer.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Asserts both directions: `msg` encodes to exactly `golden`, and `golden` decodes to `msg`.
fn assert_wire<M: Message + Default + PartialEq + Debug>(msg: &M, golden: &[u8]) {
    let encoded = msg.encode_to_vec();
    assert_eq!(
        encoded, golden,
        "encoding differs from golden bytes\n ours: {encoded:02x?}\n want: {golden:02x?}"
    );
    assert_eq!(msg.encoded_len(), golden.len());
    let decoded = M::decode(golden).expect("golden bytes must decode");
    assert_eq!(&decoded, msg);
}

fn s(v: &str) -> String {
    v.to_owned()
}

fn string_value(v: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s(v))),
    }
}

// === istio.workload ===

fn sample_workload() -> Workload {
    let port = Port {
        service_port: 80,
        target_port: 8080,
        app_protocol: AppProtocol::Http11 as i32,
    };
    Workload {
        uid: s("u1"),
        name: s("web"),
        namespace: s("ns"),
        addresses: vec![
            vec![10, 0, 0, 1],
            vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ],
        tunnel_protocol: TunnelProtocol::Hbone as i32,
        service_account: s("sa"),
        node: s("n1"),
        workload_type: WorkloadType::Pod as i32,
        authorization_policies: vec![s("ns/p")],
        status: WorkloadStatus::Unhealthy as i32,
        services: BTreeMap::from([(s("ns/s"), PortList { ports: vec![port] })]),
        application_tunnel: Some(ApplicationTunnel {
            protocol: application_tunnel::Protocol::Proxy as i32,
            port: 0,
        }),
        locality: Some(Locality {
            region: s("r"),
            ..Default::default()
        }),
        network_mode: NetworkMode::HostNetwork as i32,
        capacity: Some(5),
        ..Default::default()
    }
}

#[rustfmt::skip]
fn sample_workload_golden() -> Vec<u8> {
    cat(&[
        &[0x0a, 0x03], b"web",                  // 1 name
        &[0x12, 0x02], b"ns",                   // 2 namespace
        &[0x1a, 0x04, 10, 0, 0, 1],             // 3 addresses: IPv4, 4 raw bytes
        &[0x1a, 0x10, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // 3 addresses: IPv6
        &[0x28, 0x01],                          // 5 tunnel_protocol = HBONE
        &[0x3a, 0x02], b"sa",                   // 7 service_account
        &[0x4a, 0x02], b"n1",                   // 9 node
        &[0x60, 0x02],                          // 12 workload_type = POD
        &[0x82, 0x01, 0x04], b"ns/p",           // 16 authorization_policies (2-byte tag)
        &[0x88, 0x01, 0x01],                    // 17 status = UNHEALTHY
        &[0xa2, 0x01, 0x02], b"u1",             // 20 uid (2-byte tag)
        // 22 services: one map entry {1 key, 2 value PortList}, 17 bytes.
        &[0xb2, 0x01, 0x11],
        &[0x0a, 0x04], b"ns/s",                 //   key
        &[0x12, 0x09],                          //   value: PortList, 9 bytes
        &[0x0a, 0x07],                          //     1 ports: Port, 7 bytes
        &[0x08, 0x50],                          //       1 service_port = 80
        &[0x10, 0x90, 0x3f],                    //       2 target_port = 8080
        &[0x18, 0x01],                          //       3 app_protocol = HTTP11
        &[0xba, 0x01, 0x02, 0x08, 0x01],        // 23 application_tunnel {1 protocol = PROXY}
        &[0xc2, 0x01, 0x03, 0x0a, 0x01], b"r",  // 24 locality {1 region}
        &[0xc8, 0x01, 0x01],                    // 25 network_mode = HOST_NETWORK
        &[0xda, 0x01, 0x02, 0x08, 0x05],        // 27 capacity: UInt32Value {1 value = 5}
    ])
}

#[test]
fn workload_matches_golden_bytes() {
    assert_wire(&sample_workload(), &sample_workload_golden());
}

#[test]
fn workload_address_oneof_matches_golden_bytes() {
    let addr = workload::Address {
        r#type: Some(workload::address::Type::Workload(Workload {
            uid: s("u1"),
            ..Default::default()
        })),
    };
    // Address {1 workload {20 uid "u1"}}
    #[rustfmt::skip]
    let golden = cat(&[&[0x0a, 0x05, 0xa2, 0x01, 0x02], b"u1"]);
    assert_wire(&addr, &golden);
}

fn sample_service() -> Service {
    Service {
        name: s("s"),
        namespace: s("ns"),
        hostname: s("s.ns.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: s("net1"),
            address: vec![10, 96, 0, 10],
            length: None,
        }],
        ports: vec![
            Port {
                service_port: 80,
                target_port: 0,
                app_protocol: AppProtocol::Http2 as i32,
            },
            Port {
                service_port: 443,
                target_port: 8443,
                app_protocol: AppProtocol::Tls as i32,
            },
        ],
        waypoint: Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: s("ns"),
                hostname: s("wp"),
            })),
            hbone_mtls_port: 15008,
        }),
        load_balancing: Some(LoadBalancing {
            routing_preference: vec![
                load_balancing::Scope::Node as i32,
                load_balancing::Scope::Zone as i32,
            ],
            mode: load_balancing::Mode::Failover as i32,
            health_policy: load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ip_families: IpFamilies::Dual as i32,
        canonical: true,
        ingress_use_waypoint: true,
        weighted_waypoints: vec![WeightedWaypoint {
            destination: Some(GatewayAddress {
                destination: Some(gateway_address::Destination::Address(NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 9],
                    length: None,
                })),
                hbone_mtls_port: 0,
            }),
            weight: 3,
        }],
        visibility: Visibility::Namespace as i32,
        ..Default::default()
    }
}

#[test]
fn service_matches_golden_bytes() {
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x0a, 0x01], b"s",                           // 1 name
        &[0x12, 0x02], b"ns",                          // 2 namespace
        &[0x1a, 0x16], b"s.ns.svc.cluster.local",      // 3 hostname (22 bytes)
        &[0x22, 0x0c],                                 // 4 addresses: NetworkAddress, 12 bytes
        &[0x0a, 0x04], b"net1",                        //   1 network
        &[0x12, 0x04, 10, 96, 0, 10],                  //   2 address
        &[0x2a, 0x04, 0x08, 0x50, 0x18, 0x02],         // 5 ports {80, target 0, HTTP2}
        &[0x2a, 0x08, 0x08, 0xbb, 0x03, 0x10, 0xfb, 0x41, 0x18, 0x05], // 5 ports {443, 8443, TLS}
        &[0x3a, 0x0d],                                 // 7 waypoint: GatewayAddress, 13 bytes
        &[0x0a, 0x08],                                 //   1 hostname: NamespacedHostname
        &[0x0a, 0x02], b"ns",                          //     1 namespace
        &[0x12, 0x02], b"wp",                          //     2 hostname
        &[0x18, 0xa0, 0x75],                           //   3 hbone_mtls_port = 15008
        &[0x42, 0x08],                                 // 8 load_balancing, 8 bytes
        &[0x0a, 0x02, 0x04, 0x02],                     //   1 routing_preference packed [NODE, ZONE]
        &[0x10, 0x02],                                 //   2 mode = FAILOVER
        &[0x18, 0x01],                                 //   3 health_policy = ALLOW_ALL
        &[0x48, 0x03],                                 // 9 ip_families = DUAL
        &[0x58, 0x01],                                 // 11 canonical
        &[0x60, 0x01],                                 // 12 ingress_use_waypoint
        &[0x6a, 0x0c],                                 // 13 weighted_waypoints, 12 bytes
        &[0x0a, 0x08],                                 //   1 destination: GatewayAddress
        &[0x12, 0x06, 0x12, 0x04, 10, 0, 0, 9],        //     2 address {2 address}
        &[0x10, 0x03],                                 //   2 weight = 3
        &[0x70, 0x01],                                 // 14 visibility = NAMESPACE
    ]);
    assert_wire(&sample_service(), &golden);
}

#[test]
fn network_address_optional_length_keeps_explicit_zero() {
    // proto3 `optional`: Some(0) is on the wire (0x18 0x00), None is absent.
    let with_zero = NetworkAddress {
        network: String::new(),
        address: vec![10, 0, 0, 0],
        length: Some(0),
    };
    assert_wire(&with_zero, &[0x12, 0x04, 10, 0, 0, 0, 0x18, 0x00]);
    let with_prefix = NetworkAddress {
        length: Some(24),
        ..with_zero.clone()
    };
    assert_wire(&with_prefix, &[0x12, 0x04, 10, 0, 0, 0, 0x18, 0x18]);
    let absent = NetworkAddress {
        length: None,
        ..with_zero
    };
    assert_wire(&absent, &[0x12, 0x04, 10, 0, 0, 0]);
}

#[test]
fn workload_decoding_skips_unknown_fields() {
    // Newer control planes add fields; an unknown field 99 (varint) and field 100 (LEN) between
    // known ones must be skipped, not rejected.
    let mut golden = sample_workload_golden();
    golden.extend_from_slice(&[0x98, 0x06, 0x07]); // 99 varint = 7
    golden.extend_from_slice(&[0xa2, 0x06, 0x02, b'h', b'i']); // 100 LEN "hi"
    let decoded = Workload::decode(golden.as_slice()).expect("unknown fields are skipped");
    assert_eq!(decoded, sample_workload());
}

#[test]
fn unknown_enum_value_is_kept_raw_and_rejected_by_try_from() {
    // tunnel_protocol = 7 is not a known value: decoding keeps the raw number, and callers must
    // use try_from (the generated getter silently returns the default, NONE).
    let wl = Workload::decode([0x28, 0x07].as_slice()).expect("decode");
    assert_eq!(wl.tunnel_protocol, 7);
    assert!(TunnelProtocol::try_from(wl.tunnel_protocol).is_err());
    assert_eq!(
        TunnelProtocol::try_from(2).expect("known value"),
        TunnelProtocol::LegacyIstioMtls
    );
}

// === istio.security ===

#[test]
fn authorization_matches_golden_bytes() {
    let m = Match {
        namespaces: vec![StringMatch {
            match_type: Some(MatchType::Exact(s("ns"))),
        }],
        principals: vec![StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        not_principals: vec![StringMatch {
            match_type: Some(MatchType::Suffix(s("/sa/a"))),
        }],
        source_ips: vec![security::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        destination_ports: vec![80, 8080],
        service_accounts: vec![ServiceAccountMatch {
            namespace: s("ns"),
            service_account: s("sa"),
        }],
        ..Default::default()
    };
    let authz = Authorization {
        name: s("allow-web"),
        namespace: s("ns"),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
        dry_run: true,
        extensions: Vec::new(),
    };
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x0a, 0x09], b"allow-web",              // 1 name
        &[0x12, 0x02], b"ns",                     // 2 namespace
        &[0x18, 0x02],                            // 3 scope = WORKLOAD_SELECTOR
        &[0x20, 0x01],                            // 4 action = DENY
        &[0x2a, 0x30],                            // 5 rules: Rule, 48 bytes
        &[0x0a, 0x2e],                            //   1 clauses: Clause, 46 bytes
        &[0x12, 0x2c],                            //     2 matches: Match, 44 bytes
        &[0x0a, 0x04, 0x0a, 0x02], b"ns",         //       1 namespaces {1 exact}
        &[0x1a, 0x02, 0x22, 0x00],                //       3 principals {4 presence: Empty}
        &[0x22, 0x07, 0x1a, 0x05], b"/sa/a",      //       4 not_principals {3 suffix}
        &[0x2a, 0x08],                            //       5 source_ips: Address, 8 bytes
        &[0x0a, 0x04, 10, 0, 0, 0],               //         1 address
        &[0x10, 0x08],                            //         2 length = 8
        &[0x4a, 0x03, 0x50, 0x90, 0x3f],          //       9 destination_ports packed [80, 8080]
        &[0x5a, 0x08],                            //       11 service_accounts, 8 bytes
        &[0x0a, 0x02], b"ns",                     //         1 namespace
        &[0x12, 0x02], b"sa",                     //         2 serviceAccount
        &[0x30, 0x01],                            // 6 dry_run
    ]);
    assert_wire(&authz, &golden);
}

#[test]
fn authorization_accepts_unpacked_ports() {
    // Encoders may send repeated scalars unpacked; decoders must accept both forms.
    // Two separate varint fields with tag (9 << 3) | 0 = 0x48 instead of one LEN (0x4a) field.
    let golden = [0x48, 0x50, 0x48, 0x90, 0x3f];
    let m = Match::decode(golden.as_slice()).expect("decode");
    assert_eq!(m.destination_ports, vec![80, 8080]);
}

// === istio.v1.auth ===

#[test]
fn certificate_request_matches_golden_bytes() {
    let req = IstioCertificateRequest {
        csr: s("CSR"),
        validity_duration: 86400,
        metadata: Some(Struct {
            fields: BTreeMap::from([(
                s("ImpersonatedIdentity"),
                string_value("spiffe://cluster.local/ns/ns/sa/sa"),
            )]),
        }),
    };
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x0a, 0x03], b"CSR",                         // 1 csr
        &[0x18, 0x80, 0xa3, 0x05],                     // 3 validity_duration = 86400
        &[0x22, 0x3e],                                 // 4 metadata: Struct, 62 bytes
        &[0x0a, 0x3c],                                 //   1 fields: map entry, 60 bytes
        &[0x0a, 0x14], b"ImpersonatedIdentity",        //     1 key (20 bytes)
        &[0x12, 0x24],                                 //     2 value: Value, 36 bytes
        &[0x1a, 0x22], b"spiffe://cluster.local/ns/ns/sa/sa", // 3 string_value (34 bytes)
    ]);
    assert_wire(&req, &golden);
}

#[test]
fn certificate_request_negative_validity_is_ten_byte_varint() {
    // int64 (not sint64): -1 is sign-extended to a 10-byte varint.
    let req = IstioCertificateRequest {
        validity_duration: -1,
        ..Default::default()
    };
    let golden = [
        0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ];
    assert_wire(&req, &golden);
}

#[test]
fn certificate_response_matches_golden_bytes() {
    let resp = IstioCertificateResponse {
        cert_chain: vec![s("LEAF"), s("ROOT")],
    };
    #[rustfmt::skip]
    let golden = cat(&[&[0x0a, 0x04], b"LEAF", &[0x0a, 0x04], b"ROOT"]);
    assert_wire(&resp, &golden);
}

// === envoy.service.discovery.v3 ===

#[test]
fn delta_response_with_address_resource_matches_golden_bytes() {
    let wl_addr = workload::Address {
        r#type: Some(workload::address::Type::Workload(Workload {
            uid: s("u1"),
            ..Default::default()
        })),
    };
    let resp = DeltaDiscoveryResponse {
        system_version_info: String::new(),
        resources: vec![Resource {
            version: s("v1"),
            resource: Some(Any {
                type_url: s(ADDRESS_TYPE_URL),
                value: wl_addr.encode_to_vec(),
            }),
            name: s("u1"),
            aliases: vec![s("/10.0.0.1")],
            ttl: None,
            cache_control: None,
        }],
        type_url: s(ADDRESS_TYPE_URL),
        nonce: s("n1"),
        removed_resources: vec![s("gone")],
    };
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x12, 0x4a],                                   // 2 resources: Resource, 74 bytes
        &[0x0a, 0x02], b"v1",                            //   1 version
        &[0x12, 0x35],                                   //   2 resource: Any, 53 bytes
        &[0x0a, 0x2a], b"type.googleapis.com/istio.workload.Address", // 1 type_url (42)
        &[0x12, 0x07],                                   //     2 value: Address, 7 bytes
        &[0x0a, 0x05, 0xa2, 0x01, 0x02], b"u1",          //       1 workload {20 uid}
        &[0x1a, 0x02], b"u1",                            //   3 name
        &[0x22, 0x09], b"/10.0.0.1",                     //   4 aliases
        &[0x22, 0x2a], b"type.googleapis.com/istio.workload.Address", // 4 type_url
        &[0x2a, 0x02], b"n1",                            // 5 nonce
        &[0x32, 0x04], b"gone",                          // 6 removed_resources
    ]);
    assert_wire(&resp, &golden);

    let decoded = DeltaDiscoveryResponse::decode(golden.as_slice()).expect("decode");
    let any = decoded.resources[0]
        .resource
        .as_ref()
        .expect("resource set");
    let addr: workload::Address = unpack(any).expect("address payload");
    assert_eq!(addr, wl_addr);
}

#[test]
fn delta_request_nack_matches_golden_bytes() {
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: s("z"),
            metadata: Some(Struct {
                fields: BTreeMap::from([(s("NODE_NAME"), string_value("n1"))]),
            }),
            ..Default::default()
        }),
        type_url: s(ADDRESS_TYPE_URL),
        initial_resource_versions: BTreeMap::from([(s("a"), s("1")), (s("b"), s("2"))]),
        response_nonce: s("n1"),
        error_detail: Some(Status {
            code: 3,
            message: s("bad"),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x0a, 0x18],                                 // 1 node: Node, 24 bytes
        &[0x0a, 0x01], b"z",                           //   1 id
        &[0x1a, 0x13],                                 //   3 metadata: Struct, 19 bytes
        &[0x0a, 0x11],                                 //     1 fields entry, 17 bytes
        &[0x0a, 0x09], b"NODE_NAME",                   //       1 key
        &[0x12, 0x04, 0x1a, 0x02], b"n1",              //       2 value {3 string_value}
        &[0x12, 0x2a], b"type.googleapis.com/istio.workload.Address", // 2 type_url
        &[0x2a, 0x06, 0x0a, 0x01], b"a", &[0x12, 0x01], b"1", // 5 initial_resource_versions
        &[0x2a, 0x06, 0x0a, 0x01], b"b", &[0x12, 0x01], b"2", // 5 (second entry)
        &[0x32, 0x02], b"n1",                          // 6 response_nonce
        &[0x3a, 0x07, 0x08, 0x03, 0x12, 0x03], b"bad", // 7 error_detail {1 code, 2 message}
    ]);
    assert_wire(&req, &golden);
}

#[test]
fn delta_request_subscribe_lists_match_golden_bytes() {
    let req = DeltaDiscoveryRequest {
        resource_names_subscribe: vec![s("*")],
        resource_names_unsubscribe: vec![s("*")],
        ..Default::default()
    };
    assert_wire(&req, &[0x1a, 0x01, b'*', 0x22, 0x01, b'*']);
}

// === istio.workload.zds ===

#[test]
fn zds_add_workload_matches_golden_bytes() {
    let req = WorkloadRequest {
        payload: Some(workload_request::Payload::Add(AddWorkload {
            uid: s("pod-uid"),
            workload_info: Some(WorkloadInfo {
                name: s("p"),
                namespace: s("ns"),
                service_account: s("sa"),
            }),
        })),
    };
    #[rustfmt::skip]
    let golden = cat(&[
        &[0x0a, 0x16],                 // 1 add: AddWorkload, 22 bytes
        &[0x0a, 0x07], b"pod-uid",     //   1 uid
        &[0x12, 0x0b],                 //   2 workload_info, 11 bytes
        &[0x0a, 0x01], b"p",           //     1 name
        &[0x12, 0x02], b"ns",          //     2 namespace
        &[0x1a, 0x02], b"sa",          //     3 service_account
    ]);
    assert_wire(&req, &golden);
}

#[test]
fn zds_del_keep_snapshot_match_golden_bytes() {
    let del = WorkloadRequest {
        payload: Some(workload_request::Payload::Del(DelWorkload {
            uid: s("pod-uid"),
        })),
    };
    // 2 del {2 uid} — DelWorkload's uid is field 2, not 1.
    assert_wire(&del, &cat(&[&[0x12, 0x09, 0x12, 0x07], b"pod-uid"]));

    let keep = WorkloadRequest {
        payload: Some(workload_request::Payload::Keep(KeepWorkload {
            uid: s("k"),
        })),
    };
    assert_wire(&keep, &[0x2a, 0x03, 0x0a, 0x01, b'k']); // 5 keep {1 uid}

    let snap = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    assert_wire(&snap, &[0x1a, 0x00]); // 3 snapshot_sent {}
}

#[test]
fn zds_ack_nack_and_hello_match_golden_bytes() {
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: String::new(),
        })),
    };
    assert_wire(&ack, &[0x0a, 0x00]); // 1 ack {} (empty error = success)

    let nack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack { error: s("boom") })),
    };
    assert_wire(&nack, &cat(&[&[0x0a, 0x06, 0x0a, 0x04], b"boom"]));

    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    assert_wire(&hello, &[0x08, 0x01]);
}

// === malformed input ===

#[test]
fn truncated_input_is_a_decode_error_not_a_panic() {
    let golden = sample_workload_golden();
    // Dropping the last byte cuts the capacity field (27) mid-message.
    let err = Workload::decode(&golden[..golden.len() - 1]).expect_err("truncated");
    assert!(!err.to_string().is_empty());
    // Every prefix must decode or fail cleanly; none may panic.
    let mut failures = 0;
    for cut in 0..golden.len() {
        if Workload::decode(&golden[..cut]).is_err() {
            failures += 1;
        }
    }
    assert!(failures > golden.len() / 2, "most cuts land mid-field");

    // A length prefix larger than the buffer.
    let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(Workload::decode(huge.as_slice()).is_err());
    // An unterminated varint.
    assert!(WorkloadRequest::decode([0x08, 0xff].as_slice()).is_err());
}

#[test]
fn wrong_wire_type_is_a_decode_error() {
    // uid (20) is a string; send it as a varint: tag (20 << 3) | 0 = 0xa0 0x01.
    let err = Workload::decode([0xa0, 0x01, 0x05].as_slice()).expect_err("wrong wire type");
    assert!(err.to_string().contains("wire type"), "{err}");
    // tunnel_protocol (5) is an enum varint; send it as LEN.
    assert!(Workload::decode([0x2a, 0x01, 0x00].as_slice()).is_err());
    // ZDS add (1) is a message; send it as fixed32 (wire type 5).
    assert!(WorkloadRequest::decode([0x0d, 0, 0, 0, 0].as_slice()).is_err());
    // Wire type 7 does not exist.
    assert!(Authorization::decode([0x0f].as_slice()).is_err());
}

#[test]
fn invalid_utf8_in_string_field_is_a_decode_error() {
    // name (1) with bytes that are not UTF-8.
    assert!(Workload::decode([0x0a, 0x02, 0xff, 0xfe].as_slice()).is_err());
}

#[test]
fn unpack_with_wrong_type_url_gives_clear_error() {
    let any = Any {
        type_url: s("type.googleapis.com/istio.security.Authorization"),
        value: Vec::new(),
    };
    let err = unpack::<workload::Address>(&any).expect_err("wrong type");
    assert!(matches!(err, AnyError::TypeUrlMismatch { .. }));
    assert_eq!(
        err.to_string(),
        "unexpected any type url \"type.googleapis.com/istio.security.Authorization\", \
         expected \"type.googleapis.com/istio.workload.Address\""
    );
}
