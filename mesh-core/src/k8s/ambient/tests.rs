//! The enrollment decision table, written as the YAML users write.

use super::*;
use crate::k8s::parse_documents;

const NODE: &str = "n1";

fn namespace(mode: Option<&str>) -> Namespace {
    let labels = mode.map_or(String::new(), |m| {
        format!("labels: {{{DATAPLANE_MODE_LABEL}: {m}}}")
    });
    let text = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, {labels}}}\n");
    one(&text)
}

fn one<T: crate::k8s::Typed + Clone>(text: &str) -> T {
    let parsed = parse_documents(text).unwrap();
    T::from_object(&parsed.objects[0]).unwrap().as_ref().clone()
}

/// A pod built from YAML fragments, so cases read like the config users write.
struct P<'a> {
    mode: Option<&'a str>,
    node: &'a str,
    host_network: bool,
    ip: &'a str,
    phase: &'a str,
    sidecar: bool,
}

const BASE: P<'static> = P {
    mode: None,
    node: NODE,
    host_network: false,
    ip: "podIP: 10.0.0.5",
    phase: "Running",
    sidecar: false,
};

fn pod(p: &P<'_>) -> Pod {
    let labels = p
        .mode
        .map_or(String::new(), |m| format!("{DATAPLANE_MODE_LABEL}: {m}"));
    let annotations = if p.sidecar {
        format!("{SIDECAR_STATUS_ANNOTATION}: '{{}}'")
    } else {
        String::new()
    };
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, labels: {{{labels}}}, \
         annotations: {{{annotations}}}}}\nspec: {{nodeName: {}, hostNetwork: {}}}\n\
         status: {{phase: {}, {}}}\n",
        p.node, p.host_network, p.phase, p.ip
    );
    one(&text)
}

#[test]
fn decision_table() {
    use Decision::{Enroll, Skip};
    use SkipReason::*;
    let amb = Some("ambient");
    let cases: &[(&str, Option<&str>, P<'_>, Decision)] = &[
        ("namespace ambient", amb, BASE, Enroll),
        ("pod ambient", None, P { mode: amb, ..BASE }, Enroll),
        ("both ambient", amb, P { mode: amb, ..BASE }, Enroll),
        ("nothing", None, BASE, Skip(NotAmbient)),
        ("namespace none", Some("none"), BASE, Skip(NotAmbient)),
        (
            "namespace other value",
            Some("sidecar"),
            BASE,
            Skip(NotAmbient),
        ),
        (
            "pod opt-out wins",
            amb,
            P {
                mode: Some("none"),
                ..BASE
            },
            Skip(OptedOut),
        ),
        (
            "pod opt-out alone",
            None,
            P {
                mode: Some("none"),
                ..BASE
            },
            Skip(NotAmbient),
        ),
        (
            "pod other value in ambient ns",
            amb,
            P {
                mode: Some("x"),
                ..BASE
            },
            Enroll,
        ),
        ("other node", amb, P { node: "n2", ..BASE }, Skip(OtherNode)),
        (
            "host network",
            amb,
            P {
                host_network: true,
                ..BASE
            },
            Skip(HostNetwork),
        ),
        (
            "sidecar",
            amb,
            P {
                sidecar: true,
                ..BASE
            },
            Skip(HasSidecar),
        ),
        ("no ip", amb, P { ip: "", ..BASE }, Skip(NoPodIp)),
        (
            "empty ip",
            amb,
            P {
                ip: "podIP: ''",
                ..BASE
            },
            Skip(NoPodIp),
        ),
        (
            "bad ip",
            amb,
            P {
                ip: "podIP: 10.0.0",
                ..BASE
            },
            Skip(InvalidPodIp),
        ),
        (
            "podIPs preferred",
            amb,
            P {
                ip: "podIPs: [{ip: 'fd00::5'}]",
                ..BASE
            },
            Enroll,
        ),
        (
            "pending",
            amb,
            P {
                phase: "Pending",
                ..BASE
            },
            Enroll,
        ),
        (
            "unknown phase",
            amb,
            P {
                phase: "Unknown",
                ..BASE
            },
            Enroll,
        ),
        (
            "no phase",
            amb,
            P {
                phase: "''",
                ..BASE
            },
            Enroll,
        ),
        (
            "succeeded",
            amb,
            P {
                phase: "Succeeded",
                ..BASE
            },
            Skip(Terminated),
        ),
        (
            "failed",
            amb,
            P {
                phase: "Failed",
                ..BASE
            },
            Skip(Terminated),
        ),
        (
            "terminated and not ambient",
            None,
            P {
                phase: "Failed",
                ..BASE
            },
            Skip(Terminated),
        ),
        (
            "other node and host network",
            amb,
            P {
                node: "x",
                host_network: true,
                ..BASE
            },
            Skip(OtherNode),
        ),
    ];
    for (name, ns_mode, p, want) in cases {
        let ns = namespace(*ns_mode);
        assert_eq!(decide_on_node(NODE, Some(&ns), &pod(p)), *want, "{name}");
        if *want != Skip(OtherNode) {
            assert_eq!(decide(Some(&ns), &pod(p)), *want, "node-independent {name}");
        }
    }
}

#[test]
fn missing_namespace_counts_as_unlabelled() {
    assert_eq!(
        decide_on_node(NODE, None, &pod(&BASE)),
        Decision::Skip(SkipReason::NotAmbient)
    );
    let labelled = pod(&P {
        mode: Some("ambient"),
        ..BASE
    });
    assert_eq!(decide_on_node(NODE, None, &labelled), Decision::Enroll);
}

#[test]
fn unscheduled_pod_is_other_node() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {istio.io/dataplane-mode: ambient}}\n";
    let pod: Pod = one(text);
    assert_eq!(
        decide_on_node(NODE, None, &pod),
        Decision::Skip(SkipReason::OtherNode)
    );
}

#[test]
fn node_independent_decision_ignores_scheduling() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {istio.io/dataplane-mode: ambient}}\n\
                status: {podIP: 10.0.0.1}\n";
    let pod: Pod = one(text);
    assert_eq!(decide(None, &pod), Decision::Enroll);
    assert!(wants_ambient(None, &pod));
    assert!(!is_terminated(&pod) && !is_host_network(&pod));
}

#[test]
fn ips_and_service_account() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\n\
                spec: {serviceAccount: legacy}\n\
                status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}\n";
    let pod: Pod = one(text);
    let ips: Vec<String> = pod_ips(&pod)
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
    assert_eq!(service_account(&pod), "legacy");

    let pod: Pod = one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n\
         spec: {serviceAccountName: web, serviceAccount: legacy}\n");
    assert_eq!(service_account(&pod), "web");
    assert!(pod_ips(&pod).unwrap().is_empty());

    let pod: Pod = one("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n");
    assert_eq!(pod_ips(&pod), Err("nope".to_owned()));
    assert_eq!(service_account(&pod), DEFAULT_SERVICE_ACCOUNT);
}
