//! An HA pair: two balancers (`lb`, `lb2`) with Debian's keepalived (see
//! `balancer_tests::pair`). While a NAT stream, a DSR stream and an HL7 sender (a message
//! every 20 ms) run through the VIPs, the active balancer is faulted in turn: `kill -9` of its
//! controller and keepalived (restarted afterwards, as systemd would), its link taken down
//! (and up again), and a clean stop (SIGTERM) and start. Each time the other takes over and
//! the old one comes back as standby (no preemption). Every stream must stay byte-exact
//! without a reset, the HL7 sender must get every ACK from one listener, and new connections
//! must succeed. Under load: 5,000 new flows/s through the active balancer, held open; after a
//! `kill -9` takeover every flow that existed a second before the fault still echoes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use balancer_tests::{
    Host, Lab, LabChild,
    pair::{DSR_VIP, HL7_PORT, Node, PairLab, pair_lab, wait_active, wait_mirrored, wait_role},
    report::HoldReport,
    stream_report, tool_bin, vip4,
};

/// The HL7 sender's report (`blb-mllp send`).
fn hl7_report(child: LabChild) -> serde_json::Value {
    let done = child
        .wait_output(Duration::from_secs(120))
        .expect("hl7 sender ends");
    serde_json::from_str(done.stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("hl7 report: {e}: {:?} {:?}", done.stdout, done.stderr))
}

#[test]
fn the_pair_survives_kill_link_down_and_stop_of_the_active_balancer() {
    let PairLab {
        lab,
        servers: _servers,
        mut a,
        b,
    } = pair_lab().expect("pair lab");

    // Long-lived flows through the VIPs for the whole test.
    let seconds = 45.0;
    let mut nat = lab
        .spawn_stream(vip4(7002), seconds, 20)
        .expect("nat stream");
    let mut dsr = lab
        .spawn_stream(SocketAddr::new(DSR_VIP.into(), 7002), seconds, 20)
        .expect("dsr stream");
    let hl7 = {
        let bin = tool_bin("blb-mllp").expect("blb-mllp");
        let mut cmd = lab.command(Host::Client, bin);
        cmd.args([
            "send",
            "--to",
            &vip4(HL7_PORT).to_string(),
            "--seconds",
            &format!("{seconds}"),
            "--interval-ms",
            "20",
        ]);
        lab.spawn_command(cmd, "[c] blb-mllp send").expect("sender")
    };
    // The standby has the streams' flows before anything fails.
    sleep(Duration::from_secs(2));
    wait_mirrored(&lab, &b, 3, Duration::from_secs(5)).expect("mirrored");
    // Drain the streams' backends on the active balancer: the standby follows, both rings
    // leave them out, so after a takeover only the mirrored flow entries keep the streams on
    // their backends (a balancer without them would hash the flows to another backend).
    for (stream, service) in [(&mut nat, "web"), (&mut dsr, "web-dsr")] {
        let backend = stream_backend(stream);
        let addr = format!("10.77.0.1{}:7002", &backend[2..]);
        lab.balancer_cli_on(
            a.host,
            &[
                "drain",
                service,
                &addr,
                "--socket",
                &a.socket.to_string_lossy(),
            ],
        )
        .expect("drain");
        wait_admin(&lab, &b, service, &addr, "drain");
    }

    let mut takeovers = Vec::new();
    let mut new_conns_failed = 0;
    // 1. kill -9 of the active's controller and keepalived.
    a.balancer.as_mut().expect("a").kill9();
    a.kill_keepalived(&lab);
    // keepalived was killed too: the addresses stay on its interface until it is restarted.
    takeovers.push((
        "kill -9",
        wait_active(&lab, &b, &a, false, Duration::from_secs(5)).expect("takeover"),
    ));
    // systemd restarts both: the old active comes back as standby (no preemption) and
    // keepalived takes the addresses it left behind off its interface.
    a.start_balancer(&lab).expect("restart");
    a.start_keepalived(&lab).expect("restart keepalived");
    wait_role(&lab, &a, "standby", Duration::from_secs(10)).expect("standby");
    assert!(
        !a.holds_vip(&lab),
        "the restarted keepalived left the VIP on lb1"
    );
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;
    sleep(Duration::from_secs(2));

    // 2. The active's link goes down.
    lab.exec(b.host, &["ip", "link", "set", "eth0", "down"])
        .expect("link down");
    takeovers.push((
        "link down",
        wait_active(&lab, &a, &b, true, Duration::from_secs(5)).expect("takeover"),
    ));
    lab.exec(b.host, &["ip", "link", "set", "eth0", "up"])
        .expect("link up");
    wait_role(&lab, &b, "standby", Duration::from_secs(10)).expect("standby");
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;
    sleep(Duration::from_secs(2));

    // 3. A clean stop of the active controller, then its start.
    assert!(a.balancer.as_mut().expect("a").stop().expect("stop"));
    takeovers.push((
        "stop",
        wait_active(&lab, &b, &a, true, Duration::from_secs(5)).expect("takeover"),
    ));
    a.start_balancer(&lab).expect("start");
    wait_role(&lab, &a, "standby", Duration::from_secs(10)).expect("standby");
    let r = lab.client_conns(vip4(7002), 30, 256, 5).expect("conns");
    new_conns_failed += r.failed;

    let nat = stream_report(nat, Duration::from_secs(90)).expect("nat report");
    let dsr = stream_report(dsr, Duration::from_secs(90)).expect("dsr report");
    let hl7 = hl7_report(hl7);
    eprintln!("takeovers (until the new active holds the VIP): {takeovers:?}");
    eprintln!(
        "nat stream: ok {} chunks {} longest round trip {} ms",
        nat.ok, nat.chunks, nat.max_stall_ms
    );
    eprintln!(
        "dsr stream: ok {} chunks {} longest round trip {} ms",
        dsr.ok, dsr.chunks, dsr.max_stall_ms
    );
    eprintln!("hl7 sender: {hl7}");
    let logs = format!("{}\n{}", a.logs(), b.logs());
    assert!(nat.ok, "nat stream broke: {:?}\n{logs}", nat.error);
    assert!(dsr.ok, "dsr stream broke: {:?}\n{logs}", dsr.error);
    assert_eq!(hl7["resets"], 0, "hl7 sender saw resets: {hl7}\n{logs}");
    assert_eq!(hl7["sent"], hl7["acked"], "hl7 messages unacked: {hl7}");
    assert_eq!(
        hl7["sequence"].as_array().map(Vec::len),
        Some(1),
        "hl7 ACKs came from more than one listener: {hl7}"
    );
    assert_eq!(new_conns_failed, 0, "new connections failed\n{logs}");
    // Patient data never reaches a log.
    assert!(!logs.contains("DOE^JANE"), "a patient name is in a log");
}

