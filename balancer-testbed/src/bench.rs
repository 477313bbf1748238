//! `balancer-xdp-bench`: ns/packet through BPF_PROG_TEST_RUN (kernel-measured, `repeat = 1`
//! per call) beside a bare XDP_PASS program, and Maglev table build times.

use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Instant};

use balancer::{config, control::state::State, dataplane::maglev};

use crate::{LB_MAC, Testbed, host_mac, packet, run_prog};

/// The config the testbed benches and packet tables use (interface `t0` of the testbed).
pub const TESTBED_CONFIG: &str = r#"
[dataplane]
interface = "t0"

[[service]]
name = "web"
vip = "10.77.0.100:7002"
backends = [ { address = "10.77.0.11:7002" }, { address = "10.77.0.12:7002" }, { address = "10.77.0.13:7002" } ]

[[service]]
name = "web6"
vip = "[fd77::100]:7002"
backends = [ { address = "[fd77::11]:7002" }, { address = "[fd77::12]:7002" }, { address = "[fd77::13]:7002" } ]

[[service]]
name = "direct"
vip = "10.77.0.100:7003"
forwarding = "dsr"
backends = [ { address = "10.77.0.11:7003" }, { address = "10.77.0.12:7003" }, { address = "10.77.0.13:7003" } ]

[[service]]
name = "dns"
vip = "10.77.0.100:5353"
protocol = "udp"
backends = [ { address = "10.77.0.11:5353" }, { address = "10.77.0.12:5353" } ]

[[service]]
name = "bench"
vip = "10.77.0.100:7010"
backends = [ BENCH_BACKENDS ]

[[service]]
name = "hl7"
vip = "10.77.0.100:6661"
scheduler = "failover"
on_backend_down = "drop"
backends = [ { address = "10.77.0.11:6661", priority = 1 }, { address = "10.77.0.12:6661", priority = 2 } ]
"#;

/// A testbed with [`TESTBED_CONFIG`] applied.
pub fn configured_testbed(flow_entries: u32) -> anyhow::Result<(Testbed, State)> {
    configured_testbed_with(flow_entries, "")
}

/// A testbed with [`TESTBED_CONFIG`] applied, `dataplane` added to its `[dataplane]`
/// section (e.g. `snat_ipv4 = [...]`).
pub fn configured_testbed_with(
    flow_entries: u32,
    dataplane: &str,
) -> anyhow::Result<(Testbed, State)> {
    configured_testbed_more(flow_entries, dataplane, "")
}

