//! CA key material on disk, in Istio's `cacerts` layout.
//!
//! | file | content |
//! |---|---|
//! | `ca-cert.pem` | the signing certificate (a root in self-signed mode, usually an intermediate when plugged in) |
//! | `ca-key.pem` | its private key (PKCS#8, SEC1 or PKCS#1 PEM) |
//! | `root-cert.pem` | the root(s) clients trust |
//! | `cert-chain.pem` | `ca-cert` and its issuers up to the root (the root itself may be included) |
//!
//! [`load_dir`] validates everything before the CA signs anything: files present, key matches
//! certificate, signing certificate is a CA, nothing expired, chain links to a root.
//! [`init_self_signed`] creates that layout with a fresh P-256 root on first start and reloads it on
//! every later start, so the mesh keeps one root across restarts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The signing certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The signing key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The trusted root(s).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing certificate's chain to the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
const ALL_FILES: [&str; 4] = [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE];
// Tolerate small clock differences between this host and the machines verifying the root.
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);

/// Why CA material could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A required file does not exist.
    #[error("ca file {path} is missing")]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// Only some of the files exist: refusing to guess or overwrite.
    #[error(
        "ca directory {dir} is incomplete (has {present:?}, lacks {missing:?}); restore the missing \
         files or empty the directory to generate a new root"
    )]
    Partial {
        /// The directory.
        dir: PathBuf,
        /// Files found.
        present: Vec<&'static str>,
        /// Files not found.
        missing: Vec<&'static str>,
    },
    /// A file could not be read or written.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// `read`, `write`, …
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file's content is unusable.
    #[error("invalid {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificates do not form a chain from the signing certificate to a root.
    #[error("invalid ca chain in {dir}: {reason}")]
    Chain {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating the self-signed root failed.
    #[error("cannot generate self-signed root: {0}")]
    Generate(#[source] rcgen::Error),
}

/// Validated CA key material.
pub struct CaMaterial {
    /// The signing certificate.
    pub signer_cert: CertificateDer<'static>,
    /// Its private key.
    pub signer_key: KeyPair,
    /// The certificates between a leaf and the root: the signer (unless it is a root itself) and
    /// its issuers, nearest first.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The trusted roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Earliest expiry of the signer and its intermediates: no leaf may outlive it.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for CaMaterial {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("intermediates", &self.intermediates.len())
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// Whether the signing certificate is itself one of the roots.
    pub fn is_root(&self) -> bool {
        self.roots.contains(&self.signer_cert)
    }
}

/// Loads and validates an Istio `cacerts` directory.
pub fn load_dir(dir: &Path) -> Result<CaMaterial, StoreError> {
    let signer_path = dir.join(CA_CERT_FILE);
    let signers = read_certs(&signer_path)?;
    let [signer_cert] = <[_; 1]>::try_from(signers).map_err(|certs| StoreError::Invalid {
        path: signer_path.clone(),
        reason: format!("expected exactly one certificate, found {}", certs.len()),
    })?;
    let key_path = dir.join(CA_KEY_FILE);
    let signer_key = read_key(&key_path)?;
    let signer = parse(&signer_path, &signer_cert)?;
    check_key_matches(&signer, &signer_key, &key_path)?;
    check_is_ca(&signer, &signer_path)?;
    check_validity(&signer, &signer_path)?;

    let root_path = dir.join(ROOT_CERT_FILE);
    let roots = read_certs(&root_path)?;
    for root in &roots {
        check_validity(&parse(&root_path, root)?, &root_path)?;
    }
    let intermediates = if roots.contains(&signer_cert) {
        Vec::new()
    } else {
        chain_intermediates(dir, &signer_cert, &roots)?
    };
    let not_after = earliest_expiry(&signer_cert, &intermediates, &signer_path)?;
    Ok(CaMaterial {
        signer_cert,
        signer_key,
        intermediates,
        roots,
        not_after,
    })
}

/// Loads the self-signed CA from `dir`, generating a P-256 root valid for `root_ttl` when `dir`
/// holds none of the CA files. A partially populated directory is an error, never overwritten.
pub fn init_self_signed(
    dir: &Path,
    organization: &str,
    root_ttl: Duration,
) -> Result<CaMaterial, StoreError> {
    let (present, missing): (Vec<&'static str>, Vec<&'static str>) =
        ALL_FILES.iter().partition(|f| dir.join(f).exists());
    if missing.is_empty() {
        return load_dir(dir);
    }
    if !present.is_empty() {
        return Err(StoreError::Partial {
            dir: dir.to_path_buf(),
            present,
            missing,
        });
    }
    let (cert_pem, key_pem) = generate_root(organization, root_ttl)?;
    persist(dir, &cert_pem, &key_pem)?;
    tracing::info!(dir = %dir.display(), "generated self-signed root ca");
    load_dir(dir)
}

fn generate_root(organization: &str, ttl: Duration) -> Result<(String, String), StoreError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(StoreError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, organization);
    params
        .distinguished_name
        .push(DnType::CommonName, "zmesh root ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - ROOT_BACKDATE).into();
    params.not_after = (now + ttl).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(StoreError::Generate)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A random positive 128-bit serial number.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive (top bit clear) and never starting with a zero byte, so DER keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

// The key is written first and the root last: a crash part-way leaves a directory that
// `init_self_signed` reports as incomplete instead of silently replacing.
fn persist(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Io {
            op: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
    write_atomic(&dir.join(CA_KEY_FILE), key_pem, 0o600)?;
    write_atomic(&dir.join(CA_CERT_FILE), cert_pem, 0o644)?;
    write_atomic(&dir.join(CERT_CHAIN_FILE), cert_pem, 0o644)?;
    write_atomic(&dir.join(ROOT_CERT_FILE), cert_pem, 0o644)
}

/// Encodes DER as a PEM block with 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes `contents` to a temporary file beside `path` with `mode`, syncs it and renames it over
/// `path`, so readers never see a half-written file.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), StoreError> {
    let io = |op, source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
}

fn read(path: &Path) -> Result<String, StoreError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StoreError::Missing {
            path: path.to_path_buf(),
        },
        _ => StoreError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        },
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block found"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<KeyPair, StoreError> {
    let text = read(path)?;
    KeyPair::from_pem(&text).map_err(|e| invalid(path, format!("unusable private key: {e}")))
}

