//! Loading and removing the redirection rules inside a pod's network namespace.
//!
//! Each tool (`nft`, `iptables-save`/`iptables-restore`, `ip`) is spawned from a short-lived
//! thread that has `setns`-ed into the pod namespace: a child process starts in the namespace
//! of the thread that spawns it, and the caller's thread never changes namespace. The pod keeps
//! running throughout; removal works on a live pod.
//!
//! These calls block (they wait for child processes); call them from `spawn_blocking` in async
//! code.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;

use nix::sched::{CloneFlags, setns};

use super::{
    Backend, CaptureConfig, RulesError, iptables_apply, iptables_remove, nft_remove, nft_rules,
    routing_apply, routing_remove,
};

/// Errors from loading or removing rules in a pod namespace.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The namespace file could not be opened.
    #[error("cannot open pod network namespace {path}: {source}")]
    OpenNetns {
        /// Namespace path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// `setns(2)` into the namespace failed.
    #[error("cannot enter pod network namespace {path}: {source}")]
    Setns {
        /// Namespace path.
        path: PathBuf,
        /// Underlying error.
        source: nix::Error,
    },
    /// A tool could not be started.
    #[error("cannot run `{command}` in {netns}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Namespace path.
        netns: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A tool ran and failed.
    #[error("`{command}` failed in {netns} ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Namespace path.
        netns: PathBuf,
        /// Exit status.
        status: ExitStatus,
        /// Standard error, trimmed.
        stderr: String,
    },
}

/// Installs (or re-installs, replacing the old copy) the redirection rules and policy routing in
/// the pod namespace at `netns_path` (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
pub fn apply(netns_path: &Path, backend: Backend, cfg: &CaptureConfig) -> Result<(), ApplyError> {
    cfg.validate()?;
    let pod = PodNetns::open(netns_path)?;
    // Routing first: once capture starts, TPROXYed packets need the local route.
    let rules = pod.run(
        "ip",
        &["-4", "rule", "list", "pref", &cfg.rule_priority.to_string()],
        None,
    )?;
    pod.ip_batch(&routing_apply(cfg, &rules))?;
    match backend {
        Backend::Nftables => {
            pod.run("nft", &["-f", "-"], Some(&nft_rules(cfg)?))?;
        }
        Backend::Iptables => {
            let saved = pod.run("iptables-save", &[], None)?;
            pod.run(
                "iptables-restore",
                &["--noflush"],
                Some(&iptables_apply(cfg, &saved)?),
            )?;
        }
    }
    tracing::debug!(netns = %netns_path.display(), %backend, "capture rules applied");
    Ok(())
}

/// Removes the redirection rules and policy routing from the pod namespace at `netns_path`.
/// Removing from a pod that has none is not an error.
pub fn remove(netns_path: &Path, backend: Backend, cfg: &CaptureConfig) -> Result<(), ApplyError> {
    cfg.validate()?;
    let pod = PodNetns::open(netns_path)?;
    // Capture first, so no packet is captured without the routing it needs.
    match backend {
        Backend::Nftables => {
            pod.run("nft", &["-f", "-"], Some(&nft_remove()))?;
        }
        Backend::Iptables => {
            let text = iptables_remove(&pod.run("iptables-save", &[], None)?);
            if !text.is_empty() {
                pod.run("iptables-restore", &["--noflush"], Some(&text))?;
            }
        }
    }
    let rules = pod.run(
        "ip",
        &["-4", "rule", "list", "pref", &cfg.rule_priority.to_string()],
        None,
    )?;
    let routes = pod.run("ip", &["-4", "route", "show", "table", "all"], None)?;
    pod.ip_batch(&routing_remove(cfg, &rules, &routes))?;
    tracing::debug!(netns = %netns_path.display(), %backend, "capture rules removed");
    Ok(())
}

struct PodNetns {
    path: PathBuf,
    file: File,
}

impl PodNetns {
    fn open(path: &Path) -> Result<Self, ApplyError> {
        let file = File::open(path).map_err(|source| ApplyError::OpenNetns {
            path: path.to_owned(),
            source,
        })?;
        Ok(PodNetns {
            path: path.to_owned(),
            file,
        })
    }

    fn ip_batch(&self, lines: &[String]) -> Result<(), ApplyError> {
        if lines.is_empty() {
            return Ok(());
        }
        let input = lines.join("\n") + "\n";
        self.run("ip", &["-batch", "-"], Some(&input)).map(drop)
    }

    /// Runs `program args` inside the namespace and returns its stdout; a non-zero exit is an
    /// error carrying stderr.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
        let command = std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let output = thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(Outcome::Setns)?;
                    spawn_and_wait(program, args, stdin).map_err(Outcome::Spawn)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        let output = output.map_err(|e| match e {
            Outcome::Setns(source) => ApplyError::Setns {
                path: self.path.clone(),
                source,
            },
            Outcome::Spawn(source) => ApplyError::Spawn {
                command: command.clone(),
                netns: self.path.clone(),
                source,
            },
        })?;
        if !output.status.success() {
            return Err(ApplyError::Command {
                command,
                netns: self.path.clone(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

enum Outcome {
    Setns(nix::Error),
    Spawn(io::Error),
}

fn spawn_and_wait(program: &str, args: &[&str], stdin: Option<&str>) -> io::Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    thread::scope(|scope| {
        // Write stdin on its own thread so a chatty child cannot deadlock us on full pipes.
        let writer = child
            .stdin
            .take()
            .zip(stdin)
            .map(|(mut pipe, input)| scope.spawn(move || pipe.write_all(input.as_bytes())));
        let output = child.wait_with_output()?;
        if let Some(Ok(Err(e))) = writer.map(|w| w.join()) {
            // A child that stops reading reports why through its exit status and stderr.
            if e.kind() != io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
        Ok(output)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_clear_error() {
        let path = Path::new("/run/netns/zmesh-no-such-pod");
        let err = apply(path, Backend::Nftables, &CaptureConfig::default()).unwrap_err();
        assert!(matches!(err, ApplyError::OpenNetns { .. }), "{err}");
        assert!(
            err.to_string().contains("/run/netns/zmesh-no-such-pod"),
            "{err}"
        );
        let err = remove(path, Backend::Iptables, &CaptureConfig::default()).unwrap_err();
        assert!(matches!(err, ApplyError::OpenNetns { .. }), "{err}");
    }

    #[test]
    fn invalid_config_is_rejected_before_touching_the_namespace() {
        let cfg = CaptureConfig {
            outbound_port: 0,
            ..CaptureConfig::default()
        };
        let err = apply(Path::new("/nonexistent"), Backend::Iptables, &cfg).unwrap_err();
        assert!(matches!(err, ApplyError::Rules(_)), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_namespace_fails_setns() {
        let err = apply(
            Path::new("/proc/self/status"),
            Backend::Nftables,
            &CaptureConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(err, ApplyError::Setns { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("cannot enter pod network namespace"),
            "{err}"
        );
    }
}
