//! ZDS server: hands enrolled pods' network namespaces to the ztunnels on this node.
//!
//! Wire-compatible with Istio's node agent (`istio.workload.zds` over a `SOCK_SEQPACKET` socket,
//! see [`mesh_core::zds`]). For every ztunnel that connects:
//!
//! 1. ztunnel sends `ZdsHello{version: V1}`; any other version closes the connection.
//! 2. We send a snapshot: one `AddWorkload` (with the netns fd) per known pod, each acked before
//!    the next, then `SnapshotSent`. ztunnel drains proxies for pods not in the snapshot.
//! 3. Steady state: adds go to the **newest** connection only, deletes to **all** connections.
//!    During a ztunnel upgrade both versions are connected; the new one takes new pods while the
//!    old one still learns about deleted pods, so neither serves a pod that is gone.
//!
//! The agent keeps its pod set here even while no ztunnel is connected, so a ztunnel that starts
//! (or restarts) later gets every pod in its snapshot.

mod conn;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_core::zds::{NetnsError, NetnsFd, TransportError, ZdsListener};
use mesh_proto::zds::{AddWorkload, DelWorkload, WorkloadInfo, WorkloadRequest, workload_request};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

/// Istio's default: how long to wait for ztunnel's hello or an ack before giving up on it.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

// After a failed accept (e.g. EMFILE), pause so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Errors of the ZDS server and of the calls made through [`ZdsHandle`].
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// The socket could not be bound, accepted on, read or written.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A pod uid was empty.
    #[error("pod uid must not be empty")]
    EmptyUid,
    /// The file handed to [`ZdsHandle::add_workload`] is not a network namespace.
    #[error("pod {uid}: invalid netns: {source}")]
    InvalidNetns {
        /// The pod.
        uid: String,
        /// Why the file was rejected.
        source: NetnsError,
    },
    /// No ztunnel is connected; the pod is kept and goes out with the next snapshot.
    #[error("no ztunnel connected; pod {uid} is pending until the next snapshot")]
    NoZtunnel {
        /// The pod.
        uid: String,
    },
    /// ztunnel answered with a non-empty ack error.
    #[error("ztunnel rejected {what} for pod {uid}: {reason}")]
    Nack {
        /// The request kind (`add-workload`, `del-workload`).
        what: &'static str,
        /// The pod.
        uid: String,
        /// ztunnel's error text.
        reason: String,
    },
    /// ztunnel did not answer in time; the connection is dropped.
    #[error("no reply from ztunnel to {what} within {timeout:?}")]
    Timeout {
        /// What we were waiting for.
        what: &'static str,
        /// The configured limit.
        timeout: Duration,
    },
    /// ztunnel announced a protocol version other than V1.
    #[error("unsupported zds version {0} in ztunnel hello (only V1 is supported)")]
    UnsupportedVersion(i32),
    /// ztunnel broke the protocol (wrong message, fd attached, message while idle).
    #[error("zds protocol violation by ztunnel: {0}")]
    Protocol(String),
    /// The connection failed while our request was in flight or queued.
    #[error("ztunnel connection {conn} failed before answering: {reason}")]
    ConnectionLost {
        /// The connection id.
        conn: u64,
        /// What happened to it.
        reason: String,
    },
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ZdsServerConfig {
    /// How long to wait for the hello and for each ack.
    pub ack_timeout: Duration,
}

impl Default for ZdsServerConfig {
    fn default() -> Self {
        Self {
            ack_timeout: DEFAULT_ACK_TIMEOUT,
        }
    }
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionPhase {
    /// The snapshot is being sent; requests queue behind it.
    Snapshot,
    /// The snapshot was acknowledged; requests are sent as they come.
    Ready,
}

/// One connected ztunnel, as seen by [`ZdsHandle::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Connection id (increasing: the largest is the newest).
    pub id: u64,
    /// Protocol phase.
    pub phase: ConnectionPhase,
}

/// One known pod, as seen by [`ZdsHandle::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// Pod uid.
    pub uid: String,
    /// Pod identity facts.
    pub info: WorkloadInfo,
    /// Inode of the pod's network namespace.
    pub netns_inode: u64,
}

