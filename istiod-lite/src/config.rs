//! istiod-lite configuration: parsed once, from an injectable key→value source, then validated.
//!
//! Every key is an `ISTIOD_*` constant below; the binary layers its command-line flags over the process
//! environment, and tests pass a map. This module imports nothing from the runtime modules so it can
//! never become part of an import cycle.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::identity::{DEFAULT_TRUST_DOMAIN, validate_trust_domain};
use serde::Serialize;

/// Address of the TLS gRPC server (CA and xDS).
pub const GRPC_ADDR: &str = "ISTIOD_GRPC_ADDR";
/// Trust domain of every identity the CA signs.
pub const TRUST_DOMAIN: &str = "ISTIOD_TRUST_DOMAIN";
/// Directory where the self-signed root is created on first start and reloaded afterwards.
pub const CA_DIR: &str = "ISTIOD_CA_DIR";
/// Istio `cacerts` directory (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`); when
/// set, the CA signs with that certificate (usually an intermediate) and never generates a root.
pub const CACERTS_DIR: &str = "ISTIOD_CACERTS_DIR";
/// Lifetime of a newly generated self-signed root.
pub const SELF_SIGNED_ROOT_TTL: &str = "ISTIOD_SELF_SIGNED_ROOT_TTL";
/// Lifetime given to workload certificates whose request asks for none.
pub const DEFAULT_WORKLOAD_CERT_TTL: &str = "ISTIOD_DEFAULT_WORKLOAD_CERT_TTL";
/// Longest workload certificate lifetime a request may ask for.
pub const MAX_WORKLOAD_CERT_TTL: &str = "ISTIOD_MAX_WORKLOAD_CERT_TTL";
/// Comma-separated DNS SANs of istiod's own serving certificate.
pub const SERVING_DNS_NAMES: &str = "ISTIOD_SERVING_DNS_NAMES";
/// Comma-separated IP SANs of istiod's own serving certificate.
pub const SERVING_IPS: &str = "ISTIOD_SERVING_IPS";
/// Lifetime of istiod's serving certificate (renewed at half-life).
pub const SERVING_CERT_TTL: &str = "ISTIOD_SERVING_CERT_TTL";
/// Where the root certificate PEM is written for clients to trust.
pub const ROOT_CERT_OUT: &str = "ISTIOD_ROOT_CERT_OUT";
/// YAML/JSON file of bearer tokens (and pod placements) for standalone authentication.
pub const TOKENS_FILE: &str = "ISTIOD_TOKENS_FILE";
/// The cluster id callers must claim in their `clusterid` metadata (when they send one).
pub const CLUSTER_ID: &str = "ISTIOD_CLUSTER_ID";
/// Comma-separated `namespace/serviceaccount` list of node agents allowed to impersonate workloads.
pub const TRUSTED_NODE_ACCOUNTS: &str = "ISTIOD_TRUSTED_NODE_ACCOUNTS";
/// How long in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: &str = "ISTIOD_DRAIN_TIMEOUT";
/// Quiet period that ends a burst of configuration changes before xDS pushes.
pub const XDS_DEBOUNCE: &str = "ISTIOD_XDS_DEBOUNCE";
/// Longest a configuration change waits for its burst to end before it is pushed.
pub const XDS_MAX_DEBOUNCE: &str = "ISTIOD_XDS_MAX_DEBOUNCE";
/// How long a proxy may leave an xDS response unacknowledged before its stream is closed.
pub const XDS_ACK_TIMEOUT: &str = "ISTIOD_XDS_ACK_TIMEOUT";
/// Address of the monitoring server (`/metrics`, `/ready`); empty disables it.
pub const MONITORING_ADDR: &str = "ISTIOD_MONITORING_ADDR";
/// Where Kubernetes objects come from: `dir` (a directory of YAML, [`CONFIG_DIR`]), `kube` (the
/// API server, from kubeconfig or the in-cluster service account) or `none` (CA only, no xDS
/// resources). Default: `dir` when [`CONFIG_DIR`] is set, else `none`.
pub const CONFIG_SOURCE: &str = "ISTIOD_CONFIG_SOURCE";
/// Directory of Kubernetes YAML (Namespaces, Pods, Services, AuthorizationPolicies, ...) watched
/// for changes in standalone mode.
pub const CONFIG_DIR: &str = "ISTIOD_CONFIG_DIR";
/// How often [`CONFIG_DIR`] is checked for changes.
pub const CONFIG_POLL: &str = "ISTIOD_CONFIG_POLL";
/// Istio root namespace: its policies apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "ISTIOD_ROOT_NAMESPACE";
/// `tracing` filter directive, e.g. `info` or `istiod_lite=debug`.
pub const LOG: &str = "ISTIOD_LOG";
/// `text` or `json`.
pub const LOG_FORMAT: &str = "ISTIOD_LOG_FORMAT";

