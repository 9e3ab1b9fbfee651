//! The control plane end to end on the real kernel: istiod-lite reads Kubernetes YAML from its
//! config directory and pushes delta xDS to the real `ztunnel` binary on two nodes (issue #4
//! item 8). Every scenario asserts on what the mesh reports (`/config_dump`, `/metrics`, access
//! logs), not only on traffic:
//!
//! * a Service VIP load-balances across endpoints on both nodes, and removing the namespace's
//!   ambient label turns its workloads to protocol NONE in xDS (and back);
//! * `trafficDistribution: PreferSameNode` keeps the client on its node's endpoint, and fails
//!   over to the other node when that endpoint turns unready;
//! * an ALLOW AuthorizationPolicy selecting the server admits one identity and refuses another
//!   (HBONE `401`, `response_flags="DENY"`), and closes the now-denied open connection;
//! * istiod-lite stopped: open and new connections keep working on the last config, a policy
//!   added and a pod deleted meanwhile take effect once it is back and ztunnel reconnects.
//!
//! Needs root and a built binary; run inside the sandbox:
//! `cargo build -p ztunnel && cargo test -p mesh-tests --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test control_plane_e2e`

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::apps::{self, App};
use mesh_testbed::require_netns_tools;
use mesh_tests::mesh::objects::{self, namespace_yaml};
use mesh_tests::mesh::{
    Mesh, NAMESPACE, PROPAGATION, PodSpec, ServiceSpec, identity, metric, pod_uid,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const APP_PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const OPENED: &str = "istio_tcp_connections_opened_total";
const REVOKED: &str = "ztunnel_tcp_connections_revoked_total";
const TOOLS: [&str; 2] = ["iptables-restore", "iptables-save"];

fn pod(
    name: &'static str,
    node: &'static str,
    service_account: &'static str,
    meshed: bool,
) -> PodSpec {
    PodSpec {
        name,
        node,
        service_account,
        meshed,
    }
}

fn service(name: &'static str, endpoints: Vec<&'static str>) -> ServiceSpec {
    ServiceSpec {
        name,
        vip: VIP,
        port: 80,
        target_port: APP_PORT,
        endpoints,
    }
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn start_app(mesh: &Mesh, pod: &str, http: bool) -> Result<App> {
    let ns = mesh.pod(pod).open_netns()?;
    let addr = SocketAddr::from(([0, 0, 0, 0], APP_PORT));
    Ok(if http {
        apps::start_http(&ns, addr, pod)?
    } else {
        apps::start_echo(&ns, addr)?
    })
}

/// Polls `node`'s metrics until `name{labels}` reaches `at_least`.
async fn eventually_metric(
    mesh: &Mesh,
    node: &str,
    name: &str,
    labels: &[(&str, &str)],
    at_least: u64,
) -> Result<u64> {
    let deadline = Instant::now() + PROPAGATION;
    loop {
        let text = mesh.ztunnel(node).metrics().await?;
        let value = metric(&text, name, labels);
        if value >= at_least {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{node}: {name}{labels:?} = {value}, want >= {at_least}; metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The workload with `uid` in a config dump.
fn workload<'a>(dump: &'a Value, uid: &str) -> Option<&'a Value> {
    dump["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["uid"] == uid)
}

fn has_policy(dump: &Value, uid: &str, policy: &str) -> bool {
    let listed = workload(dump, uid).and_then(|w| w["authorizationPolicies"].as_array());
    listed.is_some_and(|p| p.iter().any(|n| n == policy))
}

// ---------------------------------------------------------------------------------------------
// a + e: load balancing across nodes; the namespace label decides the protocol.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_load_balances_across_nodes_and_namespace_label_sets_protocol() -> Result<()> {
    if !require_netns_tools(&TOOLS) {
        return Ok(());
    }
    let pods = [
        pod("client", "n1", "client", true),
        pod("web1", "n1", "web", true),
        pod("web2", "n2", "web", true),
    ];
    let web = service("web", vec!["web1", "web2"]);
    let mesh = Mesh::start(&["n1", "n2"], &pods, std::slice::from_ref(&web)).await?;
    let _apps = [
        start_app(&mesh, "web1", true)?,
        start_app(&mesh, "web2", true)?,
    ];

    // xDS carried the service and both endpoints to the client's node.
    let key = format!("{NAMESPACE}/{}", web.hostname());
    mesh.ztunnel("n1")
        .wait_config("web's two endpoints", |dump| {
            ["web1", "web2"].iter().all(|p| {
                workload(dump, &pod_uid(p)).is_some_and(|w| w["services"][&key]["80"] == 8080)
            })
        })
        .await?;

    let answered = spread_over_vip(&mesh, 40).await?;
    ensure!(
        answered.get("web1").is_some_and(|n| *n > 0)
            && answered.get("web2").is_some_and(|n| *n > 0),
        "40 connections to the VIP did not reach both endpoints: {answered:?}"
    );
    lb_metrics(&mesh, &web, &answered).await?;
    namespace_label_sets_protocol(&mesh).await?;
    prefer_same_node_and_failover(&mesh, &web).await
}

/// `trafficDistribution: PreferSameNode`: the client (on n1) reaches only web1 (n1) while it is
/// ready, and web2 (n2) once web1 is not. Asserted on the responses and on the destination
/// ztunnels' counters.
async fn prefer_same_node_and_failover(mesh: &Mesh, web: &ServiceSpec) -> Result<()> {
    let host = web.hostname();
    let yaml = objects::service_yaml(web) + "  trafficDistribution: PreferSameNode\n";
    mesh.apply(&objects::service_file(web.name), &yaml)?;
    mesh.ztunnel("n1")
        .wait_config("PreferSameNode load balancing on the web service", |dump| {
            dump["services"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["hostname"] == host.as_str() && s["loadBalancing"]["mode"] == "FAILOVER"
                })
            })
        })
        .await?;
    let inbound = |pod: &'static str| {
        [
            ("reporter", "destination"),
            ("destination_workload", pod),
            ("destination_service", host.as_str()),
        ]
    };
    let web2_before = metric(
        &mesh.ztunnel("n2").metrics().await?,
        OPENED,
        &inbound("web2"),
    );
    let web1_before = metric(
        &mesh.ztunnel("n1").metrics().await?,
        OPENED,
        &inbound("web1"),
    );
    let answered = spread_over_vip(mesh, 20).await?;
    ensure!(
        answered.get("web1") == Some(&20),
        "PreferSameNode: 20 connections from n1 should all reach web1 on n1: {answered:?}"
    );
    eventually_metric(mesh, "n1", OPENED, &inbound("web1"), web1_before + 20).await?;
    let web2_now = metric(
        &mesh.ztunnel("n2").metrics().await?,
        OPENED,
        &inbound("web2"),
    );
    ensure!(
        web2_now == web2_before,
        "n2 counted {} inbound connections to web2 under PreferSameNode",
        web2_now - web2_before
    );

    // web1 turns unready: the closest healthy endpoint is now on the other node.
    let unready = mesh
        .pod_yaml("web1")?
        .replace("status: \"True\"", "status: \"False\"");
    ensure!(
        unready.contains("status: \"False\""),
        "pod YAML changed shape"
    );
    mesh.apply(&objects::pod_file("web1"), &unready)?;
    mesh.ztunnel("n1")
        .wait_config("web1 unhealthy", |dump| {
            workload(dump, &pod_uid("web1")).is_some_and(|w| w["status"] == "Unhealthy")
        })
        .await?;
    let answered = spread_over_vip(mesh, 10).await?;
    ensure!(
        answered.get("web2") == Some(&10),
        "PreferSameNode with web1 unready should fail over to web2: {answered:?}"
    );
    eventually_metric(mesh, "n2", OPENED, &inbound("web2"), web2_before + 10).await?;
    Ok(())
}

