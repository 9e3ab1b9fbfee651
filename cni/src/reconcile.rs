//! The reconciler: keeps the pods of this node in or out of the mesh as the config says.
//!
//! On every config snapshot (and when a retry is due) one pass:
//!
//! 1. computes the enrolled set for this node ([`crate::enrollment::decide`]);
//! 2. takes out pods that left it (label removed, opted out, pod deleted or changed): ZDS
//!    `DelWorkload` first, so ztunnel stops serving them, then the in-pod rules are removed. The
//!    pod keeps running and its traffic flows directly again; nothing restarts it;
//! 3. brings in pods that joined: finds the pod's network namespace, installs the rules, then
//!    sends ZDS `AddWorkload` with the namespace. A pod whose rules fail is never sent to
//!    ztunnel, partial rules are taken out again, and the pod is retried with backoff;
//! 4. on the first pass only, removes rules left in pods that are no longer enrolled (the label
//!    went away while the agent was down).
//!
//! State is reported in [`AgentStatus`] (the `ambient.istio.io/redirection` annotation of Istio,
//! kept here because a config directory cannot be patched).
//!
//! Shutting the agent down leaves every rule in place and sends no deletes, as upstream does: pods
//! stay captured across agent restarts and upgrades, and the next agent re-applies the same rules
//! (atomically replacing them) and re-sends every pod to ztunnel.

mod entry;
mod status;
mod view;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mesh_core::k8s::Snapshot;
use mesh_core::zds::NetnsFd;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use status::{AgentStatus, ConfigReport, PodReport, Redirection};

use crate::enrollment::{Decision, SkipReason};
use crate::locate::{LocateError, Located, Locator, PodHint};
use crate::rules::{self, ApplyError, Backend, CaptureConfig};
use crate::zds::{ZdsError, ZdsHandle};
use entry::{Backoff, Ctx, Entry, blocking, enroll, unenroll};
use view::{NodePod, NodeView};

/// First retry delay after a failure.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Longest retry delay (Istio's node agent caps at 5 s; rule failures rarely fix themselves
/// quickly, so we back off further).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How many pods are moved in or out of the mesh at once.
pub const DEFAULT_CONCURRENCY: usize = 8;

/// Why a pod could not be moved where it should be.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The pod's network namespace was not found.
    #[error("cannot find the pod's network namespace: {0}")]
    Locate(#[from] LocateError),
    /// The rules could not be installed (any partial install was taken out again).
    #[error("cannot install capture rules in {netns}: {source}")]
    Install {
        /// Where the namespace was found.
        netns: PathBuf,
        /// The rule loader's error.
        source: ApplyError,
    },
    /// The rules could not be removed.
    #[error("cannot remove capture rules from {netns}: {source}")]
    Remove {
        /// Where the namespace was found.
        netns: PathBuf,
        /// The rule loader's error.
        source: ApplyError,
    },
    /// Installing failed and so did taking the partial install out.
    #[error(
        "{install}; removing the partial install also failed, so the pod may be partially captured: {cleanup}"
    )]
    PartialInstall {
        /// The install error.
        install: Box<EnrollError>,
        /// The cleanup error.
        cleanup: Box<EnrollError>,
    },
    /// The namespace descriptor could not be duplicated for ZDS.
    #[error("cannot duplicate the pod's namespace descriptor: {0}")]
    Dup(std::io::Error),
    /// ztunnel did not take the pod.
    #[error("ztunnel did not take the pod: {0}")]
    Zds(#[from] ZdsError),
    /// A blocking task died.
    #[error("{what} task failed: {reason}")]
    Task {
        /// Which task.
        what: &'static str,
        /// How it ended.
        reason: String,
    },
}

