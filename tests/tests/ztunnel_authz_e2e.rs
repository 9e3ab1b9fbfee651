//! L4 authorization end to end on the real kernel: two nodes, the real `ztunnel` binary on each,
//! an AuthorizationPolicy and a PeerAuthentication applied as Kubernetes YAML to istiod-lite's
//! config directory while connections are open, reaching the ztunnels over delta xDS.
//!
//! An ALLOW policy admits the `client` identity and refuses `intruder` (the destination ztunnel
//! answers 401, both ztunnels record `response_flags="DENY"`); PeerAuthentication STRICT
//! (translated to a DENY `notPrincipals: [presence]` policy) refuses plaintext from an unmeshed
//! pod; the policy update
//! closes the already-open connections it now denies and leaves the allowed one running.
//!
//! Needs root and a built binary; run inside the sandbox:
//! `cargo build -p ztunnel && cargo test -p mesh-tests --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test ztunnel_authz_e2e`

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::apps::{self, App};
use mesh_testbed::require_netns_tools;
use mesh_tests::mesh::{Mesh, NAMESPACE, PodSpec, ServiceSpec, identity, metric, pod_uid};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";
const REVOKED: &str = "ztunnel_tcp_connections_revoked_total";
/// What istiod-lite makes of PeerAuthentication STRICT (in the root namespace).
const STRICT_POLICY: &str = "istio-system/istio_converted_static_strict";

fn pods() -> Vec<PodSpec> {
    let pod = |name, node, sa, meshed| PodSpec {
        name,
        node,
        service_account: sa,
        meshed,
    };
    vec![
        pod("client", "n1", "client", true),
        pod("intruder", "n1", "intruder", true),
        pod("plain", "n1", "plain", false),
        pod("server", "n2", "server", true),
    ]
}

fn services() -> Vec<ServiceSpec> {
    vec![ServiceSpec {
        name: "echo",
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        target_port: APP_PORT,
        endpoints: vec!["server"],
    }]
}

/// ALLOW only `client` in the namespace.
fn allow_client() -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: {NAMESPACE}}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NAMESPACE}/sa/client]}}}}]
"
    )
}

/// Refuse anything without an identity (plaintext) in the namespace.
fn strict() -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {NAMESPACE}}}
spec: {{mtls: {{mode: STRICT}}}}
"
    )
}

fn server(mesh: &Mesh) -> SocketAddr {
    SocketAddr::from((mesh.pod("server").ip(), APP_PORT))
}

/// An open connection to the echo app, checked with one echo.
async fn open(mesh: &Mesh, from: &str) -> Result<BufReader<TcpStream>> {
    let ns = mesh.pod(from).open_netns()?;
    let stream = apps::connect(&ns, server(mesh)).await?;
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    let read = stream.read_line(&mut greeting);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .with_context(|| format!("{from}: no greeting"))??;
    ensure!(
        greeting.starts_with("peer="),
        "{from}: greeting {greeting:?}"
    );
    echo(&mut stream, from).await?;
    Ok(stream)
}

async fn echo(stream: &mut BufReader<TcpStream>, who: &str) -> Result<()> {
    stream.get_mut().write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    let read = stream.read_exact(&mut buf);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .with_context(|| format!("{who}: no echo"))??;
    ensure!(&buf == b"ping", "{who}: echo mismatch");
    Ok(())
}

/// Waits until the peer closes (EOF or reset).
async fn closed(stream: &mut BufReader<TcpStream>, who: &str) -> Result<()> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
        Ok(Ok(n)) => bail!("{who}: got {n} bytes instead of a close"),
        Err(_) => bail!("{who}: still open 5s after the policy update"),
    }
}

async fn refused(mesh: &Mesh, from: &str) -> Result<()> {
    let ns = mesh.pod(from).open_netns()?;
    match apps::echo_roundtrip(&ns, server(mesh), b"let me in").await {
        Ok(reply) => bail!("{from}: admitted, app saw {}", reply.peer),
        Err(_) => Ok(()),
    }
}

