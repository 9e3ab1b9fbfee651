//! Inbound plaintext (15006): non-HBONE traffic to the pod, TPROXYed here. The accepted socket's
//! local address is the original destination; ztunnel connects to it from the client's IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::copy::{Plain, copy_bidirectional};
use mesh_core::hbone::ErrorKind;
use tokio::net::TcpStream;
use tracing::{Instrument, debug};

use super::{Error, ILLEGAL_PORTS, PodContext, record_end};
use crate::metrics::{ConnectionGuard, Peer, Reporter, SecurityPolicy};
use crate::state::Store;

/// Serves one accepted plaintext connection to completion.
pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let mut guard = ctx
        .inputs
        .metrics
        .connection(Reporter::Destination, "inbound_plaintext", peer);
    guard.security(SecurityPolicy::Unknown);
    let span = tracing::debug_span!("inbound_plaintext", %peer);
    if let Err(error) = proxy(&ctx, stream, peer, &mut guard).instrument(span).await {
        debug!(%peer, %error, "inbound plaintext connection failed");
        guard.fail(error.kind(), &error);
    }
}

async fn proxy(
    ctx: &PodContext,
    stream: TcpStream,
    peer: SocketAddr,
    guard: &mut ConnectionGuard,
) -> Result<(), Error> {
    // TPROXY: no NAT happened, the local address is where the client was going.
    let dst = stream.local_addr().map_err(Error::Accepted)?;
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    guard.addresses(dst, None);
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return Err(Error::SelfCall(dst));
    }
    let client_ip = peer.ip().to_canonical();
    guard.source(plaintext_source(
        &ctx.store(),
        &ctx.inputs.settings.network,
        client_ip,
    ));
    // Setup futures are boxed: they live only until the connection is up, and inline they would
    // add their size to every connection's task for its whole life.
    let workload = Box::pin(ctx.workload()).await?;
    guard.destination(Peer::from_workload(&workload));
    // No identity: a STRICT PeerAuthentication (a DENY `not_principals: presence` policy)
    // refuses every plaintext connection here.
    let tracked = match ctx.admit(&workload, peer, None, dst) {
        Ok(tracked) => tracked,
        Err(reason) => {
            debug!(%peer, %dst, %reason, "inbound plaintext connection denied");
            // Dropping the stream closes the connection; the guard records the DENY.
            guard.fail(Some(ErrorKind::Denied), &reason);
            return Ok(());
        }
    };
    let upstream = Box::pin(ctx.connect(dst, Some(client_ip)))
        .await
        .map_err(Error::Connect)?;
    drop(workload);
    guard.established();
    let upstream = tracked.wrap(upstream);
    let result = copy_bidirectional(&mut Plain(stream), &mut Plain(upstream)).await;
    record_end(guard, &tracked, &result);
    Ok(())
}

/// Without mTLS the client's identity is unproven: its workload is reported, no principal.
fn plaintext_source(store: &Store, network: &str, ip: IpAddr) -> Peer {
    match store.workload_by_ip(network, ip) {
        Some(w) => Peer {
            principal: None,
            ..Peer::from_workload(&w)
        },
        None => Peer::default(),
    }
}
