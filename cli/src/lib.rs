//! zmesh's command-line tool as a library: [`localmesh`] runs a local cluster of real zmesh
//! processes on network namespaces (`zmesh up`), also used by the end-to-end tests.
#![deny(unsafe_code)]

pub mod localmesh;
pub mod up;
