//! The configuration file: TOML, validated as a whole, every error reported as
//! `file:line:column: message`. Nothing touches the system until a file validates.

pub mod health;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

/// Default pin directory for the program, its link and its maps.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/balancer";
/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/balancer/control.sock";
/// Default SNAT port range: below the kernel's default ephemeral range (32768–60999), so the
/// controller's own connections (health checks) never collide with NAT flows.
pub const DEFAULT_SNAT_PORTS: [u16; 2] = [10000, 32767];

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the XDP program runs.
    pub dataplane: Dataplane,
    /// Control socket, metrics.
    #[serde(default)]
    pub controller: Controller,
    /// Layer-4 services.
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
    /// Layer-7 (TLS-terminating HTTP proxy): listeners, routes, pools, redirects.
    pub l7: Option<Spanned<balancer_l7::L7Config>>,
}

/// `[dataplane]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataplane {
    /// One interface to attach to.
    pub interface: Option<Spanned<String>>,
    /// Several interfaces (two-arm set-ups); alternative to `interface`.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    /// `auto` (driver, falling back to skb), `driver`, `skb`.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// SNAT source for IPv4 backends; default: the interface's own IPv4 address.
    pub snat_ipv4: Option<Spanned<String>>,
    /// SNAT source for IPv6 backends; default: the interface's own global IPv6 address.
    pub snat_ipv6: Option<Spanned<String>>,
    /// First and last SNAT port, e.g. `[10000, 32767]`.
    #[serde(default = "default_snat_ports")]
    pub snat_ports: Spanned<[u16; 2]>,
    /// Flow-table entries (a NAT flow takes two).
    #[serde(default = "default_flow_table")]
    pub flow_table_size: u32,
    /// Pin directory.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Idle time after which a TCP flow's SNAT port may go to a new flow (e.g. "1h").
    #[serde(default = "default_tcp_idle", with = "humantime_serde")]
    pub tcp_idle_timeout: std::time::Duration,
    /// Idle time after which a UDP flow's SNAT port may go to a new flow (e.g. "5m").
    #[serde(default = "default_udp_idle", with = "humantime_serde")]
    pub udp_idle_timeout: std::time::Duration,
}

fn default_tcp_idle() -> std::time::Duration {
    std::time::Duration::from_secs(balancer_common::DEFAULT_TCP_IDLE_SECS as u64)
}
fn default_udp_idle() -> std::time::Duration {
    std::time::Duration::from_secs(balancer_common::DEFAULT_UDP_IDLE_SECS as u64)
}

fn default_snat_ports() -> Spanned<[u16; 2]> {
    Spanned::new(0..0, DEFAULT_SNAT_PORTS)
}
fn default_flow_table() -> u32 {
    balancer_common::DEFAULT_FLOW_ENTRIES
}
fn default_pin_path() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_PATH)
}

/// `[controller]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Controller {
    /// Unix control socket (root only).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Prometheus metrics listen address, e.g. "127.0.0.1:9550"; off when absent.
    pub metrics: Option<Spanned<String>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl Default for Controller {
    fn default() -> Self {
        Controller {
            socket: default_socket(),
            metrics: None,
        }
    }
}

/// XDP attach mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode, falling back to skb (generic) mode with a log line.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Driver,
    /// Generic (skb) mode only.
    Skb,
}

/// L4 protocol of a service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// How packets reach the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Full NAT: backends need no change.
    #[default]
    Nat,
    /// Direct server return: MAC rewrite only, backends hold the VIP on a loopback.
    Dsr,
}

/// How a backend is chosen for a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Weighted Maglev consistent hashing over the healthy backends.
    #[default]
    Maglev,
    /// One active backend, chosen by priority.
    Failover,
}

/// What flows of a backend that went down get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownAction {
    /// A TCP RST, so the client reconnects at once.
    #[default]
    Reset,
    /// Silently dropped.
    Drop,
}

/// Operator state of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic when healthy.
    #[default]
    Up,
    /// Keeps its flows, takes no new ones.
    Drain,
    /// Out of service; its flows are reset.
    Disabled,
}

/// `[[service]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name.
    pub name: Spanned<String>,
    /// `"10.77.0.100:7002"` or `"[fd77::100]:7002"`.
    pub vip: Spanned<String>,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// `nat` or `dsr`.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// `maglev` or `failover`.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Failover only: a recovered higher-priority backend takes the traffic back.
    #[serde(default)]
    pub failback: bool,
    /// Maglev ring size, a prime ≤ 65537.
    #[serde(default = "default_ring")]
    pub ring_size: Spanned<u32>,
    /// `reset` or `drop`.
    #[serde(default)]
    pub on_backend_down: DownAction,
    /// Health check (see the README); none means backends are always healthy.
    pub health: Option<Spanned<toml::Table>>,
    /// The backends.
    pub backends: Spanned<Vec<Backend>>,
}

