//! Mutation fuzzing of the real program through BPF_PROG_TEST_RUN: valid frames of every
//! kind the program handles (NAT and DSR, TCP and UDP, both families, replies, VLAN tags,
//! ICMP errors both ways, too-big packets) are mutated (bit flips, truncation, length fields,
//! IPv4 options, TCP data offsets) with a fixed seed and a bounded count. Every `XDP_PASS`
//! output must equal its input; every `XDP_TX` / `XDP_REDIRECT` output must be a well-formed
//! frame (etherparse parses it whole); a frame whose checksums were valid must leave with
//! valid checksums, and half the mutants have their checksums repaired before they go in,
//! so that rule is exercised on every path.
//!
//! Needs root (a network namespace, BPF). Runs in `cargo xtask test`.

use std::net::SocketAddr;

use balancer_testbed::{LB_MAC, Testbed, bench::configured_testbed, host_mac, packet};
use etherparse::{
    Icmpv4Type, Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, icmpv4,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
/// Mutants per run (each one BPF_PROG_TEST_RUN call).
const MUTANTS: usize = 30_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Deterministic generator (no wall clock, same mutants every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn rfc1071(bytes: &[u8], init: u32) -> u16 {
    let mut sum = init as u64;
    for c in bytes.chunks(2) {
        sum += ((c[0] as u64) << 8) | *c.get(1).unwrap_or(&0) as u64;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Offsets of a frame's layers, read without trusting anything: (l3, v6, l4 start, l4 end).
fn layers(f: &[u8]) -> Option<(usize, bool, usize, usize, u8)> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    match et {
        0x0800 => {
            let ihl = (*f.get(l3)? & 0xf) as usize * 4;
            let tot = u16::from_be_bytes([*f.get(l3 + 2)?, *f.get(l3 + 3)?]) as usize;
            if ihl < 20 || tot < ihl || l3 + tot > f.len() {
                return None;
            }
            Some((l3, false, l3 + ihl, l3 + tot, *f.get(l3 + 9)?))
        }
        0x86dd => {
            let plen = u16::from_be_bytes([*f.get(l3 + 4)?, *f.get(l3 + 5)?]) as usize;
            if l3 + 40 + plen > f.len() {
                return None;
            }
            Some((l3, true, l3 + 40, l3 + 40 + plen, *f.get(l3 + 6)?))
        }
        _ => None,
    }
}

/// The pseudo-header sum (unfolded) for an L4 segment.
fn pseudo(f: &[u8], l3: usize, v6: bool, proto: u8, len: usize) -> u32 {
    let addrs = if v6 {
        &f[l3 + 8..l3 + 40]
    } else {
        &f[l3 + 12..l3 + 20]
    };
    let mut s: u32 = addrs
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    s += proto as u32 + len as u32;
    s
}

/// Checksum field offset (from the L4 start) and whether the pseudo-header is included.
fn l4_csum(v6: bool, proto: u8) -> Option<(usize, bool)> {
    match proto {
        6 => Some((16, true)),
        17 => Some((6, true)),
        1 if !v6 => Some((2, false)),
        58 if v6 => Some((2, true)),
        _ => None,
    }
}

/// Recomputes the IPv4 header and L4 checksums in place (a mutant with valid checksums).
fn repair(f: &mut [u8]) {
    let Some((l3, v6, l4, end, proto)) = layers(f) else {
        return;
    };
    if !v6 {
        f[l3 + 10] = 0;
        f[l3 + 11] = 0;
        let c = rfc1071(&f[l3..l4], 0);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    let Some((off, with_pseudo)) = l4_csum(v6, proto) else {
        return;
    };
    if l4 + off + 2 > end {
        return;
    }
    if proto == 17 && !v6 && f[l4 + off] == 0 && f[l4 + off + 1] == 0 {
        return;
    }
    f[l4 + off] = 0;
    f[l4 + off + 1] = 0;
    let init = if with_pseudo {
        pseudo(f, l3, v6, proto, end - l4)
    } else {
        0
    };
    let mut c = rfc1071(&f[l4..end], init);
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    f[l4 + off..l4 + off + 2].copy_from_slice(&c.to_be_bytes());
}

/// Are the IPv4 header and L4 checksums valid (a zero IPv4 UDP checksum counts as valid)?
fn checksums_valid(f: &[u8]) -> bool {
    let Some((l3, v6, l4, end, proto)) = layers(f) else {
        return false;
    };
    if !v6 && rfc1071(&f[l3..l4], 0) != 0 {
        return false;
    }
    let Some((off, with_pseudo)) = l4_csum(v6, proto) else {
        return true;
    };
    if l4 + off + 2 > end {
        return false;
    }
    if proto == 17 && !v6 && f[l4 + off] == 0 && f[l4 + off + 1] == 0 {
        return true;
    }
    let init = if with_pseudo {
        pseudo(f, l3, v6, proto, end - l4)
    } else {
        0
    };
    rfc1071(&f[l4..end], init) == 0
}

/// A transmitted frame must parse whole with etherparse, and when `valid` (the input's
/// checksums were) its checksums must hold, summed by RFC 1071 over the bytes: etherparse
/// rebuilds headers from its fields before summing and drops what it has no field for (TCP's
/// reserved bits, the unused word of an ICMPv6 time exceeded), so it disagrees with correct
/// frames whose mutated bits sit there.
fn assert_well_formed(out: &[u8], valid: bool, what: &str) {
    let p = SlicedPacket::from_ethernet(out)
        .unwrap_or_else(|e| panic!("{what}: transmitted frame does not parse: {e:?}"));
    assert!(p.net.is_some(), "{what}: no IP");
    assert!(p.transport.is_some(), "{what}: no L4");
    if valid {
        assert!(checksums_valid(out), "{what}: IPv4 header or L4 checksum");
    }
}

fn tag(f: &[u8]) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
    t.extend_from_slice(&f[12..]);
    t
}

/// Valid frames of every kind, after the flows they belong to were set up.
fn corpus(tb: &Testbed) -> Vec<Vec<u8>> {
    let mut c = Vec::new();
    for (vip, client) in [
        (sa("10.77.0.100:7002"), sa("10.77.0.2:41000")),
        (sa("[fd77::100]:7002"), sa("[fd77::2]:41000")),
        (sa("10.77.0.100:7003"), sa("10.77.0.2:41001")),
    ] {
        let syn = packet::tcp(host_mac(2), LB_MAC, client, vip, 1, 0, packet::SYN, &[]);
        let (v, fwd) = tb.run(&syn).unwrap();
        assert_eq!(v, XDP_TX);
        c.push(syn);
        c.push(tag(&packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            1,
            0,
            packet::SYN,
            &[],
        )));
        c.push(packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            2,
            9,
            packet::ACK,
            b"data",
        ));
        c.push(packet::tcp(
            host_mac(2),
            LB_MAC,
            client,
            vip,
            2,
            9,
            packet::ACK,
            &[5u8; 1560],
        ));
        // The backend's reply to what the balancer sent it (NAT: to the SNAT address), and a
        // router's error about what the balancer sent. A DSR backend answers the client
        // directly and a router's error about that goes to the client: neither reaches the
        // balancer.
        let dsr = vip.port() == 7003;
        let p = SlicedPacket::from_ethernet(&fwd).unwrap();
        let (src, dst) = match p.net.as_ref().unwrap() {
            NetSlice::Ipv4(ip) => (
                std::net::IpAddr::from(ip.header().source_addr()),
                std::net::IpAddr::from(ip.header().destination_addr()),
            ),
            NetSlice::Ipv6(ip) => (
                std::net::IpAddr::from(ip.header().source_addr()),
                std::net::IpAddr::from(ip.header().destination_addr()),
            ),
            _ => unreachable!(),
        };
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            unreachable!()
        };
        let sent_src = SocketAddr::new(src, t.source_port());
        let be = SocketAddr::new(dst, t.destination_port());
        let before = c.len();
        c.push(packet::tcp(
            fwd[0..6].try_into().unwrap(),
            LB_MAC,
            be,
            sent_src,
            5,
            2,
            packet::ACK,
            b"reply",
        ));
        // ICMP errors about the flow, both ways.
        let ip_sent = fwd[14..].to_vec();
        let eth = PacketBuilder::ethernet2(host_mac(50), LB_MAC);
        let mut e = Vec::new();
        match (sent_src.ip(), be.ip()) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(_)) => {
                eth.ipv4([10, 77, 0, 50], s.octets(), 64)
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 },
                    ))
                    .write(&mut e, &ip_sent)
                    .unwrap();
            }
            (std::net::IpAddr::V6(s), _) => {
                eth.ipv6(
                    "fd77::32".parse::<std::net::Ipv6Addr>().unwrap().octets(),
                    s.octets(),
                    64,
                )
                .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
                .write(&mut e, &ip_sent)
                .unwrap();
            }
            _ => unreachable!(),
        }
        c.push(e);
        if dsr {
            c.truncate(before);
        }
        let reply = packet::tcp(
            LB_MAC,
            host_mac(2),
            vip,
            client,
            5,
            2,
            packet::ACK,
            b"reply",
        );
        let mut e = Vec::new();
        let eth = PacketBuilder::ethernet2(host_mac(2), LB_MAC);
        match (client.ip(), vip.ip()) {
            (std::net::IpAddr::V4(cl), std::net::IpAddr::V4(v)) => eth
                .ipv4(cl.octets(), v.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut e, &reply[14..])
                .unwrap(),
            (std::net::IpAddr::V6(cl), std::net::IpAddr::V6(v)) => eth
                .ipv6(cl.octets(), v.octets(), 64)
                .icmpv6(Icmpv6Type::TimeExceeded(
                    etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
                ))
                .write(&mut e, &reply[14..])
                .unwrap(),
            _ => unreachable!(),
        }
        c.push(e);
    }
    let dns = sa("10.77.0.100:5353");
    c.push(packet::udp(
        host_mac(2),
        LB_MAC,
        sa("10.77.0.2:41002"),
        dns,
        b"query",
    ));
    c.push(packet::udp(
        host_mac(2),
        LB_MAC,
        sa("10.77.0.2:41002"),
        dns,
        &[1u8; 1570],
    ));
    c
}

