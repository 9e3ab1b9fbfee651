//! `zmesh-cni` configuration: command-line flags, then `ZMESH_CNI_*` environment variables, then
//! defaults. Parsed once, from an injectable source (tests pass a map; nothing reads the process
//! environment but `main`), validated, and logged at startup.
//!
//! Keep this module free of runtime imports: it only describes settings.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Serialize, Serializer};

use crate::locate::DEFAULT_NETNS_DIR;
use crate::rules::Backend;

/// Where Namespaces and Pods come from: `dir` (a directory of YAML) or `kube` (the API server).
pub const ENV_CONFIG_SOURCE: &str = "ZMESH_CNI_CONFIG_SOURCE";
/// Config directory (Kubernetes YAML with Namespaces and Pods).
pub const ENV_CONFIG_DIR: &str = "ZMESH_CNI_CONFIG_DIR";
/// Kubeconfig file for `--config-source kube`; unset: `KUBECONFIG`, `~/.kube/config`, then the
/// in-cluster service account.
pub const ENV_KUBECONFIG: &str = "ZMESH_CNI_KUBECONFIG";
/// This node's name.
pub const ENV_NODE_NAME: &str = "ZMESH_CNI_NODE_NAME";
/// Downward-API node name (unprefixed, as Kubernetes manifests set it); used when
/// [`ENV_NODE_NAME`] is unset.
pub const ENV_K8S_NODE_NAME: &str = "NODE_NAME";
/// ZDS socket path.
pub const ENV_ZDS_SOCKET: &str = "ZMESH_CNI_ZDS_SOCKET";
/// Capture backend (`iptables` or `nftables`).
pub const ENV_BACKEND: &str = "ZMESH_CNI_BACKEND";
/// Directory of named network namespaces searched by pod IP.
pub const ENV_NETNS_DIR: &str = "ZMESH_CNI_NETNS_DIR";
/// Admin/health listen address.
pub const ENV_ADMIN_ADDR: &str = "ZMESH_CNI_ADMIN_ADDR";
/// Config directory poll interval (`500ms`, `2s`).
pub const ENV_POLL_INTERVAL: &str = "ZMESH_CNI_POLL_INTERVAL";
/// Log filter (`tracing` env-filter syntax).
pub const ENV_LOG: &str = "ZMESH_CNI_LOG";

/// Istio's default ZDS socket path (ztunnel's `INPOD_UDS`).
pub const DEFAULT_ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
/// Default capture backend: native nftables. Each pod gets its own `inet ztunnel` table loaded
/// in one atomic `nft -f` transaction (re-applying replaces it with no window), it cannot clash
/// with chains other tools (or an Istio sidecar) keep in the iptables tables, and there is no
/// iptables-legacy/iptables-nft ambiguity about which binary a host ships. Upstream Istio defaults
/// to iptables for old kernels; every kernel we target has nf_tables. `iptables` stays available.
pub const DEFAULT_BACKEND: Backend = Backend::Nftables;
/// Default admin address. The agent runs in the node's network namespace (hostNetwork), where
/// kubelet probes the node IP, so it listens on all addresses; 8000 is Istio's CNI agent port.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:8000";
/// Default config poll interval: changes apply within about two intervals.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default log filter.
pub const DEFAULT_LOG: &str = "info";

const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);
const MAX_NODE_NAME_LEN: usize = 253;

/// Errors in the configuration; each names the flag and the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line did not parse (also `--help` and `--version`, which clap prints).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// A required setting is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A setting has an unusable value.
    #[error("invalid {setting} {value:?}: {reason}")]
    Invalid {
        /// The flag / variable.
        setting: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Parser, Debug, Default)]
