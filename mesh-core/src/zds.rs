//! ZDS transport: the node-local socket between the node agent (zmesh-cni) and ztunnel.
//!
//! The wire is Istio's: a Unix `SOCK_SEQPACKET` socket carrying exactly one protobuf message per
//! datagram with no length prefix. The receiver reads into a [`MAX_DATAGRAM_SIZE`]-byte buffer and
//! treats truncation as an error. `AddWorkload` carries the pod's network namespace as one file
//! descriptor in `SCM_RIGHTS` ancillary data.
//!
//! This module only moves datagrams and file descriptors; the request/ack protocol lives with each
//! end (the server in `zmesh-cni`, the client in `ztunnel`). Received descriptors are owned
//! ([`std::os::fd::OwnedFd`]) the moment they leave the kernel, so every error path closes them.

mod netns;
mod socket;

pub use netns::{NetnsError, NetnsFd};
pub use socket::{
    Datagram, MAX_DATAGRAM_SIZE, MAX_RECEIVED_FDS, TransportError, ZdsListener, ZdsSocket,
};
