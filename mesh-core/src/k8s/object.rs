//! The kinds of Kubernetes object we understand, and a type-erased object.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, Metadata, NamespaceResourceScope, Resource};
use serde::Serialize;

/// A decode error with the path of the field it concerns.
pub type DecodeError = serde_path_to_error::Error<serde_yaml::Error>;

/// Whether a resource scope is namespaced; lets the `kinds!` list derive it from the type.
trait ScopeFlag {
    const NAMESPACED: bool;
}

impl ScopeFlag for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl ScopeFlag for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// A Rust type stored in a [`Snapshot`](super::Snapshot) under one [`Kind`].
pub trait Typed: Sized + 'static {
    /// The kind this type is stored as.
    const KIND: Kind;
    /// The typed value inside `object`, if it is of this kind.
    fn from_object(object: &Object) -> Option<&Arc<Self>>;
}

// One line per kind: the variant name and the Rust type. The type provides apiVersion, kind and
// scope (through `k8s_openapi::Resource`), `metadata` (through `Metadata`) and its decoding
// (through `Deserialize`). To store a new kind, add it here; nothing else changes.
macro_rules! kinds {
    ($( $(#[$doc:meta])* $variant:ident => $ty:ty ),+ $(,)?) => {
        /// A kind of object the store understands.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        pub enum Kind {
            $( $(#[$doc])* $variant, )+
        }

        /// One object of any understood kind. Cheap to clone.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Object {
            $( $(#[$doc])* $variant(Arc<$ty>), )+
        }

        impl Kind {
            /// Every understood kind.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),+];

            /// The `apiVersion` this kind is written with (`v1`, `apps/v1`, ...).
            pub fn api_version(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::API_VERSION,)+ }
            }

            /// The `kind` field value (`Pod`, `Namespace`, ...).
            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::KIND,)+ }
            }

            /// The API group (`""` for the core group, `discovery.k8s.io`, ...).
            pub fn group(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::GROUP,)+ }
            }

            /// The API version without the group (`v1`).
            pub fn version(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::VERSION,)+ }
            }

            /// The plural resource name used in API paths (`pods`, `endpointslices`).
            pub fn plural(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::URL_PATH_SEGMENT,)+ }
            }

            /// Whether objects of this kind live in a namespace.
            pub fn namespaced(self) -> bool {
                match self {
                    $(Kind::$variant => <<$ty as Resource>::Scope as ScopeFlag>::NAMESPACED,)+
                }
            }

            // Decodes a YAML document already checked to be of this kind.
            // The error names the offending field (`spec.hostNetwork: invalid type ...`).
            pub(super) fn decode(self, value: serde_yaml::Value) -> Result<Object, DecodeError> {
                match self {
                    $(Kind::$variant => Ok(Object::$variant(Arc::new(serde_path_to_error::deserialize(value)?))),)+
                }
            }
        }

        impl Object {
            /// The object's kind.
            pub fn kind(&self) -> Kind {
                match self { $(Object::$variant(_) => Kind::$variant,)+ }
            }

            /// Whether both hold the same allocation: a cheap "unchanged" check before comparing
            /// contents (sources keep the `Arc` of objects that did not change).
            pub fn ptr_eq(&self, other: &Object) -> bool {
                #[allow(unreachable_patterns)]
                match (self, other) {
                    $((Object::$variant(a), Object::$variant(b)) => Arc::ptr_eq(a, b),)+
                    _ => false,
                }
            }

            /// The object's metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Object::$variant(o) => o.metadata(),)+ }
            }
        }

        $(
            impl Typed for $ty {
                const KIND: Kind = Kind::$variant;

                fn from_object(object: &Object) -> Option<&Arc<Self>> {
                    #[allow(irrefutable_let_patterns)]
                    if let Object::$variant(o) = object { Some(o) } else { None }
                }
            }
        )+
    };
}

kinds! {
    /// `v1 Namespace` (cluster-scoped).
    Namespace => k8s_openapi::api::core::v1::Namespace,
    /// `v1 Pod`.
    Pod => k8s_openapi::api::core::v1::Pod,
    /// `v1 Service`.
    Service => k8s_openapi::api::core::v1::Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice => k8s_openapi::api::discovery::v1::EndpointSlice,
    /// `v1 ServiceAccount`.
    ServiceAccount => k8s_openapi::api::core::v1::ServiceAccount,
    /// `v1 Node` (cluster-scoped).
    Node => k8s_openapi::api::core::v1::Node,
    /// `security.istio.io/v1 AuthorizationPolicy`.
    AuthorizationPolicy => super::istio::AuthorizationPolicy,
    /// `security.istio.io/v1 PeerAuthentication`.
    PeerAuthentication => super::istio::PeerAuthentication,
}

