//! The delta ADS server (`envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources`) that pushes `istio.workload.Address` and `istio.security.Authorization`
//! resources to ztunnels (protocol reference §5).
//!
//! Configuration arrives as a stream of immutable [`ResourceSet`]s on a `watch` channel (the
//! feed). A debouncer folds bursts of feed changes into one publication (quiet for
//! [`AdsSettings::debounce`], never later than [`AdsSettings::max_debounce`] after the first
//! change) and computes once which names changed. Each stream then sends, per subscribed type,
//! only the names whose version differs from what that proxy holds, plus `removed_resources`.
//!
//! Per stream and type:
//! * the first request (which must carry `node`) subscribes; an empty subscribe list or `"*"` is a
//!   wildcard. It is always answered, even with no resources, because ztunnel gates readiness on
//!   it. `initial_resource_versions` seed what the proxy holds, so a reconnect gets only diffs;
//! * at most one response is unacknowledged; changes meanwhile coalesce into the next response,
//!   sent once the proxy ACKs or NACKs. A NACK (`error_detail` set) is logged and counted and the
//!   same version is not resent. A response left unanswered for [`AdsSettings::ack_timeout`]
//!   closes the stream with `DEADLINE_EXCEEDED`;
//! * a `response_nonce` that is not the outstanding one (stale, replayed, invented) is ignored,
//!   apart from any subscription change it carries;
//! * an unknown type URL is served as a type with no resources: one empty response, then
//!   nothing. Closing the stream instead would take the known types down with it and make a newer
//!   proxy that asks for an extra type reconnect forever; staying silent would leave a client that
//!   waits for every type unready. At most [`MAX_TYPES_PER_STREAM`] types per stream.
//!
//! Callers authenticate with a bearer token (the CA's [`Authenticator`]) whose identity must be in
//! the namespace the node claims, if it claims one (else `PERMISSION_DENIED`). Server shutdown ends
//! every stream with `UNAVAILABLE` so proxies reconnect elsewhere and keep their last config.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use mesh_proto::any::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URL};
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::auth::{AuthError, Authenticator, Caller, Credentials};
use crate::metrics::XdsMetrics;

mod connection;
mod debounce;
pub mod node;
pub mod resources;
mod subscription;

pub use node::{NodeError, NodeInfo};
pub use resources::{Resource, ResourceSet, TypeResources, version_of};

use connection::{Connection, End};
use debounce::Published;

/// Type URLs this server knows; others are served as empty.
pub const KNOWN_TYPE_URLS: [&str; 3] =
    [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WORKLOAD_TYPE_URL];
/// Distinct type URLs one stream may subscribe to.
pub const MAX_TYPES_PER_STREAM: usize = 16;
// A reconnecting proxy lists every name it holds: about 100 bytes each, so 16 MiB covers well
// over 100 000 resources while bounding what one request can make us buffer.
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Timing of the ADS server.
#[derive(Debug, Clone)]
pub struct AdsSettings {
    /// Quiet period that ends a burst of feed changes (istiod's `PILOT_DEBOUNCE_AFTER`: 100 ms).
    pub debounce: Duration,
    /// Longest a change waits for the burst to end (istiod's `PILOT_DEBOUNCE_MAX`: 1 s here, so a
    /// steady trickle of pod changes still reaches proxies within a second).
    pub max_debounce: Duration,
    /// How long a response may stay unacknowledged (and a new stream may stay silent) before the
    /// stream is closed.
    pub ack_timeout: Duration,
}

impl Default for AdsSettings {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(10),
            max_debounce: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// What every stream shares.
pub(crate) struct Shared {
    settings: AdsSettings,
    metrics: XdsMetrics,
    nonce_prefix: String,
    nonces: AtomicU64,
}

impl Shared {
    // Unique per process (counter) and across restarts (random prefix), so a nonce a proxy
    // remembers from a previous server is never mistaken for a current one.
    fn next_nonce(&self) -> String {
        let n = self.nonces.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.nonce_prefix)
    }
}

