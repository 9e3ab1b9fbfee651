//! istiod-lite metric names, descriptions and pre-built handles.
//!
//! Handles are created once (at startup, against whatever recorder is installed then) and passed to
//! the components that record; tests create them under a local `DebuggingRecorder`.

use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URL};
use metrics::{Counter, Gauge, Histogram, describe_counter, describe_gauge, describe_histogram};

/// Certificates signed by the CA.
pub const CERTIFICATES_ISSUED: &str = "istiod_certificates_issued_total";
/// CSRs refused, labelled with [`REASON_LABEL`].
pub const REQUESTS_REJECTED: &str = "istiod_certificate_requests_rejected_total";
/// Label of [`REQUESTS_REJECTED`]; values come from [`RejectReason::as_str`].
pub const REASON_LABEL: &str = "reason";

/// Connected xDS streams (proxies); Istio's name.
pub const XDS_CONNECTED: &str = "pilot_xds";
/// xDS responses sent, labelled with [`TYPE_LABEL`]; Istio's name.
pub const XDS_PUSHES: &str = "pilot_xds_pushes";
/// Seconds from a configuration change to the response carrying it, by [`TYPE_LABEL`]; Istio's
/// name.
pub const XDS_PUSH_TIME: &str = "pilot_xds_push_time";
/// NACKed xDS responses, by [`TYPE_LABEL`]; Istio's name.
pub const XDS_REJECTS: &str = "pilot_total_xds_rejects";
/// xDS requests whose `response_nonce` is not the outstanding one (ignored), by [`TYPE_LABEL`];
/// Istio's name.
pub const XDS_EXPIRED_NONCE: &str = "pilot_xds_expired_nonce";
/// xDS streams closed because a response was neither ACKed nor NACKed in time, by [`TYPE_LABEL`].
pub const XDS_ACK_TIMEOUTS: &str = "istiod_xds_ack_timeouts_total";
/// Label of the per-type xDS metrics; values come from [`XdsType::as_str`].
pub const TYPE_LABEL: &str = "type";

/// The closed set of [`TYPE_LABEL`] values, so a client cannot mint label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdsType {
    /// `istio.workload.Address`.
    Address,
    /// `istio.security.Authorization`.
    Authorization,
    /// `istio.workload.Workload`.
    Workload,
    /// Any other type URL.
    Other,
}

impl XdsType {
    /// Every type, in label order.
    pub const ALL: [XdsType; 4] = [
        Self::Address,
        Self::Authorization,
        Self::Workload,
        Self::Other,
    ];

    /// The label for a type URL.
    pub fn of(type_url: &str) -> Self {
        match type_url {
            ADDRESS_TYPE_URL => Self::Address,
            AUTHORIZATION_TYPE_URL => Self::Authorization,
            WORKLOAD_TYPE_URL => Self::Workload,
            _ => Self::Other,
        }
    }

    /// The label value (Istio's short names where it has them).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Address => "wads",
            Self::Authorization => "wdsauthz",
            Self::Workload => "wds",
            Self::Other => "other",
        }
    }
}

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
    describe_gauge!(XDS_CONNECTED, "Connected xDS streams (one per proxy).");
    describe_counter!(XDS_PUSHES, "xDS responses sent, by type.");
    describe_histogram!(
        XDS_PUSH_TIME,
        metrics::Unit::Seconds,
        "Time from a configuration change to the xDS response carrying it, by type."
    );
    describe_counter!(XDS_REJECTS, "xDS responses NACKed by proxies, by type.");
    describe_counter!(
        XDS_EXPIRED_NONCE,
        "xDS requests with a stale or unknown nonce (ignored), by type."
    );
    describe_counter!(
        XDS_ACK_TIMEOUTS,
        "xDS streams closed because a response was not ACKed in time, by type."
    );
}

/// Handles of the ADS server.
#[derive(Clone)]
pub struct XdsMetrics {
    connected: Gauge,
    pushes: [Counter; XdsType::ALL.len()],
    push_time: [Histogram; XdsType::ALL.len()],
    rejects: [Counter; XdsType::ALL.len()],
    expired_nonce: [Counter; XdsType::ALL.len()],
    ack_timeouts: [Counter; XdsType::ALL.len()],
}

/// Counts one connected stream for as long as it lives.
#[derive(Debug)]
#[must_use = "the stream counts as connected only while the guard lives"]
pub struct ConnectedGuard(Gauge);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl XdsMetrics {
    /// Creates the handles against the recorder installed now (a no-op one when none is).
    pub fn new() -> Self {
        let by_type = |name: &'static str| {
            XdsType::ALL.map(|t| metrics::counter!(name, TYPE_LABEL => t.as_str()))
        };
        Self {
            connected: metrics::gauge!(XDS_CONNECTED),
            pushes: by_type(XDS_PUSHES),
            push_time: XdsType::ALL
                .map(|t| metrics::histogram!(XDS_PUSH_TIME, TYPE_LABEL => t.as_str())),
            rejects: by_type(XDS_REJECTS),
            expired_nonce: by_type(XDS_EXPIRED_NONCE),
            ack_timeouts: by_type(XDS_ACK_TIMEOUTS),
        }
    }

    /// Counts a stream as connected until the guard drops.
    pub fn connected(&self) -> ConnectedGuard {
        self.connected.increment(1.0);
        ConnectedGuard(self.connected.clone())
    }

    /// Counts one response, and its latency from the change it carries when there is one.
    pub fn pushed(&self, t: XdsType, since_change: Option<std::time::Duration>) {
        self.pushes[t as usize].increment(1);
        if let Some(latency) = since_change {
            self.push_time[t as usize].record(latency.as_secs_f64());
        }
    }

    /// Counts one NACK.
    pub fn rejected(&self, t: XdsType) {
        self.rejects[t as usize].increment(1);
    }

    /// Counts one request with a stale nonce.
    pub fn expired_nonce(&self, t: XdsType) {
        self.expired_nonce[t as usize].increment(1);
    }

    /// Counts one stream closed for not ACKing.
    pub fn ack_timeout(&self, t: XdsType) {
        self.ack_timeouts[t as usize].increment(1);
    }
}

impl Default for XdsMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for XdsMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XdsMetrics")
    }
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

    #[test]
    fn xds_type_index_matches_all_and_urls_map() {
        for (i, t) in XdsType::ALL.iter().enumerate() {
            assert_eq!(*t as usize, i, "{t:?}");
        }
        assert_eq!(XdsType::of(ADDRESS_TYPE_URL), XdsType::Address);
        assert_eq!(XdsType::of(AUTHORIZATION_TYPE_URL), XdsType::Authorization);
        assert_eq!(XdsType::of("type.googleapis.com/x.Y"), XdsType::Other);
    }
}
