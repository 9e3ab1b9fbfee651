//! ZDS end to end: the real node-agent server (`zmesh-cni`) and the real ztunnel client over a
//! SEQPACKET socket in a tempdir, with an in-memory proxy table standing in for the proxies.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::zds::NetnsFd;
use mesh_proto::zds::WorkloadInfo;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zmesh_cni::zds::{ZdsError, ZdsHandle, ZdsServer};
use ztunnel::inpod::{
    AddKind, BoxFuture, WorkloadAdd, WorkloadProxyManager, ZdsClient, ZdsClientConfig,
};

const WAIT: Duration = Duration::from_secs(5);

/// uid -> netns inode of the "running" proxies; adds of uid `reject-*` fail.
#[derive(Default)]
struct ProxyTable {
    pods: Mutex<BTreeMap<String, u64>>,
}

impl ProxyTable {
    fn uids(&self) -> Vec<String> {
        self.pods.lock().unwrap().keys().cloned().collect()
    }
}

impl WorkloadProxyManager for ProxyTable {
    fn add(&self, add: WorkloadAdd) -> BoxFuture<'_, Result<(), String>> {
        let result = if add.uid.starts_with("reject-") {
            Err(format!("cannot start proxy for {}", add.uid))
        } else {
            if let AddKind::Replace { .. } | AddKind::New = add.kind {
                self.pods.lock().unwrap().insert(add.uid, add.netns.inode());
            }
            Ok(())
        };
        Box::pin(async move { result })
    }
    fn keep(&self, _uid: String) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn del(&self, uid: String) -> BoxFuture<'_, Result<(), String>> {
        self.pods.lock().unwrap().remove(&uid);
        Box::pin(async { Ok(()) })
    }
    fn snapshot_sent(&self, snapshot: HashSet<String>) -> BoxFuture<'_, Result<(), String>> {
        self.pods
            .lock()
            .unwrap()
            .retain(|uid, _| snapshot.contains(uid));
        Box::pin(async { Ok(()) })
    }
}

struct Ztunnel {
    table: Arc<ProxyTable>,
    snapshots: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Ztunnel {
    fn start(path: &std::path::Path) -> Self {
        let table = Arc::new(ProxyTable::default());
        let client = ZdsClient::new(ZdsClientConfig::new(path), table.clone());
        let snapshots = client.snapshots();
        Self {
            table,
            snapshots,
            task: tokio::spawn(client.run()),
        }
    }

    async fn wait_snapshots(&mut self, n: u64) {
        let done = tokio::time::timeout(WAIT, self.snapshots.wait_for(|s| *s == n)).await;
        done.expect("snapshot not reconciled in time").unwrap();
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn netns() -> File {
    File::open("/proc/self/ns/net").unwrap()
}

fn info(uid: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: uid.into(),
        namespace: "shop".into(),
        service_account: "default".into(),
    }
}

async fn add(handle: &ZdsHandle, uid: &str) -> Result<(), ZdsError> {
    handle.add_workload(uid, info(uid), netns()).await
}

async fn wait_ready(handle: &ZdsHandle, n: usize) {
    let mut ready = handle.ready_connections();
    tokio::time::timeout(WAIT, ready.wait_for(|r| *r == n))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn pods_flow_from_agent_to_ztunnel_across_upgrade_and_agent_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();
    let server_task = tokio::spawn(server.run());

    // Before any ztunnel: pending, then delivered by the snapshot.
    assert!(matches!(
        add(&handle, "pod-a").await,
        Err(ZdsError::NoZtunnel { .. })
    ));
    let mut old = Ztunnel::start(&path);
    old.wait_snapshots(1).await;
    assert_eq!(old.table.uids(), ["pod-a"]);
    let inode = NetnsFd::open("/proc/self/ns/net").unwrap().inode();
    assert_eq!(old.table.pods.lock().unwrap()["pod-a"], inode);

    // Steady state, including a NACK that reaches the agent's caller.
    add(&handle, "pod-b").await.unwrap();
    assert_eq!(old.table.uids(), ["pod-a", "pod-b"]);
    let err = add(&handle, "reject-me").await.unwrap_err();
    assert!(
        err.to_string().contains("cannot start proxy for reject-me"),
        "{err}"
    );

    // Upgrade: a second ztunnel connects and gets the snapshot; new pods go to it only, deletes
    // reach both.
    wait_ready(&handle, 1).await;
    let mut new = Ztunnel::start(&path);
    new.wait_snapshots(1).await;
    wait_ready(&handle, 2).await;
    assert_eq!(new.table.uids(), ["pod-a", "pod-b"]);
    add(&handle, "pod-c").await.unwrap();
    assert_eq!(new.table.uids(), ["pod-a", "pod-b", "pod-c"]);
    assert_eq!(old.table.uids(), ["pod-a", "pod-b"]);
    handle.del_workload("pod-a").await.unwrap();
    assert_eq!(old.table.uids(), ["pod-b"]);
    assert_eq!(new.table.uids(), ["pod-b", "pod-c"]);
    drop(old);

    // Agent restart with a different pod set: the ztunnel reconnects, and the new snapshot
    // drains what the new agent does not know.
    server_task.abort();
    let _ = server_task.await;
    let server = ZdsServer::bind(&path).unwrap();
    let handle = server.handle();
    assert!(matches!(
        add(&handle, "pod-c").await,
        Err(ZdsError::NoZtunnel { .. })
    ));
    let _server_task = tokio::spawn(server.run());
    new.wait_snapshots(2).await;
    assert_eq!(new.table.uids(), ["pod-c"]);
    add(&handle, "pod-d").await.unwrap();
    assert_eq!(new.table.uids(), ["pod-c", "pod-d"]);
}
