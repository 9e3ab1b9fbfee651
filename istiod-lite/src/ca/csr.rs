//! Certificate signing request checks.
//!
//! Only the public key of a CSR matters: the CA decides subject, SANs, usages and lifetime itself.
//! The CSR must be a single well-formed PKCS#10 request for an ECDSA P-256 key whose signature
//! verifies (proof that the requester holds the private key).

use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};
use x509_parser::prelude::{FromDer, X509CertificationRequest};
use x509_parser::x509::AlgorithmIdentifier;

// A P-256 CSR is well under 1 KiB; anything this large is abuse or a mistake.
const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// Why a CSR was rejected; every message names the problem for the caller.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The `csr` field is empty.
    #[error("the csr is empty")]
    Empty,
    /// The CSR is implausibly large.
    #[error("the csr is {0} bytes long, more than the {MAX_CSR_PEM_LEN} allowed")]
    TooLarge(usize),
    /// No decodable `CERTIFICATE REQUEST` PEM block.
    #[error("the csr is not a PEM \"CERTIFICATE REQUEST\": {0}")]
    Pem(String),
    /// The DER inside the PEM is not a PKCS#10 request.
    #[error("the csr is not a valid PKCS#10 request: {0}")]
    Der(String),
    /// The key is not ECDSA P-256.
    #[error("the csr key is {0}; only ECDSA P-256 keys are accepted")]
    KeyType(String),
    /// The self-signature does not verify.
    #[error("the csr signature does not verify (no proof of possession of the key)")]
    Signature,
}

/// The verified public key of a CSR.
#[derive(Debug, Clone)]
pub struct CsrKey(SubjectPublicKeyInfo);

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.0.algorithm()
    }
}

/// Parses a PEM CSR, checks its key type and signature, and returns its public key.
pub fn parse_csr(pem: &str) -> Result<CsrKey, CsrError> {
    if pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    if pem.len() > MAX_CSR_PEM_LEN {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Der(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Der(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    if !is_p256(&spki.algorithm) {
        return Err(CsrError::KeyType(describe_key(&spki.algorithm)));
    }
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let key = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| CsrError::KeyType(format!("an unreadable EC key ({e})")))?;
    // Belt and braces: rcgen must agree this is P-256 before we certify it.
    if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::KeyType(
            "an EC key rcgen does not read as P-256".into(),
        ));
    }
    Ok(CsrKey(key))
}

fn curve(alg: &AlgorithmIdentifier<'_>) -> Option<String> {
    let oid = alg.parameters.as_ref()?.as_oid().ok()?;
    Some(oid.to_id_string())
}

fn is_p256(alg: &AlgorithmIdentifier<'_>) -> bool {
    alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve(alg).as_deref() == Some(OID_EC_P256.to_id_string().as_str())
}

fn describe_key(alg: &AlgorithmIdentifier<'_>) -> String {
    if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        "RSA".to_string()
    } else if alg.algorithm == OID_SIG_ED25519 {
        "Ed25519".to_string()
    } else if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let name = match curve(alg).as_deref() {
            Some("1.3.132.0.34") => "P-384".to_string(),
            Some("1.3.132.0.35") => "P-521".to_string(),
            Some(other) => format!("curve {other}"),
            None => "an unnamed curve".to_string(),
        };
        format!("EC {name}")
    } else {
        format!("algorithm {}", alg.algorithm.to_id_string())
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};

    use super::*;

    fn csr_with(alg: &'static SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn accepts_p256_csr() {
        let key = parse_csr(&csr_with(&PKCS_ECDSA_P256_SHA256)).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn rejects_other_key_types_by_name() {
        let err = parse_csr(&csr_with(&PKCS_ECDSA_P384_SHA384)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the csr key is EC P-384; only ECDSA P-256 keys are accepted"
        );
        let err = parse_csr(&csr_with(&PKCS_ED25519)).unwrap_err();
        assert!(err.to_string().contains("is Ed25519"), "{err}");
    }

    #[test]
    fn rejects_malformed_input() {
        let good = csr_with(&PKCS_ECDSA_P256_SHA256);
        let cases: Vec<(String, &str)> =
            vec![
            (String::new(), "the csr is empty"),
            ("x".repeat(20_000), "more than the 16384 allowed"),
            ("hello".into(), "not a PEM \"CERTIFICATE REQUEST\""),
            (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
                "not a valid PKCS#10 request",
            ),
            (good.replace("CERTIFICATE REQUEST", "CERTIFICATE"), "not a PEM"),
        ];
        for (pem, want) in cases {
            let err = parse_csr(&pem).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn rejects_a_tampered_signature() {
        let pem = csr_with(&PKCS_ECDSA_P256_SHA256);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // The signature is at the end of the DER; flipping its last byte breaks it.
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = crate::ca::store::pem_encode("CERTIFICATE REQUEST", &der);
        let err = parse_csr(&tampered).unwrap_err();
        assert!(matches!(err, CsrError::Signature), "{err}");
    }
}
