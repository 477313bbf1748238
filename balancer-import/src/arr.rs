//! IIS Application Request Routing: `applicationHost.config` (XML, read with `roxmltree`).
//!
//! Web farms become L7 pools (`server` entries, `healthCheck`, `loadBalancing`, `affinity`);
//! site bindings become listeners (https) and redirects (http); URL Rewrite rules whose
//! action rewrites to `http(s)://<farm>/...` become routes (host condition, path prefix).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use roxmltree::{Document, Node};

use crate::{
    Fail, Outcome, clean_name, fail,
    model::{
        Certificate, Check, CheckKind, HttpCheck, Listener, Plan, Pool, Redirect, Route, Selection,
        Sticky, TLS_DIR,
    },
    report::Report,
    unique,
};

fn line(doc: &Document, n: Node) -> usize {
    doc.text_pos_at(n.range().start).row as usize
}

fn children<'a, 'i>(n: Node<'a, 'i>, tag: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    n.children().filter(move |c| c.has_tag_name(tag))
}

fn child<'a, 'i>(n: Node<'a, 'i>, tag: &'a str) -> Option<Node<'a, 'i>> {
    children(n, tag).next()
}

/// `hh:mm:ss`, `hh:mm:ss.fff` or `d.hh:mm:ss` (.NET TimeSpan).
fn timespan(s: &str) -> Option<Duration> {
    let (days, rest) = match s.split_once('.') {
        Some((d, r)) if !d.contains(':') => (d.parse::<u64>().ok()?, r),
        _ => (0, s),
    };
    let mut parts = rest.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || m > 59 || !(0.0..60.0).contains(&sec) {
        return None;
    }
    Some(Duration::from_secs((days * 24 + h) * 3600 + m * 60) + Duration::from_secs_f64(sec))
}

fn bool_attr(doc: &Document, n: Node, name: &str, default: bool) -> Result<bool, Fail> {
    match n.attribute(name) {
        None => Ok(default),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => fail(
            line(doc, n),
            format!(
                "<{}> {name}=\"{v}\" is not true or false",
                n.tag_name().name()
            ),
        ),
    }
}

fn num_attr(doc: &Document, n: Node, name: &str, default: u32) -> Result<u32, Fail> {
    match n.attribute(name) {
        None => Ok(default),
        Some(v) => v.parse().or_else(|_| {
            fail(
                line(doc, n),
                format!("<{}> {name}=\"{v}\" is not a number", n.tag_name().name()),
            )
        }),
    }
}

struct Farm {
    name: String,
    line: usize,
    /// Address, HTTP port, HTTPS port, weight, enabled, line.
    servers: Vec<(IpAddr, u16, u16, u32, bool, usize)>,
    health: Option<(String, Duration, Duration, Option<String>, usize)>,
    selection: Selection,
    sticky: Sticky,
}

