//! In-pod traffic redirection rules (Istio ambient "in-pod" mode) as text, for two backends:
//! `iptables-restore` input and native nftables (`table inet ztunnel`).
//!
//! Inside an enrolled pod's network namespace:
//! * outbound TCP from the app is REDIRECTed to the proxy's outbound port (15001), where the
//!   proxy reads `SO_ORIGINAL_DST`;
//! * inbound TCP is TPROXYed to 15008 (HBONE) or 15006 (plaintext), where the listener's local
//!   address is the original destination and the client's source IP is preserved;
//! * sockets the proxy marks with the socket mark (0x539) bypass both;
//! * packets of connections the proxy opens to the app while spoofing the client IP get the
//!   connection mark (0x111), which is restored on output and routed via table 100 back to the
//!   local proxy socket.
//!
//! The exact rules are the ones verified on our kernels (testbed.md §2.1), which mirror upstream
//! Istio (istio-ambient-protocol.md §6.3; DNS capture on 15053 is not generated yet). They are
//! IPv4 only. Everything here is pure text generation; [`apply`](crate::rules::apply) loads it.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::str::FromStr;

mod apply;

pub use apply::{ApplyError, apply, remove};

/// nftables table family and name used by the nft backend.
pub const NFT_TABLE: &str = "inet ztunnel";
/// iptables chain hooked from PREROUTING.
pub const PREROUTING_CHAIN: &str = "ISTIO_PRERT";
/// iptables chain hooked from OUTPUT.
pub const OUTPUT_CHAIN: &str = "ISTIO_OUTPUT";

// Routing tables the kernel reserves: unspec, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
// Rule priorities 32766/32767 are the main/default lookups; ours must come before them.
const MAX_RULE_PRIORITY: u32 = 32765;

/// Which tool loads the rules into the pod's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore --noflush` (whatever `iptables` points at; iptables-nft on Debian 12).
    Iptables,
    /// `nft -f -` with a dedicated `inet ztunnel` table.
    Nftables,
}

impl FromStr for Backend {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Backend::Iptables),
            "nft" | "nftables" => Ok(Backend::Nftables),
            other => Err(RulesError::UnknownBackend(other.to_owned())),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        })
    }
}

/// Errors from validating a capture configuration or parsing a backend name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RulesError {
    /// The backend name is not `iptables`, `nft` or `nftables`.
    #[error("unknown capture backend {0:?} (expected \"iptables\" or \"nftables\")")]
    UnknownBackend(String),
    /// A configuration value is unusable.
    #[error("invalid capture config: {0}")]
    InvalidConfig(String),
}

/// Ports, marks and routing parameters of the in-pod redirection. `Default` is Istio's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where app egress is redirected (proxy outbound listener).
    pub outbound_port: u16,
    /// Where plaintext ingress is TPROXYed (proxy inbound listener).
    pub inbound_plaintext_port: u16,
    /// HBONE port; ingress to it is TPROXYed to the same port.
    pub inbound_hbone_port: u16,
    /// `SO_MARK` the proxy sets on its own sockets to bypass capture.
    pub socket_mark: u32,
    /// Mark given to TPROXYed packets and to connections the proxy makes; selects `route_table`.
    pub conn_mark: u32,
    /// Mask applied when matching or setting either mark.
    pub mark_mask: u32,
    /// Kubelet health-probe source address; its traffic is never captured.
    pub probe_addr: Ipv4Addr,
    /// Routing table holding the `local 0.0.0.0/0 dev lo` route.
    pub route_table: u32,
    /// Priority of the `fwmark → route_table` policy rule.
    pub rule_priority: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            inbound_hbone_port: 15008,
            socket_mark: 0x539,
            conn_mark: 0x111,
            mark_mask: 0xfff,
            probe_addr: Ipv4Addr::new(169, 254, 7, 127),
            route_table: 100,
            rule_priority: 32764,
        }
    }
}

fn invalid(message: String) -> Result<(), RulesError> {
    Err(RulesError::InvalidConfig(message))
}

