//! `cargo xtask demo`: a lab with a client, the balancer and three backends (two of them also
//! run an HL7 Listener), real traffic through the VIP, who served what, a web backend failing
//! under load, an HL7 listener failover with a real MLLP sender, and the counters; then a
//! second lab with an HA pair of balancers and a takeover ([`crate::demo_pair`]).
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

/// What the controller issue adds to the sample: a health check on `web` (HTTP on the
/// backends' port 8080), and the HL7 Listener in failover on two servers.
pub const CONTROLLER_CONFIG: &str = r#"
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
"#;

/// The same two HL7 Listeners behind a second VIP:port in message mode: the controller's
/// relay holds each message until the active listener ACKs it, and replays it to the
/// standby when that listener fails.
pub const MLLP_CONFIG: &str = r#"
[[service]]
name = "hl7-messages"
vip = "10.77.0.100:6663"
scheduler = "failover"
mode = "mllp"               # HL7 messages relayed by the controller: no message lost in a failover
health = { kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }
mllp = { ack_timeout = "2s", hold_timeout = "20s" }
backends = [
  { address = "10.77.0.11:6661", priority = 1 },
  { address = "10.77.0.12:6661", priority = 2 },
]
"#;

/// The health check the demo puts on the `web` service.
const WEB_HEALTH: &str = r#"health = { kind = "http", path = "/health", port = 8080, interval = "500ms", timeout = "300ms", rise = 2, fall = 2 }
passive_health = { failures = 5, window = "1s" }
backends = [ { address = "10.77.0.11:7002", weight = 1 }"#;

/// The demo's whole config: the sample, its health check, the HL7 service, the socket.
pub fn demo_config(lab: &Lab) -> String {
    let sample = SAMPLE_CONFIG.replacen(
        r#"backends = [ { address = "10.77.0.11:7002", weight = 1 }"#,
        WEB_HEALTH,
        1,
    );
    format!(
        "{sample}{CONTROLLER_CONFIG}{MLLP_CONFIG}\n[controller]\nsocket = \"{}\"\n\n[console]\naddress = \"{CONSOLE_ADDR}\"\nusers = \"{}\"\nstate_dir = \"{}\"\n",
        lab.dir().join("control.sock").display(),
        lab.dir().join("console-users").display(),
        lab.dir().join("console").display(),
    )
}

/// The console's management address in the lab (the balancer host's own address).
const CONSOLE_ADDR: &str = "10.77.0.1:9443";

/// Adds the demo's console user with a fresh random password; returns the password.
fn console_user(lab: &Lab) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut raw = [0u8; 9];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let password: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut c = std::process::Command::new(balancer_tests::balancer_bin()?)
        .args(["user", "add", "demo", "--role", "operator", "--users"])
        .arg(lab.dir().join("console-users"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = c.stdin.take() {
        writeln!(stdin, "{password}")?;
    }
    anyhow::ensure!(c.wait()?.success(), "balancer user add failed");
    Ok(password)
}

/// Everything a demo step can use. Dropping it stops the balancer and tears the lab down.
pub struct Demo {
    /// The backends' `blb-echo` processes (`echo[i]` is backend `i + 1`); a step may kill one.
    #[allow(dead_code)]
    pub echo: Vec<LabChild>,
    /// The HL7 Listeners on backends 1 and 2.
    #[allow(dead_code)]
    pub hl7: Vec<LabChild>,
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
        ("balancer status", status),
        ("a web backend fails under load", web_backend_fails),
        ("HL7 listener failover", hl7_failover),
        (
            "HL7 listener failover in message mode (mode = \"mllp\")",
            hl7_message_mode,
        ),
        ("balancer status after the failures", status),
        ("dataplane counters", counters),
    ]
}

/// Runs the demo; the lab is cleaned up whatever happens (error, panic or Ctrl-C).
pub fn run(keep_console: bool) -> Result<()> {
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
    let mut hl7 = Vec::new();
    for (i, name) in [(1, "hl7a"), (2, "hl7b")] {
        println!("  HL7 Listener {name} (blb-mllp, ACKs with MSH-3 = {name}) on 10.77.0.1{i}:6661");
        let mut c = lab.spawn_tool(
            Host::Backend(i),
            "blb-mllp",
            &["listen", "--name", name, "--addr", "0.0.0.0:6661"],
        )?;
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))?;
        hl7.push(c);
    }
    sigint::check()?;
    let password = console_user(&lab)?;
    let config = demo_config(&lab);
    println!("\nconfig:\n{config}");
    let balancer = lab.start_balancer(&config)?;
    println!(
        "balancer running (pid {}), pins in {}",
        balancer.pid(),
        lab.pin_path().display()
    );
    let client = lab.ns(Host::Client);
    println!(
        "console: https://{CONSOLE_ADDR}/  user demo  password {password}  (self-signed certificate)\n  \
         reach it from the client namespace, e.g.\n  \
         nsenter --net=/run/netns/{client} curl -k https://{CONSOLE_ADDR}/login\n  \
         nsenter --net=/run/netns/{client} chromium --no-sandbox --user-data-dir=/tmp/blb-console https://{CONSOLE_ADDR}/"
    );
    let answer = lab.exec(
        Host::Client,
        &[
            "curl",
            "-sk",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://{CONSOLE_ADDR}/login"),
        ],
    )?;
    println!("  the console's sign-in page answers {answer} from the client namespace");
    let mut demo = Demo {
        echo,
        hl7,
        balancer: Some(balancer),
        lab,
    };
    let mut result = run_steps(&mut demo);
    if keep_console && result.is_ok() {
        banner("console");
        println!(
            "console up at https://{CONSOLE_ADDR}/ (user demo, password {password}); Ctrl-C ends the demo"
        );
        while !sigint::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
        result = Ok(());
    }
    banner("cleanup");
    if let Some(b) = demo.balancer.as_mut() {
        let _ = b.stop();
    }
    let prefix = demo.lab.prefix().to_string();
    drop(demo);
    println!("lab {prefix} removed (namespaces, processes, pins)");
    result?;
    banner("an HA pair: the active balancer killed (keepalived + mirrored flows)");
    crate::demo_pair::run()
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

