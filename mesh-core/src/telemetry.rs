//! Process-wide logging setup shared by the binaries.

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber: `filter` is an `EnvFilter` directive (`info`,
/// `ztunnel=debug,h2=warn`), `json` selects JSON lines instead of text. Colours are used only when
/// stdout is a terminal, never into log files or collectors. Fails on an invalid filter.
pub fn init_logging(filter: &str, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
