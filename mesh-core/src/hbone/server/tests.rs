//! HBONE server tests over real loopback sockets, real TLS and the test CA.

use std::time::Duration;

use http::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::*;
use crate::hbone::client::{ClientError, PoolSettings, TunnelRequest};
use crate::hbone::headers::{Baggage, TraceParent};
use crate::hbone::testutil::*;

fn connect_request(authority: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = Uri::builder().authority(authority).build().unwrap();
    request
}

#[tokio::test]
async fn client_half_close_reaches_upstream_while_replies_still_flow() {
    let pki = Pki::new();
    // Upstream: read everything until EOF, then answer — possible only if our FIN arrived and
    // the server->client direction stayed open.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        tcp.write_all(format!("after eof: {}", got.len()).as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
    });
    let handler = Arc::new(TestHandler::default());
    let server = start_server(
        pki.server.clone(),
        handler.clone(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    tunnel.write_all(b"hello upstream").await.unwrap();
    tunnel.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut tunnel).await, b"after eof: 14");
}

#[tokio::test]
async fn upstream_half_close_reaches_client_while_client_can_still_send() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (got_tx, got_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"greeting").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        got_tx.send(got).unwrap();
    });
    let handler = Arc::new(TestHandler::default());
    let server = start_server(pki.server.clone(), handler, ServerSettings::default());
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    // END_STREAM from the server shows up as EOF...
    assert_eq!(read_to_end(&mut tunnel).await, b"greeting");
    // ...and our direction still works afterwards.
    tunnel.write_all(b"late data").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), got_rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"late data");
}

#[tokio::test]
async fn large_transfers_arrive_intact_in_both_directions() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    let data: Vec<u8> = (0..12 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    let (mut r, mut w) = tokio::io::split(tunnel);
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let echoed = read_to_end(&mut r).await;
    writer.await.unwrap();
    assert!(
        echoed == expected,
        "echoed {} bytes, differing",
        echoed.len()
    );
}

#[tokio::test]
async fn handler_sees_client_identity_headers_and_addresses() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let handler = Arc::new(TestHandler::default());
    let server = start_server(
        pki.server.clone(),
        handler.clone(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let trace = TraceParent::random();
    let request = TunnelRequest::new(upstream)
        .baggage(&Baggage {
            namespace: "src".into(),
            ..Default::default()
        })
        .forwarded("10.1.2.3:4567".parse().unwrap(), None)
        .traceparent(trace);
    let mut tunnel = pool.open(&pki.key(server.addr), &request).await.unwrap();
    tunnel.shutdown().await.unwrap();
    read_to_end(&mut tunnel).await;
    let seen = handler.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.peer_identity.to_string(), CLIENT_ID);
    assert_eq!(seen.local_identity.to_string(), SERVER_ID);
    assert!(seen.peer_addr.ip().is_loopback());
    assert_eq!(seen.headers["forwarded"], "for=\"10.1.2.3:4567\"");
    assert_eq!(seen.headers["baggage"], "k8s.namespace.name=src");
    assert_eq!(
        seen.headers["traceparent"].to_str().unwrap(),
        trace.to_string()
    );
}

#[tokio::test]
async fn handler_rejections_reach_the_client_as_status_errors() {
    let pki = Pki::new();
    for (rejection, kind) in [
        (Rejection::denied("policy deny-all"), ErrorKind::Denied),
        (
            Rejection::unavailable("no such workload"),
            ErrorKind::Unavailable,
        ),
        (Rejection::bad_request("ip mismatch"), ErrorKind::BadRequest),
    ] {
        let status = rejection.status();
        let handler = Arc::new(TestHandler::rejecting(rejection));
        let server = start_server(
            pki.server.clone(),
            handler.clone(),
            ServerSettings::default(),
        );
        let pool = pki.pool(PoolSettings::default());
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err = pool
            .open(&pki.key(server.addr), &TunnelRequest::new(target))
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(status), "{err}");
        assert_eq!(err.kind(), kind);
        assert_eq!(
            err.to_string(),
            format!("{} refused CONNECT with status {status}", server.addr)
        );
        assert_eq!(handler.calls(), 1);
    }
}

#[tokio::test]
async fn unreachable_upstream_is_a_503() {
    let pki = Pki::new();
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let err = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(closed))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
}

#[tokio::test]
async fn malformed_requests_get_400_without_reaching_the_handler() {
    let pki = Pki::new();
    let handler = Arc::new(TestHandler::default());
    let server = start_server(
        pki.server.clone(),
        handler.clone(),
        ServerSettings::default(),
    );
    let (mut send, _conn) = raw_h2(&pki, server.addr).await;
    let get = Request::get("https://127.0.0.1/x").body(()).unwrap();
    assert_eq!(
        raw_status(&mut send, get).await.unwrap(),
        StatusCode::BAD_REQUEST
    );
    for authority in ["no-port", "10.0.0.1:0", "bad_host_.:80x"] {
        let status = raw_status(&mut send, connect_request(authority))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{authority}");
    }
    assert_eq!(handler.calls(), 0);
    // The connection is still usable for a good request.
    let upstream = echo_upstream().await;
    let status = raw_status(&mut send, connect_request(&upstream.to_string()))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn client_rejects_a_server_with_an_unexpected_identity() {
    let pki = Pki::new();
    let impostor = pki.tls("spiffe://cluster.local/ns/dst/sa/impostor");
    let handler = Arc::new(TestHandler::default());
    let server = start_server(impostor, handler.clone(), ServerSettings::default());
    let pool = pki.pool(PoolSettings::default());
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let err = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(target))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Identity, "{err}");
    assert!(
        err.to_string().contains(
            "peer identity spiffe://cluster.local/ns/dst/sa/impostor is not one of the expected"
        ),
        "{err}"
    );
    assert_eq!(handler.calls(), 0);
}