/// One mutation of a valid frame.
fn mutate(r: &mut Lcg, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    let l3 = if f.get(12..14) == Some(&[0x81, 0x00]) {
        18
    } else {
        14
    };
    let v6 = f.get(l3).is_some_and(|b| b >> 4 == 6);
    let l4 = l3 + if v6 { 40 } else { 20 };
    match r.below(6) {
        // Bit flips, mostly in the headers.
        0 => {
            for _ in 0..1 + r.below(4) {
                let span = if r.below(4) == 0 {
                    f.len()
                } else {
                    (l4 + 60).min(f.len())
                };
                let i = r.below(span);
                f[i] ^= 1 << r.below(8);
            }
        }
        // Truncation (never below an Ethernet header: TEST_RUN refuses those).
        1 => {
            let len = 14 + r.below(f.len() - 14);
            f.truncate(len);
        }
        // IP length fields.
        2 => {
            let (off, v) = if v6 { (l3 + 4, 40) } else { (l3 + 2, 0) };
            let cur = u16::from_be_bytes([f[off], f[off + 1]]) as i64;
            let new = match r.below(4) {
                0 => r.next() as i64 & 0xffff,
                1 => cur - 1 - r.below(64) as i64,
                2 => cur + 1 + r.below(64) as i64,
                _ => v as i64 + r.below(60) as i64,
            };
            f[off..off + 2].copy_from_slice(&(new.clamp(0, 0xffff) as u16).to_be_bytes());
        }
        // L4 length-like fields: UDP length, TCP data offset, a quoted IP length.
        3 => {
            let i = l4 + [4, 5, 12, 8 + 2, 8 + 3, 8][r.below(6)];
            if i < f.len() {
                f[i] = r.next() as u8;
            }
        }
        // IPv4 options (IHL 6 to 15, with NOPs inserted and the total length grown).
        4 if !v6 && f.len() > l4 => {
            let words = 1 + r.below(10);
            f[l3] = 0x45 + words as u8;
            let tot = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) as usize + words * 4;
            f[l3 + 2..l3 + 4].copy_from_slice(&(tot as u16).to_be_bytes());
            let opts = vec![1u8; words * 4];
            f.splice(l4..l4, opts);
        }
        // Random bytes over a random header field.
        _ => {
            let i = r.below((l4 + 48).min(f.len()));
            for j in i..(i + 1 + r.below(4)).min(f.len()) {
                f[j] = r.next() as u8;
            }
        }
    }
    f
}

