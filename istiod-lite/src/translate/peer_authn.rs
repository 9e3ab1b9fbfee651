//! PeerAuthentication → DENY policies that refuse plaintext (istio-ambient-protocol.md §9.2).
//!
//! The effective mode of a workload is its namespace's selector policy (the oldest one whose
//! selector matches), else the namespace-wide policy, else the mesh-wide one (root namespace, no
//! selector), else permissive; `UNSET` inherits the next level. `DISABLE` counts as permissive:
//! ztunnel never refuses mTLS.
//!
//! * Effective `STRICT` → the workload lists `<root ns>/istio_converted_static_strict`, a
//!   `WORKLOAD_SELECTOR` DENY policy with `not_principals: [presence]` (no peer identity).
//! * A selector policy with `portLevelMtls` → `<ns>/converted_peer_authentication_<name>`, a DENY
//!   `not_principals: [presence]` policy limited to the strict ports (`destination_ports`), or,
//!   when the workload is strict, excluding the permissive ones (`not_destination_ports`).
//!   Port-level modes in namespace or mesh policies are ignored, as in Istio.

use std::collections::{BTreeMap, HashMap};

use mesh_core::k8s::Snapshot;
use mesh_core::k8s::istio::{MtlsMode, PeerAuthentication};
use mesh_proto::security::{Action, Authorization, Clause, Match, Rule, Scope};

use super::authz::string_match;
use super::{TranslateConfig, Translated, problem, selector_matches};

/// Name of the static policy strict workloads reference.
pub(super) const STATIC_STRICT: &str = "istio_converted_static_strict";
/// Name prefix of policies converted from port-level mTLS settings.
pub(super) const CONVERTED_PREFIX: &str = "converted_peer_authentication_";

/// PeerAuthentications organised for per-workload lookups.
pub(super) struct PeerAuthn<'a> {
    mesh: MtlsMode,
    namespaces: HashMap<&'a str, MtlsMode>,
    selectors: HashMap<&'a str, Vec<&'a PeerAuthentication>>,
    root_namespace: String,
}

fn mode(pa: &PeerAuthentication) -> MtlsMode {
    pa.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
}

fn selector(pa: &PeerAuthentication) -> Option<&BTreeMap<String, String>> {
    let labels = &pa.spec.selector.as_ref()?.match_labels;
    (!labels.is_empty()).then_some(labels)
}

