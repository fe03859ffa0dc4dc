//! Layout upgrades: the entries of a retired map layout carried into its
//! successor ([`crate::pins::LAYOUTS`]), so tracked flows survive an upgrade
//! that changes a layout, and the retired maps unpinned so they leak
//! nothing.
//!
//! The programs of the previous release keep running on the old maps until
//! the new programs replace them (links updated in place), so:
//! 1. [`copy_all`] after load (the new maps are created and pinned, the old
//!    ones still pinned): every entry of each retired map that has a
//!    [`Migration`] is converted and inserted into its successor (an entry
//!    already there is kept: `BPF_NOEXIST`);
//! 2. the new programs are attached;
//! 3. [`finish`]: copy again — the flows the old programs created between 1
//!    and 2 —, then unpin every retired map (the kernel frees it once the
//!    last program using it is gone).
//!
//! A packet of a flow created between 1 and 2 that reaches the new
//! programs before 3 finds no entry: a TCP segment is dropped and
//! retransmitted (the flow then continues on its backend); a UDP datagram
//! starts a flow of its own, which step 3 keeps. Entry changes the old
//! programs make between 1 and 3 (a refresh, a FIN seen) are not carried;
//! the entry times out as it would have.
use aya::maps::{HashMap, Map, MapData};
use proxy_common::ct::{CT_F_SEEN_REPLY, CtKey, CtValue};
use tracing::{info, warn};

use crate::{
    error::{Error, Result},
    pins::{Migration, Pins, retired_maps},
};

/// `BPF_NOEXIST`: insert only if the key is absent.
const NOEXIST: u64 = 1;

/// A conntrack value of the first releases' layout (`proxy_ct_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtValueV1 {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub flags: u8,
    pub pad: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValueV1>() == 24);
// SAFETY: repr(C), plain integers, no implicit padding (asserted size).
unsafe impl aya::Pod for CtValueV1 {}

impl CtValueV1 {
    /// In the current layout. v1 had one table and no SNAT: its flows go
    /// to the confirmed table, marked as having seen a reply.
    #[must_use]
    pub fn upgrade(self) -> CtValue {
        CtValue {
            nat_addr_be: self.nat_addr_be,
            nat_port_be: self.nat_port_be,
            flags: self.flags | CT_F_SEEN_REPLY,
            _pad: 0,
            snat_addr_be: 0,
            snat_port_be: 0,
            slot: 0,
            backend_id: self.backend_id,
            svc_id: self.svc_id,
            last_seen_ns: self.last_seen_ns,
            #[cfg(feature = "layout-next")]
            created_ns: self.last_seen_ns,
        }
    }
}

/// The shipped conntrack value (`proxy_ct_v2`, `proxy_ct_new_v1`), as the
/// test-only next layout retires it.
#[cfg(feature = "layout-next")]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtValueV2 {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub flags: u8,
    pub pad: u8,
    pub snat_addr_be: u32,
    pub snat_port_be: u16,
    pub slot: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub last_seen_ns: u64,
}
#[cfg(feature = "layout-next")]
const _: () = assert!(size_of::<CtValueV2>() == 32);
// SAFETY: repr(C), plain integers, no implicit padding (asserted size).
#[cfg(feature = "layout-next")]
unsafe impl aya::Pod for CtValueV2 {}

#[cfg(feature = "layout-next")]
impl CtValueV2 {
    fn upgrade(self) -> CtValue {
        CtValue {
            nat_addr_be: self.nat_addr_be,
            nat_port_be: self.nat_port_be,
            flags: self.flags,
            _pad: 0,
            snat_addr_be: self.snat_addr_be,
            snat_port_be: self.snat_port_be,
            slot: self.slot,
            backend_id: self.backend_id,
            svc_id: self.svc_id,
            last_seen_ns: self.last_seen_ns,
            created_ns: self.last_seen_ns,
        }
    }
}

fn map_err(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, op, source }
}

fn open<V: aya::Pod>(pins: &Pins, name: &'static str) -> Result<HashMap<MapData, CtKey, V>> {
    let data = MapData::from_pin(pins.map(name)).map_err(map_err(name, "open pinned map"))?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name, "open (layout)"))
}

/// Inserts `entries` into `to` unless present; returns how many were new.
fn insert_new(pins: &Pins, to: &'static str, entries: impl Iterator<Item = (CtKey, CtValue)>) -> Result<u64> {
    let mut map = open::<CtValue>(pins, to)?;
    let mut n = 0;
    for (k, v) in entries {
        match map.insert(k, v, NOEXIST) {
            Ok(()) => n += 1,
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(map_err(to, "insert migrated entry")(e)),
        }
    }
    Ok(n)
}

/// Copies one retired map's entries into `to`.
fn copy(pins: &Pins, from: &'static str, to: &'static str, m: Migration) -> Result<u64> {
    // An entry the kernel deletes between listing and reading is skipped.
    match m {
        Migration::CtV1 => {
            let old = open::<CtValueV1>(pins, from)?;
            insert_new(pins, to, old.iter().filter_map(std::result::Result::ok).map(|(k, v)| (k, v.upgrade())))
        }
        #[cfg(feature = "layout-next")]
        Migration::CtV2 => {
            let old = open::<CtValueV2>(pins, from)?;
            insert_new(pins, to, old.iter().filter_map(std::result::Result::ok).map(|(k, v)| (k, v.upgrade())))
        }
    }
}

/// Step 1: the entries of every pinned retired map with a migration,
/// copied into its successor. A failure is logged (the flows it held are
/// then lost, as without a migration); nothing else is affected.
pub fn copy_all(pins: &Pins) {
    for (layout, retired) in retired_maps() {
        let Some(m) = retired.migration.filter(|_| pins.map(retired.name).exists()) else {
            continue;
        };
        match copy(pins, retired.name, layout.name, m) {
            Ok(n) => info!(from = retired.name, to = layout.name, entries = n, "migrated the entries of a retired layout"),
            Err(e) => warn!(from = retired.name, to = layout.name, error = %e, "cannot migrate a retired layout; its entries are lost"),
        }
    }
}

/// Step 3, once the new programs are attached: entries created meanwhile
/// copied too, then every retired map unpinned.
pub fn finish(pins: &Pins) {
    for (layout, retired) in retired_maps() {
        let path = pins.map(retired.name);
        if !path.exists() {
            continue;
        }
        if let Some(m) = retired.migration {
            match copy(pins, retired.name, layout.name, m) {
                Ok(0) => {}
                Ok(n) => info!(from = retired.name, to = layout.name, entries = n, "migrated entries created during the swap"),
                Err(e) => warn!(from = retired.name, to = layout.name, error = %e, "cannot migrate a retired layout again"),
            }
        }
        match std::fs::remove_file(&path) {
            Ok(()) => info!(map = retired.name, "unpinned a map of a retired layout"),
            Err(e) => warn!(map = retired.name, error = %e, "cannot unpin a map of a retired layout"),
        }
    }
}
