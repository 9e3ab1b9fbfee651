//! Proves that the generated redirection rules capture real traffic in a pod namespace, for both
//! backends, and that removing them on the running pod restores direct traffic.
//!
//! A tiny test proxy listens inside the enrolled pod the way ztunnel does (0.0.0.0 with
//! `IP_TRANSPARENT`) and reports what it saw. Assertions use the proxy's own report, because a
//! rule that silently failed to load still lets traffic through (testbed.md §2.1).
//!
//! Needs root; run inside the sandbox:
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p zmesh-cni`

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::{Cluster, NetnsTask, Pod, apps, netns, require_netns_tools};
use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncWriteExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use zmesh_cni::rules::{self, Backend, CaptureConfig};

const APP_PORT: u16 = 8080;

/// What the test proxy saw for one accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    listener: u16,
    /// SO_ORIGINAL_DST on the outbound listener; the local address on TPROXY listeners.
    orig_dst: SocketAddr,
    peer: SocketAddr,
}

impl Seen {
    fn line(&self) -> String {
        format!(
            "proxy listener={} orig_dst={} peer={}",
            self.listener, self.orig_dst, self.peer
        )
    }
}

fn tools(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Nftables => &["nft"],
        Backend::Iptables => &["iptables-restore", "iptables-save"],
    }
}

fn addr(pod: &Pod, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(pod.ip(), port))
}

/// Binds 0.0.0.0:`port` inside `pod` the way ztunnel does: SO_REUSEADDR + IP_TRANSPARENT
/// (required for TPROXY; harmless for REDIRECT).
fn transparent_listener(pod: &Pod, port: u16) -> Result<std::net::TcpListener> {
    let socket = pod.run(move || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })??;
    Ok(socket.into())
}

fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let raw = getsockopt(stream, sockopt::OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(raw.sin_port))))
}

/// Upstream connection to the app in the same pod that keeps the client's source IP, as
/// ztunnel's inbound does: SO_MARK (bypass capture) + IP_TRANSPARENT + bind to the client IP.
/// Must run on a thread inside the pod namespace.
async fn spoofed_upstream(client: SocketAddr, app: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(CaptureConfig::default().socket_mark)?;
    socket.set_ip_transparent_v4(true)?;
    socket.bind(&SocketAddr::from((client.ip(), 0)).into())?;
    socket.set_nonblocking(true)?;
    TcpSocket::from_std_stream(socket.into()).connect(app).await
}

/// Runs the test proxy on `listener` inside `pod`: each connection gets a report line, and on
/// the inbound path is then relayed to the app with the client IP preserved.
fn spawn_proxy(
    pod: &Pod,
    listener: std::net::TcpListener,
    report: mpsc::UnboundedSender<Seen>,
) -> Result<NetnsTask<()>> {
    let port = listener.local_addr()?.port();
    let app = addr(pod, APP_PORT);
    let outbound = port == CaptureConfig::default().outbound_port;
    Ok(pod.spawn(move || async move {
        let listener = TcpListener::from_std(listener).expect("register listener");
        while let Ok((mut stream, peer)) = listener.accept().await {
            let orig_dst = if outbound {
                original_dst(&stream)
            } else {
                stream.local_addr()
            };
            let seen = Seen {
                listener: port,
                orig_dst: orig_dst.expect("orig dst"),
                peer,
            };
            let _ = report.send(seen.clone());
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("{}\n", seen.line()).as_bytes())
                    .await;
                if !outbound && let Ok(mut upstream) = spoofed_upstream(peer, app).await {
                    let _ = copy_bidirectional(&mut stream, &mut upstream).await;
                }
            });
        }
    })?)
}

fn netns_output(pod: &Pod, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    Ok(String::from_utf8(netns::command_checked(
        &pod.open_netns()?,
        cmd,
        None,
    )?)?)
}

/// Asserts whether our rules and policy routing are present in `pod`.
fn assert_installed(pod: &Pod, backend: Backend, installed: bool) -> Result<()> {
    let cfg = CaptureConfig::default();
    let rules = netns_output(pod, &["ip", "-4", "rule", "list"])?;
    let routes = netns_output(pod, &["ip", "-4", "route", "show", "table", "all"])?;
    ensure!(
        rules::rule_present(&cfg, &rules) == installed,
        "ip rule (want {installed}):\n{rules}"
    );
    ensure!(
        rules::route_present(&cfg, &routes) == installed,
        "route (want {installed}):\n{routes}"
    );
    let (listing, needle, copies) = match backend {
        Backend::Nftables => (
            netns_output(pod, &["nft", "list", "ruleset"])?,
            "table inet ztunnel",
            1,
        ),
        Backend::Iptables => (
            netns_output(pod, &["iptables-save"])?,
            "-A OUTPUT -j ISTIO_OUTPUT",
            2,
        ),
    };
    let found = listing.matches(needle).count();
    ensure!(
        found == if installed { copies } else { 0 },
        "{found}× {needle:?} (installed={installed}):\n{listing}"
    );
    Ok(())
}

fn enroll(pod: &Pod, backend: Backend) -> Result<()> {
    let cfg = CaptureConfig::default();
    rules::apply(&pod.netns_path(), backend, &cfg)?;
    // Re-applying replaces rather than duplicates.
    rules::apply(&pod.netns_path(), backend, &cfg)?;
    assert_installed(pod, backend, true)
}

fn unenroll(pod: &Pod, backend: Backend) -> Result<()> {
    rules::remove(&pod.netns_path(), backend, &CaptureConfig::default())?;
    // Removing again is a no-op, not an error.
    rules::remove(&pod.netns_path(), backend, &CaptureConfig::default())?;
    assert_installed(pod, backend, false)
}

async fn read_report(pod: &Pod, to: SocketAddr, mark: Option<u32>) -> Result<String> {
    let stream = apps::connect_marked(&pod.open_netns()?, to, mark).await?;
    Ok(apps::read_line(stream, to).await?)
}

async fn outbound_capture(backend: Backend) -> Result<()> {
    if !require_netns_tools(tools(backend)) {
        return Ok(());
    }
    let cluster = Cluster::new("cni-out")?;
    let client = cluster.add_node("n1")?.add_pod("client")?;
    let server = cluster.add_node("n2")?.add_pod("server")?;
    let _app = apps::start_echo(
        &server.open_netns()?,
        SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
    )?;
    let target = addr(&server, APP_PORT);

    enroll(&client, backend)?;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let listener = transparent_listener(&client, CaptureConfig::default().outbound_port)?;
    let proxy = spawn_proxy(&client, listener, tx)?;

    let line = read_report(&client, target, None).await?;
    let report = seen
        .try_recv()
        .context("the proxy did not see the captured connection")?;
    assert_eq!(report.orig_dst, target, "SO_ORIGINAL_DST");
    assert_eq!(report.peer.ip(), client.ip());
    assert_eq!(line, report.line());

    // Sockets carrying the proxy's mark bypass capture and reach the real server.
    let marked = apps::connect_marked(&client.open_netns()?, target, Some(0x539)).await?;
    let reply = apps::parse_echo_reply(&apps::exchange(marked, target, b"m").await?)?;
    assert_eq!(
        (reply.peer.ip(), reply.data.as_slice()),
        (client.ip().into(), &b"m"[..])
    );
    assert!(seen.try_recv().is_err(), "marked connection was captured");

    // Removal on the running pod: the same connection now goes straight to the server.
    unenroll(&client, backend)?;
    let reply = apps::echo_roundtrip(&client.open_netns()?, target, b"direct").await?;
    assert_eq!(
        (reply.peer.ip(), reply.data.as_slice()),
        (client.ip().into(), &b"direct"[..])
    );
    assert!(
        seen.try_recv().is_err(),
        "connection captured after removal"
    );
    proxy.stop();
    Ok(())
}

async fn inbound_capture(backend: Backend) -> Result<()> {
    if !require_netns_tools(tools(backend)) {
        return Ok(());
    }
    let cluster = Cluster::new("cni-in")?;
    let n1 = cluster.add_node("n1")?;
    let n2 = cluster.add_node("n2")?;
    let (remote, server, neighbour) = (
        n1.add_pod("remote")?,
        n2.add_pod("server")?,
        n2.add_pod("nb")?,
    );
    let _app = apps::start_echo(
        &server.open_netns()?,
        SocketAddr::from(([0, 0, 0, 0], APP_PORT)),
    )?;
    let target = addr(&server, APP_PORT);

    enroll(&server, backend)?;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let listener = transparent_listener(&server, CaptureConfig::default().inbound_plaintext_port)?;
    let proxy = spawn_proxy(&server, listener, tx)?;

    // Cross-node and same-node clients are both TPROXYed to 15006; the proxy sees the original
    // destination as its local address and the real client as the peer, then hands the
    // connection to the app spoofing the client IP (which needs the connmark + table 100 path).
    for client in [&remote, &neighbour] {
        let stream = apps::connect(&client.open_netns()?, target).await?;
        let reply = String::from_utf8(apps::exchange(stream, target, b"in").await?)?;
        let report = seen
            .try_recv()
            .context("the proxy did not see the inbound connection")?;
        assert_eq!((report.listener, report.orig_dst), (15006, target));
        assert_eq!(report.peer.ip(), client.ip());
        let Some((first, echoed)) = reply.split_once('\n') else {
            bail!("short reply {reply:?}")
        };
        assert_eq!(first, report.line());
        let app_saw = apps::parse_echo_reply(echoed.as_bytes())?;
        assert_eq!(
            app_saw.peer.ip(),
            client.ip(),
            "app must see the real client IP"
        );
        assert_eq!(app_saw.data, b"in");
    }

    unenroll(&server, backend)?;
    let reply = apps::echo_roundtrip(&remote.open_netns()?, target, b"direct").await?;
    assert_eq!(reply.peer.ip(), remote.ip());
    assert!(
        seen.try_recv().is_err(),
        "connection captured after removal"
    );
    proxy.stop();
    Ok(())
}

#[tokio::test]
async fn outbound_capture_nftables() -> Result<()> {
    outbound_capture(Backend::Nftables).await
}

#[tokio::test]
async fn outbound_capture_iptables() -> Result<()> {
    outbound_capture(Backend::Iptables).await
}

#[tokio::test]
async fn inbound_capture_nftables() -> Result<()> {
    inbound_capture(Backend::Nftables).await
}

#[tokio::test]
async fn inbound_capture_iptables() -> Result<()> {
    inbound_capture(Backend::Iptables).await
}

#[test]
fn failing_removal_names_the_command_and_its_stderr() -> Result<()> {
    if !require_netns_tools(tools(Backend::Iptables)) {
        return Ok(());
    }
    let cluster = Cluster::new("cni-err")?;
    let pod = cluster.add_node("n1")?.add_pod("p")?;
    let cfg = CaptureConfig::default();
    rules::apply(&pod.netns_path(), Backend::Iptables, &cfg)?;
    // Someone else jumps to our chain (with a match, so it is not our jump), so the kernel
    // refuses to delete the chain.
    let foreign = [
        "-t",
        "mangle",
        "PREROUTING",
        "-p",
        "udp",
        "-j",
        "ISTIO_PRERT",
    ];
    let edit = |op: &str| {
        let mut args = vec!["iptables", foreign[0], foreign[1], op];
        args.extend(&foreign[2..]);
        netns_output(&pod, &args)
    };
    edit("-A")?;
    let err = rules::remove(&pod.netns_path(), Backend::Iptables, &cfg)
        .err()
        .context("removal of a referenced chain must fail")?;
    let text = err.to_string();
    assert!(matches!(err, rules::ApplyError::Command { .. }), "{text}");
    assert!(
        text.starts_with("`iptables-restore --noflush` failed in /run/netns/"),
        "{text}"
    );
    assert!(
        text.contains("ISTIO_PRERT") || text.contains("busy"),
        "stderr missing: {text}"
    );

    // Once the foreign reference is gone, removal completes.
    edit("-D")?;
    rules::remove(&pod.netns_path(), Backend::Iptables, &cfg)?;
    assert_installed(&pod, Backend::Iptables, false)
}
