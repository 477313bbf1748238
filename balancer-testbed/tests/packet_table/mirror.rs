//! HA mirror rows: the program reports the flows it creates while mirroring is on (and only
//! then), and flows installed by the controller (a mirrored flow of the other balancer,
//! without a cached next hop) resolve their next hop on their first packet in each direction:
//! forwarded to the right backend with the mirrored SNAT port, back to the client from the
//! VIP, never with zero MACs. Expected frames are built with etherparse.

use std::net::SocketAddr;

use balancer::{
    control::{
        mirror::{MirroredFlow, entries},
        state::State,
    },
    host::net::addr16,
};
use balancer_common::{
    FLOW_F_DSR, FLOW_F_FORWARD, FLOW_F_NEXTHOP, Flow, FlowKey, PROTO_TCP, Reason, ServiceKey,
};
use balancer_testbed::{LB_MAC, Testbed, bench::configured_testbed, host_mac, packet, run_prog};

use super::{
    Row, XDP_DROP, XDP_TX, forward_key, lb_addr, mac_of, predict, reason_count, reply_key,
    run_counted, sa,
};

/// A backend of `svc` that the ring would NOT give this client: the installed entry, not the
/// ring, must decide.
fn other_backend(
    tb: &Testbed,
    st: &State,
    svc: &str,
    client: SocketAddr,
    vip: SocketAddr,
) -> SocketAddr {
    let (ring_pick, _) = predict(tb, st, svc, client, vip, PROTO_TCP);
    st.services[svc]
        .backends
        .iter()
        .map(|b| b.address)
        .find(|a| *a != ring_pick)
        .unwrap()
}

/// An established flow as the other balancer mirrors it.
fn mirrored(
    client: SocketAddr,
    vip: SocketAddr,
    be: SocketAddr,
    snat_port: u16,
    dsr: bool,
) -> MirroredFlow {
    MirroredFlow {
        src: addr16(client.ip()),
        dst: addr16(vip.ip()),
        sport: client.port().to_be(),
        dport: vip.port().to_be(),
        proto: PROTO_TCP,
        new_src: if dsr {
            addr16(client.ip())
        } else {
            addr16(lb_addr(vip.is_ipv6()))
        },
        new_dst: addr16(be.ip()),
        new_sport: if dsr {
            client.port().to_be()
        } else {
            snat_port.to_be()
        },
        new_dport: be.port().to_be(),
        flags: FLOW_F_FORWARD | if dsr { FLOW_F_DSR } else { 0 },
        idle_secs: 2,
    }
}

/// Translates `m` with this testbed's own service ids and slots and installs it.
fn install(tb: &mut Testbed, m: &MirroredFlow) -> Vec<(FlowKey, Flow)> {
    let services = tb.dp.services();
    let backends = tb.dp.backends();
    let service = |k: &ServiceKey| services.iter().find(|(sk, _)| sk == k).map(|(_, s)| s.id);
    let backend = |id: u32, addr: &[u8; 16], port: u16| {
        backends
            .iter()
            .find(|(_, b)| b.used != 0 && b.service == id && b.addr == *addr && b.port == port)
            .map(|(slot, b)| (*slot, b.generation))
    };
    let now = balancer::control::flow_expiry::now_secs();
    let e = entries(m, &service, &backend, now).expect("service and backend known here");
    assert_eq!(tb.dp.install_flows(&e).unwrap(), e.len());
    for (_, f) in &e {
        assert_eq!(f.flags & FLOW_F_NEXTHOP, 0, "installed without a next hop");
    }
    e
}

