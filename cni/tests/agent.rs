//! The `zmesh-cni` binary on the real kernel: a config directory of YAML, pods in network
//! namespaces (mesh-testbed), a ztunnel stand-in on the ZDS socket, and capture checked by a test
//! proxy that must actually receive the pod's connection.
//!
//! Scenario per backend: pods `a` (netns by annotation), `b` (netns found by pod IP) and `c`
//! (opted out) on node `n1`, in a namespace labelled ambient:
//! 1. before ztunnel connects, `a` and `b` are captured and `pending`; `c` is untouched;
//! 2. ztunnel connects and gets both pods with netns fds of the right inodes; both `enabled`;
//!    `a`'s outbound connection to `b` lands on the proxy port;
//! 3. the namespace label is removed (file rewritten): DelWorkload for both, rules gone, and the
//!    same connection reaches `b`'s app, which kept running;
//! 4. the label comes back: both captured and sent again;
//! 5. SIGTERM: the agent exits cleanly and leaves the rules in place;
//! 6. the label is removed while no agent runs: the next agent removes the leftover rules.
//!
//! Needs root; run inside the sandbox:
//! `scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p zmesh-cni`

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_testbed::{Cluster, NetnsTask, Pod, apps, netns, require_netns_tools};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use zmesh_cni::rules::Backend;
use zmesh_cni::testing::{RecordingZtunnel, ZtunnelEvent};

const APP_PORT: u16 = 8080;
const OUTBOUND_PORT: u16 = 15001;
const WAIT: Duration = Duration::from_secs(15);

/// The agent as a child process; killed on drop, its log printed if the test failed.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    admin: SocketAddr,
    stopped_cleanly: bool,
}

