//! "Fragmentation needed" (ICMPv4, RFC 1191) and "packet too big" (ICMPv6, RFC 8201) built in
//! place from a packet that does not fit its egress link, and the per-CPU token bucket that
//! limits how many are sent.
//!
//! The frame's tail is cut so the error fits the minimum MTU of its family (576 / 1280
//! bytes), its head grows by the new IP and ICMP headers, and it goes back to the sender's
//! MAC out of the interface it came in on, from the address the packet was sent to (a VIP or
//! the SNAT address: both are the balancer's).

use balancer_common::Addr;

use crate::{
    checksum,
    error::Error,
    frame::Frame,
    headers::*,
    icmp::{ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMPV6_PKT_TOOBIG, IcmpHdr},
    parse::{PROTO_ICMP, PROTO_ICMPV6, Pkt},
};

/// The quote is summed in chunks of this many bytes (the BPF checksum helper takes
/// multiples of 4 from a bounds-checked pointer), so its length is a multiple of it.
pub const SUM_CHUNK: usize = 64;
/// Most chunks in a quote: 1280 − 48 rounded down is 19 chunks.
pub const SUM_CHUNKS_MAX: usize = 19;
/// Largest ICMPv4 error (RFC 1812 §4.3.2.3).
const V4_ERROR_MAX: usize = 576;
/// Largest ICMPv6 error: the IPv6 minimum MTU (RFC 4443 §2.4).
const V6_ERROR_MAX: usize = 1280;
/// IPv4 "don't fragment", wire order.
const IP_DF: u16 = u16::from_ne_bytes(0x4000u16.to_be_bytes());
/// Smallest IPv4 MTU (RFC 791): no answer claims less.
const V4_MTU_MIN: u32 = 68;
/// Smallest IPv6 MTU.
const V6_MTU_MIN: u32 = 1280;

/// Bytes of the original packet an error about a packet of `ip_len` bytes quotes.
#[inline(always)]
pub const fn quote_len(v6: bool, ip_len: usize) -> usize {
    let room = if v6 {
        V6_ERROR_MAX - size_of::<Ipv6Hdr>() - size_of::<IcmpHdr>()
    } else {
        V4_ERROR_MAX - size_of::<Ipv4Hdr>() - size_of::<IcmpHdr>()
    };
    let q = if ip_len < room { ip_len } else { room };
    q - q % SUM_CHUNK
}

/// Is a packet of `ip_len` bytes of IP above what every link of its family carries, so that
/// the egress MTU has to be checked? Smaller packets always fit (IPv4 links below 576 bytes
/// are not checked).
#[inline(always)]
pub const fn needs_mtu_check(v6: bool, ip_len: usize) -> bool {
    ip_len > if v6 { V6_ERROR_MAX } else { V4_ERROR_MAX }
}

/// What is read from a packet before its frame is reshaped.
#[derive(Clone, Copy)]
pub struct TooBig {
    l3off: usize,
    v6: bool,
    tag: Option<VlanHdr>,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    /// The packet's source: the error's destination.
    src: Addr,
    /// The packet's destination: the error's source.
    dst: Addr,
    ip_len: usize,
}

/// Reads what the error needs. An IPv4 packet without DF may be fragmented, which XDP cannot
/// do, and must not be answered: [`Error::TooBigNoDf`].
#[inline(always)]
pub fn prepare<F: Frame>(f: &F, p: &Pkt) -> Result<TooBig, Error> {
    let ip_len = if p.v6 {
        let ip: *const Ipv6Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        u16::from_be(unsafe { (*ip).payload_len }) as usize + size_of::<Ipv6Hdr>()
    } else {
        let ip: *const Ipv4Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &*ip };
        if ip.frag & IP_DF == 0 {
            return Err(Error::TooBigNoDf);
        }
        u16::from_be(ip.tot_len) as usize
    };
    if p.l3off + ip_len > f.len() || quote_len(p.v6, ip_len) == 0 {
        return Err(Error::Truncated);
    }
    let tag = if p.vlan {
        let t: *const VlanHdr = f.ptr_at(size_of::<EthHdr>())?;
        // SAFETY: bounds-checked.
        Some(unsafe { *t })
    } else {
        None
    };
    Ok(TooBig {
        l3off: p.l3off,
        v6: p.v6,
        tag,
        src_mac: p.src_mac,
        dst_mac: p.dst_mac,
        src: p.key.src,
        dst: p.key.dst,
        ip_len,
    })
}

