//! The proxy's TCP sockets inside pod network namespaces: capture listeners, the original
//! destination of redirected connections, and upstream connections that bypass capture.
//!
//! Every socket is created on the namespace's worker thread ([`NetnsHandle`]) and then handed to
//! tokio; the kernel keeps it in the pod's namespace wherever it is used from. The options mirror
//! what the in-pod capture rules expect (istio-ambient-protocol.md §6.3, testbed.md §2.2):
//!
//! * listeners (15001/15006/15008) bind `0.0.0.0:port` with `IP_TRANSPARENT` (TPROXY delivers
//!   connections for foreign addresses to them) and `SO_REUSEPORT` (a new ztunnel binds alongside
//!   the old one during an upgrade);
//! * on 15001 (REDIRECT) the original destination is `SO_ORIGINAL_DST`; on the TPROXY ports it is
//!   simply the accepted socket's local address;
//! * upstream sockets carry `SO_MARK` 0x539, which the rules let through uncaptured, and may bind
//!   a foreign source IP (`IP_TRANSPARENT`) so the app sees the real client.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::netns::{NetnsError, NetnsHandle};

/// Mark ztunnel puts on its own sockets; the capture rules let marked traffic through.
pub const DEFAULT_SOCKET_MARK: u32 = 0x539;
/// Listen backlog of capture listeners (upstream ztunnel uses 128).
pub const DEFAULT_LISTEN_BACKLOG: i32 = 128;
/// Upper bound for establishing an upstream connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HBONE port; the only port that must be reachable pod-to-pod.
pub const HBONE_PORT: u16 = 15008;
/// Idle time before the first keepalive probe (upstream ztunnel's value).
pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(180);
/// Time between keepalive probes.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(180);
/// Unanswered probes before the connection is dropped.
pub const DEFAULT_KEEPALIVE_RETRIES: u32 = 9;

// Appended to connect failures towards 15008: a NetworkPolicy that forgets the HBONE port is the
// usual cause of meshed traffic timing out while plain traffic works.
const HBONE_HINT: &str = "; is a NetworkPolicy blocking port 15008? HBONE needs TCP 15008 \
                          reachable pod-to-pod";

/// A failed step and its error, as produced on the namespace worker.
type Step<T> = Result<T, (&'static str, io::Error)>;

/// Errors from creating, configuring or connecting sockets.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A socket call failed; `op` names it (e.g. "bind", "set SO_MARK").
    #[error("{op} for {addr} in netns {netns} failed: {source}")]
    Io {
        /// The failed operation.
        op: &'static str,
        /// The address being bound or connected to.
        addr: SocketAddr,
        /// Inode of the namespace the socket lives in.
        netns: u64,
        /// Underlying error.
        source: io::Error,
    },
    /// The upstream connection was not established within the timeout.
    #[error("connect to {addr} from netns {netns} timed out after {timeout:?}{hint}")]
    ConnectTimeout {
        /// Destination.
        addr: SocketAddr,
        /// Inode of the namespace the socket lives in.
        netns: u64,
        /// The timeout that expired.
        timeout: Duration,
        /// Extra advice (non-empty for port 15008).
        hint: &'static str,
    },
    /// The upstream connection failed.
    #[error("connect to {addr} from netns {netns} failed: {source}{hint}")]
    Connect {
        /// Destination.
        addr: SocketAddr,
        /// Inode of the namespace the socket lives in.
        netns: u64,
        /// Underlying error.
        source: io::Error,
        /// Extra advice (non-empty for port 15008 when the network seems to drop or reject).
        hint: &'static str,
    },
    /// The original destination of an accepted connection could not be read.
    #[error(
        "cannot read the original destination ({option}) of connection {local} <- {peer}: {source}{hint}"
    )]
    OriginalDst {
        /// `SO_ORIGINAL_DST` or `IP6T_SO_ORIGINAL_DST`.
        option: &'static str,
        /// Local address of the accepted socket (or `?`).
        local: String,
        /// Peer address of the accepted socket (or `?`).
        peer: String,
        /// Underlying error.
        source: io::Error,
        /// Extra explanation (non-empty when no NAT entry exists).
        hint: &'static str,
    },
    /// The options or addresses cannot work together.
    #[error("invalid socket request: {0}")]
    Invalid(String),
    /// The namespace worker failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// Options of a capture listener. `Default` is what ztunnel uses in pod namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerOptions {
    /// `SO_REUSEPORT`, so a second ztunnel (same uid) can bind the same port during an upgrade.
    pub reuse_port: bool,
    /// `IP_TRANSPARENT` (`IPV6_TRANSPARENT` on IPv6), required for TPROXY delivery.
    pub transparent: bool,
    /// `listen(2)` backlog; must be positive.
    pub backlog: i32,
    /// `SO_MARK` on the listening socket, if any.
    pub mark: Option<u32>,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            reuse_port: true,
            transparent: true,
            backlog: DEFAULT_LISTEN_BACKLOG,
            mark: None,
        }
    }
}

