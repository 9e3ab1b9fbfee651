//! Standalone authentication: a YAML (or JSON) file of bearer tokens and workload placements.
//!
//! ```yaml
//! tokens:
//!   # token: who presents it, and (for node agents and pods) the node it runs on
//!   "ztunnel-node-a-3f9c2e7b1d": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
//!   "cart-7d1e0a99c4b2f8e6":     { identity: "spiffe://cluster.local/ns/shop/sa/cart", node: node-a }
//! # Pods that have no token of their own but run on a node (for impersonation checks).
//! workloads:
//!   - { identity: "spiffe://cluster.local/ns/shop/sa/web", node: node-b }
//! ```
//!
//! Every token entry with a `node`, and every `workloads` entry, says "a pod with this
//! namespace/service account runs on this node"; [`StaticNodeLocality`] answers from that set.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use mesh_core::Identity;
use serde::Deserialize;

use super::{AuthError, Authenticator, Caller, Credentials, LocalityError, NodeLocality};

// Shorter tokens are guessable; we accept them (tests, demos) but say so.
const MIN_RECOMMENDED_TOKEN_LEN: usize = 16;

/// Why the tokens file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON of the expected shape.
    #[error("cannot parse tokens file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// An entry is semantically wrong. Tokens are never named: the message names the identity.
    #[error("invalid entry in tokens file {path}: {reason}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

// Tokens stay an untyped mapping at first: serde errors quote map keys in their paths, and the keys
// here are secrets. Each entry is converted on its own and errors name it by position instead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: serde_yaml::Mapping,
    #[serde(default)]
    workloads: Vec<WorkloadEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    identity: Identity,
    #[serde(default)]
    node: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadEntry {
    identity: Identity,
    node: String,
}

/// The parsed, validated tokens file.
pub struct StaticTokens {
    // (token bytes, caller); scanned in full on every lookup so timing does not reveal prefixes.
    entries: Vec<(Vec<u8>, Caller)>,
    placements: HashSet<(String, String, String)>,
}

impl std::fmt::Debug for StaticTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokens")
            .field("tokens", &self.entries.len())
            .field("placements", &self.placements.len())
            .finish()
    }
}

impl StaticTokens {
    /// Reads and validates `path`; every identity must be in `trust_domain`.
    pub fn load(path: &Path, trust_domain: &str) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        warn_if_world_readable(path);
        Self::parse(&text, trust_domain).map_err(|e| e.at(path))
    }

    /// Parses tokens-file text (errors name the file as `<inline>`).
    pub fn from_yaml(text: &str, trust_domain: &str) -> Result<Self, TokenFileError> {
        Self::parse(text, trust_domain).map_err(|e| e.at(Path::new("<inline>")))
    }

    fn parse(text: &str, trust_domain: &str) -> Result<Self, EntryError> {
        let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(redact)?;
        let file: TokenFile = serde_yaml::from_value(value).map_err(EntryError::Parse)?;
        let mut entries = Vec::with_capacity(file.tokens.len());
        let mut placements = HashSet::new();
        for (i, (token, entry)) in file.tokens.into_iter().enumerate() {
            let (token, entry) = token_entry(i + 1, token, entry)?;
            let who = &entry.identity;
            check_trust_domain(who, trust_domain)?;
            check_token(&token, who)?;
            if let Some(node) = &entry.node {
                check_node(node, who)?;
                placements.insert(placement(who, node));
            }
            let caller = Caller {
                identity: entry.identity,
                node: entry.node,
            };
            entries.push((token.into_bytes(), caller));
        }
        for w in file.workloads {
            check_trust_domain(&w.identity, trust_domain)?;
            check_node(&w.node, &w.identity)?;
            placements.insert(placement(&w.identity, &w.node));
        }
        Ok(Self {
            entries,
            placements,
        })
    }

    /// An authenticator over these tokens that accepts requests without `clusterid` or claiming
    /// `cluster_id`.
    pub fn authenticator(&self, cluster_id: &str) -> StaticTokenAuthenticator {
        StaticTokenAuthenticator {
            entries: self.entries.clone(),
            cluster_id: cluster_id.to_string(),
        }
    }

    /// The placements (token nodes and `workloads`) as a [`NodeLocality`].
    pub fn node_locality(&self) -> StaticNodeLocality {
        StaticNodeLocality {
            placements: self.placements.clone(),
        }
    }

    /// How many tokens were loaded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token was loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