#[command(
    name = "zmesh-cni",
    version,
    about = "zmesh node agent: enrolls pods in the mesh and hands them to ztunnel over ZDS"
)]
struct Args {
    /// Where Namespaces and Pods come from: dir or kube [env: ZMESH_CNI_CONFIG_SOURCE] [default: dir]
    #[arg(long, value_name = "SOURCE")]
    config_source: Option<String>,
    /// Directory of Kubernetes YAML (Namespaces, Pods); `dir` source [env: ZMESH_CNI_CONFIG_DIR]
    #[arg(long, value_name = "DIR")]
    config_dir: Option<String>,
    /// Kubeconfig file; `kube` source [env: ZMESH_CNI_KUBECONFIG] [default: KUBECONFIG, ~/.kube/config, in-cluster]
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<String>,
    /// This node's name; pods match on spec.nodeName [env: ZMESH_CNI_NODE_NAME, NODE_NAME]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// ZDS socket ztunnel connects to [env: ZMESH_CNI_ZDS_SOCKET] [default: /var/run/ztunnel/ztunnel.sock]
    #[arg(long, value_name = "PATH")]
    zds_socket: Option<String>,
    /// Capture backend: iptables or nftables [env: ZMESH_CNI_BACKEND] [default: nftables]
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// Named network namespaces, searched by pod IP [env: ZMESH_CNI_NETNS_DIR] [default: /run/netns]
    #[arg(long, value_name = "DIR")]
    netns_dir: Option<String>,
    /// Admin/health address (/healthz/ready, /status) [env: ZMESH_CNI_ADMIN_ADDR] [default: 0.0.0.0:8000]
    #[arg(long, value_name = "ADDR")]
    admin_addr: Option<String>,
    /// Config directory poll interval, e.g. 500ms or 2s [env: ZMESH_CNI_POLL_INTERVAL] [default: 500ms]
    #[arg(long, value_name = "DURATION")]
    poll_interval: Option<String>,
    /// Log filter, e.g. info or zmesh_cni=debug [env: ZMESH_CNI_LOG] [default: info]
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

/// Where the pods and namespaces come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// A directory of Kubernetes YAML, polled.
    Dir {
        /// The config directory.
        dir: PathBuf,
        /// How often it is polled.
        #[serde(serialize_with = "as_debug")]
        poll_interval: Duration,
    },
    /// The Kubernetes API server: Namespaces, and the Pods of this node.
    Kube {
        /// Kubeconfig file; `None` infers (`KUBECONFIG`, `~/.kube/config`, in-cluster).
        kubeconfig: Option<PathBuf>,
    },
}

/// How pods are captured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CaptureSettings {
    /// The rule backend.
    #[serde(serialize_with = "as_display")]
    pub backend: Backend,
    /// Named network namespaces, searched by pod IP.
    pub netns_dir: PathBuf,
}

/// The validated configuration of `zmesh-cni`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// This node's name.
    pub node_name: String,
    /// Config source.
    pub source: SourceConfig,
    /// ZDS socket path.
    pub zds_socket: PathBuf,
    /// Capture settings.
    pub capture: CaptureSettings,
    /// Admin/health listen address.
    pub admin_addr: SocketAddr,
    /// Log filter.
    pub log: String,
}

fn as_debug<S: Serializer, T: std::fmt::Debug>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{value:?}"))
}

fn as_display<S: Serializer, T: std::fmt::Display>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// One setting: its flag value, else its variables in order; empty values count as unset.
fn pick(
    flag: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    vars: &[&str],
) -> Option<String> {
    flag.into_iter()
        .chain(vars.iter().filter_map(|v| env(v)))
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
}

