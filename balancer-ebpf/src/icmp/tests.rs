//! ICMP translation against frames built independently with etherparse: each case builds the
//! error a router or host would send and the error the other side must receive, runs the
//! translation on the first, and compares bytes and checksums.

use balancer_common::{FLOW_F_FORWARD, Flow, PROTO_TCP, PROTO_UDP};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
    icmpv4, icmpv6,
};
use proptest::prelude::*;

use super::*;
use crate::{frame::SliceFrame, parse::parse};

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

/// Addresses of one family: client, VIP, SNAT address, backend, a router on the backend side.
#[derive(Clone, Copy)]
struct Net {
    client: [u8; 16],
    vip: [u8; 16],
    snat: [u8; 16],
    backend: [u8; 16],
    router: [u8; 16],
    v6: bool,
}

fn v6(last: u16, net: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[1] = 0x77;
    a[6..8].copy_from_slice(&net.to_be_bytes());
    a[14..].copy_from_slice(&last.to_be_bytes());
    a
}

const NET4: Net = Net {
    client: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2],
    vip: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 100],
    snat: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1],
    backend: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 1, 11],
    router: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 1, 254],
    v6: false,
};

fn net6() -> Net {
    Net {
        client: v6(2, 0),
        vip: v6(0x100, 0),
        snat: v6(1, 0),
        backend: v6(0x11, 1),
        router: v6(0xfe, 1),
        v6: true,
    }
}

fn a4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// An IP packet (no Ethernet header) carrying TCP or UDP.
fn l4_packet(v6: bool, proto: u8, src: [u8; 16], dst: [u8; 16], sp: u16, dp: u16) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let ip = if v6 {
        eth.ipv6(src, dst, 63)
    } else {
        eth.ipv4(a4(&src), a4(&dst), 63)
    };
    let payload: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
    let mut out = Vec::new();
    if proto == PROTO_TCP {
        ip.tcp(sp, dp, 0x0102_0304, 501)
            .ack(0x0a0b_0c0d)
            .write(&mut out, &payload)
            .unwrap();
    } else {
        ip.udp(sp, dp).write(&mut out, &payload).unwrap();
    }
    out.split_off(14)
}

/// An ICMP error frame from `src` to `dst` quoting `quote`.
fn error_frame(v6: bool, src: [u8; 16], dst: [u8; 16], kind: u8, quote: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let mut out = Vec::new();
    if v6 {
        let t = match kind {
            ICMPV6_PKT_TOOBIG => Icmpv6Type::PacketTooBig { mtu: 1280 },
            ICMPV6_TIME_EXCEEDED => {
                Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
            }
            ICMPV6_DEST_UNREACH => {
                Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
            }
            _ => Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
        };
        eth.ipv6(src, dst, 64)
            .icmpv6(t)
            .write(&mut out, quote)
            .unwrap();
    } else {
        let t = match kind {
            ICMP_FRAG_NEEDED => Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 },
            ),
            ICMP_DEST_UNREACH => {
                Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
            }
            ICMP_TIME_EXCEEDED => {
                Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
            }
            _ => Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
        };
        eth.ipv4(a4(&src), a4(&dst), 64)
            .icmpv4(t)
            .write(&mut out, quote)
            .unwrap();
    }
    out
}

/// The entry a packet from `src:sp` to `dst:dp` is rewritten with.
fn entry(src: [u8; 16], dst: [u8; 16], sp: u16, dp: u16, forward: bool) -> Flow {
    Flow {
        new_src: src,
        new_dst: dst,
        new_sport: sp.to_be(),
        new_dport: dp.to_be(),
        flags: if forward { FLOW_F_FORWARD } else { 0 },
        ..Default::default()
    }
}

fn translate_frame(frame: &mut [u8], flow: &Flow) -> Result<Related, Error> {
    let f = SliceFrame::new(frame);
    let p = parse(&f)?;
    assert!(p.icmp, "parse marks ICMP");
    let r = parse_error(&f, &p)?;
    translate(&f, &p, &r, flow)?;
    Ok(r)
}

/// Checks the outer IPv4 header, ICMP and quoted IPv4 header checksums with etherparse.
fn assert_valid(frame: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).expect("parsable");
    match (p.net.as_ref().unwrap(), p.transport.as_ref().unwrap()) {
        (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
            let h = ip.header().to_header();
            assert_eq!(h.header_checksum, h.calc_header_checksum(), "outer IPv4");
            let c = icmp.icmp_type().calc_checksum(icmp.payload());
            assert_eq!(icmp.checksum(), c, "ICMPv4 checksum");
            let inner = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload()).unwrap();
            let ih = inner.to_header();
            assert_eq!(ih.header_checksum, ih.calc_header_checksum(), "quoted IPv4");
        }
        (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
            let h = ip.header();
            let c = icmp
                .icmp_type()
                .calc_checksum(h.source(), h.destination(), icmp.payload())
                .unwrap();
            assert_eq!(icmp.checksum(), c, "ICMPv6 checksum");
        }
        _ => panic!("not an ICMP frame"),
    }
}

