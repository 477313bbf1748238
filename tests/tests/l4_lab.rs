//! Layer-4 labs with real traffic through the XDP dataplane (issue: dataplane).
//!
//! Topology (see `balancer_tests::lab`): client 10.77.0.2, balancer 10.77.0.1 with the VIP
//! 10.77.0.100 / fd77::100, backends 10.77.0.11–13 running `blb-echo` (an 8-byte id header,
//! then a byte-exact echo), all on one bridge. Each test has its own lab and cleans it up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{thread::sleep, time::Duration};

use balancer_tests::{ECHO_PORT, Host, Lab, sample_config, stream_report, vip4, vip6};

fn backends_v4(lab: &Lab, port: u16) -> String {
    lab.backend_hosts()
        .into_iter()
        .filter_map(|h| h.v4())
        .map(|a| format!("{{ address = \"{a}:{port}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn assert_spread(by: &std::collections::BTreeMap<String, u64>, total: u64, n: u64) {
    let ideal = total as f64 / n as f64;
    assert_eq!(by.len() as u64, n, "every backend served: {by:?}");
    for (b, c) in by {
        let dev = (*c as f64 - ideal).abs() / ideal;
        assert!(
            dev <= 0.30,
            "backend {b} got {c} of {total} (ideal {ideal:.0}): {by:?}"
        );
    }
}

#[test]
fn nat_300_connections_echo_byte_exact_and_spread_evenly() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let _b = lab.start_balancer(&sample_config(&lab, "nat")).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 300, 3000, 8).unwrap();
    assert_eq!((r.ok, r.failed), (300, 0), "errors: {:?}", r.errors);
    assert_spread(&r.by_backend, 300, 3);
    let c = lab.counters().unwrap();
    let svc = &c["services"][0];
    assert!(svc["new_flows"].as_u64().unwrap() >= 300, "{svc}");
    assert_eq!(c["reasons"]["drop_snat_exhausted"], 0);
}

/// Counts, on every backend, the SYNs to the echo port from each SNAT address of `pool`
/// (an nftables counter per address), summed over the backends.
fn syns_by_source(lab: &Lab, pool: &[&str], install: bool) -> Vec<u64> {
    let mut total = vec![0; pool.len()];
    for h in lab.backend_hosts() {
        if install {
            let mut script = String::from(
                "table ip blbt_pool {\n chain input {\n  type filter hook input priority 0;\n",
            );
            for a in pool {
                script += &format!(
                    "  ip saddr {a} tcp dport {ECHO_PORT} tcp flags & (syn | ack) == syn counter\n"
                );
            }
            script += " }\n}\n";
            let file = std::env::temp_dir().join(format!("blbt-pool-{}.nft", std::process::id()));
            std::fs::write(&file, script).unwrap();
            lab.exec(h, &["nft", "-f", file.to_str().unwrap()]).unwrap();
            let _ = std::fs::remove_file(&file);
            continue;
        }
        let out = lab
            .exec(h, &["nft", "list", "table", "ip", "blbt_pool"])
            .unwrap();
        for (i, a) in pool.iter().enumerate() {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("ip saddr {a} ")))
                .unwrap_or_else(|| panic!("no counter for {a}: {out}"));
            let packets: u64 = line
                .split("packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("unreadable counter: {line}"));
            total[i] += packets;
        }
    }
    total
}

#[test]
fn nat_snat_pool_spreads_connections_over_its_addresses() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    // The pool's second address is the operator's to put on the interface.
    lab.exec(
        Host::Lb,
        &["ip", "addr", "add", "10.77.0.201/32", "dev", "eth0"],
    )
    .unwrap();
    let pool = ["10.77.0.1", "10.77.0.201"];
    syns_by_source(&lab, &pool, true);
    let cfg = sample_config(&lab, "nat").replace(
        "interface = \"eth0\"\n",
        "interface = \"eth0\"\nsnat_ipv4 = [\"10.77.0.1\", \"10.77.0.201\"]\n",
    );
    let _b = lab.start_balancer(&cfg).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 300, 3000, 8).unwrap();
    assert_eq!((r.ok, r.failed), (300, 0), "errors: {:?}", r.errors);
    assert_spread(&r.by_backend, 300, 3);
    let by_source = syns_by_source(&lab, &pool, false);
    assert!(
        by_source.iter().sum::<u64>() >= 300,
        "every connection reached a backend from the pool: {by_source:?}"
    );
    for (a, n) in pool.iter().zip(&by_source) {
        assert!(
            *n >= 90,
            "{a} carried {n} of 300 connections: {by_source:?}"
        );
    }
}

