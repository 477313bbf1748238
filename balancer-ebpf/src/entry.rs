//! The XDP entry: parse, dispatch, and the one place where an outcome becomes an XDP action
//! and a reason counter. The headers are rewritten only after the next hop is known, so a
//! packet that is passed to the kernel is always untouched.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_redirect, macros::xdp, programs::XdpContext,
};
use balancer_common::{FLOW_F_FORWARD, IFMAC_SLOTS, PROTO_TCP, PROTO_UDP, ServiceKey, VlanPort};
use balancer_ebpf::{
    error::{Error, Verdict},
    frame::Frame,
    headers::{
        ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_MF_OFFSET, Ipv4Hdr, Ipv6Hdr, VLAN_VID_MASK,
        VlanHdr,
    },
    parse::{PROTO_ICMP, PROTO_ICMPV6, Pkt, parse},
};

use crate::{
    flow,
    maps::{FLOWS, GLOBALS, IFMACS, IFMACS_HIGH, PORTS, SERVICES, VLAN_PORTS},
    related,
    stats::count,
    toobig,
    xdp::Xdp,
};

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    // Two paths, each its own BPF function, so their stack frames do not add up (the
    // verifier limits the frames of a call chain to 512 bytes together).
    // The destination MAC is checked only before a frame would be acted on (a VIP, a reply,
    // an ICMP error): anything else is passed, and the kernel drops another host's frames
    // itself, so the common non-VIP path does not pay for the lookup.
    let r = match triage(&ctx) {
        Triage::Quiet => Err(Error::NotVip),
        Triage::Icmp if not_for_us(&ctx) => Err(Error::NotForUs),
        Triage::Icmp => icmp_path(&ctx),
        Triage::Flow => match flow_path(&ctx) {
            Ok(Verdict::TooBig(mtu)) => too_big_path(&ctx, mtu),
            r => r,
        },
    };
    match r {
        Ok(v) => {
            count(v.reason());
            match v {
                Verdict::Tx | Verdict::Reset(_) | Verdict::IcmpTx(_) | Verdict::TooBig(_) => {
                    xdp_action::XDP_TX
                }
                // SAFETY: plain helper call.
                Verdict::Redirect(ifindex) | Verdict::IcmpRedirect(_, ifindex) => unsafe {
                    bpf_redirect(ifindex, 0) as u32
                },
            }
        }
        Err(e) => {
            if let Some(r) = e.reason() {
                count(r);
            }
            e.action()
        }
    }
}

/// Is the frame unicast to another MAC than the ingress interface's, or for a tagged frame
/// its VLAN device's (a switch flooded it to every port)? The kernel would drop it
/// (`PACKET_OTHERHOST`), so it must not be forwarded either. Broadcast and multicast frames
/// (I/G bit set) are not refused here, and nor is anything on an interface the controller
/// recorded no MAC for.
#[inline(never)]
fn not_for_us(ctx: &XdpContext) -> bool {
    let x = Xdp::new(ctx);
    let Ok(eth) = x.ptr_at::<EthHdr>(0) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let dst = unsafe { (*eth).dst };
    if dst[0] & 1 != 0 {
        return false;
    }
    let ifindex = x.ingress();
    // A tagged frame is for its VLAN device: that device's MAC (a tag without a device is
    // checked against the trunk's, below).
    // SAFETY (both reads): bounds-checked by ptr_at.
    if unsafe { (*eth).proto } == ETH_P_8021Q
        && let Ok(tag) = x.ptr_at::<VlanHdr>(size_of::<EthHdr>())
    {
        let port = VlanPort {
            parent: ifindex,
            vid: u16::from_be(unsafe { (*tag).tci }) & VLAN_VID_MASK,
            pad: 0,
        };
        // SAFETY: as below.
        if let Some(v) = unsafe { VLAN_PORTS.get(&port) } {
            return v.mac != dst;
        }
    }
    let m = if ifindex < IFMAC_SLOTS {
        IFMACS.get(ifindex)
    } else {
        // SAFETY: map values stay valid for the whole program run (RCU); an entry is
        // replaced whole.
        unsafe { IFMACS_HIGH.get(&ifindex) }
    };
    match m {
        // All-zero: no MAC recorded for the interface.
        Some(m) => m.mac != [0; 6] && m.mac != dst,
        None => false,
    }
}

/// What a frame's first headers say, read at fixed offsets with nothing on the stack.
enum Triage {
    /// ICMP (IPv4) or ICMPv6, as [`parse`] would find: the ICMP path.
    Icmp,
    /// TCP or UDP (IPv4 without options and not a fragment, or IPv6) to a destination port
    /// that no service uses and that is not a SNAT port (`BLB_PORTS`): not ours, passed
    /// unparsed (`pass_not_vip`) without a service lookup.
    Quiet,
    /// Anything else: the flow path parses it.
    Flow,
}

