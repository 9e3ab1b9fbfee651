//! Logging setup shared by every zmesh binary.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Parses a log filter: comma-separated `level` and `target=level` directives, e.g. `info` or
/// `ztunnel=debug,h2=warn` (levels `off`, `error`, `warn`, `info`, `debug`, `trace`). Span and
/// field filters are not supported: they would pull a regex engine into every binary (≈ 0.4 MB of
/// code in ztunnel, which counts in its idle RSS).
pub fn log_filter(spec: &str) -> Result<Targets, String> {
    spec.parse::<Targets>()
        .map_err(|e| format!("invalid log filter {spec:?}: {e}"))
}

/// Installs the global `tracing` subscriber, writing to stdout: `filter` as in [`log_filter`],
/// `json` selects JSON lines instead of text. Colours are used only when stdout is a terminal,
/// never into log files or collectors. Fails on an invalid filter.
pub fn init_logging(filter: &str, json: bool) -> Result<(), String> {
    let filter = log_filter(filter)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(tracing_subscriber::fmt::layer().json().with_ansi(false))
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(ansi))
            .init();
    }
    Ok(())
}

/// Installs a text subscriber writing to stderr with the filter in the environment variable
/// `var` (as in [`log_filter`]), or `default` when it is unset or invalid. For tools whose stdout
/// is their output.
pub fn init_stderr_logging(var: &str, default: &str) {
    let filter = std::env::var(var)
        .ok()
        .and_then(|v| log_filter(&v).ok())
        .unwrap_or_else(|| log_filter(default).unwrap_or_default());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_levels_and_targets_and_reject_garbage() {
        assert!(log_filter("info").is_ok());
        assert!(log_filter("ztunnel=debug,h2=warn,access=info").is_ok());
        let err = log_filter("ztunnel=loud").unwrap_err();
        assert!(
            err.starts_with("invalid log filter \"ztunnel=loud\""),
            "{err}"
        );
    }
}
