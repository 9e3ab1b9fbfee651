//! The ZDS client: connects to the node agent, says hello, and dispatches its requests.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::zds::{Datagram, NetnsFd, TransportError, ZdsSocket};
use mesh_proto::zds::{
    Ack, AddWorkload, Version, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request::Payload, workload_response,
};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{AddKind, WorkloadAdd, WorkloadProxyManager};

/// Istio's first reconnect delay.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(10);
/// Istio's reconnect delay cap (the delay doubles from the initial one up to this).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(15);

// Past this delay a failing connect is worth a warning rather than a debug line.
const WARN_AFTER_BACKOFF: Duration = Duration::from_secs(1);

/// Errors that end one connection to the node agent (the client then reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ZdsClientError {
    /// The socket failed or was closed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ZdsClientConfig {
    /// The node agent's socket (Istio default `/var/run/ztunnel/ztunnel.sock`).
    pub socket_path: PathBuf,
    /// First reconnect delay.
    pub initial_backoff: Duration,
    /// Largest reconnect delay.
    pub max_backoff: Duration,
}

impl ZdsClientConfig {
    /// Settings for `socket_path` with Istio's backoff.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// Keeps a connection to the node agent and feeds its requests to a [`WorkloadProxyManager`].
pub struct ZdsClient {
    config: ZdsClientConfig,
    manager: Arc<dyn WorkloadProxyManager>,
    // Netns inode of every uid the manager accepted; outlives connections so that a snapshot
    // after an agent restart can tell "same pod" from "recreated sandbox".
    known: HashMap<String, u64>,
    snapshots: watch::Sender<u64>,
}

impl ZdsClient {
    /// A client for `config.socket_path` dispatching to `manager`.
    pub fn new(config: ZdsClientConfig, manager: Arc<dyn WorkloadProxyManager>) -> Self {
        Self {
            config,
            manager,
            known: HashMap::new(),
            snapshots: watch::channel(0).0,
        }
    }

    /// The node agent's socket path.
    pub fn socket_path(&self) -> &Path {
        &self.config.socket_path
    }

    /// Counts snapshots reconciled so far; the first one is when in-pod mode becomes ready.
    pub fn snapshots(&self) -> watch::Receiver<u64> {
        self.snapshots.subscribe()
    }