/// Translates an `applicationHost.config`.
pub(crate) fn translate(text: &str, r: &mut Report) -> Result<Plan, Fail> {
    let doc = match Document::parse(text) {
        Ok(d) => d,
        Err(e) => return fail(e.pos().row as usize, format!("XML: {e}")),
    };
    let root = doc.root_element();
    if !root.has_tag_name("configuration") {
        return fail(line(&doc, root), "the root element is not <configuration>");
    }
    let mut plan = Plan::default();
    let mut names = HashSet::new();
    let mut farms: Vec<Farm> = Vec::new();
    for wf in root.descendants().filter(|n| n.has_tag_name("webFarm")) {
        farms.push(farm(&doc, wf, r)?);
    }
    let farm_index: HashMap<String, usize> = farms
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name.to_ascii_lowercase(), i))
        .collect();

    // Rules first: they decide each farm's scheme (the action URL) and the routes.
    let mut routes: Vec<(Route, usize, usize)> = Vec::new();
    let mut schemes: HashMap<usize, bool> = HashMap::new();
    let mut redirect_rule = false;
    for rule in root.descendants().filter(|n| n.has_tag_name("rule")) {
        let l = line(&doc, rule);
        let rname = rule.attribute("name").unwrap_or("rule");
        let subject = format!("rewrite rule \"{rname}\"");
        if !bool_attr(&doc, rule, "enabled", true)? {
            r.skip(l, subject, "disabled: left out");
            continue;
        }
        let Some(action) = child(rule, "action") else {
            return fail(l, format!("{subject}: no <action>"));
        };
        let ty = action.attribute("type").unwrap_or("None");
        let url = action.attribute("url").unwrap_or("");
        if ty.eq_ignore_ascii_case("Redirect") && url.to_ascii_lowercase().starts_with("https://") {
            redirect_rule = true;
            r.ok(
                l,
                subject,
                "redirect to HTTPS: the http bindings become [[l7.redirect]]",
            );
            continue;
        }
        if !ty.eq_ignore_ascii_case("Rewrite") {
            r.skip(
                l,
                subject,
                format!("action type {ty}: only rewrites to a web farm are translated"),
            );
            continue;
        }
        let (https, host) = match url.split_once("://") {
            Some((s, rest)) => (
                s.eq_ignore_ascii_case("https"),
                rest.split(['/', ':']).next().unwrap_or(""),
            ),
            None => (false, ""),
        };
        let Some(&fi) = farm_index.get(&host.to_ascii_lowercase()) else {
            r.skip(l, subject, "rewrites to something other than a web farm");
            continue;
        };
        if let Some(prev) = schemes.insert(fi, https)
            && prev != https
        {
            r.approx(
                l,
                &subject,
                "the farm is reached over http and https by different rules: https is used",
            );
            schemes.insert(fi, true);
        }
        let Some(m) = child(rule, "match") else {
            return fail(l, format!("{subject}: no <match>"));
        };
        let syntax = rule.attribute("patternSyntax").unwrap_or("ECMAScript");
        let mut notes = Vec::new();
        if bool_attr(&doc, m, "negate", false)? {
            r.skip(l, subject, "negated match: not translated");
            continue;
        }
        let (prefix, exact) = path_prefix(m.attribute("url").unwrap_or("*"), syntax);
        if !exact {
            notes.push(format!(
                "url pattern \"{}\" read as path prefix {prefix}",
                m.attribute("url").unwrap_or("")
            ));
        }
        let mut hosts = Vec::new();
        if let Some(conds) = child(rule, "conditions") {
            for c in children(conds, "add") {
                let input = c.attribute("input").unwrap_or("");
                let pat = c.attribute("pattern").unwrap_or("");
                if input.eq_ignore_ascii_case("{HTTP_HOST}")
                    && !bool_attr(&doc, c, "negate", false)?
                {
                    match host_pattern(pat, syntax) {
                        Some(h) => hosts.push(h),
                        None => notes.push(format!(
                            "host pattern \"{pat}\" is not a name: the route matches any host"
                        )),
                    }
                } else {
                    notes.push(format!("condition on {input} not translated"));
                }
            }
        }
        if hosts.len() > 1 {
            notes.push("several host conditions: one route per host".into());
        }
        if hosts.is_empty() {
            hosts.push(String::new());
        }
        let pool = clean_name(&farms[fi].name);
        for h in hosts {
            let name = unique(clean_name(rname), &mut names);
            routes.push((
                Route {
                    name,
                    source: format!("{subject} (line {l})"),
                    host: (!h.is_empty()).then_some(h),
                    path_prefix: prefix.clone(),
                    listeners: Vec::new(),
                    pool: pool.clone(),
                },
                l,
                fi,
            ));
        }
        r.add(
            l,
            if notes.is_empty() {
                Outcome::Translated
            } else {
                Outcome::Approximated
            },
            subject,
            if notes.is_empty() {
                format!("route {prefix} to pool {pool}")
            } else {
                format!("route {prefix} to pool {pool}: {}", notes.join("; "))
            },
        );
    }
    if routes.len() > 1 {
        r.approx(routes[0].1, "rewrite rules", "IIS applies rules in file order; the balancer picks the most specific route (host, then longest prefix)");
    }

    for (i, f) in farms.iter().enumerate() {
        let https = schemes.get(&i).copied().unwrap_or(false);
        let subject = format!("webFarm \"{}\"", f.name);
        if !schemes.contains_key(&i) {
            r.approx(
                f.line,
                &subject,
                "no rewrite rule routes to it: pool written without a route",
            );
        }
        let pname = clean_name(&f.name);
        names.insert(pname.clone());
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for (ip, hp, sp, w, enabled, sl) in &f.servers {
            let a = SocketAddr::new(*ip, if https { *sp } else { *hp });
            if !seen.insert(a) {
                return fail(*sl, format!("{subject}: server {a} is listed twice"));
            }
            if !enabled {
                r.approx(
                    *sl,
                    format!("{subject} server {ip}"),
                    "disabled: kept with weight 0 (no new requests)",
                );
            }
            backends.push((a, if *enabled { *w } else { 0 }));
        }
        if backends.is_empty() {
            r.skip(f.line, subject, "no server");
            continue;
        }
        let health = match &f.health {
            None => None,
            Some((url, interval, timeout, matchs, hl)) => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
                let path = rest
                    .find('/')
                    .map_or("/".to_string(), |i| rest[i..].to_string());
                let Some(path) = crate::monitor::valid_path(&path) else {
                    return fail(
                        *hl,
                        format!("{subject}: healthCheck url path \"{path}\" is not a plain path"),
                    );
                };
                let mut notes = vec![];
                let mut t = *timeout;
                if t >= *interval {
                    t = *interval / 2;
                    notes.push(format!(
                        "timeout not below the interval: {}ms",
                        t.as_millis()
                    ));
                }
                let h = HttpCheck {
                    path,
                    expect_status: vec![200],
                    body_contains: matchs.clone(),
                    host: None,
                };
                let tls = scheme.eq_ignore_ascii_case("https");
                if tls {
                    notes.push(format!(
                        "the certificate is verified against {}",
                        crate::model::BACKEND_CA
                    ));
                }
                notes.push("ARR marks a server unhealthy on one failure: fall 1, rise 1".into());
                r.add(
                    *hl,
                    if notes.len() > 1 {
                        Outcome::Approximated
                    } else {
                        Outcome::Translated
                    },
                    format!("{subject} healthCheck"),
                    notes.join("; "),
                );
                Some(Check {
                    kind: if tls {
                        CheckKind::Https(h)
                    } else {
                        CheckKind::Http(h)
                    },
                    interval: *interval,
                    timeout: t,
                    rise: 1,
                    fall: 1,
                    port: None,
                })
            }
        };
        r.ok(
            f.line,
            &subject,
            format!(
                "[[l7.pool]] {pname}, {} servers, {}",
                backends.len(),
                if https { "https" } else { "http" }
            ),
        );
        plan.pools.push(Pool {
            name: pname,
            source: format!("{subject} (line {})", f.line),
            https,
            selection: f.selection,
            sticky: f.sticky.clone(),
            health,
            backends,
        });
    }

    // Site bindings: https → listeners (one per address, a certificate per host name).
    let mut listeners: Vec<(SocketAddr, Listener)> = Vec::new();
    let mut redirects: HashSet<SocketAddr> = HashSet::new();
    for site in root.descendants().filter(|n| n.has_tag_name("site")) {
        let sname = site.attribute("name").unwrap_or("site");
        let Some(b) = child(site, "bindings") else {
            continue;
        };
        for binding in children(b, "binding") {
            let bl = line(&doc, binding);
            let proto = binding.attribute("protocol").unwrap_or("");
            let info = binding.attribute("bindingInformation").unwrap_or("");
            let subject = format!("site \"{sname}\" binding {proto} {info}");
            let mut parts = info.rsplitn(3, ':');
            let (host, port, ip) = (parts.next().unwrap_or(""), parts.next(), parts.next());
            let (Some(port), Some(ip)) = (port, ip) else {
                if proto.eq_ignore_ascii_case("http") || proto.eq_ignore_ascii_case("https") {
                    return fail(
                        bl,
                        format!("{subject}: bindingInformation is not ip:port:host"),
                    );
                }
                r.skip(bl, subject, "not an HTTP binding");
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                return fail(bl, format!("{subject}: port '{port}' is not a number"));
            };
            let ip: IpAddr = if ip == "*" || ip.is_empty() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                match ip.trim_matches(['[', ']']).parse() {
                    Ok(ip) => ip,
                    Err(_) => return fail(bl, format!("{subject}: '{ip}' is not an IP address")),
                }
            };
            let addr = SocketAddr::new(ip, port);
            if proto.eq_ignore_ascii_case("https") {
                let base = if host.is_empty() {
                    clean_name(sname)
                } else {
                    clean_name(host)
                };
                let cert = Certificate {
                    cert: format!("{TLS_DIR}/{base}.pem"),
                    key: format!("{TLS_DIR}/{base}.key"),
                    server_names: if host.is_empty() {
                        Vec::new()
                    } else {
                        vec![host.to_ascii_lowercase()]
                    },
                };
                r.approx(bl, &subject, format!("IIS keeps certificates in the Windows store: export the one bound here to {} and {} (PEM){}", cert.cert, cert.key, if ip.is_unspecified() { "; all addresses (*) → 0.0.0.0" } else { "" }));
                match listeners.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, l)) => {
                        if !l.certificates.iter().any(|c| c.cert == cert.cert) {
                            l.certificates.push(cert);
                        }
                    }
                    None => {
                        let name = unique(clean_name(&format!("{sname}-{port}")), &mut names);
                        listeners.push((
                            addr,
                            Listener {
                                name,
                                source: format!("{subject} (line {bl})"),
                                address: addr,
                                certificates: vec![cert],
                            },
                        ));
                    }
                }
            } else if proto.eq_ignore_ascii_case("http") {
                if redirects.insert(addr) {
                    plan.redirects.push(Redirect {
                        source: format!("{subject} (line {bl})"),
                        address: addr,
                        https_port: 443,
                    });
                }
                if redirect_rule {
                    r.ok(
                        bl,
                        subject,
                        "[[l7.redirect]] to HTTPS (the site's redirect rule)",
                    );
                } else {
                    r.approx(bl, subject, "plain HTTP is answered with a redirect to HTTPS: the balancer proxies HTTP over TLS only");
                }
            } else {
                r.skip(bl, subject, "not an HTTP binding");
            }
        }
    }
    if listeners.is_empty() && !routes.is_empty() {
        r.skip(
            routes[0].1,
            "rewrite rules",
            "no https site binding: the routes have no listener (add one)",
        );
    }
    plan.listeners = listeners.into_iter().map(|x| x.1).collect();
    plan.routes = routes.into_iter().map(|x| x.0).collect();
    Ok(plan)
}