impl CaptureConfig {
    /// Checks that the values can form working rules.
    pub fn validate(&self) -> Result<(), RulesError> {
        let ports = [
            ("outbound_port", self.outbound_port),
            ("inbound_plaintext_port", self.inbound_plaintext_port),
            ("inbound_hbone_port", self.inbound_hbone_port),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return invalid(format!("{name} must not be 0"));
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return invalid(format!("{name} and {other} are both {port}"));
            }
        }
        self.validate_marks()?;
        if RESERVED_TABLES.contains(&self.route_table) {
            return invalid(format!(
                "route_table {} is reserved by the kernel",
                self.route_table
            ));
        }
        if self.rule_priority == 0 || self.rule_priority > MAX_RULE_PRIORITY {
            return invalid(format!(
                "rule_priority {} must be between 1 and {MAX_RULE_PRIORITY}",
                self.rule_priority
            ));
        }
        if self.probe_addr.is_unspecified() {
            return invalid("probe_addr must not be 0.0.0.0".to_owned());
        }
        Ok(())
    }

    fn validate_marks(&self) -> Result<(), RulesError> {
        if self.mark_mask == 0 {
            return invalid("mark_mask must not be 0".to_owned());
        }
        for (name, mark) in [
            ("socket_mark", self.socket_mark),
            ("conn_mark", self.conn_mark),
        ] {
            if mark == 0 {
                return invalid(format!("{name} must not be 0"));
            }
            if mark & !self.mark_mask != 0 {
                return invalid(format!(
                    "{name} {mark:#x} has bits outside mark_mask {:#x}",
                    self.mark_mask
                ));
            }
        }
        if self.socket_mark == self.conn_mark {
            return invalid(format!(
                "socket_mark and conn_mark are both {:#x}",
                self.conn_mark
            ));
        }
        Ok(())
    }

    fn sock(&self) -> String {
        format!("{:#x}/{:#x}", self.socket_mark, self.mark_mask)
    }

    fn conn(&self) -> String {
        format!("{:#x}/{:#x}", self.conn_mark, self.mark_mask)
    }
}

/// One iptables table's worth of rules: user chains, jumps into them, and their rules.
struct Section {
    layout: &'static Layout,
    rules: Vec<String>,
}

/// The chains we own in one iptables table and the built-in chains that jump to them.
struct Layout {
    table: &'static str,
    chains: &'static [&'static str],
    jumps: &'static [(&'static str, &'static str)],
}

const MANGLE: Layout = Layout {
    table: "mangle",
    chains: &[PREROUTING_CHAIN, OUTPUT_CHAIN],
    jumps: &[("PREROUTING", PREROUTING_CHAIN), ("OUTPUT", OUTPUT_CHAIN)],
};
const NAT: Layout = Layout {
    table: "nat",
    chains: &[OUTPUT_CHAIN],
    jumps: &[("OUTPUT", OUTPUT_CHAIN)],
};

fn mangle_section(cfg: &CaptureConfig) -> Section {
    let (sock, conn, probe) = (cfg.sock(), cfg.conn(), cfg.probe_addr);
    let tproxy =
        |port: u16| format!("-j TPROXY --on-port {port} --on-ip 0.0.0.0 --tproxy-mark {conn}");
    let hbone = cfg.inbound_hbone_port;
    Section {
        layout: &MANGLE,
        rules: vec![
            format!(
                "-A {OUTPUT_CHAIN} -m connmark --mark {conn} -j CONNMARK --restore-mark \
                 --nfmask 0xffffffff --ctmask 0xffffffff"
            ),
            format!("-A {PREROUTING_CHAIN} -m mark --mark {sock} -j CONNMARK --set-xmark {conn}"),
            format!("-A {PREROUTING_CHAIN} -s {probe}/32 -p tcp -m tcp -j ACCEPT"),
            format!("-A {PREROUTING_CHAIN} ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT"),
            format!(
                "-A {PREROUTING_CHAIN} -p tcp -m tcp --dport {hbone} -m mark ! --mark {sock} {}",
                tproxy(hbone)
            ),
            format!(
                "-A {PREROUTING_CHAIN} -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            ),
            format!(
                "-A {PREROUTING_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {sock} {}",
                tproxy(cfg.inbound_plaintext_port)
            ),
        ],
    }
}

fn nat_section(cfg: &CaptureConfig) -> Section {
    let (sock, conn, probe) = (cfg.sock(), cfg.conn(), cfg.probe_addr);
    Section {
        layout: &NAT,
        rules: vec![
            format!("-A {OUTPUT_CHAIN} -d {probe}/32 -p tcp -m tcp -j ACCEPT"),
            format!("-A {OUTPUT_CHAIN} -p tcp -m mark --mark {conn} -j ACCEPT"),
            format!("-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -o lo -j ACCEPT"),
            format!(
                "-A {OUTPUT_CHAIN} ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {sock} \
                 -j REDIRECT --to-ports {}",
                cfg.outbound_port
            ),
        ],
    }
}

fn sections(cfg: &CaptureConfig) -> [Section; 2] {
    [mangle_section(cfg), nat_section(cfg)]
}

/// What an `iptables-save` dump says about our chains in one table.
#[derive(Default)]
struct Existing {
    chains: Vec<String>,
    jumps: Vec<(String, String)>,
}

fn parse_saved(saved: &str, table: &str) -> Existing {
    let mut existing = Existing::default();
    let mut current = "";
    for line in saved.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('*') {
            current = name;
        } else if current != table {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            existing
                .chains
                .extend(decl.split_whitespace().next().map(str::to_owned));
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [builtin, "-j", target] = words[..] {
                existing.jumps.push((builtin.to_owned(), target.to_owned()));
            }
        }
    }
    existing
}

