//! The closed set of HBONE failure kinds, usable as a metric label or access-log field.

use std::fmt;

use http::StatusCode;

/// Why an HBONE connection or stream failed, as a small closed set.
///
/// [`ErrorKind::as_str`] uses Istio's `response_flags` names where Istio has one (`DENY`,
/// `CONNECT`, `TLS_FAILURE`, `H2_HANDSHAKE_FAILURE`, `NETWORK_POLICY`, `IDENTITY_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Authorization denied the connection (HTTP 401).
    Denied,
    /// The TCP connection to the next hop or the upstream failed.
    Connect,
    /// The TCP connect timed out (often a NetworkPolicy dropping port 15008).
    NetworkPolicy,
    /// The TLS handshake failed for another reason than the peer's identity.
    TlsFailure,
    /// The peer's certificate chain was fine but its identity was not acceptable.
    Identity,
    /// The HTTP/2 handshake failed.
    H2Handshake,
    /// No certificate is available for the local identity.
    NoCertificate,
    /// The request was malformed (HTTP 400), e.g. not a `CONNECT` or a bad `:authority`.
    BadRequest,
    /// The destination is unknown or could not be reached (HTTP 503).
    Unavailable,
    /// The peer answered with an unexpected HTTP status.
    Status,
    /// A handshake or request timed out.
    Timeout,
    /// The HTTP/2 stream or connection failed after it was established.
    Io,
}

impl ErrorKind {
    /// The label value: Istio's `response_flags` name where one exists.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Denied => "DENY",
            Self::Connect => "CONNECT",
            Self::NetworkPolicy => "NETWORK_POLICY",
            Self::TlsFailure => "TLS_FAILURE",
            Self::Identity => "IDENTITY_ERROR",
            Self::H2Handshake => "H2_HANDSHAKE_FAILURE",
            Self::NoCertificate => "NO_CERTIFICATE",
            Self::BadRequest => "BAD_REQUEST",
            Self::Unavailable => "UNAVAILABLE",
            Self::Status => "UNEXPECTED_STATUS",
            Self::Timeout => "TIMEOUT",
            Self::Io => "IO",
        }
    }

    /// The kind an HBONE error status maps to (`401` → `Denied`, `400` → `BadRequest`, ...).
    pub fn from_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Self::Denied,
            StatusCode::BAD_REQUEST => Self::BadRequest,
            StatusCode::SERVICE_UNAVAILABLE => Self::Unavailable,
            _ => Self::Status,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_istio_flags() {
        assert_eq!(
            ErrorKind::from_status(StatusCode::UNAUTHORIZED).as_str(),
            "DENY"
        );
        assert_eq!(
            ErrorKind::from_status(StatusCode::BAD_REQUEST),
            ErrorKind::BadRequest
        );
        assert_eq!(
            ErrorKind::from_status(StatusCode::SERVICE_UNAVAILABLE),
            ErrorKind::Unavailable
        );
        assert_eq!(
            ErrorKind::from_status(StatusCode::IM_A_TEAPOT),
            ErrorKind::Status
        );
        assert_eq!(ErrorKind::H2Handshake.to_string(), "H2_HANDSHAKE_FAILURE");
        assert_eq!(ErrorKind::Identity.as_str(), "IDENTITY_ERROR");
        assert_eq!(ErrorKind::TlsFailure.as_str(), "TLS_FAILURE");
        assert_eq!(ErrorKind::Connect.as_str(), "CONNECT");
    }
}
