//! The configuration file: TOML, validated as a whole, every error reported as
//! `file:line:column: message`. Nothing touches the system until a file validates.

pub mod bgp;
pub mod console;
pub mod controller;
pub mod dataplane;
pub mod ha;
pub mod health;
pub mod mllp;
pub mod passive;
pub mod service;

pub use bgp::{BgpConfig, BgpSection};
pub use console::ConsoleSection;
pub use controller::ControllerSection;
pub use dataplane::{DataplaneSection, HostCheckError, SnatPorts, XdpMode};
pub use ha::Ha;
pub use mllp::Mode;
pub(crate) use service::names;
pub use service::{
    AdminState, BackendEntry, BackendSpec, DownAction, Forwarding, Protocol, Scheduler,
    ServiceSection, ServiceSpec,
};

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
    pub dataplane: DataplaneSection,
    /// Control socket, metrics.
    #[serde(default)]
    pub controller: ControllerSection,
    /// Layer-4 services.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceSection>,
    /// Layer-7 (TLS-terminating HTTP proxy): listeners, routes, pools, redirects.
    pub l7: Option<Spanned<balancer_l7::L7Config>>,
    /// The web console; absent: no console.
    pub console: Option<Spanned<ConsoleSection>>,
    /// One balancer of an active/standby pair; absent: a single balancer.
    pub ha: Option<Spanned<ha::HaSection>>,
    /// VIP announcement through BIRD (ECMP scale-out); absent: nothing is announced.
    pub bgp: Option<Spanned<BgpSection>>,
}

/// A validated file: everything callers read, typed.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Where it came from.
    pub path: PathBuf,
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// XDP attach mode.
    pub xdp_mode: XdpMode,
    /// Configured IPv4 SNAT addresses (a pool; empty: the interface's own address).
    pub snat_ipv4: Vec<IpAddr>,
    /// Configured IPv6 SNAT addresses (a pool; empty: the interface's own address).
    pub snat_ipv6: Vec<IpAddr>,
    /// SNAT source ports.
    pub snat_ports: SnatPorts,
    /// Flow-table entries.
    pub flow_table_size: u32,
    /// Pin directory.
    pub pin_path: PathBuf,
    /// TCP idle timeout.
    pub tcp_idle_timeout: std::time::Duration,
    /// UDP idle timeout.
    pub udp_idle_timeout: std::time::Duration,
    /// Control socket.
    pub socket: PathBuf,
    /// Metrics address.
    pub metrics: Option<SocketAddr>,
    /// Services, in file order.
    pub services: Vec<ServiceSpec>,
    /// The `[l7]` section, validated.
    pub l7: Option<balancer_l7::L7Config>,
    /// The `[console]` section, validated.
    pub console: Option<ConsoleSection>,
    /// The `[ha]` section, validated: keepalived owns the addresses, flows are mirrored.
    pub ha: Option<Ha>,
    /// The `[bgp]` section, validated.
    pub bgp: Option<BgpConfig>,
}

impl Validated {
    /// Checks what only this host can tell: the SNAT ports against the ephemeral range.
    pub fn check_host(&self) -> Result<(), HostCheckError> {
        let eph = crate::host::net::ephemeral_ports()
            .map_err(|e| HostCheckError::Unreadable(e.to_string()))?;
        self.snat_ports.check_against(eph)
    }

    /// The addresses the services answer on: every VIP and every L7 listener and redirect
    /// address (unspecified and loopback ones left out). A single balancer puts them on its
    /// interface; in a pair keepalived moves them (with the SNAT addresses).
    pub fn service_addresses(&self) -> std::collections::BTreeSet<IpAddr> {
        let mut out: std::collections::BTreeSet<IpAddr> =
            self.services.iter().map(|s| s.vip.ip()).collect();
        if let Some(l7) = &self.l7 {
            out.extend(
                l7.listeners
                    .iter()
                    .map(|l| l.address.ip())
                    .chain(l7.redirects.iter().map(|r| r.address.ip())),
            );
        }
        out.retain(|ip| !ip.is_unspecified() && !ip.is_loopback());
        out
    }

