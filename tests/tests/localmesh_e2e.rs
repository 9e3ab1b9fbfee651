//! The whole product on the real kernel, through `zmesh::localmesh` (what `zmesh up` runs): the
//! `istiod-lite` CA in the fabric namespace and, per node, the real `zmesh-cni` agent (reading a
//! Kubernetes YAML config dir) and the real `ztunnel`, all child processes. Every check is on
//! what the apps and ztunnel's `/metrics` / `/config_dump` report:
//!
//! 1. unmeshed pod → meshed pod goes through the server's ztunnel (15006, plaintext inbound);
//! 2. a client expecting another identity than the server's certificate is refused;
//! 3. the namespace label removed → pods released without restart (traffic direct, unseen by
//!    ztunnel); label back → captured again with mTLS, same netns;
//! 4. ztunnel killed and restarted while pods run: the agent re-sends them, traffic resumes.
//!
//! Needs root and the binaries; run inside the sandbox:
//! `cargo build -p ztunnel -p zmesh-cni -p istiod-lite && cargo test -p mesh-tests --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test localmesh_e2e`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::apps::{self, App, EchoReply};
use mesh_testbed::{netns, require_netns_tools};
use zmesh::localmesh::{Binaries, LocalMesh, default_layout, identity, metric, samples};

const APP_PORT: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";
const WAIT: Duration = Duration::from_secs(10);

async fn echo(mesh: &LocalMesh, client: &str, server: &str) -> Result<EchoReply> {
    let dst = SocketAddr::from((mesh.pod(server)?.ip, APP_PORT));
    let ns = mesh.pod_netns(client)?;
    let payload = format!("{client} to {server}");
    let reply = apps::echo_roundtrip(&ns, dst, payload.as_bytes()).await;
    let reply = reply.with_context(|| format!("{client} -> {server} ({dst})"))?;
    ensure!(
        reply.data == payload.as_bytes(),
        "{client} -> {server}: echo mismatch"
    );
    Ok(reply)
}

/// A round trip that must work and show the client's own IP to the app.
async fn roundtrip(mesh: &LocalMesh, client: &str, server: &str) -> Result<()> {
    let reply = echo(mesh, client, server).await?;
    ensure!(
        reply.peer.ip() == mesh.pod(client)?.ip,
        "{client} -> {server}: the app saw {} instead of the client's IP",
        reply.peer
    );
    Ok(())
}

