//! Running code inside a network namespace.
//!
//! `setns(2)` with `CLONE_NEWNET` changes the namespace of the *calling thread* only. Everything in
//! this module therefore runs on a dedicated OS thread that is thrown away afterwards, so a tokio
//! worker or a test-harness thread never changes namespace. Two kernel facts make that enough:
//! a socket keeps the namespace it was created in (so a listener or stream made inside can be used
//! from any thread afterwards), and a child process starts in the namespace of the thread that
//! spawned it.
//!
//! No `unsafe` is needed: `nix::sched::setns` is a safe wrapper.

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

/// Directory where `ip netns add` pins named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How long a stopping netns runtime waits for its blocking tasks before giving up on them.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Errors from entering a network namespace or running something inside it.
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
    /// The namespace fd could not be duplicated for the worker thread.
    #[error("cannot duplicate network namespace fd: {0}")]
    Dup(io::Error),
    /// `setns(2)` failed (not a netns fd, or missing CAP_SYS_ADMIN).
    #[error("setns into network namespace failed: {0}")]
    Setns(nix::Error),
    /// The worker thread could not be started.
    #[error("cannot spawn netns thread: {0}")]
    Thread(io::Error),
    /// The per-namespace tokio runtime could not be built.
    #[error("cannot build tokio runtime in netns thread: {0}")]
    Runtime(io::Error),
    /// A socket could not be created inside the namespace.
    #[error("cannot create socket in network namespace: {0}")]
    Socket(io::Error),
    /// The task was aborted before it produced a result.
    #[error("netns task was aborted before it finished")]
    Aborted,
    /// A process could not be started inside the namespace.
    #[error("cannot run `{command}` in network namespace: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Underlying error.
        source: io::Error,
    },
    /// A process ran inside the namespace and failed.
    #[error("`{command}` failed in network namespace ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

/// Opens a network namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Inode of the calling thread's network namespace; equal inodes mean the same namespace.
pub fn current_inode() -> io::Result<u64> {
    Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
}

/// Inode of the network namespace behind `ns`.
pub fn inode_of(ns: &impl AsFd) -> io::Result<u64> {
    let file = File::from(ns.as_fd().try_clone_to_owned()?);
    Ok(file.metadata()?.ino())
}

fn dup(ns: &impl AsFd) -> Result<OwnedFd, NetnsError> {
    ns.as_fd().try_clone_to_owned().map_err(NetnsError::Dup)
}

fn enter(fd: OwnedFd) -> Result<(), NetnsError> {
    setns(&fd, CloneFlags::CLONE_NEWNET).map_err(NetnsError::Setns)
}

/// Runs `f` on a fresh OS thread that has joined the network namespace `ns`, and waits for it.
///
/// A panic inside `f` is re-raised on the caller's thread.
pub fn run_in_netns<F, R>(ns: &impl AsFd, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let fd = dup(ns)?;
    let handle = thread::Builder::new()
        .name("netns-run".into())
        .spawn(move || enter(fd).map(|()| f()))
        .map_err(NetnsError::Thread)?;
    match handle.join() {
        Ok(result) => result,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// Async form of [`run_in_netns`]: the caller's task is not blocked while `f` runs.
///
/// Use this from tokio code; `f` itself may block (it has its own thread).
pub async fn run_in_netns_async<F, R>(ns: &impl AsFd, f: F) -> Result<R, NetnsError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let fd = dup(ns)?;
    let (tx, rx) = oneshot::channel();
    thread::Builder::new()
        .name("netns-run".into())
        .spawn(move || {
            let outcome = enter(fd).map(|()| panic::catch_unwind(AssertUnwindSafe(f)));
            let _ = tx.send(outcome);
        })
        .map_err(NetnsError::Thread)?;
    // The sender is dropped without a value only if the thread died outside `catch_unwind`,
    // which cannot happen short of an abort; treat it like a panic anyway.
    match rx
        .await
        .unwrap_or_else(|_| panic!("netns thread exited without a result"))
    {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(payload)) => panic::resume_unwind(payload),
        Err(e) => Err(e),
    }
}

