//! The fake API server's state: objects per resource, a global resource version, a bounded
//! event history (the "watch cache"), and the list / watch queries the HTTP layer serves.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde_json::{Value, json};

use super::{FakeApiError, FakeResource};
use crate::k8s::DEFAULT_NAMESPACE;

/// A watch event type as the API server writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in a resource's history.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: EventType,
    object: Value,
    // The object before a modification: selector transitions turn a MODIFIED into an ADDED or a
    // DELETED for watchers whose selector the object starts or stops matching, as the API
    // server does.
    previous: Option<Value>,
}

#[derive(Debug)]
struct Resource {
    spec: FakeResource,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Event>,
}

/// An HTTP-level failure: status code, `Status.reason` and message.
#[derive(Debug)]
pub(super) struct Failure {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `v1 Status` body the API server sends for this failure.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

/// Which objects a list or watch request is about.
#[derive(Clone, Debug)]
pub(super) struct Query {
    pub resource: usize,
    pub namespace: Option<String>,
    pub fields: Vec<Requirement>,
    pub labels: Vec<Requirement>,
}

/// One `key=value` / `key!=value` selector term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Requirement {
    key: String,
    equal: bool,
    value: String,
}

/// Parses an equality-based selector (`a=b,c!=d`); set-based terms are rejected.
pub(super) fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let mut terms = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (key, equal, value) = if let Some((k, v)) = term.split_once("!=") {
            (k, false, v)
        } else if let Some((k, v)) = term.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, true, v)
        } else {
            return Err(format!(
                "unsupported selector term {term:?} (the fake API server supports only =, == and !=)"
            ));
        };
        terms.push(Requirement {
            key: key.trim().to_owned(),
            equal,
            value: value.trim().to_owned(),
        });
    }
    Ok(terms)
}

fn matches(query: &Query, object: &Value) -> bool {
    let meta = &object["metadata"];
    if let Some(ns) = &query.namespace
        && meta["namespace"].as_str() != Some(ns.as_str())
    {
        return false;
    }
    let field = |key: &str| {
        let mut value = object;
        for part in key.split('.') {
            value = &value[part];
        }
        value.as_str().map(str::to_owned).unwrap_or_default()
    };
    let label = |key: &str| meta["labels"][key].as_str().unwrap_or_default().to_owned();
    let holds = |r: &Requirement, actual: String| (actual == r.value) == r.equal;
    query.fields.iter().all(|r| holds(r, field(&r.key)))
        && query.labels.iter().all(|r| holds(r, label(&r.key)))
}

/// Everything the fake API server knows. Tests reach it through
/// [`FakeApiServer`](super::FakeApiServer), or directly inside
/// [`FakeApiServer::during_outage`](super::FakeApiServer::during_outage).
#[derive(Debug, Default)]
pub struct FakeStore {
    rv: u64,
    // Watches (and continue tokens) from before this resource version get 410 Gone.
    oldest_rv: u64,
    // Bumped by an outage: every watch opened before it ends without delivering anything more.
    pub(super) epoch: u64,
    resources: Vec<Resource>,
    pub(super) requests: Vec<String>,
}

impl FakeStore {
    /// Serves `resource` from now on (registering it again changes nothing).
    pub fn register(&mut self, resource: FakeResource) {
        if !self.resources.iter().any(|r| r.spec == resource) {
            self.resources.push(Resource {
                spec: resource,
                objects: BTreeMap::new(),
                history: Vec::new(),
            });
        }
    }

    /// The current (latest) resource version.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Creates or replaces an object (a JSON object with `apiVersion`, `kind` and
    /// `metadata.name`). Sets `metadata.resourceVersion`, and `metadata.uid` when missing.
    /// Returns the new resource version.
    pub fn apply(&mut self, mut object: Value) -> Result<u64, FakeApiError> {
        let index = self.resource_of(&object)?;
        let namespaced = self.resources[index].spec.namespaced;
        let meta = object
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or(FakeApiError::Invalid("object without metadata"))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => return Err(FakeApiError::Invalid("object without metadata.name")),
        };
        let namespace = if namespaced {
            let ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            let ns = if ns.is_empty() { DEFAULT_NAMESPACE } else { ns }.to_owned();
            meta.insert("namespace".into(), ns.clone().into());
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        self.rv += 1;
        let rv = self.rv;
        meta.insert("resourceVersion".into(), rv.to_string().into());
        let uid = format!("fake-uid-{}-{name}-{rv}", namespace);
        meta.entry("uid").or_insert(uid.into());
        let resource = &mut self.resources[index];
        let previous = resource.objects.insert((namespace, name), object.clone());
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        resource.history.push(Event {
            rv,
            kind,
            object,
            previous,
        });
        Ok(rv)
    }

