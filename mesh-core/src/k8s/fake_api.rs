//! (features `testing` + `kube`) An in-process fake Kubernetes API server for tests.
//!
//! It speaks the subset of the API that list/watch clients use, over plain HTTP/1.1 on loopback:
//!
//! * **list** — `GET /api/v1/<plural>`, `/apis/<group>/<version>/<plural>`, and the
//!   `/namespaces/<ns>/` forms; `limit` / `continue` chunking; `fieldSelector` and
//!   `labelSelector` with `=`, `==` and `!=` terms; a `metadata.resourceVersion` on every list.
//! * **watch** — `?watch=1` / `watch=true`: a chunked stream of JSON event lines (`ADDED`,
//!   `MODIFIED`, `DELETED`, `BOOKMARK` when `allowWatchBookmarks` is set) starting after the
//!   requested `resourceVersion` (no version: the current objects as `ADDED` first), ending after
//!   `timeoutSeconds`. Objects moving in or out of a selector arrive as `ADDED` / `DELETED`.
//! * **410 Gone** — history is kept until the test compacts it ([`FakeApiServer::compact`]); a
//!   watch from an older version gets an `ERROR` event with a `Status` of code 410 (as the real
//!   server sends it), an expired `continue` token gets HTTP 410.
//! * **404** for resources that are not registered (a CRD that is not installed).
//!
//! It is a test double, not an API server: no writes over HTTP, no discovery, no
//! authentication, later list pages come from the current objects rather than the first page's
//! revision. Nothing here has been compared with a real API server beyond the protocol rules
//! above.

mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use store::FakeStore;
use store::{Failure, Query, parse_selector};

use super::Kind;

type Body = BoxBody<Bytes, Infallible>;

/// Errors of the fake API server's test interface.
#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    /// The listener could not be bound.
    #[error("cannot bind the fake api server: {0}")]
    Bind(#[source] std::io::Error),
    /// No registered resource has this `kind` and `apiVersion`.
    #[error("resource type not registered: {0}")]
    NotRegistered(String),
    /// The object to delete does not exist.
    #[error("object not found: {0}")]
    NotFound(String),
    /// The object is not a usable Kubernetes object.
    #[error("invalid object: {0}")]
    Invalid(&'static str),
    /// A YAML document did not parse.
    #[error("invalid yaml: {0}")]
    Yaml(#[from] serde_yaml::Error),
}

/// A resource type the fake serves: where (group, version, plural) and what (kind, scope).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeResource {
    /// API group; empty for the core group.
    pub group: String,
    /// API version within the group.
    pub version: String,
    /// The `kind` of its objects.
    pub kind: String,
    /// Plural name in paths.
    pub plural: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
}

impl FakeResource {
    /// A resource type from its parts.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_owned(),
            version: version.to_owned(),
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            namespaced,
        }
    }

    /// The resource type the API server serves for `kind`.
    pub fn of(kind: Kind) -> Self {
        Self::new(
            kind.group(),
            kind.version(),
            kind.name(),
            kind.plural(),
            kind.namespaced(),
        )
    }

    /// `group/version`, or just the version for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

struct Shared {
    store: Mutex<FakeStore>,
    // Bumped after every change, so open watches look for new events.
    changed: watch::Sender<u64>,
    bookmark_interval: Mutex<Duration>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, FakeStore> {
        // A panicking test thread must not hide the store from the rest of the test.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A running fake API server on `127.0.0.1:<port>`; stops when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _tasks: JoinSet<()>,
}

impl FakeApiServer {
    /// Starts a server with no resources registered.
    pub async fn start() -> Result<Self, FakeApiError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(FakeApiError::Bind)?;
        let addr = listener.local_addr().map_err(FakeApiError::Bind)?;
        let shared = Arc::new(Shared {
            store: Mutex::new(FakeStore::default()),
            changed: watch::channel(0).0,
            bookmark_interval: Mutex::new(Duration::from_secs(60)),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            shared,
            _tasks: tasks,
        })
    }

    /// The server's base URL (`http://127.0.0.1:<port>`).
    pub fn uri(&self) -> http::Uri {
        format!("http://{}", self.addr)
            .parse()
            .expect("a socket address is a valid authority")
    }