#[test]
fn mutated_frames_are_passed_untouched_or_sent_well_formed() {
    let (tb, _st) = configured_testbed(65536).unwrap();
    let corpus = corpus(&tb);
    let mut r = Lcg(0x5eed);
    let (mut passed, mut sent, mut dropped) = (0u32, 0u32, 0u32);
    for n in 0..MUTANTS {
        let base = &corpus[n % corpus.len()];
        let mut f = mutate(&mut r, base);
        if n % 2 == 0 {
            repair(&mut f);
        }
        let valid = checksums_valid(&f);
        let (v, out) = tb.run(&f).unwrap();
        let what = format!("mutant {n} of corpus frame {}", n % corpus.len());
        match v {
            XDP_PASS => {
                assert_eq!(out, f, "{what}: passed but changed");
                passed += 1;
            }
            XDP_TX | XDP_REDIRECT => {
                assert_well_formed(&out, valid, &what);
                sent += 1;
            }
            XDP_ABORTED => panic!("{what}: aborted"),
            _ => dropped += 1,
        }
    }
    // The corpus reaches every verdict (a fuzzer that only ever passes proves nothing).
    assert!(
        passed > 0 && sent > 0 && dropped > 0,
        "{passed} {sent} {dropped}"
    );
    // Unmutated, every corpus frame is sent (or answered) with valid checksums; a frame too
    // big for t0 may be dropped instead, the answers' rate limit being spent by now.
    for (i, f) in corpus.iter().enumerate() {
        let (v, out) = tb.run(f).unwrap();
        if v == XDP_DROP && f.len() > 1514 {
            assert_eq!(&out, f, "corpus frame {i}: dropped, not half-built");
            continue;
        }
        assert!(
            v == XDP_TX || v == XDP_REDIRECT,
            "corpus frame {i}: verdict {v}"
        );
        assert_well_formed(&out, true, &format!("corpus frame {i}"));
    }
}

#[test]
fn checksum_helpers_agree_with_etherparse() {
    let f = packet::tcp(
        host_mac(2),
        LB_MAC,
        sa("10.0.0.1:1"),
        sa("10.0.0.2:2"),
        1,
        0,
        packet::SYN,
        b"abc",
    );
    assert!(checksums_valid(&f));
    let mut g = f.clone();
    g[40] ^= 1;
    assert!(!checksums_valid(&g));
    repair(&mut g);
    assert!(checksums_valid(&g));
    let u = packet::udp(
        host_mac(2),
        LB_MAC,
        sa("[fd77::1]:1"),
        sa("[fd77::2]:2"),
        b"abc",
    );
    assert!(checksums_valid(&u));
}
