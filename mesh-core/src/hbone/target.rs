//! The `:authority` of an HBONE `CONNECT`: `ip:port`, `[ipv6]:port` or `hostname:port`.

use std::fmt;
use std::net::SocketAddr;

/// Why a `CONNECT` authority is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The request had no `:authority`.
    #[error("CONNECT request has no :authority")]
    Missing,
    /// The authority has no port, or port 0.
    #[error("CONNECT authority {0:?} has no usable port")]
    Port(String),
    /// The host is neither an IP address nor a valid DNS name.
    #[error("CONNECT authority {0:?} has an invalid host")]
    Host(String),
}

/// Where a `CONNECT` asks to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectTarget {
    /// An IP address and port (direct to a workload, or a service VIP via a waypoint).
    Addr(SocketAddr),
    /// A hostname and port (through an east-west gateway).
    Name {
        /// The DNS name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl ConnectTarget {
    /// Parses an authority; the port is mandatory (RFC 9113 §8.5).
    pub fn parse(authority: &str) -> Result<Self, TargetError> {
        if authority.is_empty() {
            return Err(TargetError::Missing);
        }
        if let Ok(addr) = authority.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(TargetError::Port(authority.to_string()));
            }
            return Ok(Self::Addr(addr));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| TargetError::Port(authority.to_string()))?;
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(TargetError::Port(authority.to_string())),
        };
        if !is_dns_name(host) {
            return Err(TargetError::Host(authority.to_string()));
        }
        Ok(Self::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// The socket address, when the target is an IP.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Addr(addr) => Some(*addr),
            Self::Name { .. } => None,
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Addr(addr) => addr.port(),
            Self::Name { port, .. } => *port,
        }
    }
}

impl fmt::Display for ConnectTarget {
    /// Formats as an authority (`[v6]:port` for IPv6).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for ConnectTarget {
    fn from(addr: SocketAddr) -> Self {
        Self::Addr(addr)
    }
}

fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    // An all-numeric dotted host would be a malformed IPv4 address, not a name.
    let numeric = host.chars().all(|c| c.is_ascii_digit() || c == '.');
    !host.is_empty() && host.len() <= 253 && !numeric && host.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_names() {
        assert_eq!(
            ConnectTarget::parse("10.0.0.1:8080").unwrap(),
            ConnectTarget::Addr("10.0.0.1:8080".parse().unwrap())
        );
        let v6 = ConnectTarget::parse("[fd00::1]:80").unwrap();
        assert_eq!(v6.to_string(), "[fd00::1]:80");
        assert_eq!(v6.port(), 80);
        let name = ConnectTarget::parse("Reviews.Default.svc.cluster.local:9080").unwrap();
        assert_eq!(name.to_string(), "reviews.default.svc.cluster.local:9080");
        assert_eq!(name.socket_addr(), None);
    }

    #[test]
    fn rejects_bad_authorities_with_reason() {
        let cases = [
            ("", TargetError::Missing),
            ("10.0.0.1", TargetError::Port("10.0.0.1".into())),
            ("10.0.0.1:0", TargetError::Port("10.0.0.1:0".into())),
            ("host:99999", TargetError::Port("host:99999".into())),
            ("host:http", TargetError::Port("host:http".into())),
            ("fd00::1", TargetError::Host("fd00::1".into())),
            ("999.1.1.1:80", TargetError::Host("999.1.1.1:80".into())),
            ("bad host:80", TargetError::Host("bad host:80".into())),
            ("-x.example:80", TargetError::Host("-x.example:80".into())),
            (":80", TargetError::Host(":80".into())),
        ];
        for (input, want) in cases {
            assert_eq!(ConnectTarget::parse(input), Err(want), "{input}");
        }
        assert_eq!(
            TargetError::Port("x".into()).to_string(),
            "CONNECT authority \"x\" has no usable port"
        );
    }
}
