//! istiod's own TLS serving certificate: signed by the CA at start, renewed at half-life, swapped
//! into the TLS config without a restart.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::ca::CertificateAuthority;
use crate::ca::authority::SignError;

// After a failed renewal, try again this soon (the current certificate is still valid).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Why the serving certificate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    /// The CA could not sign it.
    #[error("cannot issue serving certificate: {0}")]
    Sign(#[from] SignError),
    /// rustls could not load the key.
    #[error("cannot load serving key: {0}")]
    Key(#[source] rustls::Error),
    /// rustls refused the TLS configuration.
    #[error("cannot build tls config: {0}")]
    Tls(#[source] rustls::Error),
}

/// What the serving certificate must name, and for how long it lives.
#[derive(Debug, Clone)]
pub struct ServingCertSpec {
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Lifetime.
    pub ttl: Duration,
}

/// Serves whatever certificate was stored last, for every SNI.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
    // When the current certificate should be renewed.
    refresh_at: RwLock<SystemTime>,
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl ServingCertResolver {
    /// Issues the first certificate.
    pub fn new(
        authority: &CertificateAuthority,
        spec: &ServingCertSpec,
    ) -> Result<Self, ServingCertError> {
        let (key, refresh_at) = issue(authority, spec)?;
        Ok(Self {
            current: RwLock::new(key),
            refresh_at: RwLock::new(refresh_at),
        })
    }

    /// The certificate currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Issues a new certificate and serves it from now on.
    pub fn renew(
        &self,
        authority: &CertificateAuthority,
        spec: &ServingCertSpec,
    ) -> Result<(), ServingCertError> {
        let (key, refresh_at) = issue(authority, spec)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        *self.refresh_at.write().unwrap_or_else(|e| e.into_inner()) = refresh_at;
        Ok(())
    }

    fn refresh_at(&self) -> SystemTime {
        *self.refresh_at.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews at each half-life until `shutdown`.
    pub async fn rotate(
        self: Arc<Self>,
        authority: Arc<CertificateAuthority>,
        spec: ServingCertSpec,
        shutdown: CancellationToken,
    ) {
        loop {
            let wait = self
                .refresh_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew(&authority, &spec) {
                Ok(()) => tracing::info!("serving certificate renewed"),
                Err(error) => {
                    tracing::error!(%error, "serving certificate renewal failed");
                    *self.refresh_at.write().unwrap_or_else(|e| e.into_inner()) =
                        SystemTime::now() + RETRY_AFTER_FAILURE;
                }
            }
        }
    }
}

fn issue(
    authority: &CertificateAuthority,
    spec: &ServingCertSpec,
) -> Result<(Arc<CertifiedKey>, SystemTime), ServingCertError> {
    let cert = authority.issue_serving(&spec.dns_names, &spec.ips, spec.ttl)?;
    let provider = provider();
    let key = provider
        .key_provider
        .load_private_key(cert.key)
        .map_err(ServingCertError::Key)?;
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or_default();
    let refresh_at = cert.not_before + lifetime / 2;
    Ok((Arc::new(CertifiedKey::new(cert.chain, key)), refresh_at))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS 1.3-only, HTTP/2-only server config presenting the resolver's certificate; no client
/// certificates (callers authenticate with bearer tokens).
pub fn tls_config(
    resolver: Arc<ServingCertResolver>,
) -> Result<Arc<ServerConfig>, ServingCertError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ServingCertError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::init_self_signed;

    fn authority() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
        let dir = tempfile::tempdir().unwrap();
        let material =
            init_self_signed(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
        (dir, Arc::new(CertificateAuthority::new(material).unwrap()))
    }

    fn spec(ttl: Duration) -> ServingCertSpec {
        ServingCertSpec {
            dns_names: vec!["localhost".into()],
            ips: vec![IpAddr::from([127, 0, 0, 1])],
            ttl,
        }
    }

    #[test]
    fn renew_swaps_the_served_certificate() {
        let (_dir, ca) = authority();
        let resolver = ServingCertResolver::new(&ca, &spec(Duration::from_secs(3600))).unwrap();
        let before = resolver.current();
        resolver
            .renew(&ca, &spec(Duration::from_secs(3600)))
            .unwrap();
        assert_ne!(before.cert[0], resolver.current().cert[0]);
        let config = tls_config(Arc::new(resolver)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[tokio::test]
    async fn rotates_at_half_life_until_shutdown() {
        let (_dir, ca) = authority();
        let spec = spec(Duration::from_secs(2));
        let resolver = Arc::new(ServingCertResolver::new(&ca, &spec).unwrap());
        let first = resolver.current();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(resolver.clone().rotate(ca, spec, shutdown.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::ptr_eq(&first, &resolver.current()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no renewal within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("rotation stops on shutdown")
            .unwrap();
    }
}
