//! One stream's state for one type URL: what the proxy asked for, what it holds, and the single
//! response that may be in flight. Pure (no I/O), so the delta rules are unit-tested directly.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use mesh_proto::discovery::DeltaDiscoveryRequest;
use tokio::time::Instant;

use super::resources::{Resource, TypeResources, same};

// The wildcard name of delta xDS.
const WILDCARD: &str = "*";

/// What a proxy holds for one name, as far as the server knows.
#[derive(Debug, Clone)]
enum Held {
    /// Sent on this stream.
    Sent(Arc<Resource>),
    /// Claimed in `initial_resource_versions`.
    Claimed(String),
}

impl Held {
    fn is(&self, r: &Arc<Resource>) -> bool {
        match self {
            Self::Sent(sent) => same(sent, r),
            Self::Claimed(version) => *version == r.version,
        }
    }
}

/// Which names may differ from what the proxy holds.
#[derive(Debug, Default)]
enum Dirty {
    #[default]
    Clean,
    Names(BTreeSet<String>),
    All,
}

impl Dirty {
    fn add(&mut self, names: &BTreeSet<String>) {
        match self {
            Self::All => {}
            Self::Clean => *self = Self::Names(names.clone()),
            Self::Names(mine) => mine.extend(names.iter().cloned()),
        }
    }
}

/// The response waiting for its ACK.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Its nonce.
    pub nonce: String,
    /// When it was queued.
    pub sent_at: Instant,
}

/// A computed response body.
#[derive(Debug, Default)]
pub(crate) struct Update {
    /// Added or changed resources, by name.
    pub resources: Vec<Arc<Resource>>,
    /// Names the proxy must drop.
    pub removed: Vec<String>,
    /// The oldest configuration change this response carries.
    pub changed_at: Option<Instant>,
}

/// One type URL on one stream.
#[derive(Debug)]
pub(crate) struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    held: HashMap<String, Held>,
    pending: Option<Pending>,
    dirty: Dirty,
    // Names subscribed explicitly that must be answered even if they do not exist.
    announce: BTreeSet<String>,
    // A response is owed even when it would be empty (new subscriptions).
    owed: bool,
    changed_at: Option<Instant>,
}

impl Subscription {
    /// Starts from the first request of this type on the stream.
    pub fn new(first: &DeltaDiscoveryRequest) -> Self {
        let held = first
            .initial_resource_versions
            .iter()
            .map(|(name, version)| (name.clone(), Held::Claimed(version.clone())))
            .collect();
        let mut sub = Self {
            // An empty first subscribe list is the legacy wildcard.
            wildcard: first.resource_names_subscribe.is_empty(),
            names: BTreeSet::new(),
            held,
            pending: None,
            dirty: Dirty::All,
            announce: BTreeSet::new(),
            owed: true,
            changed_at: None,
        };
        sub.change_names(
            &first.resource_names_subscribe,
            &first.resource_names_unsubscribe,
        );
        sub.dirty = Dirty::All;
        sub.owed = true;
        sub
    }

    /// Applies a later request's subscribe/unsubscribe lists; returns whether anything changed.
    pub fn change_names(&mut self, subscribe: &[String], unsubscribe: &[String]) -> bool {
        let mut changed = false;
        for name in subscribe {
            changed |= self.subscribe(name);
        }
        for name in unsubscribe {
            changed |= self.unsubscribe(name);
        }
        changed
    }

    fn subscribe(&mut self, name: &str) -> bool {
        if name == WILDCARD {
            if self.wildcard {
                return false;
            }
            self.wildcard = true;
            self.dirty = Dirty::All;
        } else {
            if !self.names.insert(name.to_owned()) {
                return false;
            }
            let one = BTreeSet::from([name.to_owned()]);
            self.dirty.add(&one);
            self.announce.insert(name.to_owned());
        }
        self.owed = true;
        true
    }

    fn unsubscribe(&mut self, name: &str) -> bool {
        // The proxy drops what it unsubscribes from itself, so nothing is sent for it.
        if name == WILDCARD {
            if !self.wildcard {
                return false;
            }
            self.wildcard = false;
            let names = &self.names;
            self.held.retain(|n, _| names.contains(n));
            return true;
        }
        if !self.names.remove(name) {
            return false;
        }
        self.announce.remove(name);
        if !self.wildcard {
            self.held.remove(name);
        }
        true
    }

    fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Records a published change: `names` changed (all of them may have when `None`).
    pub fn changed(&mut self, names: Option<&BTreeSet<String>>, at: Instant) {
        match names {
            Some(names) => self.dirty.add(names),
            None => self.dirty = Dirty::All,
        }
        self.changed_at = Some(self.changed_at.map_or(at, |old| old.min(at)));
    }

    /// The outstanding response, if any.
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// Clears the outstanding response if `nonce` is its nonce; `false` for a stale nonce.
    pub fn answer(&mut self, nonce: &str) -> bool {
        if self.pending.as_ref().is_some_and(|p| p.nonce == nonce) {
            self.pending = None;
            return true;
        }
        false
    }

    /// The next response against `current`, unless one is in flight or there is nothing to say.
    /// The caller must then call [`Self::sent`].
    pub fn next_update(&mut self, current: Option<&TypeResources>) -> Option<Update> {
        if self.pending.is_some() {
            return None;
        }
        let empty = TypeResources::new();
        let current = current.unwrap_or(&empty);
        let mut update = Update::default();
        match std::mem::take(&mut self.dirty) {
            Dirty::Clean => {}
            Dirty::All => self.diff_all(current, &mut update),
            Dirty::Names(names) => {
                for name in &names {
                    self.diff_one(name, current, &mut update);
                }
            }
        }
        for name in std::mem::take(&mut self.announce) {
            if !current.contains_key(&name) && !update.removed.contains(&name) {
                update.removed.push(name);
            }
        }
        let owed = std::mem::take(&mut self.owed);
        let changed_at = self.changed_at.take();
        if update.resources.is_empty() && update.removed.is_empty() && !owed {
            return None;
        }
        update.changed_at = changed_at;
        Some(update)
    }

    fn diff_all(&mut self, current: &TypeResources, update: &mut Update) {
        let (wildcard, names) = (self.wildcard, &self.names);
        let wanted = current
            .iter()
            .filter(|(n, _)| wildcard || names.contains(*n));
        for (name, r) in wanted {
            if !self.held.get(name).is_some_and(|h| h.is(r)) {
                self.held.insert(name.clone(), Held::Sent(r.clone()));
                update.resources.push(r.clone());
            }
        }
        let gone: Vec<String> = (self.held.keys())
            .filter(|n| !self.wants(n) || !current.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.held.remove(&name);
            update.removed.push(name);
        }
        update.removed.sort_unstable();
    }

    fn diff_one(&mut self, name: &str, current: &TypeResources, update: &mut Update) {
        match current.get(name).filter(|_| self.wants(name)) {
            Some(r) => {
                if !self.held.get(name).is_some_and(|h| h.is(r)) {
                    self.held.insert(name.to_owned(), Held::Sent(r.clone()));
                    update.resources.push(r.clone());
                }
            }
            None => {
                if self.held.remove(name).is_some() {
                    update.removed.push(name.to_owned());
                }
            }
        }
    }

    /// Records that the update was queued under `nonce`.
    pub fn sent(&mut self, nonce: String, at: Instant) {
        self.pending = Some(Pending { nonce, sent_at: at });
    }

    /// How many names the proxy holds (for logs).
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::any::AUTHORIZATION_TYPE_URL;
    use prost_types::Any;

    use super::*;
    use crate::xds::ResourceSet;

