//! `cargo xtask bench`: bulk TCP throughput (iperf3) and short-connection rate (blb-client)
//! through a namespace lab, directly, through the balancer (XDP, nat) and through an nftables
//! DNAT balancer; the balancer's own XDP ns/packet bench; HL7 failover time and health change
//! → map update latency; the MLLP relay (`mode = "mllp"`) beside the L4 path and a direct
//! connection (latency added per message, messages/s through one relay core); the L7 proxy
//! beside HAProxy (wrk); the HA pair's takeovers (keepalived) under a NAT stream and an HL7
//! sender.
//!
//! Every path gets a fresh lab of its own. Numbers are printed, never asserted.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result, bail};
use balancer_tests::{
    ECHO_PORT, Host, Lab, LabChild, LabConfig, VIP_V4, balancer_bin,
    pair::{self, Node},
    stream_report, vip4,
};

use crate::sigint;

/// Port of the iperf3 service (one backend: iperf3's control and data connections must meet
/// the same server).
const IPERF_PORT: u16 = 5201;

/// Bench options.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seconds per throughput and per rate measurement.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Parallel connection workers for the rate measurement.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// BPF_PROG_TEST_RUN calls per case for `balancer-xdp-bench`.
    #[arg(long, default_value_t = 1_000_000)]
    pub calls: u64,
    /// Use the release binaries already built instead of building first.
    #[arg(long)]
    pub no_build: bool,
    /// Run only the MLLP relay measurement.
    #[arg(long)]
    pub mllp_only: bool,
    /// Run only the HA pair takeover measurement.
    #[arg(long)]
    pub pair_only: bool,
    /// Run only the status and metrics answers during reloads.
    #[arg(long)]
    pub status_only: bool,
    /// Run only the namespace lab's table (direct, kernel forwarding, balancer, nftables).
    #[arg(long)]
    pub lab_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    /// Client to backend 1 through the lb host's kernel as a plain router (both directions,
    /// no NAT, no XDP): the hops the balancer adds, without the balancing.
    Forward,
    Balancer,
    Nftables,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct (client -> backend)",
            Path::Forward => "kernel forwarding via lb",
            Path::Balancer => "balancer (XDP, nat)",
            Path::Nftables => "nftables DNAT (jhash)",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Row {
    gbit_per_s: Option<f64>,
    conns_per_s: Option<f64>,
    failed_conns: u64,
    note: Option<String>,
}

/// Runs every bench and prints the tables.
pub fn run(opts: &Options) -> Result<()> {
    if opts.mllp_only {
        return bench_mllp();
    }
    if opts.pair_only {
        return bench_pair();
    }
    if opts.status_only {
        return bench_status_during_reload();
    }
    let paths = [Path::Direct, Path::Forward, Path::Balancer, Path::Nftables];
    let mut rows = Vec::new();
    for path in paths {
        sigint::check()?;
        println!("\n== bench: {} ==", path.label());
        let row = match measure(path, opts) {
            Ok(r) => r,
            Err(e) => {
                sigint::check()?;
                println!("  failed: {e:#}");
                Row {
                    note: Some(first_line(&format!("{e:#}"))),
                    ..Row::default()
                }
            }
        };
        rows.push((path, row));
    }
    sigint::check()?;
    print_table(&rows, opts);
    sigint::check()?;
    if let Err(e) = bench_wide(opts) {
        println!("  64-backend bench failed: {e:#}");
    }
    if opts.lab_only {
        return Ok(());
    }
    sigint::check()?;
    bench_xdp(opts.calls);
    sigint::check()?;
    if let Err(e) = bench_failover() {
        println!("  failover bench failed: {e:#}");
    }
    sigint::check()?;
    if let Err(e) = bench_mllp() {
        println!("  mllp bench failed: {e:#}");
    }
    sigint::check()?;
    if let Err(e) = bench_status_during_reload() {
        println!("  status bench failed: {e:#}");
    }
    sigint::check()?;
    if let Err(e) = bench_pair() {
        println!("  pair bench failed: {e:#}");
    }
    sigint::check()?;
    bench_l7(opts);
    Ok(())
}

/// One `GET /v1/status` on the control socket; returns how long the answer took.
fn status_call(socket: &std::path::Path) -> Result<std::time::Duration> {
    use std::io::{Read as _, Write as _};
    let t = std::time::Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: balancer\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    if !out.starts_with(b"HTTP/1.1 200") {
        anyhow::bail!(
            "status answered {:?}",
            String::from_utf8_lossy(&out[..out.len().min(40)])
        );
    }
    Ok(t.elapsed())
}

