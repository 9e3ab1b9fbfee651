//! The xDS connection state shown in `/config_dump`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::apply::XdsType;

/// Per-type state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TypeStatus {
    /// Whether at least one response of this type was applied since start.
    pub received: bool,
    /// Nonce of the last response handled (ACKed, or partially applied and NACKed).
    pub last_nonce: Option<String>,
    /// Whether that response was ACKed.
    pub last_acked: bool,
    /// Nonce of the last response ACKed.
    pub last_acked_nonce: Option<String>,
    /// The last NACK's error message.
    pub last_nack_error: Option<String>,
    /// `system_version_info` of the last response.
    pub system_version: String,
    /// Name → version of every applied resource.
    pub versions: super::apply::Versions,
}

/// A copy of the client's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct XdsStatusSnapshot {
    /// The ADS server.
    pub address: String,
    /// Whether a stream is open now.
    pub connected: bool,
    /// Streams opened since start.
    pub connections: u64,
    /// Why the last stream ended or failed to open.
    pub last_error: Option<String>,
    /// State per type URL.
    pub types: BTreeMap<String, TypeStatus>,
}

/// The client's state, shared with the admin server. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct XdsStatus(Arc<Mutex<XdsStatusSnapshot>>);

impl XdsStatus {
    pub(super) fn new(address: &str) -> Self {
        let s = XdsStatusSnapshot {
            address: address.to_string(),
            ..Default::default()
        };
        Self(Arc::new(Mutex::new(s)))
    }

    /// The current state.
    pub fn snapshot(&self) -> XdsStatusSnapshot {
        self.lock().clone()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut XdsStatusSnapshot)) {
        f(&mut self.lock());
    }

    pub(super) fn update_type(&self, ty: XdsType, f: impl FnOnce(&mut TypeStatus)) {
        let mut s = self.lock();
        f(s.types.entry(ty.type_url().to_string()).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XdsStatusSnapshot> {
        // A panic mid-update leaves plain data behind, still worth showing.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
