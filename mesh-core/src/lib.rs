//! Shared building blocks of zmesh: SPIFFE identities, workload certificates, mTLS configs,
//! HBONE (HTTP/2 CONNECT over mutual TLS) and the CA client.
#![forbid(unsafe_code)]

pub mod cert;
pub mod copy;
pub mod hbone;
pub mod identity;
pub mod tls;

#[cfg(feature = "testing")]
pub mod testing;

pub use cert::WorkloadCertificate;
pub use identity::Identity;