/// The host operations the reconciler needs. [`HostDataplane`] is the real one; tests use
/// fakes. Every method blocks.
pub trait Dataplane: Send + Sync + 'static {
    /// Finds each pod's network namespace.
    fn locate(&self, pods: &[PodHint]) -> Vec<Result<Located, LocateError>>;
    /// Installs (or atomically re-installs) the capture rules in `netns`.
    fn apply_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError>;
    /// Removes the capture rules from `netns` (no-op if there are none).
    fn remove_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError>;
}

/// The real dataplane: [`Locator`] plus [`rules::apply`]/[`rules::remove`].
#[derive(Debug, Clone)]
pub struct HostDataplane {
    locator: Locator,
    backend: Backend,
    capture: CaptureConfig,
}

impl HostDataplane {
    /// A dataplane finding namespaces with `locator` and loading rules with `backend`.
    pub fn new(locator: Locator, backend: Backend, capture: CaptureConfig) -> Self {
        Self {
            locator,
            backend,
            capture,
        }
    }
}

// The rules go into exactly the namespace we hold (and hand to ztunnel), even if its name was
// reused meanwhile: `/proc/self/fd/N` reopens our own descriptor.
fn fd_path(netns: &NetnsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", netns.as_fd().as_raw_fd()))
}

impl Dataplane for HostDataplane {
    fn locate(&self, pods: &[PodHint]) -> Vec<Result<Located, LocateError>> {
        self.locator.locate(pods)
    }

    fn apply_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError> {
        rules::apply(&fd_path(netns), self.backend, &self.capture)
    }

    fn remove_rules(&self, netns: &NetnsFd) -> Result<(), ApplyError> {
        rules::remove(&fd_path(netns), self.backend, &self.capture)
    }
}

/// Reconciler settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReconcilerConfig {
    /// This node's name (pods match on `spec.nodeName`).
    pub node_name: String,
    /// First retry delay.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Pods processed at once.
    pub concurrency: usize,
}

impl ReconcilerConfig {
    /// Default settings for node `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

/// Keeps the node's pods in or out of the mesh (see the module docs).
pub struct Reconciler {
    node_name: String,
    concurrency: usize,
    ctx: Arc<Ctx>,
    entries: BTreeMap<String, Entry>,
    swept: bool,
    status: watch::Sender<Arc<AgentStatus>>,
}

impl Reconciler {
    /// A reconciler acting through `dataplane` and announcing pods on `zds`.
    pub fn new(config: ReconcilerConfig, dataplane: Arc<dyn Dataplane>, zds: ZdsHandle) -> Self {
        let backoff = Backoff {
            initial: config.initial_backoff,
            max: config.max_backoff,
        };
        let status = AgentStatus {
            node: config.node_name.clone(),
            ..AgentStatus::default()
        };
        Self {
            node_name: config.node_name,
            concurrency: config.concurrency.max(1),
            ctx: Arc::new(Ctx {
                dataplane,
                zds,
                backoff,
            }),
            entries: BTreeMap::new(),
            swept: false,
            status: watch::channel(Arc::new(status)).0,
        }
    }

    /// The status after each pass.
    pub fn status(&self) -> watch::Receiver<Arc<AgentStatus>> {
        self.status.subscribe()
    }