fn cli(demo: &Demo, args: &[&str]) -> Result<String> {
    let sock = demo.lab.dir().join("control.sock").display().to_string();
    let mut v = args.to_vec();
    v.extend_from_slice(&["--socket", &sock]);
    demo.lab.balancer_cli(&v)
}

fn status_json(demo: &Demo) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&cli(demo, &["status", "--json"])?)?)
}

fn status(demo: &mut Demo) -> Result<()> {
    for line in cli(demo, &["status"])?.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Polls the status every 50 ms (at most `limit`) until `f` holds; returns the time taken.
fn wait_status(
    demo: &Demo,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<Duration> {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        sigint::check()?;
        if f(&status_json(demo)?) {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("not within {limit:?}")
}

fn backend_field(st: &serde_json::Value, svc: &str, addr: &str, field: &str) -> String {
    st["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == svc))
        .and_then(|s| s["backends"].as_array())
        .and_then(|b| b.iter().find(|b| b["address"] == addr))
        .map(|b| scalar(&b[field]))
        .unwrap_or_default()
}

fn web_backend_fails(demo: &mut Demo) -> Result<()> {
    let vip = vip4(ECHO_PORT).to_string();
    let mut cmd = demo
        .lab
        .command(Host::Client, balancer_tests::tool_bin("blb-client")?);
    cmd.args(["rate", "--to", &vip, "--seconds", "4", "--concurrency", "2"]);
    let load = demo.lab.spawn_command(cmd, "[c] blb-client rate")?;
    std::thread::sleep(Duration::from_secs(1));
    println!("  continuous short connections to {vip}; killing be2 (blb-echo on 10.77.0.12)");
    demo.echo[1].kill();
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        backend_field(st, "web", "10.77.0.12:7002", "state") == "down"
    })?;
    println!(
        "  passive health (5 refused or unanswered new flows in 1 s; the http check every 500 ms needs 2 failures) marked be2 down after {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let done = load.wait_output(Duration::from_secs(30))?;
    if let Ok(r) = serde_json::from_str::<balancer_tests::RateReport>(&done.stdout) {
        println!(
            "  load: {} ok, {} failed (only connections sent to be2 before it was marked down): {:?}",
            r.ok, r.failed, r.by_backend
        );
    }
    let r = demo.lab.client_conns(vip4(ECHO_PORT), 150, 1024, 8)?;
    println!("  after detection:");
    print_spread(&r);
    Ok(())
}

fn mllp_send(demo: &Demo, patient: &str) -> Result<String> {
    // A real HL7 client: mllp_send from Debian's python3-hl7.
    let msg = format!(
        "MSH|^~\\&|DEMO|CLINIC|HL7|LISTENER|20260101000000||ADT^A01|DEMO{}|P|2.5\r\nPID|1||12345^^^HOSP^MR||{patient}||19700101|F\r\n",
        std::process::id()
    );
    let file = demo.lab.write_file("adt.hl7", &msg)?;
    let out = demo.lab.exec(
        Host::Client,
        &[
            "mllp_send",
            "--loose",
            "-p",
            "6661",
            "-f",
            &file.display().to_string(),
            "10.77.0.100",
        ],
    )?;
    let ack = out.replace('\r', "\n");
    let seg = |name: &str| {
        ack.lines()
            .map(|l| l.trim_start_matches('\u{b}'))
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    let (msh, msa) = (seg("MSH"), seg("MSA"));
    let from = msh.split('|').nth(2).unwrap_or("?").to_string();
    Ok(format!(
        "{} from {from}",
        msa.split('|').take(2).collect::<Vec<_>>().join("|")
    ))
}

fn hl7_failover(demo: &mut Demo) -> Result<()> {
    println!(
        "  mllp_send one ADT^A01 to 10.77.0.100:6661: ACK {}",
        mllp_send(demo, "DOE^JANE")?
    );
    let mut cmd = demo
        .lab
        .command(Host::Client, balancer_tests::tool_bin("blb-mllp")?);
    cmd.args([
        "send",
        "--to",
        "10.77.0.100:6661",
        "--seconds",
        "5",
        "--interval-ms",
        "50",
        "--ack-timeout",
        "5",
    ]);
    let sender = demo.lab.spawn_command(cmd, "[c] blb-mllp send")?;
    std::thread::sleep(Duration::from_millis(1500));
    println!(
        "  a sender streams a message every 50 ms; hl7a's server drops off the network (link down)"
    );
    demo.lab
        .exec(Host::Backend(1), &["ip", "link", "set", "eth0", "down"])?;
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        st["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "hl7-listener" && s["active"] == "10.77.0.12:6661")
        })
    })?;
    println!(
        "  failover to hl7b after {:.0} ms (mllp check every 250 ms, fall 2)",
        took.as_secs_f64() * 1e3
    );
    let done = sender.wait_output(Duration::from_secs(30))?;
    if let Ok(r) = serde_json::from_str::<serde_json::Value>(&done.stdout) {
        println!(
            "  sender: {} sent, {} acked, ACKs in order {}, resets {}, timeouts {}, longest gap between ACKs {} ms",
            r["sent"], r["acked"], r["sequence"], r["resets"], r["timeouts"], r["max_gap_ms"]
        );
    }
    println!("  mllp_send again: ACK {}", mllp_send(demo, "DOE^JOHN")?);
    demo.lab
        .exec(Host::Backend(1), &["ip", "link", "set", "eth0", "up"])?;
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        backend_field(st, "hl7-listener", "10.77.0.11:6661", "health") == "up"
    })?;
    println!(
        "  hl7a back after {:.0} ms; failback = false, so it waits as the standby:",
        took.as_secs_f64() * 1e3
    );
    println!("  mllp_send: ACK {}", mllp_send(demo, "DOE^JIM")?);
    // 10.77.0.11 also runs web's be1: it was down while unplugged too.
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        backend_field(st, "web", "10.77.0.11:7002", "health") == "up"
    })?;
    println!(
        "  (10.77.0.11 is also web's be1: its check passed again {:.0} ms later)",
        took.as_secs_f64() * 1e3
    );
    if let Some(b) = demo.balancer.as_ref() {
        let leaked = b.logs().contains("DOE^J");
        println!(
            "  patient names in the balancer's log: {}",
            if leaked { "FOUND (bug)" } else { "none" }
        );
    }
    Ok(())
}

