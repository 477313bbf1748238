//! F5 BIG-IP: tmsh `bigip.conf`.
//!
//! The file is a tree of `words { children }` statements; a newline ends a statement. The
//! parser builds that tree (with the line of every node), then the translator reads the
//! `ltm` objects: `node`, `pool`, `monitor tcp|http|https`, `profile client-ssl|server-ssl`,
//! `snatpool` and `virtual`. iRule bodies (`ltm rule`) are Tcl: they are skipped as raw
//! balanced braces, never tokenised.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    Fail, clean_name, fail,
    model::{
        Backend, Certificate, Check, CheckKind, Listener, Plan, Pool, Protocol, Redirect, Route,
        Scheduler, Selection, Service, State, Sticky, TLS_DIR,
    },
    monitor,
    report::Report,
    unique,
};

/// One statement: its words, its line and, if it has a `{ }` block, the statements in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The words before the block (quoted words without their quotes).
    pub words: Vec<String>,
    /// 1-based line of the first word.
    pub line: usize,
    /// The block's statements; `None` when the statement has no block.
    pub children: Option<Vec<Node>>,
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.children
            .as_deref()?
            .iter()
            .find(|c| c.words.first().is_some_and(|w| w == key))
    }

    /// The value of `key value` inside this node's block.
    fn value(&self, key: &str) -> Option<(&str, usize)> {
        let c = self.child(key)?;
        c.words.get(1).map(|v| (v.as_str(), c.line))
    }

    fn kids(&self) -> &[Node] {
        self.children.as_deref().unwrap_or(&[])
    }

    fn head(&self) -> String {
        self.words.join(" ")
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    Open,
    Close,
    Newline,
    Eof,
}

struct Lexer<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer {
            s: text.as_bytes(),
            text,
            i: 0,
            line: 1,
        }
    }

    fn next(&mut self) -> Result<(Tok, usize), Fail> {
        loop {
            let Some(&c) = self.s.get(self.i) else {
                return Ok((Tok::Eof, self.line));
            };
            match c {
                b'\n' => {
                    self.i += 1;
                    self.line += 1;
                    return Ok((Tok::Newline, self.line - 1));
                }
                b' ' | b'\t' | b'\r' => self.i += 1,
                b'#' => {
                    while self.s.get(self.i).is_some_and(|&c| c != b'\n') {
                        self.i += 1;
                    }
                }
                b'{' => {
                    self.i += 1;
                    return Ok((Tok::Open, self.line));
                }
                b'}' => {
                    self.i += 1;
                    return Ok((Tok::Close, self.line));
                }
                b'"' => return self.quoted(),
                _ => {
                    let start = self.i;
                    while self
                        .s
                        .get(self.i)
                        .is_some_and(|&c| !b" \t\r\n{}\"".contains(&c))
                    {
                        self.i += 1;
                    }
                    return Ok((Tok::Word(self.text[start..self.i].to_string()), self.line));
                }
            }
        }
    }

    /// A `"..."` word; `\"` is a quote, other escapes stay as written (monitor strings
    /// keep their `\r\n` for [`monitor::unescape`]).
    fn quoted(&mut self) -> Result<(Tok, usize), Fail> {
        let line = self.line;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return fail(line, "unterminated quoted string"),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') if self.s.get(self.i + 1) == Some(&b'"') => {
                    out.push(b'"');
                    self.i += 2;
                }
                Some(&c) => {
                    if c == b'\n' {
                        self.line += 1;
                    }
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        // The input is a &str and quotes are ASCII: the bytes between them are UTF-8.
        Ok((Tok::Word(String::from_utf8_lossy(&out).into_owned()), line))
    }

    /// Skips a Tcl body after its `{`, up to the matching `}`.
    fn skip_raw(&mut self, open_line: usize) -> Result<(), Fail> {
        let mut depth = 1usize;
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => self.i += 1,
                b'\n' => self.line += 1,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        fail(open_line, "unclosed '{' (iRule body)")
    }
}

/// Parses the statement tree of a `bigip.conf`.
pub fn parse(text: &str) -> Result<Vec<Node>, Fail> {
    let mut lx = Lexer::new(text);
    block(&mut lx, None)
}

fn block(lx: &mut Lexer, open: Option<usize>) -> Result<Vec<Node>, Fail> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut line = 0;
    loop {
        let (t, l) = lx.next()?;
        match t {
            Tok::Word(w) => {
                if words.is_empty() {
                    line = l;
                }
                words.push(w);
            }
            Tok::Newline => {
                if !words.is_empty() {
                    out.push(Node {
                        words: std::mem::take(&mut words),
                        line,
                        children: None,
                    });
                }
            }
            Tok::Open => {
                if words.is_empty() {
                    return fail(l, "'{' without a name before it");
                }
                let children =
                    if open.is_none() && words.len() >= 2 && words[..2] == ["ltm", "rule"] {
                        lx.skip_raw(l)?;
                        Vec::new()
                    } else {
                        block(lx, Some(l))?
                    };
                out.push(Node {
                    words: std::mem::take(&mut words),
                    line,
                    children: Some(children),
                });
            }
            Tok::Close => {
                if open.is_none() {
                    return fail(l, "'}' without a matching '{'");
                }
                if !words.is_empty() {
                    out.push(Node {
                        words: std::mem::take(&mut words),
                        line,
                        children: None,
                    });
                }
                return Ok(out);
            }
            Tok::Eof => {
                if let Some(o) = open {
                    return fail(o, "'{' is never closed");
                }
                if !words.is_empty() {
                    out.push(Node {
                        words,
                        line,
                        children: None,
                    });
                }
                return Ok(out);
            }
        }
    }
}

