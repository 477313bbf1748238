//! The flow state machine: a client's packet to a VIP finds its flow or makes one (backend
//! from the Maglev ring, next hop, SNAT port for NAT); a backend's reply finds its NAT flow.
//! Flows of a down backend are refused.

use aya_ebpf::bindings::BPF_ANY;
use balancer_common::{
    BE_DOWN, BE_UP, Backend, FLOW_F_CLOSING, FLOW_F_DSR, FLOW_F_FORWARD, FLOW_F_HALF_OPEN,
    FLOW_F_NEXTHOP, Flow, NEXTHOP_TTL_SECS, NO_BACKEND, PROTO_TCP, RING_MAX, Reason,
    SVC_F_DOWN_DROP, SVC_F_DSR, Service, flow_hash, idle_secs, reduce, ring_index,
};
use balancer_ebpf::{
    error::{Error, Verdict},
    headers::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse::Pkt,
    rst::build_rst,
};

use crate::{
    fib,
    maps::{BACKEND_STATS, BACKENDS, FLOWS, RATES, RINGS, Rate, SCRATCH, SERVICE_STATS},
    mirror,
    snat::{self, Pair},
    stats::account,
    tx::transmit,
    xdp::Xdp,
};

/// Monotonic seconds.
#[inline(always)]
pub fn now_secs() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Is the flow's backend slot still the same backend, and not down?
#[inline(always)]
pub fn backend_live(idx: u32, generation: u32) -> bool {
    match BACKENDS.get(idx) {
        Some(b) => b.state != BE_DOWN && b.generation == generation,
        None => false,
    }
}

/// Client → VIP.
#[inline(always)]
pub fn forward(x: &mut Xdp, p: &Pkt, svc: &Service) -> Result<Verdict, Error> {
    // A TCP SYN asks for a new flow: past the service's new-flow limit it is dropped before
    // the flow table is read, so a flood costs a per-CPU array read per SYN, not a lookup
    // in a full table. (A retransmitted SYN of a flow made earlier is dropped too, and the
    // client tries again; every other packet of a flow is looked up as always.)
    let syn = p.key.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Read once per SYN: the same window decides here and, if no flow is found, in admit.
    let window = if syn { rate_window(svc) } else { None };
    if let Some(r) = &window
        && r.count >= svc.new_flow_rate
    {
        account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
        return Err(Error::RateLimited);
    }
    if let Some(f) = FLOWS.get_ptr_mut(&p.key) {
        // SAFETY: valid for this run; read before any removal.
        let f = unsafe { &mut *f };
        if f.flags & FLOW_F_FORWARD != 0 {
            let now = now_secs();
            let live = backend_live(f.backend, f.generation);
            // An entry installed by the controller (a mirrored flow of the other balancer)
            // has no next hop yet: resolved on its first packet, like a new flow's. A cached
            // one is revalidated once it is NEXTHOP_TTL_SECS old (a route or MAC changed).
            if live
                && (f.flags & FLOW_F_NEXTHOP == 0 || idle_secs(now, f.nh_time) >= NEXTHOP_TTL_SECS)
            {
                forward_nexthop(x, p, f, now)?;
            }
            // A NAT flow's reply entry must be its own: restored when lost, and when another
            // flow holds the port this flow ends (never two clients on one backend tuple).
            let paired = !live
                || f.flags & FLOW_F_DSR != 0
                || !matches!(snat::check_pair(x, p, f, now)?, Pair::Taken);
            if live && paired {
                // The client asks again: its first SYN went unanswered (passive health).
                if f.flags & FLOW_F_HALF_OPEN != 0 && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    account(&BACKEND_STATS, f.backend, |c| c.syn_retries += 1);
                }
                touch(p, f, now);
                return transmit(x, p, f);
            }
            let backend = f.backend;
            let _ = FLOWS.remove(&p.key);
            // A fresh SYN on a reused client port is a new connection, not a packet of the
            // old flow: it gets a new flow. Anything else of the old flow is refused.
            if p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
                if !live {
                    let dropping = svc.flags & SVC_F_DOWN_DROP != 0;
                    return refuse(x, p, svc.id, Some(backend), dropping, Refusal::BackendDown);
                }
                return refuse(x, p, svc.id, Some(backend), false, Refusal::PortTaken);
            }
        }
    }
    let window = if syn { window } else { rate_window(svc) };
    if !admit(svc, window) {
        account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
        return Err(Error::RateLimited);
    }
    let h = flow_hash(&p.key, svc.seed);
    let Some((be_idx, be)) = pick(svc, h) else {
        return refuse(x, p, svc.id, None, false, Refusal::NoBackend);
    };
    let f = new_flow(x, p, svc, be_idx, be, h)?;
    transmit(x, p, f)
}