    /// Reconciles on every new snapshot, when retries are due, and when a ztunnel becomes ready
    /// (pending pods are re-sent), until the snapshot source closes or the future is dropped.
    pub async fn run(mut self, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
        let mut ready = self.ctx.zds.ready_connections();
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            self.reconcile(&snapshot).await;
            let retry = self.next_retry();
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() {
                    info!("config source closed; reconciler stopping");
                    return;
                },
                Ok(()) = ready.changed() => {
                    if *ready.borrow_and_update() > 0 {
                        self.retry_pending_now();
                    }
                }
                () = sleep_until(retry) => {}
            }
        }
    }

    /// One pass over `snapshot` (see the module docs).
    pub async fn reconcile(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        let view = NodeView::build(&self.node_name, snapshot);
        debug!(
            version = snapshot.version(),
            pods = view.pods.len(),
            enrolled = view.wanted.len(),
            "reconciling"
        );
        self.unenroll_stale(&view, now).await;
        self.enroll_wanted(&view, now).await;
        if !self.swept {
            self.sweep(&view).await;
            self.swept = true;
        }
        self.publish(&view, snapshot);
    }

    async fn unenroll_stale(&mut self, view: &NodeView, now: Instant) {
        let stale: Vec<String> = self
            .entries
            .values()
            .filter(|e| view.wanted.get(&e.uid) != Some(&e.want) || e.netns_moved())
            .filter(|e| e.phase != Redirection::Removing || e.due(now))
            .map(|e| e.uid.clone())
            .collect();
        let work: Vec<Entry> = stale
            .iter()
            .filter_map(|uid| self.entries.remove(uid))
            .collect();
        let ctx = self.ctx.clone();
        let left: Vec<Option<Entry>> = futures::stream::iter(work)
            .map(|e| unenroll(ctx.clone(), e))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        self.put_back(left.into_iter().flatten());
    }

    async fn enroll_wanted(&mut self, view: &NodeView, now: Instant) {
        for (uid, want) in &view.wanted {
            if !self.entries.contains_key(uid) {
                self.entries
                    .insert(uid.clone(), Entry::new(uid, want.clone(), now));
            }
        }
        let due: Vec<String> = self
            .entries
            .values()
            // A moved namespace must be released before the pod is enrolled at its new one.
            .filter(|e| view.wanted.get(&e.uid) == Some(&e.want) && !e.netns_moved())
            .filter(|e| {
                e.phase == Redirection::Removing || (e.phase != Redirection::Enabled && e.due(now))
            })
            .map(|e| e.uid.clone())
            .collect();
        let mut work: Vec<Entry> = due
            .iter()
            .filter_map(|uid| self.entries.remove(uid))
            .collect();
        self.locate_missing(&mut work).await;
        let ctx = self.ctx.clone();
        let done: Vec<Entry> = futures::stream::iter(work)
            .map(|e| enroll(ctx.clone(), e))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        self.put_back(done);
    }

    /// Finds the namespaces of `entries` that have none yet, in one blocking batch.
    async fn locate_missing(&self, entries: &mut [Entry]) {
        let missing: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].netns.is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        let hints: Vec<PodHint> = missing
            .iter()
            .map(|&i| entries[i].want.hint.clone())
            .collect();
        let dataplane = self.ctx.dataplane.clone();
        let results: Vec<Result<Located, EnrollError>> =
            match blocking("locate", move || dataplane.locate(&hints)).await {
                Ok(found) if found.len() == missing.len() => found
                    .into_iter()
                    .map(|r| r.map_err(EnrollError::from))
                    .collect(),
                other => {
                    let reason = match other {
                        Ok(found) => format!("{} results for {} pods", found.len(), missing.len()),
                        Err(e) => e.to_string(),
                    };
                    let failed = |_| {
                        Err(EnrollError::Task {
                            what: "locate",
                            reason: reason.clone(),
                        })
                    };
                    missing.iter().map(failed).collect()
                }
            };
        for (result, &i) in results.into_iter().zip(&missing) {
            match result {
                Ok(located) => entries[i].netns = Some(Arc::new(located)),
                Err(e) => entries[i].fail(Redirection::Failed, &e, &self.ctx.backoff),
            }
        }
    }

    /// First pass only: removes leftover rules from pods of this node that are not enrolled.
    async fn sweep(&self, view: &NodeView) {
        let leftovers: Vec<&NodePod> = view
            .pods
            .iter()
            .filter(|p| may_have_leftovers(p.decision) && !self.entries.contains_key(&p.uid))
            .collect();
        if leftovers.is_empty() {
            return;
        }
        let names: Vec<String> = leftovers
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let hints: Vec<PodHint> = leftovers.iter().map(|p| p.hint.clone()).collect();
        let dataplane = self.ctx.dataplane.clone();
        let swept = blocking("sweep", move || {
            let found = dataplane.locate(&hints);
            for (pod, result) in names.iter().zip(found) {
                match result.map(|l| dataplane.remove_rules(&l.netns).map(|()| l.path)) {
                    Ok(Ok(path)) => debug!(%pod, netns = %path.display(), "no leftover rules"),
                    Ok(Err(e)) => warn!(%pod, error = %e, "cannot remove leftover rules"),
                    Err(e) => debug!(%pod, error = %e, "not sweeping: namespace not found"),
                }
            }
        });
        if let Err(e) = swept.await {
            warn!(error = %e, "sweep of leftover rules failed");
        }
    }

    fn put_back(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for entry in entries {
            self.entries.insert(entry.uid.clone(), entry);
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.retry_at).min()
    }

    fn retry_pending_now(&mut self) {
        let now = Instant::now();
        for entry in self.entries.values_mut() {
            if entry.phase == Redirection::Pending {
                entry.retry_at = Some(now);
            }
        }
    }

    fn publish(&self, view: &NodeView, snapshot: &Snapshot) {
        let mut pods: Vec<PodReport> = view
            .pods
            .iter()
            // A pod reported for a duplicate uid must not show the other pod's entry.
            .map(|p| report(p, self.entries.get(&p.uid).filter(|_| p.error.is_none())))
            .collect();
        // Pods that left the config but whose rules are still being removed.
        let listed: std::collections::BTreeSet<&str> =
            view.pods.iter().map(|p| p.uid.as_str()).collect();
        pods.extend(
            self.entries
                .values()
                .filter(|e| !listed.contains(e.uid.as_str()))
                .map(entry_report),
        );
        let config = ConfigReport {
            version: snapshot.version(),
            files: snapshot.files().to_vec(),
            errors: snapshot.errors().to_vec(),
        };
        let status = AgentStatus {
            node: self.node_name.clone(),
            ready: true,
            config,
            pods,
        };
        self.status.send_replace(Arc::new(status));
    }
}

