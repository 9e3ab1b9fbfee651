//! Admin HTTP endpoints of the node agent.
//!
//! * `GET /healthz/ready`: 200 once the config was loaded and the first reconcile pass ran,
//!   503 before. Readiness does not wait for a ztunnel: the agent must be up first so ztunnel can
//!   connect to it.
//! * `GET /status`: JSON with every pod of the node, its enrollment decision and redirection
//!   state, the config files' health and the connected ztunnels.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::reconcile::AgentStatus;
use crate::zds::{ConnectionPhase, ZdsHandle};

/// Path of the readiness endpoint.
pub const READY_PATH: &str = "/healthz/ready";
/// Path of the status endpoint.
pub const STATUS_PATH: &str = "/status";

// Slow or idle clients cannot hold a connection open without sending a request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The listener could not be bound.
    #[error("cannot bind admin listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What the endpoints read.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// The reconciler's status.
    pub status: watch::Receiver<Arc<AgentStatus>>,
    /// The ZDS server, for connected ztunnels.
    pub zds: ZdsHandle,
}

/// One connected ztunnel in `/status`.
#[derive(Debug, Serialize)]
struct ZtunnelReport {
    id: u64,
    phase: &'static str,
}

#[derive(Debug, Serialize)]
struct StatusResponse<'a> {
    #[serde(flatten)]
    agent: &'a AgentStatus,
    ztunnels: Vec<ZtunnelReport>,
}

/// The bound admin server. Bind with [`AdminServer::bind`], serve with [`AdminServer::run`].
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`AdminServer::address`]).
    pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener, state })
    }

    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        // A bound listener always knows its address; fall back to nothing useful rather than panic.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until the future is dropped.
    pub async fn run(self) {
        info!(addr = %self.address(), "admin server listening");
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let state = self.state.clone();
                    tokio::spawn(serve_connection(stream, state));
                }
                Err(error) => {
                    warn!(%error, "admin accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: AdminState) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &state);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    // Errors here are clients hanging up; nothing to act on.
    let _ = connection.await;
}

/// The response to `request` (pure apart from reading the state).
pub fn respond<B>(request: &Request<B>, state: &AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    let status = state.status.borrow().clone();
    match request.uri().path() {
        READY_PATH if status.ready => text(StatusCode::OK, "ready\n"),
        READY_PATH => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first reconcile pass has not completed\n",
        ),
        STATUS_PATH => status_json(&status, &state.zds),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz/ready or /status\n",
        ),
    }
}

fn status_json(status: &AgentStatus, zds: &ZdsHandle) -> Response<Full<Bytes>> {
    let ztunnels = zds
        .status()
        .connections
        .into_iter()
        .map(|c| ZtunnelReport {
            id: c.id,
            phase: match c.phase {
                ConnectionPhase::Snapshot => "snapshot",
                ConnectionPhase::Ready => "ready",
            },
        })
        .collect();
    let body = StatusResponse {
        agent: status,
        ztunnels,
    };
    match serde_json::to_vec_pretty(&body) {
        Ok(json) => {
            let mut response = Response::new(Full::new(Bytes::from(json)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                "application/json".parse().expect("static header"),
            );
            response
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode status: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::PodReport;
    use crate::zds::ZdsServer;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn state(
        ready: bool,
    ) -> (
        AdminState,
        watch::Sender<Arc<AgentStatus>>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let zds = ZdsServer::bind(dir.path().join("z.sock")).unwrap().handle();
        let status = AgentStatus {
            node: "n1".into(),
            ready,
            pods: vec![PodReport {
                uid: "shop/a".into(),
                namespace: "shop".into(),
                name: "a".into(),
                ips: vec!["10.0.0.1".into()],
                enrolled: true,
                skip_reason: None,
                redirection: Some(crate::reconcile::Redirection::Pending),
                netns: Some("/run/netns/a".into()),
                netns_inode: Some(7),
                error: Some("no ztunnel connected".into()),
                failures: 0,
            }],
            ..AgentStatus::default()
        };
        let (tx, rx) = watch::channel(Arc::new(status));
        (AdminState { status: rx, zds }, tx, dir)
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn readiness_follows_the_first_pass() {
        let (state, tx, _dir) = state(false);
        assert_eq!(
            respond(&get(READY_PATH), &state).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        tx.send_modify(|s| Arc::make_mut(s).ready = true);
        let response = respond(&get(READY_PATH), &state);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response).await, "ready\n");
    }

    #[tokio::test]
    async fn status_is_json_with_pods_and_ztunnels() {
        let (state, _tx, _dir) = state(true);
        let response = respond(&get(STATUS_PATH), &state);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let json: serde_json::Value = serde_json::from_str(&body(response).await).unwrap();
        assert_eq!(json["node"], "n1");
        assert_eq!(json["pods"][0]["redirection"], "pending");
        assert_eq!(json["pods"][0]["netns"], "/run/netns/a");
        assert_eq!(json["ztunnels"], serde_json::json!([]));
        assert_eq!(json["config"]["version"], 0);
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let (state, _tx, _dir) = state(true);
        assert_eq!(
            respond(&get("/nope"), &state).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post(STATUS_PATH).body(()).unwrap();
        assert_eq!(
            respond(&post, &state).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn serves_http_on_a_bound_port() {
        let (state, _tx, _dir) = state(true);
        let server = AdminServer::bind("127.0.0.1:0".parse().unwrap(), state)
            .await
            .unwrap();
        let addr = server.address();
        let task = tokio::spawn(server.run());
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with("ready\n"), "{reply}");
        task.abort();
    }

    #[tokio::test]
    async fn bind_conflict_is_a_clear_error() {
        let (state, _tx, _dir) = state(true);
        let first = AdminServer::bind("127.0.0.1:0".parse().unwrap(), state.clone())
            .await
            .unwrap();
        let err = AdminServer::bind(first.address(), state).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot bind admin listener on 127.0.0.1:"),
            "{err}"
        );
    }
}
