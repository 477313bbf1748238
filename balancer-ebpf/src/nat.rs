//! The full-NAT rewrite: addresses and ports replaced, checksums updated incrementally.

use balancer_common::PROTO_TCP;

use crate::{checksum, error::Error, frame::Frame, headers::*, parse::Pkt};

/// Rewrites a parsed TCP or UDP packet's addresses (16-byte form; the last two words for
/// IPv4) and ports (network order), updating the IPv4 header and L4 checksums.
#[inline(always)]
pub fn rewrite<F: Frame>(
    f: &F,
    p: &Pkt,
    src: &[u16; 8],
    dst: &[u16; 8],
    sport: u16,
    dport: u16,
) -> Result<(), Error> {
    let mut l4diff;
    if p.v6 {
        let ip: *mut Ipv6Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        l4diff = checksum::diff_words(0, &ip.src, src);
        l4diff = checksum::diff_words(l4diff, &ip.dst, dst);
        ip.src = *src;
        ip.dst = *dst;
    } else {
        let ip: *mut Ipv4Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        let (s4, d4) = (v4_of(src), v4_of(dst));
        l4diff = checksum::diff_words(0, &ip.src, &s4);
        l4diff = checksum::diff_words(l4diff, &ip.dst, &d4);
        ip.csum = checksum::apply(ip.csum, l4diff);
        ip.src = s4;
        ip.dst = d4;
    }
    if p.key.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = f.ptr_at(p.l4off)?;
        // SAFETY: bounds-checked.
        let tcp = unsafe { &mut *tcp };
        l4diff = checksum::diff16(l4diff, tcp.sport, sport);
        l4diff = checksum::diff16(l4diff, tcp.dport, dport);
        tcp.csum = checksum::apply(tcp.csum, l4diff);
        tcp.sport = sport;
        tcp.dport = dport;
    } else {
        let udp: *mut UdpHdr = f.ptr_at(p.l4off)?;
        // SAFETY: bounds-checked.
        let udp = unsafe { &mut *udp };
        l4diff = checksum::diff16(l4diff, udp.sport, sport);
        l4diff = checksum::diff16(l4diff, udp.dport, dport);
        udp.csum = checksum::apply_udp(udp.csum, l4diff);
        udp.sport = sport;
        udp.dport = dport;
    }
    Ok(())
}

/// Writes the next hop's MACs into the Ethernet header.
#[inline(always)]
pub fn set_macs<F: Frame>(f: &F, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), Error> {
    let eth: *mut EthHdr = f.ptr_at(0)?;
    // SAFETY: bounds-checked.
    unsafe {
        (*eth).dst = dmac;
        (*eth).src = smac;
    }
    Ok(())
}
