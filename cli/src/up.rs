//! `zmesh up` / `zmesh down`: a local cluster of real zmesh processes, traffic through it, and
//! what the mesh reported about that traffic.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_testbed::apps::{self, App};

use crate::localmesh::{
    self, Binaries, ECHO_PORT, HTTP_PORT, LocalMesh, LocalMeshError, MESHED_NAMESPACE, POLICY_NAME,
    SERVICE_APP, SERVICE_NAME, SERVICE_PORT, SERVICE_VIP, Sample, samples,
};

pub mod service;
mod xds;

const OPENED: &str = "istio_tcp_connections_opened_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";
const SENT: &str = "istio_tcp_sent_bytes_total";

/// Flags of `zmesh up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Run the flows, print the evidence and tear down instead of running until Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// Where cluster state (configs, logs, pidfile) lives.
    #[arg(long, env = "ZMESH_STATE_DIR", default_value = "/run/zmesh")]
    pub state_dir: PathBuf,
    /// The ztunnel binary [default: next to this executable].
    #[arg(long, env = "ZMESH_ZTUNNEL_BIN")]
    pub ztunnel_bin: Option<PathBuf>,
    /// The zmesh-cni binary [default: next to this executable].
    #[arg(long, env = "ZMESH_CNI_BIN")]
    pub cni_bin: Option<PathBuf>,
    /// The istiod-lite binary [default: next to this executable].
    #[arg(long, env = "ZMESH_ISTIOD_BIN")]
    pub istiod_bin: Option<PathBuf>,
}

/// Flags of `zmesh down`.
#[derive(Debug, Clone, clap::Args)]
pub struct DownArgs {
    /// The state directory `zmesh up` used.
    #[arg(long, env = "ZMESH_STATE_DIR", default_value = "/run/zmesh")]
    pub state_dir: PathBuf,
}

/// A flow the demo sends.
struct Flow {
    client: &'static str,
    server: &'static str,
    what: &'static str,
}

const FLOWS: [Flow; 4] = [
    Flow {
        client: "client1",
        server: "server2",
        what: "cross-node",
    },
    Flow {
        client: "client2",
        server: "server1",
        what: "cross-node",
    },
    Flow {
        client: "client1",
        server: "server1",
        what: "same node",
    },
    Flow {
        client: "client1",
        server: "plain",
        what: "to an unmeshed pod",
    },
];

/// Runs `zmesh up`.
pub async fn up(args: UpArgs) -> Result<(), LocalMeshError> {
    let bins = Binaries::locate(args.ztunnel_bin, args.cni_bin, args.istiod_bin)?;
    let layout = localmesh::default_layout();
    println!(
        "starting a local cluster: nodes {}; istiod-lite (CA + delta xDS) on {}:{}",
        layout.nodes.join(", "),
        localmesh::CA_IP,
        localmesh::CA_PORT
    );
    let mut mesh = LocalMesh::start(&args.state_dir, bins, &layout).await?;
    mesh.record_supervisor("zmesh up")?;
    print_layout(&mesh);
    let _apps = start_apps(&mesh)?;
    let report = evidence(&mesh).await;
    match &report {
        Ok(text) => print!("{text}"),
        Err(e) => eprintln!("flows failed: {e}"),
    }
    if !args.once && report.is_ok() {
        wait_for_signal(&mut mesh).await?;
    }
    println!("tearing down {}", mesh.cluster().base_name());
    mesh.shutdown();
    report.map(|_| ())
}

fn print_layout(mesh: &LocalMesh) {
    println!(
        "objects (Kubernetes YAML served by istiod-lite, watched by the node agents): {}",
        mesh.dir().join("config").join("cluster.yaml").display()
    );
    let objects = mesh.objects();
    for pod in mesh.pods() {
        let mode = if objects.captures(&pod.spec) {
            "ambient (captured)"
        } else {
            "not meshed"
        };
        println!(
            "  pod {:<8} {:<15} node {} ns {} sa {} app={} version={} — {mode}",
            pod.spec.name,
            pod.ip,
            pod.spec.node,
            pod.spec.namespace(),
            pod.spec.service_account,
            pod.spec.app,
            pod.spec.version,
        );
    }
    println!(
        "  service {SERVICE_NAME}.{MESHED_NAMESPACE} {SERVICE_VIP}:{SERVICE_PORT} -> port \
         \"http\" ({HTTP_PORT}) of app={SERVICE_APP}; AuthorizationPolicy {POLICY_NAME}: \
         port {HTTP_PORT} only from sa/client, port {ECHO_PORT} from anyone"
    );
}

fn start_apps(mesh: &LocalMesh) -> Result<Vec<App>, LocalMeshError> {
    let mut started = Vec::new();
    for name in ["server1", "server2", "plain"] {
        let ns = mesh.pod_netns(name)?;
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        started.push(apps::start_echo(&ns, any(ECHO_PORT))?);
        if name != "plain" {
            started.push(apps::start_http(&ns, any(HTTP_PORT), name)?);
        }
    }
    Ok(started)
}

