use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;
use crate::k8s::fake_api::{FakeApiServer, FakeResource};
use crate::k8s::{Namespace, Pod, parse_documents};

const WAIT: Duration = Duration::from_secs(10);

fn config() -> KubeSourceConfig {
    KubeSourceConfig {
        debounce: Duration::from_millis(20),
        min_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..KubeSourceConfig::default()
    }
}

fn pod(ns: &str, name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                        "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
           "status": {"podIP": "10.0.0.1", "phase": "Running"}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}})
}

async fn fake() -> FakeApiServer {
    let server = FakeApiServer::start().await.unwrap();
    server.register_kinds(Kind::ALL);
    server
}

/// Starts a source over `server`; returns its snapshots once it is ready.
async fn start(server: &FakeApiServer, config: KubeSourceConfig) -> watch::Receiver<Arc<Snapshot>> {
    let source = KubeSource::new(server.client(), config);
    let rx = source.subscribe();
    let ready = source.ready();
    tokio::spawn(source.run());
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("source ready");
    rx
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    check: impl FnMut(&Arc<Snapshot>) -> bool,
) -> Arc<Snapshot> {
    let mut waiter = rx.clone();
    let waited = tokio::time::timeout(WAIT, waiter.wait_for(check)).await;
    if let Ok(snapshot) = waited {
        return snapshot.unwrap().clone();
    }
    let last = rx.borrow().clone();
    let objects: Vec<_> = last.objects().map(|(k, _)| k.to_string()).collect();
    panic!(
        "timed out waiting for {what}; last: {objects:?} {:?}",
        last.errors()
    );
}

