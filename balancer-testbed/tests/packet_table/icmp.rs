//! ICMP rows: errors about NAT flows translated both ways (RFC 5508), errors about DSR flows
//! forwarded to their backend, unrelated or malformed ICMP passed untouched, and packets too
//! big for the egress link answered (rate-limited). Expected frames are built with etherparse
//! from the packets each side sent, never with the dataplane's own code.

use std::net::{IpAddr, SocketAddr};

use balancer::control::state::{BackendHealth as Health, State};
use balancer_common::{PROTO_TCP, PROTO_UDP, Reason};
use balancer_testbed::{LB_MAC, Testbed, bench::configured_testbed, host_mac, packet};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpDscp, IpHeaders, IpNumber, Ipv4Header, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice, icmpv4, icmpv6,
};

use super::{XDP_DROP, XDP_PASS, XDP_TX, lb_addr, mac_of, predict, sa, set_health};

/// A router on the segment (it has a permanent neighbour entry in the testbed).
pub(super) const ROUTER: u8 = 50;

pub(super) fn router(v6: bool) -> IpAddr {
    if v6 {
        "fd77::32".parse().unwrap()
    } else {
        "10.77.0.50".parse().unwrap()
    }
}

/// What an ICMP error says.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    FragNeeded(u16),
    PortUnreachable,
    TimeExceeded,
    TooBig(u32),
}

/// An ICMP error frame from `src` to `dst` quoting `quote` (an IP packet, maybe cut).
pub(super) fn icmp_error(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    kind: Kind,
    quote: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let t = match kind {
                Kind::FragNeeded(mtu) => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ),
                Kind::PortUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
                }
                Kind::TimeExceeded => {
                    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                }
                Kind::TooBig(_) => panic!("IPv6 only"),
            };
            eth.ipv4(s.octets(), d.octets(), 64)
                .icmpv4(t)
                .write(&mut out, quote)
                .unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let t = match kind {
                Kind::TooBig(mtu) => Icmpv6Type::PacketTooBig { mtu },
                Kind::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                Kind::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
                Kind::FragNeeded(_) => panic!("IPv4 only"),
            };
            eth.ipv6(s.octets(), d.octets(), 64)
                .icmpv6(t)
                .write(&mut out, quote)
                .unwrap();
        }
        _ => panic!("mixed families"),
    }
    out
}

/// The IP packet inside a frame, cut to `len` bytes (`None`: whole).
pub(super) fn ip_of(frame: &[u8], len: Option<usize>) -> Vec<u8> {
    let ip = &frame[14..];
    ip[..len.unwrap_or(ip.len()).min(ip.len())].to_vec()
}

/// Outer and quoted checksums of an ICMP frame, recomputed by etherparse.
fn assert_icmp_checksums(frame: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).expect("parsable frame");
    match (p.net.as_ref().unwrap(), p.transport.as_ref().unwrap()) {
        (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer IPv4");
            assert_eq!(
                icmp.checksum(),
                icmp.icmp_type().calc_checksum(icmp.payload()),
                "ICMPv4"
            );
            let inner = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload())
                .unwrap()
                .to_header();
            assert_eq!(
                inner.header_checksum,
                inner.calc_header_checksum(),
                "quoted IPv4"
            );
        }
        (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
            let h = ip.header();
            let c = icmp
                .icmp_type()
                .calc_checksum(h.source(), h.destination(), icmp.payload())
                .unwrap();
            assert_eq!(icmp.checksum(), c, "ICMPv6");
        }
        _ => panic!("not ICMP"),
    }
}

/// One row: input, expected verdict, expected output (`None`: untouched), the reason counter
/// it must bump (exactly one, by one).
pub(super) struct IcmpRow {
    pub(super) name: &'static str,
    pub(super) input: Vec<u8>,
    pub(super) verdict: u32,
    pub(super) output: Option<Vec<u8>>,
    pub(super) reason: Reason,
}

fn reasons(tb: &Testbed) -> Vec<u64> {
    tb.dp.reasons().into_iter().map(|(_, v)| v).collect()
}

