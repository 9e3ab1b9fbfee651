use std::time::Duration;

use mesh_proto::any::unpack;
use mesh_proto::security::Authorization;
use mesh_proto::workload::Address;

use super::*;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  nodeName: n1
  serviceAccountName: sleep
  containers: [{name: c, image: x}]
status: {phase: Running, podIP: 10.1.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: client}
  ports: [{port: 80, targetPort: 8080}]
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: demo}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}]}]
"#;

fn snapshot(yaml: &str) -> Snapshot {
    let parsed = k8s::parse_documents(yaml).expect("valid yaml");
    Snapshot::from_objects(parsed.objects)
}

#[test]
fn resource_set_packs_every_translated_resource_under_its_type() {
    let translated = translate(
        &snapshot(&format!("{OBJECTS}---{POLICY}")),
        &TranslateConfig::default(),
    );
    let set = resource_set(&translated);
    assert_eq!(set.len(ADDRESS_TYPE_URL), 2, "one workload and one service");
    assert_eq!(set.len(AUTHORIZATION_TYPE_URL), 1);
    let uid = "Kubernetes//Pod/demo/client";
    let body = &set
        .resource(ADDRESS_TYPE_URL, uid)
        .expect("workload by uid")
        .body;
    let address: Address = unpack(body).expect("an Address");
    assert!(address.r#type.is_some());
    let policy = &set
        .resource(AUTHORIZATION_TYPE_URL, "demo/allow-sleep")
        .expect("policy")
        .body;
    let policy: Authorization = unpack(policy).expect("an Authorization");
    assert_eq!(policy.name, "allow-sleep");
}

#[tokio::test]
async fn locality_follows_the_pods_in_the_snapshot() {
    let (tx, rx) = watch::channel(Arc::new(snapshot(OBJECTS)));
    let locality = SnapshotLocality::new(rx);
    assert!(
        locality
            .has_workload_on_node("demo", "sleep", "n1")
            .await
            .unwrap()
    );
    assert!(
        !locality
            .has_workload_on_node("demo", "sleep", "n2")
            .await
            .unwrap(),
        "wrong node"
    );
    assert!(
        !locality
            .has_workload_on_node("demo", "other", "n1")
            .await
            .unwrap(),
        "wrong account"
    );
    assert!(
        !locality
            .has_workload_on_node("prod", "sleep", "n1")
            .await
            .unwrap(),
        "wrong namespace"
    );
    // The pod moves: the answer follows the new snapshot.
    let moved = OBJECTS.replace("nodeName: n1", "nodeName: n2");
    tx.send_replace(Arc::new(snapshot(&moved)));
    assert!(
        !locality
            .has_workload_on_node("demo", "sleep", "n1")
            .await
            .unwrap()
    );
    assert!(
        locality
            .has_workload_on_node("demo", "sleep", "n2")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn terminated_pods_do_not_count_for_locality() {
    let done = OBJECTS.replace("phase: Running", "phase: Succeeded");
    let (_tx, rx) = watch::channel(Arc::new(snapshot(&done)));
    let locality = SnapshotLocality::new(rx);
    assert!(
        !locality
            .has_workload_on_node("demo", "sleep", "n1")
            .await
            .unwrap()
    );
}

async fn next_set(rx: &mut watch::Receiver<Arc<ResourceSet>>) -> Arc<ResourceSet> {
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a new resource set within 10 s")
        .expect("publisher alive");
    rx.borrow_and_update().clone()
}

#[tokio::test]
async fn a_watched_directory_is_published_and_bad_files_keep_the_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.yaml"), OBJECTS).unwrap();
    let config = SourceConfig {
        kind: SourceKind::Dir {
            dir: dir.path().into(),
            poll: Duration::from_millis(20),
        },
        root_namespace: "istio-system".into(),
    };
    let shutdown = CancellationToken::new();
    let snapshots = start(&config, shutdown.clone())
        .await
        .unwrap()
        .expect("a source");
    let (tx, mut rx) = watch::channel(Arc::new(ResourceSet::new()));
    tokio::spawn(publish(
        snapshots,
        TranslateConfig::default(),
        tx,
        shutdown.clone(),
    ));
    let first = next_set(&mut rx).await;
    assert_eq!(first.len(ADDRESS_TYPE_URL), 2);
    assert_eq!(first.len(AUTHORIZATION_TYPE_URL), 0);

    std::fs::write(dir.path().join("policy.yaml"), POLICY).unwrap();
    let with_policy = next_set(&mut rx).await;
    assert_eq!(with_policy.len(AUTHORIZATION_TYPE_URL), 1);

    // A file that stops parsing keeps serving what it held.
    std::fs::write(dir.path().join("app.yaml"), "kind: Pod\n  : : not yaml [").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let current = rx.borrow().clone();
    assert_eq!(
        current.len(ADDRESS_TYPE_URL),
        2,
        "last good objects still served"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_missing_config_directory_is_a_clear_startup_error() {
    let config = SourceConfig {
        kind: SourceKind::Dir {
            dir: "/nonexistent/zmesh-config".into(),
            poll: Duration::from_secs(1),
        },
        root_namespace: "istio-system".into(),
    };
    let Err(err) = start(&config, CancellationToken::new()).await else {
        panic!("a missing directory must fail the start");
    };
    assert!(
        format!("{err:#}").contains("/nonexistent/zmesh-config"),
        "{err:#}"
    );
}