#[test]
fn mirror_events_report_each_new_flow_only_while_on() {
    let (mut tb, _st) = configured_testbed(65536).unwrap();
    let mut reader = tb.dp.mirror_reader().unwrap();
    assert!(
        tb.dp.mirror_reader().is_err(),
        "one consumer of the ring buffer"
    );
    let mut got = Vec::new();
    let vip = sa("10.77.0.100:7002");
    let syn = |c: SocketAddr, vip: SocketAddr| {
        packet::tcp(host_mac(2), LB_MAC, c, vip, 1, 0, packet::SYN, &[])
    };

    // Off (the default): a new flow, no event.
    let quiet = sa("10.77.0.2:41001");
    assert_eq!(tb.run(&syn(quiet, vip)).unwrap().0, XDP_TX);
    assert_eq!(reader.drain(&mut got), 0);
    assert_eq!(tb.dp.mirror_counters().events, 0);

    let before = tb.dp.globals().unwrap();
    tb.dp.set_mirror(true).unwrap();
    let g = tb.dp.globals().unwrap();
    assert_eq!(g.mirror, 1);
    assert_eq!(
        (
            g.snat_port_lo,
            g.snat_port_hi,
            g.tcp_idle_secs,
            g.abi_version
        ),
        (
            before.snat_port_lo,
            before.snat_port_hi,
            before.tcp_idle_secs,
            before.abi_version
        ),
        "the other globals are kept"
    );

    // On: exactly one event per new flow, the forward entry as inserted.
    for (c, vip, dsr) in [
        (sa("10.77.0.2:41002"), vip, false),
        (sa("[fd77::2]:41003"), sa("[fd77::100]:7002"), false),
        (sa("10.77.0.2:41004"), sa("10.77.0.100:7003"), true),
    ] {
        assert_eq!(tb.run(&syn(c, vip)).unwrap().0, XDP_TX);
        got.clear();
        assert_eq!(reader.drain(&mut got), 1, "{c}: one event");
        let k = forward_key(c, vip);
        assert_eq!(got[0].0, k);
        assert_eq!(got[0].1, tb.dp.flows()[&k], "{c}: the forward entry");
        assert_eq!(got[0].1.flags & FLOW_F_DSR != 0, dsr);
        // Its packets after the first make no event.
        let ack = packet::tcp(host_mac(2), LB_MAC, c, vip, 2, 1, packet::ACK, b"x");
        assert_eq!(tb.run(&ack).unwrap().0, XDP_TX);
        assert_eq!(reader.drain(&mut got), 0, "{c}: no event for a known flow");
    }
    let c = tb.dp.mirror_counters();
    assert_eq!((c.events, c.dropped), (3, 0));

    // Off again: none.
    tb.dp.set_mirror(false).unwrap();
    assert_eq!(tb.run(&syn(sa("10.77.0.2:41005"), vip)).unwrap().0, XDP_TX);
    assert_eq!(reader.drain(&mut got), 0);
    assert_eq!(tb.dp.mirror_counters().events, 3);
}

#[test]
fn an_installed_nat_flow_resolves_its_next_hops_from_the_clients_packet() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:42001")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:42001")),
    ] {
        let v6 = vip.is_ipv6();
        let be = other_backend(&tb, &st, svc, client, vip);
        // A SNAT port this balancer would not have picked itself.
        let port = 20_000;
        let snat = SocketAddr::new(lb_addr(v6), port);
        install(&mut tb, &mirrored(client, vip, be, port, false));
        run_counted(
            &tb,
            Row {
                name: "the client's ACK of an installed flow goes to its backend, mirrored port",
                input: packet::tcp(
                    host_mac(2),
                    LB_MAC,
                    client,
                    vip,
                    1001,
                    5001,
                    packet::ACK,
                    b"after the takeover",
                ),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    mac_of(be.ip()),
                    snat,
                    be,
                    1001,
                    5001,
                    packet::ACK,
                    b"after the takeover",
                )),
            },
            Reason::Tx,
        );
        let flows = tb.dp.flows();
        let f = flows[&forward_key(client, vip)];
        assert_ne!(f.flags & FLOW_F_NEXTHOP, 0, "{svc}: next hop stored");
        assert_eq!(
            (f.ifindex, f.smac, f.dmac),
            (tb.ifindex, LB_MAC, mac_of(be.ip()))
        );
        // The reply entry took the way back from the same packet.
        let r = flows[&reply_key(be, port, v6)];
        assert_ne!(r.flags & FLOW_F_NEXTHOP, 0, "{svc}: reply next hop stored");
        assert_eq!(
            (r.ifindex, r.smac, r.dmac, r.peer_ifindex),
            (tb.ifindex, LB_MAC, host_mac(2), tb.ifindex)
        );
        run_counted(
            &tb,
            Row {
                name: "and the backend's answer goes back to the client from the VIP",
                input: packet::tcp(
                    mac_of(be.ip()),
                    LB_MAC,
                    be,
                    snat,
                    5001,
                    1019,
                    packet::ACK,
                    b"ok",
                ),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    host_mac(2),
                    vip,
                    client,
                    5001,
                    1019,
                    packet::ACK,
                    b"ok",
                )),
            },
            Reason::Tx,
        );
    }
    assert_eq!(
        tb.dp.mirror_counters().events,
        0,
        "installed flows are not new flows"
    );
}

