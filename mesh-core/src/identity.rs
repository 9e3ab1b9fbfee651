//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! This is the only identity shape the mesh issues or accepts (Istio's convention). Parsing is strict:
//! anything that is not exactly that shape is rejected with an error naming the offending part, so a
//! malformed SAN or config value can never silently become a different identity.

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix of every SPIFFE id.
pub const SPIFFE_PREFIX: &str = "spiffe://";

/// The trust domain used when none is configured (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

// SPIFFE caps trust domains at 255 bytes and whole ids at 2048 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a valid SPIFFE workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The id does not start with `spiffe://`.
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    MissingScheme(String),
    /// The id is longer than SPIFFE allows.
    #[error("identity is {0} bytes long, more than the {MAX_ID_LEN} SPIFFE allows")]
    TooLong(usize),
    /// The trust domain is empty, too long or has characters SPIFFE forbids.
    #[error("invalid trust domain {domain:?}: {reason}")]
    TrustDomain {
        /// The rejected trust domain.
        domain: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("identity path {0:?} is not of the form /ns/<namespace>/sa/<service-account>")]
    Path(String),
    /// A namespace or service-account segment is empty or has characters that are not allowed.
    #[error("invalid {what} {value:?}: {reason}")]
    Segment {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A SPIFFE workload identity of the form `spiffe://<td>/ns/<ns>/sa/<sa>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from its parts, validating each one.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let (trust_domain, namespace, service_account) = (
            trust_domain.into(),
            namespace.into(),
            service_account.into(),
        );
        validate_trust_domain(&trust_domain)?;
        validate_segment("namespace", &namespace)?;
        validate_segment("service account", &service_account)?;
        let id = Self {
            trust_domain,
            namespace,
            service_account,
        };
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(IdentityError::TooLong(len));
        }
        Ok(id)
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The identity without the `spiffe://` scheme, as authorization policies write principals
    /// (`cluster.local/ns/default/sa/sleep`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_PREFIX}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(IdentityError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SPIFFE_PREFIX)
            .ok_or_else(|| IdentityError::MissingScheme(s.to_string()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["", "ns", ns, "sa", sa] => Identity::new(trust_domain, *ns, *sa),
            _ => Err(IdentityError::Path(path.to_string())),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain against the SPIFFE character set: lowercase letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(domain: &str) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::TrustDomain {
        domain: domain.to_string(),
        reason,
    };
    if domain.is_empty() {
        return Err(err("it is empty"));
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(err("it is longer than 255 bytes"));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if !domain.chars().all(ok) {
        return Err(err(
            "only lowercase letters, digits, '.', '-' and '_' are allowed",
        ));
    }
    Ok(())
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let err = |reason| IdentityError::Segment {
        what,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value == "." || value == ".." {
        return Err(err("'.' and '..' are not allowed"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if !value.chars().all(ok) {
        return Err(err("only letters, digits, '.', '-' and '_' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn rejects_malformed_ids_with_named_problem() {
        let cases: &[(&str, &str)] = &[
            ("cluster.local/ns/a/sa/b", "does not start with"),
            ("spiffe://", "trust domain \"\": it is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "only lowercase"),
            ("spiffe://td", "is not of the form"),
            ("spiffe://td/ns/a", "is not of the form"),
            ("spiffe://td/ns/a/sa/b/extra", "is not of the form"),
            ("spiffe://td/ns//sa/b", "invalid namespace \"\""),
            ("spiffe://td/ns/a/sa/", "invalid service account \"\""),
            ("spiffe://td/ns/../sa/b", "'.' and '..'"),
            ("spiffe://td/ns/a b/sa/c", "only letters"),
            ("spiffe://td/ns/a/sa/b?x=1", "only letters"),
            ("spiffe://td/ns/a/svc/b", "is not of the form"),
            ("spiffe://td:8080/ns/a/sa/b", "only lowercase"),
        ];
        for (input, want) in cases {
            let err = input.parse::<Identity>().unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{input}: {err:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn rejects_overlong_ids() {
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(3000));
        assert!(matches!(
            long.parse::<Identity>(),
            Err(IdentityError::TooLong(_))
        ));
        let td = "a".repeat(256);
        assert!(Identity::new(td, "a", "b").is_err());
    }

    #[test]
    fn serde_uses_the_uri_form() {
        let id = Identity::new("td", "ns1", "sa1").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://td/ns/ns1/sa/sa1\"");
        let back: Identity = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        assert!(serde_json::from_str::<Identity>("\"spiffe://td/x\"").is_err());
    }
}
