//! L4 authorization policies as ztunnel holds them (converted from `istio.security.Authorization`
//! by [`Policy::from_proto`], or read from the local config), and the index the evaluator uses
//! to find the policies that apply to a workload without scanning them all.
//!
//! Nesting follows the wire format: a policy has rules (OR), a rule has clauses (AND), a clause
//! has matches (OR), and a match has field groups (AND; values inside a group OR, `not_*` groups
//! none-of). The evaluator lives in [`crate::authz`].

mod convert;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;

pub use convert::PolicyError;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Scope {
    /// Every workload in the mesh (istiod sends policies of the root namespace this way).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Only workloads that list the policy in their `authorization_policies`.
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Action {
    /// Admit the connection.
    Allow,
    /// Refuse the connection.
    Deny,
}

/// One authorization policy, keyed by `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Policy name.
    pub name: String,
    /// Namespace the policy lives in (the root namespace for mesh-wide policies).
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: Scope,
    /// What happens when it matches.
    pub action: Action,
    /// The policy matches when any rule matches; with no rules it never matches.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Evaluated and logged, never enforced.
    #[serde(default)]
    pub dry_run: bool,
}

/// Matches when every clause matches (a rule without clauses matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Rule {
    /// The clauses (AND).
    pub clauses: Vec<Clause>,
}

/// Matches when any of its matches matches (a clause without matches matches everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Clause {
    /// The alternatives (OR).
    pub matches: Vec<Match>,
}

/// Conditions on one connection. Every non-empty group must hold; a match with no group set
/// never matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Source namespace (from the peer identity) is any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    /// Source namespace is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source principal (identity without `spiffe://`) is any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    /// Source principal is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    /// Source service account is any of these (trust domain ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Source service account is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source IP is in any of these prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "cidrs")]
    pub source_ips: Vec<IpNet>,
    /// Source IP is in none of these prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "cidrs")]
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP is in any of these prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "cidrs")]
    pub destination_ips: Vec<IpNet>,
    /// Destination IP is in none of these prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "cidrs")]
    pub not_destination_ips: Vec<IpNet>,
    /// Destination (target) port is any of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    /// Destination port is none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// Whether no group is set (such a match is skipped: it never matches).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// How a string attribute is compared. An absent attribute (plaintext: no identity) matches
/// nothing, not even `Presence`. Written `{exact: v}`, `{prefix: v}`, `{suffix: v}` or
/// `presence` in the local config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RawStringMatch")]
pub enum StringMatch {
    /// Equal to the value.
    Exact(String),
    /// Starts with the value.
    Prefix(String),
    /// Ends with the value.
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl StringMatch {
    /// Whether `value` (absent = `None`) satisfies this match.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Self::Exact(s) => v == s,
            Self::Prefix(s) => v.starts_with(s.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
            Self::Presence => !v.is_empty(),
        }
    }
}

// serde_yaml writes enums as YAML tags (`!exact v`); people write maps.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum RawStringMatch {
    Keyword(String),
    Map(BTreeMap<String, String>),
}

impl TryFrom<RawStringMatch> for StringMatch {
    type Error = String;

    fn try_from(raw: RawStringMatch) -> Result<Self, String> {
        let want = "want one of {exact: v}, {prefix: v}, {suffix: v}, presence";
        let entry = match raw {
            RawStringMatch::Keyword(k) if k == "presence" => return Ok(Self::Presence),
            RawStringMatch::Keyword(k) => return Err(format!("string match {k:?}: {want}")),
            RawStringMatch::Map(m) if m.len() == 1 => m.into_iter().next(),
            RawStringMatch::Map(m) => {
                return Err(format!("string match with {} keys: {want}", m.len()));
            }
        };
        match entry {
            Some((k, v)) if k == "exact" => Ok(Self::Exact(v)),
            Some((k, v)) if k == "prefix" => Ok(Self::Prefix(v)),
            Some((k, v)) if k == "suffix" => Ok(Self::Suffix(v)),
            Some((k, _)) => Err(format!("string match kind {k:?}: {want}")),
            None => Err(want.to_string()),
        }
    }
}

/// A service account in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
}

impl Policy {
    /// The xDS resource name and store key: `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Converts a wire policy, rejecting one ztunnel cannot enforce faithfully with a message that
    /// names the offending field.
    pub fn from_proto(p: &mesh_proto::security::Authorization) -> Result<Policy, String> {
        convert::policy(p).map_err(|e| e.to_string())
    }

    /// Checks what the wire format cannot express but the local config can get wrong.
    pub fn validate(&self) -> Result<(), PolicyError> {
        convert::validate(self)
    }
}

/// Shared handle used by the store.
pub type PolicyRef = Arc<Policy>;

/// Policies by key, plus the namespace and global indexes the evaluator reads per connection.
#[derive(Debug, Default, Clone)]
pub struct PolicyStore {
    by_key: HashMap<String, PolicyRef>,
    // Keys of GLOBAL-scoped policies, and of NAMESPACE-scoped ones per namespace; ordered so an
    // evaluation (and its log lines) is deterministic.
    global: BTreeSet<String>,
    by_namespace: HashMap<String, BTreeSet<String>>,
}

impl PolicyStore {
    /// Adds or replaces a policy.
    pub fn insert(&mut self, p: Policy) {
        let key = p.key();
        self.remove(&key);
        match p.scope {
            Scope::Global => {
                self.global.insert(key.clone());
            }
            Scope::Namespace => {
                let ns = self.by_namespace.entry(p.namespace.clone()).or_default();
                ns.insert(key.clone());
            }
            // Reached only through the workload's own list.
            Scope::WorkloadSelector => {}
        }
        self.by_key.insert(key, Arc::new(p));
    }

    /// Removes a policy; returns it if it was present.
    pub fn remove(&mut self, key: &str) -> Option<PolicyRef> {
        let old = self.by_key.remove(key)?;
        self.global.remove(key);
        if let Some(set) = self.by_namespace.get_mut(&old.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.by_namespace.remove(&old.namespace);
            }
        }
        Some(old)
    }

    /// The policy with this key.
    pub fn get(&self, key: &str) -> Option<&PolicyRef> {
        self.by_key.get(key)
    }

    /// Every policy, in key order.
    pub fn all(&self) -> Vec<PolicyRef> {
        let mut v: Vec<_> = self.by_key.values().cloned().collect();
        v.sort_by_key(|p| p.key());
        v
    }

    /// Whether no policy is held.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Keys of the GLOBAL policies.
    pub fn global_keys(&self) -> impl Iterator<Item = &str> {
        self.global.iter().map(String::as_str)
    }

    /// Keys of the NAMESPACE policies of `namespace`.
    pub fn namespace_keys(&self, namespace: &str) -> impl Iterator<Item = &str> {
        self.by_namespace
            .get(namespace)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Whether a workload in `namespace` with no selector policies has nothing to evaluate.
    pub fn none_for_namespace(&self, namespace: &str) -> bool {
        self.global.is_empty() && !self.by_namespace.contains_key(namespace)
    }
}

/// CIDRs as strings (`10.0.0.0/8`; a bare IP is a host prefix) in the local config and dumps.
mod cidrs {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| super::convert::parse_cidr(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests;
