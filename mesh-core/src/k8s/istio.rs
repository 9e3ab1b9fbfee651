//! Istio security CRDs (`security.istio.io/v1`): [`AuthorizationPolicy`] and
//! [`PeerAuthentication`], as our own serde types.
//!
//! They implement `k8s_openapi::Resource` and `k8s_openapi::Metadata`, so they are stored like
//! any built-in kind (and work with `kube`'s blanket `Resource` impl).
//!
//! Only the fields zmesh acts on, or must recognise to refuse safely, are modelled. Fields we do
//! not know are **kept, not dropped**: decoding records every unknown field's path (for example
//! `spec.rules.0.from.0.source.principal`) in `unknown_fields`, and translation reports such a
//! policy as having unsupported fields and treats the affected rule fail-closed. Decoding an
//! unknown field is not an error because CRDs gain fields between Istio releases; acting as if a
//! constraint were absent would silently widen a policy, which is why the paths are kept.
//! `apiVersion`, `kind` and `status` are not recorded (the parser already checked the first two;
//! status is written by controllers). A field of the wrong type or an unknown enum value
//! (`action: ALOW`) is a decode error naming the field.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope, Resource};
use serde::de::{self, Deserializer};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

/// API group of the Istio security CRDs.
pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";

/// `security.istio.io/v1 AuthorizationPolicy`: access control for workloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthorizationPolicy {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    pub spec: AuthorizationPolicySpec,
    /// Paths of fields present in the object that this type does not model, in document order.
    /// Not serialised.
    pub unknown_fields: Vec<String>,
}

/// `security.istio.io/v1 PeerAuthentication`: which mTLS mode workloads accept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerAuthentication {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The policy.
    pub spec: PeerAuthenticationSpec,
    /// Paths of fields present in the object that this type does not model. Not serialised.
    pub unknown_fields: Vec<String>,
}

/// Selects workloads by labels (Istio `WorkloadSelector`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Every label here must be present with this value. Empty selects nothing in particular
    /// (Istio treats an empty selector like no selector).
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to the object a policy attaches to (`targetRef` / `targetRefs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    /// API group of the target (`gateway.networking.k8s.io`, `""` for core).
    #[serde(default)]
    pub group: String,
    /// Kind of the target (`Gateway`, `Service`, ...).
    #[serde(default)]
    pub kind: String,
    /// Name of the target.
    #[serde(default)]
    pub name: String,
    /// Namespace of the target (defaults to the policy's).
    #[serde(default)]
    pub namespace: String,
}

/// The action of an [`AuthorizationPolicy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    /// Allow a request that matches a rule (the default).
    #[default]
    Allow,
    /// Deny a request that matches a rule.
    Deny,
    /// Audit a request that matches a rule (not supported at L4).
    Audit,
    /// Delegate the decision to an external provider (not supported at L4).
    Custom,
}

impl fmt::Display for PolicyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyAction::Allow => "ALLOW",
            PolicyAction::Deny => "DENY",
            PolicyAction::Audit => "AUDIT",
            PolicyAction::Custom => "CUSTOM",
        })
    }
}

/// `spec` of an [`AuthorizationPolicy`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads the policy applies to; `None` means the whole namespace (or mesh, in the root
    /// namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Single attachment target (waypoints and gateways; such policies are not for ztunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Attachment targets (as `target_ref`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// What to do when a rule matches.
    #[serde(default)]
    pub action: PolicyAction,
    /// The rules; a request matching any rule triggers the action.
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
    /// External authorizer for `CUSTOM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
}

/// The external authorizer of a `CUSTOM` policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtensionProvider {
    /// Provider name from the mesh config.
    #[serde(default)]
    pub name: String,
}

/// One rule: matches when any `from`, any `to` and every `when` matches (absent lists match).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationRule {
    /// Request sources.
    #[serde(default)]
    pub from: Vec<RuleFrom>,
    /// Request operations.
    #[serde(default)]
    pub to: Vec<RuleTo>,
    /// Extra conditions.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// One entry of `rules[].from`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleFrom {
    /// The source.
    #[serde(default)]
    pub source: Source,
}

/// One entry of `rules[].to`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleTo {
    /// The operation.
    #[serde(default)]
    pub operation: Operation,
}