fn pod_names(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .list::<Pod>()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

#[tokio::test]
async fn lists_every_kind_then_follows_changes() {
    let server = fake().await;
    server.apply(namespace("shop")).unwrap();
    let rv = server.apply(pod("shop", "web", "n1")).unwrap();
    server.apply(pod("shop", "db", "n2")).unwrap();
    let mut rx = start(&server, config()).await;
    let snapshot = rx.borrow().clone();
    assert_eq!(snapshot.version(), 1);
    assert_eq!(pod_names(&snapshot), ["db", "web"]);
    assert!(snapshot.get::<Namespace>("", "shop").is_some());
    assert!(snapshot.errors().is_empty(), "{:?}", snapshot.errors());

    // Both sources decode alike: the YAML parser reads the object the server holds.
    let mut served = pod("shop", "web", "n1");
    served["metadata"]["resourceVersion"] = rv.to_string().into();
    let from_yaml = parse_documents(&served.to_string())
        .unwrap()
        .objects
        .remove(0);
    let from_api = snapshot.objects().find(|(k, _)| k.name == "web").unwrap().1;
    assert_eq!(from_api, &from_yaml);

    server.apply(pod("shop", "cache", "n1")).unwrap();
    let mut moved = pod("shop", "web", "n3");
    moved["metadata"]["labels"]["app"] = "web2".into();
    server.apply(moved).unwrap();
    server.delete("v1", "Pod", "shop", "db").unwrap();
    let snapshot = wait_for(&mut rx, "changes", |s| pod_names(s) == ["cache", "web"]).await;
    let web = snapshot.get::<Pod>("shop", "web").unwrap();
    assert_eq!(web.spec.as_ref().unwrap().node_name.as_deref(), Some("n3"));
    assert_eq!(web.metadata.labels.as_ref().unwrap()["app"], "web2");
}

#[tokio::test]
async fn relists_after_410_without_losing_or_duplicating() {
    let server = fake().await;
    for name in ["a", "b", "c"] {
        server.apply(pod("x", name, "n1")).unwrap();
    }
    let mut rx = start(&server, config()).await;
    assert_eq!(pod_names(&rx.borrow()), ["a", "b", "c"]);
    server.during_outage(|store| {
        store.delete("v1", "Pod", "x", "a").unwrap();
        store.apply(pod("x", "b", "n9")).unwrap();
        store.apply(pod("x", "d", "n1")).unwrap();
    });
    let snapshot = wait_for(&mut rx, "the relist", |s| pod_names(s) == ["b", "c", "d"]).await;
    let b = snapshot.get::<Pod>("x", "b").unwrap();
    assert_eq!(b.spec.as_ref().unwrap().node_name.as_deref(), Some("n9"));
    assert_eq!(snapshot.len(), 3);
    let lists = |s: &[String]| {
        s.iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count()
    };
    assert_eq!(lists(&server.requests()), 2, "{:#?}", server.requests());
    // The watch resumed after the relist: later changes still arrive.
    server.apply(pod("x", "e", "n1")).unwrap();
    wait_for(&mut rx, "a change after the relist", |s| s.len() == 4).await;
}

#[tokio::test]
async fn a_missing_resource_is_reported_and_does_not_block_the_others() {
    let server = FakeApiServer::start().await.unwrap();
    // Every kind is served except Namespace.
    for kind in Kind::ALL.iter().filter(|k| **k != Kind::Namespace) {
        server.register(FakeResource::of(*kind));
    }
    server.apply(pod("x", "a", "n1")).unwrap();
    let mut rx = start(&server, config()).await;
    let snapshot = rx.borrow().clone();
    assert_eq!(pod_names(&snapshot), ["a"]);
    assert_eq!(
        snapshot.errors(),
        [
            "Namespace: the api server does not serve v1/namespaces (is the CRD installed?); \
          no Namespace objects until it does"
        ]
    );
    // Installed later: picked up on a retry, and the error clears.
    server.register(FakeResource::of(Kind::Namespace));
    server.apply(namespace("x")).unwrap();
    let snapshot = wait_for(&mut rx, "the namespace", |s| {
        s.list::<Namespace>().count() == 1
    })
    .await;
    assert!(snapshot.errors().is_empty(), "{:?}", snapshot.errors());
}

#[tokio::test]
async fn malformed_objects_are_skipped_and_named() {
    let server = fake().await;
    server.apply(pod("x", "good", "n1")).unwrap();
    let mut bad = pod("x", "bad", "n1");
    bad["spec"]["hostNetwork"] = "yes".into();
    server.apply(bad.clone()).unwrap();
    let mut rx = start(&server, config()).await;
    let snapshot = rx.borrow().clone();
    assert_eq!(pod_names(&snapshot), ["good"]);
    let errors = snapshot.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("Pod x/bad: skipped: spec.hostNetwork: invalid type"),
        "{errors:?}"
    );

    // A bad update keeps the last good version; a fixed one replaces it.
    let mut good = pod("x", "good", "n2");
    good["spec"]["hostNetwork"] = json!({"nested": true});
    server.apply(good).unwrap();
    bad["spec"]["hostNetwork"] = false.into();
    server.apply(bad).unwrap();
    let snapshot = wait_for(&mut rx, "the fix", |s| pod_names(s) == ["bad", "good"]).await;
    let good = snapshot.get::<Pod>("x", "good").unwrap();
    assert_eq!(good.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    assert_eq!(snapshot.errors().len(), 1, "{:?}", snapshot.errors());
    assert!(snapshot.errors()[0].starts_with("Pod x/good: skipped: spec.hostNetwork"));
}

#[tokio::test]
async fn lists_in_pages_and_selects_pods_by_node() {
    let server = fake().await;
    for i in 0..5 {
        server.apply(pod("x", &format!("p{i}"), "n1")).unwrap();
    }
    server.apply(pod("x", "elsewhere", "n2")).unwrap();
    let config = KubeSourceConfig {
        page_size: Some(2),
        pod_node_name: Some("n1".into()),
        ..config()
    };
    let mut rx = start(&server, config).await;
    assert_eq!(pod_names(&rx.borrow()), ["p0", "p1", "p2", "p3", "p4"]);
    let requests = server.requests();
    let pages = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && r.contains("limit=2"))
        .count();
    assert_eq!(pages, 3, "{requests:#?}");
    assert!(requests.iter().any(|r| r.contains("continue=")));
    // Scheduled onto this node later: appears; moved away: disappears.
    server.apply(pod("x", "elsewhere", "n1")).unwrap();
    server.apply(pod("x", "p0", "n2")).unwrap();
    let want = ["elsewhere", "p1", "p2", "p3", "p4"];
    wait_for(&mut rx, "the node's pods", |s| pod_names(s) == want).await;
}

#[tokio::test]
async fn a_burst_of_events_is_one_snapshot() {
    let server = fake().await;
    let mut rx = start(
        &server,
        KubeSourceConfig {
            debounce: Duration::from_millis(300),
            ..config()
        },
    )
    .await;
    let documents: Vec<String> = (0..50)
        .map(|i| pod("x", &format!("p{i}"), "n1").to_string())
        .collect();
    server.apply_yaml(&documents.join("\n---\n")).unwrap();
    let snapshot = wait_for(&mut rx, "the burst", |s| s.len() == 50).await;
    assert_eq!(snapshot.version(), 2, "one snapshot for the whole burst");
}

#[tokio::test]
async fn no_kinds_is_ready_and_empty() {
    let server = fake().await;
    let rx = start(
        &server,
        KubeSourceConfig {
            kinds: Vec::new(),
            ..config()
        },
    )
    .await;
    assert!(rx.borrow().is_empty());
    assert!(server.requests().is_empty());
}

