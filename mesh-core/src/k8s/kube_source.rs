//! (feature `kube`) A configuration source that watches the Kubernetes API.
//!
//! [`KubeSource`] runs one `kube::runtime::watcher` per [`Kind`] (list, then watch from the
//! list's resource version, relisting after 410 Gone, retrying with exponential backoff), over
//! `DynamicObject`s typed by each kind's group / version / plural. Every object is decoded
//! through the same [`Kind`] decoder as the YAML directory source, so both sources produce
//! identical [`Object`]s; `metadata.managedFields` and the `last-applied-configuration`
//! annotation are dropped first (large, and never needed).
//!
//! * Per-kind stores, replaced atomically when a (re)list completes, so a relist neither loses
//!   nor duplicates objects.
//! * Snapshots are debounced: a burst of events yields one snapshot. Nothing is published
//!   before every kind has completed its first list ([`KubeSource::ready`]); consumers never see
//!   a partial view.
//! * An object that does not decode is skipped and named, with the offending field, in
//!   [`Snapshot::errors`]; the rest keep serving. An update that does not decode keeps the
//!   object's last good version until the next relist.
//! * A resource the server does not have (404: a CRD that is not installed) counts as listed
//!   and empty, is reported in [`Snapshot::errors`], and is retried with backoff; the other kinds
//!   are unaffected. Other failures (unreachable server, 403) keep that kind's last objects and
//!   are reported the same way.
//!
//! Tested against the in-repo fake API server ([`fake_api`](super::fake_api)) and `tower-test`
//! mocks only; no real API server has been exercised.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Kind, Object, ObjectKey, Snapshot};

/// Default time a burst of events is collected before one snapshot is published.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Default objects per list page (as client-go).
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// Annotation `kubectl apply` stores the whole object in; never needed, often large.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// Neither a kubeconfig nor the in-cluster service account could be used.
    #[error("no kubernetes client configuration (kubeconfig or in-cluster): {0}")]
    Config(#[from] kube::config::InferConfigError),
    /// The given kubeconfig file could not be read or used.
    #[error("cannot use kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: kube::config::KubeconfigError,
    },
    /// The client could not be built from the configuration.
    #[error("cannot build the kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Settings of a [`KubeSource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSourceConfig {
    /// The kinds to watch (default: [`Kind::ALL`]). The node agent needs only a few.
    pub kinds: Vec<Kind>,
    /// Only pods on this node (`spec.nodeName=<node>` field selector), for the node agent.
    pub pod_node_name: Option<String>,
    /// How long a burst of events is collected before one snapshot is published.
    pub debounce: Duration,
    /// Objects per list page; `None` lists in one response.
    pub page_size: Option<u32>,
    /// First retry delay after an error; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            kinds: Kind::ALL.to_vec(),
            pod_node_name: None,
            debounce: DEFAULT_DEBOUNCE,
            page_size: Some(DEFAULT_PAGE_SIZE),
            // kube's default backoff: 0.8 s doubling to 30 s.
            min_backoff: Duration::from_millis(800),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A client from the environment: `KUBECONFIG` / `~/.kube/config`, else the in-cluster
/// service account (`kube::Config::infer`).
pub async fn infer_client() -> Result<Client, KubeSourceError> {
    let config = kube::Config::infer().await?;
    Ok(Client::try_from(config)?)
}

/// A client from the kubeconfig file at `path` (its current context).
pub async fn kubeconfig_client(path: &std::path::Path) -> Result<Client, KubeSourceError> {
    let error = |source| KubeSourceError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(error)?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(error)?;
    Ok(Client::try_from(config)?)
}

/// The watch target of `kind`: its group, version, plural and kind.
pub fn api_resource(kind: Kind) -> ApiResource {
    ApiResource {
        group: kind.group().to_owned(),
        version: kind.version().to_owned(),
        api_version: kind.api_version().to_owned(),
        kind: kind.name().to_owned(),
        plural: kind.plural().to_owned(),
    }
}

