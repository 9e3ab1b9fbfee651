//! zmesh's node proxy. It captures the traffic of enrolled pods and carries it between nodes over
//! mutual-TLS HBONE.
#![forbid(unsafe_code)]

pub mod inpod;
pub mod state;
