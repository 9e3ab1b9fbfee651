//! The `zmesh` command.
#![forbid(unsafe_code)]

mod demo;

use clap::{Parser, Subcommand};
use zmesh::up;

/// zmesh: an ambient-style service mesh.
#[derive(Debug, Parser)]
#[command(name = "zmesh", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the CA and two workloads on loopback and shows an mTLS HBONE round trip between them.
    Demo(demo::Args),
    /// Starts a local 2-node cluster (network namespaces, needs root) with the real istiod-lite,
    /// zmesh-cni and ztunnel binaries, sends traffic and shows what the mesh reported.
    Up(up::UpArgs),
    /// Removes local clusters left behind by `zmesh up` (processes, namespaces, state).
    Down(up::DownArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    mesh_core::telemetry::init_stderr_logging("ZMESH_LOG", "warn");
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Up(args) => Ok(up::up(args).await?),
        Command::Down(args) => Ok(up::down(&args)?),
    }
}
