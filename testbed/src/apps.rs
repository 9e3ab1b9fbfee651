//! Test applications that run inside pod namespaces, and clients that talk to them from inside
//! a namespace.
//!
//! * TCP echo: on accept it writes `peer=<ip:port>\n` (the client address it saw), then echoes
//!   every byte until the client half-closes. Source-IP preservation is asserted on that line.
//! * HTTP/1.1: `GET /` answers 200 with `pod=<name> client=<ip:port>\n`; anything else is 404.
//!
//! Servers bind synchronously (a bind error is returned, and the port is listening when the call
//! returns) and then serve on their own thread and runtime inside the namespace. Clients create
//! their socket inside the namespace and then run on the caller's tokio runtime.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::netns::{self, NetnsError, NetnsTask};

/// First bytes of the echo server's greeting line.
pub const ECHO_PEER_PREFIX: &str = "peer=";
/// Upper bound for any single client operation (connect, exchange, request).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of fds) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
const LISTEN_BACKLOG: i32 = 128;

/// Errors from the test apps and their clients.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Entering the namespace or creating a socket there failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A socket operation failed.
    #[error("{what} {addr}: {source}")]
    Io {
        /// The operation, e.g. "bind" or "connect to".
        what: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// Underlying error.
        source: io::Error,
    },
    /// The operation did not finish within [`CLIENT_TIMEOUT`].
    #[error("{what} {addr} timed out after {CLIENT_TIMEOUT:?}")]
    Timeout {
        /// The operation.
        what: &'static str,
        /// The address involved.
        addr: SocketAddr,
    },
    /// The server's answer is not what the protocol says.
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// An HTTP exchange failed.
    #[error("http request to {addr} failed: {source}")]
    Http {
        /// Server address.
        addr: SocketAddr,
        /// Underlying error.
        source: hyper::Error,
    },
    /// The HTTP request could not be built (e.g. an invalid path).
    #[error("invalid http request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// A server running inside a namespace. Dropping it stops the server and closes its sockets.
pub struct App {
    task: NetnsTask<()>,
    local_addr: SocketAddr,
}

impl App {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the server and waits until its sockets are closed.
    pub fn stop(self) {
        self.task.stop();
    }
}

/// Binds a listening TCP socket (with `SO_REUSEADDR`) inside the namespace `ns`.
pub fn bind_tcp(ns: &impl AsFd, addr: SocketAddr) -> Result<std::net::TcpListener, AppError> {
    let io_err = |source| AppError::Io {
        what: "bind",
        addr,
        source,
    };
    let socket = netns::tcp_socket_in(ns)?;
    socket.set_reuse_address(true).map_err(io_err)?;
    socket.bind(&addr.into()).map_err(io_err)?;
    socket.listen(LISTEN_BACKLOG).map_err(io_err)?;
    socket.set_nonblocking(true).map_err(io_err)?;
    Ok(socket.into())
}

/// Starts the TCP echo server on `addr` inside `ns`.
pub fn start_echo(ns: &impl AsFd, addr: SocketAddr) -> Result<App, AppError> {
    let listener = bind_tcp(ns, addr)?;
    let local_addr = local_addr(&listener, addr)?;
    let task = netns::spawn_in_netns(ns, move || async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => accept_loop(listener, serve_echo).await,
            Err(e) => tracing::error!(error = %e, "echo server cannot register listener"),
        }
    })?;
    Ok(App { task, local_addr })
}

/// Starts the HTTP/1.1 server on `addr` inside `ns`; `pod_name` appears in every response.
pub fn start_http(ns: &impl AsFd, addr: SocketAddr, pod_name: &str) -> Result<App, AppError> {
    let listener = bind_tcp(ns, addr)?;
    let local_addr = local_addr(&listener, addr)?;
    let name: Arc<str> = Arc::from(pod_name);
    let task = netns::spawn_in_netns(ns, move || async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                accept_loop(listener, move |stream, peer| {
                    serve_http(stream, peer, name.clone())
                })
                .await;
            }
            Err(e) => tracing::error!(error = %e, "http server cannot register listener"),
        }
    })?;
    Ok(App { task, local_addr })
}

