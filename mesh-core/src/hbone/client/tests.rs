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
async fn a_peer_stream_limit_below_ours_is_respected() {
    let pki = Pki::new();
    let handler = Arc::new(TestHandler::default());
    let mut settings = ServerSettings::default();
    settings.h2.max_concurrent_streams = Some(3);
    let server = start_server(pki.server.clone(), handler.clone(), settings);
    let upstream = echo_upstream().await;
    let pool = pki.pool(PoolSettings::default());
    let (key, request) = (pki.key(server.addr), TunnelRequest::new(upstream));
    let mut tunnels = Vec::new();
    for _ in 0..4 {
        // One at a time: the server's SETTINGS arrive with its first response.
        let mut tunnel = pool.open(&key, &request).await.unwrap();
        echo_once(&mut tunnel).await;
        tunnels.push(tunnel);
    }
    assert_eq!(handler.connections(), 2);
    assert_eq!(pool.connections(&key), 2);
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
async fn requests_queued_behind_a_failed_dial_share_its_error() {
    // A peer that accepts TCP but never answers TLS: every dial times out.
    let pki = Pki::new();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let connector = Arc::new(CountingConnector::default());
    let settings = PoolSettings {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let pool = HbonePool::new(
        settings,
        Arc::new(pki.client.clone()),
        Arc::new(connector.clone()),
    );
    let (key, request) = (pki.key(addr), TunnelRequest::new(addr));
    let start = std::time::Instant::now();
    let results = join_all((0..20).map(|_| pool.open(&key, &request))).await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "waiters dialled one after another"
    );
    assert_eq!(connector.0.load(Ordering::SeqCst), 1);
    for err in results.into_iter().map(Result::unwrap_err) {
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    }
    // A later request tries again.
    let _ = pool.open(&key, &request).await.unwrap_err();
    assert_eq!(connector.0.load(Ordering::SeqCst), 2);
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

/// An upstream that writes one byte and closes, so the server's END_STREAM often arrives after
/// the client has already dropped (and so reset) the tunnel.
async fn byte_then_close_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let _ = s.read_exact(&mut b).await;
                let _ = s.write_all(b"y").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_tunnels_do_not_kill_the_pooled_connection() {
    // h2 counts every frame that arrives for a stream it no longer remembers as a local error
    // reset and, by default, closes the whole connection after 1024 of them. Apps that close
    // early make exactly that pattern, so a pooled connection must survive thousands of them.
    let f = Fixture::new().await;
    let upstream = byte_then_close_upstream().await;
    let pool = f.pki.pool(PoolSettings::default());
    let request = TunnelRequest::new(upstream);
    let worker = || async {
        for _ in 0..40 {
            let mut tunnel = pool.open(&f.key(), &request).await.unwrap();
            let mut b = [0u8; 1];
            tunnel.write_all(b"p").await.unwrap();
            tunnel.read_exact(&mut b).await.unwrap();
            drop(tunnel);
        }
    };
    join_all((0..90).map(|_| worker())).await;
    let mut tunnel = pool.open(&f.key(), &f.request()).await.unwrap();
    echo_once(&mut tunnel).await;
    assert_eq!(
        f.handler.connections(),
        1,
        "the pooled connection was replaced"
    );
}