/// A long-lived connection keeps its backend while another backend leaves the config.
fn stream_survives_removal(forwarding: &str) {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    if forwarding == "dsr" {
        prepare_dsr_backends(&lab);
    }
    let cfg = sample_config(&lab, forwarding);
    let mut b = lab.start_balancer(&cfg).unwrap();
    let stream = lab.spawn_stream(vip4(ECHO_PORT), 6.0, 20).unwrap();
    let on = stream
        .stderr()
        .split("stream connected to ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    let i: usize = on.trim_start_matches("be").parse().unwrap();
    let other = lab
        .backend_hosts()
        .into_iter()
        .find(|h| *h != Host::Backend(i))
        .unwrap();
    let removed = format!("{{ address = \"{}:{ECHO_PORT}\" }}", other.v4().unwrap());
    let fewer = cfg
        .replace(&format!("{removed}, "), "")
        .replace(&format!(", {removed}"), "");
    assert_ne!(fewer, cfg);
    std::fs::write(b.config_path(), &fewer).unwrap();
    sleep(Duration::from_millis(800));
    b.signal(libc::SIGHUP).unwrap();
    b.wait_for_log("config reloaded", Duration::from_secs(10))
        .unwrap();
    // New connections go to the remaining backends only.
    let r = lab.client_conns(vip4(ECHO_PORT), 60, 500, 4).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.errors);
    assert!(
        !r.by_backend.contains_key(&other.echo_name()),
        "{:?}",
        r.by_backend
    );
    let rep = stream_report(stream, Duration::from_secs(20)).unwrap();
    assert!(rep.ok, "stream broke: {:?}", rep.error);
    assert_eq!(rep.backend, on);
    assert!(rep.chunks > 100, "{rep:?}");
}

#[test]
fn nat_long_lived_flow_stays_while_another_backend_is_removed() {
    stream_survives_removal("nat");
}

/// DSR backends hold the VIP on a loopback and must not answer ARP for it.
fn prepare_dsr_backends(lab: &Lab) {
    for h in lab.backend_hosts() {
        lab.exec(h, &["ip", "addr", "add", "10.77.0.100/32", "dev", "lo"])
            .unwrap();
        lab.exec(
            h,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ],
        )
        .unwrap();
    }
}

#[test]
fn dsr_connections_and_long_lived_flow() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    prepare_dsr_backends(&lab);
    let _b = lab.start_balancer(&sample_config(&lab, "dsr")).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 150, 2000, 6).unwrap();
    assert_eq!((r.ok, r.failed), (150, 0), "errors: {:?}", r.errors);
    assert_eq!(r.by_backend.len(), 3, "{:?}", r.by_backend);
    drop(lab);
    stream_survives_removal("dsr");
}

#[test]
fn ipv6_vip() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .filter_map(|h| h.v6())
        .map(|a| format!("{{ address = \"[{a}]:{ECHO_PORT}\" }}"))
        .collect();
    let cfg = format!(
        "[dataplane]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web6\"\nvip = \"[fd77::100]:{ECHO_PORT}\"\nbackends = [ {} ]\n{}",
        backends.join(", "),
        lab.controller_section()
    );
    let _b = lab.start_balancer(&cfg).unwrap();
    let r = lab.client_conns(vip6(ECHO_PORT), 150, 2000, 6).unwrap();
    assert_eq!((r.ok, r.failed), (150, 0), "errors: {:?}", r.errors);
    assert_spread(&r.by_backend, 150, 3);
}

