//! BPF_PROG_TEST_RUN packet table: each row is input bytes → expected verdict and output.
//! Expected frames are built independently with etherparse (full checksums), and every
//! transmitted frame's checksums are recomputed by etherparse as well.
//!
//! Needs root (a network namespace per test, BPF). Runs in `cargo xtask test`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use balancer::{
    config::AdminState,
    control::state::{BackendHealth as Health, State},
    host::net::addr16,
};
use balancer_common::{Flow, FlowKey, PROTO_TCP, PROTO_UDP, Reason};
use balancer_testbed::{
    LB_MAC, Testbed,
    bench::{configured_testbed, configured_testbed_with},
    host_mac, packet, run_prog,
};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

#[path = "packet_table/icmp.rs"]
mod icmp;
#[path = "packet_table/mac.rs"]
mod mac;
#[path = "packet_table/mirror.rs"]
mod mirror;
#[path = "packet_table/nexthop.rs"]
mod nexthop;
#[path = "packet_table/vlan.rs"]
mod vlan;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn mac_of(ip: IpAddr) -> [u8; 6] {
    let last = match ip {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    };
    host_mac(last)
}

/// Recomputes IP and L4 checksums of a frame with etherparse and compares.
fn assert_checksums(frame: &[u8]) {
    let p = SlicedPacket::from_ethernet(frame).expect("parsable frame");
    let payload_of = |t: &TransportSlice| match t {
        TransportSlice::Tcp(t) => t.payload().to_vec(),
        TransportSlice::Udp(u) => u.payload().to_vec(),
        _ => Vec::new(),
    };
    let transport = p.transport.as_ref().expect("transport");
    match p.net.as_ref().expect("ip") {
        NetSlice::Ipv4(ip) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            let (src, dst) = (h.source, h.destination);
            match transport {
                TransportSlice::Tcp(t) => {
                    let c = t
                        .to_header()
                        .calc_checksum_ipv4_raw(src, dst, &payload_of(transport))
                        .unwrap();
                    assert_eq!(t.checksum(), c, "TCP checksum (IPv4)");
                }
                TransportSlice::Udp(u) => {
                    if u.checksum() != 0 {
                        let c = u
                            .to_header()
                            .calc_checksum_ipv4_raw(src, dst, &payload_of(transport))
                            .unwrap();
                        assert_eq!(u.checksum(), c, "UDP checksum (IPv4)");
                    }
                }
                _ => panic!("unexpected transport"),
            }
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header().to_header();
            let (src, dst) = (h.source, h.destination);
            match transport {
                TransportSlice::Tcp(t) => {
                    let c = t
                        .to_header()
                        .calc_checksum_ipv6_raw(src, dst, &payload_of(transport))
                        .unwrap();
                    assert_eq!(t.checksum(), c, "TCP checksum (IPv6)");
                }
                TransportSlice::Udp(u) => {
                    let c = u
                        .to_header()
                        .calc_checksum_ipv6_raw(src, dst, &payload_of(transport))
                        .unwrap();
                    assert_eq!(u.checksum(), c, "UDP checksum (IPv6)");
                }
                _ => panic!("unexpected transport"),
            }
        }
        _ => panic!("unexpected net"),
    }
}

/// Sets backend `i` of `svc` to `h` the way the daemon does.
fn set_health(tb: &mut Testbed, st: &mut State, svc: &str, i: usize, h: Health) {
    let a = st.services[svc].backends[i].address;
    let c = st.health_change(svc, a, h).unwrap();
    st.set(&mut tb.dp, c).unwrap();
}

/// Sets backend `i` of `svc` to operator state `a` the way the daemon does.
fn set_admin(tb: &mut Testbed, st: &mut State, svc: &str, i: usize, a: AdminState) {
    let addr = st.services[svc].backends[i].address;
    let c = st.admin_change(svc, addr, a).unwrap();
    st.set(&mut tb.dp, c).unwrap();
}

/// The reference 5-tuple hash, written here from the dataplane's specification (murmur3's
/// 32-bit block mix over the ten words src[0..4], dst[0..4], sport << 16 | dport (ports as
/// stored, network order), proto; then length 37 and murmur3's finaliser), not by calling
/// the dataplane's `flow_hash`: a change of the program's hash fails these rows.
fn reference_hash(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut words = Vec::with_capacity(10);
    for a in [addr16(src), addr16(dst)] {
        for c in a.chunks_exact(4) {
            words.push(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
    words.push((u32::from(sport.to_be()) << 16) | u32::from(dport.to_be()));
    words.push(u32::from(proto));
    let mut h = seed;
    for k in words {
        let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h = (h ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    h ^= 37;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// `hash` onto `0..n`, the reference way: the high 32 bits of the 64-bit product.
fn reference_reduce(hash: u32, n: u32) -> u32 {
    u32::try_from((u64::from(hash) * u64::from(n)) >> 32).unwrap()
}

/// Where the dataplane must send a new flow: the backend the live ring holds at the slot the
/// reference hash picks, and the SNAT port it tries first (its hash rotated by 16, xor the
/// golden ratio, reduced onto the port range). The hash is [`reference_hash`], not the
/// dataplane's; the ring is the one the controller wrote (a backend of the service).
fn predict(
    tb: &Testbed,
    st: &State,
    svc: &str,
    client: SocketAddr,
    vip: SocketAddr,
    proto: u8,
) -> (SocketAddr, u16) {
    predictor(tb, st, svc)(client, vip, proto)
}

/// [`predict`] for many clients: the service's ring is read once.
fn predictor<'a>(
    tb: &Testbed,
    st: &'a State,
    svc: &str,
) -> impl Fn(SocketAddr, SocketAddr, u8) -> (SocketAddr, u16) + 'a {
    let s = &st.services[svc];
    let seed = tb
        .dp
        .services()
        .into_iter()
        .find(|(k, _)| *k == s.key)
        .unwrap()
        .1
        .seed;
    let ring = tb.dp.read_ring(s.id, s.half, s.spec.ring_size);
    move |client, vip, proto| {
        let h = reference_hash(
            client.ip(),
            vip.ip(),
            client.port(),
            vip.port(),
            proto,
            seed,
        );
        let slot = ring[reference_reduce(h, s.spec.ring_size) as usize];
        let be = s
            .backends
            .iter()
            .find(|b| b.slot == slot)
            .expect("ring points at a backend of the service");
        let (lo, hi) = (st.globals.snat_port_lo, st.globals.snat_port_hi);
        let range = u32::from(hi) - u32::from(lo) + 1;
        let port = u32::from(lo) + reference_reduce(h.rotate_left(16) ^ 0x9e37_79b9, range);
        (be.address, u16::try_from(port).unwrap())
    }
}

fn lb_addr(v6: bool) -> IpAddr {
    if v6 {
        "fd77::1".parse().unwrap()
    } else {
        "10.77.0.1".parse().unwrap()
    }
}

struct Row {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// None: the output must equal the input.
    output: Option<Vec<u8>>,
}

fn run_rows(tb: &Testbed, rows: &[Row]) {
    for r in rows {
        let (v, out) = tb.run(&r.input).unwrap();
        assert_eq!(v, r.verdict, "{}: verdict", r.name);
        match &r.output {
            Some(exp) => {
                assert_eq!(&out, exp, "{}: output bytes", r.name);
                assert_checksums(&out);
            }
            None => assert_eq!(
                out, r.input,
                "{}: a packet the program does not balance is untouched",
                r.name
            ),
        }
    }
}

#[test]
fn nat_v4_syn_ack_and_reply() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40001");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1000, 0, packet::SYN, &[]);
    let ack = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        vip,
        1001,
        5001,
        packet::ACK,
        b"hello backend",
    );
    let reply = packet::tcp(
        mac_of(be.ip()),
        LB_MAC,
        be,
        snat,
        5001,
        1014,
        packet::ACK,
        b"hello client",
    );
    run_rows(
        &tb,
        &[
            Row {
                name: "IPv4 SYN to a nat VIP",
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
                input: syn,
                verdict: XDP_TX,
            },
            Row {
                name: "the next ACK stays on the same backend and SNAT port",
                output: Some(packet::tcp(
                    LB_MAC,
                    mac_of(be.ip()),
                    snat,
                    be,
                    1001,
                    5001,
                    packet::ACK,
                    b"hello backend",
                )),
                input: ack,
                verdict: XDP_TX,
            },
            Row {
                name: "the backend's reply goes back to the client from the VIP",
                output: Some(packet::tcp(
                    LB_MAC,
                    host_mac(2),
                    vip,
                    client,
                    5001,
                    1014,
                    packet::ACK,
                    b"hello client",
                )),
                input: reply,
                verdict: XDP_TX,
            },
        ],
    );
    let c = tb.dp.service_counters(st.services["web"].id);
    assert_eq!((c.packets, c.new_flows), (3, 1));
}

#[test]
fn nat_v6_syn_and_reply() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("[fd77::100]:7002");
    let client = sa("[fd77::2]:40002");
    let (be, port) = predict(&tb, &st, "web6", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(true), port);
    run_rows(
        &tb,
        &[
            Row {
                name: "IPv6 SYN to a nat VIP",
                input: packet::tcp(host_mac(2), LB_MAC, client, vip, 7, 0, packet::SYN, &[]),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    mac_of(be.ip()),
                    snat,
                    be,
                    7,
                    0,
                    packet::SYN,
                    &[],
                )),
            },
            Row {
                name: "IPv6 reply reverse-NATed",
                input: packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 99, 8, packet::ACK, b"x"),
                verdict: XDP_TX,
                output: Some(packet::tcp(
                    LB_MAC,
                    host_mac(2),
                    vip,
                    client,
                    99,
                    8,
                    packet::ACK,
                    b"x",
                )),
            },
        ],
    );
}