pub(super) fn run_icmp_rows(tb: &Testbed, rows: &[IcmpRow]) {
    for r in rows {
        let before = reasons(tb);
        let (v, out) = tb.run(&r.input).unwrap();
        assert_eq!(v, r.verdict, "{}: verdict", r.name);
        match &r.output {
            Some(exp) => {
                assert_eq!(&out, exp, "{}: output bytes", r.name);
                assert_icmp_checksums(&out);
            }
            None => assert_eq!(out, r.input, "{}: untouched", r.name),
        }
        let after = reasons(tb);
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let want = u64::from(i == r.reason as usize);
            assert_eq!(
                a - b,
                want,
                "{}: reason {} counted {} times",
                r.name,
                Reason::ALL[i].name(),
                a - b
            );
        }
    }
}

/// A NAT flow set up by a SYN: (client, vip, backend, SNAT address and port).
fn nat_flow(
    tb: &Testbed,
    st: &State,
    svc: &str,
    client: SocketAddr,
    vip: SocketAddr,
    proto: u8,
) -> (SocketAddr, SocketAddr) {
    let (be, port) = predict(tb, st, svc, client, vip, proto);
    let snat = SocketAddr::new(lb_addr(vip.is_ipv6()), port);
    let first = if proto == PROTO_TCP {
        packet::tcp(host_mac(2), LB_MAC, client, vip, 1000, 0, packet::SYN, &[])
    } else {
        packet::udp(host_mac(2), LB_MAC, client, vip, b"query")
    };
    assert_eq!(tb.run(&first).unwrap().0, XDP_TX, "flow set up");
    (be, snat)
}

/// Rows for one family: errors from the backend side and from the client side about a TCP
/// NAT flow, a UDP one, and ICMP that is not about a flow.
fn nat_rows(v6: bool) {
    let (tb, st) = configured_testbed(65536).unwrap();
    let (svc, vip, client, dns_vip) = if v6 {
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:40101"), None)
    } else {
        (
            "web",
            sa("10.77.0.100:7002"),
            sa("10.77.0.2:40101"),
            Some(sa("10.77.0.100:5353")),
        )
    };
    let (be, snat) = nat_flow(&tb, &st, svc, client, vip, PROTO_TCP);
    let big = Kind::FragNeeded(1300);
    let too_big = if v6 { Kind::TooBig(1300) } else { big };
    // What the balancer sent the backend, and what the client had sent the VIP.
    let sent = packet::tcp(
        LB_MAC,
        mac_of(be.ip()),
        snat,
        be,
        1001,
        1,
        packet::ACK,
        &[7; 1200],
    );
    let orig = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        vip,
        1001,
        1,
        packet::ACK,
        &[7; 1200],
    );
    // What the balancer sent the client, and what the backend had sent the SNAT address.
    let reply_sent = packet::tcp(LB_MAC, host_mac(2), vip, client, 9, 1002, packet::ACK, b"r");
    let reply_orig = packet::tcp(
        mac_of(be.ip()),
        LB_MAC,
        be,
        snat,
        9,
        1002,
        packet::ACK,
        b"r",
    );
    let quote_min = Some(if v6 { 48 } else { 28 });
    let quote_full = Some(if v6 { 1232 } else { 548 });
    let mut rows = vec![
        IcmpRow {
            name: "too big from a router behind the backend link: to the client from the VIP",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(v6),
                snat.ip(),
                too_big,
                &ip_of(&sent, quote_full),
            ),
            verdict: XDP_TX,
            output: Some(icmp_error(
                LB_MAC,
                host_mac(2),
                vip.ip(),
                client.ip(),
                too_big,
                &ip_of(&orig, quote_full),
            )),
            reason: Reason::IcmpNat,
        },
        IcmpRow {
            name: "time exceeded with the minimal quote (no TCP checksum in it)",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(v6),
                snat.ip(),
                Kind::TimeExceeded,
                &ip_of(&sent, quote_min),
            ),
            verdict: XDP_TX,
            output: Some(icmp_error(
                LB_MAC,
                host_mac(2),
                vip.ip(),
                client.ip(),
                Kind::TimeExceeded,
                &ip_of(&orig, quote_min),
            )),
            reason: Reason::IcmpNat,
        },
        IcmpRow {
            name: "unreachable from the client about a reply: to the backend from the SNAT address",
            input: icmp_error(
                host_mac(2),
                LB_MAC,
                client.ip(),
                vip.ip(),
                Kind::PortUnreachable,
                &ip_of(&reply_sent, None),
            ),
            verdict: XDP_TX,
            output: Some(icmp_error(
                LB_MAC,
                mac_of(be.ip()),
                snat.ip(),
                be.ip(),
                Kind::PortUnreachable,
                &ip_of(&reply_orig, None),
            )),
            reason: Reason::IcmpNat,
        },
        IcmpRow {
            name: "an error about a packet of no flow is passed",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(v6),
                snat.ip(),
                too_big,
                &ip_of(
                    &packet::tcp(
                        LB_MAC,
                        mac_of(be.ip()),
                        SocketAddr::new(snat.ip(), snat.port() ^ 1),
                        be,
                        1,
                        1,
                        packet::ACK,
                        b"x",
                    ),
                    None,
                ),
            ),
            verdict: XDP_PASS,
            output: None,
            reason: Reason::PassIcmp,
        },
        IcmpRow {
            name: "an error not sent to the quoted packet's source is passed",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(v6),
                vip.ip(),
                too_big,
                &ip_of(&sent, quote_min),
            ),
            verdict: XDP_PASS,
            output: None,
            reason: Reason::PassIcmpMalformed,
        },
        IcmpRow {
            name: "an error quoting less than 8 bytes of TCP is passed",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(v6),
                snat.ip(),
                too_big,
                &ip_of(&sent, quote_min.map(|q| q - 1)),
            ),
            verdict: XDP_PASS,
            output: None,
            reason: Reason::PassIcmpMalformed,
        },
    ];
    if let Some(dns_vip) = dns_vip {
        let dclient = sa("10.77.0.2:40102");
        let (dbe, dsnat) = nat_flow(&tb, &st, "dns", dclient, dns_vip, PROTO_UDP);
        rows.push(IcmpRow {
            name: "port unreachable from a UDP backend: to the client from the VIP",
            input: icmp_error(
                mac_of(dbe.ip()),
                LB_MAC,
                dbe.ip(),
                dsnat.ip(),
                Kind::PortUnreachable,
                &ip_of(
                    &packet::udp(LB_MAC, mac_of(dbe.ip()), dsnat, dbe, b"query"),
                    None,
                ),
            ),
            verdict: XDP_TX,
            output: Some(icmp_error(
                LB_MAC,
                host_mac(2),
                dns_vip.ip(),
                dclient.ip(),
                Kind::PortUnreachable,
                &ip_of(
                    &packet::udp(host_mac(2), LB_MAC, dclient, dns_vip, b"query"),
                    None,
                ),
            )),
            reason: Reason::IcmpNat,
        });
    }
    run_icmp_rows(&tb, &rows);
    // A valid error cut at every length, and with its IP length claiming more than the frame
    // holds: passed or dropped, never changed.
    let valid = icmp_error(
        host_mac(ROUTER),
        LB_MAC,
        router(v6),
        snat.ip(),
        too_big,
        &ip_of(&sent, quote_full),
    );
    for len in 14..valid.len() {
        let cut = valid[..len].to_vec();
        let (v, out) = tb.run(&cut).unwrap();
        assert!(v == XDP_PASS || v == XDP_DROP, "cut at {len}: verdict {v}");
        assert_eq!(out, cut, "cut at {len}: changed");
    }
    let mut lying = valid.clone();
    lying.truncate(valid.len() - 100);
    let (v, out) = tb.run(&lying).unwrap();
    assert_eq!(v, XDP_PASS, "length past the frame");
    assert_eq!(out, lying, "length past the frame: changed");
}

