//! Destination-MAC rows: a unicast frame addressed to another MAC than the ingress
//! interface's (a switch flooding frames for another balancer's MAC) is passed untouched as
//! `pass_not_for_us` before any service or flow lookup, and makes no flow; the same frame to
//! the interface's MAC is balanced; multicast and broadcast frames are not refused by the
//! check; an interface without a recorded MAC is not checked at all; an interface whose
//! ifindex is too high for the `BLB_IFMACS` array is checked as well (`BLB_IFMACS_HIGH`).

use std::net::SocketAddr;

use balancer::control::state::State;
use balancer_common::{IFMAC_SLOTS, PROTO_TCP, Reason};
use balancer_testbed::{LB_MAC, Testbed, bench::configured_testbed, host_mac, packet, run_prog};

use super::{Row, XDP_PASS, XDP_TX, lb_addr, mac_of, predict, reason_count, run_counted, sa};

/// Another balancer's MAC on the segment: differs from [`LB_MAC`] in the last byte only.
const OTHER_LAST: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
/// A unicast MAC that differs from [`LB_MAC`] in the first byte only (I/G bit still 0).
const OTHER_FIRST: [u8; 6] = [6, 0, 0, 0, 0, 1];

fn syn(dst_mac: [u8; 6], client: SocketAddr, vip: SocketAddr) -> Vec<u8> {
    packet::tcp(host_mac(2), dst_mac, client, vip, 1000, 0, packet::SYN, &[])
}

/// The SYN's row when the program balances it (NAT service).
fn balanced(
    tb: &Testbed,
    st: &State,
    svc: &str,
    name: &'static str,
    dst_mac: [u8; 6],
    client: SocketAddr,
    vip: SocketAddr,
) -> Row {
    let (be, port) = predict(tb, st, svc, client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
    Row {
        name,
        input: syn(dst_mac, client, vip),
        verdict: XDP_TX,
        output: Some(packet::tcp(
            LB_MAC,
            mac_of(be.ip()),
            snat,
            be,
            1000,
            0,
            packet::SYN,
            &[],
        )),
    }
}

fn not_for_us(name: &'static str, input: Vec<u8>) -> Row {
    Row {
        name,
        input,
        verdict: XDP_PASS,
        output: None,
    }
}

#[test]
fn a_unicast_frame_to_another_mac_is_passed_untouched_and_makes_no_flow() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let vip6 = sa("[fd77::100]:7002");
    let client = sa("10.77.0.2:40101");
    for (name, input) in [
        (
            "IPv4 SYN to the VIP, to another balancer's MAC",
            syn(OTHER_LAST, client, vip),
        ),
        (
            "IPv4 SYN to the VIP, to a MAC differing in its first byte",
            syn(OTHER_FIRST, client, vip),
        ),
        (
            "IPv6 SYN to the VIP, to another balancer's MAC",
            syn(OTHER_LAST, sa("[fd77::2]:40101"), vip6),
        ),
    ] {
        run_counted(&tb, not_for_us(name, input), Reason::PassNotForUs);
    }
    assert!(tb.dp.flows().is_empty(), "a refused SYN makes no flow");
    assert_eq!(tb.dp.service_counters(st.services["web"].id).new_flows, 0);
    assert_eq!(tb.dp.service_counters(st.services["web6"].id).new_flows, 0);

    // The same SYN to the interface's MAC is balanced; the flow's later segments and the
    // backend's reply are refused too when addressed to another MAC (the standby of a pair
    // holds such flows mirrored).
    run_counted(
        &tb,
        balanced(
            &tb,
            &st,
            "web",
            "the same SYN to the interface's MAC",
            LB_MAC,
            client,
            vip,
        ),
        Reason::Tx,
    );
    let flows = tb.dp.flows();
    assert_eq!(flows.len(), 2, "the SYN made its flow (both entries)");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let ack = |dst| packet::tcp(host_mac(2), dst, client, vip, 1001, 1, packet::ACK, b"x");
    let reply = |dst| packet::tcp(mac_of(be.ip()), dst, be, snat, 1, 1002, packet::ACK, b"y");
    run_counted(
        &tb,
        not_for_us(
            "an established flow's segment to another MAC",
            ack(OTHER_LAST),
        ),
        Reason::PassNotForUs,
    );
    run_counted(
        &tb,
        not_for_us("the backend's reply to another MAC", reply(OTHER_LAST)),
        Reason::PassNotForUs,
    );
    run_counted(
        &tb,
        Row {
            name: "the backend's reply to the interface's MAC",
            input: reply(LB_MAC),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                1,
                1002,
                packet::ACK,
                b"y",
            )),
        },
        Reason::Tx,
    );
    let c = tb.dp.service_counters(st.services["web"].id);
    assert_eq!(
        (c.packets, c.new_flows),
        (2, 1),
        "refused frames are not counted"
    );
}

