//! zmesh node agent (zmesh-cni): pod enrollment and in-pod traffic redirection.
//!
//! For now this holds the redirection-rule generator and applier ([`rules`]); enrollment and
//! the ZDS server come later.
#![forbid(unsafe_code)]

pub mod rules;
