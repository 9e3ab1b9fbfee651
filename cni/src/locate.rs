//! Finding a pod's network namespace.
//!
//! In Kubernetes the CNI plugin hands the agent each new pod's netns path. In standalone mode
//! (the testbed, `zmesh up`) there is no plugin, so a pod's namespace is found from its YAML:
//!
//! 1. the annotation `zmesh.dev/netns`: a path (`/run/netns/NAME`, `/proc/PID/ns/net`) or a bare
//!    name, looked up in the netns directory;
//! 2. otherwise by pod IP: every namespace in the netns directory (default `/run/netns`) is
//!    entered on a short-lived thread and its interface addresses listed; the one namespace that
//!    holds a pod IP is the pod's (as Istio's agent scans `/proc` for pods that already exist).
//!    Two different namespaces holding the IP is an error, never a guess.
//!
//! Either way the agent's own namespace is refused: capturing it would capture the node.
//! Lookups block (file IO, threads); call them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use mesh_core::zds::{NetnsError, NetnsFd};
use nix::sched::{CloneFlags, setns};
use tracing::debug;

/// Pod annotation naming the pod's network namespace (standalone mode).
pub const NETNS_ANNOTATION: &str = "zmesh.dev/netns";
/// Where `ip netns` keeps named namespaces.
pub const DEFAULT_NETNS_DIR: &str = "/run/netns";

/// Why a pod's namespace was not found.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The annotation value is not usable.
    #[error("invalid {NETNS_ANNOTATION} annotation {value:?}: {reason}")]
    InvalidAnnotation {
        /// The annotation value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The namespace file could not be opened or is not a network namespace.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The namespace is the agent's own (the node's).
    #[error("{path} is the node's own network namespace; refusing to capture it")]
    HostNetns {
        /// The path that led there.
        path: PathBuf,
    },
    /// The pod has no IP to search by.
    #[error("pod has no IP and no {NETNS_ANNOTATION} annotation")]
    NoIp,
    /// No namespace in the directory holds the pod's IPs.
    #[error("no network namespace in {dir} holds pod IP {ips}")]
    NotFound {
        /// The directory searched.
        dir: PathBuf,
        /// The pod IPs, comma-separated.
        ips: String,
    },
    /// Several namespaces hold the pod's IPs.
    #[error(
        "pod IP {ips} is held by several network namespaces ({paths}); set the {NETNS_ANNOTATION} annotation"
    )]
    Ambiguous {
        /// The pod IPs, comma-separated.
        ips: String,
        /// The candidates, comma-separated.
        paths: String,
    },
    /// The netns directory could not be listed.
    #[error("cannot list network namespaces in {dir}: {reason}")]
    ScanDir {
        /// The directory.
        dir: PathBuf,
        /// The underlying error.
        reason: String,
    },
}

/// A pod's namespace, open (the descriptor keeps it alive).
#[derive(Debug)]
pub struct Located {
    /// The path it was found at.
    pub path: PathBuf,
    /// The open namespace.
    pub netns: NetnsFd,
}

/// What is known about a pod for locating its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodHint {
    /// The `zmesh.dev/netns` annotation, if set.
    pub annotation: Option<String>,
    /// The pod's IPs.
    pub ips: Vec<IpAddr>,
}

/// Resolves an annotation value: absolute paths as they are (normalised, no `..`), bare names
/// inside `dir`.
pub fn parse_netns_annotation(value: &str, dir: &Path) -> Result<PathBuf, LocateError> {
    let invalid = |reason| LocateError::InvalidAnnotation {
        value: value.to_owned(),
        reason,
    };
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty"));
    }
    if trimmed.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let path = Path::new(trimmed);
    if !trimmed.contains('/') {
        if trimmed == "." || trimmed == ".." {
            return Err(invalid("not a namespace name"));
        }
        return Ok(dir.join(trimmed));
    }
    if !path.is_absolute() {
        return Err(invalid("must be an absolute path or a bare name"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid("must not contain `..`"));
    }
    Ok(path.components().collect())
}

/// One namespace seen by a directory scan.
struct Candidate {
    path: PathBuf,
    inode: u64,
    addrs: Vec<IpAddr>,
}

/// Finds pods' namespaces (see the module docs).
#[derive(Debug, Clone)]
pub struct Locator {
    dir: PathBuf,
    own_inode: u64,
}

