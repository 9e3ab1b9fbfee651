//! The Service VIP (load balancing across both nodes) and the AuthorizationPolicy at work.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_testbed::apps;

use crate::localmesh::{
    HTTP_PORT, LocalMesh, LocalMeshError, MESHED_NAMESPACE, POLICY_NAME, SERVICE_NAME,
    SERVICE_PORT, SERVICE_VIP, Sample, samples,
};

use super::OPENED;

/// Requests sent to the VIP at least, and at most while waiting for every endpoint to answer.
const MIN_REQUESTS: usize = 10;
const MAX_REQUESTS: usize = 40;

/// `GET /` from `client` to `addr`; the pod that answered.
pub async fn who_answers(
    mesh: &LocalMesh,
    client: &str,
    addr: SocketAddr,
) -> Result<String, LocalMeshError> {
    let ns = mesh.pod_netns(client)?;
    let reply = apps::http_get(&ns, addr, "/")
        .await
        .map_err(|e| LocalMeshError::Failed(format!("{client} -> {addr}: {e}")))?;
    let pod = reply
        .body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pod="));
    match pod {
        Some(pod) if reply.status == 200 => Ok(pod.to_string()),
        _ => Err(LocalMeshError::Failed(format!(
            "{client} -> {addr}: unexpected answer {} {:?}",
            reply.status, reply.body
        ))),
    }
}

/// Sends requests from `client` to the Service VIP until every endpoint answered (at least
/// [`MIN_REQUESTS`]); returns pod → answers.
pub async fn spread_over_vip(
    mesh: &LocalMesh,
    client: &str,
    endpoints: usize,
) -> Result<BTreeMap<String, usize>, LocalMeshError> {
    let vip = SocketAddr::from((SERVICE_VIP, SERVICE_PORT));
    let mut answered = BTreeMap::new();
    for sent in 1..=MAX_REQUESTS {
        let pod = who_answers(mesh, client, vip).await?;
        *answered.entry(pod).or_insert(0) += 1;
        if sent >= MIN_REQUESTS && answered.len() >= endpoints {
            return Ok(answered);
        }
    }
    Err(LocalMeshError::Failed(format!(
        "{MAX_REQUESTS} requests to {vip} reached only {answered:?}"
    )))
}

pub(super) async fn vip_evidence(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let hostname = format!("{SERVICE_NAME}.{MESHED_NAMESPACE}.svc.cluster.local");
    let mut out = format!(
        "\nservice {hostname} (VIP {SERVICE_VIP}:{SERVICE_PORT}, HTTP app on port \
         {HTTP_PORT} of server1 and server2):\n"
    );
    let answered = spread_over_vip(mesh, "client1", 2).await?;
    let total: usize = answered.values().sum();
    let spread: Vec<String> = answered
        .iter()
        .map(|(pod, n)| {
            let node = mesh.pod(pod).map_or("?", |p| p.spec.node.as_str());
            format!("{pod} (node {node}) {n}")
        })
        .collect();
    let _ = writeln!(
        out,
        "  client1 sent {total} requests to the VIP; answered by: {}",
        spread.join(", ")
    );
    let text = mesh.metrics("n1").await?;
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client1"),
        ("destination_service", hostname.as_str()),
    ];
    for sample in samples(&text, OPENED)
        .into_iter()
        .filter(|s| s.matches(&labels))
    {
        let _ = writeln!(
            out,
            "  ztunnel n1 [reporter=source] destination_service={hostname} \
             destination_workload={} destination_principal={} connection_security_policy={} \
             connections_opened={}",
            sample.label("destination_workload"),
            sample.label("destination_principal"),
            sample.label("connection_security_policy"),
            sample.value
        );
    }
    Ok(out)
}

pub(super) async fn policy_evidence(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let server1 = SocketAddr::from((mesh.pod("server1")?.ip, HTTP_PORT));
    let mut out = format!(
        "\nAuthorizationPolicy {MESHED_NAMESPACE}/{POLICY_NAME} (port {HTTP_PORT} of app=server \
         only from sa/client):\n"
    );
    let pod = who_answers(mesh, "client2", server1).await?;
    let _ = writeln!(
        out,
        "  client2 (sa/client) -> server1 {server1}: allowed, answered by {pod}"
    );
    match who_answers(mesh, "server2", server1).await {
        Ok(pod) => {
            return Err(LocalMeshError::Failed(format!(
                "server2 (sa/server) reached {server1} ({pod}) despite {POLICY_NAME}"
            )));
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "  server2 (sa/server) -> server1 {server1}: refused ({e})"
            );
        }
    }
    out.push_str(&denied_metrics(mesh).await?);
    Ok(out)
}

/// Both ztunnels count the refused connection with `response_flags="DENY"` (server1's as the
/// destination that answered the CONNECT with 401, server2's as the source that got it), and
/// server2's access log has the status.
async fn denied_metrics(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let mut out = String::new();
    for (node, reporter) in [("n1", "destination"), ("n2", "source")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "server2"),
            ("destination_workload", "server1"),
            ("response_flags", "DENY"),
        ];
        let s = wait_sample(mesh, node, &labels).await?;
        let _ = writeln!(
            out,
            "  ztunnel {node} [reporter={reporter}] source_principal={} \
             destination_principal={} response_flags={} connections_opened={}",
            s.label("source_principal"),
            s.label("destination_principal"),
            s.label("response_flags"),
            s.value
        );
    }
    let log = mesh.ztunnel_log("n2");
    let line = log.lines().find(|l| l.contains("status 401"));
    let line = line.ok_or_else(|| {
        LocalMeshError::Failed(format!("no HBONE 401 in ztunnel n2's log:\n{log}"))
    })?;
    let error = line.find("error=").map_or(line, |i| &line[i..]);
    let _ = writeln!(out, "  ztunnel n2 access log: {error}");
    Ok(out)
}

async fn wait_sample(
    mesh: &LocalMesh,
    node: &str,
    labels: &[(&str, &str)],
) -> Result<Sample, LocalMeshError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = mesh.metrics(node).await?;
        if let Some(s) = samples(&text, OPENED)
            .into_iter()
            .find(|s| s.matches(labels))
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(LocalMeshError::Failed(format!(
                "ztunnel {node} reported no connection {labels:?}; metrics:\n{text}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
