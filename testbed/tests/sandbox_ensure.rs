//! The sandbox really isolates: `sandbox::ensure()` re-executes this binary inside a fresh
//! mount + network namespace, `sandbox_command` and `scripts/sandbox.sh` do the same for other
//! commands, and namespaces created inside never show up outside.
//!
//! `harness = false`: `ensure()` must be called before any thread starts.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use mesh_testbed::sandbox::{self, SANDBOX_ENV};

const INNER: &str = "--inner";
const OK: &str = "sandboxed-ok";

/// Runs inside the sandbox: only `lo` exists, `/run/netns` is private, and a namespace can be
/// created there. Prints the namespace name so the outside can check it never leaks.
fn inner() -> Result<()> {
    sandbox::ensure()?;
    ensure!(
        sandbox::in_sandbox(),
        "ensure() returned outside the sandbox"
    );
    let links = run(Command::new("ip").args(["-o", "link", "show"]))?;
    ensure!(
        links.lines().count() == 1 && links.contains(": lo:"),
        "links:\n{links}"
    );
    let listed = run(Command::new("ip").args(["netns", "list"]))?;
    ensure!(
        listed.trim().is_empty(),
        "sandbox /run/netns not empty:\n{listed}"
    );
    let name = format!("sbx-probe-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &name]))?;
    println!("{OK} {name}");
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Checks the child's report and that its namespace is invisible from here.
fn check_child(what: &str, cmd: &mut Command) -> Result<()> {
    let stdout = run(cmd).with_context(|| what.to_owned())?;
    let name = stdout
        .lines()
        .find_map(|l| l.strip_prefix(OK).map(str::trim))
        .with_context(|| format!("{what}: no report in {stdout:?}"))?
        .to_owned();
    let listed = run(Command::new("ip").args(["netns", "list"]))?;
    ensure!(
        !listed.contains(&name),
        "{what}: {name} leaked out of the sandbox"
    );
    println!("{what}: ok");
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == INNER) {
        return inner();
    }
    if !sandbox::require_netns() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    // ensure() re-executes the child inside a new sandbox (even when we already run in one).
    check_child(
        "ensure",
        Command::new(&exe).arg(INNER).env_remove(SANDBOX_ENV),
    )?;
    check_child("sandbox_command", sandbox::sandbox_command(&exe).arg(INNER))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/sandbox.sh");
    check_child(
        "sandbox.sh",
        Command::new(script)
            .arg(&exe)
            .arg(INNER)
            .env_remove(SANDBOX_ENV),
    )?;
    Ok(())
}
