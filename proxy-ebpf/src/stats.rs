//! Exit-reason counters, per address family (`proxy_common::stats`).
use proxy_common::stats::stats_slot;

use crate::{family::Family, maps::STATS};

/// Counts one packet of `len` bytes of family `F` under `reason`.
#[inline(always)]
pub fn count<F: Family>(reason: u32, len: u32) {
    count_in(F::STATS_FAMILY, reason, len);
}

/// Counts one packet of `len` bytes under (`family`, `reason`); for a
/// packet of no family (`FAMILY_OTHER`) or one whose family is a value.
#[inline(always)]
pub fn count_in(family: u32, reason: u32, len: u32) {
    if let Some(c) = STATS.get_ptr_mut(stats_slot(family, reason)) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}