#[test]
fn dsr_rewrites_only_macs() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7003");
    let client = sa("10.77.0.2:40003");
    let (be, _) = predict(&tb, &st, "direct", client, vip, PROTO_TCP);
    run_rows(
        &tb,
        &[Row {
            name: "dsr SYN: only the MACs change",
            input: packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                mac_of(be.ip()),
                client,
                vip,
                1,
                0,
                packet::SYN,
                &[],
            )),
        }],
    );
}

#[test]
fn udp_vip_with_and_without_checksum() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:5353");
    let client = sa("10.77.0.2:40004");
    let (be, port) = predict(&tb, &st, "dns", client, vip, PROTO_UDP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let mut no_csum = packet::udp(host_mac(2), LB_MAC, client, vip, b"query");
    no_csum[40] = 0;
    no_csum[41] = 0;
    let (v, out) = tb
        .run(&packet::udp(host_mac(2), LB_MAC, client, vip, b"query"))
        .unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(
        out,
        packet::udp(LB_MAC, mac_of(be.ip()), snat, be, b"query")
    );
    assert_checksums(&out);
    let (v, out) = tb.run(&no_csum).unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(&out[40..42], &[0, 0], "a zero IPv4 UDP checksum stays zero");
    let mut exp = packet::udp(LB_MAC, mac_of(be.ip()), snat, be, b"query");
    exp[40] = 0;
    exp[41] = 0;
    assert_eq!(out, exp);
}

fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&host_mac(2));
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&host_mac(2));
    f.extend_from_slice(&[10, 77, 0, 2, 0, 0, 0, 0, 0, 0, 10, 77, 0, 100]);
    f
}

fn icmp_echo() -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(host_mac(2), LB_MAC)
        .ipv4([10, 77, 0, 2], [10, 77, 0, 100], 64)
        .icmpv4_echo_request(1, 1);
    let mut out = Vec::new();
    b.write(&mut out, b"ping").unwrap();
    out
}

/// Same SYN with a 4-byte IPv4 option (NOPs): IHL 6.
fn with_ip_options(syn: &[u8]) -> Vec<u8> {
    let mut f = syn[..14].to_vec();
    let mut ip = syn[14..34].to_vec();
    ip[0] = 0x46;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) + 4;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[1, 1, 1, 1]);
    f.extend_from_slice(&syn[34..]);
    f
}

#[test]
fn what_is_not_balanced_passes_untouched() {
    let (tb, _st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40005");
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    let mut frag = syn.clone();
    frag[20] |= 0x20; // more fragments
    let mut frag2 = syn.clone();
    frag2[21] = 8; // offset 64
    let mut unknown_port = syn.clone();
    unknown_port[36..38].copy_from_slice(&7999u16.to_be_bytes());
    let rows = vec![
        Row {
            name: "non-VIP TCP",
            input: packet::tcp(
                host_mac(2),
                LB_MAC,
                client,
                sa("10.77.0.1:22"),
                1,
                0,
                packet::SYN,
                &[],
            ),
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "VIP address, port without a service",
            input: unknown_port,
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "ARP",
            input: arp(),
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "ICMP echo to the VIP",
            input: icmp_echo(),
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "IPv4 with options",
            input: with_ip_options(&syn),
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "first fragment",
            input: frag,
            verdict: XDP_PASS,
            output: None,
        },
        Row {
            name: "later fragment",
            input: frag2,
            verdict: XDP_PASS,
            output: None,
        },
    ];
    run_rows(&tb, &rows);
    // Cut at every length from a bare Ethernet header on (BPF_PROG_TEST_RUN refuses frames
    // shorter than 14 bytes): never transmitted, never changed.
    for v6 in [false, true] {
        let (c, vip) = if v6 {
            (sa("[fd77::2]:40006"), sa("[fd77::100]:7002"))
        } else {
            (client, vip)
        };
        let full = packet::tcp(host_mac(2), LB_MAC, c, vip, 1, 0, packet::SYN, &[]);
        for len in 14..full.len() {
            let cut = full[..len].to_vec();
            let (v, out) = tb.run(&cut).unwrap();
            assert!(
                v == XDP_PASS || v == XDP_DROP,
                "cut at {len} (v6 {v6}): verdict {v}"
            );
            assert_eq!(out, cut, "cut at {len} (v6 {v6}): changed");
        }
    }
}

/// The port filter (`BLB_PORTS`) passes a TCP/UDP frame to a port of no service and outside
/// the SNAT range before parsing it, so such a frame with an IP length that overruns it is
/// counted `pass_not_vip`; to a service's port or a SNAT port the full parse sees the bad
/// length (`pass_truncated`). Either way the frame is passed untouched.
#[test]
fn the_port_filter_passes_other_ports_unparsed_and_parses_service_and_snat_ports() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let snat_port = st.globals.snat_port_lo;
    assert!(snat_port > 1024, "{:?}", st.globals);
    let overrun = |v6: bool, dport: u16, udp: bool| {
        let (c, d) = if v6 {
            (
                sa("[fd77::2]:40007"),
                SocketAddr::new("fd77::100".parse().unwrap(), dport),
            )
        } else {
            (
                sa("10.77.0.2:40007"),
                SocketAddr::new("10.77.0.100".parse().unwrap(), dport),
            )
        };
        let mut f = if udp {
            packet::udp(host_mac(2), LB_MAC, c, d, b"x")
        } else {
            packet::tcp(host_mac(2), LB_MAC, c, d, 1, 0, packet::SYN, &[])
        };
        // IPv4 total length / IPv6 payload length: 100 bytes more than the frame holds.
        let at = if v6 { 18 } else { 16 };
        let len = u16::from_be_bytes([f[at], f[at + 1]]) + 100;
        f[at..at + 2].copy_from_slice(&len.to_be_bytes());
        f
    };
    for v6 in [false, true] {
        for (name, dport, udp, reason) in [
            ("TCP to port 22", 22, false, Reason::PassNotVip),
            ("UDP to port 53", 53, true, Reason::PassNotVip),
            (
                "TCP to the service's port",
                7002,
                false,
                Reason::PassTruncated,
            ),
            (
                "TCP to a SNAT port",
                snat_port,
                false,
                Reason::PassTruncated,
            ),
        ] {
            run_counted(
                &tb,
                Row {
                    name: Box::leak(
                        format!(
                            "IPv{} {name}, IP length past the frame",
                            if v6 { 6 } else { 4 }
                        )
                        .into_boxed_str(),
                    ),
                    input: overrun(v6, dport, udp),
                    verdict: XDP_PASS,
                    output: None,
                },
                reason,
            );
        }
    }
}

