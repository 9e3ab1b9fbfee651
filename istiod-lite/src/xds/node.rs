//! Who is on the other end of a stream: the xDS `Node` of the first request (§5.2).
//!
//! Istio's id is `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` (ztunnel:
//! `ztunnel~10.0.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local`); the metadata
//! Struct carries `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID`, `ISTIO_VERSION`.

use std::net::IpAddr;

use mesh_proto::discovery::Node;
use prost_types::value::Kind;

/// Why a `Node` is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    /// The id does not have Istio's four `~`-separated parts.
    #[error("node id {id:?} is not \"<type>~<ip>~<pod>.<namespace>~<domain>\": {reason}")]
    Id {
        /// The id sent.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A metadata field has the wrong shape.
    #[error("node metadata {key} {reason}")]
    Metadata {
        /// The metadata key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A proxy's parsed identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The raw node id, for logs.
    pub id: String,
    /// Proxy type: `ztunnel`, `sidecar`, `router`, ...
    pub proxy_type: String,
    /// The IP in the id (ztunnel sends `1.1.1.1` when it does not know its own).
    pub ip: IpAddr,
    /// Pod name (from the id, or `NAME`); empty when the proxy does not know it.
    pub pod: String,
    /// Pod namespace (from the id, or `NAMESPACE`); empty when the proxy does not know it.
    pub namespace: String,
    /// Kubernetes node name (`NODE_NAME`).
    pub node_name: Option<String>,
    /// Cluster (`CLUSTER_ID`).
    pub cluster_id: Option<String>,
    /// Pod IPs (`INSTANCE_IPS`, comma-separated).
    pub instance_ips: Vec<IpAddr>,
    /// Proxy version (`ISTIO_VERSION`).
    pub istio_version: Option<String>,
}

impl NodeInfo {
    /// Parses and cross-checks the id and metadata of `node`.
    pub fn parse(node: &Node) -> Result<Self, NodeError> {
        let mut info = parse_id(&node.id)?;
        let meta = Metadata(node.metadata.as_ref());
        if let Some(name) = meta.string("NAME")? {
            check_same("NAME", name, &mut info.pod)?;
        }
        if let Some(namespace) = meta.string("NAMESPACE")? {
            check_same("NAMESPACE", namespace, &mut info.namespace)?;
        }
        info.node_name = meta.string("NODE_NAME")?;
        info.cluster_id = meta.string("CLUSTER_ID")?;
        info.istio_version = meta.string("ISTIO_VERSION")?;
        if let Some(ips) = meta.string("INSTANCE_IPS")? {
            info.instance_ips = parse_ips(&ips)?;
        }
        Ok(info)
    }
}

fn parse_id(id: &str) -> Result<NodeInfo, NodeError> {
    let err = |reason| NodeError::Id {
        id: id.to_owned(),
        reason,
    };
    let parts: Vec<&str> = id.split('~').collect();
    let [proxy_type, ip, pod_ns, _domain] = parts[..] else {
        return Err(err("expected four parts separated by '~'"));
    };
    if proxy_type.is_empty() {
        return Err(err("the proxy type is empty"));
    }
    let ip = ip
        .parse()
        .map_err(|_| err("the second part is not an IP address"))?;
    // Pod names may contain dots, namespaces may not: split at the last one.
    let (pod, namespace) = pod_ns
        .rsplit_once('.')
        .ok_or(err("the third part is not <pod>.<namespace>"))?;
    // Empty parts are allowed: a ztunnel without POD_NAME/POD_NAMESPACE (local development)
    // sends `ztunnel~1.1.1.1~.~.svc.cluster.local`.
    Ok(NodeInfo {
        id: id.to_owned(),
        proxy_type: proxy_type.to_owned(),
        ip,
        pod: pod.to_owned(),
        namespace: namespace.to_owned(),
        node_name: None,
        cluster_id: None,
        instance_ips: Vec::new(),
        istio_version: None,
    })
}

// Disagreeing id and metadata mean a misconfigured proxy; serving it under either name would be
// a guess. Metadata fills in what the id left empty.
fn check_same(key: &'static str, metadata: String, from_id: &mut String) -> Result<(), NodeError> {
    if from_id.is_empty() {
        *from_id = metadata;
        return Ok(());
    }
    if metadata == *from_id {
        return Ok(());
    }
    Err(NodeError::Metadata {
        key,
        reason: format!("is {metadata:?} but the node id says {from_id:?}"),
    })
}

fn parse_ips(value: &str) -> Result<Vec<IpAddr>, NodeError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| NodeError::Metadata {
                key: "INSTANCE_IPS",
                reason: format!("has {s:?}, which is not an IP address"),
            })
        })
        .collect()
}

struct Metadata<'a>(Option<&'a prost_types::Struct>);

