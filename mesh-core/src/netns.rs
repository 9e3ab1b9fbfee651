//! Linux network namespaces: validated handles and a long-lived worker thread per namespace.
//!
//! In in-pod mode ztunnel runs in the node's namespace but opens its listeners (15001, 15006,
//! 15008) *inside* every enrolled pod's namespace and makes its upstream connections from there
//! too. Two kernel facts shape this module:
//!
//! * `setns(2)` with `CLONE_NEWNET` moves only the **calling thread**. Doing it on a tokio worker
//!   would silently move every task that later runs there, so it is only ever done on a thread
//!   this module owns.
//! * A socket keeps the namespace it was created in for its whole life, so a socket created on
//!   such a thread can then be used from any tokio worker.
//!
//! Upstream sockets are created per connection, and spawning a thread per socket costs tens of
//! microseconds plus a `setns`. A [`NetnsHandle`] therefore owns **one worker thread** that enters
//! the namespace once and then runs socket-creation closures sent to it over a channel: one
//! channel round trip per socket, no thread spawn. Closures must be short and must not block
//! (create and configure sockets; connect and accept happen later on tokio).
//!
//! Handles are validated before use: the fd must be on nsfs (`fstatfs`) and of the network type
//! (its `/proc/self/fd` link, then the kernel's own check in `setns`).
//!
//! No `unsafe` is needed here: `nix` wraps `setns` and `fstatfs` safely.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle, ThreadId};

use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use nix::sys::statfs::{NSFS_MAGIC, fstatfs};
use tokio::sync::oneshot;

/// The calling thread's own network namespace file (per thread, unlike `/proc/self/ns/net`).
pub const THREAD_NETNS_PATH: &str = "/proc/thread-self/ns/net";

/// Name given to every namespace worker thread (visible in `top -H`, `/proc/PID/task/*/comm`).
const WORKER_THREAD_NAME: &str = "netns-worker";

/// A unit of work for the namespace worker; it reports its own result.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// Errors from opening, validating or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// Path that was opened.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The fd could not be inspected (`fstat` or the `/proc/self/fd` link failed).
    #[error("cannot inspect fd {fd} to check that it is a network namespace: {source}")]
    Inspect {
        /// The fd number.
        fd: RawFd,
        /// Underlying error.
        source: io::Error,
    },
    /// The fd refers to something other than a network namespace.
    #[error("fd {fd} is not a network namespace: it refers to {found}")]
    NotNetns {
        /// The fd number.
        fd: RawFd,
        /// What `/proc/self/fd/N` points at, e.g. `mnt:[4026531841]` or a file path.
        found: String,
    },
    /// The namespace fd could not be duplicated for the worker thread.
    #[error("cannot duplicate fd of netns {inode}: {source}")]
    Dup {
        /// Namespace inode.
        inode: u64,
        /// Underlying error.
        source: io::Error,
    },
    /// The worker thread could not be started.
    #[error("cannot start worker thread for netns {inode}: {source}")]
    Spawn {
        /// Namespace inode.
        inode: u64,
        /// Underlying error.
        source: io::Error,
    },
    /// `setns(2)` failed, typically for lack of CAP_SYS_ADMIN.
    #[error("setns into netns {inode} failed (needs CAP_SYS_ADMIN): {source}")]
    Setns {
        /// Namespace inode.
        inode: u64,
        /// Underlying error.
        source: nix::Error,
    },
    /// The worker thread is gone (it exited before running the job).
    #[error("worker thread of netns {inode} has stopped")]
    WorkerGone {
        /// Namespace inode.
        inode: u64,
    },
}

/// An open, validated network namespace with its own worker thread.
///
/// Cheap to clone (clones share the fd and the worker). While any clone lives, the namespace
/// stays alive even if its name was deleted (`ip netns del`) or the pod's processes exited: drop
/// every clone when the pod is removed. Dropping the last clone stops the worker and waits for it,
/// after it has run the jobs already queued.
#[derive(Clone)]
pub struct NetnsHandle {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    inode: u64,
    // Both are `Option` only so that `Drop` can close the channel before joining the thread.
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

/// Inode of the calling thread's network namespace; equal inodes mean the same namespace.
pub fn current_thread_inode() -> io::Result<u64> {
    Ok(std::fs::metadata(THREAD_NETNS_PATH)?.ino())
}

/// Checks that `file` is a namespace that can be a network namespace, and returns its inode and
/// what `/proc/self/fd/N` points at.
///
/// A namespace fd lives on nsfs. Opened from `/proc/PID/ns/net` its link reads `net:[INODE]`
/// (other types use their own prefix and are rejected here), but opened through a bind mount
/// such as `/run/netns/NAME` the link is that path. The namespace *type* is then only known to
/// the kernel, and `setns(fd, CLONE_NEWNET)` on the worker rejects the wrong type with EINVAL;
/// [`NetnsHandle::from_fd`] reports that as [`NetnsError::NotNetns`] too.
fn validate(file: &File) -> Result<(u64, String), NetnsError> {
    let fd = file.as_raw_fd();
    let inspect = |source| NetnsError::Inspect { fd, source };
    let inode = file.metadata().map_err(inspect)?.ino();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(inspect)?;
    let link = link.to_string_lossy().into_owned();
    let fs = fstatfs(file).map_err(|e| inspect(e.into()))?;
    let not_netns = |found: String| Err(NetnsError::NotNetns { fd, found });
    if fs.filesystem_type() != NSFS_MAGIC {
        return not_netns(link);
    }
    match link.split_once(":[") {
        Some(("net", _)) | None => Ok((inode, link)),
        Some(_) => not_netns(link),
    }
}

impl NetnsHandle {
    /// Opens a namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`, validates it and
    /// starts its worker thread.
    ///
    /// Blocks for one thread start (tens of microseconds).
    pub fn open(path: &Path) -> Result<NetnsHandle, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        NetnsHandle::from_fd(file)
    }