/// TCP keepalive parameters of upstream connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Probes before giving up (`TCP_KEEPCNT`).
    pub retries: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle: DEFAULT_KEEPALIVE_IDLE,
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            retries: DEFAULT_KEEPALIVE_RETRIES,
        }
    }
}

/// Options of upstream sockets. `Default`: mark 0x539, `TCP_NODELAY`, keepalive 180 s/180 s/9,
/// 10 s connect timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// `SO_MARK`; the capture rules skip marked traffic. `None` leaves the socket unmarked (it
    /// is then captured like app traffic).
    pub mark: Option<u32>,
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// TCP keepalive, if enabled.
    pub keepalive: Option<Keepalive>,
    /// Upper bound for the TCP handshake; must be non-zero.
    pub connect_timeout: Duration,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            mark: Some(DEFAULT_SOCKET_MARK),
            nodelay: true,
            keepalive: Some(Keepalive::default()),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// An upstream socket created and configured inside a namespace, not yet connected.
#[derive(Debug)]
pub struct UpstreamSocket {
    socket: Socket,
    dst: SocketAddr,
    netns: u64,
    timeout: Duration,
}

/// Opens a capture listener on `addr` inside `ns`.
///
/// Must be called within a tokio runtime (the listener is registered with it).
pub async fn listener(
    ns: &NetnsHandle,
    addr: SocketAddr,
    opts: &ListenerOptions,
) -> Result<TcpListener, SocketError> {
    let mut all = listeners(ns, &[addr], opts).await?;
    Ok(all.remove(0))
}

