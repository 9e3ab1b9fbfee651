//! Reconciler tests: a fake dataplane (no namespaces or rules touched) and the real ZDS server
//! with a recording ztunnel on a socket in a tempdir.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Mutex;

use mesh_core::k8s::parse_documents;
use mesh_proto::zds::WorkloadInfo;

use super::*;
use crate::testing::{Journal, RecordingZtunnel, ZtunnelEvent, note};
use crate::zds::ZdsServer;

const NODE: &str = "n1";
const WAIT: Duration = Duration::from_secs(5);

/// Locates every pod at the agent's own namespace (any real netns fd will do for ZDS), through a
/// symlink named by its annotation or first IP; applies and removes rules only in its journal.
#[derive(Default)]
struct FakeDataplane {
    links: Option<tempfile::TempDir>,
    journal: Journal,
    names: Mutex<BTreeMap<i32, String>>,
    fail_apply: Mutex<u32>,
    fail_remove: Mutex<u32>,
    unlocatable: Mutex<Vec<String>>,
}

impl FakeDataplane {
    fn name_of(&self, netns: &NetnsFd) -> String {
        let names = self.names.lock().unwrap();
        names
            .get(&netns.as_fd().as_raw_fd())
            .cloned()
            .unwrap_or_default()
    }

    fn take_failure(counter: &Mutex<u32>) -> bool {
        let mut left = counter.lock().unwrap();
        let fail = *left > 0;
        *left = left.saturating_sub(1);
        fail
    }

    fn injected(&self, what: &str, name: &str) -> ApplyError {
        ApplyError::Spawn {
            command: format!("{what} (injected)"),
            netns: PathBuf::from(name),
            source: std::io::Error::other("injected failure"),
        }
    }
}

impl Dataplane for FakeDataplane {
    fn locate(&self, pods: &[PodHint]) -> Vec<Result<Located, LocateError>> {
        pods.iter()
            .map(|hint| {
                let name = hint
                    .annotation
                    .clone()
                    .unwrap_or_else(|| format!("ip:{}", hint.ips[0]));
                if self.unlocatable.lock().unwrap().contains(&name) {
                    return Err(LocateError::NotFound {
                        dir: "/fake".into(),
                        ips: name,
                    });
                }
                let path = self.links.as_ref().expect("links dir").path().join(&name);
                if !path.exists() {
                    std::os::unix::fs::symlink("/proc/self/ns/net", &path).unwrap();
                }
                let netns = NetnsFd::open(&path).unwrap();
                self.names
                    .lock()
                    .unwrap()
                    .insert(netns.as_fd().as_raw_fd(), name.clone());
                Ok(Located { path, netns })
            })
            .collect()
    }

    fn apply_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError> {
        let name = self.name_of(netns);
        if Self::take_failure(&self.fail_apply) {
            note(&self.journal, format!("apply-failed {name}"));
            return Err(self.injected("apply", &name));
        }
        note(&self.journal, format!("apply {name}"));
        Ok(())
    }

    fn remove_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError> {
        let name = self.name_of(netns);
        if Self::take_failure(&self.fail_remove) {
            note(&self.journal, format!("remove-failed {name}"));
            return Err(self.injected("remove", &name));
        }
        note(&self.journal, format!("remove {name}"));
        Ok(())
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    dataplane: Arc<FakeDataplane>,
    reconciler: Reconciler,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let server = ZdsServer::bind(dir.path().join("zds.sock")).unwrap();
    let (socket, zds) = (server.path(), server.handle());
    let dataplane = Arc::new(FakeDataplane {
        links: Some(tempfile::tempdir().unwrap()),
        ..FakeDataplane::default()
    });
    let config = ReconcilerConfig {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        ..ReconcilerConfig::new(NODE)
    };
    Harness {
        _dir: dir,
        socket,
        dataplane: dataplane.clone(),
        reconciler: Reconciler::new(config, dataplane, zds),
        server: tokio::spawn(server.run()),
    }
}

impl Harness {
    async fn ztunnel(&self) -> RecordingZtunnel {
        let mut zt = RecordingZtunnel::connect(&self.socket, Some(self.dataplane.journal.clone()))
            .await
            .unwrap();
        let sent = zt
            .wait_for(WAIT, |e| *e == ZtunnelEvent::SnapshotSent)
            .await;
        assert!(sent.is_some(), "no snapshot");
        let mut ready = self.reconciler.ctx.zds.ready_connections();
        tokio::time::timeout(WAIT, ready.wait_for(|n| *n > 0))
            .await
            .unwrap()
            .unwrap();
        self.journal();
        zt
    }

    fn journal(&self) -> Vec<String> {
        std::mem::take(&mut *self.dataplane.journal.lock().unwrap())
    }