#[test]
fn icmp_errors_about_v4_nat_flows_are_translated_both_ways() {
    nat_rows(false);
}

#[test]
fn icmp_errors_about_v6_nat_flows_are_translated_both_ways() {
    nat_rows(true);
}

#[test]
fn icmp_error_about_a_dsr_flow_goes_to_its_backend() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7003");
    let client = sa("10.77.0.2:40103");
    let (be, _) = predict(&tb, &st, "direct", client, vip, PROTO_TCP);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    // The backend answered the client directly, from the VIP; a router before the client
    // says that answer was too big.
    let reply = packet::tcp(
        mac_of(be.ip()),
        host_mac(ROUTER),
        vip,
        client,
        5,
        2,
        packet::ACK,
        &[1; 1400],
    );
    let err = icmp_error(
        host_mac(ROUTER),
        LB_MAC,
        router(false),
        vip.ip(),
        Kind::FragNeeded(1400),
        &ip_of(&reply, Some(548)),
    );
    let mut fwd = err.clone();
    fwd[0..6].copy_from_slice(&mac_of(be.ip()));
    fwd[6..12].copy_from_slice(&LB_MAC);
    run_icmp_rows(
        &tb,
        &[IcmpRow {
            name: "DSR: the error reaches the backend unchanged but for the MACs",
            input: err,
            verdict: XDP_TX,
            output: Some(fwd),
            reason: Reason::IcmpDsr,
        }],
    );
}

