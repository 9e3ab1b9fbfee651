//! One proxy's ADS stream: reads requests, follows published configuration, sends responses.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as XdsResource,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::debounce::Published;
use super::node::NodeInfo;
use super::subscription::{Subscription, Update};
use super::{KNOWN_TYPE_URLS, MAX_TYPES_PER_STREAM, Shared};

const MAX_TYPE_URL_LEN: usize = 256;
use crate::metrics::XdsType;

/// Where responses (and the final status) go.
pub(crate) type Outbox = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// A stream after its first request.
pub(crate) struct Connection {
    node: NodeInfo,
    shared: Arc<Shared>,
    subs: BTreeMap<String, Subscription>,
    snapshot: Arc<Published>,
    out: Outbox,
}

/// How a stream ended without an error status.
#[derive(Debug)]
pub(crate) enum End {
    /// The proxy closed its side or went away.
    ProxyClosed,
}

impl Connection {
    /// Serves `requests` (whose first message was `first`) until the proxy leaves, the server
    /// shuts down, or a protocol error ends it with a status.
    pub async fn serve(
        node: NodeInfo,
        first: DeltaDiscoveryRequest,
        shared: Arc<Shared>,
        requests: &mut Streaming<DeltaDiscoveryRequest>,
        mut feed: watch::Receiver<Arc<Published>>,
        out: Outbox,
        shutdown: &CancellationToken,
    ) -> Result<End, Status> {
        let snapshot = feed.borrow_and_update().clone();
        let mut conn = Self {
            node,
            shared,
            subs: BTreeMap::new(),
            snapshot,
            out,
        };
        conn.on_request(first)?;
        conn.run(requests, feed, shutdown).await
    }

    async fn run(
        &mut self,
        requests: &mut Streaming<DeltaDiscoveryRequest>,
        mut feed: watch::Receiver<Arc<Published>>,
        shutdown: &CancellationToken,
    ) -> Result<End, Status> {
        let mut feed_open = true;
        loop {
            let deadline = self.ack_deadline();
            tokio::select! {
                () = shutdown.cancelled() => {
                    return Err(Status::unavailable("istiod-lite is shutting down; reconnect"));
                }
                message = requests.message() => match message {
                    Ok(Some(request)) => self.on_request(request)?,
                    Ok(None) => return Ok(End::ProxyClosed),
                    Err(status) => {
                        tracing::debug!(%status, "request stream failed");
                        return Ok(End::ProxyClosed);
                    }
                },
                changed = feed.changed(), if feed_open => match changed {
                    Ok(()) => {
                        let published = feed.borrow_and_update().clone();
                        self.on_published(published)?;
                    }
                    // The debouncer stopped (shutdown): keep serving what we have.
                    Err(_) => feed_open = false,
                },
                () = sleep_until(deadline), if deadline.is_some() => return Err(self.ack_timed_out()),
            }
        }
    }

