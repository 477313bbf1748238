//! Counters: verdict reasons (counted by the entry only) and per-service / per-backend traffic.

use aya_ebpf::maps::PerCpuArray;
use balancer_common::{Counters, Reason};

use crate::maps::REASON_COUNTS;

/// Bumps a verdict reason.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_COUNTS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *c += 1 };
    }
}

/// Updates a service's or backend's counters.
#[inline(always)]
pub fn account(stats: &PerCpuArray<Counters>, idx: u32, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = stats.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, no concurrent writer.
        f(unsafe { &mut *c });
    }
}