// Istio's istiod serves CA and xDS over TLS on 15012.
const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
// Relative paths, like ztunnel's defaults, so a developer can run without root; production sets them.
const DEFAULT_CA_DIR: &str = "./var/lib/istiod-lite/ca";
// Where ztunnel looks for the CA root by default (`CA_ROOT_CA`), so a local ztunnel trusts us as-is.
const DEFAULT_ROOT_CERT_OUT: &str = "./var/run/secrets/istio/root-cert.pem";
const DEFAULT_SELF_SIGNED_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86400);
// Istio: DEFAULT_WORKLOAD_CERT_TTL 24 h, MAX_WORKLOAD_CERT_TTL 90 days.
const DEFAULT_DEFAULT_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(86400);
const DEFAULT_MAX_WORKLOAD_CERT_TTL: Duration = Duration::from_secs(90 * 86400);
const DEFAULT_SERVING_DNS_NAMES: &str = "istiod.istio-system.svc,localhost";
const DEFAULT_SERVING_IPS: &str = "127.0.0.1";
// Short enough that a leaked serving key ages out, long enough to survive a CA outage of days.
const DEFAULT_SERVING_CERT_TTL: Duration = Duration::from_secs(30 * 86400);
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
// The Istio chart's CA_TRUSTED_NODE_ACCOUNTS default.
const DEFAULT_TRUSTED_NODE_ACCOUNTS: &str = "istio-system/ztunnel";
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_LOG: &str = "info";
const DEFAULT_CONFIG_POLL: Duration = Duration::from_millis(500);
const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
// Shorter than istiod's PILOT_DEBOUNCE_AFTER (100 ms): the translation pipeline in front of the
// ADS server already coalesces bursts (at most one full translation per 100 ms), so the push
// debounce only folds near-simultaneous changes, and a change after a quiet period is pushed
// without waiting for it (config propagation target: p99 ≤ 50 ms). istiod's PILOT_DEBOUNCE_MAX is 10 s, but a second
// keeps pod changes reaching proxies promptly under constant churn.
const DEFAULT_XDS_DEBOUNCE: Duration = Duration::from_millis(10);
const DEFAULT_XDS_MAX_DEBOUNCE: Duration = Duration::from_secs(1);
// Generous: a proxy applying a large snapshot on a busy node must not be cut off.
const DEFAULT_XDS_ACK_TIMEOUT: Duration = Duration::from_secs(30);

pub use mesh_core::config::{EnvSource, Layered, Source, parse_duration};

/// Why the configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key has a value that cannot be parsed or is out of range.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The rejected value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required key is not set.
    #[error("{key} must be set: {why}")]
    Missing {
        /// The key.
        key: &'static str,
        /// What it is needed for.
        why: &'static str,
    },
    /// Two settings contradict each other.
    #[error("inconsistent configuration: {0}")]
    Inconsistent(String),
}

/// The whole istiod-lite configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The gRPC server and its certificate.
    pub server: ServerConfig,
    /// The certificate authority.
    pub ca: CaConfig,
    /// Caller authentication and impersonation rules.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// The xDS server.
    pub xds: XdsConfig,
    /// Where the Kubernetes objects behind xDS come from.
    pub source: SourceConfig,
}

/// Where Kubernetes objects come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SourceKind {
    /// No objects: the CA runs alone and xDS serves empty resource sets.
    None,
    /// A directory of Kubernetes YAML, polled.
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Poll interval.
        #[serde(serialize_with = "ser_duration")]
        poll: Duration,
    },
    /// The Kubernetes API server (kubeconfig or in-cluster).
    Kube,
}

/// The object source and the translation settings.
#[derive(Debug, Clone, Serialize)]
pub struct SourceConfig {
    /// Where objects come from.
    pub kind: SourceKind,
    /// Istio root namespace.
    pub root_namespace: String,
}

/// The xDS server's timing.
#[derive(Debug, Clone, Serialize)]
pub struct XdsConfig {
    /// Quiet period ending a burst of changes.
    #[serde(serialize_with = "ser_duration")]
    pub debounce: Duration,
    /// Longest wait for a burst to end.
    #[serde(serialize_with = "ser_duration")]
    pub max_debounce: Duration,
    /// Unacknowledged-response limit.
    #[serde(serialize_with = "ser_duration")]
    pub ack_timeout: Duration,
}

