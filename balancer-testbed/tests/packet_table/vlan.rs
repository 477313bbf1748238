//! VLANs per flow: each side's 802.1Q tag is kept with the flow. A forward packet leaves with
//! the tag of its next hop's VLAN device (the FIB's answer, through `BLB_VLANS`) or none;
//! a reply leaves with the tag the client's frames came in with; a reply is accepted only on
//! its flow's interface and VLAN.
//!
//! This kernel has no 802.1Q devices (`CONFIG_VLAN_8021Q` is off), so a macvlan on `t0`
//! stands in for `t0.20`: the route to a backend goes through it, and the test records it in
//! `BLB_VLANS` as VLAN 20 on `t0`, as the controller records a real VLAN device. The program
//! sees exactly what it would see with one: a FIB answer naming a device that is a VLAN of
//! the trunk.

use std::{collections::HashMap, net::SocketAddr};

use balancer_common::{PROTO_TCP, Reason, VlanDev};
use balancer_testbed::{LB_MAC, Testbed, bench::configured_testbed, host_mac, packet};

use super::{
    Row, XDP_DROP, XDP_PASS, XDP_TX,
    icmp::{IcmpRow, Kind, ROUTER, icmp_error, ip_of, router, run_icmp_rows},
    lb_addr, mac_of, predict, run_counted, sa,
};

/// The stand-in VLAN device's MAC: one of its own, as a VLAN device given its own address
/// has (by default a VLAN device has its trunk's; a macvlan cannot).
const VLAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xf0];

/// `frame` with an 802.1Q tag of `vid` after its MACs.
fn tagged(frame: Vec<u8>, vid: u16) -> Vec<u8> {
    let mut t = frame[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00]);
    t.extend_from_slice(&vid.to_be_bytes());
    t.extend_from_slice(&frame[12..]);
    t
}

/// Creates the stand-in for `t0.20` and records it as VLAN 20 on `t0`; returns its ifindex.
fn vlan20(tb: &mut Testbed) -> u32 {
    tb.ip(&[
        "link",
        "add",
        "t0v20",
        "link",
        "t0",
        "address",
        "02:00:00:00:00:f0",
        "type",
        "macvlan",
        "mode",
        "bridge",
    ])
    .unwrap();
    tb.ip(&["link", "set", "t0v20", "up"]).unwrap();
    let ifindex = balancer::host::net::ifindex("t0v20").unwrap();
    let devs = HashMap::from([(
        ifindex,
        VlanDev {
            parent: tb.ifindex,
            vid: 20,
            mac: VLAN_MAC,
        },
    )]);
    assert_eq!(tb.dp.set_vlans(&devs).unwrap(), 1);
    assert_eq!(tb.dp.vlans(), devs);
    assert_eq!(
        tb.dp.set_vlans(&devs).unwrap(),
        0,
        "unchanged: nothing written"
    );
    ifindex
}

/// Routes `be` through the stand-in VLAN device, with its neighbour there (in `table`).
fn on_vlan20(tb: &Testbed, be: SocketAddr) {
    on_vlan20_in(tb, be, "main");
}

fn on_vlan20_in(tb: &Testbed, be: SocketAddr, table: &str) {
    let ip = be.ip().to_string();
    let (fam, plen) = if be.is_ipv6() {
        ("-6", "/128")
    } else {
        ("-4", "/32")
    };
    tb.ip(&[
        fam,
        "route",
        "replace",
        &format!("{ip}{plen}"),
        "dev",
        "t0v20",
        "table",
        table,
    ])
    .unwrap();
    let mac = mac_of(be.ip());
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    tb.ip(&[
        fam,
        "neigh",
        "replace",
        &ip,
        "lladdr",
        &mac,
        "dev",
        "t0v20",
        "nud",
        "permanent",
    ])
    .unwrap();
}

