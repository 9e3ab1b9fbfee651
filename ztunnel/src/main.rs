//! The `ztunnel` binary: flags and environment → [`Config`] → [`app::build`] on a current-thread
//! control runtime → wait for a signal → graceful drain.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use anyhow::Context;
use clap::Parser;
use ztunnel::app;
use ztunnel::config::{self, Config, EnvSource, Layered, LogConfig};

/// zmesh node proxy. Every flag can also be set with the environment variable in brackets;
/// flags win.
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version)]
struct Args {
    /// Local workload/service YAML file [ZTUNNEL_LOCAL_CONFIG].
    #[arg(long)]
    local_config: Option<String>,
    /// Reload check interval of the local config, 0 = never [ZTUNNEL_LOCAL_CONFIG_POLL, 1s].
    #[arg(long)]
    local_config_poll: Option<String>,
    /// Control plane delta ADS URL; empty = none [ZTUNNEL_XDS_ADDRESS, default the CA address
    /// unless --local-config is given].
    #[arg(long)]
    xds_address: Option<String>,
    /// xDS server root certificate PEM file [ZTUNNEL_XDS_ROOT, default the CA root].
    #[arg(long)]
    xds_root: Option<String>,
    /// TLS name to verify on the xDS server [ZTUNNEL_XDS_HOSTNAME, default the CA's].
    #[arg(long)]
    xds_hostname: Option<String>,
    /// Node name [ZTUNNEL_NODE_NAME].
    #[arg(long)]
    node_name: Option<String>,
    /// Network of this node's pods [ZTUNNEL_NETWORK, default ""].
    #[arg(long)]
    network: Option<String>,
    /// Node agent socket [ZTUNNEL_ZDS_SOCKET, default /var/run/ztunnel/ztunnel.sock].
    #[arg(long)]
    zds_socket: Option<String>,
    /// CA URL [ZTUNNEL_CA_ADDRESS, default https://istiod.istio-system.svc:15012].
    #[arg(long)]
    ca_address: Option<String>,
    /// CA root certificate PEM file [ZTUNNEL_CA_ROOT].
    #[arg(long)]
    ca_root: Option<String>,
    /// TLS name to verify on the CA instead of the URL host [ZTUNNEL_CA_HOSTNAME].
    #[arg(long)]
    ca_hostname: Option<String>,
    /// CA bearer token file [ZTUNNEL_TOKEN_FILE].
    #[arg(long)]
    token_file: Option<String>,
    /// Literal CA bearer token [ZTUNNEL_TOKEN].
    #[arg(long)]
    token: Option<String>,
    /// Cluster id [ZTUNNEL_CLUSTER_ID, default Kubernetes].
    #[arg(long)]
    cluster_id: Option<String>,
    /// Requested certificate lifetime [ZTUNNEL_CERT_TTL, default 24h].
    #[arg(long)]
    cert_ttl: Option<String>,
    /// Admin server address [ZTUNNEL_ADMIN_ADDR, default 127.0.0.1:15000].
    #[arg(long)]
    admin_addr: Option<String>,
    /// Data-plane threads [ZTUNNEL_WORKER_THREADS, default: half the CPUs, 1 to 2].
    #[arg(long)]
    worker_threads: Option<String>,
    /// Drain deadline at shutdown and pod removal [ZTUNNEL_DRAIN_TIMEOUT, default 5s].
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Log filter [ZTUNNEL_LOG, default info].
    #[arg(long)]
    log: Option<String>,
    /// Log format, text or json [ZTUNNEL_LOG_FORMAT].
    #[arg(long)]
    log_format: Option<String>,
}

impl Args {
    /// The flags that were given, keyed like the environment.
    fn into_source(self) -> HashMap<String, String> {
        let pairs = [
            (config::LOCAL_CONFIG, self.local_config),
            (config::LOCAL_CONFIG_POLL, self.local_config_poll),
            (config::XDS_ADDRESS, self.xds_address),
            (config::XDS_ROOT, self.xds_root),
            (config::XDS_HOSTNAME, self.xds_hostname),
            (config::NODE_NAME, self.node_name),
            (config::NETWORK, self.network),
            (config::ZDS_SOCKET, self.zds_socket),
            (config::CA_ADDRESS, self.ca_address),
            (config::CA_ROOT, self.ca_root),
            (config::CA_HOSTNAME, self.ca_hostname),
            (config::TOKEN_FILE, self.token_file),
            (config::TOKEN, self.token),
            (config::CLUSTER_ID, self.cluster_id),
            (config::CERT_TTL, self.cert_ttl),
            (config::ADMIN_ADDR, self.admin_addr),
            (config::WORKER_THREADS, self.worker_threads),
            (config::DRAIN_TIMEOUT, self.drain_timeout),
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

/// First SIGTERM/SIGINT: graceful drain. A second one: exit at once.
async fn on_signals(shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = int.recv() => tracing::info!("SIGINT received; draining"),
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal received; exiting without finishing the drain");
    std::process::exit(1);
}

fn main() -> anyhow::Result<()> {
    let flags = Args::parse().into_source();
    let config = Config::from_source(&Layered(flags, EnvSource))?;
    init_tracing(&config.log)?;
    // Admin, CA, ZDS, xDS and config reload share one small thread; proxies get their own runtime.
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the control runtime")?;
    control.block_on(async {
        let bound = app::build(config).await?;
        let shutdown = bound.shutdown_handle();
        tokio::spawn(async move {
            if let Err(error) = on_signals(shutdown.clone()).await {
                tracing::error!(%error, "signal handling failed; shutting down");
                shutdown.cancel();
            }
        });
        bound.wait_termination().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_config_keys() {
        let args = Args::try_parse_from([
            "ztunnel",
            "--node-name",
            "node1",
            "--admin-addr",
            "127.0.0.1:0",
            "--worker-threads",
            "3",
        ])
        .unwrap();
        let source = args.into_source();
        assert_eq!(source.len(), 3);
        let config = Config::from_source(&source).unwrap();
        assert_eq!(config.node.node_name.as_deref(), Some("node1"));
        assert_eq!(config.runtime.worker_threads, 3);
        assert!(Args::try_parse_from(["ztunnel", "--bogus"]).is_err());
    }
}