/// The TLS gRPC server.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Listen address.
    pub grpc_addr: SocketAddr,
    /// DNS SANs of the serving certificate.
    pub serving_dns_names: Vec<String>,
    /// IP SANs of the serving certificate.
    pub serving_ips: Vec<IpAddr>,
    /// Serving certificate lifetime.
    #[serde(serialize_with = "ser_duration")]
    pub serving_cert_ttl: Duration,
    /// Where the root PEM is written for clients.
    pub root_cert_out: PathBuf,
    /// Grace period for in-flight requests at shutdown.
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
}

/// Where the CA's signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaSource {
    /// A self-signed root, generated into `dir` on first start and reloaded afterwards.
    SelfSigned {
        /// The directory holding the root and its key.
        dir: PathBuf,
        /// Lifetime of a newly generated root.
        #[serde(serialize_with = "ser_duration")]
        root_ttl: Duration,
    },
    /// An operator-provided Istio `cacerts` directory (typically an intermediate CA).
    Plugged {
        /// The directory.
        dir: PathBuf,
    },
}

/// The certificate authority.
#[derive(Debug, Clone, Serialize)]
pub struct CaConfig {
    /// Trust domain of every identity signed.
    pub trust_domain: String,
    /// Signing key source.
    pub source: CaSource,
    /// Lifetime for requests that ask for none.
    #[serde(serialize_with = "ser_duration")]
    pub default_workload_cert_ttl: Duration,
    /// Longest lifetime a request may ask for; longer requests are rejected.
    #[serde(serialize_with = "ser_duration")]
    pub max_workload_cert_ttl: Duration,
}

/// Caller authentication.
#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    /// The static tokens file (standalone mode).
    pub tokens_file: PathBuf,
    /// The cluster id callers may claim.
    pub cluster_id: String,
    /// `(namespace, service account)` of node agents allowed to impersonate.
    pub trusted_node_accounts: Vec<(String, String)>,
}

/// Logging.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// `tracing` filter directive.
    pub filter: String,
    /// Emit JSON lines instead of text.
    pub json: bool,
}