/// One Prometheus scrape of the metrics endpoint (in the lab's balancer namespace);
/// returns how long the answer took.
/// Timed as curl saw it (`time_total`), not counting the process start.
fn metrics_call(ns: &str, addr: &str) -> Result<std::time::Duration> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
        ])
        .args([
            "-w",
            "%{http_code} %{time_total}",
            &format!("http://{addr}/metrics"),
        ])
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().split_once(' ') {
        Some(("200", secs)) => Ok(std::time::Duration::from_secs_f64(secs.parse()?)),
        _ => anyhow::bail!("metrics answered {:?}", text.trim()),
    }
}

/// Calls `f` every 5 ms on a thread of its own until `stop` (at most 120 s): how many calls
/// and the slowest.
fn poll_worst(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut f: impl FnMut() -> Result<std::time::Duration> + Send + 'static,
) -> std::thread::JoinHandle<Result<(usize, std::time::Duration)>> {
    std::thread::spawn(move || {
        let mut n = 0;
        let mut worst = std::time::Duration::ZERO;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until
        {
            worst = worst.max(f()?);
            n += 1;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok((n, worst))
    })
}

/// Status answers while the daemon reloads a big config (60 services of 60 backends, full
/// Maglev rings): the slowest status answer and the slowest metrics scrape beside the
/// reload's own duration (what an answer that queued behind the reload would take).
fn bench_status_during_reload() -> Result<()> {
    println!("\n== status and metrics during reload (60 services x 60 backends, ring 65537) ==");
    let lab = Lab::new(1)?;
    let socket = lab.dir().join("control.sock");
    const METRICS: &str = "127.0.0.1:9550";
    let mut cfg = format!(
        "[dataplane]\ninterface = \"eth0\"\n\n[controller]\nsocket = \"{}\"\nmetrics = \"{METRICS}\"\n",
        socket.display()
    );
    for s in 0..60u16 {
        let backends: Vec<String> = (0..60u16)
            .map(|b| format!("{{ address = \"10.77.0.{}:{}\" }}", 11 + b, 8000 + s))
            .collect();
        cfg.push_str(&format!(
            "\n[[service]]\nname = \"s{s}\"\nvip = \"10.77.0.100:{}\"\nbackends = [ {} ]\n",
            8000 + s,
            backends.join(", ")
        ));
    }
    let b = lab.start_balancer(&cfg)?;
    // At rest first: what an answer costs with no reload running (60 services' counters).
    let mut rest: Vec<std::time::Duration> = (0..20)
        .map(|_| status_call(&socket))
        .collect::<Result<_>>()?;
    let lb_ns = lab.ns(Host::Lb);
    let mut rest_m: Vec<std::time::Duration> = (0..10)
        .map(|_| metrics_call(&lb_ns, METRICS))
        .collect::<Result<_>>()?;
    rest.sort_unstable();
    rest_m.sort_unstable();
    println!(
        "  at rest: status median {:.1} ms, slowest {:.1} ms; metrics median {:.1} ms, slowest {:.1} ms",
        rest[rest.len() / 2].as_secs_f64() * 1e3,
        rest[rest.len() - 1].as_secs_f64() * 1e3,
        rest_m[rest_m.len() / 2].as_secs_f64() * 1e3,
        rest_m[rest_m.len() - 1].as_secs_f64() * 1e3,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let socket = socket.clone();
        poll_worst(stop.clone(), move || status_call(&socket))
    };
    let scraper = poll_worst(stop.clone(), move || metrics_call(&lb_ns, METRICS));
    let mut reloads = Vec::new();
    for i in 0..3 {
        sigint::check()?;
        // A changed weight everywhere: every ring is rebuilt.
        let next = cfg.replace(" }", &format!(", weight = {} }}", 2 + i));
        std::fs::write(b.config_path(), &next)?;
        let t = std::time::Instant::now();
        let out = lab.balancer_cli(&["reload", "--socket", &socket.to_string_lossy()])?;
        reloads.push(t.elapsed());
        if !out.contains("reloaded") {
            anyhow::bail!("reload: {out}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, worst) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("status reader panicked"))??;
    let (scrapes, worst_scrape) = scraper
        .join()
        .map_err(|_| anyhow::anyhow!("metrics scraper panicked"))??;
    reloads.sort_unstable();
    println!(
        "  reload (balancer reload, 3600 backends): median {:.0} ms, max {:.0} ms",
        reloads[reloads.len() / 2].as_secs_f64() * 1e3,
        reloads[reloads.len() - 1].as_secs_f64() * 1e3
    );
    println!(
        "  status answers during the reloads: {n}, slowest {:.1} ms (a status queued behind a reload would wait up to the reload's time)",
        worst.as_secs_f64() * 1e3
    );
    println!(
        "  metrics scrapes during the reloads: {scrapes}, slowest {:.1} ms",
        worst_scrape.as_secs_f64() * 1e3
    );
    Ok(())
}

/// HL7 failover: the active listener's server drops off the network while a sender streams a
/// message every 20 ms; measured: the longest gap between two ACKs (the last from the dead
/// listener, the first from the standby), and the daemon's health-change → map-update times.
fn bench_failover() -> Result<()> {
    println!("\n== HL7 failover (mllp check 250 ms, fall 2) and health change -> map update ==");
    let mut gaps = Vec::new();
    let mut updates_us: Vec<u64> = Vec::new();
    for round in 0..3 {
        sigint::check()?;
        let lab = Lab::new(2)?;
        let mut listeners = Vec::new();
        for (i, name) in [(1, "hl7a"), (2, "hl7b")] {
            let mut c = lab.spawn_tool(
                Host::Backend(i),
                "blb-mllp",
                &["listen", "--name", name, "--addr", "0.0.0.0:6661"],
            )?;
            c.wait_for_output("blb-mllp ready", std::time::Duration::from_secs(10))?;
            listeners.push(c);
        }
        let cfg = format!(
            "[dataplane]\ninterface = \"eth0\"\n\n[controller]\nsocket = \"{}\"\n{}",
            lab.dir().join("control.sock").display(),
            crate::demo::CONTROLLER_CONFIG
        );
        let b = lab.start_balancer(&cfg)?;
        let mut cmd = lab.command(Host::Client, balancer_tests::tool_bin("blb-mllp")?);
        cmd.args([
            "send",
            "--to",
            "10.77.0.100:6661",
            "--seconds",
            "4",
            "--interval-ms",
            "20",
            "--ack-timeout",
            "5",
        ]);
        let sender = lab.spawn_command(cmd, "[c] blb-mllp send")?;
        std::thread::sleep(std::time::Duration::from_millis(1500));
        lab.exec(Host::Backend(1), &["ip", "link", "set", "eth0", "down"])?;
        let done = sender.wait_output(std::time::Duration::from_secs(30))?;
        let r: serde_json::Value = serde_json::from_str(&done.stdout)?;
        let gap = r["max_gap_ms"].as_u64().unwrap_or(0);
        println!(
            "  round {}: longest gap between ACKs {gap} ms; ACKs {} ; resets {} timeouts {}",
            round + 1,
            r["sequence"],
            r["resets"],
            r["timeouts"]
        );
        gaps.push(gap);
        for part in b.logs().split("map_update_us=").skip(1) {
            if let Some(n) = part
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
            {
                updates_us.push(n);
            }
        }
    }
    gaps.sort_unstable();
    updates_us.sort_unstable();
    println!(
        "  failover (listener gone -> first ACK from the standby, upper bound incl. the 20 ms send interval): median {} ms, max {} ms",
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    if !updates_us.is_empty() {
        println!(
            "  health change -> map update: {} changes, median {} us, max {} us",
            updates_us.len(),
            updates_us[updates_us.len() / 2],
            updates_us[updates_us.len() - 1]
        );
    }
    Ok(())
}

/// One `blb-mllp bench` run from the client.
fn mllp_bench_run(
    lab: &Lab,
    to: &str,
    connections: usize,
    seconds: f64,
) -> Result<serde_json::Value> {
    let bin = balancer_tests::tool_bin("blb-mllp")?;
    let out = lab.exec(
        Host::Client,
        &[
            &bin.to_string_lossy(),
            "bench",
            "--to",
            to,
            "--connections",
            &connections.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("blb-mllp bench")?;
    if v["errors"].as_u64().unwrap_or(0) > 0 || v["messages"].as_u64().unwrap_or(0) == 0 {
        bail!("{to}: {v}");
    }
    Ok(v)
}

/// The MLLP relay beside the L4 path: one listener, reached directly, through an L4
/// failover service (XDP, nat) and through a `mode = "mllp"` service (the controller's
/// relay: one thread with a single-threaded runtime, so at most one core). Per message: the
/// sender writes it and waits for its ACK, back to back on one connection (latency) or on
/// 16 (messages/s). Nothing is pinned: pinning the balancer to one CPU and the peers to the
/// other measured the scheduler (a competing process on the relay's CPU), not the relay.
fn bench_mllp() -> Result<()> {
    println!(
        "\n== MLLP relay (mode = \"mllp\") beside L4 and direct: ACK round trip, messages/s =="
    );
    let lab = Lab::new(1)?;
    let bin = balancer_tests::tool_bin("blb-mllp")?;
    let mut listener = lab.spawn(
        Host::Backend(1),
        &[
            &bin.to_string_lossy(),
            "listen",
            "--name",
            "hl7a",
            "--addr",
            "0.0.0.0:6661",
            "--quiet",
        ],
    )?;
    listener.wait_for_output("blb-mllp ready", std::time::Duration::from_secs(10))?;
    let socket = lab.dir().join("control.sock");
    let cfg = format!(
        r#"[dataplane]
interface = "eth0"

[controller]
socket = "{}"

[[service]]
name = "hl7-l4"
vip = "{VIP_V4}:6662"
scheduler = "failover"
health = {{ kind = "mllp", interval = "1s" }}
backends = [ {{ address = "10.77.0.11:6661" }} ]

[[service]]
name = "hl7-relay"
vip = "{VIP_V4}:6661"
scheduler = "failover"
mode = "mllp"
health = {{ kind = "mllp", interval = "1s" }}
backends = [ {{ address = "10.77.0.11:6661" }} ]
"#,
        socket.display()
    );
    let b = lab.start_balancer(&cfg)?;
    let relay = format!("{VIP_V4}:6661");
    let t0 = std::time::Instant::now();
    while mllp_bench_run(&lab, &relay, 1, 0.1).is_err() {
        if t0.elapsed() > std::time::Duration::from_secs(15) {
            bail!("the relay did not get an active listener");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let paths = [
        ("direct (sender -> listener)", "10.77.0.11:6661".to_string()),
        ("L4 failover (XDP, nat)", format!("{VIP_V4}:6662")),
        ("MLLP relay (controller)", relay.clone()),
    ];
    let mut rows = Vec::new();
    for (label, to) in &paths {
        sigint::check()?;
        let v = mllp_bench_run(&lab, to, 1, 3.0)?;
        rows.push((*label, v));
    }
    let us = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0) as i64;
    println!(
        "  {:<30} {:>12} {:>9} {:>9} {:>14} {:>14}",
        "path (1 connection)", "msgs/s", "p50 us", "p99 us", "added p50 us", "added p99 us"
    );
    let direct = rows[0].1.clone();
    for (label, v) in &rows {
        println!(
            "  {:<30} {:>12.0} {:>9} {:>9} {:>14} {:>14}",
            label,
            v["per_sec"].as_f64().unwrap_or(0.0),
            us(v, "p50_us"),
            us(v, "p99_us"),
            us(v, "p50_us") - us(&direct, "p50_us"),
            us(v, "p99_us") - us(&direct, "p99_us"),
        );
    }
    for (label, to) in [
        ("direct", "10.77.0.11:6661".to_string()),
        ("MLLP relay", relay),
    ] {
        sigint::check()?;
        let v = mllp_bench_run(&lab, &to, 16, 5.0)?;
        println!(
            "  {label}, 16 connections: {:.0} messages/s (p50 {} us, p99 {} us){}",
            v["per_sec"].as_f64().unwrap_or(0.0),
            us(&v, "p50_us"),
            us(&v, "p99_us"),
            if label == "direct" {
                ""
            } else {
                " — relay on one core"
            },
        );
    }
    let status = lab.balancer_cli(&["status", "--json", "--socket", &socket.to_string_lossy()])?;
    let st: serde_json::Value = serde_json::from_str(&status)?;
    let m = &st["mllp"]["services"][0];
    println!(
        "  relay counters: relayed {}, replayed {}, unacked {}, frame errors {}",
        m["relayed"], m["replayed"], m["unacked"], m["frame_errors"]
    );
    drop(b);
    Ok(())
}

/// A fault of the active balancer of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairFault {
    /// `kill -9` of its controller and keepalived, both restarted afterwards (as systemd
    /// would).
    Kill,
    /// `ip link set eth0 down`, up again afterwards.
    LinkDown,
    /// SIGTERM to its controller (the track file hands the addresses over), started again.
    Stop,
}

impl PairFault {
    fn label(self) -> &'static str {
        match self {
            PairFault::Kill => "kill -9 (controller + keepalived)",
            PairFault::LinkDown => "link down",
            PairFault::Stop => "clean stop (SIGTERM)",
        }
    }
}

/// One takeover as the bench saw it.
#[derive(Debug, Clone)]
struct PairRound {
    takeover_ms: u64,
    stall_ms: u64,
    stream_error: Option<String>,
    gap_ms: u64,
    resets: u64,
    listeners: Vec<String>,
}

/// The HA pair's takeovers: the pair lab (two balancers with keepalived, 100 ms adverts), a
/// NAT stream (a chunk every 20 ms) and an HL7 sender (a message every 20 ms) through the
/// VIP, three rounds of each fault of the active balancer; the old active comes back as
/// standby each time, so the two take turns. Measured: the takeover (fault to the new
/// active holding the VIP, polled every 20 ms as the pair lab does), the stream's longest
/// round trip, the sender's longest gap between two ACKs, its resets and the listeners that
/// answered it.
fn bench_pair() -> Result<()> {
    println!(
        "\n== HA pair takeover (keepalived, 100 ms adverts): NAT stream and HL7 sender, every 20 ms =="
    );
    let lab = Lab::with_config(LabConfig {
        backends: 3,
        peer: true,
        ..LabConfig::default()
    })?;
    let _servers = pair::prepare_backends(&lab)?;
    let key = pair::key_file(&lab)?;
    let mut nodes = [
        Node::new(&lab, Host::Lb, "lb1", &key)?,
        Node::new(&lab, Host::Peer, "lb2", &key)?,
    ];
    {
        let [a, b] = &mut nodes;
        pair::start_pair(&lab, a, b)?;
    }
    lab.resolve_neighbours(Host::Client)?;
    let mut active = 0;
    let mut results = Vec::new();
    for fault in [PairFault::Kill, PairFault::LinkDown, PairFault::Stop] {
        let mut rounds = Vec::new();
        for round in 0..3 {
            sigint::check()?;
            let [a, b] = &mut nodes;
            let (x, y) = if active == 0 { (a, b) } else { (b, a) };
            let r = pair_round(&lab, x, y, fault)
                .with_context(|| format!("{} round {}", fault.label(), round + 1))?;
            println!(
                "  {:<34} round {}: {} -> {} in {} ms; stream stall {} ms{}; HL7 ACK gap {} ms, resets {}, listeners {}",
                fault.label(),
                round + 1,
                x.name,
                y.name,
                r.takeover_ms,
                r.stall_ms,
                r.stream_error
                    .as_ref()
                    .map(|e| format!(" (BROKE: {})", first_line(e)))
                    .unwrap_or_default(),
                r.gap_ms,
                r.resets,
                r.listeners.join(",")
            );
            rounds.push(r);
            active = 1 - active;
        }
        results.push((fault, rounds));
    }
    let med_max = |mut v: Vec<u64>| -> String {
        v.sort_unstable();
        format!("{} / {}", v[v.len() / 2], v[v.len() - 1])
    };
    println!(
        "\n  {:<34} {:>15} {:>17} {:>16} {:>7} {:>9} {:>7}",
        "fault (3 rounds, median / max)",
        "takeover ms",
        "stream stall ms",
        "HL7 ACK gap ms",
        "resets",
        "listeners",
        "broken"
    );
    for (fault, rounds) in &results {
        println!(
            "  {:<34} {:>15} {:>17} {:>16} {:>7} {:>9} {:>7}",
            fault.label(),
            med_max(rounds.iter().map(|r| r.takeover_ms).collect()),
            med_max(rounds.iter().map(|r| r.stall_ms).collect()),
            med_max(rounds.iter().map(|r| r.gap_ms).collect()),
            rounds.iter().map(|r| r.resets).sum::<u64>(),
            rounds.iter().map(|r| r.listeners.len()).max().unwrap_or(0),
            rounds.iter().filter(|r| r.stream_error.is_some()).count(),
        );
    }
    println!(
        "  (takeover: the fault to the new active holding the VIP; stall: the stream's longest chunk round trip, \
         20 ms apart; ACK gap: the longest time between two ACKs, an upper bound incl. the 20 ms send interval; \
         listeners: most HL7 listeners that answered one sender)"
    );
    Ok(())
}

/// One round: a stream and a sender through the VIP, `fault` on `x` (active), `y` takes over,
/// `x` comes back as standby.
fn pair_round(lab: &Lab, x: &mut Node, y: &mut Node, fault: PairFault) -> Result<PairRound> {
    use std::time::Duration;
    let seconds = 7.0;
    let stream = lab.spawn_stream(vip4(ECHO_PORT), seconds, 20)?;
    let mut cmd = lab.command(Host::Client, balancer_tests::tool_bin("blb-mllp")?);
    cmd.args([
        "send",
        "--to",
        &vip4(pair::HL7_PORT).to_string(),
        "--seconds",
        &seconds.to_string(),
        "--interval-ms",
        "20",
        "--ack-timeout",
        "5",
    ]);
    let sender = lab.spawn_command(cmd, "[c] blb-mllp send")?;
    std::thread::sleep(Duration::from_millis(1500));
    // The standby has the flows before the fault.
    pair::wait_mirrored(lab, y, 2, Duration::from_secs(5))?;
    let limit = Duration::from_secs(10);
    let takeover = match fault {
        PairFault::Kill => {
            x.balancer.as_mut().context("no balancer")?.kill9();
            x.kill_keepalived(lab);
            // Its addresses stay on its interface until keepalived runs again.
            let t = pair::wait_active(lab, y, x, false, limit)?;
            x.start_balancer(lab)?;
            x.start_keepalived(lab)?;
            t
        }
        PairFault::LinkDown => {
            lab.exec(x.host, &["ip", "link", "set", "eth0", "down"])?;
            let t = pair::wait_active(lab, y, x, true, limit)?;
            lab.exec(x.host, &["ip", "link", "set", "eth0", "up"])?;
            t
        }
        PairFault::Stop => {
            x.balancer.as_mut().context("no balancer")?.stop()?;
            let t = pair::wait_active(lab, y, x, true, limit)?;
            x.start_balancer(lab)?;
            t
        }
    };
    pair::wait_role(lab, x, "standby", Duration::from_secs(15))?;
    let s = stream_report(stream, Duration::from_secs(60))?;
    let done = sender.wait_output(Duration::from_secs(60))?;
    let h: serde_json::Value = serde_json::from_str(done.stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("HL7 sender report {:?}", done.stdout))?;
    let listeners = h["by_listener"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    Ok(PairRound {
        takeover_ms: u64::try_from(takeover.as_millis()).unwrap_or(u64::MAX),
        stall_ms: s.max_stall_ms,
        stream_error: if s.ok {
            None
        } else {
            s.error.or(Some("failed".into()))
        },
        gap_ms: h["max_gap_ms"].as_u64().unwrap_or(0),
        resets: h["resets"].as_u64().unwrap_or(0),
        listeners,
    })
}

/// The L7 proxy beside HAProxy: `l7-bench` from balancer-l7 (wrk, same certificate and
/// backends).
fn bench_l7(opts: &Options) {
    println!("\n== L7: HTTPS through the proxy beside HAProxy (wrk) ==");
    let result = (|| -> Result<()> {
        if !opts.no_build {
            crate::cmd::build_release(&["balancer-l7"])?;
        }
        let bin = balancer_bin()?.with_file_name("l7-bench");
        let out = Command::new(&bin)
            .args(["--duration", &opts.seconds.max(5).to_string()])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!(
                "{}",
                first_line(String::from_utf8_lossy(&out.stderr).trim())
            );
        }
        Ok(())
    })();
    if let Err(e) = result {
        println!("  l7 bench not available ({e:#})");
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(100).collect()
}

/// One lab: 3 backends with blb-echo and iperf3 on backend 1, the path's forwarding set up,
/// then throughput and rate measured from the client.
fn measure(path: Path, opts: &Options) -> Result<Row> {
    let lab = Lab::new(3)?;
    let _echo = lab.spawn_echo_all()?;
    let _iperf = spawn_iperf_server(&lab)?;
    // Every path starts with warm neighbour tables, as it would after a health-check round.
    lab.resolve_neighbours(Host::Lb)?;
    let mut _balancer = None;
    let (tput_to, rate_to): (SocketAddr, SocketAddr) = match path {
        Path::Direct => {
            let b1 = Host::Backend(1).v4().context("backend address")?;
            ((b1, IPERF_PORT).into(), (b1, ECHO_PORT).into())
        }
        Path::Forward => {
            let b1 = kernel_forwarding(&lab)?;
            ((b1, IPERF_PORT).into(), (b1, ECHO_PORT).into())
        }
        Path::Balancer => {
            _balancer = Some(lab.start_balancer(&balancer_config(&lab, None))?);
            (vip4(IPERF_PORT), vip4(ECHO_PORT))
        }
        Path::Nftables => {
            nft_dnat(&lab)?;
            (vip4(IPERF_PORT), vip4(ECHO_PORT))
        }
    };
    let mut row = Row::default();
    sigint::check()?;
    match iperf(&lab, tput_to, opts.seconds) {
        Ok(g) => {
            println!("  throughput: {g:.2} Gbit/s");
            row.gbit_per_s = Some(g);
        }
        Err(e) => println!("  throughput failed: {e:#}"),
    }
    sigint::check()?;
    let r = lab.client_rate(rate_to, opts.seconds as f64, opts.concurrency)?;
    println!(
        "  rate: {:.0} conns/s ({} ok, {} failed, spread {:?})",
        r.conns_per_sec, r.ok, r.failed, r.by_backend
    );
    for e in r.errors.iter().take(3) {
        println!("  rate error: {e}");
    }
    row.conns_per_s = Some(r.conns_per_sec);
    row.failed_conns = r.failed;
    Ok(row)
}

fn spawn_iperf_server(lab: &Lab) -> Result<LabChild> {
    let port = IPERF_PORT.to_string();
    let mut s = lab.spawn(
        Host::Backend(1),
        &["iperf3", "-s", "-p", &port, "--forceflush"],
    )?;
    s.wait_for_output("Server listening", std::time::Duration::from_secs(10))?;
    Ok(s)
}

/// Bulk TCP throughput from the client, in Gbit/s as received by the server.
fn iperf(lab: &Lab, to: SocketAddr, seconds: u64) -> Result<f64> {
    let out = lab.exec(
        Host::Client,
        &[
            "iperf3",
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            &seconds.to_string(),
            "--connect-timeout",
            "3000",
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing iperf3 -J")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3 output")?;
    Ok(bps / 1e9)
}

/// The balancer's config for the bench: iperf3 to backend 1, echo over all backends; the
/// flow table's size when given.
fn balancer_config(lab: &Lab, flow_table_size: Option<u32>) -> String {
    let table = flow_table_size
        .map(|n| format!("flow_table_size = {n}\n"))
        .unwrap_or_default();
    let echo: Vec<String> = lab
        .backend_hosts()
        .iter()
        .filter_map(|h| h.v4())
        .map(|a| format!("{{ address = \"{a}:{ECHO_PORT}\" }}"))
        .collect();
    format!(
        r#"[dataplane]
interface = "eth0"
xdp_mode = "auto"
{table}
[[service]]
name = "echo"
vip = "{VIP_V4}:{ECHO_PORT}"
protocol = "tcp"
forwarding = "nat"
scheduler = "maglev"
backends = [ {} ]

[[service]]
name = "iperf"
vip = "{VIP_V4}:{IPERF_PORT}"
protocol = "tcp"
forwarding = "nat"
scheduler = "maglev"
backends = [ {{ address = "10.77.0.11:{IPERF_PORT}" }} ]
{}"#,
        echo.join(", "),
        lab.controller_section()
    )
}

/// Backends of the wide bench.
const WIDE_BACKENDS: usize = 64;

/// Entries of the balancer's flow table in [`bench_wide`]: 8,192 NAT flows, the smallest table
/// `check` accepts without a warning on 2 CPUs; a few seconds of short connections create
/// many times that, so past the first second nearly every new connection evicts.
const WIDE_TABLE: u32 = 16384;

/// Short connections over 64 backends with the flow table far past full: the balancer with
/// `flow_table_size = WIDE_TABLE` beside nftables DNAT over the same 64, a fresh lab each.
/// (A table below the warning's size loses a new flow's entry now and then to the kernel
/// LRU's batched eviction, and that connection waits a second for its SYN retry: at 1,024
/// entries the rate fell to a tenth.)
fn bench_wide(opts: &Options) -> Result<()> {
    println!(
        "\n== short connections over {WIDE_BACKENDS} backends, flow table past full ({WIDE_TABLE} entries) =="
    );
    let mut rates = Vec::new();
    for path in [Path::Balancer, Path::Nftables] {
        sigint::check()?;
        let lab = Lab::new(WIDE_BACKENDS)?;
        let _echo = lab.spawn_echo_all()?;
        lab.resolve_neighbours(Host::Lb)?;
        let _b = match path {
            Path::Balancer => Some(lab.start_balancer(&balancer_config(&lab, Some(WIDE_TABLE)))?),
            _ => {
                nft_dnat(&lab)?;
                None
            }
        };
        let r = lab.client_rate(vip4(ECHO_PORT), opts.seconds as f64, opts.concurrency)?;
        println!(
            "  {:<28} {:>8.0} conns/s ({} ok, {} failed, {} backends answered)",
            path.label(),
            r.conns_per_sec,
            r.ok,
            r.failed,
            r.by_backend.len()
        );
        if path == Path::Balancer {
            // Where a lost handshake went: a backend's SYN-ACK to a SNAT port whose reply
            // entry was evicted is passed (the kernel resets it) and counted here.
            let reasons = lab.counters()?["reasons"].clone();
            let n = |k: &str| reasons[k].as_u64().unwrap_or(0);
            println!(
                "    reasons: pass_no_reply_flow {}, drop_flow_table {}, drop_snat_exhausted {}, port_taken {}",
                n("pass_no_reply_flow"),
                n("drop_flow_table"),
                n("drop_snat_exhausted"),
                n("port_taken")
            );
        }
        rates.push(r.conns_per_sec);
    }
    if let [b, n] = rates[..] {
        println!("  balancer vs nftables: {}", ratio(Some(b), Some(n)));
    }
    Ok(())
}

/// Routes client <-> backend 1 through the lb host (host routes on both ends, redirects
/// off, forwarding on); returns backend 1's address.
fn kernel_forwarding(lab: &Lab) -> Result<std::net::Ipv4Addr> {
    let lb = Host::Lb.v4().context("lb address")?.to_string();
    let client = Host::Client.v4().context("client address")?;
    let b1 = Host::Backend(1).v4().context("backend address")?;
    for k in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        lab.exec(Host::Lb, &["sysctl", "-qw", k])?;
    }
    for (host, to) in [(Host::Client, b1), (Host::Backend(1), client)] {
        lab.exec(
            host,
            &["sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"],
        )?;
        lab.exec(
            host,
            &["sysctl", "-qw", "net.ipv4.conf.eth0.accept_redirects=0"],
        )?;
        lab.exec(
            host,
            &[
                "ip",
                "route",
                "add",
                &format!("{to}/32"),
                "via",
                &lb,
                "dev",
                "eth0",
            ],
        )?;
    }
    Ok(b1)
}

/// An nftables balancer on the lb host: the VIP on eth0, DNAT by a jhash of the source over
/// the backends, masquerade so replies come back through it (like the balancer's nat mode).
fn nft_dnat(lab: &Lab) -> Result<()> {
    lab.exec(
        Host::Lb,
        &["ip", "addr", "add", &format!("{VIP_V4}/32"), "dev", "eth0"],
    )?;
    let backends: Vec<String> = lab
        .backend_hosts()
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.v4().map(|a| format!("{i} : {a}")))
        .collect();
    let n = backends.len();
    let rules = format!(
        "table ip blb_bench {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP_V4} tcp dport {ECHO_PORT} dnat to jhash ip saddr . tcp sport mod {n} map {{ {} }}
    ip daddr {VIP_V4} tcp dport {IPERF_PORT} dnat to 10.77.0.11
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat ip daddr 10.77.0.0/24 masquerade
  }}
}}
",
        backends.join(", ")
    );
    let file = lab.write_file("bench.nft", &rules)?;
    lab.exec(Host::Lb, &["nft", "-f", &file.to_string_lossy()])?;
    Ok(())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "n/a".into())
}

fn print_table(rows: &[(Path, Row)], opts: &Options) {
    let get = |p: Path| rows.iter().find(|(q, _)| *q == p).map(|(_, r)| r.clone());
    let direct = get(Path::Direct).unwrap_or_default();
    let nft = get(Path::Nftables).unwrap_or_default();
    println!(
        "\n== namespace lab: {} s each, iperf3 1 stream to 1 backend, rate with {} workers over 3 backends ==",
        opts.seconds, opts.concurrency
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7}",
        "path", "Gbit/s", "vs direct", "vs nft", "conns/s", "vs direct", "vs nft", "failed"
    );
    for (path, r) in rows {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7}",
            path.label(),
            num(r.gbit_per_s, 2),
            ratio(r.gbit_per_s, direct.gbit_per_s),
            ratio(r.gbit_per_s, nft.gbit_per_s),
            num(r.conns_per_s, 0),
            ratio(r.conns_per_s, direct.conns_per_s),
            ratio(r.conns_per_s, nft.conns_per_s),
            r.failed_conns,
        );
        if let Some(n) = &r.note {
            println!("{:<28} ({n})", "");
        }
    }
}

/// `balancer-xdp-bench --calls N` (the test bed's tool), its table printed as it is.
fn bench_xdp(calls: u64) {
    println!("\n== XDP ns/packet (BPF_PROG_TEST_RUN, repeat=1) ==");
    let result = (|| -> Result<()> {
        let bin = crate::cmd::release_dir().join("balancer-xdp-bench");
        let out = Command::new(&bin)
            .args(["--calls", &calls.to_string()])
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("{}", first_line(stderr.trim()));
        }
        print!("{stdout}");
        Ok(())
    })();
    if let Err(e) = result {
        println!("bench-xdp: not available ({e:#})");
    }
}
