//! Host tests of parse, NAT rewrite and the RST builder over byte slices. Input and expected
//! frames are built independently with etherparse (which computes every checksum itself).

use std::net::{Ipv4Addr, Ipv6Addr};

use balancer_common::{PROTO_TCP, PROTO_UDP};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, TcpHeader, VlanId,
};

use crate::{
    error::Error,
    frame::{Frame as _, SliceFrame},
    headers::{bytes, v4_mapped, words},
    nat::{rewrite, set_macs},
    parse::{Pkt, parse},
    rst::build_rst,
};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const BE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

fn a16_v4(a: Ipv4Addr) -> [u16; 8] {
    let o = a.octets();
    v4_mapped([
        u16::from_ne_bytes([o[0], o[1]]),
        u16::from_ne_bytes([o[2], o[3]]),
    ])
}

fn a16_v6(a: Ipv6Addr) -> [u16; 8] {
    words(&a.octets())
}

fn tcp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), 61)
        .tcp(src.1, dst.1, 1000, 512)
        .ack(77)
        .psh()
        .options_raw(&[1, 1, 1, 1])
        .unwrap();
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn udp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.0.octets(), dst.0.octets(), 50)
        .udp(src.1, dst.1);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

fn parsed(buf: &mut [u8]) -> Result<Pkt, Error> {
    parse(&SliceFrame::new(buf))
}

#[test]
fn parse_reads_tuple_flags_and_offsets() {
    let c = Ipv4Addr::new(10, 0, 0, 1);
    let v = Ipv4Addr::new(10, 0, 1, 1);
    let mut f = tcp4(CLIENT_MAC, LB_MAC, (c, 40000), (v, 80), b"hello");
    let p = parsed(&mut f).unwrap();
    assert_eq!(
        (p.l3off, p.l4off, p.v6, p.vlan, p.icmp),
        (14, 34, false, false, false)
    );
    assert_eq!(p.key.proto, PROTO_TCP);
    assert_eq!(p.key.src, bytes(a16_v4(c)));
    assert_eq!(p.key.dst, bytes(a16_v4(v)));
    assert_eq!(u16::from_be(p.key.sport), 40000);
    assert_eq!(u16::from_be(p.key.dport), 80);
    assert_eq!(p.tcp_flags, 0x18);
    assert_eq!((p.src_mac, p.dst_mac), (CLIENT_MAC, LB_MAC));

    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .single_vlan(VlanId::try_new(7).unwrap())
        .ipv6([1; 16], [2; 16], 9)
        .udp(5, 6);
    let mut f = Vec::new();
    b.write(&mut f, b"x").unwrap();
    let p = parsed(&mut f).unwrap();
    assert_eq!((p.l3off, p.l4off, p.v6, p.vlan), (18, 58, true, true));
    assert_eq!(p.key.proto, PROTO_UDP);
}

#[test]
fn parse_refuses_what_it_does_not_balance() {
    // ARP.
    let mut f = vec![0u8; 60];
    f[12] = 0x08;
    f[13] = 0x06;
    assert_eq!(parsed(&mut f), Err(Error::NotIp));
    // An IPv4 fragment.
    let mut h = Ipv4Header::new(8, 64, IpNumber::UDP, [1, 1, 1, 1], [2, 2, 2, 2]).unwrap();
    h.more_fragments = true;
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(h, Default::default()))
        .udp(1, 2);
    let mut f = Vec::new();
    b.write(&mut f, &[]).unwrap();
    assert_eq!(parsed(&mut f), Err(Error::UnsupportedIp));
    // Cut inside the TCP header.
    let mut f = tcp4(
        CLIENT_MAC,
        LB_MAC,
        (Ipv4Addr::LOCALHOST, 1),
        (Ipv4Addr::LOCALHOST, 2),
        &[],
    );
    f.truncate(14 + 20 + 10);
    assert_eq!(parsed(&mut f), Err(Error::Truncated));
    // ICMP is recognised (its handler is a separate step), other protocols are not.
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
        .icmpv4_echo_request(1, 1);
    let mut f = Vec::new();
    b.write(&mut f, &[]).unwrap();
    assert!(parsed(&mut f).unwrap().icmp);
    let h = Ipv4Header::new(0, 64, IpNumber::GRE, [1, 1, 1, 1], [2, 2, 2, 2]).unwrap();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ip(IpHeaders::Ipv4(h, Default::default()));
    let mut f = Vec::new();
    b.write(&mut f, IpNumber::GRE, &[0; 8]).unwrap();
    assert_eq!(parsed(&mut f), Err(Error::NotTcpUdp));
}