enum EntryError {
    Parse(serde_yaml::Error),
    Invalid(String),
}

impl EntryError {
    fn at(self, path: &Path) -> TokenFileError {
        let path = path.to_path_buf();
        match self {
            Self::Parse(source) => TokenFileError::Parse { path, source },
            Self::Invalid(reason) => TokenFileError::Entry { path, reason },
        }
    }
}

/// Converts the `n`th (1-based) token entry, naming it by position, never by token.
fn token_entry(
    n: usize,
    token: serde_yaml::Value,
    entry: serde_yaml::Value,
) -> Result<(String, TokenEntry), EntryError> {
    let serde_yaml::Value::String(token) = token else {
        return Err(EntryError::Invalid(format!("token #{n} is not a string")));
    };
    let entry = serde_yaml::from_value(entry)
        .map_err(|e| EntryError::Invalid(format!("token #{n}: {e}")))?;
    Ok((token, entry))
}

// YAML syntax errors quote no content, but a duplicate-key error quotes the key, i.e. a token.
fn redact(error: serde_yaml::Error) -> EntryError {
    if !error.to_string().contains("duplicate entry") {
        return EntryError::Parse(error);
    }
    let at = error
        .location()
        .map(|l| format!(" at line {} column {}", l.line(), l.column()))
        .unwrap_or_default();
    EntryError::Invalid(format!("a token or key appears twice{at}"))
}

fn check_trust_domain(who: &Identity, trust_domain: &str) -> Result<(), EntryError> {
    if who.trust_domain() != trust_domain {
        return Err(EntryError::Invalid(format!(
            "{who} is not in the trust domain {trust_domain:?} this ca signs for"
        )));
    }
    Ok(())
}

fn check_token(token: &str, who: &Identity) -> Result<(), EntryError> {
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EntryError::Invalid(format!(
            "the token of {who} is empty or has whitespace or control characters"
        )));
    }
    if token.len() < MIN_RECOMMENDED_TOKEN_LEN {
        tracing::warn!(identity = %who, "token shorter than {MIN_RECOMMENDED_TOKEN_LEN} characters");
    }
    Ok(())
}

fn check_node(node: &str, who: &Identity) -> Result<(), EntryError> {
    if node.trim().is_empty() {
        return Err(EntryError::Invalid(format!("the node of {who} is empty")));
    }
    Ok(())
}

fn placement(who: &Identity, node: &str) -> (String, String, String) {
    (
        who.namespace().to_string(),
        who.service_account().to_string(),
        node.to_string(),
    )
}

fn warn_if_world_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "tokens file is readable by group or others");
    }
}

// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Authenticates bearer tokens against the tokens file.
#[derive(Clone)]
pub struct StaticTokenAuthenticator {
    entries: Vec<(Vec<u8>, Caller)>,
    cluster_id: String,
}

impl std::fmt::Debug for StaticTokenAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticTokenAuthenticator")
            .field("tokens", &self.entries.len())
            .field("cluster_id", &self.cluster_id)
            .finish()
    }
}

impl StaticTokenAuthenticator {
    fn lookup(&self, credentials: &Credentials) -> Result<Caller, AuthError> {
        if let Some(claimed) = &credentials.cluster_id
            && claimed != &self.cluster_id
        {
            return Err(AuthError::UnknownCluster {
                claimed: claimed.clone(),
                served: self.cluster_id.clone(),
            });
        }
        let presented = credentials.token.as_bytes();
        let mut found = None;
        for (token, caller) in &self.entries {
            if constant_time_eq(token, presented) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(AuthError::UnknownToken)
    }
}

impl Authenticator for StaticTokenAuthenticator {
    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(std::future::ready(self.lookup(credentials)))
    }
}

/// Workload placements from the tokens file.
#[derive(Debug, Clone, Default)]
pub struct StaticNodeLocality {
    placements: HashSet<(String, String, String)>,
}