#[test]
fn icmp_error_about_a_flow_of_a_down_backend_is_passed() {
    let (mut tb, mut st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40104");
    let (be, snat) = nat_flow(&tb, &st, "web", client, vip, PROTO_TCP);
    let i = st.services["web"]
        .backends
        .iter()
        .position(|b| b.address == be)
        .unwrap();
    set_health(&mut tb, &mut st, "web", i, Health::Down);
    let sent = packet::tcp(
        LB_MAC,
        mac_of(be.ip()),
        snat,
        be,
        1001,
        1,
        packet::ACK,
        b"x",
    );
    run_icmp_rows(
        &tb,
        &[IcmpRow {
            name: "error about a flow whose backend is down",
            input: icmp_error(
                host_mac(ROUTER),
                LB_MAC,
                router(false),
                snat.ip(),
                Kind::FragNeeded(1300),
                &ip_of(&sent, None),
            ),
            verdict: XDP_PASS,
            output: None,
            reason: Reason::PassIcmp,
        }],
    );
}

/// The answer etherparse builds for a packet too big for a link of `mtu`: from the packet's
/// destination to its source, back to its MAC, quoting as much as fits 576 / 1280 bytes (in
/// 64-byte steps).
fn too_big_answer(frame: &[u8], mtu: u32) -> Vec<u8> {
    let ip = &frame[14..];
    let eth = PacketBuilder::ethernet2(LB_MAC, host_mac(2));
    let mut out = Vec::new();
    if ip[0] >> 4 == 6 {
        let q = 1216.min(ip.len() / 64 * 64);
        let (src, dst): ([u8; 16], [u8; 16]) = (
            ip[8..24].try_into().unwrap(),
            ip[24..40].try_into().unwrap(),
        );
        eth.ipv6(dst, src, 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu })
            .write(&mut out, &ip[..q])
            .unwrap();
    } else {
        let q = 512.min(ip.len() / 64 * 64);
        let (src, dst): ([u8; 4], [u8; 4]) = (
            ip[12..16].try_into().unwrap(),
            ip[16..20].try_into().unwrap(),
        );
        let mut h = Ipv4Header::new(0, 64, IpNumber::ICMP, dst, src).unwrap();
        h.dont_fragment = false;
        h.dscp = IpDscp::try_new(0x30).unwrap();
        eth.ip(IpHeaders::Ipv4(h, Default::default()))
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: mtu as u16,
                },
            ))
            .write(&mut out, &ip[..q])
            .unwrap();
    }
    out
}

#[test]
fn packets_too_big_for_the_egress_link_are_answered() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let mut rows = Vec::new();
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:40105")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:40105")),
    ] {
        let (_be, _snat) = nat_flow(&tb, &st, svc, client, vip, PROTO_TCP);
        // t0's MTU is 1500: 1600 bytes of IP do not fit.
        let payload = 1600 - 20 - if vip.is_ipv6() { 40 } else { 20 };
        let big = packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            1001,
            1,
            packet::ACK,
            &vec![3u8; payload],
        );
        rows.push(IcmpRow {
            name: if vip.is_ipv6() {
                "IPv6: packet too big"
            } else {
                "IPv4 with DF: fragmentation needed"
            },
            output: Some(too_big_answer(&big, 1500)),
            input: big,
            verdict: XDP_TX,
            reason: Reason::TooBig,
        });
        // Exactly the MTU fits.
        let fits = packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            1001,
            1,
            packet::ACK,
            &vec![3u8; payload - 100],
        );
        let (v, out) = tb.run(&fits).unwrap();
        assert_eq!(v, XDP_TX, "{svc}: 1500 bytes fit");
        assert_eq!(out.len(), fits.len());
    }
    // IPv4 without DF would need fragmenting, which XDP cannot do: dropped.
    let client = sa("10.77.0.2:40105");
    let vip = sa("10.77.0.100:7002");
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, [10, 77, 0, 2], [10, 77, 0, 100]).unwrap();
    h.dont_fragment = false;
    let mut no_df = Vec::new();
    PacketBuilder::ethernet2(host_mac(2), LB_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .tcp(client.port(), vip.port(), 1001, 64240)
        .ack(1)
        .write(&mut no_df, &[3u8; 1560])
        .unwrap();
    rows.push(IcmpRow {
        name: "IPv4 without DF: dropped",
        input: no_df.clone(),
        verdict: XDP_DROP,
        output: Some(no_df),
        reason: Reason::DropTooBig,
    });
    let too_big_rows: Vec<IcmpRow> = rows;
    for r in &too_big_rows {
        let before = reasons(&tb);
        let (v, out) = tb.run(&r.input).unwrap();
        assert_eq!(v, r.verdict, "{}: verdict", r.name);
        if v == XDP_TX {
            assert_eq!(Some(&out), r.output.as_ref(), "{}: output", r.name);
            assert_icmp_checksums(&out);
        }
        let after = reasons(&tb);
        assert_eq!(
            after[r.reason as usize] - before[r.reason as usize],
            1,
            "{}",
            r.name
        );
    }
}