#[test]
fn a_tagged_client_of_an_untagged_backend_gets_its_tag_back() {
    let (tb, st) = configured_testbed(65536).unwrap();
    for (vip, client, client_vid) in [
        (sa("10.77.0.100:7002"), sa("10.77.0.2:41001"), 42u16),
        (sa("[fd77::100]:7002"), sa("[fd77::2]:41001"), 42),
    ] {
        // A tagged client, an untagged backend: the tag goes, and comes back on the reply.
        let (be, port) = predict(
            &tb,
            &st,
            if vip.is_ipv6() { "web6" } else { "web" },
            client,
            vip,
            PROTO_TCP,
        );
        let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
        run_counted(
            &tb,
            Row {
                name: "802.1Q SYN to an untagged backend leaves untagged",
                input: tagged(syn, client_vid),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    mac_of(be.ip()),
                    snat,
                    be,
                    1,
                    0,
                    packet::SYN,
                    &[],
                )),
            },
            Reason::Tx,
        );
        let reply = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 9, 2, packet::ACK, b"r");
        run_counted(
            &tb,
            Row {
                name: "the untagged reply goes back with the client's tag",
                input: reply,
                verdict: XDP_TX,
                output: Some(tagged(
                    packet::tcp(LB_MAC, host_mac(2), vip, client, 9, 2, packet::ACK, b"r"),
                    client_vid,
                )),
            },
            Reason::Tx,
        );
    }
}

#[test]
fn a_backend_on_a_vlan_is_reached_tagged_and_answers_only_on_it() {
    // A testbed of its own: the per-backend next-hop cache of an earlier flow would hold the
    // untagged route for a few seconds.
    let (mut tb, st) = configured_testbed(65536).unwrap();
    vlan20(&mut tb);
    for (vip, client, client_vid) in [
        (sa("10.77.0.100:7002"), sa("10.77.0.2:41002"), None),
        (sa("10.77.0.100:7002"), sa("10.77.0.2:41003"), Some(10u16)),
        (sa("[fd77::100]:7002"), sa("[fd77::2]:41002"), None),
        (sa("[fd77::100]:7002"), sa("[fd77::2]:41003"), Some(10)),
    ] {
        let (be, port) = predict(
            &tb,
            &st,
            if vip.is_ipv6() { "web6" } else { "web" },
            client,
            vip,
            PROTO_TCP,
        );
        on_vlan20(&tb, be);
        let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
        let client_tag = |f: Vec<u8>| match client_vid {
            Some(v) => tagged(f, v),
            None => f,
        };
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
        run_counted(
            &tb,
            Row {
                name: "a SYN to a backend on VLAN 20 leaves the trunk tagged 20",
                input: client_tag(syn),
                verdict: XDP_TX,
                output: Some(tagged(
                    packet::tcp(VLAN_MAC, mac_of(be.ip()), snat, be, 1, 0, packet::SYN, &[]),
                    20,
                )),
            },
            Reason::Tx,
        );
        // On VLAN 20 a frame is for the VLAN device's MAC; untagged, or on VLAN 30 (which has
        // no device), for the trunk's.
        let reply = |dmac| packet::tcp(mac_of(be.ip()), dmac, be, snat, 9, 2, packet::ACK, b"r");
        run_counted(
            &tb,
            Row {
                name: "the reply on VLAN 20 to the trunk's MAC is another host's: passed",
                input: tagged(reply(LB_MAC), 20),
                verdict: XDP_PASS,
                output: None,
            },
            Reason::PassNotForUs,
        );
        // The backend's tuple on the wrong VLAN (or untagged) is not its flow's.
        for (name, input) in [
            ("the reply untagged is dropped", reply(LB_MAC)),
            ("the reply on VLAN 30 is dropped", tagged(reply(LB_MAC), 30)),
        ] {
            run_counted(
                &tb,
                Row {
                    name,
                    output: Some(input.clone()),
                    input,
                    verdict: XDP_DROP,
                },
                Reason::DropWrongInterface,
            );
        }
        run_counted(
            &tb,
            Row {
                name: "the reply on VLAN 20 goes back as the client's frames came",
                input: tagged(reply(VLAN_MAC), 20),
                verdict: XDP_TX,
                output: Some(client_tag(packet::tcp(
                    LB_MAC,
                    host_mac(2),
                    vip,
                    client,
                    9,
                    2,
                    packet::ACK,
                    b"r",
                ))),
            },
            Reason::Tx,
        );
        let ack = packet::tcp(host_mac(2), LB_MAC, client, vip, 2, 10, packet::ACK, b"q");
        run_counted(
            &tb,
            Row {
                name: "the client's next packet goes the same way",
                input: client_tag(ack),
                verdict: XDP_TX,
                output: Some(tagged(
                    packet::tcp(
                        VLAN_MAC,
                        mac_of(be.ip()),
                        snat,
                        be,
                        2,
                        10,
                        packet::ACK,
                        b"q",
                    ),
                    20,
                )),
            },
            Reason::Tx,
        );
    }
}