fn parse<'a>(path: &Path, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, StoreError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| invalid(path, format!("cannot parse certificate: {e}")))
}

fn check_key_matches(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    key_path: &Path,
) -> Result<(), StoreError> {
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(invalid(
            key_path,
            format!("the key does not belong to the certificate in {CA_CERT_FILE}"),
        ));
    }
    Ok(())
}

fn check_is_ca(cert: &X509Certificate<'_>, path: &Path) -> Result<(), StoreError> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| invalid(path, format!("bad basic constraints: {e}")))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(invalid(
            path,
            "the certificate is not a CA (basic constraints CA:TRUE missing)",
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| invalid(path, format!("bad key usage: {e}")))?;
    if ku.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(invalid(path, "the key usage does not allow keyCertSign"));
    }
    Ok(())
}

fn check_validity(cert: &X509Certificate<'_>, path: &Path) -> Result<(), StoreError> {
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(invalid(
            path,
            format!("the certificate expired at {}", validity.not_after),
        ));
    }
    if validity.not_before > now {
        return Err(invalid(
            path,
            format!(
                "the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    Ok(())
}

/// The signer and its issuers below the root, from `cert-chain.pem`, checked link by link.
fn chain_intermediates(
    dir: &Path,
    signer: &CertificateDer<'static>,
    roots: &[CertificateDer<'static>],
) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let chain_path = dir.join(CERT_CHAIN_FILE);
    let mut chain = read_certs(&chain_path)?;
    if chain.first() != Some(signer) {
        return Err(invalid(
            &chain_path,
            format!("the chain must start with the certificate in {CA_CERT_FILE}"),
        ));
    }
    chain.remove(0);
    chain.retain(|c| !roots.contains(c));
    let mut child = signer.clone();
    for issuer in &chain {
        check_validity(&parse(&chain_path, issuer)?, &chain_path)?;
        verify_link(dir, &child, std::slice::from_ref(issuer))?;
        child = issuer.clone();
    }
    verify_link(dir, &child, roots)?;
    chain.insert(0, signer.clone());
    Ok(chain)
}

fn verify_link(
    dir: &Path,
    child: &CertificateDer<'_>,
    issuers: &[CertificateDer<'_>],
) -> Result<(), StoreError> {
    let chain_err = |reason: String| StoreError::Chain {
        dir: dir.to_path_buf(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(child).map_err(|e| chain_err(e.to_string()))?;
    let signed = issuers.iter().any(|issuer| {
        X509Certificate::from_der(issuer).is_ok_and(|(_, issuer)| {
            issuer.subject() == cert.issuer()
                && cert.verify_signature(Some(issuer.public_key())).is_ok()
        })
    });
    if !signed {
        return Err(chain_err(format!(
            "\"{}\" is not signed by the next certificate of {CERT_CHAIN_FILE} nor by a root in \
             {ROOT_CERT_FILE}",
            cert.subject()
        )));
    }
    Ok(())
}

fn earliest_expiry(
    signer: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    path: &Path,
) -> Result<SystemTime, StoreError> {
    let mut earliest = None;
    for der in std::iter::once(signer).chain(intermediates) {
        let secs = parse(path, der)?.validity().not_after.timestamp();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        earliest = Some(earliest.map_or(t, |e: SystemTime| e.min(t)));
    }
    Ok(earliest.unwrap_or(SystemTime::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::testing::{FixtureCert, FixtureOptions, write_cacerts, write_intermediate_cacerts};

    const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 86400);

    fn expect_err(dir: &Path, want: &str) {
        let err = load_dir(dir).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }

    #[test]
    fn self_signed_root_is_generated_once_and_reloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let first = init_self_signed(&dir, "cluster.local", TEN_YEARS).unwrap();
        assert!(first.is_root());
        assert!(first.intermediates.is_empty());
        let key_mode = fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let (_, root) = X509Certificate::from_der(&first.roots[0]).unwrap();
        assert!(root.is_ca());
        assert_eq!(root.subject(), root.issuer());
        let curve = root.public_key().algorithm.parameters.as_ref().unwrap();
        assert_eq!(
            curve.as_oid().unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(life >= TEN_YEARS.as_secs() as i64, "{life}");

        let second = init_self_signed(&dir, "cluster.local", TEN_YEARS).unwrap();
        assert_eq!(first.roots, second.roots, "restart must keep the same root");
        assert_eq!(
            first.signer_key.serialize_der(),
            second.signer_key.serialize_der()
        );
    }

    #[test]
    fn partial_directory_is_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        init_self_signed(tmp.path(), "cluster.local", TEN_YEARS).unwrap();
        let root_before = fs::read_to_string(tmp.path().join(ROOT_CERT_FILE)).unwrap();
        fs::remove_file(tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = init_self_signed(tmp.path(), "cluster.local", TEN_YEARS).unwrap_err();
        assert!(matches!(err, StoreError::Partial { .. }), "{err}");
        assert!(err.to_string().contains("lacks [\"ca-key.pem\"]"), "{err}");
        let root_after = fs::read_to_string(tmp.path().join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(root_before, root_after);
    }

    #[test]
    fn loads_intermediate_cacerts() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, intermediate) = write_intermediate_cacerts(tmp.path());
        let material = load_dir(tmp.path()).unwrap();
        assert!(!material.is_root());
        assert_eq!(material.intermediates.len(), 1);
        assert_eq!(
            pem_encode("CERTIFICATE", &material.intermediates[0]),
            intermediate.cert_pem
        );
        assert_eq!(pem_encode("CERTIFICATE", &material.roots[0]), root.cert_pem);
        assert_eq!(
            pem_encode("CERTIFICATE", &material.signer_cert),
            intermediate.cert_pem
        );

        // A cert-chain.pem without the root is just as good.
        fs::write(tmp.path().join(CERT_CHAIN_FILE), &intermediate.cert_pem).unwrap();
        assert_eq!(load_dir(tmp.path()).unwrap().intermediates.len(), 1);
    }

    #[test]
    fn loads_two_level_intermediate_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let root = FixtureCert::root("root");
        let mid = root.intermediate("mid");
        let leafca = mid.intermediate("issuing");
        let chain = format!("{}{}{}", leafca.cert_pem, mid.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &leafca, &chain, &root.cert_pem);
        let material = load_dir(tmp.path()).unwrap();
        assert_eq!(
            material.intermediates.len(),
            2,
            "issuing and mid, not the root"
        );

        // Leaving the middle link out breaks the chain.
        let chain = format!("{}{}", leafca.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &leafca, &chain, &root.cert_pem);
        expect_err(tmp.path(), "is not signed by the next certificate");
    }

    #[test]
    fn reports_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        write_intermediate_cacerts(tmp.path());
        for file in ALL_FILES {
            let sub = tempfile::tempdir().unwrap();
            for f in ALL_FILES {
                fs::copy(tmp.path().join(f), sub.path().join(f)).unwrap();
            }
            fs::remove_file(sub.path().join(file)).unwrap();
            let want = format!("{} is missing", sub.path().join(file).display());
            expect_err(sub.path(), &want);
        }
    }

    #[test]
    fn rejects_key_that_does_not_match() {
        let tmp = tempfile::tempdir().unwrap();
        write_intermediate_cacerts(tmp.path());
        let other = FixtureCert::root("other");
        fs::write(tmp.path().join(CA_KEY_FILE), &other.key_pem).unwrap();
        expect_err(
            tmp.path(),
            "the key does not belong to the certificate in ca-cert.pem",
        );
        fs::write(tmp.path().join(CA_KEY_FILE), "garbage").unwrap();
        expect_err(tmp.path(), "unusable private key");
    }

    #[test]
    fn rejects_non_ca_and_expired_signers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = FixtureCert::root("root");
        let opts = FixtureOptions {
            is_ca: false,
            ..FixtureOptions::default()
        };
        let leaf = FixtureCert::build("not a ca", Some(&root), &opts);
        let chain = format!("{}{}", leaf.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &leaf, &chain, &root.cert_pem);
        expect_err(tmp.path(), "the certificate is not a CA");

        let now = SystemTime::now();
        let opts = FixtureOptions {
            is_ca: true,
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        };
        let expired = FixtureCert::build("expired", Some(&root), &opts);
        let chain = format!("{}{}", expired.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &expired, &chain, &root.cert_pem);
        expect_err(tmp.path(), "the certificate expired at");

        let future = FixtureOptions {
            is_ca: true,
            not_before: now + Duration::from_secs(3600),
            not_after: now + Duration::from_secs(7200),
        };
        let early = FixtureCert::build("future", Some(&root), &future);
        let chain = format!("{}{}", early.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &early, &chain, &root.cert_pem);
        expect_err(tmp.path(), "is not valid before");
    }

    #[test]
    fn rejects_broken_chains_and_pem() {
        let tmp = tempfile::tempdir().unwrap();
        let root = FixtureCert::root("root");
        let intermediate = root.intermediate("intermediate");
        let stranger = FixtureCert::root("stranger");
        let chain = format!("{}{}", intermediate.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &intermediate, &chain, &stranger.cert_pem);
        expect_err(tmp.path(), "nor by a root in root-cert.pem");

        write_cacerts(tmp.path(), &intermediate, &root.cert_pem, &root.cert_pem);
        expect_err(tmp.path(), "must start with the certificate in ca-cert.pem");

        write_cacerts(tmp.path(), &intermediate, &chain, "nothing here");
        expect_err(tmp.path(), "no CERTIFICATE block found");

        let two = format!("{}{}", intermediate.cert_pem, root.cert_pem);
        write_cacerts(tmp.path(), &intermediate, &chain, &root.cert_pem);
        fs::write(tmp.path().join(CA_CERT_FILE), two).unwrap();
        expect_err(tmp.path(), "expected exactly one certificate, found 2");
    }

    #[test]
    fn serials_are_positive_and_random() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_ne!(a, b);
    }
}
