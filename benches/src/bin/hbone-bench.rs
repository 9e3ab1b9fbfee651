//! HBONE against plain TCP and plain TLS on loopback, in one process and one run.
//!
//! `cargo run --release -p mesh-benches --bin hbone-bench` (see benches/README.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_benches::stats::{cpu_time, median, percentile, rss_bytes};
use mesh_benches::transport::{Certs, Endpoint, Kind};
use mesh_benches::{BoxStream, app};

#[derive(Debug, Parser)]
#[command(about = "HBONE vs plain TCP and TLS on loopback")]
struct Args {
    /// MiB sent per bulk run.
    #[arg(long, default_value_t = 1024)]
    bulk_mib: u64,
    /// Bulk runs per transport (the median is reported; one extra warm-up run is discarded).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Round trips measured per latency run (after 2 000 warm-up round trips).
    #[arg(long, default_value_t = 20_000)]
    rtts: usize,
    /// Seconds per connection-rate run.
    #[arg(long, default_value_t = 3)]
    conn_secs: u64,
    /// Connections opened concurrently in the connection-rate runs.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Idle connections held for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
    /// Transports to run (comma list of tcp, tls, tls+tcp, hbone).
    #[arg(long, value_delimiter = ',', default_values_t = ["tcp".to_string(), "tls".into(), "tls+tcp".into(), "hbone".into()])]
    only: Vec<String>,
    /// Worker threads of the runtime shared by client and server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

#[derive(Debug, Default, Clone)]
struct Row {
    gbps: f64,
    cpu_s_per_gb: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    pooled_per_s: Option<f64>,
    kib_per_endpoint: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_core::telemetry::init_stderr_logging("BENCH_LOG", "warn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?;
    // Everything, the client loops included, runs on the runtime's workers: the main thread only
    // waits. (Driving the clients from `block_on` made the main thread a third, serialising CPU
    // consumer on a 2-core machine and halved the connection rates.)
    rt.block_on(async { tokio::spawn(run(args)).await? })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| args.only.iter().any(|o| o == k.name()))
        .collect();
    println!(
        "hbone-bench: loopback, {} runtime workers, load {}",
        args.workers,
        loadavg()
    );
    let mut rows = Vec::new();
    for kind in kinds {
        let ep = Arc::new(Endpoint::start(kind, &certs).await?);
        let row = measure(&ep, &args).await?;
        println!("  measured {:<8} {row:?}", kind.name());
        rows.push((kind, row));
    }
    report(&rows);
    Ok(())
}

async fn measure(ep: &Arc<Endpoint>, args: &Args) -> anyhow::Result<Row> {
    let mut row = Row::default();
    eprintln!("  {}: bulk", ep.kind().name());
    let (gbps, cpu) = bulk(ep, args).await?;
    eprintln!("  {}: round trips", ep.kind().name());
    (row.gbps, row.cpu_s_per_gb) = (gbps, cpu);
    let mut rtts = app::echo_rtts(ep.open(true).await?, 2_000, args.rtts).await?;
    row.p50_us = percentile(&mut rtts, 50.0).as_secs_f64() * 1e6;
    row.p99_us = percentile(&mut rtts, 99.0).as_secs_f64() * 1e6;
    eprintln!("  {}: connection rate", ep.kind().name());
    row.conns_per_s = conn_rate(ep, args, false).await?;
    if ep.kind() == Kind::Hbone {
        row.pooled_per_s = Some(conn_rate(ep, args, true).await?);
    }
    eprintln!("  {}: idle memory", ep.kind().name());
    row.kib_per_endpoint = idle_memory(ep, args.idle).await?;
    Ok(row)
}

/// Median Gbit/s and CPU-seconds per GB over `runs` bulk transfers (after one warm-up).
async fn bulk(ep: &Endpoint, args: &Args) -> anyhow::Result<(f64, f64)> {
    let total = args.bulk_mib << 20;
    let mut gbps = Vec::new();
    let mut cpu = Vec::new();
    for i in 0..=args.runs {
        let s = ep.open(true).await?;
        let cpu0 = cpu_time();
        let took = app::bulk(s, total).await?;
        let used = cpu_time() - cpu0;
        if i > 0 {
            gbps.push(total as f64 * 8.0 / took.as_secs_f64() / 1e9);
            cpu.push(used.as_secs_f64() / (total as f64 / 1e9));
        }
    }
    Ok((median(&mut gbps), median(&mut cpu)))
}

/// New connections (or pooled HBONE streams) per second, each carrying a one-byte ping.
async fn conn_rate(ep: &Arc<Endpoint>, args: &Args, pooled: bool) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(args.conn_secs);
    let start = Instant::now();
    // One task per client loop, like one task per connection in a proxy, so the runtime spreads
    // the client-side handshakes over every worker.
    let workers = (0..args.concurrency).map(|_| {
        let ep = ep.clone();
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                // A stalled exchange must fail the run, not hang it.
                tokio::time::timeout(Duration::from_secs(10), async {
                    app::ping(ep.open(pooled).await?).await?;
                    anyhow::Ok(())
                })
                .await
                .map_err(|_| anyhow::anyhow!("a connection stalled for 10 s"))??;
                n += 1;
            }
            anyhow::Ok(n)
        }
    });
    let tasks = workers.map(tokio::spawn);
    let counts: Vec<u64> = futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    Ok(counts.iter().sum::<u64>() as f64 / start.elapsed().as_secs_f64())
}

/// RSS growth per connection endpoint while `n` idle connections (unpooled) are open. Both
/// endpoints live in this process, so the growth is divided by 2n. For the proxied transports it
/// includes the proxy's upstream TCP connection to the app.
async fn idle_memory(ep: &Endpoint, n: usize) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    let mut held: Vec<BoxStream> = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(app::idle(ep.open(false).await?).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    drop(held);
    Ok(after.saturating_sub(before) as f64 / (2 * n) as f64 / 1024.0)
}

fn report(rows: &[(Kind, Row)]) {
    let tls = rows
        .iter()
        .find(|(k, _)| *k == Kind::Tls)
        .map(|(_, r)| r.clone());
    println!(
        "\n| transport | Gbit/s (1 stream) | vs tls | CPU-s/GB | 1 KiB RTT p50 µs | p99 µs | new conns/s | pooled streams/s | KiB per idle endpoint |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (kind, r) in rows {
        let ratio = tls
            .as_ref()
            .map_or("-".into(), |t| format!("{:.0} %", r.gbps / t.gbps * 100.0));
        let pooled = r.pooled_per_s.map_or("-".into(), |p| format!("{p:.0}"));
        println!(
            "| {} | {:.2} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {:.1} |",
            kind.name(),
            r.gbps,
            ratio,
            r.cpu_s_per_gb,
            r.p50_us,
            r.p99_us,
            r.conns_per_s,
            pooled,
            r.kib_per_endpoint
        );
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
