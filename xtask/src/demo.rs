//! `cargo xtask demo`: a lab with a client, the balancer and three backends, real traffic
//! through the VIP, who served what, and the dataplane counters.
//!
//! The scenario is a list of steps over a [`Demo`]; add a step function and a line in
//! [`scenario`] to show more (a web backend failing, an HL7 failover).

use std::time::Duration;

use anyhow::{Context, Result};
use balancer_tests::{
    BalancerProc, ConnsReport, ECHO_PORT, HTTP_PORT, Host, Lab, LabChild, stream_report, vip4,
};

use crate::sigint;

/// The sample config of the dataplane issue, as an operator would write it.
pub const SAMPLE_CONFIG: &str = r#"[dataplane]
interface = "eth0"
xdp_mode = "auto"

[[service]]
name = "web"
vip = "10.77.0.100:7002"
protocol = "tcp"
forwarding = "nat"
scheduler = "maglev"
backends = [ { address = "10.77.0.11:7002", weight = 1 }, { address = "10.77.0.12:7002" }, { address = "10.77.0.13:7002" } ]

# The backends' small HTTP servers, for curl.
[[service]]
name = "web-http"
vip = "10.77.0.100:8080"
protocol = "tcp"
forwarding = "nat"
scheduler = "maglev"
backends = [ { address = "10.77.0.11:8080" }, { address = "10.77.0.12:8080" }, { address = "10.77.0.13:8080" } ]
"#;

/// Everything a demo step can use. Dropping it stops the balancer and tears the lab down.
pub struct Demo {
    /// The backends' `blb-echo` processes (`echo[i]` is backend `i + 1`); a step may kill one.
    #[allow(dead_code)]
    pub echo: Vec<LabChild>,
    /// The running balancer (None once a step stopped it).
    pub balancer: Option<BalancerProc>,
    /// The lab (declared last: dropped after the processes above).
    pub lab: Lab,
}

