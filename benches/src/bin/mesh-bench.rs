//! `mesh-bench`: the ztunnel pair on the netns testbed against direct pod-to-pod traffic, in one
//! run.
//!
//! Two nodes, each with a meshed and an unmeshed pod. The meshed client on node `n1` talks to the
//! meshed server on `n2` through both ztunnels (captured on 15001, HBONE between the nodes,
//! delivered from 15008); the unmeshed pair uses the same nodes and links without the mesh. Every
//! scenario runs on both paths back to back, and the mesh path is checked to have been carried by
//! ztunnel (its byte counters), because uncaptured traffic would succeed too.
//!
//! Needs root and network namespaces: run it inside the sandbox, with a release `ztunnel` next to
//! it (see `benches/README.md`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use mesh_benches::app;
use mesh_benches::stats::{
    median, percentile, process_anon_bytes, process_cpu_time, process_rss_bytes,
};
use mesh_testbed::{NetnsTask, Pod, apps};
use mesh_tests::mesh::{Mesh, PodSpec, metric};
use tokio::net::TcpStream;

const APP_PORT: u16 = 9000;
const NODES: [&str; 2] = ["n1", "n2"];

#[derive(Parser, Debug, Clone)]
#[command(about = "ztunnel pair vs direct pod-to-pod on the netns testbed")]
struct Args {
    /// MiB sent per bulk run.
    #[arg(long, default_value_t = 2048)]
    bulk_mib: u64,
    /// Bulk runs per path (median reported; one extra warm-up run is discarded).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sequential 1 KiB round trips measured per path (after 2 000 warm-up ones).
    #[arg(long, default_value_t = 20_000)]
    rtts: usize,
    /// Seconds of the connection-rate runs.
    #[arg(long, default_value_t = 5)]
    conn_secs: u64,
    /// Client loops opening connections concurrently.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests per second of the open-loop run.
    #[arg(long, default_value_t = 1000)]
    rps: u64,
    /// Seconds of the open-loop run.
    #[arg(long, default_value_t = 5)]
    rps_secs: u64,
    /// Paths to run (comma list of `direct`, `mesh`).
    #[arg(long, value_delimiter = ',', default_value = "direct,mesh")]
    only: Vec<String>,
    /// Idle proxied connections held for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
}

/// One path under test: a client pod and the server it talks to.
struct Path {
    name: &'static str,
    client: Pod,
    server: SocketAddr,
    meshed: bool,
}

/// The two ztunnel processes (client node first).
#[derive(Clone, Copy)]
struct Ztunnels([u32; 2]);

impl Ztunnels {
    fn cpu(&self) -> Duration {
        self.0.iter().map(|p| process_cpu_time(*p)).sum()
    }

    fn rss(&self) -> [u64; 2] {
        self.0.map(process_rss_bytes)
    }