/// Opens one capture listener per address inside `ns`, in a single trip to the namespace
/// worker (the usual case: 15001, 15006 and 15008 for a newly enrolled pod). All or nothing.
pub async fn listeners(
    ns: &NetnsHandle,
    addrs: &[SocketAddr],
    opts: &ListenerOptions,
) -> Result<Vec<TcpListener>, SocketError> {
    if opts.backlog <= 0 {
        return Err(SocketError::Invalid(format!(
            "listen backlog must be positive, got {}",
            opts.backlog
        )));
    }
    let netns = ns.inode();
    let (owned_addrs, owned_opts) = (addrs.to_vec(), opts.clone());
    let sockets = ns
        .run_in_async(move || {
            owned_addrs
                .iter()
                .map(|addr| new_listener(*addr, &owned_opts).map_err(|e| (*addr, e)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?
        .map_err(|(addr, (op, source))| io_error(op, addr, netns, source))?;
    sockets
        .into_iter()
        .zip(addrs)
        .map(|(socket, addr)| {
            TcpListener::from_std(socket.into())
                .map_err(|e| io_error("register listener with tokio", *addr, netns, e))
        })
        .collect()
}

/// Creates, configures, binds and listens; runs on the namespace worker.
fn new_listener(addr: SocketAddr, opts: &ListenerOptions) -> Step<Socket> {
    let socket = new_tcp_socket(addr)?;
    step("set SO_REUSEADDR", socket.set_reuse_address(true))?;
    if opts.reuse_port {
        step("set SO_REUSEPORT", socket.set_reuse_port(true))?;
    }
    if let SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
    {
        // `[::]` serves IPv4 too, whatever the host's `bindv6only` default.
        step("clear IPV6_V6ONLY", socket.set_only_v6(false))?;
    }
    if opts.transparent {
        set_transparent(&socket, addr.ip())?;
    }
    if let Some(mark) = opts.mark {
        step("set SO_MARK", socket.set_mark(mark))?;
    }
    step("bind", socket.bind(&addr.into()))?;
    step("listen", socket.listen(opts.backlog))?;
    Ok(socket)
}

fn new_tcp_socket(addr: SocketAddr) -> Step<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP));
    let socket = step("create socket", socket)?;
    step("set O_NONBLOCK", socket.set_nonblocking(true))?;
    Ok(socket)
}

fn set_transparent(socket: &Socket, ip: IpAddr) -> Step<()> {
    // Both options set the same per-socket flag; the one matching the socket family must be used.
    match ip {
        IpAddr::V4(_) => step("set IP_TRANSPARENT", socket.set_ip_transparent_v4(true)),
        IpAddr::V6(_) => step("set IPV6_TRANSPARENT", socket.set_ip_transparent_v6(true)),
    }
}

fn step<T>(op: &'static str, result: io::Result<T>) -> Step<T> {
    result.map_err(|e| (op, e))
}

fn io_error(op: &'static str, addr: SocketAddr, netns: u64, source: io::Error) -> SocketError {
    SocketError::Io {
        op,
        addr,
        netns,
        source,
    }
}

/// The destination the app originally connected to, for a connection REDIRECTed to the
/// outbound listener (15001): `SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6.
///
/// Not for TPROXY listeners (15006/15008): there the accepted socket's local address already is
/// the original destination, and there is no NAT entry to query.
pub fn original_dst(stream: &impl AsFd) -> Result<SocketAddr, SocketError> {
    let sock = SockRef::from(stream);
    let local = sock.local_addr().ok().and_then(|a| a.as_socket());
    // A dual-stack `[::]` listener sees IPv4 clients as `::ffff:a.b.c.d`; their NAT entry is
    // an IPv4 one.
    let ipv4 = local.is_none_or(|a| a.ip().to_canonical().is_ipv4());
    let (option, result) = if ipv4 {
        let raw = getsockopt(stream, sockopt::OriginalDst);
        let addr = raw.map(|sin| {
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            SocketAddr::from((ip, u16::from_be(sin.sin_port)))
        });
        ("SO_ORIGINAL_DST", addr)
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst);
        let addr = raw.map(|sin6| {
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            SocketAddr::from((ip, u16::from_be(sin6.sin6_port)))
        });
        ("IP6T_SO_ORIGINAL_DST", addr)
    };
    result.map_err(|errno| {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "?".to_owned(), |a| a.to_string());
        SocketError::OriginalDst {
            option,
            local: show(local),
            peer: show(sock.peer_addr().ok().and_then(|a| a.as_socket())),
            hint: if errno == nix::Error::ENOENT {
                " (no NAT entry: the connection was not redirected to this listener)"
            } else {
                ""
            },
            source: errno.into(),
        }
    })
}

/// Creates an upstream socket for `dst` inside `ns`, ready to [`connect`](UpstreamSocket::connect).
///
/// With `transparent_source`, the socket binds that (foreign) IP with `IP_TRANSPARENT` before
/// connecting, so the destination sees it as the client address; replies find their way back
/// through the pod's connmark and table-100 rules. IPv4-mapped IPv6 addresses are treated as
/// IPv4. One round trip to the namespace worker, no thread spawn.
pub async fn upstream_socket(
    ns: &NetnsHandle,
    dst: SocketAddr,
    transparent_source: Option<IpAddr>,
    opts: &UpstreamOptions,
) -> Result<UpstreamSocket, SocketError> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let source = transparent_source.map(|ip| ip.to_canonical());
    validate_upstream(dst, source, opts)?;
    let netns = ns.inode();
    let owned = opts.clone();
    let socket = ns
        .run_in_async(move || new_upstream(dst, source, &owned))
        .await?
        .map_err(|(op, source)| io_error(op, dst, netns, source))?;
    Ok(UpstreamSocket {
        socket,
        dst,
        netns,
        timeout: opts.connect_timeout,
    })
}

/// [`upstream_socket`] followed by [`UpstreamSocket::connect`].
pub async fn connect_upstream(
    ns: &NetnsHandle,
    dst: SocketAddr,
    transparent_source: Option<IpAddr>,
    opts: &UpstreamOptions,
) -> Result<TcpStream, SocketError> {
    upstream_socket(ns, dst, transparent_source, opts)
        .await?
        .connect()
        .await
}

