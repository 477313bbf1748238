//! ICMP errors about balanced flows (RFC 5508 behaviour for full NAT, forwarding for DSR).
//!
//! An error quotes the packet that caused it: its IP header and at least 8 bytes of L4
//! (RFC 792, RFC 4443). That packet left the balancer (or a DSR backend), and the error goes
//! back to its source, so the quoted 5-tuple reversed is the key of the flow entry for the
//! direction the error travels in, and that entry's rewrite is the error's rewrite:
//!
//! - from the backend side to the SNAT address, about a packet we sent to a backend: the
//!   reply entry; the error leaves from the VIP to the client, about the client's packet to
//!   the VIP;
//! - from the client side to the VIP, about a reply we sent to the client: the forward entry;
//!   the error leaves from the SNAT address to the backend, about the backend's packet;
//! - to the VIP about a DSR backend's reply: the DSR forward entry; the error goes to that
//!   backend unchanged (only the MACs).
//!
//! Outer and inner headers, the inner IPv4 and L4 checksums (when quoted) and the ICMP
//! checksum are updated incrementally. Everything read here is untrusted: lengths are checked
//! against the frame, the quoted packet must be addressed from the error's destination, and
//! anything else is passed untouched.

use balancer_common::{Flow, FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{checksum, error::Error, frame::Frame, headers::*, parse::Pkt};

/// ICMP and ICMPv6 header: type, code, checksum, 4 type-specific bytes (unused, MTU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    /// Type.
    pub kind: u8,
    /// Code.
    pub code: u8,
    /// Checksum (ICMPv6: with the IPv6 pseudo-header).
    pub csum: u16,
    /// Unused, or the next-hop MTU (ICMPv4 16 bits in the low word, ICMPv6 32 bits).
    pub rest: [u16; 2],
}

/// The first 8 bytes of a quoted TCP or UDP header: all an error has to carry.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuotedL4 {
    sport: u16,
    dport: u16,
    /// TCP: sequence number. UDP: length and checksum.
    rest: [u16; 2],
}

/// ICMPv4 destination unreachable (code 4: fragmentation needed).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv4 code "fragmentation needed and DF set".
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv4 time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMPv6 destination unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMPv6 packet too big.
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMPv6 time exceeded.
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// IPv4 fragment offset mask, wire order (MF may be set: a first fragment carries the ports).
const IP_OFFSET: u16 = u16::from_ne_bytes(0x1fffu16.to_be_bytes());
/// Bytes of L4 an error must quote (ports, and the UDP checksum).
const QUOTED_L4_MIN: usize = 8;
/// Offset of the TCP checksum in a TCP header.
const TCP_CSUM_OFFSET: usize = 16;

/// An ICMP error about a TCP or UDP packet, checked against the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Related {
    /// Flow-table key of the flow the error travels with: the quoted 5-tuple reversed.
    pub key: FlowKey,
    /// Offset of the quoted IP header.
    inner_l3: usize,
    /// Offset of the quoted L4 header.
    inner_l4: usize,
    /// The quoted TCP header reaches its checksum (a UDP one always does).
    inner_csum: bool,
}

/// Is this ICMP type one whose quoted packet is translated?
#[inline(always)]
pub const fn is_translated(v6: bool, kind: u8) -> bool {
    if v6 {
        matches!(
            kind,
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEEDED
        )
    } else {
        matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
    }
}

