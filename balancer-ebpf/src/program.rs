//! The packet path. Every read of packet memory is bounds-checked against `data_end` through
//! [`ptr_at`]; everything read from the packet is untrusted. The headers are rewritten only
//! after the next hop is known, so a packet that is passed to the kernel is always untouched.

use core::mem::{size_of, transmute, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup,
        xdp_action,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_tail},
    macros::xdp,
    programs::XdpContext,
};
use balancer_common::{
    BE_DOWN, BE_UP, Backend, CLOSING_REUSE_SECS, Counters, FLOW_F_CLOSING, FLOW_F_DSR,
    FLOW_F_FORWARD, FLOW_F_HALF_OPEN, FLOW_F_NEXTHOP, Flow, FlowKey, MIN_SNAT_PORTS, NO_BACKEND,
    PROTO_TCP, PROTO_UDP, RING_MAX, Reason, SVC_F_DOWN_DROP, SVC_F_DSR, Service, ServiceKey,
    flow_hash, reduce, ring_index, snat_first_port,
};
use balancer_ebpf::{checksum, headers::*};

use crate::maps::{
    BACKEND_STATS, BACKENDS, FLOWS, GLOBALS, NEXTHOPS, REASON_COUNTS, RINGS, SCRATCH,
    SERVICE_STATS, SERVICES,
};

const AF_INET: u8 = 2;
const MAX_HDR_OFFSET: usize = 128;
/// SNAT ports tried for a new flow.
const SNAT_PROBES: u32 = 16;
/// Seconds a backend's cached FIB answer is used for new flows.
const NEXTHOP_TTL_SECS: u32 = 5;
const AF_INET6: u8 = 10;