    /// Everything `check` warns about on this host, and `run` and `reload` log: the flow
    /// table's size for the host's CPUs ([`Validated::flow_table_warning`]) and the services
    /// capped by their SNAT ports ([`Validated::capacity_warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        self.flow_table_warning(cpus)
            .into_iter()
            .chain(self.capacity_warnings())
            .collect()
    }

    /// A flow table too small for `cpus` possible CPUs. The kernel's LRU keeps up to 256
    /// entries per CPU aside (free and just-inserted) and refills them by evicting in batches
    /// of up to 128, clearing the reference bits of what it moves; with few entries per CPU a
    /// new flow's entry can be evicted before the backend's first answer, and that client
    /// waits a second for its SYN retry. Measured on 2 CPUs with short connections over a
    /// table past full: about 1 connection in 500 lost its entry at 512 entries per CPU, 1 in
    /// 2,000 at 4,096, none in 45,000 at 8,192.
    pub fn flow_table_warning(&self, cpus: usize) -> Option<String> {
        let want = u64::from(MIN_FLOW_ENTRIES_PER_CPU) * cpus.max(1) as u64;
        (u64::from(self.flow_table_size) < want).then(|| {
            format!(
                "flow_table_size {} is small for this host's {cpus} CPUs: once it is full, new flows can lose an entry to the kernel's batched LRU eviction before their first reply (that client waits a second for its SYN retry); use at least {want} ({MIN_FLOW_ENTRIES_PER_CPU} per CPU)",
                self.flow_table_size
            )
        })
    }

    /// Services whose NAT flows are capped below the flow table's size by their SNAT ports:
    /// a NAT flow needs a distinct (SNAT port, backend) pair, so a service holds at most
    /// ports × backends concurrent flows, and past that new flows are dropped (`check` prints
    /// these; `run` and `reload` log them).
    pub fn capacity_warnings(&self) -> Vec<String> {
        let ports = u64::from(self.snat_ports.last - self.snat_ports.first) + 1;
        // A NAT flow takes two entries.
        let table = u64::from(self.flow_table_size) / 2;
        self.services
            .iter()
            .filter(|s| s.forwarding == Forwarding::Nat)
            .filter_map(|s| {
                let backends = s.backends.iter().filter(|b| b.weight > 0).count() as u64;
                // Unset: the interface's one address.
                let pool = if s.vip.is_ipv4() {
                    &self.snat_ipv4
                } else {
                    &self.snat_ipv6
                };
                let addrs = pool.len().max(1) as u64;
                let cap = ports * addrs * backends;
                (cap < table).then(|| {
                    format!(
                        "service '{}': at most {cap} concurrent NAT flows ({ports} SNAT ports × {addrs} SNAT address{} × {backends} backends), fewer than the flow table's {table}; new flows past that are dropped (widen [dataplane] snat_ports, add SNAT addresses or add backends)",
                        s.name,
                        if addrs == 1 { "" } else { "es" },
                    )
                })
            })
            .collect()
    }
}

/// Flow-table entries per possible CPU below which `check` warns
/// ([`Validated::flow_table_warning`]).
pub const MIN_FLOW_ENTRIES_PER_CPU: u32 = 8192;

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