/// Watches the Kubernetes API and publishes [`Snapshot`]s (see the module docs).
///
/// Take [`KubeSource::subscribe`] / [`KubeSource::ready`] first, then drive
/// [`KubeSource::run`] (it runs until dropped).
pub struct KubeSource {
    client: Client,
    config: KubeSourceConfig,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl KubeSource {
    /// A source over `client`; nothing happens until [`KubeSource::run`].
    pub fn new(client: Client, config: KubeSourceConfig) -> Self {
        Self {
            client,
            config,
            tx: watch::channel(Arc::new(Snapshot::default())).0,
        }
    }

    /// A receiver of every new snapshot; it starts with the current one (version 0, empty,
    /// until the source is ready).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Whether every kind has completed its first list (the first snapshot is published).
    pub fn is_ready(&self) -> bool {
        self.tx.borrow().version() > 0
    }

    /// Resolves once every kind has completed its first list (and the first snapshot is
    /// published), or never if the source stops first.
    pub fn ready(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            if rx.wait_for(|s| s.version() > 0).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Watches until dropped.
    pub async fn run(self) {
        let streams = self.config.kinds.iter().map(|&kind| {
            self.kind_events(kind)
                .map(move |event| (kind, event))
                .boxed()
        });
        let mut events = futures::stream::select_all(streams);
        let mut stores = Stores::new(&self.config.kinds);
        if self.config.kinds.is_empty() {
            // Nothing to watch: ready at once, with an empty snapshot.
            self.publish(&stores);
            return std::future::pending().await;
        }
        let mut deadline: Option<Instant> = None;
        loop {
            let publish_at = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                event = events.next() => {
                    let Some((kind, event)) = event else { return };
                    if stores.apply(kind, event) && deadline.is_none() {
                        deadline = Some(Instant::now() + self.config.debounce);
                    }
                }
                () = tokio::time::sleep_until(publish_at), if deadline.is_some() => {
                    deadline = None;
                    self.publish(&stores);
                }
            }
        }
    }

    fn kind_events(
        &self,
        kind: Kind,
    ) -> impl Stream<Item = watcher::Result<Event<DynamicObject>>> + Send + use<> {
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &api_resource(kind));
        let mut config = watcher::Config::default();
        config.page_size = self.config.page_size;
        if kind == Kind::Pod
            && let Some(node) = &self.config.pod_node_name
        {
            config = config.fields(&format!("spec.nodeName={node}"));
        }
        let backoff = ExponentialBackoff::new(self.config.min_backoff, self.config.max_backoff);
        watcher::watcher(api, config).backoff(backoff)
    }

    /// Publishes the stores as a new snapshot once every kind is listed, if anything changed.
    fn publish(&self, stores: &Stores) {
        if !stores.all_listed() {
            return;
        }
        let objects = stores.objects();
        let errors = stores.errors();
        let current = self.tx.borrow().clone();
        if current.version() > 0
            && current.same_objects_as(&objects)
            && current.errors() == errors.as_slice()
        {
            return;
        }
        let snapshot = Snapshot::new(current.version() + 1, objects, Vec::new(), errors);
        if current.version() == 0 {
            info!(
                objects = snapshot.len(),
                "kubernetes source ready: every kind listed"
            );
        }
        debug!(
            version = snapshot.version(),
            objects = snapshot.len(),
            "config snapshot published"
        );
        self.tx.send_replace(Arc::new(snapshot));
    }
}

/// What one kind's watcher has told us.
#[derive(Debug, Default)]
struct KindStore {
    objects: BTreeMap<ObjectKey, Object>,
    // Why objects were skipped, by object.
    rejected: BTreeMap<ObjectKey, String>,
    // A (re)list in progress: replaces `objects` / `rejected` when it completes.
    relist: Option<(BTreeMap<ObjectKey, Object>, BTreeMap<ObjectKey, String>)>,
    listed: bool,
    // The watcher's current failure, if any.
    error: Option<String>,
}

#[derive(Debug)]
struct Stores(BTreeMap<Kind, KindStore>);

impl Stores {
    fn new(kinds: &[Kind]) -> Self {
        Self(kinds.iter().map(|&k| (k, KindStore::default())).collect())
    }

    fn all_listed(&self) -> bool {
        self.0.values().all(|s| s.listed)
    }

    fn objects(&self) -> BTreeMap<ObjectKey, Object> {
        let all = self.0.values().flat_map(|s| s.objects.iter());
        all.map(|(k, o)| (k.clone(), o.clone())).collect()
    }

    /// Kind-level failures, then skipped objects, ordered by kind.
    fn errors(&self) -> Vec<String> {
        let failures = self.0.values().filter_map(|s| s.error.clone());
        let rejected = self.0.values().flat_map(|s| s.rejected.values().cloned());
        failures.chain(rejected).collect()
    }

