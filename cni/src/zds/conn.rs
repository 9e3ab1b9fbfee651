//! One ztunnel connection: hello, snapshot, then queued requests in lockstep with their acks.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::zds::{Datagram, NetnsFd, TransportError, ZdsSocket};
use mesh_proto::zds::{
    SnapshotSent, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request,
    workload_response,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Command, Connection, ConnectionPhase, Shared, ZdsError, add_request};

/// Serves one accepted connection until it closes or misbehaves. The connection leaves the
/// server's table when this future ends or is dropped.
pub(super) async fn serve(shared: Arc<Shared>, sock: ZdsSocket, id: u64) {
    let _registered = Unregister {
        shared: shared.clone(),
        id,
    };
    match run(&shared, &sock, id).await {
        Ok(()) | Err(ZdsError::Transport(TransportError::Closed)) => info!("ztunnel disconnected"),
        Err(error) => warn!(%error, "dropping ztunnel connection"),
    }
}

async fn run(shared: &Shared, sock: &ZdsSocket, id: u64) -> Result<(), ZdsError> {
    let timeout = shared.config.ack_timeout;
    read_hello(sock, timeout).await?;
    // Register before taking the snapshot: a pod added meanwhile is either in the snapshot or
    // queued for this connection (possibly both; a repeated add with the same netns is a no-op
    // for ztunnel), so none is lost.
    let mut commands = register(shared, id);
    send_snapshot(shared, sock, timeout).await?;
    mark_ready(shared, id);
    info!("ztunnel acknowledged the snapshot");
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(command) => execute(sock, command, timeout, id).await?,
                None => return Ok(()),
            },
            // ztunnel only ever answers; anything it sends unprompted ends the connection.
            unsolicited = sock.recv_datagram() => return idle_read(unsolicited),
        }
    }
}

async fn read_hello(sock: &ZdsSocket, timeout: Duration) -> Result<(), ZdsError> {
    let datagram = recv_within(sock, timeout, "hello").await?;
    if !datagram.fds.is_empty() {
        return Err(ZdsError::Protocol(
            "hello carried file descriptors".to_string(),
        ));
    }
    let hello: ZdsHello = datagram.decode("zds hello")?;
    if hello.version != Version::V1 as i32 {
        return Err(ZdsError::UnsupportedVersion(hello.version));
    }
    debug!("ztunnel hello v1");
    Ok(())
}

async fn send_snapshot(
    shared: &Shared,
    sock: &ZdsSocket,
    timeout: Duration,
) -> Result<(), ZdsError> {
    let pods: Vec<_> = {
        let state = shared.lock();
        state
            .pods
            .iter()
            .map(|(uid, pod)| (uid.clone(), pod.info.clone(), pod.netns.clone()))
            .collect()
    };
    info!(pods = pods.len(), "sending snapshot");
    for (uid, info, netns) in pods {
        let request = add_request(&uid, info);
        let outcome = exchange(sock, &request, Some(&netns), "add-workload", timeout).await?;
        if let Some(reason) = outcome {
            // As in Istio, a NACKed pod stays in our set (and in the next snapshot); ztunnel
            // retries pods it could not start on its own.
            warn!(
                uid,
                netns_inode = netns.inode(),
                reason,
                "ztunnel rejected a snapshot pod"
            );
        }
    }
    let done = WorkloadRequest {
        payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
    };
    if let Some(reason) = exchange(sock, &done, None, "snapshot-sent", timeout).await? {
        warn!(reason, "ztunnel rejected snapshot-sent");
    }
    Ok(())
}

async fn execute(
    sock: &ZdsSocket,
    command: Command,
    timeout: Duration,
    conn: u64,
) -> Result<(), ZdsError> {
    let what = request_name(&command.request);
    let uid = command.uid;
    let netns = command.netns.as_deref();
    match exchange(sock, &command.request, netns, what, timeout).await {
        Ok(None) => {
            debug!(uid, what, "ztunnel acked");
            let _ = command.reply.send(Ok(()));
            Ok(())
        }
        Ok(Some(reason)) => {
            warn!(uid, what, reason, "ztunnel nacked");
            let _ = command
                .reply
                .send(Err(ZdsError::Nack { what, uid, reason }));
            Ok(())
        }
        Err(error) => {
            let reason = error.to_string();
            let _ = command
                .reply
                .send(Err(ZdsError::ConnectionLost { conn, reason }));
            Err(error)
        }
    }
}

/// Sends one request and waits for its ack: `Ok(None)` on success, `Ok(Some(reason))` on a
/// NACK, `Err` when the connection is no longer usable.
async fn exchange(
    sock: &ZdsSocket,
    request: &WorkloadRequest,
    netns: Option<&NetnsFd>,
    what: &'static str,
    timeout: Duration,
) -> Result<Option<String>, ZdsError> {
    sock.send(request, netns.map(AsFd::as_fd)).await?;
    let datagram = recv_within(sock, timeout, what).await?;
    if !datagram.fds.is_empty() {
        let n = datagram.fds.len();
        return Err(ZdsError::Protocol(format!(
            "ack to {what} carried {n} file descriptors"
        )));
    }
    let response: WorkloadResponse = datagram.decode("zds workload response")?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(None),
        Some(workload_response::Payload::Ack(ack)) => Ok(Some(ack.error)),
        None => Err(ZdsError::Protocol(format!("reply to {what} is not an ack"))),
    }
}

async fn recv_within(
    sock: &ZdsSocket,
    timeout: Duration,
    what: &'static str,
) -> Result<Datagram, ZdsError> {
    match tokio::time::timeout(timeout, sock.recv_datagram()).await {
        Ok(received) => Ok(received?),
        Err(_) => Err(ZdsError::Timeout { what, timeout }),
    }
}

fn idle_read(received: Result<Datagram, TransportError>) -> Result<(), ZdsError> {
    match received {
        Err(TransportError::Closed) => Ok(()),
        Err(error) => Err(error.into()),
        Ok(datagram) => Err(ZdsError::Protocol(format!(
            "unsolicited {}-byte message while no request was pending",
            datagram.bytes.len()
        ))),
    }
}

fn request_name(request: &WorkloadRequest) -> &'static str {
    match request.payload {
        Some(workload_request::Payload::Add(_)) => "add-workload",
        Some(workload_request::Payload::Keep(_)) => "keep-workload",
        Some(workload_request::Payload::Del(_)) => "del-workload",
        Some(workload_request::Payload::SnapshotSent(_)) => "snapshot-sent",
        None => "empty request",
    }
}

fn register(shared: &Shared, id: u64) -> mpsc::UnboundedReceiver<Command> {
    let (tx, rx) = mpsc::unbounded_channel();
    let phase = ConnectionPhase::Snapshot;
    shared.lock().conns.push(Connection { id, phase, tx });
    rx
}

fn mark_ready(shared: &Shared, id: u64) {
    let mut state = shared.lock();
    if let Some(conn) = state.conns.iter_mut().find(|c| c.id == id) {
        conn.phase = ConnectionPhase::Ready;
    }
    shared.publish_ready(&state);
}

/// Removes the connection from the table on every exit path, including task abort.
struct Unregister {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.conns.retain(|c| c.id != self.id);
        self.shared.publish_ready(&state);
    }
}
