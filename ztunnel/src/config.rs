//! ztunnel configuration: parsed once from an injectable key→value source, validated, nested per
//! subsystem, and logged at start.
//!
//! Every key is a `ZTUNNEL_*` constant below. The binary layers its flags (`--node-name` for
//! `ZTUNNEL_NODE_NAME`) over the process environment; tests pass a map. This module imports
//! nothing from the runtime modules, so it cannot join an import cycle.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// Local workload/service YAML file (stand-in for xDS; upstream's `LOCAL_XDS_PATH`).
pub const LOCAL_CONFIG: &str = "ZTUNNEL_LOCAL_CONFIG";
/// How often the local config file is checked for changes; `0` disables reloading.
pub const LOCAL_CONFIG_POLL: &str = "ZTUNNEL_LOCAL_CONFIG_POLL";
/// The control plane's delta ADS URL, `https://host:port`. Defaults to the CA address unless a
/// local config is given; set it empty to run with no config source at all.
pub const XDS_ADDRESS: &str = "ZTUNNEL_XDS_ADDRESS";
/// PEM file of the root(s) the xDS server's certificate must chain to (default: the CA root).
pub const XDS_ROOT: &str = "ZTUNNEL_XDS_ROOT";
/// TLS name to verify on the xDS server instead of the URL host (default: the CA's).
pub const XDS_HOSTNAME: &str = "ZTUNNEL_XDS_HOSTNAME";
/// The ztunnel pod's name (Kubernetes downward API; part of the xDS node id).
pub const POD_NAME: &str = "POD_NAME";
/// The ztunnel pod's namespace (Kubernetes downward API; part of the xDS node id).
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";
/// The ztunnel pod's IP (Kubernetes downward API; part of the xDS node id).
pub const INSTANCE_IP: &str = "INSTANCE_IP";
/// The Kubernetes node this ztunnel runs on.
pub const NODE_NAME: &str = "ZTUNNEL_NODE_NAME";
/// The network of this node's pods (empty = default network).
pub const NETWORK: &str = "ZTUNNEL_NETWORK";
/// The node agent's ZDS socket.
pub const ZDS_SOCKET: &str = "ZTUNNEL_ZDS_SOCKET";
/// CA URL, `https://host:port`.
pub const CA_ADDRESS: &str = "ZTUNNEL_CA_ADDRESS";
/// PEM file of the root(s) the CA's serving certificate must chain to.
pub const CA_ROOT: &str = "ZTUNNEL_CA_ROOT";
/// TLS name to verify on the CA instead of the URL host (upstream's `ALT_CA_HOSTNAME`).
pub const CA_HOSTNAME: &str = "ZTUNNEL_CA_HOSTNAME";
/// File holding the bearer token for the CA (re-read on every request).
pub const TOKEN_FILE: &str = "ZTUNNEL_TOKEN_FILE";
/// A literal bearer token for the CA.
pub const TOKEN: &str = "ZTUNNEL_TOKEN";
/// Cluster id sent to the CA (`clusterid`) and in `baggage`.
pub const CLUSTER_ID: &str = "ZTUNNEL_CLUSTER_ID";
/// Requested workload certificate lifetime.
pub const CERT_TTL: &str = "ZTUNNEL_CERT_TTL";
/// Admin server address (`/healthz/ready`, `/config_dump`, `/metrics`).
pub const ADMIN_ADDR: &str = "ZTUNNEL_ADMIN_ADDR";
/// Threads of the data-plane runtime.
pub const WORKER_THREADS: &str = "ZTUNNEL_WORKER_THREADS";
/// How long connections may run after a drain starts (shutdown or pod removal).
pub const DRAIN_TIMEOUT: &str = "ZTUNNEL_DRAIN_TIMEOUT";
/// `tracing` filter, e.g. `info` or `ztunnel=debug,access=info`.
pub const LOG: &str = "ZTUNNEL_LOG";
/// `text` or `json`.
pub const LOG_FORMAT: &str = "ZTUNNEL_LOG_FORMAT";