/// A backend's segment to a port of the SNAT range that matches no reply entry (its flow
/// ended, expired or was evicted) is passed untouched and counted `pass_no_reply_flow`, not
/// `pass_not_vip`: the counter that shows a flow table too small for its traffic.
#[test]
fn a_backend_segment_to_a_snat_port_of_no_flow_is_passed_and_counted() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let port = st.globals.snat_port_lo;
    for (v6, svc, client, vip) in [
        (false, "web", sa("10.77.0.2:40011"), sa("10.77.0.100:7002")),
        (true, "web6", sa("[fd77::2]:40011"), sa("[fd77::100]:7002")),
    ] {
        let (be, _) = predict(&tb, &st, svc, client, vip, PROTO_TCP);
        let snat = SocketAddr::new(lb_addr(v6), port);
        let syn_ack = packet::tcp(
            mac_of(be.ip()),
            LB_MAC,
            be,
            snat,
            5000,
            1001,
            packet::Flags {
                ack: true,
                ..packet::SYN
            },
            &[],
        );
        assert!(tb.dp.flow(&reply_key(be, port, v6)).is_none());
        run_counted(
            &tb,
            Row {
                name: if v6 {
                    "IPv6 SYN-ACK to a SNAT port of no flow"
                } else {
                    "IPv4 SYN-ACK to a SNAT port of no flow"
                },
                input: syn_ack,
                verdict: XDP_PASS,
                output: None,
            },
            Reason::PassNoReplyFlow,
        );
    }
}

/// Checks an RST the program built: addresses swapped, flags, seq/ack, checksums.
fn assert_rst(out: &[u8], from: SocketAddr, to: SocketAddr, seq: u32, ack: Option<u32>) {
    assert_eq!(
        &out[0..6],
        &host_mac(2),
        "RST goes back to the sender's MAC"
    );
    assert_eq!(&out[6..12], &LB_MAC);
    let p = SlicedPacket::from_ethernet(out).unwrap();
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    assert!(t.rst());
    assert!(t.payload().is_empty());
    assert_eq!(t.sequence_number(), seq);
    assert_eq!(t.ack(), ack.is_some());
    if let Some(a) = ack {
        assert_eq!(t.acknowledgment_number(), a);
    }
    assert_eq!(
        (t.source_port(), t.destination_port()),
        (from.port(), to.port())
    );
    match p.net.as_ref().unwrap() {
        NetSlice::Ipv4(ip) => {
            assert_eq!(IpAddr::from(ip.header().source_addr()), from.ip());
            assert_eq!(IpAddr::from(ip.header().destination_addr()), to.ip());
        }
        NetSlice::Ipv6(ip) => {
            assert_eq!(IpAddr::from(ip.header().source_addr()), from.ip());
            assert_eq!(IpAddr::from(ip.header().destination_addr()), to.ip());
        }
        _ => panic!(),
    }
    assert_checksums(out);
}

#[test]
fn flow_of_a_down_backend_is_reset_or_dropped() {
    let (mut tb, mut st) = configured_testbed(65536).unwrap();
    for (svc, vip, client) in [
        ("web", sa("10.77.0.100:7002"), sa("10.77.0.2:40008")),
        ("web6", sa("[fd77::100]:7002"), sa("[fd77::2]:40008")),
    ] {
        let (be, _) = predict(&tb, &st, svc, client, vip, PROTO_TCP);
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 100, 0, packet::SYN, &[]);
        assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
        let i = st.services[svc]
            .backends
            .iter()
            .position(|b| b.address == be)
            .unwrap();
        set_health(&mut tb, &mut st, svc, i, Health::Down);
        // An established segment with payload: RST with seq = its ack.
        let data = packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            101,
            777,
            packet::ACK,
            b"payload bytes",
        );
        let (v, out) = tb.run(&data).unwrap();
        assert_eq!(v, XDP_TX, "{svc}: the down backend's flow is answered");
        assert_rst(&out, vip, client, 777, None);
        // The entry is gone: the next segment is a new flow to a live backend.
        let (v, out) = tb.run(&data).unwrap();
        assert_eq!(v, XDP_TX);
        let p = SlicedPacket::from_ethernet(&out).unwrap();
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!()
        };
        assert!(!t.rst());
        assert_ne!(&out[0..6], &mac_of(be.ip()), "{svc}: not the down backend");
        set_health(&mut tb, &mut st, svc, i, Health::Up);
    }
    // hl7 is configured with on_backend_down = "drop"; an RST from the client is never answered.
    let vip = sa("10.77.0.100:6661");
    let client = sa("10.77.0.2:40009");
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 100, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    set_health(&mut tb, &mut st, "hl7", 0, Health::Down);
    let data = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        vip,
        101,
        1,
        packet::ACK,
        b"MSH|",
    );
    assert_eq!(tb.run(&data).unwrap().0, XDP_DROP, "drop, as configured");
    let c = sa("10.77.0.2:40010");
    let vip_web = sa("10.77.0.100:7002");
    let (be, _) = predict(&tb, &st, "web", c, vip_web, PROTO_TCP);
    assert_eq!(
        tb.run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            c,
            vip_web,
            1,
            0,
            packet::SYN,
            &[]
        ))
        .unwrap()
        .0,
        XDP_TX
    );
    let i = st.services["web"]
        .backends
        .iter()
        .position(|b| b.address == be)
        .unwrap();
    set_admin(&mut tb, &mut st, "web", i, AdminState::Disabled);
    let rst = packet::tcp(
        host_mac(2),
        LB_MAC,
        c,
        vip_web,
        2,
        1,
        packet::Flags {
            rst: true,
            ..Default::default()
        },
        &[],
    );
    assert_eq!(
        tb.run(&rst).unwrap().0,
        XDP_DROP,
        "an RST is never answered with an RST"
    );
}

#[test]
fn no_live_backend_refuses_at_once() {
    let (mut tb, mut st) = configured_testbed(65536).unwrap();
    for i in 0..3 {
        set_health(&mut tb, &mut st, "web", i, Health::Down);
    }
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40011");
    let (v, out) = tb
        .run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            5000,
            0,
            packet::SYN,
            &[],
        ))
        .unwrap();
    assert_eq!(v, XDP_TX);
    assert_rst(&out, vip, client, 0, Some(5001));
    let (v, _) = tb
        .run(&packet::udp(
            host_mac(2),
            LB_MAC,
            client,
            sa("10.77.0.100:5353"),
            b"q",
        ))
        .unwrap();
    assert_eq!(v, XDP_TX, "the UDP service still has live backends");
}