fn default_ring() -> Spanned<u32> {
    Spanned::new(0..0, balancer_common::RING_MAX)
}

/// One backend of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `"10.77.0.11:7002"`.
    pub address: Spanned<String>,
    /// Maglev weight (0–65535, default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failover priority: lower is preferred (default: position in the list).
    pub priority: Option<u32>,
    /// Initial operator state.
    #[serde(default)]
    pub state: AdminState,
}

fn default_weight() -> u32 {
    1
}

/// A validated service, ready for the dataplane.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// VIP and port.
    pub vip: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// Forwarding.
    pub forwarding: Forwarding,
    /// Scheduler.
    pub scheduler: Scheduler,
    /// Failback.
    pub failback: bool,
    /// Ring size.
    pub ring_size: u32,
    /// Down action.
    pub on_backend_down: DownAction,
    /// Health check, as written (validated by the health module).
    pub health: Option<toml::Table>,
    /// Backends.
    pub backends: Vec<BackendSpec>,
}

/// A validated backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Priority (lower first).
    pub priority: u32,
    /// Initial operator state.
    pub state: AdminState,
}

/// A validated file.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Where it came from.
    pub path: PathBuf,
    /// The file as parsed.
    pub raw: Config,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// SNAT IPv4 override.
    pub snat_ipv4: Option<IpAddr>,
    /// SNAT IPv6 override.
    pub snat_ipv6: Option<IpAddr>,
    /// Metrics address.
    pub metrics: Option<SocketAddr>,
    /// Services, in file order.
    pub services: Vec<ServiceSpec>,
}

/// One problem, at a place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError(pub Vec<Diagnostic>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

struct Diags<'a> {
    file: String,
    text: &'a str,
    out: Vec<Diagnostic>,
}

impl Diags<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.out.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
        });
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// Reads and validates a file.
pub fn load(path: &Path) -> Result<Validated, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(vec![Diagnostic {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, path)
}

/// Validates the text of a file.
pub fn parse(text: &str, path: &Path) -> Result<Validated, ConfigError> {
    let mut d = Diags {
        file: path.display().to_string(),
        text,
        out: Vec::new(),
    };
    let raw: Config = match toml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            d.at(span, e.message().to_string());
            return Err(ConfigError(d.out));
        }
    };
    let v = validate(raw, path, &mut d);
    if d.out.is_empty() {
        Ok(v)
    } else {
        Err(ConfigError(d.out))
    }
}

fn parse_ip(d: &mut Diags, s: &Spanned<String>, what: &str) -> Option<IpAddr> {
    match s.get_ref().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            d.at(
                s.span(),
                format!("{what}: '{}' is not an IP address", s.get_ref()),
            );
            None
        }
    }
}

