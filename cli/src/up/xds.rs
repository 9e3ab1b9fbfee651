//! What each ztunnel received from istiod-lite over delta xDS, read from its `/config_dump`.

use std::fmt::Write as _;

use serde_json::Value;

use crate::localmesh::{LocalMesh, LocalMeshError, XdsSummary};

/// Per node: the xDS stream state (connected, resources per type, ACKed nonces), the workloads
/// with their tunnel protocol and identity, the services with their endpoints, the policies.
pub(super) async fn config_evidence(mesh: &LocalMesh) -> Result<String, LocalMeshError> {
    let mut out = String::from(
        "\nconfig pushed by istiod-lite over delta xDS (ztunnel /config_dump of each node):\n",
    );
    for (node, _) in mesh.node_netns() {
        let dump = mesh.config_dump(&node).await?;
        let xds = XdsSummary::from_dump(&dump).ok_or_else(|| {
            LocalMeshError::Failed(format!("{node}: ztunnel is not configured over xDS"))
        })?;
        if !xds.connected || !xds.all_acked() {
            return Err(LocalMeshError::Failed(format!(
                "{node}: xDS not in sync: {xds}"
            )));
        }
        let _ = writeln!(out, "  ztunnel {node}: {xds}");
        out.push_str(&describe(&dump));
    }
    Ok(out)
}

fn describe(dump: &Value) -> String {
    let empty = Vec::new();
    let workloads = dump["workloads"].as_array().unwrap_or(&empty);
    let mut out = String::new();
    for w in workloads {
        let _ = writeln!(
            out,
            "    workload {:<8} node {} {:<5} {}",
            text(&w["name"]),
            text(&w["node"]),
            text(&w["protocol"]),
            text(&w["identity"])
        );
    }
    for svc in dump["services"].as_array().unwrap_or(&empty) {
        let key = format!("{}/{}", text(&svc["namespace"]), text(&svc["hostname"]));
        let vips: Vec<&str> = svc["vips"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|v| text(&v["address"]))
            .collect();
        let endpoints: Vec<String> = workloads
            .iter()
            .filter(|w| w["services"].get(&key).is_some())
            .map(|w| format!("{} ({})", text(&w["name"]), text(&w["node"])))
            .collect();
        let _ = writeln!(
            out,
            "    service  {} vip {} ports {} endpoints {}",
            text(&svc["hostname"]),
            vips.join(","),
            svc["ports"],
            endpoints.join(", ")
        );
    }
    for policy in dump["policies"].as_array().unwrap_or(&empty) {
        let _ = writeln!(
            out,
            "    policy   {}/{} {} scope {} ({} rules)",
            text(&policy["namespace"]),
            text(&policy["name"]),
            text(&policy["action"]),
            text(&policy["scope"]),
            policy["rules"].as_array().map_or(0, Vec::len)
        );
    }
    out
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn describes_workloads_services_with_endpoints_and_policies() {
        let dump = json!({
            "workloads": [
                {"name": "s1", "node": "n1", "protocol": "HBONE", "identity": "spiffe://x",
                 "services": {"demo/web.demo.svc.cluster.local": {"80": 8000}}},
                {"name": "p", "node": "n2", "protocol": "TCP", "identity": "spiffe://y",
                 "services": {}},
            ],
            "services": [{"namespace": "demo", "hostname": "web.demo.svc.cluster.local",
                          "vips": [{"network": "", "address": "10.96.0.10"}],
                          "ports": {"80": 0}}],
            "policies": [{"namespace": "demo", "name": "p", "action": "Allow",
                          "scope": "WorkloadSelector", "rules": [[], []]}],
        });
        let text = describe(&dump);
        assert!(
            text.contains("workload s1       node n1 HBONE spiffe://x"),
            "{text}"
        );
        assert!(
            text.contains("vip 10.96.0.10 ports {\"80\":0} endpoints s1 (n1)\n"),
            "{text}"
        );
        assert!(text.contains("policy   demo/p Allow scope WorkloadSelector (2 rules)"));
    }
}
