//! The importers on realistic configurations of each product (a PatientSecure-like farm:
//! web services on 7002 over TLS, the UI, an HL7 listener in active/standby) and on
//! malformed ones. That the output passes the balancer's own validation is tested in the
//! `balancer` crate (`balancer/tests/import_cli.rs`), which runs `balancer import`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use balancer_import::{Outcome, Product, import};

fn run(p: Product, name: &str) -> (toml::Table, balancer_import::Report, String) {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let i = import(p, &text, name).unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os("SHOW").is_some() {
        println!("{}\n{}", i.toml, i.report.render(name));
    }
    (toml::from_str(&i.toml).unwrap(), i.report, i.toml)
}

fn services(t: &toml::Table) -> Vec<&toml::Table> {
    t.get("service")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_table()).collect())
        .unwrap_or_default()
}

fn l7<'a>(t: &'a toml::Table, what: &str) -> Vec<&'a toml::Table> {
    t.get("l7")
        .and_then(|l| l.get(what))
        .and_then(|s| s.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_table()).collect())
        .unwrap_or_default()
}

fn find<'a>(v: &[&'a toml::Table], name: &str) -> &'a toml::Table {
    v.iter()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
        .unwrap_or_else(|| panic!("no {name} in {v:?}"))
}

fn s<'a>(t: &'a toml::Table, k: &str) -> &'a str {
    t.get(k)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("{k} in {t:?}"))
}

fn noted(r: &balancer_import::Report, o: Outcome, subject: &str, detail: &str) -> bool {
    r.with(o)
        .iter()
        .any(|n| n.subject.contains(subject) && n.detail.contains(detail))
}

#[test]
fn f5_patientsecure_farm() {
    let (t, r, text) = run(Product::F5, "bigip.conf");
    let svc = services(&t);
    let hl7 = find(&svc, "hl7_vs");
    assert_eq!(s(hl7, "vip"), "10.77.0.100:6661");
    assert_eq!(s(hl7, "scheduler"), "failover");
    let health = hl7["health"].as_table().unwrap();
    assert_eq!(s(health, "kind"), "mllp");
    assert_eq!(s(health, "interval"), "2s");
    assert_eq!(health["fall"].as_integer(), Some(3));
    let b = hl7["backends"].as_array().unwrap();
    // priority-group 10 (app1) wins over 5 (app2) on the BIG-IP.
    assert_eq!(s(b[0].as_table().unwrap(), "address"), "10.77.0.11:6661");
    assert_eq!(b[0]["priority"].as_integer(), Some(1));
    assert_eq!(b[1]["priority"].as_integer(), Some(2));

    let ws = find(&svc, "ws_vs");
    assert_eq!(s(ws, "scheduler"), "maglev");
    assert_eq!(ws["backends"][0]["weight"].as_integer(), Some(2));
    let h = ws["health"].as_table().unwrap();
    assert_eq!(
        (s(h, "kind"), s(h, "path"), s(h, "host")),
        ("https", "/health", "app.example.org")
    );
    assert_eq!(h["expect_status"][0].as_integer(), Some(200));

    let admin = find(&svc, "admin_vs");
    assert_eq!(s(admin["health"].as_table().unwrap(), "kind"), "tcp");
    assert!(noted(
        &r,
        Outcome::Approximated,
        "admin_pool monitor",
        "only the first"
    ));
    assert!(!text.contains("8081"), "a disabled virtual is left out");
    assert!(noted(
        &r,
        Outcome::NotTranslated,
        "old_reports_vs",
        "disabled"
    ));

    let listener = find(&l7(&t, "listener"), "ui_vs");
    assert_eq!(s(listener, "address"), "10.77.0.100:443");
    let cert = listener["certificate"][0].as_table().unwrap();
    assert_eq!(s(cert, "cert"), "/etc/balancer/tls/lb.example.org.pem");
    assert_eq!(s(cert, "key"), "/etc/balancer/tls/lb.example.org.key");
    let pool = find(&l7(&t, "pool"), "ui_pool");
    assert_eq!(
        (s(pool, "scheme"), s(pool, "sticky"), s(pool, "selection")),
        ("https", "cookie", "least_outstanding")
    );
    assert_eq!(
        pool["backend"][1]["weight"].as_integer(),
        Some(0),
        "session user-disabled drains"
    );
    let ph = pool["health"].as_table().unwrap();
    assert_eq!(
        (s(ph, "kind"), s(ph, "body_contains")),
        ("https", "PatientSecure")
    );
    assert_eq!(
        l7(&t, "redirect")[0]["address"].as_str(),
        Some("10.77.0.100:80")
    );
    assert!(noted(&r, Outcome::NotTranslated, "ui_headers", "iRule"));
    assert!(noted(
        &r,
        Outcome::NotTranslated,
        "net vlan /Common/external",
        ""
    ));
    // Monitor strings are not echoed: they may hold anything.
    assert!(!r.render("x").contains("F5MON"), "{}", r.render("x"));
}

