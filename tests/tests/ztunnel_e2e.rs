//! ztunnel end to end on the real kernel: two nodes, the real `ztunnel` binary on each, the
//! istiod-lite CA in the fabric namespace, pods enrolled over ZDS with in-pod capture rules.
//!
//! Plain TCP from a client pod reaches server pods on the other node and on the same node with
//! the client's own IP preserved; ztunnel's `/metrics` prove the path (mTLS, the right SPIFFE
//! principals, source vs destination reporter); a packet capture on the node link proves no
//! payload crosses it in plaintext; meshed → unmeshed passes through; removing a pod stops its
//! proxy; SIGTERM drains and exits cleanly.
//!
//! Needs root and a built binary; run inside the sandbox:
//! `cargo build -p ztunnel && cargo test -p mesh-tests --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-tests --test ztunnel_e2e`

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::apps::{self, App};
use mesh_testbed::{netns, require_netns_tools};
use mesh_tests::mesh::{DRAIN, Mesh, PodSpec, ServiceSpec, identity, metric};

const APP_PORT: u16 = 8080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";

fn pods() -> Vec<PodSpec> {
    let pod = |name, node, sa, meshed| PodSpec {
        name,
        node,
        service_account: sa,
        meshed,
    };
    vec![
        pod("client1", "n1", "client", true),
        pod("server1", "n1", "server", true),
        pod("client2", "n2", "client", true),
        pod("server2", "n2", "server", true),
        pod("plain", "n2", "plain", false),
    ]
}

fn services() -> Vec<ServiceSpec> {
    vec![ServiceSpec {
        name: "echo",
        vip: VIP,
        port: 80,
        target_port: APP_PORT,
        endpoints: vec!["server2"],
    }]
}

fn at(mesh: &Mesh, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((mesh.pod(pod).ip(), port))
}

fn start_echo(mesh: &Mesh, pod: &str) -> Result<App> {
    let ns = mesh.pod(pod).open_netns()?;
    Ok(apps::start_echo(
        &ns,
        SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
    )?)
}

/// Sends `payload` from `client` to `dst` through the echo app; checks the echo and that the app
/// saw the client pod's own IP.
async fn roundtrip(mesh: &Mesh, client: &str, dst: SocketAddr, payload: &[u8]) -> Result<()> {
    let ns = mesh.pod(client).open_netns()?;
    let reply = apps::echo_roundtrip(&ns, dst, payload)
        .await
        .with_context(|| format!("{client} -> {dst}"))?;
    ensure!(reply.data == payload, "{client} -> {dst}: echo mismatch");
    ensure!(
        reply.peer.ip() == mesh.pod(client).ip(),
        "{client} -> {dst}: the app saw {} instead of the client pod's IP",
        reply.peer
    );
    Ok(())
}

/// Polls `node`'s metrics until `name{labels}` reaches `at_least`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_meshes_pods_across_nodes() -> Result<()> {
    if !require_netns_tools(&["iptables-restore", "iptables-save", "tcpdump"]) {
        return Ok(());
    }
    let mut mesh = Mesh::start(&["n1", "n2"], &pods(), &services()).await?;
    let _apps = ["server1", "server2", "plain"]
        .iter()
        .map(|p| start_echo(&mesh, p))
        .collect::<Result<Vec<_>>>()?;

    cross_node_and_same_node(&mesh).await?;
    principals_and_reporters_in_metrics(&mesh).await?;
    service_vip_routes_to_an_endpoint(&mesh).await?;
    meshed_to_unmeshed_passes_through(&mesh).await?;
    no_plaintext_on_the_node_link(&mesh).await?;
    config_dump_lists_pods_and_certificates(&mesh).await?;
    removed_pod_loses_its_proxy(&mesh).await?;
    sigterm_drains_and_exits(&mut mesh).await
}

async fn cross_node_and_same_node(mesh: &Mesh) -> Result<()> {
    roundtrip(
        mesh,
        "client1",
        at(mesh, "server2", APP_PORT),
        b"hello across nodes",
    )
    .await?;
    roundtrip(
        mesh,
        "client2",
        at(mesh, "server1", APP_PORT),
        b"hello back",
    )
    .await?;
    roundtrip(
        mesh,
        "client1",
        at(mesh, "server1", APP_PORT),
        b"hello same node",
    )
    .await
}

