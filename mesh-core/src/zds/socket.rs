//! Async `SOCK_SEQPACKET` Unix sockets that move one datagram (plus optional fds) at a time.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use rustix::net::{
    self as rnet, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Largest datagram a ZDS receiver accepts; larger ones are truncated by the kernel and rejected.
/// Istio's ztunnel reads into a buffer of this size, so senders must stay within it too.
pub const MAX_DATAGRAM_SIZE: usize = 1024;

/// How many descriptors one datagram may carry before the ancillary data counts as truncated.
/// The protocol allows one; room for a few more lets us report "too many" precisely.
pub const MAX_RECEIVED_FDS: usize = 4;

// Backlog of the listening socket; a node has a handful of ztunnels at most.
const LISTEN_BACKLOG: i32 = 128;

/// Errors of the ZDS transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A socket system call failed.
    #[error("zds socket {op} failed: {source}")]
    Io {
        /// The operation (`connect`, `recvmsg`, ...).
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The socket path could not be prepared or used.
    #[error("zds socket path {path}: {reason}")]
    Path {
        /// The socket path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The peer closed the connection.
    #[error("zds peer closed the connection")]
    Closed,
    /// A received datagram did not fit into [`MAX_DATAGRAM_SIZE`] bytes.
    #[error("zds datagram of {len} bytes exceeds the {MAX_DATAGRAM_SIZE}-byte limit")]
    Truncated {
        /// The datagram's real length.
        len: usize,
    },
    /// A received datagram carried more descriptors than [`MAX_RECEIVED_FDS`].
    #[error("zds datagram carried more than {MAX_RECEIVED_FDS} file descriptors")]
    ControlTruncated,
    /// An outgoing message is larger than [`MAX_DATAGRAM_SIZE`].
    #[error("zds message of {len} bytes exceeds the {MAX_DATAGRAM_SIZE}-byte limit")]
    TooLarge {
        /// The encoded length.
        len: usize,
    },
    /// An outgoing message encodes to zero bytes, which the peer would read as a close.
    #[error("refusing to send an empty zds datagram (the peer would read it as a close)")]
    Empty,
    /// The kernel accepted only part of a datagram (never expected on `SOCK_SEQPACKET`).
    #[error("short zds send: {sent} of {len} bytes")]
    ShortSend {
        /// Bytes sent.
        sent: usize,
        /// Bytes meant to be sent.
        len: usize,
    },
    /// A datagram is not a valid protobuf encoding of the expected message.
    #[error("invalid {what}: {source}")]
    Decode {
        /// The message that was expected.
        what: &'static str,
        /// The decoder's error.
        source: prost::DecodeError,
    },
    /// The socket was created outside a tokio runtime.
    #[error("zds sockets need a tokio runtime with IO enabled")]
    NoRuntime,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { op, source }
}

/// One received datagram: its bytes and the descriptors that came with it (already owned, so
/// dropping the datagram closes them).
#[derive(Debug)]
pub struct Datagram {
    /// The payload (at most [`MAX_DATAGRAM_SIZE`] bytes).
    pub bytes: Vec<u8>,
    /// Descriptors passed with `SCM_RIGHTS`, in order.
    pub fds: Vec<OwnedFd>,
}

impl Datagram {
    /// Decodes the payload as `M`; `what` names the message in the error.
    pub fn decode<M: prost::Message + Default>(
        &self,
        what: &'static str,
    ) -> Result<M, TransportError> {
        M::decode(self.bytes.as_slice()).map_err(|source| TransportError::Decode { what, source })
    }
}

/// Wraps a non-blocking socket for readiness notifications.
///
/// Tokio has no `SOCK_SEQPACKET` type, and `AsyncFd` registration is `unsafe` in current tokio.
/// `UnixDatagram` is only used here as a safe readiness registration for an owned fd: every
/// send, receive and accept goes through our own `rustix` calls inside `async_io`, so the socket
/// type it believes it holds never matters.
fn register(fd: OwnedFd) -> Result<UnixDatagram, TransportError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TransportError::NoRuntime);
    }
    let std = std::os::unix::net::UnixDatagram::from(fd);
    UnixDatagram::from_std(std).map_err(io_err("register"))
}

fn seqpacket_socket() -> Result<OwnedFd, TransportError> {
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    rnet::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None).map_err(|e| {
        TransportError::Io {
            op: "socket",
            source: e.into(),
        }
    })
}

fn unix_addr(path: &Path) -> Result<SocketAddrUnix, TransportError> {
    SocketAddrUnix::new(path).map_err(|e| TransportError::Path {
        path: path.to_path_buf(),
        reason: format!("not usable as a unix socket address: {e}"),
    })
}

/// A connected ZDS socket (either end).
#[derive(Debug)]
pub struct ZdsSocket {
    io: UnixDatagram,
}