/// A future running on its own thread and current-thread runtime inside a network namespace.
///
/// Dropping the handle aborts the future and waits for its thread, so every socket it owned is
/// closed by the time `drop` returns (a namespace is only freed once nothing holds it).
#[must_use = "dropping a NetnsTask aborts it"]
pub struct NetnsTask<T> {
    abort: Option<oneshot::Sender<()>>,
    result: oneshot::Receiver<thread::Result<Option<T>>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts `factory()` inside the network namespace `ns` on a dedicated thread with a
/// current-thread tokio runtime, and returns once the thread has entered the namespace.
///
/// `factory` runs on the new thread, so the future it returns need not be `Send`.
pub fn spawn_in_netns<F, Fut>(
    ns: &impl AsFd,
    factory: F,
) -> Result<NetnsTask<Fut::Output>, NetnsError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    let fd = dup(ns)?;
    let (abort_tx, abort_rx) = oneshot::channel::<()>();
    let (result_tx, result_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NetnsError>>();
    let thread = thread::Builder::new()
        .name("netns-task".into())
        .spawn(move || {
            if let Some(outcome) = task_thread(fd, factory, abort_rx, ready_tx) {
                let _ = result_tx.send(outcome);
            }
        })
        .map_err(NetnsError::Thread)?;
    let started = ready_rx
        .recv()
        .unwrap_or_else(|_| panic!("netns task thread exited before reporting readiness"));
    if let Err(e) = started {
        let _ = thread.join();
        return Err(e);
    }
    Ok(NetnsTask {
        abort: Some(abort_tx),
        result: result_rx,
        thread: Some(thread),
    })
}

/// Body of a [`spawn_in_netns`] thread. Returns `None` when it could not start (the error went
/// to `ready`), otherwise the future's output (`None` inside if aborted) or its panic.
fn task_thread<F, Fut>(
    fd: OwnedFd,
    factory: F,
    abort: oneshot::Receiver<()>,
    ready: mpsc::Sender<Result<(), NetnsError>>,
) -> Option<thread::Result<Option<Fut::Output>>>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let runtime = match prepare_task_thread(fd) {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e));
            return None;
        }
    };
    let _ = ready.send(Ok(()));
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async move {
            tokio::select! {
                value = factory() => Some(value),
                _ = abort => None,
            }
        })
    }));
    // Tasks the future spawned are dropped here, closing their sockets.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
    Some(outcome)
}

fn prepare_task_thread(fd: OwnedFd) -> Result<tokio::runtime::Runtime, NetnsError> {
    enter(fd)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NetnsError::Runtime)
}

impl<T> NetnsTask<T> {
    /// Asks the future to stop; it is dropped at its next await point. Idempotent.
    pub fn abort(&mut self) {
        if let Some(tx) = self.abort.take() {
            let _ = tx.send(());
        }
    }

    /// True once the future has completed, panicked or been aborted.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Blocks until the future finishes and returns its output.
    ///
    /// Returns [`NetnsError::Aborted`] if it was aborted; re-raises a panic from the future.
    /// Do not call this on a tokio worker thread; use [`NetnsTask::wait`] there.
    pub fn join(mut self) -> Result<T, NetnsError> {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Self::unpack(self.result.try_recv().ok())
    }

    /// Waits asynchronously for the future to finish and returns its output.
    pub async fn wait(mut self) -> Result<T, NetnsError> {
        let outcome = (&mut self.result).await.ok();
        if let Some(thread) = self.thread.take() {
            // The thread has sent its result, so it is about to exit; joining is immediate.
            let _ = thread.join();
        }
        Self::unpack(outcome)
    }