impl NodeLocality for StaticNodeLocality {
    fn has_workload_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, LocalityError>> {
        let key = (
            namespace.to_string(),
            service_account.to_string(),
            node.to_string(),
        );
        Box::pin(std::future::ready(Ok(self.placements.contains(&key))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
tokens:
  "ztunnel-node-a-0123456789": { identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel", node: node-a }
  "cart-token-0123456789": { identity: "spiffe://cluster.local/ns/shop/sa/cart", node: node-a }
  "admin-token-0123456789": { identity: "spiffe://cluster.local/ns/ops/sa/admin" }
workloads:
  - { identity: "spiffe://cluster.local/ns/shop/sa/web", node: node-b }
"#;

    fn creds(token: &str, cluster: Option<&str>) -> Credentials {
        Credentials {
            token: token.into(),
            cluster_id: cluster.map(str::to_string),
        }
    }

    fn parse(text: &str) -> Result<StaticTokens, TokenFileError> {
        StaticTokens::parse(text, "cluster.local").map_err(|e| e.at(Path::new("tokens.yaml")))
    }

    #[tokio::test]
    async fn authenticates_known_tokens_only() {
        let tokens = parse(FILE).unwrap();
        assert_eq!(tokens.len(), 3);
        let auth = tokens.authenticator("Kubernetes");
        let caller = auth
            .authenticate(&creds("cart-token-0123456789", Some("Kubernetes")))
            .await
            .unwrap();
        assert_eq!(
            caller.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(caller.node.as_deref(), Some("node-a"));
        let caller = auth
            .authenticate(&creds("admin-token-0123456789", None))
            .await
            .unwrap();
        assert_eq!(caller.node, None);

        let err = auth
            .authenticate(&creds("cart-token-012345678", None))
            .await;
        assert!(matches!(err, Err(AuthError::UnknownToken)));
        let err = auth
            .authenticate(&creds("cart-token-0123456789", Some("other")))
            .await;
        assert!(matches!(err, Err(AuthError::UnknownCluster { .. })));
    }

    #[tokio::test]
    async fn locality_from_token_nodes_and_workloads() {
        let locality = parse(FILE).unwrap().node_locality();
        let on = |ns: &'static str, sa: &'static str, node: &'static str| {
            let locality = locality.clone();
            async move { locality.has_workload_on_node(ns, sa, node).await.unwrap() }
        };
        assert!(on("shop", "cart", "node-a").await);
        assert!(on("shop", "web", "node-b").await);
        assert!(!on("shop", "web", "node-a").await);
        assert!(!on("ops", "admin", "node-a").await);
    }

    #[test]
    fn rejects_bad_files_without_leaking_tokens() {
        let cases: &[(&str, &str)] = &[
            ("tokens: [", "cannot parse"),
            ("tokens: {}\nextra: 1", "unknown field"),
            (
                "tokens: {\"secret-abc\": {identity: \"spiffe://other.td/ns/a/sa/b\"}}",
                "not in the trust domain",
            ),
            (
                "tokens: {\"secret abc\": {identity: \"spiffe://cluster.local/ns/a/sa/b\"}}",
                "has whitespace",
            ),
            (
                "tokens: {\"secret-abc\": {identity: \"spiffe://cluster.local/ns/a/sa/b\", node: \" \"}}",
                "node of spiffe://cluster.local/ns/a/sa/b is empty",
            ),
            (
                "tokens: {\"secret-abc\": {identity: \"nope\"}}",
                "does not start with",
            ),
            (
                "workloads: [{identity: \"spiffe://cluster.local/ns/a/sa/b\"}]",
                "missing field `node`",
            ),
            (
                "tokens:\n  secret-abc: {identity: \"spiffe://cluster.local/ns/a/sa/b\"}\n  secret-abc: {identity: \"spiffe://cluster.local/ns/a/sa/c\"}",
                "appears twice at line",
            ),
            (
                "tokens: {1: {identity: \"spiffe://cluster.local/ns/a/sa/b\"}}",
                "token #1 is not a string",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{text}: {err:?} should contain {want:?}"
            );
            assert!(err.contains("tokens.yaml"), "{err}");
            assert!(
                !err.contains("secret abc") && !err.contains("secret-abc"),
                "{err}"
            );
        }
    }

    #[test]
    fn reports_unreadable_file_and_accepts_json() {
        let err =
            StaticTokens::load(Path::new("/nonexistent/tokens.yaml"), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("cannot read tokens file"), "{err}");
        let json = r#"{"tokens": {"t-0123456789abcdef": {"identity": "spiffe://cluster.local/ns/a/sa/b"}}}"#;
        assert_eq!(parse(json).unwrap().len(), 1);
        assert!(parse("{}").unwrap().is_empty());
    }
}