#[test]
fn draining_backend_keeps_old_flows_and_takes_no_new_ones() {
    let (mut tb, mut st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40012");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    assert_eq!(
        tb.run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            1,
            0,
            packet::SYN,
            &[]
        ))
        .unwrap()
        .0,
        XDP_TX
    );
    let i = st.services["web"]
        .backends
        .iter()
        .position(|b| b.address == be)
        .unwrap();
    set_admin(&mut tb, &mut st, "web", i, AdminState::Drain);
    let snat = SocketAddr::new(lb_addr(false), port);
    run_rows(
        &tb,
        &[Row {
            name: "old flow continues on the draining backend",
            input: packet::tcp(host_mac(2), LB_MAC, client, vip, 2, 9, packet::ACK, b"more"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                mac_of(be.ip()),
                snat,
                be,
                2,
                9,
                packet::ACK,
                b"more",
            )),
        }],
    );
    for p in 0..300u16 {
        let c = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 9, (p >> 8) as u8, p as u8)),
            2000 + p,
        );
        let (v, out) = tb
            .run(&packet::tcp(
                host_mac(2),
                LB_MAC,
                c,
                vip,
                1,
                0,
                packet::SYN,
                &[],
            ))
            .unwrap();
        assert_eq!(v, XDP_TX);
        assert_ne!(
            &out[0..6],
            &mac_of(be.ip()),
            "a new flow went to the draining backend"
        );
    }
}

#[test]
fn closed_and_idle_flows_expire_with_their_reply_entries() {
    let (mut tb, _st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let t = balancer::control::flow_expiry::Timeouts {
        tcp_idle: 3600,
        udp_idle: 300,
    };
    let closed = sa("10.77.0.2:40020");
    let idle = sa("10.77.0.2:40021");
    for c in [closed, idle] {
        assert_eq!(
            tb.run(&packet::tcp(
                host_mac(2),
                LB_MAC,
                c,
                vip,
                1,
                0,
                packet::SYN,
                &[]
            ))
            .unwrap()
            .0,
            XDP_TX
        );
    }
    let fin = packet::Flags {
        fin: true,
        ack: true,
        ..Default::default()
    };
    assert_eq!(
        tb.run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            closed,
            vip,
            2,
            1,
            fin,
            &[]
        ))
        .unwrap()
        .0,
        XDP_TX
    );
    assert_eq!(tb.dp.flows().len(), 4);
    let atime = tb.dp.flows().values().map(|f| f.atime).max().unwrap();
    let s = tb.dp.sweep_flows(t, atime + 5);
    assert_eq!((s.closed, s.idle), (0, 0), "nothing is old enough yet");
    assert!(
        s.kept.is_empty(),
        "a closing flow and a half-open one are not established: {:?}",
        s.kept
    );
    let s = tb.dp.sweep_flows(
        t,
        atime + balancer::control::flow_expiry::CLOSED_LINGER_SECS + 1,
    );
    assert_eq!((s.closed, s.idle), (1, 0));
    assert_eq!(
        tb.dp.flows().len(),
        2,
        "the closed flow left with its reply entry"
    );
    let key_of = |c: SocketAddr| forward_key(c, vip);
    assert_eq!(
        s.removed_forward,
        vec![key_of(closed)],
        "the sweep names the forward key it removed (the mirror deletes it on the standby)"
    );
    let s = tb.dp.sweep_flows(t, atime + 3600);
    assert_eq!((s.closed, s.idle), (0, 1));
    assert!(tb.dp.flows().is_empty());
    assert_eq!(s.removed_forward, vec![key_of(idle)]);
    // A SYN whose handshake never completes goes after HALF_OPEN_SECS; a completed one stays.
    let half = sa("10.77.0.2:40022");
    let done = sa("10.77.0.2:40023");
    for c in [half, done] {
        assert_eq!(
            tb.run(&packet::tcp(
                host_mac(2),
                LB_MAC,
                c,
                vip,
                1,
                0,
                packet::SYN,
                &[]
            ))
            .unwrap()
            .0,
            XDP_TX
        );
    }
    assert_eq!(
        tb.run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            done,
            vip,
            2,
            1,
            packet::ACK,
            &[]
        ))
        .unwrap()
        .0,
        XDP_TX
    );
    let atime = tb.dp.flows().values().map(|f| f.atime).max().unwrap();
    let s = tb
        .dp
        .sweep_flows(t, atime + balancer_common::HALF_OPEN_SECS + 1);
    assert_eq!((s.closed, s.idle), (0, 1));
    assert_eq!(
        tb.dp.flows().len(),
        2,
        "the completed flow stays with its reply entry"
    );
    assert_eq!(
        s.kept.values().sum::<u64>(),
        1,
        "the completed flow counts as established on its backend: {:?}",
        s.kept
    );
}

/// The count of one verdict reason so far.
fn reason_count(tb: &Testbed, r: Reason) -> u64 {
    tb.dp
        .reasons()
        .into_iter()
        .find(|(x, _)| *x == r)
        .map_or(0, |(_, v)| v)
}

/// Runs one row and checks that it bumped exactly its verdict reason, once.
fn run_counted(tb: &Testbed, row: Row, reason: Reason) {
    let before: Vec<(Reason, u64)> = Reason::ALL
        .iter()
        .map(|r| (*r, reason_count(tb, *r)))
        .collect();
    let name = row.name;
    run_rows(tb, &[row]);
    for (r, was) in before {
        let want = was + u64::from(r == reason);
        assert_eq!(reason_count(tb, r), want, "{name}: reason {}", r.name());
    }
}

/// The forward entry's key of a TCP flow from `client` to `vip`.
fn forward_key(client: SocketAddr, vip: SocketAddr) -> FlowKey {
    FlowKey {
        src: addr16(client.ip()),
        dst: addr16(vip.ip()),
        sport: client.port().to_be(),
        dport: vip.port().to_be(),
        proto: PROTO_TCP,
        pad: [0; 3],
    }
}

/// The reply entry of a NAT flow from `be` to SNAT port `port` (the key a backend's reply has).
fn reply_key(be: SocketAddr, port: u16, v6: bool) -> FlowKey {
    FlowKey {
        src: addr16(be.ip()),
        dst: addr16(lb_addr(v6)),
        sport: be.port().to_be(),
        dport: port.to_be(),
        proto: PROTO_TCP,
        pad: [0; 3],
    }
}

/// The SNAT port of a transmitted client → backend frame.
fn snat_port_of(frame: &[u8]) -> u16 {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not TCP")
    };
    t.source_port()
}

/// The SNAT address and port of a transmitted client → backend frame.
fn snat_of(frame: &[u8]) -> SocketAddr {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4")
    };
    SocketAddr::new(IpAddr::V4(ip.header().source_addr()), snat_port_of(frame))
}

#[test]
fn a_snat_pool_spreads_flows_over_its_addresses_and_replies_come_back_on_each() {
    let pool = [sa("10.77.0.1:0").ip(), sa("10.77.0.201:0").ip()];
    let (mut tb, st) = balancer_testbed::bench::configured_testbed_with(
        65536,
        "snat_ipv4 = [\"10.77.0.1\", \"10.77.0.201\"]",
    )
    .unwrap();
    let vip = sa("10.77.0.100:7002");
    let mut used = std::collections::BTreeSet::new();
    let mut last = None;
    for i in 0..64u16 {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)), 41000 + i);
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
        let (v, out) = tb.run(&syn).unwrap();
        assert_eq!(v, XDP_TX, "SYN from {client}");
        assert_checksums(&out);
        let snat = snat_of(&out);
        assert!(pool.contains(&snat.ip()), "{client} sent from {snat}");
        used.insert(snat.ip());
        last = Some((client, syn_destination(&out), snat));
    }
    assert_eq!(used.len(), 2, "64 flows use both addresses of the pool");
    // A backend's reply to either address reaches its client, from the VIP.
    let (client, be, snat) = last.unwrap();
    run_counted(
        &tb,
        Row {
            name: "a reply to the flow's pool address goes back to its client",
            input: packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 9, 2, packet::ACK, b"r"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                9,
                2,
                packet::ACK,
                b"r",
            )),
        },
        Reason::Tx,
    );
    // With the flow's first (address, port) held by a live flow, the next probe is the same
    // port on the pool's other address: each address offers the whole port range.
    let fkey = forward_key(client, vip);
    let rkey = forward_key(be, snat);
    tb.dp.remove_flow(&fkey).unwrap();
    let now = balancer::control::flow_expiry::now_secs();
    hold_at(&mut tb, vip, be, snat, 1, 0, now);
    let holder = tb.dp.flows()[&rkey];
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!(v, XDP_TX);
    let moved = snat_of(&out);
    assert_eq!(moved.port(), snat.port(), "same port");
    assert_ne!(moved.ip(), snat.ip(), "the pool's other address");
    assert_eq!(tb.dp.flows()[&rkey], holder, "the holder is untouched");
    assert!(st.services.contains_key("web"));
}

