//! Controller labs (issue: controller): health checks under load, HL7 failover with real MLLP
//! peers, reload, restart and kill -9 with a long-lived stream, the CLI and its socket,
//! sd_notify, and no patient data in any log. Each test has its own lab.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, Instant},
};

use balancer_tests::{
    ECHO_PORT, HTTP_PORT, Host, Lab, LabChild, balancer_bin, stream_report, tool_bin, vip4,
};
use serde_json::Value;

const HL7_PORT: u16 = 6661;

fn socket(lab: &Lab) -> PathBuf {
    lab.dir().join("control.sock")
}

fn header(lab: &Lab) -> String {
    format!(
        "[dataplane]\ninterface = \"eth0\"\n\n[controller]\nsocket = \"{}\"\n",
        socket(lab).display()
    )
}

fn web_service(lab: &Lab, health: &str) -> String {
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .map(|h| format!("{{ address = \"{}:{ECHO_PORT}\" }}", h.v4().unwrap()))
        .collect();
    format!(
        "\n[[service]]\nname = \"web\"\nvip = \"10.77.0.100:{ECHO_PORT}\"\n{health}backends = [ {} ]\n",
        backends.join(", ")
    )
}

fn cli(lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
    let s = socket(lab);
    let mut v: Vec<&str> = args.to_vec();
    let sp = s.to_string_lossy().to_string();
    v.push("--socket");
    v.push(&sp);
    lab.balancer_cli(&v)
}

fn status(lab: &Lab) -> Value {
    serde_json::from_str(&cli(lab, &["status", "--json"]).unwrap()).unwrap()
}

fn backend<'a>(st: &'a Value, service: &str, addr: &str) -> &'a Value {
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .unwrap()["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap()
}

/// Polls `f` every 50 ms for at most `limit`; returns how long it took.
fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return t.elapsed();
        }
        sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}");
}

fn spawn_tool(lab: &Lab, host: Host, tool: &str, args: &[&str]) -> LabChild {
    let mut cmd = lab.command(host, tool_bin(tool).unwrap());
    cmd.args(args);
    lab.spawn_command(cmd, &format!("[{host}] {tool} {}", args.join(" ")))
        .unwrap()
}

/// Runs `balancer run --config <config>` on the lb host with the lab's pins and returns its
/// output followed by `rc=<exit code>` (for a run that must stop by itself; killed after 20 s).
fn run_to_exit(lab: &Lab, config: &Path) -> String {
    lab.exec(
        Host::Lb,
        &[
            "sh",
            "-c",
            &format!(
                "timeout 20 {} run --config {} --pin-path {} 2>&1; echo rc=$?",
                balancer_bin().unwrap().display(),
                config.display(),
                lab.pin_path().display()
            ),
        ],
    )
    .unwrap()
}

/// `count` connections to the web VIP: none fails and each of `backends` takes some.
fn assert_spread(lab: &Lab, count: usize, backends: &[&str], what: &str) {
    let r = lab.client_conns(vip4(ECHO_PORT), count, 200, 4).unwrap();
    assert_eq!(r.failed, 0, "{what}: {:?}", r.errors);
    for be in backends {
        assert!(r.by_backend.contains_key(*be), "{what}: {:?}", r.by_backend);
    }
}