/// Well-known service names tmsh writes instead of port numbers.
fn port(s: &str) -> Option<u16> {
    let named = match s {
        "ftp" => 21,
        "ssh" => 22,
        "smtp" => 25,
        "domain" => 53,
        "http" => 80,
        "pop3" => 110,
        "ntp" => 123,
        "imap" => 143,
        "snmp" => 161,
        "ldap" => 389,
        "https" => 443,
        "ldaps" => 636,
        "mysql" => 3306,
        "http-alt" | "webcache" => 8080,
        _ => return s.parse::<u16>().ok().filter(|p| *p != 0),
    };
    Some(named)
}

/// `10.77.0.11` or `10.77.0.11%2` (route domain) → the IP and whether a domain was cut.
fn ip(s: &str) -> Option<(IpAddr, bool)> {
    let (a, rd) = match s.split_once('%') {
        Some((a, _)) => (a, true),
        None => (s, false),
    };
    a.parse().ok().map(|ip| (ip, rd))
}

/// `/Common/10.77.0.100:7002`, `/Common/fd77::100.7002`, `/Common/app1:http` → (host part, port).
fn split_host_port(name: &str) -> Option<(&str, &str)> {
    let base = name.rsplit('/').next().unwrap_or(name);
    if base.matches(':').count() > 1 {
        base.rsplit_once('.')
    } else {
        base.rsplit_once(':')
    }
}

#[derive(Default)]
struct Objects<'a> {
    nodes: HashMap<String, &'a Node>,
    pools: HashMap<String, &'a Node>,
    monitors: HashMap<String, (&'a str, &'a Node)>,
    client_ssl: HashMap<String, &'a Node>,
    server_ssl: HashSet<String>,
    snatpools: HashMap<String, &'a Node>,
}

/// Translates a `bigip.conf`.
pub(crate) fn translate(text: &str, r: &mut Report) -> Result<Plan, Fail> {
    let tree = parse(text)?;
    let mut o = Objects::default();
    let mut virtuals = Vec::new();
    for n in &tree {
        let w: Vec<&str> = n.words.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["ltm", "node", name] => {
                o.nodes.insert(name.to_string(), n);
            }
            ["ltm", "pool", name] => {
                o.pools.insert(name.to_string(), n);
            }
            ["ltm", "monitor", kind, name] => {
                o.monitors.insert(name.to_string(), (kind, n));
            }
            ["ltm", "profile", "client-ssl", name] => {
                o.client_ssl.insert(name.to_string(), n);
            }
            ["ltm", "profile", "server-ssl", name] => {
                o.server_ssl.insert(name.to_string());
            }
            ["ltm", "snatpool", name] => {
                o.snatpools.insert(name.to_string(), n);
            }
            ["ltm", "virtual", _] => virtuals.push(n),
            ["ltm", "rule", name] => r.skip(
                n.line,
                format!("ltm rule {name}"),
                "iRules are Tcl programs: not translated (a virtual using one is reported too)",
            ),
            ["ltm", "profile", ..] | ["ltm", "persistence", ..] => {}
            ["ltm", "virtual-address", ..] | ["ltm", "default-node-monitor", ..] => {}
            _ => r.skip(
                n.line,
                n.head(),
                "not a load-balancing object the balancer has an equivalent for",
            ),
        }
    }
    let mut t = Translator {
        o,
        r,
        plan: Plan::default(),
        checks: HashMap::new(),
        names: HashSet::new(),
        pool_names: HashMap::new(),
        vips: HashMap::new(),
    };
    for v in virtuals {
        t.virtual_server(v)?;
    }
    Ok(t.plan)
}

struct Translator<'a, 'r> {
    o: Objects<'a>,
    r: &'r mut Report,
    plan: Plan,
    /// Monitors already translated, by name (their notes are made once).
    checks: HashMap<String, Option<Check>>,
    names: HashSet<String>,
    /// F5 pool name → L7 pool name, for pools already written.
    pool_names: HashMap<String, String>,
    /// Address (and protocol, for L4) → line of the virtual that took it.
    vips: HashMap<(SocketAddr, Protocol), usize>,
}

struct Member {
    address: SocketAddr,
    weight: u32,
    group: u32,
    state: State,
}

fn number(v: Option<(&str, usize)>, what: &str) -> Result<Option<u64>, Fail> {
    match v {
        None => Ok(None),
        Some((s, line)) => s
            .parse::<u64>()
            .map(Some)
            .or_else(|_| fail(line, format!("{what}: '{s}' is not a number"))),
    }
}

