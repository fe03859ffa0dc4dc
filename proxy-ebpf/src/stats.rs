//! Exit-reason counters.
use crate::maps::STATS;

/// Counts one packet of `len` bytes under `reason` (`proxy_common::stats`).
#[inline(always)]
pub fn count(reason: u32, len: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}
