//! One pod the agent is acting on, and the steps that move it in and out of the mesh.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::view::Want;
use super::{Dataplane, EnrollError, Redirection};
use crate::locate::Located;
use crate::zds::{ZdsError, ZdsHandle};

/// Exponential retry delays.
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << exponent).min(self.max)
    }
}

/// Everything a per-pod step needs; shared by concurrent steps.
pub(super) struct Ctx {
    pub dataplane: Arc<dyn Dataplane>,
    pub zds: ZdsHandle,
    pub backoff: Backoff,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub uid: String,
    pub want: Want,
    pub netns: Option<Arc<Located>>,
    pub phase: Redirection,
    pub error: Option<String>,
    pub failures: u32,
    /// When to try again; `None` while waiting for something else (a ztunnel to connect).
    pub retry_at: Option<Instant>,
}

impl Entry {
    pub fn new(uid: &str, want: Want, now: Instant) -> Self {
        Self {
            uid: uid.to_owned(),
            want,
            netns: None,
            phase: Redirection::Failed,
            error: None,
            failures: 0,
            retry_at: Some(now),
        }
    }

    pub fn pod(&self) -> String {
        format!("{}/{}", self.want.info.namespace, self.want.info.name)
    }

    pub fn due(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|at| at <= now)
    }

    /// True if the pod's annotated namespace path now names another namespace (the pod was
    /// re-created under the same name): the held descriptor is stale.
    pub fn netns_moved(&self) -> bool {
        let (Some(located), Some(_)) = (&self.netns, &self.want.hint.annotation) else {
            return false;
        };
        std::fs::metadata(&located.path).map_or(true, |m| m.ino() != located.netns.inode())
    }

    fn succeed(&mut self, phase: Redirection) {
        self.phase = phase;
        self.error = None;
        self.failures = 0;
        self.retry_at = None;
    }

    /// Records a failure and schedules a retry. Logs a warning when the error is new, so a pod
    /// stuck on one problem does not flood the log.
    pub fn fail(&mut self, phase: Redirection, error: &EnrollError, backoff: &Backoff) {
        let message = error.to_string();
        self.failures += 1;
        let delay = backoff.delay(self.failures);
        if self.error.as_ref() != Some(&message) {
            warn!(uid = %self.uid, pod = %self.pod(), state = ?phase, error = %message, retry_in = ?delay, "pod not in its desired state");
        } else {
            debug!(uid = %self.uid, failures = self.failures, error = %message, "still failing");
        }
        self.phase = phase;
        self.error = Some(message);
        self.retry_at = Some(Instant::now() + delay);
    }
}

/// Runs blocking dataplane work off the runtime.
pub(super) async fn blocking<T, F>(what: &'static str, f: F) -> Result<T, EnrollError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EnrollError::Task {
            what,
            reason: e.to_string(),
        })
}

/// Moves a located pod into the mesh: rules first, then ztunnel. A pod whose rules fail is never
/// sent to ztunnel; a pod already `Pending` only needs ztunnel.
pub(super) async fn enroll(ctx: Arc<Ctx>, mut entry: Entry) -> Entry {
    let Some(located) = entry.netns.clone() else {
        return entry;
    };
    if entry.phase != Redirection::Pending
        && let Err(error) = install(&ctx, &located).await
    {
        entry.fail(Redirection::Failed, &error, &ctx.backoff);
        return entry;
    }
    let file = match located.netns.try_clone() {
        Ok(netns) => netns.into_file(),
        Err(e) => {
            entry.fail(Redirection::Pending, &EnrollError::Dup(e), &ctx.backoff);
            return entry;
        }
    };
    let info = entry.want.info.clone();
    match ctx.zds.add_workload(&entry.uid, info, file).await {
        Ok(()) => {
            info!(uid = %entry.uid, pod = %entry.pod(), netns = %located.path.display(), "pod enrolled");
            entry.succeed(Redirection::Enabled);
        }
        Err(ZdsError::NoZtunnel { .. }) => {
            // The ZDS server hands the pod to the next ztunnel in its snapshot; we re-send when
            // one is ready, to learn its answer.
            info!(uid = %entry.uid, pod = %entry.pod(), "pod captured; pending until a ztunnel connects");
            entry.phase = Redirection::Pending;
            entry.error = Some("no ztunnel connected".to_owned());
            entry.retry_at = None;
        }
        Err(e) => entry.fail(Redirection::Pending, &EnrollError::Zds(e), &ctx.backoff),
    }
    entry
}

async fn install(ctx: &Ctx, located: &Arc<Located>) -> Result<(), EnrollError> {
    let (dataplane, target) = (ctx.dataplane.clone(), located.clone());
    let applied = blocking("install", move || dataplane.apply_rules(&target.netns)).await?;
    let Err(source) = applied else {
        return Ok(());
    };
    let install = EnrollError::Install {
        netns: located.path.clone(),
        source,
    };
    // Never leave a pod half-captured: take out whatever part of the rules got in.
    match remove_rules(ctx, located).await {
        Ok(()) => Err(install),
        Err(cleanup) => Err(EnrollError::PartialInstall {
            install: Box::new(install),
            cleanup: Box::new(cleanup),
        }),
    }
}

async fn remove_rules(ctx: &Ctx, located: &Arc<Located>) -> Result<(), EnrollError> {
    let (dataplane, target) = (ctx.dataplane.clone(), located.clone());
    blocking("remove", move || dataplane.remove_rules(&target.netns))
        .await?
        .map_err(|source| EnrollError::Remove {
            netns: located.path.clone(),
            source,
        })
}

/// Takes a pod out of the mesh: ztunnel first (so it stops serving), then the rules. Returns
/// `None` once nothing is left to undo; otherwise the entry, `Removing`, to retry.
pub(super) async fn unenroll(ctx: Arc<Ctx>, mut entry: Entry) -> Option<Entry> {
    if matches!(entry.phase, Redirection::Enabled | Redirection::Pending)
        && let Err(error) = ctx.zds.del_workload(&entry.uid).await
    {
        // The pod is already gone from the server's set: a ztunnel that missed the delete
        // drains the pod when it reconnects and gets a snapshot without it.
        warn!(uid = %entry.uid, %error, "del-workload not acknowledged by every ztunnel");
    }
    let Some(located) = entry.netns.clone() else {
        info!(uid = %entry.uid, pod = %entry.pod(), "pod left the mesh (nothing was installed)");
        return None;
    };
    match remove_rules(&ctx, &located).await {
        Ok(()) => {
            info!(uid = %entry.uid, pod = %entry.pod(), netns = %located.path.display(), "pod left the mesh; rules removed");
            None
        }
        Err(error) => {
            entry.fail(Redirection::Removing, &error, &ctx.backoff);
            Some(entry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=6).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(1));
        assert_eq!(backoff.delay(0).as_millis(), 100);
    }
}
