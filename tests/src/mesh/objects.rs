//! The Kubernetes YAML a [`Mesh`](super::Mesh) feeds istiod-lite: one file per object in its
//! config directory (`namespace.yaml`, `pod-<name>.yaml`, `service-<name>.yaml`), so a test can
//! replace or delete a single object.
//!
//! Which pods are HBONE is decided by istiod-lite's translation from the
//! `istio.io/dataplane-mode` labels, as in a real cluster: the [`NAMESPACE`] is labelled
//! `ambient`, and every unmeshed pod (`PodSpec::meshed == false`) opts out with the pod label
//! `istio.io/dataplane-mode: none`. Keeping every pod in one namespace keeps identities and
//! namespace-wide policies the same for meshed and unmeshed pods.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Result, bail};

use super::{NAMESPACE, PodSpec, ServiceSpec};

/// File (without `.yaml`) holding the [`NAMESPACE`] object.
pub const NAMESPACE_FILE: &str = "namespace";

/// The file name (without `.yaml`) of a pod's object.
pub fn pod_file(pod: &str) -> String {
    format!("pod-{pod}")
}

/// The file name (without `.yaml`) of a service's object.
pub fn service_file(service: &str) -> String {
    format!("service-{service}")
}

/// The label a service's selector matches on its endpoint pods.
pub fn backend_label(service: &str) -> String {
    format!("backend-of-{service}")
}

/// The [`NAMESPACE`] object, labelled `istio.io/dataplane-mode=ambient` when `ambient`.
pub fn namespace_yaml(ambient: bool) -> String {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {labels}}}\n")
}

/// A running, ready pod at `ip`, labelled `app=<name>`, `backend-of-<svc>=yes` for every service
/// it backs, and `istio.io/dataplane-mode=none` when unmeshed.
pub fn pod_yaml(spec: &PodSpec, ip: Ipv4Addr, services: &[ServiceSpec]) -> String {
    let mut labels = format!("app: {}", spec.name);
    if !spec.meshed {
        labels.push_str(", istio.io/dataplane-mode: none");
    }
    for svc in services.iter().filter(|s| s.endpoints.contains(&spec.name)) {
        let _ = write!(labels, ", {}: \"yes\"", backend_label(svc.name));
    }
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{{labels}}}}}
spec:
  nodeName: {node}
  serviceAccountName: {sa}
  containers: [{{name: app, image: app}}]
status:
  phase: Running
  podIP: {ip}
  podIPs: [{{ip: {ip}}}]
  conditions: [{{type: Ready, status: \"True\"}}]
",
        name = spec.name,
        node = spec.node,
        sa = spec.service_account,
    )
}

/// A ClusterIP service whose VIP is the spec's, selecting its endpoint pods by label.
pub fn service_yaml(spec: &ServiceSpec) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  clusterIP: {vip}
  selector: {{{label}: \"yes\"}}
  ports: [{{name: tcp, port: {port}, targetPort: {target}}}]
",
        name = spec.name,
        vip = spec.vip,
        label = backend_label(spec.name),
        port = spec.port,
        target = spec.target_port,
    )
}

/// Writes `<dir>/<name>.yaml` atomically (a hidden temporary file renamed into place), so the
/// directory source never reads it half-written.
pub fn write(dir: &Path, name: &str, yaml: &str) -> Result<()> {
    check_name(name)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.yaml")))?;
    Ok(())
}

/// Removes `<dir>/<name>.yaml`.
pub fn remove(dir: &Path, name: &str) -> Result<()> {
    check_name(name)?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::remove_file(&path).map_err(|e| anyhow::anyhow!("removing {}: {e}", path.display()))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("config file name {name:?} must be [A-Za-z0-9._-]+ and not start with '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mesh_core::k8s::parse_documents;

    use super::*;

    fn spec(name: &'static str, meshed: bool) -> PodSpec {
        PodSpec {
            name,
            node: "n1",
            service_account: "sa",
            meshed,
        }
    }

    fn echo() -> ServiceSpec {
        ServiceSpec {
            name: "echo",
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            target_port: 8080,
            endpoints: vec!["a"],
        }
    }

    #[test]
    fn generated_objects_parse() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        for text in [
            namespace_yaml(true),
            namespace_yaml(false),
            pod_yaml(&spec("a", true), ip, &[echo()]),
            pod_yaml(&spec("b", false), ip, &[echo()]),
            service_yaml(&echo()),
        ] {
            let parsed = parse_documents(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(parsed.objects.len(), 1, "{text}");
            assert!(parsed.warnings.is_empty(), "{:?}: {text}", parsed.warnings);
        }
        assert!(pod_yaml(&spec("a", true), ip, &[echo()]).contains("backend-of-echo: \"yes\""));
        assert!(pod_yaml(&spec("b", false), ip, &[]).contains("istio.io/dataplane-mode: none"));
    }

    #[test]
    fn file_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", ".hidden", "a/b", "../x"] {
            let err = write(dir.path(), bad, "x").unwrap_err().to_string();
            assert!(err.contains("config file name"), "{bad}: {err}");
        }
        write(dir.path(), "ok-1", "kind: x").unwrap();
        assert!(dir.path().join("ok-1.yaml").exists());
        remove(dir.path(), "ok-1").unwrap();
        let err = remove(dir.path(), "ok-1").unwrap_err().to_string();
        assert!(err.contains("ok-1.yaml"), "{err}");
    }
}
