//! The next hop: `bpf_fib_lookup` for the rewritten packet, and a per-CPU cache of its answer
//! per backend so a burst of new flows does not ask the FIB for each.

use core::mem::{size_of, transmute, zeroed};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use balancer_common::{Backend, Flow, NEXTHOP_TTL_SECS, VlanPort};
use balancer_ebpf::{
    error::Error,
    headers::{v4_of, words},
    parse::Pkt,
};

use crate::{
    maps::{NEXTHOPS, VLAN_PORTS, VLANS},
    xdp::Xdp,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Fills a flow's next hop (egress interface and MACs) and its time (`nh_time`: the answer's,
/// so a flow revalidating it [`NEXTHOP_TTL_SECS`] later finds the cache stale too and asks
/// the FIB), from the backend's cached FIB answer when it is fresh and was made for the same
/// ingress. Nothing is written on failure.
#[inline(always)]
pub fn resolve(
    x: &Xdp,
    p: &Pkt,
    be_idx: u32,
    be: &Backend,
    flow: &mut Flow,
    now: u32,
) -> Result<(), Error> {
    let cached = match NEXTHOPS.get_ptr_mut(be_idx) {
        // SAFETY: per-CPU value, no concurrent writer.
        Some(nh) => unsafe { &mut *nh },
        None => return Err(Error::Map),
    };
    let ingress = x.ingress();
    if cached.ifindex != 0
        && cached.generation == be.generation
        && cached.ingress == ingress
        && cached.in_vid == p.vid
        && now.wrapping_sub(cached.time) < NEXTHOP_TTL_SECS
    {
        flow.ifindex = cached.ifindex;
        flow.smac = cached.smac;
        flow.dmac = cached.dmac;
        flow.mtu = cached.mtu;
        flow.vlan = cached.vlan;
        flow.nh_time = cached.time;
        return Ok(());
    }
    lookup(x, p, flow)?;
    flow.nh_time = now;
    cached.generation = be.generation;
    cached.ingress = ingress;
    cached.in_vid = p.vid;
    cached.time = now;
    cached.ifindex = flow.ifindex;
    cached.smac = flow.smac;
    cached.dmac = flow.dmac;
    cached.mtu = flow.mtu;
    cached.vlan = flow.vlan;
    Ok(())
}

/// The device the kernel would see a frame arrive on: a tagged frame's VLAN device when
/// there is one ([`VLAN_PORTS`]), else the interface itself. The FIB is asked as from it, so
/// rules on `iif`, a VRF and its forwarding setting apply as to the kernel's own forwarding.
#[inline(always)]
fn arrival_device(x: &Xdp, p: &Pkt) -> u32 {
    let ingress = x.ingress();
    if !p.vlan || p.vid == 0 {
        return ingress;
    }
    let port = VlanPort {
        parent: ingress,
        vid: p.vid,
        pad: 0,
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    match unsafe { VLAN_PORTS.get(&port) } {
        Some(v) => v.ifindex,
        None => ingress,
    }
}

/// Asks the FIB for the next hop towards `flow.new_dst`, and the route's MTU. An answer on a
/// VLAN device ([`VLANS`]) is its trunk and VLAN id. No neighbour yet: dropped (the sender
/// retries); no route: passed to the kernel untouched. Nothing is written on failure.
#[inline(always)]
pub fn lookup(x: &Xdp, p: &Pkt, flow: &mut Flow) -> Result<(), Error> {
    let src = words(&flow.new_src);
    let dst = words(&flow.new_dst);
    // SAFETY: plain C struct, all-zero is valid.
    let mut fib: bpf_fib_lookup = unsafe { zeroed() };
    fib.l4_protocol = p.key.proto;
    fib.ifindex = arrival_device(x, p);
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
            x.ctx.as_ptr(),
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        // A VLAN device cannot send an XDP frame: the frame leaves through its trunk with
        // the VLAN's tag.
        // SAFETY: map values stay valid for the whole program run (RCU).
        match unsafe { VLANS.get(&fib.ifindex) } {
            Some(v) => {
                flow.ifindex = v.parent;
                flow.vlan = v.vid;
            }
            None => {
                flow.ifindex = fib.ifindex;
                flow.vlan = 0;
            }
        }
        flow.smac = fib.smac;
        flow.dmac = fib.dmac;
        // With `tot_len` 0 nothing is too big; on success the kernel returns the route's
        // MTU in the same field (`mtu_result`): kept with the next hop, so each packet is
        // checked against it without another lookup.
        // SAFETY: reading a plain-data union field.
        flow.mtu = u32::from(unsafe { fib.__bindgen_anon_1.mtu_result });
        return Ok(());
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        return Err(Error::NoNeighbour);
    }
    Err(Error::NoRoute)
}
