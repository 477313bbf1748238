//! The XDP entry: parse, dispatch, and the one place where an outcome becomes an XDP action
//! and a reason counter. The headers are rewritten only after the next hop is known, so a
//! packet that is passed to the kernel is always untouched.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_redirect, macros::xdp, programs::XdpContext,
};
use balancer_common::{FLOW_F_FORWARD, ServiceKey};
use balancer_ebpf::{
    error::{Error, Verdict},
    parse::parse,
};

use crate::{
    flow,
    maps::{FLOWS, GLOBALS, SERVICES},
    stats::count,
    xdp::Xdp,
};

#[xdp]
pub fn balancer(ctx: XdpContext) -> u32 {
    let mut x = Xdp::new(&ctx);
    match try_balancer(&mut x) {
        Ok(v) => {
            count(v.reason());
            match v {
                Verdict::Tx | Verdict::Reset(_) => xdp_action::XDP_TX,
                // SAFETY: plain helper call.
                Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
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

#[inline(always)]
fn try_balancer(x: &mut Xdp) -> Result<Verdict, Error> {
    let p = parse(x)?;
    if p.icmp {
        // ICMP is not balanced yet: errors about a flow go to the kernel untranslated.
        return Err(Error::NotTcpUdp);
    }
    let skey = ServiceKey {
        addr: p.key.dst,
        port: p.key.dport,
        proto: p.key.proto,
        pad: 0,
    };
    if let Some(svc) = SERVICES.get_ptr(&skey) {
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
                return flow::reverse(x, &p, f);
            }
        }
    }
    Err(Error::NotVip)
}

/// A bare `XDP_PASS`: the baseline `balancer bench-xdp` measures beside the real program.
#[xdp]
pub fn pass_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
