//! The workload and service store ztunnel routes from, with the indexes the data path needs:
//! workloads by uid and by address, services by key and by VIP, and each service's endpoints.

pub mod intern;
pub mod local;
pub mod model;
pub mod policy;
mod shared;

use std::net::IpAddr;
use std::sync::Arc;

use model::{NetworkAddress, Service, Workload};
pub use shared::SharedStore;

// Persistent maps: cloning the store (every config update works on a clone, then swaps it in
// whole) shares all unchanged entries, so an update costs O(changes · log n) instead of copying
// 10 000 workloads and their index keys. B-trees rather than HAMTs: with pointer-sized entries
// an `imbl::OrdMap` costs ≈ 50 B per entry against ≈ 96 B for an `imbl::HashMap`, and a lookup
// (a dozen comparisons) stays far below the cost of the connection it serves.
type OrdMap<K, V> = imbl::OrdMap<K, V>;

/// Indexed workloads and services. Replacing an entry keeps every index consistent.
///
/// Every index holds the `Arc` of the entry itself, keyed by `Arc<str>`s the entry already owns
/// where it can: an index entry costs a few pointers, and copying an index node on update
/// increments reference counts instead of copying strings.
#[derive(Debug, Default, Clone)]
pub struct Store {
    workloads: OrdMap<Arc<str>, Arc<Workload>>,
    by_addr: OrdMap<NetworkAddress, Arc<Workload>>,
    by_name: OrdMap<(Arc<str>, Arc<str>), Arc<Workload>>,
    services: OrdMap<Arc<str>, Arc<Service>>,
    by_vip: OrdMap<NetworkAddress, Arc<Service>>,
    // service key → its endpoints by uid.
    endpoints: OrdMap<Arc<str>, OrdMap<Arc<str>, Arc<Workload>>>,
    policies: policy::PolicyStore,
}

impl Store {
    /// A store holding exactly the contents of a local config.
    pub fn from_local(cfg: local::LocalConfig) -> Self {
        let mut s = Self::default();
        cfg.services.into_iter().for_each(|svc| {
            s.insert_service(svc);
        });
        cfg.workloads.into_iter().for_each(|w| {
            s.insert_workload(w);
        });
        cfg.policies.into_iter().for_each(|p| s.insert_policy(p));
        s
    }

    /// Adds or replaces a workload (keyed by uid); returns the key.
    pub fn insert_workload(&mut self, w: Workload) -> Arc<str> {
        self.remove_workload(&w.uid);
        let w = Arc::new(w);
        for addr in &w.addresses {
            self.by_addr.insert(net_addr(&w.network, *addr), w.clone());
        }
        for svc in w.services.keys() {
            self.endpoints
                .entry(svc.clone())
                .or_default()
                .insert(w.uid.clone(), w.clone());
        }
        let name = (w.namespace.clone(), w.name.clone());
        self.by_name.insert(name, w.clone());
        let uid = w.uid.clone();
        self.workloads.insert(uid.clone(), w);
        uid
    }

    /// Removes a workload; returns it if it was present.
    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads.remove(uid)?;
        let name = (old.namespace.clone(), old.name.clone());
        if self.by_name.get(&name).is_some_and(|w| *w.uid == *uid) {
            self.by_name.remove(&name);
        }
        for addr in &old.addresses {
            let key = net_addr(&old.network, *addr);
            if self.by_addr.get(&key).is_some_and(|w| *w.uid == *uid) {
                self.by_addr.remove(&key);
            }
        }
        for svc in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(svc) {
                set.remove(uid);
                if set.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        Some(old)
    }

    /// Adds or replaces a service (keyed by `ns/hostname`); returns the key.
    pub fn insert_service(&mut self, s: Service) -> Arc<str> {
        let key: Arc<str> = Arc::from(s.key());
        self.remove_service(&key);
        let s = Arc::new(s);
        for vip in &s.vips {
            self.by_vip.insert(vip.clone(), s.clone());
        }
        self.services.insert(key.clone(), s);
        key
    }

