//! Shared building blocks of zmesh: SPIFFE identities, workload certificates, mTLS configs,
//! HBONE (HTTP/2 CONNECT over mutual TLS), the CA client, and the Linux network-namespace and
//! socket plumbing of in-pod listeners.
#![forbid(unsafe_code)]

pub mod cert;
pub mod identity;
pub mod netns;
pub mod socket;

#[cfg(feature = "testing")]
pub mod testing;

pub use cert::WorkloadCertificate;
pub use identity::Identity;
