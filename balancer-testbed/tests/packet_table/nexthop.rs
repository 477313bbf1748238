//! Cached next hops are revalidated: an established flow follows its backend's changed MAC
//! within the next-hop TTL (the forward entry asks the FIB again once its answer is
//! `NEXTHOP_TTL_SECS` old), and a reply entry follows the client's MAC at once (it is taken
//! from the client's own packets).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use balancer_common::{NEXTHOP_TTL_SECS, PROTO_TCP, Reason};
use balancer_testbed::{LB_MAC, bench::configured_testbed, host_mac, packet};

use super::{Row, XDP_TX, forward_key, lb_addr, mac_of, predict, reply_key, run_counted, sa};

#[test]
fn an_established_flow_follows_a_changed_backend_mac_within_the_ttl() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:48001");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let fkey = forward_key(client, vip);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!((v, &out[0..6]), (XDP_TX, &mac_of(be.ip())[..]));
    let made = Instant::now();

    // The backend's MAC changes (a replaced NIC, a moved VM).
    let moved = [2, 0, 0, 0, 0, 0x99];
    let ok = std::process::Command::new("ip")
        .args(["-n", &tb.ns, "neigh", "replace", &be.ip().to_string()])
        .args([
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "t0",
            "nud",
            "permanent",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let ack = packet::tcp(host_mac(2), LB_MAC, client, vip, 2, 1, packet::ACK, b"x");
    let (v, out) = tb.run(&ack).unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(
        &out[0..6],
        &mac_of(be.ip()),
        "within the TTL the flow's cached next hop is used"
    );
    // Packets of the flow keep going (to the old MAC) until its next hop is TTL old.
    let limit = Duration::from_secs(NEXTHOP_TTL_SECS as u64) + Duration::from_millis(1500);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let (v, out) = tb.run(&ack).unwrap();
        assert_eq!(v, XDP_TX);
        if out[0..6] == moved {
            break;
        }
        assert_eq!(&out[0..6], &mac_of(be.ip()));
        assert!(
            made.elapsed() < limit,
            "the flow still uses the old MAC after {:?}",
            made.elapsed()
        );
    }
    assert!(
        made.elapsed() >= Duration::from_secs(NEXTHOP_TTL_SECS as u64 - 1),
        "revalidated after about the TTL, not per packet ({:?})",
        made.elapsed()
    );
    run_counted(
        &tb,
        Row {
            name: "the established flow goes to the backend's new MAC",
            input: packet::tcp(host_mac(2), LB_MAC, client, vip, 3, 1, packet::ACK, b"y"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                moved,
                snat,
                be,
                3,
                1,
                packet::ACK,
                b"y",
            )),
        },
        Reason::Tx,
    );
    assert_eq!(tb.dp.flows()[&fkey].dmac, moved);

    // The client's side changes MAC (it moved behind another router): its next packet
    // updates the reply entry, and the backend's answer follows at once.
    let router = [2, 0, 0, 0, 0, 0x77];
    run_counted(
        &tb,
        Row {
            name: "the client's packet from a new MAC",
            input: packet::tcp(router, LB_MAC, client, vip, 4, 1, packet::ACK, b"z"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                moved,
                snat,
                be,
                4,
                1,
                packet::ACK,
                b"z",
            )),
        },
        Reason::Tx,
    );
    assert_eq!(tb.dp.flows()[&reply_key(be, port, false)].dmac, router);
    run_counted(
        &tb,
        Row {
            name: "the backend's answer goes to the client's new MAC",
            input: packet::tcp(moved, LB_MAC, be, snat, 1, 5, packet::ACK, b"ok"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                router,
                vip,
                client,
                1,
                5,
                packet::ACK,
                b"ok",
            )),
        },
        Reason::Tx,
    );
}