/// A point-in-time view of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// Known pods, by uid.
    pub pods: Vec<PodStatus>,
    /// Connected ztunnels, oldest first.
    pub connections: Vec<ConnectionStatus>,
}

/// A request for one connection's task; the result goes back on `reply`.
struct Command {
    request: WorkloadRequest,
    netns: Option<Arc<NetnsFd>>,
    uid: String,
    reply: oneshot::Sender<Result<(), ZdsError>>,
}

struct Pod {
    info: WorkloadInfo,
    netns: Arc<NetnsFd>,
}

struct Connection {
    id: u64,
    phase: ConnectionPhase,
    tx: mpsc::UnboundedSender<Command>,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, Pod>,
    // Oldest first: the last entry is the newest connection.
    conns: Vec<Connection>,
    next_conn: u64,
}

struct Shared {
    config: ZdsServerConfig,
    state: Mutex<State>,
    ready: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated in a way that matters
        // (every update is a single insert/remove), so keep serving rather than propagate poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_ready(&self, state: &State) {
        let ready = state
            .conns
            .iter()
            .filter(|c| c.phase == ConnectionPhase::Ready)
            .count();
        self.ready.send_replace(ready);
    }
}

/// The bound ZDS server. Create with [`ZdsServer::bind`], drive with [`ZdsServer::run`].
pub struct ZdsServer {
    listener: ZdsListener,
    shared: Arc<Shared>,
}

impl ZdsServer {
    /// Binds the socket at `path` with default settings (see [`ZdsServer::bind_with`]).
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        Self::bind_with(path, ZdsServerConfig::default())
    }

    /// Binds the socket at `path`, replacing a stale socket file from an earlier run.
    pub fn bind_with(path: impl AsRef<Path>, config: ZdsServerConfig) -> Result<Self, ZdsError> {
        let listener = ZdsListener::bind(path)?;
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State::default()),
            ready: watch::channel(0).0,
        });
        info!(path = %listener.path().display(), "zds server listening");
        Ok(Self { listener, shared })
    }

    /// The socket path.
    pub fn path(&self) -> PathBuf {
        self.listener.path().to_path_buf()
    }

    /// A handle for adding and deleting pods; usable before and while the server runs.
    pub fn handle(&self) -> ZdsHandle {
        ZdsHandle {
            shared: self.shared.clone(),
        }
    }

    /// Accepts ztunnel connections until the future is dropped; dropping it also closes every
    /// connection. Pods added through handles stay known for a later server on the same handle.
    pub async fn run(self) {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(sock) => {
                        let id = self.shared.lock().next_id();
                        let span = info_span!("zds_conn", conn = id);
                        tasks.spawn(conn::serve(self.shared.clone(), sock, id).instrument(span));
                    }
                    Err(error) => {
                        warn!(%error, "zds accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
                Some(_) = tasks.join_next() => {}
            }
        }
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }
}

/// A cloneable handle to the server's pod set and connections.
#[derive(Clone)]
pub struct ZdsHandle {
    shared: Arc<Shared>,
}

impl ZdsHandle {
    /// Enrolls a pod: remembers it and sends `AddWorkload` with `netns` to the newest ztunnel,
    /// waiting for the ack.
    ///
    /// The pod is remembered whatever the outcome, so it is part of every later snapshot. With
    /// no ztunnel connected this returns [`ZdsError::NoZtunnel`] (the pod is pending); a NACK
    /// returns [`ZdsError::Nack`] with ztunnel's reason.
    pub async fn add_workload(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: File,
    ) -> Result<(), ZdsError> {
        if uid.is_empty() {
            return Err(ZdsError::EmptyUid);
        }
        let netns = NetnsFd::new(netns).map_err(|source| ZdsError::InvalidNetns {
            uid: uid.to_string(),
            source,
        })?;
        let netns = Arc::new(netns);
        let inode = netns.inode();
        let request = add_request(uid, info.clone());
        let reply = {
            let mut state = self.shared.lock();
            let pod = Pod {
                info,
                netns: netns.clone(),
            };
            state.pods.insert(uid.to_string(), pod);
            self.send_to_newest(&mut state, request, Some(netns), uid)
        };
        let Some((conn, reply)) = reply else {
            info!(
                uid,
                netns_inode = inode,
                "no ztunnel connected; pod pending"
            );
            return Err(ZdsError::NoZtunnel {
                uid: uid.to_string(),
            });
        };
        debug!(uid, netns_inode = inode, conn, "add-workload sent");
        await_reply(conn, reply).await
    }

