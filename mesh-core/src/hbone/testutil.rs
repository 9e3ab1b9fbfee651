//! Shared fixtures for the HBONE tests: a PKI, a recording handler, servers and upstreams.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::client::{HbonePool, PoolKey, PoolSettings, TcpConnector};
use super::server::{
    Accepted, ConnectHandler, HboneServer, InboundRequest, Rejection, ServerSettings,
};
use crate::identity::Identity;
use crate::testing::TestCa;
use crate::tls::{WorkloadTls, dummy_server_name};

pub(crate) const SERVER_ID: &str = "spiffe://cluster.local/ns/dst/sa/server";
pub(crate) const CLIENT_ID: &str = "spiffe://cluster.local/ns/src/sa/client";

pub(crate) fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

/// A CA and the two workloads' TLS material.
pub(crate) struct Pki {
    pub ca: TestCa,
    pub server: Arc<WorkloadTls>,
    pub client: Arc<WorkloadTls>,
}

impl Pki {
    pub fn new() -> Self {
        let ca = TestCa::new("cluster.local");
        let server = Arc::new(WorkloadTls::from_certificate(&ca.issue(&id(SERVER_ID))).unwrap());
        let client = Arc::new(WorkloadTls::from_certificate(&ca.issue(&id(CLIENT_ID))).unwrap());
        Self { ca, server, client }
    }

    pub fn tls(&self, identity: &str) -> Arc<WorkloadTls> {
        Arc::new(WorkloadTls::from_certificate(&self.ca.issue(&id(identity))).unwrap())
    }

    pub fn key(&self, dst: SocketAddr) -> PoolKey {
        PoolKey {
            src_identity: self.client.identity().clone(),
            dst_identities: vec![self.server.identity().clone()],
            dst,
            src_ip: None,
        }
    }

    pub fn pool(&self, settings: PoolSettings) -> HbonePool {
        pool_with(self.client.clone(), settings)
    }
}

/// A pool presenting `tls`.
pub(crate) fn pool_with(tls: Arc<WorkloadTls>, settings: PoolSettings) -> HbonePool {
    HbonePool::new(settings, Arc::new(tls), Arc::new(TcpConnector))
}

/// What the handler saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub peer_identity: Identity,
    pub local_identity: Identity,
    pub peer_addr: SocketAddr,
    pub headers: HeaderMap,
}

/// Connects each CONNECT to its target over TCP (or rejects everything with `reject`).
#[derive(Default)]
pub(crate) struct TestHandler {
    pub reject: Option<Rejection>,
    pub seen: Mutex<Vec<Seen>>,
    pub calls: AtomicUsize,
}

impl TestHandler {
    pub fn rejecting(rejection: Rejection) -> Self {
        Self {
            reject: Some(rejection),
            ..Default::default()
        }
    }

    /// Distinct client connections seen (one source port per TCP connection).
    pub fn connections(&self) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .map(|s| s.peer_addr)
            .collect::<HashSet<_>>()
            .len()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl ConnectHandler for TestHandler {
    async fn handle(&self, req: InboundRequest) -> Result<Accepted, Rejection> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(Seen {
            peer_identity: (*req.peer_identity).clone(),
            local_identity: req.local_identity.clone(),
            peer_addr: req.peer_addr,
            headers: req.headers.clone(),
        });
        if let Some(rejection) = &self.reject {
            return Err(rejection.clone());
        }
        let addr = req
            .target
            .socket_addr()
            .ok_or_else(|| Rejection::bad_request("test handler needs an ip target"))?;
        let upstream = TcpStream::connect(addr)
            .await
            .map_err(|e| Rejection::unavailable(format!("upstream {addr}: {e}")))?;
        upstream.set_nodelay(true).unwrap();
        Ok(Accepted::new(upstream))
    }
}

/// A running HBONE server.
pub(crate) struct Running {
    pub addr: SocketAddr,
    pub drain: CancellationToken,
    pub task: JoinHandle<()>,
}

pub(crate) fn start_server(
    tls: Arc<WorkloadTls>,
    handler: Arc<TestHandler>,
    settings: ServerSettings,
) -> Running {
    let server = HboneServer::new(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(tls),
        handler,
        settings,
    )
    .unwrap();
    let addr = server.local_addr();
    let drain = server.drain_token();
    let task = tokio::spawn(server.run());
    Running { addr, drain, task }
}

/// An upstream that echoes every connection until EOF, then closes its write side.
pub(crate) async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A raw HTTP/2 client over HBONE TLS, for requests the pool would never send.
pub(crate) async fn raw_h2(
    pki: &Pki,
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    JoinHandle<Result<(), h2::Error>>,
) {
    let config = pki
        .client
        .client_config(vec![pki.server.identity().clone()])
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(config)
        .connect(dummy_server_name(), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    (send, tokio::spawn(conn))
}

/// Sends `request` on a raw connection and returns the response status (or the h2 error).
pub(crate) async fn raw_status(
    send: &mut h2::client::SendRequest<Bytes>,
    request: Request<()>,
) -> Result<http::StatusCode, h2::Error> {
    let ready = send.clone().ready().await?;
    *send = ready;
    let (response, _stream) = send.send_request(request, true)?;
    Ok(response.await?.status())
}

/// Reads until EOF with a deadline.
pub(crate) async fn read_to_end(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut out))
        .await
        .expect("read_to_end timed out")
        .expect("read_to_end failed");
    out
}

/// Polls `cond` until it holds or `what` times out.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