/// The ADS service; mount it with [`AdsService::into_server`].
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
    feed: watch::Receiver<Arc<Published>>,
    authenticator: Arc<dyn Authenticator>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for AdsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsService")
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl AdsService {
    /// Serves whatever `feed` holds, now and after every (debounced) change. Must be called within
    /// a Tokio runtime: it spawns the debouncer, which stops at `shutdown` (which also ends every
    /// stream) or when the feed's sender is dropped (streams then keep the last configuration).
    pub fn new(
        feed: watch::Receiver<Arc<ResourceSet>>,
        authenticator: Arc<dyn Authenticator>,
        settings: AdsSettings,
        metrics: XdsMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let published = debounce::spawn(
            feed,
            settings.debounce,
            settings.max_debounce,
            shutdown.clone(),
        );
        let shared = Arc::new(Shared {
            settings,
            metrics,
            nonce_prefix: format!("{:08x}", rand::random::<u32>()),
            nonces: AtomicU64::new(0),
        });
        Self {
            shared,
            feed: published,
            authenticator,
            shutdown,
        }
    }

    /// The tonic service, with a request size limit.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn authenticate(
        &self,
        request: &Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Caller, Status> {
        let peer = request.remote_addr();
        let result = match Credentials::from_metadata(request.metadata()) {
            Ok(credentials) => self.authenticator.authenticate(&credentials).await,
            Err(error) => Err(error),
        };
        result.map_err(|error| {
            tracing::warn!(?peer, %error, "xds stream rejected");
            // Opaque, like the CA: the detail only helps someone probing tokens.
            match error {
                AuthError::Backend(_) => Status::unavailable("authentication unavailable"),
                _ => Status::unauthenticated("request authentication failed"),
            }
        })
    }

    // Runs one stream to its end and reports how it ended on `out`.
    async fn run_stream(
        self,
        caller: Caller,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        out: connection::Outbox,
    ) {
        let result = self.serve_stream(&caller, &mut requests, out.clone()).await;
        match result {
            Ok(End::ProxyClosed) => tracing::info!("stream closed by the proxy"),
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "stream closed");
                let _ = out.try_send(Err(status));
            }
        }
    }

    async fn serve_stream(
        &self,
        caller: &Caller,
        requests: &mut Streaming<DeltaDiscoveryRequest>,
        out: connection::Outbox,
    ) -> Result<End, Status> {
        let Some(first) = self.first_request(requests).await? else {
            return Ok(End::ProxyClosed);
        };
        let node = first.node.as_ref().ok_or_else(|| {
            Status::invalid_argument(
                "the first request on a stream must carry node (id and metadata) to identify \
                 the proxy",
            )
        })?;
        let node = NodeInfo::parse(node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        check_caller_is_node(caller, &node)?;
        let _connected = self.shared.metrics.connected();
        tracing::info!(
            proxy = node.id,
            caller = %caller.identity,
            node_name = node.node_name.as_deref().unwrap_or(""),
            "proxy connected"
        );
        let feed = self.feed.clone();
        let shared = self.shared.clone();
        Connection::serve(node, first, shared, requests, feed, out, &self.shutdown).await
    }

    async fn first_request(
        &self,
        requests: &mut Streaming<DeltaDiscoveryRequest>,
    ) -> Result<Option<DeltaDiscoveryRequest>, Status> {
        let timeout = self.shared.settings.ack_timeout;
        tokio::select! {
            () = self.shutdown.cancelled() => {
                Err(Status::unavailable("istiod-lite is shutting down; reconnect"))
            }
            () = tokio::time::sleep(timeout) => Err(Status::deadline_exceeded(format!(
                "no request within {timeout:?} of opening the stream"
            ))),
            message = requests.message() => match message {
                Ok(message) => Ok(message),
                Err(status) => {
                    tracing::debug!(%status, "request stream failed before its first message");
                    Ok(None)
                }
            },
        }
    }
}

// Istio's connection identity check: the token must belong to the namespace the proxy claims
// to run in, so a workload's token cannot pose as (and be logged as) another namespace's proxy.
// A proxy that does not know its namespace (local development) claims none and is not checked.
fn check_caller_is_node(caller: &Caller, node: &NodeInfo) -> Result<(), Status> {
    if node.namespace.is_empty() || caller.identity.namespace() == node.namespace {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "{} may not connect as proxy {:?}: the node id names namespace {:?}",
        caller.identity, node.id, node.namespace
    )))
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let caller = self.authenticate(&request).await?;
        let peer: Option<SocketAddr> = request.remote_addr();
        let span = tracing::info_span!("xds", peer = ?peer, caller = %caller.identity);
        // One response per type may be unacknowledged, plus the closing status.
        let (tx, rx) = mpsc::channel(MAX_TYPES_PER_STREAM + 1);
        let service = self.clone();
        tokio::spawn(
            service
                .run_stream(caller, request.into_inner(), tx)
                .instrument(span),
        );
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests;