/// From the backend side: a router tells the SNAT address about the packet the balancer sent
/// to the backend; the client must get the same error from the VIP about its own packet.
fn backend_side_case(n: Net, proto: u8, kind: u8, quote_len: Option<usize>) {
    let (cport, vport, sport, bport) = (40000, 80, 10007, 8080);
    let sent = l4_packet(n.v6, proto, n.snat, n.backend, sport, bport);
    let orig = l4_packet(n.v6, proto, n.client, n.vip, cport, vport);
    let cut = |p: &[u8]| p[..quote_len.unwrap_or(p.len())].to_vec();
    let mut frame = error_frame(n.v6, n.router, n.snat, kind, &cut(&sent));
    let expected = error_frame(n.v6, n.vip, n.client, kind, &cut(&orig));
    let reply = entry(n.vip, n.client, vport, cport, false);
    let r = translate_frame(&mut frame, &reply).unwrap();
    assert_same_but_half_checksum(&frame, &expected, proto, quote_len, n.v6);
    assert_eq!(r.key.src, n.backend);
    assert_eq!(r.key.dst, n.snat);
    assert_eq!(
        (u16::from_be(r.key.sport), u16::from_be(r.key.dport)),
        (bport, sport)
    );
    assert_eq!(r.key.proto, proto);
    assert_valid(&frame);
}

/// A quote that ends inside the TCP checksum carries half of it, which cannot be updated:
/// that byte stays as the balancer sent it (the ICMP checksum covers it as it is). Every
/// other byte must equal etherparse's frame.
fn assert_same_but_half_checksum(
    got: &[u8],
    want: &[u8],
    proto: u8,
    quote_len: Option<usize>,
    v6: bool,
) {
    let ip = if v6 { 40 } else { 20 };
    let half = proto == PROTO_TCP && quote_len == Some(ip + TCP_CSUM_OFFSET + 1);
    if !half {
        assert_eq!(got, want);
        return;
    }
    assert_eq!(got.len(), want.len());
    let icmp = 14 + ip;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if i == got.len() - 1 || i == icmp + 2 || i == icmp + 3 {
            continue;
        }
        assert_eq!(g, w, "byte {i}");
    }
}

/// From the client side: the client (or a router before it) tells the VIP about a reply; the
/// backend must get the error from the SNAT address about its own reply.
fn client_side_case(n: Net, proto: u8, kind: u8, quote_len: Option<usize>) {
    let (cport, vport, sport, bport) = (40001, 443, 10100, 8443);
    let sent = l4_packet(n.v6, proto, n.vip, n.client, vport, cport);
    let orig = l4_packet(n.v6, proto, n.backend, n.snat, bport, sport);
    let cut = |p: &[u8]| p[..quote_len.unwrap_or(p.len())].to_vec();
    let mut frame = error_frame(n.v6, n.client, n.vip, kind, &cut(&sent));
    let expected = error_frame(n.v6, n.snat, n.backend, kind, &cut(&orig));
    let forward = entry(n.snat, n.backend, sport, bport, true);
    let r = translate_frame(&mut frame, &forward).unwrap();
    assert_eq!((r.key.src, r.key.dst), (n.client, n.vip));
    assert_same_but_half_checksum(&frame, &expected, proto, quote_len, n.v6);
    assert_valid(&frame);
}

#[test]
fn v4_frag_needed_from_a_router_reaches_the_client_about_its_packet() {
    backend_side_case(NET4, PROTO_TCP, ICMP_FRAG_NEEDED, None);
    backend_side_case(NET4, PROTO_TCP, ICMP_FRAG_NEEDED, Some(28));
    backend_side_case(NET4, PROTO_TCP, ICMP_FRAG_NEEDED, Some(20 + 18));
    backend_side_case(NET4, PROTO_TCP, ICMP_TIME_EXCEEDED, Some(20 + 17));
    backend_side_case(NET4, PROTO_UDP, ICMP_DEST_UNREACH, Some(28));
    backend_side_case(NET4, PROTO_UDP, ICMP_DEST_UNREACH, None);
}