impl<'a> PeerAuthn<'a> {
    /// Indexes the snapshot's PeerAuthentications; unknown fields are reported.
    pub(super) fn new(
        snapshot: &'a Snapshot,
        cfg: &TranslateConfig,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut all: Vec<&'a PeerAuthentication> = snapshot
            .list::<PeerAuthentication>()
            .map(AsRef::as_ref)
            .collect();
        // Oldest first, as Istio picks the oldest when several apply; name breaks ties.
        all.sort_by(|a, b| {
            let key = |p: &PeerAuthentication| {
                (
                    p.metadata.creation_timestamp.clone().map(|t| t.0),
                    p.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut this = Self {
            mesh: MtlsMode::Unset,
            namespaces: HashMap::new(),
            selectors: HashMap::new(),
            root_namespace: cfg.root_namespace.clone(),
        };
        for pa in all {
            let ns = pa.metadata.namespace.as_deref().unwrap_or_default();
            report_unknown(pa, ns, problems);
            if selector(pa).is_some() {
                this.selectors.entry(ns).or_default().push(pa);
            } else if ns == cfg.root_namespace {
                if this.mesh == MtlsMode::Unset {
                    this.mesh = mode(pa);
                }
            } else {
                this.namespaces.entry(ns).or_insert(mode(pa));
            }
        }
        this
    }

    /// The policies a workload in `namespace` with `labels` must list, adding any converted
    /// policy to `out.authorizations`.
    pub(super) fn policies_for(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
        out: &mut Translated,
    ) -> Vec<String> {
        let base = match self.namespaces.get(namespace).copied().unwrap_or_default() {
            MtlsMode::Unset => self.mesh,
            m => m,
        };
        let selected = self.selectors.get(namespace).and_then(|list| {
            list.iter()
                .find(|pa| selector(pa).is_some_and(|s| selector_matches(s, labels)))
        });
        let Some(pa) = selected else {
            return self.static_strict(base, out);
        };
        let workload = match mode(pa) {
            MtlsMode::Unset => base,
            m => m,
        };
        match converted(pa, workload, &mut out.problems) {
            Converted::None => Vec::new(),
            Converted::Static => self.static_strict(MtlsMode::Strict, out),
            Converted::Policy(auth) => {
                let key = format!("{}/{}", auth.namespace, auth.name);
                out.authorizations.insert(key.clone(), auth);
                vec![key]
            }
        }
    }

    fn static_strict(&self, mode: MtlsMode, out: &mut Translated) -> Vec<String> {
        if mode != MtlsMode::Strict {
            return Vec::new();
        }
        let auth = deny_plaintext(&self.root_namespace, STATIC_STRICT, Match::default());
        let key = format!("{}/{STATIC_STRICT}", self.root_namespace);
        out.authorizations.entry(key.clone()).or_insert(auth);
        vec![key]
    }
}

fn report_unknown(pa: &PeerAuthentication, ns: &str, problems: &mut Vec<String>) {
    if !pa.unknown_fields.is_empty() {
        let name = pa.metadata.name.as_deref().unwrap_or_default();
        let fields = pa.unknown_fields.join(", ");
        let msg = format!("unsupported fields ignored: {fields}");
        problems.push(problem("PeerAuthentication", ns, name, msg));
    }
}

enum Converted {
    None,
    Static,
    Policy(Authorization),
}

fn converted(pa: &PeerAuthentication, workload: MtlsMode, problems: &mut Vec<String>) -> Converted {
    let ns = pa.metadata.namespace.as_deref().unwrap_or_default();
    let name = pa.metadata.name.as_deref().unwrap_or_default();
    let (mut strict, mut lax) = (Vec::new(), Vec::new());
    for (port, setting) in &pa.spec.port_level_mtls {
        let Some(port) = port.parse::<u16>().ok().filter(|&p| p != 0) else {
            problems.push(problem(
                "PeerAuthentication",
                ns,
                name,
                format!("portLevelMtls key {port:?} is not a valid port; ignored"),
            ));
            continue;
        };
        let effective = if setting.mode == MtlsMode::Unset {
            workload
        } else {
            setting.mode
        };
        if effective == MtlsMode::Strict {
            strict.push(u32::from(port))
        } else {
            lax.push(u32::from(port))
        }
    }
    let converted_name = format!("{CONVERTED_PREFIX}{name}");
    let only_ports = |ports, not_ports| Match {
        destination_ports: ports,
        not_destination_ports: not_ports,
        ..Match::default()
    };
    match (
        workload == MtlsMode::Strict,
        strict.is_empty(),
        lax.is_empty(),
    ) {
        (true, _, true) => Converted::Static,
        (true, _, false) => Converted::Policy(deny_plaintext(
            ns,
            &converted_name,
            only_ports(Vec::new(), lax),
        )),
        (false, true, _) => Converted::None,
        (false, false, _) => Converted::Policy(deny_plaintext(
            ns,
            &converted_name,
            only_ports(strict, Vec::new()),
        )),
    }
}

/// A selector-scoped DENY of connections without a peer identity, further limited by `extra`.
fn deny_plaintext(namespace: &str, name: &str, extra: Match) -> Authorization {
    let matches = vec![Match {
        not_principals: vec![string_match("*")],
        ..extra
    }];
    Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: Scope::WorkloadSelector as i32,
        action: Action::Deny as i32,
        rules: vec![Rule {
            clauses: vec![Clause { matches }],
        }],
        dry_run: false,
        extensions: Vec::new(),
    }
}
