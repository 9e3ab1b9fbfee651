//! Inbound HBONE (15008): terminates mTLS with the pod's own certificate, checks each `CONNECT`,
//! and splices it to the app inside the pod, connecting from the client's IP so the app sees
//! its real peer.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_core::hbone::headers::{self, Baggage};
use mesh_core::hbone::server::{
    Accepted, BoxError, ConnectHandler, InboundRequest, Rejection, ServerCerts,
};
use mesh_core::tls::WorkloadTls;
use tokio::net::TcpStream;

use super::{ILLEGAL_PORTS, PodContext, record_end};
use crate::authz::{Revocable, TrackedConnection};
use crate::metrics::{ConnectionGuard, Peer, Reporter, SecurityPolicy};
use crate::state::Store;

/// Serves the pod's certificate on its HBONE listener.
#[derive(Debug)]
pub struct PodCerts {
    ctx: Arc<PodContext>,
}

impl PodCerts {
    /// Certificates of `ctx`'s pod.
    pub fn new(ctx: Arc<PodContext>) -> Self {
        Self { ctx }
    }
}

impl ServerCerts for PodCerts {
    fn server_certificate(
        &self,
        _local: SocketAddr,
    ) -> BoxFuture<'_, Result<Arc<WorkloadTls>, BoxError>> {
        // The listener is the pod's own, so whatever the local address, the identity is the pod's.
        Box::pin(async move {
            let workload = self.ctx.workload().await?;
            Ok(self.ctx.inputs.certs.tls(&workload.identity).await?)
        })
    }
}

/// Decides on each `CONNECT` to the pod.
#[derive(Debug)]
pub struct InboundHandler {
    ctx: Arc<PodContext>,
}

impl InboundHandler {
    /// The handler of `ctx`'s pod.
    pub fn new(ctx: Arc<PodContext>) -> Self {
        Self { ctx }
    }

    async fn upstream(
        &self,
        req: &InboundRequest,
        guard: &mut ConnectionGuard,
    ) -> Result<(Revocable<TcpStream>, TrackedConnection), Rejection> {
        let target = check_target(req)?;
        guard.addresses(target, Some(req.local_addr));
        let workload = self
            .ctx
            .workload()
            .await
            .map_err(|e| Rejection::unavailable(e.to_string()))?;
        guard.destination(Peer::from_workload(&workload));
        let tracked = self
            .ctx
            .admit(
                &workload,
                req.peer_addr,
                Some(req.peer_identity.clone()),
                target,
            )
            .map_err(Rejection::denied)?;
        let client_ip = req.peer_addr.ip().to_canonical();
        let upstream = self
            .ctx
            .connect(target, Some(client_ip))
            .await
            .map_err(|e| Rejection::unavailable(format!("cannot reach the app: {e}")))?;
        // Revoked before the upstream was up: refuse now rather than open and cut at once.
        if let Some(reason) = tracked.revoked() {
            return Err(Rejection::denied(reason.to_string()));
        }
        Ok((tracked.wrap(upstream), tracked))
    }
}

impl ConnectHandler for InboundHandler {
    async fn handle(&self, req: InboundRequest) -> Result<Accepted, Rejection> {
        let metrics = &self.ctx.inputs.metrics;
        let mut guard = metrics.connection(Reporter::Destination, "inbound", req.peer_addr);
        guard
            .security(SecurityPolicy::MutualTls)
            .source(source_peer(
                &self.ctx.store(),
                &self.ctx.inputs.settings.network,
                &req,
            ))
            .service(forwarded_host(&req));
        match self.upstream(&req, &mut guard).await {
            Ok((upstream, tracked)) => {
                guard.established();
                Ok(Accepted::new(upstream).on_close(move |result| {
                    // `a` is the tunnel (client side), `b` the app.
                    record_end(&mut guard, &tracked, result);
                }))
            }
            Err(rejection) => {
                tracing::debug!(peer = %req.peer_addr, target = %req.target,
                    reason = rejection.reason(), "hbone connect rejected");
                guard.fail(Some(rejection.kind()), rejection.reason());
                Err(rejection)
            }
        }
    }
}

