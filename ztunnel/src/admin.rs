//! The admin server (loopback by default): `/healthz/ready`, `/config_dump`, `/metrics` and
//! `POST /quitquitquit`. It runs on the control runtime, away from the data plane.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::readiness::Readiness;

/// Produces the `/config_dump` document.
pub type DumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound.
    #[error("cannot bind the admin server on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the endpoints serve.
#[derive(Clone)]
pub struct AdminState {
    /// Startup tasks still pending.
    pub readiness: Readiness,
    /// `/config_dump`.
    pub dump: DumpFn,
    /// `/metrics`.
    pub metrics: PrometheusHandle,
    /// Cancelled by `POST /quitquitquit`.
    pub shutdown: CancellationToken,
}

/// The bound admin server.
pub struct AdminServer {
    listener: TcpListener,
    state: AdminState,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks one; see [`Self::address`]).
    pub async fn bind(addr: SocketAddr, state: AdminState) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener, state })
    }

    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        info!(address = %self.address(), "admin server listening");
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => { conns.spawn(serve_conn(stream, self.state.clone())); }
                    Err(error) => warn!(%error, "admin accept failed"),
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    }
}

async fn serve_conn(stream: tokio::net::TcpStream, state: AdminState) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&state, &req)) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    if let Err(error) = conn.await {
        debug!(%error, "admin connection failed");
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => ready(state),
        (&Method::GET, "/config_dump") => {
            let body = serde_json::to_string_pretty(&(state.dump)()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/metrics" | "/stats/prometheus") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        (&Method::POST, "/quitquitquit") => {
            info!("shutdown requested through the admin server");
            state.shutdown.cancel();
            reply(StatusCode::OK, "text/plain", "shutting down\n".into())
        }
        (_, "/quitquitquit") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST\n".into(),
        ),
        (_, path) => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no admin endpoint {path}; try /healthz/ready, /config_dump, /metrics\n"),
        ),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        reply(StatusCode::OK, "text/plain", "ready\n".into())
    } else {
        let body = format!("not ready: waiting for {}\n", pending.join(", "));
        reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", body)
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