/// Two clients of `vip` whose new flows go to the same backend (and that backend): the
/// first client port from `from` on, and the next one after it.
fn two_clients_of_one_backend(
    tb: &Testbed,
    st: &balancer::control::state::State,
    svc: &str,
    vip: SocketAddr,
    from: u16,
) -> (SocketAddr, SocketAddr, SocketAddr) {
    let ip: std::net::IpAddr = if vip.is_ipv6() {
        "fd77::2"
    } else {
        "10.77.0.2"
    }
    .parse()
    .unwrap();
    let host = |port| SocketAddr::new(ip, port);
    let a = host(from);
    let (be, _) = predict(tb, st, svc, a, vip, PROTO_TCP);
    let b = (from + 1..from + 200)
        .map(host)
        .find(|c| predict(tb, st, svc, *c, vip, PROTO_TCP).0 == be)
        .expect("a second client port of the same backend within 200");
    (a, b, be)
}

#[test]
fn a_tagged_frame_is_routed_and_checked_as_arriving_on_its_vlan_device() {
    // What arrives on VLAN 20 is routed by its own table (`ip rule iif t0.20`): its
    // backends are reached through VLAN 20 too, while untagged clients reach them on the
    // trunk. The FIB must be asked as from the VLAN device, as the kernel's own forwarding
    // would, and the per-backend next-hop cache must keep the two answers apart.
    let (mut tb, st) = configured_testbed(65536).unwrap();
    vlan20(&mut tb);
    for fam in ["-4", "-6"] {
        tb.ip(&[fam, "rule", "add", "iif", "t0v20", "lookup", "120"])
            .unwrap();
    }
    for (svc, vip) in [
        ("web", sa("10.77.0.100:7002")),
        ("web6", sa("[fd77::100]:7002")),
    ] {
        let (plain, on20, be) = two_clients_of_one_backend(&tb, &st, svc, vip, 41100);
        on_vlan20_in(&tb, be, "120");
        let (_, port) = predict(&tb, &st, svc, plain, vip, PROTO_TCP);
        let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
        run_counted(
            &tb,
            Row {
                name: "an untagged SYN is routed by the main table: out untagged",
                input: packet::tcp(host_mac(2), LB_MAC, plain, vip, 1, 0, packet::SYN, &[]),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    mac_of(be.ip()),
                    snat,
                    be,
                    1,
                    0,
                    packet::SYN,
                    &[],
                )),
            },
            Reason::Tx,
        );
        let (_, port) = predict(&tb, &st, svc, on20, vip, PROTO_TCP);
        let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
        let syn = |dmac| packet::tcp(host_mac(2), dmac, on20, vip, 1, 0, packet::SYN, &[]);
        run_counted(
            &tb,
            Row {
                name: "a SYN on VLAN 20 to the trunk's MAC is another host's: passed",
                input: tagged(syn(LB_MAC), 20),
                verdict: XDP_PASS,
                output: None,
            },
            Reason::PassNotForUs,
        );
        run_counted(
            &tb,
            Row {
                name: "an untagged SYN to the VLAN device's MAC is another host's: passed",
                input: syn(VLAN_MAC),
                verdict: XDP_PASS,
                output: None,
            },
            Reason::PassNotForUs,
        );
        run_counted(
            &tb,
            Row {
                name: "a SYN on VLAN 20 to its device's MAC is routed by VLAN 20's table",
                input: tagged(syn(VLAN_MAC), 20),
                verdict: XDP_TX,
                output: Some(tagged(
                    packet::tcp(VLAN_MAC, mac_of(be.ip()), snat, be, 1, 0, packet::SYN, &[]),
                    20,
                )),
            },
            Reason::Tx,
        );
    }
}