#[tokio::test]
async fn server_rejects_a_client_from_another_trust_domain() {
    let pki = Pki::new();
    let foreign = pki.tls("spiffe://other.td/ns/src/sa/client");
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pool_with(foreign.clone(), PoolSettings::default());
    let key = crate::hbone::client::PoolKey {
        src_identity: foreign.identity().clone(),
        ..pki.key(server.addr)
    };
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let err = pool
        .open(&key, &TunnelRequest::new(target))
        .await
        .unwrap_err();
    // TLS 1.3: our handshake completes, the server's rejection arrives with the first request.
    assert_eq!(err.kind(), ErrorKind::TlsFailure, "{err}");
    assert!(err.to_string().contains("alert"), "{err}");
}

/// Opens an echo tunnel and checks it still carries bytes.
async fn assert_tunnel_alive(tunnel: &mut Tunnel) {
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut buf))
        .await
        .expect("tunnel stalled")
        .unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn garbage_on_the_port_closes_only_that_connection() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    let mut garbage = TcpStream::connect(server.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // The server answers with a TLS alert at most, then closes.
    let closed = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "server kept the garbage connection open");
    assert!(rest.len() < 64, "unexpected reply {rest:?}");
    assert_tunnel_alive(&mut tunnel).await;
}

#[tokio::test]
async fn oversized_headers_are_refused_without_hurting_other_connections() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let handler = Arc::new(TestHandler::default());
    let server = start_server(
        pki.server.clone(),
        handler.clone(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();

    // Over the 64 KiB limit: this request is refused (431), the connection survives.
    let (mut send, conn) = raw_h2(&pki, server.addr).await;
    let mut big = connect_request(&upstream.to_string());
    big.headers_mut()
        .insert("x-big", "a".repeat(100 * 1024).parse().unwrap());
    let status = raw_status(&mut send, big).await.unwrap();
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(!conn.is_finished());

    // Far over it (abuse): the whole connection is closed with GOAWAY.
    let (mut send, conn) = raw_h2(&pki, server.addr).await;
    let mut huge = connect_request(&upstream.to_string());
    huge.headers_mut()
        .insert("x-huge", "a".repeat(300 * 1024).parse().unwrap());
    assert!(raw_status(&mut send, huge).await.is_err());
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "abusive connection was not closed");
    assert_eq!(
        handler.calls(),
        1,
        "only the pool's tunnel reached the handler"
    );
    assert_tunnel_alive(&mut tunnel).await;
}

#[tokio::test]
async fn unanswered_pings_drop_the_connection() {
    let pki = Pki::new();
    let mut settings = ServerSettings::default();
    settings.h2.keepalive_interval = Duration::from_millis(100);
    settings.h2.keepalive_timeout = Duration::from_millis(200);
    let server = start_server(pki.server.clone(), Arc::default(), settings);
    // A client that completes TLS and the HTTP/2 preface, then never answers anything.
    let config = pki
        .client
        .client_config(vec![pki.server.identity().clone()])
        .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(crate::tls::dummy_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = Vec::new();
    let start = std::time::Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "server kept a silent connection open");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    // Somewhere in there: a PING frame (type 6) and a GOAWAY (type 7).
    assert!(received.windows(4).any(|w| w[3] == 6), "no PING was sent");
}

#[tokio::test]
async fn drain_stops_accepting_and_lets_tunnels_finish() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    server.drain.cancel();
    eventually("listener to close", || {
        std::net::TcpStream::connect(server.addr).is_err()
    })
    .await;
    // The open tunnel keeps working through the drain...
    assert_tunnel_alive(&mut tunnel).await;
    // ...new streams on the draining connection are refused...
    let again = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await;
    assert!(
        matches!(
            again,
            Err(ClientError::Connect { .. } | ClientError::Request { .. })
        ),
        "{again:?}"
    );
    // ...and the server stops once it is closed.
    tunnel.shutdown().await.unwrap();
    read_to_end(&mut tunnel).await;
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn drain_deadline_cuts_tunnels_that_never_end() {
    let pki = Pki::new();
    let upstream = echo_upstream().await;
    let settings = ServerSettings {
        drain_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let server = start_server(pki.server.clone(), Arc::default(), settings);
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(upstream))
        .await
        .unwrap();
    server.drain.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn binding_a_taken_port_fails_clearly() {
    let pki = Pki::new();
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = HboneServer::bind(
        addr,
        Arc::new(pki.server.clone()),
        Arc::new(TestHandler::default()),
        ServerSettings::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot bind the hbone listener on {addr}")),
        "{err}"
    );
}
