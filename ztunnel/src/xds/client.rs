//! The stream loop: connect, subscribe, apply and ACK/NACK every response, reconnect with backoff.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::channel::mpsc;
use http::{HeaderMap, HeaderValue};
use mesh_core::ca_client::{AUTHORIZATION_HEADER, AuthToken, CLUSTER_ID_HEADER};
use mesh_core::cert::parse_pem_certs;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Status};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::apply::{self, XdsType};
use super::grpc;
use super::{
    Backoff, H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT, MAX_DECODE_SIZE, TCP_KEEPALIVE,
    Termination, XdsClientConfig, XdsError, XdsMetrics, XdsStatus,
};
use crate::readiness::{Readiness, ReadyGuard};
use crate::state::SharedStore;
use crate::state::intern::Interner;

/// The delta ADS client. Build with [`XdsClient::new`], then spawn [`XdsClient::run`].
pub struct XdsClient {
    config: XdsClientConfig,
    endpoint: Endpoint,
    store: Arc<SharedStore>,
    status: XdsStatus,
    metrics: XdsMetrics,
    // One readiness guard per type, dropped after that type's first response was applied.
    pending: BTreeMap<XdsType, ReadyGuard>,
    // Name → version of every applied resource, per type: `initial_resource_versions` on reconnect.
    // Persistent maps: handing a copy to the status after every response is O(1).
    versions: BTreeMap<XdsType, apply::Versions>,
    // Shares repeated strings and identities across the store's workloads.
    interner: Interner,
    backoff: Backoff,
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("address", &self.config.address)
            .finish_non_exhaustive()
    }
}

type Requests = mpsc::UnboundedSender<DeltaDiscoveryRequest>;

/// How a stream ended.
struct SessionEnd {
    why: Termination,
    error: String,
}

impl SessionEnd {
    fn new(why: Termination, error: impl std::fmt::Display) -> Self {
        Self {
            why,
            error: error.to_string(),
        }
    }
}

impl XdsClient {
    /// Validates the settings and registers one readiness task per type ("xds address",
    /// "xds authorization"). Nothing connects until [`Self::run`].
    pub fn new(
        config: XdsClientConfig,
        store: Arc<SharedStore>,
        readiness: &Readiness,
        metrics: XdsMetrics,
    ) -> Result<Self, XdsError> {
        let endpoint = endpoint(&config)?;
        MetadataValue::try_from(config.node.cluster_id.as_str())
            .map_err(|_| XdsError::Metadata("cluster id"))?;
        let pending = XdsType::ALL
            .into_iter()
            .map(|t| (t, readiness.register(format!("xds {}", t.label()))))
            .collect();
        Ok(Self {
            status: XdsStatus::new(&config.address),
            backoff: config.backoff.clone(),
            config,
            endpoint,
            store,
            metrics,
            pending,
            versions: BTreeMap::new(),
            interner: Interner::default(),
        })
    }

    /// The connection state, for `/config_dump`.
    pub fn status(&self) -> XdsStatus {
        self.status.clone()
    }

    /// Keeps a stream open for ever, reconnecting with backoff. The store is never cleared: while
    /// the control plane is away, the last config keeps serving.
    pub async fn run(mut self) {
        info!(address = %self.config.address, node = %self.config.node.node_id(), "xds client starting");
        loop {
            let end = self.session().await;
            self.metrics.terminated(end.why);
            self.status.update(|s| {
                s.connected = false;
                s.last_error = Some(end.error.clone());
            });
            let delay = self.backoff.next_delay();
            warn!(reason = end.why.as_str(), error = %end.error, retry_in = ?delay, "xds stream ended; keeping the last config");
            tokio::time::sleep(delay).await;
        }
    }