/// Opens `n` connections to the VIP from `client`; returns how many each pod answered.
async fn spread_over_vip(mesh: &Mesh, n: usize) -> Result<BTreeMap<String, u64>> {
    let ns = mesh.pod("client").open_netns()?;
    let client_ip = mesh.pod("client").ip();
    let mut answered = BTreeMap::new();
    for i in 0..n {
        let reply = apps::http_get(&ns, vip(), "/")
            .await
            .with_context(|| format!("request {i} to the vip"))?;
        ensure!(reply.status == 200, "request {i}: {reply:?}");
        // Body: `pod=<name> client=<ip:port>`; the app must see the client pod's own IP.
        let mut fields = reply.body.split_whitespace();
        let pod = fields.next().and_then(|f| f.strip_prefix("pod="));
        let client = fields.next().and_then(|f| f.strip_prefix("client="));
        let pod = pod.with_context(|| format!("request {i}: body {:?}", reply.body))?;
        let client: SocketAddr = client.context("no client")?.parse()?;
        ensure!(client.ip() == client_ip, "request {i}: app saw {client}");
        *answered.entry(pod.to_string()).or_default() += 1;
    }
    Ok(answered)
}

/// Each endpoint's ztunnel counts its share as destination; the client's counts all as source.
async fn lb_metrics(
    mesh: &Mesh,
    web: &ServiceSpec,
    answered: &BTreeMap<String, u64>,
) -> Result<()> {
    let host = web.hostname();
    let total: u64 = answered.values().sum();
    for (pod, node) in [("web1", "n1"), ("web2", "n2")] {
        let labels = [
            ("reporter", "destination"),
            ("destination_service", host.as_str()),
            ("destination_workload", pod),
            ("connection_security_policy", "mutual_tls"),
            ("response_flags", "-"),
        ];
        eventually_metric(mesh, node, OPENED, &labels, answered[pod]).await?;
        let text = mesh.ztunnel(node).metrics().await?;
        let other = if pod == "web1" { "web2" } else { "web1" };
        let wrong = [("reporter", "destination"), ("destination_workload", other)];
        ensure!(
            metric(&text, OPENED, &wrong) == 0,
            "{node} counted inbound connections for {other}, which runs elsewhere"
        );
    }
    let src = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_service", host.as_str()),
    ];
    eventually_metric(mesh, "n1", OPENED, &src, total).await?;
    Ok(())
}

