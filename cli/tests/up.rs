//! `zmesh up` / `zmesh down` end to end: the real `zmesh` binary builds a local cluster with the
//! real istiod-lite, zmesh-cni and ztunnel binaries (built next to it), sends traffic and prints
//! what the ztunnels reported.
//!
//! Needs root; run inside the sandbox after building every binary:
//! `cargo build -p zmesh -p ztunnel -p zmesh-cni -p istiod-lite && cargo test -p zmesh --no-run`
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p zmesh --test up`

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mesh_testbed::require_netns_tools;

const ZMESH: &str = env!("CARGO_BIN_EXE_zmesh");

// `zmesh down` removes every `zmesh-*` namespace: the cluster tests must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn up_once_shows_xds_config_mutual_tls_load_balancing_and_policy() {
    if !require_netns_tools(&["nft"]) {
        return;
    }
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(ZMESH)
        .args(["up", "--once", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "zmesh up failed\n{stdout}\n{stderr}");
    let client = "source_principal=spiffe://cluster.local/ns/demo/sa/client";
    let server = "destination_principal=spiffe://cluster.local/ns/demo/sa/server";
    let mtls = stdout
        .lines()
        .filter(|l| l.contains(client) && l.contains(server))
        .filter(|l| l.contains("connection_security_policy=mutual_tls"))
        .count();
    // 3 meshed flows, each reported by the source and the destination ztunnel.
    assert_eq!(mtls, 6, "{stdout}");
    for seen in [
        "the server app saw the client as 10.100.1.11:",
        "the server app saw the client as 10.100.2.11:",
        "connection_security_policy=unknown (passed through as plain TCP)",
        "ztunnel n2 [reporter=destination]",
        // Config over xDS, both types ACKed on both nodes.
        "ztunnel n1: xds https://10.99.0.254:15012 connected (streams 1); address: 6 resources, \
         last ACKed",
        "ztunnel n2: xds https://10.99.0.254:15012 connected (streams 1); address: 6 resources, \
         last ACKed",
        "authorization: 1 resources, last ACKed",
        "workload plain    node n2 TCP   spiffe://cluster.local/ns/legacy/sa/plain",
        "vip 10.96.0.10 ports {\"80\":0} endpoints server1 (n1), server2 (n2)",
        "policy   demo/web-clients-only Allow",
        // The VIP spread over both nodes.
        "server1 (node n1) ",
        "server2 (node n2) ",
        "destination_service=web.demo.svc.cluster.local destination_workload=server2",
        // One allowed, one denied connection.
        "client2 (sa/client) -> server1 10.100.1.12:8000: allowed, answered by server1",
        "server2 (sa/server) -> server1 10.100.1.12:8000: refused",
        "ztunnel n1 [reporter=destination] source_principal=spiffe://cluster.local/ns/demo/sa/server \
         destination_principal=spiffe://cluster.local/ns/demo/sa/server response_flags=DENY",
        "refused CONNECT with status 401 Unauthorized",
    ] {
        assert!(stdout.contains(seen), "missing {seen:?} in\n{stdout}");
    }
    assert_eq!(stdout.matches(" HBONE spiffe://").count(), 8, "{stdout}");
    assert!(!netns_list().contains("zmesh-"), "namespaces left behind");
    let left: Vec<_> = std::fs::read_dir(state.path()).unwrap().collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}

/// Reads `zmesh up`'s output until it says it is running; returns the rest of it, which must
/// stay open (`zmesh up` still prints while tearing down).
fn wait_running(up: &mut Child) -> Lines<BufReader<ChildStdout>> {
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    while !seen.contains("press Ctrl-C") {
        match lines.next() {
            Some(line) => seen.push_str(&(line.unwrap() + "\n")),
            None => panic!("zmesh up ended early:\n{seen}"),
        }
    }
    lines
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn down_stops_a_running_up_and_removes_everything() {
    if !require_netns_tools(&["nft"]) {
        return;
    }
    let _serial = serial();
    let state = tempfile::tempdir().unwrap();
    let mut up = Command::new(ZMESH)
        .args(["up", "--state-dir"])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rest = wait_running(&mut up);
    assert!(
        netns_list().contains("zmesh-"),
        "no namespaces while running"
    );
    let down = Command::new(ZMESH)
        .args(["down", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&down.stdout);
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "zmesh down failed: {said}\n{err}");
    assert!(said.contains("stopped zmesh up"), "{said}");
    let status = wait_exit(&mut up, Duration::from_secs(10));
    let rest: Vec<String> = rest.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.starts_with("tearing down")),
        "{rest:?}"
    );
    assert!(status.success(), "zmesh up exited with {status}");
    assert!(!netns_list().contains("zmesh-"), "namespaces left behind");
    let left: Vec<_> = std::fs::read_dir(state.path()).unwrap().collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
    let again = Command::new(ZMESH)
        .args(["down", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to clean up"));
}

#[test]
fn up_names_a_missing_binary() {
    let out = Command::new(ZMESH)
        .args(["up", "--once", "--ztunnel-bin", "/nonexistent/ztunnel"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ztunnel binary not found") && stderr.contains("/nonexistent/ztunnel"),
        "{stderr}"
    );
}