#[test]
fn udp_vip() {
    let lab = Lab::new(3).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let cfg = format!(
        "[dataplane]\ninterface = \"eth0\"\n\n[[service]]\nname = \"udp\"\nvip = \"10.77.0.100:{ECHO_PORT}\"\nprotocol = \"udp\"\nbackends = [ {} ]\n{}",
        backends_v4(&lab, ECHO_PORT),
        lab.controller_section()
    );
    let _b = lab.start_balancer(&cfg).unwrap();
    let r = lab.client_udp(vip4(ECHO_PORT), 100).unwrap();
    assert_eq!((r.ok, r.failed), (100, 0), "{r:?}");
    let c = lab.counters().unwrap();
    assert!(c["services"][0]["packets"].as_u64().unwrap() >= 200, "{c}");
}

/// The balancer's interface gets a new MAC while it runs: the controller records it from the
/// rtnetlink link message (the backstop poll is a minute away), so frames to the new MAC are
/// balanced at once instead of being passed to the kernel as another host's (which would
/// answer the VIP's SYNs with resets: nothing listens there), and the backends' neighbours,
/// which the kernel forgot with the old MAC, are resolved again at once.
#[test]
fn interface_mac_change_is_followed_at_once() {
    const NEW_MAC: &str = "02:77:00:00:00:a1";
    let lab = Lab::new(2).unwrap();
    let _echo = lab.spawn_echo_all().unwrap();
    let mut b = lab.start_balancer(&sample_config(&lab, "nat")).unwrap();
    let r = lab.client_conns(vip4(ECHO_PORT), 20, 512, 4).unwrap();
    assert_eq!((r.ok, r.failed), (20, 0), "errors: {:?}", r.errors);
    let passed_before = lab.counters().unwrap()["reasons"]["pass_not_for_us"]
        .as_u64()
        .unwrap();
    lab.exec(
        Host::Lb,
        &["ip", "link", "set", "dev", "eth0", "address", NEW_MAC],
    )
    .unwrap();
    // The neighbours learn it (as a gratuitous ARP with arp_notify would teach them).
    let lb = Host::Lb.v4().unwrap().to_string();
    let vip = vip4(ECHO_PORT).ip().to_string();
    for (host, addr) in [(Host::Client, &vip), (Host::Client, &lb)]
        .into_iter()
        .chain(lab.backend_hosts().into_iter().map(|h| (h, &lb)))
    {
        lab.exec(
            host,
            &[
                "ip", "neigh", "replace", addr, "lladdr", NEW_MAC, "dev", "eth0",
            ],
        )
        .unwrap();
    }
    b.wait_for_log("interface MAC changed", Duration::from_secs(10))
        .unwrap();
    // The kernel forgot eth0's neighbours with its old MAC; the controller primes them again
    // at once (its periodic refresh is 10 s away), so the FIB has every backend's MAC before
    // the next SYN needs it.
    let backends: Vec<String> = lab
        .backend_hosts()
        .into_iter()
        .filter_map(|h| h.v4())
        .map(|a| a.to_string())
        .collect();
    let mut table = String::new();
    for _ in 0..30 {
        table = lab
            .exec(Host::Lb, &["ip", "-4", "neigh", "show", "dev", "eth0"])
            .unwrap();
        let resolved = |a: &String| {
            table
                .lines()
                .any(|l| l.starts_with(&format!("{a} ")) && l.contains("lladdr"))
        };
        if backends.iter().all(resolved) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    for a in &backends {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("{a} ")) && l.contains("lladdr")),
            "backend {a} not resolved again within 3 s:\n{table}"
        );
    }
    let r = lab.client_conns(vip4(ECHO_PORT), 20, 512, 4).unwrap();
    assert_eq!((r.ok, r.failed), (20, 0), "errors: {:?}", r.errors);
    let c = lab.counters().unwrap();
    assert_eq!(
        c["reasons"]["pass_not_for_us"].as_u64().unwrap(),
        passed_before,
        "no frame to the new MAC was passed as another host's: {c}"
    );
    assert_eq!(c["reasons"]["drop_no_neighbour"], 0, "{c}");
}
