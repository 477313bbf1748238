//! Citrix ADC / NetScaler: `ns.conf`, one CLI command per line.
//!
//! A line is split into words (double quotes group, `\"` escapes), then read as
//! `verb object positional... -option value...`. The translator collects `add server`,
//! `add service`, `add serviceGroup` / `bind serviceGroup`, `add lb monitor`, `bind service`,
//! `add lb vserver`, `bind lb vserver`, `set lb vserver -backupVServer`, `add ssl certKey`
//! and `bind ssl vserver`, then writes one service or listener per addressable vserver.
//! Other commands are reported by their first words only: `ns.conf` lines also carry
//! password hashes and keys.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    Fail, Outcome, clean_name, fail,
    model::{
        Backend, Certificate, Check, CheckKind, HttpCheck, Listener, Plan, Pool, Protocol, Route,
        Scheduler, Selection, Service, State, Sticky, TLS_DIR,
    },
    monitor,
    report::Report,
    unique,
};

/// One command: positional words and `-option value` pairs, with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// 1-based line.
    pub line: usize,
    /// Words before the first option.
    pub args: Vec<String>,
    /// Options, keys without the dash, lower-cased, values space-joined; a flag has "".
    pub opts: Vec<(String, String)>,
}

impl Command {
    fn opt(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .find(|(k, _)| k == &key.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    fn arg(&self, i: usize, what: &str) -> Result<&str, Fail> {
        match self.args.get(i) {
            Some(a) => Ok(a),
            None => fail(self.line, format!("`{}`: missing {what}", self.verb())),
        }
    }

    fn verb(&self) -> String {
        self.args
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn num(&self, key: &str) -> Result<Option<u64>, Fail> {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => match v.parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => fail(
                    self.line,
                    format!("`{}`: -{key} '{v}' is not a number", self.verb()),
                ),
            },
        }
    }
}

fn words(line: &str, n: usize) -> Result<Vec<String>, Fail> {
    let mut out = Vec::new();
    let mut it = line.chars().peekable();
    while let Some(&c) = it.peek() {
        if c.is_whitespace() {
            it.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' {
            it.next();
            loop {
                match it.next() {
                    None => return fail(n, "unterminated quoted string"),
                    Some('"') => break,
                    Some('\\') => match it.next() {
                        Some('"') => w.push('"'),
                        Some(o) => {
                            w.push('\\');
                            w.push(o);
                        }
                        None => return fail(n, "unterminated quoted string"),
                    },
                    Some(o) => w.push(o),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                it.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// Splits `ns.conf` into commands (comments `#` and blank lines left out).
pub fn parse(text: &str) -> Result<Vec<Command>, Fail> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let n = i + 1;
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let w = words(t, n)?;
        let mut args = Vec::new();
        let mut opts = Vec::new();
        let mut k = 0;
        while k < w.len() && !is_opt(&w[k]) {
            args.push(w[k].clone());
            k += 1;
        }
        while k < w.len() {
            // Words after the first positional options: `-respCode 200 302` has two values.
            let key = w[k].get(1..).unwrap_or("").to_ascii_lowercase();
            k += 1;
            let mut vals = Vec::new();
            while k < w.len() && !is_opt(&w[k]) {
                vals.push(w[k].as_str());
                k += 1;
            }
            opts.push((key, vals.join(" ")));
        }
        out.push(Command {
            line: n,
            args,
            opts,
        });
    }
    Ok(out)
}

/// `-name` is an option; `-1` (a negative number) is not.
fn is_opt(w: &str) -> bool {
    w.len() > 1 && w.starts_with('-') && !w[1..].starts_with(|c: char| c.is_ascii_digit())
}

struct Svc {
    line: usize,
    kind: String,
    members: Vec<(String, u16, u32, usize)>,
    monitors: Vec<String>,
    disabled: bool,
}

struct Vs<'a> {
    cmd: &'a Command,
    kind: String,
    addr: Option<SocketAddr>,
    binds: Vec<(String, usize)>,
    backup: Option<(String, usize)>,
    no_failback: bool,
    certs: Vec<(String, bool, usize)>,
}

#[derive(Default)]
struct Conf<'a> {
    servers: HashMap<String, (IpAddr, bool)>,
    services: HashMap<String, Svc>,
    monitors: HashMap<String, &'a Command>,
    vservers: Vec<Vs<'a>>,
    certkeys: HashMap<String, &'a Command>,
}

/// Translates an `ns.conf`.
pub(crate) fn translate(text: &str, r: &mut Report) -> Result<Plan, Fail> {
    let cmds = parse(text)?;
    let mut c = Conf::default();
    let mut vs_index: HashMap<String, usize> = HashMap::new();
    for cmd in &cmds {
        let a: Vec<&str> = cmd.args.iter().map(String::as_str).collect();
        let lower: Vec<String> = a.iter().take(3).map(|s| s.to_ascii_lowercase()).collect();
        let l: Vec<&str> = lower.iter().map(String::as_str).collect();
        match l.as_slice() {
            ["add", "server", ..] => {
                let name = cmd.arg(2, "server name")?;
                let addr = cmd.arg(3, "server address")?;
                match addr.parse::<IpAddr>() {
                    Ok(ip) => {
                        let disabled = cmd.opt("state").is_some_and(|s| s.eq_ignore_ascii_case("DISABLED"));
                        c.servers.insert(name.to_string(), (ip, disabled));
                    }
                    Err(_) => r.skip(cmd.line, format!("add server {name}"), "a server by domain name: the balancer needs addresses (its services are left out)"),
                }
            }
            ["add", "service", ..] => {
                let name = cmd.arg(2, "service name")?;
                let server = cmd.arg(3, "server")?;
                let kind = cmd.arg(4, "service type")?;
                let port = port(cmd, cmd.arg(5, "port")?)?;
                c.services.insert(
                    name.to_string(),
                    Svc {
                        line: cmd.line,
                        kind: kind.to_ascii_uppercase(),
                        members: vec![(server.to_string(), port, 1, cmd.line)],
                        monitors: Vec::new(),
                        disabled: cmd.opt("state").is_some_and(|s| s.eq_ignore_ascii_case("DISABLED")),
                    },
                );
            }
            ["add", "servicegroup", ..] => {
                let name = cmd.arg(2, "service group name")?;
                let kind = cmd.arg(3, "service type")?;
                c.services.insert(
                    name.to_string(),
                    Svc {
                        line: cmd.line,
                        kind: kind.to_ascii_uppercase(),
                        members: Vec::new(),
                        monitors: Vec::new(),
                        disabled: cmd.opt("state").is_some_and(|s| s.eq_ignore_ascii_case("DISABLED")),
                    },
                );
            }
            ["bind", "servicegroup", ..] | ["bind", "service", ..] => {
                let name = cmd.arg(2, "service name")?;
                let Some(s) = c.services.get_mut(name) else {
                    return fail(cmd.line, format!("`{}`: service '{name}' is not defined", cmd.verb()));
                };
                if let Some(m) = cmd.opt("monitorName") {
                    s.monitors.push(m.to_string());
                } else if l[1] == "servicegroup" {
                    let server = cmd.arg(3, "server")?;
                    let p = port(cmd, cmd.arg(4, "port")?)?;
                    let w = cmd.num("weight")?.unwrap_or(1).min(65535) as u32;
                    s.members.push((server.to_string(), p, w, cmd.line));
                } else {
                    r.skip(cmd.line, cmd.verb(), "binding not translated");
                }
            }
            ["add", "lb", "monitor"] => {
                let name = cmd.arg(3, "monitor name")?;
                cmd.arg(4, "monitor type")?;
                c.monitors.insert(name.to_string(), cmd);
            }
            ["add", "lb", "vserver"] => {
                let name = cmd.arg(3, "vserver name")?;
                let kind = cmd.arg(4, "service type")?.to_ascii_uppercase();
                let addr = match (cmd.args.get(5), cmd.args.get(6)) {
                    (Some(ip), Some(p)) => {
                        let Ok(ip) = ip.parse::<IpAddr>() else {
                            return fail(cmd.line, format!("`add lb vserver {name}`: '{ip}' is not an IP address"));
                        };
                        let p: u16 = match p.parse() {
                            Ok(p) => p,
                            Err(_) if p == "*" => 0,
                            Err(_) => return fail(cmd.line, format!("`add lb vserver {name}`: port '{p}' is not a number")),
                        };
                        (!ip.is_unspecified() && p != 0).then(|| SocketAddr::new(ip, p))
                    }
                    _ => None,
                };
                vs_index.insert(name.to_string(), c.vservers.len());
                c.vservers.push(Vs {
                    cmd,
                    kind,
                    addr,
                    binds: Vec::new(),
                    backup: cmd.opt("backupVServer").map(|b| (b.to_string(), cmd.line)),
                    no_failback: cmd.opt("disablePrimaryOnDown").is_some_and(|v| v.eq_ignore_ascii_case("ENABLED")),
                    certs: Vec::new(),
                });
            }
            ["bind", "lb", "vserver"] | ["set", "lb", "vserver"] | ["bind", "ssl", "vserver"] => {
                let name = cmd.arg(3, "vserver name")?;
                let Some(&i) = vs_index.get(name) else {
                    return fail(cmd.line, format!("`{}`: vserver '{name}' is not defined", cmd.verb()));
                };
                let v = &mut c.vservers[i];
                match l[0] {
                    "bind" if l[1] == "lb" => match cmd.args.get(4) {
                        Some(t) => v.binds.push((t.to_string(), cmd.line)),
                        None if cmd.opt("policyName").is_some() => {
                            r.skip(cmd.line, format!("bind lb vserver {name} -policyName"), "policies are not translated")
                        }
                        None => return fail(cmd.line, format!("`bind lb vserver {name}`: nothing to bind")),
                    },
                    "bind" => match cmd.opt("certkeyName") {
                        Some(ck) => v.certs.push((ck.to_string(), cmd.opt("SNICert").is_some(), cmd.line)),
                        None => r.skip(cmd.line, format!("bind ssl vserver {name}"), "only -certkeyName is translated"),
                    },
                    _ => {
                        if let Some(b) = cmd.opt("backupVServer") {
                            v.backup = Some((b.to_string(), cmd.line));
                        }
                        if let Some(d) = cmd.opt("disablePrimaryOnDown") {
                            v.no_failback = d.eq_ignore_ascii_case("ENABLED");
                        }
                        let other: Vec<&str> = cmd
                            .opts
                            .iter()
                            .map(|(k, _)| k.as_str())
                            .filter(|k| *k != "backupvserver" && *k != "disableprimaryondown")
                            .collect();
                        if !other.is_empty() {
                            r.skip(cmd.line, format!("set lb vserver {name}"), format!("options not translated: -{}", other.join(", -")));
                        }
                    }
                }
            }
            ["add", "ssl", "certkey"] => {
                let name = cmd.arg(3, "certKey name")?;
                c.certkeys.insert(name.to_string(), cmd);
            }
            ["set", "ssl", "vserver"] => r.approx(
                cmd.line,
                format!("set ssl vserver {}", a.get(3).unwrap_or(&"")),
                "protocol and cipher settings: the balancer offers TLS 1.2 and 1.3 with forward-secret AEAD suites only",
            ),
            _ => r.skip(cmd.line, cmd.verb(), "no load-balancing equivalent"),
        }
    }
    let mut t = Translator {
        c: &c,
        r,
        plan: Plan::default(),
        names: HashSet::new(),
        pools: HashMap::new(),
        by_name: vs_index,
        used: HashSet::new(),
        noted_certs: HashSet::new(),
    };
    let backups: HashSet<String> = c
        .vservers
        .iter()
        .filter_map(|v| v.backup.as_ref().map(|b| b.0.clone()))
        .collect();
    for v in &c.vservers {
        t.vserver(v, backups.contains(&v.cmd.args[3]))?;
    }
    Ok(t.plan)
}

fn port(cmd: &Command, p: &str) -> Result<u16, Fail> {
    match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(n),
        _ => fail(
            cmd.line,
            format!("`{}`: port '{p}' is not a port number", cmd.verb()),
        ),
    }
}

struct Translator<'a, 'r> {
    c: &'a Conf<'a>,
    r: &'r mut Report,
    plan: Plan,
    names: HashSet<String>,
    pools: HashMap<String, String>,
    by_name: HashMap<String, usize>,
    used: HashSet<(SocketAddr, Protocol)>,
    /// certKeys already reported (one note each, however many vservers use them).
    noted_certs: HashSet<String>,
}

struct Member {
    address: SocketAddr,
    weight: u32,
    disabled: bool,
}

fn unit(v: u64, u: Option<&str>) -> Duration {
    match u.map(|s| s.to_ascii_uppercase()).as_deref() {
        Some("MSEC") => Duration::from_millis(v),
        Some("MIN") => Duration::from_secs(v * 60),
        _ => Duration::from_secs(v),
    }
}

impl Translator<'_, '_> {
    fn vserver(&mut self, v: &Vs, is_backup: bool) -> Result<(), Fail> {
        let name = v.cmd.args[3].clone();
        let subject = format!("add lb vserver {name}");
        let line = v.cmd.line;
        if v.cmd
            .opt("state")
            .is_some_and(|s| s.eq_ignore_ascii_case("DISABLED"))
        {
            self.r
                .skip(line, subject, "disabled on the NetScaler: left out");
            return Ok(());
        }
        let Some(addr) = v.addr else {
            if is_backup {
                self.r.ok(line, subject, "non-addressable backup vserver: its services are the standby backends of its primary");
            } else {
                self.r.skip(
                    line,
                    subject,
                    "non-addressable vserver (no IP and port) that is no one's backup",
                );
            }
            return Ok(());
        };
        // The chain primary → backup → backup's backup: priorities 1, 2, 3...
        let mut chain = vec![(name.clone(), 1u32)];
        let mut seen = HashSet::from([name.clone()]);
        let mut cur = v;
        while let Some((b, bline)) = &cur.backup {
            let Some(&i) = self.by_name.get(b) else {
                return fail(
                    *bline,
                    format!("`{subject}`: backup vserver '{b}' is not defined"),
                );
            };
            if !seen.insert(b.clone()) {
                break;
            }
            chain.push((b.clone(), chain.len() as u32 + 1));
            cur = &self.c.vservers[i];
        }
        let mut members: Vec<(Member, u32)> = Vec::new();
        let mut kinds = HashSet::new();
        let mut monitors: Vec<(String, usize)> = Vec::new();
        for (vname, prio) in &chain {
            let vs = &self.c.vservers[self.by_name[vname]];
            for (target, bline) in &vs.binds {
                let Some(s) = self.c.services.get(target) else {
                    return fail(
                        *bline,
                        format!("`bind lb vserver {vname}`: service '{target}' is not defined"),
                    );
                };
                kinds.insert(s.kind.clone());
                if let Some(m) = s.monitors.first() {
                    monitors.push((m.clone(), s.line));
                } else {
                    monitors.push((String::new(), s.line));
                }
                for (server, p, w, mline) in &s.members {
                    let (ip, server_disabled) = match self.c.servers.get(server) {
                        Some(x) => *x,
                        None => match server.parse::<IpAddr>() {
                            Ok(ip) => (ip, false),
                            Err(_) => {
                                self.r.skip(
                                    *mline,
                                    format!("{target} member {server}"),
                                    "server has no address: left out",
                                );
                                continue;
                            }
                        },
                    };
                    if ip.is_ipv4() != addr.is_ipv4() {
                        self.r.skip(
                            *mline,
                            format!("{target} member {server}"),
                            "other address family than the vserver: left out",
                        );
                        continue;
                    }
                    members.push((
                        Member {
                            address: SocketAddr::new(ip, *p),
                            weight: *w,
                            disabled: s.disabled || server_disabled,
                        },
                        *prio,
                    ));
                }
            }
        }
        if members.is_empty() {
            self.r
                .skip(line, subject, "no bound service with an address");
            return Ok(());
        }
        members.dedup_by(|a, b| a.0.address == b.0.address);
        let check = self.check(&monitors, &kinds)?;
        let persistence = v.cmd.opt("persistenceType").map(|p| p.to_ascii_uppercase());
        let method = v
            .cmd
            .opt("lbMethod")
            .map_or("LEASTCONNECTION".to_string(), |m| m.to_ascii_uppercase());
        let protocol = if v.kind == "UDP" || v.kind == "DNS" {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        match v.kind.as_str() {
            "SSL" => {
                if chain.len() > 1 {
                    self.r.approx(
                        line,
                        &subject,
                        "backup vserver of an SSL vserver: its services join the pool",
                    );
                }
                if !self.used.insert((addr, Protocol::Tcp)) {
                    return fail(line, format!("`{subject}`: {addr} is used twice"));
                }
                let certs = self.certs(v, &subject)?;
                let lname = unique(clean_name(&name), &mut self.names);
                let https = kinds.iter().all(|k| k == "SSL" || k == "SSL_TCP");
                if !https && kinds.iter().any(|k| k == "SSL") {
                    self.r.approx(
                        line,
                        &subject,
                        "services of mixed types: the pool speaks plain HTTP",
                    );
                }
                let pool_key = chain
                    .iter()
                    .map(|c| c.0.clone())
                    .collect::<Vec<_>>()
                    .join("+");
                let pname = match self.pools.get(&pool_key) {
                    Some(p) => p.clone(),
                    None => {
                        let pname = unique(clean_name(&format!("{name}-pool")), &mut self.names);
                        let selection = match method.as_str() {
                            "ROUNDROBIN" => Selection::RoundRobin,
                            m => {
                                self.r.approx(
                                    line,
                                    &subject,
                                    format!(
                                        "-lbMethod {m}: least_outstanding (requests in flight)"
                                    ),
                                );
                                Selection::LeastOutstanding
                            }
                        };
                        let sticky = match persistence.as_deref() {
                            None | Some("NONE") => Sticky::None,
                            Some("COOKIEINSERT") => Sticky::Cookie(None),
                            Some("SOURCEIP") => Sticky::Source,
                            Some(p) => {
                                self.r.approx(
                                    line,
                                    &subject,
                                    format!("-persistenceType {p}: sticky = \"cookie\""),
                                );
                                Sticky::Cookie(None)
                            }
                        };
                        let mut check = check.clone();
                        if let Some(c) = check.as_mut()
                            && let CheckKind::Http(h) = &c.kind
                            && https
                        {
                            c.kind = CheckKind::Https(h.clone());
                        }
                        let backends: Vec<(SocketAddr, u32)> = members
                            .iter()
                            .filter(|m| !m.0.disabled)
                            .map(|m| (m.0.address, m.0.weight))
                            .collect();
                        if backends.is_empty() {
                            self.r
                                .skip(line, subject, "every bound service is disabled");
                            return Ok(());
                        }
                        self.plan.pools.push(Pool {
                            name: pname.clone(),
                            source: format!("services bound to {subject} (line {line})"),
                            https,
                            selection,
                            sticky,
                            health: check,
                            backends,
                        });
                        self.pools.insert(pool_key, pname.clone());
                        pname
                    }
                };
                self.plan.listeners.push(Listener {
                    name: lname.clone(),
                    source: format!("{subject} (line {line}): SSL vserver, TLS terminated"),
                    address: addr,
                    certificates: certs,
                });
                let rname = unique(format!("{lname}-all"), &mut self.names);
                self.plan.routes.push(Route {
                    name: rname,
                    source: format!("{subject}: every request"),
                    host: None,
                    path_prefix: "/".into(),
                    listeners: vec![lname.clone()],
                    pool: pname.clone(),
                });
                self.r.ok(
                    line,
                    subject,
                    format!("L7 listener {lname} on {addr}, route / to pool {pname}"),
                );
                Ok(())
            }
            "TCP" | "SSL_BRIDGE" | "ANY" | "HTTP" | "UDP" | "SSL_TCP" | "DNS" => {
                if !self.used.insert((addr, protocol)) {
                    return fail(line, format!("`{subject}`: {addr} is used twice"));
                }
                if v.kind == "HTTP" {
                    self.r.approx(
                        line,
                        &subject,
                        "HTTP vserver: balanced at layer 4, requests pass unchanged",
                    );
                }
                if v.kind == "SSL_TCP" {
                    self.r.approx(
                        line,
                        &subject,
                        "SSL_TCP vserver: balanced at layer 4, TLS passes through to the servers",
                    );
                }
                let failover = chain.len() > 1;
                if failover {
                    let per: Vec<usize> = chain
                        .iter()
                        .map(|(_, p)| members.iter().filter(|m| m.1 == *p).count())
                        .collect();
                    self.r.add(
                        line,
                        if per.iter().any(|n| *n > 1) {
                            Outcome::Approximated
                        } else {
                            Outcome::Translated
                        },
                        &subject,
                        format!(
                            "-backupVServer chain {}: scheduler = failover, failback = {}{}",
                            chain
                                .iter()
                                .map(|c| c.0.as_str())
                                .collect::<Vec<_>>()
                                .join(" → "),
                            !v.no_failback,
                            if per.iter().any(|n| *n > 1) {
                                "; one backend is active at a time, not a whole vserver"
                            } else {
                                ""
                            }
                        ),
                    );
                } else {
                    self.r.approx(
                        line,
                        &subject,
                        format!("-lbMethod {method}: consistent hashing (maglev) with the weights"),
                    );
                }
                if let Some(p) = persistence.as_deref().filter(|p| *p != "NONE") {
                    self.r.approx(line, &subject, format!("-persistenceType {p}: at layer 4 a flow stays on its backend, new connections are hashed anew"));
                }
                let sname = unique(clean_name(&name), &mut self.names);
                self.r.ok(
                    line,
                    &subject,
                    format!("[[service]] {sname} on {addr}, {} backends", members.len()),
                );
                self.plan.services.push(Service {
                    name: sname,
                    source: format!(
                        "{subject} (line {line}){}",
                        if failover {
                            format!(
                                ", backups: {}",
                                chain[1..]
                                    .iter()
                                    .map(|c| c.0.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        } else {
                            String::new()
                        }
                    ),
                    vip: addr,
                    protocol,
                    scheduler: if failover {
                        Scheduler::Failover
                    } else {
                        Scheduler::Maglev
                    },
                    failback: !v.no_failback,
                    health: check,
                    backends: members
                        .iter()
                        .map(|(m, p)| Backend {
                            address: m.address,
                            weight: m.weight,
                            priority: failover.then_some(*p),
                            state: if m.disabled {
                                State::Disabled
                            } else {
                                State::Up
                            },
                        })
                        .collect(),
                });
                Ok(())
            }
            other => {
                self.r.skip(
                    line,
                    subject,
                    format!("vserver type {other} has no equivalent"),
                );
                Ok(())
            }
        }
    }

    fn certs(&mut self, v: &Vs, subject: &str) -> Result<Vec<Certificate>, Fail> {
        let mut out: Vec<Certificate> = Vec::new();
        let mut ordered: Vec<&(String, bool, usize)> = v.certs.iter().filter(|c| !c.1).collect();
        ordered.extend(v.certs.iter().filter(|c| c.1));
        for (ck, _sni, bline) in ordered {
            let Some(cmd) = self.c.certkeys.get(ck) else {
                return fail(
                    *bline,
                    format!("`bind ssl vserver`: certKey '{ck}' is not defined"),
                );
            };
            let (Some(cert), Some(key)) = (cmd.opt("cert"), cmd.opt("key")) else {
                return fail(
                    cmd.line,
                    format!("`add ssl certKey {ck}`: needs -cert and -key"),
                );
            };
            let base = |p: &str| {
                let b = p.rsplit('/').next().unwrap_or(p);
                clean_name(b.rsplit_once('.').map_or(b, |x| x.0))
            };
            let c = Certificate {
                cert: format!("{TLS_DIR}/{}.pem", base(cert)),
                key: format!("{TLS_DIR}/{}.key", base(key)),
                server_names: Vec::new(),
            };
            let pass = cmd.opt("passcrypt").is_some() || cmd.opt("password").is_some();
            if !self.noted_certs.insert(ck.clone()) {
                out.push(c);
                continue;
            }
            self.r.approx(
                cmd.line,
                format!("add ssl certKey {ck}"),
                format!(
                    "copy {cert} to {} and {key} to {} (PEM){}",
                    c.cert,
                    c.key,
                    if pass {
                        "; the key is encrypted on the NetScaler: store it decrypted, mode 0600"
                    } else {
                        ""
                    }
                ),
            );
            out.push(c);
        }
        if out.is_empty() {
            return fail(
                v.cmd.line,
                format!("`{subject}`: SSL vserver without `bind ssl vserver ... -certkeyName`"),
            );
        }
        if v.certs.iter().any(|c| c.1) {
            self.r.approx(v.cmd.line, subject, "SNI certificates: each answers the names in its certificate file; set server_names");
        }
        Ok(out)
    }

    fn check(
        &mut self,
        monitors: &[(String, usize)],
        kinds: &HashSet<String>,
    ) -> Result<Option<Check>, Fail> {
        let names: HashSet<&str> = monitors.iter().map(|m| m.0.as_str()).collect();
        let Some((first, sline)) = monitors.first() else {
            return Ok(None);
        };
        if names.len() > 1 {
            self.r.approx(
                *sline,
                format!(
                    "monitors {}",
                    names
                        .iter()
                        .filter(|n| !n.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "different monitors on the bound services: the first one checks them all",
            );
        }
        if first.is_empty() {
            let kind = if kinds.iter().all(|k| k == "UDP" || k == "DNS") {
                "ping-default"
            } else {
                "tcp-default"
            };
            self.r.approx(
                *sline,
                "no monitor bound",
                format!(
                    "the NetScaler uses {kind}: a TCP connect check every 5s, timeout 2s, fall 3"
                ),
            );
            return Ok(Some(Check {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise: 1,
                fall: 3,
                port: None,
            }));
        }
        let Some(cmd) = self.c.monitors.get(first.as_str()) else {
            let builtin = match first.to_ascii_lowercase().as_str() {
                "tcp" | "tcp-default" => Some(CheckKind::Tcp),
                "http" => Some(CheckKind::Http(HttpCheck {
                    path: "/".into(),
                    expect_status: vec![200],
                    ..Default::default()
                })),
                "ping" | "ping-default" => None,
                _ => return fail(*sline, format!("monitor '{first}' is not defined")),
            };
            let kind = builtin.unwrap_or(CheckKind::Tcp);
            self.r.approx(
                *sline,
                format!("monitor {first}"),
                "built-in monitor: checked with the NetScaler's default timing (5s, 2s, fall 3)",
            );
            return Ok(Some(Check {
                kind,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise: 1,
                fall: 3,
                port: None,
            }));
        };
        let subject = format!("add lb monitor {first}");
        let ty = cmd.args[4].to_ascii_uppercase();
        let send = cmd.opt("send");
        let recv = cmd.opt("recv");
        let secure = cmd
            .opt("secure")
            .is_some_and(|s| s.eq_ignore_ascii_case("YES"));
        let mut notes = Vec::new();
        let mut exact = true;
        let kind = if monitor::looks_hl7(send, recv) {
            notes.push("HL7 send/receive strings: an mllp check with the balancer's MSH-only ping, passing on an ACK with MSA-1 AA or CA".to_string());
            exact = false;
            CheckKind::Mllp
        } else {
            match ty.as_str() {
                "TCP" => CheckKind::Tcp,
                "TCP-ECV" => {
                    notes.push(
                        "TCP-ECV send/receive strings are not checked: a TCP connect check".into(),
                    );
                    exact = false;
                    CheckKind::Tcp
                }
                "HTTP" => {
                    let req = cmd.opt("httpRequest").unwrap_or("HEAD /");
                    let (mut h, n) = monitor::http(Some(req), None, false);
                    if !n.is_empty() {
                        exact = false;
                    }
                    notes.extend(n);
                    if let Some(codes) = cmd.opt("respCode") {
                        h.expect_status = resp_codes(codes).map_or_else(
                            || {
                                fail(
                                    cmd.line,
                                    format!("`{subject}`: -respCode '{codes}' is not a list of status codes or ranges"),
                                )
                            },
                            Ok,
                        )?;
                    }
                    if secure {
                        CheckKind::Https(h)
                    } else {
                        CheckKind::Http(h)
                    }
                }
                "HTTP-ECV" => {
                    let (h, n) = monitor::http(send.or(Some("GET /")), recv, false);
                    if !n.is_empty() {
                        exact = false;
                    }
                    notes.extend(n);
                    if secure {
                        CheckKind::Https(h)
                    } else {
                        CheckKind::Http(h)
                    }
                }
                other => {
                    self.r.skip(
                        cmd.line,
                        subject,
                        format!("monitor type {other} has no equivalent: no check"),
                    );
                    return Ok(None);
                }
            }
        };
        if secure && !matches!(kind, CheckKind::Mllp) {
            notes.push(format!(
                "-secure YES: the certificate is verified against {}",
                crate::model::BACKEND_CA
            ));
            exact = false;
        }
        let interval = unit(cmd.num("interval")?.unwrap_or(5), cmd.opt("units3"));
        let mut timeout = unit(cmd.num("resptimeout")?.unwrap_or(2), cmd.opt("units4"));
        if interval.is_zero() {
            return fail(cmd.line, format!("`{subject}`: -interval 0"));
        }
        if timeout >= interval || timeout.is_zero() {
            notes.push(format!(
                "response timeout not below the interval: {}ms",
                interval.as_millis() / 2
            ));
            timeout = interval / 2;
            exact = false;
        }
        let fall = cmd.num("retries")?.unwrap_or(3).clamp(1, 1000) as u32;
        let rise = cmd.num("successRetries")?.unwrap_or(1).clamp(1, 1000) as u32;
        let port = match cmd.num("destPort")? {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => return fail(cmd.line, format!("`{subject}`: -destPort {p}")),
            None => None,
        };
        if cmd.opt("downTime").is_some() {
            notes.push("-downTime: the balancer probes a down backend at the same interval".into());
            exact = false;
        }
        notes.push(format!(
            "interval {}ms, timeout {}ms, fall {fall}, rise {rise}",
            interval.as_millis(),
            timeout.as_millis()
        ));
        self.r.add(
            cmd.line,
            if exact {
                Outcome::Translated
            } else {
                Outcome::Approximated
            },
            subject,
            notes.join("; "),
        );
        Ok(Some(Check {
            kind,
            interval,
            timeout,
            rise,
            fall,
            port,
        }))
    }
}

/// `200 302`, `200-299`: the codes, each in 100..=599.
fn resp_codes(s: &str) -> Option<Vec<u16>> {
    let mut out = Vec::new();
    for part in s.split([',', ' ']).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?),
            None => {
                let c = part.parse::<u16>().ok()?;
                (c, c)
            }
        };
        if !(100..=599).contains(&lo) || !(lo..=599).contains(&hi) {
            return None;
        }
        out.extend(lo..=hi);
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn response_codes_and_ranges() {
        assert_eq!(resp_codes("200 302"), Some(vec![200, 302]));
        assert_eq!(resp_codes("200-203").map(|v| v.len()), Some(4));
        assert_eq!(resp_codes("99"), None);
        assert_eq!(resp_codes("300-200"), None);
        assert_eq!(resp_codes("ok"), None);
    }

    #[test]
    fn words_and_options() {
        let c = parse("add lb monitor mon-ws HTTP-ECV -send \"GET /health HTTP/1.1\\r\\nHost: \\\"x\\\"\" -recv OK -LRTM DISABLED -interval 5\n").unwrap();
        assert_eq!(c[0].args, ["add", "lb", "monitor", "mon-ws", "HTTP-ECV"]);
        assert_eq!(
            c[0].opt("send"),
            Some("GET /health HTTP/1.1\\r\\nHost: \"x\"")
        );
        assert_eq!(c[0].opt("lrtm"), Some("DISABLED"));
        assert_eq!(c[0].num("interval").unwrap(), Some(5));
    }

    #[test]
    fn unterminated_quote_has_its_line() {
        let e =
            parse("add server a 10.0.0.1\nadd lb monitor m HTTP-ECV -send \"GET /\n").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
