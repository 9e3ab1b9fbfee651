//! ztunnel's traffic metrics (Istio's `istio_tcp_*` names and labels) and access logs.
//!
//! Every proxied connection holds a [`ConnectionGuard`]: it records the connection as opened once
//! its labels are known, and on drop records it as closed with its byte counts and emits the
//! connection's single access-log event (`target: "access"`). Early returns therefore still count.
//!
//! Metrics go to a recorder owned by the app (no global registry), so tests can read them with a
//! debugging recorder and the admin server renders the Prometheus one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::hbone::ErrorKind;
use metrics::{Counter, Key, Label, Metadata, Recorder, SharedString, Unit};

use crate::state::model::Workload;

/// Connections opened.
pub const TCP_CONNECTIONS_OPENED: &str = "istio_tcp_connections_opened_total";
/// Connections closed.
pub const TCP_CONNECTIONS_CLOSED: &str = "istio_tcp_connections_closed_total";
/// Bytes sent from the server to the client (the response direction).
pub const TCP_SENT_BYTES: &str = "istio_tcp_sent_bytes_total";
/// Bytes received from the client by the server (the request direction).
pub const TCP_RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";

/// Established connections closed because a policy update denies them (ztunnel-specific; the
/// `istio_tcp_*` close of such a connection keeps the labels it was opened with, so opened and
/// closed pair up, while this counter carries `response_flags="DENY"`).
pub const TCP_CONNECTIONS_REVOKED: &str = "ztunnel_tcp_connections_revoked_total";

/// Pod proxies running now (in-pod mode; upstream's name).
pub const ACTIVE_PROXIES: &str = "workload_manager_active_proxy_count";
/// Pod proxies started.
pub const PROXIES_STARTED: &str = "workload_manager_proxies_started_total";
/// Pod proxies stopped (deleted, replaced, dropped from a snapshot, or at shutdown).
pub const PROXIES_STOPPED: &str = "workload_manager_proxies_stopped_total";

/// Target of the access-log events.
pub const ACCESS_LOG_TARGET: &str = "access";

/// The value of every label nobody knows.
pub const UNKNOWN: &str = "unknown";

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Which proxy reports a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The source pod's proxy (outbound).
    Source,
    /// The destination pod's proxy (inbound).
    Destination,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Whether the connection was carried over mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// HBONE.
    MutualTls,
    /// Plain TCP.
    Unknown,
}

impl SecurityPolicy {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::Unknown => "unknown",
        }
    }
}

/// Who one side of a connection is.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// Workload name (the owning controller's, else the pod's).
    pub workload: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// SPIFFE identity, when proven (mTLS) or known.
    pub principal: Option<String>,
}

impl Peer {
    /// What the store says about a workload, with its identity as principal.
    pub fn from_workload(w: &Workload) -> Self {
        let name = if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        };
        Self {
            workload: Some(name.to_string()),
            namespace: Some(w.namespace.to_string()),
            principal: Some(w.identity.to_string()),
        }
    }
}

/// Describes every metric of this module on `recorder`.
pub fn describe(recorder: &dyn Recorder) {
    let d = |name: &'static str, unit: Unit, help: &'static str| {
        recorder.describe_counter(name.into(), Some(unit), SharedString::const_str(help));
    };
    d(
        TCP_CONNECTIONS_OPENED,
        Unit::Count,
        "TCP connections opened",
    );
    d(
        TCP_CONNECTIONS_CLOSED,
        Unit::Count,
        "TCP connections closed",
    );
    d(
        TCP_SENT_BYTES,
        Unit::Bytes,
        "Bytes sent by the server to the client",
    );
    d(
        TCP_RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes received by the server from the client",
    );
    d(
        TCP_CONNECTIONS_REVOKED,
        Unit::Count,
        "Established connections closed because a policy update denies them",
    );
}

/// The traffic metrics, recorded into the app's recorder.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<dyn Recorder + Send + Sync>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Metrics recorded into `recorder` (describes them first).
    pub fn new(recorder: Arc<dyn Recorder + Send + Sync>) -> Self {
        describe(&*recorder);
        Self { recorder }
    }

    fn counter(&self, name: &'static str, labels: &[Label]) -> Counter {
        let key = Key::from_parts(name, labels.to_vec());
        self.recorder.register_counter(&key, &METADATA)
    }

    /// Records a pod proxy start; `active` is how many run now.
    pub fn proxy_started(&self, active: usize) {
        self.counter(PROXIES_STARTED, &[]).increment(1);
        self.active_proxies(active);
    }

    /// Records a pod proxy stop; `active` is how many run now.
    pub fn proxy_stopped(&self, active: usize) {
        self.counter(PROXIES_STOPPED, &[]).increment(1);
        self.active_proxies(active);
    }

    fn active_proxies(&self, active: usize) {
        let key = Key::from_name(ACTIVE_PROXIES);
        self.recorder
            .register_gauge(&key, &METADATA)
            .set(active as f64);
    }

    /// Starts tracking one connection.
    pub fn connection(
        &self,
        reporter: Reporter,
        direction: &'static str,
        src: SocketAddr,
    ) -> ConnectionGuard {
        ConnectionGuard {
            metrics: self.clone(),
            reporter,
            direction,
            start: Instant::now(),
            src_addr: src,
            source: Peer::default(),
            destination: Peer::default(),
            dst_addr: None,
            hbone_addr: None,
            service: None,
            security: SecurityPolicy::Unknown,
            opened: None,
            received: 0,
            sent: 0,
            error: None,
        }
    }
}