/// `-D` lines for every copy of our jumps present in `existing`.
fn delete_jumps(out: &mut String, layout: &Layout, existing: &Existing) {
    for (builtin, target) in &existing.jumps {
        if layout
            .jumps
            .iter()
            .any(|(b, t)| b == builtin && t == target)
        {
            let _ = writeln!(out, "-D {builtin} -j {target}");
        }
    }
}

fn render_install(out: &mut String, section: &Section, existing: &Existing) {
    let layout = section.layout;
    let _ = writeln!(out, "*{}", layout.table);
    // With --noflush, declaring a user chain creates it or flushes it if it exists, so
    // re-applying replaces our rules atomically per table instead of duplicating them.
    for chain in layout.chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    delete_jumps(out, layout, existing);
    for (builtin, target) in layout.jumps {
        let _ = writeln!(out, "-A {builtin} -j {target}");
    }
    for rule in &section.rules {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
}

/// `iptables-restore --noflush` input that installs the rules into a pod with none yet.
pub fn iptables_rules(cfg: &CaptureConfig) -> Result<String, RulesError> {
    iptables_apply(cfg, "")
}

/// `iptables-restore --noflush` input that installs the rules, replacing any copy already
/// present according to `saved` (the pod's current `iptables-save` output).
pub fn iptables_apply(cfg: &CaptureConfig, saved: &str) -> Result<String, RulesError> {
    cfg.validate()?;
    let mut out = String::new();
    for section in sections(cfg) {
        render_install(
            &mut out,
            &section,
            &parse_saved(saved, section.layout.table),
        );
    }
    Ok(out)
}

/// `iptables-restore --noflush` input that removes whatever of our chains and jumps `saved`
/// (the pod's current `iptables-save` output) shows. Empty when nothing is installed.
pub fn iptables_remove(saved: &str) -> String {
    let mut out = String::new();
    for layout in [&MANGLE, &NAT] {
        let existing = parse_saved(saved, layout.table);
        let mut body = String::new();
        delete_jumps(&mut body, layout, &existing);
        for chain in layout.chains {
            if existing.chains.iter().any(|e| e == chain) {
                let _ = writeln!(body, "-F {chain}\n-X {chain}");
            }
        }
        if !body.is_empty() {
            let _ = write!(out, "*{}\n{body}COMMIT\n", layout.table);
        }
    }
    out
}

/// `nft -f -` input that (re)creates `table inet ztunnel` atomically.
pub fn nft_rules(cfg: &CaptureConfig) -> Result<String, RulesError> {
    cfg.validate()?;
    let mut out = nft_remove();
    let _ = writeln!(out, "table {NFT_TABLE} {{");
    nft_prerouting(&mut out, cfg);
    nft_output(&mut out, cfg);
    out.push_str("}\n");
    Ok(out)
}

/// `meta mark & MASK != SOCKET_MARK`: the packet is not from one of the proxy's own sockets.
fn nft_not_proxy(cfg: &CaptureConfig) -> String {
    format!("meta mark & {:#x} != {:#x}", cfg.mark_mask, cfg.socket_mark)
}

fn nft_prerouting(out: &mut String, cfg: &CaptureConfig) {
    let (sock, conn, mask) = (cfg.socket_mark, cfg.conn_mark, cfg.mark_mask);
    let (hbone, plain) = (cfg.inbound_hbone_port, cfg.inbound_plaintext_port);
    let not_proxy = nft_not_proxy(cfg);
    // Runs at mangle priority, like iptables' mangle PREROUTING.
    out.push_str("  chain prerouting {\n");
    out.push_str("    type filter hook prerouting priority mangle; policy accept;\n");
    let _ = writeln!(
        out,
        "    meta mark & {mask:#x} == {sock:#x} ct mark set {conn:#x}"
    );
    let _ = writeln!(
        out,
        "    ip saddr {} meta l4proto tcp accept",
        cfg.probe_addr
    );
    out.push_str("    iifname \"lo\" ip daddr != 127.0.0.1 meta l4proto tcp accept\n");
    let _ = writeln!(
        out,
        "    meta l4proto tcp tcp dport {hbone} {not_proxy} \
         tproxy ip to :{hbone} meta mark set {conn:#x} accept"
    );
    out.push_str("    meta l4proto tcp ct state established,related accept\n");
    let _ = writeln!(
        out,
        "    meta l4proto tcp ip daddr != 127.0.0.1 {not_proxy} \
         tproxy ip to :{plain} meta mark set {conn:#x} accept"
    );
    out.push_str("  }\n");
}

fn nft_output(out: &mut String, cfg: &CaptureConfig) {
    let (conn, mask) = (cfg.conn_mark, cfg.mark_mask);
    out.push_str("  chain output_mangle {\n");
    out.push_str("    type route hook output priority mangle; policy accept;\n");
    let _ = writeln!(
        out,
        "    ct mark & {mask:#x} == {conn:#x} meta mark set ct mark\n  }}"
    );
    // nft 1.0.6 rejects `priority dstnat` on the output hook, and a failed load leaves
    // traffic silently uncaptured: the numeric -100 is what works.
    out.push_str("  chain output_nat {\n");
    out.push_str("    type nat hook output priority -100; policy accept;\n");
    let _ = writeln!(
        out,
        "    ip daddr {} meta l4proto tcp accept",
        cfg.probe_addr
    );
    let _ = writeln!(
        out,
        "    meta l4proto tcp meta mark & {mask:#x} == {conn:#x} accept"
    );
    out.push_str("    oifname \"lo\" ip daddr != 127.0.0.1 accept\n");
    let _ = writeln!(
        out,
        "    meta l4proto tcp ip daddr != 127.0.0.1 {} redirect to :{}\n  }}",
        nft_not_proxy(cfg),
        cfg.outbound_port
    );
}

/// `nft -f -` input that deletes `table inet ztunnel`; succeeds whether or not it exists
/// (declaring the table first makes the delete unconditional).
pub fn nft_remove() -> String {
    format!("table {NFT_TABLE}\ndelete table {NFT_TABLE}\n")
}

/// The policy-routing commands, as `ip` arguments, that TPROXY and spoofed-source replies need.
pub fn routing_commands(cfg: &CaptureConfig) -> [String; 2] {
    [rule_add(cfg), route_add(cfg)]
}

fn rule_spec(cfg: &CaptureConfig) -> String {
    format!(
        "fwmark {} pref {} lookup {}",
        cfg.conn(),
        cfg.rule_priority,
        cfg.route_table
    )
}

fn rule_add(cfg: &CaptureConfig) -> String {
    format!("rule add {}", rule_spec(cfg))
}

fn route_add(cfg: &CaptureConfig) -> String {
    format!("route add local 0.0.0.0/0 dev lo table {}", cfg.route_table)
}

/// Whether `ip -4 rule list` output contains our policy rule.
pub fn rule_present(cfg: &CaptureConfig, listing: &str) -> bool {
    let pref = format!("{}:", cfg.rule_priority);
    let mark = format!("fwmark {}", cfg.conn());
    let lookup = format!("lookup {}", cfg.route_table);
    listing.lines().any(|line| {
        let line = line.trim();
        line.starts_with(&pref) && line.contains(&mark) && line.ends_with(&lookup)
    })
}

/// Whether `ip -4 route show table all` output contains our local default route.
pub fn route_present(cfg: &CaptureConfig, listing: &str) -> bool {
    let table = cfg.route_table.to_string();
    listing.lines().any(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.starts_with(&["local", "default"])
            && words.contains(&"lo")
            && words.windows(2).any(|w| w[0] == "table" && w[1] == table)
    })
}

