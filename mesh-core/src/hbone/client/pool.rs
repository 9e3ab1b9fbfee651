//! Pool internals: per-key connection lists, stream slots, dialling, idle release.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use h2::{PingPong, Reason};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{Instrument, debug};

use super::{ClientCerts, ClientError, Connector, PoolKey, PoolSettings, TunnelRequest};
use crate::hbone::ErrorKind;
use crate::hbone::{MAX_WINDOW, Tunnel, clamp_frame_size, keepalive};
use crate::tls::{classify_handshake_error, dummy_server_name};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data; keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pool of HBONE connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: PoolSettings,
    certs: Arc<dyn ClientCerts>,
    connector: Arc<dyn Connector>,
    keys: Mutex<HashMap<PoolKey, Arc<KeyEntry>>>,
    next_id: AtomicU64,
}

/// The connections of one key, and the lock that serializes dialling for it.
#[derive(Default)]
struct KeyEntry {
    dial: tokio::sync::Mutex<DialState>,
    // Finished dial attempts; read before queueing on `dial` to spot attempts made meanwhile.
    dials: AtomicU64,
    conns: Mutex<Vec<Arc<PooledConn>>>,
}

/// How the last dial of a key failed, for the requests that queued behind it.
#[derive(Default)]
struct DialState {
    last_failure: Option<(ErrorKind, String)>,
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    shared: Arc<ConnShared>,
}

/// State shared by a pooled connection, its driver task and its tunnels.
struct ConnShared {
    state: Mutex<ConnState>,
    closed: AtomicBool,
    became_idle: Notify,
    // The first TLS error on the connection; h2 flattens I/O errors to strings, losing it.
    tls_error: OnceLock<rustls::Error>,
}

impl ConnShared {
    fn new() -> Self {
        Self {
            state: Mutex::new(ConnState {
                active: 0,
                idle_since: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            became_idle: Notify::new(),
            tls_error: OnceLock::new(),
        }
    }
}

struct ConnState {
    active: usize,
    idle_since: Instant,
}

/// One claimed stream on a connection; released when the tunnel is dropped.
struct StreamSlot {
    shared: Arc<ConnShared>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.active -= 1;
        if state.active == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.shared.became_idle.notify_one();
        }
    }
}

/// Whether a failed attempt may be retried on a fresh connection (nothing was sent yet).
enum OpenError {
    Retry(ClientError),
    Fatal(ClientError),
}

