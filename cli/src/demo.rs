//! `zmesh demo`: a real CA and two workloads on loopback.
//!
//! It starts istiod-lite's CA, lets a node proxy (ztunnel's role) obtain certificates for two pods
//! of its node by impersonation, serves HBONE with the server pod's certificate in front of a TCP
//! echo app, and opens a tunnel from the client pod. It prints what each side observed: the
//! identities presented and verified, and the bytes carried. Finally it shows that a client
//! expecting another identity refuses the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use mesh_core::Identity;
use mesh_core::ca_client::{AuthToken, CaClient, CaClientConfig};
use mesh_core::hbone::client::{HbonePool, PoolKey, PoolSettings, TcpConnector, TunnelRequest};
use mesh_core::hbone::server::{Accepted, ConnectHandler, HboneServer, InboundRequest, Rejection, ServerSettings};
use mesh_core::tls::WorkloadTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NODE: &str = "demo-node";
const NODE_TOKEN: &str = "demo-ztunnel-node-token-0123456789";

/// Flags of `zmesh demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes to send through the tunnel.
    #[arg(long, default_value_t = 1 << 20)]
    bytes: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("create a scratch directory")?;
    let client_id: Identity = "spiffe://cluster.local/ns/demo/sa/client".parse()?;
    let server_id: Identity = "spiffe://cluster.local/ns/demo/sa/server".parse()?;

    println!("zmesh demo: CA + mutual-TLS HBONE round trip on loopback\n");
    let ca = start_ca(dir.path(), &[&client_id, &server_id]).await?;
    println!("1. istiod-lite CA listening on {} (gRPC over TLS 1.3)", ca.grpc_address());
    println!("   root certificate written to {}", ca.root_cert_path().display());

    let root = std::fs::read_to_string(ca.root_cert_path())?;
    let client_tls = issue(&ca, &root, &client_id).await?;
    let server_tls = issue(&ca, &root, &server_id).await?;

    let app = echo_app().await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(DemoHandler { app, seen: seen.clone() });
    let server = HboneServer::bind(
        "127.0.0.1:0".parse()?,
        Arc::new(server_tls.clone()),
        handler,
        ServerSettings::default(),
    )?;
    let hbone_addr = server.local_addr();
    tokio::spawn(server.run());
    println!("3. HBONE server for {server_id} on {hbone_addr}, in front of a TCP echo app on {app}");

    round_trip(&client_tls, &client_id, &server_id, hbone_addr, app, args.bytes, &seen).await?;
    wrong_identity(&client_tls, &client_id, hbone_addr, app).await;
    ca.shutdown_handle().cancel();
    ca.wait_termination().await?;
    println!("\ndone: everything above ran on this machine over real sockets; nothing is left behind.");
    Ok(())
}

async fn start_ca(dir: &std::path::Path, pods: &[&Identity]) -> anyhow::Result<istiod_lite::app::Bound> {
    let workloads: Vec<String> = pods
        .iter()
        .map(|id| format!("  - {{ identity: \"{id}\", node: {NODE} }}"))
        .collect();
    let tokens = format!(
        "tokens:\n  \"{NODE_TOKEN}\": {{ identity: \"spiffe://cluster.local/ns/istio-system/sa/ztunnel\", node: {NODE} }}\nworkloads:\n{}\n",
        workloads.join("\n")
    );
    let tokens_file = dir.join("tokens.yaml");
    std::fs::write(&tokens_file, tokens)?;
    let mut env = HashMap::new();
    let mut set = |k: &str, v: String| env.insert(k.to_string(), v);
    set("ISTIOD_GRPC_ADDR", "127.0.0.1:0".into());
    set("ISTIOD_CA_DIR", dir.join("ca").display().to_string());
    set("ISTIOD_ROOT_CERT_OUT", dir.join("root-cert.pem").display().to_string());
    set("ISTIOD_TOKENS_FILE", tokens_file.display().to_string());
    let config = istiod_lite::config::Config::from_source(&env)?;
    istiod_lite::app::build(config).await
}

