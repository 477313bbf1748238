//! Renders a [`Plan`] as a commented `balancer.toml`.

use std::{fmt::Write as _, time::Duration};

use crate::{
    Product,
    model::{
        BACKEND_CA, Check, CheckKind, HttpCheck, Plan, Pool, Protocol, Scheduler, Selection, State,
        Sticky,
    },
};

/// A TOML basic string, escaped by the `toml` crate.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("\"{}s\"", ms / 1000)
    } else {
        format!("\"{ms}ms\"")
    }
}

/// The inline `health = { ... }` table.
pub(crate) fn health(c: &Check) -> String {
    let mut kv: Vec<(String, String)> = Vec::new();
    let http = |kv: &mut Vec<(String, String)>, h: &HttpCheck| {
        kv.push(("path".into(), q(&h.path)));
        let codes: Vec<String> = h.expect_status.iter().map(|c| c.to_string()).collect();
        kv.push(("expect_status".into(), format!("[{}]", codes.join(", "))));
        if let Some(b) = &h.body_contains {
            kv.push(("body_contains".into(), q(b)));
        }
        if let Some(host) = &h.host {
            kv.push(("host".into(), q(host)));
        }
    };
    match &c.kind {
        CheckKind::Tcp => kv.push(("kind".into(), q("tcp"))),
        CheckKind::Mllp => kv.push(("kind".into(), q("mllp"))),
        CheckKind::Http(h) => {
            kv.push(("kind".into(), q("http")));
            http(&mut kv, h);
        }
        CheckKind::Https(h) => {
            kv.push(("kind".into(), q("https")));
            http(&mut kv, h);
            kv.push(("ca_file".into(), q(BACKEND_CA)));
        }
    }
    if let Some(p) = c.port {
        kv.push(("port".into(), p.to_string()));
    }
    kv.push(("interval".into(), dur(c.interval)));
    kv.push(("timeout".into(), dur(c.timeout)));
    kv.push(("rise".into(), c.rise.to_string()));
    kv.push(("fall".into(), c.fall.to_string()));
    let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
    format!("{{ {} }}", body.join(", "))
}

fn comment(out: &mut String, text: &str) {
    for l in text.lines() {
        let _ = writeln!(out, "# {l}");
    }
}

/// The whole file.
pub fn render(plan: &Plan, product: Product, file: &str) -> String {
    let mut o = String::new();
    let src: String = file.chars().filter(|c| !c.is_control()).collect();
    comment(
        &mut o,
        &format!(
            "Imported from the {} configuration {src} by `balancer import`.\n\
             Read the import report (printed with this file) for what was approximated or\n\
             left out, set the interface, put certificates and CAs in {}/, then\n  \
             balancer check --config /etc/balancer/balancer.toml",
            product.name(),
            crate::model::TLS_DIR
        ),
    );
    o.push('\n');
    o.push_str("[dataplane]\n");
    o.push_str(
        "interface = \"eth0\"            # the interface that holds the VIPs: not in the source, set it\n",
    );
    o.push_str("xdp_mode = \"auto\"\n");
    match plan.snat_ipv4 {
        Some(ip) => {
            let _ = writeln!(
                o,
                "snat_ipv4 = {}        # the source's SNAT address",
                q(&ip.to_string())
            );
        }
        None => o.push_str(
            "# snat_ipv4 = \"10.77.0.1\"     # NAT source; default: the interface's own address\n",
        ),
    }
    o.push_str("snat_ports = [10000, 32767]   # below net.ipv4.ip_local_port_range\n\n");
    o.push_str("[controller]\n");
    o.push_str("socket = \"/run/balancer/control.sock\"\n");
    o.push_str("metrics = \"127.0.0.1:9550\"     # Prometheus: GET /metrics\n");

    for s in &plan.services {
        o.push('\n');
        comment(&mut o, &s.source);
        o.push_str("[[service]]\n");
        let _ = writeln!(o, "name = {}", q(&s.name));
        let _ = writeln!(o, "vip = {}", q(&s.vip.to_string()));
        let _ = writeln!(
            o,
            "protocol = \"{}\"",
            match s.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
        );
        o.push_str("forwarding = \"nat\"\n");
        match s.scheduler {
            Scheduler::Maglev => o.push_str("scheduler = \"maglev\"\n"),
            Scheduler::Failover => {
                o.push_str("scheduler = \"failover\"        # one active backend, by priority\n");
                let _ = writeln!(o, "failback = {}", s.failback);
            }
        }
        if let Some(h) = &s.health {
            let _ = writeln!(o, "health = {}", health(h));
        }
        o.push_str("backends = [\n");
        for b in &s.backends {
            let mut kv = vec![format!("address = {}", q(&b.address.to_string()))];
            kv.push(format!("weight = {}", b.weight));
            if let Some(p) = b.priority {
                kv.push(format!("priority = {p}"));
            }
            match b.state {
                State::Up => {}
                State::Drain => kv.push("state = \"drain\"".into()),
                State::Disabled => kv.push("state = \"disabled\"".into()),
            }
            let _ = writeln!(o, "  {{ {} }},", kv.join(", "));
        }
        o.push_str("]\n");
    }

    if plan.listeners.is_empty()
        && plan.redirects.is_empty()
        && plan.routes.is_empty()
        && plan.pools.is_empty()
    {
        return o;
    }
    o.push_str("\n[l7]\ncert_watch_interval = \"10s\"\n");
    for l in &plan.listeners {
        o.push('\n');
        comment(&mut o, &l.source);
        o.push_str("[[l7.listener]]\n");
        let _ = writeln!(o, "name = {}", q(&l.name));
        let _ = writeln!(o, "address = {}", q(&l.address.to_string()));
        o.push_str(
            "min_tls_version = \"1.2\"       # TLS 1.2 and 1.3, forward-secret AEAD suites\n",
        );
        for c in &l.certificates {
            o.push_str("  [[l7.listener.certificate]]\n");
            let _ = writeln!(o, "  cert = {}", q(&c.cert));
            let _ = writeln!(o, "  key = {}", q(&c.key));
            if !c.server_names.is_empty() {
                let names: Vec<String> = c.server_names.iter().map(|n| q(n)).collect();
                let _ = writeln!(o, "  server_names = [{}]", names.join(", "));
            }
        }
    }
    for r in &plan.redirects {
        o.push('\n');
        comment(&mut o, &r.source);
        o.push_str("[[l7.redirect]]\n");
        let _ = writeln!(o, "address = {}", q(&r.address.to_string()));
        let _ = writeln!(o, "https_port = {}", r.https_port);
        o.push_str("status = 301\n");
    }
    for r in &plan.routes {
        o.push('\n');
        comment(&mut o, &r.source);
        o.push_str("[[l7.route]]\n");
        let _ = writeln!(o, "name = {}", q(&r.name));
        if let Some(h) = &r.host {
            let _ = writeln!(o, "host = {}", q(h));
        }
        let _ = writeln!(o, "path_prefix = {}", q(&r.path_prefix));
        if !r.listeners.is_empty() {
            let ls: Vec<String> = r.listeners.iter().map(|n| q(n)).collect();
            let _ = writeln!(o, "listeners = [{}]", ls.join(", "));
        }
        let _ = writeln!(o, "pool = {}", q(&r.pool));
    }
    for p in &plan.pools {
        pool(&mut o, p);
    }
    o
}

