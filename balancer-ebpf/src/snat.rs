//! SNAT port claims: a new NAT flow's address (of the service's pool) and port are claimed by
//! inserting its reply entry.

use aya_ebpf::bindings::BPF_NOEXIST;
use balancer_common::{
    Addr, Backend, CLOSING_REUSE_SECS, FLOW_F_CLOSING, FLOW_F_FORWARD, FLOW_F_HALF_OPEN,
    FLOW_F_NEXTHOP, Flow, FlowKey, HALF_OPEN_REUSE_SECS, MAX_SNAT_ADDRS, MIN_SNAT_PORTS,
    ORPHAN_GRACE_SECS, PROTO_TCP, Service, idle_secs, owns_reply, snat_first_port,
};
use balancer_ebpf::{
    error::Error,
    headers::{TCP_ACK, TCP_SYN},
    parse::Pkt,
};

use crate::{
    maps::{EXHAUSTED, FLOWS, GLOBALS, SCRATCH},
    xdp::Xdp,
};

/// What a NAT flow's forward hit found of its reply entry.
pub enum Pair {
    /// There, and the flow's own.
    Intact,
    /// Gone (evicted), put back.
    Restored,
    /// The port now belongs to another flow.
    Taken,
}

/// Checks that a NAT flow's reply entry is there and belongs to it. A missing one is put back
/// (`BPF_NOEXIST`: if another flow claimed the port meanwhile, the port is taken), so eviction
/// of one half of a flow cannot hand its port to another client.
#[inline(always)]
pub fn check_pair(x: &Xdp, p: &Pkt, f: &Flow, now: u32) -> Result<Pair, Error> {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Error::Map);
    };
    // SAFETY: per-CPU scratch, used by this run only.
    let scratch = unsafe { &mut *scratch };
    let rkey = &mut scratch.rkey;
    rkey.src = f.new_dst;
    rkey.dst = f.new_src;
    rkey.sport = f.new_dport;
    rkey.dport = f.new_sport;
    rkey.proto = p.key.proto;
    rkey.pad = [0; 3];
    if let Some(e) = FLOWS.get_ptr_mut(&*rkey) {
        // SAFETY: valid for this run; concurrent writers only clear the same flag.
        let e = unsafe { &mut *e };
        let ours = e.flags & FLOW_F_FORWARD == 0
            && e.new_dst == p.key.src
            && e.new_dport == p.key.sport
            && e.new_src == p.key.dst
            && e.new_sport == p.key.dport;
        if !ours {
            return Ok(Pair::Taken);
        }
        // The client's first segment after its SYN completes both halves.
        if e.flags & FLOW_F_HALF_OPEN != 0 && p.tcp_flags & TCP_SYN == 0 {
            e.flags &= !FLOW_F_HALF_OPEN;
        }
        // The way back is the way the client's packets come: taken from this packet when the
        // entry has none (installed by the controller), or when the client's MAC or ingress
        // changed (it moved, or its router did), as for a restored entry.
        let ingress = x.ingress();
        if e.flags & FLOW_F_NEXTHOP == 0
            || e.ifindex != ingress
            || e.vlan != p.vid
            || e.dmac != p.src_mac
            || e.smac != p.dst_mac
        {
            e.ifindex = ingress;
            e.vlan = p.vid;
            e.smac = p.dst_mac;
            e.dmac = p.src_mac;
            e.nh_time = now;
            e.mtu = 0;
            e.flags |= FLOW_F_NEXTHOP;
        }
        // Replies come in where the requests go out, on the same VLAN (that may have changed
        // with the forward next hop).
        if e.peer_ifindex != f.ifindex || e.peer_vlan != f.vlan {
            e.peer_ifindex = f.ifindex;
            e.peer_vlan = f.vlan;
        }
        return Ok(Pair::Intact);
    }
    let reply = &mut scratch.reply;
    reply.new_src = p.key.dst;
    reply.new_dst = p.key.src;
    reply.new_sport = p.key.dport;
    reply.new_dport = p.key.sport;
    // Still half-open only while the client has sent nothing but its SYN.
    let half = if p.tcp_flags & TCP_SYN != 0 {
        f.flags & FLOW_F_HALF_OPEN
    } else {
        0
    };
    reply.flags = FLOW_F_NEXTHOP | (f.flags & FLOW_F_CLOSING) | half;
    reply.backend = f.backend;
    reply.generation = f.generation;
    reply.service = f.service;
    reply.ifindex = x.ingress();
    reply.vlan = p.vid;
    reply.smac = p.dst_mac;
    reply.dmac = p.src_mac;
    reply.atime = now;
    reply.peer_ifindex = f.ifindex;
    reply.peer_vlan = f.vlan;
    reply.nh_time = now;
    // The way back came from the client's packet, not the FIB: the device MTU applies.
    reply.mtu = 0;
    if FLOWS.insert(&*rkey, &*reply, BPF_NOEXIST as u64).is_ok() {
        return Ok(Pair::Restored);
    }
    Ok(Pair::Taken)
}

