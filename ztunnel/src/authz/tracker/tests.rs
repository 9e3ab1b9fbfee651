use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::authz::tests::workload;
use crate::state::policy::{Action, Clause, Match, Policy, Rule, Scope, StringMatch};

fn deny_plaintext(scope: Scope) -> Policy {
    Policy {
        name: "strict".into(),
        namespace: "b".into(),
        scope,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch::Presence],
                    ..Match::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

fn store_with(w: &Workload, policies: Vec<Policy>) -> Store {
    let mut s = Store::default();
    s.insert_workload(w.clone());
    policies.into_iter().for_each(|p| s.insert_policy(p));
    s
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn client() -> Identity {
    "spiffe://cluster.local/ns/a/sa/client".parse().unwrap()
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn admits_tracks_and_forgets() {
    let w = Arc::new(workload("b", &[]));
    let store = Arc::new(SharedStore::new(store_with(
        &w,
        vec![deny_plaintext(Scope::Namespace)],
    )));
    let tracker = ConnectionTracker::default();
    let (src, dst) = (addr("10.0.0.9:4000"), addr("10.0.0.2:80"));
    let denied = tracker
        .admit(&store, w.clone(), src, None, dst)
        .unwrap_err();
    assert_eq!(denied, Denied::DenyPolicy("b/strict".into()));
    assert!(tracker.is_empty(), "a denied connection is not tracked");
    let tracked = tracker
        .admit(&store, w, src, Some(client().into()), dst)
        .unwrap();
    assert_eq!(tracker.len(), 1);
    assert!(tracked.revoked().is_none());
    drop(tracked);
    assert!(tracker.is_empty());
}

#[tokio::test]
async fn a_policy_update_closes_only_the_connections_it_denies() {
    let w = Arc::new(workload("b", &[]));
    let store = Arc::new(SharedStore::new(store_with(&w, vec![])));
    let tracker = ConnectionTracker::default();
    let (src, dst) = (addr("10.0.0.9:4000"), addr("10.0.0.2:80"));
    let plain = tracker.admit(&store, w.clone(), src, None, dst).unwrap();
    let mtls = tracker
        .admit(&store, w.clone(), src, Some(client().into()), dst)
        .unwrap();

    // A live copy through the plaintext connection's upstream.
    let (app, mut app_peer) = tokio::io::duplex(64);
    let mut upstream = plain.wrap(app);
    app_peer.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    upstream.read_exact(&mut buf).await.unwrap();
    let pending_read = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        upstream.read(&mut buf).await
    });

    // An unrelated update changes nothing.
    store.replace(store_with(&w, vec![]));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(plain.revoked().is_none());

    store.replace(store_with(&w, vec![deny_plaintext(Scope::Namespace)]));
    eventually("plaintext revoked", || plain.revoked().is_some()).await;
    assert_eq!(plain.revoked(), Some("denied by policy b/strict"));
    assert!(mtls.revoked().is_none());
    // The blocked read is woken and fails with the reason.
    let err = pending_read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    assert_eq!(
        err.to_string(),
        "closed by a policy update: denied by policy b/strict"
    );
    // Writes fail too.
    let mut again = plain.wrap(tokio::io::duplex(8).0);
    assert!(again.write_all(b"x").await.is_err());
}

#[tokio::test]
async fn a_workload_newly_selecting_a_policy_is_rechecked() {
    let w = Arc::new(workload("b", &[]));
    let policy = deny_plaintext(Scope::WorkloadSelector);
    let store = Arc::new(SharedStore::new(store_with(&w, vec![policy.clone()])));
    let tracker = ConnectionTracker::default();
    let tracked = tracker
        .admit(&store, w, addr("10.0.0.9:1"), None, addr("10.0.0.2:80"))
        .unwrap();
    // Same policies, but the workload now lists the selector policy.
    let selected = workload("b", &["b/strict"]);
    assert_eq!(
        tracker.recheck(&store_with(&workload("b", &[]), vec![policy.clone()])),
        0
    );
    assert_eq!(tracker.recheck(&store_with(&selected, vec![policy])), 1);
    assert!(tracked.revoked().is_some());
    // Already revoked: not counted again.
    assert_eq!(tracker.recheck(&Store::default()), 0);
}

#[test]
fn without_a_runtime_admission_still_decides() {
    let w = Arc::new(workload("b", &[]));
    let store = Arc::new(SharedStore::new(store_with(
        &w,
        vec![deny_plaintext(Scope::Namespace)],
    )));
    let tracker = ConnectionTracker::default();
    let denied = tracker.admit(&store, w, addr("10.0.0.9:1"), None, addr("10.0.0.2:80"));
    assert!(denied.is_err());
}
