//! Multi-document Kubernetes YAML into typed objects.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

use super::{DEFAULT_NAMESPACE, DecodeError, Kind, Object, ObjectKey};

/// Why a YAML text was rejected as a whole. Messages name the document (1-based) and, when
/// known, the object.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The text is not valid YAML (the message carries line and column).
    #[error("document {index}: invalid yaml: {source}")]
    Syntax {
        /// 1-based document number.
        index: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A document is YAML but not a Kubernetes object.
    #[error("document {index}: {reason}")]
    Malformed {
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A document of a known kind does not match that kind's schema.
    #[error("document {index} ({key}): {source}")]
    Decode {
        /// 1-based document number.
        index: usize,
        /// The object the document describes.
        key: ObjectKey,
        /// The decoder's error, with the path of the offending field.
        source: DecodeError,
    },
}

/// The objects of one YAML text, in document order, and non-fatal findings.
#[derive(Debug, Default)]
pub struct ParsedFile {
    /// Objects of understood kinds. A later document with the same key replaces an earlier one.
    pub objects: Vec<Object>,
    /// Things that were skipped or overridden (unknown kinds, duplicates).
    pub warnings: Vec<String>,
}

/// Parses every document of `text` (separated by `---`; a `v1 List` contributes its items).
///
/// Empty documents are ignored. Documents whose `apiVersion`/`kind` we do not understand are
/// skipped with a warning. Any other problem rejects the whole text: callers keep their previous
/// objects rather than act on half a file. Namespaced objects without a namespace get
/// [`DEFAULT_NAMESPACE`].
pub fn parse_documents(text: &str) -> Result<ParsedFile, ParseError> {
    let mut parsed = ParsedFile::default();
    let mut seen: BTreeMap<ObjectKey, usize> = BTreeMap::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let mut value =
            Value::deserialize(document).map_err(|source| ParseError::Syntax { index, source })?;
        // Support `<<: *anchor` merge keys, as kubectl does.
        value
            .apply_merge()
            .map_err(|source| ParseError::Syntax { index, source })?;
        for object in document_objects(index, value, &mut parsed.warnings)? {
            let key = object.key();
            if let Some(earlier) = seen.insert(key.clone(), parsed.objects.len()) {
                parsed.warnings.push(format!(
                    "document {index}: {key} is defined twice; this copy replaces the earlier one"
                ));
                parsed.objects[earlier] = object;
                seen.insert(key, earlier);
            } else {
                parsed.objects.push(object);
            }
        }
    }
    Ok(parsed)
}

/// The objects one document contributes: none (empty or unknown kind), one, or a List's items.
fn document_objects(
    index: usize,
    value: Value,
    warnings: &mut Vec<String>,
) -> Result<Vec<Object>, ParseError> {
    if value.is_null() {
        return Ok(Vec::new());
    }
    let (api_version, kind) = type_of(index, &value)?;
    if api_version == "v1" && kind == "List" {
        let Some(Value::Sequence(items)) = value.get("items").cloned() else {
            return Err(malformed(index, "v1 List without an `items` list".into()));
        };
        let mut objects = Vec::with_capacity(items.len());
        for item in items {
            objects.extend(decode_object(index, item, warnings)?);
        }
        return Ok(objects);
    }
    Ok(decode_object(index, value, warnings)?.into_iter().collect())
}

fn decode_object(
    index: usize,
    mut value: Value,
    warnings: &mut Vec<String>,
) -> Result<Option<Object>, ParseError> {
    let (api_version, kind_name) = type_of(index, &value)?;
    let Some(kind) = Kind::from_type(&api_version, &kind_name) else {
        warnings.push(format!(
            "document {index}: skipping unsupported kind {kind_name} ({api_version})"
        ));
        return Ok(None);
    };
    let name = meta_string(&value, "name").unwrap_or_default();
    if name.is_empty() {
        return Err(malformed(index, format!("{kind} without metadata.name")));
    }
    let mut namespace = meta_string(&value, "namespace").unwrap_or_default();
    if kind.namespaced() && namespace.is_empty() {
        namespace = DEFAULT_NAMESPACE.to_owned();
        set_namespace(&mut value, &namespace);
    }
    let key = ObjectKey::new(kind, &namespace, &name);
    kind.decode(value)
        .map(Some)
        .map_err(|source| ParseError::Decode { index, key, source })
}

fn type_of(index: usize, value: &Value) -> Result<(String, String), ParseError> {
    if !value.is_mapping() {
        return Err(malformed(
            index,
            "expected a mapping with apiVersion and kind".into(),
        ));
    }
    let field = |name: &str| match value.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(_) => Err(malformed(
            index,
            format!("`{name}` must be a non-empty string"),
        )),
        None => Err(malformed(index, format!("missing `{name}`"))),
    };
    Ok((field("apiVersion")?, field("kind")?))
}

fn meta_string(value: &Value, field: &str) -> Option<String> {
    value
        .get("metadata")?
        .get(field)?
        .as_str()
        .map(str::to_owned)
}