impl ZdsSocket {
    /// Connects to a listening ZDS socket at `path`.
    ///
    /// Unix-socket connects complete immediately; a full backlog fails with `EAGAIN`, which
    /// callers treat like any other connect failure and retry with backoff.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        let addr = unix_addr(path.as_ref())?;
        let fd = seqpacket_socket()?;
        rnet::connect(&fd, &addr).map_err(|e| TransportError::Io {
            op: "connect",
            source: e.into(),
        })?;
        Ok(Self { io: register(fd)? })
    }

    /// Creates a connected pair of sockets (for tests and in-process use).
    pub fn pair() -> Result<(Self, Self), TransportError> {
        let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
        let (a, b) = rnet::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)
            .map_err(|e| TransportError::Io {
                op: "socketpair",
                source: e.into(),
            })?;
        Ok((Self { io: register(a)? }, Self { io: register(b)? }))
    }

    /// Encodes `msg` and sends it as one datagram, with `fd` attached via `SCM_RIGHTS` if given.
    pub async fn send<M: prost::Message>(
        &self,
        msg: &M,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), TransportError> {
        self.send_datagram(&msg.encode_to_vec(), fd).await
    }

    /// Sends `bytes` as one datagram, with `fd` attached via `SCM_RIGHTS` if given.
    pub async fn send_datagram(
        &self,
        bytes: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), TransportError> {
        if bytes.len() > MAX_DATAGRAM_SIZE {
            return Err(TransportError::TooLarge { len: bytes.len() });
        }
        if bytes.is_empty() {
            return Err(TransportError::Empty);
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.send_unchecked(bytes, &fds).await
    }

    /// Sends any datagram with any number of descriptors, skipping the size checks. Only for
    /// tests that play a misbehaving peer.
    #[cfg(feature = "testing")]
    pub async fn send_raw(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        self.send_unchecked(bytes, fds).await
    }

    async fn send_unchecked(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let sent = self
            .io
            .async_io(Interest::WRITABLE, || {
                send_once(self.io.as_fd(), bytes, fds)
            })
            .await
            .map_err(io_err("sendmsg"))?;
        if sent != bytes.len() {
            return Err(TransportError::ShortSend {
                sent,
                len: bytes.len(),
            });
        }
        Ok(())
    }

    /// Receives one datagram. Cancel-safe: if the future is dropped, no datagram is lost.
    ///
    /// Errors: [`TransportError::Closed`] at end of stream, [`TransportError::Truncated`] and
    /// [`TransportError::ControlTruncated`] for oversize datagrams (the datagram is consumed and
    /// its descriptors closed, so the connection stays usable).
    pub async fn recv_datagram(&self) -> Result<Datagram, TransportError> {
        self.io
            .async_io(Interest::READABLE, || recv_once(self.io.as_fd()))
            .await
            .map_err(io_err("recvmsg"))?
    }
}

fn send_once(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("ancillary buffer too small"));
    }
    // NOSIGNAL: a peer that went away must surface as EPIPE, not kill the process with SIGPIPE.
    let n = rnet::sendmsg(
        fd,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(n)
}

// The outer `io::Result` is for `async_io` (WouldBlock means "wait again"); the inner one is the
// datagram's verdict.
fn recv_once(fd: BorrowedFd<'_>) -> io::Result<Result<Datagram, TransportError>> {
    let mut buf = vec![0u8; MAX_DATAGRAM_SIZE];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_RECEIVED_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    // TRUNC makes the kernel report the datagram's real length; CMSG_CLOEXEC keeps received
    // namespaces out of any child process.
    let flags = RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC;
    let msg = rnet::recvmsg(fd, &mut [IoSliceMut::new(&mut buf)], &mut control, flags)?;
    // Take ownership of every received descriptor first, so each return below closes them.
    let mut fds = Vec::new();
    for cmsg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > MAX_DATAGRAM_SIZE {
        return Ok(Err(TransportError::Truncated { len: msg.bytes }));
    }
    // The buffer is rounded up for alignment and may hold a few more than the limit.
    if msg.flags.contains(ReturnFlags::CTRUNC) || fds.len() > MAX_RECEIVED_FDS {
        return Ok(Err(TransportError::ControlTruncated));
    }
    // On SOCK_SEQPACKET a zero-byte read without descriptors is the end of the stream.
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(Err(TransportError::Closed));
    }
    buf.truncate(msg.bytes);
    Ok(Ok(Datagram { bytes: buf, fds }))
}

/// A listening ZDS socket (the node agent's end).
#[derive(Debug)]
pub struct ZdsListener {
    io: UnixDatagram,
    path: PathBuf,
}

impl ZdsListener {
    /// Binds and listens at `path`, creating the parent directory if needed.
    ///
    /// A socket file left by a previous run is removed first (the agent owns this path); any
    /// other kind of file at `path` is an error rather than something to delete.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, TransportError> {
        let path = path.as_ref().to_path_buf();
        let path_err = |reason: String| TransportError::Path {
            path: path.clone(),
            reason,
        };
        remove_stale_socket(&path).map_err(path_err)?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| path_err(format!("cannot create parent directory: {e}")))?;
        }
        let addr = unix_addr(&path)?;
        let fd = seqpacket_socket()?;
        rnet::bind(&fd, &addr).map_err(|e| path_err(format!("bind failed: {e}")))?;
        rnet::listen(&fd, LISTEN_BACKLOG).map_err(|e| TransportError::Io {
            op: "listen",
            source: e.into(),
        })?;
        Ok(Self {
            io: register(fd)?,
            path,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection.
    pub async fn accept(&self) -> Result<ZdsSocket, TransportError> {
        let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
        let fd = self
            .io
            .async_io(Interest::READABLE, || {
                rnet::accept_with(self.io.as_fd(), flags).map_err(io::Error::from)
            })
            .await
            .map_err(io_err("accept"))?;
        Ok(ZdsSocket { io: register(fd)? })
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot stat: {e}")),
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale socket: {e}"))
        }
        Ok(_) => Err("exists and is not a socket; refusing to replace it".to_string()),
    }
}

#[cfg(test)]
mod tests;