    /// Takes ownership of a namespace fd (e.g. one received over SCM_RIGHTS), validates it and
    /// starts its worker thread. A fd that is not a network namespace is rejected.
    pub fn from_fd(fd: impl Into<OwnedFd>) -> Result<NetnsHandle, NetnsError> {
        let file = File::from(fd.into());
        let (inode, link) = validate(&file)?;
        let worker_fd = file
            .try_clone()
            .map_err(|source| NetnsError::Dup { inode, source })?;
        let (jobs, worker) = match start_worker(worker_fd.into(), inode) {
            Err(NetnsError::Setns {
                source: Errno::EINVAL,
                ..
            }) => {
                return Err(NetnsError::NotNetns {
                    fd: file.as_raw_fd(),
                    found: format!("{link}, a namespace of another type"),
                });
            }
            other => other?,
        };
        Ok(NetnsHandle {
            inner: Arc::new(Inner {
                file,
                inode,
                jobs: Some(jobs),
                worker: Some(worker),
            }),
        })
    }

    /// A handle on the calling thread's current namespace (the node's, for ztunnel).
    ///
    /// Also a startup self-check: it fails if the process cannot `setns`.
    pub fn current() -> Result<NetnsHandle, NetnsError> {
        NetnsHandle::open(Path::new(THREAD_NETNS_PATH))
    }

    /// The namespace's inode number: its identity (two handles with the same inode refer to the
    /// same namespace).
    pub fn inode(&self) -> u64 {
        self.inner.inode
    }

    /// Runs `f` on the namespace's worker thread and waits for the result.
    ///
    /// Blocks the caller for one channel round trip plus `f`; from async code prefer
    /// [`run_in_async`](Self::run_in_async). The caller's own namespace never changes. A panic
    /// inside `f` is re-raised here; the worker survives it. Called from inside a job on the same
    /// worker, `f` runs inline (the thread is already in the namespace).
    pub fn run_in<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        if self.on_worker() {
            return Ok(f());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            // The caller may have given up waiting; nothing to do then.
            let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(f)));
        }))?;
        match rx.recv() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(payload)) => panic::resume_unwind(payload),
            Err(_) => Err(self.gone()),
        }
    }

    /// Async form of [`run_in`](Self::run_in): the calling task waits without blocking its
    /// thread. `f` returns everything it creates (e.g. several sockets) in one hop.
    pub async fn run_in_async<F, R>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(f)));
        }))?;
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(payload)) => panic::resume_unwind(payload),
            Err(_) => Err(self.gone()),
        }
    }

    fn submit(&self, job: Job) -> Result<(), NetnsError> {
        let jobs = self.inner.jobs.as_ref().ok_or_else(|| self.gone())?;
        jobs.send(job).map_err(|_| self.gone())
    }

    fn on_worker(&self) -> bool {
        self.inner.worker_id() == Some(thread::current().id())
    }

    fn gone(&self) -> NetnsError {
        NetnsError::WorkerGone {
            inode: self.inner.inode,
        }
    }
}

impl AsFd for NetnsHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsHandle")
            .field("inode", &self.inner.inode)
            .field("fd", &self.inner.file.as_raw_fd())
            .finish()
    }
}

impl Inner {
    fn worker_id(&self) -> Option<ThreadId> {
        self.worker.as_ref().map(|w| w.thread().id())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop once the queued jobs ran.
        drop(self.jobs.take());
        let Some(worker) = self.worker.take() else {
            return;
        };
        // The last clone may be dropped by a job on the worker itself; joining would deadlock.
        if worker.thread().id() != thread::current().id() {
            // Jobs catch their own panics, so the worker cannot have panicked.
            let _ = worker.join();
        }
    }
}

