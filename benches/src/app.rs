//! The application protocol of the benchmarks. The first byte a client sends picks the mode:
//!
//! * `B` bulk: the server discards everything until EOF, then replies with the byte count (u64 BE).
//! * `E` echo: the server reads 1 KiB messages and writes each one back.
//! * `P` ping: the server echoes one byte and closes (connection-rate scenario).
//! * `I` idle: the server answers one byte, then holds the connection until the client closes.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of one echo message.
pub const MSG: usize = 1024;

/// Serves one connection of any mode.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        b'B' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes()).await?;
            s.shutdown().await
        }
        b'E' => {
            let mut buf = [0u8; MSG];
            loop {
                match s.read_exact(&mut buf).await {
                    Ok(_) => {
                        s.write_all(&buf).await?;
                        s.flush().await?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        b'P' => {
            s.read_exact(&mut mode).await?;
            s.write_all(&mode).await?;
            s.flush().await?;
            s.shutdown().await
        }
        b'I' => {
            s.write_all(b"i").await?;
            s.flush().await?;
            let mut sink = [0u8; 16];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown bench mode byte {other:#x}"),
        )),
    }
}

/// Sends `total` bytes in bulk mode and returns how long until the server confirmed receipt.
pub async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, total: u64) -> io::Result<Duration> {
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    s.write_all(b"B").await?;
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    s.shutdown().await?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await?;
    let got = u64::from_be_bytes(ack);
    if got != total {
        return Err(io::Error::other(format!(
            "server received {got} bytes, expected {total}"
        )));
    }
    Ok(start.elapsed())
}

/// Runs `warmup + n` sequential 1 KiB round trips and returns the last `n` round-trip times.
pub async fn echo_rtts<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    warmup: usize,
    n: usize,
) -> io::Result<Vec<Duration>> {
    let out = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    s.write_all(b"E").await?;
    let mut rtts = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        s.write_all(&out).await?;
        s.flush().await?;
        s.read_exact(&mut back).await?;
        if i >= warmup {
            rtts.push(start.elapsed());
        }
    }
    s.shutdown().await?;
    Ok(rtts)
}

/// One ping exchange on a fresh connection.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    // TLS streams may keep written bytes buffered until flushed; without it both ends can wait.
    s.write_all(b"P!").await?;
    s.flush().await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(())
}

/// Puts a connection into idle mode and waits until the server has answered.
pub async fn idle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<S> {
    s.write_all(b"I").await?;
    s.flush().await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn with_server<F, Fut, T>(client: F) -> T
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(b));
        let out = client(a).await;
        server.await.unwrap().unwrap();
        out
    }

    #[tokio::test]
    async fn every_mode_round_trips() {
        with_server(|s| async { bulk(s, 3 * 1024 * 1024 + 7).await.unwrap() }).await;
        let rtts = with_server(|s| async { echo_rtts(s, 2, 10).await.unwrap() }).await;
        assert_eq!(rtts.len(), 10);
        with_server(|s| async { ping(s).await.unwrap() }).await;
        with_server(|s| async { drop(idle(s).await.unwrap()) }).await;
    }

    #[tokio::test]
    async fn unknown_mode_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"Z").await.unwrap();
        let err = serve(b).await.unwrap_err();
        assert!(err.to_string().contains("unknown bench mode"));
    }
}
