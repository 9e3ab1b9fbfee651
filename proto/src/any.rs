//! Packing zmesh messages into `google.protobuf.Any` and unpacking them with a type-URL check.
//!
//! xDS carries every resource as an `Any`; a receiver must reject a payload whose type URL is not
//! the one it subscribed to instead of decoding it as the wrong message.

use prost::Message;
use prost_types::Any;

use crate::{security, workload};

/// Type URL of the `istio.workload.Address` xDS resource (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of the `istio.workload.Workload` xDS resource (served by istiod, unused by ztunnel).
pub const WORKLOAD_TYPE_URL: &str = "type.googleapis.com/istio.workload.Workload";
/// Type URL of the `istio.security.Authorization` xDS resource.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Errors from [`unpack`] and [`unpack_as`].
#[derive(Debug, thiserror::Error)]
pub enum AnyError {
    /// The `Any` names a different message type than the caller expected.
    #[error("unexpected any type url {actual:?}, expected {expected:?}")]
    TypeUrlMismatch {
        /// The type URL the caller asked for.
        expected: String,
        /// The type URL found in the `Any`.
        actual: String,
    },
    /// The type URL matched but the payload is not a valid encoding of that message.
    // The decode error is part of the message (not a `#[source]`) because callers put
    // `to_string()` into xDS NACKs, which must say what was wrong.
    #[error("malformed {type_url} payload in any: {reason}")]
    Decode {
        /// The type URL of the payload that failed to decode.
        type_url: String,
        /// The protobuf decode failure.
        reason: prost::DecodeError,
    },
}

/// A message that travels in an `Any` under a fixed type URL.
pub trait TypeUrl: Message + Default {
    /// The full type URL, `type.googleapis.com/<package>.<Message>`.
    const TYPE_URL: &'static str;
}

impl TypeUrl for workload::Address {
    const TYPE_URL: &'static str = ADDRESS_TYPE_URL;
}

impl TypeUrl for workload::Workload {
    const TYPE_URL: &'static str = WORKLOAD_TYPE_URL;
}

impl TypeUrl for security::Authorization {
    const TYPE_URL: &'static str = AUTHORIZATION_TYPE_URL;
}

/// Encodes `msg` into an `Any` carrying its type URL.
pub fn pack<M: TypeUrl>(msg: &M) -> Any {
    Any {
        type_url: M::TYPE_URL.to_owned(),
        value: msg.encode_to_vec(),
    }
}

/// Decodes an `Any` as `M`, failing if its type URL is not `M::TYPE_URL` or the bytes are
/// malformed.
pub fn unpack<M: TypeUrl>(any: &Any) -> Result<M, AnyError> {
    unpack_as(any, M::TYPE_URL)
}

/// Decodes an `Any` as `M` under an explicit `type_url`, for messages without a [`TypeUrl`] impl.
pub fn unpack_as<M: Message + Default>(any: &Any, type_url: &str) -> Result<M, AnyError> {
    if any.type_url != type_url {
        return Err(AnyError::TypeUrlMismatch {
            expected: type_url.to_owned(),
            actual: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|reason| AnyError::Decode {
        type_url: type_url.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::Authorization;
    use crate::workload::{Address, Workload, address};

    fn workload_address(uid: &str) -> Address {
        Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.to_owned(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn pack_sets_type_url_and_round_trips() {
        let addr = workload_address("c1//Pod/ns/p");
        let any = pack(&addr);
        assert_eq!(any.type_url, ADDRESS_TYPE_URL);
        let back: Address = unpack(&any).expect("unpack");
        assert_eq!(back, addr);
    }

    #[test]
    fn pack_authorization_uses_security_type_url() {
        let authz = Authorization {
            name: "allow".to_owned(),
            ..Default::default()
        };
        let any = pack(&authz);
        assert_eq!(any.type_url, AUTHORIZATION_TYPE_URL);
        assert_eq!(unpack::<Authorization>(&any).expect("unpack"), authz);
    }

    #[test]
    fn unpack_rejects_wrong_type_url_with_clear_error() {
        let any = pack(&workload_address("u"));
        let err = unpack::<Authorization>(&any).expect_err("must reject");
        assert!(matches!(err, AnyError::TypeUrlMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(ADDRESS_TYPE_URL), "{msg}");
        assert!(msg.contains(AUTHORIZATION_TYPE_URL), "{msg}");
    }

    #[test]
    fn unpack_rejects_type_url_that_differs_only_in_prefix() {
        // Only the canonical prefix is accepted; a look-alike must not be decoded.
        let any = Any {
            type_url: "example.com/istio.workload.Address".to_owned(),
            value: Vec::new(),
        };
        let err = unpack::<Address>(&any).expect_err("must reject");
        assert!(matches!(err, AnyError::TypeUrlMismatch { .. }), "{err:?}");
    }

    #[test]
    fn unpack_reports_malformed_payload() {
        // Field 1 (workload), wire type LEN, claims 5 bytes but only 1 follows.
        let any = Any {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            value: vec![0x0a, 0x05, 0x00],
        };
        let err = unpack::<Address>(&any).expect_err("must reject");
        assert!(matches!(err, AnyError::Decode { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("malformed {ADDRESS_TYPE_URL} payload in any: ")),
            "{msg}"
        );
    }

    #[test]
    fn unpack_as_accepts_explicit_type_url() {
        let wl = Workload {
            uid: "u1".to_owned(),
            ..Default::default()
        };
        let any = Any {
            type_url: WORKLOAD_TYPE_URL.to_owned(),
            value: wl.encode_to_vec(),
        };
        let back: Workload = unpack_as(&any, WORKLOAD_TYPE_URL).expect("unpack");
        assert_eq!(back, wl);
    }
}