/// The same kind of failover through the relay: the active listener (hl7b since the step
/// before) drops off the network while a sender streams; every message is ACKed on the
/// sender's one connection.
fn hl7_message_mode(demo: &mut Demo) -> Result<()> {
    let active = |st: &serde_json::Value| {
        st["mllp"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "hl7-messages"))
            .map(|s| s["active"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    wait_status(demo, Duration::from_secs(10), |st| {
        active(st) == "10.77.0.12:6661"
            && backend_field(st, "hl7-messages", "10.77.0.11:6661", "health") == "up"
    })?;
    println!(
        "  hl7-messages on 10.77.0.100:6663: the relay sends to hl7b (active), hl7a is the standby"
    );
    let mut cmd = demo
        .lab
        .command(Host::Client, balancer_tests::tool_bin("blb-mllp")?);
    cmd.args([
        "send",
        "--to",
        "10.77.0.100:6663",
        "--seconds",
        "5",
        "--interval-ms",
        "50",
        "--ack-timeout",
        "25",
    ]);
    let sender = demo
        .lab
        .spawn_command(cmd, "[c] blb-mllp send (message mode)")?;
    std::thread::sleep(Duration::from_millis(1500));
    println!(
        "  a sender streams a message every 50 ms; hl7b's server drops off the network (link down)"
    );
    demo.lab
        .exec(Host::Backend(2), &["ip", "link", "set", "eth0", "down"])?;
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        active(st) == "10.77.0.11:6661"
    })?;
    println!(
        "  the relay sends to hl7a after {:.0} ms; the message hl7b did not ACK is replayed there",
        took.as_secs_f64() * 1e3
    );
    let done = sender.wait_output(Duration::from_secs(60))?;
    if let Ok(r) = serde_json::from_str::<serde_json::Value>(&done.stdout) {
        println!(
            "  sender: sent {}, acked {}, resets {}, timeouts {}, connections {}, ACKs in order {}, longest gap between ACKs {} ms",
            r["sent"],
            r["acked"],
            r["resets"],
            r["timeouts"],
            r["connects"],
            r["sequence"],
            r["max_gap_ms"]
        );
    }
    if let Some(b) = demo.balancer.as_ref() {
        let replays = b
            .logs()
            .lines()
            .filter(|l| l.contains("replaying a message"))
            .count();
        println!(
            "  replays logged by the balancer (possible duplicates at the listeners, control ID only): {replays}"
        );
    }
    demo.lab
        .exec(Host::Backend(2), &["ip", "link", "set", "eth0", "up"])?;
    let took = wait_status(demo, Duration::from_secs(5), |st| {
        backend_field(st, "hl7-messages", "10.77.0.12:6661", "health") == "up"
    })?;
    println!(
        "  hl7b back after {:.0} ms, as the standby (failback = false)",
        took.as_secs_f64() * 1e3
    );
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
