//! Per-identity certificate cache with background rotation.
//!
//! One worker task per identity owns that identity's certificate: it asks the
//! [`CertificateProvider`] for a certificate, publishes it on a `watch` channel, sleeps until the
//! certificate's half-life and asks again. Failures are retried with exponential backoff
//! (0.5 s → 150 s by default) while the previous certificate keeps being served until it expires.
//! Callers of [`CertificateManager::fetch`] only read the channel, so any number of concurrent
//! fetches for one identity share a single CSR.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::ca_client::{CaClientError, CertificateProvider};
use crate::cert::WorkloadCertificate;
use crate::identity::Identity;

/// Istio's initial retry delay after a failed CSR.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Istio's cap on the retry delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(150);
/// Istio's limit on CSRs in flight at once (per manager).
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 8;
// Long sleeps are cut into slices so a wall-clock jump (suspend, NTP step) delays a rotation by at most
// this much: the timer runs on the monotonic clock, certificates expire on the wall clock.
const MAX_SLEEP_SLICE: Duration = Duration::from_secs(60);

/// A source of wall-clock time, injectable so tests can run with paused tokio time.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's (possibly paused) clock, for tests.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

#[cfg(any(test, feature = "testing"))]
impl TokioClock {
    /// Starts at the current wall time (whole seconds, as X.509 stores it).
    pub fn new() -> Self {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Self {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(any(test, feature = "testing"))]
impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(any(test, feature = "testing"))]
impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

/// Tuning of a [`CertificateManager`].
#[derive(Debug, Clone)]
pub struct CertManagerConfig {
    /// First retry delay after a failure; doubles on each further failure.
    pub initial_backoff: Duration,
    /// Cap on the retry delay.
    pub max_backoff: Duration,
    /// How many CSRs may be in flight at once.
    pub max_concurrent_requests: usize,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
        }
    }
}

/// Why [`CertificateManager::fetch`] could not return a certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertManagerError {
    /// The latest attempt failed and there is no valid certificate to fall back on.
    #[error("no certificate for {identity}: {source}")]
    Fetch {
        /// The identity asked for.
        identity: Box<Identity>,
        /// The last failure (shared by every caller that waited for it).
        source: Arc<CaClientError>,
    },
    /// The cached certificate expired and has not been renewed yet.
    #[error("certificate for {identity} expired and has not been renewed yet")]
    Expired {
        /// The identity asked for.
        identity: Box<Identity>,
    },
    /// The identity was forgotten (or the manager dropped) while the caller waited.
    #[error("certificate request for {identity} was cancelled")]
    Cancelled {
        /// The identity asked for.
        identity: Box<Identity>,
    },
}

#[derive(Clone)]
enum CertState {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    Failed(Arc<CaClientError>),
}

struct Entry {
    state: watch::Receiver<CertState>,
    worker: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// Everything a worker needs; deliberately not the manager itself, so dropping the manager stops all
/// workers.
#[derive(Clone)]
struct WorkerDeps {
    provider: Arc<dyn CertificateProvider>,
    clock: Arc<dyn Clock>,
    permits: Arc<Semaphore>,
    config: CertManagerConfig,
}

/// Caches one certificate per identity and keeps it fresh in the background.
pub struct CertificateManager {
    deps: WorkerDeps,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("config", &self.deps.config)
            .field("identities", &self.identities())
            .finish()
    }
}

impl CertificateManager {
    /// A manager using the system clock.
    pub fn new(provider: Arc<dyn CertificateProvider>, config: CertManagerConfig) -> Self {
        Self::with_clock(provider, config, Arc::new(SystemClock))
    }