#[test]
fn rewrite_v4_tcp_equals_frame_built_with_new_tuple() {
    let (c, v) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 1, 1));
    let (s, b) = (Ipv4Addr::new(10, 0, 2, 1), Ipv4Addr::new(10, 0, 3, 7));
    let payload = b"MSH|^~\\&|not real";
    let mut f = tcp4(CLIENT_MAC, LB_MAC, (c, 40000), (v, 2575), payload);
    let p = parsed(&mut f).unwrap();
    let frame = SliceFrame::new(&mut f);
    rewrite(
        &frame,
        &p,
        &a16_v4(s),
        &a16_v4(b),
        61000u16.to_be(),
        3000u16.to_be(),
    )
    .unwrap();
    set_macs(&frame, LB_MAC, BE_MAC).unwrap();
    assert_eq!(f, tcp4(LB_MAC, BE_MAC, (s, 61000), (b, 3000), payload));
}

#[test]
fn rewrite_v6_udp_equals_frame_built_with_new_tuple() {
    let c: Ipv6Addr = "fd00::1".parse().unwrap();
    let v: Ipv6Addr = "fd00:1::1".parse().unwrap();
    let s: Ipv6Addr = "fd00:2::1".parse().unwrap();
    let b: Ipv6Addr = "fd00:3::ab".parse().unwrap();
    let mut f = udp6(CLIENT_MAC, LB_MAC, (c, 5353), (v, 53), b"query");
    let p = parsed(&mut f).unwrap();
    rewrite(
        &SliceFrame::new(&mut f),
        &p,
        &a16_v6(s),
        &a16_v6(b),
        60001u16.to_be(),
        5300u16.to_be(),
    )
    .unwrap();
    assert_eq!(f, udp6(CLIENT_MAC, LB_MAC, (s, 60001), (b, 5300), b"query"));
}

#[test]
fn rewrite_keeps_a_zero_udp4_checksum() {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4([10, 0, 0, 1], [10, 0, 1, 1], 64)
        .udp(1000, 53);
    let mut f = Vec::new();
    b.write(&mut f, b"abc").unwrap();
    f[40] = 0;
    f[41] = 0;
    let p = parsed(&mut f).unwrap();
    let dst = a16_v4(Ipv4Addr::new(10, 0, 3, 3));
    rewrite(
        &SliceFrame::new(&mut f),
        &p,
        &a16_v4(Ipv4Addr::new(10, 0, 2, 1)),
        &dst,
        1,
        2,
    )
    .unwrap();
    assert_eq!(&f[40..42], &[0, 0]);
    let ip = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
    let Some(etherparse::NetSlice::Ipv4(h)) = ip.net else {
        panic!("not IPv4")
    };
    let h = h.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
}

/// The RST as etherparse builds it for a segment from `src` to `dst`.
fn expected_rst(
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    ports: (u16, u16),
    seq: u32,
    ack: Option<u32>,
) -> Vec<u8> {
    let mut t = TcpHeader::new(ports.0, ports.1, seq, 0);
    t.rst = true;
    if let Some(a) = ack {
        t.ack = true;
        t.acknowledgment_number = a;
    }
    let ip = if v6 {
        IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 20,
                next_header: IpNumber::TCP,
                hop_limit: 64,
                source: src,
                destination: dst,
            },
            Default::default(),
        )
    } else {
        let mut h = Ipv4Header::new(
            20,
            64,
            IpNumber::TCP,
            src[12..].try_into().unwrap(),
            dst[12..].try_into().unwrap(),
        )
        .unwrap();
        h.dont_fragment = true;
        h.identification = 0;
        IpHeaders::Ipv4(h, Default::default())
    };
    let b = PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
        .ip(ip)
        .tcp_header(t);
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

#[test]
fn rst_for_a_syn_with_options_and_payload_acks_it() {
    let (c, v) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 1, 1));
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(c.octets(), v.octets(), 64)
        .tcp(40000, 80, 0xffff_fff0, 100)
        .syn()
        .options_raw(&[2, 4, 5, 0xb4])
        .unwrap();
    let mut f = Vec::new();
    b.write(&mut f, b"0123456789").unwrap();
    let p = parsed(&mut f).unwrap();
    let mut frame = SliceFrame::new(&mut f);
    build_rst(&mut frame, &p).unwrap();
    let len = frame.len();
    f.truncate(len);
    // SYN counts one, ten bytes of payload: ack = seq + 11 (wrapping).
    let want = expected_rst(
        false,
        p.key.dst,
        p.key.src,
        (80, 40000),
        0,
        Some(0xffff_fff0u32.wrapping_add(11)),
    );
    assert_eq!(f, want);
}

#[test]
fn rst_for_an_ack_takes_its_sequence_from_the_ack_v6() {
    let c: Ipv6Addr = "fd00::1".parse().unwrap();
    let v: Ipv6Addr = "fd00:1::1".parse().unwrap();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(c.octets(), v.octets(), 64)
        .tcp(40000, 443, 5, 100)
        .ack(123_456);
    let mut f = Vec::new();
    b.write(&mut f, b"data").unwrap();
    let p = parsed(&mut f).unwrap();
    let mut frame = SliceFrame::new(&mut f);
    build_rst(&mut frame, &p).unwrap();
    let len = frame.len();
    f.truncate(len);
    assert_eq!(
        f,
        expected_rst(true, v.octets(), c.octets(), (443, 40000), 123_456, None)
    );
}
