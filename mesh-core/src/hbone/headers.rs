//! Builders and parsers for the headers an HBONE `CONNECT` carries: `baggage`, `forwarded`,
//! `traceparent` (and the name of `x-forwarded-network`).

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;

use http::HeaderValue;
use http::header::HeaderName;

/// `baggage`: peer workload metadata (W3C baggage syntax).
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// `forwarded`: the original client address (RFC 7239).
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// `traceparent`: W3C trace context, random per outbound connection.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-forwarded-network`: the origin network, on the inner `CONNECT` of double HBONE.
pub const X_FORWARDED_NETWORK: HeaderName = HeaderName::from_static("x-forwarded-network");

/// Workload metadata sent as `baggage` (empty fields are omitted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: String,
    /// `k8s.namespace.name`.
    pub namespace: String,
    /// The lower-cased workload type: `deployment`, `cronjob`, `pod` or `job` (`k8s.<type>.name`).
    pub workload_type: String,
    /// The workload name (`k8s.<type>.name`).
    pub workload_name: String,
    /// `service.name`: the canonical service.
    pub service_name: String,
    /// `service.version`: the canonical revision.
    pub service_version: String,
    /// `cloud.region`.
    pub region: String,
    /// `cloud.availability_zone`.
    pub zone: String,
}

impl Baggage {
    fn pairs(&self) -> Vec<(String, &str)> {
        let workload_key = format!("k8s.{}.name", self.workload_type);
        let mut pairs = vec![
            ("k8s.cluster.name".to_string(), self.cluster.as_str()),
            ("k8s.namespace.name".to_string(), self.namespace.as_str()),
        ];
        if !self.workload_type.is_empty() {
            pairs.push((workload_key, self.workload_name.as_str()));
        }
        pairs.extend([
            ("service.name".to_string(), self.service_name.as_str()),
            ("service.version".to_string(), self.service_version.as_str()),
            ("cloud.region".to_string(), self.region.as_str()),
            ("cloud.availability_zone".to_string(), self.zone.as_str()),
        ]);
        pairs.retain(|(_, v)| !v.is_empty());
        pairs
    }

    /// The header value (`k=v,k=v`); values are percent-encoded where baggage requires it.
    pub fn header_value(&self) -> HeaderValue {
        let mut out = String::new();
        for (key, value) in self.pairs() {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&key);
            out.push('=');
            percent_encode(value, &mut out);
        }
        HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Reads the fields this type knows from a `baggage` value; unknown keys are ignored.
    pub fn parse(value: &str) -> Self {
        let mut b = Self::default();
        for member in value.split(',') {
            // Properties (`;k=v`) after a member are allowed by W3C baggage but unused here.
            let kv = member.split(';').next().unwrap_or_default().trim();
            let Some((key, v)) = kv.split_once('=') else {
                continue;
            };
            let v = percent_decode(v.trim());
            match key.trim() {
                "k8s.cluster.name" => b.cluster = v,
                "k8s.namespace.name" => b.namespace = v,
                "service.name" => b.service_name = v,
                "service.version" => b.service_version = v,
                "cloud.region" => b.region = v,
                "cloud.availability_zone" => b.zone = v,
                k => {
                    if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                    {
                        b.workload_type = kind.to_string();
                        b.workload_name = v;
                    }
                }
            }
        }
        b
    }
}

// W3C baggage-octet: visible ASCII except '"', ',', ';', '\' (and '%', which starts an escape).
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E) && b != b'%'
}

