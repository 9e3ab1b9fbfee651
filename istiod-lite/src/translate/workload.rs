//! Pod → `istio.workload.Workload`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mesh_core::k8s::ambient::{self, Decision};
use mesh_core::k8s::k8s_openapi::Metadata;
use mesh_core::k8s::k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::k8s::{Namespace, Node, Pod, Snapshot};
use mesh_proto::workload::{
    Locality, NetworkMode, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};

use super::{TranslateConfig, ip_bytes, problem};

/// A translated pod, with what endpoint matching needs.
pub(super) struct PodEntry<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Its labels.
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The workload built so far (`services` and policies are filled in later).
    pub workload: Workload,
}

/// Workloads of every live pod with an IP, in snapshot order.
pub(super) fn translate_pods<'a>(
    snapshot: &'a Snapshot,
    cfg: &TranslateConfig,
    problems: &mut Vec<String>,
) -> Vec<PodEntry<'a>> {
    // One lookup table each instead of a keyed (allocating) snapshot lookup per pod.
    let namespaces: HashMap<&str, &Namespace> = by_name(snapshot.list::<Namespace>());
    let nodes: HashMap<&str, &Node> = by_name(snapshot.list::<Node>());
    let mut out = Vec::new();
    for pod in snapshot.list::<Pod>() {
        if ambient::is_terminated(pod) {
            continue;
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let ips = match ambient::pod_ips(pod) {
            Ok(ips) if ips.is_empty() => continue,
            Ok(ips) => ips,
            Err(bad) => {
                problems.push(problem(
                    "Pod",
                    ns,
                    name,
                    format!("pod IP {bad:?} is not an IP address; pod skipped"),
                ));
                continue;
            }
        };
        let namespace = namespaces.get(ns).copied();
        let mut workload = base_workload(pod, ns, name, cfg);
        workload.addresses = ips.into_iter().map(ip_bytes).collect();
        workload.tunnel_protocol = tunnel(namespace, pod) as i32;
        workload.locality = nodes
            .get(workload.node.as_str())
            .and_then(|node| locality(node));
        out.push(PodEntry {
            pod,
            labels: pod.metadata.labels.as_ref(),
            workload,
        });
    }
    out
}

fn by_name<'a, T>(objects: impl Iterator<Item = &'a Arc<T>>) -> HashMap<&'a str, &'a T>
where
    T: Metadata<Ty = ObjectMeta> + 'a,
{
    objects
        .map(|o| (o.metadata().name.as_deref().unwrap_or_default(), o.as_ref()))
        .collect()
}

fn base_workload(pod: &Pod, ns: &str, name: &str, cfg: &TranslateConfig) -> Workload {
    let spec = pod.spec.as_ref();
    let workload_name = workload_name(pod, name);
    let (canonical_name, canonical_revision) = canonical(pod, &workload_name);
    let host_network = ambient::is_host_network(pod);
    Workload {
        uid: super::workload_uid(cfg, ns, name),
        name: name.to_owned(),
        namespace: ns.to_owned(),
        network: cfg.network.clone(),
        // istiod elides the default trust domain; ztunnel reads "" as cluster.local.
        trust_domain: if cfg.trust_domain == "cluster.local" {
            String::new()
        } else {
            cfg.trust_domain.clone()
        },
        service_account: ambient::service_account(pod).to_owned(),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        canonical_name,
        canonical_revision,
        workload_type: WorkloadType::Pod as i32,
        workload_name,
        status: status(pod) as i32,
        cluster_id: cfg.cluster_id.clone(),
        network_mode: if host_network {
            NetworkMode::HostNetwork
        } else {
            NetworkMode::Standard
        } as i32,
        ..Workload::default()
    }
}

fn tunnel(namespace: Option<&Namespace>, pod: &Pod) -> TunnelProtocol {
    match ambient::decide(namespace, pod) {
        Decision::Enroll => TunnelProtocol::Hbone,
        Decision::Skip(_) => TunnelProtocol::None,
    }
}

// Ready condition True and not being deleted: what Kubernetes endpoints call "ready".
fn status(pod: &Pod) -> WorkloadStatus {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if ready && pod.metadata.deletion_timestamp.is_none() {
        WorkloadStatus::Healthy
    } else {
        WorkloadStatus::Unhealthy
    }
}

fn label<'a>(pod: &'a Pod, keys: &[&str]) -> Option<&'a str> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter()
        .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
        .map(String::as_str)
}

// Istio's canonical service precedence (`pkg/config/labels` CanonicalService).
fn canonical(pod: &Pod, workload_name: &str) -> (String, String) {
    let name = label(
        pod,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(workload_name);
    let revision = label(
        pod,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest");
    (name.to_owned(), revision.to_owned())
}

/// The controller the pod belongs to, as a user names it (Deployment rather than ReplicaSet).
fn workload_name(pod: &Pod, pod_name: &str) -> String {
    let owners = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or(owners.first())
    else {
        return pod_name.to_owned();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = label(pod, &["pod-template-hash"]).unwrap_or_default();
            match owner
                .name
                .strip_suffix(hash)
                .and_then(|n| n.strip_suffix('-'))
            {
                Some(deployment) if !hash.is_empty() => deployment.to_owned(),
                _ => owner.name.clone(),
            }
        }
        // CronJob-created Jobs are named `<cronjob>-<scheduled time>`.
        "Job" => match owner.name.rsplit_once('-') {
            Some((cron, stamp))
                if !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_owned()
            }
            _ => owner.name.clone(),
        },
        _ => owner.name.clone(),
    }
}

fn locality(node: &Node) -> Option<Locality> {
    let labels = node.metadata.labels.as_ref()?;
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let locality = Locality {
        region: get("topology.kubernetes.io/region"),
        zone: get("topology.kubernetes.io/zone"),
        subzone: get("topology.istio.io/subzone"),
    };
    (locality != Locality::default()).then_some(locality)
}