impl Locator {
    /// A locator searching `dir`; refuses the namespace this process runs in.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, LocateError> {
        let own = NetnsFd::open("/proc/self/ns/net")?;
        Ok(Self::with_own_inode(dir, own.inode()))
    }

    /// Like [`Locator::new`] with the inode of the namespace to refuse given explicitly.
    pub fn with_own_inode(dir: impl Into<PathBuf>, own_inode: u64) -> Self {
        Self {
            dir: dir.into(),
            own_inode,
        }
    }

    /// The directory searched by IP.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Locates each pod, scanning the directory at most once for all of them.
    pub fn locate(&self, pods: &[PodHint]) -> Vec<Result<Located, LocateError>> {
        let mut scan: Option<Result<Vec<Candidate>, String>> = None;
        pods.iter()
            .map(|pod| match &pod.annotation {
                Some(value) => self.by_annotation(value),
                None => match scan.get_or_insert_with(|| self.scan()) {
                    Ok(candidates) => self.by_ip(&pod.ips, candidates),
                    Err(reason) => Err(LocateError::ScanDir {
                        dir: self.dir.clone(),
                        reason: reason.clone(),
                    }),
                },
            })
            .collect()
    }

    fn by_annotation(&self, value: &str) -> Result<Located, LocateError> {
        let path = parse_netns_annotation(value, &self.dir)?;
        let netns = NetnsFd::open(&path)?;
        self.checked(path, netns)
    }

    fn checked(&self, path: PathBuf, netns: NetnsFd) -> Result<Located, LocateError> {
        if netns.inode() == self.own_inode {
            return Err(LocateError::HostNetns { path });
        }
        Ok(Located { path, netns })
    }

    fn by_ip(&self, ips: &[IpAddr], candidates: &[Candidate]) -> Result<Located, LocateError> {
        if ips.is_empty() {
            return Err(LocateError::NoIp);
        }
        let list = |items: Vec<String>| items.join(", ");
        let ip_list = list(ips.iter().map(ToString::to_string).collect());
        let mut matches: BTreeMap<u64, &Candidate> = BTreeMap::new();
        for candidate in candidates {
            if candidate.addrs.iter().any(|a| ips.contains(a)) {
                // Several names for one namespace (same inode) are one match.
                matches.entry(candidate.inode).or_insert(candidate);
            }
        }
        let mut found = matches.into_values();
        match (found.next(), found.next()) {
            (None, _) => Err(LocateError::NotFound {
                dir: self.dir.clone(),
                ips: ip_list,
            }),
            (Some(only), None) => {
                let netns = NetnsFd::open(&only.path)?;
                self.checked(only.path.clone(), netns)
            }
            (Some(a), Some(b)) => {
                let paths = [a, b].into_iter().chain(found);
                let paths = list(paths.map(|c| c.path.display().to_string()).collect());
                Err(LocateError::Ambiguous {
                    ips: ip_list,
                    paths,
                })
            }
        }
    }

    /// Every network namespace in the directory (except ours) with its addresses.
    fn scan(&self) -> Result<Vec<Candidate>, String> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|e| e.to_string())?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        let mut candidates = Vec::new();
        for path in paths {
            // Anything that is not a netns (or vanished meanwhile) is not a candidate.
            let netns = match NetnsFd::open(&path) {
                Ok(netns) if netns.inode() != self.own_inode => netns,
                Ok(_) => continue,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "skipping netns candidate");
                    continue;
                }
            };
            match addresses_in(&netns) {
                Ok(addrs) => candidates.push(Candidate {
                    inode: netns.inode(),
                    path,
                    addrs,
                }),
                Err(e) => debug!(path = %path.display(), error = %e, "cannot list addresses"),
            }
        }
        Ok(candidates)
    }
}

