//! Pool tests against a real HBONE server on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::hbone::Tunnel;
use crate::hbone::server::ServerSettings;
use crate::hbone::testutil::*;

/// Counts dials, then connects like [`TcpConnector`].
#[derive(Default)]
struct CountingConnector(AtomicUsize);

impl Connector for Arc<CountingConnector> {
    fn connect(
        &self,
        dst: SocketAddr,
        src_ip: Option<IpAddr>,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        TcpConnector.connect(dst, src_ip)
    }
}

struct Fixture {
    pki: Pki,
    handler: Arc<TestHandler>,
    server: Running,
    upstream: SocketAddr,
}

impl Fixture {
    async fn new() -> Self {
        let pki = Pki::new();
        let handler = Arc::new(TestHandler::default());
        let server = start_server(
            pki.server.clone(),
            handler.clone(),
            ServerSettings::default(),
        );
        let upstream = echo_upstream().await;
        Self {
            pki,
            handler,
            server,
            upstream,
        }
    }

    fn key(&self) -> PoolKey {
        self.pki.key(self.server.addr)
    }

    fn request(&self) -> TunnelRequest {
        TunnelRequest::new(self.upstream)
    }
}

async fn echo_once(tunnel: &mut Tunnel) {
    tunnel.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    tunnel.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn sequential_tunnels_share_one_connection() {
    let f = Fixture::new().await;
    let pool = f.pki.pool(PoolSettings::default());
    for _ in 0..3 {
        let mut tunnel = pool.open(&f.key(), &f.request()).await.unwrap();
        echo_once(&mut tunnel).await;
    }
    assert_eq!(f.handler.connections(), 1);
    assert_eq!(f.handler.calls(), 3);
    assert_eq!(pool.connections(&f.key()), 1);
}

#[tokio::test]
async fn the_101st_concurrent_tunnel_opens_a_second_connection() {
    let f = Fixture::new().await;
    let pool = f.pki.pool(PoolSettings::default());
    let (key, request) = (f.key(), f.request());
    let opens = (0..101).map(|_| pool.open(&key, &request));
    let mut tunnels: Vec<Tunnel> = join_all(opens)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(pool.connections(&key), 2);
    assert_eq!(f.handler.connections(), 2);
    for tunnel in &mut tunnels {
        echo_once(tunnel).await;
    }
    // Once one closes, its slot is reused instead of dialling a third connection.
    tunnels.pop();
    let _again = pool.open(&key, &request).await.unwrap();
    assert_eq!(f.handler.connections(), 2);
}

#[tokio::test]
async fn concurrent_first_requests_dial_once() {
    let f = Fixture::new().await;
    let connector = Arc::new(CountingConnector::default());
    let pool = HbonePool::new(
        PoolSettings::default(),
        Arc::new(f.pki.client.clone()),
        Arc::new(connector.clone()),
    );
    let (key, request) = (f.key(), f.request());
    let opens = (0..50).map(|_| pool.open(&key, &request));
    let tunnels: Vec<_> = join_all(opens)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tunnels.len(), 50);
    assert_eq!(connector.0.load(Ordering::SeqCst), 1);
    assert_eq!(f.handler.connections(), 1);
}

#[tokio::test]
async fn different_keys_use_different_connections() {
    let f = Fixture::new().await;
    let other_client = f.pki.tls("spiffe://cluster.local/ns/src/sa/other");
    let certs = Arc::new(TwoCerts(f.pki.client.clone(), other_client.clone()));
    let pool = HbonePool::new(PoolSettings::default(), certs, Arc::new(TcpConnector));
    let key_a = f.key();
    let key_b = PoolKey {
        src_identity: other_client.identity().clone(),
        ..f.key()
    };
    let key_c = PoolKey {
        dst_identities: vec![
            f.pki.server.identity().clone(),
            id("spiffe://cluster.local/ns/dst/sa/waypoint"),
        ],
        ..f.key()
    };
    for key in [&key_a, &key_b, &key_c, &key_a] {
        let mut tunnel = pool.open(key, &f.request()).await.unwrap();
        echo_once(&mut tunnel).await;
    }
    assert_eq!(f.handler.connections(), 3);
    assert_eq!(pool.total_connections(), 3);
    let seen: Vec<_> = f
        .handler
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.peer_identity.to_string())
        .collect();
    assert_eq!(seen[1], "spiffe://cluster.local/ns/src/sa/other");
}

struct TwoCerts(Arc<WorkloadTls>, Arc<WorkloadTls>);

impl ClientCerts for TwoCerts {
    fn client_certificate(
        &self,
        src: &Identity,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>> {
        let found = [&self.0, &self.1]
            .into_iter()
            .find(|t| t.identity() == src)
            .cloned();
        Box::pin(async move { found.ok_or_else(|| "unknown identity".into()) })
    }
}

#[tokio::test]
async fn idle_connections_are_released() {
    let f = Fixture::new().await;
    let settings = PoolSettings {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let pool = f.pki.pool(settings);
    let mut tunnel = pool.open(&f.key(), &f.request()).await.unwrap();
    echo_once(&mut tunnel).await;
    // In use: kept well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.connections(&f.key()), 1);
    echo_once(&mut tunnel).await;
    drop(tunnel);
    eventually("idle release", || pool.connections(&f.key()) == 0).await;
    // A later request dials a fresh connection.
    let mut tunnel = pool.open(&f.key(), &f.request()).await.unwrap();
    echo_once(&mut tunnel).await;
    assert_eq!(f.handler.connections(), 2);
}

#[tokio::test]
async fn dead_connections_leave_the_pool() {
    let f = Fixture::new().await;
    let pool = f.pki.pool(PoolSettings::default());
    let mut tunnel = pool.open(&f.key(), &f.request()).await.unwrap();
    echo_once(&mut tunnel).await;
    drop(tunnel);
    // Killing the server task aborts its connections.
    f.server.task.abort();
    eventually("dead connection removal", || {
        pool.connections(&f.key()) == 0
    })
    .await;
    let err = pool.open(&f.key(), &f.request()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
}

#[tokio::test]
async fn connect_failures_are_classified() {
    let pki = Pki::new();
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = pki.pool(PoolSettings::default());
    let err = pool
        .open(&pki.key(closed), &TunnelRequest::new(closed))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(
        err.to_string()
            .starts_with(&format!("cannot connect to {closed}")),
        "{err}"
    );

    // A peer that accepts TCP but never speaks TLS: handshake timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = PoolSettings {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let pool = pki.pool(settings);
    let addr = silent.local_addr().unwrap();
    let err = pool
        .open(&pki.key(addr), &TunnelRequest::new(addr))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
}

#[tokio::test]
async fn missing_source_certificate_is_reported() {
    let f = Fixture::new().await;
    let pool = f.pki.pool(PoolSettings::default());
    let key = PoolKey {
        src_identity: id("spiffe://cluster.local/ns/src/sa/nobody"),
        ..f.key()
    };
    let err = pool.open(&key, &f.request()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoCertificate);
    assert!(
        err.to_string()
            .starts_with("no certificate for spiffe://cluster.local/ns/src/sa/nobody"),
        "{err}"
    );
}