/// What the parser learnt of a packet.
struct Pkt {
    l3off: usize,
    l4off: usize,
    v6: bool,
    vlan: bool,
    tcp_flags: u8,
    key: FlowKey,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
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
    let skey = ServiceKey {
        addr: p.key.dst,
        port: p.key.dport,
        proto: p.key.proto,
        pad: 0,
    };
    if let Some(svc) = SERVICES.get_ptr(&skey) {
        // SAFETY: map values stay valid for the whole program run (RCU); the controller
        // replaces a service by a whole-element update.
        return forward(ctx, &p, unsafe { &*svc });
    }
    // A reply from a backend to one of our SNAT ports?
    let port = u16::from_be(p.key.dport);
    let in_range = match GLOBALS.get(0) {
        Some(g) => port >= g.snat_port_lo && port <= g.snat_port_hi && g.snat_port_hi != 0,
        None => false,
    };
    if in_range {
        if let Some(f) = FLOWS.get_ptr_mut(&p.key) {
            // SAFETY: as above; concurrent writers only store the same atime or a flag.
            let f = unsafe { &mut *f };
            if f.flags & FLOW_F_FORWARD == 0 {
                return reverse(ctx, &p, f);
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
    let (mut proto, src_mac, dst_mac) = unsafe { ((*eth).proto, (*eth).src, (*eth).dst) };
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
    Ok(Pkt {
        l3off,
        l4off,
        v6,
        vlan,
        tcp_flags,
        key,
        src_mac,
        dst_mac,
    })
}

#[inline(always)]
fn backend_live(idx: u32, generation: u32) -> bool {
    match BACKENDS.get(idx) {
        Some(b) => b.state != BE_DOWN && b.generation == generation,
        None => false,
    }
}

/// Client → VIP.
#[inline(always)]
fn forward(ctx: &XdpContext, p: &Pkt, svc: &Service) -> Result<u32, Reason> {
    if let Some(f) = FLOWS.get_ptr_mut(&p.key) {
        // SAFETY: valid for this run; read before any removal.
        let f = unsafe { &mut *f };
        if f.flags & FLOW_F_FORWARD != 0 {
            if backend_live(f.backend, f.generation) {
                touch(p, f);
                return transmit(ctx, p, f);
            }
            let backend = f.backend;
            let _ = FLOWS.remove(&p.key);
            // A fresh SYN on a reused client port is a new connection, not a packet of the
            // dead flow: it gets a live backend. Anything else of the dead flow is refused.
            if p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
                let dropping = svc.flags & SVC_F_DOWN_DROP != 0;
                return Ok(refuse(
                    ctx,
                    p,
                    svc.id,
                    Some(backend),
                    dropping,
                    Reason::ResetBackendDown,
                ));
            }
        }
    }
    match new_flow(ctx, p, svc) {
        Ok(f) => transmit(ctx, p, f),
        Err(v) => Ok(v),
    }
}

/// Backend → SNAT address: back to the client, from the VIP.
#[inline(always)]
fn reverse(ctx: &XdpContext, p: &Pkt, flow: &mut Flow) -> Result<u32, Reason> {
    if !backend_live(flow.backend, flow.generation) {
        // The client's side is reset by the forward path; the backend's packets stop here.
        count(Reason::DropBackendDown);
        account(&SERVICE_STATS, flow.service, |c| c.drops += 1);
        return Ok(xdp_action::XDP_DROP);
    }
    touch(p, flow);
    transmit(ctx, p, flow)
}

/// Monotonic seconds.
#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Records activity on a flow entry: the time (at most one write a second) and a FIN or RST.
#[inline(always)]
fn touch(p: &Pkt, f: &mut Flow) {
    let now = now_secs();
    if f.atime != now {
        f.atime = now;
    }
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 && f.flags & FLOW_F_CLOSING == 0 {
        f.flags |= FLOW_F_CLOSING;
    }
    // The client's first segment after its SYN: the handshake is done.
    if f.flags & FLOW_F_HALF_OPEN != 0 && p.tcp_flags & TCP_SYN == 0 {
        f.flags &= !FLOW_F_HALF_OPEN;
    }
}

/// May a new flow take the SNAT port of this reply entry? Only when its flow is over: closed
/// a moment ago, or idle past the protocol's timeout.
#[inline(always)]
fn reusable(e: &Flow, proto: u8, now: u32) -> bool {
    let idle = now.wrapping_sub(e.atime);
    if e.flags & FLOW_F_CLOSING != 0 && idle >= CLOSING_REUSE_SECS {
        return true;
    }
    let limit = match GLOBALS.get(0) {
        Some(g) if proto == PROTO_TCP => g.tcp_idle_secs,
        Some(g) => g.udp_idle_secs,
        None => return false,
    };
    limit != 0 && idle >= limit
}

/// Picks a backend from the ring and records the flow (both directions for NAT). The new
/// entries are built in per-CPU scratch space: the BPF stack is too small for them.
#[inline(always)]
fn new_flow(ctx: &XdpContext, p: &Pkt, svc: &Service) -> Result<&'static Flow, u32> {
    let h = flow_hash(&p.key, svc.seed);
    let size = if svc.ring_size > RING_MAX {
        RING_MAX
    } else {
        svc.ring_size
    };
    let slot = reduce(h, size);
    let i = ring_index(svc.id, svc.ring_half & 1, slot);
    let be_idx = match RINGS.get(i >> 1) {
        Some(pair) if svc.ring_size != 0 => pair[(i & 1) as usize],
        _ => NO_BACKEND,
    };
    let be: &Backend = match BACKENDS.get(be_idx) {
        Some(b) if be_idx != NO_BACKEND && b.state == BE_UP => b,
        _ => return Err(refuse(ctx, p, svc.id, None, false, Reason::NoBackend)),
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(xdp_action::XDP_PASS);
    };
    // SAFETY: per-CPU scratch, used by this run only.
    let scratch = unsafe { &mut *scratch };
    let nat = svc.flags & SVC_F_DSR == 0;
    let flow = &mut scratch.flow;
    flow.new_src = if nat { svc.snat_addr } else { p.key.src };
    flow.new_dst = be.addr;
    flow.new_sport = p.key.sport;
    flow.new_dport = if nat { be.port } else { p.key.dport };
    flow.flags = if nat {
        FLOW_F_FORWARD | FLOW_F_NEXTHOP
    } else {
        FLOW_F_FORWARD | FLOW_F_DSR | FLOW_F_NEXTHOP
    };
    if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        flow.flags |= FLOW_F_HALF_OPEN;
    }
    flow.backend = be_idx;
    flow.generation = be.generation;
    flow.service = svc.id;
    flow.atime = now_secs();
    // The next hop is resolved once per flow and kept in the flow entry; the FIB answer for a
    // backend is itself reused for a few seconds (per CPU).
    let now = flow.atime;
    let cached = match NEXTHOPS.get_ptr_mut(be_idx) {
        // SAFETY: per-CPU value, no concurrent writer.
        Some(nh) => unsafe { &mut *nh },
        None => return Err(xdp_action::XDP_PASS),
    };
    let ingress = ctx.ingress_ifindex() as u32;
    if cached.ifindex != 0
        && cached.generation == be.generation
        && cached.ingress == ingress
        && now.wrapping_sub(cached.time) < NEXTHOP_TTL_SECS
    {
        flow.ifindex = cached.ifindex;
        flow.smac = cached.smac;
        flow.dmac = cached.dmac;
    } else {
        if let Err(v) = next_hop(ctx, p, flow) {
            account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
            return Err(v);
        }
        cached.generation = be.generation;
        cached.ingress = ingress;
        cached.time = now;
        cached.ifindex = flow.ifindex;
        cached.smac = flow.smac;
        cached.dmac = flow.dmac;
    }
    if nat {
        let Some(port) = snat_port(
            ctx,
            p,
            svc,
            be,
            be_idx,
            h,
            &mut scratch.reply,
            &mut scratch.rkey,
            &mut scratch.okey,
        ) else {
            count(Reason::DropSnatExhausted);
            account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
            return Err(xdp_action::XDP_DROP);
        };
        scratch.flow.new_sport = port;
    }
    if FLOWS.insert(&p.key, &scratch.flow, BPF_ANY as u64).is_err() {
        count(Reason::DropFlowTable);
        return Err(xdp_action::XDP_DROP);
    }
    account(&SERVICE_STATS, svc.id, |c| c.new_flows += 1);
    account(&BACKEND_STATS, be_idx, |c| c.new_flows += 1);
    Ok(&scratch.flow)
}

