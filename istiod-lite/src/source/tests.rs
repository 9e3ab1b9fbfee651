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

fn versions(set: &ResourceSet) -> Vec<(String, String, String)> {
    set.type_urls()
        .flat_map(|t| {
            set.get(t)
                .into_iter()
                .flatten()
                .map(move |(n, r)| (t.to_string(), n.clone(), r.version.clone()))
        })
        .collect()
}

const MORE_PODS: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: client, version: v1}}
spec: {nodeName: n2, serviceAccountName: web, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.1.2.2, conditions: [{type: Ready, status: "True"}]}
"#;

#[test]
fn pod_only_changes_translate_incrementally_to_the_same_result_as_a_full_translation() {
    let cfg = TranslateConfig::default();
    let base = format!("{OBJECTS}{MORE_PODS}---{POLICY}");
    let steps = [
        // A label change (the revision), then a pod gone, then a new pod and a terminated one.
        base.replace("version: v1", "version: v2"),
        OBJECTS.to_string() + "---" + POLICY,
        format!(
            "{OBJECTS}{}---{POLICY}",
            MORE_PODS
                .replace("name: web", "name: web2")
                .replace("10.1.2.2", "10.1.2.3")
        )
        .replace(
            "phase: Running, podIP: 10.1.1.2",
            "phase: Failed, podIP: 10.1.1.2",
        ),
        // A non-pod change (the policy removed) takes the full path.
        OBJECTS.to_string(),
    ];
    let mut translator = Translator::new(cfg.clone());
    let first = translator.update(Arc::new(snapshot(&base)));
    assert_eq!(
        versions(&first),
        versions(&resource_set(&translate(&snapshot(&base), &cfg)))
    );
    for (i, step) in steps.iter().enumerate() {
        let s = snapshot(step);
        let got = translator.update(Arc::new(s.clone()));
        let want = resource_set(&translate(&s, &cfg));
        assert_eq!(versions(&got), versions(&want), "step {i}");
    }
}

#[test]
fn changed_pods_is_none_when_anything_but_pods_changed() {
    let a = snapshot(&format!("{OBJECTS}{MORE_PODS}"));
    let b = snapshot(&format!("{OBJECTS}{}", MORE_PODS.replace("v1", "v9")));
    let pods = changed_pods(&a, &b).expect("only a pod changed");
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].name, "web");
    let c = snapshot(&OBJECTS.replace("port: 80", "port: 81"));
    assert!(changed_pods(&a, &c).is_none());
}