/// 1 when the packet is a fresh SYN (the flow it makes is half-open), else 0.
#[inline(always)]
fn half_open_of(p: &Pkt) -> u32 {
    (p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) as u32
}

/// SNAT ports tried for a new flow.
const SNAT_PROBES: u32 = 16;
/// SNAT ports tried for a new flow to a backend whose ports were all held a moment ago.
const SHORT_PROBES: u32 = 4;

/// May a new flow take the SNAT port of this reply entry? Only when its flow is over: closed
/// a moment ago, or idle past the protocol's timeout.
#[inline(always)]
fn reusable(e: &Flow, proto: u8, now: u32) -> bool {
    let idle = idle_secs(now, e.atime);
    if e.flags & FLOW_F_CLOSING != 0 && idle >= CLOSING_REUSE_SECS {
        return true;
    }
    // A handshake that never completed (a SYN flood) holds its port only briefly.
    if e.flags & FLOW_F_HALF_OPEN != 0 && idle >= HALF_OPEN_REUSE_SECS {
        return true;
    }
    let limit = match GLOBALS.get(0) {
        Some(g) if proto == PROTO_TCP => g.tcp_idle_secs,
        Some(g) => g.udp_idle_secs,
        None => return false,
    };
    limit != 0 && idle >= limit
}

/// Is the reply entry `e` at `rkey` still its flow's? True when the client's forward entry is
/// there and uses this SNAT address and port. Leaves the forward key in `okey`.
#[inline(always)]
fn owned(e: &Flow, rkey: &FlowKey, okey: &mut FlowKey) -> bool {
    okey.src = e.new_dst;
    okey.dst = e.new_src;
    okey.sport = e.new_dport;
    okey.dport = e.new_sport;
    okey.proto = rkey.proto;
    okey.pad = [0; 3];
    // SAFETY: read within this run; the entry is replaced or removed whole.
    match unsafe { FLOWS.get(&*okey) } {
        Some(f) => owns_reply(f, rkey),
        None => false,
    }
}

/// `i` (below the pool size) as an index the verifier can bound: the compiler knows it is
/// below [`MAX_SNAT_ADDRS`] and drops the bounds check, but the verifier does not follow a
/// modulo, so the value goes through memory and a mask it can follow.
#[inline(always)]
pub fn pool_index(i: u32) -> u32 {
    // SAFETY: reads a local.
    let i = unsafe { core::ptr::read_volatile(&i) };
    i & (MAX_SNAT_ADDRS as u32 - 1)
}

/// Copies an address from a variable offset without a byte loop (LLVM turns a plain copy
/// of a 1-aligned array at an unknown offset into one, which the verifier then walks 16
/// times per probe).
#[inline(always)]
pub fn copy_addr(dst: &mut Addr, src: &Addr) {
    // SAFETY: both are 16 bytes; unaligned accesses are lowered to byte loads and stores.
    unsafe {
        let s = src.as_ptr() as *const u64;
        let d = dst.as_mut_ptr() as *mut u64;
        core::ptr::write_unaligned(d, core::ptr::read_unaligned(s));
        core::ptr::write_unaligned(d.add(1), core::ptr::read_unaligned(s.add(1)));
    }
}

/// A claimed SNAT port.
pub struct Claim {
    /// The port, network order (the address is `rkey.dst`).
    pub port: u16,
    /// The reply entry was inserted by this claim (a failed later step removes it again).
    pub inserted: bool,
}