/// The target must be this pod's address (the one the tunnel was accepted on) and not one of
/// ztunnel's own ports.
fn check_target(req: &InboundRequest) -> Result<SocketAddr, Rejection> {
    let target = req.target.socket_addr().ok_or_else(|| {
        Rejection::bad_request(format!(
            "CONNECT target {} is not an IP address",
            req.target
        ))
    })?;
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    let local = req.local_addr.ip().to_canonical();
    if target.ip() != local {
        return Err(Rejection::bad_request(format!(
            "CONNECT target {target} is not this pod's address {local}"
        )));
    }
    if ILLEGAL_PORTS.contains(&target.port()) {
        return Err(Rejection::bad_request(format!(
            "CONNECT target {target} is a ztunnel port"
        )));
    }
    Ok(target)
}

/// The client: its proven identity, and its workload from the store when the address and
/// identity agree, else from the `baggage` it sent.
fn source_peer(store: &Store, network: &str, req: &InboundRequest) -> Peer {
    let principal = Some(req.peer_identity.to_string());
    let ip = req.peer_addr.ip().to_canonical();
    let known = store
        .workload_by_ip(network, ip)
        .filter(|w| w.identity == req.peer_identity);
    if let Some(w) = known {
        return Peer {
            principal,
            ..Peer::from_workload(&w)
        };
    }
    let baggage = req
        .headers
        .get(headers::BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .map(Baggage::parse)
        .unwrap_or_default();
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    Peer {
        workload: non_empty(baggage.workload_name),
        namespace: non_empty(baggage.namespace)
            .or_else(|| Some(req.peer_identity.namespace().to_string())),
        principal,
    }
}

fn forwarded_host(req: &InboundRequest) -> Option<String> {
    req.headers
        .get(headers::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(headers::forwarded_host)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use mesh_core::hbone::ConnectTarget;

    use super::*;
    use crate::state::local::LocalConfig;

    fn request(target: &str, local: &str) -> InboundRequest {
        InboundRequest {
            target: ConnectTarget::parse(target).unwrap(),
            headers: HeaderMap::new(),
            peer_identity: Arc::new("spiffe://cluster.local/ns/a/sa/client".parse().unwrap()),
            peer_addr: "10.0.0.9:40000".parse().unwrap(),
            local_addr: local.parse().unwrap(),
            local_identity: "spiffe://cluster.local/ns/b/sa/server".parse().unwrap(),
        }
    }

    #[test]
    fn targets_must_be_this_pod_and_not_ztunnel_ports() {
        let ok = check_target(&request("10.0.0.2:8080", "10.0.0.2:15008")).unwrap();
        assert_eq!(ok, "10.0.0.2:8080".parse().unwrap());
        let cases = [
            ("10.0.0.3:8080", "is not this pod's address 10.0.0.2"),
            ("10.0.0.2:15001", "is a ztunnel port"),
            ("10.0.0.2:15008", "is a ztunnel port"),
            ("echo.ns.svc:80", "is not an IP address"),
        ];
        for (target, want) in cases {
            let err = check_target(&request(target, "10.0.0.2:15008")).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{target}");
            assert!(err.reason().contains(want), "{target}: {}", err.reason());
        }
    }

    #[test]
    fn source_comes_from_the_store_or_baggage() {
        let yaml = "workloads: [{uid: c, name: client-pod, namespace: a, serviceAccount: client,
            workloadIps: [10.0.0.9], protocol: HBONE, workloadName: client}]";
        let store = Store::from_local(LocalConfig::parse(yaml).unwrap());
        let peer = source_peer(&store, "", &request("10.0.0.2:80", "10.0.0.2:15008"));
        assert_eq!(peer.workload.as_deref(), Some("client"));
        assert_eq!(peer.namespace.as_deref(), Some("a"));
        let mut req = request("10.0.0.2:80", "10.0.0.2:15008");
        req.peer_addr = "10.0.0.10:1".parse().unwrap();
        req.headers.insert(
            headers::BAGGAGE,
            "k8s.namespace.name=a,k8s.pod.name=other".parse().unwrap(),
        );
        req.headers.insert(
            headers::FORWARDED,
            "for=\"10.0.0.10:1\";host=echo.b.svc.cluster.local"
                .parse()
                .unwrap(),
        );
        let peer = source_peer(&store, "", &req);
        assert_eq!(peer.workload.as_deref(), Some("other"));
        assert_eq!(
            peer.principal.as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/client")
        );
        assert_eq!(
            forwarded_host(&req).as_deref(),
            Some("echo.b.svc.cluster.local")
        );
    }
}