fn farm(doc: &Document, wf: Node, r: &mut Report) -> Result<Farm, Fail> {
    let l = line(doc, wf);
    let Some(name) = wf.attribute("name").filter(|n| !n.is_empty()) else {
        return fail(l, "<webFarm> without a name");
    };
    let subject = format!("webFarm \"{name}\"");
    let mut servers = Vec::new();
    for s in children(wf, "server") {
        let sl = line(doc, s);
        let Some(a) = s.attribute("address") else {
            return fail(sl, format!("{subject}: <server> without an address"));
        };
        let Ok(ip) = a.parse::<IpAddr>() else {
            r.skip(
                sl,
                format!("{subject} server {a}"),
                "a server by host name: the balancer needs addresses",
            );
            continue;
        };
        let arr = child(s, "applicationRequestRouting");
        let (hp, sp, w) = match arr {
            Some(x) => (
                num_attr(doc, x, "httpPort", 80)?,
                num_attr(doc, x, "httpsPort", 443)?,
                num_attr(doc, x, "weight", 100)?,
            ),
            None => (80, 443, 100),
        };
        let (Ok(hp), Ok(sp)) = (u16::try_from(hp), u16::try_from(sp)) else {
            return fail(sl, format!("{subject} server {a}: port out of range"));
        };
        if hp == 0 || sp == 0 || w > 65535 {
            return fail(
                sl,
                format!("{subject} server {a}: port 0 or weight above 65535"),
            );
        }
        servers.push((ip, hp, sp, w, bool_attr(doc, s, "enabled", true)?, sl));
    }
    let arr = child(wf, "applicationRequestRouting");
    let mut health = None;
    let mut selection = Selection::RoundRobin;
    let mut sticky = Sticky::None;
    if let Some(arr) = arr {
        if let Some(h) = child(arr, "healthCheck")
            && let Some(url) = h.attribute("url").filter(|u| !u.is_empty())
        {
            let hl = line(doc, h);
            let ts = |k: &str, d: u64| match h.attribute(k) {
                None => Ok(Duration::from_secs(d)),
                Some(v) => timespan(v).filter(|d| !d.is_zero()).map_or_else(
                    || {
                        fail(
                            hl,
                            format!(
                                "{subject} healthCheck {k}=\"{v}\" is not a duration (hh:mm:ss)"
                            ),
                        )
                    },
                    Ok,
                ),
            };
            let matchs = h
                .attribute("responseMatch")
                .filter(|m| !m.is_empty())
                .map(str::to_string);
            health = Some((
                url.to_string(),
                ts("interval", 30)?,
                ts("timeout", 30)?,
                matchs,
                hl,
            ));
        }
        if let Some(lb) = child(arr, "loadBalancing") {
            let ll = line(doc, lb);
            let alg = lb.attribute("algorithm").unwrap_or("WeightedRoundRobin");
            selection = match alg {
                "WeightedRoundRobin" => Selection::RoundRobin,
                "LeastRequests" => {
                    r.ok(
                        ll,
                        format!("{subject} loadBalancing"),
                        "LeastRequests: least_outstanding",
                    );
                    Selection::LeastOutstanding
                }
                "LeastResponseTime" => {
                    r.approx(
                        ll,
                        format!("{subject} loadBalancing"),
                        "LeastResponseTime: least_outstanding (requests in flight)",
                    );
                    Selection::LeastOutstanding
                }
                other => {
                    r.approx(
                        ll,
                        format!("{subject} loadBalancing"),
                        format!("{other}: weighted round_robin"),
                    );
                    Selection::RoundRobin
                }
            };
        }
        if let Some(af) = child(arr, "affinity")
            && bool_attr(doc, af, "useCookie", false)?
        {
            let al = line(doc, af);
            let cookie = af.attribute("cookieName").unwrap_or("ARRAffinity");
            if !cookie.is_empty()
                && cookie
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                sticky = Sticky::Cookie(Some(cookie.to_string()));
                r.ok(
                    al,
                    format!("{subject} affinity"),
                    format!("cookie affinity: sticky = \"cookie\", sticky_cookie = {cookie}"),
                );
            } else {
                sticky = Sticky::Cookie(None);
                r.approx(al, format!("{subject} affinity"), "cookie name has characters the balancer refuses: the default cookie name is used");
            }
        }
    }
    Ok(Farm {
        name: name.to_string(),
        line: l,
        servers,
        health,
        selection,
        sticky,
    })
}