#[test]
fn v4_error_from_the_client_side_reaches_the_backend_about_its_reply() {
    client_side_case(NET4, PROTO_TCP, ICMP_FRAG_NEEDED, None);
    client_side_case(NET4, PROTO_UDP, ICMP_DEST_UNREACH, Some(28));
    client_side_case(NET4, PROTO_TCP, ICMP_TIME_EXCEEDED, Some(48));
}

#[test]
fn v6_errors_both_ways() {
    let n = net6();
    backend_side_case(n, PROTO_TCP, ICMPV6_PKT_TOOBIG, None);
    backend_side_case(n, PROTO_TCP, ICMPV6_PKT_TOOBIG, Some(48));
    backend_side_case(n, PROTO_UDP, ICMPV6_DEST_UNREACH, Some(48));
    backend_side_case(n, PROTO_TCP, ICMPV6_TIME_EXCEEDED, Some(40 + 18));
    client_side_case(n, PROTO_TCP, ICMPV6_PKT_TOOBIG, None);
    client_side_case(n, PROTO_UDP, ICMPV6_TIME_EXCEEDED, Some(48));
    client_side_case(n, PROTO_TCP, ICMPV6_DEST_UNREACH, Some(60));
}

#[test]
fn a_zero_ipv4_udp_checksum_in_the_quote_stays_zero() {
    let n = NET4;
    let mut sent = l4_packet(false, PROTO_UDP, n.snat, n.backend, 10007, 53);
    let mut orig = l4_packet(false, PROTO_UDP, n.client, n.vip, 40000, 53);
    sent[26..28].copy_from_slice(&[0, 0]);
    orig[26..28].copy_from_slice(&[0, 0]);
    let mut frame = error_frame(false, n.router, n.snat, ICMP_DEST_UNREACH, &sent[..28]);
    let expected = error_frame(false, n.vip, n.client, ICMP_DEST_UNREACH, &orig[..28]);
    translate_frame(&mut frame, &entry(n.vip, n.client, 53, 40000, false)).unwrap();
    assert_eq!(frame, expected);
}

/// Every refusal leaves the frame exactly as it was.
fn refused(mut frame: Vec<u8>, want: Error) {
    let before = frame.clone();
    let flow = entry(NET4.vip, NET4.client, 80, 40000, false);
    assert_eq!(translate_frame(&mut frame, &flow).unwrap_err(), want);
    assert_eq!(frame, before);
}

#[test]
fn what_is_not_an_error_about_tcp_or_udp_is_refused_untouched() {
    let n = NET4;
    let sent = l4_packet(false, PROTO_TCP, n.snat, n.backend, 10007, 8080);
    refused(
        error_frame(false, n.router, n.snat, 0, &sent),
        Error::IcmpUnrelated,
    );
    // An error about an ICMP packet (not balanced).
    let mut icmp_quote = sent.clone();
    icmp_quote[9] = 1;
    refused(
        error_frame(false, n.router, n.snat, ICMP_DEST_UNREACH, &icmp_quote),
        Error::IcmpUnrelated,
    );
    let n6 = net6();
    let sent6 = l4_packet(true, PROTO_TCP, n6.snat, n6.backend, 10007, 8080);
    refused(
        error_frame(true, n6.router, n6.snat, 0, &sent6),
        Error::IcmpUnrelated,
    );
}

#[test]
fn malformed_errors_are_refused_untouched() {
    let n = NET4;
    let sent = l4_packet(false, PROTO_TCP, n.snat, n.backend, 10007, 8080);
    let good = error_frame(false, n.router, n.snat, ICMP_FRAG_NEEDED, &sent[..28]);
    // The error is not addressed to the quoted packet's source.
    refused(
        error_frame(false, n.router, n.vip, ICMP_FRAG_NEEDED, &sent[..28]),
        Error::IcmpMalformed,
    );
    // Fewer than 8 bytes of L4 quoted.
    refused(
        error_frame(false, n.router, n.snat, ICMP_FRAG_NEEDED, &sent[..27]),
        Error::IcmpMalformed,
    );
    // An outer length past the frame (parse refuses it before the ICMP is read).
    let mut long = good.clone();
    long[16..18].copy_from_slice(&2000u16.to_be_bytes());
    refused(long, Error::Truncated);
    // A quoted header with options, and a quoted later fragment.
    let mut opts = good.clone();
    opts[14 + 28] = 0x46;
    refused(opts, Error::IcmpMalformed);
    let mut frag = good.clone();
    frag[14 + 28 + 7] = 1;
    refused(frag, Error::IcmpMalformed);
    // IPv6: a quoted version that is not 6, a payload length past the frame.
    let n6 = net6();
    let sent6 = l4_packet(true, PROTO_TCP, n6.snat, n6.backend, 10007, 8080);
    let good6 = error_frame(true, n6.router, n6.snat, ICMPV6_PKT_TOOBIG, &sent6[..48]);
    let mut ver = good6.clone();
    ver[14 + 48] = 0x40;
    refused(ver, Error::IcmpMalformed);
    let mut long6 = good6.clone();
    long6[18..20].copy_from_slice(&200u16.to_be_bytes());
    refused(long6, Error::Truncated);
    let mut short6 = good6.clone();
    short6.truncate(14 + 40 + 8 + 40 + 4);
    short6[18..20].copy_from_slice(&52u16.to_be_bytes());
    refused(short6, Error::IcmpMalformed);
}

