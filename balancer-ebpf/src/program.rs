//! The packet path. Every read of packet memory is bounds-checked against `data_end` through
//! [`ptr_at`]; everything read from the packet is untrusted. The headers are rewritten only
//! after the next hop is known, so a packet that is passed to the kernel is always untouched.

use core::mem::{size_of, transmute, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
        bpf_fib_lookup, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use balancer_common::{
    BE_DOWN, BE_UP, Backend, Counters, FLOW_F_DSR, FLOW_F_FORWARD, Flow, FlowKey, NO_BACKEND,
    PROTO_TCP, PROTO_UDP, RING_MAX, Reason, SVC_F_DOWN_DROP, SVC_F_DSR, Service, ServiceKey,
    flow_hash, reduce, ring_index,
};
use balancer_ebpf::{checksum, headers::*};

use crate::maps::{
    BACKEND_STATS, BACKENDS, FLOWS, GLOBALS, REASON_COUNTS, RINGS, SERVICE_STATS, SERVICES,
};

const AF_INET: u8 = 2;
const MAX_HDR_OFFSET: usize = 128;
const AF_INET6: u8 = 10;

/// What the parser learnt of a packet.
struct Pkt {
    l3off: usize,
    l4off: usize,
    v6: bool,
    vlan: bool,
    tcp_flags: u8,
    key: FlowKey,
}

/// A new flow's backend, or the verdict already given to the packet.
enum Pick {
    Flow(Flow),
    Verdict(u32),
}

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    match try_balance(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Header offsets are small; the explicit bound keeps the verifier's range of an offset that
    // went through the stack.
    if offset > MAX_HDR_OFFSET || start + offset + size_of::<T>() > end {
        return Err(Reason::PassTruncated);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn count(reason: Reason) {
    if let Some(c) = REASON_COUNTS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn account(stats: &aya_ebpf::maps::PerCpuArray<Counters>, idx: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = stats.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, no concurrent writer.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u16; 8] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { transmute(*a) }
}

#[inline(always)]
fn bytes(w: [u16; 8]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { transmute(w) }
}

#[inline(always)]
fn v4_of(w: &[u16; 8]) -> [u16; 2] {
    [w[6], w[7]]
}

fn try_balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let p = parse(ctx)?;
    let skey = ServiceKey { addr: p.key.dst, port: p.key.dport, proto: p.key.proto, pad: 0 };
    // SAFETY: the map value is copied out at once.
    if let Some(svc) = SERVICES.get_ptr(&skey) {
        let svc = unsafe { *svc };
        return forward(ctx, &p, &svc);
    }
    // A reply from a backend to one of our SNAT ports?
    let port = u16::from_be(p.key.dport);
    let in_range = match GLOBALS.get(0) {
        Some(g) => port >= g.snat_port_lo && port <= g.snat_port_hi && g.snat_port_hi != 0,
        None => false,
    };
    if in_range {
        if let Some(f) = FLOWS.get_ptr(&p.key) {
            // SAFETY: copied out at once; a concurrent update replaces the element (RCU).
            let f = unsafe { *f };
            if f.flags & FLOW_F_FORWARD == 0 {
                return reverse(ctx, &p, &f);
            }
        }
    }
    Err(Reason::PassNotVip)
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Pkt, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut l3off = size_of::<EthHdr>();
    // SAFETY (all header reads): bounds-checked by ptr_at.
    let mut proto = unsafe { (*eth).proto };
    let mut vlan = false;
    if proto == ETH_P_8021Q {
        let tag: *const VlanHdr = ptr_at(ctx, l3off)?;
        proto = unsafe { (*tag).proto };
        l3off += size_of::<VlanHdr>();
        vlan = true;
    }
    let mut key = FlowKey::default();
    let l4off;
    let v6;
    if proto == ETH_P_IP {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3off)?;
        let ip = unsafe { &*ip };
        if ip.version_ihl != 0x45 || ip.frag & IP_MF_OFFSET != 0 {
            return Err(Reason::PassUnsupportedIp);
        }
        key.proto = ip.proto;
        key.src = bytes(v4_mapped(ip.src));
        key.dst = bytes(v4_mapped(ip.dst));
        l4off = l3off + size_of::<Ipv4Hdr>();
        v6 = false;
    } else if proto == ETH_P_IPV6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l3off)?;
        let ip = unsafe { &*ip };
        if ip.vtc_flow[0] & u16::from_ne_bytes([0xf0, 0]) != u16::from_ne_bytes([0x60, 0]) {
            return Err(Reason::PassUnsupportedIp);
        }
        key.proto = ip.next_hdr;
        key.src = bytes(ip.src);
        key.dst = bytes(ip.dst);
        l4off = l3off + size_of::<Ipv6Hdr>();
        v6 = true;
    } else {
        return Err(Reason::PassNotIp);
    }
    let mut tcp_flags = 0;
    if key.proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4off)?;
        let tcp = unsafe { &*tcp };
        if tcp.doff >> 4 < 5 {
            return Err(Reason::PassTruncated);
        }
        key.sport = tcp.sport;
        key.dport = tcp.dport;
        tcp_flags = tcp.flags;
    } else if key.proto == PROTO_UDP {
        let udp: *const UdpHdr = ptr_at(ctx, l4off)?;
        let udp = unsafe { &*udp };
        key.sport = udp.sport;
        key.dport = udp.dport;
    } else {
        return Err(Reason::PassNotTcpUdp);
    }
    Ok(Pkt { l3off, l4off, v6, vlan, tcp_flags, key })
}

