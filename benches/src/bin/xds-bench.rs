//! `xds-bench`: the control plane at scale, in one process over real gRPC + TLS on loopback.
//!
//! istiod-lite (CA + delta ADS, its translation pipeline fed snapshots directly, as a source
//! would) runs on its own runtime whose threads are named `istiod`; ztunnel's real xDS clients run
//! on another (`client`), so each side's CPU is read from its own threads.
//!
//! Scenarios (issue #4 targets in brackets):
//! 1. A new ztunnel receives and applies the full snapshot of 10 000 workloads and 1 000
//!    services [≤ 200 ms].
//! 2. One pod change fanned out to 100 connected clients, from the new snapshot entering the
//!    pipeline to each client's store holding it [p99 ≤ 50 ms].
//! 3. istiod-lite CPU at 50 pod changes/s with the 100 clients connected [≤ 0.5 vCPU].
//! 4. ztunnel memory per workload [≤ 2 KB]: RSS growth of a child process (this binary in
//!    `--client-only` mode: one real xDS client and its store) from start to synced.
//! 5. CA certificates per second end to end: CSR generation, gRPC + TLS, signing, response
//!    validation [≥ 5 000/s].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use istiod_lite::app::Bound;
use istiod_lite::config::{self, Config};
use istiod_lite::source;
use istiod_lite::translate::TranslateConfig;
use mesh_benches::stats::{median, percentile};
use mesh_core::Identity;
use mesh_core::ca_client::{AuthToken, CaClient, CaClientConfig};
use mesh_core::k8s::{Object, Snapshot, parse_documents};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ztunnel::readiness::Readiness;
use ztunnel::state::SharedStore;
use ztunnel::xds::{NodeIdentity, XdsClient, XdsClientConfig, XdsMetrics};

const ZTUNNEL_TOKEN: &str = "bench-ztunnel-token-7f3a9c2e5b1d";
const CLIENT_TOKEN: &str = "bench-workload-token-4c8e1a7d9f2b";

#[derive(Parser, Debug)]
#[command(about = "control-plane scale: snapshot, fan-out, CPU, memory, CA rate")]
struct Args {
    /// Workloads (pods) in the snapshot.
    #[arg(long, default_value_t = 10_000)]
    workloads: usize,
    /// Services (each selecting workloads / services pods).
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    /// Connected clients for the fan-out and CPU runs.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Pod changes measured in the fan-out run.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Pod changes per second of the CPU run.
    #[arg(long, default_value_t = 50)]
    change_rate: u64,
    /// Seconds of the CPU run.
    #[arg(long, default_value_t = 10)]
    cpu_secs: u64,
    /// Seconds of the CA run.
    #[arg(long, default_value_t = 5)]
    ca_secs: u64,
    /// Concurrent CA callers.
    #[arg(long, default_value_t = 64)]
    ca_concurrency: usize,
    /// Print each fan-out round: when istiod-lite published, when the first and the last
    /// client held the change.
    #[arg(long)]
    show_rounds: bool,
    /// Internal: run one xDS client against `address` (root PEM file, expected resource count)
    /// and print its RSS before and after syncing.
    #[arg(long, num_args = 3, value_names = ["ADDRESS", "ROOT_PEM", "RESOURCES"], hide = true)]
    client_only: Option<Vec<String>>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(spec) = &args.client_only {
        return client_only(spec);
    }
    let istiod = runtime("istiod")?;
    let clients = runtime("client")?;
    let cluster = Cluster::new(args.workloads, args.services);
    let dir = tempfile::tempdir()?;
    let cp = istiod.block_on(ControlPlane::start(dir.path(), cluster.snapshot(0)))?;
    println!(
        "xds-bench: {} workloads, {} services, load {}",
        args.workloads,
        args.services,
        loadavg()
    );
    let target = args.workloads + args.services;
    let store = store_memory(&cp, dir.path(), target)?;
    let mut snapshot_ms = Vec::new();
    for _ in 0..5 {
        snapshot_ms.push(clients.block_on(full_snapshot(&cp, target))?.as_secs_f64() * 1e3);
    }
    // Before the 100 clients connect, so their streams cannot slow it down.
    let certs = clients.block_on(ca_rate(&cp, &args))?;
    let connected = clients.block_on(connect_many(&cp, args.clients, target))?;
    let (fanout, mut publish) = clients.block_on(fan_out(&cp, &cluster, &connected, &args))?;
    let cpu = clients.block_on(cpu_at_rate(&cp, &cluster, &args))?;
    drop(connected);
    let publish_p50 = percentile(&mut publish, 50.0);
    report(&args, store, &mut snapshot_ms, fanout, cpu, certs);
    println!(
        "(fan-out breakdown: istiod-lite published the changed resource set after p50 {publish_p50:?}; the rest is the push debounce, the push and the clients applying it)"
    );
    istiod.block_on(async { cp.bound.shutdown_handle().cancel() });
    Ok(())
}

