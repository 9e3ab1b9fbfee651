//! istiod-lite in the fabric namespace: CA and delta xDS on [`CA_IP`]:[`CA_PORT`], serving the
//! cluster's config directory; and cutting a node off from it.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_testbed::apps;
use mesh_testbed::{Cluster, netns};

use super::{
    Binaries, CA_IP, CA_PORT, LocalMeshError, Proc, Result, STARTUP, config, write_atomic,
};

/// How often istiod-lite re-reads the config directory (the agents use the same period).
pub const CONFIG_POLL: &str = "200ms";
// The nftables table `partition` adds to a node's namespace.
const PARTITION_TABLE: &str = "zmesh_partition";

/// istiod-lite's URL, for ztunnel's CA and xDS clients.
pub fn url() -> String {
    format!("https://{CA_IP}:{CA_PORT}")
}

/// Addresses the fabric bridge with [`CA_IP`], starts istiod-lite there on the cluster's config
/// directory and waits until it accepts connections and has written its root certificate.
pub async fn start(
    cluster: &Cluster,
    dir: &Path,
    bins: &Binaries,
    nodes: &[String],
) -> Result<Proc> {
    let fabric = cluster.fabric_netns();
    run(
        "ip",
        &[
            "-n",
            fabric,
            "addr",
            "add",
            &format!("{CA_IP}/24"),
            "dev",
            "fab0",
        ],
    )
    .map_err(|e| LocalMeshError::Failed(format!("cannot address fab0: {e}")))?;
    let tokens = dir.join("tokens.yaml");
    write_atomic(&tokens, &config::tokens_file(nodes))?;
    let mut cmd = Command::new(&bins.istiod);
    cmd.env("ISTIOD_GRPC_ADDR", format!("{CA_IP}:{CA_PORT}"));
    cmd.env("ISTIOD_SERVING_IPS", CA_IP.to_string());
    cmd.env("ISTIOD_CA_DIR", dir.join("ca"));
    cmd.env("ISTIOD_ROOT_CERT_OUT", dir.join("root-cert.pem"));
    cmd.env("ISTIOD_TOKENS_FILE", &tokens);
    cmd.arg("--config-dir").arg(dir.join("config"));
    cmd.args(["--config-poll", CONFIG_POLL]);
    let fabric_ns = netns::open(&PathBuf::from(netns::NETNS_RUN_DIR).join(fabric))?;
    let log = dir.join("istiod-lite.log");
    let mut ca = Proc::spawn("istiod-lite", cmd, &fabric_ns, &log, &dir.join("pids"))?;
    wait_ready(&mut ca, &fabric_ns, &dir.join("root-cert.pem")).await?;
    Ok(ca)
}

async fn wait_ready(ca: &mut Proc, fabric: &File, root: &Path) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    let addr = SocketAddr::from((CA_IP, CA_PORT));
    loop {
        if root.exists() && apps::connect(fabric, addr).await.is_ok() {
            return Ok(());
        }
        let exited = ca.exited();
        if exited.is_some() || Instant::now() > deadline {
            return Err(LocalMeshError::Timeout {
                what: "istiod-lite".into(),
                timeout: STARTUP,
                detail: format!("exit status {exited:?}; log:\n{}", ca.log()),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// In the node namespace `netns`: with `cut`, drops every packet from istiod-lite (its pushes
/// never arrive, the stream stays open, the node's ztunnel keeps its last config); without,
/// removes that rule again.
pub fn partition(netns: &str, cut: bool) -> Result<()> {
    let script = if cut {
        format!(
            "add table inet {PARTITION_TABLE}; \
             add chain inet {PARTITION_TABLE} input {{ type filter hook input priority -10; }}; \
             add rule inet {PARTITION_TABLE} input ip saddr {CA_IP} tcp sport {CA_PORT} drop"
        )
    } else {
        format!("delete table inet {PARTITION_TABLE}")
    };
    run("ip", &["netns", "exec", netns, "nft", &script])
        .map_err(|e| LocalMeshError::Failed(format!("{netns}: partition = {cut}: {e}")))
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("{program} {}: {}", args.join(" "), stderr.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_is_named_with_its_error() {
        let err = run("sh", &["-c", "echo nope >&2; exit 3"]).unwrap_err();
        assert!(err.contains("sh -c") && err.contains("nope"), "{err}");
        let err = run("/nonexistent/tool", &[]).unwrap_err();
        assert!(err.contains("running /nonexistent/tool"), "{err}");
    }
}