impl Config {
    /// Parses and validates the configuration from `source`.
    pub fn from_source(source: &impl Source) -> Result<Self, ConfigError> {
        let config = Self {
            server: server_config(source)?,
            ca: ca_config(source)?,
            auth: auth_config(source)?,
            log: log_config(source)?,
            xds: xds_config(source)?,
            source: source_config(source)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let ca = &self.ca;
        if ca.default_workload_cert_ttl > ca.max_workload_cert_ttl {
            return Err(ConfigError::Inconsistent(format!(
                "{DEFAULT_WORKLOAD_CERT_TTL} ({}s) is longer than {MAX_WORKLOAD_CERT_TTL} ({}s)",
                ca.default_workload_cert_ttl.as_secs(),
                ca.max_workload_cert_ttl.as_secs()
            )));
        }
        if self.server.serving_dns_names.is_empty() && self.server.serving_ips.is_empty() {
            return Err(ConfigError::Inconsistent(format!(
                "{SERVING_DNS_NAMES} and {SERVING_IPS} are both empty; the serving certificate \
                 needs at least one name"
            )));
        }
        Ok(())
    }
}

fn server_config(source: &impl Source) -> Result<ServerConfig, ConfigError> {
    let dns = get_or(source, SERVING_DNS_NAMES, DEFAULT_SERVING_DNS_NAMES);
    let serving_dns_names = split_list(&dns)
        .map(|name| parse_dns_name(SERVING_DNS_NAMES, name))
        .collect::<Result<_, _>>()?;
    let ips = get_or(source, SERVING_IPS, DEFAULT_SERVING_IPS);
    let serving_ips = split_list(&ips)
        .map(|ip| parse_value(SERVING_IPS, ip, "expected an IP address"))
        .collect::<Result<_, _>>()?;
    Ok(ServerConfig {
        grpc_addr: parse_value(
            GRPC_ADDR,
            &get_or(source, GRPC_ADDR, DEFAULT_GRPC_ADDR),
            "expected host:port, e.g. 0.0.0.0:15012",
        )?,
        serving_dns_names,
        serving_ips,
        serving_cert_ttl: duration(source, SERVING_CERT_TTL, DEFAULT_SERVING_CERT_TTL)?,
        root_cert_out: path(source, ROOT_CERT_OUT, DEFAULT_ROOT_CERT_OUT)?,
        drain_timeout: duration(source, DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT)?,
    })
}

fn ca_config(source: &impl Source) -> Result<CaConfig, ConfigError> {
    let trust_domain = get_or(source, TRUST_DOMAIN, DEFAULT_TRUST_DOMAIN);
    validate_trust_domain(&trust_domain).map_err(|e| ConfigError::Invalid {
        key: TRUST_DOMAIN,
        value: trust_domain.clone(),
        reason: e.to_string(),
    })?;
    let source_kind = match non_empty(source, CACERTS_DIR) {
        Some(dir) => CaSource::Plugged { dir: dir.into() },
        None => CaSource::SelfSigned {
            dir: path(source, CA_DIR, DEFAULT_CA_DIR)?,
            root_ttl: duration(source, SELF_SIGNED_ROOT_TTL, DEFAULT_SELF_SIGNED_ROOT_TTL)?,
        },
    };
    Ok(CaConfig {
        trust_domain,
        source: source_kind,
        default_workload_cert_ttl: duration(
            source,
            DEFAULT_WORKLOAD_CERT_TTL,
            DEFAULT_DEFAULT_WORKLOAD_CERT_TTL,
        )?,
        max_workload_cert_ttl: duration(
            source,
            MAX_WORKLOAD_CERT_TTL,
            DEFAULT_MAX_WORKLOAD_CERT_TTL,
        )?,
    })
}

fn auth_config(source: &impl Source) -> Result<AuthConfig, ConfigError> {
    let tokens_file = non_empty(source, TOKENS_FILE).ok_or(ConfigError::Missing {
        key: TOKENS_FILE,
        why: "it is the only way callers can authenticate in standalone mode",
    })?;
    let accounts = get_or(source, TRUSTED_NODE_ACCOUNTS, DEFAULT_TRUSTED_NODE_ACCOUNTS);
    let trusted_node_accounts = split_list(&accounts)
        .map(parse_account)
        .collect::<Result<_, _>>()?;
    let cluster_id = get_or(source, CLUSTER_ID, DEFAULT_CLUSTER_ID);
    if cluster_id.trim().is_empty() {
        return Err(invalid(CLUSTER_ID, &cluster_id, "it must not be empty"));
    }
    Ok(AuthConfig {
        tokens_file: tokens_file.into(),
        cluster_id,
        trusted_node_accounts,
    })
}

fn xds_config(source: &impl Source) -> Result<XdsConfig, ConfigError> {
    let xds = XdsConfig {
        debounce: duration(source, XDS_DEBOUNCE, DEFAULT_XDS_DEBOUNCE)?,
        max_debounce: duration(source, XDS_MAX_DEBOUNCE, DEFAULT_XDS_MAX_DEBOUNCE)?,
        ack_timeout: duration(source, XDS_ACK_TIMEOUT, DEFAULT_XDS_ACK_TIMEOUT)?,
    };
    if xds.max_debounce < xds.debounce {
        return Err(ConfigError::Inconsistent(format!(
            "{XDS_MAX_DEBOUNCE} ({:?}) is shorter than {XDS_DEBOUNCE} ({:?})",
            xds.max_debounce, xds.debounce
        )));
    }
    Ok(xds)
}

/// The monitoring address (`None` when set to empty). Read separately from [`Config`] because the
/// binary binds it before building the rest.
pub fn monitoring_addr(source: &impl Source) -> Result<Option<SocketAddr>, ConfigError> {
    match source.get(MONITORING_ADDR) {
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => parse_value(
            MONITORING_ADDR,
            &v,
            "expected host:port, e.g. 0.0.0.0:15014",
        )
        .map(Some),
        None => Ok(Some(SocketAddr::from(([127, 0, 0, 1], 15014)))),
    }
}

fn source_config(source: &impl Source) -> Result<SourceConfig, ConfigError> {
    let dir = non_empty(source, CONFIG_DIR);
    let requested = non_empty(source, CONFIG_SOURCE);
    let kind = match (requested.as_deref(), dir) {
        (None | Some("dir"), Some(dir)) => SourceKind::Dir {
            dir: dir.into(),
            poll: duration(source, CONFIG_POLL, DEFAULT_CONFIG_POLL)?,
        },
        (Some("dir"), None) => {
            return Err(ConfigError::Missing {
                key: CONFIG_DIR,
                why: "ISTIOD_CONFIG_SOURCE=dir reads objects from that directory",
            });
        }
        (None | Some("none"), None) => SourceKind::None,
        (Some("kube"), None) => SourceKind::Kube,
        (Some(kind @ ("none" | "kube")), Some(_)) => {
            return Err(ConfigError::Inconsistent(format!(
                "{CONFIG_DIR} is set but {CONFIG_SOURCE} is {kind:?}; unset one of them"
            )));
        }
        (Some(other), _) => {
            return Err(invalid(
                CONFIG_SOURCE,
                other,
                "expected one of: dir, kube, none",
            ));
        }
    };
    let root_namespace = get_or(source, ROOT_NAMESPACE, DEFAULT_ROOT_NAMESPACE);
    if root_namespace.trim().is_empty() {
        return Err(invalid(
            ROOT_NAMESPACE,
            &root_namespace,
            "it must not be empty",
        ));
    }
    Ok(SourceConfig {
        kind,
        root_namespace,
    })
}

fn log_config(source: &impl Source) -> Result<LogConfig, ConfigError> {
    let format = get_or(source, LOG_FORMAT, "text");
    let json = match format.as_str() {
        "text" => false,
        "json" => true,
        _ => {
            return Err(invalid(
                LOG_FORMAT,
                &format,
                "expected \"text\" or \"json\"",
            ));
        }
    };
    Ok(LogConfig {
        filter: get_or(source, LOG, DEFAULT_LOG),
        json,
    })
}

fn get_or(source: &impl Source, key: &str, default: &str) -> String {
    non_empty(source, key).unwrap_or_else(|| default.to_string())
}

// An empty value means "unset", so `ISTIOD_X=` falls back to the default like an absent key.
fn non_empty(source: &impl Source, key: &str) -> Option<String> {
    source.get(key).filter(|v| !v.trim().is_empty())
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_value<T: std::str::FromStr>(
    key: &'static str,
    value: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, value, expected))
}