/// The non-loopback addresses of every interface in `netns`, listed from a thread that enters
/// it (the caller's thread never changes namespace).
pub fn addresses_in(netns: &NetnsFd) -> io::Result<Vec<IpAddr>> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> io::Result<Vec<IpAddr>> {
                setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
                Ok(addrs
                    .filter_map(|a| a.address)
                    .filter_map(|a| {
                        let v4 = a.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()));
                        v4.or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
                    })
                    .filter(|ip| !ip.is_loopback())
                    .collect())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_table() {
        let dir = Path::new("/run/netns");
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("/run/netns/pod-a", Ok("/run/netns/pod-a")),
            ("pod-a", Ok("/run/netns/pod-a")),
            (" pod-a ", Ok("/run/netns/pod-a")),
            ("/proc/42/ns/net", Ok("/proc/42/ns/net")),
            ("/run//netns/./x", Ok("/run/netns/x")),
            ("", Err("empty")),
            ("   ", Err("empty")),
            ("..", Err("not a namespace name")),
            (
                "netns/pod-a",
                Err("must be an absolute path or a bare name"),
            ),
            ("/run/netns/../../etc/passwd", Err("must not contain `..`")),
            ("a\0b", Err("contains a NUL byte")),
        ];
        for (value, want) in cases {
            match (parse_netns_annotation(value, dir), want) {
                (Ok(path), Ok(expected)) => assert_eq!(path, Path::new(expected), "{value:?}"),
                (Err(e), Err(reason)) => {
                    let text = e.to_string();
                    assert!(
                        text.contains(reason) && text.contains(NETNS_ANNOTATION),
                        "{value:?}: {text}"
                    );
                }
                (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn own_namespace_is_refused() {
        let locator = Locator::new("/nonexistent").unwrap();
        let hint = PodHint {
            annotation: Some("/proc/self/ns/net".to_owned()),
            ips: Vec::new(),
        };
        let err = locator.locate(&[hint]).pop().unwrap().unwrap_err();
        assert!(matches!(err, LocateError::HostNetns { .. }), "{err}");
        assert!(err.to_string().contains("refusing to capture"), "{err}");
    }

    #[test]
    fn lookup_errors_are_clear() {
        let locator = Locator::with_own_inode("/nonexistent/netns-dir", 1);
        let hints = [
            PodHint {
                annotation: Some("missing-pod".to_owned()),
                ips: Vec::new(),
            },
            PodHint {
                annotation: Some("/proc/self/ns/uts".to_owned()),
                ips: Vec::new(),
            },
            PodHint {
                annotation: None,
                ips: Vec::new(),
            },
            PodHint {
                annotation: None,
                ips: vec!["10.0.0.1".parse().unwrap()],
            },
        ];
        let errors: Vec<String> = locator
            .locate(&hints)
            .into_iter()
            .map(|r| r.unwrap_err().to_string())
            .collect();
        assert!(
            errors[0].contains("/nonexistent/netns-dir/missing-pod"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].contains("not a network namespace"),
            "{}",
            errors[1]
        );
        assert!(
            errors[2].contains("cannot list network namespaces"),
            "{}",
            errors[2]
        );
        assert!(
            errors[3].contains("/nonexistent/netns-dir"),
            "{}",
            errors[3]
        );
    }

    #[test]
    fn ip_matching_needs_exactly_one_namespace() {
        // Candidates are plain data here; the real scan is covered by the netns tests.
        let own = NetnsFd::open("/proc/self/ns/net").unwrap().inode();
        let locator = Locator::with_own_inode("/x", own + 1);
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let cand = |path: &str, inode, addrs: &[&str]| Candidate {
            path: PathBuf::from(path),
            inode,
            addrs: addrs.iter().map(|a| ip(a)).collect(),
        };
        let candidates = [
            cand("/proc/self/ns/net", own, &["10.0.0.1"]),
            cand("/also/self", own, &["10.0.0.1"]),
            cand("/a", 7, &["10.0.0.2"]),
            cand("/b", 8, &["10.0.0.2", "fd00::2"]),
        ];
        let found = locator.by_ip(&[ip("10.0.0.1")], &candidates).unwrap();
        assert_eq!(
            found.path,
            Path::new("/proc/self/ns/net"),
            "same inode under two names"
        );
        let err = locator
            .by_ip(&[ip("10.0.0.2")], &candidates)
            .unwrap_err()
            .to_string();
        assert!(err.contains("several network namespaces (/a, /b)"), "{err}");
        let err = locator
            .by_ip(&[ip("10.0.0.9")], &candidates)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no network namespace in /x holds pod IP 10.0.0.9"),
            "{err}"
        );
        assert!(matches!(
            locator.by_ip(&[], &candidates),
            Err(LocateError::NoIp)
        ));
    }

    #[test]
    fn own_addresses_are_listed_from_a_side_thread() {
        let own = NetnsFd::open("/proc/self/ns/net").unwrap();
        let addrs = addresses_in(&own).unwrap();
        assert!(addrs.iter().all(|a| !a.is_loopback()));
    }
}