#[test]
fn nat_flow_reply_state_is_restored_or_the_flow_reset_never_shared() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40030");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let to_backend = |seq, ack, flags, data: &[u8]| {
        packet::tcp(LB_MAC, mac_of(be.ip()), snat, be, seq, ack, flags, data)
    };
    run_counted(
        &tb,
        Row {
            name: "SYN makes the NAT flow",
            input: packet::tcp(host_mac(2), LB_MAC, client, vip, 1000, 0, packet::SYN, &[]),
            verdict: XDP_TX,
            output: Some(to_backend(1000, 0, packet::SYN, &[])),
        },
        Reason::Tx,
    );
    // The reply half is lost (as by LRU eviction).
    let rkey = reply_key(be, port, false);
    tb.dp.remove_flow(&rkey).unwrap();
    assert!(!tb.dp.flows().contains_key(&rkey));
    run_counted(
        &tb,
        Row {
            name: "a forward hit whose reply state is gone restores it",
            input: packet::tcp(
                host_mac(2),
                LB_MAC,
                client,
                vip,
                1001,
                5001,
                packet::ACK,
                b"a",
            ),
            verdict: XDP_TX,
            output: Some(to_backend(1001, 5001, packet::ACK, b"a")),
        },
        Reason::Tx,
    );
    let restored = tb.dp.flows()[&rkey];
    assert_eq!(restored.new_dst, addr16(client.ip()));
    assert_eq!(restored.new_dport, client.port().to_be());
    run_counted(
        &tb,
        Row {
            name: "the backend's reply reaches the client through the restored entry",
            input: packet::tcp(
                mac_of(be.ip()),
                LB_MAC,
                be,
                snat,
                5001,
                1002,
                packet::ACK,
                b"b",
            ),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                5001,
                1002,
                packet::ACK,
                b"b",
            )),
        },
        Reason::Tx,
    );
    // Lost again, and the port claimed by another client meanwhile.
    let other = sa("10.77.0.3:40031");
    let mut theirs = restored;
    theirs.new_dst = addr16(other.ip());
    theirs.new_dport = other.port().to_be();
    tb.dp.put_flow(&rkey, &theirs).unwrap();
    let ack = packet::tcp(
        host_mac(2),
        LB_MAC,
        client,
        vip,
        1002,
        5002,
        packet::ACK,
        b"c",
    );
    let (v, out) = tb.run(&ack).unwrap();
    assert_eq!(v, XDP_TX, "port taken: the client is reset");
    assert_rst(&out, vip, client, 5002, None);
    assert_eq!(reason_count(&tb, Reason::PortTaken), 1);
    let flows = tb.dp.flows();
    assert_eq!(
        flows[&rkey], theirs,
        "the other flow's entry is not touched"
    );
    assert!(
        !flows.values().any(|f| f.new_dst == addr16(be.ip())
            && f.new_sport == port.to_be()
            && f.flags & balancer_common::FLOW_F_FORWARD != 0),
        "no forward entry of this client uses the taken port any more"
    );
    // The client's reconnect gets a port of its own.
    let (v, out) = tb
        .run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            9000,
            0,
            packet::SYN,
            &[],
        ))
        .unwrap();
    assert_eq!(v, XDP_TX);
    assert_ne!(
        snat_port_of(&out),
        port,
        "never two clients on one backend tuple"
    );
}

#[test]
fn a_port_freed_by_eviction_and_claimed_by_the_program_for_another_client_resets_the_first() {
    // A narrow SNAT range, so another client whose first probe is the first client's port is
    // found among a few thousand.
    let (mut tb, st) = configured_testbed_with(65536, "snat_ports = [61000, 62023]").unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40070");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let fkey = forward_key(client, vip);
    let from_client = |seq, flags, data: &[u8]| {
        packet::tcp(host_mac(2), LB_MAC, client, vip, seq, 5001, flags, data)
    };
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1000, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    assert_eq!(
        tb.run(&from_client(1001, packet::ACK, b"")).unwrap().0,
        XDP_TX
    );
    let rkey = reply_key(be, port, false);
    assert_eq!(tb.dp.flows()[&rkey].new_dst, addr16(client.ip()));
    // The reply half is evicted, and another client's first probe is exactly that port: the
    // program's own claim (not an entry written from outside) takes it.
    tb.dp.remove_flow(&rkey).unwrap();
    let first_probe = predictor(&tb, &st, "web");
    let other = (1024..=u16::MAX)
        .map(|p| SocketAddr::new("10.77.0.3".parse().unwrap(), p))
        .find(|c| first_probe(*c, vip, PROTO_TCP) == (be, port))
        .expect("a client whose first probe is the same backend and port");
    let (v, out) = tb
        .run(&packet::tcp(
            host_mac(3),
            LB_MAC,
            other,
            vip,
            7000,
            0,
            packet::SYN,
            &[],
        ))
        .unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(
        snat_port_of(&out),
        port,
        "the free port goes to the other client"
    );
    // The first client's next segment: its reply entry is now the other client's, so this
    // client is reset instead of being forwarded into the other client's connection.
    let (v, out) = tb.run(&from_client(1002, packet::ACK, b"phi")).unwrap();
    assert_eq!(
        v, XDP_TX,
        "reset, not forwarded into the other client's connection"
    );
    assert_rst(&out, vip, client, 5001, None);
    assert_eq!(reason_count(&tb, Reason::PortTaken), 1);
    assert_eq!(tb.dp.flows()[&rkey].new_dst, addr16(other.ip()));
    assert!(
        tb.dp.flow(&fkey).is_none(),
        "the first client's flow is over"
    );
}

#[test]
fn a_claimed_port_is_never_overwritten_by_a_colliding_claim() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40040");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    // Another live flow holds the port this client tries first.
    let holder = Flow {
        new_src: addr16(vip.ip()),
        new_dst: addr16("10.77.0.9".parse().unwrap()),
        new_sport: vip.port().to_be(),
        new_dport: 5555u16.to_be(),
        flags: balancer_common::FLOW_F_NEXTHOP,
        ..Default::default()
    };
    let rkey = reply_key(be, port, false);
    tb.dp.put_flow(&rkey, &holder).unwrap();
    let (v, out) = tb
        .run(&packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            1,
            0,
            packet::SYN,
            &[],
        ))
        .unwrap();
    assert_eq!(v, XDP_TX);
    // Triangular probing: the second port tried is the first + 1 (wrapping in the range).
    let svc = tb
        .dp
        .services()
        .into_iter()
        .map(|(_, s)| s)
        .find(|s| s.id == st.services["web"].id)
        .unwrap();
    let (lo, hi) = (svc.snat_port_lo, svc.snat_port_hi);
    let next = if port == hi { lo } else { port + 1 };
    assert_eq!(snat_port_of(&out), next);
    assert_eq!(
        tb.dp.flows()[&rkey],
        holder,
        "the holder's entry is untouched"
    );
    assert_eq!(
        tb.dp.flows()[&reply_key(be, next, false)].new_dst,
        addr16(client.ip())
    );
}

