//! How namespace descriptors from `/run/netns` are validated before they go to ztunnel.
//!
//! `ip netns add` bind-mounts each namespace on a file, and such a descriptor's `/proc` link
//! reads as that path rather than `net:[inode]`, so `NetnsFd` asks the kernel instead. This
//! checks both outcomes on real bind mounts, which needs the private mount namespace of the
//! sandbox: `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p zmesh-cni`

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use anyhow::{Result, ensure};
use mesh_core::zds::NetnsFd;
use mesh_testbed::sandbox::{REQUIRE_NETNS_ENV, decide, in_sandbox};
use mesh_testbed::{Cluster, require_netns};

#[test]
fn bind_mounted_namespaces_are_checked_by_type() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    // Mounting outside the sandbox would touch the host's mount table.
    let missing = if in_sandbox() {
        vec![]
    } else {
        vec!["the sandbox (scripts/sandbox.sh)".to_owned()]
    };
    if !decide(std::env::var(REQUIRE_NETNS_ENV).ok().as_deref(), &missing) {
        return Ok(());
    }
    let cluster = Cluster::new("cni-nsfd")?;
    let pod = cluster.add_node("n1")?.add_pod("p")?;
    let netns = NetnsFd::open(pod.netns_path())?;
    ensure!(
        netns.inode() == std::fs::metadata(pod.netns_path())?.ino(),
        "inode"
    );

    let dir = tempfile::tempdir()?;
    let uts = dir.path().join("uts");
    std::fs::write(&uts, "")?;
    let mounted = Command::new("mount")
        .args(["--bind", "/proc/self/ns/uts"])
        .arg(&uts)
        .status()?;
    ensure!(mounted.success(), "mount --bind failed: {mounted}");
    let err = NetnsFd::open(&uts).err();
    let _ = Command::new("umount").arg(&uts).status();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        err.contains("a namespace of another type"),
        "uts namespace accepted: {err:?}"
    );
    ensure!(err.contains(&uts.display().to_string()), "{err}");
    Ok(())
}
