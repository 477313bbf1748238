//! Packets too big for their egress link: the route's MTU (from the FIB answer kept with the
//! flow's next hop) and the device MTU are checked for every packet above its family's
//! minimum MTU, and the sender gets "fragmentation needed" / "packet too big",
//! at most [`PTB_RATE`] a second per CPU.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
    helpers::generated::{bpf_check_mtu, bpf_ktime_get_ns},
};
use balancer_common::Reason;
use balancer_ebpf::{
    error::{Error, Verdict},
    frame::Frame,
    parse::Pkt,
    ptb,
};

use crate::{maps::PTB_BUCKETS, xdp::Xdp};

/// Answers per second per CPU.
pub const PTB_RATE: u64 = 200;
/// Answers at once per CPU.
pub const PTB_BURST: u64 = 50;

/// The MTU when the packet does not fit its flow's route (`route_mtu`, from the FIB; 0:
/// unknown) or the egress device `ifindex`, else `None`.
#[inline(always)]
pub fn exceeds(x: &Xdp, p: &Pkt, ifindex: u32, route_mtu: u32) -> Option<u32> {
    let ip_len = x.len().saturating_sub(p.l3off);
    if !ptb::needs_mtu_check(p.v6, ip_len) {
        return None;
    }
    // A route's `mtu` below the device's (a smaller link further on that the route knows).
    if route_mtu != 0 && ip_len as u32 > route_mtu {
        return Some(route_mtu);
    }
    // In: the packet's L3 length; out: the device MTU.
    let mut mtu = ip_len as u32;
    // SAFETY: helper call with a valid context and a stack slot.
    let rc = unsafe { bpf_check_mtu(x.ctx.as_ptr(), ifindex, &mut mtu, 0, 0) };
    if rc == BPF_MTU_CHK_RET_FRAG_NEEDED as i64 {
        return Some(mtu);
    }
    None
}

/// Turns the packet into the error for its sender, if the rate allows.
#[inline(always)]
pub fn answer(x: &mut Xdp, p: &Pkt, mtu: u32) -> Result<Verdict, Error> {
    let t = ptb::prepare(x, p)?;
    let Some(b) = PTB_BUCKETS.get_ptr_mut(0) else {
        return Err(Error::Map);
    };
    // SAFETY: per-CPU value, no concurrent writer.
    let b = unsafe { &mut *b };
    // SAFETY: plain helper call.
    if !b.take(unsafe { bpf_ktime_get_ns() }, PTB_RATE, PTB_BURST) {
        return Err(Error::TooBig);
    }
    // The frame is reshaped from here on: a failure drops it.
    ptb::build(x, &t, mtu).map_err(|_| Error::TooBig)?;
    Ok(Verdict::IcmpTx(Reason::TooBig))
}