    /// Deletes an object; `namespace` is ignored for cluster-scoped resources. Returns the new
    /// resource version.
    pub fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<u64, FakeApiError> {
        let index = self.resource_by_type(api_version, kind)?;
        let resource = &mut self.resources[index];
        let namespace = if resource.spec.namespaced {
            namespace
        } else {
            ""
        };
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut object) = resource.objects.remove(&key) else {
            return Err(FakeApiError::NotFound(format!("{kind} {namespace}/{name}")));
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        resource.history.push(Event {
            rv: self.rv,
            kind: EventType::Deleted,
            object,
            previous: None,
        });
        Ok(self.rv)
    }

    /// Forgets all history up to now, as etcd compaction does: watches and continue tokens from
    /// an older resource version get 410 Gone and must relist.
    pub fn compact(&mut self) {
        self.oldest_rv = self.rv;
        for resource in &mut self.resources {
            resource.history.clear();
        }
    }

    fn resource_of(&self, object: &Value) -> Result<usize, FakeApiError> {
        let field = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or("");
        self.resource_by_type(field("apiVersion"), field("kind"))
    }

    fn resource_by_type(&self, api_version: &str, kind: &str) -> Result<usize, FakeApiError> {
        self.resources
            .iter()
            .position(|r| r.spec.api_version() == api_version && r.spec.kind == kind)
            .ok_or_else(|| FakeApiError::NotRegistered(format!("{kind} ({api_version})")))
    }

    /// The resource served at `group`/`version`/`plural`, if registered.
    pub(super) fn find(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.resources.iter().position(|r| {
            r.spec.group == group && r.spec.version == version && r.spec.plural == plural
        })
    }

    /// Whether resource `index` is namespaced.
    pub(super) fn namespaced(&self, index: usize) -> bool {
        self.resources[index].spec.namespaced
    }