// Istio's in-pod ZDS socket.
const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
// Istio's istiod address; in-cluster DNS.
const DEFAULT_CA_ADDRESS: &str = "https://istiod.istio-system.svc:15012";
// Relative like upstream's defaults, so a developer can run without root.
const DEFAULT_CA_ROOT: &str = "./var/run/secrets/istio/root-cert.pem";
const DEFAULT_TOKEN_FILE: &str = "./var/run/secrets/tokens/istio-token";
const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
// Istio's SECRET_TTL default.
const DEFAULT_CERT_TTL: Duration = Duration::from_secs(86400);
// Upstream's admin port, loopback only: it exposes certificates' metadata and config.
const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
// At most two data-plane threads: they saturate a node's pods; more only adds contention.
const MAX_DEFAULT_WORKER_THREADS: usize = 2;
// Upstream's default drain period when no termination grace period is configured.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
// Short enough that an edited file takes effect before a human re-runs a test.
const DEFAULT_LOCAL_CONFIG_POLL: Duration = Duration::from_secs(1);
const DEFAULT_LOG: &str = "info";
const MAX_WORKER_THREADS: usize = 1024;

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
    /// Two settings contradict each other.
    #[error("inconsistent configuration: {0}")]
    Inconsistent(String),
}

/// The whole ztunnel configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where this ztunnel runs.
    pub node: NodeConfig,
    /// The CA and certificates.
    pub ca: CaConfig,
    /// In-pod mode (ZDS).
    pub inpod: InpodConfig,
    /// Workloads and services.
    pub state: StateConfig,
    /// The admin server.
    pub admin: AdminConfig,
    /// Runtimes and shutdown.
    pub runtime: RuntimeConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Where this ztunnel runs.
#[derive(Debug, Clone, Serialize)]
pub struct NodeConfig {
    /// Node name (informational until xDS; logged and dumped).
    pub node_name: Option<String>,
    /// Network of this node's pods.
    pub network: String,
    /// Cluster id.
    pub cluster_id: String,
    /// The ztunnel pod's name.
    pub pod_name: String,
    /// The ztunnel pod's namespace.
    pub pod_namespace: String,
    /// The ztunnel pod's IP.
    pub instance_ip: Option<IpAddr>,
}

/// How the CA is reached.
#[derive(Debug, Clone, Serialize)]
pub struct CaConfig {
    /// CA URL.
    pub address: String,
    /// Root PEM file for the CA's serving certificate.
    pub root_cert: PathBuf,
    /// TLS name to verify instead of the URL host.
    pub server_name: Option<String>,
    /// The bearer token.
    pub token: TokenSource,
    /// Requested certificate lifetime.
    #[serde(with = "secs")]
    pub cert_ttl: Duration,
}

/// Where the CA bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// No token.
    None,
    /// A literal token (never logged).
    #[serde(serialize_with = "redacted")]
    Literal(String),
    /// A file, re-read on every request.
    File(PathBuf),
}

/// How the control plane's delta ADS is reached (the token is the CA's).
#[derive(Debug, Clone, Serialize)]
pub struct XdsConfig {
    /// `https://host:port`.
    pub address: String,
    /// Root PEM file for the server's certificate.
    pub root_cert: PathBuf,
    /// TLS name to verify instead of the URL host.
    pub server_name: Option<String>,
}

/// In-pod mode.
#[derive(Debug, Clone, Serialize)]
pub struct InpodConfig {
    /// The node agent's ZDS socket.
    pub zds_socket: PathBuf,
}

/// Workload and service sources: a local file or xDS, never both.
#[derive(Debug, Clone, Serialize)]
pub struct StateConfig {
    /// Local YAML file, if any.
    pub local_config: Option<PathBuf>,
    /// The control plane, if any.
    pub xds: Option<XdsConfig>,
    /// Reload check interval; `None` = never reload.
    #[serde(with = "opt_secs")]
    pub poll_interval: Option<Duration>,
}

/// The admin server.
#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Listen address.
    pub addr: SocketAddr,
}

/// Runtimes and shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeConfig {
    /// Data-plane worker threads.
    pub worker_threads: usize,
    /// Drain deadline.
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
}

/// Logging.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// `tracing` filter directive.
    pub filter: String,
    /// JSON lines instead of text.
    pub json: bool,
}

