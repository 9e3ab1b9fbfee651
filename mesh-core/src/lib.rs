//! Shared building blocks of zmesh: SPIFFE identities, workload certificates, mTLS configs,
//! HBONE (HTTP/2 CONNECT over mutual TLS), the CA client, the ZDS transport between the node
//! agent and ztunnel, the Linux network-namespace and socket plumbing of in-pod listeners, and
//! (feature `k8s`) Kubernetes objects as configuration, served from a directory of YAML.
#![forbid(unsafe_code)]

pub mod ca_client;
pub mod cert;
pub mod cert_manager;
pub mod config;
pub mod copy;
pub mod hbone;
pub mod identity;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod netns;
pub mod socket;
pub mod telemetry;
pub mod tls;
pub mod zds;

#[cfg(feature = "testing")]
pub mod testing;

pub use cert::WorkloadCertificate;
pub use identity::Identity;