impl Config {
    /// Parses `args` (including the program name) and the variables `env` returns.
    pub fn parse<I, T>(args: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args = Args::try_parse_from(args)?;
        let setting = |flag, vars: &[&str]| pick(flag, env, vars);
        let source = parse_source(
            setting(args.config_source, &[ENV_CONFIG_SOURCE]),
            setting(args.config_dir, &[ENV_CONFIG_DIR]),
            setting(args.kubeconfig, &[ENV_KUBECONFIG]),
            setting(args.poll_interval, &[ENV_POLL_INTERVAL]),
        )?;
        let node_name = setting(args.node_name, &[ENV_NODE_NAME, ENV_K8S_NODE_NAME]).ok_or(
            ConfigError::Missing("--node-name (or ZMESH_CNI_NODE_NAME / NODE_NAME)"),
        )?;
        validate_node_name(&node_name)?;
        let or = |value: Option<String>, default: &str| value.unwrap_or_else(|| default.to_owned());
        Ok(Config {
            node_name,
            source,
            zds_socket: or(
                setting(args.zds_socket, &[ENV_ZDS_SOCKET]),
                DEFAULT_ZDS_SOCKET,
            )
            .into(),
            capture: CaptureSettings {
                backend: parse_backend(setting(args.backend, &[ENV_BACKEND]))?,
                netns_dir: or(setting(args.netns_dir, &[ENV_NETNS_DIR]), DEFAULT_NETNS_DIR).into(),
            },
            admin_addr: parse_admin_addr(&or(
                setting(args.admin_addr, &[ENV_ADMIN_ADDR]),
                DEFAULT_ADMIN_ADDR,
            ))?,
            log: or(setting(args.log, &[ENV_LOG]), DEFAULT_LOG),
        })
    }
}

/// The config source from `--config-source` and the settings that belong to it; a setting of
/// the other source is an error rather than silently ignored.
fn parse_source(
    source: Option<String>,
    dir: Option<String>,
    kubeconfig: Option<String>,
    poll_interval: Option<String>,
) -> Result<SourceConfig, ConfigError> {
    let unused = |setting: &'static str, value: String, source: &str| ConfigError::Invalid {
        setting,
        value,
        reason: format!("only used with --config-source {source}"),
    };
    match source.as_deref().unwrap_or("dir") {
        "dir" => {
            if let Some(path) = kubeconfig {
                return Err(unused("--kubeconfig / ZMESH_CNI_KUBECONFIG", path, "kube"));
            }
            let dir = dir.ok_or(ConfigError::Missing(
                "--config-dir (or ZMESH_CNI_CONFIG_DIR)",
            ))?;
            let poll_interval =
                poll_interval.map_or(Ok(DEFAULT_POLL_INTERVAL), |v| parse_poll_interval(&v))?;
            Ok(SourceConfig::Dir {
                dir: dir.into(),
                poll_interval,
            })
        }
        "kube" => {
            if let Some(dir) = dir {
                return Err(unused("--config-dir / ZMESH_CNI_CONFIG_DIR", dir, "dir"));
            }
            if let Some(interval) = poll_interval {
                let setting = "--poll-interval / ZMESH_CNI_POLL_INTERVAL";
                return Err(unused(setting, interval, "dir"));
            }
            Ok(SourceConfig::Kube {
                kubeconfig: kubeconfig.map(PathBuf::from),
            })
        }
        other => Err(ConfigError::Invalid {
            setting: "--config-source / ZMESH_CNI_CONFIG_SOURCE",
            value: other.to_owned(),
            reason: "expected dir or kube".to_owned(),
        }),
    }
}

fn parse_backend(value: Option<String>) -> Result<Backend, ConfigError> {
    let Some(value) = value else {
        return Ok(DEFAULT_BACKEND);
    };
    value
        .parse()
        .map_err(|e: crate::rules::RulesError| ConfigError::Invalid {
            setting: "--backend / ZMESH_CNI_BACKEND",
            value,
            reason: e.to_string(),
        })
}

fn parse_admin_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            setting: "--admin-addr / ZMESH_CNI_ADMIN_ADDR",
            value: value.to_owned(),
            reason: format!("{e} (expected IP:PORT)"),
        })
}

fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let reason = if name.len() > MAX_NODE_NAME_LEN {
        Some(format!("longer than {MAX_NODE_NAME_LEN} characters"))
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("a node name is a DNS subdomain: lowercase letters, digits, '-' and '.'".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::Invalid {
            setting: "--node-name / ZMESH_CNI_NODE_NAME",
            value: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses `250ms`, `2s` or `1m` into a poll interval between 10 ms and 60 s.
pub fn parse_poll_interval(value: &str) -> Result<Duration, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        setting: "--poll-interval / ZMESH_CNI_POLL_INTERVAL",
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| invalid("expected a number with a unit, like 500ms or 2s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        _ => return Err(invalid("unknown unit (use ms, s or m)")),
    };
    if !(MIN_POLL_INTERVAL..=MAX_POLL_INTERVAL).contains(&duration) {
        return Err(invalid("must be between 10ms and 60s"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |key: &str| env.get(key).cloned();
        Config::parse(
            std::iter::once("zmesh-cni").chain(args.iter().copied()),
            &lookup,
        )
    }

    #[test]
    fn defaults_with_required_flags() {
        let config = parse(&["--config-dir", "/etc/zmesh", "--node-name", "n1"], &[]).unwrap();
        assert_eq!(config.node_name, "n1");
        assert_eq!(
            config.source,
            SourceConfig::Dir {
                dir: PathBuf::from("/etc/zmesh"),
                poll_interval: DEFAULT_POLL_INTERVAL
            }
        );
        assert_eq!(config.zds_socket, PathBuf::from(DEFAULT_ZDS_SOCKET));
        assert_eq!(config.capture.backend, Backend::Nftables);
        assert_eq!(config.capture.netns_dir, PathBuf::from("/run/netns"));
        assert_eq!(config.admin_addr, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(config.log, "info");
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["capture"]["backend"], "nftables");
        assert_eq!(json["source"]["poll_interval"], "500ms");
        assert_eq!(json["source"]["type"], "dir");
    }

    #[test]
    fn environment_fills_in_and_flags_win() {
        let env = [
            (ENV_CONFIG_DIR, "/from/env"),
            (ENV_K8S_NODE_NAME, "k8s-node"),
            (ENV_BACKEND, "iptables"),
            (ENV_ZDS_SOCKET, "/tmp/z.sock"),
            (ENV_NETNS_DIR, "/tmp/netns"),
            (ENV_ADMIN_ADDR, "127.0.0.1:0"),
            (ENV_POLL_INTERVAL, "2s"),
            (ENV_LOG, "debug"),
        ];
        let config = parse(&[], &env).unwrap();
        let dir = |c: &Config| match &c.source {
            SourceConfig::Dir { dir, .. } => dir.clone(),
            SourceConfig::Kube { .. } => panic!("not a dir source"),
        };
        assert_eq!(dir(&config), PathBuf::from("/from/env"));
        assert_eq!(config.node_name, "k8s-node");
        assert_eq!(config.capture.backend, Backend::Iptables);
        assert_eq!(config.zds_socket, PathBuf::from("/tmp/z.sock"));
        assert_eq!(config.capture.netns_dir, PathBuf::from("/tmp/netns"));
        assert_eq!(config.admin_addr.port(), 0);
        assert!(
            matches!(config.source, SourceConfig::Dir { poll_interval, .. } if poll_interval == Duration::from_secs(2))
        );
        assert_eq!(config.log, "debug");

        let mut env = env.to_vec();
        env.push((ENV_NODE_NAME, "prefixed"));
        let config = parse(&["--config-dir", "/flag", "--backend", "nft"], &env).unwrap();
        assert_eq!(dir(&config), PathBuf::from("/flag"));
        assert_eq!(
            config.node_name, "prefixed",
            "prefixed variable beats NODE_NAME"
        );
        assert_eq!(config.capture.backend, Backend::Nftables);
        // Empty values count as unset.
        let config = parse(
            &["--node-name", "n1"],
            &[(ENV_CONFIG_DIR, "/d"), (ENV_BACKEND, " ")],
        )
        .unwrap();
        assert_eq!(config.capture.backend, DEFAULT_BACKEND);
    }

    #[test]
    fn errors_name_the_setting() {
        let required = ["--config-dir", "/d", "--node-name", "n1"];
        let with = |extra: &[&str]| {
            let args: Vec<&str> = required.iter().chain(extra).copied().collect();
            parse(&args, &[]).unwrap_err().to_string()
        };
        let cases: &[(Vec<&str>, &str)] = &[
            (
                vec!["--backend", "ebpf"],
                "invalid --backend / ZMESH_CNI_BACKEND \"ebpf\": unknown capture backend",
            ),
            (
                vec!["--admin-addr", "localhost:80"],
                "invalid --admin-addr / ZMESH_CNI_ADMIN_ADDR \"localhost:80\"",
            ),
            (vec!["--poll-interval", "5"], "unknown unit"),
            (
                vec!["--poll-interval", "fast"],
                "expected a number with a unit",
            ),
            (vec!["--poll-interval", "1ms"], "between 10ms and 60s"),
            (vec!["--poll-interval", "2m"], "between 10ms and 60s"),
        ];
        for (extra, want) in cases {
            let err = with(extra);
            assert!(err.contains(want), "{extra:?}: {err}");
        }
        let err = parse(&["--config-dir", "/d", "--node-name", "Node_1"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("a node name is a DNS subdomain"), "{err}");
        let err = parse(&["--node-name", "n1"], &[]).unwrap_err().to_string();
        assert_eq!(err, "missing --config-dir (or ZMESH_CNI_CONFIG_DIR)");
        let err = parse(&["--config-dir", "/d"], &[]).unwrap_err().to_string();
        assert!(err.starts_with("missing --node-name"), "{err}");
        assert!(matches!(
            parse(&["--bogus"], &[]),
            Err(ConfigError::Args(_))
        ));
        assert!(matches!(parse(&["--help"], &[]), Err(ConfigError::Args(_))));
    }

    #[test]
    fn kubernetes_source() {
        let config = parse(&["--config-source", "kube", "--node-name", "n1"], &[]).unwrap();
        assert_eq!(config.source, SourceConfig::Kube { kubeconfig: None });
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["source"]["type"], "kube");
        let env = [
            (ENV_CONFIG_SOURCE, "kube"),
            (ENV_KUBECONFIG, "/etc/kube.yaml"),
        ];
        let config = parse(&["--node-name", "n1"], &env).unwrap();
        let kubeconfig = Some(PathBuf::from("/etc/kube.yaml"));
        assert_eq!(config.source, SourceConfig::Kube { kubeconfig });

        let cases: &[(&[&str], &str)] = &[
            (
                &["--config-source", "etcd"],
                "invalid --config-source / ZMESH_CNI_CONFIG_SOURCE \"etcd\": expected dir or kube",
            ),
            (
                &["--config-source", "kube", "--config-dir", "/d"],
                "invalid --config-dir / ZMESH_CNI_CONFIG_DIR \"/d\": only used with --config-source dir",
            ),
            (
                &["--config-source", "kube", "--poll-interval", "1s"],
                "only used with --config-source dir",
            ),
            (
                &["--config-dir", "/d", "--kubeconfig", "/k"],
                "invalid --kubeconfig / ZMESH_CNI_KUBECONFIG \"/k\": only used with --config-source kube",
            ),
        ];
        for (args, want) in cases {
            let args: Vec<&str> = args.iter().copied().chain(["--node-name", "n1"]).collect();
            let err = parse(&args, &[]).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn poll_intervals() {
        assert_eq!(
            parse_poll_interval("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_poll_interval("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_poll_interval("").is_err());
        assert!(parse_poll_interval("99999999999999999999s").is_err());
    }
}
