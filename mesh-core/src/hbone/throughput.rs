//! Throughput self-check (not a benchmark suite): one stream of bulk data on loopback, through
//! plain TLS and through HBONE, in the same process and run. Ignored by default; run with
//! `cargo test -p mesh-core --release throughput -- --ignored --nocapture`
//! (`HBONE_BENCH_MIB` sets the volume, default 1024).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::client::{PoolSettings, TunnelRequest};
use super::server::ServerSettings;
use super::testutil::{Pki, TestHandler, start_server};
use crate::copy::{ChunkWrite, Plain, copy_bidirectional};
use crate::tls::dummy_server_name;

const CHUNK: usize = 256 * 1024;

fn volume() -> u64 {
    let mib: u64 = std::env::var("HBONE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    mib * 1024 * 1024
}

/// Process CPU time (user + system) from /proc, in seconds: a load-independent cost measure.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

struct Meter {
    wall: Instant,
    cpu: f64,
}

impl Meter {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    fn report(&self, what: &str, bytes: u64) -> f64 {
        let elapsed = self.wall.elapsed();
        let gib = bytes as f64 / (1u64 << 30) as f64;
        let gbps = bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
        let cpu = (cpu_seconds() - self.cpu) / gib;
        println!(
            "{what:<42} {gbps:6.2} Gbit/s  {cpu:5.2} CPU-s/GiB  ({} MiB in {elapsed:.2?})",
            bytes >> 20
        );
        gbps
    }
}

/// A TCP server that reads and discards everything, reporting how much it got per connection.
async fn sink() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    (addr, rx)
}

async fn write_volume(w: &mut (impl AsyncWriteExt + Unpin), total: u64) {
    let block = vec![0x5au8; CHUNK];
    let mut sent = 0;
    while sent < total {
        w.write_all(&block).await.unwrap();
        sent += CHUNK as u64;
    }
    w.shutdown().await.unwrap();
}

async fn plain_tls(pki: &Pki, total: u64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server.server_config());
    let reader = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while let Ok(n @ 1..) = tls.read(&mut buf).await {
            got += n as u64;
        }
        got
    });
    let config = pki
        .client
        .client_config(vec![pki.server.identity().clone()])
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut tls = TlsConnector::from(config)
        .connect(dummy_server_name(), tcp)
        .await
        .unwrap();
    let meter = Meter::start();
    write_volume(&mut tls, total).await;
    assert_eq!(reader.await.unwrap(), total);
    meter.report("plain TLS, one stream", total)
}

/// The app writes owned chunks straight into the tunnel (HBONE's own cost).
async fn hbone_direct(pki: &Pki, total: u64) -> f64 {
    let (sink_addr, mut done) = sink().await;
    let server = start_server(
        pki.server.clone(),
        Arc::default(),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let mut tunnel = pool
        .open(&pki.key(server.addr), &TunnelRequest::new(sink_addr))
        .await
        .unwrap();
    let block = Bytes::from(vec![0x5au8; CHUNK]);
    let meter = Meter::start();
    let mut sent = 0;
    while sent < total {
        let mut chunk = block.clone();
        while !chunk.is_empty() {
            poll_fn(|cx| tunnel.poll_write_chunk(cx, &mut chunk))
                .await
                .unwrap();
        }
        sent += CHUNK as u64;
    }
    poll_fn(|cx| tunnel.poll_close_write(cx)).await.unwrap();
    assert_eq!(done.recv().await.unwrap(), total);
    meter.report("HBONE, tunnel -> upstream", total)
}

/// app TCP -> [client copy -> HBONE tunnel] -> [server -> upstream TCP] -> sink: both proxies.
async fn hbone_proxied(pki: &Pki, total: u64) -> f64 {
    let (sink_addr, mut done) = sink().await;
    let server = start_server(
        pki.server.clone(),
        Arc::new(TestHandler::default()),
        ServerSettings::default(),
    );
    let pool = pki.pool(PoolSettings::default());
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let key = pki.key(server.addr);
    let outbound = tokio::spawn(async move {
        let (app, _) = front.accept().await.unwrap();
        app.set_nodelay(true).unwrap();
        let mut tunnel = pool
            .open(&key, &TunnelRequest::new(sink_addr))
            .await
            .unwrap();
        copy_bidirectional(&mut Plain(app), &mut tunnel)
            .await
            .unwrap()
    });
    let mut app = TcpStream::connect(front_addr).await.unwrap();
    app.set_nodelay(true).unwrap();
    let meter = Meter::start();
    write_volume(&mut app, total).await;
    assert_eq!(done.recv().await.unwrap(), total);
    let gbps = meter.report("HBONE, app TCP -> client -> server -> TCP", total);
    drop(app);
    outbound.await.unwrap();
    gbps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput self-check; run in release with --ignored --nocapture"]
async fn throughput_one_stream() {
    let pki = Pki::new();
    let total = volume();
    // HBONE_BENCH_ONLY=tls|direct|proxied runs one phase (for profiling).
    let only = std::env::var("HBONE_BENCH_ONLY").unwrap_or_default();
    let single = match only.as_str() {
        "tls" => Some(plain_tls(&pki, total).await),
        "direct" => Some(hbone_direct(&pki, total).await),
        "proxied" => Some(hbone_proxied(&pki, total).await),
        _ => None,
    };
    if single.is_some() {
        return;
    }
    // Warm the allocator and the runtime first (first bulk runs fault in fresh pages).
    plain_tls(&pki, total / 8).await;
    let tls = plain_tls(&pki, total).await;
    let direct = hbone_direct(&pki, total).await;
    let proxied = hbone_proxied(&pki, total).await;
    println!(
        "HBONE/TLS: direct {:.0}%, proxied {:.0}%",
        direct / tls * 100.0,
        proxied / tls * 100.0
    );
}
