//! L4 authorization of inbound connections (Istio's `AuthorizationPolicy` minus CUSTOM/AUDIT).
//!
//! The policies that apply to a destination workload are the GLOBAL ones, the NAMESPACE ones of
//! its namespace and the selector ones it lists in `authorization_policies` (unknown names are
//! skipped). Dry-run policies are only logged. Then: any matching DENY denies; otherwise, if
//! there is an ALLOW policy, one of them must match; otherwise the connection is allowed.
//!
//! [`ConnectionTracker`] re-checks live inbound connections whenever the store changes and
//! closes the ones a new policy denies.

mod tracker;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use mesh_core::Identity;
use tracing::{debug, info};

use crate::state::model::Workload;
use crate::state::policy::{Action, Clause, Match, Policy, PolicyRef, PolicyStore};

pub use tracker::{ConnectionTracker, Revocable, TrackedConnection};

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A DENY policy matched.
    #[error("denied by policy {0}")]
    DenyPolicy(String),
    /// ALLOW policies apply and none matched.
    #[error("no allow policy matched (applicable: {0})")]
    NoAllowMatch(String),
}

/// The facts a decision is made on.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's IP (the TCP peer).
    pub src_ip: IpAddr,
    /// The client's proven identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The destination: the pod's IP and the (target) port the app listens on.
    pub dst: SocketAddr,
}

// The attributes policies compare, derived once per evaluation.
struct Attrs<'a> {
    principal: Option<String>,
    identity: Option<&'a Identity>,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
}

impl<'a> Attrs<'a> {
    fn new(c: &Connection<'a>) -> Self {
        let principal = c.src_identity.map(|id| {
            let s = id.to_string();
            s.strip_prefix("spiffe://").map(str::to_string).unwrap_or(s)
        });
        Self {
            principal,
            identity: c.src_identity,
            src_ip: c.src_ip.to_canonical(),
            dst_ip: c.dst.ip().to_canonical(),
            dst_port: c.dst.port(),
        }
    }
}

/// Decides on a connection to `workload`.
pub fn evaluate(
    policies: &PolicyStore,
    workload: &Workload,
    conn: &Connection<'_>,
) -> Result<(), Denied> {
    // The common case, checked without allocating: nothing applies to this workload.
    if workload.authorization_policies.is_empty()
        && policies.none_for_namespace(&workload.namespace)
    {
        return Ok(());
    }
    let attrs = Attrs::new(conn);
    let mut allows = Vec::new();
    let mut allowed = false;
    for p in applicable(policies, workload) {
        let matched = policy_matches(&p, &attrs);
        if p.dry_run {
            log_dry_run(&p, matched, conn);
            continue;
        }
        match p.action {
            Action::Deny if matched => return Err(Denied::DenyPolicy(p.key())),
            Action::Deny => {}
            Action::Allow => {
                allowed |= matched;
                allows.push(p.key());
            }
        }
    }
    if allows.is_empty() || allowed {
        Ok(())
    } else {
        Err(Denied::NoAllowMatch(allows.join(", ")))
    }
}

/// The policies that apply to `workload`, each once, in a stable order.
pub fn applicable(policies: &PolicyStore, workload: &Workload) -> Vec<PolicyRef> {
    let mut keys: Vec<&str> = policies
        .global_keys()
        .chain(policies.namespace_keys(&workload.namespace))
        .collect();
    for key in &workload.authorization_policies {
        if policies.get(key).is_none() {
            // Usually transient (the workload arrived before its policy); upstream skips too.
            debug!(workload = %workload.uid, policy = %key, "selected policy is unknown, skipped");
        }
        keys.push(key);
    }
    keys.sort_unstable();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| policies.get(k).cloned())
        .collect()
}

fn log_dry_run(p: &Policy, matched: bool, conn: &Connection<'_>) {
    let would_deny = match p.action {
        Action::Deny => matched,
        Action::Allow => !matched,
    };
    let src = conn.src_identity.map(ToString::to_string);
    if would_deny {
        info!(policy = %p.key(), src.ip = %conn.src_ip, src.identity = src, dst = %conn.dst,
            "dry-run policy would deny this connection");
    } else {
        debug!(policy = %p.key(), matched, "dry-run policy evaluated");
    }
}

fn policy_matches(p: &Policy, a: &Attrs<'_>) -> bool {
    // Rules OR; a rule's clauses AND (no clauses: matches).
    p.rules
        .iter()
        .any(|r| r.clauses.iter().all(|c| clause_matches(c, a)))
}

fn clause_matches(c: &Clause, a: &Attrs<'_>) -> bool {
    // Matches OR (no matches: matches); an empty match is skipped, it never matches.
    c.matches.is_empty() || c.matches.iter().any(|m| !m.is_empty() && match_holds(m, a))
}

/// Every set group holds: a positive list needs one hit, a `not_` list none.
fn group<T>(pos: &[T], neg: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&hit)) && !neg.iter().any(&hit)
}

fn match_holds(m: &Match, a: &Attrs<'_>) -> bool {
    let namespace = a.identity.map(Identity::namespace);
    let principal = a.principal.as_deref();
    let in_net = |ip: IpAddr| move |n: &IpNet| n.contains(&ip);
    group(&m.namespaces, &m.not_namespaces, |s| s.matches(namespace))
        && group(&m.principals, &m.not_principals, |s| s.matches(principal))
        && group(&m.service_accounts, &m.not_service_accounts, |sa| {
            a.identity.is_some_and(|id| {
                id.namespace() == sa.namespace && id.service_account() == sa.service_account
            })
        })
        && group(&m.source_ips, &m.not_source_ips, in_net(a.src_ip))
        && group(&m.destination_ips, &m.not_destination_ips, in_net(a.dst_ip))
        && group(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == a.dst_port
        })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