#[test]
fn an_installed_reply_entry_finds_the_way_back_to_the_client_and_learns_its_interface() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:43001")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:43001")),
    ] {
        let v6 = vip.is_ipv6();
        let be = other_backend(&tb, &st, svc, client, vip);
        let port = 21_000;
        let snat = SocketAddr::new(lb_addr(v6), port);
        install(&mut tb, &mirrored(client, vip, be, port, false));
        // The backend speaks first after the takeover (server push, or its retransmission).
        let from_be = packet::tcp(
            mac_of(be.ip()),
            LB_MAC,
            be,
            snat,
            7000,
            3000,
            packet::ACK,
            b"pushed",
        );
        run_counted(
            &tb,
            Row {
                name: "an installed reply entry: to the client from the VIP (FIB to the client)",
                input: from_be.clone(),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    host_mac(2),
                    vip,
                    client,
                    7000,
                    3000,
                    packet::ACK,
                    b"pushed",
                )),
            },
            Reason::Tx,
        );
        let r = tb.dp.flows()[&reply_key(be, port, v6)];
        assert_ne!(r.flags & FLOW_F_NEXTHOP, 0, "{svc}: next hop stored");
        assert_eq!(
            (r.ifindex, r.smac, r.dmac, r.peer_ifindex),
            (tb.ifindex, LB_MAC, host_mac(2), tb.ifindex),
            "{svc}: the client's MAC from the FIB, the backend's interface learnt"
        );
        // Learnt: from now on the wrong-interface rule applies.
        let before = reason_count(&tb, Reason::DropWrongInterface);
        let (v, _, _) = run_prog(tb.dp.program().unwrap(), &from_be, 1).unwrap();
        assert_eq!(v, XDP_DROP, "{svc}: a reply from another interface");
        assert_eq!(reason_count(&tb, Reason::DropWrongInterface), before + 1);
        // The forward entry is still without a next hop until the client sends.
        assert_eq!(
            tb.dp.flows()[&forward_key(client, vip)].flags & FLOW_F_NEXTHOP,
            0
        );
    }
}

#[test]
fn an_installed_dsr_flow_goes_to_its_backends_mac() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7003");
    let client = sa("10.77.0.2:44001");
    let be = other_backend(&tb, &st, "direct", client, vip);
    let e = install(&mut tb, &mirrored(client, vip, be, 0, true));
    assert_eq!(e.len(), 1, "a DSR flow has no reply entry");
    run_counted(
        &tb,
        Row {
            name: "an installed DSR flow: only the MACs change, to its backend's",
            input: packet::tcp(
                host_mac(2),
                LB_MAC,
                client,
                vip,
                10,
                20,
                packet::ACK,
                b"dsr",
            ),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                mac_of(be.ip()),
                client,
                vip,
                10,
                20,
                packet::ACK,
                b"dsr",
            )),
        },
        Reason::Tx,
    );
    let f = tb.dp.flows()[&forward_key(client, vip)];
    assert_ne!(f.flags & FLOW_F_NEXTHOP, 0);
    assert_eq!(f.dmac, mac_of(be.ip()));
}

#[test]
fn an_installed_flow_without_a_neighbour_is_dropped_never_sent_with_zero_macs() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:45001");
    let be = other_backend(&tb, &st, "web", client, vip);
    let port = 22_000;
    install(&mut tb, &mirrored(client, vip, be, port, false));
    let ip = |args: &[&str]| {
        let mut v = vec!["-n", tb.ns.as_str()];
        v.extend_from_slice(args);
        let ok = std::process::Command::new("ip")
            .args(&v)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args:?}");
    };
    // Neither the backend's nor the client's MAC is known.
    let (be_ip, client_ip) = (be.ip().to_string(), client.ip().to_string());
    ip(&["neigh", "del", &be_ip, "dev", "t0"]);
    ip(&["neigh", "del", &client_ip, "dev", "t0"]);
    let ack = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 2, packet::ACK, b"a");
    run_counted(
        &tb,
        Row {
            name: "no neighbour for the installed flow's backend: dropped (the client retransmits)",
            input: ack.clone(),
            verdict: XDP_DROP,
            output: None,
        },
        Reason::DropNoNeighbour,
    );
    let snat = SocketAddr::new(lb_addr(false), port);
    let from_be = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 2, 2, packet::ACK, b"b");
    run_counted(
        &tb,
        Row {
            name: "no neighbour for the installed reply's client: dropped",
            input: from_be.clone(),
            verdict: XDP_DROP,
            output: None,
        },
        Reason::DropNoNeighbour,
    );
    let flows = tb.dp.flows();
    assert_eq!(flows[&forward_key(client, vip)].flags & FLOW_F_NEXTHOP, 0);
    assert_eq!(flows[&reply_key(be, port, false)].flags & FLOW_F_NEXTHOP, 0);
    assert_eq!(
        flows[&reply_key(be, port, false)].peer_ifindex,
        0,
        "nothing learnt from a dropped reply"
    );
    // The neighbours come back: the retransmissions go through.
    let mac = |h: [u8; 6]| {
        h.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let (be_mac, client_mac) = (mac(mac_of(be.ip())), mac(host_mac(2)));
    ip(&[
        "neigh",
        "replace",
        &be_ip,
        "lladdr",
        &be_mac,
        "dev",
        "t0",
        "nud",
        "permanent",
    ]);
    ip(&[
        "neigh",
        "replace",
        &client_ip,
        "lladdr",
        &client_mac,
        "dev",
        "t0",
        "nud",
        "permanent",
    ]);
    run_counted(
        &tb,
        Row {
            name: "the backend's retransmission once the client's MAC is known",
            input: from_be,
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                2,
                2,
                packet::ACK,
                b"b",
            )),
        },
        Reason::Tx,
    );
    run_counted(
        &tb,
        Row {
            name: "the client's retransmission once the backend's MAC is known",
            input: ack,
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                mac_of(be.ip()),
                snat,
                be,
                1,
                2,
                packet::ACK,
                b"a",
            )),
        },
        Reason::Tx,
    );
}

