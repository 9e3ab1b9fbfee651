//! Workload certificates as the proxies use them: fetched through the [`CertificateManager`]
//! (which rotates them at half-life), turned into TLS configs once per certificate, and kept off
//! the data-plane runtime (the manager's per-identity workers run on the control runtime).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::FutureExt;
use futures::future::BoxFuture;
use mesh_core::Identity;
use mesh_core::WorkloadCertificate;
use mesh_core::cert_manager::{CertManagerError, CertificateManager};
use mesh_core::hbone::client::ClientCerts;
use mesh_core::tls::{TlsError, WorkloadTls};
use tokio::runtime::Handle;

/// Why no TLS config is available for an identity.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// The certificate manager has no valid certificate (CA down, refused, expired, ...).
    #[error(transparent)]
    Fetch(#[from] CertManagerError),
    /// The certificate could not be turned into a TLS config.
    #[error("certificate for {identity} is unusable: {reason}")]
    Tls {
        /// The identity.
        identity: Box<Identity>,
        /// The TLS error, as text (TlsError is not Clone).
        reason: String,
    },
    /// The control runtime that fetches certificates is gone (shutting down).
    #[error("certificate fetch for {0} was aborted: ztunnel is shutting down")]
    Aborted(Box<Identity>),
}

/// One certificate and the TLS config built from it.
#[derive(Clone)]
struct Cached {
    cert: Arc<WorkloadCertificate>,
    tls: Arc<WorkloadTls>,
}

/// What `/config_dump` shows of one identity's certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertDump {
    /// The SPIFFE identity.
    pub identity: String,
    /// `ready`, `pending` or `failed`.
    pub state: &'static str,
    /// Start of validity (RFC 3339), when ready.
    pub not_before: Option<String>,
    /// End of validity (RFC 3339), when ready.
    pub expires: Option<String>,
    /// The failure, when failed.
    pub error: Option<String>,
}

/// Certificates and TLS configs per identity.
pub struct CertSource {
    manager: Arc<CertificateManager>,
    control: Handle,
    cache: Mutex<HashMap<Identity, Cached>>,
}

impl std::fmt::Debug for CertSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSource")
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

impl CertSource {
    /// Certificates from `manager`, whose background work runs on `control`.
    pub fn new(manager: Arc<CertificateManager>, control: Handle) -> Self {
        Self {
            manager,
            control,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The TLS config of `identity`, fetching its certificate first if needed.
    pub async fn tls(&self, identity: &Identity) -> Result<Arc<WorkloadTls>, CertError> {
        let cert = self.certificate(identity).await?;
        if let Some(hit) = self.lock().get(identity)
            && Arc::ptr_eq(&hit.cert, &cert)
        {
            return Ok(hit.tls.clone());
        }
        // A new (or rotated) certificate: parse the key and build the server config once.
        let tls = WorkloadTls::from_certificate(&cert).map_err(|e: TlsError| CertError::Tls {
            identity: Box::new(identity.clone()),
            reason: e.to_string(),
        })?;
        let tls = Arc::new(tls);
        let cached = Cached {
            cert,
            tls: tls.clone(),
        };
        self.lock().insert(identity.clone(), cached);
        Ok(tls)
    }

    async fn certificate(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, CertError> {
        // Fast path: a known identity whose certificate is ready answers without waiting, on
        // the calling runtime (no new worker can be spawned there: the entry exists).
        if self.lock().contains_key(identity)
            && let Some(result) = self.manager.fetch(identity).now_or_never()
        {
            return Ok(result?);
        }
        let manager = self.manager.clone();
        let id = identity.clone();
        // The first fetch starts the identity's rotation worker on the runtime it runs on.
        let fetch = self.control.spawn(async move { manager.fetch(&id).await });
        match fetch.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(CertError::Aborted(Box::new(identity.clone()))),
        }
    }

    /// Starts fetching `identity` in the background (a pod was enrolled).
    pub fn prefetch(&self, identity: &Identity) {
        let manager = self.manager.clone();
        let id = identity.clone();
        self.control.spawn(async move {
            if let Err(error) = manager.fetch(&id).await {
                tracing::warn!(identity = %id, %error, "certificate prefetch failed; will retry");
            }
        });
    }

    /// Stops rotating `identity` (its last pod left the node).
    pub fn forget(&self, identity: &Identity) {
        self.lock().remove(identity);
        self.manager.forget(identity);
    }

    /// Identities whose certificates are held or being fetched.
    pub fn identities(&self) -> Vec<Identity> {
        self.manager.identities()
    }

    /// The state of every certificate, for `/config_dump`. Never waits.
    pub fn dump(&self) -> Vec<CertDump> {
        self.manager
            .identities()
            .into_iter()
            .map(|id| match self.manager.fetch(&id).now_or_never() {
                Some(Ok(cert)) => CertDump {
                    identity: id.to_string(),
                    state: "ready",
                    not_before: Some(rfc3339(cert.not_before())),
                    expires: Some(rfc3339(cert.not_after())),
                    error: None,
                },
                Some(Err(e)) => CertDump {
                    identity: id.to_string(),
                    state: "failed",
                    not_before: None,
                    expires: None,
                    error: Some(e.to_string()),
                },
                None => CertDump {
                    identity: id.to_string(),
                    state: "pending",
                    not_before: None,
                    expires: None,
                    error: None,
                },
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientCerts for CertSource {
    fn client_certificate(
        &self,
        src: &Identity,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, mesh_core::hbone::client::BoxError>> {
        let src = src.clone();
        Box::pin(async move { self.tls(&src).await.map_err(Into::into) })
    }
}

/// Formats a time as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
