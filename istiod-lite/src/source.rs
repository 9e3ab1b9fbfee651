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
use mesh_core::k8s::{self, DirSource, DirSourceConfig, Kind, ObjectKey, Snapshot};
use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, pack};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{LocalityError, NodeLocality};
use crate::config::{SourceConfig, SourceKind};
use crate::translate::{TranslateConfig, Translated, translate, workload_uid};
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
/// `shutdown`. Translation runs off the async workers: a full one takes tens of milliseconds for
/// 10 000 pods, so when only pods changed, only those pods are translated (see [`Translator`]).
pub async fn publish(
    mut snapshots: Snapshots,
    config: TranslateConfig,
    resources: watch::Sender<Arc<ResourceSet>>,
    shutdown: CancellationToken,
) {
    let mut translator = Some(Translator::new(config));
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let start = Instant::now();
        let Some(mut working) = translator.take() else {
            return;
        };
        let built = tokio::task::spawn_blocking(move || {
            let set = working.update(snapshot);
            (working, set)
        })
        .await;
        let Ok((working, set)) = built else {
            tracing::error!("translation panicked; keeping the last published resources");
            return;
        };
        translator = Some(working);
        let took = start.elapsed();
        metrics::histogram!("istiod_translate_duration_seconds").record(took.as_secs_f64());
        metrics::gauge!("istiod_xds_resources", "type" => "address")
            .set(set.len(ADDRESS_TYPE_URL) as f64);
        metrics::gauge!("istiod_xds_resources", "type" => "authorization")
            .set(set.len(AUTHORIZATION_TYPE_URL) as f64);
        tracing::debug!(?took, "translated snapshot");
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

/// Turns snapshots into resource sets, remembering the last one.
///
/// A pod's workload resource depends on the pod, its namespace and node, and the services and
/// policies that select it, but never on other pods; services and policies never depend on pods.
/// So when only pods changed, translating a reduced snapshot (every non-pod object plus the
/// changed pods) and replacing just those pods' workloads gives exactly the full translation, at
/// a cost proportional to services and policies instead of to the whole mesh.
pub struct Translator {
    config: TranslateConfig,
    last: Option<(Arc<Snapshot>, ResourceSet)>,
    reported: BTreeSet<String>,
}

impl Translator {
    /// A translator with nothing published yet.
    pub fn new(config: TranslateConfig) -> Self {
        Self {
            config,
            last: None,
            reported: BTreeSet::new(),
        }
    }

    /// The resource set for `snapshot`.
    pub fn update(&mut self, snapshot: Arc<Snapshot>) -> ResourceSet {
        let last = self.last.take();
        let incremental = last.as_ref().and_then(|(old, set)| {
            let pods = changed_pods(old, &snapshot)?;
            Some(self.pods_only(&snapshot, set, &pods))
        });
        let set = incremental.unwrap_or_else(|| {
            let translated = translate(&snapshot, &self.config);
            report_problems(
                &mut self.reported,
                translated.problems.iter().cloned().collect(),
            );
            resource_set(&translated)
        });
        self.last = Some((snapshot, set.clone()));
        set
    }

    fn pods_only(
        &mut self,
        snapshot: &Snapshot,
        last: &ResourceSet,
        pods: &[ObjectKey],
    ) -> ResourceSet {
        let reduced = Snapshot::from_objects(
            snapshot
                .objects()
                .filter(|(key, _)| key.kind != Kind::Pod || pods.binary_search(key).is_ok())
                .map(|(_, object)| object.clone()),
        );
        let translated = translate(&reduced, &self.config);
        let mut set = last.clone();
        let mut problems = self.reported.clone();
        for pod in pods {
            let uid = workload_uid(&self.config, &pod.namespace, &pod.name);
            match translated.addresses.get(&uid) {
                Some(address) => set.insert(ADDRESS_TYPE_URL, uid, pack(address)),
                // Deleted, or no longer translatable (terminated, lost its IP).
                None => drop(set.remove(ADDRESS_TYPE_URL, &uid)),
            }
            let prefix = format!("Pod {}/{}:", pod.namespace, pod.name);
            problems.retain(|p| !p.starts_with(&prefix));
            problems.extend(
                translated
                    .problems
                    .iter()
                    .filter(|p| p.starts_with(&prefix))
                    .cloned(),
            );
        }
        report_problems(&mut self.reported, problems);
        set
    }
}

/// The keys of the pods that differ between `old` and `new`, sorted; `None` if anything else
/// changed too.
fn changed_pods(old: &Snapshot, new: &Snapshot) -> Option<Vec<ObjectKey>> {
    let mut pods = Vec::new();
    for change in old.diff(new) {
        let key = change.key();
        if key.kind != Kind::Pod {
            return None;
        }
        pods.push(key);
    }
    pods.sort();
    Some(pods)
}

// Logs each problem once (when it appears), not on every snapshot.
fn report_problems(reported: &mut BTreeSet<String>, current: BTreeSet<String>) {
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
