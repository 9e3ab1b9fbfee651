//! Server tests against scripted fake ztunnels on real SEQPACKET sockets in a tempdir.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use mesh_core::zds::{NetnsFd, TransportError, ZdsSocket};
use mesh_proto::zds::{
    Ack, Version, WorkloadResponse, ZdsHello, workload_request::Payload, workload_response,
};
use tokio::task::JoinHandle;

use super::*;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(150);

struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    handle: ZdsHandle,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start() -> Server {
    start_with(ZdsServerConfig {
        ack_timeout: Duration::from_secs(3),
    })
}

fn start_with(config: ZdsServerConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::bind_with(dir.path().join("ztunnel.sock"), config).unwrap();
    let (path, handle) = (server.path(), server.handle());
    let task = tokio::spawn(server.run());
    Server {
        _dir: dir,
        path,
        handle,
        task,
    }
}

fn netns() -> File {
    File::open("/proc/self/ns/net").unwrap()
}

fn own_inode() -> u64 {
    NetnsFd::open("/proc/self/ns/net").unwrap().inode()
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.to_string(),
        namespace: "default".to_string(),
        service_account: "sa".to_string(),
    }
}

/// Spawns `add_workload` so the test can play ztunnel while the call waits for its ack.
fn spawn_add(handle: &ZdsHandle, uid: &str) -> JoinHandle<Result<(), ZdsError>> {
    let (handle, uid) = (handle.clone(), uid.to_string());
    tokio::spawn(async move { handle.add_workload(&uid, info(&uid), netns()).await })
}

fn spawn_del(handle: &ZdsHandle, uid: &str) -> JoinHandle<Result<(), ZdsError>> {
    let (handle, uid) = (handle.clone(), uid.to_string());
    tokio::spawn(async move { handle.del_workload(&uid).await })
}

async fn wait_ready(handle: &ZdsHandle, n: usize) {
    let mut ready = handle.ready_connections();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r == n))
        .await
        .unwrap()
        .unwrap();
}

/// A scripted ztunnel.
struct FakeZtunnel {
    sock: ZdsSocket,
}

impl FakeZtunnel {
    async fn connect(path: &Path) -> Self {
        Self::connect_version(path, Version::V1 as i32).await
    }

    async fn connect_version(path: &Path, version: i32) -> Self {
        let sock = ZdsSocket::connect(path).await.unwrap();
        sock.send(&ZdsHello { version }, None).await.unwrap();
        Self { sock }
    }

    /// Connects and acks an empty snapshot.
    async fn ready(path: &Path) -> Self {
        let zt = Self::connect(path).await;
        zt.expect_snapshot(&[]).await;
        zt
    }

    async fn next(&self) -> (Payload, Vec<OwnedFd>) {
        let received = tokio::time::timeout(WAIT, self.sock.recv_datagram()).await;
        let datagram = received.expect("no request from server").unwrap();
        let request: WorkloadRequest = datagram.decode("request").unwrap();
        (request.payload.expect("empty request"), datagram.fds)
    }

    async fn reply(&self, error: &str) {
        let ack = Ack {
            error: error.to_string(),
        };
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(ack)),
        };
        self.sock.send(&response, None).await.unwrap();
    }

    /// Receives an add, checks its fd is our netns, and returns the uid without acking.
    async fn expect_add(&self) -> AddWorkload {
        let (payload, mut fds) = self.next().await;
        let Payload::Add(add) = payload else {
            panic!("expected add, got {payload:?}")
        };
        assert_eq!(fds.len(), 1, "add must carry exactly one fd");
        assert_eq!(
            NetnsFd::new(fds.pop().unwrap()).unwrap().inode(),
            own_inode()
        );
        add
    }

    async fn expect_del(&self) -> String {
        let (payload, fds) = self.next().await;
        assert!(fds.is_empty(), "del must not carry fds");
        let Payload::Del(del) = payload else {
            panic!("expected del, got {payload:?}")
        };
        del.uid
    }

    /// Acks a snapshot of exactly `uids` (in order), checking each add waits for its ack.
    async fn expect_snapshot(&self, uids: &[&str]) {
        for uid in uids {
            assert_eq!(self.expect_add().await.uid, *uid);
            self.assert_quiet().await;
            self.reply("").await;
        }
        let (payload, fds) = self.next().await;
        assert!(
            matches!(payload, Payload::SnapshotSent(_)),
            "got {payload:?}"
        );
        assert!(fds.is_empty());
        self.reply("").await;
    }

    async fn assert_quiet(&self) {
        let received = tokio::time::timeout(QUIET, self.sock.recv_datagram()).await;
        assert!(received.is_err(), "unexpected message: {received:?}");
    }

    async fn expect_closed(&self) {
        let received = tokio::time::timeout(WAIT, self.sock.recv_datagram())
            .await
            .unwrap();
        assert!(
            matches!(received, Err(TransportError::Closed)),
            "{received:?}"
        );
    }
}

