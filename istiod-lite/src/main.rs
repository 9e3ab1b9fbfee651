//! The `istiod-lite` binary: flags and environment → [`Config`] → [`app::build`] → wait for a signal.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use anyhow::Context;
use clap::Parser;
use istiod_lite::app;
use istiod_lite::config::{self, Config, EnvSource, Layered, LogConfig};
use istiod_lite::monitoring;

/// zmesh control plane: SPIFFE certificate authority. Every flag can also be set with the
/// environment variable in brackets; flags win.
#[derive(Debug, Parser)]
#[command(name = "istiod-lite", version)]
struct Args {
    /// TLS gRPC listen address [ISTIOD_GRPC_ADDR, default 0.0.0.0:15012].
    #[arg(long)]
    grpc_addr: Option<String>,
    /// Trust domain [ISTIOD_TRUST_DOMAIN, default cluster.local].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Self-signed root directory, created on first start [ISTIOD_CA_DIR].
    #[arg(long)]
    ca_dir: Option<String>,
    /// Istio cacerts directory to sign with instead of a self-signed root [ISTIOD_CACERTS_DIR].
    #[arg(long)]
    cacerts_dir: Option<String>,
    /// Bearer tokens file (YAML or JSON) [ISTIOD_TOKENS_FILE, required].
    #[arg(long)]
    tokens_file: Option<String>,
    /// Where to write the root certificate PEM [ISTIOD_ROOT_CERT_OUT].
    #[arg(long)]
    root_cert_out: Option<String>,
    /// Default workload certificate lifetime, e.g. 24h [ISTIOD_DEFAULT_WORKLOAD_CERT_TTL].
    #[arg(long)]
    default_workload_cert_ttl: Option<String>,
    /// Maximum workload certificate lifetime, e.g. 90d [ISTIOD_MAX_WORKLOAD_CERT_TTL].
    #[arg(long)]
    max_workload_cert_ttl: Option<String>,
    /// Node agents allowed to impersonate, ns/sa comma list [ISTIOD_TRUSTED_NODE_ACCOUNTS].
    #[arg(long)]
    trusted_node_accounts: Option<String>,
    /// Serving certificate DNS names, comma list [ISTIOD_SERVING_DNS_NAMES].
    #[arg(long)]
    serving_dns_names: Option<String>,
    /// Serving certificate IPs, comma list [ISTIOD_SERVING_IPS].
    #[arg(long)]
    serving_ips: Option<String>,
    /// Serving certificate lifetime, renewed at half-life [ISTIOD_SERVING_CERT_TTL, default 30d].
    #[arg(long)]
    serving_cert_ttl: Option<String>,
    /// Lifetime of a newly generated self-signed root [ISTIOD_SELF_SIGNED_ROOT_TTL, default 3650d].
    #[arg(long)]
    self_signed_root_ttl: Option<String>,
    /// Cluster id callers must claim [ISTIOD_CLUSTER_ID, default Kubernetes].
    #[arg(long)]
    cluster_id: Option<String>,
    /// Grace period for in-flight requests at shutdown [ISTIOD_DRAIN_TIMEOUT, default 5s].
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Object source: dir, kube or none [ISTIOD_CONFIG_SOURCE].
    #[arg(long)]
    config_source: Option<String>,
    /// Directory of Kubernetes YAML to serve over xDS [ISTIOD_CONFIG_DIR].
    #[arg(long)]
    config_dir: Option<String>,
    /// Poll interval of the config directory [ISTIOD_CONFIG_POLL, 500ms].
    #[arg(long)]
    config_poll: Option<String>,
    /// Istio root namespace [ISTIOD_ROOT_NAMESPACE, istio-system].
    #[arg(long)]
    root_namespace: Option<String>,
    /// Monitoring address serving /metrics; empty disables [ISTIOD_MONITORING_ADDR, 127.0.0.1:15014].
    #[arg(long)]
    monitoring_addr: Option<String>,
    /// Log filter, e.g. info or istiod_lite=debug [ISTIOD_LOG].
    #[arg(long)]
    log: Option<String>,
    /// Log format: text or json [ISTIOD_LOG_FORMAT].
    #[arg(long)]
    log_format: Option<String>,
}