/// A match-url pattern (IIS writes it without the leading `/`) → a path prefix, and
/// whether that is exact.
fn path_prefix(pat: &str, syntax: &str) -> (String, bool) {
    let wildcard = syntax.eq_ignore_ascii_case("Wildcard");
    let p = pat.trim_start_matches('^').trim_start_matches('/');
    // In a regular expression `.` is any character and `\.` a dot.
    let mut lit = String::new();
    let mut used = 0;
    let b = p.as_bytes();
    while used < b.len() {
        let c = b[used] as char;
        if c.is_ascii_alphanumeric() || "-_/~".contains(c) || (wildcard && c == '.') {
            lit.push(c);
            used += 1;
        } else if !wildcard && c == '\\' && b.get(used + 1) == Some(&b'.') {
            lit.push('.');
            used += 2;
        } else {
            break;
        }
    }
    let rest = &p[used..];
    let exact_rest: &[&str] = if wildcard {
        &["", "*", "/*"]
    } else {
        &[
            ".*", "(.*)", "/(.*)", "/.*", "$", "/?$", "/?(.*)", "(/.*)?", "(/.*)?$", "/?(.*)$", "",
        ]
    };
    let base = lit.trim_end_matches('/');
    let prefix = format!("/{base}");
    // ExactMatch names one URL: a prefix also matches what is below it.
    let exact = !syntax.eq_ignore_ascii_case("ExactMatch") && exact_rest.contains(&rest);
    (prefix, exact)
}

