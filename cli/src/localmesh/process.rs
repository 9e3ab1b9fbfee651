//! Child processes of a local cluster: locating the binaries, starting them inside a network
//! namespace, the pidfile `zmesh down` reads.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mesh_testbed::netns;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::LocalMeshError;

/// The three binaries a local cluster runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `ztunnel`.
    pub ztunnel: PathBuf,
    /// `zmesh-cni`, the node agent.
    pub cni: PathBuf,
    /// `istiod-lite`, the CA.
    pub istiod: PathBuf,
}

impl Binaries {
    /// Finds each binary: the explicit path if given, else `$ZMESH_<NAME>_BIN`, else next to the
    /// current executable or in its parent directory (test executables live in `deps/`).
    pub fn locate(
        ztunnel: Option<PathBuf>,
        cni: Option<PathBuf>,
        istiod: Option<PathBuf>,
    ) -> Result<Self, LocalMeshError> {
        Ok(Self {
            ztunnel: locate("ztunnel", "ZMESH_ZTUNNEL_BIN", ztunnel)?,
            cni: locate("zmesh-cni", "ZMESH_CNI_BIN", cni)?,
            istiod: locate("istiod-lite", "ZMESH_ISTIOD_BIN", istiod)?,
        })
    }
}

fn locate(name: &str, env: &str, given: Option<PathBuf>) -> Result<PathBuf, LocalMeshError> {
    let candidates: Vec<PathBuf> = match given.or_else(|| std::env::var_os(env).map(Into::into)) {
        Some(path) => vec![path],
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| LocalMeshError::io("locating the current executable", e))?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|dir| dir.join(name))
                .collect()
        }
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| LocalMeshError::MissingBinary {
            name: name.into(),
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            env: env.into(),
        })
}

/// A child process started inside a network namespace; killed on drop.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` from a thread inside `ns` (the child inherits the namespace), with stdout
    /// and stderr appended to `log`, and records it in `pidfile`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        ns: &File,
        log: &Path,
        pidfile: &Path,
    ) -> Result<Self, LocalMeshError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| LocalMeshError::io(format!("opening {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| LocalMeshError::io("duplicating a log fd", e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Its own process group: a terminal's Ctrl-C reaches only the supervisor, which then
        // stops the children in order (ztunnel drains before the CA goes away).
        cmd.process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = netns::run_in_netns(ns, move || cmd.spawn())?
            .map_err(|e| LocalMeshError::io(format!("starting {program}"), e))?;
        record_pid(pidfile, child.id(), name)?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// What the process is (`ztunnel n1`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if it exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `timeout`; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, LocalMeshError> {
        let Some(mut child) = self.child.take() else {
            return Err(LocalMeshError::Failed(format!(
                "{} already stopped",
                self.name
            )));
        };
        let _ = signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            let status = child
                .try_wait()
                .map_err(|e| LocalMeshError::io(format!("waiting for {}", self.name), e))?;
            if let Some(status) = status {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child
                    .wait()
                    .map_err(|e| LocalMeshError::io(format!("waiting for {}", self.name), e));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no grace period (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, sig: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::EINVAL)?;
    kill(Pid::from_raw(pid), sig)
}

fn record_pid(pidfile: &Path, pid: u32, name: &str) -> Result<(), LocalMeshError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(pidfile)
        .map_err(|e| LocalMeshError::io(format!("opening {}", pidfile.display()), e))?;
    writeln!(file, "{pid} {name}")
        .map_err(|e| LocalMeshError::io(format!("writing {}", pidfile.display()), e))
}

/// Stops every process listed in `pidfile` that is still one of ours (its command line names a
/// zmesh binary): SIGTERM, then SIGKILL after `grace`. Returns what was stopped.
pub fn stop_recorded(pidfile: &Path, grace: Duration) -> Vec<String> {
    let text = std::fs::read_to_string(pidfile).unwrap_or_default();
    let mut alive = Vec::new();
    for line in text.lines() {
        let Some((pid, name)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        // A recycled pid belongs to someone else: only touch processes running our binaries.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = is_ours(&cmdline);
        if ours && signal(pid, Signal::SIGTERM).is_ok() {
            alive.push((pid, name.to_string()));
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && alive
            .iter()
            .any(|(pid, _)| Path::new(&format!("/proc/{pid}")).exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (pid, _) in &alive {
        let _ = signal(*pid, Signal::SIGKILL);
    }
    alive
        .into_iter()
        .map(|(pid, name)| format!("{name} (pid {pid})"))
        .collect()
}

/// Whether a `/proc/PID/cmdline` is one of the processes a local cluster runs.
fn is_ours(cmdline: &[u8]) -> bool {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name();
    let base = base
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    ["ztunnel", "zmesh-cni", "istiod-lite", "zmesh"].contains(&base.as_str())
}

/// Appends the current process (the supervisor, e.g. `zmesh up`) to `pidfile`.
pub fn record_self(pidfile: &Path, name: &str) -> Result<(), LocalMeshError> {
    record_pid(pidfile, std::process::id(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_names_where_it_looked() {
        let err = locate("zz-none", "ZZ_NONE_BIN", Some("/nonexistent/zz".into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("zz-none") && msg.contains("/nonexistent/zz"),
            "{msg}"
        );
    }

    #[test]
    fn stop_recorded_ignores_foreign_and_garbage_lines() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pids");
        let me = std::process::id();
        std::fs::write(&pidfile, format!("garbage\nx y\n{me} me\n")).unwrap();
        // Our own test process is not a zmesh binary: it must survive.
        assert!(stop_recorded(&pidfile, Duration::from_millis(10)).is_empty());
        assert!(stop_recorded(&dir.path().join("absent"), Duration::ZERO).is_empty());
        assert!(is_ours(b"/x/target/debug/ztunnel\0--node-name\0n1\0"));
        assert!(is_ours(b"zmesh\0up\0"));
        assert!(!is_ours(b"/x/deps/zmesh-0123abcd\0"));
        assert!(!is_ours(b""));
    }
}
