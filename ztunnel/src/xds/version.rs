//! Resource versions as ztunnel keeps them: one per resource, for `initial_resource_versions` on
//! reconnect and for `/config_dump`.
//!
//! Versions are opaque to the client, but istiod-lite's are hex content hashes (32 lowercase hex
//! digits), as are most control planes'. Those are held inline as bytes: 24 bytes per resource
//! instead of a 64-byte string allocation, for every workload of the mesh. Anything else is kept
//! as the string it arrived as, so every version round-trips exactly.

use std::fmt;
use std::sync::Arc;

/// A resource version, displayed exactly as the control plane sent it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    // Lowercase hex of an even number of digits, at most 32: the decoded bytes.
    Hex { len: u8, bytes: [u8; 16] },
    Text(Arc<str>),
}

impl From<&str> for Version {
    fn from(s: &str) -> Self {
        Self(hex(s).unwrap_or_else(|| Repr::Text(Arc::from(s))))
    }
}

fn hex(s: &str) -> Option<Repr> {
    // Uppercase digits would not print back the same; an odd length fails to decode.
    if s.is_empty() || s.len() > 32 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(s, &mut bytes[..s.len() / 2]).ok()?;
    Some(Repr::Hex {
        len: u8::try_from(s.len() / 2).ok()?,
        bytes,
    })
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Hex { len, bytes } => f.write_str(&hex::encode(&bytes[..usize::from(*len)])),
            Repr::Text(s) => f.write_str(s),
        }
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_prints_back_exactly() {
        for v in [
            "0123456789abcdef0123456789abcdef",
            "00",
            "ff00",
            "v1",
            "",
            "ABCDEF",
            "abc",
            "0123456789abcdef0123456789abcdef00",
            "2026-12-06T05:00:00Z/42",
        ] {
            assert_eq!(Version::from(v).to_string(), v);
        }
    }

    #[test]
    fn hex_hashes_are_held_inline() {
        assert!(matches!(
            Version::from("0123456789abcdef0123456789abcdef").0,
            Repr::Hex { len: 16, .. }
        ));
        assert!(matches!(Version::from("v1").0, Repr::Text(_)));
        assert!(matches!(Version::from("ABCD").0, Repr::Text(_)));
        assert_eq!(Version::from("0a"), Version::from("0a"));
        assert_ne!(Version::from("0a"), Version::from("0a00"));
        assert_eq!(size_of::<Version>(), 24);
    }
}
