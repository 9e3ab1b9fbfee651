//! `zmesh-cni`: the zmesh node agent. Everything happens in [`zmesh_cni::app`].

use std::process::ExitCode;

use anyhow::Context;
use tracing::info;
use zmesh_cni::app;
use zmesh_cni::config::{Config, ConfigError};

fn main() -> ExitCode {
    let env = |key: &str| std::env::var(key).ok();
    let config = match Config::parse(std::env::args_os(), &env) {
        Ok(config) => config,
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("zmesh-cni: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zmesh-cni: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    mesh_core::telemetry::init_logging(&config.log, false).map_err(anyhow::Error::msg)?;
    info!(config = %serde_json::to_string(config)?, "starting zmesh-cni");
    // The agent does control work only (rule loading runs on the blocking pool), so one thread
    // is enough.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async {
        let bound = app::build(config).await?;
        info!(admin = %bound.admin_address(), zds = %bound.zds_path().display(), "zmesh-cni running");
        bound.wait_termination().await
    })
}