async fn namespace_label_sets_protocol(mesh: &Mesh) -> Result<()> {
    let protocols = |dump: &Value, want: &str| {
        ["client", "web1", "web2"]
            .iter()
            .all(|p| workload(dump, &pod_uid(p)).is_some_and(|w| w["protocol"] == want))
    };
    // Unlabelled namespace: xDS sends tunnel protocol NONE (shown as TCP) for all its pods.
    mesh.apply(objects::NAMESPACE_FILE, &namespace_yaml(false))?;
    for node in ["n1", "n2"] {
        mesh.ztunnel(node)
            .wait_config("protocol NONE after the namespace label was removed", |d| {
                protocols(d, "TCP")
            })
            .await?;
    }
    // Labelled again: HBONE.
    mesh.apply(objects::NAMESPACE_FILE, &namespace_yaml(true))?;
    for node in ["n1", "n2"] {
        mesh.ztunnel(node)
            .wait_config("protocol HBONE after the label came back", |d| {
                protocols(d, "HBONE")
            })
            .await?;
    }
    // And meshed traffic flows again.
    let reply = apps::http_get(&mesh.pod("client").open_netns()?, vip(), "/").await?;
    ensure!(reply.status == 200, "{reply:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// b + c: ALLOW policy through istiod-lite: admit, 401, revoke.

fn authz_pods() -> Vec<PodSpec> {
    vec![
        pod("client", "n1", "client", true),
        pod("intruder", "n1", "intruder", true),
        pod("server", "n2", "server", true),
        pod("spare", "n2", "spare", true),
    ]
}

/// ALLOW only the `client` identity to workloads labelled `app=server`.
fn allow_client_to_server() -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: server-allow-client, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/{NAMESPACE}/sa/client]}}}}]
"
    )
}

