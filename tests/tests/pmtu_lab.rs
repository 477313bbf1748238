//! Path MTU through a NAT VIP (issue: flow state, ICMP follows its flow).
//!
//! The backend is two routers away behind a smaller middle link that neither end knows:
//!
//! ```text
//!  client ─┐                     b1 = router R1          b2 = router R2        b3 = backend
//!  lb ─────┴─ bridge ─ eth0 10.77.0.11 ─ p12 ══ 1300 ══ p21 ─ p23 10.88.2.1 ── p32 10.88.2.2
//!                                       10.88.1.1/30   10.88.1.2/30           fd88:2::2
//! ```
//!
//! The client's full-size segments reach R1, which answers "fragmentation needed" / "packet
//! too big" to the SNAT address; the balancer must turn that into an error from the VIP to
//! the client about the client's own packet, or the upload stalls for good. R2 tells the
//! backend about its replies directly. Each test has its own lab and cleans it up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use balancer_tests::{ECHO_PORT, Host, Lab, vip4, vip6};

/// Bytes each connection uploads (and gets echoed back).
const UPLOAD: usize = 400_000;
/// Connections per family.
const CONNS: usize = 3;
/// MTU of the router-to-router link.
const MIDDLE_MTU: &str = "1300";

fn sh(lab: &Lab, host: Host, cmds: &[&[&str]]) {
    for c in cmds {
        lab.exec(host, c).unwrap();
    }
}

/// Rewires backends 1 and 2 of a three-backend lab into routers R1 and R2 and moves
/// backend 3 behind them (see the module comment).
fn build_routers(lab: &Lab) {
    let (r1, r2, be) = (Host::Backend(1), Host::Backend(2), Host::Backend(3));
    let ns2 = lab.ns(r2);
    let ns3 = lab.ns(be);
    sh(
        lab,
        r1,
        &[
            &[
                "ip", "link", "add", "p12", "mtu", MIDDLE_MTU, "type", "veth", "peer", "name",
                "p21", "netns", &ns2,
            ],
            &["ip", "addr", "add", "10.88.1.1/30", "dev", "p12"],
            &["ip", "addr", "add", "fd88:1::1/64", "dev", "p12", "nodad"],
            &["ethtool", "-K", "p12", "tx", "off"],
            &["ip", "link", "set", "p12", "up"],
            &["ip", "route", "add", "10.88.2.0/24", "via", "10.88.1.2"],
            &[
                "ip",
                "-6",
                "route",
                "add",
                "fd88:2::/64",
                "via",
                "fd88:1::2",
            ],
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
            ],
        ],
    );
    sh(
        lab,
        r2,
        &[
            &["ip", "link", "set", "eth0", "down"],
            &["ip", "link", "set", "p21", "mtu", MIDDLE_MTU],
            &["ip", "addr", "add", "10.88.1.2/30", "dev", "p21"],
            &["ip", "addr", "add", "fd88:1::2/64", "dev", "p21", "nodad"],
            &["ethtool", "-K", "p21", "tx", "off"],
            &["ip", "link", "set", "p21", "up"],
            &[
                "ip", "link", "add", "p23", "type", "veth", "peer", "name", "p32", "netns", &ns3,
            ],
            &["ip", "addr", "add", "10.88.2.1/24", "dev", "p23"],
            &["ip", "addr", "add", "fd88:2::1/64", "dev", "p23", "nodad"],
            &["ethtool", "-K", "p23", "tx", "off"],
            &["ip", "link", "set", "p23", "up"],
            &["ip", "route", "add", "default", "via", "10.88.1.1"],
            &["ip", "-6", "route", "add", "default", "via", "fd88:1::1"],
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
            ],
        ],
    );
    sh(
        lab,
        be,
        &[
            &["ip", "link", "set", "eth0", "down"],
            &["ip", "addr", "add", "10.88.2.2/24", "dev", "p32"],
            &["ip", "addr", "add", "fd88:2::2/64", "dev", "p32", "nodad"],
            &["ethtool", "-K", "p32", "tx", "off"],
            &["ip", "link", "set", "p32", "up"],
            &["ip", "route", "add", "default", "via", "10.88.2.1"],
            &["ip", "-6", "route", "add", "default", "via", "fd88:2::1"],
        ],
    );
    sh(
        lab,
        Host::Lb,
        &[
            &["ip", "route", "add", "10.88.0.0/16", "via", "10.77.0.11"],
            &["ip", "-6", "route", "add", "fd88::/16", "via", "fd77::11"],
        ],
    );
    // The path works for small packets before the balancer is involved (a few tries while
    // the neighbours are resolved).
    for to in ["10.88.2.2", "fd88:2::2"] {
        let ok = (0..5).any(|_| {
            lab.exec(Host::Lb, &["ping", "-q", "-c", "1", "-W", "1", to])
                .is_ok()
        });
        if !ok {
            for h in [Host::Lb, r1, r2, be] {
                for c in [
                    &["ip", "-6", "route"][..],
                    &["ip", "-6", "addr"],
                    &["ip", "-6", "neigh"],
                ] {
                    eprintln!("{h} {c:?}: {:?}", lab.exec(h, c));
                }
            }
            for (h, t) in [
                (r1, "fd88:2::2"),
                (r1, "fd88:1::2"),
                (r2, "fd88:2::2"),
                (r2, "fd77::1"),
            ] {
                eprintln!(
                    "{h} ping {t}: {:?}",
                    lab.exec(h, &["ping", "-c", "1", "-W", "1", t])
                );
            }
            panic!("no path from the lb to {to}");
        }
    }
}

