//! Readiness as a set of drop guards: each startup dependency registers a named guard, and
//! ztunnel is ready once every guard was dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The pending startup tasks. Cheap to clone; clones share the set.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// Holds readiness back until dropped.
#[derive(Debug)]
pub struct ReadyGuard {
    readiness: Readiness,
    id: u64,
}

impl Readiness {
    /// Registers a pending task named `name`.
    pub fn register(&self, name: impl Into<String>) -> ReadyGuard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id, name.into());
        ReadyGuard {
            readiness: self.clone(),
            id,
        }
    }

    /// Names of the tasks still pending (empty = ready).
    pub fn pending(&self) -> Vec<String> {
        self.lock().values().cloned().collect()
    }

    /// Whether every registered task is done.
    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, String>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.readiness.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_guard_is_dropped() {
        let r = Readiness::default();
        assert!(r.is_ready());
        let a = r.register("config");
        let b = r.register("zds snapshot");
        assert_eq!(r.pending(), ["config", "zds snapshot"]);
        drop(a);
        assert_eq!(r.pending(), ["zds snapshot"]);
        drop(b);
        assert!(r.is_ready());
    }
}
