//! The TCP reset a refused segment's sender expects (RFC 9293 §3.10.7.1), built in place.

use core::mem::{size_of, transmute};

use balancer_common::PROTO_TCP;

use crate::{checksum, error::Error, frame::Frame, headers::*, parse::Pkt};

/// Turns the parsed TCP segment into its RST: addresses, ports and MACs swapped, options and
/// payload cut, checksums computed afresh.
#[inline(always)]
pub fn build_rst<F: Frame>(f: &mut F, p: &Pkt) -> Result<(), Error> {
    // Everything needed from the old headers, read before the tail moves.
    let tcp: *const TcpHdr = f.ptr_at(p.l4off)?;
    // SAFETY: bounds-checked.
    let (seq, ack, flags, doff) = unsafe { ((*tcp).seq, (*tcp).ack, (*tcp).flags, (*tcp).doff) };
    let ip_payload = if p.v6 {
        let ip: *const Ipv6Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        u16::from_be(unsafe { (*ip).payload_len }) as u32
    } else {
        let ip: *const Ipv4Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        (u16::from_be(unsafe { (*ip).tot_len }) as u32).wrapping_sub(20)
    };
    let seg_len = ip_payload.wrapping_sub(((doff >> 4) as u32) * 4)
        + (flags & TCP_SYN != 0) as u32
        + (flags & TCP_FIN != 0) as u32;
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, [0u16; 2], TCP_RST)
    } else {
        ([0u16; 2], seq_add(seq, seg_len), TCP_RST | TCP_ACK)
    };

    let want = p.l4off + size_of::<TcpHdr>();
    let have = f.len();
    if have > want {
        f.shrink(have - want)?;
    }

    let eth: *mut EthHdr = f.ptr_at(0)?;
    // SAFETY: bounds-checked.
    unsafe {
        let e = &mut *eth;
        core::mem::swap(&mut e.src, &mut e.dst);
    }
    let src = words(&p.key.dst);
    let dst = words(&p.key.src);
    let mut pseudo: u32;
    if p.v6 {
        let ip: *mut Ipv6Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        ip.vtc_flow = [u16::from_ne_bytes([0x60, 0]), 0];
        ip.payload_len = 20u16.to_be();
        ip.next_hdr = PROTO_TCP;
        ip.hop_limit = 64;
        ip.src = src;
        ip.dst = dst;
        pseudo = checksum::sum_words(0, &src);
        pseudo = checksum::sum_words(pseudo, &dst);
    } else {
        let ip: *mut Ipv4Hdr = f.ptr_at(p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        ip.version_ihl = 0x45;
        ip.tos = 0;
        ip.tot_len = 40u16.to_be();
        ip.id = 0;
        ip.frag = 0x4000u16.to_be();
        ip.ttl = 64;
        ip.proto = PROTO_TCP;
        ip.csum = 0;
        ip.src = v4_of(&src);
        ip.dst = v4_of(&dst);
        // SAFETY: Ipv4Hdr is 20 bytes of plain data.
        let hw: [u16; 10] = unsafe { transmute(*ip) };
        ip.csum = !checksum::fold(checksum::sum_words(0, &hw));
        pseudo = checksum::sum_words(0, &ip.src);
        pseudo = checksum::sum_words(pseudo, &ip.dst);
    }
    pseudo += checksum::be_word(PROTO_TCP as u16) as u32 + checksum::be_word(20) as u32;
    let tcp: *mut TcpHdr = f.ptr_at(p.l4off)?;
    // SAFETY: bounds-checked.
    let t = unsafe { &mut *tcp };
    let (sport, dport) = (t.dport, t.sport);
    *t = TcpHdr {
        sport,
        dport,
        seq: new_seq,
        ack: new_ack,
        doff: 5 << 4,
        flags: new_flags,
        window: 0,
        csum: 0,
        urg: 0,
    };
    // SAFETY: TcpHdr is 20 bytes of plain data.
    let tw: [u16; 10] = unsafe { transmute(*t) };
    t.csum = !checksum::fold(checksum::sum_words(pseudo, &tw));
    Ok(())
}