/// Backend → SNAT address: back to the client, from the VIP.
#[inline(always)]
pub fn reverse(x: &mut Xdp, p: &Pkt, flow: &mut Flow) -> Result<Verdict, Error> {
    // Zero: installed by the controller; the first reply's interface and VLAN are learnt
    // below.
    if flow.peer_ifindex != 0 && (flow.peer_ifindex != x.ingress() || flow.peer_vlan != p.vid) {
        return Err(Error::WrongInterface);
    }
    if !backend_live(flow.backend, flow.generation) {
        // The client's side is reset by the forward path; the backend's packets stop here.
        account(&SERVICE_STATS, flow.service, |c| c.drops += 1);
        return Err(Error::BackendDown);
    }
    // Installed by the controller and no client packet seen yet: the way back to the client
    // from the FIB.
    if flow.flags & FLOW_F_NEXTHOP == 0 {
        if let Err(e) = fib::lookup(x, p, flow) {
            account(&SERVICE_STATS, flow.service, |c| c.drops += 1);
            return Err(e);
        }
        flow.nh_time = now_secs();
        flow.flags |= FLOW_F_NEXTHOP;
    }
    if flow.peer_ifindex == 0 {
        flow.peer_ifindex = x.ingress();
        flow.peer_vlan = p.vid;
    }
    // A backend's SYN-ACK retransmits do not keep a half-open flow alive.
    if flow.flags & FLOW_F_HALF_OPEN == 0 {
        touch(p, flow, now_secs());
    } else if p.tcp_flags & TCP_RST != 0 {
        // The backend refused a new flow (passive health).
        account(&BACKEND_STATS, flow.backend, |c| c.refused += 1);
    }
    transmit(x, p, flow)
}

/// Resolves a forward entry's next hop as for a new flow (the backend's cached FIB answer or
/// a lookup): for an entry that has none (installed by the controller; no neighbour yet:
/// dropped), or whose answer is [`NEXTHOP_TTL_SECS`] old. A revalidation that fails keeps
/// the old next hop (the flow keeps working as before) and tries again a TTL later.
#[inline(always)]
fn forward_nexthop(x: &Xdp, p: &Pkt, f: &mut Flow, now: u32) -> Result<(), Error> {
    let Some(be) = BACKENDS.get(f.backend) else {
        return Err(Error::Map);
    };
    match fib::resolve(x, p, f.backend, be, f, now) {
        Ok(()) => {
            if f.flags & FLOW_F_NEXTHOP == 0 {
                f.flags |= FLOW_F_NEXTHOP;
            }
            Ok(())
        }
        Err(e) if f.flags & FLOW_F_NEXTHOP == 0 => {
            account(&SERVICE_STATS, f.service, |c| c.drops += 1);
            Err(e)
        }
        Err(_) => {
            f.nh_time = now;
            Ok(())
        }
    }
}

/// The service's new-flow window on this CPU (one-second windows, begun again when the last
/// one is over); `None` when the service has no `new_flow_rate`.
#[inline(always)]
fn rate_window(svc: &Service) -> Option<&'static mut Rate> {
    if svc.new_flow_rate == 0 {
        return None;
    }
    let r = RATES.get_ptr_mut(svc.id)?;
    // SAFETY: per-CPU value, no concurrent writer.
    let r = unsafe { &mut *r };
    // SAFETY: plain helper call.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
    if now.wrapping_sub(r.start_ns) >= 1_000_000_000 {
        r.start_ns = now;
        r.count = 0;
    }
    Some(r)
}

/// The new-flow rate limit over the service's `window` ([`rate_window`]): false past
/// `new_flow_rate` new flows in it; counts the new flow otherwise. Checked when the flow
/// table has no flow for the packet, before the ring and the SNAT ports (a TCP SYN past the
/// limit is refused earlier still, before the flow lookup).
#[inline(always)]
fn admit(svc: &Service, window: Option<&mut Rate>) -> bool {
    let Some(r) = window else {
        return true;
    };
    if r.count >= svc.new_flow_rate {
        return false;
    }
    r.count += 1;
    true
}

