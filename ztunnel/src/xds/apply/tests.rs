use std::net::IpAddr;

use mesh_proto::any;

use mesh_proto::discovery::DeltaDiscoveryResponse;

use super::*;
use crate::xds::testutil;

/// A client's state, as the xDS client keeps it between responses.
#[derive(Default)]
struct Client {
    store: Store,
    versions: Versions,
    interner: Interner,
}

impl Client {
    fn apply(&mut self, ty: XdsType, response: &DeltaDiscoveryResponse) -> Vec<Rejection> {
        apply(
            &mut self.store,
            &mut self.versions,
            &mut self.interner,
            ty,
            &response.removed_resources,
            response.resources.clone(),
        )
    }
}

fn response(resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        nonce: "n".into(),
        ..Default::default()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn good_resources_apply_and_bad_ones_are_rejected_individually() {
    let mut c = Client::default();
    let mut no_payload = testutil::workload("c", [10, 0, 0, 3], "v1");
    no_payload.resource = None;
    let mut wrong_type = testutil::workload("d", [10, 0, 0, 4], "v1");
    wrong_type.resource = Some(any::pack(&Authorization::default()));
    let mut unnamed = testutil::workload("e", [10, 0, 0, 5], "v1");
    unnamed.name.clear();
    let resp = response(
        vec![
            testutil::workload("a", [10, 0, 0, 1], "v1"),
            testutil::bad_workload("b", "v1"),
            testutil::service("echo", [10, 96, 0, 1], "v1"),
            no_payload,
            wrong_type,
            unnamed,
        ],
        &[],
    );
    let rejected = c.apply(XdsType::Address, &resp);
    let names: Vec<_> = rejected.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["b", "c", "d", ""]);
    let msg = nack_message(&rejected);
    for want in [
        "workload \"b\": addresses[0]: an ip address is 4 or 16 bytes",
        "\"c\": resource has no payload",
        "\"d\": unexpected any type url",
        "resource with an empty name",
    ] {
        assert!(msg.contains(want), "{msg}\nwant: {want}");
    }
    assert_eq!(
        &*c.store.workload_by_ip("", ip("10.0.0.1")).unwrap().uid,
        "a"
    );
    assert!(c.store.workload("b").is_none());
    assert!(c.store.service_by_vip("", ip("10.96.0.1")).is_some());
    let applied: Vec<_> = c.versions.keys().map(|k| &**k).collect();
    assert_eq!(applied, ["a", "default/echo.default.svc.cluster.local"]);
}

#[test]
fn a_rejected_update_keeps_the_previous_version() {
    let mut c = Client::default();
    let first = response(vec![testutil::workload("a", [10, 0, 0, 1], "v1")], &[]);
    assert!(c.apply(XdsType::Address, &first).is_empty());
    let bad = response(vec![testutil::bad_workload("a", "v2")], &[]);
    assert_eq!(c.apply(XdsType::Address, &bad).len(), 1);
    assert_eq!(c.store.workload("a").unwrap().addresses, [ip("10.0.0.1")]);
    assert_eq!(c.versions["a"].to_string(), "v1");
}

#[test]
fn removals_remove_workloads_then_services_and_forget_versions() {
    let mut c = Client::default();
    let svc = "default/echo.default.svc.cluster.local";
    let add = response(
        vec![
            testutil::workload("a", [10, 0, 0, 1], "v1"),
            testutil::service("echo", [10, 96, 0, 1], "v1"),
        ],
        &[],
    );
    c.apply(XdsType::Address, &add);
    let remove = response(vec![], &["a", svc, "never-existed"]);
    assert!(c.apply(XdsType::Address, &remove).is_empty());
    assert_eq!(c.store.len(), (0, 0));
    assert!(c.versions.is_empty());
}

#[test]
fn a_name_that_changes_kind_replaces_the_old_resource() {
    let mut c = Client::default();
    let svc = testutil::service("echo", [10, 96, 0, 1], "v1");
    let mut w = testutil::workload("x", [10, 0, 0, 1], "v1");
    // Re-pack the workload under the service's name (uid = that name).
    let mut a: mesh_proto::workload::Address = any::unpack(w.resource.as_ref().unwrap()).unwrap();
    if let Some(mesh_proto::workload::address::Type::Workload(wl)) = &mut a.r#type {
        wl.uid = svc.name.clone();
    }
    w.resource = Some(any::pack(&a));
    w.name = svc.name.clone();
    c.apply(XdsType::Address, &response(vec![svc], &[]));
    c.apply(XdsType::Address, &response(vec![w], &[]));
    assert_eq!(c.store.len(), (1, 0));
}

#[test]
fn policies_are_converted_individually_and_removed_by_name() {
    let mut c = Client::default();
    let mut bad = testutil::policy("ns", "bad", "v1");
    let mut p: Authorization = any::unpack(bad.resource.as_ref().unwrap()).unwrap();
    // An action that does not exist cannot be enforced faithfully.
    p.action = 42;
    bad.resource = Some(any::pack(&p));
    let good = testutil::policy("ns", "good", "v1");
    let resp = response(vec![bad, good], &[]);
    let rejected = c.apply(XdsType::Authorization, &resp);
    assert!(rejected.iter().any(|r| r.name == "ns/bad"), "{rejected:?}");
    assert!(nack_message(&rejected).contains("ns/bad"));
    assert!(c.store.policy("ns/bad").is_none() && !c.versions.contains_key("ns/bad"));
    // Whether the plain policy converts depends on the policy model; either way it is
    // reported or applied, never both, and a removal clears it.
    let good_applied = c.store.policy("ns/good").is_some();
    assert_eq!(good_applied, !rejected.iter().any(|r| r.name == "ns/good"));
    assert_eq!(good_applied, c.versions.contains_key("ns/good"));
    let remove = response(vec![], &["ns/good"]);
    assert!(c.apply(XdsType::Authorization, &remove).is_empty());
    assert!(c.store.policy("ns/good").is_none() && c.versions.is_empty());
}

#[test]
fn type_urls_round_trip() {
    for t in XdsType::ALL {
        assert_eq!(XdsType::from_url(t.type_url()), Some(t));
    }
    assert_eq!(XdsType::from_url(mesh_proto::any::WORKLOAD_TYPE_URL), None);
}
