//! End-to-end test support for zmesh.

pub mod mesh;