#[test]
fn backoff_doubles_to_the_cap_and_resets() {
    let mut backoff =
        ExponentialBackoff::new(Duration::from_millis(100), Duration::from_millis(350));
    let delays: Vec<Duration> = (0..4).map(|_| backoff.next().unwrap()).collect();
    let within = |d: Duration, base: u64| {
        d >= Duration::from_millis(base * 3 / 4) && d <= Duration::from_millis(base * 5 / 4)
    };
    for (delay, base) in delays.iter().zip([100, 200, 350, 350]) {
        assert!(within(*delay, base), "{delays:?}");
    }
    backoff.reset();
    assert!(within(backoff.next().unwrap(), 100));
}

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn query_of(request: &Request<Body>) -> Vec<(String, String)> {
    let query = request.uri().query().unwrap_or("");
    form_pairs(query)
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.replace("%3D", "=").replace("%2F", "/"))
        })
        .collect()
}

fn has(query: &[(String, String)], key: &str, value: &str) -> bool {
    query.iter().any(|(k, v)| k == key && v == value)
}

fn respond(send: mock::SendResponse<Response<Body>>, body: Value) {
    // Newline-terminated: watch bodies are JSON lines.
    let mut bytes = serde_json::to_vec(&body).unwrap();
    bytes.push(b'\n');
    send.send_response(Response::builder().body(Body::from(bytes)).unwrap());
}

/// A source over a `tower-test` mock; returns the handle that sees each request.
fn mocked(config: KubeSourceConfig) -> (KubeSource, Handle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (
        KubeSource::new(Client::new(service, "default"), config),
        handle,
    )
}

#[tokio::test]
async fn pod_requests_carry_the_node_selector_page_size_and_list_version() {
    let config = KubeSourceConfig {
        kinds: vec![Kind::Pod],
        pod_node_name: Some("n1".into()),
        page_size: Some(7),
        ..config()
    };
    let (source, mut handle) = mocked(config);
    let mut rx = source.subscribe();
    tokio::spawn(source.run());
    let (request, send) = tokio::time::timeout(WAIT, handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.method(), http::Method::GET);
    assert_eq!(request.uri().path(), "/api/v1/pods");
    let query = query_of(&request);
    assert!(
        has(&query, "fieldSelector", "spec.nodeName=n1"),
        "{query:?}"
    );
    assert!(has(&query, "limit", "7"), "{query:?}");
    assert!(!query.iter().any(|(k, _)| k == "watch"), "{query:?}");
    let item = pod("x", "a", "n1");
    respond(
        send,
        json!({"kind": "PodList", "apiVersion": "v1",
                         "metadata": {"resourceVersion": "41"}, "items": [item]}),
    );

    let (request, send) = tokio::time::timeout(WAIT, handle.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(request.uri().path(), "/api/v1/pods");
    let query = query_of(&request);
    for (key, value) in [
        ("watch", "true"),
        ("resourceVersion", "41"),
        ("allowWatchBookmarks", "true"),
        ("fieldSelector", "spec.nodeName=n1"),
    ] {
        assert!(has(&query, key, value), "{key}={value} in {query:?}");
    }
    let mut object = pod("x", "b", "n1");
    object["metadata"]["resourceVersion"] = "42".into();
    let added = json!({"type": "ADDED", "object": object});
    respond(send, added);
    let snapshot = wait_for(&mut rx, "the mocked pods", |s| s.len() == 2).await;
    assert_eq!(pod_names(&snapshot), ["a", "b"]);
    // The watch ended: it resumes from the last event's version, without relisting.
    let (request, _send) = tokio::time::timeout(WAIT, handle.next_request())
        .await
        .unwrap()
        .unwrap();
    let query = query_of(&request);
    assert!(
        has(&query, "watch", "true") && has(&query, "resourceVersion", "42"),
        "{query:?}"
    );
}

#[tokio::test]
async fn every_kind_is_listed_at_its_api_path() {
    for &kind in Kind::ALL {
        let config = KubeSourceConfig {
            kinds: vec![kind],
            page_size: None,
            ..config()
        };
        let (source, mut handle) = mocked(config);
        let task = tokio::spawn(source.run());
        let (request, _send) = tokio::time::timeout(WAIT, handle.next_request())
            .await
            .unwrap()
            .unwrap();
        let want = if kind.group().is_empty() {
            format!("/api/{}/{}", kind.version(), kind.plural())
        } else {
            format!(
                "/apis/{}/{}/{}",
                kind.group(),
                kind.version(),
                kind.plural()
            )
        };
        assert_eq!(request.uri().path(), want, "{kind}");
        assert!(
            !query_of(&request).iter().any(|(k, _)| k == "limit"),
            "{kind}: no paging"
        );
        task.abort();
    }
}