    /// Each ztunnel's anonymous (heap, stacks) resident memory.
    fn anon(&self) -> [u64; 2] {
        self.0.map(process_anon_bytes)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    raise_fd_limit()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

// 1 000 idle connections need ~2 000 descriptors in this process (client and server apps) and
// more in each ztunnel, which inherits the limit.
fn raise_fd_limit() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")
}

async fn run(args: Args) -> Result<()> {
    let pods = [
        pod("mclient", "n1", "client", true),
        pod("mserver", "n2", "server", true),
        pod("dclient", "n1", "client", false),
        pod("dserver", "n2", "server", false),
    ];
    let mesh = Mesh::start(&NODES, &pods, &[]).await?;
    let zt = Ztunnels([pid(&mesh, "n1")?, pid(&mesh, "n2")?]);
    let _servers = [serve(&mesh, "mserver")?, serve(&mesh, "dserver")?];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = zt.rss();
    let idle_anon = zt.anon();
    let paths = [
        path(&mesh, "direct", "dclient", "dserver", false),
        path(&mesh, "mesh", "mclient", "mserver", true),
    ];
    println!(
        "mesh-bench: 2 nodes, ztunnel pids {:?}, load {}",
        zt.0,
        loadavg()
    );
    // Memory first, on fresh processes: after the bulk runs the heap holds freed buffers that
    // would blur the per-connection figure either way.
    let held = idle_conns(&paths[1], args.idle, zt).await?;
    let mut report = Report::default();
    for p in paths
        .iter()
        .filter(|p| args.only.iter().any(|o| o == p.name))
    {
        let carried0 = carried_bytes(&mesh).await?;
        report.add(p, "1-stream Gbit/s", bulk(p, &args, 1, zt).await?);
        report.add(p, "4-stream Gbit/s", bulk(p, &args, 4, zt).await?);
        check_carried(&mesh, p, carried0, args.bulk_mib << 20).await?;
        report.add(p, "1 KiB RTT", rtt(p, &args, zt).await?);
        report.add(p, "open loop", open_loop(p, &args, zt).await?);
        report.add(p, "new conns/s", conn_rate(p, &args).await?);
    }
    report.print(idle_rss, held, args.idle, &args);
    println!(
        "ztunnel anonymous memory idle: n1 {:.1} MiB, n2 {:.1} MiB (the rest of RSS is the binary's mapped pages)",
        idle_anon[0] as f64 / 1048576.0,
        idle_anon[1] as f64 / 1048576.0
    );
    Ok(())
}

fn pod(name: &'static str, node: &'static str, sa: &'static str, meshed: bool) -> PodSpec {
    PodSpec {
        name,
        node,
        service_account: sa,
        meshed,
    }
}

fn pid(mesh: &Mesh, node: &str) -> Result<u32> {
    mesh.ztunnel(node).pid().context("ztunnel not running")
}

fn path(mesh: &Mesh, name: &'static str, client: &str, server: &str, meshed: bool) -> Path {
    Path {
        name,
        client: mesh.pod(client).clone(),
        server: SocketAddr::new(mesh.pod(server).ip().into(), APP_PORT),
        meshed,
    }
}

/// Starts the bench app server inside a pod (one thread, as a single-process app would).
fn serve(mesh: &Mesh, name: &str) -> Result<NetnsTask<()>> {
    let addr = SocketAddr::new(mesh.pod(name).ip().into(), APP_PORT);
    let listener = apps::bind_tcp(&mesh.pod(name).open_netns()?, addr)?;
    Ok(mesh.pod(name).spawn(move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(app::serve(s));
        }
    })?)
}

/// Runs `f` on a new thread inside the client pod and waits for its result.
async fn in_client<F, Fut, T>(p: &Path, f: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>> + 'static,
    T: Send + 'static,
{
    p.client.spawn(f)?.wait().await?
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Median Gbit/s over `runs` transfers of `bulk_mib` split over `streams` connections, plus the
/// ztunnels' CPU-seconds per GB.
async fn bulk(p: &Path, args: &Args, streams: u64, zt: Ztunnels) -> Result<Measure> {
    let total = args.bulk_mib << 20;
    let (mut gbps, mut cpu) = (Vec::new(), Vec::new());
    for i in 0..=args.runs {
        let cpu0 = zt.cpu();
        let start = Instant::now();
        let transfers = (0..streams).map(|_| {
            let server = p.server;
            in_client(p, move || async move {
                Ok(app::bulk(connect(server).await?, total / streams).await?)
            })
        });
        futures::future::try_join_all(transfers).await?;
        let took = start.elapsed().as_secs_f64();
        if i > 0 {
            gbps.push(total as f64 * 8.0 / took / 1e9);
            cpu.push((zt.cpu() - cpu0).as_secs_f64() / (total as f64 / 1e9));
        }
    }
    Ok(Measure::Bulk {
        gbps: median(&mut gbps),
        cpu_s_per_gb: median(&mut cpu),
    })
}

/// Sequential 1 KiB round trips on one connection: p50/p99 and ztunnel CPU per 1 000.
async fn rtt(p: &Path, args: &Args, zt: Ztunnels) -> Result<Measure> {
    let (server, n) = (p.server, args.rtts);
    let cpu0 = zt.cpu();
    let mut rtts = in_client(p, move || async move {
        Ok(app::echo_rtts(connect(server).await?, 2_000, n).await?)
    })
    .await?;
    let cpu = (zt.cpu() - cpu0).as_secs_f64() / (n + 2_000) as f64 * 1_000.0;
    Ok(Measure::Latency {
        p50_us: percentile(&mut rtts, 50.0).as_secs_f64() * 1e6,
        p99_us: percentile(&mut rtts, 99.0).as_secs_f64() * 1e6,
        cpu_ms_per_1000: cpu * 1e3,
    })
}

/// 1 KiB requests at a fixed rate on one connection: latency and each ztunnel's vCPU.
async fn open_loop(p: &Path, args: &Args, zt: Ztunnels) -> Result<Measure> {
    let (server, rps, secs) = (p.server, args.rps, args.rps_secs);
    let cpu0 = zt.0.map(process_cpu_time);
    let start = Instant::now();
    let mut lat = in_client(
        p,
        move || async move { paced_echo(server, rps, secs).await },
    )
    .await?;
    let wall = start.elapsed().as_secs_f64();
    let vcpu = [0, 1].map(|i| (process_cpu_time(zt.0[i]) - cpu0[i]).as_secs_f64() / wall);
    Ok(Measure::OpenLoop {
        p50_us: percentile(&mut lat, 50.0).as_secs_f64() * 1e6,
        p99_us: percentile(&mut lat, 99.0).as_secs_f64() * 1e6,
        vcpu,
    })
}

/// Paced by the client thread's own `nanosleep` (tens of µs of slack) with blocking I/O: tokio's
/// timer wheel has 1 ms granularity, which at 1 000 rps would put its own lateness (up to a whole
/// interval) into every sample.
async fn paced_echo(server: SocketAddr, rps: u64, secs: u64) -> Result<Vec<Duration>> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(server).with_context(|| format!("connect {server}"))?;
    s.set_nodelay(true)?;
    s.write_all(b"E")?;
    let (out, mut back) = ([0x42u8; app::MSG], [0u8; app::MSG]);
    let interval = Duration::from_secs_f64(1.0 / rps as f64);
    let n = rps * secs;
    let mut lat = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        // From the send, unless the schedule slipped by more than an interval (then from the due
        // time, so a stall is not hidden by the requests it delayed).
        let from = if sent.duration_since(due) > interval {
            due
        } else {
            sent
        };
        lat.push(from.elapsed());
    }
    Ok(lat)
}

