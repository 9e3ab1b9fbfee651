//! Directory source tests on a real temporary directory, driven poll by poll.

use std::fs;

use super::*;
use crate::k8s::{Namespace, Pod};

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
";

fn pods(label: &str) -> String {
    format!(
        "\
apiVersion: v1
kind: Pod
metadata: {{name: a, namespace: shop, labels: {{v: {label}}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: b, namespace: shop}}
"
    )
}

struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Dir {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes atomically (temp file + rename), as the docs recommend.
    fn write(&self, name: &str, text: &str) {
        let temp = self.path(&format!(".{name}.tmp"));
        fs::write(&temp, text).unwrap();
        fs::rename(temp, self.path(name)).unwrap();
    }

    fn source(&self) -> DirSource {
        DirSource::new(DirSourceConfig::new(self.tmp.path())).unwrap()
    }
}

fn label_of_a(source: &DirSource) -> Option<String> {
    let snapshot = source.snapshot();
    let pod = snapshot.get::<Pod>("shop", "a")?;
    pod.metadata.labels.as_ref()?.get("v").cloned()
}

fn status<'a>(snapshot: &'a Snapshot, name: &str) -> &'a FileStatus {
    snapshot
        .files()
        .iter()
        .find(|f| f.path.file_name().unwrap() == name)
        .unwrap_or_else(|| panic!("no status for {name}: {:?}", snapshot.files()))
}

#[test]
fn initial_load_reads_candidates_only() {
    let dir = Dir::new();
    dir.write("ns.yaml", NAMESPACE);
    dir.write("pods.yml", &pods("one"));
    fs::write(dir.path(".hidden.yaml"), "not: [valid").unwrap();
    fs::write(dir.path("notes.txt"), "not: [valid").unwrap();
    fs::create_dir(dir.path("sub.yaml")).unwrap();
    fs::write(dir.path("sub.yaml/x.yaml"), NAMESPACE).unwrap();
    let source = dir.source();
    let snapshot = source.snapshot();
    assert_eq!(snapshot.version(), 1);
    assert_eq!(snapshot.len(), 3);
    assert!(snapshot.get::<Namespace>("", "shop").is_some());
    assert_eq!(snapshot.files().len(), 2);
    assert_eq!(status(&snapshot, "pods.yml").objects, 2);
    assert!(snapshot.errors().is_empty());
}

#[test]
fn update_is_published_after_two_agreeing_polls() {
    let dir = Dir::new();
    dir.write("pods.yaml", &pods("one"));
    let mut source = dir.source();
    let mut rx = source.subscribe();
    rx.mark_unchanged();
    assert!(!source.poll(), "nothing changed");

    dir.write("pods.yaml", &pods("two"));
    assert!(!source.poll(), "first sighting only marks the change");
    assert_eq!(label_of_a(&source).as_deref(), Some("one"));
    assert!(source.poll());
    assert_eq!(label_of_a(&source).as_deref(), Some("two"));
    assert_eq!(source.snapshot().version(), 2);
    assert!(rx.has_changed().unwrap());
    assert!(!source.poll());
}

#[test]
fn same_size_rewrite_in_place_is_noticed() {
    // In-place rewrite, same length, likely within one mtime tick: only the content differs.
    let dir = Dir::new();
    dir.write("pods.yaml", &pods("one"));
    let mut source = dir.source();
    fs::write(dir.path("pods.yaml"), pods("two")).unwrap();
    source.poll();
    source.poll();
    assert_eq!(label_of_a(&source).as_deref(), Some("two"));
}

#[test]
fn invalid_yaml_keeps_last_good_objects_and_reports_the_file() {
    let dir = Dir::new();
    dir.write("ns.yaml", NAMESPACE);
    dir.write("pods.yaml", &pods("one"));
    let mut source = dir.source();

    dir.write("pods.yaml", "apiVersion: v1\nkind: Pod\nmetadata: [oops");
    dir.write("ns.yaml", &NAMESPACE.replace("shop", "shop2"));
    source.poll();
    assert!(source.poll());
    let snapshot = source.snapshot();
    assert_eq!(
        label_of_a(&source).as_deref(),
        Some("one"),
        "last good kept"
    );
    assert_eq!(snapshot.list::<Pod>().count(), 2);
    let bad = status(&snapshot, "pods.yaml");
    assert_eq!(bad.objects, 2);
    let error = bad.error.as_deref().unwrap();
    assert!(error.contains("document 1: invalid yaml"), "{error}");
    // The other file is unaffected and its own update went through.
    assert!(status(&snapshot, "ns.yaml").error.is_none());
    assert!(snapshot.get::<Namespace>("", "shop2").is_some());
    assert!(!source.poll(), "an unchanged bad file is not re-reported");

    dir.write("pods.yaml", &pods("three"));
    source.poll();
    source.poll();
    assert_eq!(label_of_a(&source).as_deref(), Some("three"));
    assert!(status(&source.snapshot(), "pods.yaml").error.is_none());
}