    /// Removes a service; returns it if it was present.
    pub fn remove_service(&mut self, key: &str) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        for vip in &old.vips {
            if self.by_vip.get(vip).is_some_and(|s| Arc::ptr_eq(s, &old)) {
                self.by_vip.remove(vip);
            }
        }
        Some(old)
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// The workload named `name` in `namespace` (a pod name is unique in its namespace).
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        self.by_name
            .get(&(Arc::from(namespace), Arc::from(name)))
            .cloned()
    }

    /// The workload that owns `ip` on `network`.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        self.by_addr.get(&net_addr(network, ip)).cloned()
    }

    /// The service with this `ns/hostname` key.
    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The service whose VIP is `ip` on `network`.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<Arc<Service>> {
        self.by_vip.get(&net_addr(network, ip)).cloned()
    }

    /// The workloads backing a service, in uid order.
    pub fn endpoints(&self, service_key: &str) -> Vec<Arc<Workload>> {
        self.endpoints
            .get(service_key)
            .map(|eps| eps.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every workload scheduled on `node`.
    pub fn workloads_on_node(&self, node: &str) -> Vec<Arc<Workload>> {
        self.workloads
            .values()
            .filter(|w| *w.node == *node)
            .cloned()
            .collect()
    }

    /// Every workload, in uid order.
    pub fn workloads(&self) -> Vec<Arc<Workload>> {
        self.workloads.values().cloned().collect()
    }

    /// Every service, in key order.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.services.values().cloned().collect()
    }

    /// Adds or replaces an authorization policy (keyed by `namespace/name`).
    pub fn insert_policy(&mut self, p: policy::Policy) {
        self.policies.insert(p);
    }

    /// Removes a policy; returns it if it was present.
    pub fn remove_policy(&mut self, key: &str) -> Option<policy::PolicyRef> {
        self.policies.remove(key)
    }

    /// The policy with this `namespace/name` key.
    pub fn policy(&self, key: &str) -> Option<policy::PolicyRef> {
        self.policies.get(key).cloned()
    }

    /// Every policy, in key order.
    pub fn policies(&self) -> Vec<policy::PolicyRef> {
        self.policies.all()
    }

    /// The policies with their scope indexes (what the authorization evaluator reads).
    pub fn policy_store(&self) -> &policy::PolicyStore {
        &self.policies
    }

    /// Number of workloads and services held.
    pub fn len(&self) -> (usize, usize) {
        (self.workloads.len(), self.services.len())
    }
}

fn net_addr(network: &str, address: IpAddr) -> NetworkAddress {
    NetworkAddress {
        network: network.to_string(),
        address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use local::LocalConfig;

    fn store() -> Store {
        Store::from_local(
            LocalConfig::parse(
                r#"
workloads:
- {uid: a, name: a, namespace: default, workloadIps: [10.0.0.1], protocol: HBONE, node: n1,
   services: {default/echo.default.svc.cluster.local: {80: 8080}}}
- {uid: b, name: b, namespace: default, workloadIps: [10.0.0.2], protocol: HBONE, node: n2,
   services: {default/echo.default.svc.cluster.local: {80: 9090}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [/10.96.0.1], ports: {80: 8080}}
"#,
            )
            .unwrap(),
        )
    }

    #[test]
    fn indexes_by_ip_vip_and_endpoints() {
        let s = store();
        let ip = |v: &str| v.parse::<IpAddr>().unwrap();
        assert_eq!(&*s.workload_by_ip("", ip("10.0.0.2")).unwrap().uid, "b");
        assert!(s.workload_by_ip("other", ip("10.0.0.2")).is_none());
        let svc = s.service_by_vip("", ip("10.96.0.1")).unwrap();
        let eps: Vec<_> = s
            .endpoints(&svc.key())
            .iter()
            .map(|w| w.uid.to_string())
            .collect();
        assert_eq!(eps, ["a", "b"]);
        assert_eq!(s.workloads_on_node("n1").len(), 1);
        assert_eq!(&*s.workload_by_name("default", "b").unwrap().uid, "b");
        assert!(s.workload_by_name("other", "b").is_none());
    }

    #[test]
    fn replacing_and_removing_keep_indexes_consistent() {
        let mut s = store();
        let ip = |v: &str| v.parse::<IpAddr>().unwrap();
        let mut a = (*s.workload("a").unwrap()).clone();
        a.addresses = vec![ip("10.0.0.9")];
        a.services = Default::default();
        s.insert_workload(a);
        assert!(s.workload_by_ip("", ip("10.0.0.1")).is_none());
        assert_eq!(&*s.workload_by_ip("", ip("10.0.0.9")).unwrap().uid, "a");
        assert_eq!(
            s.endpoints("default/echo.default.svc.cluster.local").len(),
            1
        );
        s.remove_workload("b");
        assert!(s.workload_by_name("default", "b").is_none());
        assert!(
            s.endpoints("default/echo.default.svc.cluster.local")
                .is_empty()
        );
        s.remove_service("default/echo.default.svc.cluster.local");
        assert!(s.service_by_vip("", ip("10.96.0.1")).is_none());
        assert_eq!(s.len(), (1, 0));
    }
}