/// Pods that may carry rules from an earlier run although they are not enrolled now. Never
/// host-network pods (their namespace is the node's) and never pods that are gone.
fn may_have_leftovers(decision: Decision) -> bool {
    matches!(
        decision,
        Decision::Skip(SkipReason::NotAmbient | SkipReason::OptedOut | SkipReason::HasSidecar)
    )
}

fn report(pod: &NodePod, entry: Option<&Entry>) -> PodReport {
    let (skip_reason, enrolled) = match pod.decision {
        Decision::Enroll => (None, pod.error.is_none()),
        Decision::Skip(reason) => (Some(reason), false),
    };
    let mut report = PodReport {
        uid: pod.uid.clone(),
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        ips: pod.ips.clone(),
        enrolled,
        skip_reason,
        redirection: None,
        netns: None,
        netns_inode: None,
        error: pod.error.clone(),
        failures: 0,
    };
    if let Some(entry) = entry {
        fill_from_entry(&mut report, entry);
    }
    report
}

fn entry_report(entry: &Entry) -> PodReport {
    let mut report = PodReport {
        uid: entry.uid.clone(),
        namespace: entry.want.info.namespace.clone(),
        name: entry.want.info.name.clone(),
        ips: entry
            .want
            .hint
            .ips
            .iter()
            .map(ToString::to_string)
            .collect(),
        enrolled: false,
        skip_reason: None,
        redirection: None,
        netns: None,
        netns_inode: None,
        error: None,
        failures: 0,
    };
    fill_from_entry(&mut report, entry);
    report
}

fn fill_from_entry(report: &mut PodReport, entry: &Entry) {
    report.redirection = Some(entry.phase);
    report.netns = entry.netns.as_ref().map(|l| l.path.display().to_string());
    report.netns_inode = entry.netns.as_ref().map(|l| l.netns.inode());
    report.error = entry.error.clone().or(report.error.take());
    report.failures = entry.failures;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
