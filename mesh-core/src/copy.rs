//! Bidirectional byte copy between two streams, with half-close propagation.
//!
//! Data moves as owned [`Bytes`] chunks: a plain socket is read into a per-direction buffer whose
//! filled part is frozen and handed on without another copy, and an HBONE tunnel hands out the
//! DATA frame payloads h2 decoded and takes chunks as DATA frames, so neither side copies bytes
//! into an intermediate buffer. Plain `AsyncRead + AsyncWrite` types join in through [`Plain`].
//!
//! Read sizes grow with the amount moved (1 KiB, then 16 KiB after 128 KiB, then 256 KiB after
//! 10 MiB): idle and chatty connections stay small, bulk transfers get few, large reads. Small
//! reads go through the stack and are copied into an exact-size chunk, so an idle connection holds
//! no read buffer.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// Read size while a direction has moved less than [`MEDIUM_AFTER`] bytes.
pub const SMALL_READ: usize = 1024;
/// Read size once a direction has moved [`MEDIUM_AFTER`] bytes.
pub const MEDIUM_READ: usize = 16 * 1024;
/// Read size once a direction has moved [`LARGE_AFTER`] bytes.
pub const LARGE_READ: usize = 256 * 1024;
/// Bytes moved before reads grow to [`MEDIUM_READ`].
pub const MEDIUM_AFTER: u64 = 128 * 1024;
/// Bytes moved before reads grow to [`LARGE_READ`].
pub const LARGE_AFTER: u64 = 10 * 1024 * 1024;

/// A source of owned byte chunks.
pub trait ChunkRead {
    /// Reads the next chunk (never empty); `Ok(None)` is end of stream. Sources that need a
    /// buffer read into `buf`, which belongs to this copy direction.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Option<Bytes>>>;
}

/// A sink of owned byte chunks with a write-side half close.
pub trait ChunkWrite {
    /// Writes a non-empty prefix of `chunk` and advances `chunk` past it.
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, chunk: &mut Bytes)
    -> Poll<io::Result<()>>;

    /// Flushes anything buffered.
    fn poll_flush_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Closes the write side (TCP FIN, HTTP/2 END_STREAM); reading may continue.
    fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Ready when the peer will accept no more data (it reset the stream): `Ok` for a graceful
    /// reset (stop copying this way), `Err` otherwise. Polled only while the direction is idle.
    fn poll_write_closed(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

/// Adapts any `AsyncRead + AsyncWrite` (a TCP socket, a TLS stream) to [`ChunkRead`] + [`ChunkWrite`].
#[derive(Debug)]
pub struct Plain<T>(pub T);

impl<T: AsyncRead + Unpin> ChunkRead for Plain<T> {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Option<Bytes>>> {
        buf.poll_fill(cx, Pin::new(&mut self.0))
    }
}

impl<T: AsyncWrite + Unpin> ChunkWrite for Plain<T> {
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.0).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_flush_chunks(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The growing read buffer of one copy direction.
#[derive(Debug, Default)]
pub struct ReadBuffer {
    buf: BytesMut,
    total: u64,
}

impl ReadBuffer {
    /// How much the next read may fill, given how much this direction has moved.
    fn read_size(&self) -> usize {
        match self.total {
            t if t >= LARGE_AFTER => LARGE_READ,
            t if t >= MEDIUM_AFTER => MEDIUM_READ,
            _ => SMALL_READ,
        }
    }

    /// Reads once from `io` and returns what was read as an owned chunk.
    pub fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        io: Pin<&mut R>,
    ) -> Poll<io::Result<Option<Bytes>>> {
        let size = self.read_size();
        if size == SMALL_READ {
            // Small phase: read onto the stack and copy out exactly what came (at most 1 KiB).
            // A connection that is idle between small messages, the common case, then holds no
            // read buffer at all.
            let mut stack = [MaybeUninit::<u8>::uninit(); SMALL_READ];
            let mut read = ReadBuf::uninit(&mut stack);
            ready!(io.poll_read(cx, &mut read))?;
            let filled = read.filled();
            if filled.is_empty() {
                return Poll::Ready(Ok(None));
            }
            self.total += filled.len() as u64;
            return Poll::Ready(Ok(Some(Bytes::copy_from_slice(filled))));
        }
        if self.buf.capacity() < size && !self.buf.try_reclaim(size) {
            // Chunks handed out earlier still use the old allocation (it is freed when they
            // are); start a new one. `try_reclaim` reuses the old one once they are all gone, so
            // steady state allocates nothing.
            self.buf = BytesMut::with_capacity(size);
        }
        let n = ready!(poll_read_buf(io, cx, &mut (&mut self.buf).limit(size)))?;
        if n == 0 {
            return Poll::Ready(Ok(None));
        }
        self.total += n as u64;
        Poll::Ready(Ok(Some(self.buf.split().freeze())))
    }
}

/// Bytes moved in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Which way a failed copy was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From `a` to `b`.
    AToB,
    /// From `b` to `a`.
    BToA,
}