impl Translator<'_, '_> {
    fn members(&mut self, pool: &Node) -> Result<Vec<Member>, Fail> {
        let mut out = Vec::new();
        let Some(ms) = pool.child("members") else {
            return Ok(out);
        };
        for m in ms.kids() {
            let Some(name) = m.words.first() else {
                continue;
            };
            let Some((host, port_s)) = split_host_port(name) else {
                return fail(m.line, format!("pool member '{name}' has no port"));
            };
            let Some(p) = port(port_s) else {
                return fail(
                    m.line,
                    format!(
                        "pool member '{name}': port '{port_s}' is not a port number (\"any\" is not supported)"
                    ),
                );
            };
            // The member name is `<node>:<port>` (`<node>.<port>` for IPv6).
            let node_name = &name[..name.len() - port_s.len() - 1];
            let addr_s = m
                .value("address")
                .map(|(a, _)| a.to_string())
                .or_else(|| {
                    self.o
                        .nodes
                        .get(node_name)
                        .and_then(|n| n.value("address"))
                        .map(|(a, _)| a.to_string())
                })
                .unwrap_or_else(|| host.to_string());
            let Some((a, rd)) = ip(&addr_s) else {
                return fail(
                    m.line,
                    format!(
                        "pool member '{name}': no address (no `address` and no `ltm node` of that name)"
                    ),
                );
            };
            if rd {
                self.r.approx(
                    m.line,
                    format!("pool member {name}"),
                    "route domain (%N) dropped: the balancer has one routing table",
                );
            }
            let weight = number(m.value("ratio"), "ratio")?.unwrap_or(1);
            let group = number(m.value("priority-group"), "priority-group")?.unwrap_or(0);
            let node = self.o.nodes.get(node_name);
            let disabled = |n: &Node| {
                n.value("state").is_some_and(|(s, _)| s == "user-down")
                    || n.value("session")
                        .is_some_and(|(s, _)| s == "user-disabled")
            };
            let state = if m.value("state").is_some_and(|(s, _)| s == "user-down")
                || node.is_some_and(|n| n.value("state").is_some_and(|(s, _)| s == "user-down"))
            {
                State::Disabled
            } else if m
                .value("session")
                .is_some_and(|(s, _)| s == "user-disabled")
                || node.is_some_and(|n| disabled(n))
            {
                State::Drain
            } else {
                State::Up
            };
            if m.child("monitor").is_some() {
                self.r.approx(
                    m.line,
                    format!("pool member {name}"),
                    "member-specific monitor ignored: the pool's monitor checks every member",
                );
            }
            out.push(Member {
                address: SocketAddr::new(a, p),
                weight: weight.min(65535) as u32,
                group: group.min(u32::MAX as u64) as u32,
                state,
            });
        }
        Ok(out)
    }

    /// The check for a pool's `monitor` value.
    fn pool_check(&mut self, pool: &Node, pool_name: &str) -> Result<Option<Check>, Fail> {
        let Some(m) = pool.child("monitor") else {
            return Ok(None);
        };
        // `monitor a and b`, `monitor min 1 of { a b }`: the balancer runs one check.
        let mut names: Vec<&String> = m.words[1..]
            .iter()
            .filter(|w| !["and", "min", "of"].contains(&w.as_str()) && w.parse::<u32>().is_err())
            .collect();
        if let Some(c) = m.children.as_deref() {
            names.extend(c.iter().flat_map(|n| n.words.iter()));
        }
        let Some(first) = names.first().map(|s| s.to_string()) else {
            return fail(m.line, "monitor without a name");
        };
        if names.len() > 1 {
            self.r.approx(
                m.line,
                format!("ltm pool {pool_name} monitor"),
                format!("{} monitors: only the first ({first}) is used", names.len()),
            );
        }
        self.check(&first, m.line).map(Some).map(Option::flatten)
    }

    fn check(&mut self, name: &str, used_at: usize) -> Result<Option<Check>, Fail> {
        if let Some(c) = self.checks.get(name) {
            return Ok(c.clone());
        }
        let c = self.resolve_check(name, used_at, 0)?;
        self.checks.insert(name.to_string(), c.clone());
        Ok(c)
    }