    /// A `kube` client pointed at this server.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(kube::Config::new(self.uri()))
            .expect("a plain-http config without credentials always builds a client")
    }

    /// Serves `resource` from now on.
    pub fn register(&self, resource: FakeResource) {
        self.shared.lock().register(resource);
    }

    /// Serves the resource type of each of `kinds`.
    pub fn register_kinds(&self, kinds: &[Kind]) {
        let mut store = self.shared.lock();
        for &kind in kinds {
            store.register(FakeResource::of(kind));
        }
    }

    /// How often an idle watch that asked for bookmarks gets one (default 60 s).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// Creates or replaces an object (see [`FakeStore::apply`]); returns its resource version.
    pub fn apply(&self, object: Value) -> Result<u64, FakeApiError> {
        self.edit(|store| store.apply(object))
    }

    /// Applies every document of a YAML (or JSON) text; returns the last resource version.
    pub fn apply_yaml(&self, text: &str) -> Result<u64, FakeApiError> {
        let mut objects = Vec::new();
        for document in serde_yaml::Deserializer::from_str(text) {
            let value: Value = serde::Deserialize::deserialize(document)?;
            if !value.is_null() {
                objects.push(value);
            }
        }
        self.edit(|store| {
            let mut rv = store.resource_version();
            for object in objects {
                rv = store.apply(object)?;
            }
            Ok(rv)
        })
    }

    /// Deletes an object (see [`FakeStore::delete`]); returns the new resource version.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<u64, FakeApiError> {
        self.edit(|store| store.delete(api_version, kind, namespace, name))
    }

    /// Forgets the history up to now (see [`FakeStore::compact`]).
    pub fn compact(&self) {
        self.edit(FakeStore::compact);
    }

    /// Simulates an API server restart with compaction, atomically: every open watch ends
    /// without seeing anything `changes` does, then the history is compacted. Clients resume
    /// their watches from versions that are now too old, get 410 Gone, and must relist to see
    /// the changes.
    pub fn during_outage<R>(&self, changes: impl FnOnce(&mut FakeStore) -> R) -> R {
        self.edit(|store| {
            store.epoch += 1;
            let result = changes(store);
            store.compact();
            result
        })
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    fn edit<R>(&self, f: impl FnOnce(&mut FakeStore) -> R) -> R {
        let result = f(&mut self.shared.lock());
        self.shared.notify();
        result
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: let it pass rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request)) }
            });
            // A client hanging up mid-response is normal for watches.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let uri = request.uri().clone();
    shared
        .lock()
        .requests
        .push(format!("{} {}", request.method(), uri));
    if request.method() != Method::GET {
        let failure = Failure::new(405, "MethodNotAllowed", "the fake api server is read-only");
        return failure_response(&failure);
    }
    let params = parse_query(uri.query().unwrap_or(""));
    let param = |name: &str| param(&params, name);
    let query = match resolve(shared, uri.path(), &params) {
        Ok(query) => query,
        Err(failure) => return failure_response(&failure),
    };
    if matches!(param("watch"), Some("1" | "true")) {
        let options = WatchOptions {
            from: param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0),
            bookmarks: matches!(param("allowWatchBookmarks"), Some("1" | "true")),
            timeout: param("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs),
        };
        return watch_response(shared.clone(), query, options);
    }
    let limit = param("limit").and_then(|v| v.parse().ok());
    match shared.lock().list(&query, limit, param("continue")) {
        Ok(list) => json_response(StatusCode::OK, &list),
        Err(failure) => failure_response(&failure),
    }
}

/// The resource and namespace a path names, with the request's selectors.
fn resolve(shared: &Shared, path: &str, params: &[(String, String)]) -> Result<Query, Failure> {
    let not_found = || {
        Failure::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some((*ns).to_owned()), *plural),
        _ => return Err(not_found()),
    };
    let store = shared.lock();
    let resource = store.find(group, version, plural).ok_or_else(not_found)?;
    if namespace.is_some() && !store.namespaced(resource) {
        return Err(not_found());
    }
    let selector = |name: &str| {
        parse_selector(param(params, name).unwrap_or(""))
            .map_err(|e| Failure::new(400, "BadRequest", e))
    };
    Ok(Query {
        resource,
        namespace,
        fields: selector("fieldSelector")?,
        labels: selector("labelSelector")?,
    })
}

struct WatchOptions {
    from: Option<u64>,
    bookmarks: bool,
    timeout: Option<Duration>,
}

fn watch_response(shared: Arc<Shared>, query: Query, options: WatchOptions) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_events(shared, query, options, tx));
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed())
        .expect("static response parts are valid")
}

/// Feeds one watch until its timeout, an outage, 410 Gone, or the client leaving.
async fn stream_events(
    shared: Arc<Shared>,
    query: Query,
    options: WatchOptions,
    tx: mpsc::Sender<Bytes>,
) {
    // Subscribe before the first read so no change between the two is missed.
    let mut changed = shared.changed.subscribe();
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let deadline = options
        .timeout
        .map_or(far, |t| tokio::time::Instant::now() + t);
    let epoch = shared.lock().epoch;
    let mut after = options.from;
    loop {
        let batch = {
            let store = shared.lock();
            if store.epoch != epoch {
                return;
            }
            match after {
                None => Ok(store.current_as_added(&query)),
                Some(after) => store.watch_batch(&query, after),
            }
        };
        let (lines, upto) = match batch {
            Ok(batch) => batch,
            Err(gone) => {
                let _ = tx.send(line_bytes(&gone)).await;
                return;
            }
        };
        after = Some(upto);
        for line in lines {
            if tx.send(line_bytes(&line)).await.is_err() {
                return;
            }
        }
        let interval = *shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tokio::select! {
            changed = changed.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(interval), if options.bookmarks => {
                let bookmark = shared.lock().bookmark(&query, upto);
                if tx.send(line_bytes(&bookmark)).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

fn line_bytes(line: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(line).expect("json values always serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("json values always serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("static response parts are valid")
}

fn failure_response(failure: &Failure) -> Response<Body> {
    let status = StatusCode::from_u16(failure.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &failure.status())
}

/// The value of query parameter `name`, if present.
fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `a=b&c=d` with percent-decoding (`+` is a space, as in forms).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