/// A host condition pattern → a host name the balancer matches, if it is one.
fn host_pattern(pat: &str, syntax: &str) -> Option<String> {
    let h = if syntax.eq_ignore_ascii_case("Wildcard") {
        pat.to_string()
    } else {
        pat.trim_start_matches('^')
            .trim_end_matches('$')
            .replace("\\.", ".")
    };
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    (!bare.is_empty()
        && bare
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    .then(|| h.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn timespans() {
        assert_eq!(timespan("00:00:30"), Some(Duration::from_secs(30)));
        assert_eq!(timespan("00:00:00.500"), Some(Duration::from_millis(500)));
        assert_eq!(timespan("1.00:00:01"), Some(Duration::from_secs(86401)));
        assert_eq!(timespan("30s"), None);
    }

    #[test]
    fn patterns() {
        assert_eq!(path_prefix("ws/*", "Wildcard"), ("/ws".into(), true));
        assert_eq!(path_prefix("*", "Wildcard"), ("/".into(), true));
        assert_eq!(path_prefix("^ws/(.*)", "ECMAScript"), ("/ws".into(), true));
        assert_eq!(path_prefix(".*", "ECMAScript"), ("/".into(), true));
        assert_eq!(
            path_prefix("^(ws|api)/(.*)", "ECMAScript"),
            ("/".into(), false)
        );
        assert_eq!(path_prefix("ws", "ExactMatch"), ("/ws".into(), false));
        assert_eq!(
            host_pattern("^lb\\.example\\.org$", "ECMAScript"),
            Some("lb.example.org".into())
        );
        assert_eq!(host_pattern("^(www\\.)?example\\.org$", "ECMAScript"), None);
    }
}