#[test]
fn half_open_flows_are_not_kept_by_backend_retransmits() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40050");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    let rkey = reply_key(be, port, false);
    let fkey = forward_key(client, vip);
    let half = balancer_common::FLOW_F_HALF_OPEN;
    let flows = tb.dp.flows();
    let (fwd, mut reply) = (flows[&fkey], flows[&rkey]);
    assert!(
        fwd.flags & half != 0 && reply.flags & half != 0,
        "both halves half-open"
    );
    // Age the reply entry, then let the backend retransmit its SYN-ACK.
    reply.atime = fwd.atime.wrapping_sub(100);
    tb.dp.put_flow(&rkey, &reply).unwrap();
    let syn_ack = packet::Flags {
        syn: true,
        ack: true,
        ..Default::default()
    };
    let from_be = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 50, 2, syn_ack, &[]);
    run_counted(
        &tb,
        Row {
            name: "a backend's SYN-ACK of a half-open flow reaches the client",
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                50,
                2,
                syn_ack,
                &[],
            )),
            input: from_be.clone(),
            verdict: XDP_TX,
        },
        Reason::Tx,
    );
    assert_eq!(
        tb.dp.flows()[&rkey].atime,
        reply.atime,
        "the SYN-ACK did not refresh the half-open flow"
    );
    // The client's ACK completes both halves; the backend's packets refresh it from then on.
    let ack = packet::tcp(host_mac(2), LB_MAC, client, vip, 2, 51, packet::ACK, &[]);
    assert_eq!(tb.run(&ack).unwrap().0, XDP_TX);
    let flows = tb.dp.flows();
    assert_eq!(flows[&fkey].flags & half, 0);
    assert_eq!(flows[&rkey].flags & half, 0);
    assert_eq!(tb.run(&from_be).unwrap().0, XDP_TX);
    // Refreshed to now (the whole-second clock may have ticked since the SYN).
    let refreshed = tb.dp.flows()[&rkey].atime;
    assert!(
        refreshed != reply.atime && balancer_common::idle_secs(refreshed, fwd.atime) <= 5,
        "refreshed {refreshed}, SYN at {}",
        fwd.atime
    );

    // A half-open flow whose reply half was refreshed later is still swept 30 s after the
    // client's SYN, and so is a half-open reply entry whose forward half is gone.
    let t = balancer::control::flow_expiry::Timeouts {
        tcp_idle: 3600,
        udp_idle: 300,
    };
    let c2 = sa("10.77.0.2:40051");
    let c3 = sa("10.77.0.2:40052");
    for c in [c2, c3] {
        let syn = packet::tcp(host_mac(2), LB_MAC, c, vip, 1, 0, packet::SYN, &[]);
        assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    }
    let (be2, p2) = predict(&tb, &st, "web", c2, vip, PROTO_TCP);
    let (be3, p3) = predict(&tb, &st, "web", c3, vip, PROTO_TCP);
    let mut r2 = tb.dp.flows()[&reply_key(be2, p2, false)];
    r2.atime = fwd.atime + 20;
    tb.dp.put_flow(&reply_key(be2, p2, false), &r2).unwrap();
    let f3 = FlowKey {
        sport: c3.port().to_be(),
        ..fkey
    };
    tb.dp.remove_flow(&f3).unwrap();
    let before = tb.dp.flows().len();
    let s = tb
        .dp
        .sweep_flows(t, fwd.atime + balancer_common::HALF_OPEN_SECS + 5);
    assert_eq!(
        (s.idle, s.orphans),
        (1, 1),
        "the refreshed half-open flow, and the half whose flow is gone"
    );
    assert_eq!(s.half_open, 1, "the idle one was half-open");
    let flows = tb.dp.flows();
    assert_eq!(flows.len(), before - 3);
    assert!(!flows.contains_key(&reply_key(be3, p3, false)));
    assert!(flows.contains_key(&rkey), "the completed flow stays");
}

#[test]
fn replies_are_accepted_only_from_the_flows_interface() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40060");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    let reply = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 7, 2, packet::ACK, b"r");
    // The same 5-tuple arriving on loopback (ifindex 1) instead of the lab interface.
    let before = reason_count(&tb, Reason::DropWrongInterface);
    let (v, _, _) = run_prog(tb.dp.program().unwrap(), &reply, 1).unwrap();
    assert_eq!(v, XDP_DROP, "a reply from another interface is dropped");
    assert_eq!(reason_count(&tb, Reason::DropWrongInterface), before + 1);
    run_counted(
        &tb,
        Row {
            name: "the same reply from the flow's interface goes through",
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                7,
                2,
                packet::ACK,
                b"r",
            )),
            input: reply,
            verdict: XDP_TX,
        },
        Reason::Tx,
    );
}

#[test]
fn new_flow_rate_limit_stops_new_state_while_established_flows_work() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40070");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    // Three new flows per second per CPU from now on.
    let (key, mut svc) = tb
        .dp
        .services()
        .into_iter()
        .find(|(_, s)| s.id == st.services["web"].id)
        .unwrap();
    svc.new_flow_rate = 3;
    tb.dp.put_service(&key, &svc).unwrap();
    let flows_before = tb.dp.flows().len();
    // A burst of SYNs from new clients (an unrouted lab prefix): past the limit, dropped.
    let mut limited = 0;
    let mut admitted = 0;
    let mut last_admitted = None;
    let new_client = |i: u32| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(
                10,
                77,
                200 + (i / 250) as u8,
                (i % 250) as u8 + 1,
            )),
            20000,
        )
    };
    for i in 0..2000u32 {
        let c = new_client(i);
        let (v, _) = tb
            .run(&packet::tcp(
                host_mac(2),
                LB_MAC,
                c,
                vip,
                1,
                0,
                packet::SYN,
                &[],
            ))
            .unwrap();
        match v {
            XDP_DROP => limited += 1,
            XDP_TX => {
                admitted += 1;
                last_admitted = Some(c);
            }
            other => panic!("unexpected verdict {other}"),
        }
        if limited >= 100 {
            break;
        }
    }
    assert_eq!(limited, 100, "the limiter drops past the rate");
    assert_eq!(reason_count(&tb, Reason::DropRateLimited), 100);
    assert_eq!(
        tb.dp.flows().len(),
        flows_before + 2 * admitted,
        "a limited SYN makes no state"
    );
    // Past the limit a SYN is refused before the flow table is read: a retransmitted SYN of
    // a flow admitted earlier is refused too (its client tries again), and makes nothing.
    // Each try sits between two SYNs of new clients refused in the same window (a window
    // may end between them: bounded retries).
    let again = last_admitted.expect("some SYN was admitted");
    let syn_of = |c| packet::tcp(host_mac(2), LB_MAC, c, vip, 1, 0, packet::SYN, &[]);
    let flows = tb.dp.flows().len();
    let mut seen = false;
    for t in 0..5u32 {
        let outer = [new_client(1000 + 2 * t), new_client(1001 + 2 * t)];
        let (a, _) = tb.run(&syn_of(outer[0])).unwrap();
        let (r, out) = tb.run(&syn_of(again)).unwrap();
        let (b, _) = tb.run(&syn_of(outer[1])).unwrap();
        if (a, b) == (XDP_DROP, XDP_DROP) {
            assert_eq!(r, XDP_DROP, "a retransmitted SYN past the limit");
            assert_eq!(out, syn_of(again), "dropped untouched");
            seen = true;
            break;
        }
    }
    assert!(seen, "five windows ended between three packets");
    assert!(
        tb.dp.flows().len() <= flows + 4,
        "only the admitted of those made state"
    );
    // The established flow keeps working both ways.
    run_counted(
        &tb,
        Row {
            name: "an established flow is not rate limited",
            input: packet::tcp(host_mac(2), LB_MAC, client, vip, 2, 9, packet::ACK, b"q"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                mac_of(be.ip()),
                snat,
                be,
                2,
                9,
                packet::ACK,
                b"q",
            )),
        },
        Reason::Tx,
    );
    run_counted(
        &tb,
        Row {
            name: "nor are its replies",
            input: packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 9, 3, packet::ACK, b"a"),
            verdict: XDP_TX,
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                9,
                3,
                packet::ACK,
                b"a",
            )),
        },
        Reason::Tx,
    );
}

