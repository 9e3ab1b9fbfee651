//! The test sandbox and the privilege check for netns tests.
//!
//! The sandbox is a private mount + network namespace (`unshare --mount --net --propagation
//! private`) with a tmpfs over `/run/netns` and only `lo` in its root netns. Namespace names can't
//! clash with the host or other runs, nothing can leave the box, and everything disappears when
//! the sandboxed process exits, even after a crash. `scripts/sandbox.sh` is the shell form.
//!
//! Netns tests call [`require_netns`] first: without the privileges or tools they skip with a loud
//! message, unless `MESH_REQUIRE_NETNS=1`, in which case they fail, so CI cannot go green by
//! skipping.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// Set to `1` to turn a netns-test skip into a failure.
pub const REQUIRE_NETNS_ENV: &str = "MESH_REQUIRE_NETNS";
/// Set to `1` inside the sandbox by [`sandbox_command`] and `scripts/sandbox.sh`.
pub const SANDBOX_ENV: &str = "MESH_SANDBOX";

/// Tools every netns test needs.
const BASE_TOOLS: &[&str] = &["ip"];
/// At least one of these must exist to load capture rules.
const RULE_TOOLS: &[&str] = &["iptables-restore", "nft"];
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

// Runs inside `sh -c`; "$@" is the wrapped command.
const SANDBOX_SCRIPT: &str = "set -e
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
ip link set lo up
exec \"$@\"";

/// Errors from entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The path of the running executable is unknown.
    #[error("cannot find the current executable: {0}")]
    CurrentExe(std::io::Error),
    /// `unshare` could not be started.
    #[error("cannot start the sandbox with unshare: {0}")]
    Spawn(std::io::Error),
}

/// Whether a `MESH_REQUIRE_NETNS` / `MESH_SANDBOX` value means "on".
pub fn flag_enabled(value: Option<&str>) -> bool {
    matches!(value.map(str::trim), Some("1" | "true" | "yes"))
}

/// Whether this process runs inside the sandbox (per the `MESH_SANDBOX` marker).
pub fn in_sandbox() -> bool {
    flag_enabled(std::env::var(SANDBOX_ENV).ok().as_deref())
}

/// A command that runs `program` inside a fresh sandbox. Arguments added to the returned command
/// with `.arg()`/`.args()` go to `program`.
pub fn sandbox_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--net", "--propagation", "private", "--"])
        .args(["sh", "-c", SANDBOX_SCRIPT, "mesh-sandbox"])
        .arg(program)
        .env(SANDBOX_ENV, "1");
    cmd
}

/// Makes sure the process runs in the sandbox: inside it, returns `Ok(())`; outside, re-runs the
/// current executable with the same arguments inside a new sandbox, waits for it, and exits
/// with its status (so this call does not return).
///
/// Call it first thing in `main` (a CLI, or a `harness = false` test binary), before any thread
/// starts: the outer process only waits.
pub fn ensure() -> Result<(), SandboxError> {
    if in_sandbox() {
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(SandboxError::CurrentExe)?;
    let status = sandbox_command(exe)
        .args(std::env::args_os().skip(1))
        .status()
        .map_err(SandboxError::Spawn)?;
    std::process::exit(status.code().unwrap_or(1))
}

/// What is missing for netns tests, as human-readable items (empty = ready).
pub fn missing_for_netns(extra_tools: &[&str]) -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    evaluate(&status, &|tool| on_path(&path, tool), extra_tools)
}