fn validate_upstream(
    dst: SocketAddr,
    source: Option<IpAddr>,
    opts: &UpstreamOptions,
) -> Result<(), SocketError> {
    if opts.connect_timeout.is_zero() {
        return Err(SocketError::Invalid(
            "upstream connect timeout must be non-zero".to_owned(),
        ));
    }
    if dst.ip().is_unspecified() || dst.port() == 0 {
        return Err(SocketError::Invalid(format!(
            "upstream destination {dst} has no address or port"
        )));
    }
    match source {
        Some(src) if src.is_ipv4() != dst.is_ipv4() => Err(SocketError::Invalid(format!(
            "transparent source {src} and destination {dst} are of different address families"
        ))),
        Some(src) if src.is_unspecified() || src.is_multicast() => Err(SocketError::Invalid(
            format!("transparent source {src} is not a unicast address"),
        )),
        _ => Ok(()),
    }
}

/// Creates and configures an upstream socket; runs on the namespace worker.
fn new_upstream(dst: SocketAddr, source: Option<IpAddr>, opts: &UpstreamOptions) -> Step<Socket> {
    let socket = new_tcp_socket(dst)?;
    if let Some(mark) = opts.mark {
        step("set SO_MARK", socket.set_mark(mark))?;
    }
    if opts.nodelay {
        step("set TCP_NODELAY", socket.set_tcp_nodelay(true))?;
    }
    if let Some(ka) = opts.keepalive {
        let params = TcpKeepalive::new()
            .with_time(ka.idle)
            .with_interval(ka.interval)
            .with_retries(ka.retries);
        step("set TCP keepalive", socket.set_tcp_keepalive(&params))?;
    }
    if let Some(src) = source {
        set_transparent(&socket, src)?;
        // Defer the source port choice to connect(): ports are then shared across distinct
        // destinations instead of being reserved per spoofed IP at bind time.
        let no_port = setsockopt(&socket, sockopt::IpBindAddressNoPort, &true);
        step(
            "set IP_BIND_ADDRESS_NO_PORT",
            no_port.map_err(io::Error::from),
        )?;
        step(
            "bind transparent source",
            socket.bind(&SocketAddr::new(src, 0).into()),
        )?;
    }
    Ok(socket)
}

impl UpstreamSocket {
    /// The destination this socket was created for.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Inode of the namespace the socket lives in.
    pub fn netns_inode(&self) -> u64 {
        self.netns
    }

    /// The underlying socket, e.g. to read back an option.
    pub fn as_socket(&self) -> &Socket {
        &self.socket
    }

    /// Connects to the destination within the configured timeout. Must be called within a
    /// tokio runtime. Errors name the destination and namespace; for port 15008 they also hint
    /// at a NetworkPolicy blocking HBONE.
    pub async fn connect(self) -> Result<TcpStream, SocketError> {
        let UpstreamSocket {
            socket,
            dst,
            netns,
            timeout,
        } = self;
        let hbone = dst.port() == HBONE_PORT;
        let socket = TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(SocketError::Connect {
                addr: dst,
                netns,
                hint: if hbone && looks_filtered(&source) {
                    HBONE_HINT
                } else {
                    ""
                },
                source,
            }),
            Err(_) => Err(SocketError::ConnectTimeout {
                addr: dst,
                netns,
                timeout,
                hint: if hbone { HBONE_HINT } else { "" },
            }),
        }
    }
}