impl Metadata<'_> {
    fn string(&self, key: &'static str) -> Result<Option<String>, NodeError> {
        let Some(value) = self.0.and_then(|s| s.fields.get(key)) else {
            return Ok(None);
        };
        match &value.kind {
            Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
            Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
            _ => Err(NodeError::Metadata {
                key,
                reason: "must be a string".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use prost_types::{Struct, Value};

    use super::*;

    const ZTUNNEL_ID: &str =
        "ztunnel~10.0.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local";

    fn node(id: &str, meta: &[(&str, Kind)]) -> Node {
        let fields: BTreeMap<String, Value> = meta
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect();
        Node {
            id: id.into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> Kind {
        Kind::StringValue(v.into())
    }

    #[test]
    fn parses_ztunnel_node() {
        let n = node(
            ZTUNNEL_ID,
            &[
                ("NAME", s("ztunnel-abcde")),
                ("NAMESPACE", s("istio-system")),
                ("INSTANCE_IPS", s("10.0.0.5,fd00::5")),
                ("NODE_NAME", s("node-a")),
                ("CLUSTER_ID", s("Kubernetes")),
                ("OTHER", Kind::BoolValue(true)),
            ],
        );
        let info = NodeInfo::parse(&n).unwrap();
        assert_eq!(info.proxy_type, "ztunnel");
        assert_eq!(info.ip, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(
            (info.pod.as_str(), info.namespace.as_str()),
            ("ztunnel-abcde", "istio-system")
        );
        assert_eq!(info.node_name.as_deref(), Some("node-a"));
        assert_eq!(info.cluster_id.as_deref(), Some("Kubernetes"));
        assert_eq!(info.istio_version, None);
        assert_eq!(info.instance_ips.len(), 2);
        assert_eq!(info.id, ZTUNNEL_ID);
    }

    #[test]
    fn pod_names_with_dots_and_ipv6_and_no_metadata() {
        let n = Node {
            id: "sidecar~fd00::1~web.v1-0.shop~shop.svc.cluster.local".into(),
            ..Default::default()
        };
        let info = NodeInfo::parse(&n).unwrap();
        assert_eq!(
            (info.pod.as_str(), info.namespace.as_str()),
            ("web.v1-0", "shop")
        );
        assert!(info.ip.is_ipv6());
        assert_eq!(info.node_name, None);
    }

    #[test]
    fn rejects_malformed_ids_naming_the_problem() {
        let cases = [
            ("", "four parts"),
            ("ztunnel~1.1.1.1~p.ns", "four parts"),
            ("ztunnel~1.1.1.1~p.ns~d~extra", "four parts"),
            ("~1.1.1.1~p.ns~d", "proxy type is empty"),
            ("ztunnel~not-an-ip~p.ns~d", "not an IP address"),
            ("ztunnel~1.1.1.1~podonly~d", "not <pod>.<namespace>"),
        ];
        for (id, want) in cases {
            let err = NodeInfo::parse(&node(id, &[])).unwrap_err().to_string();
            assert!(err.contains(want), "{id:?}: {err}");
            assert!(err.contains(&format!("{id:?}")), "names the id: {err}");
        }
    }

    #[test]
    fn rejects_bad_or_inconsistent_metadata() {
        let cases: [(&[(&str, Kind)], &str); 4] = [
            (
                &[("NODE_NAME", Kind::NumberValue(1.0))],
                "NODE_NAME must be a string",
            ),
            (
                &[("INSTANCE_IPS", s("10.0.0.5,nope"))],
                "INSTANCE_IPS has \"nope\"",
            ),
            (
                &[("NAMESPACE", s("other"))],
                "NAMESPACE is \"other\" but the node id says \"istio-system\"",
            ),
            (&[("NAME", s("ztunnel-zzz"))], "NAME is \"ztunnel-zzz\""),
        ];
        for (meta, want) in cases {
            let err = NodeInfo::parse(&node(ZTUNNEL_ID, meta))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
        // Empty strings count as unset.
        let info = NodeInfo::parse(&node(ZTUNNEL_ID, &[("NODE_NAME", s(""))])).unwrap();
        assert_eq!(info.node_name, None);
    }

    #[test]
    fn an_unconfigured_ztunnel_is_accepted_and_metadata_fills_gaps() {
        let unknown = "ztunnel~1.1.1.1~.~.svc.cluster.local";
        let info =
            NodeInfo::parse(&node(unknown, &[("NAME", s("")), ("NAMESPACE", s(""))])).unwrap();
        assert_eq!((info.pod.as_str(), info.namespace.as_str()), ("", ""));
        let info = NodeInfo::parse(&node(unknown, &[("NAMESPACE", s("istio-system"))])).unwrap();
        assert_eq!(info.namespace, "istio-system");
    }
}