/// Parses the ICMP message of a frame `parse` marked as ICMP: an error about a TCP or UDP
/// packet gives the key of its flow; anything else is [`Error::IcmpUnrelated`] (echo,
/// other types, quoted protocols that are not balanced) or [`Error::IcmpMalformed`]
/// (lengths that do not fit, a quoted header the balancer never sends, a quoted packet
/// that was not addressed from the error's destination).
#[inline(never)]
pub fn parse_error<F: Frame>(f: &F, p: &Pkt) -> Result<Related, Error> {
    let icmp: *const IcmpHdr = f.ptr_at(p.l4off)?;
    // SAFETY (all header reads): bounds-checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if !is_translated(p.v6, kind) {
        return Err(Error::IcmpUnrelated);
    }
    let inner_l3 = p.l4off + size_of::<IcmpHdr>();
    let mut key = FlowKey::default();
    let inner_l4;
    // Bytes of the ICMP message after the quoted IP header, from the outer length field.
    let quoted_l4;
    if p.v6 {
        let outer: *const Ipv6Hdr = f.ptr_at(p.l3off)?;
        let outer = unsafe { &*outer };
        let msg = u16::from_be(outer.payload_len) as usize;
        if p.l4off + msg > f.len() || msg < size_of::<IcmpHdr>() + size_of::<Ipv6Hdr>() {
            return Err(Error::IcmpMalformed);
        }
        let inner: *const Ipv6Hdr = f.ptr_at(inner_l3)?;
        let inner = unsafe { &*inner };
        if inner.vtc_flow[0] & u16::from_ne_bytes([0xf0, 0]) != u16::from_ne_bytes([0x60, 0]) {
            return Err(Error::IcmpMalformed);
        }
        if inner.next_hdr != PROTO_TCP && inner.next_hdr != PROTO_UDP {
            return Err(Error::IcmpUnrelated);
        }
        if outer.dst != inner.src {
            return Err(Error::IcmpMalformed);
        }
        key.proto = inner.next_hdr;
        key.src = bytes(inner.dst);
        key.dst = bytes(inner.src);
        inner_l4 = inner_l3 + size_of::<Ipv6Hdr>();
        quoted_l4 = msg - size_of::<IcmpHdr>() - size_of::<Ipv6Hdr>();
    } else {
        let outer: *const Ipv4Hdr = f.ptr_at(p.l3off)?;
        let outer = unsafe { &*outer };
        let tot = u16::from_be(outer.tot_len) as usize;
        let head = size_of::<Ipv4Hdr>() + size_of::<IcmpHdr>() + size_of::<Ipv4Hdr>();
        if p.l3off + tot > f.len() || tot < head {
            return Err(Error::IcmpMalformed);
        }
        let inner: *const Ipv4Hdr = f.ptr_at(inner_l3)?;
        let inner = unsafe { &*inner };
        // The balancer never sends IPv4 options or later fragments, so such a quote is not
        // about one of its packets.
        if inner.version_ihl != 0x45 || inner.frag & IP_OFFSET != 0 {
            return Err(Error::IcmpMalformed);
        }
        if inner.proto != PROTO_TCP && inner.proto != PROTO_UDP {
            return Err(Error::IcmpUnrelated);
        }
        if outer.dst != inner.src {
            return Err(Error::IcmpMalformed);
        }
        key.proto = inner.proto;
        key.src = bytes(v4_mapped(inner.dst));
        key.dst = bytes(v4_mapped(inner.src));
        inner_l4 = inner_l3 + size_of::<Ipv4Hdr>();
        quoted_l4 = tot - head;
    }
    if quoted_l4 < QUOTED_L4_MIN {
        return Err(Error::IcmpMalformed);
    }
    let l4: *const QuotedL4 = f.ptr_at(inner_l4)?;
    // SAFETY: bounds-checked.
    let l4 = unsafe { &*l4 };
    key.sport = l4.dport;
    key.dport = l4.sport;
    let inner_csum = key.proto == PROTO_UDP || quoted_l4 >= TCP_CSUM_OFFSET + 2;
    Ok(Related {
        key,
        inner_l3,
        inner_l4,
        inner_csum,
    })
}

/// Replaces `n` words at `pkt` by the words at `new`, adding the change to `acc`. Volatile
/// accesses, word by word: the compiler cannot load every address word up front and spill
/// them (that made this step's stack frame 416 bytes, past the BPF limit with its callers).
///
/// # Safety
/// `pkt` and `new` valid for `n` aligned words.
#[inline(always)]
unsafe fn replace_words(mut acc: u32, pkt: *mut u16, new: *const u16, n: usize) -> u32 {
    let mut i = 0;
    while i < n {
        // SAFETY: in bounds (caller).
        unsafe {
            let old = core::ptr::read_volatile(pkt.add(i));
            let w = core::ptr::read_volatile(new.add(i));
            acc = checksum::diff16(acc, old, w);
            core::ptr::write_volatile(pkt.add(i), w);
        }
        i += 1;
    }
    acc
}