fn redacted<S: serde::Serializer>(_: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

mod opt_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

impl Config {
    /// Parses and validates the configuration from `source`.
    pub fn from_source(source: &impl Source) -> Result<Self, ConfigError> {
        Ok(Self {
            node: node_config(source)?,
            ca: ca_config(source)?,
            inpod: InpodConfig {
                zds_socket: path(source, ZDS_SOCKET, DEFAULT_ZDS_SOCKET)?,
            },
            state: state_config(source)?,
            admin: AdminConfig {
                addr: parse(source, ADMIN_ADDR, DEFAULT_ADMIN_ADDR, "expected ip:port")?,
            },
            runtime: runtime_config(source)?,
            log: log_config(source)?,
        })
    }
}

fn node_config(source: &impl Source) -> Result<NodeConfig, ConfigError> {
    let instance_ip = match non_empty(source, INSTANCE_IP) {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse()
                .map_err(|_| invalid(INSTANCE_IP, &v, "expected an ip address"))?,
        ),
    };
    Ok(NodeConfig {
        node_name: non_empty(source, NODE_NAME),
        network: source.get(NETWORK).unwrap_or_default(),
        cluster_id: get_or(source, CLUSTER_ID, DEFAULT_CLUSTER_ID),
        pod_name: source.get(POD_NAME).unwrap_or_default(),
        pod_namespace: source.get(POD_NAMESPACE).unwrap_or_default(),
        instance_ip,
    })
}

fn state_config(source: &impl Source) -> Result<StateConfig, ConfigError> {
    let local_config = non_empty(source, LOCAL_CONFIG).map(PathBuf::from);
    let address = match (source.get(XDS_ADDRESS), &local_config) {
        // Both sources would fight over the store: one replaces what the other applied.
        (Some(a), Some(_)) if !a.trim().is_empty() => {
            return Err(ConfigError::Inconsistent(format!(
                "{LOCAL_CONFIG} and {XDS_ADDRESS} are both set; use the local file or xds, not both"
            )));
        }
        (Some(a), _) => Some(a.trim().to_string()).filter(|a| !a.is_empty()),
        (None, Some(_)) => None,
        // Like upstream: istiod serves both the CA and xDS on one port.
        (None, None) => Some(get_or(source, CA_ADDRESS, DEFAULT_CA_ADDRESS)),
    };
    let xds = match address {
        None => None,
        Some(address) => Some(xds_config(source, address)?),
    };
    Ok(StateConfig {
        local_config,
        xds,
        poll_interval: poll_interval(source)?,
    })
}

fn xds_config(source: &impl Source, address: String) -> Result<XdsConfig, ConfigError> {
    if !address.starts_with("https://") {
        return Err(invalid(
            XDS_ADDRESS,
            &address,
            "the control plane is only reached over tls: use https://host:port",
        ));
    }
    let ca_root = get_or(source, CA_ROOT, DEFAULT_CA_ROOT);
    Ok(XdsConfig {
        address,
        root_cert: path(source, XDS_ROOT, &ca_root)?,
        server_name: non_empty(source, XDS_HOSTNAME).or_else(|| non_empty(source, CA_HOSTNAME)),
    })
}

fn ca_config(source: &impl Source) -> Result<CaConfig, ConfigError> {
    let address = get_or(source, CA_ADDRESS, DEFAULT_CA_ADDRESS);
    if !address.starts_with("https://") {
        return Err(invalid(
            CA_ADDRESS,
            &address,
            "the ca is only reached over tls: use https://host:port",
        ));
    }
    Ok(CaConfig {
        address,
        root_cert: path(source, CA_ROOT, DEFAULT_CA_ROOT)?,
        server_name: non_empty(source, CA_HOSTNAME),
        token: token_source(source)?,
        cert_ttl: duration(source, CERT_TTL, DEFAULT_CERT_TTL)?,
    })
}

fn token_source(source: &impl Source) -> Result<TokenSource, ConfigError> {
    match (non_empty(source, TOKEN), non_empty(source, TOKEN_FILE)) {
        (Some(_), Some(_)) => Err(ConfigError::Inconsistent(format!(
            "{TOKEN} and {TOKEN_FILE} are both set; use one"
        ))),
        (Some(token), None) => Ok(TokenSource::Literal(token)),
        (None, Some(file)) => Ok(TokenSource::File(file.into())),
        // Like upstream: the default token file is used when it exists, else no token is sent.
        (None, None) if Path::new(DEFAULT_TOKEN_FILE).exists() => {
            Ok(TokenSource::File(DEFAULT_TOKEN_FILE.into()))
        }
        (None, None) => Ok(TokenSource::None),
    }
}