/// Starts the worker thread and waits until it has entered the namespace (or failed to).
fn start_worker(
    fd: OwnedFd,
    inode: u64,
) -> Result<(mpsc::Sender<Job>, JoinHandle<()>), NetnsError> {
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let worker = thread::Builder::new()
        .name(WORKER_THREAD_NAME.into())
        .spawn(move || worker_main(fd, inode, &ready_tx, jobs_rx))
        .map_err(|source| NetnsError::Spawn { inode, source })?;
    let entered = ready_rx
        .recv()
        .unwrap_or(Err(NetnsError::WorkerGone { inode }));
    match entered {
        Ok(()) => Ok((jobs_tx, worker)),
        Err(e) => {
            let _ = worker.join();
            Err(e)
        }
    }
}

fn worker_main(
    fd: OwnedFd,
    inode: u64,
    ready: &mpsc::SyncSender<Result<(), NetnsError>>,
    jobs: mpsc::Receiver<Job>,
) {
    let entered =
        setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Setns { inode, source });
    // The thread itself now holds the namespace; its fd copy is no longer needed.
    drop(fd);
    let ok = entered.is_ok();
    let _ = ready.send(entered);
    if !ok {
        return;
    }
    tracing::debug!(netns = inode, "netns worker started");
    for job in jobs {
        job();
    }
    tracing::debug!(netns = inode, "netns worker stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require_setns() -> bool {
        mesh_testbed::require_netns()
    }

    #[test]
    fn rejects_fds_that_are_not_network_namespaces() {
        let cases: [(&str, &str); 3] = [
            ("/proc/self/status", "/proc/"),
            ("/proc/self/ns/mnt", "mnt:["),
            ("/proc/self/ns/uts", "uts:["),
        ];
        for (path, found) in cases {
            let err = NetnsHandle::open(Path::new(path)).unwrap_err();
            assert!(matches!(err, NetnsError::NotNetns { .. }), "{path}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("is not a network namespace") && text.contains(found),
                "{path}: {text}"
            );
        }
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = NetnsHandle::from_fd(OwnedFd::from(socket)).unwrap_err();
        assert!(err.to_string().contains("socket:["), "{err}");
    }

    #[test]
    fn open_missing_path_names_it() {
        let err = NetnsHandle::open(Path::new("/run/netns/zmesh-no-such-ns")).unwrap_err();
        assert!(matches!(err, NetnsError::Open { .. }));
        assert!(
            err.to_string().contains("/run/netns/zmesh-no-such-ns"),
            "{err}"
        );
    }

    #[test]
    fn current_runs_on_one_worker_in_the_same_namespace() {
        if !require_setns() {
            return;
        }
        let ns = NetnsHandle::current().unwrap();
        assert_eq!(ns.inode(), current_thread_inode().unwrap());
        let (worker, inode) = ns
            .run_in(|| (thread::current().id(), current_thread_inode().unwrap()))
            .unwrap();
        assert_eq!(inode, ns.inode());
        assert_ne!(worker, thread::current().id());
        assert_eq!(ns.run_in(|| thread::current().id()).unwrap(), worker);
        assert!(format!("{ns:?}").contains(&ns.inode().to_string()));
    }

    #[test]
    fn panics_are_reraised_and_the_worker_survives() {
        if !require_setns() {
            return;
        }
        let ns = NetnsHandle::current().unwrap();
        let caught = panic::catch_unwind(AssertUnwindSafe(|| ns.run_in(|| panic!("boom"))));
        assert!(caught.is_err());
        assert_eq!(ns.run_in(|| 6 * 7).unwrap(), 42);
    }

    #[test]
    fn nested_run_in_executes_inline() {
        if !require_setns() {
            return;
        }
        let ns = NetnsHandle::current().unwrap();
        let inner = ns.clone();
        let same = ns
            .run_in(move || {
                let outer = thread::current().id();
                inner
                    .run_in(move || thread::current().id() == outer)
                    .unwrap()
            })
            .unwrap();
        assert!(same);
    }

    #[test]
    fn last_clone_dropped_on_the_worker_does_not_deadlock() {
        if !require_setns() {
            return;
        }
        let ns = NetnsHandle::current().unwrap();
        let clone = ns.clone();
        let (tx, rx) = mpsc::channel();
        ns.submit(Box::new(move || {
            // Wait until the test dropped its handle, so this drop is the last one.
            rx.recv().unwrap();
            drop(clone);
        }))
        .unwrap();
        drop(ns);
        tx.send(()).unwrap();
    }

    #[tokio::test]
    async fn run_in_async_returns_the_value() {
        if !require_setns() {
            return;
        }
        let ns = NetnsHandle::current().unwrap();
        let inode = ns.run_in_async(current_thread_inode).await.unwrap();
        assert_eq!(inode.unwrap(), ns.inode());
    }
}