const POLICY: &str = "demo/server-allow-client";

/// An open connection to the echo app behind the VIP, checked with one echo.
async fn open(mesh: &Mesh, from: &str) -> Result<BufReader<TcpStream>> {
    let ns = mesh.pod(from).open_netns()?;
    let mut stream = BufReader::new(apps::connect(&ns, vip()).await?);
    let mut greeting = String::new();
    let read = stream.read_line(&mut greeting);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .with_context(|| format!("{from}: no greeting"))??;
    let peer = greeting.trim().strip_prefix("peer=");
    let peer: SocketAddr = peer
        .with_context(|| format!("{from}: {greeting:?}"))?
        .parse()?;
    ensure!(peer.ip() == mesh.pod(from).ip(), "{from}: app saw {peer}");
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

async fn closed(stream: &mut BufReader<TcpStream>, who: &str) -> Result<()> {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Ok(()),
        Ok(Ok(n)) => bail!("{who}: got {n} bytes instead of a close"),
        Err(_) => bail!("{who}: still open 10s after the policy update"),
    }
}

async fn admitted(mesh: &Mesh, from: &str) -> Result<()> {
    let ns = mesh.pod(from).open_netns()?;
    let reply = apps::echo_roundtrip(&ns, vip(), b"hello")
        .await
        .with_context(|| format!("{from} -> vip"))?;
    ensure!(reply.data == b"hello", "{from}: echo mismatch");
    Ok(())
}

async fn refused(mesh: &Mesh, from: &str) -> Result<()> {
    let ns = mesh.pod(from).open_netns()?;
    match apps::echo_roundtrip(&ns, vip(), b"let me in").await {
        Ok(reply) => bail!("{from}: admitted, app saw {}", reply.peer),
        Err(_) => Ok(()),
    }
}