impl HbonePool {
    /// A pool presenting certificates from `certs` and dialling through `connector`.
    pub fn new(
        settings: PoolSettings,
        certs: Arc<dyn ClientCerts>,
        connector: Arc<dyn Connector>,
    ) -> Self {
        let inner = PoolInner {
            settings,
            certs,
            connector,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Opens a tunnel: a `CONNECT` on a pooled (or new) connection for `key`. Returns the tunnel
    /// once the server answered `200`; any other status is [`ClientError::Status`].
    ///
    /// Dialling is bounded by the connect and handshake timeouts; waiting for the server's answer
    /// is not (it authorizes and connects upstream first): wrap the call in a timeout if needed.
    pub async fn open(
        &self,
        key: &PoolKey,
        request: &TunnelRequest,
    ) -> Result<Tunnel, ClientError> {
        match self.inner.try_open(key, request).await {
            Ok(tunnel) => Ok(tunnel),
            Err(OpenError::Fatal(e)) => Err(e),
            // The pooled connection died under us (GOAWAY, reset): one retry on another.
            Err(OpenError::Retry(e)) => {
                debug!(error = %e, "retrying CONNECT on another connection");
                self.inner
                    .try_open(key, request)
                    .await
                    .map_err(|e| match e {
                        OpenError::Retry(e) | OpenError::Fatal(e) => e,
                    })
            }
        }
    }

    /// Live pooled connections for `key`.
    pub fn connections(&self, key: &PoolKey) -> usize {
        let entry = lock(&self.inner.keys).get(key).cloned();
        entry.map_or(0, |e| lock(&e.conns).len())
    }

    /// Live pooled connections over all keys.
    pub fn total_connections(&self) -> usize {
        let entries: Vec<_> = lock(&self.inner.keys).values().cloned().collect();
        entries.iter().map(|e| lock(&e.conns).len()).sum()
    }
}

impl PoolInner {
    async fn try_open(
        self: &Arc<Self>,
        key: &PoolKey,
        request: &TunnelRequest,
    ) -> Result<Tunnel, OpenError> {
        let http_request = request.to_http().map_err(OpenError::Fatal)?;
        let (send, slot) = self.acquire(key).await.map_err(OpenError::Fatal)?;
        let (response, stream) = match send_request(send, http_request).await {
            Ok(sent) => sent,
            Err(e) => return Err(stale(key.dst, &slot, e)),
        };
        let response = response.await.map_err(|e| {
            let refused = e.reason() == Some(Reason::REFUSED_STREAM);
            let err = request_error(key.dst, &slot.shared, e);
            if refused {
                OpenError::Retry(err)
            } else {
                OpenError::Fatal(err)
            }
        })?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err(OpenError::Fatal(ClientError::Status {
                dst: key.dst,
                status,
            }));
        }
        let body = response.into_body();
        Ok(Tunnel::new(stream, body, Some(Box::new(slot))))
    }

    async fn acquire(
        self: &Arc<Self>,
        key: &PoolKey,
    ) -> Result<(SendRequest<Bytes>, StreamSlot), ClientError> {
        let entry = self.entry(key);
        if let Some(claimed) = self.checkout(&entry) {
            return Ok(claimed);
        }
        // One dial per key at a time: whoever waits here re-checks once the dial finished.
        let seen = entry.dials.load(Ordering::Acquire);
        let mut dialing = entry.dial.lock().await;
        if let Some(claimed) = self.checkout(&entry) {
            return Ok(claimed);
        }
        // A dial failed while we queued: share its error rather than queueing another dial
        // (a burst to a black-holed peer would otherwise wait one timeout per request).
        if entry.dials.load(Ordering::Acquire) != seen
            && let Some((kind, reason)) = &dialing.last_failure
        {
            let (kind, reason) = (*kind, reason.clone());
            return Err(ClientError::DialFailed {
                dst: key.dst,
                kind,
                reason,
            });
        }
        // Boxed: dialling (TCP, TLS and h2 handshakes) needs kilobytes of future state that would
        // otherwise be part of every tunnel's task for its whole life, even on the pooled path.
        let dialed = Box::pin(self.dial(key)).await;
        dialing.last_failure = dialed.as_ref().err().map(|e| (e.kind(), e.to_string()));
        entry.dials.fetch_add(1, Ordering::AcqRel);
        let conn = dialed?;
        let claimed = self.claim(&conn).ok_or_else(|| ClientError::Request {
            dst: key.dst,
            source: h2::Error::from(Reason::REFUSED_STREAM),
        })?;
        self.insert(key, &entry, conn);
        Ok(claimed)
    }

    fn entry(&self, key: &PoolKey) -> Arc<KeyEntry> {
        lock(&self.keys).entry(key.clone()).or_default().clone()
    }

    fn checkout(&self, entry: &KeyEntry) -> Option<(SendRequest<Bytes>, StreamSlot)> {
        lock(&entry.conns).iter().find_map(|c| self.claim(c))
    }

    /// Claims a stream slot on `conn` if it is alive and below its stream limit.
    fn claim(&self, conn: &PooledConn) -> Option<(SendRequest<Bytes>, StreamSlot)> {
        if conn.shared.closed.load(Ordering::Acquire) {
            return None;
        }
        let limit = self
            .settings
            .max_streams_per_connection
            .min(conn.send.current_max_send_streams());
        let mut state = lock(&conn.shared.state);
        if state.active >= limit {
            return None;
        }
        state.active += 1;
        let slot = StreamSlot {
            shared: conn.shared.clone(),
        };
        Some((conn.send.clone(), slot))
    }

    fn insert(&self, key: &PoolKey, entry: &Arc<KeyEntry>, conn: Arc<PooledConn>) {
        let mut keys = lock(&self.keys);
        // The entry may have been dropped (its last connection released) while we dialled.
        let current = keys.entry(key.clone()).or_insert_with(|| entry.clone());
        lock(&current.conns).push(conn);
    }

    /// Drops connection `id` from the pool, and the key's entry once it has nothing left.
    fn remove(&self, key: &PoolKey, id: u64) {
        let mut keys = lock(&self.keys);
        let Some(entry) = keys.get(key).cloned() else {
            return;
        };
        let mut conns = lock(&entry.conns);
        conns.retain(|c| c.id != id);
        if conns.is_empty() && entry.dial.try_lock().is_ok() {
            drop(conns);
            keys.remove(key);
        }
    }

    /// Releases connection `id` if it has been idle for `timeout`. Checked under the key's
    /// connection lock, so no tunnel can claim the connection at the same time.
    fn release_if_idle(
        &self,
        key: &PoolKey,
        id: u64,
        shared: &ConnShared,
        timeout: Duration,
    ) -> bool {
        let entry = lock(&self.keys).get(key).cloned();
        let conns = entry.as_ref().map(|e| lock(&e.conns));
        {
            let state = lock(&shared.state);
            if state.active > 0 || state.idle_since + timeout > Instant::now() {
                return false;
            }
        }
        shared.closed.store(true, Ordering::Release);
        drop(conns);
        self.remove(key, id);
        true
    }
}

// === dialling ===

type ClientConn = h2::client::Connection<TlsErrorTap, Bytes>;

impl PoolInner {
    async fn dial(self: &Arc<Self>, key: &PoolKey) -> Result<Arc<PooledConn>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span =
            tracing::debug_span!("hbone_outbound", id, dst = %key.dst, src = %key.src_identity);
        let shared = Arc::new(ConnShared::new());
        let handshake = self.handshake(key, shared.clone());
        let (send, mut conn) = handshake.instrument(span.clone()).await?;
        let ping = conn.ping_pong();
        let pool = Arc::downgrade(self);
        let driver = drive(
            conn,
            ping,
            shared.clone(),
            pool,
            key.clone(),
            id,
            self.settings.clone(),
        );
        tokio::spawn(driver.instrument(span));
        Ok(Arc::new(PooledConn { id, send, shared }))
    }

