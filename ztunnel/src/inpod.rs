//! In-pod mode: the node agent hands ztunnel each enrolled pod's network namespace over ZDS, and
//! ztunnel runs that pod's proxy listeners inside it.
//!
//! [`ZdsClient`] speaks the protocol (Istio's `istio.workload.zds` over the node-local
//! `SOCK_SEQPACKET` socket) and turns each request into a call on a [`WorkloadProxyManager`],
//! which owns the proxies. The client answers every request with an ack carrying the manager's
//! error text, if any (a NACK).

mod manager;
mod zds_client;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

pub use manager::{PodDump, ProxyManager};
pub use mesh_core::zds::NetnsFd;
pub use mesh_proto::zds::WorkloadInfo;
pub use zds_client::{
    DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, ZdsClient, ZdsClientConfig, ZdsClientError,
};

/// A boxed, `Send` future, so [`WorkloadProxyManager`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How an `AddWorkload` relates to what this ztunnel already runs for the uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddKind {
    /// No proxy was started for this uid (or it was deleted or drained since).
    New,
    /// The uid already runs in the same network namespace (e.g. sent again in a new snapshot).
    SameNetns,
    /// The uid runs in another namespace (the pod sandbox was recreated): drain the old proxy
    /// and start a new one.
    Replace {
        /// Inode of the namespace the running proxy uses.
        previous_inode: u64,
    },
}

impl AddKind {
    /// Classifies an add of `inode` given the inode last added successfully for the uid.
    pub fn classify(previous: Option<u64>, inode: u64) -> Self {
        match previous {
            None => Self::New,
            Some(old) if old == inode => Self::SameNetns,
            Some(previous_inode) => Self::Replace { previous_inode },
        }
    }
}

/// A validated `AddWorkload` request.
#[derive(Debug)]
pub struct WorkloadAdd {
    /// Pod uid (non-empty).
    pub uid: String,
    /// Pod identity facts, as sent by the agent.
    pub info: Option<WorkloadInfo>,
    /// The pod's network namespace (checked to be one).
    pub netns: NetnsFd,
    /// New, same or replacement.
    pub kind: AddKind,
}

/// Owns the per-pod proxies; [`ZdsClient`] calls it for every ZDS request. An `Err` becomes the
/// NACK text sent back to the node agent.
pub trait WorkloadProxyManager: Send + Sync {
    /// Start (or replace, see [`AddKind`]) the proxy for a pod.
    fn add(&self, add: WorkloadAdd) -> BoxFuture<'_, Result<(), String>>;
    /// During a snapshot: keep the pod's existing proxy (the agent has no netns fd for it).
    fn keep(&self, uid: String) -> BoxFuture<'_, Result<(), String>>;
    /// Drain and remove the pod's proxy now.
    fn del(&self, uid: String) -> BoxFuture<'_, Result<(), String>>;
    /// The snapshot is complete: drain every proxy whose uid is not in `snapshot`.
    fn snapshot_sent(&self, snapshot: HashSet<String>) -> BoxFuture<'_, Result<(), String>>;
}

#[cfg(test)]
mod tests {
    use super::AddKind;

    #[test]
    fn add_kind_classification() {
        assert_eq!(AddKind::classify(None, 7), AddKind::New);
        assert_eq!(AddKind::classify(Some(7), 7), AddKind::SameNetns);
        assert_eq!(
            AddKind::classify(Some(7), 8),
            AddKind::Replace { previous_inode: 7 }
        );
    }
}
