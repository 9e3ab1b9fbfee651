//! Generated protobuf types for zmesh's wire protocols.
//!
//! Every package, message name and field number here matches Istio ambient's wire contract, so an
//! upstream ztunnel or istiod can talk to zmesh components and vice versa.
#![forbid(unsafe_code)]

/// `istio.v1.auth`: the certificate-signing service (`IstioCertificateService/CreateCertificate`).
pub mod ca {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("istio.v1.auth");
}