/// New connections per second, each a 1-byte exchange, from `concurrency` client loops.
async fn conn_rate(p: &Path, args: &Args) -> Result<Measure> {
    let (server, secs, conc) = (p.server, args.conn_secs, args.concurrency);
    let n = in_client(p, move || async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let loops = (0..conc).map(|_| async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                app::ping(connect(server).await?).await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
        Ok(futures::future::try_join_all(loops)
            .await?
            .iter()
            .sum::<u64>())
    })
    .await?;
    Ok(Measure::Rate(n as f64 / secs as f64))
}

/// Opens `n` idle connections through the mesh and reports each ztunnel's RSS while they are
/// held (the measurement happens inside the client task, before it closes them).
async fn idle_conns(p: &Path, n: usize, zt: Ztunnels) -> Result<[u64; 2]> {
    let server = p.server;
    in_client(p, move || async move {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(app::idle(connect(server).await?).await?);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(zt.rss())
    })
    .await
}

/// Bytes the client node's ztunnel reports having carried (sent + received).
async fn carried_bytes(mesh: &Mesh) -> Result<u64> {
    let text = mesh.ztunnel("n1").metrics().await?;
    Ok(metric(&text, "istio_tcp_sent_bytes_total", &[])
        + metric(&text, "istio_tcp_received_bytes_total", &[]))
}

async fn check_carried(mesh: &Mesh, p: &Path, before: u64, expected: u64) -> Result<()> {
    let carried = carried_bytes(mesh).await? - before;
    if p.meshed {
        ensure!(
            carried >= expected,
            "mesh path: ztunnel carried only {carried} bytes; traffic was not captured"
        );
    } else {
        ensure!(
            carried < expected / 100,
            "direct path: ztunnel carried {carried} bytes; it should not see this traffic"
        );
    }
    Ok(())
}

enum Measure {
    Bulk {
        gbps: f64,
        cpu_s_per_gb: f64,
    },
    Latency {
        p50_us: f64,
        p99_us: f64,
        cpu_ms_per_1000: f64,
    },
    OpenLoop {
        p50_us: f64,
        p99_us: f64,
        vcpu: [f64; 2],
    },
    Rate(f64),
}

#[derive(Default)]
struct Report {
    rows: Vec<(&'static str, &'static str, Measure)>,
}

