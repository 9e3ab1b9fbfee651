//! The whole product on the real kernel, through `zmesh::localmesh` (what `zmesh up` runs):
//! `istiod-lite` (CA and delta xDS) in the fabric namespace serving a directory of Kubernetes
//! YAML and, per node, the real `zmesh-cni` agent (watching the same directory) and the real
//! `ztunnel` (configured over xDS only), all child processes. Every check is on what the apps
//! and ztunnel's `/metrics` / `/config_dump` report:
//!
//! 1. the config came over xDS: connected, resources of both types, responses ACKed;
//! 2. a ztunnel cut off from istiod-lite keeps its last config; the other one learns a new
//!    service account for server2, expects that identity and refuses server2's certificate;
//! 3. unmeshed pod → meshed pod goes through the server's ztunnel (15006, plaintext inbound);
//! 4. the Service VIP is load-balanced over endpoints on both nodes; the AuthorizationPolicy
//!    admits `sa/client` and refuses `sa/server` (401, `response_flags="DENY"`);
//! 5. the namespace label removed → pods released without restart (traffic direct, unseen by
//!    ztunnel); label back → captured again with mTLS, same netns;
//! 6. ztunnel killed and restarted while pods run: the agent re-sends them, xDS re-syncs,
//!    traffic resumes;
//! 7. (a second cluster, started unlabelled with one pod opted out) labelling the namespace
//!    captures the running pods: HBONE workloads with SPIFFE identities and certificates in
//!    ztunnel, mTLS in its metrics; the opted-out pod stays out until its label goes;
//!    unlabelling releases them all; no pod restarts.
//!
//! Needs root and the binaries; run inside the sandbox:
//! `cargo build -p ztunnel -p zmesh-cni -p istiod-lite && cargo test -p mesh-tests --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test localmesh_e2e`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::apps::{self, App, EchoReply};
use mesh_testbed::{netns, require_netns_tools};
use zmesh::localmesh::{
    Binaries, ECHO_PORT, HTTP_PORT, LocalMesh, XdsSummary, default_layout, identity, metric,
    workload,
};
use zmesh::up::service::{spread_over_vip, who_answers};

const OPENED: &str = "istio_tcp_connections_opened_total";
const WAIT: Duration = Duration::from_secs(10);
const NODES: [&str; 2] = ["n1", "n2"];

