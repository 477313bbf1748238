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

use super::{Row, XDP_DROP, XDP_TX, lb_addr, mac_of, predict, run_counted, sa};

/// The stand-in VLAN device's MAC (a real VLAN device has its trunk's; a macvlan cannot).
const VLAN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xf0];

/// `frame` with an 802.1Q tag of `vid` after its MACs.
fn tagged(frame: Vec<u8>, vid: u16) -> Vec<u8> {
    let mut t = frame[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00]);
    t.extend_from_slice(&vid.to_be_bytes());
    t.extend_from_slice(&frame[12..]);
    t
}

/// Creates the stand-in for `t0.20` and records it as VLAN 20 on `t0`.
fn vlan20(tb: &mut Testbed) {
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
            pad: 0,
        },
    )]);
    assert_eq!(tb.dp.set_vlans(&devs).unwrap(), 1);
    assert_eq!(tb.dp.vlans(), devs);
    assert_eq!(
        tb.dp.set_vlans(&devs).unwrap(),
        0,
        "unchanged: nothing written"
    );
}

/// Routes `be` through the stand-in VLAN device, with its neighbour there.
fn on_vlan20(tb: &Testbed, be: SocketAddr) {
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
        // To the trunk's MAC, as to a real VLAN device's (the stand-in has its own).
        let reply = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 9, 2, packet::ACK, b"r");
        // The backend's tuple on the wrong VLAN (or untagged) is not its flow's.
        for (name, input) in [
            ("the reply untagged is dropped", reply.clone()),
            ("the reply on VLAN 30 is dropped", tagged(reply.clone(), 30)),
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
                input: tagged(reply, 20),
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
