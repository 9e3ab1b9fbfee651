//! The certificate authority: key material ([`store`]), CSR checks ([`csr`]), signing
//! ([`authority`]) and the gRPC `IstioCertificateService` ([`server`]).

pub mod authority;
pub mod csr;
pub mod server;
pub mod store;

pub use authority::CertificateAuthority;
pub use server::{CaService, SigningPolicy};