#[test]
fn icmp_errors_about_a_flow_across_vlans_keep_each_sides_tag() {
    // A client on VLAN 10 (no device: the trunk's MAC), a backend on VLAN 20: an error from
    // the backend's side reaches the client tagged 10, one from the client's side reaches
    // the backend tagged 20, each translated.
    let (mut tb, st) = configured_testbed(65536).unwrap();
    vlan20(&mut tb);
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:41200")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:41200")),
    ] {
        let v6 = vip.is_ipv6();
        let (be, port) = predict(&tb, &st, svc, client, vip, PROTO_TCP);
        on_vlan20(&tb, be);
        let snat = SocketAddr::new(lb_addr(v6), port);
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
        assert_eq!(tb.run(&tagged(syn, 10)).unwrap().0, XDP_TX, "flow set up");
        // What went out to the backend and what the client sent; what went back to the
        // client and what the backend sent (quoted untagged: a quote is the IP packet).
        let sent = packet::tcp(
            LB_MAC,
            mac_of(be.ip()),
            snat,
            be,
            2,
            1,
            packet::ACK,
            &[7; 600],
        );
        let orig = packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            2,
            1,
            packet::ACK,
            &[7; 600],
        );
        let reply_sent = packet::tcp(LB_MAC, host_mac(2), vip, client, 9, 2, packet::ACK, b"r");
        let reply_orig = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 9, 2, packet::ACK, b"r");
        let too_big = if v6 {
            Kind::TooBig(1300)
        } else {
            Kind::FragNeeded(1300)
        };
        run_icmp_rows(
            &tb,
            &[
                IcmpRow {
                    name: "too big from a router on VLAN 20: to the client on VLAN 10",
                    input: tagged(
                        icmp_error(
                            host_mac(ROUTER),
                            VLAN_MAC,
                            router(v6),
                            snat.ip(),
                            too_big,
                            &ip_of(&sent, Some(if v6 { 1232 } else { 548 })),
                        ),
                        20,
                    ),
                    verdict: XDP_TX,
                    output: Some(tagged(
                        icmp_error(
                            LB_MAC,
                            host_mac(2),
                            vip.ip(),
                            client.ip(),
                            too_big,
                            &ip_of(&orig, Some(if v6 { 1232 } else { 548 })),
                        ),
                        10,
                    )),
                    reason: Reason::IcmpNat,
                },
                IcmpRow {
                    name: "unreachable from the client on VLAN 10: to the backend on VLAN 20",
                    input: tagged(
                        icmp_error(
                            host_mac(2),
                            LB_MAC,
                            client.ip(),
                            vip.ip(),
                            Kind::PortUnreachable,
                            &ip_of(&reply_sent, None),
                        ),
                        10,
                    ),
                    verdict: XDP_TX,
                    output: Some(tagged(
                        icmp_error(
                            VLAN_MAC,
                            mac_of(be.ip()),
                            snat.ip(),
                            be.ip(),
                            Kind::PortUnreachable,
                            &ip_of(&reply_orig, None),
                        ),
                        20,
                    )),
                    reason: Reason::IcmpNat,
                },
            ],
        );
    }
}