/// The default number of data-plane threads for a node with `cpus` CPUs: half of them, between 1
/// and 2. ztunnel shares the node with the pods it serves; on a 2-CPU node a second worker mostly
/// adds cross-thread wake-ups (measured with `mesh-bench`: 1 KiB round trips +100 µs over direct
/// with 2 workers, +37 µs with 1, and no throughput gained).
pub fn default_worker_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, MAX_DEFAULT_WORKER_THREADS)
}

/// The CPUs this process may use (cgroup quota included), at least 1.
fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn runtime_config(source: &impl Source) -> Result<RuntimeConfig, ConfigError> {
    let default = default_worker_threads(available_cpus()).to_string();
    let threads = get_or(source, WORKER_THREADS, &default);
    let worker_threads = threads
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_WORKER_THREADS).contains(n))
        .ok_or_else(|| invalid(WORKER_THREADS, &threads, "expected a number from 1 to 1024"))?;
    Ok(RuntimeConfig {
        worker_threads,
        drain_timeout: duration(source, DRAIN_TIMEOUT, DEFAULT_DRAIN_TIMEOUT)?,
    })
}

fn log_config(source: &impl Source) -> Result<LogConfig, ConfigError> {
    let format = get_or(source, LOG_FORMAT, "text");
    let json = match format.as_str() {
        "text" => false,
        "json" => true,
        _ => return Err(invalid(LOG_FORMAT, &format, "expected text or json")),
    };
    Ok(LogConfig {
        filter: get_or(source, LOG, DEFAULT_LOG),
        json,
    })
}

