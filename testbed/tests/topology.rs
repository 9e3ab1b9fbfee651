//! Topology tests: nodes and pods as network namespaces, traffic between them, removal and
//! cleanup. They need root; run them inside the sandbox:
//!
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-testbed`

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use mesh_testbed::{Cluster, Node, Pod, TestbedError, apps, netns, require_netns};

const ECHO_PORT: u16 = 8080;
const HTTP_PORT: u16 = 80;

fn netns_list() -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(out.status.success(), "ip netns list failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(pod.ip(), port))
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// Polls `check` until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct TwoByTwo {
    cluster: Cluster,
    nodes: [Node; 2],
    // [node][pod]
    pods: [[Pod; 2]; 2],
}

fn two_by_two(prefix: &str) -> Result<TwoByTwo> {
    let cluster = Cluster::new(prefix)?;
    let n1 = cluster.add_node("n1")?;
    let n2 = cluster.add_node("n2")?;
    let pods = [
        [n1.add_pod("a")?, n1.add_pod("b")?],
        [n2.add_pod("a")?, n2.add_pod("b")?],
    ];
    Ok(TwoByTwo {
        cluster,
        nodes: [n1, n2],
        pods,
    })
}

#[test]
fn address_plan_and_node_setup() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-plan")?;
    let [n1, n2] = &tb.nodes;
    assert_eq!((n1.index(), n1.ip()), (1, Ipv4Addr::new(10, 99, 0, 1)));
    assert_eq!(n2.ip(), Ipv4Addr::new(10, 99, 0, 2));
    assert_eq!(n2.pod_cidr(), (Ipv4Addr::new(10, 100, 2, 0), 24));
    let ips: Vec<Ipv4Addr> = tb.pods.iter().flatten().map(Pod::ip).collect();
    assert_eq!(
        ips,
        ["10.100.1.11", "10.100.1.12", "10.100.2.11", "10.100.2.12"]
            .map(|s| s.parse::<Ipv4Addr>().unwrap())
    );
    let pod = &tb.pods[1][0];
    assert_eq!((pod.name(), pod.node_name()), ("a", "n2"));
    assert_eq!(pod.gateway(), Ipv4Addr::new(10, 100, 2, 1));
    assert_eq!(
        pod.netns_path().to_str(),
        Some(&*format!("/run/netns/{}", pod.netns_name()))
    );

    let listed = netns_list()?;
    for name in tb.cluster.netns_names() {
        assert!(name.starts_with(tb.cluster.base_name()), "{name}");
        assert!(listed.contains(&name), "{name} not in {listed:?}");
    }
    let forward = n1.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))??;
    assert_eq!(forward.trim(), "1", "ip_forward in node");
    let forward = pod.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))??;
    assert_eq!(forward.trim(), "0", "pods do not forward");
    Ok(())
}

#[test]
fn threads_enter_namespaces_without_moving_the_caller() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-thread")?;
    let before = netns::current_inode()?;
    let pod = &tb.pods[0][1];
    let pod_inode = netns::inode_of(&pod.open_netns()?)?;
    assert_ne!(before, pod_inode);
    assert_eq!(pod.run(netns::current_inode)??, pod_inode);
    let task = pod.spawn(|| async { netns::current_inode() })?;
    assert_eq!(task.join()??, pod_inode);
    assert_eq!(
        netns::current_inode()?,
        before,
        "caller thread changed namespace"
    );

    // A process spawned from the pod thread runs in the pod.
    let mut cmd = Command::new("ip");
    cmd.args(["-4", "-o", "addr", "show", "dev", "eth0"]);
    let out = netns::command_checked(&pod.open_netns()?, cmd, None)?;
    let out = String::from_utf8(out)?;
    assert!(out.contains(&format!("{}/24", pod.ip())), "{out}");
    Ok(())
}

#[tokio::test]
async fn tcp_and_http_across_and_within_nodes() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-traffic")?;
    let [[a1, b1], [a2, b2]] = &tb.pods;
    let echo = apps::start_echo(&b2.open_netns()?, any(ECHO_PORT))?;
    assert_eq!(echo.local_addr(), any(ECHO_PORT));
    let http = apps::start_http(&b1.open_netns()?, any(HTTP_PORT), b1.name())?;

    // Cross node (n1/a → n2/b) and same node (n2/a → n2/b): the echo server sees the real client IP.
    for client in [a1, a2, b1] {
        let reply = apps::echo_roundtrip(&client.open_netns()?, addr(b2, ECHO_PORT), b"hello")
            .await
            .with_context(|| format!("echo from {}/{}", client.node_name(), client.name()))?;
        assert_eq!(reply.peer.ip(), client.ip(), "echo saw the client pod IP");
        assert_eq!(reply.data, b"hello");
    }

    let reply = apps::http_get(&a2.open_netns()?, addr(b1, HTTP_PORT), "/").await?;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .body
            .starts_with(&format!("pod=b client={}:", a2.ip())),
        "{}",
        reply.body
    );
    let missing = apps::http_get(&a2.open_netns()?, addr(b1, HTTP_PORT), "/nope").await?;
    assert_eq!(missing.status, 404);
    let bad = apps::http_get(&a2.open_netns()?, addr(b1, HTTP_PORT), "no path").await;
    assert!(matches!(bad, Err(apps::AppError::Request(_))), "{bad:?}");

    // Stopping an app closes its listener.
    echo.stop();
    // The listener closes when the app's runtime is torn down; allow the kernel a moment
    // (bounded) before requiring refusals.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let err = loop {
        match apps::connect(&a1.open_netns()?, addr(b2, ECHO_PORT)).await {
            Err(e) => break e,
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Ok(_) => anyhow::bail!("connect after stop must fail"),
        }
    };
    assert!(
        err.to_string().contains("connect to 10.100.2.12:8080"),
        "{err}"
    );
    drop(http);
    Ok(())
}

#[test]
fn bind_conflict_is_an_error() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-bind")?;
    let ns = tb.pods[0][0].open_netns()?;
    let _first = apps::start_echo(&ns, any(ECHO_PORT))?;
    let err = apps::start_echo(&ns, any(ECHO_PORT))
        .err()
        .context("second bind must fail")?;
    assert!(err.to_string().contains("bind 0.0.0.0:8080"), "{err}");
    Ok(())
}

#[tokio::test]
async fn pod_removal() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-remove")?;
    let gone = tb.pods[1][1].clone();
    tb.cluster.remove_pod(&gone)?;
    assert!(!netns_list()?.contains(&gone.netns_name().to_owned()));
    assert!(!tb.cluster.pods().contains(&gone));
    let again = tb
        .cluster
        .remove_pod(&gone)
        .err()
        .context("second removal must fail")?;
    assert!(matches!(again, TestbedError::UnknownPod { .. }), "{again}");

    // The node-side veth (p2, the second pod of n2) goes away asynchronously.
    let node = tb.nodes[1].open_netns()?;
    eventually(Duration::from_secs(3), || {
        let mut cmd = Command::new("ip");
        cmd.args(["-o", "link", "show"]);
        let links = String::from_utf8(netns::command_checked(&node, cmd, None)?)?;
        Ok(!links.contains(" p2@"))
    })?;

    // Names can be reused; addresses are not.
    let back = tb.nodes[1].add_pod("b")?;
    assert_eq!(back.ip(), Ipv4Addr::new(10, 100, 2, 13));
    let _echo = apps::start_echo(&back.open_netns()?, any(ECHO_PORT))?;
    let client = &tb.pods[0][0];
    let reply = apps::echo_roundtrip(&client.open_netns()?, addr(&back, ECHO_PORT), b"x").await?;
    assert_eq!(reply.peer.ip(), client.ip());
    Ok(())
}

#[test]
fn drop_deletes_every_namespace() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let tb = two_by_two("tb-drop")?;
    let names = tb.cluster.netns_names();
    assert_eq!(names.len(), 7, "fabric + 2 nodes + 4 pods: {names:?}");
    let node = tb.nodes[0].clone();
    drop(tb);
    let listed = netns_list()?;
    for name in &names {
        assert!(!listed.contains(name), "{name} survived the drop");
    }
    // A leftover node handle cannot resurrect the cluster.
    let err = node
        .add_pod("late")
        .err()
        .context("add after drop must fail")?;
    assert!(matches!(err, TestbedError::TornDown), "{err}");
    Ok(())
}

#[test]
fn bad_names_and_duplicates_are_errors() -> Result<()> {
    if !require_netns() {
        return Ok(());
    }
    let cluster = Cluster::new("tb-names")?;
    let n1 = cluster.add_node("n1")?;
    let dup = cluster.add_node("n1").err().context("duplicate node")?;
    assert_eq!(dup.to_string(), "node \"n1\" already exists");
    let bad = cluster.add_node("N 1").err().context("bad node name")?;
    assert!(
        bad.to_string().starts_with("invalid node name \"N 1\""),
        "{bad}"
    );
    n1.add_pod("a")?;
    let dup = n1.add_pod("a").err().context("duplicate pod")?;
    assert_eq!(dup.to_string(), "pod \"a\" already exists on node \"n1\"");
    let bad = n1.add_pod("a.b").err().context("bad pod name")?;
    assert!(bad.to_string().starts_with("invalid pod name"), "{bad}");
    assert!(cluster.node("n1").is_some() && cluster.node("n9").is_none());
    Ok(())
}
