//! The too-big answer against frames built independently with etherparse.

use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4};
use proptest::prelude::*;

use super::*;
use crate::{frame::SliceFrame, parse::parse};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const HEADROOM: usize = 64;

fn big_tcp(v6: bool, payload: usize, df: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let b = if v6 {
        eth.ipv6(
            [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            64,
        )
    } else {
        let mut h = etherparse::Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::TCP,
            [10, 77, 0, 2],
            [10, 77, 0, 100],
        )
        .unwrap();
        h.dont_fragment = df;
        eth.ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
    };
    let data: Vec<u8> = (0..payload).map(|i| (i * 13 + 1) as u8).collect();
    let mut out = Vec::new();
    b.tcp(40000, 7002, 77, 64240)
        .ack(5)
        .write(&mut out, &data)
        .unwrap();
    out
}

/// The error etherparse builds: from the packet's destination to its source, quoting its
/// first `quote_len` bytes.
fn expected(v6: bool, orig: &[u8], mtu: u32) -> Vec<u8> {
    let ip = &orig[14..];
    let q = quote_len(v6, ip.len());
    let eth = PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC);
    let mut out = Vec::new();
    if v6 {
        let (src, dst): ([u8; 16], [u8; 16]) = (
            ip[8..24].try_into().unwrap(),
            ip[24..40].try_into().unwrap(),
        );
        eth.ipv6(dst, src, 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu })
            .write(&mut out, &ip[..q])
            .unwrap();
    } else {
        let (src, dst): ([u8; 4], [u8; 4]) = (
            ip[12..16].try_into().unwrap(),
            ip[16..20].try_into().unwrap(),
        );
        let mut h =
            etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, dst, src).unwrap();
        h.dont_fragment = false;
        h.dscp = etherparse::IpDscp::try_new(0x30).unwrap();
        eth.ip(etherparse::IpHeaders::Ipv4(h, Default::default()))
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

fn answer(frame: &[u8], mtu: u32) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; HEADROOM];
    buf.extend_from_slice(frame);
    let mut f = SliceFrame::with_headroom(&mut buf, HEADROOM);
    let p = parse(&f)?;
    let t = prepare(&f, &p)?;
    build(&mut f, &t, mtu)?;
    let (start, len) = f.window();
    Ok(buf[start..start + len].to_vec())
}

#[test]
fn v4_packet_with_df_gets_fragmentation_needed() {
    let orig = big_tcp(false, 1460, true);
    let out = answer(&orig, 1300).unwrap();
    assert_eq!(out, expected(false, &orig, 1300));
    assert_eq!(out.len(), 14 + 28 + 512, "fits 576 bytes of IP");
}

#[test]
fn v4_packet_without_df_is_not_answered() {
    let orig = big_tcp(false, 1460, false);
    assert_eq!(answer(&orig, 1300).unwrap_err(), Error::TooBigNoDf);
}

#[test]
fn v6_packet_gets_packet_too_big() {
    let orig = big_tcp(true, 1440, true);
    let out = answer(&orig, 1400).unwrap();
    assert_eq!(out, expected(true, &orig, 1400));
    assert_eq!(out.len(), 14 + 48 + 1216, "fits 1280 bytes of IP");
    // An MTU below the IPv6 minimum is announced as the minimum.
    assert_eq!(answer(&orig, 600).unwrap(), expected(true, &orig, 1280));
}

#[test]
fn a_tagged_frame_keeps_its_tag() {
    let tag = |f: &[u8]| {
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        t.extend_from_slice(&f[12..]);
        t
    };
    let orig = big_tcp(false, 1460, true);
    let out = answer(&tag(&orig), 1500).unwrap();
    assert_eq!(out, tag(&expected(false, &orig, 1500)));
}

#[test]
fn quote_lengths() {
    assert_eq!(quote_len(false, 1500), 512);
    assert_eq!(quote_len(false, 100), 64);
    assert_eq!(quote_len(true, 1500), 1216);
    assert_eq!(quote_len(true, 9000), 1216);
    assert!(quote_len(true, 1232) / SUM_CHUNK <= SUM_CHUNKS_MAX);
    assert!(!needs_mtu_check(false, 576) && needs_mtu_check(false, 577));
    assert!(!needs_mtu_check(true, 1280) && needs_mtu_check(true, 1281));
}

#[test]
fn token_bucket_allows_a_burst_then_the_rate() {
    let mut b = TokenBucket::default();
    let s = 1_000_000_000u64;
    // Starts empty: a full second accrues the burst.
    assert!(!b.take(0, 10, 5));
    let granted = (0..20).filter(|_| b.take(s, 10, 5)).count();
    assert_eq!(granted, 5, "burst");
    // A tenth of a second later, one more.
    assert!(b.take(s + s / 10, 10, 5));
    assert!(!b.take(s + s / 10, 10, 5));
    // A clock that goes back grants nothing.
    assert!(!b.take(s, 10, 5));
    assert!(!b.take(0, 0, 5), "rate 0 never grants");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any payload size and MTU: the answer equals etherparse's and fits the family minimum.
    #[test]
    fn any_size_any_mtu(v6 in any::<bool>(), payload in 600usize..2000, mtu in 0u32..70000) {
        let orig = big_tcp(v6, payload, true);
        let out = answer(&orig, mtu).unwrap();
        let shown = if v6 { mtu.max(1280) } else { mtu.clamp(68, 0xffff) };
        prop_assert_eq!(&out, &expected(v6, &orig, shown));
        let limit = if v6 { 1280 } else { 576 };
        prop_assert!(out.len() - 14 <= limit);
    }

    /// Over a long run the bucket never grants more than burst + rate × time.
    #[test]
    fn token_bucket_bound(steps in proptest::collection::vec(0u64..50_000_000, 1..400)) {
        let mut b = TokenBucket::default();
        let mut now = 0u64;
        let mut granted = 0u64;
        for s in steps {
            now += s;
            granted += b.take(now, 100, 10) as u64;
        }
        prop_assert!(granted <= 10 + now / 10_000_000);
    }
}