#[inline(always)]
fn triage(ctx: &XdpContext) -> Triage {
    let x = Xdp::new(ctx);
    let Ok(eth) = x.ptr_at::<EthHdr>(0) else {
        return Triage::Flow;
    };
    // SAFETY (all reads): bounds-checked by ptr_at.
    let mut proto = unsafe { (*eth).proto };
    let mut l3 = size_of::<EthHdr>();
    if proto == ETH_P_8021Q {
        let Ok(tag) = x.ptr_at::<VlanHdr>(l3) else {
            return Triage::Flow;
        };
        proto = unsafe { (*tag).proto };
        l3 += size_of::<VlanHdr>();
    }
    let (l4proto, l4) = if proto == ETH_P_IP {
        let Ok(ip) = x.ptr_at::<Ipv4Hdr>(l3) else {
            return Triage::Flow;
        };
        let ip = unsafe { &*ip };
        if ip.proto == PROTO_ICMP {
            return Triage::Icmp;
        }
        if ip.version_ihl != 0x45 || ip.frag & IP_MF_OFFSET != 0 {
            return Triage::Flow;
        }
        (ip.proto, l3 + size_of::<Ipv4Hdr>())
    } else if proto == ETH_P_IPV6 {
        let Ok(ip) = x.ptr_at::<Ipv6Hdr>(l3) else {
            return Triage::Flow;
        };
        let next = unsafe { (*ip).next_hdr };
        if next == PROTO_ICMPV6 {
            return Triage::Icmp;
        }
        (next, l3 + size_of::<Ipv6Hdr>())
    } else {
        return Triage::Flow;
    };
    if l4proto != PROTO_TCP && l4proto != PROTO_UDP {
        return Triage::Flow;
    }
    // TCP and UDP both start with the source and destination ports.
    let Ok(ports) = x.ptr_at::<[u16; 2]>(l4) else {
        return Triage::Flow;
    };
    let dport = u16::from_be(unsafe { (*ports)[1] });
    match PORTS.get(u32::from(dport >> 6)) {
        Some(w) if *w & (1u64 << (dport & 63)) == 0 => Triage::Quiet,
        _ => Triage::Flow,
    }
}

/// ICMP: errors about a flow go with it.
#[inline(never)]
fn icmp_path(ctx: &XdpContext) -> Result<Verdict, Error> {
    let mut x = Xdp::new(ctx);
    // SAFETY: plain data (offsets, flags, addresses); all-zero is valid.
    let mut p: Pkt = unsafe { core::mem::zeroed() };
    parse_into(ctx, &mut p)?;
    if !p.icmp {
        return Err(Error::NotTcpUdp);
    }
    related::icmp(&mut x, &p)
}

/// A packet of a flow too big for its egress link (the flow path left it untouched): the
/// sender gets "fragmentation needed" / "packet too big", rate-limited.
#[inline(never)]
fn too_big_path(ctx: &XdpContext, mtu: u32) -> Result<Verdict, Error> {
    // Parsed again here (inlined: a call would add its frame to this one's).
    let mut x = Xdp::new(ctx);
    let p = parse(&x)?;
    toobig::answer(&mut x, &p, mtu)
}

/// [`parse`] as its own BPF function: its spills stay out of the ICMP path's frame.
#[inline(never)]
fn parse_into(ctx: &XdpContext, out: &mut Pkt) -> Result<(), Error> {
    // The context pointer goes through a volatile read, so the compiler cannot hoist the
    // loads of `data` / `data_end` into the caller and pass them as 32-bit arguments (the
    // verifier refuses arithmetic on such a pointer).
    let ctx = ctx as *const XdpContext;
    // SAFETY: reads a local; the pointer is the caller's valid reference.
    let ctx = unsafe { &*core::ptr::read_volatile(&ctx) };
    *out = parse(&Xdp::new(ctx))?;
    Ok(())
}

/// TCP and UDP: the flow table, new flows, replies.
#[inline(never)]
fn flow_path(ctx: &XdpContext) -> Result<Verdict, Error> {
    let mut x = Xdp::new(ctx);
    let x = &mut x;
    let p = parse(x)?;
    if p.icmp {
        return Err(Error::IcmpUnrelated);
    }
    let skey = ServiceKey {
        addr: p.key.dst,
        port: p.key.dport,
        proto: p.key.proto,
        pad: 0,
    };
    if let Some(svc) = SERVICES.get_ptr(&skey) {
        if not_for_us(ctx) {
            return Err(Error::NotForUs);
        }
        // SAFETY: map values stay valid for the whole program run (RCU); the controller
        // replaces a service by a whole-element update.
        return flow::forward(x, &p, unsafe { &*svc });
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
                if not_for_us(ctx) {
                    return Err(Error::NotForUs);
                }
                return flow::reverse(x, &p, f);
            }
        } else {
            return Err(Error::NoReplyFlow);
        }
    }
    Err(Error::NotVip)
}

/// A bare `XDP_PASS`: the baseline `balancer bench-xdp` measures beside the real program.
#[xdp]
pub fn pass_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
