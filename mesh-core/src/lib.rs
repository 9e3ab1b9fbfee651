//! Shared building blocks of zmesh: SPIFFE identities, workload certificates, mTLS configs,
//! HBONE (HTTP/2 CONNECT over mutual TLS), the CA client, the ZDS transport between the node
//! agent and ztunnel, and the Linux network-namespace and socket plumbing of in-pod listeners.
#![forbid(unsafe_code)]

pub mod ca_client;
pub mod cert;
pub mod cert_manager;
pub mod copy;
pub mod hbone;
pub mod identity;
pub mod netns;
pub mod socket;
pub mod tls;
pub mod zds;

#[cfg(feature = "testing")]
pub mod testing;

pub use cert::WorkloadCertificate;
pub use identity::Identity;
