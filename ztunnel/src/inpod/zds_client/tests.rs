//! Client tests against a scripted fake node agent on real SEQPACKET sockets in a tempdir.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;

use mesh_core::zds::ZdsListener;
use mesh_proto::zds::{DelWorkload, KeepWorkload, SnapshotSent, WorkloadInfo};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::inpod::BoxFuture;

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Add {
        uid: String,
        kind: AddKind,
        inode: u64,
        info: Option<WorkloadInfo>,
    },
    Keep(String),
    Del(String),
    Snapshot(Vec<String>),
}

/// Records every call; `fail_add` makes adds fail with that text.
struct Recorder {
    events: mpsc::UnboundedSender<Event>,
    fail_add: Mutex<Option<String>>,
}

impl Recorder {
    fn record(&self, event: Event) -> BoxFuture<'_, Result<(), String>> {
        let _ = self.events.send(event);
        Box::pin(async { Ok(()) })
    }
}

impl WorkloadProxyManager for Recorder {
    fn add(&self, add: WorkloadAdd) -> BoxFuture<'_, Result<(), String>> {
        if let Some(reason) = self.fail_add.lock().unwrap().clone() {
            return Box::pin(async move { Err(reason) });
        }
        let inode = add.netns.inode();
        self.record(Event::Add {
            uid: add.uid,
            kind: add.kind,
            inode,
            info: add.info,
        })
    }
    fn keep(&self, uid: String) -> BoxFuture<'_, Result<(), String>> {
        self.record(Event::Keep(uid))
    }
    fn del(&self, uid: String) -> BoxFuture<'_, Result<(), String>> {
        self.record(Event::Del(uid))
    }
    fn snapshot_sent(&self, snapshot: HashSet<String>) -> BoxFuture<'_, Result<(), String>> {
        let mut uids: Vec<_> = snapshot.into_iter().collect();
        uids.sort();
        self.record(Event::Snapshot(uids))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    events: mpsc::UnboundedReceiver<Event>,
    manager: Arc<Recorder>,
    snapshots: watch::Receiver<u64>,
    client: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.client.abort();
    }
}

impl Harness {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let manager = Arc::new(Recorder {
            events: tx,
            fail_add: Mutex::new(None),
        });
        let mut config = ZdsClientConfig::new(dir.path().join("ztunnel.sock"));
        config.max_backoff = Duration::from_millis(100);
        let client = ZdsClient::new(config, manager.clone());
        let snapshots = client.snapshots();
        let client = tokio::spawn(client.run());
        Self {
            dir,
            events,
            manager,
            snapshots,
            client,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("ztunnel.sock")
    }

    async fn event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no manager call")
            .unwrap()
    }

    fn no_event(&mut self) {
        assert!(self.events.try_recv().is_err(), "unexpected manager call");
    }

    async fn wait_snapshots(&mut self, n: u64) {
        let done = tokio::time::timeout(WAIT, self.snapshots.wait_for(|s| *s == n)).await;
        done.unwrap().unwrap();
    }
}

/// The node agent's side of one connection.
struct Agent {
    sock: ZdsSocket,
}