/// A copy that stopped on an I/O error, with what had been moved until then.
#[derive(Debug, thiserror::Error)]
#[error("copy {direction:?} failed after {transferred:?}: {source}")]
pub struct CopyError {
    /// The direction that failed.
    pub direction: Direction,
    /// Bytes moved before the failure.
    pub transferred: Transferred,
    /// The I/O error.
    pub source: io::Error,
}

/// Copies `a` ⇄ `b` until both directions reach end of stream, propagating each end of stream as
/// a write-side close on the other stream. Fails on the first I/O error in either direction.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: ChunkRead + ChunkWrite + ?Sized,
    B: ChunkRead + ChunkWrite + ?Sized,
{
    let mut a_to_b = Pump::default();
    let mut b_to_a = Pump::default();
    let result = poll_fn(|cx| {
        let ab = a_to_b.poll(cx, a, b).map_err(|e| (Direction::AToB, e))?;
        let ba = b_to_a.poll(cx, b, a).map_err(|e| (Direction::BToA, e))?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let transferred = Transferred {
        a_to_b: a_to_b.moved,
        b_to_a: b_to_a.moved,
    };
    match result {
        Ok(()) => Ok(transferred),
        Err((direction, source)) => Err(CopyError {
            direction,
            transferred,
            source,
        }),
    }
}

/// [`copy_bidirectional`] for two plain `AsyncRead + AsyncWrite` streams.
pub async fn copy_plain<A, B>(a: &mut A, b: &mut B) -> Result<Transferred, CopyError>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_bidirectional(&mut Plain(a), &mut Plain(b)).await
}

/// One direction of a copy.
#[derive(Debug, Default)]
struct Pump {
    buf: ReadBuffer,
    pending: Option<Bytes>,
    need_flush: bool,
    eof: bool,
    done: bool,
    moved: u64,
}

impl Pump {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: ChunkRead + ?Sized,
        W: ChunkWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.poll_write_pending(cx, w))?;
            if self.eof {
                return self.poll_finish(cx, w);
            }
            match r.poll_read_chunk(cx, &mut self.buf) {
                Poll::Ready(Ok(Some(chunk))) => self.pending = Some(chunk),
                Poll::Ready(Ok(None)) => self.eof = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.poll_idle(cx, w),
            }
        }
    }

    fn poll_write_pending<W>(&mut self, cx: &mut Context<'_>, w: &mut W) -> Poll<io::Result<()>>
    where
        W: ChunkWrite + ?Sized,
    {
        if let Some(chunk) = &mut self.pending {
            while !chunk.is_empty() {
                let before = chunk.len();
                let res = w.poll_write_chunk(cx, chunk);
                self.moved += (before - chunk.len()) as u64;
                ready!(res)?;
            }
            self.pending = None;
            self.need_flush = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Nothing to read right now: flush what was written, and watch for the peer going away.
    fn poll_idle<W: ChunkWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(w.poll_flush_chunks(cx))?;
            self.need_flush = false;
        }
        ready!(w.poll_write_closed(cx))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }

    fn poll_finish<W: ChunkWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(w.poll_flush_chunks(cx))?;
            self.need_flush = false;
        }
        ready!(w.poll_close_write(cx))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
