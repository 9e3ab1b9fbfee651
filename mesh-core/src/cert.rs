//! Workload certificates: a leaf with its SPIFFE identity, the chain up to the roots, and the key.
//!
//! Certificates arrive from the CA as PEM strings in Istio's order (`[leaf, intermediates…, roots]`,
//! where the last element may hold several concatenated roots). [`WorkloadCertificate::from_pem_chain`]
//! checks that order and that the leaf really names the identity it claims before anything uses it.

use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{Identity, IdentityError, SPIFFE_PREFIX};

/// Why a certificate, chain or key was rejected.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A PEM block could not be decoded.
    #[error("invalid PEM in {what}: {source}")]
    Pem {
        /// Which input was being decoded.
        what: &'static str,
        /// The decoder's error.
        source: rustls_pki_types::pem::Error,
    },
    /// The chain is empty or lacks a root.
    #[error("certificate chain is incomplete: {0}")]
    Chain(&'static str),
    /// A certificate's DER could not be parsed.
    #[error("cannot parse X.509 certificate: {0}")]
    X509(String),
    /// The leaf has no SPIFFE URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeSan,
    /// The leaf's SPIFFE URI SAN is not a valid workload identity.
    #[error("certificate SAN is not a valid identity: {0}")]
    BadSan(#[from] IdentityError),
    /// The leaf names another identity than the one expected.
    #[error("certificate is for {actual}, expected {expected}")]
    WrongIdentity {
        /// The identity the caller expected.
        expected: Box<Identity>,
        /// The identity in the certificate.
        actual: Box<Identity>,
    },
}

/// A workload's certificate and key, ready to build TLS configs from.
#[derive(Debug, Clone)]
pub struct WorkloadCertificate {
    identity: Identity,
    // Leaf first, then intermediates; never the root (peers have it already).
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    // PKCS#8 DER of the private key; kept as bytes because `PrivateKeyDer` is not `Clone`.
    key_pkcs8: Vec<u8>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl WorkloadCertificate {
    /// Builds a workload certificate from DER parts, reading identity and validity from the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        key_pkcs8: Vec<u8>,
    ) -> Result<Self, CertError> {
        let leaf = chain
            .first()
            .ok_or(CertError::Chain("no leaf certificate"))?;
        if roots.is_empty() {
            return Err(CertError::Chain("no root certificate"));
        }
        let info = LeafInfo::parse(leaf)?;
        Ok(Self {
            identity: info.identity,
            chain,
            roots,
            key_pkcs8,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Parses a CA response chain (`[leaf, intermediates…, roots]`) and the PEM PKCS#8 key.
    pub fn from_pem_chain(chain_pem: &[String], key_pem: &str) -> Result<Self, CertError> {
        let (last, rest) = chain_pem
            .split_last()
            .ok_or(CertError::Chain("empty chain"))?;
        if rest.is_empty() {
            return Err(CertError::Chain(
                "the chain needs a leaf and a root; only one element was given",
            ));
        }
        let mut chain = Vec::new();
        for pem in rest {
            chain.extend(parse_pem_certs("certificate chain", pem)?);
        }
        let roots = parse_pem_certs("root certificates", last)?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| {
            CertError::Pem {
                what: "private key",
                source,
            }
        })?;
        Self::new(chain, roots, key.secret_pkcs8_der().to_vec())
    }

    /// The SPIFFE identity in the leaf.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Leaf and intermediates, in the order TLS presents them.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The trusted roots that came with this certificate.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// A fresh copy of the private key for a TLS config.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The start of the leaf's validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The end of the leaf's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the certificate should be renewed: half-way through its lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    /// Whether the leaf has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Fails unless the leaf names `expected`.
    pub fn check_identity(&self, expected: &Identity) -> Result<(), CertError> {
        if &self.identity != expected {
            return Err(CertError::WrongIdentity {
                expected: Box::new(expected.clone()),
                actual: Box::new(self.identity.clone()),
            });
        }
        Ok(())
    }
}

/// Decodes every `CERTIFICATE` block in a PEM string (at least one is required).
pub fn parse_pem_certs(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            what,
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// Returns the identity in the first `spiffe://` URI SAN of a DER certificate.
pub fn identity_from_der(der: &CertificateDer<'_>) -> Result<Identity, CertError> {
    Ok(LeafInfo::parse(der)?.identity)
}

struct LeafInfo {
    identity: Identity,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl LeafInfo {
    fn parse(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::X509(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::X509(e.to_string()))?;
        let uri = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(SPIFFE_PREFIX) => Some(*uri),
                _ => None,
            })
            .ok_or(CertError::NoSpiffeSan)?;
        let validity = cert.validity();
        Ok(Self {
            identity: uri.parse()?,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ca_style_pem_chain() {
        let ca = TestCa::new("cluster.local");
        let (chain_pem, key_pem) = ca.issue_pem(&id("spiffe://cluster.local/ns/a/sa/b"));
        let cert = WorkloadCertificate::from_pem_chain(&chain_pem, &key_pem).unwrap();
        assert_eq!(cert.identity(), &id("spiffe://cluster.local/ns/a/sa/b"));
        assert_eq!(cert.chain().len(), 1);
        assert_eq!(cert.roots().len(), 1);
        assert!(cert.refresh_at() > cert.not_before() && cert.refresh_at() < cert.not_after());
        assert!(!cert.is_expired(SystemTime::now()));
        cert.check_identity(&id("spiffe://cluster.local/ns/a/sa/b"))
            .unwrap();
        let err = cert
            .check_identity(&id("spiffe://cluster.local/ns/a/sa/c"))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("expected spiffe://cluster.local/ns/a/sa/c")
        );
    }

    #[test]
    fn rejects_bad_chains() {
        let ca = TestCa::new("cluster.local");
        let (chain_pem, key_pem) = ca.issue_pem(&id("spiffe://cluster.local/ns/a/sa/b"));
        let only_leaf = vec![chain_pem[0].clone()];
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(&only_leaf, &key_pem),
            Err(CertError::Chain(_))
        ));
        assert!(matches!(
            WorkloadCertificate::from_pem_chain(&[], &key_pem),
            Err(CertError::Chain(_))
        ));
        let garbage = vec!["not pem".to_string(), chain_pem[1].clone()];
        let err = WorkloadCertificate::from_pem_chain(&garbage, &key_pem).unwrap_err();
        assert!(err.to_string().contains("certificate chain"), "{err}");
        let err = WorkloadCertificate::from_pem_chain(&chain_pem, "nope").unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
    }

    #[test]
    fn rejects_leaf_without_spiffe_san() {
        let ca = TestCa::new("cluster.local");
        let der = ca.issue_dns_only("example.com");
        assert!(matches!(
            identity_from_der(&der),
            Err(CertError::NoSpiffeSan)
        ));
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        assert!(matches!(identity_from_der(&junk), Err(CertError::X509(_))));
    }
}
