//! ICMP errors about balanced flows: the flow is found by the quoted packet, then the error
//! is translated (NAT) or forwarded as it is (DSR) with that flow's next hop.

use balancer_common::{FLOW_F_DSR, FLOW_F_NEXTHOP, Reason};
use balancer_ebpf::{
    error::{Error, Verdict},
    frame::Frame,
    icmp,
    nat::set_macs,
    parse::Pkt,
    vlan::retag,
};

use crate::{
    flow::backend_live,
    maps::{BACKEND_STATS, FLOWS, SERVICE_STATS},
    stats::account,
    xdp::Xdp,
};

/// An ICMP message (`parse` marked it): an error about a flow of a live backend goes with
/// that flow; anything else is passed untouched.
#[inline(always)]
pub fn icmp(x: &mut Xdp, p: &Pkt) -> Result<Verdict, Error> {
    let r = icmp::parse_error(x, p)?;
    let Some(f) = FLOWS.get_ptr(&r.key) else {
        return Err(Error::IcmpUnrelated);
    };
    // SAFETY: map values stay valid for the whole program run (RCU).
    let f = unsafe { &*f };
    // A flow installed by the controller whose first packet has not resolved its next hop
    // yet: passed (never sent with zero MACs).
    if !backend_live(f.backend, f.generation) || f.flags & FLOW_F_NEXTHOP == 0 {
        return Err(Error::IcmpUnrelated);
    }
    let reason = if f.flags & FLOW_F_DSR != 0 {
        Reason::IcmpDsr
    } else {
        icmp::translate(x, p, &r, f)?;
        Reason::IcmpNat
    };
    retag(x, p, f.vlan).map_err(|_| Error::VlanResize)?;
    set_macs(x, f.smac, f.dmac)?;
    let len = x.len() as u64;
    account(&SERVICE_STATS, f.service, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    account(&BACKEND_STATS, f.backend, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    if f.ifindex == x.ingress() {
        return Ok(Verdict::IcmpTx(reason));
    }
    Ok(Verdict::IcmpRedirect(reason, f.ifindex))
}