/// No wall-clock bound: the order of events is asserted. be2 goes down once, by its active
/// check; every failed connection of the load sent at least its SYN to be2 through the
/// dataplane between the kill and that change (or was in flight at the kill), so the failures
/// are bounded by be2's forwarded packets in that window; after the change no new flow reaches
/// be2 and nothing fails. The detection time is printed.
#[test]
fn web_backend_killed_under_load_leaves_within_fall_times_interval() {
    const CONCURRENCY: u64 = 4;
    let lab = Lab::new(3).unwrap();
    let mut echo = lab.spawn_echo_all().unwrap();
    let health = format!(
        "health = {{ kind = \"http\", path = \"/health\", port = {HTTP_PORT}, interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n"
    );
    let mut b = lab
        .start_balancer(&(header(&lab) + &web_service(&lab, &health)))
        .unwrap();
    wait_until(Duration::from_secs(5), "all backends up", || {
        let st = status(&lab);
        st["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["health"] == "up")
    });
    let vip = vip4(ECHO_PORT).to_string();
    let load = spawn_tool(
        &lab,
        Host::Client,
        "blb-client",
        &[
            "rate",
            "--to",
            &vip,
            "--seconds",
            "5",
            "--concurrency",
            &CONCURRENCY.to_string(),
        ],
    );
    sleep(Duration::from_secs(1));
    let be2 = format!("{}:{ECHO_PORT}", Host::Backend(2).v4().unwrap());
    let traffic = |lab: &Lab, what: &str| {
        backend(&status(lab), "web", &be2)["traffic"][what]
            .as_u64()
            .unwrap()
    };
    let new_flows = |lab: &Lab| traffic(lab, "new_flows");
    let packets_before_kill = traffic(&lab, "packets");
    echo[1].kill(); // be2
    let took = wait_until(Duration::from_secs(5), "be2 marked down", || {
        backend(&status(&lab), "web", &be2)["state"] == "down"
    });
    let flows_at_down = new_flows(&lab);
    let packets_at_down = traffic(&lab, "packets");
    println!("be2 marked down {took:?} after the kill (checks every 200 ms, fall 2)");
    // From now on nothing goes to be2 and nothing fails.
    let r = lab.client_conns(vip4(ECHO_PORT), 200, 1000, 4).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert!(!r.by_backend.contains_key("be2"), "{:?}", r.by_backend);
    let done = load.wait_output(Duration::from_secs(20)).unwrap();
    let rate: balancer_tests::RateReport = serde_json::from_str(&done.stdout).unwrap();
    assert!(
        rate.by_backend.contains_key("be1") && rate.by_backend.contains_key("be3"),
        "{rate:?}"
    );
    // After the health change the dataplane created no flow to be2 (the load kept running).
    assert_eq!(
        new_flows(&lab),
        flows_at_down,
        "new flows to be2 after it went down"
    );
    // Only connections to be2 opened before the change may have failed: those in flight at
    // the kill (at most one per load worker) and those whose SYN the dataplane sent to it
    // between kill and change. (Not `new_flows`: a reused source port finds its old flow.)
    let to_be2 = packets_at_down - packets_before_kill;
    println!(
        "load: {} connections, {} failed; {to_be2} packets to be2 between kill and down",
        rate.ok + rate.failed,
        rate.failed
    );
    assert!(
        rate.failed <= to_be2 + CONCURRENCY,
        "{} failed, {to_be2} packets went to be2 between the kill and its health change: {rate:?}",
        rate.failed
    );
    // The change happened once, to down, by the active check (passive health is off here).
    b.stop().unwrap();
    let logs = b.logs();
    let changes: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("backend health changed") && l.contains(&be2))
        .collect();
    let downs: Vec<&&str> = changes.iter().filter(|l| l.contains("new=Down")).collect();
    assert_eq!(downs.len(), 1, "{changes:?}");
    assert!(!downs[0].contains("reason=passive:"), "{changes:?}");
}

/// Passive health: a killed backend (its kernel answers SYNs with RSTs) is marked down by the
/// dataplane's refused-flow counter. Its active check runs every 30 s: its first run passed at
/// start, so only passive health can take it down within this test, and the log says so.
#[test]
fn passive_health_takes_down_a_backend_that_refuses_new_flows() {
    let lab = Lab::new(3).unwrap();
    let mut echo = lab.spawn_echo_all().unwrap();
    let health = format!(
        "health = {{ kind = \"http\", path = \"/health\", port = {HTTP_PORT}, interval = \"30s\", timeout = \"1s\", rise = 3, fall = 2 }}\npassive_health = {{ failures = 5, window = \"1s\" }}\n"
    );
    let mut b = lab
        .start_balancer(&(header(&lab) + &web_service(&lab, &health)))
        .unwrap();
    let vip = vip4(ECHO_PORT).to_string();
    let load = spawn_tool(
        &lab,
        Host::Client,
        "blb-client",
        &["rate", "--to", &vip, "--seconds", "4", "--concurrency", "4"],
    );
    sleep(Duration::from_secs(1));
    echo[1].kill(); // be2 now refuses new connections
    let be2 = format!("{}:{ECHO_PORT}", Host::Backend(2).v4().unwrap());
    wait_until(Duration::from_secs(10), "be2 marked down", || {
        backend(&status(&lab), "web", &be2)["state"] == "down"
    });
    let be2_status = backend(&status(&lab), "web", &be2).clone();
    assert_eq!(be2_status["health"], "down", "{be2_status}");
    assert!(
        be2_status["traffic"]["refused"].as_u64().unwrap() >= 5,
        "{be2_status}"
    );
    // From now on nothing goes to be2 and nothing fails.
    let r = lab.client_conns(vip4(ECHO_PORT), 200, 1000, 4).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert!(!r.by_backend.contains_key("be2"), "{:?}", r.by_backend);
    let done = load.wait_output(Duration::from_secs(20)).unwrap();
    let rate: balancer_tests::RateReport = serde_json::from_str(&done.stdout).unwrap();
    println!(
        "passive health: {} connections, {} failed",
        rate.ok + rate.failed,
        rate.failed
    );
    b.stop().unwrap();
    let logs = b.logs();
    assert!(
        logs.contains("passive health: refused or unanswered new flows"),
        "{logs}"
    );
    // Exactly one health change of be2, and passive health made it.
    let changes: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("backend health changed") && l.contains(&be2))
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].contains("reason=passive:"), "{changes:?}");
}