async fn principals_and_reporters_in_metrics(mesh: &Mesh) -> Result<()> {
    let (client, server) = (identity("client"), identity("server"));
    let mtls = [
        ("source_principal", client.as_str()),
        ("destination_principal", server.as_str()),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "tcp"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels = mtls.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    // client1 -> server2: reported by n1 as source and by n2 as destination.
    let cross = [
        ("source_workload", "client1"),
        ("destination_workload", "server2"),
    ];
    let src = with(&[&cross[..], &[("reporter", "source")]].concat());
    let dst = with(&[&cross[..], &[("reporter", "destination")]].concat());
    for name in [OPENED, CLOSED] {
        eventually_metric(mesh, "n1", name, &src, 1).await?;
        eventually_metric(mesh, "n2", name, &dst, 1).await?;
    }
    let payload = b"hello across nodes".len() as u64;
    eventually_metric(mesh, "n1", RECEIVED, &src, payload).await?;
    eventually_metric(mesh, "n2", RECEIVED, &dst, payload).await?;
    // client1 -> server1 (same node): both sides on n1.
    let same = [
        ("source_workload", "client1"),
        ("destination_workload", "server1"),
    ];
    for reporter in ["source", "destination"] {
        let labels = with(&[&same[..], &[("reporter", reporter)]].concat());
        eventually_metric(mesh, "n1", OPENED, &labels, 1).await?;
    }
    Ok(())
}

async fn service_vip_routes_to_an_endpoint(mesh: &Mesh) -> Result<()> {
    roundtrip(mesh, "client1", SocketAddr::from((VIP, 80)), b"via the vip").await?;
    let service = services()[0].hostname();
    let labels = [
        ("destination_service", service.as_str()),
        ("destination_workload", "server2"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let src = [&labels[..], &[("reporter", "source")]].concat();
    let dst = [&labels[..], &[("reporter", "destination")]].concat();
    eventually_metric(mesh, "n1", OPENED, &src, 1).await?;
    // The destination learns the service from the `forwarded` header's host.
    eventually_metric(mesh, "n2", OPENED, &dst, 1).await
}

async fn meshed_to_unmeshed_passes_through(mesh: &Mesh) -> Result<()> {
    roundtrip(
        mesh,
        "client1",
        at(mesh, "plain", APP_PORT),
        b"to an unmeshed pod",
    )
    .await?;
    let labels = [
        ("reporter", "source"),
        ("source_principal", &identity("client")[..]),
        ("destination_workload", "plain"),
        ("connection_security_policy", "unknown"),
    ];
    eventually_metric(mesh, "n1", OPENED, &labels, 1).await
}

/// tcpdump on the fabric bridge while a distinctive payload goes meshed (must never appear) and
/// unmeshed (must appear: proves the capture sees payloads at all).
async fn no_plaintext_on_the_node_link(mesh: &Mesh) -> Result<()> {
    let secret = format!("ZMESH-SECRET-{:016x}-", rand::random::<u64>());
    let control = format!("ZMESH-CONTROL-{:016x}-", rand::random::<u64>());
    let pcap = mesh.dir().join("fabric.pcap");
    let capture = Tcpdump::start(&mesh.fabric()?, "fab0", &pcap)?;
    let meshed = secret.repeat(4096);
    roundtrip(
        mesh,
        "client1",
        at(mesh, "server2", APP_PORT),
        meshed.as_bytes(),
    )
    .await?;
    let plain = control.repeat(64);
    roundtrip(
        mesh,
        "client1",
        at(mesh, "plain", APP_PORT),
        plain.as_bytes(),
    )
    .await?;
    // The control payload went last: once it is on disk, everything before it is too, unless the
    // kernel dropped packets, which tcpdump reports in its log.
    let bytes = capture.stop_after(control.as_bytes())?;
    ensure!(
        bytes.len() > meshed.len(),
        "capture holds only {} bytes; the meshed transfer alone was {} ({})",
        bytes.len(),
        meshed.len(),
        capture_log(&pcap)
    );
    ensure!(
        contains(&bytes, control.as_bytes()),
        "the unmeshed control payload is missing from the capture: the capture is not working ({})",
        capture_log(&pcap)
    );
    ensure!(
        !contains(&bytes, secret.as_bytes()),
        "the meshed payload crossed the node link in plaintext"
    );
    Ok(())
}

async fn config_dump_lists_pods_and_certificates(mesh: &Mesh) -> Result<()> {
    let dump = mesh.ztunnel("n1").config_dump().await?;
    let pods = dump["pods"].as_array().context("pods")?;
    let mut names: Vec<&str> = pods.iter().filter_map(|p| p["name"].as_str()).collect();
    names.sort();
    ensure!(names == ["client1", "server1"], "pods on n1: {names:?}");
    for pod in pods {
        let name = pod["name"].as_str().unwrap_or_default();
        let inode = netns::inode_of(&mesh.pod(name).open_netns()?)?;
        ensure!(pod["netns_inode"].as_u64() == Some(inode), "{name}: {pod}");
        ensure!(pod["state"] == "running", "{name}: {pod}");
    }
    let certs = dump["certificates"].as_array().context("certificates")?;
    for id in [identity("client"), identity("server")] {
        let cert = certs.iter().find(|c| c["identity"] == id.as_str());
        let cert = cert.with_context(|| format!("no certificate for {id}: {certs:?}"))?;
        ensure!(
            cert["state"] == "ready" && cert["expires"].is_string(),
            "{cert}"
        );
    }
    ensure!(
        dump["workloads"].as_array().map(Vec::len) == Some(5),
        "workloads: {}",
        dump["workloads"]
    );
    Ok(())
}

async fn removed_pod_loses_its_proxy(mesh: &Mesh) -> Result<()> {
    mesh.unenroll("client2").await?;
    // The capture rules stay, but nothing listens on 15001 in the pod any more.
    let ns = mesh.pod("client2").open_netns()?;
    let refused = apps::echo_roundtrip(&ns, at(mesh, "server1", APP_PORT), b"x").await;
    ensure!(
        refused.is_err(),
        "traffic of an unenrolled pod still flowed: {refused:?}"
    );
    let dump = mesh.ztunnel("n2").config_dump().await?;
    let pods = dump["pods"].as_array().context("pods")?;
    ensure!(
        pods.len() == 1 && pods[0]["name"] == "server2",
        "pods on n2: {pods:?}"
    );
    // Enrolling it again brings it back.
    mesh.enroll("client2").await?;
    roundtrip(
        mesh,
        "client2",
        at(mesh, "server1", APP_PORT),
        b"back again",
    )
    .await
}

async fn sigterm_drains_and_exits(mesh: &mut Mesh) -> Result<()> {
    let status = mesh
        .ztunnel_mut("n1")
        .terminate(DRAIN + Duration::from_secs(5))
        .await?;
    ensure!(status.success(), "ztunnel exited with {status}");
    let log = mesh.ztunnel("n1").log();
    ensure!(
        log.contains("shut down"),
        "no clean shutdown in the log:\n{log}"
    );
    // The listeners closed with the process: client1's traffic is refused now.
    let ns = mesh.pod("client1").open_netns()?;
    let after = apps::echo_roundtrip(&ns, at(mesh, "server2", APP_PORT), b"x").await;
    ensure!(after.is_err(), "traffic still flowed after ztunnel exited");
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `tcpdump -w` running inside a namespace.
struct Tcpdump {
    child: Child,
    file: PathBuf,
}

impl Tcpdump {
    fn start(ns: &std::fs::File, iface: &str, file: &Path) -> Result<Self> {
        let mut cmd = Command::new("tcpdump");
        // Immediate mode: without it the last partly filled ring block is lost at SIGINT. A 32 MiB
        // kernel buffer: on a busy 2-core runner the default 2 MiB overflows during the transfer.
        cmd.args(["-i", iface, "-n", "--immediate-mode", "-U", "-B", "32768"])
            .args(["-s", "0", "-w"])
            .arg(file);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(file.with_extension("log"))?);
        let child = netns::run_in_netns(ns, move || cmd.spawn())?.context("spawn tcpdump")?;
        // tcpdump prints "listening on" once the capture is attached.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !capture_log(file).contains("listening on") {
            ensure!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                capture_log(file)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            child,
            file: file.to_path_buf(),
        })
    }

    /// Waits (up to 10 s) until `last` is in the capture file, then stops tcpdump and returns the
    /// whole file. The packets are written as they arrive (`-U`), so waiting for the last payload
    /// sent means the capture has caught up instead of being cut short by the SIGINT.
    fn stop_after(mut self, last: &[u8]) -> Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !contains(&std::fs::read(&self.file).unwrap_or_default(), last)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        self.child.wait()?;
        Ok(std::fs::read(&self.file)?)
    }
}

/// What tcpdump printed: "listening on", and at exit its packet and drop counts.
fn capture_log(pcap: &Path) -> String {
    std::fs::read_to_string(pcap.with_extension("log"))
        .unwrap_or_default()
        .trim()
        .replace('\n', "; ")
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