    fn resolve_check(
        &mut self,
        name: &str,
        used_at: usize,
        depth: u32,
    ) -> Result<Option<Check>, Fail> {
        let builtin = |kind: &str| -> Option<Check> {
            let k = match kind {
                "tcp" | "tcp_half_open" => CheckKind::Tcp,
                "http" => CheckKind::Http(crate::model::HttpCheck {
                    path: "/".into(),
                    expect_status: vec![200],
                    ..Default::default()
                }),
                "https" | "https_443" => CheckKind::Https(crate::model::HttpCheck {
                    path: "/".into(),
                    expect_status: vec![200],
                    ..Default::default()
                }),
                _ => return None,
            };
            Some(f5_timing(k, 5, 16).0)
        };
        let Some(&(kind, node)) = self.o.monitors.get(name) else {
            let base = name.strip_prefix("/Common/").unwrap_or(name);
            return match builtin(base) {
                Some(c) => {
                    if base == "http" || base == "https" {
                        self.r.approx(
                            used_at,
                            format!("monitor {name}"),
                            "built-in monitor (GET /, any answer): checked as GET / expecting 200",
                        );
                    }
                    Ok(Some(c))
                }
                None if base == "gateway_icmp" || base == "icmp" => {
                    self.r.approx(
                        used_at,
                        format!("monitor {name}"),
                        "ICMP monitors are not supported: a TCP connect check is used",
                    );
                    Ok(Some(f5_timing(CheckKind::Tcp, 5, 16).0))
                }
                None => fail(used_at, format!("monitor '{name}' is not defined")),
            };
        };
        let subject = format!("ltm monitor {kind} {name}");
        let s = |k: &str| node.value(k).map(|(v, _)| v.to_string());
        // defaults-from: settings not written here come from the parent.
        let parent = match node.value("defaults-from") {
            Some((p, _)) if p != name && depth < 8 => {
                if self.o.monitors.contains_key(p) {
                    self.resolve_check(p, node.line, depth + 1)?
                } else {
                    builtin(p.strip_prefix("/Common/").unwrap_or(p))
                }
            }
            _ => None,
        };
        let interval = number(node.value("interval"), "interval")?;
        let timeout = number(node.value("timeout"), "timeout")?;
        let (pi, pt) = parent.as_ref().map_or((5, 16), |c| {
            (
                c.interval.as_secs(),
                c.interval.as_secs() * c.fall as u64 + 1,
            )
        });
        let (interval, timeout) = (interval.unwrap_or(pi), timeout.unwrap_or(pt));
        if interval == 0 {
            return fail(node.line, format!("{subject}: interval 0"));
        }
        let send = s("send").filter(|v| v != "none");
        let recv = s("recv").filter(|v| v != "none");
        let mut notes = Vec::new();
        let kind_v = if monitor::looks_hl7(send.as_deref(), recv.as_deref()) {
            notes.push("HL7 send/receive strings: an mllp check with the balancer's MSH-only ping, passing on an ACK with MSA-1 AA or CA".to_string());
            CheckKind::Mllp
        } else {
            match kind {
                "tcp" | "tcp-half-open" => {
                    if send.is_some() || recv.is_some() {
                        notes.push("send/receive strings of a TCP monitor are not checked: a TCP connect check is used".into());
                    }
                    CheckKind::Tcp
                }
                "http" | "https" => {
                    let inherited = parent.as_ref().and_then(|c| match &c.kind {
                        CheckKind::Http(h) | CheckKind::Https(h) => Some(h.clone()),
                        _ => None,
                    });
                    let h = if send.is_none() && recv.is_none() {
                        inherited.unwrap_or_else(|| crate::model::HttpCheck {
                            path: "/".into(),
                            expect_status: vec![200],
                            ..Default::default()
                        })
                    } else {
                        let (h, n) = monitor::http(send.as_deref(), recv.as_deref(), true);
                        notes.extend(n);
                        h
                    };
                    if kind == "https" {
                        notes.push(format!(
                            "the BIG-IP does not verify the server certificate; the balancer does, against {}",
                            crate::model::BACKEND_CA
                        ));
                        CheckKind::Https(h)
                    } else {
                        CheckKind::Http(h)
                    }
                }
                other => {
                    self.r.skip(
                        node.line,
                        &subject,
                        format!(
                            "{other} monitors have no equivalent: the pools using it get no check"
                        ),
                    );
                    return Ok(None);
                }
            }
        };
        let (mut check, how) = f5_timing(kind_v, interval, timeout);
        notes.push(how);
        if let Some((a, line)) = node.value("destination") {
            match split_host_port(a).and_then(|(_, p)| port(p)) {
                Some(p) => check.port = Some(p),
                None if a.ends_with(":*") || a.ends_with(".*") || a == "*:*" => {}
                None => return fail(line, format!("{subject}: destination '{a}' has no port")),
            }
        }
        if node
            .value("manual-resume")
            .is_some_and(|(v, _)| v == "enabled")
        {
            notes.push("manual-resume: not supported, a member comes back by itself (use `balancer disable`)".into());
        }
        self.r.approx(node.line, subject, notes.join("; "));
        Ok(Some(check))
    }

