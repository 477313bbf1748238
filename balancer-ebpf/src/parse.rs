//! Parsing: Ethernet (one optional 802.1Q tag), IPv4 without options or IPv6 without extension
//! headers, then TCP, UDP or ICMP. Everything read here is untrusted.

use core::mem::size_of;

use balancer_common::{FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{error::Error, frame::Frame, headers::*};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// What the parser learnt of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pkt {
    /// Offset of the IP header.
    pub l3off: usize,
    /// Offset of the L4 header.
    pub l4off: usize,
    /// IPv6.
    pub v6: bool,
    /// The frame carries an 802.1Q tag.
    pub vlan: bool,
    /// The tag's VLAN id (0: untagged, or a priority tag).
    pub vid: u16,
    /// ICMP (v4) or ICMPv6: `key` has no ports and the L4 header is not read yet.
    pub icmp: bool,
    /// TCP flags (0 for UDP and ICMP).
    pub tcp_flags: u8,
    /// The 5-tuple as it arrived.
    pub key: FlowKey,
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
}

/// Parses the headers of a frame, or says why they are not balanced.
#[inline(always)]
pub fn parse<F: Frame>(f: &F) -> Result<Pkt, Error> {
    let eth: *const EthHdr = f.ptr_at(0)?;
    let mut l3off = size_of::<EthHdr>();
    // SAFETY (all header reads): bounds-checked by ptr_at.
    let (mut proto, src_mac, dst_mac) = unsafe { ((*eth).proto, (*eth).src, (*eth).dst) };
    let mut vlan = false;
    let mut vid = 0;
    if proto == ETH_P_8021Q {
        let tag: *const VlanHdr = f.ptr_at(l3off)?;
        let tci;
        (proto, tci) = unsafe { ((*tag).proto, (*tag).tci) };
        vid = u16::from_be(tci) & VLAN_VID_MASK;
        l3off += size_of::<VlanHdr>();
        vlan = true;
    }
    let mut key = FlowKey::default();
    let l4off;
    let v6;
    // Bytes of L4 the IP header says there are; checked against the frame so that nothing
    // is forwarded whose lengths do not hold up.
    let l4len;
    if proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = f.ptr_at(l3off)?;
        let ip = unsafe { &*ip };
        if ip.version_ihl != 0x45 || ip.frag & IP_MF_OFFSET != 0 {
            return Err(Error::UnsupportedIp);
        }
        key.proto = ip.proto;
        key.src = bytes(v4_mapped(ip.src));
        key.dst = bytes(v4_mapped(ip.dst));
        l4off = l3off + size_of::<Ipv4Hdr>();
        v6 = false;
        let tot = u16::from_be(ip.tot_len) as usize;
        if tot < size_of::<Ipv4Hdr>() || l3off + tot > f.len() {
            return Err(Error::Truncated);
        }
        l4len = tot - size_of::<Ipv4Hdr>();
    } else if proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = f.ptr_at(l3off)?;
        let ip = unsafe { &*ip };
        if ip.vtc_flow[0] & u16::from_ne_bytes([0xf0, 0]) != u16::from_ne_bytes([0x60, 0]) {
            return Err(Error::UnsupportedIp);
        }
        key.proto = ip.next_hdr;
        key.src = bytes(ip.src);
        key.dst = bytes(ip.dst);
        l4off = l3off + size_of::<Ipv6Hdr>();
        v6 = true;
        l4len = u16::from_be(ip.payload_len) as usize;
        if l4off + l4len > f.len() {
            return Err(Error::Truncated);
        }
    } else {
        return Err(Error::NotIp);
    }
    let mut tcp_flags = 0;
    let mut icmp = false;
    if key.proto == PROTO_TCP {
        let tcp: *const TcpHdr = f.ptr_at(l4off)?;
        let tcp = unsafe { &*tcp };
        if tcp.doff >> 4 < 5 || ((tcp.doff >> 4) as usize) * 4 > l4len {
            return Err(Error::Truncated);
        }
        key.sport = tcp.sport;
        key.dport = tcp.dport;
        tcp_flags = tcp.flags;
    } else if key.proto == PROTO_UDP {
        let udp: *const UdpHdr = f.ptr_at(l4off)?;
        let udp = unsafe { &*udp };
        let len = u16::from_be(udp.len) as usize;
        if len < size_of::<UdpHdr>() || len > l4len {
            return Err(Error::Truncated);
        }
        key.sport = udp.sport;
        key.dport = udp.dport;
    } else if key.proto == if v6 { PROTO_ICMPV6 } else { PROTO_ICMP } {
        icmp = true;
    } else {
        return Err(Error::NotTcpUdp);
    }
    Ok(Pkt {
        l3off,
        l4off,
        v6,
        vlan,
        vid,
        icmp,
        tcp_flags,
        key,
        src_mac,
        dst_mac,
    })
}
