//! Kubernetes objects → xDS: starts the configured object source, translates every new snapshot
//! and publishes the resulting resource set to the ADS server, which pushes only what changed.
//! The CA's "does this workload run on the caller's node" check is answered from the same
//! objects ([`SnapshotLocality`]).
//!
//! A snapshot that fails in part (a file that stops parsing, an object that does not decode, a
//! policy with unsupported fields) never empties the served set: the sources keep the last good
//! objects, and translation turns bad objects into logged problems while the rest is served.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use mesh_core::k8s::Pod;
use mesh_core::k8s::{self, DirSource, DirSourceConfig, Snapshot};
use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, pack};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{LocalityError, NodeLocality};
use crate::config::{SourceConfig, SourceKind};
use crate::translate::{TranslateConfig, Translated, translate};
use crate::xds::ResourceSet;

/// Snapshots of every object the source knows.
pub type Snapshots = watch::Receiver<Arc<Snapshot>>;

/// Starts the object source; `None` when none is configured (CA-only mode).
pub async fn start(
    config: &SourceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<Snapshots>> {
    match &config.kind {
        SourceKind::None => Ok(None),
        SourceKind::Dir { dir, poll } => {
            let mut cfg = DirSourceConfig::new(dir.clone());
            cfg.poll_interval = *poll;
            let source = DirSource::new(cfg)
                .with_context(|| format!("cannot read the config directory {}", dir.display()))?;
            let rx = source.subscribe();
            tracing::info!(dir = %dir.display(), objects = rx.borrow().len(), "config directory loaded");
            tokio::spawn(async move {
                tokio::select! {
                    () = source.run() => {}
                    () = shutdown.cancelled() => {}
                }
            });
            Ok(Some(rx))
        }
        SourceKind::Kube => start_kube(shutdown).await.map(Some),
    }
}

// Watches the API server; objects arrive as the watchers list them, and xDS serves whatever is
// known so far (ztunnel's readiness waits for the first response of each type, not completeness).
async fn start_kube(shutdown: CancellationToken) -> anyhow::Result<Snapshots> {
    let client = k8s::infer_client()
        .await
        .context("cannot build a Kubernetes client (kubeconfig or in-cluster service account)")?;
    let source = k8s::KubeSource::new(client, k8s::KubeSourceConfig::default());
    let rx = source.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            () = source.run() => {}
            () = shutdown.cancelled() => {}
        }
    });
    Ok(rx)
}

/// Packs a translation into the resource set the ADS server serves.
pub fn resource_set(translated: &Translated) -> ResourceSet {
    let mut set = ResourceSet::new();
    for (name, address) in &translated.addresses {
        set.insert(ADDRESS_TYPE_URL, name.clone(), pack(address));
    }
    for (name, policy) in &translated.authorizations {
        set.insert(AUTHORIZATION_TYPE_URL, name.clone(), pack(policy));
    }
    set
}

/// Shortest time between two translations: a burst of changes (a rollout, 50 pod updates a
/// second) is coalesced into at most ten full translations a second, while a single change after
/// a quiet period is translated at once.
pub const MIN_TRANSLATE_INTERVAL: Duration = Duration::from_millis(100);

/// Translates every snapshot `snapshots` yields and publishes the result on `resources` until
/// `shutdown`. Translation runs off the async workers (10 000 pods take tens of milliseconds).
pub async fn publish(
    mut snapshots: Snapshots,
    config: TranslateConfig,
    resources: watch::Sender<Arc<ResourceSet>>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let mut reported = BTreeSet::new();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let cfg = config.clone();
        let start = Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            let translated = translate(&snapshot, &cfg);
            let set = resource_set(&translated);
            (translated.problems, set, snapshot.version())
        })
        .await;
        let Ok((problems, set, version)) = built else {
            tracing::error!("translation panicked; keeping the last published resources");
            return;
        };
        report_problems(&mut reported, problems);
        let took = start.elapsed();
        metrics::histogram!("istiod_translate_duration_seconds").record(took.as_secs_f64());
        metrics::gauge!("istiod_xds_resources", "type" => "address")
            .set(set.len(ADDRESS_TYPE_URL) as f64);
        metrics::gauge!("istiod_xds_resources", "type" => "authorization")
            .set(set.len(AUTHORIZATION_TYPE_URL) as f64);
        tracing::debug!(version, ?took, "translated snapshot");
        resources.send_replace(Arc::new(set));
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        // Changes arriving meanwhile are coalesced: the loop reads only the newest snapshot.
        let wait = MIN_TRANSLATE_INTERVAL.saturating_sub(start.elapsed());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

// Logs each problem once (when it appears), not on every snapshot.
fn report_problems(reported: &mut BTreeSet<String>, problems: Vec<String>) {
    let current: BTreeSet<String> = problems.into_iter().collect();
    for problem in current.difference(reported) {
        tracing::warn!(%problem, "object not served as written");
    }
    metrics::gauge!("istiod_config_problems").set(current.len() as f64);
    *reported = current;
}

/// Answers the CA's impersonation check from the pods in the current snapshot.
pub struct SnapshotLocality {
    snapshots: Snapshots,
    // {(namespace, service account, node)} of the snapshot it was built from, rebuilt on first
    // use after the snapshot changes.
    index: Mutex<Option<(Arc<Snapshot>, Arc<Placements>)>>,
}

impl SnapshotLocality {
    /// A locality view over `snapshots`.
    pub fn new(snapshots: Snapshots) -> Self {
        Self {
            snapshots,
            index: Mutex::new(None),
        }
    }

    fn placements(&self) -> Arc<Placements> {
        let snapshot = self.snapshots.borrow().clone();
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        match &*index {
            Some((built_from, placements)) if Arc::ptr_eq(built_from, &snapshot) => {
                placements.clone()
            }
            _ => {
                let built = Arc::new(placements(&snapshot));
                *index = Some((snapshot, built.clone()));
                built
            }
        }
    }
}

type Placements = HashSet<(String, String, String)>;

fn placements(snapshot: &Snapshot) -> Placements {
    snapshot
        .list::<Pod>()
        .filter_map(|pod| {
            let spec = pod.spec.as_ref()?;
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                return None;
            }
            let namespace = pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| k8s::DEFAULT_NAMESPACE.into());
            let account = spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into());
            Some((namespace, account, spec.node_name.clone()?))
        })
        .collect()
}

impl NodeLocality for SnapshotLocality {
    fn has_workload_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, LocalityError>> {
        let key = (
            namespace.to_string(),
            service_account.to_string(),
            node.to_string(),
        );
        let found = self.placements().contains(&key);
        Box::pin(std::future::ready(Ok(found)))
    }
}

#[cfg(test)]
mod tests;
