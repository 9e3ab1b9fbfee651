//! The transports under test, each with a server side that ends in [`crate::app::serve`] and a
//! client side that opens streams to it.
//!
//! * `tcp`: the client talks to the app directly.
//! * `tls`: mutual TLS 1.3 terminated by the app's own process (the plain-TLS baseline).
//! * `tls+tcp`: mutual TLS terminated by a proxy that forwards over loopback TCP to the app (the same
//!   hop structure as HBONE, minus HTTP/2).
//! * `hbone`: HTTP/2 CONNECT over mutual TLS, terminated by the HBONE server, which connects to
//!   the app over loopback TCP exactly as ztunnel's inbound does.
//!
//! Every TLS flavour uses the same certificates and the same rustls configs as the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Identity;
use mesh_core::hbone::client::{HbonePool, PoolKey, PoolSettings, TcpConnector, TunnelRequest};
use mesh_core::hbone::server::{
    Accepted, ConnectHandler, HboneServer, InboundRequest, Rejection, ServerSettings,
};
use mesh_core::testing::TestCa;
use mesh_core::tls::{WorkloadTls, dummy_server_name};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::BoxStream;

/// Which transport a scenario runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain TCP.
    Tcp,
    /// Mutual TLS terminated in the app's process.
    Tls,
    /// Mutual TLS terminated by a proxy forwarding to the app over TCP.
    TlsTcp,
    /// HBONE (HTTP/2 CONNECT over mutual TLS) forwarding to the app over TCP.
    Hbone,
}

impl Kind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::TlsTcp => "tls+tcp",
            Kind::Hbone => "hbone",
        }
    }

    /// Every transport, in report order.
    pub const ALL: [Kind; 4] = [Kind::Tcp, Kind::Tls, Kind::TlsTcp, Kind::Hbone];
}

/// A running server for one transport plus what a client needs to reach it.
pub struct Endpoint {
    kind: Kind,
    addr: SocketAddr,
    app: SocketAddr,
    client_tls: Arc<WorkloadTls>,
    server_id: Identity,
    pooled: HbonePool,
}

/// Certificates shared by every transport.
pub struct Certs {
    client: Arc<WorkloadTls>,
    server: Arc<WorkloadTls>,
}

impl Certs {
    /// A fresh test CA with a client and a server identity.
    pub fn new() -> anyhow::Result<Self> {
        let ca = TestCa::new("cluster.local");
        let id = |sa: &str| format!("spiffe://cluster.local/ns/bench/sa/{sa}").parse::<Identity>();
        Ok(Self {
            client: Arc::new(WorkloadTls::from_certificate(&ca.issue(&id("client")?))?),
            server: Arc::new(WorkloadTls::from_certificate(&ca.issue(&id("server")?))?),
        })
    }
}

impl Endpoint {
    /// Starts the server side of `kind` on loopback.
    pub async fn start(kind: Kind, certs: &Certs) -> anyhow::Result<Self> {
        let app = spawn_tcp_app().await?;
        let addr = match kind {
            Kind::Tcp => app,
            Kind::Tls => spawn_tls(certs.server.clone(), None).await?,
            Kind::TlsTcp => spawn_tls(certs.server.clone(), Some(app)).await?,
            Kind::Hbone => spawn_hbone(certs.server.clone()).await?,
        };
        Ok(Self {
            kind,
            addr,
            app,
            client_tls: certs.client.clone(),
            server_id: certs.server.identity().clone(),
            pooled: new_pool(&certs.client),
        })
    }

    /// The transport.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Opens a stream; for HBONE, `pooled` picks a stream on the shared pool instead of a new
    /// connection with its own TLS handshake.
    pub async fn open(&self, pooled: bool) -> anyhow::Result<BoxStream> {
        match self.kind {
            Kind::Tcp => {
                let s = TcpStream::connect(self.addr).await?;
                s.set_nodelay(true)?;
                Ok(Box::pin(s))
            }
            Kind::Tls | Kind::TlsTcp => {
                let cfg = self
                    .client_tls
                    .client_config(vec![self.server_id.clone()])?;
                let tcp = TcpStream::connect(self.addr).await?;
                tcp.set_nodelay(true)?;
                let tls = TlsConnector::from(cfg)
                    .connect(dummy_server_name(), tcp)
                    .await?;
                Ok(Box::pin(tls))
            }
            Kind::Hbone => {
                let key = PoolKey {
                    src_identity: self.client_tls.identity().clone(),
                    dst_identities: vec![self.server_id.clone()],
                    dst: self.addr,
                    src_ip: None,
                };
                let request = TunnelRequest::new(self.app);
                let tunnel = if pooled {
                    self.pooled.open(&key, &request).await?
                } else {
                    new_pool(&self.client_tls).open(&key, &request).await?
                };
                Ok(Box::pin(tunnel))
            }
        }
    }
}

fn new_pool(tls: &Arc<WorkloadTls>) -> HbonePool {
    HbonePool::new(
        PoolSettings::default(),
        Arc::new(tls.clone()),
        Arc::new(TcpConnector),
    )
}

async fn spawn_tcp_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(crate::app::serve(s));
        }
    });
    Ok(addr)
}

/// A TLS server that either serves the app itself or forwards to `upstream` over TCP.
async fn spawn_tls(
    tls: Arc<WorkloadTls>,
    upstream: Option<SocketAddr>,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = TlsAcceptor::from(tls.server_config());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                match upstream {
                    None => {
                        let _ = crate::app::serve(tls).await;
                    }
                    Some(up) => {
                        if let Ok(mut up) = TcpStream::connect(up).await {
                            let _ = up.set_nodelay(true);
                            let _ = mesh_core::copy::copy_plain(&mut tls, &mut up).await;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}

struct ForwardToApp;

impl ConnectHandler for ForwardToApp {
    async fn handle(&self, req: InboundRequest) -> Result<Accepted, Rejection> {
        let dst = req
            .target
            .socket_addr()
            .ok_or_else(|| Rejection::bad_request("bench expects ip:port"))?;
        let up = TcpStream::connect(dst)
            .await
            .map_err(|e| Rejection::unavailable(e.to_string()))?;
        let _ = up.set_nodelay(true);
        Ok(Accepted::new(up))
    }
}

async fn spawn_hbone(tls: Arc<WorkloadTls>) -> anyhow::Result<SocketAddr> {
    let server = HboneServer::new(
        "127.0.0.1:0".parse()?,
        Arc::new(tls),
        Arc::new(ForwardToApp),
        ServerSettings::default(),
    )?;
    let addr = server.local_addr();
    tokio::spawn(server.run());
    Ok(addr)
}