fn config(lab: &Lab) -> String {
    format!(
        r#"[dataplane]
interface = "eth0"
xdp_mode = "auto"

[[service]]
name = "far"
vip = "{}"
backends = [ {{ address = "10.88.2.2:{ECHO_PORT}" }} ]

[[service]]
name = "far6"
vip = "{}"
backends = [ {{ address = "[fd88:2::2]:{ECHO_PORT}" }} ]
{}"#,
        vip4(ECHO_PORT),
        vip6(ECHO_PORT),
        lab.controller_section()
    )
}

/// Starts the echo server and the balancer, uploads [`UPLOAD`] bytes [`CONNS`] times per
/// family through the VIPs (each echoed byte-exact by the far backend), and returns the
/// balancer's counters.
fn upload_through_the_balancer(lab: &Lab) -> serde_json::Value {
    let _echo = lab.spawn_echo(3).unwrap();
    let _b = lab.start_balancer(&config(lab)).unwrap();
    for vip in [vip4(ECHO_PORT), vip6(ECHO_PORT)] {
        // One connection at a time: each starts at the full MTU until it learns the path's.
        let r = lab.client_conns(vip, CONNS, UPLOAD, 1).unwrap();
        assert_eq!(
            (r.ok, r.failed),
            (CONNS as u64, 0),
            "{vip}: uploads of {UPLOAD} bytes: {:?}",
            r.errors
        );
        assert_eq!(r.by_backend.get("be3"), Some(&(CONNS as u64)), "{vip}");
    }
    lab.counters().unwrap()
}

#[test]
fn large_uploads_through_a_nat_vip_cross_a_smaller_middle_link_v4_and_v6() {
    let lab = Lab::new(3).unwrap();
    build_routers(&lab);
    let c = upload_through_the_balancer(&lab);
    eprintln!("reasons: {}", c["reasons"]);
    let translated = c["reasons"]["icmp_nat"].as_u64().unwrap();
    // At least one error per family reached the client (later connections may reuse the
    // learnt path MTU).
    assert!(translated >= 2, "icmp_nat {translated}: {}", c["reasons"]);
    assert_eq!(c["reasons"]["pass_icmp_malformed"], 0, "{}", c["reasons"]);
}

/// The same path with R1 a blackhole router (it sends no "fragmentation needed" / "packet
/// too big"), and the MTU known to the operator instead: locked route MTUs on the balancer
/// towards the far network. The balancer answers the client itself from the route's MTU,
/// so the uploads complete without a single error from the path.
#[test]
fn a_locked_route_mtu_stands_in_for_a_router_that_sends_no_errors_v4_and_v6() {
    let lab = Lab::new(3).unwrap();
    build_routers(&lab);
    sh(
        &lab,
        Host::Backend(1),
        &[
            &["nft", "add", "table", "inet", "blackhole"],
            &[
                "nft",
                "add",
                "chain",
                "inet",
                "blackhole",
                "out",
                "{ type filter hook output priority 0 ; }",
            ],
            &[
                "nft",
                "add",
                "rule",
                "inet",
                "blackhole",
                "out",
                "icmp",
                "type",
                "destination-unreachable",
                "drop",
            ],
            &[
                "nft",
                "add",
                "rule",
                "inet",
                "blackhole",
                "out",
                "icmpv6",
                "type",
                "packet-too-big",
                "drop",
            ],
        ],
    );
    sh(
        &lab,
        Host::Lb,
        &[
            &[
                "ip",
                "route",
                "replace",
                "10.88.0.0/16",
                "via",
                "10.77.0.11",
                "mtu",
                "lock",
                MIDDLE_MTU,
            ],
            &[
                "ip",
                "-6",
                "route",
                "replace",
                "fd88::/16",
                "via",
                "fd77::11",
                "mtu",
                "lock",
                MIDDLE_MTU,
            ],
        ],
    );
    let c = upload_through_the_balancer(&lab);
    eprintln!("reasons: {}", c["reasons"]);
    assert_eq!(
        c["reasons"]["icmp_nat"], 0,
        "R1 sent no error: {}",
        c["reasons"]
    );
    let answered = c["reasons"]["too_big"].as_u64().unwrap();
    assert!(
        answered >= 2,
        "the balancer answered each family from the route's MTU: {}",
        c["reasons"]
    );
}