/// Everything `zmesh up` shows: the config each ztunnel got over xDS, the flows with their
/// identities, load balancing over the Service VIP, and the policy at work.
pub async fn evidence(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let mut out = xds::config_evidence(mesh).await?;
    out.push_str(&run_flows(mesh).await?);
    out.push_str(&service::vip_evidence(mesh).await?);
    out.push_str(&service::policy_evidence(mesh).await?);
    Ok(out)
}

/// Sends every flow and describes what the apps and the ztunnels saw.
pub async fn run_flows(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let mut out = String::from("\ntraffic (TCP echo on port 8080 in server1, server2, plain):\n");
    for flow in &FLOWS {
        let client = mesh.pod(flow.client)?;
        let server = mesh.pod(flow.server)?;
        let payload = format!("hello from {} to {}", flow.client, flow.server);
        let dst = SocketAddr::from((server.ip, ECHO_PORT));
        let ns = mesh.pod_netns(flow.client)?;
        let reply = apps::echo_roundtrip(&ns, dst, payload.as_bytes())
            .await
            .map_err(|e| {
                LocalMeshError::Failed(format!("{} -> {} ({dst}): {e}", flow.client, flow.server))
            })?;
        let _ = writeln!(
            out,
            "\n{} ({}) -> {} ({dst}), {}: {} bytes echoed; the server app saw \
            the client as {}",
            flow.client,
            client.ip,
            flow.server,
            flow.what,
            reply.data.len(),
            reply.peer
        );
        let lines = flow_metrics(mesh, flow, payload.len() as u64).await?;
        out.push_str(&lines);
    }
    Ok(out)
}

/// The ztunnel metrics of one flow, on the client's node (source) and, for meshed servers, the
/// server's node (destination).
async fn flow_metrics(mesh: &LocalMesh, flow: &Flow, bytes: u64) -> Result<String, LocalMeshError> {
    let client = mesh.pod(flow.client)?;
    let server = mesh.pod(flow.server)?;
    let mut reporters = vec![("source", client.spec.node.clone())];
    if server.spec.meshed {
        reporters.push(("destination", server.spec.node.clone()));
    }
    let mut out = String::new();
    for (reporter, node) in reporters {
        let labels = [
            ("reporter", reporter),
            ("source_workload", flow.client),
            ("destination_workload", flow.server),
        ];
        let (sample, received, sent) = wait_flow_sample(mesh, &node, &labels, bytes).await?;
        let policy = sample.label("connection_security_policy");
        let note = if policy == "mutual_tls" {
            ""
        } else {
            " (passed through as plain TCP)"
        };
        let _ = writeln!(
            out,
            "  ztunnel {node} [reporter={reporter}] source_principal={} \
            destination_principal={} connection_security_policy={policy}{note} \
            response_flags={} connections_opened={} bytes client->server={received} \
            server->client={sent}",
            sample.label("source_principal"),
            sample.label("destination_principal"),
            sample.label("response_flags"),
            sample.value
        );
    }
    Ok(out)
}

async fn wait_flow_sample(
    mesh: &LocalMesh,
    node: &str,
    labels: &[(&str, &str)],
    bytes: u64,
) -> Result<(Sample, u64, u64), LocalMeshError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = mesh.metrics(node).await?;
        let opened = samples(&text, OPENED)
            .into_iter()
            .find(|s| s.matches(labels));
        let received = localmesh::metric(&text, RECEIVED, labels);
        if let Some(sample) = opened.filter(|_| received >= bytes) {
            return Ok((sample, received, localmesh::metric(&text, SENT, labels)));
        }
        if Instant::now() > deadline {
            return Err(LocalMeshError::Failed(format!(
                "ztunnel on {node} reported no connection {labels:?} carrying {bytes} bytes; \
                 metrics:\n{text}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_signal(mesh: &mut LocalMesh) -> Result<(), LocalMeshError> {
    println!("\nthe mesh is running; logs:");
    for (name, path) in mesh.logs() {
        println!("  {name:<16} {}", path.display());
    }
    for (node, ns) in mesh.node_netns() {
        println!(
            "  node {node}: ip netns exec {ns} curl -s 127.0.0.1:15000/metrics (ztunnel), \
            127.0.0.1:8000/status (agent)"
        );
    }
    println!("press Ctrl-C (or send SIGTERM) to tear it down");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| LocalMeshError::Io {
            context: "installing a SIGTERM handler".into(),
            source: e,
        })?;
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = check.tick() => {
                let dead = mesh.exited();
                if !dead.is_empty() {
                    return Err(LocalMeshError::Failed(dead.join("; ")));
                }
            }
        }
    }
}

/// Runs `zmesh down`.
pub fn down(args: &DownArgs) -> Result<(), LocalMeshError> {
    let done = localmesh::down(&args.state_dir)?;
    if done.is_empty() {
        println!("nothing to clean up");
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
