//! zmesh's node proxy. It captures the traffic of enrolled pods and carries it between nodes over
//! mutual-TLS HBONE.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod certs;
pub mod config;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod readiness;
pub mod state;
pub mod xds;