/// Passive health: the backend counters that tell the controller a backend refuses or ignores
/// new flows, long before an active check runs.
#[test]
fn refused_and_unanswered_syns_are_counted_per_backend() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let web = &st.services["web"];
    let slot_of = |be: SocketAddr| web.backends.iter().find(|b| b.address == be).unwrap().slot;
    let rst_ack = packet::Flags {
        rst: true,
        ack: true,
        ..Default::default()
    };

    // A SYN, the client's retransmit of it, then the backend's RST: one of each.
    let client = sa("10.77.0.2:40070");
    let (be, port) = predict(&tb, &st, "web", client, vip, PROTO_TCP);
    let snat = SocketAddr::new(lb_addr(false), port);
    let before = tb.dp.backend_counters(slot_of(be));
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_TX);
    assert_eq!(
        tb.dp.backend_counters(slot_of(be)).syn_retries,
        before.syn_retries,
        "a first SYN is no retry"
    );
    run_counted(
        &tb,
        Row {
            name: "a retransmitted SYN still goes to the flow's backend",
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
            input: syn.clone(),
            verdict: XDP_TX,
        },
        Reason::Tx,
    );
    let refused = packet::tcp(mac_of(be.ip()), LB_MAC, be, snat, 0, 2, rst_ack, &[]);
    run_counted(
        &tb,
        Row {
            name: "the backend's RST to a SYN reaches the client",
            output: Some(packet::tcp(
                LB_MAC,
                host_mac(2),
                vip,
                client,
                0,
                2,
                rst_ack,
                &[],
            )),
            input: refused,
            verdict: XDP_TX,
        },
        Reason::Tx,
    );
    let after = tb.dp.backend_counters(slot_of(be));
    assert_eq!(after.syn_retries - before.syn_retries, 1);
    assert_eq!(after.refused - before.refused, 1);
    assert_eq!(
        after.new_flows - before.new_flows,
        1,
        "a retransmitted SYN is not a new flow"
    );

    // An established flow's RST (the application closing) and its ACKs count as neither.
    let c2 = sa("10.77.0.2:40071");
    let (be2, port2) = predict(&tb, &st, "web", c2, vip, PROTO_TCP);
    let snat2 = SocketAddr::new(lb_addr(false), port2);
    let before = tb.dp.backend_counters(slot_of(be2));
    for p in [
        packet::tcp(host_mac(2), LB_MAC, c2, vip, 1, 0, packet::SYN, &[]),
        packet::tcp(host_mac(2), LB_MAC, c2, vip, 2, 9, packet::ACK, b"hi"),
        packet::tcp(host_mac(2), LB_MAC, c2, vip, 4, 9, packet::ACK, b"hi"),
        packet::tcp(mac_of(be2.ip()), LB_MAC, be2, snat2, 9, 6, rst_ack, &[]),
    ] {
        assert_eq!(tb.run(&p).unwrap().0, XDP_TX);
    }
    let after = tb.dp.backend_counters(slot_of(be2));
    assert_eq!(
        (after.syn_retries, after.refused),
        (before.syn_retries, before.refused)
    );
}

/// A SYN flood recycles its own ports: when every probed port is held, a port held by a
/// half-open flow older than `HALF_OPEN_REUSE_SECS` goes to the new flow (the old flow's
/// forward entry goes too); ports of live or young half-open flows are never taken.
#[test]
fn a_flood_of_half_open_flows_gives_up_its_ports_to_new_clients() {
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40080");
    let (be, probes) = probed_ports(&tb, &st, client, vip);
    let now = balancer::control::flow_expiry::now_secs();
    let half = balancer_common::FLOW_F_HALF_OPEN;
    // Young half-open flows and live flows everywhere: no port for the new client.
    for i in 0..16 {
        let flags = if i % 2 == 0 { half } else { 0 };
        hold(&mut tb, vip, be, &probes, i, flags, now);
    }
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    run_counted(
        &tb,
        Row {
            name: "every probed port held by a live or young half-open flow: dropped",
            input: syn.clone(),
            verdict: XDP_DROP,
            output: None,
        },
        Reason::DropSnatExhausted,
    );
    // Probe 5's half-open flow is old now: its port goes to the new client.
    let old = hold(&mut tb, vip, be, &probes, 5, half, now.wrapping_sub(3));
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(snat_port_of(&out), probes[5]);
    let flows = tb.dp.flows();
    assert!(
        !flows.contains_key(&old),
        "the old flow's forward entry went with its port"
    );
    assert_eq!(
        flows[&reply_key(be, probes[5], false)].new_dst,
        addr16(client.ip())
    );
}