impl Agent {
    fn start(dir: &Path, backend: Backend) -> Result<Agent> {
        let admin = free_port()?;
        let log = dir.join("agent.log");
        let out = File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_zmesh-cni"))
            .args(["--config-dir", &dir.join("config").display().to_string()])
            .args(["--node-name", "n1"])
            .args(["--zds-socket", &dir.join("zds.sock").display().to_string()])
            .args(["--netns-dir", &dir.join("netns").display().to_string()])
            .args(["--backend", &backend.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--poll-interval", "50ms", "--log", "debug"])
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting zmesh-cni")?;
        Ok(Agent {
            child: Some(child),
            log,
            admin,
            stopped_cleanly: false,
        })
    }

    /// `/status` as JSON.
    fn status(&self) -> Result<serde_json::Value> {
        let mut stream = std::net::TcpStream::connect(self.admin)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /status HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        let (head, body) = reply.split_once("\r\n\r\n").context("no http body")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "status: {head}");
        Ok(serde_json::from_str(body)?)
    }

    fn pod_field(&self, name: &str, field: &str) -> Result<serde_json::Value> {
        let status = self.status()?;
        let pods = status["pods"].as_array().context("pods")?;
        let pod = pods
            .iter()
            .find(|p| p["name"] == name)
            .context("pod not in status")?;
        Ok(pod[field].clone())
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait()? {
                self.stopped_cleanly = status.success();
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "agent did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A clean SIGTERM exit means the scenario got to its end; otherwise show what happened.
        if !self.stopped_cleanly {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- zmesh-cni log ----\n{log}\n---- end of log ----");
        }
    }
}

fn free_port() -> Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Polls `check` until it returns `Ok(true)` or `WAIT` passes.
async fn eventually(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => "condition false".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_config(dir: &Path, ambient: bool, a: &Pod, b: &Pod, c: &Pod) -> Result<()> {
    let label = if ambient {
        "istio.io/dataplane-mode: ambient"
    } else {
        "team: shop"
    };
    let pod = |name: &str, pod: &Pod, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  uid: uid-{name}\n{extra}\
             spec:\n  nodeName: n1\n  serviceAccountName: sa-{name}\nstatus:\n  phase: Running\n  podIP: {}\n",
            pod.ip()
        )
    };
    let annotation = |p: &Pod| {
        format!(
            "  annotations:\n    zmesh.dev/netns: {}\n",
            p.netns_path().display()
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    {label}\n{}{}{}",
        pod("a", a, &annotation(a)),
        pod("b", b, ""),
        pod(
            "c",
            c,
            &format!(
                "  labels:\n    istio.io/dataplane-mode: none\n{}",
                annotation(c)
            )
        ),
    );
    // Atomic replace, as the docs recommend.
    let tmp = dir.join(".shop.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("shop.yaml"))?;
    Ok(())
}

/// Whether our rules are in `pod` (checked with the backend's own listing tool).
fn has_rules(pod: &Pod, backend: Backend) -> Result<bool> {
    let (program, args, needle): (&str, &[&str], &str) = match backend {
        Backend::Nftables => ("nft", &["list", "ruleset"], "table inet ztunnel"),
        Backend::Iptables => ("iptables-save", &[], "-A OUTPUT -j ISTIO_OUTPUT"),
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = netns::command_checked(&pod.open_netns()?, cmd, None)?;
    Ok(String::from_utf8(out)?.contains(needle))
}

/// A stand-in for ztunnel's outbound listener in `pod`: reports the original destination of
/// every connection it receives and tells the client it was captured.
fn outbound_proxy(pod: &Pod) -> Result<(NetnsTask<()>, mpsc::UnboundedReceiver<SocketAddr>)> {
    let listener = pod.run(|| -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_ip_transparent_v4(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT)).into())?;
        socket.listen(128)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    })??;
    let (tx, rx) = mpsc::unbounded_channel();
    let task = pod.spawn(move || async move {
        let listener = TcpListener::from_std(listener).expect("register listener");
        while let Ok((mut stream, _)) = listener.accept().await {
            let raw = getsockopt(&stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
            let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
            let _ = tx.send(SocketAddr::from((ip, u16::from_be(raw.sin_port))));
            let _ = stream.write_all(b"captured\n").await;
        }
    })?;
    Ok((task, rx))
}

fn uid_of(event: &ZtunnelEvent) -> Option<&str> {
    match event {
        ZtunnelEvent::Add { uid, .. } | ZtunnelEvent::Del { uid } => Some(uid),
        _ => None,
    }
}

fn inode(pod: &Pod) -> Result<u64> {
    Ok(std::fs::metadata(pod.netns_path())?.ino())
}

/// Waits for adds of both pods (in any order) and checks their namespace inodes.
async fn expect_adds(zt: &mut RecordingZtunnel, a: &Pod, b: &Pod) -> Result<()> {
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = zt
            .wait_for(WAIT, |e| matches!(e, ZtunnelEvent::Add { .. }))
            .await
            .context("no AddWorkload")?;
        let ZtunnelEvent::Add {
            uid,
            info,
            netns_inode,
        } = event
        else {
            unreachable!()
        };
        let pod = if uid == "uid-a" { a } else { b };
        ensure!(
            netns_inode == inode(pod)?,
            "{uid}: netns inode {netns_inode} is not {}'s",
            pod.name()
        );
        ensure!(
            info.namespace == "shop" && info.service_account == format!("sa-{}", &uid[4..]),
            "{info:?}"
        );
        if !seen.contains(&uid) {
            seen.push(uid);
        }
    }
    Ok(())
}

/// Connects from `a` to `b`'s app: `Ok(true)` if the proxy got it, `Ok(false)` if the app did.
async fn captured(
    a: &Pod,
    b: &Pod,
    proxy: &mut mpsc::UnboundedReceiver<SocketAddr>,
) -> Result<bool> {
    let target = SocketAddr::from((b.ip(), APP_PORT));
    let stream = apps::connect(&a.open_netns()?, target).await?;
    let line = apps::read_line(stream, target).await?;
    if line == "captured" {
        let orig = proxy.recv().await.context("proxy report")?;
        ensure!(orig == target, "SO_ORIGINAL_DST {orig}, want {target}");
        return Ok(true);
    }
    let peer: SocketAddr = line
        .strip_prefix(apps::ECHO_PEER_PREFIX)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("unexpected reply {line:?}"))?;
    ensure!(peer.ip() == std::net::IpAddr::V4(a.ip()), "app saw {peer}");
    ensure!(
        proxy.try_recv().is_err(),
        "proxy saw a connection that reached the app"
    );
    Ok(false)
}

/// The cluster, pods, config directory and test proxy of one scenario run.
struct Scene {
    backend: Backend,
    _cluster: Cluster,
    a: Pod,
    b: Pod,
    c: Pod,
    dir: tempfile::TempDir,
    _app: apps::App,
    _proxy_task: NetnsTask<()>,
    proxy: mpsc::UnboundedReceiver<SocketAddr>,
}

impl Scene {
    fn new(backend: Backend) -> Result<Scene> {
        let cluster = Cluster::new("cni-agent")?;
        let node = cluster.add_node("n1")?;
        let (a, b, c) = (node.add_pod("a")?, node.add_pod("b")?, node.add_pod("c")?);
        let app = apps::start_echo(&b.open_netns()?, SocketAddr::from(([0, 0, 0, 0], APP_PORT)))?;
        let (proxy_task, proxy) = outbound_proxy(&a)?;
        // Only this cluster's namespaces are searched by IP: other tests reuse the same IP plan.
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("netns"))?;
        for name in cluster.netns_names() {
            let link = dir.path().join("netns").join(&name);
            std::os::unix::fs::symlink(Path::new("/run/netns").join(&name), link)?;
        }
        std::fs::create_dir(dir.path().join("config"))?;
        let scene = Scene {
            backend,
            _cluster: cluster,
            a,
            b,
            c,
            dir,
            _app: app,
            _proxy_task: proxy_task,
            proxy,
        };
        scene.label(true)?;
        Ok(scene)
    }

    fn label(&self, ambient: bool) -> Result<()> {
        write_config(
            &self.dir.path().join("config"),
            ambient,
            &self.a,
            &self.b,
            &self.c,
        )
    }

    fn rules(&self, pod: &Pod) -> Result<bool> {
        has_rules(pod, self.backend)
    }

    /// Whether both `a` and `b` have rules (`Some(true)`), neither (`Some(false)`) or one.
    fn both(&self) -> Result<Option<bool>> {
        let (a, b) = (self.rules(&self.a)?, self.rules(&self.b)?);
        Ok((a == b).then_some(a))
    }

    async fn captured(&mut self) -> Result<bool> {
        captured(&self.a, &self.b, &mut self.proxy).await
    }

    fn agent(&self) -> Result<Agent> {
        Agent::start(self.dir.path(), self.backend)
    }

    async fn ztunnel(&self) -> Result<RecordingZtunnel> {
        Ok(RecordingZtunnel::connect(&self.dir.path().join("zds.sock"), None).await?)
    }
}

