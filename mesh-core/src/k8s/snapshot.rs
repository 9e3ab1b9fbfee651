//! Immutable, versioned views of the configured objects.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::{Object, ObjectKey, Typed};

/// How one configuration file is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileStatus {
    /// The file.
    pub path: PathBuf,
    /// How many objects from this file are being served (its last good content).
    pub objects: usize,
    /// Why the current content is not being served, if it is not.
    pub error: Option<String>,
    /// Non-fatal findings about the served content (skipped kinds, duplicates).
    pub warnings: Vec<String>,
}

/// One object-level difference between two snapshots.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The object is new.
    Added(Object),
    /// The object changed.
    Updated {
        /// The previous version.
        old: Object,
        /// The current version.
        new: Object,
    },
    /// The object is gone (its last version).
    Deleted(Object),
}

impl Change {
    /// The key of the object that changed.
    pub fn key(&self) -> ObjectKey {
        match self {
            Change::Added(o) | Change::Updated { new: o, .. } | Change::Deleted(o) => o.key(),
        }
    }
}

/// Every configured object at one point in time, plus the health of the source.
///
/// The version increases by one with every published snapshot; it never goes back.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    version: u64,
    objects: BTreeMap<ObjectKey, Object>,
    files: Vec<FileStatus>,
    errors: Vec<String>,
}

impl Snapshot {
    /// A snapshot with `version`, `objects`, per-file status and source-level errors.
    pub fn new(
        version: u64,
        objects: BTreeMap<ObjectKey, Object>,
        files: Vec<FileStatus>,
        errors: Vec<String>,
    ) -> Self {
        Self {
            version,
            objects,
            files,
            errors,
        }
    }

    /// A snapshot holding exactly `objects` (later duplicates win), version 0; for tests and
    /// in-memory sources.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Self {
        let objects = objects.into_iter().map(|o| (o.key(), o)).collect();
        Self::new(0, objects, Vec::new(), Vec::new())
    }

    /// The snapshot's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The object of type `T` in `namespace` (ignored for cluster-scoped kinds) called `name`.
    pub fn get<T: Typed>(&self, namespace: &str, name: &str) -> Option<&Arc<T>> {
        let key = ObjectKey::new(T::KIND, namespace, name);
        self.objects.get(&key).and_then(T::from_object)
    }

    /// Every object of type `T`, ordered by namespace and name.
    pub fn list<T: Typed>(&self) -> impl Iterator<Item = &Arc<T>> {
        self.objects
            .range(ObjectKey::first_of(T::KIND)..)
            .take_while(|(key, _)| key.kind == T::KIND)
            .filter_map(|(_, object)| T::from_object(object))
    }

    /// Every object, ordered by key.
    pub fn objects(&self) -> impl Iterator<Item = (&ObjectKey, &Object)> {
        self.objects.iter()
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether there are no objects.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Per-file status, ordered by path (empty for sources without files).
    pub fn files(&self) -> &[FileStatus] {
        &self.files
    }

    /// Source-level problems (for example an unreadable directory); objects are the last good.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Whether `other` holds exactly the same objects.
    pub fn same_objects(&self, other: &Snapshot) -> bool {
        self.objects == other.objects
    }

    pub(super) fn same_objects_as(&self, objects: &BTreeMap<ObjectKey, Object>) -> bool {
        &self.objects == objects
    }

    /// What changed from `self` to `newer`, ordered by key.
    pub fn diff(&self, newer: &Snapshot) -> Vec<Change> {
        // One merge walk over both key-ordered maps: O(n) comparisons of neighbouring keys rather
        // than a tree lookup per object, and the changes come out in key order.
        let mut changes = Vec::new();
        let (mut old, mut new) = (
            self.objects.iter().peekable(),
            newer.objects.iter().peekable(),
        );
        loop {
            let order = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.cmp(b),
            };
            match order {
                Ordering::Less => {
                    if let Some((_, o)) = old.next() {
                        changes.push(Change::Deleted(o.clone()));
                    }
                }
                Ordering::Greater => {
                    if let Some((_, n)) = new.next() {
                        changes.push(Change::Added(n.clone()));
                    }
                }
                Ordering::Equal => {
                    if let (Some((_, o)), Some((_, n))) = (old.next(), new.next())
                        && !n.ptr_eq(o)
                        && n != o
                    {
                        changes.push(Change::Updated {
                            old: o.clone(),
                            new: n.clone(),
                        });
                    }
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Namespace, Pod, parse_documents};

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::from_objects(parse_documents(text).unwrap().objects)
    }

    const BASE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
";

    #[test]
    fn typed_lookups() {
        let s = snapshot(BASE);
        assert_eq!(s.len(), 4);
        assert!(s.get::<Namespace>("", "a").is_some());
        assert!(s.get::<Namespace>("whatever", "b").is_some());
        assert!(s.get::<Pod>("a", "p1").is_some());
        assert!(s.get::<Pod>("b", "p1").is_none());
        let names: Vec<_> = s
            .list::<Pod>()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["p1", "p2"]);
        assert_eq!(s.list::<Namespace>().count(), 2);
        assert!(Snapshot::default().is_empty());
    }

    #[test]
    fn diff_reports_adds_updates_and_deletes() {
        let old = snapshot(BASE);
        let new = snapshot(
            "\
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {x: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: a}
---
apiVersion: v1
kind: Pod
metadata: {name: p3, namespace: a}
",
        );
        let summary: Vec<String> = old
            .diff(&new)
            .iter()
            .map(|c| match c {
                Change::Added(o) => format!("+{}", o.key()),
                Change::Updated { new, .. } => format!("~{}", new.key()),
                Change::Deleted(o) => format!("-{}", o.key()),
            })
            .collect();
        assert_eq!(
            summary,
            ["~Namespace a", "-Namespace b", "-Pod a/p2", "+Pod a/p3"]
        );
        assert!(old.diff(&old).is_empty());
        assert!(old.same_objects(&snapshot(BASE)));
        assert!(!old.same_objects(&new));
    }
}