/// Records activity on a flow entry: the time (at most one write a second) and a FIN or RST.
#[inline(always)]
fn touch(p: &Pkt, f: &mut Flow, now: u32) {
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

/// The live ring's backend for a flow hash, when it is up.
#[inline(always)]
fn pick(svc: &Service, h: u32) -> Option<(u32, &'static Backend)> {
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
    match BACKENDS.get(be_idx) {
        Some(b) if be_idx != NO_BACKEND && b.state == BE_UP => Some((be_idx, b)),
        _ => None,
    }
}

/// Records a new flow to backend `be_idx` (both directions for NAT). The new entries are
/// built in per-CPU scratch space: the BPF stack is too small for them.
#[inline(always)]
fn new_flow(
    x: &Xdp,
    p: &Pkt,
    svc: &Service,
    be_idx: u32,
    be: &Backend,
    h: u32,
) -> Result<&'static Flow, Error> {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Error::Map);
    };
    // SAFETY: per-CPU scratch, used by this run only.
    let scratch = unsafe { &mut *scratch };
    let nat = svc.flags & SVC_F_DSR == 0;
    let flow = &mut scratch.flow;
    // A NAT flow's source is the SNAT address its claim picks (below); the next hop is
    // looked up from the pool's first (it is cached per backend anyway).
    flow.new_src = if nat { svc.snat_addrs[0] } else { p.key.src };
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
    let now = now_secs();
    flow.atime = now;
    // The next hop is resolved once per flow and kept in the flow entry.
    if let Err(e) = fib::resolve(x, p, be_idx, be, flow, now) {
        account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
        return Err(e);
    }
    if nat {
        let Some(claim) = snat::claim(
            x,
            p,
            svc,
            be,
            be_idx,
            h,
            now,
            scratch.flow.ifindex,
            scratch.flow.vlan,
            &mut scratch.reply,
            &mut scratch.rkey,
            &mut scratch.okey,
        ) else {
            account(&SERVICE_STATS, svc.id, |c| c.drops += 1);
            return Err(Error::SnatExhausted);
        };
        // The claimed address and port are the reply key's destination.
        scratch.flow.new_src = scratch.rkey.dst;
        scratch.flow.new_sport = claim.port;
        if FLOWS.insert(&p.key, &scratch.flow, BPF_ANY as u64).is_err() {
            // Roll back: a reply entry without its forward entry would hold the port.
            if claim.inserted {
                let _ = FLOWS.remove(&scratch.rkey);
            }
            return Err(Error::FlowTable);
        }
    } else if FLOWS.insert(&p.key, &scratch.flow, BPF_ANY as u64).is_err() {
        return Err(Error::FlowTable);
    }
    account(&SERVICE_STATS, svc.id, |c| c.new_flows += 1);
    account(&BACKEND_STATS, be_idx, |c| c.new_flows += 1);
    if mirror::enabled() {
        mirror::report(&p.key, &scratch.flow);
    }
    Ok(&scratch.flow)
}

/// Why a packet of a service is refused.
#[derive(Clone, Copy)]
enum Refusal {
    /// The service has no live backend.
    NoBackend,
    /// The flow's backend is down.
    BackendDown,
    /// The flow's SNAT port belongs to another flow now.
    PortTaken,
}

/// Refuses a packet of a service: a TCP reset built in place (so the client reconnects at
/// once), or a drop (UDP, an RST itself, or a service configured to drop).
#[inline(always)]
fn refuse(
    x: &mut Xdp,
    p: &Pkt,
    svc: u32,
    backend: Option<u32>,
    drop: bool,
    why: Refusal,
) -> Result<Verdict, Error> {
    let can_reset = p.key.proto == PROTO_TCP && p.tcp_flags & TCP_RST == 0 && !drop;
    if can_reset && build_rst(x, p).is_ok() {
        account(&SERVICE_STATS, svc, |c| c.resets += 1);
        if let Some(b) = backend {
            account(&BACKEND_STATS, b, |c| c.resets += 1);
        }
        return Ok(Verdict::Reset(match why {
            Refusal::NoBackend => Reason::NoBackend,
            Refusal::BackendDown => Reason::ResetBackendDown,
            Refusal::PortTaken => Reason::PortTaken,
        }));
    }
    account(&SERVICE_STATS, svc, |c| c.drops += 1);
    Err(match why {
        Refusal::NoBackend => Error::NoBackend,
        Refusal::BackendDown => Error::BackendDown,
        Refusal::PortTaken => Error::PortTaken,
    })
}
