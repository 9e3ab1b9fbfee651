use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::*;

const WAIT: Duration = Duration::from_secs(5);

async fn server() -> FakeApiServer {
    let server = FakeApiServer::start().await.unwrap();
    server.register(FakeResource::new("", "v1", "Pod", "pods", true));
    server.register(FakeResource::new(
        "",
        "v1",
        "Namespace",
        "namespaces",
        false,
    ));
    server.register(FakeResource::new(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
        true,
    ));
    server
}

fn pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}})
}

/// Sends a GET and returns the status code and body (the whole response; not for watches).
async fn get(server: &FakeApiServer, path: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    let status = reply[9..12].parse().unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap())
}

/// Opens a watch and returns a reader positioned at the first chunk.
async fn open_watch(server: &FakeApiServer, path: &str) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            return reader;
        }
    }
}

/// The next JSON event line of a chunked watch, or `None` at its end.
async fn next_event(reader: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut line = String::new();
    loop {
        line.clear();
        let read = tokio::time::timeout(WAIT, reader.read_line(&mut line));
        if read.await.unwrap().unwrap() == 0 {
            return None;
        }
        let trimmed = line.trim();
        // Chunk-size lines are hex numbers; "0" ends the body.
        if trimmed == "0" {
            return None;
        }
        if trimmed.starts_with('{') {
            return Some(serde_json::from_str(trimmed).unwrap());
        }
    }
}

#[tokio::test]
async fn list_pages_paths_and_errors() {
    let server = server().await;
    for name in ["a", "b", "c"] {
        server.apply(pod("x", name)).unwrap();
    }
    server.apply(pod("y", "d")).unwrap();
    let (code, page) = get(&server, "/api/v1/pods?limit=2").await;
    assert_eq!(code, 200);
    assert_eq!(page["kind"], "PodList");
    assert_eq!(page["metadata"]["resourceVersion"], "4");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let token = page["metadata"]["continue"]
        .as_str()
        .unwrap()
        .replace('/', "%2F");
    let (_, page) = get(&server, &format!("/api/v1/pods?limit=2&continue={token}")).await;
    let names: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, ["c", "d"]);
    assert!(page["metadata"].get("continue").is_none());

    let (_, page) = get(&server, "/api/v1/namespaces/y/pods").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let (_, page) = get(&server, "/api/v1/pods?fieldSelector=metadata.namespace%3Dx").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3);

    let (code, status) = get(&server, "/apis/networking.istio.io/v1/sidecars").await;
    assert_eq!((code, status["reason"].clone()), (404, "NotFound".into()));
    let (code, _) = get(&server, "/apis/security.istio.io/v1/authorizationpolicies").await;
    assert_eq!(code, 200);
    let (code, _) = get(&server, "/api/v1/namespaces/x/namespaces").await;
    assert_eq!(
        code, 404,
        "cluster-scoped resources have no namespaced path"
    );
    let (code, status) = get(&server, "/api/v1/pods?labelSelector=app+in+(a)").await;
    assert_eq!(code, 400);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("unsupported selector term")
    );
    assert!(server.requests()[0].starts_with("GET /api/v1/pods?limit=2"));
}

#[tokio::test]
async fn watch_streams_events_bookmarks_and_ends() {
    let server = server().await;
    server.apply(pod("x", "a")).unwrap();
    server.set_bookmark_interval(Duration::from_millis(50));
    let mut watch = open_watch(
        &server,
        "/api/v1/pods?watch=1&resourceVersion=1&allowWatchBookmarks=true",
    )
    .await;
    server.apply(pod("x", "b")).unwrap();
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    server.delete("v1", "Pod", "x", "a").unwrap();
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!(event["type"], "DELETED");
    assert_eq!(event["object"]["metadata"]["resourceVersion"], "3");
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!(event["type"], "BOOKMARK");
    assert_eq!(event["object"]["metadata"]["resourceVersion"], "3");

    // No resource version: the current objects first. timeoutSeconds ends the stream.
    let mut watch = open_watch(&server, "/api/v1/pods?watch=true&timeoutSeconds=1").await;
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    assert!(next_event(&mut watch).await.is_none());
}

#[tokio::test]
async fn expired_versions_get_410_and_outages_end_watches() {
    let server = server().await;
    server.apply(pod("x", "a")).unwrap();
    let mut open = open_watch(&server, "/api/v1/pods?watch=1&resourceVersion=1").await;
    server.during_outage(|store| store.apply(pod("x", "b")).unwrap());
    assert!(
        next_event(&mut open).await.is_none(),
        "the outage ends the watch unseen"
    );
    let mut watch = open_watch(&server, "/api/v1/pods?watch=1&resourceVersion=1").await;
    let event = next_event(&mut watch).await.unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    assert!(next_event(&mut watch).await.is_none());
    let (code, _) = get(&server, "/api/v1/pods?limit=1&continue=1%2Fx%2Fa").await;
    assert_eq!(code, 410);
    server.compact();
    let (code, list) = get(&server, "/api/v1/pods").await;
    assert_eq!((code, list["items"].as_array().unwrap().len()), (200, 2));
}

#[tokio::test]
async fn test_interface_reports_bad_input() {
    let server = server().await;
    assert!(matches!(
        server.apply_yaml("a: [b"),
        Err(FakeApiError::Yaml(_))
    ));
    let err = server.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n");
    assert_eq!(
        err.unwrap_err().to_string(),
        "resource type not registered: Service (v1)"
    );
    let rv = server.apply_yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: n, namespace: ignored}\n---\n",
    );
    assert_eq!(rv.unwrap(), 1);
    let (_, list) = get(&server, "/api/v1/namespaces").await;
    assert!(list["items"][0]["metadata"].get("namespace").is_none());
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"DELETE /api/v1/namespaces HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
}