    fn body(v: u8) -> Any {
        Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![v],
        }
    }

    fn set(entries: &[(&str, u8)]) -> ResourceSet {
        let mut set = ResourceSet::new();
        for (name, v) in entries {
            set.insert(AUTHORIZATION_TYPE_URL, name.to_string(), body(*v));
        }
        set
    }

    fn wildcard() -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            ..Default::default()
        }
    }

    fn names(update: &Update) -> (Vec<&str>, Vec<&str>) {
        let added = update.resources.iter().map(|r| r.name.as_str()).collect();
        let removed = update.removed.iter().map(String::as_str).collect();
        (added, removed)
    }

    fn next(sub: &mut Subscription, set: &ResourceSet) -> Option<Update> {
        let update = sub.next_update(set.get(AUTHORIZATION_TYPE_URL));
        if update.is_some() {
            sub.sent("n".into(), Instant::now());
            assert!(sub.answer("n"));
        }
        update
    }

    #[test]
    fn first_response_is_owed_even_when_empty() {
        let mut sub = Subscription::new(&wildcard());
        let update = next(&mut sub, &ResourceSet::new()).expect("owed");
        assert_eq!(names(&update), (vec![], vec![]));
        assert!(next(&mut sub, &ResourceSet::new()).is_none(), "then silent");
    }

    #[test]
    fn only_changed_names_and_removals_are_sent() {
        let mut sub = Subscription::new(&wildcard());
        let v1 = set(&[("a", 1), ("b", 1), ("c", 1)]);
        assert_eq!(names(&next(&mut sub, &v1).unwrap()).0, ["a", "b", "c"]);
        let v2 = set(&[("a", 1), ("b", 2), ("d", 1)]);
        sub.changed(
            v2.changes_since(&v1).get(AUTHORIZATION_TYPE_URL),
            Instant::now(),
        );
        let update = next(&mut sub, &v2).unwrap();
        assert_eq!(names(&update), (vec!["b", "d"], vec!["c"]));
        assert!(update.changed_at.is_some());
        // A full recomputation finds nothing more to do.
        sub.changed(None, Instant::now());
        assert!(next(&mut sub, &v2).is_none());
    }

    #[test]
    fn initial_resource_versions_skip_held_and_remove_stale() {
        let v1 = set(&[("a", 1), ("b", 2)]);
        let mut first = wildcard();
        first.initial_resource_versions = [
            (
                "a".to_string(),
                v1.resource(AUTHORIZATION_TYPE_URL, "a")
                    .unwrap()
                    .version
                    .clone(),
            ),
            ("b".to_string(), "old".to_string()),
            ("gone".to_string(), "x".to_string()),
        ]
        .into();
        let mut sub = Subscription::new(&first);
        assert_eq!(
            names(&next(&mut sub, &v1).unwrap()),
            (vec!["b"], vec!["gone"])
        );
    }

    #[test]
    fn one_response_in_flight_and_changes_coalesce_until_answered() {
        let mut sub = Subscription::new(&wildcard());
        let v1 = set(&[("a", 1)]);
        assert!(sub.next_update(v1.get(AUTHORIZATION_TYPE_URL)).is_some());
        sub.sent("n1".into(), Instant::now());
        let v2 = set(&[("a", 2)]);
        sub.changed(
            v2.changes_since(&v1).get(AUTHORIZATION_TYPE_URL),
            Instant::now(),
        );
        assert!(
            sub.next_update(v2.get(AUTHORIZATION_TYPE_URL)).is_none(),
            "in flight"
        );
        let v3 = set(&[("a", 2), ("b", 1)]);
        sub.changed(
            v3.changes_since(&v2).get(AUTHORIZATION_TYPE_URL),
            Instant::now(),
        );
        assert!(!sub.answer("stale"), "a stale nonce does not clear it");
        assert!(sub.answer("n1"));
        let update = next(&mut sub, &v3).unwrap();
        assert_eq!(names(&update).0, ["a", "b"]);
    }

    #[test]
    fn nacked_versions_are_not_resent() {
        let mut sub = Subscription::new(&wildcard());
        let v1 = set(&[("a", 1)]);
        next(&mut sub, &v1).unwrap(); // answered, as a NACK would be
        sub.changed(None, Instant::now());
        assert!(next(&mut sub, &v1).is_none());
    }

    #[test]
    fn explicit_names_and_wildcard_changes() {
        let mut first = wildcard();
        first.resource_names_subscribe = vec!["a".into(), "missing".into()];
        let mut sub = Subscription::new(&first);
        let v1 = set(&[("a", 1), ("b", 1)]);
        // Not a wildcard: only "a", and "missing" is announced as absent.
        assert_eq!(
            names(&next(&mut sub, &v1).unwrap()),
            (vec!["a"], vec!["missing"])
        );
        assert!(!sub.change_names(&["a".into()], &[]), "already subscribed");
        assert!(sub.change_names(&["*".into()], &[]));
        assert_eq!(names(&next(&mut sub, &v1).unwrap()).0, ["b"]);
        // Unsubscribing the wildcard forgets everything not named, without a response.
        assert!(sub.change_names(&[], &["*".into()]));
        assert_eq!(sub.held(), 1);
        assert!(next(&mut sub, &v1).is_none());
        assert!(sub.change_names(&[], &["a".into()]));
        assert_eq!(sub.held(), 0);
    }

    #[test]
    fn ztunnel_on_demand_first_request_subscribes_to_nothing() {
        let mut first = wildcard();
        first.resource_names_subscribe = vec!["*".into()];
        first.resource_names_unsubscribe = vec!["*".into()];
        let mut sub = Subscription::new(&first);
        let v1 = set(&[("a", 1)]);
        assert_eq!(names(&next(&mut sub, &v1).unwrap()), (vec![], vec![]));
    }
}