async fn eventually_metric(
    mesh: &Mesh,
    node: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_least: u64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = mesh.ztunnel(node).metrics().await?;
        let value = metric(&text, name, labels);
        if value >= at_least {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{node}: {name}{labels:?} = {value}, want >= {at_least}; metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies the policies through istiod-lite and waits until the server's ztunnel has both: the
/// namespace policy and the server workload's reference to the converted STRICT policy.
async fn apply_policies(mesh: &Mesh) -> Result<()> {
    mesh.apply("authz-allow-client", &allow_client())?;
    mesh.apply("peer-authn-strict", &strict())?;
    let allow = format!("{NAMESPACE}/allow-client");
    let server = pod_uid("server");
    mesh.ztunnel("n2")
        .wait_config("the allow-client and STRICT policies", |dump| {
            let names = policy_names(dump);
            let strict = dump["workloads"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| {
                    w["uid"] == server.as_str()
                        && w["authorizationPolicies"]
                            .as_array()
                            .is_some_and(|p| p.iter().any(|n| n == STRICT_POLICY))
                })
            });
            names.contains(&allow) && names.iter().any(|n| n == STRICT_POLICY) && strict
        })
        .await?;
    Ok(())
}

fn policy_names(dump: &serde_json::Value) -> Vec<String> {
    let policies = dump["policies"].as_array().cloned().unwrap_or_default();
    policies
        .iter()
        .filter_map(|p| {
            let (ns, name) = (p["namespace"].as_str()?, p["name"].as_str()?);
            Some(format!("{ns}/{name}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_admit_refuse_and_revoke() -> Result<()> {
    if !require_netns_tools(&["iptables-restore", "iptables-save"]) {
        return Ok(());
    }
    let mesh = Mesh::start(&["n1", "n2"], &pods(), &services()).await?;
    let ns = mesh.pod("server").open_netns()?;
    let _app: App = apps::start_echo(&ns, SocketAddr::from(([0, 0, 0, 0], APP_PORT)))?;

    // No policy yet: everyone gets in, and stays connected.
    let mut allowed = open(&mesh, "client").await?;
    let mut intruder = open(&mesh, "intruder").await?;
    let mut plain = open(&mesh, "plain").await?;

    apply_policies(&mesh).await?;
    // The update closes what it now denies, and only that.
    closed(&mut intruder, "intruder (mTLS, not allowed)").await?;
    closed(&mut plain, "plain (no identity)").await?;
    echo(&mut allowed, "client").await?;
    let revoked = [("reporter", "destination"), ("response_flags", "DENY")];
    eventually_metric(&mesh, "n2", REVOKED, &revoked, 2).await?;

    // New connections: allowed, 401, closed.
    drop(open(&mesh, "client").await?);
    refused(&mesh, "intruder").await?;
    refused(&mesh, "plain").await?;
    let intruder_id = identity("intruder");
    let denied_mtls = [
        ("response_flags", "DENY"),
        ("source_principal", intruder_id.as_str()),
        ("connection_security_policy", "mutual_tls"),
    ];
    let dst = [&denied_mtls[..], &[("reporter", "destination")]].concat();
    eventually_metric(&mesh, "n2", OPENED, &dst, 1).await?;
    // The intruder's own ztunnel saw the 401 as a DENY.
    let src = [&denied_mtls[..], &[("reporter", "source")]].concat();
    eventually_metric(&mesh, "n1", OPENED, &src, 1).await?;
    let denied_plain = [
        ("reporter", "destination"),
        ("response_flags", "DENY"),
        ("connection_security_policy", "unknown"),
    ];
    eventually_metric(&mesh, "n2", OPENED, &denied_plain, 1).await?;
    let log = mesh.ztunnel("n2").log();
    ensure!(
        log.contains("closing connection: a policy update denies it"),
        "no revocation in the log:\n{log}"
    );
    Ok(())
}