/// New connections per second through each VIP (NAT and DSR: 5,000/s in all), and for how
/// long: 10,000 connections held open, a thread each in the backends' `blb-echo`.
const HOLD_RATE: u64 = 2500;
const HOLD_SECONDS: f64 = 2.0;

/// Starts `blb-client hold` towards `to`; its check round starts once `check` exists.
fn spawn_hold(lab: &Lab, to: SocketAddr, check: &std::path::Path) -> LabChild {
    let bin = tool_bin("blb-client").expect("blb-client");
    let mut cmd = lab.command(Host::Client, bin);
    cmd.args([
        "hold",
        "--to",
        &to.to_string(),
        "--rate",
        &HOLD_RATE.to_string(),
        "--seconds",
        &HOLD_SECONDS.to_string(),
        "--check-file",
        &check.to_string_lossy(),
        "--wait-seconds",
        "60",
    ]);
    lab.spawn_command(cmd, &format!("[c] blb-client hold --to {to}"))
        .expect("hold client")
}

fn hold_report(child: LabChild) -> HoldReport {
    let done = child
        .wait_output(Duration::from_secs(90))
        .expect("hold client ends");
    serde_json::from_str(done.stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("hold report: {e}: {:?} {:?}", done.stdout, done.stderr))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The mirror counters of a node's status, for the test's output.
fn mirror_line(lab: &Lab, n: &Node) -> String {
    match n.status(lab) {
        Some(s) => {
            let m = &s["ha"]["mirror"];
            format!(
                "{}: flows sent {} applied {} unknown {}, ring-buffer events dropped {}, sync messages lost {}, resyncs sent {} received {}",
                n.name,
                m["flows_sent"],
                m["flows_applied"],
                m["flows_unknown"],
                m["events_dropped"],
                m["lost"],
                m["resyncs_sent"],
                m["resyncs_received"]
            )
        }
        None => format!("{}: no answer", n.name),
    }
}

#[test]
fn flows_opened_at_5000_per_second_survive_a_takeover() {
    let PairLab {
        lab,
        servers: _servers,
        mut a,
        b,
    } = pair_lab().expect("pair lab");

    let check = lab.dir().join("hold-check");
    let mut nat = spawn_hold(&lab, vip4(7002), &check);
    let mut dsr = spawn_hold(&lab, SocketAddr::new(DSR_VIP.into(), 7002), &check);
    for c in [&mut nat, &mut dsr] {
        c.wait_for_output("hold: opening", Duration::from_secs(10))
            .expect("hold client starts");
    }
    let t0 = Instant::now();
    // Part way through the opening: be1 and be2 drained on the active balancer (the standby
    // follows), so both rings send new flows to be3 only. The flows opened so far on be1 and
    // be2 (about two thirds of them) then keep their backend after the takeover only through
    // their mirrored entries: a balancer without them would hash them to be3, which resets
    // them.
    sleep(Duration::from_millis(700));
    for service in ["web", "web-dsr"] {
        for backend in ["10.77.0.11:7002", "10.77.0.12:7002"] {
            lab.balancer_cli_on(
                a.host,
                &[
                    "drain",
                    service,
                    backend,
                    "--socket",
                    &a.socket.to_string_lossy(),
                ],
            )
            .expect("drain");
        }
    }
    for service in ["web", "web-dsr"] {
        for backend in ["10.77.0.11:7002", "10.77.0.12:7002"] {
            wait_admin(&lab, &b, service, backend, "drain");
        }
    }
    let drained = t0.elapsed();
    // The fault while the clients are still opening (or, on a slow machine, right after the
    // drain reached the standby).
    let fault_at = Duration::from_millis(1800).max(drained + Duration::from_millis(200));
    if let Some(d) = fault_at.checked_sub(t0.elapsed()) {
        sleep(d);
    }
    let before = mirror_line(&lab, &a);
    let fault_ms = unix_ms();
    let fault_after = t0.elapsed();
    a.balancer.as_mut().expect("a").kill9();
    a.kill_keepalived(&lab);
    let takeover = wait_active(&lab, &b, &a, false, Duration::from_secs(5)).expect("takeover");
    for c in [&mut nat, &mut dsr] {
        c.wait_for_output("hold: opened", Duration::from_secs(30))
            .expect("hold client opened");
    }
    // The check round on every connection; "old" ones were opened at least a second before
    // the fault.
    sleep(Duration::from_millis(500));
    std::fs::write(&check, format!("{}\n", fault_ms - 1000)).expect("check file");
    let nat = hold_report(nat);
    let dsr = hold_report(dsr);
    let after = mirror_line(&lab, &b);

    eprintln!(
        "drained after {:.2} s, fault after {:.2} s, takeover {takeover:?}",
        drained.as_secs_f64(),
        fault_after.as_secs_f64()
    );
    for (name, r) in [("nat", &nat), ("dsr", &dsr)] {
        eprintln!(
            "{name}: opened {} (failed to open {}) in {:.2} s ({:.0}/s), by backend {:?}; \
             old (>= 1 s before the fault) {} ok {} failed {}; younger {} ok {} failed {}; check {} ms",
            r.opened,
            r.failed_to_open,
            r.open_seconds,
            r.opened as f64 / r.open_seconds.max(0.001),
            r.by_backend,
            r.old.opened,
            r.old.ok,
            r.old.failed,
            r.young.opened,
            r.young.ok,
            r.young.failed,
            r.check_ms
        );
        for e in r.open_errors.iter().chain(&r.errors).take(5) {
            eprintln!("  {name}: {e}");
        }
    }
    eprintln!("active before the fault: {before}");
    eprintln!("new active after the check: {after}");
    let logs = format!("{}\n{}", a.logs(), b.logs());
    for (name, r) in [("nat", &nat), ("dsr", &dsr)] {
        // Most of the connections are old ones (the test means something), and on the
        // drained backends too.
        assert!(
            r.old.opened as f64 >= 0.25 * HOLD_RATE as f64 * HOLD_SECONDS,
            "{name}: only {} connections opened a second before the fault: {r:?}",
            r.old.opened
        );
        assert_eq!(
            r.old.failed, 0,
            "{name}: connections opened a second before the fault broke: {:?}\n{logs}",
            r.errors
        );
    }
}

/// The backend a stream connected to (`be<i>`), from its first line.
fn stream_backend(stream: &mut LabChild) -> String {
    stream
        .wait_for_output("stream connected to ", Duration::from_secs(10))
        .expect("stream connected");
    let err = stream.stderr();
    err.lines()
        .find_map(|l| l.strip_prefix("stream connected to "))
        .map(|b| b.trim().to_string())
        .expect("backend name")
}

/// Waits until `node`'s status shows `backend` of `service` in operator state `admin`.
fn wait_admin(lab: &Lab, node: &Node, service: &str, backend: &str, admin: &str) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let got = node.status(lab).and_then(|s| {
            s["services"]
                .as_array()?
                .iter()
                .find(|x| x["name"] == service)?["backends"]
                .as_array()?
                .iter()
                .find(|b| b["address"] == backend)
                .and_then(|b| b["admin"].as_str().map(str::to_string))
        });
        if got.as_deref() == Some(admin) {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    panic!(
        "{} does not show {service} {backend} as {admin}\n{}",
        node.name,
        node.logs()
    );
}

/// Runs a scapy snippet in `host` (Debian's python3-scapy).
fn scapy(lab: &Lab, host: Host, code: &str) -> String {
    lab.exec(host, &["/usr/bin/python3", "-c", code])
        .unwrap_or_else(|e| panic!("scapy in {host}: {e:#}"))
}

fn mirror_counter(lab: &Lab, n: &Node, field: &str) -> u64 {
    n.status(lab)
        .and_then(|s| s["ha"]["mirror"][field].as_u64())
        .unwrap_or(0)
}

#[test]
fn forged_and_replayed_sync_messages_are_dropped_and_counted() {
    let PairLab {
        lab,
        servers: _servers,
        a: _a,
        b,
    } = pair_lab().expect("pair lab");
    let role_b = b.role(&lab);
    let applied = mirror_counter(&lab, &b, "flows_applied");
    // A forged datagram with the peer's source address (the sync header, a body, a tag that
    // is not the key's), sent from the client's namespace: dropped for its MAC.
    scapy(
        &lab,
        Host::Client,
        "from scapy.all import *\n\
         body = b'BLBS' + bytes([1,0,0,0]) + (2**62).to_bytes(8,'big') + (1).to_bytes(8,'big') + b'\\x03' + bytes(32)\n\
         send(IP(src='10.77.0.1', dst='10.77.0.3')/UDP(sport=7946, dport=7946)/Raw(body), verbose=0)",
    );
    // A real datagram of lb1, captured on the switch and sent again: dropped as a replay.
    scapy(
        &lab,
        Host::Switch,
        "from scapy.all import *\n\
         p = sniff(iface='lb', filter='udp and src host 10.77.0.1 and dst port 7946', count=1, timeout=5)\n\
         assert len(p) == 1, 'no sync datagram seen'\n\
         sendp(p[0], iface='lb2', verbose=0)",
    );
    // From an address that is not the peer's: dropped before its MAC is even checked.
    scapy(
        &lab,
        Host::Client,
        "from scapy.all import *\n\
         send(IP(dst='10.77.0.3')/UDP(sport=7946, dport=7946)/Raw(b'BLBS' + bytes(80)), verbose=0)",
    );
    let t0 = std::time::Instant::now();
    let (mut auth, mut replay, mut foreign) = (0, 0, 0);
    while t0.elapsed() < Duration::from_secs(5) {
        auth = mirror_counter(&lab, &b, "dropped_auth");
        replay = mirror_counter(&lab, &b, "dropped_replay");
        foreign = mirror_counter(&lab, &b, "dropped_foreign");
        if auth >= 1 && replay >= 1 && foreign >= 1 {
            break;
        }
        sleep(Duration::from_millis(50));
    }
    let logs = b.logs();
    assert!(auth >= 1, "forged datagram not counted\n{logs}");
    assert!(replay >= 1, "replayed datagram not counted\n{logs}");
    assert!(foreign >= 1, "foreign datagram not counted\n{logs}");
    assert_eq!(b.role(&lab), role_b, "the standby's role changed");
    assert_eq!(
        mirror_counter(&lab, &b, "flows_applied"),
        applied,
        "a dropped datagram installed flows"
    );
    assert!(
        logs.contains("pair sync") && !logs.contains("BLBS"),
        "drops are logged without content\n{logs}"
    );
}

#[test]
fn a_detached_dataplane_hands_the_addresses_to_the_peer() {
    let PairLab {
        lab,
        servers: _servers,
        a,
        b,
    } = pair_lab().expect("pair lab");
    // Unpinning the active's XDP link detaches its program (the controller keeps no handle).
    let link = lab.pin_path_of(Host::Lb).join("link-eth0");
    std::fs::remove_file(&link).expect("unpin the link");
    let took = wait_active(&lab, &b, &a, true, Duration::from_secs(5)).expect("takeover");
    eprintln!("takeover after the dataplane was detached: {took:?}");
    assert!(
        a.logs()
            .contains("the XDP program is no longer attached to every interface"),
        "{}",
        a.logs()
    );
    assert_eq!(a.role(&lab), "fault");
}
