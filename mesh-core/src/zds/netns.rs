//! A file descriptor that is known to refer to a network namespace.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Why a file descriptor was not accepted as a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `/proc/self/fd/<n>` or `fstat` could not be read for the descriptor.
    #[error("cannot inspect file descriptor {fd}: {source}")]
    Inspect {
        /// The descriptor number at the time of the check.
        fd: i32,
        /// The underlying error.
        source: io::Error,
    },
    /// The descriptor refers to something else (a regular file, another namespace type, ...).
    #[error("file descriptor is not a network namespace (it refers to {target})")]
    NotNetns {
        /// What `/proc/self/fd/<n>` points to.
        target: String,
    },
    /// `/proc` and `fstat` disagree about the namespace inode.
    #[error("network namespace inode mismatch: /proc reports {link}, fstat reports {inode}")]
    InodeMismatch {
        /// What `/proc/self/fd/<n>` points to.
        link: String,
        /// The inode `fstat` reports.
        inode: u64,
    },
    /// A namespace path could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// An open network namespace: a file descriptor checked to be a `net` namespace, with its inode.
///
/// The inode identifies the namespace on this host: two descriptors of the same namespace have the
/// same inode. Dropping the value closes the descriptor, which (once no process lives in it) lets
/// the kernel free the namespace.
#[derive(Debug)]
pub struct NetnsFd {
    file: File,
    inode: u64,
}

impl NetnsFd {
    /// Takes ownership of `fd` and checks that it refers to a network namespace.
    ///
    /// `/proc/self/fd/<n>` of a namespace descriptor usually reads `net:[<inode>]`, and that inode
    /// must equal the one `fstat` reports. A namespace bind-mounted on a file (what `ip netns add`
    /// does for `/run/netns/NAME`) reads as that file's path instead; then the descriptor must be
    /// on nsfs and the kernel must accept it as a network namespace (see [`check_bind_mounted`]).
    /// On error the descriptor is closed.
    pub fn new(fd: impl Into<OwnedFd>) -> Result<Self, NetnsError> {
        let file = File::from(fd.into());
        let raw = file.as_raw_fd();
        let inspect = |source| NetnsError::Inspect { fd: raw, source };
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).map_err(inspect)?;
        let link = link.to_string_lossy().into_owned();
        let inode = file.metadata().map_err(inspect)?.ino();
        match parse_ns_link(&link) {
            // The nsfs inode in the link and the one fstat sees are the same number; a mismatch
            // means the descriptor table changed under us, which we refuse rather than guess about.
            Some(("net", link_inode)) if link_inode == inode => {}
            Some(("net", _)) => return Err(NetnsError::InodeMismatch { link, inode }),
            Some(_) => return Err(NetnsError::NotNetns { target: link }),
            None => check_bind_mounted(&file, link)?,
        }
        Ok(Self { file, inode })
    }

    /// Opens a network namespace by path (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(file)
    }

    /// The namespace inode, which identifies the namespace on this host.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Duplicates the descriptor (same namespace, same inode).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            inode: self.inode,
        })
    }

    /// Gives up the check and returns the plain file.
    pub fn into_file(self) -> File {
        self.file
    }
}

impl AsFd for NetnsFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `statfs` magic of nsfs, the file system of namespace descriptors.
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Checks a descriptor whose `/proc` link is a path (`link`): it must live on nsfs, and `setns`
/// restricted to network namespaces must accept it. The `setns` runs on a throwaway thread, so
/// no caller thread ever changes namespace; it needs `CAP_SYS_ADMIN`, which every user of these
/// descriptors (the node agent, ztunnel) has anyway.
fn check_bind_mounted(file: &File, link: String) -> Result<(), NetnsError> {
    let inspect = |source: io::Error| NetnsError::Inspect {
        fd: file.as_raw_fd(),
        source,
    };
    let stat = rustix::fs::fstatfs(file).map_err(|e| inspect(e.into()))?;
    if stat.f_type as u64 != NSFS_MAGIC {
        return Err(NetnsError::NotNetns { target: link });
    }
    let fd = file.as_fd();
    let entered = std::thread::scope(|scope| {
        scope
            .spawn(|| move_into_link_name_space(fd, Some(LinkNameSpaceType::Network)))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    match entered {
        Ok(()) => Ok(()),
        // EINVAL: a namespace, but not a network namespace.
        Err(e) if e == rustix::io::Errno::INVAL => Err(NetnsError::NotNetns {
            target: format!("{link}, a namespace of another type"),
        }),
        Err(e) => Err(inspect(e.into())),
    }
}

/// Parses `net:[4026531840]` into `("net", 4026531840)`; anything else is `None`.
fn parse_ns_link(link: &str) -> Option<(&str, u64)> {
    let (kind, rest) = link.split_once(":[")?;
    // Namespace kinds are short lowercase words; a path (bind mount) never matches.
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    let inode = rest.strip_suffix(']')?.parse().ok()?;
    Some((kind, inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_is_accepted_with_its_inode() {
        let ns = NetnsFd::open("/proc/self/ns/net").unwrap();
        let expected = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(ns.inode(), expected);
        let clone = ns.try_clone().unwrap();
        assert_eq!(clone.inode(), expected);
    }

    #[test]
    fn regular_file_is_rejected_naming_its_target() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let err = NetnsFd::new(tmp.reopen().unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("not a network namespace"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    }

    #[test]
    fn other_namespace_type_is_rejected() {
        let err = NetnsFd::open("/proc/self/ns/uts").unwrap_err();
        assert!(err.to_string().contains("uts:["), "{err}");
    }

    #[test]
    fn missing_path_names_the_path() {
        let err = NetnsFd::open("/nonexistent/netns").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }

    #[test]
    fn link_parsing() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(("net", 4026531840)));
        assert_eq!(parse_ns_link("mnt:[4026531840]"), Some(("mnt", 4026531840)));
        assert_eq!(parse_ns_link("net:[abc]"), None);
        assert_eq!(parse_ns_link("net:[12"), None);
        assert_eq!(parse_ns_link("/tmp/x"), None);
        assert_eq!(parse_ns_link("/run/netns/a:[1]"), None);
    }
}