/// A route's MTU below the device's (a smaller link the route knows of further on) is
/// checked too: the FIB answer's MTU is kept with the flow's next hop. For IPv4 the FIB
/// answers with a route's MTU when it is locked (`mtu lock`), as for the kernel's own
/// forwarding (or with `net.ipv4.ip_forward_use_pmtu`).
#[test]
fn packets_too_big_for_the_route_are_answered() {
    let (tb, st) = configured_testbed(65536).unwrap();
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:40106")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:40106")),
    ] {
        let (be, _) = predict(&tb, &st, svc, client, vip, PROTO_TCP);
        let (family, prefix) = if be.is_ipv6() {
            ("-6", 128)
        } else {
            ("-4", 32)
        };
        let dst = format!("{}/{prefix}", be.ip());
        tb.ip(&[
            family, "route", "add", &dst, "dev", "t0", "mtu", "lock", "1300",
        ])
        .unwrap();
        nat_flow(&tb, &st, svc, client, vip, PROTO_TCP);
        let l4 = 20 + if vip.is_ipv6() { 40 } else { 20 };
        let segment = |ip_len: usize| {
            packet::tcp(
                host_mac(2),
                LB_MAC,
                client,
                vip,
                1001,
                1,
                packet::ACK,
                &vec![5u8; ip_len - l4],
            )
        };
        // 1400 bytes fit t0 (1500) but not the route.
        let big = segment(1400);
        let before = reasons(&tb);
        let (v, out) = tb.run(&big).unwrap();
        assert_eq!(v, XDP_TX, "{svc}: answered");
        assert!(
            out == too_big_answer(&big, 1300),
            "{svc}: not the route MTU's answer ({} bytes out, {} in)",
            out.len(),
            big.len()
        );
        assert_icmp_checksums(&out);
        let after = reasons(&tb);
        assert_eq!(
            after[Reason::TooBig as usize] - before[Reason::TooBig as usize],
            1
        );
        let fits = segment(1300);
        let (v, out) = tb.run(&fits).unwrap();
        assert_eq!(v, XDP_TX, "{svc}: 1300 bytes fit");
        assert_eq!(out.len(), fits.len(), "{svc}: forwarded, not answered");
    }
}

/// Answers are rate-limited per CPU (the bucket's arithmetic is unit-tested on the host
/// with a fake clock): with the thread on one CPU, a run of too-big packets far past the
/// burst gets some answers and the rest dropped, each counted once.
#[test]
fn too_big_answers_are_rate_limited() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40106");
    nat_flow(&tb, &st, "web", client, vip, PROTO_TCP);
    let big = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        vip,
        1001,
        1,
        packet::ACK,
        &[3u8; 1560],
    );
    let before = reasons(&tb);
    // PTB_BURST 50, PTB_RATE 200/s (balancer-ebpf/src/toobig.rs): 2000 runs would have to
    // take ten seconds to all be answered.
    let n = 2000u64;
    let mut answered = 0u64;
    for _ in 0..n {
        let (v, out) = tb.run(&big).unwrap();
        assert!(v == XDP_TX || v == XDP_DROP, "verdict {v}");
        if v == XDP_DROP {
            assert_eq!(out, big, "a dropped packet is not half-built");
        }
        answered += u64::from(v == XDP_TX);
    }
    let after = reasons(&tb);
    assert!(answered >= 1, "some answers");
    assert!(
        answered < n,
        "the rest is dropped: {answered} of {n} answered"
    );
    let t = Reason::TooBig as usize;
    let d = Reason::DropTooBig as usize;
    assert_eq!(after[t] - before[t], answered);
    assert_eq!(after[d] - before[d], n - answered);
}