/// Whether a connect error looks like a firewall dropping or rejecting the traffic.
fn looks_filtered(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> Option<NetnsHandle> {
        mesh_testbed::require_netns().then(|| NetnsHandle::current().expect("current netns"))
    }

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn defaults_match_ztunnel() {
        let up = UpstreamOptions::default();
        assert_eq!(up.mark, Some(0x539));
        assert!(up.nodelay);
        assert_eq!(up.connect_timeout, Duration::from_secs(10));
        let ka = up.keepalive.unwrap();
        assert_eq!(
            (ka.idle.as_secs(), ka.interval.as_secs(), ka.retries),
            (180, 180, 9)
        );
        let l = ListenerOptions::default();
        assert!(l.reuse_port && l.transparent && l.backlog == 128 && l.mark.is_none());
    }

    #[test]
    fn invalid_upstream_requests_are_rejected_with_reasons() {
        let opts = UpstreamOptions::default();
        let v4 = loopback(80);
        let cases: [(SocketAddr, Option<IpAddr>, Duration, &str); 5] = [
            (
                v4,
                Some("::1".parse().unwrap()),
                opts.connect_timeout,
                "different address families",
            ),
            (
                v4,
                Some("0.0.0.0".parse().unwrap()),
                opts.connect_timeout,
                "not a unicast",
            ),
            (v4, None, Duration::ZERO, "timeout must be non-zero"),
            (
                loopback(0),
                None,
                opts.connect_timeout,
                "no address or port",
            ),
            (
                "0.0.0.0:80".parse().unwrap(),
                None,
                opts.connect_timeout,
                "no address or port",
            ),
        ];
        for (dst, src, timeout, expected) in cases {
            let opts = UpstreamOptions {
                connect_timeout: timeout,
                ..UpstreamOptions::default()
            };
            let err = validate_upstream(dst, src, &opts).unwrap_err().to_string();
            assert!(err.contains(expected), "{dst} {src:?}: {err}");
        }
        assert!(validate_upstream(v4, Some("10.1.2.3".parse().unwrap()), &opts).is_ok());
    }

    #[test]
    fn connect_errors_hint_at_network_policy_only_for_hbone() {
        let timeout = |port| SocketError::ConnectTimeout {
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            netns: 7,
            timeout: Duration::from_secs(10),
            hint: if port == HBONE_PORT { HBONE_HINT } else { "" },
        };
        let text = timeout(HBONE_PORT).to_string();
        assert!(
            text.contains("NetworkPolicy") && text.contains("netns 7"),
            "{text}"
        );
        assert!(!timeout(8080).to_string().contains("NetworkPolicy"));
        assert!(looks_filtered(&io::Error::from(
            io::ErrorKind::HostUnreachable
        )));
        assert!(!looks_filtered(&io::Error::from(
            io::ErrorKind::ConnectionRefused
        )));
    }

    #[tokio::test]
    async fn listener_rejects_bad_backlog_and_reports_bind_conflicts() {
        let Some(ns) = current() else { return };
        let opts = ListenerOptions {
            backlog: 0,
            ..ListenerOptions::default()
        };
        let err = listener(&ns, loopback(0), &opts).await.unwrap_err();
        assert!(
            err.to_string().contains("backlog must be positive"),
            "{err}"
        );

        // Without SO_REUSEPORT a second bind to the same port fails, naming the step and netns.
        let plain = ListenerOptions {
            reuse_port: false,
            ..ListenerOptions::default()
        };
        let first = listener(&ns, loopback(0), &plain).await.unwrap();
        let taken = first.local_addr().unwrap();
        let err = listener(&ns, taken, &plain).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("bind for {taken} in netns {}", ns.inode())),
            "{text}"
        );
        assert!(matches!(err, SocketError::Io { ref source, .. }
            if source.kind() == io::ErrorKind::AddrInUse));
    }

    #[tokio::test]
    async fn listeners_and_upstream_on_loopback() {
        let Some(ns) = current() else { return };
        let opts = ListenerOptions::default();
        let ls = listeners(&ns, &[loopback(0), loopback(0)], &opts)
            .await
            .unwrap();
        assert_eq!(ls.len(), 2);
        let sock = SockRef::from(&ls[0]);
        assert!(sock.reuse_port().unwrap() && sock.ip_transparent_v4().unwrap());

        let dst = ls[1].local_addr().unwrap();
        let up = upstream_socket(&ns, dst, None, &UpstreamOptions::default())
            .await
            .unwrap();
        assert_eq!((up.dst(), up.netns_inode()), (dst, ns.inode()));
        let s = up.as_socket();
        assert_eq!(s.mark().unwrap(), DEFAULT_SOCKET_MARK);
        assert!(s.tcp_nodelay().unwrap() && s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), DEFAULT_KEEPALIVE_IDLE);
        assert_eq!(
            s.tcp_keepalive_retries().unwrap(),
            DEFAULT_KEEPALIVE_RETRIES
        );
        let stream = up.connect().await.unwrap();
        let (accepted, peer) = ls[1].accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());

        // Not redirected, so there is no NAT entry: a clear error, not a bogus address.
        let err = original_dst(&accepted).unwrap_err().to_string();
        assert!(
            err.contains("SO_ORIGINAL_DST") && err.contains("no NAT entry"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn refused_connect_names_destination_and_netns() {
        let Some(ns) = current() else { return };
        let closed = {
            let l = std::net::TcpListener::bind(loopback(0)).unwrap();
            l.local_addr().unwrap()
        };
        let err = connect_upstream(&ns, closed, None, &UpstreamOptions::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("connect to {closed} from netns {}", ns.inode())),
            "{text}"
        );
        assert!(!text.contains("NetworkPolicy"), "{text}");
    }
}