/// Asks the CA for `id`'s certificate the way ztunnel does: as the node proxy, impersonating the pod.
async fn issue(ca: &istiod_lite::app::Bound, root: &str, id: &Identity) -> anyhow::Result<Arc<WorkloadTls>> {
    let mut cfg = CaClientConfig::new(format!("https://localhost:{}", ca.grpc_address().port()), root);
    cfg.token = AuthToken::Literal(NODE_TOKEN.into());
    cfg.impersonate = true;
    let cert = CaClient::new(cfg)?.create_certificate(id).await?;
    let left = cert.not_after().duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    println!(
        "2. node proxy on {NODE} obtained a certificate for {} (impersonation), valid {}h more, chain of {} + {} root",
        cert.identity(),
        left.as_secs() / 3600,
        cert.chain().len(),
        cert.roots().len()
    );
    Ok(Arc::new(WorkloadTls::from_certificate(&cert)?))
}

struct DemoHandler {
    app: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ConnectHandler for DemoHandler {
    async fn handle(&self, req: InboundRequest) -> Result<Accepted, Rejection> {
        self.seen.lock().expect("lock").push(format!(
            "   server side: CONNECT {} from {}; client certificate verified as {} (we presented {})",
            req.target, req.peer_addr, req.peer_identity, req.local_identity
        ));
        let upstream = TcpStream::connect(self.app)
            .await
            .map_err(|e| Rejection::unavailable(format!("app connect: {e}")))?;
        Ok(Accepted::new(upstream))
    }
}

async fn round_trip(
    tls: &Arc<WorkloadTls>,
    src: &Identity,
    dst: &Identity,
    hbone: SocketAddr,
    app: SocketAddr,
    bytes: usize,
    seen: &Mutex<Vec<String>>,
) -> anyhow::Result<()> {
    let pool = HbonePool::new(PoolSettings::default(), Arc::new(tls.clone()), Arc::new(TcpConnector));
    let key = PoolKey { src_identity: src.clone(), dst_identities: vec![dst.clone()], dst: hbone, src_ip: None };
    let tunnel = pool.open(&key, &TunnelRequest::new(app)).await?;
    println!("4. client {src} opened CONNECT {app} to {hbone}; server verified as {dst}");
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let payload = vec![0x7au8; bytes];
    let writer = async move {
        wr.write_all(&payload).await?;
        wr.shutdown().await?; // FIN → END_STREAM; the echo app closes when it sees EOF
        anyhow::Ok(bytes)
    };
    let reader = async move {
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await?;
        anyhow::Ok(back)
    };
    let (sent, back) = tokio::try_join!(writer, reader)?;
    anyhow::ensure!(back.len() == sent && back.iter().all(|b| *b == 0x7a), "echo mismatch");
    for line in seen.lock().expect("lock").drain(..) {
        println!("{line}");
    }
    println!("   client side: sent {sent} bytes, received {} bytes back, identical; half-close carried both ways", back.len());
    Ok(())
}

async fn wrong_identity(tls: &Arc<WorkloadTls>, src: &Identity, hbone: SocketAddr, app: SocketAddr) {
    let expected: Identity = "spiffe://cluster.local/ns/demo/sa/somebody-else".parse().expect("valid id");
    let pool = HbonePool::new(PoolSettings::default(), Arc::new(tls.clone()), Arc::new(TcpConnector));
    let key = PoolKey { src_identity: src.clone(), dst_identities: vec![expected.clone()], dst: hbone, src_ip: None };
    match pool.open(&key, &TunnelRequest::new(app)).await {
        Ok(_) => println!("5. UNEXPECTED: a client expecting {expected} accepted the server"),
        Err(e) => println!("5. a client expecting {expected} refuses the server: {e}"),
    }
}

async fn echo_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}