#[test]
fn netscaler_patientsecure_farm() {
    let (t, r, _) = run(Product::NetScaler, "ns.conf");
    let svc = services(&t);
    let hl7 = find(&svc, "vs_hl7");
    assert_eq!(s(hl7, "scheduler"), "failover");
    assert_eq!(
        hl7["failback"].as_bool(),
        Some(false),
        "-disablePrimaryOnDown ENABLED"
    );
    let h = hl7["health"].as_table().unwrap();
    assert_eq!(
        (s(h, "kind"), s(h, "interval"), s(h, "timeout")),
        ("mllp", "500ms", "400ms")
    );
    assert_eq!(
        (h["rise"].as_integer(), h["fall"].as_integer()),
        (Some(2), Some(2))
    );
    let b = hl7["backends"].as_array().unwrap();
    assert_eq!(
        (
            s(b[0].as_table().unwrap(), "address"),
            b[0]["priority"].as_integer()
        ),
        ("10.77.0.11:6661", Some(1))
    );
    assert_eq!(
        (
            s(b[1].as_table().unwrap(), "address"),
            b[1]["priority"].as_integer()
        ),
        ("10.77.0.12:6661", Some(2))
    );
    let admin = find(&svc, "vs_admin");
    assert_eq!(
        s(admin["backends"][1].as_table().unwrap(), "state"),
        "disabled"
    );
    assert!(
        services(&t)
            .iter()
            .all(|s| s["name"].as_str() != Some("vs_hl7_standby"))
    );
    assert!(noted(&r, Outcome::NotTranslated, "vs_reports", "disabled"));

    let ls = l7(&t, "listener");
    assert_eq!(s(find(&ls, "vs_ws"), "address"), "10.77.0.100:7002");
    let pools = l7(&t, "pool");
    let ws = find(&pools, "vs_ws-pool");
    assert_eq!(
        (s(ws, "scheme"), s(ws, "selection")),
        ("https", "round_robin")
    );
    let wh = ws["health"].as_table().unwrap();
    assert_eq!(
        (s(wh, "kind"), s(wh, "path"), s(wh, "timeout")),
        ("https", "/health", "2s")
    );
    let ui = find(&pools, "vs_ui-pool");
    assert_eq!(s(ui, "sticky"), "cookie");
    assert_eq!(ui["backend"][0]["weight"].as_integer(), Some(2));
    let uh = ui["health"].as_table().unwrap();
    assert_eq!(uh["expect_status"].as_array().unwrap().len(), 2);
    assert!(noted(
        &r,
        Outcome::Approximated,
        "lb_example_org",
        "encrypted"
    ));
    // System lines are reported by their first words only (they hold password hashes).
    let text = r.render("ns.conf");
    assert!(text.contains("add system user"), "{text}");
    assert!(!text.contains("0d1a2b3c"), "{text}");
    assert!(!text.contains("8f3a1c0e2d"), "{text}");
}

#[test]
fn arr_patientsecure_farm() {
    let (t, r, _) = run(Product::Arr, "applicationHost.config");
    assert!(services(&t).is_empty());
    let ls = l7(&t, "listener");
    assert_eq!(ls.len(), 2);
    assert_eq!(s(ls[0], "address"), "10.77.0.100:443");
    assert_eq!(
        l7(&t, "redirect")[0]["address"].as_str(),
        Some("10.77.0.100:80")
    );
    let routes = l7(&t, "route");
    let ws = find(&routes, "ARR_ws-farm_loadbalance");
    assert_eq!(
        (s(ws, "host"), s(ws, "path_prefix"), s(ws, "pool")),
        ("lb.example.org", "/ws", "ws-farm")
    );
    let ui = find(&routes, "ARR_ui-farm_loadbalance");
    assert_eq!(
        (s(ui, "host"), s(ui, "path_prefix")),
        ("lb.example.org", "/")
    );
    let pools = l7(&t, "pool");
    let wsp = find(&pools, "ws-farm");
    assert_eq!(s(wsp, "scheme"), "https");
    assert_eq!(
        s(wsp["backend"][0].as_table().unwrap(), "address"),
        "10.77.0.11:7002"
    );
    let h = wsp["health"].as_table().unwrap();
    assert_eq!(
        (
            s(h, "kind"),
            s(h, "path"),
            s(h, "body_contains"),
            s(h, "interval")
        ),
        ("https", "/health", "OK", "5s")
    );
    let uip = find(&pools, "ui-farm");
    assert_eq!(
        (
            s(uip, "sticky"),
            s(uip, "sticky_cookie"),
            s(uip, "selection")
        ),
        ("cookie", "ARRAffinity", "least_outstanding")
    );
    assert_eq!(uip["backend"][1]["weight"].as_integer(), Some(0));
    assert_eq!(
        s(uip["health"].as_table().unwrap(), "timeout"),
        "5s",
        "30s is not below 10s"
    );
    assert!(noted(&r, Outcome::Translated, "Force HTTPS", "redirect"));
    assert!(noted(
        &r,
        Outcome::Approximated,
        "binding https",
        "Windows store"
    ));
}

#[test]
fn malformed_inputs_name_file_and_line() {
    for (p, name, line, msg) in [
        (Product::F5, "bad-brace.conf", 5, "never closed"),
        (Product::F5, "bad-member.conf", 3, "no address"),
        (Product::F5, "bad-pool-ref.conf", 3, "not defined"),
        (Product::NetScaler, "bad-quote.conf", 3, "unterminated"),
        (Product::NetScaler, "bad-bind.conf", 4, "not defined"),
        (Product::NetScaler, "bad-vip.conf", 2, "not an IP address"),
        (Product::Arr, "bad-xml.config", 6, "XML"),
        (Product::Arr, "bad-timespan.config", 7, "not a duration"),
    ] {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let e = import(p, &text, name).unwrap_err();
        assert_eq!(e.line, line, "{name}: {e}");
        assert!(e.message.contains(msg), "{name}: {e}");
        assert!(
            e.to_string().starts_with(&format!("{name}:{line}: ")),
            "{e}"
        );
    }
}