/// `ip -batch` lines that install the policy routing, given the current rule listing.
/// `route replace` is idempotent; the rule is only added when missing (the kernel refuses a
/// duplicate).
pub fn routing_apply(cfg: &CaptureConfig, rule_listing: &str) -> Vec<String> {
    let mut lines = Vec::new();
    if !rule_present(cfg, rule_listing) {
        lines.push(rule_add(cfg));
    }
    lines.push(format!(
        "route replace local 0.0.0.0/0 dev lo table {}",
        cfg.route_table
    ));
    lines
}

/// `ip -batch` lines that remove whatever of the policy routing the listings show.
pub fn routing_remove(cfg: &CaptureConfig, rule_listing: &str, route_listing: &str) -> Vec<String> {
    let mut lines = Vec::new();
    if rule_present(cfg, rule_listing) {
        lines.push(format!("rule del {}", rule_spec(cfg)));
    }
    if route_present(cfg, route_listing) {
        lines.push(format!(
            "route del local 0.0.0.0/0 dev lo table {}",
            cfg.route_table
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with no value in common with the defaults.
    fn custom() -> CaptureConfig {
        CaptureConfig {
            outbound_port: 25001,
            inbound_plaintext_port: 25006,
            inbound_hbone_port: 25008,
            socket_mark: 0x2000,
            conn_mark: 0x4000,
            mark_mask: 0xf000,
            probe_addr: Ipv4Addr::new(169, 254, 9, 9),
            route_table: 200,
            rule_priority: 30000,
        }
    }

    #[test]
    fn iptables_default_rules_contain_the_verified_lines() {
        let text = iptables_rules(&CaptureConfig::default()).unwrap();
        let expected = [
            "*mangle",
            ":ISTIO_PRERT - [0:0]",
            ":ISTIO_OUTPUT - [0:0]",
            "-A PREROUTING -j ISTIO_PRERT",
            "-A OUTPUT -j ISTIO_OUTPUT",
            "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
            "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -i lo -p tcp -j ACCEPT",
            "-A ISTIO_PRERT -p tcp -m tcp --dport 15008 -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15008 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff",
            "-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x111/0xfff",
            "*nat",
            "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
            "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for line in expected {
            assert!(lines.contains(&line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(lines.iter().filter(|l| **l == "COMMIT").count(), 2);
        assert!(
            !text.contains("-D "),
            "a fresh install deletes nothing:\n{text}"
        );
        // The mangle TPROXY for HBONE must come before the catch-all 15006 one.
        let hbone = text.find("--on-port 15008").unwrap();
        let plain = text.find("--on-port 15006").unwrap();
        assert!(hbone < plain);
    }

    #[test]
    fn nft_default_rules_contain_the_verified_lines() {
        let text = nft_rules(&CaptureConfig::default()).unwrap();
        let expected = [
            "table inet ztunnel",
            "delete table inet ztunnel",
            "type filter hook prerouting priority mangle; policy accept;",
            "meta mark & 0xfff == 0x539 ct mark set 0x111",
            "ip saddr 169.254.7.127 meta l4proto tcp accept",
            "iifname \"lo\" ip daddr != 127.0.0.1 meta l4proto tcp accept",
            "meta l4proto tcp tcp dport 15008 meta mark & 0xfff != 0x539 tproxy ip to :15008 meta mark set 0x111 accept",
            "meta l4proto tcp ct state established,related accept",
            "meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0xfff != 0x539 tproxy ip to :15006 meta mark set 0x111 accept",
            "type route hook output priority mangle; policy accept;",
            "ct mark & 0xfff == 0x111 meta mark set ct mark",
            "type nat hook output priority -100; policy accept;",
            "ip daddr 169.254.7.127 meta l4proto tcp accept",
            "meta l4proto tcp meta mark & 0xfff == 0x111 accept",
            "oifname \"lo\" ip daddr != 127.0.0.1 accept",
            "meta l4proto tcp ip daddr != 127.0.0.1 meta mark & 0xfff != 0x539 redirect to :15001",
        ];
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for line in expected {
            assert!(lines.contains(&line), "missing {line:?} in:\n{text}");
        }
        // Braces balance, so nft sees one table with three chains.
        assert_eq!(text.matches('{').count(), text.matches('}').count());
        assert_eq!(text.matches("chain ").count(), 3);
    }

    #[test]
    fn generated_text_never_uses_dstnat_and_follows_the_config() {
        let defaults = ["15001", "15006", "15008", "0x539", "0x111", "169.254.7.127"];
        for cfg in [CaptureConfig::default(), custom()] {
            let outputs = [
                ("iptables", iptables_rules(&cfg).unwrap()),
                ("nft", nft_rules(&cfg).unwrap()),
                ("nft-remove", nft_remove()),
            ];
            for (name, text) in &outputs {
                assert!(!text.contains("dstnat"), "{name} uses dstnat:\n{text}");
            }
            if cfg == custom() {
                for (name, text) in &outputs[..2] {
                    for value in [
                        "25001",
                        "25006",
                        "25008",
                        "0x2000",
                        "0x4000",
                        "0xf000",
                        "169.254.9.9",
                    ] {
                        assert!(text.contains(value), "{name} lacks {value}:\n{text}");
                    }
                    for value in defaults {
                        assert!(
                            !text.contains(value),
                            "{name} still has default {value}:\n{text}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn validation_table() {
        let base = CaptureConfig::default;
        let cases: Vec<(CaptureConfig, &str)> = vec![
            (
                CaptureConfig {
                    outbound_port: 0,
                    ..base()
                },
                "outbound_port must not be 0",
            ),
            (
                CaptureConfig {
                    inbound_hbone_port: 15001,
                    ..base()
                },
                "inbound_hbone_port and outbound_port are both 15001",
            ),
            (
                CaptureConfig {
                    inbound_plaintext_port: 15008,
                    inbound_hbone_port: 15008,
                    ..base()
                },
                "inbound_hbone_port and inbound_plaintext_port are both 15008",
            ),
            (
                CaptureConfig {
                    mark_mask: 0,
                    ..base()
                },
                "mark_mask must not be 0",
            ),
            (
                CaptureConfig {
                    socket_mark: 0,
                    ..base()
                },
                "socket_mark must not be 0",
            ),
            (
                CaptureConfig {
                    conn_mark: 0x1111,
                    ..base()
                },
                "conn_mark 0x1111 has bits outside mark_mask 0xfff",
            ),
            (
                CaptureConfig {
                    socket_mark: 0x111,
                    ..base()
                },
                "socket_mark and conn_mark are both 0x111",
            ),
            (
                CaptureConfig {
                    route_table: 254,
                    ..base()
                },
                "route_table 254 is reserved",
            ),
            (
                CaptureConfig {
                    route_table: 0,
                    ..base()
                },
                "route_table 0 is reserved",
            ),
            (
                CaptureConfig {
                    rule_priority: 0,
                    ..base()
                },
                "rule_priority 0 must be between",
            ),
            (
                CaptureConfig {
                    rule_priority: 32766,
                    ..base()
                },
                "rule_priority 32766 must be between",
            ),
            (
                CaptureConfig {
                    probe_addr: Ipv4Addr::UNSPECIFIED,
                    ..base()
                },
                "probe_addr must not be 0.0.0.0",
            ),
        ];
        for (cfg, message) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(
                err.to_string().contains(message),
                "{err} (wanted {message:?})"
            );
            assert!(
                err.to_string().starts_with("invalid capture config: "),
                "{err}"
            );
            assert_eq!(iptables_rules(&cfg).unwrap_err(), err);
            assert_eq!(nft_rules(&cfg).unwrap_err(), err);
        }
        assert_eq!(base().validate(), Ok(()));
        assert_eq!(custom().validate(), Ok(()));
    }

    #[test]
    fn backend_names() {
        let cases = [
            ("iptables", Some(Backend::Iptables)),
            ("nft", Some(Backend::Nftables)),
            ("nftables", Some(Backend::Nftables)),
            ("ebpf", None),
            ("", None),
            ("IPTABLES", None),
        ];
        for (name, expected) in cases {
            match (name.parse::<Backend>(), expected) {
                (Ok(backend), Some(want)) => assert_eq!(backend, want),
                (Err(e), None) => assert!(e.to_string().contains("unknown capture backend"), "{e}"),
                (got, want) => panic!("{name:?}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            Backend::Nftables.to_string().parse::<Backend>(),
            Ok(Backend::Nftables)
        );
        assert_eq!(
            Backend::Iptables.to_string().parse::<Backend>(),
            Ok(Backend::Iptables)
        );
    }

    /// `iptables-save` output of a pod with our rules (trimmed), as iptables-nft 1.8.9 prints it.
    const SAVED: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -j SOMEONE_ELSE
COMMIT
*filter
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
COMMIT
";

    #[test]
    fn reapply_deletes_every_existing_jump_once() {
        let text = iptables_apply(&CaptureConfig::default(), SAVED).unwrap();
        let (mangle, nat) = text.split_once("*nat").unwrap();
        assert_eq!(mangle.matches("-D PREROUTING -j ISTIO_PRERT\n").count(), 1);
        assert_eq!(mangle.matches("-D OUTPUT -j ISTIO_OUTPUT\n").count(), 1);
        assert_eq!(
            nat.matches("-D OUTPUT -j ISTIO_OUTPUT\n").count(),
            2,
            "{nat}"
        );
        assert!(
            !text.contains("SOMEONE_ELSE") && !text.contains("*filter"),
            "{text}"
        );
        // Deletes come after the chain declarations and before the new jumps.
        let declare = mangle.find(":ISTIO_PRERT").unwrap();
        let delete = mangle.find("-D PREROUTING").unwrap();
        let add = mangle.find("-A PREROUTING").unwrap();
        assert!(declare < delete && delete < add, "{mangle}");
    }

    #[test]
    fn removal_table() {
        let cases: &[(&str, &str)] = &[
            ("", ""),
            ("*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", ""),
            (
                SAVED,
                "*mangle\n-D PREROUTING -j ISTIO_PRERT\n-D OUTPUT -j ISTIO_OUTPUT\n\
                 -F ISTIO_PRERT\n-X ISTIO_PRERT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n\
                 *nat\n-D OUTPUT -j ISTIO_OUTPUT\n-D OUTPUT -j ISTIO_OUTPUT\n\
                 -F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n",
            ),
            // Chains left behind without their jumps are still removed.
            (
                "*nat\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n",
                "*nat\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n",
            ),
        ];
        for (saved, expected) in cases {
            assert_eq!(iptables_remove(saved), *expected, "saved:\n{saved}");
        }
        let nft = nft_remove();
        assert_eq!(nft, "table inet ztunnel\ndelete table inet ztunnel\n");
        assert!(
            nft_rules(&CaptureConfig::default())
                .unwrap()
                .starts_with(&nft)
        );
    }

    #[test]
    fn routing_commands_and_listings() {
        let cfg = CaptureConfig::default();
        assert_eq!(
            routing_commands(&cfg),
            [
                "rule add fwmark 0x111/0xfff pref 32764 lookup 100",
                "route add local 0.0.0.0/0 dev lo table 100",
            ]
        );
        let rule = "32764:\tfrom all fwmark 0x111/0xfff lookup 100\n";
        let route = "local default dev lo table 100 scope host \nlocal 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1 \n";
        let cases: &[(&str, &str, bool, bool)] = &[
            ("", "", false, false),
            (rule, route, true, true),
            (
                "32765:\tfrom all fwmark 0x111/0xfff lookup 100\n",
                "",
                false,
                false,
            ),
            (
                "32764:\tfrom all fwmark 0x222/0xfff lookup 100\n",
                "",
                false,
                false,
            ),
            (
                "32764:\tfrom all fwmark 0x111/0xfff lookup 1000\n",
                "local default dev lo table 1000 scope host",
                false,
                false,
            ),
            (
                "",
                "local default dev eth0 table 100 scope host",
                false,
                false,
            ),
        ];
        for (rules, routes, has_rule, has_route) in cases {
            assert_eq!(rule_present(&cfg, rules), *has_rule, "{rules:?}");
            assert_eq!(route_present(&cfg, routes), *has_route, "{routes:?}");
        }
        assert_eq!(
            routing_apply(&cfg, ""),
            [
                "rule add fwmark 0x111/0xfff pref 32764 lookup 100",
                "route replace local 0.0.0.0/0 dev lo table 100"
            ]
        );
        assert_eq!(
            routing_apply(&cfg, rule),
            ["route replace local 0.0.0.0/0 dev lo table 100"]
        );
        assert_eq!(
            routing_remove(&cfg, rule, route),
            [
                "rule del fwmark 0x111/0xfff pref 32764 lookup 100",
                "route del local 0.0.0.0/0 dev lo table 100"
            ]
        );
        assert!(routing_remove(&cfg, "", "").is_empty());
    }
}
