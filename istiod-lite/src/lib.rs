//! istiod-lite: zmesh's control plane: the SPIFFE certificate authority
//! (`istio.v1.auth.IstioCertificateService`) and the delta ADS server ([`xds`]), served over TLS on
//! port 15012.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod ca;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod monitoring;
pub mod serving_cert;
pub mod source;
pub mod translate;
pub mod xds;

#[cfg(feature = "testing")]
pub mod testing;