/// Claims a SNAT port for a new NAT flow by inserting its reply entry. The first port tried
/// depends only on the 5-tuple, so a flow whose forward entry was evicted finds its own reply
/// entry again and keeps its port.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn snat_port(
    ctx: &XdpContext,
    p: &Pkt,
    svc: &Service,
    be: &Backend,
    be_idx: u32,
    h: u32,
    reply: &mut Flow,
    rkey: &mut FlowKey,
    okey: &mut FlowKey,
) -> Option<u16> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if hi < lo || lo == 0 {
        return None;
    }
    if hi < lo + MIN_SNAT_PORTS - 1 {
        return None;
    }
    let port = snat_first_port(h, lo as u16, hi as u16) as u32;
    // Replies go back the way the request came: to the MAC it came from, out of the interface
    // it came in on.
    reply.new_src = p.key.dst;
    reply.new_dst = p.key.src;
    reply.new_sport = p.key.dport;
    reply.new_dport = p.key.sport;
    reply.flags = FLOW_F_NEXTHOP;
    reply.backend = be_idx;
    reply.generation = be.generation;
    reply.service = svc.id;
    reply.ifindex = ctx.ingress_ifindex() as u32;
    reply.smac = p.dst_mac;
    reply.dmac = p.src_mac;
    let now = now_secs();
    reply.atime = now;
    rkey.src = be.addr;
    rkey.dst = svc.snat_addr;
    rkey.sport = be.port;
    rkey.proto = p.key.proto;
    rkey.pad = [0; 3];
    // A free port first; a port whose flow is over only when none of the probed ports is
    // free (its old flow's forward entry goes too, so a late packet of that flow cannot reach
    // the new one).
    let mut fallback: u32 = 0;
    let range = hi - lo + 1;
    let first = port - lo;
    for i in 0..SNAT_PROBES {
        // Triangular probing (first, +1, +3, +6, …): no primary clusters to run into.
        let mut off = first + i * (i + 1) / 2;
        if off >= range {
            off -= range;
        }
        let port = lo + off;
        rkey.dport = (port as u16).to_be();
        if FLOWS.insert(&*rkey, &*reply, BPF_NOEXIST as u64).is_ok() {
            return Some(rkey.dport);
        }
        if let Some(e) = FLOWS.get_ptr(&*rkey) {
            // SAFETY: valid for this run.
            let e = unsafe { &*e };
            let same_client = e.flags & FLOW_F_FORWARD == 0
                && e.new_dst == reply.new_dst
                && e.new_dport == reply.new_dport
                && e.new_src == reply.new_src
                && e.new_sport == reply.new_sport;
            if same_client {
                let _ = FLOWS.insert(&*rkey, &*reply, BPF_ANY as u64);
                return Some(rkey.dport);
            }
            if fallback == 0 && reusable(e, p.key.proto, now) {
                fallback = port;
            }
        }
    }
    if fallback == 0 {
        return None;
    }
    rkey.dport = (fallback as u16).to_be();
    if let Some(e) = FLOWS.get_ptr(&*rkey) {
        // SAFETY: valid for this run; copied into the scratch key before the delete.
        let e = unsafe { &*e };
        okey.src = e.new_dst;
        okey.dst = e.new_src;
        okey.sport = e.new_dport;
        okey.dport = e.new_sport;
        okey.proto = p.key.proto;
        okey.pad = [0; 3];
        let _ = FLOWS.remove(&*okey);
    }
    if FLOWS.insert(&*rkey, &*reply, BPF_ANY as u64).is_ok() {
        return Some(rkey.dport);
    }
    None
}