fn percent_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if is_baggage_octet(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `forwarded: for="<ip:port>"`, plus `;host=<hostname>` when a destination service is known.
pub fn forwarded(client: SocketAddr, host: Option<&str>) -> HeaderValue {
    let mut value = format!("for=\"{client}\"");
    if let Some(host) = host.filter(|h| is_token(h)) {
        value.push_str(";host=");
        value.push_str(host);
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `host=` parameter of a `forwarded` value, if any.
pub fn forwarded_host(value: &str) -> Option<&str> {
    value
        .split([';', ','])
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim().trim_matches('"'))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A W3C `traceparent`: version 00, random trace and parent ids, flags 00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The 128-bit trace id (never zero).
    pub trace_id: u128,
    /// The 64-bit parent span id (never zero).
    pub parent_id: u64,
}

impl TraceParent {
    /// Fresh random ids (all-zero ids are invalid in W3C trace context, so they are avoided).
    pub fn random() -> Self {
        Self {
            trace_id: rand::random::<u128>().max(1),
            parent_id: rand::random::<u64>().max(1),
        }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; `None` when malformed or ids are zero.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some() || version != "00" || !hex(trace, 32) || !hex(parent, 16) {
            return None;
        }
        if !hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let parent_id = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
        Some(Self {
            trace_id,
            parent_id,
        })
    }

    /// The header value.
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(&self.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-00", self.trace_id, self.parent_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baggage_omits_empty_values_and_round_trips() {
        let b = Baggage {
            cluster: "Kubernetes".into(),
            namespace: "shop".into(),
            workload_type: "deployment".into(),
            workload_name: "cart".into(),
            service_name: "cart".into(),
            service_version: "v1".into(),
            ..Default::default()
        };
        let v = b.header_value();
        assert_eq!(
            v.to_str().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=cart,\
             service.name=cart,service.version=v1"
        );
        assert_eq!(Baggage::parse(v.to_str().unwrap()), b);
    }

    #[test]
    fn baggage_escapes_separators() {
        let b = Baggage {
            namespace: "a,b;c d%".into(),
            ..Default::default()
        };
        let v = b.header_value();
        assert_eq!(v.to_str().unwrap(), "k8s.namespace.name=a%2Cb%3Bc%20d%25");
        assert_eq!(Baggage::parse(v.to_str().unwrap()).namespace, "a,b;c d%");
        assert_eq!(
            Baggage::parse("garbage,,=x,k8s.pod.name=p;prop=1").workload_name,
            "p"
        );
    }

    #[test]
    fn forwarded_formats_v4_v6_and_host() {
        let v4 = forwarded("10.0.0.1:5555".parse().unwrap(), None);
        assert_eq!(v4.to_str().unwrap(), "for=\"10.0.0.1:5555\"");
        let v6 = forwarded(
            "[fd00::1]:80".parse().unwrap(),
            Some("cart.shop.svc.cluster.local"),
        );
        assert_eq!(
            v6.to_str().unwrap(),
            "for=\"[fd00::1]:80\";host=cart.shop.svc.cluster.local"
        );
        assert_eq!(
            forwarded_host(v6.to_str().unwrap()),
            Some("cart.shop.svc.cluster.local")
        );
        assert_eq!(forwarded_host(v4.to_str().unwrap()), None);
        // A host that is not a token is dropped rather than corrupting the header.
        let bad = forwarded("10.0.0.1:1".parse().unwrap(), Some("a b"));
        assert_eq!(bad.to_str().unwrap(), "for=\"10.0.0.1:1\"");
    }

    #[test]
    fn traceparent_is_w3c_and_parses_back() {
        let t = TraceParent::random();
        let s = t.to_string();
        assert_eq!(s.len(), 55);
        assert!(s.starts_with("00-") && s.ends_with("-00"));
        assert_eq!(TraceParent::parse(&s), Some(t));
        assert_ne!(TraceParent::random(), t);
        for bad in [
            "",
            "01-00000000000000000000000000000001-0000000000000001-00",
            "00-00000000000000000000000000000000-0000000000000001-00",
            "00-0000000000000000000000000000001-0000000000000001-00",
            "00-00000000000000000000000000000001-0000000000000001-00-x",
            "00-0000000000000000000000000000000g-0000000000000001-00",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