fn runtime(name: &'static str) -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// The generated cluster: `ns-<i>` namespaces of 100 pods, services selecting 10 pods each.
/// Objects are parsed once; a changed snapshot shares every unchanged object with the previous
/// one, as the real sources do (only a changed file or watch event yields a new object).
struct Cluster {
    base: Vec<Object>,
    pods: Vec<Object>,
    per_svc: usize,
}

impl Cluster {
    fn new(workloads: usize, services: usize) -> Self {
        let mut yaml = String::new();
        let per_svc = workloads.div_ceil(services.max(1)).max(1);
        for ns in 0..workloads.div_ceil(100) {
            yaml += &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{ns}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n"
            );
        }
        for i in 0..services {
            let (ns, a, b) = (i * per_svc / 100, 96 + i / 65_536 % 4, i % 65_536);
            yaml += &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\nspec: {{clusterIP: 10.{a}.{}.{}, selector: {{svc: s{i}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n",
                b / 256,
                b % 256
            );
        }
        let base = parse_documents(&yaml).expect("generated yaml").objects;
        let pods: String = (0..workloads)
            .map(|i| pod_yaml(i, i / per_svc, 0))
            .collect();
        let pods = parse_documents(&pods).expect("generated pods").objects;
        Self {
            base,
            pods,
            per_svc,
        }
    }

    /// The snapshot with pod `changed`'s revision label set to `rev` (0 = untouched).
    fn snapshot_with(&self, changed: usize, rev: usize) -> Snapshot {
        let mut objects = self.base.clone();
        objects.extend(self.pods.iter().enumerate().map(|(i, pod)| {
            if i == changed && rev > 0 {
                let text = pod_yaml(i, i / self.per_svc, rev);
                parse_documents(&text)
                    .expect("generated pod")
                    .objects
                    .remove(0)
            } else {
                pod.clone()
            }
        }));
        Snapshot::from_objects(objects)
    }

    fn snapshot(&self, rev: usize) -> Snapshot {
        self.snapshot_with(usize::MAX, rev)
    }
}

fn pod_yaml(i: usize, svc: usize, rev: usize) -> String {
    let ip = 0x0a00_0000u32 + 0x0001_0000 + i as u32;
    let ip = Ipv4Addr::from(ip);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{i}, namespace: ns-{}, labels: {{svc: s{svc}, app: app-{svc}, version: v{rev}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{svc}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\n",
        i / 100,
        i % 50
    )
}

/// istiod-lite with the snapshot feed in the bench's hands.
struct ControlPlane {
    bound: Bound,
    feed: watch::Sender<Arc<Snapshot>>,
    root_pem: String,
    address: String,
    _stop: CancellationToken,
}

impl ControlPlane {
    async fn start(dir: &Path, first: Snapshot) -> Result<Self> {
        let tokens = dir.join("tokens.yaml");
        std::fs::write(
            &tokens,
            format!(
                "tokens:\n  {ZTUNNEL_TOKEN}: {{identity: \"spiffe://cluster.local/ns/istio-system/sa/ztunnel\", node: node-0}}\n  {CLIENT_TOKEN}: {{identity: \"spiffe://cluster.local/ns/bench/sa/client\"}}\n"
            ),
        )?;
        let settings: HashMap<String, String> = [
            (config::GRPC_ADDR, "127.0.0.1:0".to_string()),
            (config::CA_DIR, dir.join("ca").display().to_string()),
            (
                config::ROOT_CERT_OUT,
                dir.join("root.pem").display().to_string(),
            ),
            (config::TOKENS_FILE, tokens.display().to_string()),
            (config::LOG, "warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bound = istiod_lite::app::build(Config::from_source(&settings)?).await?;
        let root_pem = std::fs::read_to_string(bound.root_cert_path())?;
        let address = format!("https://{}", bound.grpc_address());
        let (feed, snapshots) = watch::channel(Arc::new(first));
        let stop = CancellationToken::new();
        let resources = bound.resources();
        tokio::spawn(source::publish(
            snapshots,
            TranslateConfig::default(),
            resources,
            stop.clone(),
        ));
        Ok(Self {
            bound,
            feed,
            root_pem,
            address,
            _stop: stop,
        })
    }

    fn client_side(&self) -> ClientSide {
        ClientSide {
            address: self.address.clone(),
            root_pem: self.root_pem.clone(),
        }
    }
}

/// What an xDS client needs to reach the control plane.
struct ClientSide {
    address: String,
    root_pem: String,
}

impl ClientSide {
    fn config(&self, i: usize) -> XdsClientConfig {
        let node = NodeIdentity {
            pod_name: format!("ztunnel-{i}"),
            pod_namespace: "istio-system".into(),
            instance_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            node_name: Some(format!("node-{}", i % 50)),
            cluster_id: "Kubernetes".into(),
        };
        let mut cfg = XdsClientConfig::new(&self.address, &self.root_pem, node);
        cfg.token = AuthToken::Literal(ZTUNNEL_TOKEN.into());
        cfg.tls_server_name = Some("localhost".into());
        cfg
    }
}

/// A running xDS client and its store.
struct Client {
    store: Arc<SharedStore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_client(cp: &ControlPlane, i: usize) -> Result<(Client, Readiness)> {
    start_client_with(cp.client_side().config(i)).await
}

async fn start_client_with(config: XdsClientConfig) -> Result<(Client, Readiness)> {
    let store = Arc::new(SharedStore::default());
    let readiness = Readiness::default();
    let metrics = XdsMetrics::new(Arc::new(metrics::NoopRecorder));
    let client = XdsClient::new(config, store.clone(), &readiness, metrics)?;
    let task = tokio::spawn(client.run());
    Ok((Client { store, task }, readiness))
}

async fn wait_full(client: &Client, readiness: &Readiness, target: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (w, s) = client.store.snapshot().len();
        if readiness.is_ready() && w + s >= target {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "client not synced after 60 s ({w} + {s})"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Time from a new client's start to its store holding the whole snapshot.
async fn full_snapshot(cp: &ControlPlane, target: usize) -> Result<Duration> {
    let start = Instant::now();
    let (client, readiness) = start_client(cp, 0).await?;
    wait_full(&client, &readiness, target).await?;
    Ok(start.elapsed())
}

/// Memory growth per resource of a separate process running one real xDS client (the ztunnel
/// crate's) from before its first connection to fully synced: (anonymous memory, whole RSS).
///
/// Anonymous memory (heap, stacks) is what the resources cost. RSS also counts the pages of the
/// binary's code that syncing touches for the first time: a fixed cost, clean and shared, that
/// divided by the resource count looks like hundreds of bytes each.
fn store_memory(cp: &ControlPlane, dir: &Path, target: usize) -> Result<StoreMemory> {
    let root = dir.join("root-for-client.pem");
    std::fs::write(&root, &cp.root_pem)?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("--client-only")
        .args([
            cp.address.as_str(),
            &root.display().to_string(),
            &target.to_string(),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "client process failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    anyhow::ensure!(v.len() == 4, "unexpected client output {text:?}");
    let per = |from: f64, to: f64| (to - from) / target as f64;
    Ok(StoreMemory {
        anon: per(v[2], v[3]),
        rss: per(v[0], v[1]),
    })
}

/// Bytes per resource.
struct StoreMemory {
    anon: f64,
    rss: f64,
}

fn client_only(spec: &[String]) -> Result<()> {
    let [address, root, target] = spec else {
        anyhow::bail!("--client-only needs 3 values")
    };
    let target: usize = target.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cp = ClientSide {
            address: address.clone(),
            root_pem: std::fs::read_to_string(root)?,
        };
        // Warm the runtime, TLS and the allocator with a tiny process baseline first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let me = std::process::id();
        let before = mesh_benches::stats::rss_bytes();
        let anon_before = mesh_benches::stats::process_anon_bytes(me);
        let (client, readiness) = start_client_with(cp.config(9_999)).await?;
        wait_full(&client, &readiness, target).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = mesh_benches::stats::rss_bytes();
        let anon_after = mesh_benches::stats::process_anon_bytes(me);
        println!("{before} {after} {anon_before} {anon_after}");
        anyhow::Ok(())
    })
}

async fn connect_many(cp: &ControlPlane, n: usize, target: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let (client, readiness) = start_client(cp, i).await?;
        clients.push((client, readiness));
    }
    for (client, readiness) in &clients {
        wait_full(client, readiness, target).await?;
    }
    Ok(clients.into_iter().map(|(c, _)| c).collect())
}

fn revision_of(store: &SharedStore, uid: &str) -> Option<String> {
    store
        .snapshot()
        .workload(uid)
        .map(|w| w.canonical_revision.to_string())
}

/// Latencies from publishing a snapshot with one changed pod to each client holding it.
async fn fan_out(
    cp: &ControlPlane,
    cluster: &Cluster,
    clients: &[Client],
    args: &Args,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (mut latencies, mut publish) = (Vec::new(), Vec::new());
    for round in 1..=args.changes {
        let pod = (round * 7919) % cluster.pods.len();
        let uid = format!("Kubernetes//Pod/ns-{}/pod-{pod}", pod / 100);
        let want = format!("v{round}");
        let next = Arc::new(cluster.snapshot_with(pod, round));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut feed = cp.bound.resources().subscribe();
        feed.mark_unchanged();
        let start = Instant::now();
        // Keep the replaced snapshot: dropping 10 000 pods must not count as propagation time.
        let _old = cp.feed.send_replace(next);
        let mut published = false;
        let mut pending: Vec<&Client> = clients.iter().collect();
        let deadline = start + Duration::from_secs(10);
        while !pending.is_empty() {
            if !published && feed.has_changed().unwrap_or(false) {
                published = true;
                publish.push(start.elapsed());
            }
            pending.retain(|c| {
                let done = revision_of(&c.store, &uid).as_deref() == Some(want.as_str());
                if done {
                    latencies.push(start.elapsed());
                }
                !done
            });
            if pending.is_empty() && args.show_rounds {
                let this = &latencies[latencies.len() - clients.len()..];
                let ms = |d: Option<&Duration>| {
                    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                };
                eprintln!(
                    "round {round}: published after {}, first client {}, last client {}",
                    ms(publish.last()),
                    ms(this.iter().min()),
                    ms(this.iter().max())
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} clients missed change {round}",
                pending.len()
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    Ok((latencies, publish))
}

/// istiod-lite vCPU (its threads only) while pods change at `change_rate` per second.
async fn cpu_at_rate(cp: &ControlPlane, cluster: &Cluster, args: &Args) -> Result<f64> {
    // Pre-build the snapshots so building them does not compete with the measurement.
    let n = (args.change_rate * args.cpu_secs) as usize;
    let snapshots: Vec<Arc<Snapshot>> = (0..n.min(64))
        .map(|i| Arc::new(cluster.snapshot_with((i * 131) % cluster.pods.len(), 1000 + i)))
        .collect();
    let cpu0 = thread_cpu("istiod");
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.change_rate as f64));
    for i in 0..n {
        ticker.tick().await;
        cp.feed.send_replace(snapshots[i % snapshots.len()].clone());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((thread_cpu("istiod") - cpu0).as_secs_f64() / start.elapsed().as_secs_f64())
}

/// Certificates per second: `ca_concurrency` callers, each generating a CSR and calling the CA.
async fn ca_rate(cp: &ControlPlane, args: &Args) -> Result<f64> {
    let identity: Identity = "spiffe://cluster.local/ns/bench/sa/client".parse()?;
    let mut config = CaClientConfig::new(&cp.address, &cp.root_pem);
    config.token = AuthToken::Literal(CLIENT_TOKEN.into());
    config.tls_server_name = Some("localhost".into());
    // A few connections, as a few ztunnels would hold.
    let clients: Vec<Arc<CaClient>> = (0..4)
        .map(|_| CaClient::new(config.clone()).map(Arc::new))
        .collect::<Result<_, _>>()?;
    let issued = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.ca_secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..args.ca_concurrency)
        .map(|i| {
            let (client, identity, issued) = (
                clients[i % clients.len()].clone(),
                identity.clone(),
                issued.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    client
                        .create_certificate(&identity)
                        .await
                        .context("ca call")?;
                    issued.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(issued.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// CPU time of this process's threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> Duration {
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += ticks(11) + ticks(12);
    }
    Duration::from_millis(total * 10)
}

fn report(
    args: &Args,
    store: StoreMemory,
    snapshot_ms: &mut [f64],
    mut fanout: Vec<Duration>,
    cpu: f64,
    certs: f64,
) {
    let p = |v: &mut Vec<Duration>, q| percentile(v, q).as_secs_f64() * 1e3;
    let snap_max = snapshot_ms.iter().cloned().fold(0.0, f64::max);
    println!("\n| scenario | measured | target |\n|---|---|---|");
    println!(
        "| full snapshot to a new ztunnel ({} workloads + {} services) | median {:.0} ms, max {snap_max:.0} ms (5 runs) | ≤ 200 ms |",
        args.workloads,
        args.services,
        median(snapshot_ms)
    );
    println!(
        "| one pod change → {} clients | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes) | p99 ≤ 50 ms |",
        args.clients,
        p(&mut fanout, 50.0),
        p(&mut fanout, 99.0),
        p(&mut fanout, 100.0),
        args.changes
    );
    println!(
        "| istiod-lite CPU at {} pod changes/s, {} clients | {cpu:.2} vCPU | ≤ 0.5 vCPU |",
        args.change_rate, args.clients
    );
    // The whole growth (services included) charged to the workloads: the stricter reading.
    let per_workload = (args.workloads + args.services) as f64 / args.workloads.max(1) as f64;
    println!(
        "| ztunnel memory per workload (growth of a process holding one synced xDS client, all of it ÷ {} workloads) | anonymous {:.0} B ({:.0} B per resource); RSS {:.0} B | ≤ 2 KB |",
        args.workloads,
        store.anon * per_workload,
        store.anon,
        store.rss * per_workload,
    );
    println!(
        "| CA certificates/s end to end ({} callers) | {certs:.0} | ≥ 5 000 |",
        args.ca_concurrency
    );
    println!("(load {})", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