fn local_addr(listener: &std::net::TcpListener, addr: SocketAddr) -> Result<SocketAddr, AppError> {
    listener.local_addr().map_err(|source| AppError::Io {
        what: "read local address of",
        addr,
        source,
    })
}

async fn accept_loop<H, Fut>(listener: TcpListener, handler: H)
where
    H: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => drop(tokio::spawn(handler(stream, peer))),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

async fn serve_echo(stream: TcpStream, peer: SocketAddr) {
    let (mut reader, mut writer) = stream.into_split();
    let greeting = format!("{ECHO_PEER_PREFIX}{peer}\n");
    if writer.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    // Errors mean the client went away; nothing to report for a test app.
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
    let _ = writer.shutdown().await;
}

/// The body the HTTP app sends for `GET /`.
pub fn http_body(pod_name: &str, client: SocketAddr) -> String {
    format!("pod={pod_name} client={client}\n")
}

async fn serve_http(stream: TcpStream, peer: SocketAddr, name: Arc<str>) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = http_response(&req, &name, peer);
        async move { Ok::<_, Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn http_response<B>(req: &Request<B>, name: &str, peer: SocketAddr) -> Response<Full<Bytes>> {
    let (status, body) = if req.method() == Method::GET && req.uri().path() == "/" {
        (StatusCode::OK, http_body(name, peer))
    } else {
        (StatusCode::NOT_FOUND, "not found\n".to_owned())
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Connects from inside `ns` to `addr`.
pub async fn connect(ns: &impl AsFd, addr: SocketAddr) -> Result<TcpStream, AppError> {
    connect_marked(ns, addr, None).await
}

/// Connects from inside `ns` to `addr`, optionally setting `SO_MARK` on the socket first (as a
/// proxy does to bypass its own capture rules; needs CAP_NET_ADMIN).
pub async fn connect_marked(
    ns: &impl AsFd,
    addr: SocketAddr,
    mark: Option<u32>,
) -> Result<TcpStream, AppError> {
    let io_err = |source| AppError::Io {
        what: "connect to",
        addr,
        source,
    };
    let socket = netns::run_in_netns_async(ns, move || new_client_socket(addr, mark))
        .await?
        .map_err(io_err)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(CLIENT_TIMEOUT, socket.connect(addr)).await {
        Ok(result) => result.map_err(io_err),
        Err(_) => Err(AppError::Timeout {
            what: "connect to",
            addr,
        }),
    }
}

fn new_client_socket(addr: SocketAddr, mark: Option<u32>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Writes `payload` on `stream`, half-closes it, and reads until the server closes.
pub async fn exchange(
    mut stream: TcpStream,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, AppError> {
    let io_err = |source| AppError::Io {
        what: "exchange with",
        addr,
        source,
    };
    let work = async {
        stream.write_all(payload).await.map_err(io_err)?;
        stream.shutdown().await.map_err(io_err)?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.map_err(io_err)?;
        Ok(reply)
    };
    tokio::time::timeout(CLIENT_TIMEOUT, work)
        .await
        .unwrap_or(Err(AppError::Timeout {
            what: "exchange with",
            addr,
        }))
}

/// Connects from inside `ns`, sends `payload`, half-closes and returns everything received.
pub async fn tcp_exchange(
    ns: &impl AsFd,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, AppError> {
    let stream = connect(ns, addr).await?;
    exchange(stream, addr, payload).await
}

/// What the echo server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoReply {
    /// The client address the server saw.
    pub peer: SocketAddr,
    /// The bytes echoed back.
    pub data: Vec<u8>,
}

/// Parses an echo server reply (`peer=<ip:port>\n` followed by the echoed bytes).
pub fn parse_echo_reply(reply: &[u8]) -> Result<EchoReply, AppError> {
    let bad = || {
        let shown = String::from_utf8_lossy(&reply[..reply.len().min(120)]).into_owned();
        AppError::BadReply(format!(
            "expected `{ECHO_PEER_PREFIX}<ip:port>` line, got {shown:?}"
        ))
    };
    let newline = reply.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let line = std::str::from_utf8(&reply[..newline]).map_err(|_| bad())?;
    let peer = line
        .strip_prefix(ECHO_PEER_PREFIX)
        .and_then(|p| p.parse().ok())
        .ok_or_else(bad)?;
    Ok(EchoReply {
        peer,
        data: reply[newline + 1..].to_vec(),
    })
}

/// Sends `payload` to the echo server at `addr` from inside `ns` and parses the reply.
pub async fn echo_roundtrip(
    ns: &impl AsFd,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<EchoReply, AppError> {
    parse_echo_reply(&tcp_exchange(ns, addr, payload).await?)
}

/// Reads the first line (without the newline) from `stream`, e.g. a test proxy's report.
pub async fn read_line(stream: TcpStream, addr: SocketAddr) -> Result<String, AppError> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(CLIENT_TIMEOUT, read).await {
        Ok(Ok(_)) => Ok(line.trim_end_matches('\n').to_owned()),
        Ok(Err(source)) => Err(AppError::Io {
            what: "read from",
            addr,
            source,
        }),
        Err(_) => Err(AppError::Timeout {
            what: "read from",
            addr,
        }),
    }
}

/// An HTTP response as seen by [`http_get`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Body, lossily decoded as UTF-8.
    pub body: String,
}

/// Sends `GET path` over HTTP/1.1 from inside `ns` to `addr`.
pub async fn http_get(ns: &impl AsFd, addr: SocketAddr, path: &str) -> Result<HttpReply, AppError> {
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let stream = connect(ns, addr).await?;
    let http_err = |source| AppError::Http { addr, source };
    let work = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let conn = tokio::spawn(conn);
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(http_err)?;
        conn.abort();
        Ok(HttpReply {
            status,
            body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        })
    };
    tokio::time::timeout(CLIENT_TIMEOUT, work)
        .await
        .unwrap_or(Err(AppError::Timeout {
            what: "http request to",
            addr,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_echo_reply_table() {
        let ok = parse_echo_reply(b"peer=10.100.1.11:40000\nhello").unwrap();
        assert_eq!(ok.peer, "10.100.1.11:40000".parse().unwrap());
        assert_eq!(ok.data, b"hello");
        let empty = parse_echo_reply(b"peer=1.2.3.4:5\n").unwrap();
        assert!(empty.data.is_empty());

        let bad: &[&[u8]] = &[
            b"",
            b"peer=10.100.1.11:40000",
            b"proxy orig_dst=10.100.2.11:8080\n",
            b"peer=not-an-addr\n",
            b"\xff\xfe\n",
        ];
        for reply in bad {
            let err = parse_echo_reply(reply).unwrap_err();
            assert!(matches!(err, AppError::BadReply(_)), "{reply:?}: {err}");
            assert!(err.to_string().contains("expected `peer="), "{err}");
        }
    }

    #[test]
    fn http_response_routes() {
        let peer: SocketAddr = "10.100.1.11:1234".parse().unwrap();
        let get = Request::get("/").body(()).unwrap();
        let response = http_response(&get, "web", peer);
        assert_eq!(response.status(), StatusCode::OK);
        let other = Request::get("/nope").body(()).unwrap();
        assert_eq!(
            http_response(&other, "web", peer).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/").body(()).unwrap();
        assert_eq!(
            http_response(&post, "web", peer).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(http_body("web", peer), "pod=web client=10.100.1.11:1234\n");
    }
}
