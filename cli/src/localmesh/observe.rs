//! Reading ztunnel's `/config_dump`: what it holds for each pod, and its xDS state.

use std::fmt;

use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use serde_json::Value;

use super::config::{Objects, PlacedPod};

/// Type URLs of the two resource types ztunnel subscribes to.
const TYPES: [(&str, &str); 2] = [
    ("address", ADDRESS_TYPE_URL),
    ("authorization", AUTHORIZATION_TYPE_URL),
];

/// The workload `namespace/name` in a ztunnel `/config_dump`, if it holds one.
pub fn workload<'a>(dump: &'a Value, namespace: &str, name: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["namespace"] == namespace && w["name"] == name)
}

/// How `node`'s ztunnel (its `dump`) differs from what `objects` say about `pods`: each pod's
/// workload must be there with the identity of its service account and HBONE if the objects
/// put it in the mesh, TCP otherwise; pods of this node in the mesh must be enrolled (ZDS).
pub fn unsettled_workloads(
    node: &str,
    dump: &Value,
    pods: &[PlacedPod],
    objects: &Objects,
) -> Vec<String> {
    let mut pending = Vec::new();
    for pod in pods {
        let spec = &pod.spec;
        let ns = spec.namespace();
        let want_protocol = if objects.captures(spec) {
            "HBONE"
        } else {
            "TCP"
        };
        let want_identity = super::identity(ns, objects.service_account(spec));
        match workload(dump, ns, &spec.name) {
            Some(w) if w["protocol"] == want_protocol && w["identity"] == *want_identity => {}
            Some(w) => pending.push(format!(
                "{node} ztunnel: {} is {} {}, want {want_protocol} {want_identity}",
                spec.name, w["protocol"], w["identity"]
            )),
            None => pending.push(format!("{node} ztunnel: no workload {}", spec.name)),
        }
        // Enrolled by the agent (ZDS) under the current service account: a changed account
        // makes the agent re-enroll the pod.
        let account = objects.service_account(spec);
        let enrolled = dump["pods"].as_array().is_some_and(|p| {
            p.iter().any(|p| {
                p["name"] == spec.name.as_str()
                    && p["service_account"] == account
                    && p["state"] == "running"
            })
        });
        if spec.node == node && objects.captures(spec) && !enrolled {
            pending.push(format!("{node} ztunnel: pod {} not enrolled", spec.name));
        }
    }
    pending
}

/// ztunnel's xDS state in brief: connected or not, and per type the resources held and the
/// last ACKed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsSummary {
    /// The ADS server.
    pub address: String,
    /// A stream is open.
    pub connected: bool,
    /// Streams opened since start.
    pub connections: u64,
    /// Per type (`address`, `authorization`): resources held, last response ACKed, its nonce.
    pub types: Vec<(String, usize, bool, String)>,
}

impl XdsSummary {
    /// Reads the `xds` section of a `/config_dump`; `None` when ztunnel runs without xDS.
    pub fn from_dump(dump: &Value) -> Option<Self> {
        let xds = dump.get("xds").filter(|x| !x.is_null())?;
        let types = TYPES
            .iter()
            .map(|(short, url)| {
                let t = &xds["types"][*url];
                let count = t["versions"].as_object().map_or(0, serde_json::Map::len);
                let acked = t["last_acked"].as_bool().unwrap_or(false);
                let nonce = t["last_acked_nonce"].as_str().unwrap_or("-").to_string();
                (short.to_string(), count, acked, nonce)
            })
            .collect();
        Some(Self {
            address: xds["address"].as_str().unwrap_or_default().to_string(),
            connected: xds["connected"].as_bool().unwrap_or(false),
            connections: xds["connections"].as_u64().unwrap_or(0),
            types,
        })
    }

    /// Resources held of type `short` (`address` or `authorization`).
    pub fn count(&self, short: &str) -> usize {
        let found = self.types.iter().find(|t| t.0 == short);
        found.map_or(0, |t| t.1)
    }

    /// Every type's last response was ACKed.
    pub fn all_acked(&self) -> bool {
        self.types.iter().all(|t| t.2)
    }
}

impl fmt::Display for XdsSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.connected {
            "connected"
        } else {
            "DISCONNECTED"
        };
        write!(
            f,
            "xds {} {state} (streams {})",
            self.address, self.connections
        )?;
        for (short, count, acked, nonce) in &self.types {
            let ack = if *acked { "ACKed" } else { "NACKed" };
            write!(f, "; {short}: {count} resources, last {ack} nonce {nonce}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;
    use crate::localmesh::config::PodSpec;

    fn pod(name: &str, node: &str) -> PlacedPod {
        PlacedPod {
            spec: PodSpec::new(name, node, "sa", true),
            ip: Ipv4Addr::new(10, 100, 1, 11),
            netns: name.into(),
        }
    }

    fn dump(protocol: &str, identity: &str, pods: &[&str]) -> Value {
        json!({
            "workloads": [{"name": "a", "namespace": "demo", "protocol": protocol,
                           "identity": identity}],
            "pods": pods.iter().map(|p| json!({"name": p, "service_account": "sa",
                                               "state": "running"})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn settled_means_right_protocol_identity_and_enrollment() {
        let pods = [pod("a", "n1")];
        let id = "spiffe://cluster.local/ns/demo/sa/sa";
        let mut objects = Objects::default();
        assert!(unsettled_workloads("n1", &dump("HBONE", id, &["a"]), &pods, &objects).is_empty());
        // Another node does not enroll it.
        assert!(unsettled_workloads("n2", &dump("HBONE", id, &[]), &pods, &objects).is_empty());
        let missing = unsettled_workloads("n1", &dump("HBONE", id, &[]), &pods, &objects);
        assert_eq!(missing, ["n1 ztunnel: pod a not enrolled"]);
        let stale = unsettled_workloads("n1", &dump("TCP", id, &["a"]), &pods, &objects);
        assert!(stale[0].contains("want HBONE"), "{stale:?}");
        objects.ambient = false;
        assert!(unsettled_workloads("n1", &dump("TCP", id, &[]), &pods, &objects).is_empty());
        objects.ambient = true;
        objects.service_accounts.insert("a".into(), "x".into());
        let wrong = unsettled_workloads("n1", &dump("HBONE", id, &["a"]), &pods, &objects);
        assert!(wrong[0].contains("sa/x"), "{wrong:?}");
        // The ZDS entry still has the old account: not re-enrolled yet.
        assert_eq!(wrong[1], "n1 ztunnel: pod a not enrolled");
        let none = unsettled_workloads("n1", &json!({}), &pods, &objects);
        assert_eq!(none[0], "n1 ztunnel: no workload a");
    }

    #[test]
    fn xds_summary_reads_the_dump() {
        assert_eq!(XdsSummary::from_dump(&json!({"xds": null})), None);
        let dump = json!({"xds": {
        "address": "https://x:15012", "connected": true, "connections": 1,
        "types": {
            TYPES[0].1: {"versions": {"a": "1", "b": "2"}, "last_acked": true,
                         "last_acked_nonce": "n7"},
            TYPES[1].1: {"versions": {}, "last_acked": true, "last_acked_nonce": "n8"},
        }}});
        let s = XdsSummary::from_dump(&dump).unwrap();
        assert_eq!((s.count("address"), s.count("authorization")), (2, 0));
        assert!(s.all_acked() && s.connected);
        assert_eq!(
            s.to_string(),
            "xds https://x:15012 connected (streams 1); address: 2 resources, last ACKed \
             nonce n7; authorization: 0 resources, last ACKed nonce n8"
        );
    }
}