/// As [`configured_testbed_with`], with `services` (more `[[service]]` tables) appended.
pub fn configured_testbed_more(
    flow_entries: u32,
    dataplane: &str,
    services: &str,
) -> anyhow::Result<(Testbed, State)> {
    let mut tb = Testbed::new(flow_entries)?;
    let backends: Vec<String> = (11..=74)
        .map(|h| format!("{{ address = \"10.77.0.{h}:7010\" }}"))
        .collect();
    let text = TESTBED_CONFIG
        .replace("BENCH_BACKENDS", &backends.join(", "))
        .replace(
            "interface = \"t0\"\n",
            &format!("interface = \"t0\"\n{dataplane}\n"),
        )
        + services;
    let cfg =
        config::parse(&text, Path::new("testbed.toml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let p = balancer::control::reconcile(
        &mut tb.dp,
        &cfg,
        None,
        &Default::default(),
        &Default::default(),
    )?;
    Ok((tb, p.next))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("literal address")
}

/// Runs the XDP benches and returns a table.
pub fn xdp(calls: u32) -> anyhow::Result<String> {
    // A service whose new-flow limit is always reached: the cost of the flood limiter.
    let (mut tb, _st) = configured_testbed_more(
        balancer_common::DEFAULT_FLOW_ENTRIES,
        "",
        r#"
[[service]]
name = "limited"
vip = "10.77.0.100:7011"
new_flow_rate = 1
backends = [ { address = "10.77.0.11:7011" }, { address = "10.77.0.12:7011" }, { address = "10.77.0.13:7011" } ]
"#,
    )?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "XDP ns/packet (BPF_PROG_TEST_RUN, repeat=1, {calls} calls each, kernel-measured)"
    );
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40000");
    let nonvip = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        sa("10.77.0.1:22"),
        1,
        0,
        packet::ACK,
        &[],
    );

    let time = |prog: &aya::programs::Xdp,
                pkt: &mut Vec<u8>,
                ifindex: u32,
                vary: bool|
     -> anyhow::Result<(f64, u32)> {
        let mut total = 0u128;
        let mut verdict = 0;
        for i in 0..calls {
            if vary {
                // A distinct client (address and port) per call: every call is a new flow.
                let ip = 0x0a01_0000u32 + (i >> 14);
                pkt[26..30].copy_from_slice(&ip.to_be_bytes());
                let port = 1024 + (i & 0x3fff) as u16;
                pkt[34..36].copy_from_slice(&port.to_be_bytes());
            }
            let (v, _, d) = run_prog(prog, pkt, ifindex)?;
            verdict = v;
            total += d.as_nanos();
        }
        Ok((total as f64 / calls as f64, verdict))
    };
    let ifindex = tb.ifindex;
    let mut rows: Vec<(&str, f64, u32)> = Vec::new();
    {
        let base = tb.dp.baseline_program()?;
        let mut p = nonvip.clone();
        let (ns, v) = time(base, &mut p, ifindex, false)?;
        rows.push(("baseline XDP_PASS program", ns, v));
    }
    let prog = tb.dp.program()?;
    // The verifier's work on the program: its limit is 1,000,000 instructions, and a load
    // that takes long is more likely to be interrupted by a signal (EAGAIN, retried).
    let verified = prog
        .info()
        .ok()
        .and_then(|i| i.verified_instruction_count());
    let mut p = nonvip.clone();
    let (ns, v) = time(prog, &mut p, ifindex, false)?;
    rows.push(("non-VIP packet (pass)", ns, v));
    // New flows spread over a 64-backend service, as a busy farm would.
    let mut syn = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        sa("10.77.0.100:7010"),
        1000,
        0,
        packet::SYN,
        &[],
    );
    let (ns, v) = time(prog, &mut syn, ifindex, true)?;
    rows.push(("new TCP flow (SYN, full NAT)", ns, v));
    // Past the service's new-flow limit (1 a second per CPU): each SYN is a new client, and
    // dropped before its flow is made.
    let mut limited = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        sa("10.77.0.100:7011"),
        1000,
        0,
        packet::SYN,
        &[],
    );
    let (ns, v) = time(prog, &mut limited, ifindex, true)?;
    rows.push(("SYN past new_flow_rate (flood limiter)", ns, v));
    let mut ack = packet::tcp(host_mac(2), LB_MAC, client, vip, 1001, 1, packet::ACK, &[]);
    let (v0, out0) = tb.run(&ack)?;
    let (ns, v) = time(prog, &mut ack, ifindex, false)?;
    rows.push(("established flow (ACK, full NAT)", ns, v));
    // The reply to that flow: from the backend the ACK went to, to the SNAT port it got.
    if v0 != 3 {
        let reasons: Vec<_> = tb
            .dp
            .reasons()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        anyhow::bail!("the ACK was not transmitted (verdict {v0}); reasons so far: {reasons:?}");
    }
    let be = SocketAddr::new(
        std::net::Ipv4Addr::new(out0[30], out0[31], out0[32], out0[33]).into(),
        u16::from_be_bytes([out0[36], out0[37]]),
    );
    let snat = SocketAddr::new(
        std::net::Ipv4Addr::new(out0[26], out0[27], out0[28], out0[29]).into(),
        u16::from_be_bytes([out0[34], out0[35]]),
    );
    let last = be
        .ip()
        .to_string()
        .rsplit('.')
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(11);
    let mut reply = packet::tcp(host_mac(last), LB_MAC, be, snat, 1, 1002, packet::ACK, &[]);
    let (ns, v) = time(prog, &mut reply, ifindex, false)?;
    rows.push(("reply (reverse NAT)", ns, v));
    let _ = writeln!(out, "{:<36} {:>10} {:>8}", "path", "ns/packet", "verdict");
    for (name, ns, v) in &rows {
        let verdict = match v {
            1 => "DROP",
            2 => "PASS",
            3 => "TX",
            4 => "REDIRECT",
            _ => "other",
        };
        let _ = writeln!(out, "{name:<36} {ns:>10.1} {verdict:>8}");
    }
    let reasons: Vec<String> = tb
        .dp
        .reasons()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    let _ = writeln!(out, "verdict reasons over the run: {}", reasons.join(" "));
    if let Some(n) = verified {
        let _ = writeln!(out, "verifier: {n} instructions processed (limit 1000000)");
    }
    drop(tb);

    let _ = writeln!(out, "\nMaglev table build, M=65537 (median of 15)");
    for n in [10u32, 100, 1000] {
        let entries: Vec<maglev::Entry> = (0..n)
            .map(|i| maglev::Entry {
                name: format!("10.{}.{}.{}:7002", i / 65536, (i / 256) % 256, i % 256),
                weight: 1,
                value: i,
            })
            .collect();
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&entries, 65537);
                std::hint::black_box(&table);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let _ = writeln!(out, "N={n:<5} {:>8.3} ms", times[7]);
    }
    Ok(out)
}
