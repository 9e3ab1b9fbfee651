//! Live inbound connections and the facts they were authorized on, so a policy update that
//! denies one closes it (upstream ztunnel's connection manager does the same).
//!
//! A connection is registered *before* its first check and re-checked if the store changed
//! while it was being checked, so no update can slip between the check and the registration.
//! A watcher task (started with the first connection) re-checks every tracked connection after
//! each store update and revokes the denied ones; their upstream streams are wrapped in
//! [`Revocable`], which then fails every read and write, ending the copy.
//!
//! Every inbound connection carries this state, so it is kept small: a revocation is a flag and
//! the waker of the task copying the connection (no cancellation-token node, no boxed future).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use mesh_core::Identity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{info, warn};

use super::{Connection, Denied, evaluate};
use crate::state::model::Workload;
use crate::state::{SharedStore, Store};

/// Registry of live inbound connections. Cheap to share; clones see the same registry.
#[derive(Debug, Clone, Default)]
pub struct ConnectionTracker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    conns: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    watching: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    src: SocketAddr,
    src_identity: Option<Arc<Identity>>,
    dst: SocketAddr,
    workload: Arc<Workload>,
    revoked: AtomicBool,
    // The task copying the connection (one task drives both directions).
    waker: AtomicWaker,
    reason: OnceLock<String>,
}

impl Entry {
    fn connection(&self) -> Connection<'_> {
        Connection {
            src_ip: self.src.ip(),
            src_identity: self.src_identity.as_deref(),
            dst: self.dst,
        }
    }

    fn revoke(&self, denied: &Denied) {
        if self.reason.set(denied.to_string()).is_ok() {
            info!(src = %self.src, dst = %self.dst, workload = %self.workload.uid,
                reason = %denied, "closing connection: a policy update denies it");
        }
        self.revoked.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

/// One admitted connection; dropping it stops tracking.
#[derive(Debug)]
pub struct TrackedConnection {
    id: u64,
    entry: Arc<Entry>,
    registry: Weak<Inner>,
}

impl TrackedConnection {
    /// Why a policy update closed the connection, if it did.
    pub fn revoked(&self) -> Option<&str> {
        self.entry.reason.get().map(String::as_str)
    }

    /// Wraps the connection's upstream so it fails once the connection is revoked.
    pub fn wrap<S>(&self, stream: S) -> Revocable<S> {
        Revocable {
            inner: stream,
            entry: self.entry.clone(),
        }
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if let Some(inner) = self.registry.upgrade() {
            inner.lock().remove(&self.id);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ConnectionTracker {
    /// Authorizes a connection from `src` (proven as `src_identity`, if mTLS) to `dst` on
    /// `workload` against the current store and, if allowed, tracks it until the returned handle
    /// is dropped.
    pub fn admit(
        &self,
        store: &Arc<SharedStore>,
        workload: Arc<Workload>,
        src: SocketAddr,
        src_identity: Option<Arc<Identity>>,
        dst: SocketAddr,
    ) -> Result<TrackedConnection, Denied> {
        self.ensure_watching(store);
        let handle = self.register(Entry {
            src,
            src_identity,
            dst,
            workload,
            revoked: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            reason: OnceLock::new(),
        });
        loop {
            let version = store.version();
            let snapshot = store.snapshot();
            let entry = &handle.entry;
            evaluate(
                snapshot.policy_store(),
                &entry.workload,
                &entry.connection(),
            )?;
            // An update that landed during the check may not have seen this entry yet.
            if store.version() == version {
                return Ok(handle);
            }
        }
    }

    fn register(&self, entry: Entry) -> TrackedConnection {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(entry);
        self.inner.lock().insert(id, entry.clone());
        TrackedConnection {
            id,
            entry,
            registry: Arc::downgrade(&self.inner),
        }
    }

    /// How many connections are tracked.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether no connection is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-checks every tracked connection against `store` and revokes the denied ones; returns
    /// how many were revoked. A connection's workload is taken from `store` when it is still
    /// there (its selector policies may have changed).
    pub fn recheck(&self, store: &Store) -> usize {
        let entries: Vec<Arc<Entry>> = self.inner.lock().values().cloned().collect();
        let mut revoked = 0;
        for entry in entries.iter().filter(|e| !e.is_revoked()) {
            let current = store.workload(&entry.workload.uid);
            let workload = current.as_deref().unwrap_or(&entry.workload);
            if let Err(denied) = evaluate(store.policy_store(), workload, &entry.connection()) {
                entry.revoke(&denied);
                revoked += 1;
            }
        }
        revoked
    }

    fn ensure_watching(&self, store: &Arc<SharedStore>) {
        if self.inner.watching.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("no runtime: policy updates will not close established connections");
            self.inner.watching.store(false, Ordering::Release);
            return;
        };
        let registry = Arc::downgrade(&self.inner);
        runtime.spawn(watch(registry, Arc::downgrade(store), store.subscribe()));
    }
}

// Ends when the tracker or the store is gone.
async fn watch(
    registry: Weak<Inner>,
    store: Weak<SharedStore>,
    mut changes: tokio::sync::watch::Receiver<u64>,
) {
    while changes.changed().await.is_ok() {
        let (Some(inner), Some(store)) = (registry.upgrade(), store.upgrade()) else {
            return;
        };
        let tracker = ConnectionTracker { inner };
        tracker.recheck(&store.snapshot());
    }
}

/// A stream that fails every read and write once its connection is revoked.
pub struct Revocable<S> {
    inner: S,
    entry: Arc<Entry>,
}

impl<S> std::fmt::Debug for Revocable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocable")
            .field("revoked", &self.entry.is_revoked())
            .finish_non_exhaustive()
    }
}

impl<S> Revocable<S> {
    // Ready with the error once revoked; otherwise registers the task to be woken on revocation.
    fn poll_revoked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let revoked = self.entry.is_revoked() || {
            // Register first, then look again: a revocation in between still wakes us.
            self.entry.waker.register(cx.waker());
            self.entry.is_revoked()
        };
        if revoked {
            let reason = self.entry.reason.get().map_or("revoked", String::as_str);
            let msg = format!("closed by a policy update: {reason}");
            return Poll::Ready(io::Error::new(io::ErrorKind::ConnectionAborted, msg));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Revocable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Revocable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.poll_revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
