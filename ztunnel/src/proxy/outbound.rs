//! Outbound capture (15001): the app's egress, REDIRECTed here, goes over HBONE to a meshed
//! destination or as plain TCP (from inside the pod, marked so it is not captured again) to
//! anything else.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Identity;
use mesh_core::copy::{Plain, copy_bidirectional};
use mesh_core::hbone::Tunnel;
use mesh_core::hbone::client::{HbonePool, PoolKey, TunnelRequest};
use mesh_core::hbone::headers::{Baggage, TraceParent};
use mesh_core::socket;
use tokio::net::TcpStream;
use tracing::{Instrument, debug};

use super::route::{self, Upstream};
use super::{Error, HBONE_PORT, ILLEGAL_PORTS, PodContext, pool, record_copy};
use crate::metrics::{ConnectionGuard, Peer, Reporter, SecurityPolicy};
use crate::state::model::{TunnelProtocol, Workload};

/// Where an HBONE tunnel goes.
struct HboneDst<'a> {
    /// Identities the destination may present.
    identities: Vec<Identity>,
    /// The service hostname, when the app dialled a VIP (`forwarded: ;host=`).
    host: Option<&'a str>,
    /// Pod IP and target port: the `:authority`.
    target: SocketAddr,
}

/// A connection ready to carry bytes: the app's stream and its upstream.
enum Connected {
    /// Over an HBONE tunnel.
    Hbone(TcpStream, Tunnel),
    /// Plain TCP.
    Plain(TcpStream, TcpStream),
}

/// The outbound proxy of one pod.
pub struct Outbound {
    ctx: Arc<PodContext>,
    pool: HbonePool,
}

impl Outbound {
    /// The outbound proxy for `ctx`'s pod, with its own HBONE pool.
    pub fn new(ctx: Arc<PodContext>) -> Self {
        let settings = &ctx.inputs.settings;
        let pool = pool::pod_pool(
            ctx.netns.clone(),
            ctx.inputs.certs.clone(),
            settings.pool.clone(),
            settings.upstream.clone(),
        );
        Self { ctx, pool }
    }

    /// Serves one accepted connection to completion.
    ///
    /// Setting the connection up (routing, certificates, the pool, the dial) runs as a boxed
    /// future that is freed once the upstream is connected: the task that lives as long as the
    /// connection holds only the two streams, the copy state and the metrics guard.
    pub async fn handle(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let metrics = &self.ctx.inputs.metrics;
        let mut guard = metrics.connection(Reporter::Source, "outbound", peer);
        let span = tracing::debug_span!("outbound", %peer);
        let setup = Box::pin(self.setup(stream, peer, &mut guard).instrument(span)).await;
        let result = match setup {
            Ok(Connected::Hbone(stream, mut tunnel)) => {
                copy_bidirectional(&mut Plain(stream), &mut tunnel).await
            }
            Ok(Connected::Plain(stream, upstream)) => {
                copy_bidirectional(&mut Plain(stream), &mut Plain(upstream)).await
            }
            Err(error) => {
                debug!(%peer, %error, "outbound connection failed");
                return guard.fail(error.kind(), &error);
            }
        };
        record_copy(&mut guard, &result);
    }

    async fn setup(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        guard: &mut ConnectionGuard,
    ) -> Result<Connected, Error> {
        let orig = socket::original_dst(&stream).map_err(Error::OriginalDst)?;
        let orig = SocketAddr::new(orig.ip().to_canonical(), orig.port());
        guard.addresses(orig, None);
        let illegal = ILLEGAL_PORTS.contains(&orig.port());
        if illegal && orig.ip().is_loopback() {
            return Err(Error::SelfCall(orig));
        }
        let src = self.ctx.workload().await?;
        guard.source(Peer::from_workload(&src));
        if illegal && src.addresses.contains(&orig.ip()) {
            return Err(Error::SelfCall(orig));
        }
        let upstream = route::resolve(&self.ctx.store(), &src, orig, &mut rand::rng())?;
        self.forward(stream, peer, &src, upstream, guard).await
    }

    /// Connects to the chosen upstream: HBONE for meshed workloads, else plain.
    async fn forward(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        src: &Workload,
        upstream: Upstream,
        guard: &mut ConnectionGuard,
    ) -> Result<Connected, Error> {
        match &upstream {
            Upstream::Passthrough(dst) => self.passthrough(stream, *dst, guard).await,
            Upstream::Workload {
                workload,
                service,
                target,
            } => {
                guard
                    .destination(Peer::from_workload(workload))
                    .service(service.as_ref().map(|s| s.hostname.clone()));
                match workload.protocol {
                    TunnelProtocol::Tcp => self.passthrough(stream, *target, guard).await,
                    TunnelProtocol::Hbone => {
                        let dst = HboneDst {
                            identities: upstream.expected_identities(),
                            host: service.as_ref().map(|s| s.hostname.as_str()),
                            target: *target,
                        };
                        self.hbone(stream, peer, src, dst, guard).await
                    }
                }
            }
        }
    }

    /// Plain TCP from inside the pod; the destination sees the pod's own address.
    async fn passthrough(
        &self,
        stream: TcpStream,
        dst: SocketAddr,
        guard: &mut ConnectionGuard,
    ) -> Result<Connected, Error> {
        guard.addresses(dst, None).security(SecurityPolicy::Unknown);
        let upstream = self.ctx.connect(dst, None).await.map_err(Error::Connect)?;
        guard.established();
        Ok(Connected::Plain(stream, upstream))
    }

    async fn hbone(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        src: &Workload,
        dst: HboneDst<'_>,
        guard: &mut ConnectionGuard,
    ) -> Result<Connected, Error> {
        let key = PoolKey {
            src_identity: (*src.identity).clone(),
            dst_identities: dst.identities,
            dst: SocketAddr::new(dst.target.ip(), HBONE_PORT),
            src_ip: None,
        };
        guard
            .addresses(dst.target, Some(key.dst))
            .security(SecurityPolicy::MutualTls);
        let request = TunnelRequest::new(dst.target)
            .baggage(&self.baggage(src))
            .forwarded(peer, dst.host)
            .traceparent(TraceParent::random());
        let tunnel = self.pool.open(&key, &request).await?;
        guard.established();
        Ok(Connected::Hbone(stream, tunnel))
    }

    fn baggage(&self, src: &Workload) -> Baggage {
        // The model has no controller kind; a named owner is reported as a deployment, the
        // common case, else the pod itself.
        let (workload_type, workload_name) = if src.workload_name.is_empty() {
            ("pod", src.name.to_string())
        } else {
            ("deployment", src.workload_name.to_string())
        };
        Baggage {
            cluster: self.ctx.inputs.settings.cluster_id.clone(),
            namespace: src.namespace.to_string(),
            workload_type: workload_type.to_string(),
            workload_name,
            service_name: src.canonical_name.to_string(),
            service_version: src.canonical_revision.to_string(),
            ..Baggage::default()
        }
    }
}