fn pool(o: &mut String, p: &Pool) {
    o.push('\n');
    comment(o, &p.source);
    o.push_str("[[l7.pool]]\n");
    let _ = writeln!(o, "name = {}", q(&p.name));
    if p.https {
        o.push_str("scheme = \"https\"\n");
        let _ = writeln!(
            o,
            "ca = {}   # the CA that signed the servers' certificates",
            q(BACKEND_CA)
        );
    } else {
        o.push_str("scheme = \"http\"\n");
    }
    match p.selection {
        Selection::RoundRobin => o.push_str("selection = \"round_robin\"\n"),
        Selection::LeastOutstanding => o.push_str("selection = \"least_outstanding\"\n"),
    }
    match &p.sticky {
        Sticky::None => {}
        Sticky::Source => o.push_str("sticky = \"source\"\n"),
        Sticky::Cookie(name) => {
            o.push_str("sticky = \"cookie\"\n");
            if let Some(n) = name {
                let _ = writeln!(o, "sticky_cookie = {}", q(n));
            }
        }
    }
    if let Some(h) = &p.health {
        let _ = writeln!(o, "health = {}", health(h));
    }
    for (addr, weight) in &p.backends {
        o.push_str("  [[l7.pool.backend]]\n");
        let _ = writeln!(o, "  address = {}", q(&addr.to_string()));
        let _ = writeln!(o, "  weight = {weight}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn health_tables_are_written_in_the_balancer_syntax() {
        let c = Check {
            kind: CheckKind::Https(HttpCheck {
                path: "/health".into(),
                expect_status: vec![200],
                body_contains: Some("he said \"ok\"".into()),
                host: None,
            }),
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(2500),
            rise: 1,
            fall: 3,
            port: Some(7003),
        };
        let line = format!("health = {}", health(&c));
        assert!(line.starts_with(r#"health = { kind = "https", path = "/health", expect_status = [200], body_contains = "#), "{line}");
        let t: toml::Table = toml::from_str(&line).unwrap();
        let h = t["health"].as_table().unwrap();
        assert_eq!(h["body_contains"].as_str(), Some("he said \"ok\""));
        assert_eq!(h["timeout"].as_str(), Some("2500ms"));
        assert_eq!(
            h["ca_file"].as_str(),
            Some("/etc/balancer/tls/backend-ca.pem")
        );
        assert_eq!(h["port"].as_integer(), Some(7003));
    }
}