#[test]
fn multicast_and_broadcast_frames_are_not_refused_by_the_mac_check() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let vip6 = sa("[fd77::100]:7002");
    for (name, mac, client, vip, svc) in [
        (
            "IPv4 SYN to the VIP in an IPv4 multicast frame",
            [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01],
            sa("10.77.0.2:40111"),
            vip,
            "web",
        ),
        (
            "IPv4 SYN to the VIP in a broadcast frame",
            [0xff; 6],
            sa("10.77.0.2:40112"),
            vip,
            "web",
        ),
        (
            "IPv6 SYN to the VIP in an IPv6 multicast frame",
            [0x33, 0x33, 0x00, 0x00, 0x00, 0x01],
            sa("[fd77::2]:40113"),
            vip6,
            "web6",
        ),
    ] {
        run_counted(
            &tb,
            balanced(&tb, &st, svc, name, mac, client, vip),
            Reason::Tx,
        );
    }
}

#[test]
fn an_interface_without_a_recorded_mac_is_not_checked() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    assert_eq!(tb.dp.interface_macs().get(&tb.ifindex), Some(&LB_MAC));
    tb.dp.set_interface_mac(tb.ifindex, None).unwrap();
    assert!(tb.dp.interface_macs().is_empty());
    run_counted(
        &tb,
        balanced(
            &tb,
            &st,
            "web",
            "no MAC recorded: a SYN to another MAC is balanced as before",
            OTHER_LAST,
            sa("10.77.0.2:40121"),
            vip,
        ),
        Reason::Tx,
    );
    tb.dp.set_interface_mac(tb.ifindex, Some(LB_MAC)).unwrap();
    run_counted(
        &tb,
        not_for_us(
            "MAC recorded again: refused",
            syn(OTHER_LAST, sa("10.77.0.2:40122"), vip),
        ),
        Reason::PassNotForUs,
    );
}

#[test]
fn an_interface_with_a_high_ifindex_has_its_mac_checked_too() {
    let (mut tb, _st) = configured_testbed(65536).unwrap();
    // An ifindex past the array's slots (a host that has made many interfaces).
    let high = IFMAC_SLOTS + 904;
    tb.ip(&[
        "link",
        "add",
        "hi0",
        "index",
        &high.to_string(),
        "address",
        "02:00:00:00:00:e1",
        "type",
        "veth",
        "peer",
        "name",
        "hi1",
    ])
    .unwrap();
    tb.ip(&["link", "set", "hi0", "up"]).unwrap();
    tb.ip(&["link", "set", "hi1", "up"]).unwrap();
    let mac = [2, 0, 0, 0, 0, 0xe1];
    tb.dp.set_interface_mac(high, Some(mac)).unwrap();
    assert_eq!(tb.dp.interface_macs().get(&high), Some(&mac));
    assert_eq!(tb.dp.interface_macs().get(&tb.ifindex), Some(&LB_MAC));
    let vip = sa("10.77.0.100:7002");
    let on_high = |tb: &Testbed, client: &str| -> (u32, bool) {
        let input = syn(LB_MAC, sa(client), vip);
        let before = reason_count(tb, Reason::PassNotForUs);
        let (v, out, _) = run_prog(tb.dp.program().unwrap(), &input, high).unwrap();
        let counted = reason_count(tb, Reason::PassNotForUs) == before + 1;
        (v, counted && out == input)
    };
    // t0's MAC is not hi0's: on hi0 the frame is another host's.
    let (v, not_for_us) = on_high(&tb, "10.77.0.2:40131");
    assert_eq!(v, XDP_PASS);
    assert!(
        not_for_us,
        "a frame on hi0 to another MAC is passed untouched as not for us"
    );
    // Forgotten: no longer checked on hi0, and t0's entry is untouched.
    tb.dp.set_interface_mac(high, None).unwrap();
    assert_eq!(tb.dp.interface_macs().get(&high), None);
    assert_eq!(tb.dp.interface_macs().get(&tb.ifindex), Some(&LB_MAC));
    let (_, not_for_us) = on_high(&tb, "10.77.0.2:40132");
    assert!(!not_for_us, "hi0 without a recorded MAC is not checked");
}
