//! The HBONE client: a pool of mTLS HTTP/2 connections, one `CONNECT` stream per tunnel.
//!
//! Connections are pooled per [`PoolKey`]. A connection carries at most
//! [`PoolSettings::max_streams_per_connection`] open tunnels (and never more than the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS); when all are full a new one is dialled. Dials for one key are
//! serialized, so a burst of first requests dials once. Connections idle for
//! [`PoolSettings::idle_timeout`] are released, dead ones (closed, GOAWAY, unanswered PING) are
//! dropped from the pool.

mod pool;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use tokio::net::{TcpSocket, TcpStream};

use super::headers::{self, Baggage, TraceParent};
use super::{ConnectTarget, ErrorKind, H2Settings};
use crate::identity::Identity;
use crate::tls::{HandshakeError, TlsError, WorkloadTls};

pub use pool::HbonePool;

/// A boxed error from a caller-provided hook.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What makes two tunnels share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity we present (the source workload's).
    pub src_identity: Identity,
    /// The identities the server may present (destination workload ∪ service SANs).
    pub dst_identities: Vec<Identity>,
    /// The HBONE address, `<pod ip>:15008`.
    pub dst: SocketAddr,
    /// The local IP to connect from, if it matters.
    pub src_ip: Option<IpAddr>,
}

/// Hands the pool the certificate for a source identity.
pub trait ClientCerts: Send + Sync + 'static {
    /// The certificate (and trust bundle) to present as `src`.
    fn client_certificate(
        &self,
        src: &Identity,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>>;
}

/// A single certificate; asking for any other identity fails.
impl ClientCerts for Arc<WorkloadTls> {
    fn client_certificate(
        &self,
        src: &Identity,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>> {
        let result = if src == self.identity() {
            Ok(self.clone())
        } else {
            Err(format!("only the certificate of {} is available", self.identity()).into())
        };
        Box::pin(std::future::ready(result))
    }
}

/// Opens the TCP connection to an HBONE peer (ztunnel hooks socket marks or network namespaces
/// in here).
pub trait Connector: Send + Sync + 'static {
    /// Connects to `dst`, from `src_ip` when given.
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'static, io::Result<TcpStream>>;
}

/// Plain tokio connect (bound to `src_ip` when given), with TCP_NODELAY.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        Box::pin(async move {
            let socket = match dst {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if let Some(ip) = src_ip {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let stream = socket.connect(dst).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

/// A `CONNECT` to send: the target (`:authority`) and the request headers.
#[derive(Debug, Clone)]
pub struct TunnelRequest {
    target: ConnectTarget,
    headers: HeaderMap,
}

impl TunnelRequest {
    /// A request for `target` with no headers yet.
    pub fn new(target: impl Into<ConnectTarget>) -> Self {
        Self {
            target: target.into(),
            headers: HeaderMap::new(),
        }
    }

    /// Adds (or replaces) a header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Adds `baggage` describing the source workload.
    pub fn baggage(self, baggage: &Baggage) -> Self {
        self.header(headers::BAGGAGE, baggage.header_value())
    }

    /// Adds `forwarded: for="<client>"` (and `;host=` when the destination service is known).
    pub fn forwarded(self, client: SocketAddr, host: Option<&str>) -> Self {
        self.header(headers::FORWARDED, headers::forwarded(client, host))
    }

    /// Adds a `traceparent`.
    pub fn traceparent(self, trace: TraceParent) -> Self {
        self.header(headers::TRACEPARENT, trace.header_value())
    }

    /// The target.
    pub fn target(&self) -> &ConnectTarget {
        &self.target
    }

    /// The headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn to_http(&self) -> Result<Request<()>, ClientError> {
        let uri = Uri::builder()
            .authority(self.target.to_string())
            .build()
            .map_err(|e| {
                ClientError::InvalidRequest(format!("bad authority {}: {e}", self.target))
            })?;
        let mut request = Request::new(());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers.clone();
        Ok(request)
    }
}

/// Connection limits, timeouts and HTTP/2 settings of the pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// HTTP/2 settings (defaults: [`H2Settings::client`]).
    pub h2: H2Settings,
    /// Open tunnels per connection before another connection is dialled.
    pub max_streams_per_connection: usize,
    /// How long an unused connection stays pooled.
    pub idle_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for the TLS and the HTTP/2 handshake, each.
    pub handshake_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            h2: H2Settings::client(),
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No certificate for the source identity.
    #[error("no certificate for {identity}: {source}")]
    Certificate {
        /// The source identity.
        identity: Box<Identity>,
        /// What the certificate provider said.
        source: BoxError,
    },
    /// The TLS config could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TCP connect failed.
    #[error("cannot connect to {dst}: {source}")]
    Connect {
        /// The HBONE address.
        dst: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The TCP connect timed out.
    #[error(
        "connecting to {dst} timed out after {after:?}; \
         is a network policy blocking the hbone port?"
    )]
    ConnectTimeout {
        /// The HBONE address.
        dst: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The TLS handshake failed (or the server rejected our certificate right after it).
    #[error("tls handshake with {dst} failed: {source}")]
    Handshake {
        /// The HBONE address.
        dst: SocketAddr,
        /// The cause.
        source: HandshakeError,
    },
    /// The TLS or HTTP/2 handshake timed out.
    #[error("handshake with {dst} timed out after {after:?}")]
    HandshakeTimeout {
        /// The HBONE address.
        dst: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The HTTP/2 handshake failed.
    #[error("http/2 handshake with {dst} failed: {source}")]
    H2Handshake {
        /// The HBONE address.
        dst: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The `CONNECT` stream failed before a response arrived.
    #[error("CONNECT via {dst} failed: {source}")]
    Request {
        /// The HBONE address.
        dst: SocketAddr,
        /// The h2 error.
        source: h2::Error,
    },
    /// The server answered with a status other than `200`.
    #[error("{dst} refused CONNECT with status {status}")]
    Status {
        /// The HBONE address.
        dst: SocketAddr,
        /// The status.
        status: StatusCode,
    },
    /// The request itself is unusable.
    #[error("invalid CONNECT request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The failure kind for metrics and access logs.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Certificate { .. } => ErrorKind::NoCertificate,
            Self::Tls(_) => ErrorKind::TlsFailure,
            Self::Connect { .. } => ErrorKind::Connect,
            Self::ConnectTimeout { .. } => ErrorKind::NetworkPolicy,
            Self::Handshake {
                source: HandshakeError::Identity(_),
                ..
            } => ErrorKind::Identity,
            Self::Handshake { .. } => ErrorKind::TlsFailure,
            Self::HandshakeTimeout { .. } => ErrorKind::Timeout,
            Self::H2Handshake { .. } => ErrorKind::H2Handshake,
            Self::Request { .. } => ErrorKind::Io,
            Self::Status { status, .. } => ErrorKind::from_status(*status),
            Self::InvalidRequest(_) => ErrorKind::BadRequest,
        }
    }

    /// The HTTP status, when the server answered with one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