impl Kind {
    /// The kind written as `apiVersion` + `kind`, if we understand it.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Identifies an object: kind, namespace (empty for cluster-scoped kinds) and name. Keys sort by
/// kind first, so all objects of one kind are adjacent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key for `kind` in `namespace` (ignored for cluster-scoped kinds) called `name`.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        let namespace = if kind.namespaced() { namespace } else { "" };
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The smallest key of `kind`: every key of that kind sorts at or after it.
    pub(super) fn first_of(kind: Kind) -> Self {
        Self {
            kind,
            namespace: String::new(),
            name: String::new(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    /// The object's key (namespace as stored; parsing fills in [`DEFAULT_NAMESPACE`]).
    ///
    /// [`DEFAULT_NAMESPACE`]: super::DEFAULT_NAMESPACE
    pub fn key(&self) -> ObjectKey {
        let meta = self.metadata();
        ObjectKey::new(
            self.kind(),
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        )
    }

    /// The value of label `key`, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata()
            .labels
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }

    /// The value of annotation `key`, if set.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata()
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Namespace, Pod};

    #[test]
    fn kind_table() {
        let cases = [
            ("v1", "Pod", Some(Kind::Pod)),
            ("v1", "Namespace", Some(Kind::Namespace)),
            ("v2", "Pod", None),
            ("apps/v1", "Deployment", None),
            ("v1", "pod", None),
            ("v1", "Service", Some(Kind::Service)),
            (
                "discovery.k8s.io/v1",
                "EndpointSlice",
                Some(Kind::EndpointSlice),
            ),
            ("v1", "EndpointSlice", None),
            ("v1", "ServiceAccount", Some(Kind::ServiceAccount)),
            ("v1", "Node", Some(Kind::Node)),
            (
                "security.istio.io/v1",
                "AuthorizationPolicy",
                Some(Kind::AuthorizationPolicy),
            ),
            (
                "security.istio.io/v1",
                "PeerAuthentication",
                Some(Kind::PeerAuthentication),
            ),
            ("security.istio.io/v1beta1", "AuthorizationPolicy", None),
        ];
        for (api, kind, want) in cases {
            assert_eq!(Kind::from_type(api, kind), want, "{api} {kind}");
        }
        assert!(Kind::Pod.namespaced());
        assert!(!Kind::Namespace.namespaced());
        assert_eq!(Kind::Pod.to_string(), "Pod");
        assert!(!Kind::Node.namespaced());
        for kind in [Kind::Service, Kind::EndpointSlice, Kind::ServiceAccount] {
            assert!(kind.namespaced(), "{kind}");
        }
        assert!(Kind::AuthorizationPolicy.namespaced());
        assert_eq!(Kind::AuthorizationPolicy.group(), "security.istio.io");
        assert_eq!(Kind::AuthorizationPolicy.version(), "v1");
        assert_eq!(Kind::AuthorizationPolicy.plural(), "authorizationpolicies");
        assert_eq!(Kind::PeerAuthentication.plural(), "peerauthentications");
        assert_eq!(Kind::EndpointSlice.group(), "discovery.k8s.io");
    }

    #[test]
    fn keys_display_and_ignore_namespace_for_cluster_kinds() {
        assert_eq!(
            ObjectKey::new(Kind::Pod, "shop", "a").to_string(),
            "Pod shop/a"
        );
        let ns = ObjectKey::new(Kind::Namespace, "ignored", "shop");
        assert_eq!(ns.namespace, "");
        assert_eq!(ns.to_string(), "Namespace shop");
        assert!(ObjectKey::first_of(Kind::Pod) <= ObjectKey::new(Kind::Pod, "", "a"));
    }

    #[test]
    fn typed_access() {
        let pod = Object::Pod(Arc::new(Pod::default()));
        assert!(Pod::from_object(&pod).is_some());
        assert!(Namespace::from_object(&pod).is_none());
        assert_eq!(pod.label("x"), None);
        assert_eq!(pod.annotation("x"), None);
    }
}
