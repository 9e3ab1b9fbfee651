//! Copy tests: a real TCP proxy on loopback, plus scripted streams for the edge cases.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// client <-> proxy(copy_plain) <-> upstream; returns the client socket, the upstream socket and
/// the proxy task.
async fn proxied() -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<Result<Transferred, CopyError>>,
) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (front_addr, back_addr): (SocketAddr, SocketAddr) =
        (front.local_addr().unwrap(), back.local_addr().unwrap());
    let proxy = tokio::spawn(async move {
        let (mut a, _) = front.accept().await.unwrap();
        let mut b = TcpStream::connect(back_addr).await.unwrap();
        copy_plain(&mut a, &mut b).await
    });
    let client = TcpStream::connect(front_addr).await.unwrap();
    let (upstream, _) = back.accept().await.unwrap();
    (client, upstream, proxy)
}

async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test]
async fn half_close_propagates_each_way_and_counts_bytes() {
    let (mut client, mut upstream, proxy) = proxied().await;
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    // The upstream sees the client's FIN...
    assert_eq!(read_all(&mut upstream).await, b"request");
    // ...and can still answer, then close its side.
    upstream.write_all(b"response after fin").await.unwrap();
    upstream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut client).await, b"response after fin");
    let moved = proxy.await.unwrap().unwrap();
    assert_eq!(
        moved,
        Transferred {
            a_to_b: 7,
            b_to_a: 18
        }
    );
}

#[tokio::test]
async fn upstream_closing_first_keeps_the_client_direction_open() {
    let (mut client, mut upstream, proxy) = proxied().await;
    upstream.write_all(b"banner").await.unwrap();
    upstream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut client).await, b"banner");
    client.write_all(b"late").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(read_all(&mut upstream).await, b"late");
    proxy.await.unwrap().unwrap();
}

#[tokio::test]
async fn bulk_data_is_intact() {
    let (mut client, mut upstream, proxy) = proxied().await;
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&data).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    let got = read_all(&mut upstream).await;
    assert!(got == expected, "corrupted: {} bytes", got.len());
    drop(upstream);
    drop(writer.await.unwrap());
    let moved = proxy.await.unwrap().unwrap();
    assert_eq!(moved.a_to_b, 5_000_000);
}

#[tokio::test]
async fn read_size_grows_with_the_amount_moved() {
    let (mut tx, mut rx) = tokio::io::duplex(4 * 1024 * 1024);
    let writer = tokio::spawn(async move {
        let block = vec![7u8; 1024 * 1024];
        for _ in 0..12 {
            tx.write_all(&block).await.unwrap();
        }
    });
    let mut buf = ReadBuffer::default();
    let (mut total, mut max_small, mut max_large) = (0u64, 0, 0);
    while let Some(chunk) = poll_fn(|cx| buf.poll_fill(cx, Pin::new(&mut rx)))
        .await
        .unwrap()
    {
        assert!(chunk.len() <= LARGE_READ);
        if total < MEDIUM_AFTER {
            max_small = max_small.max(chunk.len());
            // Small reads keep no buffer between reads.
            assert_eq!(buf.buf.capacity(), 0);
        } else if total >= LARGE_AFTER {
            max_large = max_large.max(chunk.len());
        }
        total += chunk.len() as u64;
    }
    writer.await.unwrap();
    assert_eq!(total, 12 * 1024 * 1024);
    assert!(max_small <= SMALL_READ, "{max_small}");
    assert!(max_large > MEDIUM_READ, "{max_large}");
}

/// A stream driven by a script: chunks to hand out, then EOF (or pending forever).
#[derive(Default)]
struct Scripted {
    input: VecDeque<&'static [u8]>,
    eof: bool,
    written: Vec<u8>,
    fail_writes: bool,
    peer_gone: bool,
    write_closed: bool,
}

impl ChunkRead for Scripted {
    fn poll_read_chunk(
        &mut self,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Option<Bytes>>> {
        match self.input.pop_front() {
            Some(data) => Poll::Ready(Ok(Some(Bytes::from_static(data)))),
            None if self.eof => Poll::Ready(Ok(None)),
            None => Poll::Pending,
        }
    }
}

impl ChunkWrite for Scripted {
    fn poll_write_chunk(
        &mut self,
        _cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if self.fail_writes {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Accept at most 2 bytes per call to exercise partial writes.
        let n = chunk.len().min(2);
        self.written.extend_from_slice(&chunk.split_to(n));
        Poll::Ready(Ok(()))
    }

    fn poll_flush_chunks(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close_write(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write_closed = true;
        Poll::Ready(Ok(()))
    }

    fn poll_write_closed(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.peer_gone {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

#[tokio::test]
async fn write_errors_stop_the_copy_with_direction_and_counts() {
    let mut a = Scripted {
        input: VecDeque::from([&b"hello"[..]]),
        eof: true,
        ..Default::default()
    };
    let mut b = Scripted {
        eof: true,
        fail_writes: true,
        ..Default::default()
    };
    let err = copy_bidirectional(&mut a, &mut b).await.unwrap_err();
    assert_eq!(err.direction, Direction::AToB);
    assert_eq!(err.source.kind(), io::ErrorKind::BrokenPipe);
    assert!(
        err.to_string().starts_with("copy AToB failed after"),
        "{err}"
    );
}

#[tokio::test]
async fn a_peer_that_stopped_reading_ends_that_direction_quietly() {
    // `a` never sends anything; `b` has gone away for writing (graceful reset).
    let mut a = Scripted::default();
    let mut b = Scripted {
        input: VecDeque::from([&b"bye"[..]]),
        eof: true,
        peer_gone: true,
        ..Default::default()
    };
    let moved = copy_bidirectional(&mut a, &mut b).await.unwrap();
    assert_eq!(
        moved,
        Transferred {
            a_to_b: 0,
            b_to_a: 3
        }
    );
    assert_eq!(a.written, b"bye");
    assert!(a.write_closed, "EOF from b must close a's write side");
    assert!(!b.write_closed);
}