fn set_namespace(value: &mut Value, namespace: &str) {
    if let Some(Value::Mapping(meta)) = value.get_mut("metadata") {
        meta.insert("namespace".into(), namespace.into());
    }
}

fn malformed(index: usize, reason: String) -> ParseError {
    ParseError::Malformed { index, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{Pod, Typed};

    fn keys(parsed: &ParsedFile) -> Vec<String> {
        parsed.objects.iter().map(|o| o.key().to_string()).collect()
    }

    #[test]
    fn multi_document_with_defaults_and_empty_documents() {
        let text = "\
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
# only a comment
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: n1
  hostNetwork: false
  containers: [{name: app, image: app}]
status: {podIP: 10.0.0.1, phase: Running}
";
        let parsed = parse_documents(text).unwrap();
        assert_eq!(keys(&parsed), ["Namespace shop", "Pod default/web"]);
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(
            parsed.objects[0].label("istio.io/dataplane-mode"),
            Some("ambient")
        );
        let pod = Pod::from_object(&parsed.objects[1]).unwrap();
        assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn unknown_kinds_are_skipped_with_a_warning() {
        let text = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: v2
kind: Pod
metadata: {name: p}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: x}
";
        let parsed = parse_documents(text).unwrap();
        assert_eq!(keys(&parsed), ["Pod x/p"]);
        assert_eq!(
            parsed.warnings,
            [
                "document 1: skipping unsupported kind Deployment (apps/v1)",
                "document 2: skipping unsupported kind Pod (v2)",
            ]
        );
    }

    #[test]
    fn lists_anchors_and_duplicates() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: &meta {name: a, namespace: n, labels: {v: one}}
- apiVersion: v1
  kind: Pod
  metadata:
    <<: *meta
    name: b
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: n, labels: {v: two}}
";
        let parsed = parse_documents(text).unwrap();
        assert_eq!(keys(&parsed), ["Pod n/a", "Pod n/b"]);
        assert_eq!(parsed.objects[0].label("v"), Some("two"));
        assert_eq!(parsed.objects[1].label("v"), Some("one"));
        assert_eq!(parsed.warnings.len(), 1);
        assert!(parsed.warnings[0].contains("Pod n/a is defined twice"));
    }

    #[test]
    fn rejections_name_the_document_and_problem() {
        let cases: &[(&str, &str)] = &[
            ("a: [1, 2", "document 1: invalid yaml"),
            ("- 1\n- 2\n", "document 1: expected a mapping"),
            ("kind: Pod\nmetadata: {name: a}\n", "missing `apiVersion`"),
            ("apiVersion: v1\nmetadata: {name: a}\n", "missing `kind`"),
            (
                "apiVersion: 1\nkind: Pod\n",
                "`apiVersion` must be a non-empty string",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}\n",
                "Pod without metadata.name",
            ),
            (
                "apiVersion: v1\nkind: List\n",
                "v1 List without an `items` list",
            ),
            (
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\n\
                 apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {hostNetwork: maybe}\n",
                "document 2 (Pod default/p): spec.hostNetwork: invalid type",
            ),
        ];
        for (text, want) in cases {
            let err = parse_documents(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    const BUILTIN_KINDS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: http}, {port: 90, targetPort: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.1], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
";

    #[test]
    fn builtin_kinds_decode() {
        use crate::k8s::{EndpointSlice, Node, Service, ServiceAccount};
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let parsed = parse_documents(BUILTIN_KINDS).unwrap();
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
        assert_eq!(
            keys(&parsed),
            [
                "Service shop/web",
                "EndpointSlice shop/web-abc",
                "ServiceAccount shop/web",
                "Node n1"
            ]
        );
        let svc = Service::from_object(&parsed.objects[0]).unwrap();
        let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("http".into()))
        );
        assert_eq!(ports[1].target_port, Some(IntOrString::Int(9090)));
        let slice = EndpointSlice::from_object(&parsed.objects[1]).unwrap();
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.1"]);
        assert!(ServiceAccount::from_object(&parsed.objects[2]).is_some());
        let node = Node::from_object(&parsed.objects[3]).unwrap();
        assert_eq!(node.metadata.namespace, None, "cluster-scoped");
    }

    #[test]
    fn builtin_kinds_reject_bad_fields_by_path() {
        let cases: &[(&str, &str)] = &[
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: http}]}\n",
                "(Service default/s): spec.ports[0].port: invalid type",
            ),
            (
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\n\
                 addressType: IPv4\nendpoints: [{addresses: 10.0.0.1}]\n",
                "(EndpointSlice default/e): endpoints[0].addresses: invalid type",
            ),
            (
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa}\nautomountServiceAccountToken: maybe\n",
                "(ServiceAccount default/sa): automountServiceAccountToken: invalid type",
            ),
            (
                "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {unschedulable: 3}\n",
                "(Node n): spec.unschedulable: invalid type",
            ),
        ];
        for (text, want) in cases {
            let err = parse_documents(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn empty_text_is_no_objects() {
        for text in ["", "\n", "---\n", "# nothing\n"] {
            let parsed = parse_documents(text).unwrap();
            assert!(parsed.objects.is_empty() && parsed.warnings.is_empty());
        }
    }
}
