//! The per-pod proxies of in-pod mode: for every enrolled pod, three listeners inside its network
//! namespace — outbound capture (15001), inbound plaintext (15006) and inbound HBONE (15008).
//!
//! [`PodProxy::start`] opens the listeners and spawns the three accept loops on the data-plane
//! runtime; [`PodProxy::drain`] stops accepting at once (closing the listeners, so a newer
//! ztunnel sharing the ports through `SO_REUSEPORT` gets every new connection) and lets open
//! connections run until the drain deadline before cutting them.

mod inbound;
mod inbound_passthrough;
mod outbound;
mod pool;
pub mod route;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::Identity;
use mesh_core::copy::{CopyError, Transferred};
use mesh_core::hbone::ErrorKind;
use mesh_core::hbone::client::{ClientError, PoolSettings};
use mesh_core::hbone::server::{HboneServer, ServerError, ServerSettings};
use mesh_core::netns::{NetnsError, NetnsHandle};
use mesh_core::socket::{self, ListenerOptions, SocketError, UpstreamOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::authz::{ConnectionTracker, TrackedConnection};
use crate::certs::{CertError, CertSource};
use crate::metrics::{ConnectionGuard, Metrics};
use crate::state::model::Workload;
use crate::state::{SharedStore, Store};

pub use inbound::{InboundHandler, PodCerts};
pub use route::RouteError;

/// Outbound capture port (REDIRECT target of app egress).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port (TPROXY target of non-HBONE ingress).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE port.
pub const HBONE_PORT: u16 = mesh_core::hbone::HBONE_PORT;
/// ztunnel's own ports: traffic to them is refused to prevent loops.
pub const ILLEGAL_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

// How long a connection waits for its pod to appear in the workload config (upstream: 5 s).
const DEFAULT_WORKLOAD_WAIT: Duration = Duration::from_secs(5);
// Back off after a failed accept (usually EMFILE) instead of spinning on a readable listener.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Why a connection (or a pod's proxy) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `SO_ORIGINAL_DST` could not be read.
    #[error("cannot read the original destination: {0}")]
    OriginalDst(#[source] SocketError),
    /// The destination is one of ztunnel's own ports.
    #[error("refusing connection to {0}: that port belongs to ztunnel (traffic loop)")]
    SelfCall(SocketAddr),
    /// The pod is not (yet) in the workload config.
    #[error("pod {pod} is not in the workload config (waited {waited:?})")]
    UnknownWorkload {
        /// `namespace/name` (or the uid when the agent sent no name).
        pod: String,
        /// How long we waited.
        waited: Duration,
    },
    /// No upstream could be chosen.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No certificate for the pod.
    #[error(transparent)]
    Certificate(#[from] CertError),
    /// The HBONE tunnel could not be opened.
    #[error(transparent)]
    Hbone(#[from] ClientError),
    /// A plain upstream connection failed.
    #[error("upstream {0}")]
    Connect(#[source] SocketError),
    /// A local address could not be read from an accepted socket.
    #[error("accepted connection lost before it was served: {0}")]
    Accepted(#[source] std::io::Error),
    /// The pod's listeners could not be opened.
    #[error("cannot open the pod's listeners: {0}")]
    Listen(#[source] SocketError),
    /// The pod's network namespace could not be used.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The HBONE server could not use its listener.
    #[error(transparent)]
    HboneServer(#[from] ServerError),
    /// The data-plane runtime is shutting down.
    #[error("the data-plane runtime is shutting down")]
    Runtime,
}

impl Error {
    /// The `response_flags` kind of this failure.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Hbone(e) => Some(e.kind()),
            Self::Certificate(_) => Some(ErrorKind::NoCertificate),
            Self::Connect(SocketError::ConnectTimeout { .. }) => Some(ErrorKind::Timeout),
            Self::Connect(_) => Some(ErrorKind::Connect),
            Self::SelfCall(_) => Some(ErrorKind::BadRequest),
            Self::UnknownWorkload { .. } | Self::Route(_) => Some(ErrorKind::Unavailable),
            _ => None,
        }
    }
}

/// Settings every pod proxy shares.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The network of this node's pods (`""` = default).
    pub network: String,
    /// Cluster id, sent in `baggage`.
    pub cluster_id: String,
    /// How long open connections may run once their pod (or ztunnel) drains.
    pub drain_timeout: Duration,
    /// How long a connection waits for its pod to appear in the workload config.
    pub workload_wait: Duration,
    /// HBONE client pool settings.
    pub pool: PoolSettings,
    /// Options of upstream sockets (mark, keepalive, connect timeout).
    pub upstream: UpstreamOptions,
    /// Options of the in-pod listeners.
    pub listener: ListenerOptions,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            network: String::new(),
            cluster_id: mesh_core::ca_client::DEFAULT_CLUSTER_ID.to_string(),
            drain_timeout: Duration::from_secs(5),
            workload_wait: DEFAULT_WORKLOAD_WAIT,
            pool: PoolSettings::default(),
            upstream: UpstreamOptions::default(),
            listener: ListenerOptions::default(),
        }
    }
}

/// What every pod proxy needs from the rest of ztunnel.
#[derive(Debug)]
pub struct ProxyInputs {
    /// Workloads and services.
    pub store: Arc<SharedStore>,
    /// Workload certificates.
    pub certs: Arc<CertSource>,
    /// Traffic metrics.
    pub metrics: Metrics,
    /// Shared settings.
    pub settings: ProxySettings,
    /// Live inbound connections, re-authorized on every config update.
    pub connections: ConnectionTracker,
}

/// The pod as the node agent described it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodInfo {
    /// Kubernetes pod uid.
    pub uid: String,
    /// Pod name (may be empty if the agent sent none).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl PodInfo {
    /// `namespace/name`, or the uid when no name is known.
    pub fn display_name(&self) -> String {
        if self.name.is_empty() {
            self.uid.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// One enrolled pod: who it is, its namespace, and the shared inputs.
#[derive(Debug)]
pub struct PodContext {
    /// The pod.
    pub info: PodInfo,
    /// Its network namespace (sockets are created there).
    pub netns: NetnsHandle,
    /// Shared inputs.
    pub inputs: Arc<ProxyInputs>,
}

impl PodContext {
    /// The pod's workload in `store`: by namespace and name (the uid when no name was sent).
    pub fn find_workload(&self, store: &Store) -> Option<Arc<Workload>> {
        if self.info.name.is_empty() {
            return store.workload(&self.info.uid);
        }
        store
            .workload_by_name(&self.info.namespace, &self.info.name)
            .filter(|w| *w.network == *self.inputs.settings.network)
    }

    /// The pod's workload, waiting up to `workload_wait` for it to appear in the config.
    pub async fn workload(&self) -> Result<Arc<Workload>, Error> {
        if let Some(w) = self.find_workload(&self.inputs.store.snapshot()) {
            return Ok(w);
        }
        let waited = self.inputs.settings.workload_wait;
        self.inputs
            .store
            .wait_for(waited, |s| self.find_workload(s))
            .await
            .ok_or_else(|| Error::UnknownWorkload {
                pod: self.info.display_name(),
                waited,
            })
    }

    /// The store snapshot in effect now.
    pub fn store(&self) -> Arc<Store> {
        self.inputs.store.snapshot()
    }

    /// Connects to `dst` from inside the pod with the ztunnel mark (bypassing capture), from
    /// `transparent_source` when given (the app then sees that address as its client).
    pub async fn connect(
        &self,
        dst: SocketAddr,
        transparent_source: Option<IpAddr>,
    ) -> Result<TcpStream, SocketError> {
        let opts = &self.inputs.settings.upstream;
        socket::connect_upstream(&self.netns, dst, transparent_source, opts).await
    }
}

/// What L4 authorization decides on.
#[derive(Debug)]
pub struct AuthzRequest<'a> {
    /// The client address.
    pub src: SocketAddr,
    /// The client's proven identity (`None` for plaintext).
    pub src_identity: Option<&'a Identity>,
    /// The destination address (pod IP and app port).
    pub dst: SocketAddr,
    /// The destination workload.
    pub dst_workload: &'a Workload,
}

/// L4 authorization of one inbound connection against `store`'s policies: `Err(reason)` denies.
pub fn authorize(store: &Store, request: &AuthzRequest<'_>) -> Result<(), String> {
    let conn = crate::authz::Connection {
        src_ip: request.src.ip(),
        src_identity: request.src_identity,
        dst: request.dst,
    };
    crate::authz::evaluate(store.policy_store(), request.dst_workload, &conn)
        .map_err(|denied| denied.to_string())
}

impl PodContext {
    /// Authorizes an inbound connection to this pod's `workload` and tracks it, so a later
    /// policy update that denies it closes it. `Err(reason)` denies.
    pub fn admit(
        &self,
        workload: &Arc<Workload>,
        src: SocketAddr,
        src_identity: Option<Arc<Identity>>,
        dst: SocketAddr,
    ) -> Result<TrackedConnection, String> {
        let inputs = &self.inputs;
        inputs
            .connections
            .admit(&inputs.store, workload.clone(), src, src_identity, dst)
            .map_err(|denied| denied.to_string())
    }
}

/// Records how a tracked connection ended: a revocation by a policy update is a `DENY`.
pub(crate) fn record_end(
    guard: &mut ConnectionGuard,
    tracked: &TrackedConnection,
    result: &Result<Transferred, CopyError>,
) {
    record_copy(guard, result);
    if let Some(reason) = tracked.revoked() {
        guard.fail(
            Some(ErrorKind::Denied),
            format!("closed by a policy update: {reason}"),
        );
    }
}

/// Records a finished copy on a connection's guard (`a` is always the client side).
pub(crate) fn record_copy(guard: &mut ConnectionGuard, result: &Result<Transferred, CopyError>) {
    match result {
        Ok(t) => guard.bytes(t.a_to_b, t.b_to_a),
        Err(e) => {
            guard.bytes(e.transferred.a_to_b, e.transferred.b_to_a);
            guard.fail(None, e);
        }
    }
}

/// A running pod proxy.
#[derive(Debug)]
pub struct PodProxy {
    ctx: Arc<PodContext>,
    drain: CancellationToken,
    task: JoinHandle<()>,
}

impl PodProxy {
    /// Opens the pod's listeners (inside its namespace) and starts serving them on `data`.
    pub async fn start(ctx: Arc<PodContext>, data: &Handle) -> Result<Self, Error> {
        let listeners = open_listeners(&ctx, data).await?;
        let [outbound, plaintext, hbone] = listeners;
        let drain = CancellationToken::new();
        let deadline = ctx.inputs.settings.drain_timeout;
        let server_settings = ServerSettings {
            drain_timeout: deadline,
            ..ServerSettings::default()
        };
        let server = HboneServer::from_listener(
            hbone,
            Arc::new(PodCerts::new(ctx.clone())),
            Arc::new(InboundHandler::new(ctx.clone())),
            server_settings,
        )?;
        let outbound_proxy = Arc::new(outbound::Outbound::new(ctx.clone()));
        let serve_out = serve(outbound, drain.clone(), deadline, move |s, p| {
            outbound_proxy.clone().handle(s, p)
        });
        let plain_ctx = ctx.clone();
        let serve_in = serve(plaintext, drain.clone(), deadline, move |s, p| {
            inbound_passthrough::handle(plain_ctx.clone(), s, p)
        });
        let serve_hbone = run_hbone(server, drain.clone());
        let span = tracing::info_span!("pod", pod = %ctx.info.display_name());
        let task = data.spawn(
            async move {
                tokio::join!(serve_out, serve_in, serve_hbone);
                debug!("pod proxy stopped");
            }
            .instrument(span),
        );
        info!(pod = %ctx.info.display_name(), netns = ctx.netns.inode(), "pod proxy started");
        Ok(Self { ctx, drain, task })
    }

    /// The pod.
    pub fn context(&self) -> &Arc<PodContext> {
        &self.ctx
    }

    /// Whether a drain was started.
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Stops accepting now; returns the task that ends once open connections finished or were
    /// cut at the drain deadline.
    pub fn drain(self) -> JoinHandle<()> {
        info!(pod = %self.ctx.info.display_name(), "draining pod proxy");
        self.drain.cancel();
        self.task
    }
}

async fn open_listeners(ctx: &PodContext, data: &Handle) -> Result<[TcpListener; 3], Error> {
    let addrs: Vec<SocketAddr> = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT]
        .into_iter()
        .map(|port| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
        .collect();
    let (ns, opts) = (ctx.netns.clone(), ctx.inputs.settings.listener.clone());
    // Listeners register with the reactor of the runtime that creates them: the data plane's.
    let opened = data
        .spawn(async move { socket::listeners(&ns, &addrs, &opts).await })
        .await
        .map_err(|_| Error::Runtime)?
        .map_err(Error::Listen)?;
    opened
        .try_into()
        .map_err(|_| Error::Listen(SocketError::Invalid("expected three listeners".into())))
}

async fn run_hbone<H: mesh_core::hbone::server::ConnectHandler>(
    server: HboneServer<H>,
    drain: CancellationToken,
) {
    let server_drain = server.drain_token();
    let run = server.run();
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => return,
        () = drain.cancelled() => server_drain.cancel(),
    }
    // The server stops accepting, sends GOAWAY and cuts tunnels at its own drain deadline.
    run.await;
}

/// Accepts on `listener` until `drain` fires, then waits up to `deadline` for the connections
/// to finish before cutting them.
async fn serve<F, Fut>(
    listener: TcpListener,
    drain: CancellationToken,
    deadline: Duration,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = drain.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => { conns.spawn(handle(stream, peer)); }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(deadline, all_done).await.is_err() {
        warn!(
            remaining = conns.len(),
            "drain deadline reached, closing connections"
        );
        conns.shutdown().await;
    }
}

#[cfg(test)]
mod tests;
