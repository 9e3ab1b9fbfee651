//! Composition root: builds every component from a [`Config`] in one straight line and returns the
//! bound addresses and the shutdown handle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::auth::NodeLocality;
use crate::auth::token_file::StaticTokens;
use crate::ca::store::{self, CaMaterial};
use crate::ca::{CaService, CertificateAuthority, SigningPolicy};
use crate::config::{CaConfig, CaSource, Config};
use crate::grpc::{GrpcError, GrpcServer};
use crate::metrics::{self, CaMetrics, XdsMetrics};
use crate::serving_cert::{self, ServingCertResolver, ServingCertSpec};
use crate::source::{self, SnapshotLocality};
use crate::translate::TranslateConfig;
use crate::xds::{AdsService, AdsSettings, ResourceSet};

// Warn operators well before the CA itself expires and every workload certificate with it.
const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86400);
const MAX_CA_REQUEST_BYTES: usize = 64 * 1024;

/// A running istiod-lite.
#[derive(Debug)]
pub struct Bound {
    grpc_address: SocketAddr,
    root_cert_path: PathBuf,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), GrpcError>>,
    drain_timeout: Duration,
    resources: watch::Sender<Arc<ResourceSet>>,
}

impl Bound {
    /// Where the TLS gRPC server (CA) listens.
    pub fn grpc_address(&self) -> SocketAddr {
        self.grpc_address
    }

    /// Where the root certificate PEM was written.
    pub fn root_cert_path(&self) -> &Path {
        &self.root_cert_path
    }

    /// The xDS feed: every value sent here is served (debounced) to connected proxies. Starts
    /// empty; the configuration translation publishes into it.
    pub fn resources(&self) -> watch::Sender<Arc<ResourceSet>> {
        self.resources.clone()
    }

    /// Cancelling this token starts a graceful shutdown.
    pub fn shutdown_handle(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for shutdown to be requested (or the server to fail), then drains in-flight calls for at
    /// most the configured drain timeout.
    pub async fn wait_termination(mut self) -> anyhow::Result<()> {
        tokio::select! {
            result = &mut self.server => {
                self.shutdown.cancel();
                return result.context("grpc server task panicked")?.context("grpc server stopped");
            }
            () = self.shutdown.cancelled() => {}
        }
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        match tokio::time::timeout(self.drain_timeout, &mut self.server).await {
            Ok(result) => result.context("grpc server task panicked")??,
            Err(_) => {
                tracing::warn!("drain timed out; closing remaining connections");
                self.server.abort();
            }
        }
        tracing::info!("shut down");
        Ok(())
    }
}

/// Builds and starts every component.
pub async fn build(config: Config) -> anyhow::Result<Bound> {
    tracing::info!(config = %serde_json::to_string(&config)?, "starting istiod-lite");
    metrics::describe();
    let ca_metrics = CaMetrics::new();

    let material = load_ca(&config.ca)?;
    warn_if_expiring(&material);
    let authority = Arc::new(CertificateAuthority::new(material).context("cannot start the ca")?);
    let shutdown = CancellationToken::new();
    write_root(&config.server.root_cert_out, authority.roots_pem())?;

    let tokens = StaticTokens::load(&config.auth.tokens_file, &config.ca.trust_domain)?;
    tracing::info!(tokens = tokens.len(), "loaded tokens file");
    let authenticator = Arc::new(tokens.authenticator(&config.auth.cluster_id));
    let snapshots = source::start(&config.source, shutdown.clone()).await?;
    // With an object source, "is this pod on the caller's node" is answered from the real pods;
    // without one, from the placements in the tokens file.
    let locality: Arc<dyn NodeLocality> = match &snapshots {
        Some(rx) => Arc::new(SnapshotLocality::new(rx.clone())),
        None => Arc::new(tokens.node_locality()),
    };
    let policy = SigningPolicy {
        trust_domain: config.ca.trust_domain.clone(),
        trusted_node_accounts: config.auth.trusted_node_accounts.clone(),
        default_ttl: config.ca.default_workload_cert_ttl,
        max_ttl: config.ca.max_workload_cert_ttl,
    };
    let service = CaService::new(
        authority.clone(),
        authenticator.clone(),
        locality,
        policy,
        ca_metrics,
    );

    let spec = ServingCertSpec {
        dns_names: config.server.serving_dns_names.clone(),
        ips: config.server.serving_ips.clone(),
        ttl: config.server.serving_cert_ttl,
    };
    let resolver = Arc::new(ServingCertResolver::new(&authority, &spec)?);
    let tls = serving_cert::tls_config(resolver.clone())?;
    let server = GrpcServer::bind(config.server.grpc_addr, tls).await?;
    let grpc_address = server.address();

    let (resources, feed) = watch::channel(Arc::new(ResourceSet::new()));
    if let Some(rx) = snapshots {
        let translate = TranslateConfig {
            trust_domain: config.ca.trust_domain.clone(),
            cluster_id: config.auth.cluster_id.clone(),
            root_namespace: config.source.root_namespace.clone(),
            ..TranslateConfig::default()
        };
        tokio::spawn(source::publish(
            rx,
            translate,
            resources.clone(),
            shutdown.clone(),
        ));
    }
    let settings = AdsSettings {
        debounce: config.xds.debounce,
        max_debounce: config.xds.max_debounce,
        ack_timeout: config.xds.ack_timeout,
    };
    let ads = AdsService::new(
        feed,
        authenticator,
        settings,
        XdsMetrics::new(),
        shutdown.clone(),
    );
    // A CSR request is about 1 KiB; refuse anything far larger before decoding it.
    let ca_server =
        IstioCertificateServiceServer::new(service).max_decoding_message_size(MAX_CA_REQUEST_BYTES);
    // CA and xDS share the port, as in Istio.
    let routes = Routes::new(ca_server).add_service(ads.into_server());
    let server = tokio::spawn(server.run(routes, shutdown.clone()));
    tokio::spawn(resolver.rotate(authority, spec, shutdown.clone()));
    tracing::info!(address = %grpc_address, "ca and xds serving");

    Ok(Bound {
        grpc_address,
        root_cert_path: config.server.root_cert_out,
        shutdown,
        server,
        drain_timeout: config.server.drain_timeout,
        resources,
    })
}

fn load_ca(config: &CaConfig) -> anyhow::Result<CaMaterial> {
    let material = match &config.source {
        CaSource::SelfSigned { dir, root_ttl } => {
            store::init_self_signed(dir, &config.trust_domain, *root_ttl)?
        }
        CaSource::Plugged { dir } => store::load_dir(dir)?,
    };
    tracing::info!(
        intermediates = material.intermediates.len(),
        roots = material.roots.len(),
        signer_is_root = material.is_root(),
        "loaded ca"
    );
    Ok(material)
}

fn warn_if_expiring(material: &CaMaterial) {
    let left = material
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    if left < CA_EXPIRY_WARNING {
        tracing::warn!(
            days_left = left.as_secs() / 86400,
            "the ca certificate expires soon"
        );
    }
}

fn write_root(path: &Path, roots_pem: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create directory {}", parent.display()))?;
    }
    store::write_atomic(path, roots_pem, 0o644)?;
    tracing::info!(path = %path.display(), "wrote root certificate");
    Ok(())
}
