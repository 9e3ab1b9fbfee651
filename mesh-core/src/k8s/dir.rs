//! A configuration source that serves the Kubernetes objects found in a directory of YAML files.
//!
//! The directory is polled. Polling is cheap for a handful of small files, needs no platform
//! support, and works on every kind of mount (including ConfigMap volumes, whose files are
//! symlinks swapped atomically through a hidden `..data` directory).
//!
//! Rules:
//! * Files named `*.yaml`, `*.yml` or `*.json` directly in the directory are read; names starting
//!   with `.` (editor swap files, ConfigMap internals) and subdirectories are ignored.
//! * Files are independent: one that fails to parse keeps serving its **last good** objects and
//!   reports the error (logged once and shown in [`FileStatus`]); the others are unaffected.
//! * A change is acted on only once two consecutive polls see the same state, so a file caught
//!   half-written, or briefly missing while an editor replaces it, never withdraws objects.
//!   Writing files atomically (write elsewhere, then rename) is still the recommended practice.
//! * The same object in two files: the file whose path sorts last wins, with a warning.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{FileStatus, Object, ObjectKey, ParsedFile, Snapshot, parse_documents};

/// How often the directory is polled unless configured otherwise.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Largest file read; bigger files are reported as errors (and keep their last good objects).
pub const DEFAULT_MAX_FILE_SIZE: u64 = 8 << 20;

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];
// A file modified this recently may be modified again within the filesystem's timestamp
// granularity without its size or mtime changing, so its content is re-checked on every poll
// until its mtime is older than this ("racy" files, as git calls them).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Errors of the directory source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory could not be listed.
    #[error("cannot read config directory {dir}: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Settings of a [`DirSource`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSourceConfig {
    /// The directory to watch.
    pub dir: PathBuf,
    /// Time between two polls. A change is published after two polls that agree.
    pub poll_interval: Duration,
    /// Largest file size accepted.
    pub max_file_size: u64,
}

impl DirSourceConfig {
    /// Default settings for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
        }
    }
}

/// What the file system says about a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    mtime: SystemTime,
    inode: u64,
    dev: u64,
}

/// What one poll found for one path.
#[derive(Debug)]
enum Observed {
    Missing,
    Content {
        fingerprint: Fingerprint,
        hash: u64,
        text: String,
    },
    Unreadable {
        fingerprint: Fingerprint,
        reason: String,
    },
}

