//! The TLS gRPC listener (port 15012): binds in [`GrpcServer::bind`], serves in [`GrpcServer::run`].
//!
//! TLS handshakes run in their own tasks, with a deadline, so a slow or silent client cannot hold
//! up the accept loop; only finished handshakes reach tonic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

// A handshake is two round trips; ten seconds only ever expires for broken or hostile peers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
// Finished handshakes waiting for tonic to pick them up.
const ACCEPT_BACKLOG: usize = 128;
// Istio's control-plane keepalive: ping every 30 s, give up after 10 s without an answer.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(300);

/// Why the gRPC server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// The listen address could not be bound.
    #[error("cannot bind grpc listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// tonic stopped with an error.
    #[error("grpc server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A bound, not yet serving, TLS gRPC listener.
#[derive(Debug)]
pub struct GrpcServer {
    listener: TcpListener,
    address: SocketAddr,
    tls: Arc<ServerConfig>,
}

impl GrpcServer {
    /// Binds `addr` now, so a port conflict fails startup loudly.
    pub async fn bind(addr: SocketAddr, tls: Arc<ServerConfig>) -> Result<Self, GrpcError> {
        let bind_err = |source| GrpcError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let address = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            listener,
            address,
            tls,
        })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves `routes` until `shutdown`, then waits for in-flight calls (bounded by the caller).
    pub async fn run(self, routes: Routes, shutdown: CancellationToken) -> Result<(), GrpcError> {
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let acceptor = TlsAcceptor::from(self.tls);
        let accept = tokio::spawn(accept_loop(self.listener, acceptor, tx, shutdown.clone()));
        let incoming = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|stream| (Ok::<_, std::io::Error>(stream), rx))
        });
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(H2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(H2_KEEPALIVE_TIMEOUT))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        accept.abort();
        Ok(result?)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Typically EMFILE; back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        set_keepalive(&tcp);
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send(tls).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        });
    }
}

fn set_keepalive(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(error) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot enable tcp keepalive");
    }
    let _ = tcp.set_nodelay(true);
}