/// The TCP quote's first 8 bytes, and whether the checksum is in it, follow the quote length.
#[test]
fn quoted_tcp_checksum_is_updated_only_when_quoted() {
    let n = NET4;
    let sent = l4_packet(false, PROTO_TCP, n.snat, n.backend, 10007, 8080);
    for len in [28, 37, 38, 48] {
        let frame = error_frame(false, n.router, n.snat, ICMP_FRAG_NEEDED, &sent[..len]);
        let mut fr = frame.clone();
        let sf = SliceFrame::new(&mut fr);
        let p = parse(&sf).unwrap();
        let r = parse_error(&sf, &p).unwrap();
        assert_eq!(r.inner_csum, len >= 38, "quote of {len}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any ports, addresses, protocol and quote length: the error the client gets is the one
    /// etherparse builds about the client's packet.
    #[test]
    fn any_flow_any_quote_translates_like_etherparse(
        v6 in any::<bool>(),
        tcp in any::<bool>(),
        seed in any::<[u8; 12]>(),
        ports in any::<[u16; 4]>(),
        extra in 8usize..=48,
        kind_pick in 0usize..3,
    ) {
        let mut n = if v6 { net6() } else { NET4 };
        n.client[13..16].copy_from_slice(&seed[0..3]);
        n.vip[13..16].copy_from_slice(&seed[3..6]);
        n.snat[13..16].copy_from_slice(&seed[6..9]);
        n.backend[13..16].copy_from_slice(&seed[9..12]);
        let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
        let ip = if v6 { 40 } else { 20 };
        let kind = if v6 {
            [ICMPV6_PKT_TOOBIG, ICMPV6_DEST_UNREACH, ICMPV6_TIME_EXCEEDED][kind_pick]
        } else {
            [ICMP_FRAG_NEEDED, ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED][kind_pick]
        };
        let [cport, vport, sport, bport] = ports;
        let sent = l4_packet(v6, proto, n.snat, n.backend, sport, bport);
        let orig = l4_packet(v6, proto, n.client, n.vip, cport, vport);
        let len = ip + extra;
        let mut frame = error_frame(v6, n.router, n.snat, kind, &sent[..len]);
        let expected = error_frame(v6, n.vip, n.client, kind, &orig[..len]);
        let reply = entry(n.vip, n.client, vport, cport, false);
        translate_frame(&mut frame, &reply).unwrap();
        assert_same_but_half_checksum(&frame, &expected, proto, Some(len), v6);
        assert_valid(&frame);
    }

    /// Random bytes after a valid outer header: no panic, and a refusal changes nothing.
    #[test]
    fn random_icmp_bodies_never_panic_and_refusals_change_nothing(
        v6 in any::<bool>(),
        body in proptest::collection::vec(any::<u8>(), 0..140),
        kind in prop_oneof![Just(1u8), Just(2), Just(3), Just(11), any::<u8>()],
    ) {
        let n = if v6 { net6() } else { NET4 };
        let mut frame = error_frame(v6, n.router, n.snat, 0, &body);
        let l4 = 14 + if v6 { 40 } else { 20 };
        frame[l4] = kind;
        let before = frame.clone();
        let flow = entry(n.vip, n.client, 80, 40000, false);
        if translate_frame(&mut frame, &flow).is_err() {
            prop_assert_eq!(&frame, &before);
        } else {
            prop_assert_eq!(frame.len(), before.len());
        }
    }
}

#[test]
fn ip_number_constants_match_etherparse() {
    assert_eq!(crate::parse::PROTO_ICMP, IpNumber::ICMP.0);
    assert_eq!(crate::parse::PROTO_ICMPV6, IpNumber::IPV6_ICMP.0);
}