#[tokio::test]
async fn hello_then_snapshot_of_two_pods_acked_one_by_one() {
    let server = start();
    for uid in ["pod-b", "pod-a"] {
        let err = server
            .handle
            .add_workload(uid, info(uid), netns())
            .await
            .unwrap_err();
        assert!(matches!(err, ZdsError::NoZtunnel { .. }), "{err}");
    }
    let zt = FakeZtunnel::connect(&server.path).await;
    let first = zt.expect_add().await;
    assert_eq!(
        (first.uid.as_str(), first.workload_info),
        ("pod-a", Some(info("pod-a")))
    );
    // The second add must wait for the first ack.
    zt.assert_quiet().await;
    zt.reply("").await;
    assert_eq!(zt.expect_add().await.uid, "pod-b");
    zt.reply("").await;
    let (payload, _) = zt.next().await;
    assert!(matches!(payload, Payload::SnapshotSent(_)));
    assert_eq!(
        *server.handle.ready_connections().borrow(),
        0,
        "ready before snapshot ack"
    );
    zt.reply("").await;
    wait_ready(&server.handle, 1).await;
    let status = server.handle.status();
    assert_eq!(
        status.connections,
        vec![ConnectionStatus {
            id: 1,
            phase: ConnectionPhase::Ready
        }]
    );
    assert_eq!(status.pods.len(), 2);
    assert!(status.pods.iter().all(|p| p.netns_inode == own_inode()));
}

#[tokio::test]
async fn steady_state_add_and_del() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    let received = zt.expect_add().await;
    assert_eq!(received.uid, "pod-1");
    assert_eq!(received.workload_info, Some(info("pod-1")));
    zt.reply("").await;
    add.await.unwrap().unwrap();
    assert_eq!(server.handle.status().pods[0].uid, "pod-1");

    let del = spawn_del(&server.handle, "pod-1");
    assert_eq!(zt.expect_del().await, "pod-1");
    zt.reply("").await;
    del.await.unwrap().unwrap();
    assert!(server.handle.status().pods.is_empty());
}

#[tokio::test]
async fn pending_pod_goes_out_with_the_next_snapshot_and_deleted_pods_do_not() {
    let server = start();
    let err = server
        .handle
        .add_workload("late", info("late"), netns())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("pending until the next snapshot"),
        "{err}"
    );
    server
        .handle
        .add_workload("gone", info("gone"), netns())
        .await
        .unwrap_err();
    // Deleting with nobody connected only forgets the pod.
    server.handle.del_workload("gone").await.unwrap();
    let zt = FakeZtunnel::connect(&server.path).await;
    zt.expect_snapshot(&["late"]).await;
    // A ztunnel that restarts gets the same snapshot again.
    drop(zt);
    let zt = FakeZtunnel::connect(&server.path).await;
    zt.expect_snapshot(&["late"]).await;
}

#[tokio::test]
async fn nack_reaches_the_caller_and_the_pod_is_kept() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-x");
    zt.expect_add().await;
    zt.reply("failed to start proxy: address in use").await;
    let err = add.await.unwrap().unwrap_err();
    assert!(matches!(err, ZdsError::Nack { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("add-workload for pod pod-x: failed to start proxy"),
        "{err}"
    );
    assert_eq!(server.handle.status().pods.len(), 1);
    // The connection keeps working after a NACK.
    let del = spawn_del(&server.handle, "pod-x");
    assert_eq!(zt.expect_del().await, "pod-x");
    zt.reply("").await;
    del.await.unwrap().unwrap();
}

#[tokio::test]
async fn adds_go_to_the_newest_ztunnel_and_deletes_to_all() {
    let server = start();
    let old = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let new = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 2).await;

    let add = spawn_add(&server.handle, "pod-1");
    assert_eq!(new.expect_add().await.uid, "pod-1");
    new.reply("").await;
    add.await.unwrap().unwrap();
    old.assert_quiet().await;

    let del = spawn_del(&server.handle, "pod-1");
    assert_eq!(old.expect_del().await, "pod-1");
    assert_eq!(new.expect_del().await, "pod-1");
    old.reply("").await;
    new.reply("").await;
    del.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_nack_on_one_connection_fails_the_delete() {
    let server = start();
    let a = FakeZtunnel::ready(&server.path).await;
    let b = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 2).await;
    let del = spawn_del(&server.handle, "pod-1");
    a.expect_del().await;
    b.expect_del().await;
    a.reply("").await;
    b.reply("drain failed").await;
    let err = del.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("del-workload for pod pod-1: drain failed"),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_from_one_ztunnel_drops_only_that_connection() {
    let server = start();
    let good = FakeZtunnel::ready(&server.path).await;
    let bad = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 2).await;
    bad.sock
        .send_datagram(&[0xff, 0xff, 0xff], None)
        .await
        .unwrap();
    bad.expect_closed().await;
    wait_ready(&server.handle, 1).await;
    // The newest remaining connection takes the add.
    let add = spawn_add(&server.handle, "pod-1");
    assert_eq!(good.expect_add().await.uid, "pod-1");
    good.reply("").await;
    add.await.unwrap().unwrap();
}

