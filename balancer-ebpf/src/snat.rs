//! SNAT port claims: a new NAT flow's port is claimed by inserting its reply entry.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use balancer_common::{
    Backend, CLOSING_REUSE_SECS, FLOW_F_CLOSING, FLOW_F_FORWARD, FLOW_F_NEXTHOP, Flow, FlowKey,
    MIN_SNAT_PORTS, PROTO_TCP, Service, snat_first_port,
};
use balancer_ebpf::parse::Pkt;

use crate::{
    maps::{FLOWS, GLOBALS},
    xdp::Xdp,
};

/// SNAT ports tried for a new flow.
const SNAT_PROBES: u32 = 16;

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

/// Claims a SNAT port for a new NAT flow by inserting its reply entry. The first port tried
/// depends only on the 5-tuple, so a flow whose forward entry was evicted finds its own reply
/// entry again and keeps its port.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn claim(
    x: &Xdp,
    p: &Pkt,
    svc: &Service,
    be: &Backend,
    be_idx: u32,
    h: u32,
    now: u32,
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
    reply.ifindex = x.ingress();
    reply.smac = p.dst_mac;
    reply.dmac = p.src_mac;
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