    async fn handshake(
        &self,
        key: &PoolKey,
        shared: Arc<ConnShared>,
    ) -> Result<(SendRequest<Bytes>, ClientConn), ClientError> {
        let tls = self
            .certs
            .client_certificate(&key.src_identity)
            .await
            .map_err(|source| ClientError::Certificate {
                identity: Box::new(key.src_identity.clone()),
                source,
            })?;
        let config = tls.client_config(key.dst_identities.clone())?;
        let tcp = self.connect_tcp(key).await?;
        let dst = key.dst;
        let after = self.settings.handshake_timeout;
        let timed_out = |_| ClientError::HandshakeTimeout { dst, after };
        let connect = TlsConnector::from(config).connect(dummy_server_name(), tcp);
        let stream = tokio::time::timeout(after, connect)
            .await
            .map_err(timed_out)?
            .map_err(|e| ClientError::Handshake {
                dst,
                source: classify_handshake_error(e),
            })?;
        let h2 = h2_builder(&self.settings).handshake(TlsErrorTap { io: stream, shared });
        tokio::time::timeout(after, h2)
            .await
            .map_err(timed_out)?
            .map_err(|source| ClientError::H2Handshake { dst, source })
    }

    async fn connect_tcp(&self, key: &PoolKey) -> Result<TcpStream, ClientError> {
        let dst = key.dst;
        let after = self.settings.connect_timeout;
        let connect = self.connector.connect(dst, key.src_ip);
        tokio::time::timeout(after, connect)
            .await
            .map_err(|_| ClientError::ConnectTimeout { dst, after })?
            .map_err(|source| ClientError::Connect { dst, source })
    }
}