#[test]
fn invalid_file_at_startup_serves_nothing_from_it() {
    let dir = Dir::new();
    dir.write("bad.yaml", "kind: Pod\n");
    dir.write("ns.yaml", NAMESPACE);
    let snapshot = dir.source().snapshot();
    assert_eq!(snapshot.len(), 1);
    let bad = status(&snapshot, "bad.yaml");
    assert_eq!(bad.objects, 0);
    assert!(
        bad.error
            .as_deref()
            .unwrap()
            .contains("missing `apiVersion`")
    );
}

#[test]
fn unknown_kinds_are_warnings() {
    let dir = Dir::new();
    let text =
        format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n{NAMESPACE}");
    dir.write("mixed.yaml", &text);
    let snapshot = dir.source().snapshot();
    assert_eq!(snapshot.len(), 1);
    let mixed = status(&snapshot, "mixed.yaml");
    assert!(mixed.error.is_none());
    assert_eq!(
        mixed.warnings,
        ["document 1: skipping unsupported kind Deployment (apps/v1)"]
    );
}

#[test]
fn deleting_a_file_withdraws_its_objects() {
    let dir = Dir::new();
    dir.write("ns.yaml", NAMESPACE);
    dir.write("pods.yaml", &pods("one"));
    let mut source = dir.source();
    fs::remove_file(dir.path("pods.yaml")).unwrap();
    assert!(!source.poll());
    assert_eq!(
        source.snapshot().list::<Pod>().count(),
        2,
        "not yet confirmed"
    );
    assert!(source.poll());
    let snapshot = source.snapshot();
    assert_eq!(snapshot.list::<Pod>().count(), 0);
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot.files().len(), 1);
}

#[test]
fn a_brief_absence_is_ignored() {
    let dir = Dir::new();
    dir.write("pods.yaml", &pods("one"));
    let mut source = dir.source();
    fs::remove_file(dir.path("pods.yaml")).unwrap();
    assert!(!source.poll());
    dir.write("pods.yaml", &pods("one"));
    assert!(!source.poll());
    assert!(!source.poll());
    assert_eq!(source.snapshot().version(), 1);
    assert_eq!(source.snapshot().list::<Pod>().count(), 2);
}

#[test]
fn new_files_and_cross_file_duplicates() {
    let dir = Dir::new();
    dir.write("a.yaml", &pods("from-a"));
    let mut source = dir.source();
    dir.write("b.yaml", &pods("from-b"));
    source.poll();
    assert!(source.poll());
    assert_eq!(
        label_of_a(&source).as_deref(),
        Some("from-b"),
        "last path wins"
    );
    let snapshot = source.snapshot();
    let b = status(&snapshot, "b.yaml");
    assert_eq!(b.warnings.len(), 2, "{:?}", b.warnings);
    assert!(
        b.warnings[0].contains("Pod shop/a is also defined in"),
        "{:?}",
        b.warnings
    );
    assert!(b.warnings[0].contains("a.yaml"));
}

#[test]
fn oversized_and_non_utf8_files_are_errors() {
    let dir = Dir::new();
    dir.write("big.yaml", &"# padding\n".repeat(20));
    fs::write(dir.path("bin.yaml"), [0xff, 0xfe, 0x00]).unwrap();
    let config = DirSourceConfig {
        max_file_size: 100,
        ..DirSourceConfig::new(dir.tmp.path())
    };
    let snapshot = DirSource::new(config).unwrap().snapshot();
    let big = status(&snapshot, "big.yaml").error.clone().unwrap();
    assert!(big.contains("larger than the 100-byte limit"), "{big}");
    let bin = status(&snapshot, "bin.yaml").error.clone().unwrap();
    assert!(bin.contains("not valid UTF-8"), "{bin}");
}

#[test]
fn missing_directory_is_a_startup_error_and_a_runtime_status() {
    let err = DirSource::new(DirSourceConfig::new("/nonexistent/zmesh-config")).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/zmesh-config"),
        "{err}"
    );

    let dir = Dir::new();
    let sub = dir.path("config");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("ns.yaml"), NAMESPACE).unwrap();
    let mut source = DirSource::new(DirSourceConfig::new(&sub)).unwrap();
    fs::remove_dir_all(&sub).unwrap();
    assert!(source.poll());
    let snapshot = source.snapshot();
    assert_eq!(snapshot.len(), 1, "last good objects kept");
    assert!(snapshot.errors()[0].contains("cannot read config directory"));
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("ns.yaml"), NAMESPACE).unwrap();
    assert!(source.poll());
    assert!(source.snapshot().errors().is_empty());
}

#[tokio::test]
async fn run_publishes_changes() {
    let dir = Dir::new();
    dir.write("ns.yaml", NAMESPACE);
    let config = DirSourceConfig {
        poll_interval: Duration::from_millis(10),
        ..DirSourceConfig::new(dir.tmp.path())
    };
    let source = DirSource::new(config).unwrap();
    let mut rx = source.subscribe();
    let task = tokio::spawn(source.run());
    dir.write("pods.yaml", &pods("one"));
    let snapshot = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|s| s.list::<Pod>().count() == 2),
    )
    .await
    .expect("change published in time")
    .unwrap()
    .clone();
    assert!(snapshot.version() >= 2);
    task.abort();
}
