//! End-to-end test support for zmesh.
