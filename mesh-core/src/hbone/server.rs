//! The HBONE server: mTLS + HTTP/2 `CONNECT` termination on port 15008.
//!
//! Bind with [`HboneServer::new`] (or hand over a listener opened elsewhere, e.g. inside a pod's
//! network namespace, with [`HboneServer::from_listener`]), then [`HboneServer::run`] it. Each
//! accepted connection gets the certificate [`ServerCerts`] picks for the socket's *local*
//! address; each `CONNECT` goes to the [`ConnectHandler`], and only once the handler accepted
//! (authorized and connected upstream) does the client get its `200`.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::{ConnectTarget, ErrorKind, H2Settings, Tunnel, keepalive};
use crate::copy::{CopyError, Plain, Transferred, copy_bidirectional};
use crate::identity::Identity;
use crate::tls::{HandshakeError, WorkloadTls, classify_handshake_error, peer_identity};

/// A boxed error from a caller-provided hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Picks the certificate for a connection from the local address it was accepted on (ztunnel
/// serves each pod's identity on that pod's own listener).
pub trait ServerCerts: Send + Sync + 'static {
    /// The certificate and trust bundle to use for a connection accepted on `local`.
    fn server_certificate(
        &self,
        local: SocketAddr,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>>;
}

/// One certificate for every local address.
impl ServerCerts for Arc<WorkloadTls> {
    fn server_certificate(
        &self,
        _local: SocketAddr,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>> {
        Box::pin(std::future::ready(Ok(self.clone())))
    }
}

/// A `CONNECT` the handler must decide on.
#[derive(Debug)]
pub struct InboundRequest {
    /// Where the client wants to go (the `:authority`).
    pub target: ConnectTarget,
    /// The request headers (`baggage`, `forwarded`, `traceparent`, ...).
    pub headers: HeaderMap,
    /// The client's SPIFFE identity, from its verified certificate (shared by the connection's
    /// streams).
    pub peer_identity: Arc<Identity>,
    /// The client's TCP address.
    pub peer_addr: SocketAddr,
    /// The local address the connection was accepted on.
    pub local_addr: SocketAddr,
    /// The identity we presented on this connection.
    pub local_identity: Identity,
}

/// A refused `CONNECT`: the status sent to the client and a reason for our logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    reason: String,
}

impl Rejection {
    /// A rejection with any status.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }

    /// `400`: malformed request (bad authority, IP mismatch, ...).
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason)
    }

    /// `401`: authorization policy denied the connection.
    pub fn denied(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, reason)
    }

    /// `503`: unknown destination or upstream connect failure.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason)
    }

    /// The status sent to the client.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Why (for logs; never sent to the client).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The failure kind for metrics.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::from_status(self.status)
    }
}

/// A connected upstream stream.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpstreamIo for T {}

/// Called once when a tunnel ends, with the bytes moved (`a_to_b` = client to upstream).
pub type CloseHook = Box<dyn FnOnce(&Result<Transferred, CopyError>) + Send>;

/// An accepted `CONNECT`: the upstream to splice the tunnel to, and extra response headers.
pub struct Accepted {
    upstream: Box<dyn UpstreamIo>,
    headers: HeaderMap,
    on_close: Option<CloseHook>,
}

impl Accepted {
    /// Accepts with this upstream (already connected; PROXY header already written if any).
    pub fn new(upstream: impl UpstreamIo + 'static) -> Self {
        Self {
            upstream: Box::new(upstream),
            headers: HeaderMap::new(),
            on_close: None,
        }
    }

    /// Adds headers to the `200` response (e.g. `baggage` describing the destination).
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Runs `hook` when the tunnel ends (for access logs and byte counters).
    pub fn on_close(
        mut self,
        hook: impl FnOnce(&Result<Transferred, CopyError>) + Send + 'static,
    ) -> Self {
        self.on_close = Some(Box::new(hook));
        self
    }
}

/// Decides on each `CONNECT`: authorize, connect upstream, accept or reject.
pub trait ConnectHandler: Send + Sync + 'static {
    /// Returns the upstream to splice to, or the status to refuse with.
    fn handle(
        &self,
        request: InboundRequest,
    ) -> impl Future<Output = Result<Accepted, Rejection>> + Send;
}