impl Agent {
    /// Accepts the client's connection and checks its hello.
    async fn accept(listener: &ZdsListener) -> Self {
        let sock = tokio::time::timeout(WAIT, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let datagram = tokio::time::timeout(WAIT, sock.recv_datagram())
            .await
            .unwrap()
            .unwrap();
        let hello: ZdsHello = datagram.decode("hello").unwrap();
        assert_eq!(hello.version, Version::V1 as i32);
        assert!(datagram.fds.is_empty());
        Self { sock }
    }

    /// Sends raw bytes with fds and returns the ack's error text.
    async fn raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> String {
        self.sock.send_raw(bytes, fds).await.unwrap();
        let datagram = tokio::time::timeout(WAIT, self.sock.recv_datagram())
            .await
            .unwrap()
            .unwrap();
        assert!(datagram.fds.is_empty());
        let response: WorkloadResponse = datagram.decode("response").unwrap();
        match response.payload {
            Some(workload_response::Payload::Ack(ack)) => ack.error,
            None => panic!("reply is not an ack"),
        }
    }

    async fn request(&self, payload: Payload, fds: &[BorrowedFd<'_>]) -> String {
        let request = WorkloadRequest {
            payload: Some(payload),
        };
        self.raw(&prost::Message::encode_to_vec(&request), fds)
            .await
    }

    async fn add(&self, uid: &str, netns: &File) -> String {
        self.request(add_payload(uid), &[netns.as_fd()]).await
    }

    async fn del(&self, uid: &str) -> String {
        self.request(
            Payload::Del(DelWorkload {
                uid: uid.to_string(),
            }),
            &[],
        )
        .await
    }

    async fn keep(&self, uid: &str) -> String {
        self.request(
            Payload::Keep(KeepWorkload {
                uid: uid.to_string(),
            }),
            &[],
        )
        .await
    }

    async fn snapshot_sent(&self) -> String {
        self.request(Payload::SnapshotSent(SnapshotSent {}), &[])
            .await
    }
}

fn add_payload(uid: &str) -> Payload {
    Payload::Add(AddWorkload {
        uid: uid.to_string(),
        workload_info: Some(info(uid)),
    })
}

fn info(uid: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: uid.to_string(),
        namespace: "ns".to_string(),
        service_account: "sa".to_string(),
    }
}

fn netns() -> File {
    File::open("/proc/self/ns/net").unwrap()
}

fn own_inode() -> u64 {
    NetnsFd::open("/proc/self/ns/net").unwrap().inode()
}

fn added(uid: &str, kind: AddKind, inode: u64) -> Event {
    Event::Add {
        uid: uid.to_string(),
        kind,
        inode,
        info: Some(info(uid)),
    }
}

fn snapshot(uids: &[&str]) -> Event {
    Event::Snapshot(uids.iter().map(|u| u.to_string()).collect())
}

/// Starts a client and an agent, with an empty snapshot already acknowledged.
async fn connected() -> (Harness, ZdsListener, Agent) {
    let mut h = Harness::start();
    let listener = ZdsListener::bind(h.path()).unwrap();
    let agent = Agent::accept(&listener).await;
    assert_eq!(agent.snapshot_sent().await, "");
    assert_eq!(h.event().await, snapshot(&[]));
    (h, listener, agent)
}

#[tokio::test]
async fn hello_then_snapshot_then_steady_state() {
    // The client starts first and keeps retrying until the agent's socket exists.
    let mut h = Harness::start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listener = ZdsListener::bind(h.path()).unwrap();
    let agent = Agent::accept(&listener).await;
    let ns = netns();
    assert_eq!(agent.add("pod-a", &ns).await, "");
    assert_eq!(h.event().await, added("pod-a", AddKind::New, own_inode()));
    assert_eq!(agent.keep("pod-k").await, "");
    assert_eq!(h.event().await, Event::Keep("pod-k".to_string()));
    assert_eq!(*h.snapshots.borrow(), 0, "ready before the snapshot ended");
    assert_eq!(agent.snapshot_sent().await, "");
    assert_eq!(h.event().await, snapshot(&["pod-a", "pod-k"]));
    h.wait_snapshots(1).await;

    assert_eq!(agent.add("pod-b", &ns).await, "");
    assert_eq!(h.event().await, added("pod-b", AddKind::New, own_inode()));
    assert_eq!(agent.add("pod-b", &ns).await, "");
    assert_eq!(
        h.event().await,
        added("pod-b", AddKind::SameNetns, own_inode())
    );
    assert_eq!(agent.del("pod-b").await, "");
    assert_eq!(h.event().await, Event::Del("pod-b".to_string()));
    // After a delete, the same uid is new again.
    assert_eq!(agent.add("pod-b", &ns).await, "");
    assert_eq!(h.event().await, added("pod-b", AddKind::New, own_inode()));
}

#[tokio::test]
async fn manager_failure_becomes_a_nack_and_the_connection_continues() {
    let (mut h, _listener, agent) = connected().await;
    *h.manager.fail_add.lock().unwrap() = Some("cannot bind 15008 in pod netns".to_string());
    assert_eq!(
        agent.add("pod-a", &netns()).await,
        "cannot bind 15008 in pod netns"
    );
    *h.manager.fail_add.lock().unwrap() = None;
    // A failed add is not remembered: the retry is still "new".
    assert_eq!(agent.add("pod-a", &netns()).await, "");
    assert_eq!(h.event().await, added("pod-a", AddKind::New, own_inode()));
}

#[tokio::test]
async fn bad_requests_are_nacked_with_a_reason_and_the_connection_continues() {
    let (mut h, _listener, agent) = connected().await;
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let not_netns = tmp.reopen().unwrap();
    let ns = netns();
    let cases: Vec<(Vec<u8>, Vec<BorrowedFd<'_>>, &str)> = vec![
        (vec![0xff, 0xff, 0xff], vec![], "invalid zds request"),
        (vec![0x30, 0x01], vec![], "no known payload"),
        (
            encode(add_payload("pod-a")),
            vec![not_netns.as_fd()],
            "not a network namespace",
        ),
        (
            encode(add_payload("pod-a")),
            vec![],
            "carried no netns file descriptor",
        ),
        (
            encode(add_payload("pod-a")),
            vec![ns.as_fd(), ns.as_fd()],
            "2 file descriptors",
        ),
        (encode(add_payload("")), vec![ns.as_fd()], "empty uid"),
        (
            encode(Payload::Del(DelWorkload { uid: "x".into() })),
            vec![ns.as_fd()],
            "del-workload carried 1",
        ),
        (
            encode(Payload::Keep(KeepWorkload { uid: "x".into() })),
            vec![],
            "outside of a snapshot",
        ),
        (
            encode(Payload::SnapshotSent(SnapshotSent {})),
            vec![],
            "snapshot-sent received twice",
        ),
        (
            vec![0x0a; 2000],
            vec![],
            "2000 bytes exceeds the 1024-byte limit",
        ),
    ];
    for (bytes, fds, expected) in &cases {
        let error = agent.raw(bytes, fds).await;
        assert!(
            error.contains(expected),
            "expected {expected:?} in {error:?}"
        );
    }
    h.no_event();
    assert_eq!(agent.add("pod-a", &ns).await, "");
    assert_eq!(h.event().await, added("pod-a", AddKind::New, own_inode()));
}

fn encode(payload: Payload) -> Vec<u8> {
    prost::Message::encode_to_vec(&WorkloadRequest {
        payload: Some(payload),
    })
}

#[tokio::test]
async fn agent_restart_brings_a_new_snapshot_that_drains_missing_pods() {
    let (mut h, listener, agent) = connected().await;
    let ns = netns();
    for uid in ["stays", "goes"] {
        assert_eq!(agent.add(uid, &ns).await, "");
        h.event().await;
    }
    drop(agent);
    drop(listener);
    // The new agent binds the same path (replacing the stale socket file).
    let listener = ZdsListener::bind(h.path()).unwrap();
    let agent = Agent::accept(&listener).await;
    assert_eq!(agent.add("stays", &ns).await, "");
    assert_eq!(
        h.event().await,
        added("stays", AddKind::SameNetns, own_inode())
    );
    assert_eq!(agent.snapshot_sent().await, "");
    assert_eq!(h.event().await, snapshot(&["stays"]));
    h.wait_snapshots(2).await;
    // "goes" was drained with the snapshot; if it comes back it is a new proxy.
    assert_eq!(agent.add("goes", &ns).await, "");
    assert_eq!(h.event().await, added("goes", AddKind::New, own_inode()));
}

#[tokio::test]
async fn delete_during_snapshot_removes_the_uid_from_it() {
    let mut h = Harness::start();
    let listener = ZdsListener::bind(h.path()).unwrap();
    let agent = Agent::accept(&listener).await;
    assert_eq!(agent.add("pod-a", &netns()).await, "");
    h.event().await;
    assert_eq!(agent.del("pod-a").await, "");
    h.event().await;
    assert_eq!(agent.snapshot_sent().await, "");
    assert_eq!(h.event().await, snapshot(&[]));
}

/// A re-add with another namespace is reported as a replacement. Needs a second network
/// namespace, which `unshare(1)` gives when we are root or user namespaces are allowed.
#[tokio::test]
async fn readd_with_another_netns_is_a_replace() {
    let Some(other) = OtherNetns::spawn() else {
        eprintln!(
            "SKIPPED readd_with_another_netns_is_a_replace: cannot create a network namespace"
        );
        return;
    };
    let (mut h, _listener, agent) = connected().await;
    assert_eq!(agent.add("pod-a", &netns()).await, "");
    h.event().await;
    let file = File::open(format!("/proc/{}/ns/net", other.child.id())).unwrap();
    let other_inode = NetnsFd::new(file.try_clone().unwrap()).unwrap().inode();
    assert_eq!(agent.add("pod-a", &file).await, "");
    let replaced = AddKind::Replace {
        previous_inode: own_inode(),
    };
    assert_eq!(h.event().await, added("pod-a", replaced, other_inode));
}

/// A `sleep` in its own network namespace, killed on drop.
struct OtherNetns {
    child: std::process::Child,
}

impl OtherNetns {
    fn spawn() -> Option<Self> {
        for args in [&["--net"][..], &["--user", "--map-root-user", "--net"][..]] {
            let child = std::process::Command::new("unshare")
                .args(args)
                .args(["sleep", "30"])
                .spawn();
            let Ok(child) = child else { continue };
            let other = Self { child };
            if other.wait_unshared() {
                return Some(other);
            }
        }
        None
    }

    // `unshare` switches namespace just before exec'ing sleep; poll until it has.
    fn wait_unshared(&self) -> bool {
        let path = format!("/proc/{}/ns/net", self.child.id());
        for _ in 0..200 {
            match NetnsFd::open(&path) {
                Ok(ns) if ns.inode() != own_inode() => return true,
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for OtherNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
