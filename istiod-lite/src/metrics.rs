//! istiod-lite metric names, descriptions and pre-built handles.
//!
//! Handles are created once (at startup, against whatever recorder is installed then) and passed to
//! the components that record; tests create them under a local `DebuggingRecorder`.

use metrics::{Counter, describe_counter};

/// Certificates signed by the CA.
pub const CERTIFICATES_ISSUED: &str = "istiod_certificates_issued_total";
/// CSRs refused, labelled with [`REASON_LABEL`].
pub const REQUESTS_REJECTED: &str = "istiod_certificate_requests_rejected_total";
/// Label of [`REQUESTS_REJECTED`]; values come from [`RejectReason::as_str`].
pub const REASON_LABEL: &str = "reason";

/// Why a certificate request was refused; the closed set of [`REASON_LABEL`] values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Missing, malformed or unknown credentials.
    Unauthenticated,
    /// Impersonation not allowed.
    PermissionDenied,
    /// Bad request metadata.
    InvalidMetadata,
    /// Requested lifetime out of range.
    InvalidTtl,
    /// Malformed CSR, bad signature or unsupported key.
    InvalidCsr,
    /// An authentication or placement backend could not answer.
    BackendUnavailable,
    /// The CA failed to sign.
    SigningFailed,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 7] = [
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::InvalidMetadata,
        Self::InvalidTtl,
        Self::InvalidCsr,
        Self::BackendUnavailable,
        Self::SigningFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
            Self::InvalidMetadata => "invalid_metadata",
            Self::InvalidTtl => "invalid_ttl",
            Self::InvalidCsr => "invalid_csr",
            Self::BackendUnavailable => "backend_unavailable",
            Self::SigningFailed => "signing_failed",
        }
    }
}

/// Registers help texts with the installed recorder.
pub fn describe() {
    describe_counter!(
        CERTIFICATES_ISSUED,
        "Workload certificates signed by the CA."
    );
    describe_counter!(
        REQUESTS_REJECTED,
        "Certificate signing requests refused, by reason."
    );
}

/// Counters of the CA service.
#[derive(Clone)]
pub struct CaMetrics {
    issued: Counter,
    rejected: [Counter; RejectReason::ALL.len()],
}

impl CaMetrics {
    /// Creates the handles against the recorder installed now (a no-op one when none is).
    pub fn new() -> Self {
        Self {
            issued: metrics::counter!(CERTIFICATES_ISSUED),
            rejected: RejectReason::ALL
                .map(|r| metrics::counter!(REQUESTS_REJECTED, REASON_LABEL => r.as_str())),
        }
    }

    /// Counts one signed certificate.
    pub fn issued(&self) {
        self.issued.increment(1);
    }

    /// Counts one refused request.
    pub fn rejected(&self, reason: RejectReason) {
        // ALL is in declaration order, so the discriminant is the index.
        self.rejected[reason as usize].increment(1);
    }
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CaMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaMetrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_index_matches_all() {
        for (i, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }
}