#[tokio::test]
async fn garbage_reply_fails_the_add_and_drops_the_connection() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    zt.expect_add().await;
    zt.sock
        .send_datagram(&[0xff, 0xff, 0xff], None)
        .await
        .unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("invalid zds workload response"),
        "{err}"
    );
    zt.expect_closed().await;
    assert!(server.handle.status().connections.is_empty());
}

#[tokio::test]
async fn oversize_reply_is_an_error() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    zt.expect_add().await;
    zt.sock.send_raw(&[0x0a; 2000], &[]).await.unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("2000 bytes exceeds the 1024-byte limit"),
        "{err}"
    );
    zt.expect_closed().await;
}

#[tokio::test]
async fn reply_with_an_fd_is_a_protocol_error() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    zt.expect_add().await;
    let ack = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack::default())),
    };
    zt.sock.send(&ack, Some(netns().as_fd())).await.unwrap();
    let err = add.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("ack to add-workload carried 1 file descriptors"),
        "{err}"
    );
    zt.expect_closed().await;
}

#[tokio::test]
async fn unsupported_hello_version_is_rejected() {
    let server = start();
    let zt = FakeZtunnel::connect_version(&server.path, 2).await;
    zt.expect_closed().await;
    // Garbage instead of a hello is rejected the same way.
    let sock = ZdsSocket::connect(&server.path).await.unwrap();
    sock.send_datagram(b"\xff\xff", None).await.unwrap();
    let received = tokio::time::timeout(WAIT, sock.recv_datagram())
        .await
        .unwrap();
    assert!(matches!(received, Err(TransportError::Closed)));
    assert!(server.handle.status().connections.is_empty());
}

#[tokio::test]
async fn missing_ack_times_out_and_drops_the_connection() {
    let server = start_with(ZdsServerConfig {
        ack_timeout: Duration::from_millis(200),
    });
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    zt.expect_add().await;
    let err = add.await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("no reply from ztunnel to add-workload within 200ms"),
        "{err}"
    );
    zt.expect_closed().await;
}

#[tokio::test]
async fn silent_client_times_out_before_hello() {
    let server = start_with(ZdsServerConfig {
        ack_timeout: Duration::from_millis(200),
    });
    let sock = ZdsSocket::connect(&server.path).await.unwrap();
    let received = tokio::time::timeout(WAIT, sock.recv_datagram())
        .await
        .unwrap();
    assert!(matches!(received, Err(TransportError::Closed)));
}

#[tokio::test]
async fn invalid_inputs_are_rejected_without_remembering_the_pod() {
    let server = start();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let err = server
        .handle
        .add_workload("pod-1", info("pod-1"), tmp.reopen().unwrap())
        .await;
    let err = err.unwrap_err();
    assert!(
        err.to_string()
            .contains("pod pod-1: invalid netns: file descriptor is not a network"),
        "{err}"
    );
    let err = server
        .handle
        .add_workload("", info("x"), netns())
        .await
        .unwrap_err();
    assert!(matches!(err, ZdsError::EmptyUid), "{err}");
    assert!(matches!(
        server.handle.del_workload("").await,
        Err(ZdsError::EmptyUid)
    ));
    assert!(server.handle.status().pods.is_empty());
}

#[tokio::test]
async fn queued_requests_fail_when_the_server_stops() {
    let server = start();
    let zt = FakeZtunnel::ready(&server.path).await;
    wait_ready(&server.handle, 1).await;
    let add = spawn_add(&server.handle, "pod-1");
    zt.expect_add().await;
    server.task.abort();
    let err = add.await.unwrap().unwrap_err();
    assert!(matches!(err, ZdsError::ConnectionLost { .. }), "{err}");
    zt.expect_closed().await;
    assert!(server.handle.status().connections.is_empty());
}
