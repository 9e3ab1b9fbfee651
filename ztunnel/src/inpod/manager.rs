//! The proxy manager: starts a [`PodProxy`] for every pod the node agent enrolls, replaces it
//! when the pod's sandbox is recreated, and drains it when the pod goes away.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::netns::NetnsHandle;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{BoxFuture, WorkloadAdd, WorkloadInfo, WorkloadProxyManager};
use crate::proxy::{PodContext, PodInfo, PodProxy, ProxyInputs};

/// What `/config_dump` shows of one proxied pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodDump {
    /// The pod.
    #[serde(flatten)]
    pub info: PodInfo,
    /// Inode of its network namespace.
    pub netns_inode: u64,
    /// `running` or `draining`.
    pub state: &'static str,
    /// The workload uid it resolved to in the config, if any yet.
    pub workload: Option<String>,
}

/// Owns every pod proxy of this ztunnel.
pub struct ProxyManager {
    inputs: Arc<ProxyInputs>,
    data: Handle,
    pods: Mutex<BTreeMap<String, PodProxy>>,
    // Proxies being drained, so shutdown can wait for them.
    draining: Mutex<Vec<(PodInfo, JoinHandle<()>)>>,
}

impl std::fmt::Debug for ProxyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyManager")
            .field("pods", &self.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ProxyManager {
    /// A manager whose proxies run on the `data` runtime.
    pub fn new(inputs: Arc<ProxyInputs>, data: Handle) -> Self {
        Self {
            inputs,
            data,
            pods: Mutex::new(BTreeMap::new()),
            draining: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodProxy>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pods with a proxy, for `/config_dump`.
    pub fn dump(&self) -> Vec<PodDump> {
        let store = self.inputs.store.snapshot();
        self.lock()
            .values()
            .map(|proxy| {
                let ctx = proxy.context();
                PodDump {
                    info: ctx.info.clone(),
                    netns_inode: ctx.netns.inode(),
                    state: if proxy.is_draining() {
                        "draining"
                    } else {
                        "running"
                    },
                    workload: ctx.find_workload(&store).map(|w| w.uid.to_string()),
                }
            })
            .collect()
    }

    /// Number of running pod proxies.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no pod proxy runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn start(&self, add: WorkloadAdd) -> Result<(), String> {
        let uid = add.uid;
        let inode = add.netns.inode();
        let running = self.lock().get(&uid).map(|p| p.context().netns.inode());
        if running == Some(inode) {
            // Same pod, same sandbox (e.g. sent again in a new snapshot): nothing to do.
            return Ok(());
        }
        let info = pod_info(&uid, add.info);
        let netns = NetnsHandle::from_fd(add.netns.into_file())
            .map_err(|e| format!("pod {}: {e}", info.display_name()))?;
        let ctx = Arc::new(PodContext {
            info: info.clone(),
            netns,
            inputs: self.inputs.clone(),
        });
        if running.is_some() {
            // The sandbox was recreated: the old listeners live in a namespace that is gone.
            self.stop(&uid, "replaced by a new network namespace");
        }
        let proxy = PodProxy::start(ctx.clone(), &self.data)
            .await
            .map_err(|e| format!("cannot start the proxy of pod {}: {e}", info.display_name()))?;
        let active = {
            let mut pods = self.lock();
            pods.insert(uid, proxy);
            pods.len()
        };
        self.inputs.metrics.proxy_started(active);
        self.warm_up(ctx);
        Ok(())
    }

    /// Fetches the pod's certificate ahead of its first connection, once it shows up in config.
    fn warm_up(&self, ctx: Arc<PodContext>) {
        tokio::spawn(async move {
            match ctx.workload().await {
                Ok(w) => ctx.inputs.certs.prefetch(&w.identity),
                Err(error) => warn!(%error, "connections of this pod will wait for its config"),
            }
        });
    }

    fn stop(&self, uid: &str, why: &str) -> bool {
        let (proxy, active) = {
            let mut pods = self.lock();
            let Some(proxy) = pods.remove(uid) else {
                return false;
            };
            (proxy, pods.len())
        };
        self.inputs.metrics.proxy_stopped(active);
        let info = proxy.context().info.clone();
        info!(pod = %info.display_name(), uid, why, "stopping pod proxy");
        let task = proxy.drain();
        let mut draining = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        draining.retain(|(_, t)| !t.is_finished());
        draining.push((info, task));
        drop(draining);
        self.forget_unused_certificates();
        true
    }

    /// Drops the certificates no remaining pod uses.
    fn forget_unused_certificates(&self) {
        let store = self.inputs.store.snapshot();
        let in_use: HashSet<_> = self
            .lock()
            .values()
            .filter_map(|p| p.context().find_workload(&store))
            .map(|w| w.identity.clone())
            .collect();
        for id in self.inputs.certs.identities() {
            if !in_use.contains(&id) {
                self.inputs.certs.forget(&id);
            }
        }
    }

    /// Drains every proxy (listeners close at once) and waits for them, at most `deadline` plus
    /// a small margin for the forced close.
    pub async fn shutdown(&self, deadline: Duration) {
        let uids: Vec<String> = self.lock().keys().cloned().collect();
        for uid in &uids {
            self.stop(uid, "ztunnel is shutting down");
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.draining.lock().unwrap_or_else(|e| e.into_inner()));
        let all = futures::future::join_all(tasks.into_iter().map(|(_, t)| t));
        if tokio::time::timeout(deadline + Duration::from_secs(1), all)
            .await
            .is_err()
        {
            warn!("pod proxies did not stop in time");
        }
    }
}

fn pod_info(uid: &str, info: Option<WorkloadInfo>) -> PodInfo {
    let info = info.unwrap_or_default();
    PodInfo {
        uid: uid.to_string(),
        name: info.name,
        namespace: info.namespace,
        service_account: info.service_account,
    }
}

impl WorkloadProxyManager for ProxyManager {
    fn add(&self, add: WorkloadAdd) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.start(add))
    }

    fn keep(&self, uid: String) -> BoxFuture<'_, Result<(), String>> {
        if !self.lock().contains_key(&uid) {
            // Nothing to keep and no namespace to start one with; the agent will send an add
            // once it has the pod's namespace again.
            warn!(uid, "keep-workload for a pod without a proxy");
        }
        Box::pin(async { Ok(()) })
    }

    fn del(&self, uid: String) -> BoxFuture<'_, Result<(), String>> {
        if !self.stop(&uid, "deleted by the node agent") {
            info!(uid, "delete for a pod without a proxy");
        }
        Box::pin(async { Ok(()) })
    }

    fn snapshot_sent(&self, snapshot: HashSet<String>) -> BoxFuture<'_, Result<(), String>> {
        let stale: Vec<String> = self
            .lock()
            .keys()
            .filter(|uid| !snapshot.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            self.stop(&uid, "not in the node agent's snapshot");
        }
        Box::pin(async { Ok(()) })
    }
}
