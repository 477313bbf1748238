//! Server-rendered HTML. Everything from the controller is escaped; no inline script or style
//! (the CSP forbids both): behaviour is in `static/console.js`, looks in `static/console.css`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::auth::Session;
use crate::events::{Event, EventKind, Utc};
use crate::history::{Sample, growth, rates};
use crate::server::Shared;
use crate::source::{
    Action, AdminState, BackendView, DataplaneState, Health, ServiceView, SourceError,
    StatusSnapshot,
};
use crate::tls::cert_info;
use crate::users::Role;

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encodes a query value.
fn q(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn layout(
    session: Option<&Session>,
    title: &str,
    nav: &str,
    live: Option<Duration>,
    main: &str,
) -> String {
    let mut h = String::with_capacity(main.len() + 2048);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{} · balancer</title><link rel=\"stylesheet\" href=\"/static/console.css\">\
<script src=\"/static/console.js\" defer></script></head><body>",
        esc(title)
    );
    h.push_str("<header><a class=\"brand\" href=\"/\">balancer</a><nav>");
    if let Some(s) = session {
        for (href, name) in [("/", "Overview"), ("/l7", "L7"), ("/events", "Events")] {
            let cls = if name == nav { " class=\"here\"" } else { "" };
            let _ = write!(h, "<a href=\"{href}\"{cls}>{name}</a>");
        }
        let _ = write!(
            h,
            "</nav><div class=\"who\"><span id=\"user\">{}</span> <span class=\"role\">{}</span>\
<form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button id=\"signout\" type=\"submit\">Sign out</button></form></div>",
            esc(&s.user),
            s.role,
            esc(&s.csrf)
        );
    } else {
        h.push_str("</nav>");
    }
    h.push_str("</header>");
    match live {
        Some(every) => {
            let _ = write!(
                h,
                "<main id=\"live\" data-refresh-ms=\"{}\">",
                every.as_millis()
            );
        }
        None => h.push_str("<main>"),
    }
    h.push_str(main);
    h.push_str("</main></body></html>");
    h
}

fn live_page<S>(
    shared: &Shared<S>,
    s: &Session,
    title: &str,
    nav: &str,
    frag: bool,
    main: String,
) -> String {
    if frag {
        main
    } else {
        layout(
            Some(s),
            title,
            nav,
            Some(shared.cfg.refresh_interval),
            &main,
        )
    }
}

/// The sign-in page.
pub fn login(signed_out: bool, error: Option<&str>) -> String {
    let mut m = String::from("<section class=\"login\"><h1>Sign in</h1>");
    if signed_out {
        m.push_str("<p class=\"note\" id=\"signed-out\">Signed out.</p>");
    }
    if let Some(e) = error {
        let _ = write!(m, "<p class=\"error\" id=\"login-error\">{}</p>", esc(e));
    }
    m.push_str(
        "<form method=\"post\" action=\"/login\">\
<label>User <input id=\"login-user\" name=\"user\" autocomplete=\"username\" required autofocus></label>\
<label>Password <input id=\"login-password\" name=\"password\" type=\"password\" \
autocomplete=\"current-password\" required></label>\
<button id=\"login-submit\" type=\"submit\">Sign in</button></form></section>",
    );
    layout(None, "Sign in", "", None, &m)
}

/// A short page with a title and one message.
pub fn message(session: Option<&Session>, title: &str, text: &str) -> String {
    let m = format!(
        "<h1>{}</h1><p class=\"message\">{}</p>",
        esc(title),
        esc(text)
    );
    layout(session, title, "", None, &m)
}

