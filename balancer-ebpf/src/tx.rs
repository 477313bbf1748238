//! Sending a packet of a flow: NAT rewrite (unless DSR), the flow's VLAN tag and next-hop
//! MACs, counters, and out of the flow's interface.

use balancer_common::{FLOW_F_DSR, Flow};
use balancer_ebpf::{
    error::{Error, Verdict},
    frame::Frame,
    headers::words,
    nat::{rewrite, set_macs},
    parse::Pkt,
    vlan::retag,
};

use crate::{
    maps::{BACKEND_STATS, SERVICE_STATS},
    stats::account,
    toobig,
    xdp::Xdp,
};

/// Rewrites (NAT) and sends a packet of a flow to the flow's cached next hop.
#[inline(always)]
pub fn transmit(x: &mut Xdp, p: &Pkt, flow: &Flow) -> Result<Verdict, Error> {
    // Too big for the egress link: answered by the entry, before anything is rewritten.
    if let Some(mtu) = toobig::exceeds(x, p, flow.ifindex, flow.mtu) {
        return Ok(Verdict::TooBig(mtu));
    }
    if flow.flags & FLOW_F_DSR == 0 {
        rewrite(
            x,
            p,
            &words(&flow.new_src),
            &words(&flow.new_dst),
            flow.new_sport,
            flow.new_dport,
        )?;
    }
    // The tag of the flow's VLAN (or none) on its interface; after the rewrite, whose
    // offsets it moves. The frame is changed already: a failure drops it.
    retag(x, p, flow.vlan).map_err(|_| Error::VlanResize)?;
    set_macs(x, flow.smac, flow.dmac)?;
    let len = x.len() as u64;
    account(&SERVICE_STATS, flow.service, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    account(&BACKEND_STATS, flow.backend, |c| {
        c.packets += 1;
        c.bytes += len;
    });
    if flow.ifindex == x.ingress() {
        return Ok(Verdict::Tx);
    }
    Ok(Verdict::Redirect(flow.ifindex))
}