    /// Removes a pod and sends `DelWorkload` to every connected ztunnel, waiting for all acks.
    /// Returns the first failure (each one is also logged). Deleting an unknown uid is not an
    /// error: a ztunnel may still know it from before this agent started.
    pub async fn del_workload(&self, uid: &str) -> Result<(), ZdsError> {
        if uid.is_empty() {
            return Err(ZdsError::EmptyUid);
        }
        let request = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: uid.to_string(),
            })),
        };
        let replies = {
            let mut state = self.shared.lock();
            state.pods.remove(uid);
            self.broadcast(&mut state, &request, uid)
        };
        let mut first_error = None;
        for (conn, reply) in replies {
            if let Err(error) = await_reply(conn, reply).await {
                warn!(uid, conn, %error, "del-workload failed on a ztunnel connection");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Known pods and connected ztunnels right now.
    pub fn status(&self) -> ServerStatus {
        let state = self.shared.lock();
        let pods = state.pods.iter().map(|(uid, pod)| PodStatus {
            uid: uid.clone(),
            info: pod.info.clone(),
            netns_inode: pod.netns.inode(),
        });
        let connections = state.conns.iter().map(|c| ConnectionStatus {
            id: c.id,
            phase: c.phase,
        });
        ServerStatus {
            pods: pods.collect(),
            connections: connections.collect(),
        }
    }

    /// Watches the number of connections that have acknowledged their snapshot.
    pub fn ready_connections(&self) -> watch::Receiver<usize> {
        self.shared.ready.subscribe()
    }

    // Queues on the newest live connection, dropping dead entries on the way.
    fn send_to_newest(
        &self,
        state: &mut State,
        request: WorkloadRequest,
        netns: Option<Arc<NetnsFd>>,
        uid: &str,
    ) -> Option<(u64, oneshot::Receiver<Result<(), ZdsError>>)> {
        let mut cmd = new_command(request, netns, uid);
        while let Some(conn) = state.conns.last() {
            let id = conn.id;
            match conn.tx.send(cmd.0) {
                Ok(()) => return Some((id, cmd.1)),
                Err(mpsc::error::SendError(back)) => {
                    state.conns.pop();
                    cmd.0 = back;
                }
            }
        }
        None
    }

    fn broadcast(
        &self,
        state: &mut State,
        request: &WorkloadRequest,
        uid: &str,
    ) -> Vec<(u64, oneshot::Receiver<Result<(), ZdsError>>)> {
        let mut replies = Vec::new();
        state.conns.retain(|conn| {
            let (cmd, reply) = new_command(request.clone(), None, uid);
            let alive = conn.tx.send(cmd).is_ok();
            if alive {
                replies.push((conn.id, reply));
            }
            alive
        });
        replies
    }
}

impl std::fmt::Debug for ZdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsServer")
            .field("path", &self.listener.path())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ZdsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsHandle")
            .field("status", &self.status())
            .finish()
    }
}

fn add_request(uid: &str, info: WorkloadInfo) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(workload_request::Payload::Add(AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info),
        })),
    }
}

fn new_command(
    request: WorkloadRequest,
    netns: Option<Arc<NetnsFd>>,
    uid: &str,
) -> (Command, oneshot::Receiver<Result<(), ZdsError>>) {
    let (reply, rx) = oneshot::channel();
    (
        Command {
            request,
            netns,
            uid: uid.to_string(),
            reply,
        },
        rx,
    )
}

async fn await_reply(
    conn: u64,
    reply: oneshot::Receiver<Result<(), ZdsError>>,
) -> Result<(), ZdsError> {
    // The sender is dropped without an answer only when the connection task ended first.
    reply.await.unwrap_or_else(|_| {
        Err(ZdsError::ConnectionLost {
            conn,
            reason: "connection closed".to_string(),
        })
    })
}

#[cfg(test)]
mod tests;
