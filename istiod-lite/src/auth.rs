//! Who is calling, and may they act for a given workload?
//!
//! [`Authenticator`] turns request credentials into a [`Caller`]; [`NodeLocality`] answers "does a
//! pod with this namespace/service account run on that node?", which gates impersonation by node
//! agents. Both are traits so the Kubernetes implementations (TokenReview, a pod informer) can slot in
//! beside the static, file-based ones in [`token_file`].

use futures::future::BoxFuture;
use mesh_core::Identity;
use mesh_core::ca_client::{AUTHORIZATION_HEADER, CLUSTER_ID_HEADER};
use tonic::metadata::MetadataMap;

pub mod token_file;

/// Credentials presented with a request.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The bearer token.
    pub token: String,
    /// The `clusterid` metadata, when sent.
    pub cluster_id: Option<String>,
}

impl std::fmt::Debug for Credentials {
    // Tokens are secrets: never log them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads `authorization: Bearer <token>` and `clusterid` from gRPC metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, AuthError> {
        let header = metadata
            .get(AUTHORIZATION_HEADER)
            .ok_or(AuthError::MissingToken)?
            .to_str()
            .map_err(|_| AuthError::MalformedHeader("it is not printable ascii"))?;
        let (scheme, token) = header
            .split_once(' ')
            .ok_or(AuthError::MalformedHeader("expected \"Bearer <token>\""))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::MalformedHeader("the scheme is not Bearer"));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::MalformedHeader("the token is empty"));
        }
        let cluster_id = match metadata.get(CLUSTER_ID_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| AuthError::MalformedHeader("clusterid is not printable ascii"))?
                    .to_string(),
            ),
        };
        Ok(Self {
            token: token.to_string(),
            cluster_id,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's own identity.
    pub identity: Identity,
    /// The node the caller runs on, when known (needed to impersonate).
    pub node: Option<String>,
}

/// Why a caller could not be authenticated. The details are for logs only; callers get an opaque
/// status.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("no authorization metadata")]
    MissingToken,
    /// The `authorization` (or `clusterid`) metadata is not usable.
    #[error("malformed authorization metadata: {0}")]
    MalformedHeader(&'static str),
    /// The token is not known.
    #[error("unknown bearer token")]
    UnknownToken,
    /// The caller claims a cluster this CA does not serve.
    #[error("caller claims cluster {claimed:?}, but this ca serves {served:?}")]
    UnknownCluster {
        /// The `clusterid` sent.
        claimed: String,
        /// The configured cluster id.
        served: String,
    },
    /// The authentication backend could not answer (retryable).
    #[error("authentication backend unavailable: {0}")]
    Backend(String),
}

/// Authenticates request credentials.
pub trait Authenticator: Send + Sync + 'static {
    /// The caller the credentials belong to.
    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

/// The placement backend could not answer.
#[derive(Debug, thiserror::Error)]
#[error("workload placement lookup failed: {0}")]
pub struct LocalityError(pub String);

/// Knows which workloads run on which nodes.
pub trait NodeLocality: Send + Sync + 'static {
    /// Whether a pod running as `namespace/service_account` is scheduled on `node`.
    fn has_workload_on_node<'a>(
        &'a self,
        namespace: &'a str,
        service_account: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<bool, LocalityError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn parses_bearer_token_and_cluster() {
        let creds = Credentials::from_metadata(&metadata(&[
            ("authorization", "Bearer abc.def"),
            ("clusterid", "c1"),
        ]))
        .unwrap();
        assert_eq!(creds.token, "abc.def");
        assert_eq!(creds.cluster_id.as_deref(), Some("c1"));
        assert!(!format!("{creds:?}").contains("abc.def"));
        let creds =
            Credentials::from_metadata(&metadata(&[("authorization", "bearer  xyz ")])).unwrap();
        assert_eq!(creds.token, "xyz");
        assert_eq!(creds.cluster_id, None);
    }

    #[test]
    fn rejects_missing_or_malformed_authorization() {
        let cases: &[(&[(&'static str, &str)], &str)] = &[
            (&[], "no authorization"),
            (&[("authorization", "Basic abc")], "not Bearer"),
            (
                &[("authorization", "Bearer")],
                "expected \"Bearer <token>\"",
            ),
            (&[("authorization", "Bearer  ")], "token is empty"),
        ];
        for (pairs, want) in cases {
            let err = Credentials::from_metadata(&metadata(pairs)).unwrap_err();
            assert!(err.to_string().contains(want), "{pairs:?}: {err}");
        }
    }
}