async fn wait_policy(mesh: &Mesh, node: &str, present: bool) -> Result<()> {
    let uid = pod_uid("server");
    let what = format!("server's reference to {POLICY} = {present}");
    mesh.ztunnel(node)
        .wait_config(&what, |d| has_policy(d, &uid, POLICY) == present)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_from_istiod_admits_refuses_and_revokes() -> Result<()> {
    if !require_netns_tools(&TOOLS) {
        return Ok(());
    }
    let mesh = Mesh::start(
        &["n1", "n2"],
        &authz_pods(),
        &[service("echo", vec!["server"])],
    )
    .await?;
    let _app = start_app(&mesh, "server", false)?;
    let mut allowed = open(&mesh, "client").await?;
    let mut intruder = open(&mesh, "intruder").await?;

    mesh.apply("server-allow-client", &allow_client_to_server())?;
    wait_policy(&mesh, "n2", true).await?;
    // c: the open intruder connection is closed by the update; the client's keeps working.
    closed(&mut intruder, "intruder").await?;
    echo(&mut allowed, "client").await?;
    let revoked = [("reporter", "destination"), ("response_flags", "DENY")];
    let revoked_id = identity("intruder");
    let revoked = [&revoked[..], &[("source_principal", revoked_id.as_str())]].concat();
    eventually_metric(&mesh, "n2", REVOKED, &revoked, 1).await?;

    // b: new connections: client admitted, intruder refused with 401.
    admitted(&mesh, "client").await?;
    refused(&mesh, "intruder").await?;
    let denied = [
        ("response_flags", "DENY"),
        ("source_principal", revoked_id.as_str()),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let dst = [&denied[..], &[("reporter", "destination")]].concat();
    eventually_metric(&mesh, "n2", OPENED, &dst, 1).await?;
    let src = [&denied[..], &[("reporter", "source")]].concat();
    eventually_metric(&mesh, "n1", OPENED, &src, 1).await?;
    let client_id = identity("client");
    let ok = [
        ("reporter", "destination"),
        ("source_principal", client_id.as_str()),
        ("response_flags", "DENY"),
    ];
    ensure!(
        metric(&mesh.ztunnel("n2").metrics().await?, OPENED, &ok) == 0,
        "a client connection was denied"
    );
    source_access_log_shows_401(&mesh).await?;

    // Deleting the policy admits the intruder again.
    mesh.delete("server-allow-client")?;
    wait_policy(&mesh, "n2", false).await?;
    admitted(&mesh, "intruder").await
}

/// The intruder's ztunnel logged the refused CONNECT: status 401, flag DENY.
async fn source_access_log_shows_401(mesh: &Mesh) -> Result<()> {
    let deadline = Instant::now() + PROPAGATION;
    loop {
        let log = mesh.ztunnel("n1").log();
        let found = log.lines().any(|l| {
            l.contains("connection complete")
                && l.contains("src.workload=\"intruder\"")
                && l.contains("status 401")
                && l.contains("response_flags=\"DENY\"")
        });
        if found {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no access-log line with the 401 on n1:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// d: control-plane outage.

fn xds_connections(dump: &Value) -> Option<(bool, u64)> {
    let xds = &dump["xds"];
    Some((xds["connected"].as_bool()?, xds["connections"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_outage_keeps_last_config_and_resyncs() -> Result<()> {
    if !require_netns_tools(&TOOLS) {
        return Ok(());
    }
    let mut mesh = Mesh::start(
        &["n1", "n2"],
        &authz_pods(),
        &[service("echo", vec!["server"])],
    )
    .await?;
    let _app = start_app(&mesh, "server", false)?;
    // Every identity has its certificate before the outage.
    admitted(&mesh, "client").await?;
    admitted(&mesh, "intruder").await?;
    let mut open_conn = open(&mesh, "client").await?;
    let mut before = BTreeMap::new();
    for node in ["n1", "n2"] {
        let dump = mesh.ztunnel(node).config_dump().await?;
        let (connected, n) = xds_connections(&dump).context("no xds status")?;
        ensure!(
            connected,
            "{node}: xds not connected before the outage: {}",
            dump["xds"]
        );
        before.insert(node, n);
    }

    mesh.stop_istiod().await?;
    for node in ["n1", "n2"] {
        mesh.ztunnel(node)
            .wait_config("xds disconnected", |d| {
                xds_connections(d).is_some_and(|(c, _)| !c)
            })
            .await?;
    }
    // Last config keeps serving: the open connection, new ones, through the VIP.
    echo(&mut open_conn, "client (open across the outage)").await?;
    admitted(&mesh, "client").await?;
    admitted(&mesh, "intruder").await?;

    // Changes while the control plane is away: a policy, and a pod removed.
    mesh.apply("server-allow-client", &allow_client_to_server())?;
    mesh.delete(&objects::pod_file("spare"))?;
    // Nobody can push them: a second later the intruder is still admitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    admitted(&mesh, "intruder").await?;
    let dump = mesh.ztunnel("n2").config_dump().await?;
    ensure!(
        workload(&dump, &pod_uid("spare")).is_some()
            && !has_policy(&dump, &pod_uid("server"), POLICY),
        "config changed while istiod-lite was down: {}",
        dump["workloads"]
    );

    mesh.start_istiod().await?;
    for node in ["n1", "n2"] {
        let was = before[node];
        mesh.ztunnel(node)
            .wait_config("xds reconnected with the new config", |d| {
                let reconnected = xds_connections(d).is_some_and(|(c, n)| c && n > was);
                let spare_gone = workload(d, &pod_uid("spare")).is_none();
                reconnected && spare_gone && has_policy(d, &pod_uid("server"), POLICY)
            })
            .await?;
    }
    refused(&mesh, "intruder").await?;
    admitted(&mesh, "client").await?;
    echo(&mut open_conn, "client (allowed by the new policy)").await?;
    let denied = [("reporter", "destination"), ("response_flags", "DENY")];
    eventually_metric(&mesh, "n2", OPENED, &denied, 1).await?;
    Ok(())
}
