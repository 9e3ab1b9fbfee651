//! The store as the proxies see it: an immutable snapshot swapped whole on every update, plus a
//! change signal so a connection can wait for a workload that is not known yet.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use super::Store;

/// The current [`Store`] snapshot, shared by the config source (writer) and the proxies (readers).
#[derive(Debug)]
pub struct SharedStore {
    current: RwLock<Arc<Store>>,
    version: watch::Sender<u64>,
}

impl Default for SharedStore {
    fn default() -> Self {
        Self::new(Store::default())
    }
}

impl SharedStore {
    /// A shared store starting with `store`.
    pub fn new(store: Store) -> Self {
        Self {
            current: RwLock::new(Arc::new(store)),
            version: watch::channel(0).0,
        }
    }

    /// The current snapshot. Cheap: readers never block each other or the writer for long.
    pub fn snapshot(&self) -> Arc<Store> {
        // A panic while holding this lock cannot leave a half-written Arc; recover from poison.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the whole store and wakes every waiter.
    pub fn replace(&self, store: Store) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(store);
        self.version.send_modify(|v| *v += 1);
    }

    /// How many updates were applied so far.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// A receiver that is notified after every update (its value is the version).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Returns `find(store)` as soon as it yields something, re-checking after every update, for
    /// at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        find: impl Fn(&Store) -> Option<T>,
    ) -> Option<T> {
        let mut changes = self.version.subscribe();
        let wait = async {
            loop {
                changes.borrow_and_update();
                if let Some(found) = find(&self.snapshot()) {
                    return Some(found);
                }
                // The sender lives as long as `self`, so this only fails if it is being dropped.
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::local::LocalConfig;

    fn with_workload(uid: &str) -> Store {
        let yaml = format!(
            "workloads: [{{uid: {uid}, name: {uid}, namespace: ns, workloadIps: [10.0.0.1], protocol: HBONE}}]"
        );
        Store::from_local(LocalConfig::parse(&yaml).unwrap())
    }

    #[tokio::test]
    async fn waiters_see_later_updates_and_give_up_after_timeout() {
        let shared = Arc::new(SharedStore::default());
        let waiter = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shared
                    .wait_for(Duration::from_secs(5), |s| s.workload("a"))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        shared.replace(with_workload("a"));
        assert_eq!(&*waiter.await.unwrap().unwrap().uid, "a");
        assert_eq!(shared.version(), 1);
        let missing = shared
            .wait_for(Duration::from_millis(30), |s| s.workload("b"))
            .await;
        assert!(missing.is_none());
    }
}