impl Args {
    /// The flags that were given, keyed like the environment.
    fn into_source(self) -> HashMap<String, String> {
        let pairs = [
            (config::GRPC_ADDR, self.grpc_addr),
            (config::TRUST_DOMAIN, self.trust_domain),
            (config::CA_DIR, self.ca_dir),
            (config::CACERTS_DIR, self.cacerts_dir),
            (config::TOKENS_FILE, self.tokens_file),
            (config::ROOT_CERT_OUT, self.root_cert_out),
            (
                config::DEFAULT_WORKLOAD_CERT_TTL,
                self.default_workload_cert_ttl,
            ),
            (config::MAX_WORKLOAD_CERT_TTL, self.max_workload_cert_ttl),
            (config::TRUSTED_NODE_ACCOUNTS, self.trusted_node_accounts),
            (config::SERVING_DNS_NAMES, self.serving_dns_names),
            (config::SERVING_IPS, self.serving_ips),
            (config::SERVING_CERT_TTL, self.serving_cert_ttl),
            (config::SELF_SIGNED_ROOT_TTL, self.self_signed_root_ttl),
            (config::CLUSTER_ID, self.cluster_id),
            (config::DRAIN_TIMEOUT, self.drain_timeout),
            (config::CONFIG_SOURCE, self.config_source),
            (config::MONITORING_ADDR, self.monitoring_addr),
            (config::CONFIG_DIR, self.config_dir),
            (config::CONFIG_POLL, self.config_poll),
            (config::ROOT_NAMESPACE, self.root_namespace),
            (config::LOG, self.log),
            (config::LOG_FORMAT, self.log_format),
        ];
        pairs
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| (key.to_string(), v)))
            .collect()
    }
}

fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    mesh_core::telemetry::init_logging(&log.filter, log.json)
        .map_err(|e| anyhow::anyhow!("invalid {} filter {:?}: {e}", config::LOG, log.filter))
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        result = tokio::signal::ctrl_c() => {
            result.context("cannot listen for SIGINT")?;
            tracing::info!("SIGINT received");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let source = Layered(Args::parse().into_source(), EnvSource);
    let config = Config::from_source(&source)?;
    init_tracing(&config.log)?;
    // One process-wide recorder: every component records through the `metrics` facade.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    let monitoring = match config::monitoring_addr(&source)? {
        Some(addr) => Some(monitoring::bind(addr).await?),
        None => None,
    };
    let bound = app::build(config).await?;
    let shutdown = bound.shutdown_handle();
    if let Some(listener) = monitoring {
        tracing::info!(address = %listener.local_addr()?, "monitoring serving /metrics");
        tokio::spawn(monitoring::serve(listener, metrics, shutdown.clone()));
    }
    tokio::spawn(async move {
        if let Err(error) = shutdown_signal().await {
            tracing::error!(%error, "signal handling failed; shutting down");
        }
        shutdown.cancel();
    });
    bound.wait_termination().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_config_keys() {
        let args = Args::try_parse_from([
            "istiod-lite",
            "--grpc-addr",
            "127.0.0.1:0",
            "--tokens-file",
            "/t.yaml",
            "--max-workload-cert-ttl",
            "2d",
        ])
        .unwrap();
        let source = args.into_source();
        assert_eq!(source.len(), 3);
        assert_eq!(source[config::GRPC_ADDR], "127.0.0.1:0");
        assert_eq!(source[config::TOKENS_FILE], "/t.yaml");
        let config = Config::from_source(&source).unwrap();
        assert_eq!(config.ca.max_workload_cert_ttl.as_secs(), 2 * 86400);
        assert!(Args::try_parse_from(["istiod-lite", "--bogus"]).is_err());
    }
}