fn hl7_config(lab: &Lab, failback: bool) -> String {
    header(lab)
        + &format!(
            r#"
[[service]]
name = "hl7-listener"
vip = "10.77.0.100:{HL7_PORT}"
protocol = "tcp"
forwarding = "nat"
scheduler = "failover"
failback = {failback}
health = {{ kind = "mllp", interval = "250ms", timeout = "200ms", rise = 2, fall = 2 }}
backends = [
  {{ address = "10.77.0.11:{HL7_PORT}", priority = 1 }},
  {{ address = "10.77.0.12:{HL7_PORT}", priority = 2 }},
]
"#
        )
}

fn active(lab: &Lab) -> String {
    status(lab)["services"][0]["active"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn hl7_failover_resets_the_sender_and_the_standby_acks_then_failback_only_when_asked() {
    let lab = Lab::new(2).unwrap();
    let listen = |i: usize, name: &str| {
        let mut c = spawn_tool(
            &lab,
            Host::Backend(i),
            "blb-mllp",
            &[
                "listen",
                "--name",
                name,
                "--addr",
                &format!("0.0.0.0:{HL7_PORT}"),
            ],
        );
        c.wait_for_output("blb-mllp ready", Duration::from_secs(10))
            .unwrap();
        c
    };
    let _a = listen(1, "hl7a");
    let _b = listen(2, "hl7b");
    let mut bal = lab.start_balancer(&hl7_config(&lab, false)).unwrap();
    wait_until(Duration::from_secs(5), "hl7a active", || {
        active(&lab) == "10.77.0.11:6661"
    });
    let marker = "ZZTESTPATIENT^MARKER";
    let sender = spawn_tool(
        &lab,
        Host::Client,
        "blb-mllp",
        &[
            "send",
            "--to",
            &format!("10.77.0.100:{HL7_PORT}"),
            "--seconds",
            "14",
            "--interval-ms",
            "50",
            "--ack-timeout",
            "5",
            "--patient",
            marker,
        ],
    );
    sleep(Duration::from_secs(2));
    // The active listener's server drops off the network: no FIN, no RST from it.
    lab.exec(Host::Backend(1), &["ip", "link", "set", "eth0", "down"])
        .unwrap();
    let failover = wait_until(Duration::from_secs(5), "failover to hl7b", || {
        active(&lab) == "10.77.0.12:6661"
    });
    // No wall-clock bound (the wait above fails the test after 5 s): the order of the log's
    // events is asserted at the end.
    println!("failover {failover:?} after the link went down (checks every 250 ms, fall 2)");
    sleep(Duration::from_secs(1));
    lab.exec(Host::Backend(1), &["ip", "link", "set", "eth0", "up"])
        .unwrap();
    wait_until(Duration::from_secs(5), "hl7a healthy again", || {
        backend(&status(&lab), "hl7-listener", "10.77.0.11:6661")["health"] == "up"
    });
    sleep(Duration::from_secs(2));
    assert_eq!(
        active(&lab),
        "10.77.0.12:6661",
        "failback = false: the recovered listener waits"
    );
    std::fs::write(bal.config_path(), hl7_config(&lab, true)).unwrap();
    let out = cli(&lab, &["reload"]).unwrap();
    assert!(out.contains("reloaded"), "{out}");
    wait_until(Duration::from_secs(3), "failback to hl7a", || {
        active(&lab) == "10.77.0.11:6661"
    });
    let done = sender.wait_output(Duration::from_secs(30)).unwrap();
    let r: Value = serde_json::from_str(&done.stdout).unwrap();
    let seq: Vec<String> = r["sequence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seq, ["hl7a", "hl7b", "hl7a"], "{r}");
    assert_eq!(r["timeouts"], 0, "a sender was left hanging: {r}");
    assert!(r["resets"].as_u64().unwrap() >= 2, "{r}");
    // The longest gap between ACKs is printed, not bounded: `timeouts == 0` says no message
    // waited longer than the sender's ACK timeout.
    println!("longest gap between ACKs: {} ms", r["max_gap_ms"]);
    assert!(r["errors"].as_array().unwrap().is_empty(), "{r}");
    // Patient data never reaches a log.
    bal.stop().unwrap();
    let logs = bal.logs();
    assert!(
        !logs.contains("ZZTESTPATIENT"),
        "marker in the balancer's log"
    );
    // Order: hl7a's health change to down, then the failover to hl7b it caused.
    let lines: Vec<&str> = logs.lines().collect();
    let hl7a_down = lines.iter().position(|l| {
        l.contains("backend health changed")
            && l.contains("10.77.0.11:6661")
            && l.contains("new=Down")
    });
    let to_hl7b = lines.iter().position(|l| {
        l.contains("failover: new active backend") && l.contains("to=10.77.0.12:6661")
    });
    match (hl7a_down, to_hl7b) {
        (Some(d), Some(f)) => assert!(d < f, "failover before the health change:\n{logs}"),
        _ => panic!("no health change of hl7a or no failover to hl7b in the log:\n{logs}"),
    }
}

#[test]
fn reload_good_and_bad_restart_and_kill9_keep_a_stream_byte_exact() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let cfg = header(&lab) + &web_service(&lab, "");
    let mut b = lab.start_balancer(&cfg).unwrap();
    let stream = lab.spawn_stream(vip4(ECHO_PORT), 12.0, 20).unwrap();
    let load = spawn_tool(
        &lab,
        Host::Client,
        "blb-client",
        &[
            "rate",
            "--to",
            &vip4(ECHO_PORT).to_string(),
            "--seconds",
            "3",
            "--concurrency",
            "1",
            "--timeout-ms",
            "5000",
        ],
    );
    // A bad file is refused with its place, and the running config keeps serving.
    std::fs::write(
        b.config_path(),
        cfg.replace("name = \"web\"", "name = \"web\"\nschedular = \"maglev\""),
    )
    .unwrap();
    let err = cli(&lab, &["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("balancer.toml:") && err.contains("schedular"),
        "{err}"
    );
    assert_eq!(status(&lab)["config_errors"], 1);
    // A good one applies.
    std::fs::write(
        b.config_path(),
        cfg.replace(
            "{ address = \"10.77.0.11:7002\" }",
            "{ address = \"10.77.0.11:7002\", weight = 3 }",
        ),
    )
    .unwrap();
    assert!(cli(&lab, &["reload"]).unwrap().contains("reloaded"));
    assert_eq!(
        backend(&status(&lab), "web", "10.77.0.11:7002")["weight"],
        3
    );
    // A SYN lost to a busy lab host is retried by TCP within the 5 s connect timeout; a reset
    // or a blackholed flow would still fail.
    let rate = load.wait_output(Duration::from_secs(20)).unwrap();
    let rate: balancer_tests::RateReport = serde_json::from_str(&rate.stdout).unwrap();
    assert_eq!(
        rate.failed,
        0,
        "{rate:?} {}",
        lab.counters().unwrap()["reasons"]
    );
    // A clean stop and a new start adopt the pinned dataplane.
    b.stop().unwrap();
    sleep(Duration::from_millis(500));
    let mut b = lab
        .start_balancer(&std::fs::read_to_string(b.config_path()).unwrap())
        .unwrap();
    assert!(b.logs().contains("adopted pinned maps"), "{}", b.logs());
    // kill -9 and start again.
    sleep(Duration::from_millis(500));
    b.kill9();
    sleep(Duration::from_millis(500));
    let b2 = lab
        .start_balancer(&std::fs::read_to_string(b.config_path()).unwrap())
        .unwrap();
    assert!(b2.logs().contains("adopted pinned maps"));
    let rep = stream_report(stream, Duration::from_secs(30)).unwrap();
    assert!(
        rep.ok,
        "stream broke: {:?}\nreasons: {}\n{}",
        rep.error,
        lab.counters()
            .map(|c| c["reasons"].clone())
            .unwrap_or_default(),
        b2.logs()
    );
    assert!(rep.chunks > 300, "{rep:?}");
    let r = lab.client_conns(vip4(ECHO_PORT), 60, 500, 4).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

#[test]
fn cli_status_drain_disable_enable_and_socket_is_root_only() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let b = lab
        .start_balancer(&(header(&lab) + &web_service(&lab, "")))
        .unwrap();
    let table = cli(&lab, &["status"]).unwrap();
    assert!(
        table.contains("web") && table.contains("10.77.0.11:7002"),
        "{table}"
    );
    cli(&lab, &["drain", "web", "10.77.0.11:7002"]).unwrap();
    assert_eq!(
        backend(&status(&lab), "web", "10.77.0.11:7002")["state"],
        "draining"
    );
    let stream = lab.spawn_stream(vip4(ECHO_PORT), 4.0, 20).unwrap();
    cli(&lab, &["disable", "web", "10.77.0.12"]).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 60, 500, 4).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert_eq!(
        r.by_backend.keys().collect::<Vec<_>>(),
        ["be3"],
        "{:?}",
        r.by_backend
    );
    let rep = stream_report(stream, Duration::from_secs(20)).unwrap();
    assert!(
        rep.ok || rep.backend == "be2",
        "a stream on a live backend broke: {rep:?}"
    );
    // Operator states survive a controller restart.
    let mut b = b;
    b.stop().unwrap();
    let _b = lab
        .start_balancer(&std::fs::read_to_string(b.config_path()).unwrap())
        .unwrap();
    let st = status(&lab);
    assert_eq!(
        backend(&st, "web", "10.77.0.11:7002")["admin"],
        "drain",
        "{st}"
    );
    assert_eq!(
        backend(&st, "web", "10.77.0.12:7002")["admin"],
        "disabled",
        "{st}"
    );
    cli(&lab, &["enable", "web", "10.77.0.11:7002"]).unwrap();
    cli(&lab, &["enable", "web", "10.77.0.12:7002"]).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 90, 500, 4).unwrap();
    assert_eq!((r.failed, r.by_backend.len()), (0, 3), "{:?}", r.by_backend);
    assert!(cli(&lab, &["drain", "web", "10.9.9.9:1"]).is_err());
    assert!(cli(&lab, &["drain", "nosuch", "10.77.0.11:7002"]).is_err());
    // Not root: refused.
    let bin = balancer_bin().unwrap();
    let out = lab
        .exec(
            Host::Lb,
            &["sh", "-c", &format!("setpriv --reuid=65534 --regid=65534 --clear-groups {} status --socket {} ; echo rc=$?", bin.display(), socket(&lab).display())],
        )
        .unwrap();
    assert!(out.contains("rc=1"), "{out}");
}

#[test]
fn sd_notify_messages() {
    let lab = Lab::new(1).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let sock_path = lab.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cfg = lab
        .write_file("b.toml", &(header(&lab) + &web_service(&lab, "")))
        .unwrap();
    let mut cmd = lab.command(Host::Lb, balancer_bin().unwrap());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .arg("--pin-path")
        .arg(lab.pin_path());
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000");
    let mut b = lab
        .spawn_command(cmd, "[lb] balancer run (notify)")
        .unwrap();
    let mut seen = Vec::new();
    let mut recv = |want: &str| {
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        while t.elapsed() < Duration::from_secs(10) {
            let n = sock.recv(&mut buf).unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(msg.clone());
            if msg.contains(want) {
                return msg;
            }
        }
        panic!("no {want} in {seen:?}");
    };
    recv("READY=1");
    recv("WATCHDOG=1");
    b.signal(libc::SIGHUP).unwrap();
    let reloading = recv("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    recv("READY=1");
    b.signal(libc::SIGTERM).unwrap();
    recv("STOPPING=1");
}

#[test]
fn a_bad_file_attaches_nothing_and_a_layout_change_replaces_the_pins() {
    let lab = Lab::new(1).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let good = header(&lab) + &web_service(&lab, "");
    let bad = lab
        .write_file("bad.toml", &good.replace("vip = ", "vipp = "))
        .unwrap();
    let out = run_to_exit(&lab, &bad);
    assert!(
        out.contains("bad.toml:") && out.contains("vipp") && out.contains("rc=1"),
        "{out}"
    );
    let link = lab.exec(Host::Lb, &["ip", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "a program was attached: {link}");
    // A running dataplane, then a restart with another flow-table size: replaced, not adopted.
    let mut b = lab.start_balancer(&good).unwrap();
    b.stop().unwrap();
    let bigger = good.replace(
        "interface = \"eth0\"\n",
        "interface = \"eth0\"\nflow_table_size = 131072\n",
    );
    let b2 = lab.start_balancer(&bigger).unwrap();
    assert!(
        b2.logs().contains("does not match: replacing it"),
        "{}",
        b2.logs()
    );
    let r = lab.client_conns(vip4(ECHO_PORT), 20, 100, 2).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
}

/// The controller issue's scenario: a reload that cannot be applied (an IPv6 NAT service, and
/// the balancer has no global IPv6 address left) is refused before any map write, and every
/// old backend keeps taking new connections.
#[test]
fn a_refused_reload_keeps_every_old_backend_serving() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let cfg = header(&lab) + &web_service(&lab, "");
    let b = lab.start_balancer(&cfg).unwrap();
    let spread = |what: &str| assert_spread(&lab, 120, &["be1", "be2", "be3"], what);
    spread("before");
    let lb6 = Host::Lb.v6().unwrap();
    lab.exec(
        Host::Lb,
        &[
            "ip",
            "-6",
            "addr",
            "del",
            &format!("{lb6}/64"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let without_be3 = cfg.replace(&format!(", {{ address = \"10.77.0.13:{ECHO_PORT}\" }}"), "");
    assert_ne!(without_be3, cfg);
    let v6 = format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"[fd77::100]:{ECHO_PORT}\"\nbackends = [ {{ address = \"[fd77::11]:{ECHO_PORT}\" }} ]\n"
    );
    std::fs::write(b.config_path(), without_be3 + &v6).unwrap();
    let err = cli(&lab, &["reload"]).unwrap_err().to_string();
    assert!(
        err.contains("no SNAT address") && err.contains("nothing changed"),
        "{err}"
    );
    let st = status(&lab);
    assert_eq!(st["config_errors"], 1);
    assert_eq!(st["reloads"], 0);
    let services = st["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{st}");
    let backends = services[0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 3, "{st}");
    assert!(backends.iter().all(|b| b["state"] == "up"), "{st}");
    spread("after the refused reload");
}

/// A second `balancer run` on the same control socket (an operator starting one by hand
/// beside the service, here with a config that drops a backend and the same pins) stops at
/// the socket with a clear error, before it touches the pinned maps or the interface: the
/// running balancer keeps every backend, its socket and its program.
#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start_and_changes_nothing() {
    let lab = Lab::new(2).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let cfg = header(&lab) + &web_service(&lab, "");
    let mut first = lab.start_balancer(&cfg).unwrap();
    let spread = |what: &str| assert_spread(&lab, 80, &["be1", "be2"], what);
    spread("before");
    let one_backend = cfg.replace(&format!(", {{ address = \"10.77.0.12:{ECHO_PORT}\" }}"), "");
    assert_ne!(one_backend, cfg);
    let second = lab.write_file("second.toml", &one_backend).unwrap();
    let out = run_to_exit(&lab, &second);
    assert!(
        out.contains("is in use: is another balancer running?") && out.contains("rc=1"),
        "{out}"
    );
    assert!(!out.contains("xdp attached"), "{out}");
    assert!(first.is_running(), "{}", first.logs());
    let st = status(&lab);
    let backends = st["services"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{st}");
    spread("after the refused second daemon");
}
