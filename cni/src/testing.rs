//! Test helpers (feature `testing`): a ztunnel stand-in that speaks ZDS over the real socket and
//! records what the agent sends it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::zds::{Datagram, NetnsFd, TransportError, ZdsSocket};
use mesh_proto::zds::{
    Ack, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
    workload_request::Payload, workload_response,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A shared, ordered log of what fakes saw, to assert the order of steps across fakes.
pub type Journal = Arc<Mutex<Vec<String>>>;

/// Appends `line` to `journal`.
pub fn note(journal: &Journal, line: String) {
    journal.lock().unwrap_or_else(|e| e.into_inner()).push(line);
}

/// One request the stand-in received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZtunnelEvent {
    /// `AddWorkload` with the inode of the namespace descriptor that came with it.
    Add {
        /// Pod uid.
        uid: String,
        /// Pod facts.
        info: WorkloadInfo,
        /// Inode of the received namespace descriptor.
        netns_inode: u64,
    },
    /// `DelWorkload`.
    Del {
        /// Pod uid.
        uid: String,
    },
    /// `SnapshotSent`.
    SnapshotSent,
    /// Anything else, described.
    Other(String),
}

/// A ztunnel stand-in: says hello, acks every request (or NACKs adds of chosen uids) and
/// records each one. Journal lines are `ztunnel add UID`, `ztunnel del UID`, `ztunnel snapshot`.
pub struct RecordingZtunnel {
    events: mpsc::UnboundedReceiver<ZtunnelEvent>,
    nacks: Arc<Mutex<BTreeMap<String, String>>>,
    task: JoinHandle<()>,
}

impl RecordingZtunnel {
    /// Connects to the agent's ZDS socket at `path`.
    pub async fn connect(path: &Path, journal: Option<Journal>) -> Result<Self, TransportError> {
        let sock = ZdsSocket::connect(path).await?;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        sock.send(&hello, None).await?;
        let (tx, events) = mpsc::unbounded_channel();
        let nacks = Arc::new(Mutex::new(BTreeMap::new()));
        let task = tokio::spawn(serve(sock, tx, nacks.clone(), journal));
        Ok(Self {
            events,
            nacks,
            task,
        })
    }

    /// From now on, adds of `uid` are answered with a NACK carrying `reason` (empty: ack again).
    pub fn nack(&self, uid: &str, reason: &str) {
        let mut nacks = self.nacks.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_empty() {
            nacks.remove(uid);
        } else {
            nacks.insert(uid.to_owned(), reason.to_owned());
        }
    }

    /// The next request, waiting up to `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<ZtunnelEvent> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next request matching `pred`, skipping others, waiting up to `timeout` in total.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&ZtunnelEvent) -> bool,
    ) -> Option<ZtunnelEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.next(left).await?;
            if pred(&event) {
                return Some(event);
            }
        }
    }

    /// Every request received so far that has not been read.
    pub fn drain(&mut self) -> Vec<ZtunnelEvent> {
        std::iter::from_fn(|| self.events.try_recv().ok()).collect()
    }

    /// Disconnects (as a ztunnel that exits).
    pub fn disconnect(self) {
        self.task.abort();
    }
}

impl Drop for RecordingZtunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    sock: ZdsSocket,
    tx: mpsc::UnboundedSender<ZtunnelEvent>,
    nacks: Arc<Mutex<BTreeMap<String, String>>>,
    journal: Option<Journal>,
) {
    while let Ok(datagram) = sock.recv_datagram().await {
        let event = decode(datagram);
        let error = match &event {
            ZtunnelEvent::Add { uid, .. } => nacks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(uid)
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        };
        if let Some(journal) = &journal {
            note(journal, journal_line(&event));
        }
        let _ = tx.send(event);
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        if sock.send(&ack, None).await.is_err() {
            return;
        }
    }
}

fn decode(datagram: Datagram) -> ZtunnelEvent {
    let request = datagram.decode::<WorkloadRequest>("zds request");
    let mut fds = datagram.fds;
    match request.map(|r| r.payload) {
        Ok(Some(Payload::Add(add))) => ZtunnelEvent::Add {
            uid: add.uid,
            info: add.workload_info.unwrap_or_default(),
            // 0 when the fd is missing or not a namespace, which no test expects.
            netns_inode: fds
                .pop()
                .and_then(|fd| NetnsFd::new(fd).ok())
                .map_or(0, |ns| ns.inode()),
        },
        Ok(Some(Payload::Del(del))) => ZtunnelEvent::Del { uid: del.uid },
        Ok(Some(Payload::SnapshotSent(_))) => ZtunnelEvent::SnapshotSent,
        other => ZtunnelEvent::Other(format!("{other:?}")),
    }
}

fn journal_line(event: &ZtunnelEvent) -> String {
    match event {
        ZtunnelEvent::Add { uid, .. } => format!("ztunnel add {uid}"),
        ZtunnelEvent::Del { uid } => format!("ztunnel del {uid}"),
        ZtunnelEvent::SnapshotSent => "ztunnel snapshot".to_owned(),
        ZtunnelEvent::Other(what) => format!("ztunnel other {what}"),
    }
}