    /// Aborts the future and waits for its thread to exit.
    pub fn stop(mut self) {
        self.abort();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn unpack(outcome: Option<thread::Result<Option<T>>>) -> Result<T, NetnsError> {
        match outcome {
            Some(Ok(Some(value))) => Ok(value),
            Some(Ok(None)) | None => Err(NetnsError::Aborted),
            Some(Err(payload)) => panic::resume_unwind(payload),
        }
    }
}

impl<T> Drop for NetnsTask<T> {
    fn drop(&mut self) {
        self.abort();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Renders a command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion inside the namespace `ns`, feeding it `stdin`, and returns its output
/// whatever the exit status.
pub fn command_output(
    ns: &impl AsFd,
    cmd: Command,
    stdin: Option<Vec<u8>>,
) -> Result<Output, NetnsError> {
    let command = describe(&cmd);
    run_in_netns(ns, move || spawn_and_collect(cmd, stdin))?
        .map_err(|source| NetnsError::Spawn { command, source })
}

fn spawn_and_collect(mut cmd: Command, stdin: Option<Vec<u8>>) -> io::Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Feed stdin from its own thread: writing it all before reading stdout could deadlock once
    // both pipes fill up.
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => Some(thread::spawn(move || pipe.write_all(&input))),
        _ => None,
    };
    let output = child.wait_with_output()?;
    if let Some(Ok(Err(e))) = writer.map(JoinHandle::join) {
        // A child that exits without reading all its input reports that through its status.
        if e.kind() != io::ErrorKind::BrokenPipe {
            return Err(e);
        }
    }
    Ok(output)
}

/// Like [`command_output`], but a non-zero exit status is an error naming the command and its
/// stderr. Returns stdout.
pub fn command_checked(
    ns: &impl AsFd,
    cmd: Command,
    stdin: Option<Vec<u8>>,
) -> Result<Vec<u8>, NetnsError> {
    let command = describe(&cmd);
    let output = command_output(ns, cmd, stdin)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(NetnsError::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Builds `ip netns exec NAME PROGRAM`; add the program's arguments with `.arg()`/`.args()`.
///
/// Prefer [`command_output`] with an fd when you have one: it avoids the extra `ip` process and
/// the private mount namespace that `ip netns exec` sets up.
pub fn ip_netns_exec(name: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", name, program]);
    cmd
}

/// Creates an IPv4 TCP socket inside the namespace `ns` (it stays there once created).
pub fn tcp_socket_in(ns: &impl AsFd) -> Result<socket2::Socket, NetnsError> {
    run_in_netns(ns, || {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
    })?
    .map_err(NetnsError::Socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_netns() -> File {
        open(Path::new("/proc/thread-self/ns/net")).expect("open own netns")
    }

    #[test]
    fn open_missing_namespace_names_the_path() {
        let err = open(Path::new("/run/netns/definitely-not-here-zmesh")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/run/netns/definitely-not-here-zmesh"),
            "{text}"
        );
    }

    #[test]
    fn setns_on_a_non_namespace_fd_is_an_error() {
        let not_ns = File::open("/proc/self/status").expect("open");
        let err = run_in_netns(&not_ns, || ()).unwrap_err();
        assert!(matches!(err, NetnsError::Setns(_)), "{err}");
        let err = spawn_in_netns(&not_ns, || async {})
            .err()
            .expect("must fail");
        assert!(matches!(err, NetnsError::Setns(_)), "{err}");
    }

    #[test]
    fn describe_renders_program_and_args() {
        let mut cmd = Command::new("nft");
        cmd.args(["-f", "-"]);
        assert_eq!(describe(&cmd), "nft -f -");
        assert_eq!(
            describe(&ip_netns_exec("pod", "nft")),
            "ip netns exec pod nft"
        );
    }

    // Entering the namespace we are already in needs CAP_SYS_ADMIN; the rest of these tests are
    // skipped quietly without it because the netns integration tests report the skip loudly.
    fn can_setns() -> bool {
        run_in_netns(&own_netns(), || ()).is_ok()
    }

    #[test]
    fn run_in_netns_returns_value_and_reraises_panics() {
        if !can_setns() {
            return;
        }
        assert_eq!(run_in_netns(&own_netns(), || 41 + 1).unwrap(), 42);
        let caught = panic::catch_unwind(|| run_in_netns(&own_netns(), || panic!("boom")));
        assert!(caught.is_err());
    }

    #[test]
    fn task_join_wait_and_abort() {
        if !can_setns() {
            return;
        }
        let task = spawn_in_netns(&own_netns(), || async { 7 }).unwrap();
        assert_eq!(task.join().unwrap(), 7);

        let mut task = spawn_in_netns(&own_netns(), std::future::pending::<()>).unwrap();
        assert!(!task.is_finished());
        task.abort();
        assert!(matches!(task.join(), Err(NetnsError::Aborted)));

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let task = spawn_in_netns(&own_netns(), || async { "done" }).unwrap();
        assert_eq!(rt.block_on(task.wait()).unwrap(), "done");
        let value = rt.block_on(run_in_netns_async(&own_netns(), || 5)).unwrap();
        assert_eq!(value, 5);
    }

    #[test]
    fn command_checked_reports_failure_with_stderr() {
        if !can_setns() {
            return;
        }
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bad thing >&2; exit 3"]);
        let err = command_checked(&own_netns(), cmd, None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("sh -c") && text.contains("bad thing"),
            "{text}"
        );

        let mut cmd = Command::new("cat");
        cmd.arg("-");
        let out = command_checked(&own_netns(), cmd, Some(b"hello".to_vec())).unwrap();
        assert_eq!(out, b"hello");

        let err = command_checked(&own_netns(), Command::new("/nonexistent/zmesh"), None);
        assert!(matches!(err, Err(NetnsError::Spawn { .. })));
    }
}