/// Attributes of a request's source; every non-empty list must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Peer identities (`<trust domain>/ns/<ns>/sa/<sa>`), with `*` wildcards.
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated `principals`.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// JWT identities (L7).
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negated `request_principals` (L7).
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces, with `*` wildcards.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated `namespaces`.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer service accounts, `<ns>/<sa>` or `<sa>` (the policy's namespace).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated `service_accounts`.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated `ip_blocks`.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs from headers (L7).
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated `remote_ip_blocks` (L7).
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

/// Attributes of a request's operation; every non-empty list must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports (strings in the CRD; plain integers are accepted too).
    #[serde(default, deserialize_with = "strings_or_ints")]
    pub ports: Vec<String>,
    /// Negated `ports`.
    #[serde(default, deserialize_with = "strings_or_ints")]
    pub not_ports: Vec<String>,
    /// HTTP hosts (L7).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated `hosts` (L7).
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// HTTP methods (L7).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated `methods` (L7).
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// HTTP paths (L7).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated `paths` (L7).
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// One `rules[].when` condition: attribute `key` is one of `values` and none of `not_values`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute (`source.ip`, `destination.port`, `request.headers[x]`, ...).
    pub key: String,
    /// Accepted values.
    #[serde(default, deserialize_with = "strings_or_ints")]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default, deserialize_with = "strings_or_ints")]
    pub not_values: Vec<String>,
}

/// `spec` of a [`PeerAuthentication`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to; `None` means the namespace (or mesh, in the root
    /// namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Workload-level mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per-port modes, keyed by port number as written (validated by the consumer).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "port_map"
    )]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// An mTLS setting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerMtls {
    /// The mode.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Which connections a workload accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh); the mesh default is permissive.
    #[default]
    Unset,
    /// Plaintext only (treated as permissive by ztunnel: it never refuses mTLS).
    Disable,
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

// Accepts `"80"` and `80` alike: the CRD says strings, hand-written YAML often has numbers.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct StringOrInt(String);

impl<'de> Deserialize<'de> for StringOrInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
        }
        d.deserialize_any(V).map(StringOrInt)
    }
}

fn strings_or_ints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items: Vec<StringOrInt> = Deserialize::deserialize(d)?;
    Ok(items.into_iter().map(|s| s.0).collect())
}

fn port_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, PeerMtls>, D::Error> {
    let map: BTreeMap<StringOrInt, PeerMtls> = Deserialize::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// The path of a skipped field without serde_ignored's `?` markers for `Option`s.
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    let mut segments = Vec::new();
    let mut cursor = path;
    loop {
        match cursor {
            Path::Root => break,
            Path::Seq { parent, index } => {
                segments.push(index.to_string());
                cursor = parent;
            }
            Path::Map { parent, key } => {
                segments.push(key.clone());
                cursor = parent;
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => cursor = parent,
        }
    }
    segments.reverse();
    segments.join(".")
}

#[derive(Deserialize)]
struct Raw<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: S,
}

// Top-level fields that are expected but deliberately not modelled.
const NOT_RECORDED: &[&str] = &["apiVersion", "kind", "status"];

/// Decodes `T`, returning the paths of every field `T` does not model.
fn decode_keeping_unknown<'de, D, S>(d: D) -> Result<(Raw<S>, Vec<String>), D::Error>
where
    D: Deserializer<'de>,
    S: Deserialize<'de> + Default,
{
    let mut unknown = Vec::new();
    let raw = serde_ignored::deserialize(d, |path| {
        let path = path_string(&path);
        if !NOT_RECORDED.contains(&path.as_str()) {
            unknown.push(path);
        }
    })?;
    Ok((raw, unknown))
}

// Resource + Metadata + (de)serialisation for one CRD type.
macro_rules! istio_crd {
    ($ty:ident, $spec:ty, $kind:literal, $plural:literal) => {
        impl Resource for $ty {
            const API_VERSION: &'static str = "security.istio.io/v1";
            const GROUP: &'static str = ISTIO_SECURITY_GROUP;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = NamespaceResourceScope;
        }

        impl Metadata for $ty {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let (raw, unknown_fields) = decode_keeping_unknown::<D, $spec>(d)?;
                Ok(Self {
                    metadata: raw.metadata,
                    spec: raw.spec,
                    unknown_fields,
                })
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut state = s.serialize_struct($kind, 4)?;
                state.serialize_field("apiVersion", <Self as Resource>::API_VERSION)?;
                state.serialize_field("kind", $kind)?;
                state.serialize_field("metadata", &self.metadata)?;
                state.serialize_field("spec", &self.spec)?;
                state.end()
            }
        }
    };
}

istio_crd!(
    AuthorizationPolicy,
    AuthorizationPolicySpec,
    "AuthorizationPolicy",
    "authorizationpolicies"
);
istio_crd!(
    PeerAuthentication,
    PeerAuthenticationSpec,
    "PeerAuthentication",
    "peerauthentications"
);

#[cfg(test)]
mod tests;
