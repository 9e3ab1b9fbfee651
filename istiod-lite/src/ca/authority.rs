//! Signing: workload leaves for verified CSR keys, and istiod's own serving certificate.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::csr::CsrKey;
use super::store::{CaMaterial, pem_encode, random_serial};

// Leaves start slightly in the past so peers whose clocks lag a little accept them at once; never by
// more than 5% of the lifetime, so short-lived certificates still renew at their real half-life.
const LEAF_BACKDATE: Duration = Duration::from_secs(60);
const LEAF_BACKDATE_MAX_FRACTION: u32 = 20;

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The CA certificate could not be turned into an issuer.
    #[error("cannot use the ca certificate as issuer: {0}")]
    Issuer(#[source] rcgen::Error),
    /// rcgen refused the parameters or the signature failed.
    #[error("cannot sign certificate: {0}")]
    Sign(#[source] rcgen::Error),
    /// The identity cannot be encoded as a URI SAN.
    #[error("cannot encode {identity} as a uri san: {source}")]
    San {
        /// The identity.
        identity: Box<Identity>,
        /// The encoder's error.
        source: rcgen::Error,
    },
    /// The CA's signing certificate has expired.
    #[error("the ca certificate expired; it cannot sign")]
    CaExpired,
}

/// A serving certificate chain and its fresh private key.
pub struct ServingCert {
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// The PKCS#8 private key.
    pub key: PrivateKeyDer<'static>,
    /// End of the leaf's validity.
    pub not_after: SystemTime,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
}

/// The certificate authority: an issuer plus the chain every response carries.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    // PEM of the intermediates, nearest first, one per element.
    intermediates_pem: Vec<String>,
    // DER of the intermediates, for serving chains.
    intermediates: Vec<CertificateDer<'static>>,
    // All roots concatenated: the last element of every response.
    roots_pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("intermediates", &self.intermediates.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Wraps validated key material.
    pub fn new(material: CaMaterial) -> Result<Self, SignError> {
        let issuer = Issuer::from_ca_cert_der(&material.signer_cert, material.signer_key)
            .map_err(SignError::Issuer)?;
        Ok(Self {
            issuer,
            intermediates_pem: material.intermediates.iter().map(|c| to_pem(c)).collect(),
            intermediates: material.intermediates,
            roots_pem: material.roots.iter().map(|c| to_pem(c)).collect(),
            not_after: material.not_after,
        })
    }

    /// The root certificate(s), PEM: what clients must trust.
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// When the signing chain expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a workload certificate for `identity` over `key`, valid for `ttl` (never beyond the CA's
    /// own expiry), and returns the response chain `[leaf, intermediates…, roots]` in PEM.
    pub fn sign_workload(
        &self,
        key: &CsrKey,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, SignError> {
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|source| SignError::San {
                identity: Box::new(identity.clone()),
                source,
            })?;
        let mut params = self.leaf_params(ttl)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let leaf = params
            .signed_by(key, &self.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = Vec::with_capacity(self.intermediates_pem.len() + 2);
        chain.push(leaf.pem());
        chain.extend(self.intermediates_pem.iter().cloned());
        chain.push(self.roots_pem.clone());
        Ok(chain)
    }

    /// Issues a serving certificate with a new P-256 key for the given DNS names and IPs.
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<ServingCert, SignError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(SignError::Sign)?;
        let mut params = self.leaf_params(ttl)?;
        for name in dns_names {
            let name = name.clone().try_into().map_err(SignError::Sign)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let (not_before, not_after) = (params.not_before.into(), params.not_after.into());
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(SignError::Sign)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok(ServingCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }

    /// Common leaf settings: empty subject, random serial, client+server auth, not a CA.
    fn leaf_params(&self, ttl: Duration) -> Result<CertificateParams, SignError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(SignError::CaExpired);
        }
        let mut not_after = now + ttl;
        if not_after > self.not_after {
            // A leaf outliving its issuer would fail verification anyway; end it with the CA.
            tracing::warn!(ca_not_after = ?self.not_after, "shortening certificate to ca expiry");
            not_after = self.not_after;
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let backdate = LEAF_BACKDATE.min(ttl / LEAF_BACKDATE_MAX_FRACTION);
        params.not_before = (now - backdate).into();
        params.not_after = not_after.into();
        Ok(params)
    }
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    pem_encode("CERTIFICATE", der)
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::UnixTime;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

    use super::*;
    use crate::ca::csr::parse_csr;
    use crate::ca::store::{init_self_signed, load_dir};
    use crate::testing::write_intermediate_cacerts;

    fn csr_key() -> CsrKey {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        parse_csr(&pem).unwrap()
    }

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Verifies `chain` ([leaf, intermediates…, roots]) with webpki for client and server auth.
    pub(crate) fn verify_chain(chain: &[String]) {
        let leaf = der(&chain[0]).remove(0);
        let intermediates: Vec<_> = chain[1..chain.len() - 1]
            .iter()
            .flat_map(|p| der(p))
            .collect();
        let roots = der(chain.last().unwrap());
        let anchors: Vec<_> = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned())
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .unwrap();
        }
    }

    #[test]
    fn signs_spiffe_leaf_with_istio_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::new(
            init_self_signed(
                tmp.path(),
                "cluster.local",
                Duration::from_secs(86400 * 365),
            )
            .unwrap(),
        )
        .unwrap();
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let ttl = Duration::from_secs(3600);
        let chain = ca.sign_workload(&csr_key(), &id, ttl).unwrap();
        assert_eq!(chain.len(), 2, "[leaf, root]");
        assert_eq!(chain[1], ca.roots_pem());
        verify_chain(&chain);

        let leaf_der = der(&chain[0]).remove(0);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        assert_eq!(leaf.subject().iter_attributes().count(), 0, "empty subject");
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "san must be critical with an empty subject");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/cart")]
        );
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let serial = leaf.raw_serial();
        assert!(serial.len() >= 16 && serial[0] & 0x80 == 0, "{serial:?}");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let nb = leaf.validity().not_before.timestamp();
        let na = leaf.validity().not_after.timestamp();
        assert!(
            (now - 70..=now - 50).contains(&nb),
            "backdated about a minute: {nb} vs {now}"
        );
        assert!((now + 3590..=now + 3610).contains(&na), "{na} vs {now}");
    }

    #[test]
    fn intermediate_ca_chain_is_leaf_intermediate_root() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, intermediate) = write_intermediate_cacerts(tmp.path());
        let ca = CertificateAuthority::new(load_dir(tmp.path()).unwrap()).unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let chain = ca
            .sign_workload(&csr_key(), &id, Duration::from_secs(60))
            .unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[1], intermediate.cert_pem);
        assert_eq!(chain[2], root.cert_pem);
        verify_chain(&chain);
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::new(
            init_self_signed(tmp.path(), "cluster.local", Duration::from_secs(7200)).unwrap(),
        )
        .unwrap();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let chain = ca
            .sign_workload(&csr_key(), &id, Duration::from_secs(86400))
            .unwrap();
        let leaf_der = der(&chain[0]).remove(0);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let ca_end = ca
            .not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            leaf.validity().not_after.timestamp(),
            ca_end.as_secs() as i64
        );
    }

    #[test]
    fn serving_cert_has_dns_and_ip_sans() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, _) = write_intermediate_cacerts(tmp.path());
        let ca = CertificateAuthority::new(load_dir(tmp.path()).unwrap()).unwrap();
        let cert = ca
            .issue_serving(
                &["istiod.istio-system.svc".into(), "localhost".into()],
                &["127.0.0.1".parse().unwrap()],
                Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf and intermediate, no root");
        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        let names = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .clone();
        assert!(names.contains(&GeneralName::DNSName("istiod.istio-system.svc")));
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    }
}