    fn on_request(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Status> {
        let type_url = request.type_url.clone();
        if type_url.is_empty() {
            return Err(Status::invalid_argument("request has an empty type_url"));
        }
        // Type URLs end up in logs and as map keys; real ones are under 100 bytes.
        if type_url.len() > MAX_TYPE_URL_LEN {
            return Err(Status::invalid_argument(format!(
                "type_url is {} bytes long; at most {MAX_TYPE_URL_LEN} are accepted",
                type_url.len()
            )));
        }
        let Some(sub) = self.subs.get_mut(&type_url) else {
            return self.subscribe(request);
        };
        let t = XdsType::of(&type_url);
        if !request.response_nonce.is_empty() {
            answer(&self.node, &self.shared, sub, &request, t);
        }
        let changed = sub.change_names(
            &request.resource_names_subscribe,
            &request.resource_names_unsubscribe,
        );
        if !changed && request.response_nonce.is_empty() {
            tracing::debug!(type_url, "request changes nothing; ignored");
        }
        if !request.initial_resource_versions.is_empty() {
            tracing::debug!(
                type_url,
                "initial_resource_versions after the first request; ignored"
            );
        }
        self.flush(&type_url)
    }

    fn subscribe(&mut self, request: DeltaDiscoveryRequest) -> Result<(), Status> {
        let type_url = request.type_url.clone();
        if self.subs.len() >= MAX_TYPES_PER_STREAM {
            return Err(Status::invalid_argument(format!(
                "too many type urls on one stream (at most {MAX_TYPES_PER_STREAM}); refusing {type_url}"
            )));
        }
        if !KNOWN_TYPE_URLS.contains(&type_url.as_str()) {
            // Answered as an empty type (see the module docs): the proxy learns there is nothing,
            // and one unknown type does not take the whole stream down.
            tracing::warn!(
                type_url,
                "subscription to an unknown type url; serving it as empty"
            );
        }
        if !request.response_nonce.is_empty() {
            tracing::debug!(
                type_url,
                nonce = request.response_nonce,
                "nonce on a new subscription; ignored"
            );
        }
        let sub = Subscription::new(&request);
        tracing::info!(
            type_url,
            held = sub.held(),
            wildcard = request.resource_names_subscribe.is_empty(),
            "subscribed"
        );
        self.subs.insert(type_url.clone(), sub);
        self.flush(&type_url)
    }

    fn on_published(&mut self, published: Arc<Published>) -> Result<(), Status> {
        // A skipped generation means the per-generation change lists do not add up: recompute.
        let contiguous = published.generation == self.snapshot.generation + 1;
        for (type_url, sub) in &mut self.subs {
            match published.changes.get(type_url) {
                Some(names) if contiguous => sub.changed(Some(names), published.changed_at),
                None if contiguous => {}
                _ => sub.changed(None, published.changed_at),
            }
        }
        self.snapshot = published;
        let types: Vec<String> = self.subs.keys().cloned().collect();
        for type_url in types {
            self.flush(&type_url)?;
        }
        Ok(())
    }

    fn flush(&mut self, type_url: &str) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let Some(update) = sub.next_update(self.snapshot.set.get(type_url)) else {
            return Ok(());
        };
        let nonce = self.shared.next_nonce();
        let now = Instant::now();
        sub.sent(nonce.clone(), now);
        let since_change = update.changed_at.map(|at| now.duration_since(at));
        tracing::debug!(
            type_url,
            nonce,
            resources = update.resources.len(),
            removed = update.removed.len(),
            "push"
        );
        let response = self.response(type_url, nonce, update);
        // Capacity covers one unacknowledged response per type plus the final status, so a full
        // queue means the invariant broke; closed means the proxy is gone.
        self.out.try_send(Ok(response)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::internal("xds response queue overflow"),
            mpsc::error::TrySendError::Closed(_) => Status::cancelled("proxy went away"),
        })?;
        self.shared
            .metrics
            .pushed(XdsType::of(type_url), since_change);
        Ok(())
    }

    fn response(&self, type_url: &str, nonce: String, update: Update) -> DeltaDiscoveryResponse {
        let resources = update
            .resources
            .iter()
            .map(|r| XdsResource {
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                name: r.name.clone(),
                ..Default::default()
            })
            .collect();
        DeltaDiscoveryResponse {
            system_version_info: self.snapshot.generation.to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce,
            removed_resources: update.removed,
        }
    }

    fn ack_deadline(&self) -> Option<Instant> {
        let timeout = self.shared.settings.ack_timeout;
        (self.subs.values())
            .filter_map(|s| s.pending().map(|p| p.sent_at + timeout))
            .min()
    }

    fn ack_timed_out(&self) -> Status {
        let timeout = self.shared.settings.ack_timeout;
        let Some((type_url, pending)) = (self.subs.iter())
            .filter_map(|(t, s)| s.pending().map(|p| (t, p)))
            .min_by_key(|(_, p)| p.sent_at)
        else {
            return Status::internal("ack deadline without a pending response");
        };
        self.shared.metrics.ack_timeout(XdsType::of(type_url));
        tracing::warn!(
            proxy = self.node.id,
            type_url,
            nonce = pending.nonce,
            ?timeout,
            "proxy did not ack; closing its stream"
        );
        Status::deadline_exceeded(format!(
            "no ACK or NACK for the {type_url} response with nonce {} within {timeout:?}; \
             closing the stream",
            pending.nonce
        ))
    }
}

// An ACK or NACK for `sub`'s outstanding response; anything else is stale and ignored.
fn answer(
    node: &NodeInfo,
    shared: &Shared,
    sub: &mut Subscription,
    request: &DeltaDiscoveryRequest,
    t: XdsType,
) {
    let type_url = &request.type_url;
    let nonce = &request.response_nonce;
    if !sub.answer(nonce) {
        shared.metrics.expired_nonce(t);
        tracing::debug!(type_url, nonce, "stale or unknown nonce; ignored");
        return;
    }
    match &request.error_detail {
        None => tracing::debug!(type_url, nonce, "ack"),
        Some(error) => {
            // The proxy keeps its previous version of what it rejected; resending the same
            // content would only be rejected again, so the next change is what fixes it.
            shared.metrics.rejected(t);
            tracing::warn!(
                proxy = node.id,
                type_url,
                nonce,
                code = error.code,
                message = error.message,
                "proxy rejected configuration (nack)"
            );
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