/// Asks the FIB for the next hop towards `dst`: (egress ifindex, source MAC, destination MAC),
/// or the verdict for a packet that cannot go (no neighbour yet: dropped, the sender retries;
/// no route: passed to the kernel untouched).
#[inline(always)]
fn next_hop(ctx: &XdpContext, p: &Pkt, flow: &mut Flow) -> Result<(), u32> {
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
        fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        flow.ifindex = fib.ifindex;
        flow.smac = fib.smac;
        flow.dmac = fib.dmac;
        return Ok(());
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        count(Reason::DropNoNeighbour);
        return Err(xdp_action::XDP_DROP);
    }
    count(Reason::PassNoRoute);
    Err(xdp_action::XDP_PASS)
}

/// Rewrites (NAT) and sends a packet of a flow to the flow's cached next hop.
#[inline(always)]
fn transmit(ctx: &XdpContext, p: &Pkt, flow: &Flow) -> Result<u32, Reason> {
    if flow.flags & FLOW_F_DSR == 0 {
        rewrite(
            ctx,
            p,
            &words(&flow.new_src),
            &words(&flow.new_dst),
            flow.new_sport,
            flow.new_dport,
        )?;
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked.
    unsafe {
        (*eth).dst = flow.dmac;
        (*eth).src = flow.smac;
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
    if p.vlan || flow.ifindex == ctx.ingress_ifindex() as u32 {
        count(Reason::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    count(Reason::Redirect);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(flow.ifindex, 0) } as u32)
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
    count(if reason == Reason::ResetBackendDown {
        Reason::DropBackendDown
    } else {
        reason
    });
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