/// The counters a connection's close increments, resolved when it opened.
#[derive(Debug)]
struct CloseCounters {
    closed: Counter,
    received: Counter,
    sent: Counter,
}

/// One connection's labels, byte counts and outcome. Dropping it records the close.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Metrics,
    reporter: Reporter,
    direction: &'static str,
    start: Instant,
    src_addr: SocketAddr,
    source: Peer,
    destination: Peer,
    dst_addr: Option<SocketAddr>,
    hbone_addr: Option<SocketAddr>,
    service: Option<String>,
    security: SecurityPolicy,
    // The close-time counters, registered with the labels the open was recorded with (a few
    // shared handles rather than a copy of the labels for every connection).
    opened: Option<Box<CloseCounters>>,
    received: u64,
    sent: u64,
    error: Option<(Option<ErrorKind>, String)>,
}

impl ConnectionGuard {
    /// Sets who the client is.
    pub fn source(&mut self, peer: Peer) -> &mut Self {
        self.source = peer;
        self
    }

    /// Sets who the server is.
    pub fn destination(&mut self, peer: Peer) -> &mut Self {
        self.destination = peer;
        self
    }

    /// Sets the destination address (as resolved) and, for HBONE, the tunnel's address.
    pub fn addresses(&mut self, dst: SocketAddr, hbone: Option<SocketAddr>) -> &mut Self {
        self.dst_addr = Some(dst);
        self.hbone_addr = hbone;
        self
    }

    /// Sets the destination service hostname.
    pub fn service(&mut self, hostname: Option<String>) -> &mut Self {
        self.service = hostname;
        self
    }

    /// Sets whether the connection is carried over mTLS.
    pub fn security(&mut self, policy: SecurityPolicy) -> &mut Self {
        self.security = policy;
        self
    }

    /// Records the open (once); call when the upstream is connected.
    pub fn established(&mut self) {
        if self.opened.is_none() {
            let labels = self.labels();
            let m = &self.metrics;
            m.counter(TCP_CONNECTIONS_OPENED, &labels).increment(1);
            self.opened = Some(Box::new(CloseCounters {
                closed: m.counter(TCP_CONNECTIONS_CLOSED, &labels),
                received: m.counter(TCP_RECEIVED_BYTES, &labels),
                sent: m.counter(TCP_SENT_BYTES, &labels),
            }));
        }
    }

    /// Records bytes moved: `received` from the client, `sent` to it.
    pub fn bytes(&mut self, received: u64, sent: u64) {
        self.received = received;
        self.sent = sent;
    }

    /// Records why the connection failed; `kind` (if any) becomes `response_flags`.
    pub fn fail(&mut self, kind: Option<ErrorKind>, error: impl std::fmt::Display) {
        self.error = Some((kind, error.to_string()));
    }

    /// The `response_flags` value: the failure kind, or `-`.
    fn response_flags(&self) -> &'static str {
        match &self.error {
            Some((Some(kind), _)) => kind.as_str(),
            _ => "-",
        }
    }

    fn labels(&self) -> Vec<Label> {
        let v = |o: &Option<String>| o.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let flags = self.response_flags();
        vec![
            Label::new("reporter", self.reporter.as_str()),
            Label::new("source_workload", v(&self.source.workload)),
            Label::new("source_workload_namespace", v(&self.source.namespace)),
            Label::new("source_principal", v(&self.source.principal)),
            Label::new("destination_workload", v(&self.destination.workload)),
            Label::new(
                "destination_workload_namespace",
                v(&self.destination.namespace),
            ),
            Label::new("destination_principal", v(&self.destination.principal)),
            Label::new("destination_service", v(&self.service)),
            Label::new("request_protocol", "tcp"),
            Label::new("response_flags", flags),
            Label::new("connection_security_policy", self.security.as_str()),
        ]
    }

    fn access_log(&self) {
        let opt = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        let error = self.error.as_ref().map(|(_, e)| e.as_str());
        tracing::event!(
            target: ACCESS_LOG_TARGET,
            tracing::Level::INFO,
            src.addr = %self.src_addr,
            src.workload = self.source.workload.as_deref(),
            src.identity = self.source.principal.as_deref(),
            dst.addr = opt(self.dst_addr),
            dst.hbone_addr = opt(self.hbone_addr),
            dst.service = self.service.as_deref(),
            dst.workload = self.destination.workload.as_deref(),
            dst.identity = self.destination.principal.as_deref(),
            direction = self.direction,
            bytes_sent = self.sent,
            bytes_recv = self.received,
            duration = ?self.start.elapsed(),
            connection_security_policy = self.security.as_str(),
            response_flags = self.response_flags(),
            error = error,
            "connection complete"
        );
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        // A connection that failed before it was established is counted with its final labels
        // (including response_flags), so opened and closed always pair up.
        let revoked =
            self.opened.is_some() && matches!(self.error, Some((Some(ErrorKind::Denied), _)));
        self.established();
        if let Some(close) = self.opened.take() {
            close.closed.increment(1);
            close.received.increment(self.received);
            close.sent.increment(self.sent);
        }
        if revoked {
            self.metrics
                .counter(TCP_CONNECTIONS_REVOKED, &self.labels())
                .increment(1);
        }
        self.access_log();
    }
}

#[cfg(test)]
mod tests;