#[test]
fn the_sweep_names_the_forward_keys_it_removes_for_the_standby() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let t = balancer::control::flow_expiry::Timeouts {
        tcp_idle: 3600,
        udp_idle: 300,
    };
    let vip = sa("10.77.0.100:7002");
    let dsr_vip = sa("10.77.0.100:7003");
    let nat = sa("10.77.0.2:46001");
    let dsr = sa("10.77.0.2:46002");
    let busy = sa("10.77.0.2:46003");
    let lone = sa("10.77.0.2:46004");
    let be = other_backend(&tb, &st, "web", nat, vip);
    let dsr_be = other_backend(&tb, &st, "direct", dsr, dsr_vip);
    let now = balancer::control::flow_expiry::now_secs();
    for (c, v, b, port, is_dsr, idle) in [
        (nat, vip, be, 23_000, false, 4000),
        (dsr, dsr_vip, dsr_be, 0, true, 4000),
        (busy, vip, be, 23_001, false, 5),
        (lone, vip, be, 23_002, false, 4000),
    ] {
        let mut m = mirrored(c, v, b, port, is_dsr);
        m.idle_secs = idle;
        install(&mut tb, &m);
    }
    // The lone flow's forward entry is gone already (evicted): its reply entry is swept.
    tb.dp.remove_flow(&forward_key(lone, vip)).unwrap();
    let s = tb.dp.sweep_flows(t, now);
    let mut removed = s.removed_forward.clone();
    removed.sort_by_key(|k| u16::from_be(k.sport));
    assert_eq!(
        removed,
        vec![forward_key(nat, vip), forward_key(dsr, dsr_vip)]
    );
    assert_eq!(s.idle, 2, "two idle flows");
    assert_eq!(
        s.orphans, 1,
        "the lone reply entry: its port serves no flow"
    );
    let flows = tb.dp.flows();
    assert_eq!(flows.len(), 2, "the busy flow stays, both halves");
    assert!(flows.contains_key(&forward_key(busy, vip)));
}

#[test]
fn the_mirror_maps_are_pinned_and_adopted_by_a_restarted_controller() {
    use balancer::dataplane::{Dataplane, LoadOptions, remove_pins};
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/blbt-mirror-{}", std::process::id()));
    let opts = LoadOptions {
        pin_path: Some(dir.clone()),
        flow_entries: 4096,
    };
    let key = forward_key(sa("10.77.0.2:47001"), sa("10.77.0.100:7002"));
    let flow = Flow {
        flags: FLOW_F_FORWARD,
        backend: 1,
        ..Flow::default()
    };
    let run = || -> anyhow::Result<()> {
        let mut first = Dataplane::load(&opts)?;
        assert!(!first.adopted);
        first.set_mirror(true)?;
        first.install_flows(&[(key, flow)])?;
        let _reader = first.mirror_reader()?;
        drop(first);
        for n in [
            balancer_common::MAP_MIRROR,
            balancer_common::MAP_MIRROR_STATS,
        ] {
            assert!(dir.join(n).exists(), "{n} pinned");
        }
        let mut second = Dataplane::load(&opts)?;
        assert!(second.adopted, "same ABI: adopted");
        assert_eq!(second.globals()?.mirror, 1, "mirroring stays on");
        assert_eq!(second.flows().get(&key), Some(&flow));
        let _reader = second.mirror_reader()?;
        let mut status = Dataplane::open_pinned(&dir)?;
        assert_eq!(status.mirror_counters(), Default::default());
        let mut reader = status.mirror_reader()?;
        assert_eq!(reader.drain(&mut Vec::new()), 0);
        Ok(())
    };
    let r = run();
    remove_pins(&dir).unwrap();
    r.unwrap();
}