fn parse_sock(d: &mut Diags, s: &Spanned<String>, what: &str) -> Option<SocketAddr> {
    match s.get_ref().parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Some(a),
        Ok(_) => {
            d.at(s.span(), format!("{what}: port 0 is not allowed"));
            None
        }
        Err(_) => {
            d.at(
                s.span(),
                format!(
                    "{what}: '{}' is not an address with a port (\"10.0.0.1:80\" or \"[fd00::1]:80\")",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

fn validate(raw: Config, path: &Path, d: &mut Diags) -> Validated {
    let mut interfaces: Vec<String> = Vec::new();
    if let Some(i) = &raw.dataplane.interface {
        interfaces.push(i.get_ref().clone());
    }
    for i in &raw.dataplane.interfaces {
        interfaces.push(i.get_ref().clone());
    }
    if interfaces.is_empty() {
        d.at(0..0, "[dataplane]: set `interface` (or `interfaces`)");
    }
    for i in raw
        .dataplane
        .interface
        .iter()
        .chain(raw.dataplane.interfaces.iter())
    {
        if i.get_ref().is_empty() || i.get_ref().len() > 15 || i.get_ref().contains('/') {
            d.at(
                i.span(),
                format!("'{}' is not an interface name", i.get_ref()),
            );
        }
    }
    let snat_ipv4 = raw
        .dataplane
        .snat_ipv4
        .as_ref()
        .and_then(|s| parse_ip(d, s, "snat_ipv4"));
    if let (Some(ip), Some(s)) = (snat_ipv4, &raw.dataplane.snat_ipv4)
        && !ip.is_ipv4()
    {
        d.at(s.span(), "snat_ipv4 must be an IPv4 address");
    }
    let snat_ipv6 = raw
        .dataplane
        .snat_ipv6
        .as_ref()
        .and_then(|s| parse_ip(d, s, "snat_ipv6"));
    if let (Some(ip), Some(s)) = (snat_ipv6, &raw.dataplane.snat_ipv6)
        && !ip.is_ipv6()
    {
        d.at(s.span(), "snat_ipv6 must be an IPv6 address");
    }
    let [lo, hi] = *raw.dataplane.snat_ports.get_ref();
    if lo < 1024 || (hi as u32) < lo as u32 + balancer_common::MIN_SNAT_PORTS - 1 {
        d.at(
            raw.dataplane.snat_ports.span(),
            "snat_ports must be [first, last] with first >= 1024 and at least 1024 ports",
        );
    }
    if raw.dataplane.flow_table_size < 1024 {
        d.at(0..0, "[dataplane] flow_table_size must be at least 1024");
    }
    let metrics = raw
        .controller
        .metrics
        .as_ref()
        .and_then(|s| parse_sock(d, s, "metrics"));

    let mut services = Vec::new();
    let mut names = HashSet::new();
    let mut vips: BTreeMap<(SocketAddr, Protocol), String> = BTreeMap::new();
    let mut total_backends = 0usize;
    if raw.services.len() > balancer_common::MAX_SERVICES as usize {
        d.at(
            0..0,
            format!("at most {} services", balancer_common::MAX_SERVICES),
        );
    }
    for s in &raw.services {
        let name = s.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            d.at(
                s.name.span(),
                "service name: use letters, digits, '-', '_' and '.'",
            );
        }
        if !names.insert(name.clone()) {
            d.at(s.name.span(), format!("service '{name}' is defined twice"));
        }
        let vip = parse_sock(d, &s.vip, "vip");
        if let Some(v) = vip
            && let Some(other) = vips.insert((v, s.protocol), name.clone())
        {
            d.at(
                s.vip.span(),
                format!(
                    "vip {v} ({:?}) is already used by service '{other}'",
                    s.protocol
                ),
            );
        }
        let ring = *s.ring_size.get_ref();
        if ring > balancer_common::RING_MAX || !crate::dataplane::maglev::is_prime(ring) {
            d.at(
                s.ring_size.span(),
                format!("ring_size {ring} must be a prime no larger than 65537"),
            );
        }
        if s.backends.get_ref().is_empty() {
            d.at(s.backends.span(), "a service needs at least one backend");
        }
        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for (i, b) in s.backends.get_ref().iter().enumerate() {
            total_backends += 1;
            let Some(addr) = parse_sock(d, &b.address, "backend address") else {
                continue;
            };
            if !seen.insert(addr) {
                d.at(b.address.span(), format!("backend {addr} is listed twice"));
            }
            if let Some(v) = vip {
                if v.is_ipv4() != addr.is_ipv4() {
                    d.at(
                        b.address.span(),
                        "backend and vip must be of the same address family",
                    );
                }
                if s.forwarding == Forwarding::Dsr && addr.port() != v.port() {
                    d.at(
                        b.address.span(),
                        "dsr cannot change the port: the backend port must equal the vip port",
                    );
                }
            }
            if b.weight > 65535 {
                d.at(b.address.span(), "weight must be 0..=65535");
            }
            backends.push(BackendSpec {
                address: addr,
                weight: b.weight,
                priority: b.priority.unwrap_or(i as u32 + 1),
                state: b.state,
            });
        }
        if let Some(h) = &s.health
            && let Err(e) = crate::config::health::spec_from_table(h.get_ref())
        {
            d.at(h.span(), format!("health: {e}"));
        }
        if let Some(vip) = vip {
            services.push(ServiceSpec {
                name,
                vip,
                protocol: s.protocol,
                forwarding: s.forwarding,
                scheduler: s.scheduler,
                failback: s.failback,
                ring_size: ring,
                on_backend_down: s.on_backend_down,
                health: s.health.as_ref().map(|h| h.get_ref().clone()),
                backends,
            });
        }
    }
    if let Some(l7) = &raw.l7 {
        if let Err(errs) = l7.get_ref().validate() {
            for e in errs {
                d.at(l7.span(), format!("l7: {e}"));
            }
        }
        for l in &l7.get_ref().listeners {
            if services
                .iter()
                .any(|s: &ServiceSpec| s.vip == l.address && s.protocol == Protocol::Tcp)
            {
                d.at(
                    l7.span(),
                    format!("l7 listener {} is also an L4 service VIP:port", l.address),
                );
            }
        }
    }
    if total_backends > balancer_common::MAX_BACKENDS as usize {
        d.at(
            0..0,
            format!("at most {} backends in all", balancer_common::MAX_BACKENDS),
        );
    }
    Validated {
        path: path.to_path_buf(),
        interfaces,
        snat_ipv4,
        snat_ipv6,
        metrics,
        services,
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interface = "eth0"        # where the XDP program attaches
xdp_mode = "auto"         # auto | driver | skb

[[service]]
name = "web"
vip = "10.77.0.100:7002"  # or "[fd77::100]:7002"
protocol = "tcp"          # tcp | udp
forwarding = "nat"        # nat | dsr
scheduler = "maglev"
backends = [
  { address = "10.77.0.11:7002", weight = 1 },
  { address = "10.77.0.12:7002" },
]
"#;

    fn p(t: &str) -> Result<Validated, ConfigError> {
        parse(t, Path::new("b.toml"))
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let v = p(GOOD).expect("valid");
        assert_eq!(v.interfaces, vec!["eth0"]);
        assert_eq!(v.services.len(), 1);
        assert_eq!(v.services[0].backends.len(), 2);
        assert_eq!(v.services[0].backends[1].weight, 1);
        assert_eq!(v.services[0].ring_size, 65537);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = p("[dataplane]\ninterface = \"eth0\"\nxdp_mode = auto\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("b.toml:3:"), "{s}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let bad = GOOD.replace("10.77.0.12:7002", "10.77.0.12");
        let e = p(&bad).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].line, 14);
        assert!(e.0[0].message.contains("not an address with a port"), "{e}");
        let col = bad.lines().nth(13).unwrap().find("\"10.77.0.12\"").unwrap() + 1;
        assert_eq!(e.0[0].column, col);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = GOOD.replace("scheduler = \"maglev\"", "schedular = \"maglev\"");
        let line = text
            .lines()
            .position(|l| l.starts_with("schedular"))
            .unwrap()
            + 1;
        let e = p(&text).unwrap_err();
        assert!(e.to_string().contains("schedular"), "{e}");
        assert!(
            e.to_string().starts_with(&format!("b.toml:{line}:1:")),
            "{e}"
        );
    }

    #[test]
    fn several_problems_are_all_reported() {
        let bad = GOOD
            .replace("10.77.0.11:7002", "[fd77::11]:7002")
            .replace("ring_size", "x")
            .replace(
                "forwarding = \"nat\"",
                "forwarding = \"dsr\"\nring_size = 65536",
            )
            .replace("10.77.0.12:7002", "10.77.0.12:80");
        let e = p(&bad).unwrap_err();
        assert!(e.0.len() >= 3, "{e}");
    }

    #[test]
    fn duplicate_vip_and_name() {
        let two = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[service]]").unwrap()..]);
        let e = p(&two).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("defined twice") && s.contains("already used"),
            "{s}"
        );
    }

    #[test]
    fn shipped_examples_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in [
            "examples/patientsecure.toml",
            "examples/patientsecure-l7.toml",
            "packaging/balancer.toml",
        ] {
            let v = load(&root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!v.services.is_empty() || v.raw.l7.is_some(), "{f}");
        }
    }

    #[test]
    fn the_controller_issue_example_is_accepted() {
        let text = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "hl7-listener"
vip = "10.77.0.100:6661"
protocol = "tcp"
forwarding = "nat"
scheduler = "failover"      # one active backend; the others wait by priority
failback = false            # a recovered server does not take the traffic back by itself
health = { kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }
backends = [
  { address = "10.77.0.11:6661", priority = 1 },
  { address = "10.77.0.12:6661", priority = 2 },
]

[[service]]
name = "web"
vip = "10.77.0.100:7002"
protocol = "tcp"
scheduler = "maglev"
health = { kind = "http", path = "/health", expect_status = [200], interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }
backends = [ { address = "10.77.0.11:7002" }, { address = "10.77.0.12:7002" }, { address = "10.77.0.13:7002" } ]
"#;
        let v = p(text).expect("valid");
        assert_eq!(v.services[0].scheduler, Scheduler::Failover);
        assert_eq!(v.services[0].backends[1].priority, 2);
        assert!(v.services[1].health.is_some());
    }
}
