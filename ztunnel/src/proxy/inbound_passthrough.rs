//! Inbound plaintext (15006): non-HBONE traffic to the pod, TPROXYed here. The accepted socket's
//! local address is the original destination; ztunnel connects to it from the client's IP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::copy::{Plain, copy_bidirectional};
use mesh_core::hbone::ErrorKind;
use tokio::net::TcpStream;
use tracing::{Instrument, debug};

use super::{Error, ILLEGAL_PORTS, PodContext, record_end};
use crate::authz::{Revocable, TrackedConnection};
use crate::metrics::{ConnectionGuard, Peer, Reporter, SecurityPolicy};
use crate::state::Store;

/// Serves one accepted plaintext connection to completion.
///
/// As for outbound connections, the setup (policy, upstream connect) runs as a boxed future freed
/// once the upstream is up; the long-lived task holds only the streams, the copy state, the
/// revocation handle and the metrics guard.
pub async fn handle(ctx: Arc<PodContext>, stream: TcpStream, peer: SocketAddr) {
    let mut guard = ctx
        .inputs
        .metrics
        .connection(Reporter::Destination, "inbound_plaintext", peer);
    guard.security(SecurityPolicy::Unknown);
    let span = tracing::debug_span!("inbound_plaintext", %peer);
    let setup = Box::pin(setup(&ctx, stream, peer, &mut guard).instrument(span)).await;
    match setup {
        Ok(Some((stream, upstream, tracked))) => {
            let result = copy_bidirectional(&mut Plain(stream), &mut Plain(upstream)).await;
            record_end(&mut guard, &tracked, &result);
        }
        // Denied: dropping the stream closes the connection; the guard recorded the DENY.
        Ok(None) => {}
        Err(error) => {
            debug!(%peer, %error, "inbound plaintext connection failed");
            guard.fail(error.kind(), &error);
        }
    }
}

/// The app's stream, the connected (revocable) upstream and its tracking handle; `None` when
/// policy denies the connection.
type Connected = (TcpStream, Revocable<TcpStream>, TrackedConnection);

async fn setup(
    ctx: &PodContext,
    stream: TcpStream,
    peer: SocketAddr,
    guard: &mut ConnectionGuard,
) -> Result<Option<Connected>, Error> {
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
    let workload = ctx.workload().await?;
    guard.destination(Peer::from_workload(&workload));
    // No identity: a STRICT PeerAuthentication (a DENY `not_principals: presence` policy)
    // refuses every plaintext connection here.
    let tracked = match ctx.admit(&workload, peer, None, dst) {
        Ok(tracked) => tracked,
        Err(reason) => {
            debug!(%peer, %dst, %reason, "inbound plaintext connection denied");
            guard.fail(Some(ErrorKind::Denied), &reason);
            return Ok(None);
        }
    };
    let upstream = ctx
        .connect(dst, Some(client_ip))
        .await
        .map_err(Error::Connect)?;
    guard.established();
    Ok(Some((stream, tracked.wrap(upstream), tracked)))
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