fn path(source: &impl Source, key: &'static str, default: &str) -> Result<PathBuf, ConfigError> {
    Ok(PathBuf::from(get_or(source, key, default)))
}

fn duration(
    source: &impl Source,
    key: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match non_empty(source, key) {
        None => Ok(default),
        Some(value) => parse_duration(&value).map_err(|reason| invalid(key, &value, reason)),
    }
}

fn parse_dns_name(key: &'static str, name: &str) -> Result<String, ConfigError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*');
    if name.len() > 253 || !name.chars().all(ok) || name.starts_with('.') || name.ends_with('.') {
        return Err(invalid(key, name, "not a valid DNS name"));
    }
    Ok(name.to_ascii_lowercase())
}

fn parse_account(value: &str) -> Result<(String, String), ConfigError> {
    match value.split('/').collect::<Vec<_>>().as_slice() {
        [ns, sa] if !ns.is_empty() && !sa.is_empty() => Ok((ns.to_string(), sa.to_string())),
        _ => Err(invalid(
            TRUSTED_NODE_ACCOUNTS,
            value,
            "expected namespace/serviceaccount",
        )),
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn source(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.entry(TOKENS_FILE.to_string())
            .or_insert_with(|| "/etc/istiod/tokens.yaml".to_string());
        map
    }

    #[test]
    fn xds_timing_defaults_and_checks() {
        let xds = Config::from_source(&source(&[])).unwrap().xds;
        assert_eq!(xds.debounce, Duration::from_millis(10));
        assert_eq!(xds.max_debounce, Duration::from_secs(1));
        assert_eq!(xds.ack_timeout, Duration::from_secs(30));
        let cases = [
            (
                &[(XDS_DEBOUNCE, "2s")][..],
                "ISTIOD_XDS_MAX_DEBOUNCE (1s) is shorter",
            ),
            (
                &[(XDS_ACK_TIMEOUT, "0")][..],
                "for ISTIOD_XDS_ACK_TIMEOUT: the duration must be positive",
            ),
            (&[(XDS_DEBOUNCE, "soon")][..], "for ISTIOD_XDS_DEBOUNCE"),
        ];
        for (pairs, want) in cases {
            let err = Config::from_source(&source(pairs)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn defaults_match_istio() {
        let config = Config::from_source(&source(&[])).unwrap();
        assert_eq!(config.server.grpc_addr.port(), 15012);
        assert_eq!(
            config.server.serving_dns_names,
            vec!["istiod.istio-system.svc", "localhost"]
        );
        assert_eq!(
            config.server.serving_ips,
            vec![IpAddr::from([127, 0, 0, 1])]
        );
        assert_eq!(config.ca.trust_domain, "cluster.local");
        assert_eq!(
            config.ca.default_workload_cert_ttl,
            Duration::from_secs(86400)
        );
        assert_eq!(
            config.ca.max_workload_cert_ttl,
            Duration::from_secs(90 * 86400)
        );
        assert!(matches!(config.ca.source, CaSource::SelfSigned { .. }));
        assert_eq!(
            config.auth.trusted_node_accounts,
            vec![("istio-system".to_string(), "ztunnel".to_string())]
        );
        assert_eq!(config.auth.cluster_id, "Kubernetes");
        assert!(!config.log.json);
    }

    #[test]
    fn parses_overrides() {
        let config = Config::from_source(&source(&[
            (GRPC_ADDR, "127.0.0.1:0"),
            (CACERTS_DIR, "/etc/cacerts"),
            (MAX_WORKLOAD_CERT_TTL, "48h"),
            (DEFAULT_WORKLOAD_CERT_TTL, "3600"),
            (
                TRUSTED_NODE_ACCOUNTS,
                "kube-system/agent, istio-system/ztunnel",
            ),
            (SERVING_IPS, ""),
            (SERVING_DNS_NAMES, "Istiod.Example"),
            (LOG_FORMAT, "json"),
        ]))
        .unwrap();
        assert_eq!(config.server.grpc_addr.port(), 0);
        assert_eq!(
            config.ca.source,
            CaSource::Plugged {
                dir: "/etc/cacerts".into()
            }
        );
        assert_eq!(
            config.ca.max_workload_cert_ttl,
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(
            config.ca.default_workload_cert_ttl,
            Duration::from_secs(3600)
        );
        assert_eq!(config.auth.trusted_node_accounts.len(), 2);
        // An empty value means "use the default".
        assert_eq!(
            config.server.serving_ips,
            vec![IpAddr::from([127, 0, 0, 1])]
        );
        assert_eq!(config.server.serving_dns_names, vec!["istiod.example"]);
        assert!(config.log.json);
        // The logged form is plain JSON with readable durations and no secrets.
        let json = serde_json::to_string(&config).unwrap();
        assert!(
            json.contains("\"max_workload_cert_ttl\":\"172800s\""),
            "{json}"
        );
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[(GRPC_ADDR, "nope")], "ISTIOD_GRPC_ADDR"),
            (&[(MAX_WORKLOAD_CERT_TTL, "90 days")], "expected a duration"),
            (&[(MAX_WORKLOAD_CERT_TTL, "0s")], "must be positive"),
            (
                &[(DEFAULT_WORKLOAD_CERT_TTL, "-5")],
                "ISTIOD_DEFAULT_WORKLOAD_CERT_TTL",
            ),
            (&[(SERVING_IPS, "1.2.3")], "expected an IP address"),
            (&[(SERVING_DNS_NAMES, "bad name")], "not a valid DNS name"),
            (&[(TRUST_DOMAIN, "Bad.Domain")], "ISTIOD_TRUST_DOMAIN"),
            (
                &[(TRUSTED_NODE_ACCOUNTS, "ztunnel")],
                "namespace/serviceaccount",
            ),
            (&[(LOG_FORMAT, "xml")], "ISTIOD_LOG_FORMAT"),
            (
                &[
                    (DEFAULT_WORKLOAD_CERT_TTL, "2d"),
                    (MAX_WORKLOAD_CERT_TTL, "1d"),
                ],
                "is longer than ISTIOD_MAX_WORKLOAD_CERT_TTL",
            ),
            (&[(MAX_WORKLOAD_CERT_TTL, "99999999999999999d")], "too long"),
        ];
        for (pairs, want) in cases {
            let err = Config::from_source(&source(pairs)).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{pairs:?}: {err:?} should contain {want:?}"
            );
        }
        let empty: HashMap<String, String> = HashMap::new();
        let err = Config::from_source(&empty).unwrap_err().to_string();
        assert!(err.contains("ISTIOD_TOKENS_FILE must be set"), "{err}");
    }

    #[test]
    fn layered_source_prefers_the_first() {
        let flags = source(&[(LOG, "debug")]);
        let env = source(&[(LOG, "warn"), (LOG_FORMAT, "json")]);
        let config = Config::from_source(&Layered(flags, env)).unwrap();
        assert_eq!(config.log.filter, "debug");
        assert!(config.log.json);
    }

    #[test]
    fn parses_duration_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1y").is_err());
    }
}
