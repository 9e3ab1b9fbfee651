//! Generated protobuf types for zmesh's wire protocols.
//!
//! Every package, message name and field number here matches Istio ambient's wire contract, so an
//! upstream ztunnel or istiod can talk to zmesh components and vice versa:
//!
//! | module | protobuf package | used for |
//! |---|---|---|
//! | [`ca`] | `istio.v1.auth` | certificate signing (`IstioCertificateService`) |
//! | [`workload`] | `istio.workload` | workload/service discovery resources (`Address`) |
//! | [`security`] | `istio.security` | L4 authorization resources (`Authorization`) |
//! | [`discovery`] | `envoy.service.discovery.v3` | delta aggregated xDS transport |
//! | [`zds`] | `istio.workload.zds` | CNI agent ↔ node proxy pod hand-off |
//!
//! [`any`] packs and unpacks these messages in `google.protobuf.Any` with type-URL checks.
#![forbid(unsafe_code)]

pub mod any;

/// `istio.v1.auth`: the certificate-signing service (`IstioCertificateService/CreateCertificate`).
pub mod ca {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("istio.v1.auth");
}

/// `istio.workload`: the `Address` resource (a `Workload` or a `Service`) and its parts.
pub mod workload {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("istio.workload");
}

/// `istio.security`: the `Authorization` resource (L4 policy).
pub mod security {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("istio.security");
}

/// `envoy.service.discovery.v3`: the delta xDS subset (`AggregatedDiscoveryService/
/// DeltaAggregatedResources`) with the `Node` and `Status` messages it embeds.
pub mod discovery {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("envoy.service.discovery.v3");
}

/// `istio.workload.zds`: messages exchanged over the node-local ZDS socket between the CNI agent
/// and the node proxy.
pub mod zds {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("istio.workload.zds");
}