/// Rewrites an ICMP error with the flow entry of the direction it travels in: outer source
/// and destination become the entry's new source and destination (so an error from a router
/// reaches the client from the VIP, as with IPVS), the quoted packet's source becomes the
/// entry's new destination and port, its destination the entry's new source and port. All
/// pointers are taken before the first write, so a failure leaves the frame untouched.
#[inline(never)]
pub fn translate<F: Frame>(f: &F, p: &Pkt, r: &Related, flow: &Flow) -> Result<(), Error> {
    let icmp: *mut IcmpHdr = f.ptr_at(p.l4off)?;
    let l4: *mut QuotedL4 = f.ptr_at(r.inner_l4)?;
    let csum_off = if r.key.proto == PROTO_TCP {
        r.inner_l4 + TCP_CSUM_OFFSET
    } else {
        r.inner_l4 + 6
    };
    let l4csum: Option<*mut u16> = if r.inner_csum {
        Some(f.ptr_at(csum_off)?)
    } else {
        None
    };
    // The flow's addresses as words (a map value or a `Flow`: 4-byte aligned).
    let new_src = flow.new_src.as_ptr() as *const u16;
    let new_dst = flow.new_dst.as_ptr() as *const u16;
    // ICMP checksum change: everything rewritten inside the message (and, for ICMPv6, the
    // outer addresses of its pseudo-header).
    let mut icmp_diff;
    // Quoted L4 checksum change: the quoted addresses (pseudo-header) and ports.
    let mut l4_diff;
    if p.v6 {
        let outer: *mut Ipv6Hdr = f.ptr_at(p.l3off)?;
        let inner: *mut Ipv6Hdr = f.ptr_at(r.inner_l3)?;
        // SAFETY: bounds-checked; all pointers taken above; 8 words per address.
        unsafe {
            icmp_diff = replace_words(0, (*outer).src.as_mut_ptr(), new_src, 8);
            icmp_diff = replace_words(icmp_diff, (*outer).dst.as_mut_ptr(), new_dst, 8);
            l4_diff = replace_words(0, (*inner).src.as_mut_ptr(), new_dst, 8);
            l4_diff = replace_words(l4_diff, (*inner).dst.as_mut_ptr(), new_src, 8);
        }
        icmp_diff += l4_diff;
    } else {
        let outer: *mut Ipv4Hdr = f.ptr_at(p.l3off)?;
        let inner: *mut Ipv4Hdr = f.ptr_at(r.inner_l3)?;
        // SAFETY: bounds-checked; all pointers taken above; an IPv4 address is the last two
        // words of the 16-byte form.
        unsafe {
            let (s4, d4) = (new_src.add(6), new_dst.add(6));
            let mut ip_diff = replace_words(0, (*outer).src.as_mut_ptr(), s4, 2);
            ip_diff = replace_words(ip_diff, (*outer).dst.as_mut_ptr(), d4, 2);
            (*outer).csum = checksum::apply((*outer).csum, ip_diff);
            l4_diff = replace_words(0, (*inner).src.as_mut_ptr(), d4, 2);
            l4_diff = replace_words(l4_diff, (*inner).dst.as_mut_ptr(), s4, 2);
            let old = (*inner).csum;
            let csum = checksum::apply(old, l4_diff);
            icmp_diff = checksum::diff16(l4_diff, old, csum);
            (*inner).csum = csum;
        }
    }
    // SAFETY: bounds-checked above.
    let (icmp, l4) = unsafe { (&mut *icmp, &mut *l4) };
    let port_diff = checksum::diff16(
        checksum::diff16(0, l4.sport, flow.new_dport),
        l4.dport,
        flow.new_sport,
    );
    l4.sport = flow.new_dport;
    l4.dport = flow.new_sport;
    l4_diff += port_diff;
    icmp_diff += port_diff;
    if let Some(l4csum) = l4csum {
        // SAFETY: bounds-checked above.
        let l4csum = unsafe { &mut *l4csum };
        let old = *l4csum;
        let new = if r.key.proto == PROTO_UDP {
            checksum::apply_udp(old, l4_diff)
        } else {
            checksum::apply(old, l4_diff)
        };
        icmp_diff = checksum::diff16(icmp_diff, old, new);
        *l4csum = new;
    }
    icmp.csum = checksum::apply(icmp.csum, icmp_diff);
    Ok(())
}

#[cfg(test)]
mod tests;
