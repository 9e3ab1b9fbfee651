//! The HBONE pool of one pod: tunnels are dialled from inside the pod's network namespace with
//! the ztunnel mark, so the kernel uses the pod's IP as source and the capture rules let them out.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_core::hbone::client::{ClientCerts, Connector, HbonePool, PoolSettings};
use mesh_core::netns::NetnsHandle;
use mesh_core::socket::{self, SocketError, UpstreamOptions};
use tokio::net::TcpStream;

/// Dials HBONE peers from inside a pod's network namespace.
#[derive(Debug, Clone)]
pub struct NetnsConnector {
    netns: NetnsHandle,
    opts: UpstreamOptions,
}

impl NetnsConnector {
    /// Dials from `netns` with `opts` (mark, keepalive, timeout).
    pub fn new(netns: NetnsHandle, opts: UpstreamOptions) -> Self {
        Self { netns, opts }
    }
}

impl Connector for NetnsConnector {
    fn connect(
        &self,
        dst: SocketAddr,
        _src_ip: Option<IpAddr>,
    ) -> BoxFuture<'static, io::Result<TcpStream>> {
        // The socket lives in the pod's namespace, so its source already is the pod's IP; pool
        // keys never carry a source IP in in-pod mode.
        let (netns, opts) = (self.netns.clone(), self.opts.clone());
        Box::pin(async move {
            socket::connect_upstream(&netns, dst, None, &opts)
                .await
                .map_err(to_io)
        })
    }
}

/// Keeps the OS error kind (the pool classifies timeouts and refusals) and our message.
fn to_io(e: SocketError) -> io::Error {
    let kind = match &e {
        SocketError::ConnectTimeout { .. } => io::ErrorKind::TimedOut,
        SocketError::Connect { source, .. } | SocketError::Io { source, .. } => source.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A pool for one pod.
pub fn pod_pool(
    netns: NetnsHandle,
    certs: Arc<dyn ClientCerts>,
    settings: PoolSettings,
    opts: UpstreamOptions,
) -> HbonePool {
    HbonePool::new(settings, certs, Arc::new(NetnsConnector::new(netns, opts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_errors_keep_their_kind_and_text() {
        let timeout = SocketError::ConnectTimeout {
            addr: "10.0.0.1:15008".parse().unwrap(),
            netns: 7,
            timeout: std::time::Duration::from_secs(1),
            hint: "",
        };
        let e = to_io(timeout);
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("10.0.0.1:15008"), "{e}");
        let refused = SocketError::Connect {
            addr: "10.0.0.1:15008".parse().unwrap(),
            netns: 7,
            source: io::ErrorKind::ConnectionRefused.into(),
            hint: "",
        };
        assert_eq!(to_io(refused).kind(), io::ErrorKind::ConnectionRefused);
    }
}
