//! Pods indexed by namespace and label, so selecting endpoints costs the size of the smallest
//! matching label set instead of a scan of every pod.

use std::collections::{BTreeMap, HashMap};

use super::selector_matches;
use super::workload::PodEntry;

#[derive(Default)]
struct NamespacePods<'a> {
    all: Vec<usize>,
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

/// Positions in the pod list, by namespace and by `(label key, value)`.
pub(super) struct PodIndex<'a> {
    namespaces: HashMap<&'a str, NamespacePods<'a>>,
}

impl<'a> PodIndex<'a> {
    /// Indexes `pods`; positions refer to that slice.
    pub(super) fn new(pods: &[PodEntry<'a>]) -> Self {
        let mut namespaces: HashMap<&'a str, NamespacePods<'a>> = HashMap::new();
        for (i, entry) in pods.iter().enumerate() {
            let ns = entry.pod.metadata.namespace.as_deref().unwrap_or_default();
            let slot = namespaces.entry(ns).or_default();
            slot.all.push(i);
            for (k, v) in entry.labels.into_iter().flatten() {
                slot.by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        Self { namespaces }
    }

    /// Positions of the pods in `namespace` carrying every label of `selector`, in order.
    /// An empty selector selects every pod of the namespace.
    pub(super) fn select(
        &self,
        pods: &[PodEntry<'a>],
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<usize> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        let mut smallest: &[usize] = &ns.all;
        for (k, v) in selector {
            match ns.by_label.get(&(k.as_str(), v.as_str())) {
                Some(list) if list.len() < smallest.len() => smallest = list,
                Some(_) => {}
                None => return Vec::new(),
            }
        }
        smallest
            .iter()
            .copied()
            .filter(|&i| selector_matches(selector, pods[i].labels))
            .collect()
    }
}