async fn echo(mesh: &LocalMesh, client: &str, server: &str) -> Result<EchoReply> {
    let dst = SocketAddr::from((mesh.pod(server)?.ip, ECHO_PORT));
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

/// Polls `node`'s `/config_dump` until `check` accepts it.
async fn eventually_dump(
    mesh: &LocalMesh,
    node: &str,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let dump = mesh.config_dump(node).await?;
        if check(&dump) {
            return Ok(dump);
        }
        ensure!(
            Instant::now() < deadline,
            "{node}: config_dump never showed {what}: {dump:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_apps(mesh: &LocalMesh) -> Result<Vec<App>> {
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    let mut started = Vec::new();
    for pod in ["server1", "server2", "plain"] {
        let ns = mesh.pod_netns(pod)?;
        started.push(apps::start_echo(&ns, any(ECHO_PORT))?);
        started.push(apps::start_http(&ns, any(HTTP_PORT), pod)?);
    }
    Ok(started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mesh_with_real_agent_and_ztunnel() -> Result<()> {
    if !require_netns_tools(&["nft"]) {
        return Ok(());
    }
    let bins = Binaries::locate(None, None, None)?;
    let state = tempfile::tempdir()?;
    let mut mesh = LocalMesh::start(state.path(), bins, &default_layout()).await?;
    let _apps = start_apps(&mesh)?;
    // A panic (not an error return) makes the dropped mesh print every process's log.
    scenarios(&mut mesh)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    Ok(())
}

async fn scenarios(mesh: &mut LocalMesh) -> Result<()> {
    config_came_over_xds(mesh).await?;
    stale_identity_is_refused(mesh).await?;
    unmeshed_to_meshed_goes_through_inbound_plaintext(mesh).await?;
    service_vip_spreads_and_policy_decides(mesh).await?;
    label_removal_releases_and_recaptures_pods(mesh).await?;
    ztunnel_restart_resumes_traffic(mesh).await
}

/// Every ztunnel holds the 5 workloads, the Service and the policy, from an open, ACKed stream.
async fn config_came_over_xds(mesh: &LocalMesh) -> Result<()> {
    for node in NODES {
        let dump = mesh.config_dump(node).await?;
        let xds = XdsSummary::from_dump(&dump).context("ztunnel runs without xds")?;
        ensure!(xds.connected && xds.all_acked(), "{node}: {xds}");
        ensure!(
            (xds.count("address"), xds.count("authorization")) == (6, 1),
            "{node}: {xds}"
        );
        let server2 = workload(&dump, "demo", "server2").context("no server2")?;
        ensure!(
            server2["protocol"] == "HBONE" && server2["node"] == "n2",
            "{node}: {server2}"
        );
    }
    Ok(())
}

fn identity_of(dump: &serde_json::Value, pod: &str) -> String {
    let found = workload(dump, "demo", pod).map(|w| w["identity"].clone());
    found
        .and_then(|i| i.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// n1 is cut off from istiod-lite, then server2's service account changes to `impostor`: n2
/// learns it over xDS and serves server2 with an `impostor` certificate; n1 keeps its last
/// config and still expects `server`. The client side must refuse the handshake, and say so.
async fn stale_identity_is_refused(mesh: &mut LocalMesh) -> Result<()> {
    // client1's certificate is in place before n1 loses the control plane (and its CA).
    roundtrip(mesh, "client1", "server2").await?;
    let ok_into_n2 = [
        ("reporter", "destination"),
        CLIENT1_TO_SERVER2[0],
        CLIENT1_TO_SERVER2[1],
        ("response_flags", "-"),
    ];
    let accepted = eventually_metric(mesh, "n2", &ok_into_n2, 1).await?;
    mesh.partition("n1", true)?;
    mesh.update_objects(|o| {
        o.service_accounts
            .insert("server2".into(), "impostor".into());
    })?;
    let impostor = identity("demo", "impostor");
    // The agent re-enrolls server2 under its new account (ZDS), xDS brings the new identity;
    // n2 fetches the `impostor` certificate when the first connection needs it.
    eventually_dump(mesh, "n2", "server2 re-enrolled as impostor", |d| {
        let pods = d["pods"].as_array().cloned().unwrap_or_default();
        identity_of(d, "server2") == impostor
            && pods.iter().any(|p| {
                p["name"] == "server2"
                    && p["service_account"] == "impostor"
                    && p["state"] == "running"
            })
    })
    .await?;
    let server = identity("demo", "server");
    let n1 = mesh.config_dump("n1").await?;
    ensure!(
        identity_of(&n1, "server2") == server,
        "the partitioned ztunnel did not keep its last config"
    );
    let refused = echo(mesh, "client1", "server2").await;
    ensure!(
        refused.is_err(),
        "a server with the wrong identity was accepted: {refused:?}"
    );
    let labels = [
        ("reporter", "source"),
        ("destination_workload", "server2"),
        ("destination_principal", server.as_str()),
        ("response_flags", "IDENTITY_ERROR"),
    ];
    eventually_metric(mesh, "n1", &labels, 1).await?;
    let n2 = metric(&mesh.metrics("n2").await?, OPENED, &ok_into_n2);
    ensure!(n2 == accepted, "server2's ztunnel accepted the connection");
    // Back to the truth. n1's stalled stream may still deliver the impostor push late, so its
    // ztunnel is restarted to re-sync from scratch once reachable.
    mesh.update_objects(|o| o.service_accounts.clear())?;
    mesh.kill_ztunnel("n1")?;
    mesh.partition("n1", false)?;
    mesh.start_ztunnel("n1").await?;
    mesh.wait_settled().await?;
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

/// The VIP reaches server1 (n1) and server2 (n2); the policy admits client2 on port 8000 and
/// refuses server2 there: 401 on the wire, DENY in both ztunnels' metrics.
async fn service_vip_spreads_and_policy_decides(mesh: &LocalMesh) -> Result<()> {
    let answered = spread_over_vip(mesh, "client2", 2).await?;
    let pods: Vec<&str> = answered.keys().map(String::as_str).collect();
    ensure!(pods == ["server1", "server2"], "answered: {answered:?}");
    let service = ("destination_service", "web.demo.svc.cluster.local");
    for (pod, count) in &answered {
        let labels = [
            ("reporter", "source"),
            ("source_workload", "client2"),
            ("destination_workload", pod.as_str()),
            ("connection_security_policy", "mutual_tls"),
            service,
        ];
        eventually_metric(mesh, "n2", &labels, *count as u64).await?;
    }
    let server1 = SocketAddr::from((mesh.pod("server1")?.ip, HTTP_PORT));
    ensure!(who_answers(mesh, "client2", server1).await? == "server1");
    let denied = who_answers(mesh, "server2", server1).await;
    ensure!(denied.is_err(), "sa/server was admitted: {denied:?}");
    for (node, reporter) in [("n1", "destination"), ("n2", "source")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "server2"),
            ("destination_workload", "server1"),
            ("source_principal", &identity("demo", "server")[..]),
            ("response_flags", "DENY"),
        ];
        eventually_metric(mesh, node, &labels, 1).await?;
    }
    let log = mesh.ztunnel_log("n2");
    ensure!(
        log.contains("status 401"),
        "no 401 in n2's ztunnel log:\n{log}"
    );
    Ok(())
}

fn inode(mesh: &LocalMesh, pod: &str) -> Result<u64> {
    Ok(netns::inode_of(&mesh.pod_netns(pod)?)?)
}

async fn dump_inode(mesh: &LocalMesh, node: &str, pod: &str) -> Result<Option<u64>> {
    let dump = mesh.config_dump(node).await?;
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
    mesh.update_objects(|o| o.ambient = false)?;
    mesh.wait_settled().await?;
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
    mesh.update_objects(|o| o.ambient = true)?;
    mesh.wait_settled().await?;
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
    mesh.wait_settled().await?;
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
    let xds = XdsSummary::from_dump(&mesh.config_dump("n1").await?).context("no xds")?;
    ensure!(xds.connections == 1 && xds.all_acked(), "{xds}");
    let log = mesh.ztunnel_log("n1");
    ensure!(!log.is_empty(), "no log from the new ztunnel");
    Ok(())
}

/// A cluster whose meshed namespace starts unlabelled, with client2 opted out on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_the_namespace_captures_running_pods() -> Result<()> {
    if !require_netns_tools(&["nft"]) {
        return Ok(());
    }
    let bins = Binaries::locate(None, None, None)?;
    let state = tempfile::tempdir()?;
    let mut layout = default_layout();
    layout.objects.ambient = false;
    layout.objects.opted_out.insert("client2".into());
    let mesh = LocalMesh::start(state.path(), bins, &layout).await?;
    let _apps = start_apps(&mesh)?;
    label_and_unlabel(&mesh)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    Ok(())
}

async fn label_and_unlabel(mesh: &LocalMesh) -> Result<()> {
    let meshed = ["client1", "server1", "client2", "server2"];
    let inodes: BTreeMap<&str, u64> = meshed
        .iter()
        .map(|p| Ok((*p, inode(mesh, p)?)))
        .collect::<Result<_>>()?;

    // Unlabelled: plain TCP workloads, nothing enrolled, traffic unseen by either ztunnel.
    expect_workloads(mesh, &[], &meshed).await?;
    roundtrip(mesh, "client1", "server2").await?;
    ensure!(
        total_opened(mesh).await? == 0,
        "ztunnel saw unmeshed traffic"
    );

    mesh.update_objects(|o| o.ambient = true)?;
    mesh.wait_settled().await?;
    let captured = ["client1", "server1", "server2"];
    expect_workloads(mesh, &captured, &["client2"]).await?;
    expect_enrolled(mesh, &inodes, &captured).await?;
    expect_certificates(mesh, "n1", &["client", "server"]).await?;
    roundtrip(mesh, "client1", "server2").await?;
    expect_mtls(mesh, "client1", "server2").await?;
    // client2 is still opted out: plaintext into server1's ztunnel (inbound 15006).
    roundtrip(mesh, "client2", "server1").await?;
    let plaintext = [
        ("reporter", "destination"),
        ("source_workload", "client2"),
        ("destination_workload", "server1"),
        ("connection_security_policy", "unknown"),
    ];
    eventually_metric(mesh, "n1", &plaintext, 1).await?;

    mesh.update_objects(|o| o.opted_out.clear())?;
    mesh.wait_settled().await?;
    expect_workloads(mesh, &meshed, &[]).await?;
    expect_enrolled(mesh, &inodes, &meshed).await?;
    roundtrip(mesh, "client2", "server1").await?;
    expect_mtls(mesh, "client2", "server1").await?;

    mesh.update_objects(|o| o.ambient = false)?;
    mesh.wait_settled().await?;
    expect_workloads(mesh, &[], &meshed).await?;
    expect_enrolled(mesh, &inodes, &[]).await?;
    let seen = total_opened(mesh).await?;
    roundtrip(mesh, "client1", "server2").await?;
    roundtrip(mesh, "client2", "server1").await?;
    ensure!(
        total_opened(mesh).await? == seen,
        "released traffic went through ztunnel"
    );
    for (pod, before) in &inodes {
        ensure!(inode(mesh, pod)? == *before, "{pod}'s netns changed");
    }
    Ok(())
}

async fn total_opened(mesh: &LocalMesh) -> Result<u64> {
    let mut total = 0;
    for node in NODES {
        total += metric(&mesh.metrics(node).await?, OPENED, &[]);
    }
    Ok(total)
}

/// Both ztunnels hold `hbone` pods as HBONE workloads and `tcp` pods as TCP ones, each with the
/// SPIFFE identity of its service account.
async fn expect_workloads(mesh: &LocalMesh, hbone: &[&str], tcp: &[&str]) -> Result<()> {
    for node in NODES {
        let dump = mesh.config_dump(node).await?;
        let wanted = hbone.iter().map(|p| (p, "HBONE"));
        for (pod, protocol) in wanted.chain(tcp.iter().map(|p| (p, "TCP"))) {
            let w = workload(&dump, "demo", pod).with_context(|| format!("{node}: {pod}"))?;
            let sa = &mesh.pod(pod)?.spec.service_account;
            ensure!(
                w["protocol"] == protocol && w["identity"] == *identity("demo", sa),
                "{node}: {pod} want {protocol}: {w}"
            );
        }
    }
    Ok(())
}

/// Exactly `pods` are enrolled in their node's ztunnel, in the netns they had from the start.
async fn expect_enrolled(
    mesh: &LocalMesh,
    inodes: &BTreeMap<&str, u64>,
    pods: &[&str],
) -> Result<()> {
    for (pod, netns) in inodes {
        let node = &mesh.pod(pod)?.spec.node;
        let want = pods.contains(pod).then_some(*netns);
        let seen = dump_inode(mesh, node, pod).await?;
        ensure!(
            seen == want,
            "{pod} on {node}: enrolled {seen:?}, want {want:?}"
        );
    }
    Ok(())
}

/// `node`'s ztunnel holds a ready certificate for each service account of `demo`.
async fn expect_certificates(mesh: &LocalMesh, node: &str, accounts: &[&str]) -> Result<()> {
    let ids: Vec<String> = accounts.iter().map(|sa| identity("demo", sa)).collect();
    eventually_dump(mesh, node, "ready certificates", |dump| {
        let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
        ids.iter().all(|id| {
            certs
                .iter()
                .any(|c| c["identity"] == id.as_str() && c["state"] == "ready")
        })
    })
    .await?;
    Ok(())
}

/// Both ztunnels report `client → server` as mutual TLS between the pods' SPIFFE identities.
async fn expect_mtls(mesh: &LocalMesh, client: &str, server: &str) -> Result<()> {
    let (c, s) = (mesh.pod(client)?, mesh.pod(server)?);
    for (node, reporter) in [(&c.spec.node, "source"), (&s.spec.node, "destination")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", client),
            ("destination_workload", server),
            ("source_principal", &c.spec.identity()[..]),
            ("destination_principal", &s.spec.identity()[..]),
            ("connection_security_policy", "mutual_tls"),
        ];
        eventually_metric(mesh, node, &labels, 1).await?;
    }
    Ok(())
}