#[test]
fn a_probed_port_whose_flow_is_gone_is_free_at_once() {
    // The short-probe memo is per CPU: every run on one CPU.
    let mut cpu = nix::sched::CpuSet::new();
    cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu).unwrap();
    let (mut tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let client = sa("10.77.0.2:40090");
    let (be, probes) = probed_ports(&tb, &st, client, vip);
    let now = balancer::control::flow_expiry::now_secs();
    // Established flows of a few seconds: an orphan is reclaimed once it is
    // ORPHAN_GRACE_SECS old.
    let then = now.wrapping_sub(balancer_common::ORPHAN_GRACE_SECS + 1);
    let mut forward = Vec::new();
    for i in 0..16 {
        forward.push(hold(&mut tb, vip, be, &probes, i, 0, then));
    }
    let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
    assert_eq!(tb.run(&syn).unwrap().0, XDP_DROP, "16 live flows");
    // Every port held by an established flow: for a moment this CPU probes only the first 4.
    // Probe 9's forward entry goes, and is not reached.
    tb.dp.remove_flow(&forward[9]).unwrap();
    run_counted(
        &tb,
        Row {
            name: "right after a backend was found full of established flows, 4 probes",
            input: syn.clone(),
            verdict: XDP_DROP,
            output: None,
        },
        Reason::DropSnatExhausted,
    );
    forward[9] = hold(&mut tb, vip, be, &probes, 9, 0, then);
    // Probe 1's forward entry was evicted: its reply entry holds a port nobody uses.
    tb.dp.remove_flow(&forward[1]).unwrap();
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!(
        v, XDP_TX,
        "an orphaned port is claimed at once, not after the idle timeout"
    );
    assert_eq!(snat_port_of(&out), probes[1]);
    let flows = tb.dp.flows();
    assert_eq!(
        flows[&reply_key(be, probes[1], false)].new_dst,
        addr16(client.ip())
    );
    for (i, k) in forward.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert!(flows.contains_key(k), "probe {i}'s live flow stays");
    }
    // The same client again, with probe 1 held by a live flow once more and probe 3's
    // client now on another port: that client's forward entry stays, its old port is free.
    let fkey = forward_key(client, vip);
    tb.dp.remove_flow(&fkey).unwrap();
    hold(&mut tb, vip, be, &probes, 1, 0, then);
    let mut moved = tb.dp.flows()[&forward[3]];
    moved.new_sport = 40000u16.to_be();
    tb.dp.put_flow(&forward[3], &moved).unwrap();
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!(v, XDP_TX);
    assert_eq!(snat_port_of(&out), probes[3]);
    assert_eq!(
        tb.dp.flows()[&forward[3]],
        moved,
        "a forward entry on another port is not the old port's flow: kept"
    );
    // The controller's sweep frees such ports too, once they are 2 s old, and keeps
    // every reply entry whose flow is there.
    let mut orphan = tb.dp.flows()[&reply_key(be, probes[5], false)];
    tb.dp.remove_flow(&forward[5]).unwrap();
    orphan.atime = now.wrapping_sub(balancer::control::flow_expiry::ORPHAN_GRACE_SECS);
    tb.dp
        .put_flow(&reply_key(be, probes[5], false), &orphan)
        .unwrap();
    tb.dp.remove_flow(&forward[6]).unwrap();
    let mut young = tb.dp.flows()[&reply_key(be, probes[6], false)];
    young.atime = now;
    tb.dp
        .put_flow(&reply_key(be, probes[6], false), &young)
        .unwrap();
    let t = balancer::control::flow_expiry::Timeouts {
        tcp_idle: 3600,
        udp_idle: 300,
    };
    let before = tb.dp.flows().len();
    let s = tb.dp.sweep_flows(t, now);
    assert_eq!((s.orphans, s.idle, s.closed), (1, 0, 0), "{s:?}");
    let flows = tb.dp.flows();
    assert_eq!(flows.len(), before - 1);
    assert!(!flows.contains_key(&reply_key(be, probes[5], false)));
    assert!(
        flows.contains_key(&reply_key(be, probes[6], false)),
        "a young orphan may be a claim in progress: kept"
    );
    // Two ticks of the whole-second clock after the full probe, all 16 are probed again:
    // probe 12's orphaned port is found.
    tb.dp.remove_flow(&fkey).unwrap();
    let start = balancer::control::flow_expiry::now_secs();
    for _ in 0..40 {
        if balancer_common::idle_secs(balancer::control::flow_expiry::now_secs(), start) >= 2 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let later = balancer::control::flow_expiry::now_secs();
    let aged = later.wrapping_sub(balancer_common::ORPHAN_GRACE_SECS + 1);
    for (i, f) in forward.iter_mut().enumerate() {
        *f = hold(&mut tb, vip, be, &probes, i, 0, aged);
    }
    tb.dp.remove_flow(&forward[12]).unwrap();
    let (v, out) = tb.run(&syn).unwrap();
    assert_eq!(v, XDP_TX, "all 16 probes again");
    assert_eq!(snat_port_of(&out), probes[12]);
}

/// The backend a client's first SYN goes to, and the 16 SNAT ports the program probes for
/// it, written out independently: first, +1, +3, +6, …
fn probed_ports(
    tb: &Testbed,
    st: &State,
    client: SocketAddr,
    vip: SocketAddr,
) -> (SocketAddr, Vec<u16>) {
    let (be, first) = predict(tb, st, "web", client, vip, PROTO_TCP);
    let svc = tb
        .dp
        .services()
        .into_iter()
        .map(|(_, s)| s)
        .find(|s| s.id == st.services["web"].id)
        .unwrap();
    let (lo, hi) = (svc.snat_port_lo as u32, svc.snat_port_hi as u32);
    let range = hi - lo + 1;
    let probes = (0..16u32)
        .map(|i| (lo + (first as u32 - lo + i * (i + 1) / 2) % range) as u16)
        .collect();
    (be, probes)
}

/// Holds probed port `i` with a spoofed client's flow (both halves, as the program makes
/// them); returns its forward key.
fn hold(
    tb: &mut Testbed,
    vip: SocketAddr,
    be: SocketAddr,
    probes: &[u16],
    i: usize,
    flags: u32,
    atime: u32,
) -> FlowKey {
    let snat = SocketAddr::new(lb_addr(false), probes[i]);
    hold_at(tb, vip, be, snat, i + 1, flags, atime)
}

/// Holds SNAT address and port `snat` towards `be` with the flow of spoofed client
/// 10.99.0.`client` (both halves); returns its forward key.
fn hold_at(
    tb: &mut Testbed,
    vip: SocketAddr,
    be: SocketAddr,
    snat: SocketAddr,
    client: usize,
    flags: u32,
    atime: u32,
) -> FlowKey {
    let spoofed = SocketAddr::new(format!("10.99.0.{client}").parse().unwrap(), 5000);
    let rk = forward_key(be, snat);
    let reply = Flow {
        new_src: addr16(vip.ip()),
        new_dst: addr16(spoofed.ip()),
        new_sport: vip.port().to_be(),
        new_dport: spoofed.port().to_be(),
        flags: balancer_common::FLOW_F_NEXTHOP | flags,
        atime,
        ..Default::default()
    };
    tb.dp.put_flow(&rk, &reply).unwrap();
    let fk = forward_key(spoofed, vip);
    let fwd = Flow {
        new_src: addr16(snat.ip()),
        new_dst: addr16(be.ip()),
        new_sport: snat.port().to_be(),
        new_dport: be.port().to_be(),
        flags: balancer_common::FLOW_F_FORWARD | balancer_common::FLOW_F_NEXTHOP | flags,
        atime,
        ..Default::default()
    };
    tb.dp.put_flow(&fk, &fwd).unwrap();
    fk
}

/// The backend a transmitted NAT SYN is addressed to (its IPv4 destination and TCP port).
fn syn_destination(out: &[u8]) -> SocketAddr {
    let p = SlicedPacket::from_ethernet(out).expect("parsable frame");
    let ip = match p.net.as_ref().expect("ip") {
        NetSlice::Ipv4(ip) => IpAddr::V4(ip.header().destination_addr()),
        NetSlice::Ipv6(ip) => IpAddr::V6(ip.header().destination_addr()),
        _ => panic!("unexpected net"),
    };
    let port = match p.transport.as_ref().expect("transport") {
        TransportSlice::Tcp(t) => t.destination_port(),
        _ => panic!("unexpected transport"),
    };
    SocketAddr::new(ip, port)
}

/// Without any hash of the test's own: every new flow goes to a backend of the service, the
/// same 5-tuple again goes to the same one, and 256 distinct sources reach every backend.
#[test]
fn new_flows_spread_over_every_backend_and_stay_put() {
    let (tb, st) = configured_testbed(65536).unwrap();
    let vip = sa("10.77.0.100:7002");
    let backends: std::collections::BTreeSet<SocketAddr> = st.services["web"]
        .backends
        .iter()
        .map(|b| b.address)
        .collect();
    assert_eq!(backends.len(), 3);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..256u16 {
        let client = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2 + u8::try_from(i % 4).unwrap())),
            30000 + i,
        );
        let mac = mac_of(client.ip());
        let syn = packet::tcp(mac, LB_MAC, client, vip, 1000, 0, packet::SYN, &[]);
        let (v, out) = tb.run(&syn).unwrap();
        assert_eq!(v, XDP_TX, "SYN from {client}: verdict");
        assert_checksums(&out);
        let be = syn_destination(&out);
        assert!(
            backends.contains(&be),
            "{client} sent to {be}, not a backend"
        );
        let (v, again) = tb.run(&syn).unwrap();
        assert_eq!(v, XDP_TX, "SYN again from {client}: verdict");
        assert_eq!(syn_destination(&again), be, "SYN again from {client}");
        seen.insert(be);
    }
    assert_eq!(seen, backends, "backends reached by 256 sources");
}