    fn virtual_server(&mut self, v: &Node) -> Result<(), Fail> {
        let name = v.words[2].clone();
        let subject = format!("ltm virtual {name}");
        if v.child("disabled").is_some() {
            self.r
                .skip(v.line, subject, "disabled on the BIG-IP: left out");
            return Ok(());
        }
        let Some((dest, dline)) = v.value("destination") else {
            return fail(v.line, format!("{subject}: no destination"));
        };
        let Some((host, port_s)) = split_host_port(dest) else {
            return fail(
                dline,
                format!("{subject}: destination '{dest}' has no port"),
            );
        };
        let Some((vip_ip, rd)) = ip(host) else {
            return fail(
                dline,
                format!("{subject}: destination '{dest}' is not an IP address"),
            );
        };
        let Some(vip_port) = port(port_s) else {
            self.r.skip(
                v.line,
                subject,
                format!("destination port '{port_s}': a VIP needs one port"),
            );
            return Ok(());
        };
        if rd {
            self.r.approx(dline, &subject, "route domain (%N) dropped");
        }
        let vip = SocketAddr::new(vip_ip, vip_port);
        let protocol = match v.value("ip-protocol").map(|p| p.0) {
            None | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some(other) => {
                self.r.skip(
                    v.line,
                    subject,
                    format!("ip-protocol {other}: only tcp and udp"),
                );
                return Ok(());
            }
        };
        let rules: Vec<String> = v
            .child("rules")
            .map(|r| r.kids().iter().flat_map(|k| k.words.clone()).collect())
            .unwrap_or_default();
        let redirect = rules.iter().any(|r| r.ends_with("_sys_https_redirect"));
        for rule in rules.iter().filter(|r| !r.ends_with("_sys_https_redirect")) {
            self.r.skip(
                v.child("rules").map_or(v.line, |r| r.line),
                format!("{subject} rule {rule}"),
                "iRule not translated: what it does must be done another way",
            );
        }
        let profiles: Vec<(String, usize)> = v
            .child("profiles")
            .map(|p| {
                p.kids()
                    .iter()
                    .filter_map(|k| k.words.first().map(|w| (w.clone(), k.line)))
                    .collect()
            })
            .unwrap_or_default();
        let client_ssl: Vec<&(String, usize)> = profiles
            .iter()
            .filter(|(p, _)| {
                self.o.client_ssl.contains_key(p)
                    || p.rsplit('/')
                        .next()
                        .is_some_and(|b| b.starts_with("clientssl"))
            })
            .collect();
        let server_ssl = profiles.iter().any(|(p, _)| {
            self.o.server_ssl.contains(p)
                || p.rsplit('/')
                    .next()
                    .is_some_and(|b| b.starts_with("serverssl"))
        });
        let has_http = profiles.iter().any(|(p, _)| {
            p.rsplit('/')
                .next()
                .is_some_and(|b| b == "http" || b.starts_with("http_") || b.starts_with("http-"))
        });
        let persist = v
            .child("persist")
            .and_then(|p| p.kids().first())
            .and_then(|k| k.words.first())
            .map(|w| w.rsplit('/').next().unwrap_or(w).to_string());

        if redirect && client_ssl.is_empty() && v.value("pool").is_none() {
            if self.vips.insert((vip, Protocol::Tcp), v.line).is_some() {
                return fail(dline, format!("{subject}: destination {vip} is used twice"));
            }
            self.plan.redirects.push(Redirect {
                source: format!("{subject} (line {}): _sys_https_redirect", v.line),
                address: vip,
                https_port: 443,
            });
            self.r.ok(
                v.line,
                subject,
                format!("redirect to HTTPS on {vip} ([[l7.redirect]])"),
            );
            return Ok(());
        }
        let Some((pool_ref, pline)) = v.value("pool") else {
            self.r.skip(
                v.line,
                subject,
                "no pool (forwarding or iRule-only virtual)",
            );
            return Ok(());
        };
        let Some(&pool) = self.o.pools.get(pool_ref) else {
            return fail(
                pline,
                format!("{subject}: pool '{pool_ref}' is not defined"),
            );
        };
        if let Some(prev) = self.vips.insert((vip, protocol), v.line) {
            return fail(
                dline,
                format!(
                    "{subject}: destination {vip} is already used by the virtual at line {prev}"
                ),
            );
        }
        let members = self.members(pool)?;
        let (members, other_family): (Vec<Member>, Vec<Member>) = members
            .into_iter()
            .partition(|m| m.address.is_ipv4() == vip.is_ipv4());
        if !other_family.is_empty() {
            self.r.skip(
                pool.line,
                format!("ltm pool {pool_ref}"),
                format!(
                    "{} members of the other address family than the VIP {vip}: left out",
                    other_family.len()
                ),
            );
        }
        if members.is_empty() {
            self.r.skip(
                v.line,
                subject,
                format!("pool {pool_ref} has no usable member"),
            );
            return Ok(());
        }
        let check = self.pool_check(pool, pool_ref)?;
        let mode = pool
            .value("load-balancing-mode")
            .map_or("round-robin", |m| m.0)
            .to_string();
        self.snat(v, &subject)?;

        if client_ssl.is_empty() {
            self.l4(
                v,
                &subject,
                vip,
                protocol,
                pool,
                pool_ref,
                members,
                check,
                &mode,
                persist.as_deref(),
                has_http,
            )
        } else {
            if protocol != Protocol::Tcp {
                return fail(dline, format!("{subject}: client-ssl on a non-TCP virtual"));
            }
            let certs = self.certificates(&client_ssl)?;
            let lname = unique(clean_name(&name), &mut self.names);
            self.plan.listeners.push(Listener {
                name: lname.clone(),
                source: format!(
                    "{subject} (line {}): TLS terminated with {}",
                    v.line,
                    client_ssl
                        .iter()
                        .map(|c| c.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                address: vip,
                certificates: certs,
            });
            if !has_http {
                self.r.approx(v.line, &subject, "client-ssl without an http profile: the balancer terminates TLS and proxies HTTP only");
            }
            let pool_name = self.l7_pool(
                pool,
                pool_ref,
                members,
                check,
                &mode,
                persist.as_deref(),
                server_ssl,
            )?;
            let rname = unique(format!("{lname}-all"), &mut self.names);
            self.plan.routes.push(Route {
                name: rname,
                source: format!("{subject}: every request of listener {lname}"),
                host: None,
                path_prefix: "/".into(),
                listeners: vec![lname.clone()],
                pool: pool_name.clone(),
            });
            self.r.ok(
                v.line,
                subject,
                format!("L7 listener {lname} on {vip}, route / to pool {pool_name}"),
            );
            Ok(())
        }
    }

    fn snat(&mut self, v: &Node, subject: &str) -> Result<(), Fail> {
        let sat = v.child("source-address-translation");
        let ty = sat.and_then(|s| s.value("type")).map(|t| t.0);
        match ty {
            Some("automap") => Ok(()),
            Some("snat") => {
                let Some((pname, line)) = sat.and_then(|s| s.value("pool")) else {
                    return fail(
                        sat.map_or(v.line, |s| s.line),
                        format!("{subject}: snat without a pool"),
                    );
                };
                let Some(sp) = self.o.snatpools.get(pname) else {
                    return fail(
                        line,
                        format!("{subject}: snatpool '{pname}' is not defined"),
                    );
                };
                let addrs: Vec<IpAddr> = sp
                    .child("members")
                    .map(|m| {
                        m.kids()
                            .iter()
                            .filter_map(|k| k.words.first())
                            .filter_map(|w| ip(w.rsplit('/').next().unwrap_or(w)).map(|x| x.0))
                            .collect()
                    })
                    .unwrap_or_default();
                let Some(IpAddr::V4(first)) = addrs.first().copied() else {
                    self.r.skip(
                        line,
                        format!("{subject} snatpool {pname}"),
                        "no IPv4 member: the interface address is used",
                    );
                    return Ok(());
                };
                match self.plan.snat_ipv4 {
                    Some(s) if s != first => self.r.approx(line, format!("{subject} snatpool {pname}"), format!("the balancer has one SNAT address per family: {s} (from an earlier virtual) is used")),
                    _ => {
                        self.plan.snat_ipv4 = Some(first);
                        if addrs.len() > 1 {
                            self.r.approx(line, format!("{subject} snatpool {pname}"), format!("{} addresses: only {first} is used (snat_ipv4)", addrs.len()));
                        } else {
                            self.r.ok(line, format!("{subject} snatpool {pname}"), format!("snat_ipv4 = {first}"));
                        }
                    }
                }
                Ok(())
            }
            Some("none") | None => {
                self.r.approx(v.line, subject, "no SNAT on the BIG-IP (servers saw client addresses and routed back through it): forwarding = nat makes them see the balancer's address; see forwarding = \"dsr\" to keep client addresses");
                Ok(())
            }
            Some(other) => fail(
                sat.map_or(v.line, |s| s.line),
                format!("{subject}: source-address-translation type '{other}' unknown"),
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn l4(
        &mut self,
        v: &Node,
        subject: &str,
        vip: SocketAddr,
        protocol: Protocol,
        pool: &Node,
        pool_ref: &str,
        members: Vec<Member>,
        check: Option<Check>,
        mode: &str,
        persist: Option<&str>,
        has_http: bool,
    ) -> Result<(), Fail> {
        let name = unique(clean_name(&v.words[2]), &mut self.names);
        let min_active =
            number(pool.value("min-active-members"), "min-active-members")?.unwrap_or(0);
        let groups: BTreeSet<u32> = members.iter().map(|m| m.group).collect();
        let psubject = format!("ltm pool {pool_ref}");
        let failover = min_active > 0 && groups.len() > 1;
        if !failover && groups.len() > 1 {
            self.r.approx(pool.line, &psubject, "priority groups without min-active-members are inactive on the BIG-IP: all members balanced (maglev)");
        }
        // Higher priority-group wins on the BIG-IP; lower priority wins here.
        let rank = |g: u32| {
            groups
                .iter()
                .rev()
                .position(|x| *x == g)
                .map_or(1, |p| p as u32 + 1)
        };
        let backends: Vec<Backend> = members
            .iter()
            .map(|m| Backend {
                address: m.address,
                weight: m.weight,
                priority: failover.then(|| rank(m.group)),
                state: m.state,
            })
            .collect();
        if failover {
            let shared = groups
                .iter()
                .any(|g| members.iter().filter(|m| m.group == *g).count() > 1);
            self.r.add(
                pool.line,
                if shared || min_active > 1 { crate::Outcome::Approximated } else { crate::Outcome::Translated },
                &psubject,
                format!(
                    "priority groups {} with min-active-members {min_active}: scheduler = failover, failback = true (the BIG-IP sends new connections back to a recovered higher group){}",
                    groups.iter().rev().map(|g| g.to_string()).collect::<Vec<_>>().join(" > "),
                    if shared || min_active > 1 { "; one member is active at a time, not a whole group" } else { "" }
                ),
            );
        } else {
            let how = match mode {
                "round-robin" | "ratio-member" | "ratio-node" => {
                    "consistent hashing (maglev) with the ratios as weights"
                }
                _ => {
                    "no dynamic equivalent at layer 4: consistent hashing (maglev) with the ratios as weights"
                }
            };
            self.r.approx(
                pool.line,
                &psubject,
                format!("load-balancing-mode {mode}: {how}"),
            );
        }
        if let Some(p) = persist {
            self.r.approx(v.line, subject, format!("persistence {p}: at layer 4 a flow stays on its backend, a client's new connections are hashed anew"));
        }
        if has_http {
            self.r.approx(v.line, subject, "http profile without client-ssl: balanced at layer 4 (HTTP passes through unchanged)");
        }
        self.r.ok(
            v.line,
            subject,
            format!("[[service]] {name} on {vip}, {} backends", backends.len()),
        );
        self.plan.services.push(Service {
            name,
            source: format!(
                "{subject} (line {}), pool {pool_ref} (line {})",
                v.line, pool.line
            ),
            vip,
            protocol,
            scheduler: if failover {
                Scheduler::Failover
            } else {
                Scheduler::Maglev
            },
            failback: true,
            health: check,
            backends,
        });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn l7_pool(
        &mut self,
        pool: &Node,
        pool_ref: &str,
        members: Vec<Member>,
        check: Option<Check>,
        mode: &str,
        persist: Option<&str>,
        https: bool,
    ) -> Result<String, Fail> {
        if let Some(n) = self.pool_names.get(pool_ref) {
            return Ok(n.clone());
        }
        let name = unique(clean_name(pool_ref), &mut self.names);
        let psubject = format!("ltm pool {pool_ref}");
        let selection = match mode {
            "round-robin" | "ratio-member" | "ratio-node" => Selection::RoundRobin,
            m => {
                self.r.approx(
                    pool.line,
                    &psubject,
                    format!("load-balancing-mode {m}: least_outstanding"),
                );
                Selection::LeastOutstanding
            }
        };
        let sticky = match persist {
            None => Sticky::None,
            Some(p) if p.starts_with("cookie") => Sticky::Cookie(None),
            Some(p) if p.starts_with("source_addr") => Sticky::Source,
            Some(p) => {
                self.r.approx(
                    pool.line,
                    &psubject,
                    format!("persistence {p}: sticky = \"cookie\""),
                );
                Sticky::Cookie(None)
            }
        };
        if members.iter().any(|m| m.group != 0)
            && number(pool.value("min-active-members"), "min-active-members")?.unwrap_or(0) > 0
        {
            self.r.approx(
                pool.line,
                &psubject,
                "priority groups in an L7 pool: every member is balanced",
            );
        }
        let mut check = check;
        if let Some(c) = check.as_mut()
            && let CheckKind::Http(h) = &c.kind
            && https
        {
            c.kind = CheckKind::Https(h.clone());
            self.r.approx(
                pool.line,
                &psubject,
                "http monitor on a server-ssl pool: checked over TLS",
            );
        }
        let backends = members
            .iter()
            .filter_map(|m| match m.state {
                State::Disabled => None,
                State::Drain => Some((m.address, 0)),
                State::Up => Some((m.address, m.weight)),
            })
            .collect::<Vec<_>>();
        if members.iter().any(|m| m.state != State::Up) {
            self.r.approx(
                pool.line,
                &psubject,
                "disabled members are left out, forced-offline ones get weight 0",
            );
        }
        if backends.is_empty() {
            return fail(pool.line, format!("{psubject}: every member is disabled"));
        }
        self.r.ok(
            pool.line,
            &psubject,
            format!(
                "[[l7.pool]] {name}, {} backends, {}",
                backends.len(),
                if https { "https (server-ssl)" } else { "http" }
            ),
        );
        self.plan.pools.push(Pool {
            name: name.clone(),
            source: format!("{psubject} (line {})", pool.line),
            https,
            selection,
            sticky,
            health: check,
            backends,
        });
        self.pool_names.insert(pool_ref.to_string(), name.clone());
        Ok(name)
    }

    fn certificates(&mut self, profiles: &[&(String, usize)]) -> Result<Vec<Certificate>, Fail> {
        let mut out = Vec::new();
        for (p, line) in profiles {
            let (cert, key, names, at) = match self.o.client_ssl.get(p.as_str()) {
                Some(n) => {
                    let mut c = n.value("cert").map(|x| x.0.to_string());
                    let mut k = n.value("key").map(|x| x.0.to_string());
                    if let Some(ckc) = n.child("cert-key-chain")
                        && let Some(first) = ckc.kids().first()
                    {
                        c = c.or(first.value("cert").map(|x| x.0.to_string()));
                        k = k.or(first.value("key").map(|x| x.0.to_string()));
                    }
                    let names = n
                        .value("server-name")
                        .map(|x| vec![x.0.to_string()])
                        .unwrap_or_default();
                    (c, k, names, n.line)
                }
                None => (
                    Some("/Common/default.crt".into()),
                    Some("/Common/default.key".into()),
                    Vec::new(),
                    *line,
                ),
            };
            let (Some(cert), Some(key)) =
                (cert.filter(|c| c != "none"), key.filter(|k| k != "none"))
            else {
                return fail(at, format!("client-ssl profile {p}: no cert and key"));
            };
            let base = |s: &str, ext: &str| {
                let b = s.rsplit('/').next().unwrap_or(s);
                let b = b.strip_suffix(ext).unwrap_or(b);
                clean_name(b)
            };
            let c = Certificate {
                cert: format!("{TLS_DIR}/{}.pem", base(&cert, ".crt")),
                key: format!("{TLS_DIR}/{}.key", base(&key, ".key")),
                server_names: names
                    .into_iter()
                    .filter(|n| {
                        n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-._*".contains(c))
                    })
                    .collect(),
            };
            self.r.approx(at, format!("ltm profile client-ssl {p}"), format!("certificate {cert} and key {key} are not in bigip.conf: export them to {} and {} (PEM); TLS 1.2+ with forward-secret suites replaces the profile's ciphers and options", c.cert, c.key));
            out.push(c);
        }
        Ok(out)
    }
}

/// F5 timing: a member is marked down when no probe succeeded for `timeout` seconds, probing
/// every `interval`. Here: the same interval, `fall` = the probes that fit in that time,
/// each bounded by half the interval, `rise` = 1 (the BIG-IP marks up on the first success).
fn f5_timing(kind: CheckKind, interval: u64, timeout: u64) -> (Check, String) {
    let fall = (timeout / interval).clamp(1, 1000) as u32;
    let i = Duration::from_secs(interval);
    (
        Check {
            kind,
            interval: i,
            timeout: i / 2,
            rise: 1,
            fall,
            port: None,
        },
        format!(
            "interval {interval}s, timeout {timeout}s: interval {interval}s, fall {fall}, rise 1, {}ms per probe",
            i.as_millis() / 2
        ),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_has_lines_and_nesting() {
        let t = parse("#TMSH-VERSION: 15.1.0\nltm pool /Common/p {\n    members {\n        /Common/a:80 { address 10.0.0.1 }\n    }\n    monitor /Common/tcp\n}\n").unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].line, 2);
        let m = t[0].child("members").unwrap();
        assert_eq!(m.line, 3);
        assert_eq!(m.kids()[0].line, 4);
        assert_eq!(m.kids()[0].value("address"), Some(("10.0.0.1", 4)));
        assert_eq!(t[0].value("monitor"), Some(("/Common/tcp", 6)));
    }

    #[test]
    fn quotes_and_irules() {
        let t = parse("ltm rule /Common/r {\n when HTTP_REQUEST {\n  # don't \"break\n  set x 1 }\n}\nltm monitor http /Common/m {\n send \"GET / HTTP/1.0\\r\\n\\\"x\\\"\"\n}\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].value("send").unwrap().0, "GET / HTTP/1.0\\r\\n\"x\"");
    }

    #[test]
    fn syntax_errors_have_lines() {
        for (text, line, msg) in [
            ("ltm pool /Common/p {\n members {\n", 2, "never closed"),
            (
                "ltm node a { address 1.2.3.4 }\n}\n",
                2,
                "without a matching",
            ),
            ("ltm monitor http m {\n send \"GET /\n", 2, "unterminated"),
            ("ltm pool p {\n { }\n}\n", 2, "without a name"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.line, e.message.contains(msg)),
                (line, true),
                "{text}: {e:?}"
            );
        }
    }

    #[test]
    fn host_and_port_forms() {
        assert_eq!(
            split_host_port("/Common/10.0.0.1:http"),
            Some(("10.0.0.1", "http"))
        );
        assert_eq!(
            split_host_port("/Common/fd77::11.7002"),
            Some(("fd77::11", "7002"))
        );
        assert_eq!(port("https"), Some(443));
        assert_eq!(port("any"), None);
        assert_eq!(ip("10.0.0.1%2"), Some(("10.0.0.1".parse().unwrap(), true)));
    }

    #[test]
    fn timing_follows_the_timeout() {
        let (c, _) = f5_timing(CheckKind::Tcp, 5, 16);
        assert_eq!(
            (c.interval, c.timeout, c.fall, c.rise),
            (Duration::from_secs(5), Duration::from_millis(2500), 3, 1)
        );
        assert_eq!(f5_timing(CheckKind::Tcp, 10, 5).0.fall, 1);
    }
}