fn h2_builder(settings: &PoolSettings) -> h2::client::Builder {
    let s = &settings.h2;
    let mut b = h2::client::Builder::new();
    b.initial_window_size(s.stream_window.min(MAX_WINDOW))
        .initial_connection_window_size(s.connection_window.min(MAX_WINDOW))
        .max_frame_size(clamp_frame_size(s.max_frame_size))
        .max_header_list_size(s.max_header_list_size)
        .max_send_buffer_size(s.max_send_buffer)
        .enable_push(false)
        .initial_max_send_streams(settings.max_streams_per_connection)
        .max_concurrent_reset_streams(crate::hbone::MAX_REMEMBERED_RESETS)
        .max_local_error_reset_streams(None);
    b
}

async fn send_request(
    send: SendRequest<Bytes>,
    request: http::Request<()>,
) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
    let mut send = send.ready().await?;
    send.send_request(request, false)
}

/// The connection died before our request went out: retry elsewhere, unless TLS failed (the
/// server rejected our certificate, and would again).
fn stale(dst: SocketAddr, slot: &StreamSlot, e: h2::Error) -> OpenError {
    slot.shared.closed.store(true, Ordering::Release);
    let err = request_error(dst, &slot.shared, e);
    match slot.shared.tls_error.get() {
        Some(_) => OpenError::Fatal(err),
        None => OpenError::Retry(err),
    }
}

/// A stream-level error, or the server's TLS rejection of our certificate surfacing on the
/// first request (TLS 1.3 clients finish the handshake before the server verifies them).
fn request_error(dst: SocketAddr, shared: &ConnShared, e: h2::Error) -> ClientError {
    match shared.tls_error.get() {
        Some(tls) => ClientError::Handshake {
            dst,
            source: classify_handshake_error(io::Error::new(
                io::ErrorKind::InvalidData,
                tls.clone(),
            )),
        },
        None => ClientError::Request { dst, source: e },
    }
}

/// The TLS stream under h2, noting the first TLS error it returns (see [`ConnShared`]).
struct TlsErrorTap {
    io: TlsStream<TcpStream>,
    shared: Arc<ConnShared>,
}

impl TlsErrorTap {
    fn note<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &result
            && let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            let _ = self.shared.tls_error.set(tls.clone());
        }
        result
    }
}

impl AsyncRead for TlsErrorTap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        self.note(result)
    }
}

impl AsyncWrite for TlsErrorTap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.note(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(result)
    }
}

// === the per-connection driver task ===

/// Polls the connection until it ends, sends keepalive PINGs, and releases it when idle.
async fn drive(
    conn: ClientConn,
    ping: Option<PingPong>,
    shared: Arc<ConnShared>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    id: u64,
    settings: PoolSettings,
) {
    let h2 = &settings.h2;
    let keepalive = keepalive(ping, h2.keepalive_interval, h2.keepalive_timeout);
    let idle = wait_idle(&shared, &pool, &key, id, settings.idle_timeout);
    tokio::pin!(conn, keepalive, idle);
    tokio::select! {
        result = &mut conn => match result {
            Ok(()) => debug!("hbone connection closed"),
            Err(e) => debug!(error = %e, "hbone connection failed"),
        },
        reason = &mut keepalive => debug!(%reason, "dropping unresponsive hbone connection"),
        () = &mut idle => {
            debug!("releasing idle hbone connection");
            // Out of the pool, the last request handle is gone and h2 sends GOAWAY and closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut conn).await;
        }
    }
    shared.closed.store(true, Ordering::Release);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, id);
    }
}

async fn wait_idle(
    shared: &ConnShared,
    pool: &Weak<PoolInner>,
    key: &PoolKey,
    id: u64,
    timeout: Duration,
) {
    loop {
        let idle_since = {
            let state = lock(&shared.state);
            (state.active == 0).then_some(state.idle_since)
        };
        let Some(since) = idle_since else {
            shared.became_idle.notified().await;
            continue;
        };
        tokio::time::sleep_until(since + timeout).await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.release_if_idle(key, id, shared, timeout) {
            return;
        }
    }
}

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("connections", &self.total_connections())
            .finish()
    }
}