impl Report {
    fn add(&mut self, p: &Path, what: &'static str, m: Measure) {
        eprintln!("  {:<6} {what}: {}", p.name, describe(&m, p.meshed));
        self.rows.push((p.name, what, m));
    }

    fn print(&self, idle: [u64; 2], held: [u64; 2], n: usize, args: &Args) {
        println!("\n| scenario | direct | mesh | mesh − direct / ratio |\n|---|---|---|---|");
        for what in [
            "1-stream Gbit/s",
            "4-stream Gbit/s",
            "1 KiB RTT",
            "open loop",
            "new conns/s",
        ] {
            let get = |path| {
                self.rows
                    .iter()
                    .find(|r| r.0 == path && r.1 == what)
                    .map(|r| &r.2)
            };
            if let (Some(d), Some(m)) = (get("direct"), get("mesh")) {
                println!(
                    "| {what} | {} | {} | {} |",
                    describe(d, false),
                    describe(m, true),
                    compare(d, m)
                );
            }
        }
        let kib = |b: u64| b as f64 / 1024.0;
        let per_conn = [0, 1].map(|i| kib(held[i].saturating_sub(idle[i])) / n as f64);
        println!(
            "\nztunnel RSS idle: n1 {:.1} MiB, n2 {:.1} MiB; with {n} idle proxied connections: n1 {:.1} MiB, n2 {:.1} MiB → {:.2} / {:.2} KiB per connection per ztunnel",
            kib(idle[0]) / 1024.0,
            kib(idle[1]) / 1024.0,
            kib(held[0]) / 1024.0,
            kib(held[1]) / 1024.0,
            per_conn[0],
            per_conn[1]
        );
        println!(
            "(bulk {} MiB × {} runs, {} RTTs, {} s at {} rps, {} s of connections at concurrency {}; load {})",
            args.bulk_mib,
            args.runs,
            args.rtts,
            args.rps_secs,
            args.rps,
            args.conn_secs,
            args.concurrency,
            loadavg()
        );
    }
}

fn describe(m: &Measure, meshed: bool) -> String {
    match m {
        Measure::Bulk { gbps, cpu_s_per_gb } if meshed => {
            format!("{gbps:.2} ({cpu_s_per_gb:.2} ztunnel CPU-s/GB)")
        }
        Measure::Bulk { gbps, .. } => format!("{gbps:.2}"),
        Measure::Latency {
            p50_us,
            p99_us,
            cpu_ms_per_1000,
        } if meshed => {
            format!(
                "p50 {p50_us:.0} µs, p99 {p99_us:.0} µs ({cpu_ms_per_1000:.1} ztunnel CPU-ms per 1 000)"
            )
        }
        Measure::Latency { p50_us, p99_us, .. } => {
            format!("p50 {p50_us:.0} µs, p99 {p99_us:.0} µs")
        }
        Measure::OpenLoop {
            p50_us,
            p99_us,
            vcpu,
        } if meshed => {
            format!(
                "p50 {p50_us:.0} µs, p99 {p99_us:.0} µs (vCPU n1 {:.3}, n2 {:.3})",
                vcpu[0], vcpu[1]
            )
        }
        Measure::OpenLoop { p50_us, p99_us, .. } => {
            format!("p50 {p50_us:.0} µs, p99 {p99_us:.0} µs")
        }
        Measure::Rate(r) => format!("{r:.0}"),
    }
}

fn compare(d: &Measure, m: &Measure) -> String {
    match (d, m) {
        (Measure::Bulk { gbps: a, .. }, Measure::Bulk { gbps: b, .. })
        | (Measure::Rate(a), Measure::Rate(b)) => {
            format!("{:.0} %", b / a * 100.0)
        }
        (
            Measure::Latency {
                p50_us: a50,
                p99_us: a99,
                ..
            },
            Measure::Latency {
                p50_us: b50,
                p99_us: b99,
                ..
            },
        )
        | (
            Measure::OpenLoop {
                p50_us: a50,
                p99_us: a99,
                ..
            },
            Measure::OpenLoop {
                p50_us: b50,
                p99_us: b99,
                ..
            },
        ) => {
            format!("+{:.0} µs p50, +{:.0} µs p99", b50 - a50, b99 - a99)
        }
        _ => "-".into(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