async fn both_in(agent: &Agent, state: &str) -> Result<()> {
    eventually(&format!("a and b {state}"), || {
        Ok(agent.pod_field("a", "redirection")? == state
            && agent.pod_field("b", "redirection")? == state)
    })
    .await
}

/// Steps 1 and 2: pending without ztunnel (captured, fail closed), enabled once it connects.
async fn enroll(scene: &mut Scene, agent: &Agent) -> Result<RecordingZtunnel> {
    both_in(agent, "pending").await?;
    ensure!(scene.both()? == Some(true), "rules missing");
    ensure!(!scene.rules(&scene.c)?, "opted-out pod got rules");
    assert_eq!(agent.pod_field("c", "skip_reason")?, "opted-out");
    let found_by_ip = scene.dir.path().join("netns").join(scene.b.netns_name());
    assert_eq!(
        agent.pod_field("b", "netns")?,
        found_by_ip.display().to_string()
    );

    let mut zt = scene.ztunnel().await?;
    expect_adds(&mut zt, &scene.a, &scene.b).await?;
    both_in(agent, "enabled").await?;
    ensure!(
        scene.captured().await?,
        "a's outbound traffic was not captured"
    );
    Ok(zt)
}

/// Step 3: ztunnel hears first, rules go, `b`'s app keeps serving; nothing is restarted.
async fn release(scene: &mut Scene, agent: &Agent, zt: &mut RecordingZtunnel) -> Result<()> {
    zt.drain();
    scene.label(false)?;
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        let is_del = |e: &ZtunnelEvent| matches!(e, ZtunnelEvent::Del { .. });
        let event = zt.wait_for(WAIT, is_del).await.context("no DelWorkload")?;
        deleted.extend(uid_of(&event).map(str::to_owned));
    }
    deleted.sort();
    assert_eq!(deleted, ["uid-a", "uid-b"]);
    let released = |pod: &str| -> Result<bool> {
        Ok(agent.pod_field(pod, "redirection")?.is_null()
            && agent.pod_field(pod, "enrolled")? == false)
    };
    eventually("a and b released", || Ok(released("a")? && released("b")?)).await?;
    ensure!(scene.both()? == Some(false), "rules left after release");
    ensure!(
        !scene.captured().await?,
        "traffic still captured after un-enrollment"
    );
    assert_eq!(agent.pod_field("a", "skip_reason")?, "not-ambient");
    Ok(())
}

async fn scenario(backend: Backend) -> Result<()> {
    let tools: &[&str] = match backend {
        Backend::Nftables => &["nft"],
        Backend::Iptables => &["iptables-restore", "iptables-save"],
    };
    if !require_netns_tools(tools) {
        return Ok(());
    }
    let mut scene = Scene::new(backend)?;
    let mut agent = scene.agent()?;
    let mut zt = enroll(&mut scene, &agent).await?;
    release(&mut scene, &agent, &mut zt).await?;

    // 4. Label back: captured and announced again.
    scene.label(true)?;
    expect_adds(&mut zt, &scene.a, &scene.b).await?;
    eventually("rules back", || Ok(scene.both()? == Some(true))).await?;
    ensure!(scene.captured().await?, "not re-captured");

    // 5. SIGTERM: clean exit, rules stay.
    let status = agent.terminate()?;
    ensure!(status.success(), "agent exited with {status}");
    ensure!(scene.both()? == Some(true), "rules removed on shutdown");
    ensure!(!scene.rules(&scene.c)?, "opted-out pod got rules");

    // 6. The label went away while no agent ran: the next agent's first pass sweeps the rules.
    drop(zt);
    scene.label(false)?;
    let mut agent = scene.agent()?;
    eventually("leftover rules swept", || {
        Ok(agent.status()?["ready"] == true && scene.both()? == Some(false))
    })
    .await?;
    ensure!(!scene.captured().await?, "traffic captured after the sweep");
    ensure!(
        agent.terminate()?.success(),
        "second agent did not exit cleanly"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_and_releases_pods_nftables() -> Result<()> {
    scenario(Backend::Nftables).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_and_releases_pods_iptables() -> Result<()> {
    scenario(Backend::Iptables).await
}