/// Polls `node`'s metrics until `name{labels}` reaches `at_least`; returns the value.
async fn eventually_metric(
    mesh: &LocalMesh,
    node: &str,
    labels: &[(&str, &str)],
    at_least: u64,
) -> Result<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = mesh.metrics(node).await?;
        let value = metric(&text, OPENED, labels);
        if value >= at_least {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{node}: {OPENED}{labels:?} = {value}, want >= {at_least}; metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually_dump(mesh: &LocalMesh, node: &str, what: &str, want: bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = mesh.ztunnel_admin(node, "/config_dump").await?.body;
        if dump.contains(what) == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{node}: {what:?} in config_dump != {want}: {dump}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_apps(mesh: &LocalMesh) -> Result<Vec<App>> {
    ["server1", "server2", "plain"]
        .iter()
        .map(|p| {
            let ns = mesh.pod_netns(p)?;
            Ok(apps::start_echo(
                &ns,
                SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
            )?)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mesh_with_real_agent_and_ztunnel() -> Result<()> {
    if !require_netns_tools(&["nft"]) {
        return Ok(());
    }
    let bins = Binaries::locate(None, None, None)?;
    let state = tempfile::tempdir()?;
    let (nodes, pods) = default_layout();
    let mut mesh = LocalMesh::start(state.path(), bins, &nodes, &pods).await?;
    let _apps = start_apps(&mesh)?;

    wrong_identity_is_refused(&mesh).await?;
    unmeshed_to_meshed_goes_through_inbound_plaintext(&mesh).await?;
    label_removal_releases_and_recaptures_pods(&mesh).await?;
    ztunnel_restart_resumes_traffic(&mut mesh).await
}

/// n1's ztunnel is told server2 runs as `impostor`; server2's certificate says `server`. The
/// client side must refuse the handshake, and say so in its metrics.
async fn wrong_identity_is_refused(mesh: &LocalMesh) -> Result<()> {
    mesh.write_ztunnel_config("n1", &[("server2", "impostor")])?;
    eventually_dump(mesh, "n1", "impostor", true).await?;
    let refused = echo(mesh, "client1", "server2").await;
    ensure!(
        refused.is_err(),
        "a server with the wrong identity was accepted: {refused:?}"
    );
    let text = mesh.metrics("n1").await?;
    let impostor = identity("demo", "impostor");
    let labels = [
        ("reporter", "source"),
        ("destination_workload", "server2"),
        ("destination_principal", impostor.as_str()),
    ];
    let failed: Vec<_> = samples(&text, OPENED)
        .into_iter()
        .filter(|s| s.matches(&labels) && s.label("response_flags") != "-")
        .collect();
    ensure!(
        !failed.is_empty(),
        "no failed connection to the impostor in:\n{text}"
    );
    let flags = failed[0].label("response_flags");
    ensure!(flags == "IDENTITY_ERROR", "response_flags={flags}");
    println!(
        "refused with response_flags={flags}: {:?}",
        failed[0].labels
    );
    // server2 itself never accepted the connection.
    let n2 = metric(
        &mesh.metrics("n2").await?,
        OPENED,
        &[("destination_workload", "server2")],
    );
    ensure!(n2 == 0, "server2's ztunnel recorded {n2} connections");
    // Back to the truth: the same flow works.
    mesh.write_ztunnel_config("n1", &[])?;
    eventually_dump(mesh, "n1", "impostor", false).await?;
    roundtrip(mesh, "client1", "server2").await
}

/// `plain` is not in the mesh; server1 is. The connection is plaintext on the wire and enters
/// server1 through its ztunnel's inbound plaintext listener, which keeps plain's IP.
async fn unmeshed_to_meshed_goes_through_inbound_plaintext(mesh: &LocalMesh) -> Result<()> {
    roundtrip(mesh, "plain", "server1").await?;
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "plain"),
        ("destination_workload", "server1"),
        ("destination_principal", &identity("demo", "server")[..]),
        ("connection_security_policy", "unknown"),
        ("response_flags", "-"),
    ];
    eventually_metric(mesh, "n1", &labels, 1).await?;
    Ok(())
}

fn inode(mesh: &LocalMesh, pod: &str) -> Result<u64> {
    Ok(netns::inode_of(&mesh.pod_netns(pod)?)?)
}

async fn dump_inode(mesh: &LocalMesh, node: &str, pod: &str) -> Result<Option<u64>> {
    let dump: serde_json::Value =
        serde_json::from_str(&mesh.ztunnel_admin(node, "/config_dump").await?.body)?;
    let pods = dump["pods"].as_array().cloned().unwrap_or_default();
    Ok(pods
        .iter()
        .find(|p| p["name"] == pod)
        .and_then(|p| p["netns_inode"].as_u64()))
}

const CLIENT1_TO_SERVER2: [(&str, &str); 2] = [
    ("source_workload", "client1"),
    ("destination_workload", "server2"),
];

async fn label_removal_releases_and_recaptures_pods(mesh: &LocalMesh) -> Result<()> {
    let before = inode(mesh, "client1")?;
    ensure!(
        dump_inode(mesh, "n1", "client1").await? == Some(before),
        "client1 not enrolled"
    );
    let n2_direct = release(mesh).await?;
    recapture(mesh, n2_direct).await?;
    ensure!(inode(mesh, "client1")? == before, "client1's netns changed");
    ensure!(
        dump_inode(mesh, "n1", "client1").await? == Some(before),
        "client1 not re-enrolled"
    );
    Ok(())
}

/// Label removed: the agent releases every pod; traffic flows directly, unseen by ztunnel n1.
/// Returns server2's ztunnel count for the flow at that point.
async fn release(mesh: &LocalMesh) -> Result<u64> {
    let seen = metric(&mesh.metrics("n1").await?, OPENED, &CLIENT1_TO_SERVER2);
    mesh.write_agent_config(false)?;
    mesh.wait_enrolled(false).await?;
    ensure!(
        dump_inode(mesh, "n1", "client1").await?.is_none(),
        "client1 still in ztunnel"
    );
    roundtrip(mesh, "client1", "server2").await?;
    let now = metric(&mesh.metrics("n1").await?, OPENED, &CLIENT1_TO_SERVER2);
    ensure!(
        now == seen,
        "released traffic still went through ztunnel n1 ({now} != {seen})"
    );
    Ok(metric(
        &mesh.metrics("n2").await?,
        OPENED,
        &CLIENT1_TO_SERVER2,
    ))
}

/// Label back: captured again, mTLS reported by both ztunnels.
async fn recapture(mesh: &LocalMesh, n2_direct: u64) -> Result<()> {
    let mtls = [
        CLIENT1_TO_SERVER2[0],
        CLIENT1_TO_SERVER2[1],
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let seen = metric(&mesh.metrics("n1").await?, OPENED, &mtls);
    mesh.write_agent_config(true)?;
    mesh.wait_enrolled(true).await?;
    roundtrip(mesh, "client1", "server2").await?;
    eventually_metric(mesh, "n1", &mtls, seen + 1).await?;
    let n2_now = metric(&mesh.metrics("n2").await?, OPENED, &CLIENT1_TO_SERVER2);
    ensure!(
        n2_now > n2_direct,
        "re-captured traffic not seen by server2's ztunnel"
    );
    Ok(())
}

async fn ztunnel_restart_resumes_traffic(mesh: &mut LocalMesh) -> Result<()> {
    mesh.kill_ztunnel("n1")?;
    // Still captured, nobody listening: fail closed.
    let closed = echo(mesh, "client1", "server2").await;
    ensure!(
        closed.is_err(),
        "traffic flowed with no ztunnel: {closed:?}"
    );
    mesh.start_ztunnel("n1").await?;
    mesh.wait_enrolled(true).await?;
    roundtrip(mesh, "client1", "server2").await?;
    roundtrip(mesh, "client2", "server1").await?;
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client1"),
        ("destination_workload", "server2"),
        ("source_principal", &identity("demo", "client")[..]),
        ("connection_security_policy", "mutual_tls"),
    ];
    // A fresh process: its counters hold exactly the one connection made since.
    let count = eventually_metric(mesh, "n1", &labels, 1).await?;
    ensure!(
        count == 1,
        "expected the new ztunnel's first connection, counted {count}"
    );
    let log = mesh.ztunnel_log("n1");
    ensure!(!log.is_empty(), "no log from the new ztunnel");
    Ok(())
}