fn on_path(path: &str, tool: &str) -> bool {
    std::env::split_paths(path).any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn evaluate(status: &str, has_tool: &dyn Fn(&str) -> bool, extra_tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    if status_field(status, "Uid:").and_then(|v| v.split_whitespace().nth(1)) != Some("0") {
        missing.push("root (effective uid 0)".to_owned());
    }
    let caps = status_field(status, "CapEff:").and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    for (bit, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        if caps.is_none_or(|c| c & (1 << bit) == 0) {
            missing.push(name.to_owned());
        }
    }
    for tool in BASE_TOOLS.iter().chain(extra_tools) {
        if !has_tool(tool) {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if !RULE_TOOLS.iter().any(|t| has_tool(t)) {
        missing.push("`iptables-restore` or `nft` on PATH".to_owned());
    }
    missing
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| line.strip_prefix(key))
}

/// Checks that netns tests can run (root, CAP_NET_ADMIN, CAP_SYS_ADMIN, `ip`, and
/// `iptables-restore` or `nft`). Returns `true` when they can. Otherwise prints a loud skip
/// notice and returns `false`, or panics when `MESH_REQUIRE_NETNS=1`.
pub fn require_netns() -> bool {
    require_netns_tools(&[])
}

/// [`require_netns`] plus specific tools (e.g. `["nft"]`).
pub fn require_netns_tools(tools: &[&str]) -> bool {
    let required = std::env::var(REQUIRE_NETNS_ENV).ok();
    decide(required.as_deref(), &missing_for_netns(tools))
}

/// The skip-or-fail decision: `required` is the value of `MESH_REQUIRE_NETNS`.
pub fn decide(required: Option<&str>, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if flag_enabled(required) {
        panic!("{REQUIRE_NETNS_ENV}=1 but netns tests cannot run: missing {what}");
    }
    // Written to the stderr handle directly: libtest captures `eprintln!` of passing tests,
    // which would make the skip silent.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED netns test: missing {what}\n\
         !!! run as root inside scripts/sandbox.sh, and set {REQUIRE_NETNS_ENV}=1\n\
         !!! to make this a failure instead of a skip.\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_STATUS: &str = "Name:\tx\nUid:\t0\t0\t0\t0\nCapEff:\t000001fffeffffff\n";

    type Case<'a> = (
        &'a str,
        &'a dyn Fn(&str) -> bool,
        &'a [&'a str],
        &'a [&'a str],
    );

    #[test]
    fn evaluate_table() {
        let all = |_: &str| true;
        let none = |_: &str| false;
        let only_nft = |t: &str| t == "ip" || t == "nft";
        let cases: &[Case<'_>] = &[
            (ROOT_STATUS, &all, &[], &[]),
            (ROOT_STATUS, &only_nft, &[], &[]),
            (
                ROOT_STATUS,
                &only_nft,
                &["iptables-restore"],
                &["`iptables-restore` on PATH"],
            ),
            (
                ROOT_STATUS,
                &none,
                &[],
                &["`ip` on PATH", "`iptables-restore` or `nft` on PATH"],
            ),
            (
                "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n",
                &all,
                &[],
                &["root (effective uid 0)", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"],
            ),
            // Root without CAP_SYS_ADMIN (a restricted container).
            (
                "Uid:\t0\t0\t0\t0\nCapEff:\t0000000000001000\n",
                &all,
                &[],
                &["CAP_SYS_ADMIN"],
            ),
            (
                "",
                &all,
                &[],
                &["root (effective uid 0)", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"],
            ),
        ];
        for (status, tools, extra, expected) in cases {
            assert_eq!(
                evaluate(status, *tools, extra),
                *expected,
                "{status:?} {extra:?}"
            );
        }
    }

    #[test]
    fn decide_skips_or_panics() {
        assert!(decide(None, &[]));
        assert!(decide(Some("1"), &[]));
        assert!(!decide(None, &["CAP_NET_ADMIN".into()]));
        assert!(!decide(Some("0"), &["CAP_NET_ADMIN".into()]));
        let panic = std::panic::catch_unwind(|| decide(Some("1"), &["CAP_NET_ADMIN".into()]));
        let message = *panic.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("MESH_REQUIRE_NETNS=1") && message.contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn flag_values() {
        for (value, on) in [
            (None, false),
            (Some("1"), true),
            (Some(" true "), true),
            (Some("0"), false),
            (Some(""), false),
        ] {
            assert_eq!(flag_enabled(value), on, "{value:?}");
        }
    }

    #[test]
    fn sandbox_command_wraps_program_and_args() {
        let mut cmd = sandbox_command("cargo");
        cmd.args(["test", "-p", "x"]);
        let line = crate::netns::describe(&cmd);
        assert!(
            line.starts_with("unshare --mount --net --propagation private -- sh -c"),
            "{line}"
        );
        assert!(line.ends_with("mesh-sandbox cargo test -p x"), "{line}");
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(env, [(OsStr::new(SANDBOX_ENV), Some(OsStr::new("1")))]);
    }
}