fn poll_interval(source: &impl Source) -> Result<Option<Duration>, ConfigError> {
    match non_empty(source, LOCAL_CONFIG_POLL).as_deref() {
        Some("0") => Ok(None),
        _ => duration(source, LOCAL_CONFIG_POLL, DEFAULT_LOCAL_CONFIG_POLL).map(Some),
    }
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn non_empty(source: &impl Source, key: &str) -> Option<String> {
    source.get(key).filter(|v| !v.trim().is_empty())
}

fn get_or(source: &impl Source, key: &str, default: &str) -> String {
    non_empty(source, key).unwrap_or_else(|| default.to_string())
}

fn parse<T: std::str::FromStr>(
    source: &impl Source,
    key: &'static str,
    default: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    let value = get_or(source, key, default);
    value
        .trim()
        .parse()
        .map_err(|_| invalid(key, &value, expected))
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn source(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_workers_are_half_the_cpus_between_one_and_two() {
        let table = [(1, 1), (2, 1), (3, 1), (4, 2), (8, 2), (96, 2)];
        for (cpus, want) in table {
            assert_eq!(default_worker_threads(cpus), want, "{cpus} cpus");
        }
    }

    #[test]
    fn defaults() {
        let c = Config::from_source(&source(&[])).unwrap();
        assert_eq!(
            c.inpod.zds_socket,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(c.admin.addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(
            c.runtime.worker_threads,
            default_worker_threads(available_cpus())
        );
        assert_eq!(c.runtime.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.ca.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(c.ca.cert_ttl, Duration::from_secs(86400));
        assert_eq!(c.node.cluster_id, "Kubernetes");
        assert_eq!(c.state.poll_interval, Some(Duration::from_secs(1)));
        assert!(c.state.local_config.is_none() && !c.log.json);
        // With no local file, config comes from xDS at the CA's address with the CA's root.
        let xds = c.state.xds.unwrap();
        assert_eq!(xds.address, "https://istiod.istio-system.svc:15012");
        assert_eq!(xds.root_cert, c.ca.root_cert);
        assert!(c.node.instance_ip.is_none() && c.node.pod_name.is_empty());
    }

    #[test]
    fn xds_and_local_config_are_exclusive() {
        let local = Config::from_source(&source(&[(LOCAL_CONFIG, "/zt.yaml")])).unwrap();
        assert!(local.state.xds.is_none());
        let both = Config::from_source(&source(&[
            (LOCAL_CONFIG, "/zt.yaml"),
            (XDS_ADDRESS, "https://istiod:15012"),
        ]))
        .unwrap_err();
        assert!(
            both.to_string()
                .contains("ZTUNNEL_LOCAL_CONFIG and ZTUNNEL_XDS_ADDRESS are both set"),
            "{both}"
        );
        let off = Config::from_source(&source(&[(XDS_ADDRESS, "")])).unwrap();
        assert!(off.state.xds.is_none() && off.state.local_config.is_none());
        let xds = Config::from_source(&source(&[
            (XDS_ADDRESS, "https://10.0.0.1:15012"),
            (CA_ROOT, "/ca.pem"),
            (CA_HOSTNAME, "istiod.istio-system.svc"),
            (POD_NAME, "ztunnel-x"),
            (POD_NAMESPACE, "istio-system"),
            (INSTANCE_IP, "10.0.0.7"),
        ]))
        .unwrap();
        let x = xds.state.xds.unwrap();
        assert_eq!(x.root_cert, PathBuf::from("/ca.pem"));
        assert_eq!(x.server_name.as_deref(), Some("istiod.istio-system.svc"));
        assert_eq!(xds.node.instance_ip, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(
            (xds.node.pod_name.as_str(), xds.node.pod_namespace.as_str()),
            ("ztunnel-x", "istio-system")
        );
        let own =
            Config::from_source(&source(&[(XDS_ROOT, "/xds.pem"), (XDS_HOSTNAME, "x")])).unwrap();
        let x = own.state.xds.unwrap();
        assert_eq!(
            (x.root_cert, x.server_name),
            (PathBuf::from("/xds.pem"), Some("x".into()))
        );
    }

    #[test]
    fn values_are_parsed_and_the_token_is_never_logged() {
        let c = Config::from_source(&source(&[
            (NODE_NAME, "node1"),
            (CA_ADDRESS, "https://10.99.0.254:15012"),
            (TOKEN, "s3cret"),
            (WORKER_THREADS, "4"),
            (DRAIN_TIMEOUT, "500ms"),
            (LOCAL_CONFIG, "/etc/zt.yaml"),
            (LOCAL_CONFIG_POLL, "0"),
            (LOG_FORMAT, "json"),
        ]))
        .unwrap();
        assert_eq!(c.node.node_name.as_deref(), Some("node1"));
        assert_eq!(c.ca.token, TokenSource::Literal("s3cret".into()));
        assert_eq!(c.runtime.worker_threads, 4);
        assert_eq!(c.runtime.drain_timeout, Duration::from_millis(500));
        assert_eq!(c.state.poll_interval, None);
        assert!(c.log.json);
        let logged = serde_json::to_string(&c).unwrap();
        assert!(
            !logged.contains("s3cret") && logged.contains("<redacted>"),
            "{logged}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (ADMIN_ADDR, "localhost", "ZTUNNEL_ADMIN_ADDR"),
            (WORKER_THREADS, "0", "expected a number from 1 to 1024"),
            (DRAIN_TIMEOUT, "5 parsecs", "ZTUNNEL_DRAIN_TIMEOUT"),
            (DRAIN_TIMEOUT, "0s", "must be positive"),
            (CA_ADDRESS, "http://ca:15012", "only reached over tls"),
            (LOG_FORMAT, "xml", "expected text or json"),
            (
                XDS_ADDRESS,
                "http://istiod:15012",
                "control plane is only reached over tls",
            ),
            (INSTANCE_IP, "10.0.0", "INSTANCE_IP: expected an ip address"),
            (CERT_TTL, "99999999999999999d", "too long"),
        ];
        for (key, value, want) in cases {
            let err = Config::from_source(&source(&[(key, value)])).unwrap_err();
            assert!(err.to_string().contains(want), "{key}={value}: {err}");
        }
        let both = Config::from_source(&source(&[(TOKEN, "a"), (TOKEN_FILE, "/t")])).unwrap_err();
        assert!(both.to_string().contains("both set"), "{both}");
    }
}
