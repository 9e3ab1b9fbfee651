//! The `zmesh` command.
#![forbid(unsafe_code)]

mod demo;

use clap::{Parser, Subcommand};

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZMESH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
    }
}
