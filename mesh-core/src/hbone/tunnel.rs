//! One established HBONE stream as a byte stream.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::{ChunkRead, ChunkWrite, ReadBuffer};

/// Something the tunnel keeps alive until it is dropped (the client pool's stream slot).
pub(crate) type Guard = Box<dyn Send + Sync>;

/// An established HBONE `CONNECT` stream.
///
/// Reading yields the peer's DATA payloads and ends at END_STREAM (or a NO_ERROR/CANCEL reset);
/// shutting down the write side sends END_STREAM. Dropping the tunnel before both directions
/// ended resets the stream (CANCEL).
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    // The unread rest of the last DATA payload (AsyncRead callers may read less than a frame).
    leftover: Bytes,
    recv_done: bool,
    send_done: bool,
    _guard: Option<Guard>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("stream", &self.send.stream_id())
            .field("recv_done", &self.recv_done)
            .field("send_done", &self.send_done)
            .finish()
    }
}

impl Tunnel {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Option<Guard>) -> Self {
        Self {
            send,
            recv,
            leftover: Bytes::new(),
            recv_done: false,
            send_done: false,
            _guard: guard,
        }
    }

    /// Receives the next non-empty DATA payload, releasing its flow-control window.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.leftover.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.leftover))));
        }
        loop {
            if self.recv_done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Released as soon as the data leaves h2: the consumer holds one chunk at most.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                None => self.recv_done = true,
                Some(Err(e)) if is_graceful_reset(&e) => self.recv_done = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }

    /// Sends a prefix of `chunk` as DATA, as far as flow control allows right now.
    fn poll_send(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes) -> Poll<io::Result<()>> {
        let capacity = ready!(self.poll_capacity_for(cx, chunk.len()))?;
        let data = chunk.split_to(capacity.min(chunk.len()));
        Poll::Ready(self.send.send_data(data, false).map_err(h2_to_io))
    }

    /// Waits until h2 grants send capacity; returns how much (never zero).
    fn poll_capacity_for(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.send_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "hbone tunnel write side is already closed",
            )));
        }
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity));
            }
            // Not additive: this asks for `want` in total, and h2 assigns it as windows allow.
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(self.closed_error(cx))),
            }
        }
    }

    /// Why the peer stopped accepting data.
    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        let detail = match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => format!("peer reset the hbone stream ({reason})"),
            Poll::Ready(Err(e)) => return h2_to_io(e),
            Poll::Pending => "hbone stream is closed".to_string(),
        };
        io::Error::new(io::ErrorKind::BrokenPipe, detail)
    }

    fn close_send(&mut self) -> io::Result<()> {
        if self.send_done {
            return Ok(());
        }
        self.send_done = true;
        self.send.send_data(Bytes::new(), true).map_err(h2_to_io)
    }
}

/// RST_STREAM NO_ERROR / CANCEL: the peer finished or abandoned the stream; treated as EOF.
fn is_graceful_reset(e: &h2::Error) -> bool {
    e.is_reset() && matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL))
}

/// Maps an h2 error to an I/O error, keeping the underlying I/O error when there is one.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl ChunkRead for Tunnel {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Option<Bytes>>> {
        self.poll_data(cx)
    }
}

impl ChunkWrite for Tunnel {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        self.poll_send(cx, chunk)
    }

    fn poll_flush_chunks(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The h2 connection task writes and flushes queued frames on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_close_write(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.close_send())
    }

    fn poll_write_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL) => Poll::Ready(Ok(())),
            Ok(reason) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("peer reset the hbone stream ({reason})"),
            ))),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(mut data) = ready!(this.poll_data(cx))? else {
            return Poll::Ready(Ok(()));
        };
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        data.advance(n);
        this.leftover = data;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        // Wait for capacity before copying, so a pending write allocates nothing.
        let capacity = ready!(this.poll_capacity_for(cx, buf.len()))?;
        let n = capacity.min(buf.len());
        let data = Bytes::copy_from_slice(&buf[..n]);
        this.send.send_data(data, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().close_send())
    }
}