impl Observed {
    /// Identifies the observation for the "two polls agree" rule.
    fn identity(&self) -> Identity {
        match self {
            Observed::Missing => Identity::Missing,
            Observed::Content { hash, .. } => Identity::Content(*hash),
            Observed::Unreadable { reason, .. } => Identity::Unreadable(reason.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Identity {
    Missing,
    Content(u64),
    Unreadable(String),
}

/// A file we have acted on.
#[derive(Debug)]
struct Tracked {
    fingerprint: Fingerprint,
    racy: bool,
    // Hash of the content whose parse result is current (good or bad).
    hash: Option<u64>,
    // Last good objects.
    objects: Vec<Object>,
    warnings: Vec<String>,
    error: Option<String>,
}

/// Watches a directory of Kubernetes YAML and publishes [`Snapshot`]s.
///
/// [`DirSource::new`] loads the directory once, so the first snapshot is complete before
/// anything subscribes; [`DirSource::run`] then polls until dropped.
#[derive(Debug)]
pub struct DirSource {
    config: DirSourceConfig,
    files: BTreeMap<PathBuf, Tracked>,
    pending: BTreeMap<PathBuf, Identity>,
    dir_error: Option<String>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl DirSource {
    /// Loads every file in `config.dir`. Fails if the directory cannot be listed; files that do
    /// not parse are reported in the snapshot's [`FileStatus`] instead.
    pub fn new(config: DirSourceConfig) -> Result<Self, SourceError> {
        let listing = list(&config.dir)?;
        let mut source = Self {
            config,
            files: BTreeMap::new(),
            pending: BTreeMap::new(),
            dir_error: None,
            tx: watch::channel(Arc::new(Snapshot::default())).0,
        };
        for (path, fingerprint) in listing {
            let observed = source.observe(&path, Some(fingerprint));
            source.act(&path, observed);
        }
        source.publish();
        Ok(source)
    }

    /// The directory being watched.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// A receiver of every new snapshot; it starts with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Polls once (blocking file IO) and publishes a new snapshot if anything changed. Returns
    /// whether a snapshot was published.
    pub fn poll(&mut self) -> bool {
        match list(&self.config.dir) {
            Ok(listing) => {
                if let Some(previous) = self.dir_error.take() {
                    info!(dir = %self.config.dir.display(), %previous, "config directory readable again");
                }
                self.poll_listing(&listing);
            }
            Err(e) => {
                let message = format!("{e}; serving the last good objects");
                if self.dir_error.as_ref() != Some(&message) {
                    error!(error = %e, "config directory unreadable; serving the last good objects");
                }
                self.dir_error = Some(message);
            }
        }
        self.publish()
    }

    /// Polls every `poll_interval` until the future is dropped. File IO runs on the blocking
    /// pool, so a slow mount does not stall the runtime.
    pub async fn run(mut self) {
        let mut interval = tokio::time::interval(self.config.poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            let polled = tokio::task::spawn_blocking(move || {
                self.poll();
                self
            });
            self = match polled.await {
                Ok(source) => source,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return,
            };
        }
    }

    fn poll_listing(&mut self, listing: &BTreeMap<PathBuf, Fingerprint>) {
        let paths: BTreeSet<PathBuf> = listing.keys().chain(self.files.keys()).cloned().collect();
        // A candidate that vanished before it was confirmed is forgotten.
        self.pending.retain(|path, _| paths.contains(path));
        for path in paths {
            let now = listing.get(&path).copied();
            let tracked = self.files.get(&path);
            if let Some(t) = tracked
                && now == Some(t.fingerprint)
                && !t.racy
            {
                self.pending.remove(&path);
                continue;
            }
            let observed = self.observe(&path, now);
            if self.matches_current(&path, &observed) {
                self.pending.remove(&path);
                continue;
            }
            // Act only when the previous poll saw the same thing: never on a half-written file.
            let identity = observed.identity();
            if self.pending.get(&path) == Some(&identity) {
                self.pending.remove(&path);
                self.act(&path, observed);
            } else {
                debug!(file = %path.display(), "config file changed; confirming on the next poll");
                self.pending.insert(path, identity);
            }
        }
    }

    /// True when `observed` is what we already serve (refreshing the fingerprint if so).
    fn matches_current(&mut self, path: &Path, observed: &Observed) -> bool {
        let Some(tracked) = self.files.get_mut(path) else {
            return matches!(observed, Observed::Missing);
        };
        match observed {
            Observed::Content {
                fingerprint, hash, ..
            } if tracked.hash == Some(*hash) => {
                tracked.fingerprint = *fingerprint;
                tracked.racy = is_racy(fingerprint);
                true
            }
            _ => false,
        }
    }

    fn observe(&self, path: &Path, now: Option<Fingerprint>) -> Observed {
        let Some(fingerprint) = now else {
            return Observed::Missing;
        };
        match read_limited(path, self.config.max_file_size) {
            Ok(text) => {
                let mut hasher = DefaultHasher::new();
                text.hash(&mut hasher);
                Observed::Content {
                    fingerprint,
                    hash: hasher.finish(),
                    text,
                }
            }
            Err(reason) => Observed::Unreadable {
                fingerprint,
                reason,
            },
        }
    }

    fn act(&mut self, path: &Path, observed: Observed) {
        let (fingerprint, hash, result) = match observed {
            Observed::Missing => {
                if let Some(gone) = self.files.remove(path) {
                    let (file, objects) = (path.display(), gone.objects.len());
                    info!(%file, objects, "config file removed; its objects are withdrawn");
                }
                return;
            }
            Observed::Unreadable {
                fingerprint,
                reason,
            } => (fingerprint, None, Err(reason)),
            Observed::Content {
                fingerprint,
                hash,
                text,
            } => {
                let parsed = parse_documents(&text).map_err(|e| e.to_string());
                (fingerprint, Some(hash), parsed)
            }
        };
        let tracked = self
            .files
            .entry(path.to_owned())
            .or_insert_with(|| Tracked {
                fingerprint,
                racy: false,
                hash: None,
                objects: Vec::new(),
                warnings: Vec::new(),
                error: None,
            });
        tracked.fingerprint = fingerprint;
        tracked.racy = is_racy(&fingerprint);
        tracked.hash = hash;
        tracked.record(path, result);
    }

    /// Merges the files into a snapshot and publishes it if it differs from the current one.
    fn publish(&mut self) -> bool {
        let (objects, files) = self.merge();
        let errors: Vec<String> = self.dir_error.iter().cloned().collect();
        let current = self.tx.borrow().clone();
        let unchanged = current.version() > 0
            && current.same_objects_as(&objects)
            && current.files() == files.as_slice()
            && current.errors() == errors.as_slice();
        if unchanged {
            return false;
        }
        let snapshot = Snapshot::new(current.version() + 1, objects, files, errors);
        let (version, objects) = (snapshot.version(), snapshot.len());
        debug!(version, objects, "config snapshot published");
        self.tx.send_replace(Arc::new(snapshot));
        true
    }

    /// Every file's objects in path order (later files win) and each file's status.
    fn merge(&self) -> (BTreeMap<ObjectKey, Object>, Vec<FileStatus>) {
        let mut objects: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        let mut origin: BTreeMap<ObjectKey, &Path> = BTreeMap::new();
        let mut files = Vec::with_capacity(self.files.len());
        for (path, tracked) in &self.files {
            let mut warnings = tracked.warnings.clone();
            for object in &tracked.objects {
                let key = object.key();
                if let Some(earlier) = origin.insert(key.clone(), path) {
                    warnings.push(format!(
                        "{key} is also defined in {}; this file's copy is used",
                        earlier.display()
                    ));
                }
                objects.insert(key, object.clone());
            }
            files.push(FileStatus {
                path: path.clone(),
                objects: tracked.objects.len(),
                error: tracked.error.clone(),
                warnings,
            });
        }
        (objects, files)
    }
}

impl Tracked {
    /// Serves a parse result, or records why the last good objects stay.
    fn record(&mut self, path: &Path, result: Result<ParsedFile, String>) {
        let file = path.display();
        match result {
            Ok(parsed) => {
                for warning in &parsed.warnings {
                    warn!(%file, %warning, "config file warning");
                }
                info!(%file, objects = parsed.objects.len(), "config file loaded");
                self.objects = parsed.objects;
                self.warnings = parsed.warnings;
                self.error = None;
            }
            Err(reason) => {
                let kept = self.objects.len();
                error!(%file, error = %reason, kept, "config file rejected; keeping its last good objects");
                self.error = Some(reason);
            }
        }
    }
}

fn is_racy(fingerprint: &Fingerprint) -> bool {
    SystemTime::now()
        .duration_since(fingerprint.mtime)
        .map_or(true, |age| age < RACY_WINDOW)
}

/// The candidate files in `dir` with their fingerprints.
fn list(dir: &Path) -> Result<BTreeMap<PathBuf, Fingerprint>, SourceError> {
    let read_dir = |source| SourceError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if !is_candidate(&path) {
            continue;
        }
        // `metadata` follows symlinks: a dangling link (mid-swap) counts as missing for now.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let fingerprint = Fingerprint {
                    len: meta.len(),
                    mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    inode: meta.ino(),
                    dev: meta.dev(),
                };
                files.insert(path, fingerprint);
            }
            Ok(_) => {}
            Err(e) => debug!(file = %path.display(), error = %e, "config file not readable yet"),
        }
    }
    Ok(files)
}

fn is_candidate(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && extension.is_some_and(|e| EXTENSIONS.contains(&e))
}

fn read_limited(path: &Path, limit: u64) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit to tell "exactly at the limit" from "too large".
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("file is larger than the {limit}-byte limit"));
    }
    String::from_utf8(bytes).map_err(|e| format!("not valid UTF-8: {e}"))
}

#[cfg(test)]
mod tests;