fn human_bytes(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn uptime(secs: u64) -> String {
    match secs {
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Rate over the last two samples.
fn now_rate(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> f64 {
    rates(&samples[samples.len().saturating_sub(2)..], f)
        .last()
        .map_or(0.0, |r| r.1)
}

/// A small line chart of per-second rates over the last hour, as inline SVG.
fn chart(
    points: &[(u64, f64)],
    w: u32,
    h: u32,
    label: &str,
    unit: impl Fn(f64) -> String,
) -> String {
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let mut s = format!(
        "<svg class=\"chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
aria-label=\"{l}\"><title>{l}: peak {p}/s over the last hour</title>\
<rect class=\"bg\" x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\"/>",
        l = esc(label),
        p = esc(&unit(max)),
    );
    if let (Some(first), Some(last)) = (points.first(), points.last())
        && points.len() >= 2
    {
        let span = last.0.saturating_sub(first.0).max(1) as f64;
        let (wf, hf) = (f64::from(w), f64::from(h) - 2.0);
        let mut pts = String::new();
        for (t, v) in points {
            let x = (t - first.0) as f64 / span * wf;
            let y = if max > 0.0 {
                hf - v / max * (hf - 2.0) + 1.0
            } else {
                hf
            };
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let _ = write!(
            s,
            "<polyline class=\"line\" points=\"{}\"/>",
            pts.trim_end()
        );
    }
    let _ = write!(
        s,
        "<text class=\"peak\" x=\"2\" y=\"10\">{}/s</text></svg>",
        esc(&unit(max))
    );
    s
}

fn count(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn health_cls(b: &BackendView) -> &'static str {
    match (b.admin, b.health, b.state) {
        (AdminState::Disabled, _, _) => "disabled",
        (AdminState::Drain, _, _) | (_, _, DataplaneState::Draining) => "drain",
        (_, Health::Down, _) | (_, _, DataplaneState::Down) => "down",
        (_, Health::Up, _) => "up",
        _ => "unchecked",
    }
}

fn dot(b: &BackendView) -> String {
    format!(
        "<span class=\"dot {}\" title=\"{} admin {} health {} dataplane {}\"></span>",
        health_cls(b),
        b.address,
        b.admin,
        b.health,
        b.state
    )
}

/// The overview: every service.
pub fn overview<S>(
    shared: &Shared<S>,
    session: &Session,
    s: &StatusSnapshot,
    frag: bool,
) -> String {
    let hist = crate::server::history_of(shared);
    let mut m = String::from("<h1>Services</h1>");
    if session.role == Role::Operator {
        m.push_str("<p class=\"tools\"><a class=\"act reload\" id=\"reload\" href=\"/confirm?verb=reload\">Reload config</a></p>");
    }
    let _ = write!(
        m,
        "<p class=\"summary\">{} services · up {} · {} flows · {} reloads ({} refused) · {} failovers</p>",
        s.services.len(),
        uptime(s.uptime_secs),
        s.flows,
        s.reloads,
        s.config_errors,
        s.failovers
    );
    m.push_str(
        "<table id=\"services\"><thead><tr><th>Service</th><th>VIP</th><th>Scheduler</th>\
<th>Backends</th><th>Active</th><th>Packets/s</th><th>Bytes/s</th><th>New flows/s</th>\
<th>Last hour</th></tr></thead><tbody>",
    );
    for svc in &s.services {
        let samples = hist.service(&svc.name);
        let now = hist.service_now(&svc.name);
        let up = svc
            .backends
            .iter()
            .filter(|b| health_cls(b) == "up" || health_cls(b) == "unchecked")
            .count();
        let _ = write!(
            m,
            "<tr data-service=\"{n}\"><td><a href=\"/service?name={qn}\">{n}</a></td><td>{vip} {p}/{f}</td>\
<td>{sch}</td><td>{dots} <span class=\"count\">{up}/{total}</span></td><td>{act}</td>\
<td>{pps}</td><td>{bps}</td><td>{fps}</td><td>{chart}</td></tr>",
            n = esc(&svc.name),
            qn = esc(&q(&svc.name)),
            vip = svc.vip,
            p = esc(&svc.protocol),
            f = esc(&svc.forwarding),
            sch = esc(&svc.scheduler),
            dots = svc.backends.iter().map(dot).collect::<String>(),
            total = svc.backends.len(),
            act = svc.active.map_or(String::from("–"), |a| format!(
                "<span class=\"active\">{a}</span>"
            )),
            pps = count(now_rate(&now, |t| t.packets)),
            bps = human_bytes(now_rate(&now, |t| t.bytes)),
            fps = count(now_rate(&now, |t| t.new_flows)),
            chart = chart(
                &rates(&samples, |t| t.bytes),
                120,
                24,
                "bytes/s",
                human_bytes
            ),
        );
    }
    m.push_str("</tbody></table>");
    live_page(shared, session, "Overview", "Overview", frag, m)
}

fn action_link(svc: &str, b: SocketAddr, verb: &str) -> String {
    format!(
        "<a class=\"act {verb}\" id=\"{verb}-{id}\" href=\"/confirm?verb={verb}&amp;service={s}&amp;backend={b}\">{verb}</a>",
        id = esc(&b.to_string().replace([':', '.', '[', ']'], "-")),
        s = esc(&q(svc)),
        b = esc(&q(&b.to_string())),
    )
}

/// A service's page: backends, charts, health history.
pub fn service<S>(
    shared: &Shared<S>,
    session: &Session,
    _s: &StatusSnapshot,
    svc: &ServiceView,
    frag: bool,
) -> String {
    let hist = crate::server::history_of(shared);
    let mut m = format!("<h1>{}</h1>", esc(&svc.name));
    let _ = write!(
        m,
        "<p class=\"summary\">VIP {} {}/{} · scheduler {} · health check {}{}</p>",
        svc.vip,
        esc(&svc.protocol),
        esc(&svc.forwarding),
        esc(&svc.scheduler),
        esc(svc.health_check.as_deref().unwrap_or("none")),
        svc.active.map_or(String::new(), |a| format!(
            " · active <span class=\"active\">{a}</span>"
        )),
    );
    let samples = hist.service(&svc.name);
    let _ = write!(
        m,
        "<div class=\"charts\"><figure>{}<figcaption>new flows/s, last hour</figcaption></figure>\
<figure>{}<figcaption>bytes/s, last hour</figcaption></figure></div>",
        chart(
            &rates(&samples, |t| t.new_flows),
            420,
            80,
            "new flows/s",
            count
        ),
        chart(
            &rates(&samples, |t| t.bytes),
            420,
            80,
            "bytes/s",
            human_bytes
        ),
    );
    m.push_str(
        "<table id=\"backends\"><thead><tr><th>Backend</th><th>Weight</th><th>Priority</th><th>Admin</th>\
<th>Health</th><th>Dataplane</th><th>Check</th><th>New flows/s</th><th>Bytes/s</th><th></th></tr></thead><tbody>",
    );
    for b in &svc.backends {
        let bs = hist.backend(&svc.name, b.address);
        let mut acts = String::new();
        if session.role == Role::Operator {
            if b.admin != AdminState::Drain {
                acts.push_str(&action_link(&svc.name, b.address, "drain"));
            }
            if b.admin != AdminState::Disabled {
                acts.push_str(&action_link(&svc.name, b.address, "disable"));
            }
            if b.admin != AdminState::Up {
                acts.push_str(&action_link(&svc.name, b.address, "enable"));
            }
        }
        let _ = write!(
            m,
            "<tr data-backend=\"{a}\"><td>{dot} {a}{act}</td><td>{w}</td><td>{p}</td>\
<td class=\"admin {adm}\">{adm}</td><td class=\"health {h}\">{h}</td><td class=\"state {st}\">{st}</td>\
<td>{lat}</td><td>{fl}</td><td>{by}</td><td class=\"acts\">{acts}</td></tr>",
            a = b.address,
            dot = dot(b),
            act = if b.active {
                " <span class=\"active\">active</span>"
            } else {
                ""
            },
            w = b.weight,
            p = b.priority,
            adm = b.admin,
            h = b.health,
            st = b.state,
            lat = b
                .check_latency_ms
                .map_or("–".to_string(), |l| format!("{l:.1} ms")),
            fl = chart(&rates(&bs, |t| t.new_flows), 110, 22, "new flows/s", count),
            by = chart(&rates(&bs, |t| t.bytes), 110, 22, "bytes/s", human_bytes),
        );
    }
    m.push_str("</tbody></table><h2>Health changes</h2>");
    let prefix = format!("{} ", svc.name);
    let prefix2 = format!("{}: ", svc.name);
    let ev = shared.events.recent(50, |e| {
        matches!(
            e.kind,
            EventKind::Health | EventKind::Failover | EventKind::Action
        ) && (e.what.starts_with(&prefix)
            || e.what.starts_with(&prefix2)
            || e.what.contains(&format!(" {prefix}")))
    });
    m.push_str(&event_table(&ev, "service-events"));
    live_page(shared, session, &svc.name, "Overview", frag, m)
}

fn event_table(ev: &[Event], id: &str) -> String {
    if ev.is_empty() {
        return "<p class=\"note\">None yet.</p>".to_string();
    }
    let mut m = format!(
        "<table id=\"{id}\"><thead><tr><th>When (UTC)</th><th>Kind</th><th>Who</th><th>From</th>\
<th>What</th><th>Result</th></tr></thead><tbody>"
    );
    for e in ev {
        let _ = write!(
            m,
            "<tr class=\"ev {k}\"><td>{t}</td><td>{k}</td><td>{w}</td><td>{f}</td><td>{what}</td><td>{r}</td></tr>",
            t = Utc(e.at),
            k = e.kind.as_str(),
            w = esc(&e.who),
            f = esc(&e.from),
            what = esc(&e.what),
            r = esc(&e.result),
        );
    }
    m.push_str("</tbody></table>");
    m
}

/// The events page, optionally of one kind.
pub fn events<S>(shared: &Shared<S>, session: &Session, kind: Option<&str>, frag: bool) -> String {
    let mut m = String::from("<h1>Events</h1><p class=\"filters\">");
    let kinds = [
        EventKind::Health,
        EventKind::Failover,
        EventKind::Reload,
        EventKind::Action,
        EventKind::SignIn,
    ];
    let _ = write!(
        m,
        "<a href=\"/events\"{}>all</a>",
        if kind.is_none() {
            " class=\"here\""
        } else {
            ""
        }
    );
    for k in kinds {
        let here = if kind == Some(k.as_str()) {
            " class=\"here\""
        } else {
            ""
        };
        let _ = write!(m, " <a href=\"/events?kind={0}\"{here}>{0}</a>", k.as_str());
    }
    m.push_str("</p>");
    let ev = shared
        .events
        .recent(500, |e| kind.is_none_or(|k| e.kind.as_str() == k));
    m.push_str(&event_table(&ev, "events"));
    live_page(shared, session, "Events", "Events", frag, m)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Listeners with their certificates, routes, pools.
pub fn l7(session: &Session, s: &StatusSnapshot, frag: bool) -> String {
    let mut m = String::from("<h1>Layer 7</h1>");
    let Some(l7) = &s.l7 else {
        m.push_str("<p class=\"note\">No [l7] section is configured.</p>");
        return if frag {
            m
        } else {
            layout(Some(session), "L7", "L7", None, &m)
        };
    };
    let _ = write!(
        m,
        "<p class=\"summary\">{} client connections open</p>",
        l7.open_connections
    );
    m.push_str(
        "<h2>Listeners and certificates</h2><table id=\"certs\"><thead><tr><th>Listener</th>\
<th>Address</th><th>Certificate</th><th>Subject</th><th>Names</th><th>Expires (UTC)</th></tr></thead><tbody>",
    );
    let now = now_secs();
    for l in &l7.listeners {
        for c in &l.certificates {
            let (subject, names, expiry) = match cert_info(&c.path) {
                Ok(i) => {
                    let days = (i.not_after - now).div_euclid(86400);
                    let (cls, note) = match days {
                        d if d < 0 => ("expired", "expired".to_string()),
                        d if d < 30 => ("warn", format!("{d} days left")),
                        d => ("ok", format!("{d} days left")),
                    };
                    (
                        esc(&i.subject),
                        esc(&i.names.join(", ")),
                        format!(
                            "<span class=\"expiry {cls}\">{} ({note})</span>",
                            Utc(u64::try_from(i.not_after).unwrap_or(0))
                        ),
                    )
                }
                Err(e) => (
                    String::new(),
                    String::new(),
                    format!(
                        "<span class=\"expiry expired\">{}</span>",
                        esc(&e.to_string())
                    ),
                ),
            };
            let _ = write!(
                m,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{subject}</td><td>{names}</td><td>{expiry}</td></tr>",
                esc(&l.name),
                l.address,
                esc(&c.path.display().to_string()),
            );
        }
    }
    m.push_str("</tbody></table><h2>Routes</h2><table id=\"routes\"><thead><tr><th>Route</th><th>Host</th>\
<th>Path prefix</th><th>Listeners</th><th>Pool</th><th>2xx</th><th>4xx</th><th>5xx</th></tr></thead><tbody>");
    for r in &l7.routes {
        let _ = write!(
            m,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(r.host.as_deref().unwrap_or("*")),
            esc(&r.path_prefix),
            esc(&if r.listeners.is_empty() {
                "all".to_string()
            } else {
                r.listeners.join(", ")
            }),
            esc(&r.pool),
            r.status_classes[1],
            r.status_classes[3],
            r.status_classes[4],
        );
    }
    m.push_str(
        "</tbody></table><h2>Pools</h2><table id=\"pools\"><thead><tr><th>Pool</th><th>Member</th>\
<th>Health</th><th>Check</th><th>Requests</th><th>Connect failures</th></tr></thead><tbody>",
    );
    for p in &l7.pools {
        for b in &p.members {
            let _ = write!(
                m,
                "<tr><td>{}</td><td>{}</td><td class=\"health {h}\">{h}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&p.name),
                b.address,
                b.check_latency_ms
                    .map_or("–".to_string(), |l| format!("{l:.1} ms")),
                b.requests,
                b.connect_failures,
                h = b.health,
            );
        }
    }
    m.push_str("</tbody></table>");
    if frag {
        m
    } else {
        layout(Some(session), "L7", "L7", None, &m)
    }
}

/// What an action will do, and the form that does it.
pub fn confirm<S>(shared: &Shared<S>, session: &Session, s: &StatusSnapshot, a: &Action) -> String {
    let mut m = format!("<h1>Confirm: {}</h1>", esc(&a.to_string()));
    let what = match a.target() {
        Some((svc, addr)) => {
            let Some(b) = s
                .service(svc)
                .and_then(|v| v.backends.iter().find(|b| b.address == addr))
            else {
                return message(Some(session), "No such backend", &a.to_string());
            };
            let hist = crate::server::history_of(shared);
            let samples = hist.backend(svc, addr);
            let recent = growth(&samples, Duration::from_secs(300), |t| t.new_flows);
            let others = s.service(svc).map_or(0, |v| {
                v.backends
                    .iter()
                    .filter(|o| o.address != addr && o.admin == AdminState::Up)
                    .count()
            });
            match a {
                Action::Drain { .. } => format!(
                    "No new flows go to {addr}; its {} established flow(s) stay on it until they end \
({recent} new flows were sent to it in the last 5 minutes). New flows of {svc} go to its \
{others} other backend(s) in service. It is now admin {}, health {}.",
                    b.flows, b.admin, b.health
                ),
                Action::Disable { .. } => format!(
                    "{addr} goes out of service: its {} established flow(s) are reset at once and it gets \
no new ones ({recent} new flows were sent to it in the last 5 minutes). {others} other backend(s) of {svc} stay in service.",
                    b.flows
                ),
                _ => format!(
                    "{addr} goes back in service: it gets new flows of {svc} again as soon as its health \
check passes (health now: {}).",
                    b.health
                ),
            }
        }
        None => format!(
            "The config file {} is read again. If it has errors it is refused, the errors are shown \
and the running config keeps serving; if it is valid it takes over without dropping established flows.",
            s.config
        ),
    };
    let _ = write!(m, "<p class=\"message\" id=\"what\">{}</p>", esc(&what));
    let (service, backend) = a.target().map_or((String::new(), String::new()), |(s, b)| {
        (s.to_string(), b.to_string())
    });
    let back = if service.is_empty() {
        "/".to_string()
    } else {
        format!("/service?name={}", q(&service))
    };
    let _ = write!(
        m,
        "<form method=\"post\" action=\"/action\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<input type=\"hidden\" name=\"verb\" value=\"{}\"><input type=\"hidden\" name=\"service\" value=\"{}\">\
<input type=\"hidden\" name=\"backend\" value=\"{}\"><button id=\"confirm\" class=\"danger\" type=\"submit\">{}</button> \
<a href=\"{}\">Cancel</a></form>",
        esc(&session.csrf),
        a.verb(),
        esc(&service),
        esc(&backend),
        esc(&a.to_string()),
        esc(&back)
    );
    layout(Some(session), "Confirm", "", None, &m)
}

/// The outcome of an action.
pub fn done(session: &Session, a: &Action, r: &Result<String, SourceError>) -> String {
    let mut m = String::new();
    match r {
        Ok(summary) => {
            let _ = write!(
                m,
                "<h1>Done: {}</h1><p class=\"message ok\" id=\"result\">{}</p>",
                esc(&a.to_string()),
                esc(summary)
            );
        }
        Err(e) => {
            let _ = write!(
                m,
                "<h1>Refused: {}</h1><p class=\"message\">Nothing changed.</p><pre class=\"error\" id=\"result\">{}</pre>",
                esc(&a.to_string()),
                esc(&e.to_string())
            );
        }
    }
    let back = match a.target() {
        Some((svc, _)) => format!("/service?name={}", q(svc)),
        None => "/".to_string(),
    };
    let _ = write!(m, "<p><a id=\"back\" href=\"{}\">Back</a></p>", esc(&back));
    layout(Some(session), "Result", "", None, &m)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_charts() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let c = chart(&[(0, 0.0), (1000, 10.0), (2000, 5.0)], 100, 20, "x", count);
        assert!(c.starts_with("<svg") && c.contains("<polyline"), "{c}");
        assert!(!chart(&[], 100, 20, "x", count).contains("polyline"));
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
    }
}
