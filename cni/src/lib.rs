//! zmesh's node agent: decides which pods are enrolled, programs their in-pod traffic redirection
//! and hands each enrolled pod's network namespace to ztunnel over ZDS.
#![forbid(unsafe_code)]

pub mod rules;
pub mod zds;