/// A SNAT address or pool: addresses of the family, no repeats, 1 to
/// [`balancer_common::MAX_SNAT_ADDRS`] of them.
fn snat_pool(
    d: &mut Diags,
    s: Option<&Spanned<dataplane::SnatAddrs>>,
    what: &str,
    v6: bool,
) -> Vec<IpAddr> {
    let Some(s) = s else { return Vec::new() };
    let texts = s.get_ref().texts();
    let max = balancer_common::MAX_SNAT_ADDRS;
    if texts.is_empty() || texts.len() > max {
        d.at(s.span(), format!("{what}: give 1 to {max} addresses"));
        return Vec::new();
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for t in texts {
        let Ok(ip) = t.parse::<IpAddr>() else {
            d.at(s.span(), format!("{what}: '{t}' is not an IP address"));
            continue;
        };
        if ip.is_ipv6() != v6 {
            let family = if v6 { "IPv6" } else { "IPv4" };
            d.at(
                s.span(),
                format!("{what} must be {family} addresses: '{t}'"),
            );
        } else if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            d.at(
                s.span(),
                format!("{what}: '{t}' cannot be a source address"),
            );
        } else if out.contains(&ip) {
            d.at(s.span(), format!("{what}: '{t}' is listed twice"));
        } else {
            out.push(ip);
        }
    }
    out
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
    let snat_ipv4 = snat_pool(d, raw.dataplane.snat_ipv4.as_ref(), "snat_ipv4", false);
    let snat_ipv6 = snat_pool(d, raw.dataplane.snat_ipv6.as_ref(), "snat_ipv6", true);
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
        let check = match &s.health {
            Some(h) => match health::spec_from_table(h.get_ref()) {
                Ok(spec) => Some(spec),
                Err(e) => {
                    d.at(h.span(), format!("health: {e}"));
                    None
                }
            },
            None => None,
        };
        let passive = s.passive_health.as_ref().and_then(|p| {
            let problem = if let Err(e) = p.get_ref().validate() {
                Some(e)
            } else if s.protocol != Protocol::Tcp {
                Some("TCP services only (it counts refused and unanswered SYNs)".into())
            } else if s.health.is_none() {
                Some("needs an active `health` check to bring a backend back".into())
            } else {
                None
            };
            match problem {
                Some(e) => {
                    d.at(p.span(), format!("passive_health: {e}"));
                    None
                }
                None => Some(*p.get_ref()),
            }
        });
        let relay = mllp::check(d, s);
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
                new_flow_rate: s.new_flow_rate,
                mode: *s.mode.get_ref(),
                mllp: relay,
                health: check,
                passive_health: passive,
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
            // A relayed service's socket binds its VIP:port in the kernel, like a listener.
            if services.iter().any(|s: &ServiceSpec| {
                s.protocol == Protocol::Tcp
                    && (s.vip == l.address
                        || (s.mode == Mode::Mllp
                            && s.vip.port() == l.address.port()
                            && (l.address.ip().is_unspecified() || s.vip.ip().is_unspecified())))
            }) {
                d.at(
                    l7.span(),
                    format!("l7 listener {} is also an L4 service VIP:port", l.address),
                );
            }
        }
    }
    let console = raw
        .console
        .as_ref()
        .and_then(|c| console::validate(c, &services, metrics, d));
    let ha = raw.ha.as_ref().and_then(|h| {
        let snat = (!snat_ipv4.is_empty(), !snat_ipv6.is_empty());
        ha::validate(h, &interfaces, snat, &services, d)
    });
    let bgp = raw.bgp.as_ref().and_then(|b| bgp::validate(b, d));
    if total_backends > balancer_common::MAX_BACKENDS as usize {
        d.at(
            0..0,
            format!("at most {} backends in all", balancer_common::MAX_BACKENDS),
        );
    }
    Validated {
        path: path.to_path_buf(),
        interfaces,
        xdp_mode: raw.dataplane.xdp_mode,
        snat_ipv4,
        snat_ipv6,
        snat_ports: SnatPorts {
            first: lo,
            last: hi,
        },
        flow_table_size: raw.dataplane.flow_table_size,
        pin_path: raw.dataplane.pin_path.clone(),
        tcp_idle_timeout: raw.dataplane.tcp_idle_timeout,
        udp_idle_timeout: raw.dataplane.udp_idle_timeout,
        socket: raw.controller.socket.clone(),
        metrics,
        services,
        l7: raw.l7.map(Spanned::into_inner),
        console,
        ha,
        bgp,
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
    fn passive_health_needs_tcp_and_an_active_check() {
        let svc = |extra: &str| {
            format!(
                "[dataplane]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\n{extra}\nbackends = [ {{ address = \"10.77.0.11:80\" }} ]\n"
            )
        };
        let ok = p(&svc(
            "health = { kind = \"tcp\" }\npassive_health = { failures = 3, window = \"500ms\" }",
        ))
        .unwrap();
        let ph = ok.services[0].passive_health.unwrap();
        assert_eq!(
            (ph.failures, ph.window),
            (3, std::time::Duration::from_millis(500))
        );
        let e = p(&svc("passive_health = {}")).unwrap_err().to_string();
        assert!(
            e.contains("passive_health: needs an active `health` check"),
            "{e}"
        );
        let e = p(&svc(
            "protocol = \"udp\"\nhealth = { kind = \"tcp\" }\npassive_health = {}",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("passive_health: TCP services only"), "{e}");
        let e = p(&svc(
            "health = { kind = \"tcp\" }\npassive_health = { failures = 0 }",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":8:") && e.contains("failures must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn shipped_examples_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in [
            "examples/patientsecure.toml",
            "examples/patientsecure-l7.toml",
            "examples/patientsecure-ha.toml",
            "packaging/balancer.toml",
        ] {
            let v = load(&root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(!v.services.is_empty() || v.l7.is_some(), "{f}");
        }
    }

    #[test]
    fn check_warns_when_the_flow_table_is_small_for_the_cpus() {
        let text = |size: u32| {
            format!(
                "[dataplane]\ninterface = \"eth0\"\nflow_table_size = {size}\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\nbackends = [ {{ address = \"10.77.0.11:80\" }} ]\n"
            )
        };
        let small = p(&text(8192)).unwrap();
        let w = small.flow_table_warning(2).expect("4,096 per CPU");
        assert!(w.contains("at least 16384"), "{w}");
        assert_eq!(small.flow_table_warning(1), None, "8,192 for one CPU");
        let big = p(&text(262144)).unwrap();
        assert_eq!(big.flow_table_warning(32), None);
        let w = big.flow_table_warning(64).expect("4,096 per CPU");
        assert!(
            w.contains("64 CPUs") && w.contains("at least 524288"),
            "{w}"
        );
    }

    #[test]
    fn check_warns_when_snat_ports_cap_a_service_below_the_flow_table() {
        let text = |size: u32| {
            format!(
                "[dataplane]\ninterface = \"eth0\"\nflow_table_size = {size}\nsnat_ports = [40000, 49999]\n\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\nbackends = [ {{ address = \"10.77.0.11:80\" }}, {{ address = \"10.77.0.12:80\" }}, {{ address = \"10.77.0.13:80\", weight = 0 }} ]\n\n[[service]]\nname = \"direct\"\nvip = \"10.77.0.100:81\"\nforwarding = \"dsr\"\nbackends = [ {{ address = \"10.77.0.11:81\" }} ]\n"
            )
        };
        let w = p(&text(32768)).unwrap().capacity_warnings();
        assert!(
            w.is_empty(),
            "20,000 pairs hold the table's 16,384 flows: {w:?}"
        );
        let w = p(&text(65536 * 2)).unwrap().capacity_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("'web'")
                && w[0].contains("at most 20000")
                && w[0].contains("× 2 backends")
                && w[0].contains("65536"),
            "{w:?}"
        );
    }

    #[test]
    fn a_snat_pool_multiplies_the_capacity_check_warns_about() {
        let text = |pool: &str| {
            format!(
                "[dataplane]\ninterface = \"eth0\"\nflow_table_size = 131072\nsnat_ports = [40000, 49999]\n{pool}\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:80\"\nbackends = [ {{ address = \"10.77.0.11:80\" }}, {{ address = \"10.77.0.12:80\" }} ]\n"
            )
        };
        let one = p(&text("snat_ipv4 = \"10.77.0.200\"")).unwrap();
        assert_eq!(
            one.snat_ipv4,
            vec!["10.77.0.200".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(one.capacity_warnings().len(), 1, "20,000 < 65,536");
        let pool = p(&text(
            "snat_ipv4 = [\"10.77.0.200\", \"10.77.0.201\", \"10.77.0.202\", \"10.77.0.203\"]",
        ))
        .unwrap();
        assert_eq!(pool.snat_ipv4.len(), 4);
        assert!(
            pool.capacity_warnings().is_empty(),
            "4 × 10,000 × 2 = 80,000 >= 65,536: {:?}",
            pool.capacity_warnings()
        );
        let three = p(&text(
            "snat_ipv4 = [\"10.77.0.200\", \"10.77.0.201\", \"10.77.0.202\"]",
        ))
        .unwrap()
        .capacity_warnings();
        assert!(
            three.len() == 1
                && three[0].contains("at most 60000")
                && three[0].contains("× 3 SNAT addresses"),
            "{three:?}"
        );
        for (bad, why) in [
            ("snat_ipv4 = []", "give 1 to 8 addresses"),
            (
                "snat_ipv4 = [\"10.77.0.200\", \"10.77.0.200\"]",
                "listed twice",
            ),
            (
                "snat_ipv4 = [\"10.77.0.200\", \"fd77::200\"]",
                "must be IPv4 addresses",
            ),
            ("snat_ipv6 = \"10.77.0.200\"", "must be IPv6 addresses"),
            (
                "snat_ipv4 = [\"10.77.0.200\", \"nonsense\"]",
                "'nonsense' is not an IP address",
            ),
            ("snat_ipv4 = \"0.0.0.0\"", "cannot be a source address"),
        ] {
            let e = p(&text(bad)).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let nine: Vec<String> = (0..9).map(|i| format!("\"10.77.0.{}\"", 200 + i)).collect();
        let e = p(&text(&format!("snat_ipv4 = [{}]", nine.join(", "))))
            .expect_err("nine")
            .to_string();
        assert!(e.contains("give 1 to 8 addresses"), "{e}");
    }

    #[test]
    fn snat_ports_inside_the_ephemeral_range_are_refused() {
        let p = SnatPorts {
            first: 10000,
            last: 32767,
        };
        assert!(p.check_against((32768, 60999)).is_ok());
        let e = p.check_against((32000, 60999)).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        assert!(
            SnatPorts {
                first: 61000,
                last: 65535
            }
            .check_against((32768, 60999))
            .is_ok()
        );
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
