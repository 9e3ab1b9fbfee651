//! Sharing equal values across the workloads of a store.
//!
//! ztunnel holds every workload of the mesh, and most of a workload's strings repeat: its
//! namespace, node, cluster, revision, locality, the services it backs, its identity. Holding
//! each distinct value once and handing out `Arc`s saves an allocation per field per workload,
//! and makes copying index nodes (which every persistent-map update does) a reference-count
//! increment instead of a string copy.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use mesh_core::Identity;

use super::model::Locality;

/// The distinct strings and identities of the workloads converted so far.
///
/// Values nobody else holds any more are dropped by [`Interner::purge`], amortised: only once the
/// sets have doubled since the last purge, so each conversion stays O(1) on average and the sets
/// stay within twice what the store references.
#[derive(Debug)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    identities: HashSet<Arc<Identity>>,
    localities: HashSet<Arc<Locality>>,
    purge_at: usize,
}

const MIN_PURGE_AT: usize = 1024;

impl Default for Interner {
    fn default() -> Self {
        Self {
            strings: HashSet::new(),
            identities: HashSet::new(),
            localities: HashSet::new(),
            purge_at: MIN_PURGE_AT,
        }
    }
}

impl Interner {
    /// A shared copy of `s`.
    pub fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(s);
        self.strings.insert(shared.clone());
        shared
    }

    /// A shared copy of `id`.
    pub fn identity(&mut self, id: Identity) -> Arc<Identity> {
        share(&mut self.identities, id)
    }

    /// A shared copy of `locality`.
    pub fn locality(&mut self, locality: Locality) -> Arc<Locality> {
        share(&mut self.localities, locality)
    }

    /// Drops the values only the interner still holds, if the sets doubled since the last purge.
    pub fn purge(&mut self) {
        if self.len() < self.purge_at {
            return;
        }
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.identities.retain(|i| Arc::strong_count(i) > 1);
        self.localities.retain(|l| Arc::strong_count(l) > 1);
        self.strings.shrink_to_fit();
        self.identities.shrink_to_fit();
        self.localities.shrink_to_fit();
        self.purge_at = (2 * self.len()).max(MIN_PURGE_AT);
    }

    // Distinct values held.
    fn len(&self) -> usize {
        self.strings.len() + self.identities.len() + self.localities.len()
    }
}

fn share<T: Hash + Eq>(set: &mut HashSet<Arc<T>>, value: T) -> Arc<T> {
    if let Some(shared) = set.get(&value) {
        return shared.clone();
    }
    let shared = Arc::new(value);
    set.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_one_allocation() {
        let mut i = Interner::default();
        let a = i.str("ns-1");
        let b = i.str(&String::from("ns-1"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &i.str("ns-2")));
        let id = |sa: &str| Identity::new("cluster.local", "ns-1", sa).unwrap();
        assert!(Arc::ptr_eq(&i.identity(id("a")), &i.identity(id("a"))));
        let zone = |z: &str| Locality {
            zone: z.into(),
            ..Locality::default()
        };
        assert!(Arc::ptr_eq(
            &i.locality(zone("z1")),
            &i.locality(zone("z1"))
        ));
        assert!(!Arc::ptr_eq(
            &i.locality(zone("z1")),
            &i.locality(zone("z2"))
        ));
        assert_eq!(i.len(), 5);
    }

    #[test]
    fn purge_drops_only_unreferenced_values_once_the_sets_doubled() {
        let mut i = Interner::default();
        let kept: Vec<Arc<str>> = (0..10).map(|n| i.str(&format!("kept-{n}"))).collect();
        for n in 0..MIN_PURGE_AT {
            i.str(&format!("gone-{n}"));
        }
        i.purge();
        assert_eq!(i.len(), kept.len());
        assert!(Arc::ptr_eq(&kept[3], &i.str("kept-3")));
        // Below the next threshold nothing is scanned, even if unreferenced values exist.
        i.str("gone-again");
        i.purge();
        assert_eq!(i.len(), kept.len() + 1);
    }
}