/// Timeouts and HTTP/2 settings of the server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// HTTP/2 settings (defaults: [`H2Settings::server`]).
    pub h2: H2Settings,
    /// Time allowed for the TLS and the HTTP/2 handshake, each.
    pub handshake_timeout: Duration,
    /// How long open tunnels may run after a drain starts before they are cut.
    pub drain_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            h2: H2Settings::server(),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the listening socket failed.
    #[error("cannot bind the hbone listener on {addr}: {source}")]
    Bind {
        /// The requested address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A listener handed over could not be used.
    #[error("cannot use the hbone listener: {0}")]
    Listener(#[source] io::Error),
}

/// Why one inbound connection failed before serving any stream.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("no certificate for local address {local}: {source}")]
    Certificate { local: SocketAddr, source: BoxError },
    #[error("tls handshake timed out after {0:?}")]
    TlsTimeout(Duration),
    #[error(transparent)]
    Tls(#[from] HandshakeError),
    #[error("peer certificate carries no spiffe identity")]
    NoPeerIdentity,
    #[error("http/2 handshake failed: {0}")]
    H2(#[source] h2::Error),
    #[error("http/2 handshake timed out after {0:?}")]
    H2Timeout(Duration),
}

impl ConnError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Certificate { .. } => ErrorKind::NoCertificate,
            Self::TlsTimeout(_) | Self::H2Timeout(_) => ErrorKind::Timeout,
            Self::Tls(HandshakeError::Identity(_)) | Self::NoPeerIdentity => ErrorKind::Identity,
            Self::Tls(_) => ErrorKind::TlsFailure,
            Self::H2(_) => ErrorKind::H2Handshake,
        }
    }
}

/// What every connection task shares.
struct Shared<H> {
    certs: Arc<dyn ServerCerts>,
    handler: Arc<H>,
    settings: ServerSettings,
    drain: CancellationToken,
}

/// Facts about one established connection, shared by its streams.
struct ConnInfo {
    peer_identity: Arc<Identity>,
    local_identity: Identity,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

/// An HBONE server bound to its listening socket.
pub struct HboneServer<H> {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared<H>>,
}

impl<H: ConnectHandler> HboneServer<H> {
    /// Binds `addr` (port 0 picks a free port; see [`Self::local_addr`]). Needs a tokio runtime.
    pub fn new(
        addr: SocketAddr,
        certs: Arc<dyn ServerCerts>,
        handler: Arc<H>,
        settings: ServerSettings,
    ) -> Result<Self, ServerError> {
        let listener = bind_listener(addr).map_err(|source| ServerError::Bind { addr, source })?;
        Self::from_listener(listener, certs, handler, settings)
    }

