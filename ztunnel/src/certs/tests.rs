use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use futures::future::BoxFuture;
use mesh_core::ca_client::{CaClientError, CertificateProvider};
use mesh_core::cert_manager::CertManagerConfig;
use mesh_core::testing::TestCa;

use super::*;

struct FakeCa {
    ca: TestCa,
    calls: AtomicUsize,
    fail: AtomicBool,
}

impl CertificateProvider for FakeCa {
    fn fetch_certificate<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, CaClientError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = if self.fail.load(Ordering::SeqCst) {
            Err(CaClientError::TokenFile {
                path: "/token".into(),
                source: std::io::Error::other("ca is down"),
            })
        } else {
            Ok(self.ca.issue(identity))
        };
        Box::pin(std::future::ready(result))
    }
}

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

fn source(fail: bool) -> (Arc<FakeCa>, CertSource) {
    let ca = Arc::new(FakeCa {
        ca: TestCa::new("cluster.local"),
        calls: AtomicUsize::new(0),
        fail: AtomicBool::new(fail),
    });
    let config = CertManagerConfig {
        initial_backoff: Duration::from_millis(10),
        ..CertManagerConfig::default()
    };
    let manager = Arc::new(CertificateManager::new(ca.clone(), config));
    (ca, CertSource::new(manager, Handle::current()))
}

#[tokio::test]
async fn tls_configs_are_built_once_per_certificate() {
    let (ca, certs) = source(false);
    let alice = id("spiffe://cluster.local/ns/a/sa/alice");
    let first = certs.tls(&alice).await.unwrap();
    let second = certs.tls(&alice).await.unwrap();
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!(first.identity(), &alice);
    assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
    let dump = certs.dump();
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0].state, "ready");
    assert!(dump[0].expires.as_deref().unwrap().ends_with('Z'));
    certs.forget(&alice);
    assert!(certs.identities().is_empty());
}

#[tokio::test]
async fn a_failing_ca_is_reported_clearly() {
    let (_ca, certs) = source(true);
    let bob = id("spiffe://cluster.local/ns/b/sa/bob");
    let err = certs.tls(&bob).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("no certificate for spiffe://cluster.local/ns/b/sa/bob"),
        "{text}"
    );
    assert!(text.contains("ca is down"), "{text}");
    assert_eq!(certs.dump()[0].state, "failed");
}

#[test]
fn rfc3339_formats_utc() {
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // 2024-02-29T23:59:59Z (leap day)
    assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
    let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
    assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
}