    /// One page of a list: at most `limit` objects after the `continue` token's position.
    pub(super) fn list(
        &self,
        query: &Query,
        limit: Option<usize>,
        token: Option<&str>,
    ) -> Result<Value, Failure> {
        let resource = &self.resources[query.resource];
        let (rv, after) = match token {
            Some(token) => self.parse_continue(token)?,
            None => (self.rv, None),
        };
        let mut items = Vec::new();
        let mut next = None;
        let mut last_key = None;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        for (key, object) in resource.objects.range((start, Bound::Unbounded)) {
            if !matches(query, object) {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() >= l) {
                // The token names the last object served; the next page starts after it.
                next = last_key.map(|(ns, name): &(String, String)| format!("{rv}/{ns}/{name}"));
                break;
            }
            items.push(object.clone());
            last_key = Some(key);
        }
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if let Some(next) = next {
            metadata["continue"] = next.into();
        }
        Ok(json!({
            "kind": format!("{}List", resource.spec.kind),
            "apiVersion": resource.spec.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    // Continue tokens are `<list rv>/<namespace>/<name>`; this fake serves later pages from the
    // current objects (a real server reads them at the first page's revision).
    fn parse_continue(&self, token: &str) -> Result<(u64, Option<(String, String)>), Failure> {
        let bad = || {
            Failure::new(
                400,
                "BadRequest",
                format!("invalid continue token {token:?}"),
            )
        };
        let mut parts = token.splitn(3, '/');
        let rv: u64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let ns = parts.next().ok_or_else(bad)?.to_owned();
        let name = parts.next().ok_or_else(bad)?.to_owned();
        if rv < self.oldest_rv {
            return Err(Failure::new(
                410,
                "Expired",
                format!(
                    "the provided continue parameter is too old (resource version {rv} was compacted); relist"
                ),
            ));
        }
        Ok((rv, Some((ns, name))))
    }

    /// Watch event lines for `query` after resource version `after`, and the resource version
    /// they bring the watcher up to. `Err` holds the ERROR event line for an expired version.
    pub(super) fn watch_batch(
        &self,
        query: &Query,
        after: u64,
    ) -> Result<(Vec<Value>, u64), Value> {
        if after < self.oldest_rv {
            let gone = Failure::new(
                410,
                "Expired",
                format!("too old resource version: {after} ({})", self.oldest_rv),
            );
            return Err(json!({ "type": "ERROR", "object": gone.status() }));
        }
        let resource = &self.resources[query.resource];
        let lines = resource
            .history
            .iter()
            .filter(|e| e.rv > after)
            .filter_map(|e| event_line(query, e))
            .collect();
        Ok((lines, self.rv))
    }

    /// Synthetic ADDED lines for every current object (a watch without a resource version).
    pub(super) fn current_as_added(&self, query: &Query) -> (Vec<Value>, u64) {
        let resource = &self.resources[query.resource];
        let lines = resource
            .objects
            .values()
            .filter(|o| matches(query, o))
            .map(|o| json!({ "type": "ADDED", "object": o }))
            .collect();
        (lines, self.rv)
    }

    /// A BOOKMARK line at resource version `rv`.
    pub(super) fn bookmark(&self, query: &Query, rv: u64) -> Value {
        let spec = &self.resources[query.resource].spec;
        json!({ "type": "BOOKMARK", "object": {
            "kind": spec.kind, "apiVersion": spec.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
        }})
    }
}

fn event_line(query: &Query, event: &Event) -> Option<Value> {
    let now = matches(query, &event.object);
    let before = event.previous.as_ref().is_some_and(|p| matches(query, p));
    let kind = match (event.kind, before, now) {
        (EventType::Modified, true, true) => EventType::Modified,
        (EventType::Modified, false, true) => EventType::Added,
        (EventType::Modified, true, false) => EventType::Deleted,
        (EventType::Added | EventType::Deleted, _, true) => event.kind,
        _ => return None,
    };
    Some(json!({ "type": kind.as_str(), "object": event.object }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "a"}, "spec": {"nodeName": node}})
    }

    fn store() -> FakeStore {
        let mut store = FakeStore::default();
        store.register(FakeResource::new("", "v1", "Pod", "pods", true));
        store
    }

    fn query(fields: &str) -> Query {
        Query {
            resource: 0,
            namespace: None,
            fields: parse_selector(fields).unwrap(),
            labels: Vec::new(),
        }
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let mut s = store();
        s.apply(pod("p", "n2")).unwrap();
        s.apply(pod("p", "n1")).unwrap();
        s.apply(pod("p", "n1")).unwrap();
        s.apply(pod("p", "n2")).unwrap();
        s.delete("v1", "Pod", "a", "p").unwrap();
        let (lines, upto) = s.watch_batch(&query("spec.nodeName=n1"), 0).unwrap();
        let types: Vec<_> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["ADDED", "MODIFIED", "DELETED"]);
        assert_eq!(upto, 5);
    }

    #[test]
    fn bad_input_is_rejected_with_reasons() {
        let mut s = store();
        let err = s.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}));
        assert_eq!(
            err.unwrap_err().to_string(),
            "invalid object: object without metadata.name"
        );
        let err = s.apply(json!({"apiVersion": "v9", "kind": "Pod", "metadata": {"name": "x"}}));
        assert!(err.unwrap_err().to_string().contains("Pod (v9)"));
        assert!(s.delete("v1", "Pod", "a", "nope").is_err());
        assert!(
            parse_selector("a in (b)")
                .unwrap_err()
                .contains("unsupported selector")
        );
        assert!(s.list(&query(""), None, Some("x")).is_err());
    }

    #[test]
    fn compaction_expires_old_versions() {
        let mut s = store();
        s.apply(pod("p", "n1")).unwrap();
        s.apply(pod("q", "n1")).unwrap();
        s.compact();
        let gone = s.watch_batch(&query(""), 1).unwrap_err();
        assert_eq!(gone["object"]["code"], 410);
        assert!(s.watch_batch(&query(""), 2).unwrap().0.is_empty());
        let err = s.list(&query(""), Some(1), Some("1/a/p")).unwrap_err();
        assert_eq!(err.code, 410);
    }
}
