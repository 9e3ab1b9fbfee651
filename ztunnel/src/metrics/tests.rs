use std::sync::Arc;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

use super::*;

fn setup() -> (Metrics, Snapshotter) {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    (Metrics::new(Arc::new(recorder)), snapshotter)
}

/// Counter values by (name, labels as `k=v` sorted).
fn counters(s: &Snapshotter) -> Vec<(String, Vec<String>, u64)> {
    let mut out: Vec<_> = s
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key: CompositeKey = key;
            let DebugValue::Counter(v) = value else {
                return None;
            };
            assert_eq!(key.kind(), MetricKind::Counter);
            let mut labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            Some((key.key().name().to_string(), labels, v))
        })
        .collect();
    out.sort();
    out
}

fn peer(name: &str, ns: &str, principal: &str) -> Peer {
    Peer {
        workload: Some(name.into()),
        namespace: Some(ns.into()),
        principal: Some(principal.into()),
    }
}

#[test]
fn an_established_connection_records_open_close_and_bytes_with_its_labels() {
    let (metrics, snap) = setup();
    {
        let mut guard = metrics.connection(
            Reporter::Source,
            "outbound",
            "10.0.0.1:4000".parse().unwrap(),
        );
        guard
            .source(peer("client", "a", "spiffe://cluster.local/ns/a/sa/client"))
            .destination(peer("server", "b", "spiffe://cluster.local/ns/b/sa/server"))
            .security(SecurityPolicy::MutualTls)
            .service(Some("echo.b.svc.cluster.local".into()));
        guard.established();
        guard.bytes(100, 250);
    }
    let all = counters(&snap);
    let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            TCP_CONNECTIONS_CLOSED,
            TCP_CONNECTIONS_OPENED,
            TCP_RECEIVED_BYTES,
            TCP_SENT_BYTES
        ]
    );
    let values: Vec<u64> = all.iter().map(|(_, _, v)| *v).collect();
    assert_eq!(values, [1, 1, 100, 250]);
    let labels = &all[0].1;
    for want in [
        "reporter=source",
        "source_workload=client",
        "source_workload_namespace=a",
        "source_principal=spiffe://cluster.local/ns/a/sa/client",
        "destination_workload=server",
        "destination_workload_namespace=b",
        "destination_principal=spiffe://cluster.local/ns/b/sa/server",
        "destination_service=echo.b.svc.cluster.local",
        "request_protocol=tcp",
        "response_flags=-",
        "connection_security_policy=mutual_tls",
    ] {
        assert!(
            labels.contains(&want.to_string()),
            "missing {want} in {labels:?}"
        );
    }
    // Open and close share one label set.
    assert!(all.iter().all(|(_, l, _)| l == labels));
}

#[test]
fn a_failed_connection_still_counts_with_its_response_flag() {
    let (metrics, snap) = setup();
    {
        let mut guard = metrics.connection(
            Reporter::Destination,
            "inbound",
            "10.0.0.1:4000".parse().unwrap(),
        );
        guard.fail(Some(ErrorKind::Connect), "connection refused");
    }
    let all = counters(&snap);
    let opened = all
        .iter()
        .find(|(n, _, _)| n == TCP_CONNECTIONS_OPENED)
        .unwrap();
    let closed = all
        .iter()
        .find(|(n, _, _)| n == TCP_CONNECTIONS_CLOSED)
        .unwrap();
    assert_eq!((opened.2, closed.2), (1, 1));
    for want in [
        "response_flags=CONNECT",
        "reporter=destination",
        "source_workload=unknown",
        "connection_security_policy=unknown",
    ] {
        assert!(
            closed.1.contains(&want.to_string()),
            "missing {want} in {:?}",
            closed.1
        );
    }
}

#[test]
fn denials_carry_deny_and_revocations_are_counted_apart() {
    let (metrics, snap) = setup();
    let src = "10.0.0.1:4000".parse().unwrap();
    {
        // Refused at connect time (plaintext under STRICT).
        let mut guard = metrics.connection(Reporter::Destination, "inbound_plaintext", src);
        guard.fail(Some(ErrorKind::Denied), "denied by policy b/strict");
    }
    {
        // Admitted over mTLS, then closed by a policy update.
        let mut guard = metrics.connection(Reporter::Destination, "inbound", src);
        guard.security(SecurityPolicy::MutualTls).established();
        guard.bytes(5, 7);
        guard.fail(Some(ErrorKind::Denied), "closed by a policy update");
    }
    let all = counters(&snap);
    let find = |name: &str, label: &str| {
        all.iter()
            .find(|(n, l, _)| n == name && l.contains(&label.to_string()))
            .map(|(_, l, v)| (l.clone(), *v))
    };
    let (labels, n) = find(TCP_CONNECTIONS_CLOSED, "connection_security_policy=unknown").unwrap();
    assert_eq!(n, 1);
    assert!(
        labels.contains(&"response_flags=DENY".to_string()),
        "{labels:?}"
    );
    // The revoked connection closes with the labels it opened with...
    let (labels, n) = find(
        TCP_CONNECTIONS_CLOSED,
        "connection_security_policy=mutual_tls",
    )
    .unwrap();
    assert_eq!(n, 1);
    assert!(
        labels.contains(&"response_flags=-".to_string()),
        "{labels:?}"
    );
    // ...and is counted once as revoked, with DENY.
    let (labels, n) = find(TCP_CONNECTIONS_REVOKED, "response_flags=DENY").unwrap();
    assert_eq!(n, 1);
    assert!(labels.contains(&"connection_security_policy=mutual_tls".to_string()));
    assert_eq!(
        all.iter()
            .filter(|(n, _, _)| n == TCP_CONNECTIONS_REVOKED)
            .count(),
        1,
        "a connection denied before it was established is not a revocation"
    );
}