/// Client → VIP.
#[inline(always)]
fn forward(ctx: &XdpContext, p: &Pkt, svc: &Service) -> Result<u32, Reason> {
    let existing = FLOWS.get_ptr(&p.key).map(|f| unsafe { *f });
    let flow = match existing {
        Some(f) if f.flags & FLOW_F_FORWARD != 0 => {
            let live = match BACKENDS.get(f.backend) {
                Some(b) => b.state != BE_DOWN && b.generation == f.generation,
                None => false,
            };
            if !live {
                let _ = FLOWS.remove(&p.key);
                let dropping = svc.flags & SVC_F_DOWN_DROP != 0;
                return Ok(refuse(ctx, p, svc.id, Some(f.backend), dropping, Reason::ResetBackendDown));
            }
            f
        }
        _ => match new_flow(ctx, p, svc) {
            Pick::Flow(f) => f,
            Pick::Verdict(v) => return Ok(v),
        },
    };
    transmit(ctx, p, &flow)
}

/// Backend → SNAT address: back to the client, from the VIP.
#[inline(always)]
fn reverse(ctx: &XdpContext, p: &Pkt, flow: &Flow) -> Result<u32, Reason> {
    let live = match BACKENDS.get(flow.backend) {
        Some(b) => b.state != BE_DOWN && b.generation == flow.generation,
        None => false,
    };
    if !live {
        // The client's side is reset by the forward path; the backend's packets stop here.
        count(Reason::DropBackendDown);
        account(&SERVICE_STATS, flow.service, |c| c.drops += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    transmit(ctx, p, flow)
}

/// Picks a backend from the ring and records the flow (both directions for NAT).
#[inline(always)]
fn new_flow(ctx: &XdpContext, p: &Pkt, svc: &Service) -> Pick {
    let h = flow_hash(&p.key, svc.seed);
    let size = if svc.ring_size > RING_MAX { RING_MAX } else { svc.ring_size };
    let slot = reduce(h, size);
    let be_idx = match RINGS.get(ring_index(svc.id, svc.ring_half & 1, slot)) {
        Some(i) if svc.ring_size != 0 => *i,
        _ => NO_BACKEND,
    };
    let be: Backend = match BACKENDS.get(be_idx) {
        Some(b) if be_idx != NO_BACKEND && b.state == BE_UP => *b,
        _ => return Pick::Verdict(refuse(ctx, p, svc.id, None, false, Reason::NoBackend)),
    };
    let mut flow = Flow {
        new_src: p.key.src,
        new_dst: be.addr,
        new_sport: p.key.sport,
        new_dport: p.key.dport,
        flags: FLOW_F_FORWARD | FLOW_F_DSR,
        backend: be_idx,
        generation: be.generation,
        service: svc.id,
        pad: 0,
    };
    if svc.flags & SVC_F_DSR == 0 {
        let Some(port) = snat_port(p, svc, &be, be_idx, h) else {
            count(Reason::DropSnatExhausted);
            account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
            return Pick::Verdict(xdp_action::XDP_DROP);
        };
        flow.new_src = svc.snat_addr;
        flow.new_sport = port;
        flow.new_dport = be.port;
        flow.flags = FLOW_F_FORWARD;
    }
    if FLOWS.insert(&p.key, &flow, BPF_ANY as u64).is_err() {
        count(Reason::DropFlowTable);
        return Pick::Verdict(xdp_action::XDP_DROP);
    }
    account(&SERVICE_STATS, svc.id, |c| c.new_flows += 1);
    account(&BACKEND_STATS, be_idx, |c| c.new_flows += 1);
    Pick::Flow(flow)
}

/// Claims a SNAT port for a new NAT flow by inserting its reply entry. The first port tried
/// depends only on the 5-tuple, so a flow whose forward entry was evicted finds its own reply
/// entry again and keeps its port.
#[inline(always)]
fn snat_port(p: &Pkt, svc: &Service, be: &Backend, be_idx: u32, h: u32) -> Option<u16> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if hi < lo || lo == 0 {
        return None;
    }
    let range = hi - lo + 1;
    let mut port = lo + reduce(h.rotate_left(16) ^ 0x9e37_79b9, range);
    let reply = Flow {
        new_src: p.key.dst,
        new_dst: p.key.src,
        new_sport: p.key.dport,
        new_dport: p.key.sport,
        flags: 0,
        backend: be_idx,
        generation: be.generation,
        service: svc.id,
        pad: 0,
    };
    let mut rkey = FlowKey {
        src: be.addr,
        dst: svc.snat_addr,
        sport: be.port,
        dport: 0,
        proto: p.key.proto,
        pad: [0; 3],
    };
    for _ in 0..8 {
        rkey.dport = (port as u16).to_be();
        if FLOWS.insert(&rkey, &reply, BPF_NOEXIST as u64).is_ok() {
            return Some(rkey.dport);
        }
        if let Some(e) = FLOWS.get_ptr(&rkey) {
            // SAFETY: copied out at once.
            let e = unsafe { *e };
            if e.flags & FLOW_F_FORWARD == 0
                && e.new_dst == reply.new_dst
                && e.new_dport == reply.new_dport
                && e.new_src == reply.new_src
                && e.new_sport == reply.new_sport
            {
                let _ = FLOWS.insert(&rkey, &reply, BPF_ANY as u64);
                return Some(rkey.dport);
            }
        }
        port = if port >= hi { lo } else { port + 1 };
    }
    None
}

/// Resolves the next hop, then rewrites and sends. The packet is untouched until the FIB
/// answered, so a pass to the kernel never carries half-rewritten headers.
#[inline(always)]
fn transmit(ctx: &XdpContext, p: &Pkt, flow: &Flow) -> Result<u32, Reason> {
    let dsr = flow.flags & FLOW_F_DSR != 0;
    let src = words(&flow.new_src);
    let dst = words(&flow.new_dst);
    // SAFETY: plain C struct, all-zero is valid.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    fib.l4_protocol = p.key.proto;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: writing plain-data union fields.
    unsafe {
        if p.v6 {
            fib.family = AF_INET6;
            fib.__bindgen_anon_3.ipv6_src = transmute(src);
            fib.__bindgen_anon_4.ipv6_dst = transmute(dst);
        } else {
            fib.family = AF_INET;
            fib.__bindgen_anon_3.ipv4_src = transmute(v4_of(&src));
            fib.__bindgen_anon_4.ipv4_dst = transmute(v4_of(&dst));
        }
    }
    // SAFETY: helper call with a valid context and a stack buffer of the right size.
    let rc = unsafe {
        fib_lookup(ctx.as_ptr(), &mut fib, size_of::<bpf_fib_lookup>() as i32, 0)
    } as u32;
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        count(Reason::DropNoNeighbour);
        account(&SERVICE_STATS, flow.service, |c| c.drops += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Err(Reason::PassNoRoute);
    }
    if !dsr {
        rewrite(ctx, p, &src, &dst, flow.new_sport, flow.new_dport)?;
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked.
    unsafe {
        (*eth).dst = fib.dmac;
        (*eth).src = fib.smac;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    account(&SERVICE_STATS, flow.service, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    account(&BACKEND_STATS, flow.backend, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    // A tagged frame leaves on its trunk: the FIB answers with the VLAN device.
    if p.vlan || fib.ifindex == ctx.ingress_ifindex() as u32 {
        count(Reason::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    count(Reason::Redirect);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as u32)
}

/// Full NAT rewrite of addresses and ports with incremental checksum updates.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    p: &Pkt,
    src: &[u16; 8],
    dst: &[u16; 8],
    sport: u16,
    dport: u16,
) -> Result<(), Reason> {
    let mut l4diff;
    if p.v6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3off)?;
        // SAFETY: bounds-checked.
        let ip = unsafe { &mut *ip };
        l4diff = checksum::diff_words(0, &ip.src, src);
        l4diff = checksum::diff_words(l4diff, &ip.dst, dst);
        ip.src = *src;
        ip.dst = *dst;
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3off)?;
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
        let tcp: *mut TcpHdr = ptr_at(ctx, p.l4off)?;
        // SAFETY: bounds-checked.
        let tcp = unsafe { &mut *tcp };
        l4diff = checksum::diff16(l4diff, tcp.sport, sport);
        l4diff = checksum::diff16(l4diff, tcp.dport, dport);
        tcp.csum = checksum::apply(tcp.csum, l4diff);
        tcp.sport = sport;
        tcp.dport = dport;
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, p.l4off)?;
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

/// Refuses a packet of a service: a TCP reset built in place (so the client reconnects at
/// once), or a drop (UDP, an RST itself, or a service configured to drop).
#[inline(always)]
fn refuse(
    ctx: &XdpContext,
    p: &Pkt,
    svc: u32,
    backend: Option<u32>,
    drop: bool,
    reason: Reason,
) -> u32 {
    let can_reset = p.key.proto == PROTO_TCP && p.tcp_flags & TCP_RST == 0 && !drop;
    if can_reset && build_rst(ctx, p).is_ok() {
        count(reason);
        account(&SERVICE_STATS, svc, |c| c.resets += 1);
        if let Some(b) = backend {
            account(&BACKEND_STATS, b, |c| c.resets += 1);
        }
        return xdp_action::XDP_TX;
    }
    count(if reason == Reason::ResetBackendDown { Reason::DropBackendDown } else { reason });
    account(&SERVICE_STATS, svc, |c| c.drops += 1);
    xdp_action::XDP_DROP
}

/// Turns the TCP segment into the RST its sender expects (RFC 9293 §3.10.7.1): addresses,
/// ports and MACs swapped, options and payload cut, checksums computed afresh.
#[inline(always)]
fn build_rst(ctx: &XdpContext, p: &Pkt) -> Result<(), Reason> {
    // Everything needed from the old headers, read before the tail moves.
    let tcp: *const TcpHdr = ptr_at(ctx, p.l4off)?;
    // SAFETY: bounds-checked.
    let (seq, ack, flags, doff) = unsafe { ((*tcp).seq, (*tcp).ack, (*tcp).flags, (*tcp).doff) };
    let ip_payload = if p.v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, p.l3off)?;
        // SAFETY: bounds-checked.
        u16::from_be(unsafe { (*ip).payload_len }) as u32
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, p.l3off)?;
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
    let have = ctx.data_end() - ctx.data();
    if have > want {
        // SAFETY: helper call; all packet pointers are re-derived below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - want) as i32)) } != 0 {
            return Err(Reason::PassTruncated);
        }
    }

    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked.
    unsafe {
        let e = &mut *eth;
        core::mem::swap(&mut e.src, &mut e.dst);
    }
    let src = words(&p.key.dst);
    let dst = words(&p.key.src);
    let mut pseudo: u32;
    if p.v6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, p.l3off)?;
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
        let ip: *mut Ipv4Hdr = ptr_at(ctx, p.l3off)?;
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
    let tcp: *mut TcpHdr = ptr_at(ctx, p.l4off)?;
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

/// A bare `XDP_PASS`: the baseline `balancer bench-xdp` measures beside the real program.
#[xdp]
pub fn pass_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
