//! How much heap ztunnel's store holds per xDS resource, for a mesh shaped like the xds-bench one
//! (10 000 pods in 100 namespaces, 1 000 services, 10 pods per service, 50 nodes), applied through
//! the same path as the xDS client (`apply`, which also records resource versions).
//!
//! A counting allocator measures the live heap before and after. The malloc figure adds glibc's
//! per-allocation cost (an 8-byte header, rounding to 16 bytes: ≈ 16 B on average), which is what
//! the process's RSS pays. The budget guards against regressions; the target (≤ 2 KB of
//! ztunnel memory per workload, measured as RSS growth) is checked by `xds-bench`.

use mesh_proto::any::{ADDRESS_TYPE_URL, pack};
use mesh_proto::discovery::{DeltaDiscoveryResponse, Resource};
use mesh_proto::workload as pb;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use ztunnel::state::Store;
use ztunnel::state::intern::Interner;
use ztunnel::xds::apply::{XdsType, apply};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;

fn hostname(svc: usize, ns: usize) -> String {
    format!("svc-{svc}.ns-{ns}.svc.cluster.local")
}

fn resources() -> Vec<Resource> {
    let per_svc = PODS / SERVICES;
    let mut out = Vec::new();
    for i in 0..SERVICES {
        let ns = i * per_svc / 100;
        let svc = pb::Service {
            name: format!("svc-{i}"),
            namespace: format!("ns-{ns}"),
            hostname: hostname(i, ns),
            addresses: vec![pb::NetworkAddress {
                network: String::new(),
                address: vec![10, 96, (i / 256) as u8, (i % 256) as u8],
                ..Default::default()
            }],
            ports: vec![pb::Port {
                service_port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        };
        out.push(resource(
            format!("ns-{ns}/{}", hostname(i, ns)),
            pb::address::Type::Service(svc),
        ));
    }
    for i in 0..PODS {
        let (ns, svc) = (i / 100, i / per_svc);
        let uid = format!("Kubernetes//Pod/ns-{ns}/pod-{i}");
        let ip = 0x0a01_0000u32 + i as u32;
        let w = pb::Workload {
            uid: uid.clone(),
            name: format!("pod-{i}"),
            namespace: format!("ns-{ns}"),
            addresses: vec![ip.to_be_bytes().to_vec()],
            service_account: format!("sa-{svc}"),
            node: format!("node-{}", i % 50),
            canonical_name: format!("app-{svc}"),
            canonical_revision: "v0".into(),
            workload_name: format!("pod-{i}"),
            workload_type: pb::WorkloadType::Pod as i32,
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            cluster_id: "Kubernetes".into(),
            services: [(
                format!("ns-{ns}/{}", hostname(svc, ns)),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        ..Default::default()
                    }],
                },
            )]
            .into(),
            ..Default::default()
        };
        out.push(resource(uid, pb::address::Type::Workload(w)));
    }
    out
}

fn resource(name: String, ty: pb::address::Type) -> Resource {
    Resource {
        // A 128-bit hex content hash, like istiod-lite's.
        version: format!("{:032x}", rand::random::<u128>()),
        resource: Some(pack(&pb::Address { r#type: Some(ty) })),
        name,
        ..Default::default()
    }
}

#[test]
fn store_heap_per_resource_stays_within_budget() {
    let mut store = Store::default();
    let mut versions = imbl::OrdMap::new();
    let mut interner = Interner::default();
    // From before the response exists to after it was consumed: what remains is what the store,
    // the versions and the interner hold.
    let region = Region::new(GLOBAL);
    let response = DeltaDiscoveryResponse {
        type_url: ADDRESS_TYPE_URL.into(),
        resources: resources(),
        ..Default::default()
    };
    let rejected = apply(
        &mut store,
        &mut versions,
        &mut interner,
        XdsType::Address,
        &response.removed_resources,
        response.resources,
    );
    let stats = region.change();
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(store.len(), (PODS, SERVICES));
    let n = (PODS + SERVICES) as f64;
    // `realloc` growth and shrinkage are already counted in these two.
    let live = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    let blocks = stats.allocations as f64 - stats.deallocations as f64;
    let (live, blocks) = (live / n, blocks / n);
    let malloc = live + 16.0 * blocks;
    println!(
        "store + versions per resource: {live:.0} B live in {blocks:.1} allocations, ≈ {malloc:.0} B with malloc overhead"
    );
    // ≈ 975 B when written (it was 2 160 B before strings were shared and the indexes became
    // B-trees of pointers).
    assert!(
        malloc <= 1_250.0,
        "the store holds ≈ {malloc:.0} B per resource (budget 1 250 B)"
    );
    drop((store, versions, interner));
}