/// Turns the frame into the error about it, announcing `mtu` (raised to the family's minimum).
/// Once this starts the frame is changed: a failure must drop it, never pass it.
#[inline(always)]
pub fn build<F: Frame>(f: &mut F, t: &TooBig, mtu: u32) -> Result<(), Error> {
    let q = quote_len(t.v6, t.ip_len);
    let hdr = if t.v6 {
        size_of::<Ipv6Hdr>() + size_of::<IcmpHdr>()
    } else {
        size_of::<Ipv4Hdr>() + size_of::<IcmpHdr>()
    };
    let keep = t.l3off + q;
    let len = f.len();
    if len < keep {
        return Err(Error::Truncated);
    }
    if len > keep {
        f.shrink(len - keep)?;
    }
    f.grow_head(hdr)?;
    let eth: *mut EthHdr = f.ptr_at(0)?;
    let ip_proto = if t.v6 { ETH_P_IPV6 } else { ETH_P_IP };
    // SAFETY (all header writes): bounds-checked by ptr_at.
    unsafe {
        *eth = EthHdr {
            dst: t.src_mac,
            src: t.dst_mac,
            proto: if t.tag.is_some() {
                ETH_P_8021Q
            } else {
                ip_proto
            },
        };
    }
    if let Some(tag) = t.tag {
        let v: *mut VlanHdr = f.ptr_at(size_of::<EthHdr>())?;
        unsafe {
            *v = VlanHdr {
                tci: tag.tci,
                proto: ip_proto,
            };
        }
    }
    // The IP and ICMP headers are written through one bounds-checked pointer at constant
    // offsets (the verifier loses the range of a second pointer at a variable offset).
    let (src, dst) = (words(&t.dst), words(&t.src));
    let mut sum;
    if t.v6 {
        let mtu = if mtu < V6_MTU_MIN { V6_MTU_MIN } else { mtu };
        let h: *mut V6Error = f.ptr_at(t.l3off)?;
        let msg = (size_of::<IcmpHdr>() + q) as u16;
        // SAFETY: bounds-checked.
        let h = unsafe { &mut *h };
        h.ip = Ipv6Hdr {
            vtc_flow: [u16::from_ne_bytes([0x60, 0]), 0],
            payload_len: msg.to_be(),
            next_hdr: PROTO_ICMPV6,
            hop_limit: 64,
            src,
            dst,
        };
        h.icmp = IcmpHdr {
            kind: ICMPV6_PKT_TOOBIG,
            code: 0,
            csum: 0,
            rest: [
                u16::from_ne_bytes(((mtu >> 16) as u16).to_be_bytes()),
                u16::from_ne_bytes((mtu as u16).to_be_bytes()),
            ],
        };
        sum = checksum::sum_words(0, &src);
        sum = checksum::sum_words(sum, &dst);
        sum += checksum::be_word(msg) as u32 + checksum::be_word(PROTO_ICMPV6 as u16) as u32;
        // SAFETY: IcmpHdr is 8 bytes of plain data.
        let hw: [u16; 4] = unsafe { core::mem::transmute(h.icmp) };
        sum = checksum::sum_words(sum, &hw);
    } else {
        let mtu = if mtu < V4_MTU_MIN { V4_MTU_MIN } else { mtu };
        let mtu = if mtu > 0xffff { 0xffff } else { mtu };
        let h: *mut V4Error = f.ptr_at(t.l3off)?;
        // SAFETY: bounds-checked.
        let h = unsafe { &mut *h };
        h.ip = Ipv4Hdr {
            version_ihl: 0x45,
            tos: 0xc0,
            tot_len: ((hdr + q) as u16).to_be(),
            id: 0,
            frag: 0,
            ttl: 64,
            proto: PROTO_ICMP,
            csum: 0,
            src: v4_of(&src),
            dst: v4_of(&dst),
        };
        // SAFETY: Ipv4Hdr is 20 bytes of plain data.
        let hw: [u16; 10] = unsafe { core::mem::transmute(h.ip) };
        h.ip.csum = !checksum::fold(checksum::sum_words(0, &hw));
        h.icmp = IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            csum: 0,
            rest: [0, u16::from_ne_bytes((mtu as u16).to_be_bytes())],
        };
        // SAFETY: IcmpHdr is 8 bytes of plain data.
        let iw: [u16; 4] = unsafe { core::mem::transmute(h.icmp) };
        sum = checksum::sum_words(0, &iw);
    }
    let quote = f.sum(t.l3off + hdr, q)?;
    let csum = !checksum::fold(checksum::fold(sum) as u32 + checksum::fold(quote) as u32);
    // A fresh bounds check after the checksum helper calls.
    if t.v6 {
        let h: *mut V6Error = f.ptr_at(t.l3off)?;
        // SAFETY: bounds-checked.
        unsafe { (*h).icmp.csum = csum };
    } else {
        let h: *mut V4Error = f.ptr_at(t.l3off)?;
        // SAFETY: bounds-checked.
        unsafe { (*h).icmp.csum = csum };
    }
    Ok(())
}

/// IPv4 and ICMP headers of a built error.
#[repr(C)]
#[derive(Clone, Copy)]
struct V4Error {
    ip: Ipv4Hdr,
    icmp: IcmpHdr,
}

/// IPv6 and ICMPv6 headers of a built error.
#[repr(C)]
#[derive(Clone, Copy)]
struct V6Error {
    ip: Ipv6Hdr,
    icmp: IcmpHdr,
}

/// A per-CPU token bucket kept as time credit: each answer costs `1 / rate` seconds of
/// credit, credit accrues with time up to `burst` answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Credit in nanoseconds.
    pub credit_ns: u64,
    /// Monotonic time of the last update, nanoseconds.
    pub last_ns: u64,
}

impl TokenBucket {
    /// Takes one token at `now_ns` if there is one. `rate` per second, at most `burst` at once.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, rate: u64, burst: u64) -> bool {
        if rate == 0 {
            return false;
        }
        let cost = 1_000_000_000 / rate;
        let cap = cost * burst;
        let elapsed = now_ns.saturating_sub(self.last_ns);
        self.last_ns = now_ns;
        let credit = self.credit_ns.saturating_add(elapsed);
        self.credit_ns = if credit > cap { cap } else { credit };
        if self.credit_ns < cost {
            return false;
        }
        self.credit_ns -= cost;
        true
    }
}

#[cfg(test)]
mod tests;