    /// Serves on a listener opened elsewhere (e.g. inside a pod's network namespace).
    pub fn from_listener(
        listener: TcpListener,
        certs: Arc<dyn ServerCerts>,
        handler: Arc<H>,
        settings: ServerSettings,
    ) -> Result<Self, ServerError> {
        let local_addr = listener.local_addr().map_err(ServerError::Listener)?;
        let shared = Arc::new(Shared {
            certs,
            handler,
            settings,
            drain: CancellationToken::new(),
        });
        Ok(Self {
            listener,
            local_addr,
            shared,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The token that starts a graceful drain when cancelled (stop accepting, GOAWAY, let
    /// tunnels finish up to [`ServerSettings::drain_timeout`]).
    pub fn drain_token(&self) -> CancellationToken {
        self.shared.drain.clone()
    }

    /// Accepts and serves connections until drained; returns once every connection is closed.
    pub async fn run(self) {
        let Self {
            listener, shared, ..
        } = self;
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shared.drain.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        conns.spawn(serve_connection(shared.clone(), tcp, peer));
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        finish_drain(conns, shared.settings.drain_timeout).await;
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_failed(e: io::Error) {
    // Usually EMFILE/ENFILE: back off instead of spinning on a listener that stays readable.
    warn!(error = %e, "hbone accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn finish_drain(mut conns: JoinSet<()>, deadline: Duration) {
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, all_done).await.is_err() {
        warn!(
            remaining = conns.len(),
            "hbone drain deadline reached, closing connections"
        );
        conns.shutdown().await;
    }
}

async fn serve_connection<H: ConnectHandler>(
    shared: Arc<Shared<H>>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let local = match tcp.local_addr() {
        Ok(local) => local,
        Err(e) => return debug!(%peer, error = %e, "hbone connection lost before serving"),
    };
    let span = tracing::debug_span!("hbone_inbound", %peer, %local);
    async move {
        match establish(&shared, tcp, peer, local).await {
            Ok((conn, info)) => drive(&shared, conn, Arc::new(info)).await,
            Err(e) => log_rejected(&e),
        }
    }
    .instrument(span)
    .await
}

fn log_rejected(e: &ConnError) {
    let kind = e.kind().as_str();
    match e.kind() {
        // Our own misconfiguration: someone has to act.
        ErrorKind::NoCertificate => warn!(kind, error = %e, "hbone connection rejected"),
        // A peer of our mesh with an unacceptable identity: worth seeing by default.
        ErrorKind::Identity => info!(kind, error = %e, "hbone connection rejected"),
        // Scanners, health checks, clients that went away: too common and too cheap to cause
        // for default logging (metrics count them).
        _ => debug!(kind, error = %e, "hbone connection rejected"),
    }
}

type H2Conn = h2::server::Connection<TlsStream<TcpStream>, Bytes>;

async fn establish<H>(
    shared: &Shared<H>,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
) -> Result<(H2Conn, ConnInfo), ConnError> {
    // Small CONNECT responses and interactive traffic must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let tls = shared
        .certs
        .server_certificate(local_addr)
        .await
        .map_err(|source| ConnError::Certificate {
            local: local_addr,
            source,
        })?;
    let timeout = shared.settings.handshake_timeout;
    let accept = TlsAcceptor::from(tls.server_config()).accept(tcp);
    let stream = tokio::time::timeout(timeout, accept)
        .await
        .map_err(|_| ConnError::TlsTimeout(timeout))?
        .map_err(classify_handshake_error)?;
    let peer_identity = peer_identity(stream.get_ref().1).ok_or(ConnError::NoPeerIdentity)?;
    let handshake = h2_builder(&shared.settings.h2).handshake(stream);
    let conn = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ConnError::H2Timeout(timeout))?
        .map_err(ConnError::H2)?;
    let info = ConnInfo {
        peer_identity: Arc::new(peer_identity),
        local_identity: tls.identity().clone(),
        peer_addr,
        local_addr,
    };
    Ok((conn, info))
}

fn h2_builder(s: &H2Settings) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(s.stream_window.min(super::MAX_WINDOW))
        .initial_connection_window_size(s.connection_window.min(super::MAX_WINDOW))
        .max_frame_size(super::clamp_frame_size(s.max_frame_size))
        .max_header_list_size(s.max_header_list_size)
        .max_send_buffer_size(s.max_send_buffer)
        .max_concurrent_reset_streams(super::MAX_REMEMBERED_RESETS)
        .max_local_error_reset_streams(None);
    if let Some(n) = s.max_concurrent_streams {
        b.max_concurrent_streams(n);
    }
    b
}

/// Serves the streams of one connection until it closes, is drained, or stops answering PINGs.
async fn drive<H: ConnectHandler>(shared: &Shared<H>, mut conn: H2Conn, info: Arc<ConnInfo>) {
    // Owned here so that a connection cut at the drain deadline takes its tunnels with it.
    let mut streams = JoinSet::new();
    accept_streams(shared, &mut conn, &info, &mut streams).await;
    // Tunnels may still be delivering what the client sent before it went away. Dropping the
    // connection first makes every h2 call of theirs fail at once, so none can hang on it.
    drop(conn);
    while streams.join_next().await.is_some() {}
}

async fn accept_streams<H: ConnectHandler>(
    shared: &Shared<H>,
    conn: &mut H2Conn,
    info: &Arc<ConnInfo>,
    streams: &mut JoinSet<()>,
) {
    let h2 = &shared.settings.h2;
    let keepalive = keepalive(
        conn.ping_pong(),
        h2.keepalive_interval,
        h2.keepalive_timeout,
    );
    tokio::pin!(keepalive);
    let mut draining = false;
    loop {
        tokio::select! {
            request = conn.accept() => match request {
                Some(Ok((request, respond))) => {
                    let handler = shared.handler.clone();
                    streams.spawn(serve_stream(handler, info.clone(), request, respond));
                }
                Some(Err(e)) => return debug!(error = %e, "hbone connection failed"),
                None => return debug!("hbone connection closed"),
            },
            _ = shared.drain.cancelled(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            reason = &mut keepalive => {
                conn.abrupt_shutdown(Reason::NO_ERROR);
                return info!(%reason, "dropping unresponsive hbone connection");
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// One CONNECT stream. Accepting it (parsing, the handler's checks and upstream connect, the
/// response) runs as a boxed future freed once the tunnel is up, so the task that lives as long as
/// the tunnel holds only the tunnel, the upstream and the copy state.
async fn serve_stream<H: ConnectHandler>(
    handler: Arc<H>,
    info: Arc<ConnInfo>,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let Some(open) = Box::pin(accept_stream(handler, info, request, respond)).await else {
        return;
    };
    let OpenTunnel {
        mut tunnel,
        upstream,
        on_close,
        target,
    } = open;
    let result = copy_bidirectional(&mut tunnel, &mut Plain(upstream)).await;
    match &result {
        Ok(t) => debug!(%target, to_upstream = t.a_to_b, from_upstream = t.b_to_a, "tunnel closed"),
        Err(e) => debug!(%target, error = %e, "tunnel failed"),
    }
    if let Some(hook) = on_close {
        hook(&result);
    }
}

/// An accepted tunnel, ready to carry bytes.
struct OpenTunnel {
    tunnel: Tunnel,
    upstream: Box<dyn UpstreamIo>,
    on_close: Option<CloseHook>,
    target: ConnectTarget,
}

async fn accept_stream<H: ConnectHandler>(
    handler: Arc<H>,
    info: Arc<ConnInfo>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<OpenTunnel> {
    let (parts, recv) = request.into_parts();
    let inbound = match inbound_request(parts, &info) {
        Ok(inbound) => inbound,
        Err(rejection) => {
            reject(respond, rejection);
            return None;
        }
    };
    let target = inbound.target.clone();
    let decision = tokio::select! {
        decision = handler.handle(inbound) => decision,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!(%target, "client gave up on CONNECT before it was answered");
            return None;
        }
    };
    let Accepted {
        upstream,
        headers,
        on_close,
    } = match decision {
        Ok(accepted) => accepted,
        Err(rejection) => {
            reject(respond, rejection);
            return None;
        }
    };
    let mut response = Response::new(());
    *response.headers_mut() = headers;
    match respond.send_response(response, false) {
        Ok(send) => Some(OpenTunnel {
            tunnel: Tunnel::new(send, recv, None),
            upstream,
            on_close,
            target,
        }),
        Err(e) => {
            debug!(%target, error = %e, "could not accept hbone CONNECT");
            None
        }
    }
}

fn inbound_request(
    parts: http::request::Parts,
    info: &ConnInfo,
) -> Result<InboundRequest, Rejection> {
    if parts.method != Method::CONNECT {
        return Err(Rejection::bad_request(format!(
            "method {} is not CONNECT",
            parts.method
        )));
    }
    let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let target =
        ConnectTarget::parse(authority).map_err(|e| Rejection::bad_request(e.to_string()))?;
    Ok(InboundRequest {
        target,
        headers: parts.headers,
        peer_identity: info.peer_identity.clone(),
        peer_addr: info.peer_addr,
        local_addr: info.local_addr,
        local_identity: info.local_identity.clone(),
    })
}

fn reject(mut respond: SendResponse<Bytes>, rejection: Rejection) {
    debug!(
        status = rejection.status.as_u16(),
        kind = rejection.kind().as_str(),
        reason = %rejection.reason,
        "hbone CONNECT rejected"
    );
    let mut response = Response::new(());
    *response.status_mut() = rejection.status;
    if let Err(e) = respond.send_response(response, true) {
        debug!(error = %e, "could not send hbone rejection");
    }
}

#[cfg(test)]
mod tests;