type Step = (&'static str, fn(&mut Demo) -> Result<()>);

/// The demo's steps, in order.
fn scenario() -> Vec<Step> {
    vec![
        ("backends answer directly", direct_check),
        ("300 connections through the VIP", spread_through_vip),
        ("a long-lived connection stays on its backend", long_lived),
        ("HTTP through the VIP", http_through_vip),
        ("dataplane counters", counters),
    ]
}

/// Runs the demo; the lab is cleaned up whatever happens (error, panic or Ctrl-C).
pub fn run() -> Result<()> {
    banner("lab");
    let lab = Lab::new(3).context("building the lab")?;
    println!("lab {} is up:", lab.prefix());
    println!("  client   {:<8} 10.77.0.2   fd77::2", lab.ns(Host::Client));
    println!(
        "  balancer {:<8} 10.77.0.1   fd77::1   VIP 10.77.0.100:{ECHO_PORT}",
        lab.ns(Host::Lb)
    );
    for h in lab.backend_hosts() {
        println!(
            "  backend  {:<8} {:<11} {:<9} blb-echo {} (tcp/udp :{ECHO_PORT}, http :{HTTP_PORT})",
            lab.ns(h),
            h.v4().map(|a| a.to_string()).unwrap_or_default(),
            h.v6().map(|a| a.to_string()).unwrap_or_default(),
            h.echo_name(),
        );
    }
    let echo = lab.spawn_echo_all()?;
    sigint::check()?;
    println!("\nconfig:\n{SAMPLE_CONFIG}");
    let balancer = lab.start_balancer(SAMPLE_CONFIG)?;
    println!(
        "balancer running (pid {}), pins in {}",
        balancer.pid(),
        lab.pin_path().display()
    );
    let mut demo = Demo {
        echo,
        balancer: Some(balancer),
        lab,
    };
    let result = run_steps(&mut demo);
    banner("cleanup");
    if let Some(b) = demo.balancer.as_mut() {
        let _ = b.stop();
    }
    let prefix = demo.lab.prefix().to_string();
    drop(demo);
    println!("lab {prefix} removed (namespaces, processes, pins)");
    result
}

fn run_steps(demo: &mut Demo) -> Result<()> {
    for (title, step) in scenario() {
        sigint::check()?;
        banner(title);
        step(demo).with_context(|| format!("demo step \"{title}\""))?;
    }
    sigint::check()
}

fn banner(title: &str) {
    println!("\n== {title} ==");
}

fn direct_check(demo: &mut Demo) -> Result<()> {
    for h in demo.lab.backend_hosts() {
        let Some(a) = h.v4() else { continue };
        let r = demo.lab.client_conns((a, ECHO_PORT).into(), 5, 256, 1)?;
        println!(
            "  client -> {a}:{ECHO_PORT}: {} ok, {} failed",
            r.ok, r.failed
        );
    }
    Ok(())
}

fn spread_through_vip(demo: &mut Demo) -> Result<()> {
    let r = demo.lab.client_conns(vip4(ECHO_PORT), 300, 1024, 16)?;
    print_spread(&r);
    Ok(())
}

fn print_spread(r: &ConnsReport) {
    println!(
        "  {} connections ok, {} failed (each 1024 random bytes echoed byte-exact)",
        r.ok, r.failed
    );
    let total = r.ok.max(1) as f64;
    for (backend, n) in &r.by_backend {
        let bar = "#".repeat((*n as f64 / total * 60.0).round() as usize);
        println!(
            "  {backend:<6} {n:>5}  {:>5.1}%  {bar}",
            *n as f64 / total * 100.0
        );
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}

fn long_lived(demo: &mut Demo) -> Result<()> {
    let s = demo.lab.spawn_stream(vip4(ECHO_PORT), 2.0, 50)?;
    let r = stream_report(s, Duration::from_secs(30))?;
    println!(
        "  one connection for 2 s: served by {}, {} chunks, {} bytes echoed, {}",
        r.backend,
        r.chunks,
        r.bytes,
        if r.ok { "byte-exact" } else { "FAILED" }
    );
    if let Some(e) = r.error {
        println!("  error: {e}");
    }
    Ok(())
}

fn http_through_vip(demo: &mut Demo) -> Result<()> {
    let url = format!("http://10.77.0.100:{HTTP_PORT}/");
    for _ in 0..6 {
        let body = demo
            .lab
            .exec(Host::Client, &["curl", "-s", "-m", "5", &url])?;
        println!("  curl {url}  ->  {}", body.trim());
    }
    Ok(())
}

fn counters(demo: &mut Demo) -> Result<()> {
    match demo.lab.counters() {
        Ok(v) => print_counters(&v),
        Err(e) => println!(
            "  counters not available: {}",
            first_line(&format!("{e:#}"))
        ),
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// Prints `balancer counters --json` as tables: per service, per backend, and the non-zero
/// verdict reasons. Falls back to an outline for a shape it does not know.
pub fn print_counters(v: &serde_json::Value) {
    let Some(services) = v.get("services").and_then(|s| s.as_array()) else {
        print_json_readably(v, 1);
        return;
    };
    let n = |v: &serde_json::Value, k: &str| v.get(k).map(scalar).unwrap_or_else(|| "-".into());
    for svc in services {
        println!(
            "  service {} {} ({}): {} packets, {} bytes, {} new flows, {} drops",
            svc.get("name")
                .or_else(|| svc.get("id"))
                .map(scalar)
                .unwrap_or_default(),
            n(svc, "vip"),
            n(svc, "protocol"),
            n(svc, "packets"),
            n(svc, "bytes"),
            n(svc, "new_flows"),
            n(svc, "drops"),
        );
        println!(
            "    {:<22} {:<9} {:>9} {:>11} {:>9} {:>7} {:>7}",
            "backend", "state", "packets", "bytes", "new flows", "drops", "resets"
        );
        for b in svc
            .get("backends")
            .and_then(|b| b.as_array())
            .into_iter()
            .flatten()
        {
            println!(
                "    {:<22} {:<9} {:>9} {:>11} {:>9} {:>7} {:>7}",
                n(b, "address"),
                n(b, "state"),
                n(b, "packets"),
                n(b, "bytes"),
                n(b, "new_flows"),
                n(b, "drops"),
                n(b, "resets"),
            );
        }
    }
    if let Some(f) = v.get("flows") {
        println!("  flow table entries: {}", scalar(f));
    }
    if let Some(reasons) = v.get("reasons").and_then(|r| r.as_object()) {
        let nonzero: Vec<String> = reasons
            .iter()
            .filter(|(_, c)| c.as_u64() != Some(0))
            .map(|(k, c)| format!("{k}={}", scalar(c)))
            .collect();
        println!("  verdicts: {}", nonzero.join("  "));
    }
}

/// Prints JSON as an indented outline: objects as `key: value`, arrays of objects as rows.
pub fn print_json_readably(v: &serde_json::Value, depth: usize) {
    use serde_json::Value;
    let pad = "  ".repeat(depth);
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                match val {
                    Value::Object(_) | Value::Array(_) => {
                        println!("{pad}{k}:");
                        print_json_readably(val, depth + 1);
                    }
                    other => println!("{pad}{k}: {}", scalar(other)),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(map) if map.values().all(|x| !x.is_object() && !x.is_array()) => {
                        let row: Vec<String> = map
                            .iter()
                            .map(|(k, x)| format!("{k}={}", scalar(x)))
                            .collect();
                        println!("{pad}- {}", row.join("  "));
                    }
                    other => {
                        println!("{pad}-");
                        print_json_readably(other, depth + 1);
                    }
                }
            }
        }
        other => println!("{pad}{}", scalar(other)),
    }
}

fn scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