    /// A manager reading wall time from `clock`.
    pub fn with_clock(
        provider: Arc<dyn CertificateProvider>,
        config: CertManagerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrent_requests.max(1)));
        Self {
            deps: WorkerDeps {
                provider,
                clock,
                permits,
                config,
            },
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Returns a valid certificate for `identity`, requesting one first if none is cached.
    ///
    /// The first call for an identity starts its background worker (which must run inside a tokio
    /// runtime) and waits for the first answer; later calls return the cached certificate at once.
    pub async fn fetch(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadCertificate>, CertManagerError> {
        let mut state = self.subscribe(identity);
        let boxed = || Box::new(identity.clone());
        loop {
            let current = state.borrow_and_update().clone();
            match current {
                CertState::Ready(cert) if !cert.is_expired(self.deps.clock.now()) => {
                    return Ok(cert);
                }
                CertState::Ready(_) => return Err(CertManagerError::Expired { identity: boxed() }),
                CertState::Failed(source) => {
                    return Err(CertManagerError::Fetch {
                        identity: boxed(),
                        source,
                    });
                }
                CertState::Pending => state
                    .changed()
                    .await
                    .map_err(|_| CertManagerError::Cancelled { identity: boxed() })?,
            }
        }
    }

    /// Stops rotating `identity` and drops its certificate; waiting fetches fail with `Cancelled`.
    pub fn forget(&self, identity: &Identity) {
        let removed = self.lock().remove(identity);
        if removed.is_some() {
            tracing::debug!(%identity, "certificate forgotten");
        }
    }

    /// The identities currently cached or being fetched.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn subscribe(&self, identity: &Identity) -> watch::Receiver<CertState> {
        let mut entries = self.lock();
        if let Some(entry) = entries.get(identity) {
            return entry.state.clone();
        }
        let (tx, rx) = watch::channel(CertState::Pending);
        let worker = tokio::spawn(run_worker(identity.clone(), tx, self.deps.clone()));
        entries.insert(
            identity.clone(),
            Entry {
                state: rx.clone(),
                worker,
            },
        );
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // A panic while holding this lock cannot leave the map half-updated, so recover from poison.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn run_worker(identity: Identity, tx: watch::Sender<CertState>, deps: WorkerDeps) {
    let mut backoff = deps.config.initial_backoff;
    loop {
        let result = {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = deps.permits.acquire().await.ok();
            deps.provider.fetch_certificate(&identity).await
        };
        let now = deps.clock.now();
        let result = result.and_then(|cert| reject_expired(&identity, cert, now));
        match result {
            Ok(cert) => {
                backoff = deps.config.initial_backoff;
                let refresh_at = cert.refresh_at();
                tracing::info!(%identity, not_after = ?cert.not_after(), "certificate ready");
                tx.send_replace(CertState::Ready(Arc::new(cert)));
                // Never re-request faster than the initial backoff, even for a near-expired answer.
                let wait = refresh_at.duration_since(now).unwrap_or_default();
                sleep_wall(&*deps.clock, now + wait.max(deps.config.initial_backoff)).await;
            }
            Err(error) => {
                tracing::warn!(%identity, %error, retry_in = ?backoff, "certificate request failed");
                record_failure(&tx, error, now);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(deps.config.max_backoff);
            }
        }
    }
}

// A certificate that is already expired on arrival (clock skew, broken CA) is a failure, not a success.
fn reject_expired(
    identity: &Identity,
    cert: WorkloadCertificate,
    now: SystemTime,
) -> Result<WorkloadCertificate, CaClientError> {
    if cert.is_expired(now) {
        return Err(CaClientError::Response {
            identity: Box::new(identity.clone()),
            source: crate::cert::CertError::Chain("the issued certificate is already expired"),
        });
    }
    Ok(cert)
}

// Keep serving the previous certificate while it is valid; only callers with nothing usable see the error.
fn record_failure(tx: &watch::Sender<CertState>, error: CaClientError, now: SystemTime) {
    let keep = matches!(&*tx.borrow(), CertState::Ready(cert) if !cert.is_expired(now));
    if !keep {
        tx.send_replace(CertState::Failed(Arc::new(error)));
    }
}

async fn sleep_wall(clock: &dyn Clock, until: SystemTime) {
    while let Ok(left) = until.duration_since(clock.now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(MAX_SLEEP_SLICE)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::future::{BoxFuture, join_all};

    use super::*;
    use crate::testing::{IssueOptions, TestCa};

    /// A provider that issues real certificates from a [`TestCa`] on the tokio clock, and can be told
    /// to fail or to take its time.
    struct FakeCa {
        ca: TestCa,
        clock: TokioClock,
        // Validity relative to issuance: (start offset back, lifetime).
        backdate: Duration,
        lifetime: Duration,
        delay: Duration,
        calls: AtomicUsize,
        fail: AtomicBool,
    }

    impl FakeCa {
        fn new(clock: TokioClock) -> Self {
            Self {
                ca: TestCa::new("cluster.local"),
                clock,
                backdate: Duration::ZERO,
                lifetime: Duration::from_secs(100),
                delay: Duration::ZERO,
                calls: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn set_failing(&self, fail: bool) {
            self.fail.store(fail, Ordering::SeqCst);
        }
    }

    impl CertificateProvider for FakeCa {
        fn fetch_certificate<'a>(
            &'a self,
            identity: &'a Identity,
        ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(CaClientError::Rpc {
                        identity: Box::new(identity.clone()),
                        code: tonic::Code::Unavailable,
                        message: "ca is down".into(),
                    });
                }
                let now = self.clock.now();
                let opts = IssueOptions {
                    not_before: now - self.backdate,
                    not_after: now - self.backdate + self.lifetime,
                };
                Ok(self.ca.issue_with(identity, &opts))
            })
        }
    }

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    fn manager(ca: &Arc<FakeCa>, config: CertManagerConfig) -> CertificateManager {
        CertificateManager::with_clock(ca.clone(), config, Arc::new(ca.clock))
    }

    /// Lets spawned workers run until they block, without moving the paused clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    /// Moves the paused clock forward in 100 ms steps, so timers armed along the way fire in order
    /// (one big `advance` only fires the first of a chain of sleeps).
    async fn advance(secs: f64) {
        let steps = (secs * 10.0).round() as u64;
        for _ in 0..steps {
            tokio::time::advance(Duration::from_millis(100)).await;
            settle().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_fetches_share_one_request() {
        let mut fake = FakeCa::new(TokioClock::new());
        fake.delay = Duration::from_secs(1);
        let ca = Arc::new(fake);
        let mgr = manager(&ca, CertManagerConfig::default());
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let certs = join_all((0..10).map(|_| mgr.fetch(&me))).await;
        let first = certs[0].as_ref().unwrap();
        for cert in &certs {
            assert!(Arc::ptr_eq(first, cert.as_ref().unwrap()));
        }
        assert_eq!(ca.calls(), 1);
        assert_eq!(first.identity(), &me);
        assert_eq!(mgr.identities(), vec![me]);
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_at_half_life() {
        let ca = Arc::new(FakeCa::new(TokioClock::new()));
        let mgr = manager(&ca, CertManagerConfig::default());
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let first = mgr.fetch(&me).await.unwrap();
        assert_eq!(ca.calls(), 1);

        advance(49.0).await;
        assert_eq!(ca.calls(), 1, "no rotation before half-life");
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&me).await.unwrap()));

        advance(1.5).await;
        assert_eq!(ca.calls(), 2, "rotation at half-life");
        let second = mgr.fetch(&me).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.not_after() > first.not_after());

        // The next rotation is at the second certificate's half-life, not earlier.
        advance(48.0).await;
        assert_eq!(ca.calls(), 2);
        advance(2.0).await;
        assert_eq!(ca.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn serves_old_cert_while_backing_off_until_it_expires() {
        let ca = Arc::new(FakeCa::new(TokioClock::new()));
        let mgr = manager(&ca, CertManagerConfig::default());
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let first = mgr.fetch(&me).await.unwrap();
        ca.set_failing(true);

        advance(50.1).await; // t=50.1: rotation attempt fails
        assert_eq!(ca.calls(), 2);
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&me).await.unwrap()));
        // Retries at +0.5, +1, +2, +4 s after each failure: t=50.5, 51.5, 53.5, 57.5.
        advance(0.3).await; // 50.4
        assert_eq!(ca.calls(), 2);
        advance(0.2).await; // 50.6
        assert_eq!(ca.calls(), 3);
        advance(0.8).await; // 51.4
        assert_eq!(ca.calls(), 3);
        advance(0.2).await; // 51.6
        assert_eq!(ca.calls(), 4);
        advance(1.8).await; // 53.4
        assert_eq!(ca.calls(), 4);
        advance(0.2).await; // 53.6
        assert_eq!(ca.calls(), 5);
        assert!(Arc::ptr_eq(&first, &mgr.fetch(&me).await.unwrap()));

        // Then 4, 8, 16, 32 s: t=57.5, 65.5, 81.5, 113.5. At t=100 the old certificate is gone.
        advance(46.5).await; // 100.1
        assert_eq!(ca.calls(), 8);
        let err = mgr.fetch(&me).await.unwrap_err();
        assert!(matches!(err, CertManagerError::Expired { .. }), "{err}");
        advance(13.5).await; // 113.6: the failure is now what callers see
        assert_eq!(ca.calls(), 9);
        let err = mgr.fetch(&me).await.unwrap_err();
        assert!(err.to_string().contains("ca is down"), "{err}");

        ca.set_failing(false);
        advance(64.0).await; // 177.6: retry after 64 s succeeds
        assert_eq!(ca.calls(), 10);
        let renewed = mgr.fetch(&me).await.unwrap();
        assert!(renewed.not_after() > first.not_after());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_capped_and_first_failure_is_reported() {
        let ca = Arc::new(FakeCa::new(TokioClock::new()));
        ca.set_failing(true);
        let config = CertManagerConfig {
            max_backoff: Duration::from_secs(2),
            ..CertManagerConfig::default()
        };
        let mgr = manager(&ca, config);
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let err = mgr.fetch(&me).await.unwrap_err();
        assert!(matches!(err, CertManagerError::Fetch { .. }), "{err}");
        assert_eq!(ca.calls(), 1);
        // Failures at t=0, 0.5, 1.5, 3.5, then every 2 s: 5.5, 7.5.
        advance(7.6).await;
        assert_eq!(ca.calls(), 6);
        ca.set_failing(false);
        advance(2.0).await;
        assert_eq!(ca.calls(), 7);
        mgr.fetch(&me).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn forget_cancels_waiters_and_stops_rotation() {
        let mut fake = FakeCa::new(TokioClock::new());
        fake.delay = Duration::from_secs(10);
        let ca = Arc::new(fake);
        let mgr = Arc::new(manager(&ca, CertManagerConfig::default()));
        let me = id("spiffe://cluster.local/ns/a/sa/b");
        let waiter = {
            let (mgr, me) = (mgr.clone(), me.clone());
            tokio::spawn(async move { mgr.fetch(&me).await })
        };
        settle().await;
        mgr.forget(&me);
        let err = waiter.await.unwrap().unwrap_err();
        assert!(matches!(err, CertManagerError::Cancelled { .. }), "{err}");
        assert!(mgr.identities().is_empty());

        mgr.fetch(&me).await.unwrap();
        assert_eq!(ca.calls(), 2, "a forgotten identity is fetched afresh");
        mgr.forget(&me);
        advance(200.0).await;
        assert_eq!(ca.calls(), 2, "no rotation after forget");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_on_arrival_is_a_failure() {
        let mut fake = FakeCa::new(TokioClock::new());
        fake.backdate = Duration::from_secs(200);
        let ca = Arc::new(fake);
        let mgr = manager(&ca, CertManagerConfig::default());
        let err = mgr
            .fetch(&id("spiffe://cluster.local/ns/a/sa/b"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("already expired"), "{err}");
    }
}