/// Claims a SNAT port for a new NAT flow by inserting its reply entry. The first port tried
/// depends only on the 5-tuple, so a flow whose forward entry was evicted finds its own reply
/// entry again and keeps its port. A port is looked up before it is claimed, and every insert
/// is `BPF_NOEXIST`: of two CPUs claiming one port, one wins and the other probes on; a claim
/// never overwrites another flow's entry, and a held port costs a lookup, not an eviction.
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
    peer_ifindex: u32,
    peer_vlan: u16,
    reply: &mut Flow,
    rkey: &mut FlowKey,
    okey: &mut FlowKey,
) -> Option<Claim> {
    let lo = svc.snat_port_lo as u32;
    let hi = svc.snat_port_hi as u32;
    if hi < lo || lo == 0 {
        return None;
    }
    if hi < lo + MIN_SNAT_PORTS - 1 {
        return None;
    }
    let naddrs = svc.snat_addr_count;
    if naddrs == 0 || naddrs > MAX_SNAT_ADDRS as u32 {
        return None;
    }
    let port = snat_first_port(h, lo as u16, hi as u16) as u32;
    // The first address of the pool tried depends on the hash too (other bits than the
    // port's); each probe moves to the next address, so a pool of n addresses offers n
    // ports at every step of the port sequence.
    let first_addr = (h >> 24) % naddrs;
    // Replies go back the way the request came: to the MAC it came from, out of the interface
    // it came in on, with the tag it came with.
    reply.new_src = p.key.dst;
    reply.new_dst = p.key.src;
    reply.new_sport = p.key.dport;
    reply.new_dport = p.key.sport;
    reply.flags = FLOW_F_NEXTHOP | (half_open_of(p) * FLOW_F_HALF_OPEN);
    reply.backend = be_idx;
    reply.generation = be.generation;
    reply.service = svc.id;
    reply.ifindex = x.ingress();
    reply.vlan = p.vid;
    reply.smac = p.dst_mac;
    reply.dmac = p.src_mac;
    reply.atime = now;
    reply.peer_ifindex = peer_ifindex;
    reply.peer_vlan = peer_vlan;
    reply.nh_time = now;
    // The way back came from the client's packet, not the FIB: the device MTU applies.
    reply.mtu = 0;
    rkey.src = be.addr;
    rkey.sport = be.port;
    rkey.proto = p.key.proto;
    rkey.pad = [0; 3];
    // A free port first; a port whose flow is over only when none of the probed ports is
    // free (its old flow's forward entry goes too, so a late packet of that flow cannot reach
    // the new one).
    let mut fallback: u32 = 0;
    let mut fallback_addr: u32 = 0;
    let range = hi - lo + 1;
    let first = port - lo;
    // A backend whose ports were all found held by established flows on this CPU this second
    // or the last gets a short probe: while its flows last, new flows to it cost a few
    // lookups, not 16 cold ones, and ports that come free are found again a second later.
    // Half-open or closing holders (a SYN flood, churn) free their ports within seconds, so
    // a backend full of them is probed in full: that is how new clients find those ports.
    let memo = EXHAUSTED.get_ptr_mut(be_idx);
    // SAFETY (all uses of `memo`): per-CPU value, no concurrent writer.
    let short = memo.is_some_and(|m| unsafe { (*m).at != 0 && idle_secs(now, (*m).at) <= 1 });
    let unsettled = |on: u32| {
        if let Some(m) = memo {
            unsafe { core::ptr::write_volatile(&mut (*m).unsettled, on) };
        }
    };
    unsettled(0);
    // The first port is inserted at once, without a lookup: it is nearly always free (held
    // only on a collision in the backend's whole port space), and the lookup would walk the
    // bucket the insert walks anyway. Not for a backend found full a moment ago: there it
    // is nearly always held, and a failed LRU insert costs an eviction (below). When it is
    // held, the probe below finds it so.
    if !short {
        let Some(addr) = svc.snat_addrs.get(pool_index(first_addr) as usize) else {
            return None;
        };
        copy_addr(&mut rkey.dst, addr);
        rkey.dport = (port as u16).to_be();
        if FLOWS.insert(&*rkey, &*reply, BPF_NOEXIST as u64).is_ok() {
            return Some(Claim {
                port: rkey.dport,
                inserted: true,
            });
        }
    }
    for i in 0..SNAT_PROBES {
        if short && i >= SHORT_PROBES {
            break;
        }
        let a = pool_index((first_addr + i) % naddrs);
        let Some(addr) = svc.snat_addrs.get(a as usize) else {
            return None;
        };
        copy_addr(&mut rkey.dst, addr);
        // Triangular probing (first, +1, +3, +6, …) per address: no primary clusters to run
        // into.
        let step = i / naddrs;
        let mut off = first + step * (step + 1) / 2;
        if off >= range {
            off -= range;
        }
        let port = lo + off;
        rkey.dport = (port as u16).to_be();
        // Looked up first: an LRU insert takes a node (evicting the oldest entry when the
        // table is full) before it finds the key taken, so a failed insert of a held port
        // would cost an eviction, and would evict some other live flow.
        let held = FLOWS.get_ptr_mut(&*rkey);
        if held.is_none() {
            if FLOWS.insert(&*rkey, &*reply, BPF_NOEXIST as u64).is_ok() {
                return Some(Claim {
                    port: rkey.dport,
                    inserted: true,
                });
            }
            // Another CPU claimed it a moment ago.
            unsettled(1);
            continue;
        }
        if let Some(e) = held {
            // SAFETY: valid for this run.
            let e = unsafe { &mut *e };
            let same_client = e.flags & FLOW_F_FORWARD == 0
                && e.new_dst == reply.new_dst
                && e.new_dport == reply.new_dport
                && e.new_src == reply.new_src
                && e.new_sport == reply.new_sport;
            if same_client {
                // Our own entry (same client, same backend): brought up to date in place.
                e.backend = reply.backend;
                e.generation = reply.generation;
                e.service = reply.service;
                e.ifindex = reply.ifindex;
                e.vlan = reply.vlan;
                e.peer_vlan = reply.peer_vlan;
                e.smac = reply.smac;
                e.dmac = reply.dmac;
                e.flags = reply.flags;
                e.peer_ifindex = reply.peer_ifindex;
                e.nh_time = now;
                e.mtu = reply.mtu;
                e.atime = now;
                return Some(Claim {
                    port: rkey.dport,
                    inserted: false,
                });
            }
            // A port whose flow is over, or whose owner is gone (its forward entry was
            // evicted or expired, or its client's flow has another port now) for
            // ORPHAN_GRACE_SECS, is free at once.
            if fallback == 0
                && (reusable(e, p.key.proto, now)
                    || (idle_secs(now, e.atime) >= ORPHAN_GRACE_SECS && !owned(e, rkey, okey)))
            {
                fallback = port;
                fallback_addr = a;
            }
            if e.flags & (FLOW_F_HALF_OPEN | FLOW_F_CLOSING) != 0 {
                unsettled(1);
            }
        }
    }
    if fallback == 0 {
        // Only a full probe sets the memo, so it ends a second after the last full one.
        if let Some(m) = memo
            && !short
            && unsafe { core::ptr::read_volatile(&(*m).unsettled) } == 0
        {
            unsafe { (*m).at = now };
        }
        return None;
    }
    let Some(addr) = svc.snat_addrs.get(pool_index(fallback_addr) as usize) else {
        return None;
    };
    copy_addr(&mut rkey.dst, addr);
    rkey.dport = (fallback as u16).to_be();
    if let Some(e) = FLOWS.get_ptr(&*rkey) {
        // SAFETY: valid for this run; the keys are copied into scratch before the deletes.
        let e = unsafe { &*e };
        // The old flow's forward entry goes too, so a late packet of it cannot reach the
        // new flow; a forward entry of another flow of that client stays.
        if owned(e, rkey, okey) {
            let _ = FLOWS.remove(&*okey);
        }
        let _ = FLOWS.remove(&*rkey);
    }
    // Another CPU may take the freed port first: then this flow has none.
    if FLOWS.insert(&*rkey, &*reply, BPF_NOEXIST as u64).is_ok() {
        return Some(Claim {
            port: rkey.dport,
            inserted: true,
        });
    }
    None
}
