//! Fixed-size wire headers. Every field is a byte or a 16-bit word in memory (wire) order, so
//! each struct has an alignment of at most 2 (packet data is always 2-byte aligned) and no
//! padding. Values read from these are untrusted: they come from the packet.

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType, wire order.
    pub proto: u16,
}

/// 802.1Q tag that follows the MACs when the EtherType is 0x8100.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    /// Tag control information.
    pub tci: u16,
    /// Inner EtherType, wire order.
    pub proto: u16,
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version and header length.
    pub version_ihl: u8,
    /// DSCP/ECN.
    pub tos: u8,
    /// Total length.
    pub tot_len: u16,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset.
    pub frag: u16,
    /// Time to live.
    pub ttl: u8,
    /// L4 protocol.
    pub proto: u8,
    /// Header checksum.
    pub csum: u16,
    /// Source address.
    pub src: [u16; 2],
    /// Destination address.
    pub dst: [u16; 2],
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label.
    pub vtc_flow: [u16; 2],
    /// Payload length.
    pub payload_len: u16,
    /// Next header.
    pub next_hdr: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Source address.
    pub src: [u16; 8],
    /// Destination address.
    pub dst: [u16; 8],
}

/// TCP header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: [u16; 2],
    /// Acknowledgement number.
    pub ack: [u16; 2],
    /// Data offset (high nibble).
    pub doff: u8,
    /// Flags.
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Checksum.
    pub csum: u16,
    /// Urgent pointer.
    pub urg: u16,
}

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Length.
    pub len: u16,
    /// Checksum (0 on IPv4: none).
    pub csum: u16,
}

/// EtherType IPv4, wire order.
pub const ETH_P_IP: u16 = u16::from_ne_bytes(0x0800u16.to_be_bytes());
/// EtherType IPv6, wire order.
pub const ETH_P_IPV6: u16 = u16::from_ne_bytes(0x86ddu16.to_be_bytes());
/// EtherType 802.1Q, wire order.
pub const ETH_P_8021Q: u16 = u16::from_ne_bytes(0x8100u16.to_be_bytes());
/// The VLAN id bits of an 802.1Q TCI (host order).
pub const VLAN_VID_MASK: u16 = 0x0fff;
/// IPv4 "more fragments" flag and fragment offset mask, wire order.
pub const IP_MF_OFFSET: u16 = u16::from_ne_bytes(0x3fffu16.to_be_bytes());

/// TCP FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;

/// Words of an IPv4 address in its 16-byte (v4-mapped) form: the last two of eight.
#[inline(always)]
pub fn v4_mapped(w: [u16; 2]) -> [u16; 8] {
    [0, 0, 0, 0, 0, 0xffff, w[0], w[1]]
}

/// Adds one to a 32-bit big-endian number held in two memory-order words, plus `n`.
#[inline(always)]
pub fn seq_add(w: [u16; 2], n: u32) -> [u16; 2] {
    let hi = u16::from_be_bytes(w[0].to_ne_bytes()) as u32;
    let lo = u16::from_be_bytes(w[1].to_ne_bytes()) as u32;
    let v = ((hi << 16) | lo).wrapping_add(n);
    [
        u16::from_ne_bytes(((v >> 16) as u16).to_be_bytes()),
        u16::from_ne_bytes((v as u16).to_be_bytes()),
    ]
}

/// An address's sixteen bytes as eight memory-order words.
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u16; 8] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute(*a) }
}

/// Eight memory-order words as an address's sixteen bytes.
#[inline(always)]
pub fn bytes(w: [u16; 8]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute(w) }
}

/// The IPv4 address (two words) of a v4-mapped address.
#[inline(always)]
pub fn v4_of(w: &[u16; 8]) -> [u16; 2] {
    [w[6], w[7]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn header_sizes() {
        assert_eq!(size_of::<EthHdr>(), 14);
        assert_eq!(size_of::<VlanHdr>(), 4);
        assert_eq!(size_of::<Ipv4Hdr>(), 20);
        assert_eq!(size_of::<Ipv6Hdr>(), 40);
        assert_eq!(size_of::<TcpHdr>(), 20);
        assert_eq!(size_of::<UdpHdr>(), 8);
    }

    #[test]
    fn seq_add_carries() {
        let w = [
            u16::from_ne_bytes(0x0000u16.to_be_bytes()),
            u16::from_ne_bytes(0xffffu16.to_be_bytes()),
        ];
        let r = seq_add(w, 1);
        assert_eq!(u16::from_be_bytes(r[0].to_ne_bytes()), 1);
        assert_eq!(u16::from_be_bytes(r[1].to_ne_bytes()), 0);
    }

    #[test]
    fn v4_mapped_prefix() {
        let m = v4_mapped([1, 2]);
        assert_eq!(m[5], 0xffff);
        assert_eq!(&m[6..], &[1, 2]);
    }
}