    /// Connects, serves, and reconnects forever (until the future is dropped). Reconnect delays
    /// double from `initial_backoff` to `max_backoff` and reset once a snapshot was reconciled.
    pub async fn run(mut self) {
        let path = self.config.socket_path.clone();
        let mut backoff = self.config.initial_backoff;
        loop {
            match ZdsSocket::connect(&path).await {
                Ok(sock) => {
                    let before = *self.snapshots.borrow();
                    let span = info_span!("zds_client", path = %path.display());
                    self.connection(&sock).instrument(span).await;
                    if *self.snapshots.borrow() != before {
                        backoff = self.config.initial_backoff;
                    }
                }
                Err(error) if backoff >= WARN_AFTER_BACKOFF => {
                    warn!(%error, ?backoff, "cannot reach the node agent; retrying");
                }
                Err(error) => debug!(%error, ?backoff, "cannot reach the node agent; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    async fn connection(&mut self, sock: &ZdsSocket) {
        info!("connected to the node agent");
        match self.serve(sock).await {
            Ok(()) => info!("node agent closed the connection"),
            Err(error) => warn!(%error, "zds connection failed"),
        }
    }

    /// Serves one connection: hello, then one ack per request until the agent goes away.
    async fn serve(&mut self, sock: &ZdsSocket) -> Result<(), ZdsClientError> {
        sock.send(
            &ZdsHello {
                version: Version::V1 as i32,
            },
            None,
        )
        .await?;
        // `Some` while the snapshot is being received: the uids it named so far.
        let mut snapshot = Some(HashSet::new());
        loop {
            let outcome = match sock.recv_datagram().await {
                Ok(datagram) => self.handle(datagram, &mut snapshot).await,
                Err(TransportError::Closed) => return Ok(()),
                // An oversize datagram was consumed whole, so the protocol is still in step:
                // answer it like any other bad request.
                Err(e @ (TransportError::Truncated { .. } | TransportError::ControlTruncated)) => {
                    Err(format!("invalid zds request: {e}"))
                }
                Err(e) => return Err(e.into()),
            };
            let error = outcome.err().unwrap_or_default();
            if !error.is_empty() {
                warn!(%error, "nacking zds request");
            }
            let ack = workload_response::Payload::Ack(Ack { error });
            sock.send(&WorkloadResponse { payload: Some(ack) }, None)
                .await?;
        }
    }

    async fn handle(
        &mut self,
        datagram: Datagram,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), String> {
        let request: WorkloadRequest = datagram.decode("zds request").map_err(|e| e.to_string())?;
        let fds = datagram.fds;
        let Some(payload) = request.payload else {
            return Err("invalid zds request: no known payload".to_string());
        };
        match payload {
            Payload::Add(add) => self.add(add, fds, snapshot).await,
            other if !fds.is_empty() => Err(format!(
                "{} carried {} file descriptor(s); only add-workload may carry one",
                payload_name(&other),
                fds.len()
            )),
            Payload::Keep(keep) => self.keep(keep.uid, snapshot).await,
            Payload::Del(del) => self.del(del.uid, snapshot).await,
            Payload::SnapshotSent(_) => self.snapshot_sent(snapshot).await,
        }
    }

    async fn add(
        &mut self,
        add: AddWorkload,
        fds: Vec<OwnedFd>,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), String> {
        let uid = add.uid;
        if uid.is_empty() {
            return Err("add-workload has an empty uid".to_string());
        }
        // The agent knows this pod even if its fd turns out unusable, so a running proxy for it
        // must survive the snapshot's reconciliation.
        if let Some(seen) = snapshot {
            seen.insert(uid.clone());
        }
        let netns = single_netns(&uid, fds)?;
        let inode = netns.inode();
        let kind = AddKind::classify(self.known.get(&uid).copied(), inode);
        info!(uid, netns_inode = inode, ?kind, "add workload");
        let request = WorkloadAdd {
            uid: uid.clone(),
            info: add.workload_info,
            netns,
            kind,
        };
        self.manager.add(request).await?;
        self.known.insert(uid, inode);
        Ok(())
    }

    async fn keep(
        &self,
        uid: String,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), String> {
        let Some(seen) = snapshot else {
            return Err(format!("keep-workload for pod {uid} outside of a snapshot"));
        };
        info!(uid, "keep workload");
        seen.insert(uid.clone());
        self.manager.keep(uid).await
    }

    async fn del(
        &mut self,
        uid: String,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), String> {
        info!(uid, "delete workload");
        if let Some(seen) = snapshot {
            seen.remove(&uid);
        }
        self.known.remove(&uid);
        self.manager.del(uid).await
    }

    async fn snapshot_sent(
        &mut self,
        snapshot: &mut Option<HashSet<String>>,
    ) -> Result<(), String> {
        let Some(seen) = snapshot.take() else {
            return Err("snapshot-sent received twice on one connection".to_string());
        };
        info!(pods = seen.len(), "snapshot complete; reconciling");
        self.known.retain(|uid, _| seen.contains(uid));
        self.manager.snapshot_sent(seen).await?;
        self.snapshots.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// The one descriptor an add must carry, checked to be a network namespace.
fn single_netns(uid: &str, mut fds: Vec<OwnedFd>) -> Result<NetnsFd, String> {
    match (fds.pop(), fds.len()) {
        (Some(fd), 0) => NetnsFd::new(fd).map_err(|e| format!("add-workload for pod {uid}: {e}")),
        (None, _) => Err(format!(
            "add-workload for pod {uid} carried no netns file descriptor"
        )),
        (Some(_), extra) => Err(format!(
            "add-workload for pod {uid} carried {} file descriptors, expected exactly one",
            extra + 1
        )),
    }
}

fn payload_name(payload: &Payload) -> &'static str {
    match payload {
        Payload::Add(_) => "add-workload",
        Payload::Keep(_) => "keep-workload",
        Payload::Del(_) => "del-workload",
        Payload::SnapshotSent(_) => "snapshot-sent",
    }
}

impl std::fmt::Debug for ZdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZdsClient")
            .field("socket_path", &self.config.socket_path)
            .field("known", &self.known)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