    fn status(&self) -> Arc<AgentStatus> {
        self.reconciler.status().borrow().clone()
    }

    fn pod(&self, name: &str) -> PodReport {
        let status = self.status();
        status
            .pod("shop", name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {:?}", status.pods))
    }
}

fn namespace(ambient: bool) -> String {
    let labels = if ambient {
        "labels: {istio.io/dataplane-mode: ambient}"
    } else {
        "labels: {}"
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, {labels}}}\n---\n")
}

fn pod(name: &str, ip: &str, extra_labels: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{extra_labels}}}, \
         annotations: {{zmesh.dev/netns: ns-{name}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: sa-{name}}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

fn snapshot(parts: &[String]) -> Snapshot {
    Snapshot::from_objects(parse_documents(&parts.concat()).unwrap().objects)
}

fn base(ambient: bool) -> Snapshot {
    snapshot(&[
        namespace(ambient),
        pod("a", "10.0.0.1", "", NODE),
        pod("b", "10.0.0.2", "", NODE),
        pod("out", "10.0.0.3", "istio.io/dataplane-mode: none", NODE),
        pod("far", "10.0.0.4", "", "n2"),
    ])
}

#[tokio::test]
async fn enrolls_then_unenrolls_without_touching_others() {
    let mut h = harness();
    let mut zt = h.ztunnel().await;
    h.reconciler.reconcile(&base(true)).await;

    assert_eq!(h.pod("a").redirection, Some(Redirection::Enabled));
    assert_eq!(h.pod("b").redirection, Some(Redirection::Enabled));
    let out = h.pod("out");
    assert_eq!(
        (out.enrolled, out.skip_reason),
        (false, Some(SkipReason::OptedOut))
    );
    assert!(
        h.status().pod("shop", "far").is_none(),
        "other node's pods are not ours"
    );
    let mut journal = h.journal();
    journal.sort();
    assert_eq!(
        journal,
        [
            "apply ns-a",
            "apply ns-b",
            "remove ns-out",
            "ztunnel add shop/a",
            "ztunnel add shop/b"
        ],
        "the first pass also sweeps leftovers from the opted-out pod"
    );
    let adds: Vec<ZtunnelEvent> = zt.drain();
    let own = NetnsFd::open("/proc/self/ns/net").unwrap().inode();
    assert!(
        adds.contains(&ZtunnelEvent::Add {
            uid: "shop/a".into(),
            info: WorkloadInfo {
                name: "a".into(),
                namespace: "shop".into(),
                service_account: "sa-a".into()
            },
            netns_inode: own,
        }),
        "{adds:?}"
    );

    // Same config again: nothing to do.
    h.reconciler.reconcile(&base(true)).await;
    assert!(h.journal().is_empty());

    // Namespace label removed: ztunnel hears first, then the rules go; pods stay listed.
    h.reconciler.reconcile(&base(false)).await;
    let journal = h.journal();
    for pod in ["a", "b"] {
        let del = journal
            .iter()
            .position(|l| *l == format!("ztunnel del shop/{pod}"))
            .unwrap();
        let remove = journal
            .iter()
            .position(|l| *l == format!("remove ns-{pod}"))
            .unwrap();
        assert!(del < remove, "{journal:?}");
    }
    assert_eq!(journal.len(), 4, "{journal:?}");
    let a = h.pod("a");
    assert_eq!(
        (a.enrolled, a.redirection, a.skip_reason),
        (false, None, Some(SkipReason::NotAmbient))
    );
}

#[tokio::test]
async fn a_pod_whose_rules_fail_is_retried_and_never_sent_half_captured() {
    let mut h = harness();
    let mut zt = h.ztunnel().await;
    *h.dataplane.fail_apply.lock().unwrap() = 2;
    let config = snapshot(&[namespace(true), pod("a", "10.0.0.1", "", NODE)]);
    h.reconciler.reconcile(&config).await;
    let a = h.pod("a");
    assert_eq!((a.redirection, a.failures), (Some(Redirection::Failed), 1));
    let error = a.error.unwrap();
    assert!(
        error.starts_with("cannot install capture rules in /"),
        "{error}"
    );
    assert!(
        error.contains("/ns-a: cannot run `apply (injected)`"),
        "{error}"
    );
    // The partial install was taken out; ztunnel heard nothing.
    assert_eq!(h.journal(), ["apply-failed ns-a", "remove ns-a"]);
    assert!(zt.drain().is_empty());

    // The run loop retries on its own once the backoff expires.
    let (tx, rx) = watch::channel(Arc::new(config));
    let mut status = h.reconciler.status();
    let task = tokio::spawn(std::mem::replace(&mut h.reconciler, dummy()).run(rx));
    let enabled = |s: &Arc<AgentStatus>| {
        s.pod("shop", "a").and_then(|p| p.redirection) == Some(Redirection::Enabled)
    };
    tokio::time::timeout(WAIT, status.wait_for(enabled))
        .await
        .unwrap()
        .unwrap();
    let journal = h.journal();
    assert_eq!(
        journal,
        [
            "apply-failed ns-a",
            "remove ns-a",
            "apply ns-a",
            "ztunnel add shop/a"
        ]
    );
    assert!(matches!(
        zt.next(WAIT).await,
        Some(ZtunnelEvent::Add { .. })
    ));
    task.abort();
    drop(tx);
}

/// A reconciler to leave behind when the real one moves into a task.
fn dummy() -> Reconciler {
    let dir = tempfile::tempdir().unwrap();
    let zds = ZdsServer::bind(dir.path().join("x.sock")).unwrap().handle();
    Reconciler::new(
        ReconcilerConfig::new(NODE),
        Arc::new(FakeDataplane::default()),
        zds,
    )
}

#[tokio::test]
async fn a_failed_cleanup_is_reported_as_possibly_partial() {
    let mut h = harness();
    *h.dataplane.fail_apply.lock().unwrap() = 1;
    *h.dataplane.fail_remove.lock().unwrap() = 1;
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    let error = h.pod("a").error.unwrap();
    assert!(error.contains("may be partially captured"), "{error}");
    assert!(
        error.starts_with("cannot install capture rules in /"),
        "{error}"
    );
    assert!(
        error.contains("cannot remove capture rules from /"),
        "{error}"
    );
}

#[tokio::test]
async fn without_ztunnel_a_pod_is_pending_then_enabled_when_one_connects() {
    let mut h = harness();
    let config = snapshot(&[namespace(true), pod("a", "10.0.0.1", "", NODE)]);
    h.reconciler.reconcile(&config).await;
    let a = h.pod("a");
    assert_eq!(a.redirection, Some(Redirection::Pending));
    assert_eq!(a.error.as_deref(), Some("no ztunnel connected"));
    assert_eq!(h.journal(), ["apply ns-a"], "rules stay in: fail closed");

    let (_tx, rx) = watch::channel(Arc::new(config));
    let mut status = h.reconciler.status();
    let task = tokio::spawn(std::mem::replace(&mut h.reconciler, dummy()).run(rx));
    let mut zt = RecordingZtunnel::connect(&h.socket, None).await.unwrap();
    // The server's snapshot carries the pod; the reconciler then re-sends it to learn the answer.
    let first = zt.next(WAIT).await.unwrap();
    assert!(
        matches!(first, ZtunnelEvent::Add { ref uid, .. } if uid == "shop/a"),
        "{first:?}"
    );
    let enabled = |s: &Arc<AgentStatus>| {
        s.pod("shop", "a").and_then(|p| p.redirection) == Some(Redirection::Enabled)
    };
    tokio::time::timeout(WAIT, status.wait_for(enabled))
        .await
        .unwrap()
        .unwrap();
    task.abort();
}

#[tokio::test]
async fn a_nack_keeps_the_pod_pending_with_the_reason() {
    let mut h = harness();
    let zt = h.ztunnel().await;
    zt.nack("shop/a", "proxy start failed");
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    let a = h.pod("a");
    assert_eq!(a.redirection, Some(Redirection::Pending));
    assert!(
        a.error.as_deref().unwrap().contains("proxy start failed"),
        "{a:?}"
    );
    zt.nack("shop/a", "");
    tokio::time::sleep(Duration::from_millis(60)).await;
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    assert_eq!(h.pod("a").redirection, Some(Redirection::Enabled));
    let journal = h.journal();
    assert_eq!(
        journal.iter().filter(|l| l.starts_with("apply")).count(),
        1,
        "re-send only: {journal:?}"
    );
}

#[tokio::test]
async fn deleted_pod_with_failing_removal_stays_listed_until_removed() {
    let mut h = harness();
    let _zt = h.ztunnel().await;
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    h.journal();
    *h.dataplane.fail_remove.lock().unwrap() = 1;
    let empty = snapshot(&[namespace(true)]);
    h.reconciler.reconcile(&empty).await;
    let a = h.pod("a");
    assert_eq!(
        (a.redirection, a.enrolled),
        (Some(Redirection::Removing), false)
    );
    let error = a.error.unwrap();
    assert!(
        error.starts_with("cannot remove capture rules from /"),
        "{error}"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    h.reconciler.reconcile(&empty).await;
    assert!(h.status().pod("shop", "a").is_none());
    assert_eq!(
        h.journal(),
        ["ztunnel del shop/a", "remove-failed ns-a", "remove ns-a"],
        "one delete only"
    );
}

#[tokio::test]
async fn unlocatable_pods_fail_without_side_effects() {
    let mut h = harness();
    h.dataplane.unlocatable.lock().unwrap().push("ns-a".into());
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    let a = h.pod("a");
    assert_eq!(a.redirection, Some(Redirection::Failed));
    assert!(
        a.error
            .unwrap()
            .starts_with("cannot find the pod's network namespace")
    );
    assert!(h.journal().is_empty());
}

#[tokio::test]
async fn a_changed_netns_annotation_moves_the_pod() {
    let mut h = harness();
    let _zt = h.ztunnel().await;
    h.reconciler
        .reconcile(&snapshot(&[
            namespace(true),
            pod("a", "10.0.0.1", "", NODE),
        ]))
        .await;
    h.journal();
    let moved = pod("a", "10.0.0.1", "", NODE).replace("ns-a", "ns-a2");
    h.reconciler
        .reconcile(&snapshot(&[namespace(true), moved]))
        .await;
    assert_eq!(
        h.journal(),
        [
            "ztunnel del shop/a",
            "remove ns-a",
            "apply ns-a2",
            "ztunnel add shop/a"
        ]
    );
    assert!(h.pod("a").netns.unwrap().ends_with("/ns-a2"));
}

#[tokio::test]
async fn pod_label_enrolls_and_opt_out_unenrolls() {
    let mut h = harness();
    let _zt = h.ztunnel().await;
    let labelled = |mode: &str| {
        snapshot(&[
            namespace(false),
            pod(
                "a",
                "10.0.0.1",
                &format!("istio.io/dataplane-mode: {mode}"),
                NODE,
            ),
        ])
    };
    h.reconciler.reconcile(&labelled("ambient")).await;
    assert_eq!(h.pod("a").redirection, Some(Redirection::Enabled));
    h.reconciler.reconcile(&labelled("none")).await;
    assert_eq!(h.pod("a").skip_reason, Some(SkipReason::NotAmbient));
    assert_eq!(
        h.journal(),
        [
            "apply ns-a",
            "ztunnel add shop/a",
            "ztunnel del shop/a",
            "remove ns-a"
        ]
    );
}

#[tokio::test]
async fn duplicate_uids_enroll_only_the_first() {
    let mut h = harness();
    let _zt = h.ztunnel().await;
    let with_uid = |name: &str| {
        pod(name, "10.0.0.1", "", NODE).replace("namespace: shop,", "namespace: shop, uid: same,")
    };
    h.reconciler
        .reconcile(&snapshot(&[namespace(true), with_uid("a"), with_uid("b")]))
        .await;
    assert_eq!(h.pod("a").redirection, Some(Redirection::Enabled));
    let b = h.pod("b");
    assert_eq!((b.enrolled, b.redirection), (false, None));
    assert!(
        b.error
            .unwrap()
            .contains("uid same is also used by pod shop/a")
    );
}

#[tokio::test]
async fn host_network_and_terminated_pods_are_never_swept() {
    let mut h = harness();
    let host = pod("h", "10.0.0.9", "", NODE).replace("spec: {", "spec: {hostNetwork: true, ");
    let done = pod("d", "10.0.0.8", "", NODE).replace("status: {", "status: {phase: Succeeded, ");
    h.reconciler
        .reconcile(&snapshot(&[namespace(true), host, done]))
        .await;
    assert!(h.journal().is_empty());
    assert_eq!(h.pod("h").skip_reason, Some(SkipReason::HostNetwork));
    assert_eq!(h.pod("d").skip_reason, Some(SkipReason::Terminated));
    assert!(h.status().ready);
}

#[tokio::test]
async fn a_replaced_namespace_file_is_released_before_the_pod_is_enrolled_again() {
    let mut h = harness();
    let _zt = h.ztunnel().await;
    let config = snapshot(&[namespace(true), pod("a", "10.0.0.1", "", NODE)]);
    h.reconciler.reconcile(&config).await;
    h.journal();
    // The annotated path no longer names the namespace we hold (pod re-created).
    let link = h.dataplane.links.as_ref().unwrap().path().join("ns-a");
    std::fs::remove_file(link).unwrap();
    *h.dataplane.fail_remove.lock().unwrap() = 1;
    h.reconciler.reconcile(&config).await;
    assert_eq!(h.journal(), ["ztunnel del shop/a", "remove-failed ns-a"]);
    assert_eq!(
        h.pod("a").redirection,
        Some(Redirection::Removing),
        "stale fd not reused"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    h.reconciler.reconcile(&config).await;
    assert_eq!(
        h.journal(),
        ["remove ns-a", "apply ns-a", "ztunnel add shop/a"]
    );
    assert_eq!(h.pod("a").redirection, Some(Redirection::Enabled));
}
