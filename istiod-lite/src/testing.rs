//! Test helpers: PKI fixtures written in Istio's `cacerts` layout, tokens files and configs.
//!
//! Compiled only with the `testing` feature; release binaries never contain it.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};

use crate::ca::store::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};
use crate::config;

/// Shape of a fixture certificate.
#[derive(Debug, Clone)]
pub struct FixtureOptions {
    /// Mark it as a CA.
    pub is_ca: bool,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        let now = SystemTime::now();
        Self {
            is_ca: true,
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(365 * 86400),
        }
    }
}

/// A fixture certificate with its key.
pub struct FixtureCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 key.
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl FixtureCert {
    /// A self-signed root CA.
    pub fn root(cn: &str) -> Self {
        Self::build(cn, None, &FixtureOptions::default())
    }

    /// An intermediate CA signed by `self`.
    pub fn intermediate(&self, cn: &str) -> Self {
        Self::build(cn, Some(self), &FixtureOptions::default())
    }

    /// A certificate signed by `parent` (self-signed when `None`) with `opts`.
    pub fn build(cn: &str, parent: Option<&FixtureCert>, opts: &FixtureOptions) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("generate key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        if opts.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
        }
        params.not_before = opts.not_before.into();
        params.not_after = opts.not_after.into();
        let cert = match parent {
            Some(parent) => params.signed_by(&key, &parent.issuer),
            None => params.self_signed(&key),
        }
        .expect("sign fixture");
        let key_pem = key.serialize_pem();
        Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        }
    }
}

/// Writes a `cacerts` directory: `signer` with its key, `chain_pem` as `cert-chain.pem`, `root_pem`.
pub fn write_cacerts(dir: &Path, signer: &FixtureCert, chain_pem: &str, root_pem: &str) {
    std::fs::create_dir_all(dir).expect("create cacerts dir");
    let write = |name: &str, content: &str| {
        std::fs::write(dir.join(name), content).expect("write cacerts file");
    };
    write(CA_CERT_FILE, &signer.cert_pem);
    write(CA_KEY_FILE, &signer.key_pem);
    write(CERT_CHAIN_FILE, chain_pem);
    write(ROOT_CERT_FILE, root_pem);
}

/// A root and an intermediate, written as Istio's sample plugged-in CA: `cert-chain.pem` is the
/// intermediate followed by the root. Returns `(root, intermediate)`.
pub fn write_intermediate_cacerts(dir: &Path) -> (FixtureCert, FixtureCert) {
    let root = FixtureCert::root("fixture root");
    let intermediate = root.intermediate("fixture intermediate");
    let chain = format!("{}{}", intermediate.cert_pem, root.cert_pem);
    write_cacerts(dir, &intermediate, &chain, &root.cert_pem);
    (root, intermediate)
}

/// A config source for a server on `127.0.0.1:0` keeping all its files under `dir`.
pub fn local_config(dir: &Path, tokens_file: &Path) -> HashMap<String, String> {
    let path = |p: &str| dir.join(p).display().to_string();
    HashMap::from([
        (config::GRPC_ADDR.to_string(), "127.0.0.1:0".to_string()),
        (config::CA_DIR.to_string(), path("ca")),
        (config::ROOT_CERT_OUT.to_string(), path("out/root-cert.pem")),
        (
            config::TOKENS_FILE.to_string(),
            tokens_file.display().to_string(),
        ),
        (config::DRAIN_TIMEOUT.to_string(), "1s".to_string()),
    ])
}