    /// Applies one watcher item; returns whether anything a snapshot shows may have changed.
    fn apply(&mut self, kind: Kind, event: watcher::Result<Event<DynamicObject>>) -> bool {
        let store = self.0.entry(kind).or_default();
        let event = match event {
            Ok(event) => event,
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // Routine after etcd compaction: the watcher relists, and the relist replaces
                // the store atomically.
                info!(%kind, message = %status.message, "kubernetes watch expired (410 Gone); relisting");
                return false;
            }
            Err(e) => return store.fail(kind, &e),
        };
        // A completed list or a watch event proves the watcher works again (`Init` does not).
        if matches!(event, Event::InitDone | Event::Apply(_) | Event::Delete(_))
            && let Some(previous) = store.error.take()
        {
            info!(%kind, %previous, "kubernetes watch recovered");
        }
        match event {
            Event::Init => store.relist = Some(Default::default()),
            Event::InitApply(object) => {
                let (objects, rejected) = store.relist.get_or_insert_with(Default::default);
                insert(kind, object, objects, rejected);
                return false;
            }
            Event::InitDone => {
                let (objects, rejected) = store.relist.take().unwrap_or_default();
                store.objects = objects;
                store.rejected = rejected;
                store.listed = true;
                debug!(%kind, objects = store.objects.len(), "kubernetes list complete");
            }
            Event::Apply(object) => insert(kind, object, &mut store.objects, &mut store.rejected),
            Event::Delete(object) => {
                let key = key_of(kind, &object);
                store.objects.remove(&key);
                store.rejected.remove(&key);
            }
        }
        true
    }
}

impl KindStore {
    /// Records a watcher failure; returns whether the snapshot's view changed.
    fn fail(&mut self, kind: Kind, error: &watcher::Error) -> bool {
        let resource = api_resource(kind);
        let path = format!("{}/{}", resource.api_version, resource.plural);
        let message = if is_not_found(error) {
            // The resource does not exist on this server, so it has no objects: count it as
            // listed (empty) and keep retrying in case it gets installed.
            self.objects.clear();
            self.rejected.clear();
            self.listed = true;
            format!(
                "{kind}: the api server does not serve {path} (is the CRD installed?); no {kind} objects until it does"
            )
        } else {
            format!(
                "{kind}: watching {path} failed: {error}; serving the last objects and retrying"
            )
        };
        self.relist = None;
        if self.error.as_ref() == Some(&message) {
            return false;
        }
        warn!(%kind, error = %message, "kubernetes watch failed");
        self.error = Some(message);
        true
    }
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

fn key_of(kind: Kind, object: &DynamicObject) -> ObjectKey {
    let meta = &object.metadata;
    ObjectKey::new(
        kind,
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// Decodes `object` into `objects`, or records why it was skipped in `rejected`.
fn insert(
    kind: Kind,
    object: DynamicObject,
    objects: &mut BTreeMap<ObjectKey, Object>,
    rejected: &mut BTreeMap<ObjectKey, String>,
) {
    let key = key_of(kind, &object);
    match decode(kind, object) {
        Ok(decoded) => {
            rejected.remove(&key);
            objects.insert(key, decoded);
        }
        Err(reason) => {
            let message = format!("{key}: skipped: {reason}");
            if rejected.get(&key) != Some(&message) {
                warn!(object = %key, %reason, "kubernetes object skipped");
            }
            rejected.insert(key, message);
        }
    }
}

/// Decodes a watched object with the YAML source's decoder, after trimming what is never used.
fn decode(kind: Kind, mut object: DynamicObject) -> Result<Object, String> {
    object.metadata.managed_fields = None;
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
    let mut value = object.data;
    let serde_json::Value::Object(map) = &mut value else {
        return Err("object is not a JSON object".to_owned());
    };
    let metadata = serde_json::to_value(&object.metadata).map_err(|e| e.to_string())?;
    map.insert("metadata".into(), metadata);
    // List items usually carry no apiVersion/kind; the watcher knows them.
    map.insert("apiVersion".into(), kind.api_version().into());
    map.insert("kind".into(), kind.name().into());
    let yaml = serde_yaml::to_value(&value).map_err(|e| e.to_string())?;
    kind.decode(yaml).map_err(|e| e.to_string())
}

/// Exponential backoff (doubling from `min` to `max`, ±25 % jitter), reset by the watcher after
/// each success.
#[derive(Debug)]
struct ExponentialBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl ExponentialBackoff {
    fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }
}

impl Iterator for ExponentialBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter spreads the retries of many agents after an API server restart.
        let jitter = rand::random_range(0.75..=1.25);
        Some(delay.mul_f64(jitter))
    }
}

impl Backoff for ExponentialBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests;
