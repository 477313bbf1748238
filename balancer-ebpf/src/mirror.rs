//! Mirror events: while `Globals::mirror` is 1, every flow the program creates is reported
//! (its forward entry) through the `BLB_MIRROR` ring buffer, so the controller can stream it
//! to the standby balancer of an HA pair.

use core::ptr::addr_of_mut;

use balancer_common::{Flow, FlowKey, MirrorEvent};

use crate::maps::{GLOBALS, MIRROR, MIRROR_STATS};

/// Is mirroring on?
#[inline(always)]
pub fn enabled() -> bool {
    matches!(GLOBALS.get(0), Some(g) if g.mirror != 0)
}

/// Writes one event (counted; a full ring buffer loses it, counted as dropped).
#[inline(always)]
pub fn report(key: &FlowKey, flow: &Flow) {
    let Some(c) = MIRROR_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, no concurrent writer.
    let c = unsafe { &mut *c };
    match MIRROR.reserve::<MirrorEvent>(0) {
        Some(mut e) => {
            let ev = e.as_mut_ptr();
            // SAFETY: the reservation is a whole MirrorEvent, ours until submitted; written
            // field by field (no copy through the stack).
            unsafe {
                addr_of_mut!((*ev).key).write(*key);
                addr_of_mut!((*ev).flow).write(*flow);
            }
            e.submit(0);
            c.events += 1;
        }
        None => c.dropped += 1,
    }
}
