//! Test helpers: an in-memory certificate authority that issues real P-256 SPIFFE certificates.
//!
//! Compiled only with the `testing` feature; release binaries never contain it.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::cert::WorkloadCertificate;
use crate::identity::Identity;

/// Validity window and chain shape of a certificate issued by [`TestCa`].
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Default for IssueOptions {
    fn default() -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(24 * 3600),
        }
    }
}

/// An in-memory CA: a self-signed root, optionally with one intermediate that signs the leaves.
pub struct TestCa {
    trust_domain: String,
    root_der: CertificateDer<'static>,
    root_pem: String,
    signer: Issuer<'static, KeyPair>,
    // PEM of the intermediate, when leaves are signed by one.
    intermediate: Option<(CertificateDer<'static>, String)>,
}

impl TestCa {
    /// A CA whose root signs leaves directly.
    pub fn new(trust_domain: &str) -> Self {
        let (params, key) = ca_params("zmesh test root");
        let root = params.self_signed(&key).expect("self-sign test root");
        Self {
            trust_domain: trust_domain.to_string(),
            root_der: root.der().clone(),
            root_pem: root.pem(),
            signer: Issuer::new(params, key),
            intermediate: None,
        }
    }

    /// A CA with a root and one intermediate; leaves are signed by the intermediate.
    pub fn with_intermediate(trust_domain: &str) -> Self {
        let mut ca = Self::new(trust_domain);
        let (params, key) = ca_params("zmesh test intermediate");
        let cert = params
            .signed_by(&key, &ca.signer)
            .expect("sign test intermediate");
        ca.intermediate = Some((cert.der().clone(), cert.pem()));
        ca.signer = Issuer::new(params, key);
        ca
    }

    /// The trust domain this CA's identities are expected to use.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (DER).
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate (PEM).
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Issues a 24-hour certificate for `id`.
    pub fn issue(&self, id: &Identity) -> WorkloadCertificate {
        self.issue_with(id, &IssueOptions::default())
    }

    /// Issues a certificate for `id` with the given validity.
    pub fn issue_with(&self, id: &Identity, opts: &IssueOptions) -> WorkloadCertificate {
        let (chain, key) = self.issue_der(id, opts);
        WorkloadCertificate::new(chain, vec![self.root_der()], key).expect("valid test cert")
    }

    /// Issues a certificate and returns it as a CA response would: `([leaf, intermediates…, root], key)` in PEM.
    pub fn issue_pem(&self, id: &Identity) -> (Vec<String>, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate key");
        let leaf = leaf_params(&id.to_string(), &IssueOptions::default())
            .signed_by(&key, &self.signer)
            .expect("sign leaf");
        let mut chain = vec![leaf.pem()];
        if let Some((_, pem)) = &self.intermediate {
            chain.push(pem.clone());
        }
        chain.push(self.root_pem());
        (chain, key.serialize_pem())
    }

    /// Issues a leaf that carries only a DNS SAN (no SPIFFE id), for negative tests.
    pub fn issue_dns_only(&self, dns: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate key");
        let mut params = CertificateParams::new(vec![dns.to_string()]).expect("dns params");
        params.is_ca = IsCa::ExplicitNoCa;
        params
            .signed_by(&key, &self.signer)
            .expect("sign leaf")
            .der()
            .clone()
    }

    fn issue_der(
        &self,
        id: &Identity,
        opts: &IssueOptions,
    ) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate key");
        let leaf = leaf_params(&id.to_string(), opts)
            .signed_by(&key, &self.signer)
            .expect("sign leaf");
        let mut chain = vec![leaf.der().clone()];
        if let Some((der, _)) = &self.intermediate {
            chain.push(der.clone());
        }
        (chain, key.serialize_der())
    }
}

fn ca_params(cn: &str) -> (CertificateParams, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate CA key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "zmesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
    (params, key)
}

/// Leaf parameters for a SPIFFE workload certificate (URI SAN, client+server auth, empty subject).
fn leaf_params(uri: &str, opts: &IssueOptions) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("ia5 uri"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = opts.not_before.into();
    params.not_after = opts.not_after.into();
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intermediate_chain_has_two_certs() {
        let ca = TestCa::with_intermediate("td");
        let id: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let cert = ca.issue(&id);
        assert_eq!(cert.chain().len(), 2);
        let (pem, _) = ca.issue_pem(&id);
        assert_eq!(pem.len(), 3);
    }
}