    async fn session(&mut self) -> SessionEnd {
        let (mut stream, tx) = match self.open().await {
            Ok(open) => open,
            Err(end) => return end,
        };
        info!(address = %self.config.address, "xds stream open");
        self.status.update(|s| {
            s.connected = true;
            s.connections += 1;
        });
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    self.backoff.reset();
                    let ty = XdsType::from_url(&response.type_url);
                    let reply = self.handle(response);
                    if tx.unbounded_send(reply).is_err() {
                        return SessionEnd::new(Termination::Error, "request stream closed");
                    }
                    if let Some(ty) = ty {
                        self.pending.remove(&ty);
                    }
                }
                Ok(None) => {
                    return SessionEnd::new(Termination::Complete, "server ended the stream");
                }
                Err(status) => return SessionEnd::new(Termination::Error, grpc(&status)),
            }
        }
    }

    /// Connects (a new connection every time: the old one may lead to a dead server) and opens
    /// the stream with the first request of each type queued.
    async fn open(&self) -> Result<(grpc::Responses, Requests), SessionEnd> {
        let failed = |e: XdsError| SessionEnd::new(Termination::ConnectionError, e);
        let channel = self.endpoint.connect().await.map_err(|source| {
            let address = self.config.address.clone();
            failed(XdsError::Connect { address, source })
        })?;
        let (tx, rx) = mpsc::unbounded();
        for ty in XdsType::ALL {
            // Cannot fail: the receiver is alive.
            let _ = tx.unbounded_send(self.initial_request(ty));
        }
        let metadata = self.metadata().await.map_err(failed)?;
        let stream = grpc::open(channel, metadata, rx, MAX_DECODE_SIZE)
            .await
            .map_err(|status| SessionEnd::new(Termination::ConnectionError, grpc(&status)))?;
        Ok((stream, tx))
    }

    /// The first request of a type: node, wildcard subscription, what we already have.
    fn initial_request(&self, ty: XdsType) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(self.config.node.node()),
            type_url: ty.type_url().to_string(),
            initial_resource_versions: self
                .versions
                .get(&ty)
                .map(|v| {
                    v.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    /// The stream's request headers: the bearer token and the cluster id.
    async fn metadata(&self) -> Result<HeaderMap, XdsError> {
        let mut headers = HeaderMap::new();
        if let Some(token) = read_token(&self.config.token).await? {
            let value = HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| XdsError::Metadata("auth token"))?;
            headers.insert(AUTHORIZATION_HEADER, value);
        }
        let cluster = HeaderValue::try_from(self.config.node.cluster_id.as_str())
            .map_err(|_| XdsError::Metadata("cluster id"))?;
        headers.insert(CLUSTER_ID_HEADER, cluster);
        Ok(headers)
    }

    /// Applies one response to the store in a single replace and returns the ACK or NACK.
    fn handle(&mut self, mut response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let Some(ty) = XdsType::from_url(&response.type_url) else {
            let message = format!("unsupported type url {:?}", response.type_url);
            warn!(%message, nonce = %response.nonce, "xds response rejected");
            self.metrics.nacked_label("unknown");
            return reply(&response, Some(message));
        };
        let mut store = (*self.store.snapshot()).clone();
        let versions = self.versions.entry(ty).or_default();
        let resources = std::mem::take(&mut response.resources);
        let received = resources.len();
        let rejected = apply::apply(
            &mut store,
            versions,
            &mut self.interner,
            ty,
            &response.removed_resources,
            resources,
        );
        let applied = received - rejected.len();
        if applied > 0 || !response.removed_resources.is_empty() {
            self.store.replace(store);
        }
        debug!(
            r#type = ty.label(),
            nonce = %response.nonce,
            applied,
            removed = response.removed_resources.len(),
            rejected = rejected.len(),
            "xds response applied"
        );
        let nack = (!rejected.is_empty()).then(|| apply::nack_message(&rejected));
        if let Some(message) = &nack {
            warn!(r#type = ty.label(), nonce = %response.nonce, error = %message, "xds resources rejected; applied the rest");
            self.metrics.nacked(ty);
        }
        self.record(ty, &response, nack.clone());
        reply(&response, nack)
    }

    /// Shows the outcome of a response in `/config_dump`.
    fn record(&self, ty: XdsType, response: &DeltaDiscoveryResponse, nack: Option<String>) {
        let versions = self.versions.get(&ty).cloned().unwrap_or_default();
        self.status.update_type(ty, |t| {
            t.received = true;
            t.last_nonce = Some(response.nonce.clone());
            t.last_acked = nack.is_none();
            if nack.is_none() {
                t.last_acked_nonce = Some(response.nonce.clone());
            } else {
                // Kept after later ACKs: the last rejection is what an operator looks for.
                t.last_nack_error = nack;
            }
            t.system_version = response.system_version_info.clone();
            t.versions = versions;
        });
    }
}

/// ACK (`error` = None) or NACK of `response`.
fn reply(response: &DeltaDiscoveryResponse, error: Option<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: response.type_url.clone(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|message| Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

fn grpc(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// The TLS endpoint, like the CA client's but with no per-request timeout: the stream lives for
/// hours.
fn endpoint(config: &XdsClientConfig) -> Result<Endpoint, XdsError> {
    let bad = |reason: &str| XdsError::Address {
        address: config.address.clone(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = config
        .address
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    // The control plane decides who may talk to whom: never listen to it in plaintext.
    if uri.scheme_str() != Some("https") {
        return Err(bad("the scheme must be https"));
    }
    let host = uri.host().ok_or_else(|| bad("it has no host"))?;
    let server_name = config.tls_server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    parse_pem_certs("xds root certificate", &config.root_cert_pem).map_err(XdsError::RootCert)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&config.root_cert_pem))
        .domain_name(server_name);
    Ok(Endpoint::from(uri)
        .tls_config(tls)
        .map_err(XdsError::Tls)?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE)))
}

async fn read_token(token: &AuthToken) -> Result<Option<String>, XdsError> {
    match token {
        AuthToken::None => Ok(None),
        AuthToken::Literal(t) => Ok(Some(t.clone())),
        AuthToken::File(path) => tokio::fs::read_to_string(path)
            .await
            .map(|t| Some(t.trim().to_string()))
            .map_err(|source| XdsError::TokenFile {
                path: path.clone(),
                source,
            }),
    }
}

#[cfg(test)]
mod tests;
