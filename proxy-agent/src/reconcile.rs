//! Desired (from the model) vs programmed (what the maps hold): only the
//! differences are written, in an order that keeps every intermediate state
//! valid for a packet in flight:
//!
//! 1. frontends that are gone: slot 0 first (new packets stop matching), then
//!    their slots, then their name;
//! 2. for each new or changed frontend: new backends, then the slots that
//!    differ, then slot 0 with the new count, then the slots beyond it;
//! 3. backends no longer referenced by any slot.
//!
//! Existing backends keep their slot where possible, so a change to one
//! endpoint rewrites one slot, not the whole list. Ids (service and backend)
//! are read back from the pinned maps on start, so a restart reshuffles
//! nothing and conntrack entries (which hold backend ids) stay valid.
//!
//! A failed write marks the programmed view stale; the next sync re-reads the
//! maps and retries what is still different.
//!
//! A frontend that does not fit in a map is never programmed half: it is
//! programmed *closed* instead — slot 0 alone, no backends, no
//! drop-when-empty flag — so its traffic is rejected (ICMP port
//! unreachable, `ECONNREFUSED` on the socket path) rather than routed
//! untranslated to an address nobody serves. Closed frontends take one
//! service-map entry each from a reserve the others cannot use
//! ([`closed_reserve`]); the sync reports them (and `/healthz` fails) until a
//! later sync finds room for the whole frontend.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proxy_common::{
    backend::{BACKEND_F_LOCAL, BACKEND_MAP, BACKEND_MAX_ENTRIES, BACKEND6_MAP, Backend, Backend6},
    svc::{SVC_FLAG_DROP_WHEN_EMPTY, SVC_FLAG_POLICY_LOCAL, SVC_FLAG_SNAT_REMOTE, SVC_MAP, SVC_MAX_ENTRIES, SVC6_MAP, Svc6Key, SvcKey, SvcValue},
};

use crate::{
    datapath::{MapsDump, ServiceMaps},
    error::{Error, Result},
    model::{BackendAddr, Desired, Frontend, FrontendKey, Protocol},
};

/// A frontend as it is in the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgFrontend {
    svc_id: u32,
    flags: u16,
    /// Slot 0's affinity group and timeout.
    affinity_group: u32,
    affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` entries of this frontend's service id.
    ranges: BTreeSet<(Ipv4Addr, u8)>,
    /// Backend id of slot i + 1 (0 = slot missing in the map).
    slots: Vec<u32>,
    /// Slot numbers present in the map beyond `slots.len()`.
    stale_slots: Vec<u16>,
    name: Option<String>,
}

impl ProgFrontend {
    fn entries(&self) -> usize {
        1 + self.slots.len() + self.stale_slots.len()
    }
}

/// What the maps hold, indexed for diffing.
#[derive(Clone, Debug, Default)]
struct Programmed {
    frontends: BTreeMap<FrontendKey, ProgFrontend>,
    backend_ids: BTreeMap<(BackendAddr, Protocol), u32>,
    backends: BTreeMap<u32, BackendEntry>,
    /// Service-map keys that belong to no valid frontend.
    orphan_svc: Vec<SlotKey>,
    /// Names of service ids no frontend uses.
    orphan_names: Vec<u32>,
    /// Source ranges of service ids no frontend uses.
    orphan_ranges: Vec<(u32, Ipv4Addr, u8)>,
    /// Service-map entries per family (index [`fam`]): each family's map
    /// has its own capacity.
    svc_entries: [usize; 2],
    /// Backend-map entries per family.
    backend_entries: [usize; 2],
    next_svc_id: u32,
    next_backend_id: u32,
    /// How many slots reference each backend id.
    refs: BTreeMap<u32, u32>,
    /// Backend ids whose reference count reached 0 (deleted by
    /// `remove_unreferenced_backends` unless referenced again).
    unref: BTreeSet<u32>,
}

/// A key of the service map of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SlotKey {
    V4(SvcKey),
    V6(Svc6Key),
}

impl SlotKey {
    /// The same frontend's key of slot `slot`.
    fn with_slot(self, slot: u16) -> Self {
        match self {
            Self::V4(k) => Self::V4(SvcKey { backend_slot: slot, ..k }),
            Self::V6(k) => Self::V6(Svc6Key { backend_slot: slot, ..k }),
        }
    }

    fn slot(self) -> u16 {
        match self {
            Self::V4(k) => k.backend_slot,
            Self::V6(k) => k.backend_slot,
        }
    }

    /// The frontend, if the key is a valid one (known protocol, scope 0).
    fn frontend(self) -> Option<FrontendKey> {
        let (addr, port_be, proto, scope) = match self {
            Self::V4(k) => (IpAddr::V4(Ipv4Addr::from(u32::from_be(k.addr_be))), k.port_be, k.proto, k.scope),
            Self::V6(k) => (IpAddr::V6(Ipv6Addr::from(k.addr)), k.port_be, k.proto, k.scope),
        };
        (scope == 0).then_some(())?;
        Some(FrontendKey { addr, port: u16::from_be(port_be), protocol: Protocol::from_number(proto)? })
    }
}

/// The service-map key of slot `slot` of frontend `k`, in its family's map.
fn slot_key(k: FrontendKey, slot: u16) -> SlotKey {
    let (port_be, proto) = (k.port.to_be(), k.protocol.number());
    match k.addr {
        IpAddr::V4(a) => SlotKey::V4(SvcKey { addr_be: u32::from(a).to_be(), port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }),
        IpAddr::V6(a) => SlotKey::V6(Svc6Key { addr: a.octets(), port_be, backend_slot: slot, proto, scope: 0, _pad: [0; 2] }),
    }
}

/// The IPv4 service-map key of slot `slot` of frontend `k` (tests).
#[cfg(test)]
pub(crate) fn svc_key(k: FrontendKey, slot: u16) -> SvcKey {
    match slot_key(k, slot) {
        SlotKey::V4(k) => k,
        SlotKey::V6(_) => panic!("{k} is IPv6"),
    }
}

#[cfg(test)]
fn frontend_of(k: SvcKey) -> Option<FrontendKey> {
    SlotKey::V4(k).frontend()
}

/// A backend-map entry of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendEntry {
    V4(Backend),
    V6(Backend6),
}

impl BackendEntry {
    fn new(b: BackendAddr, proto: Protocol) -> Self {
        let (port_be, flags) = (b.port.to_be(), if b.local { BACKEND_F_LOCAL } else { 0 });
        match b.addr {
            IpAddr::V4(a) => Self::V4(Backend { addr_be: u32::from(a).to_be(), port_be, proto: proto.number(), flags }),
            IpAddr::V6(a) => Self::V6(Backend6 { addr: a.octets(), port_be, proto: proto.number(), flags }),
        }
    }
}

/// The model's key of a backend as stored in the map.
fn backend_key(b: BackendEntry) -> Option<(BackendAddr, Protocol)> {
    let (addr, port_be, proto, flags) = match b {
        BackendEntry::V4(b) => (IpAddr::V4(Ipv4Addr::from(u32::from_be(b.addr_be))), b.port_be, b.proto, b.flags),
        BackendEntry::V6(b) => (IpAddr::V6(Ipv6Addr::from(b.addr)), b.port_be, b.proto, b.flags),
    };
    let addr = BackendAddr { addr, port: u16::from_be(port_be), local: flags & BACKEND_F_LOCAL != 0 };
    Some((addr, Protocol::from_number(proto)?))
}

/// The index of `a`'s family in per-family counters: 0 IPv4, 1 IPv6.
fn fam(a: IpAddr) -> usize {
    usize::from(a.is_ipv6())
}

fn slot_u16(i: usize) -> u16 {
    u16::try_from(i).expect("slot numbers fit u16 (MAX_BACKENDS_PER_FRONTEND)")
}

impl Programmed {
    fn from_dump(d: MapsDump) -> Self {
        let mut p = Self {
            svc_entries: [d.svc.len(), d.svc6.len()],
            backend_entries: [d.backends.len(), d.backends6.len()],
            ..Self::default()
        };
        // Slot 0's key → slot → value, both families.
        let mut groups: BTreeMap<SlotKey, BTreeMap<u16, SvcValue>> = BTreeMap::new();
        let keys = d.svc.into_iter().map(|(k, v)| (SlotKey::V4(k), v)).chain(d.svc6.into_iter().map(|(k, v)| (SlotKey::V6(k), v)));
        for (k, v) in keys {
            groups.entry(k.with_slot(0)).or_default().insert(k.slot(), v);
        }
        let names: BTreeMap<u32, String> = d.names.into_iter().collect();
        let mut ranges: BTreeMap<u32, BTreeSet<(Ipv4Addr, u8)>> = BTreeMap::new();
        for (id, a, l) in d.ranges {
            ranges.entry(id).or_default().insert((a, l));
        }
        for (key0, slots) in groups {
            let (Some(fk), Some(head)) = (key0.frontend(), slots.get(&0)) else {
                p.orphan_svc.extend(slots.keys().map(|&s| key0.with_slot(s)));
                continue;
            };
            let count = head.count;
            let fe = ProgFrontend {
                svc_id: head.svc_id,
                flags: head.flags,
                affinity_group: head.backend_id,
                affinity_timeout_s: head.affinity_timeout_s,
                ranges: ranges.remove(&head.svc_id).unwrap_or_default(),
                slots: (1..=count).map(|s| slots.get(&s).map_or(0, |v| v.backend_id)).collect(),
                stale_slots: slots.keys().copied().filter(|&s| s > count).collect(),
                name: names.get(&head.svc_id).cloned(),
            };
            p.next_svc_id = p.next_svc_id.max(head.svc_id);
            p.frontends.insert(fk, fe);
        }
        let used: BTreeSet<u32> = p.frontends.values().map(|f| f.svc_id).collect();
        p.orphan_names = names.keys().copied().filter(|id| !used.contains(id)).collect();
        p.orphan_ranges = ranges.into_iter().flat_map(|(id, rs)| rs.into_iter().map(move |(a, l)| (id, a, l))).collect();
        let backends = d.backends.into_iter().map(|(id, b)| (id, BackendEntry::V4(b)));
        for (id, b) in backends.chain(d.backends6.into_iter().map(|(id, b)| (id, BackendEntry::V6(b)))) {
            p.next_backend_id = p.next_backend_id.max(id);
            p.backends.insert(id, b);
            if let Some(key) = backend_key(b) {
                // Two ids for one address (should not happen): keep the first;
                // the other is deleted once nothing references it.
                p.backend_ids.entry(key).or_insert(id);
            }
        }
        p.next_svc_id += 1;
        p.next_backend_id += 1;
        let slots: Vec<u32> = p.frontends.values().flat_map(|f| f.slots.iter().copied()).collect();
        p.add_refs(&slots);
        p.unref = p.backends.keys().copied().filter(|id| !p.refs.contains_key(id)).collect();
        p
    }

    fn add_refs(&mut self, slots: &[u32]) {
        for id in slots.iter().filter(|id| **id != 0) {
            *self.refs.entry(*id).or_default() += 1;
        }
    }

    fn drop_refs(&mut self, slots: &[u32]) {
        for id in slots.iter().filter(|id| **id != 0) {
            if let Some(n) = self.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(id);
                    self.unref.insert(*id);
                }
            }
        }
    }

    /// Sets (or removes) frontend `key`, keeping the entry count and the
    /// backends' reference counts.
    fn set_frontend(&mut self, key: FrontendKey, fe: Option<ProgFrontend>) {
        // (Entries counted from a dump may be fewer than `entries()` says
        // when a slot was missing: saturate, never underflow.)
        if let Some(fe) = fe {
            let n = &mut self.svc_entries[fam(key.addr)];
            *n += fe.entries();
            self.add_refs(&fe.slots);
            if let Some(old) = self.frontends.insert(key, fe) {
                let n = &mut self.svc_entries[fam(key.addr)];
                *n = n.saturating_sub(old.entries());
                self.drop_refs(&old.slots);
            }
        } else if let Some(old) = self.frontends.remove(&key) {
            let n = &mut self.svc_entries[fam(key.addr)];
            *n = n.saturating_sub(old.entries());
            self.drop_refs(&old.slots);
        }
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    /// Frontends that could not be (fully) programmed, and why.
    pub errors: Vec<(FrontendKey, Error)>,
    /// Errors outside any one frontend (cleanup of stale entries).
    pub other_errors: Vec<Error>,
    /// UDP backends (address, port) that left a frontend in this sync:
    /// connected UDP sockets translated to them are to be destroyed.
    pub removed_udp_backends: BTreeSet<(Ipv4Addr, u16)>,
    /// Frontends of `errors` that did not fit and are programmed closed
    /// (their traffic is rejected).
    pub closed: BTreeSet<FrontendKey>,
}

impl SyncReport {
    #[must_use]
    pub fn changed(&self) -> bool {
        self.writes + self.deletes > 0
    }
}

pub struct Reconciler<M: ServiceMaps> {
    maps: M,
    state: Programmed,
    stale: bool,
    svc_capacity: usize,
    /// Service-map entries only closed frontends may use.
    svc_reserve: usize,
    backend_capacity: usize,
    /// Frontends that did not fit at the last attempt: retried by every
    /// sync, partial ones included, so room made elsewhere is used.
    unfit: BTreeSet<FrontendKey>,
}

/// The service-map entries held back for closed frontends (one entry
/// each): 1/64 of the map (16,384 of the default 1,048,576 entries), at
/// least a quarter of a small map's first 64.
#[must_use]
pub fn closed_reserve(svc_capacity: usize) -> usize {
    (svc_capacity / 64).max(svc_capacity.min(64) / 4)
}

/// `fe` closed: slot 0 alone, answered with a reject.
fn closed(fe: &Frontend) -> Frontend {
    Frontend {
        backends: Vec::new(),
        drop_when_empty: false,
        policy_local: false,
        snat_remote: false,
        affinity_timeout_s: 0,
        source_ranges: None,
        ..fe.clone()
    }
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Adopts whatever the maps already hold (ids included).
    pub fn new(maps: M) -> Result<Self> {
        let state = Programmed::from_dump(maps.dump()?);
        Ok(Self {
            maps,
            state,
            stale: false,
            svc_capacity: SVC_MAX_ENTRIES as usize,
            svc_reserve: closed_reserve(SVC_MAX_ENTRIES as usize),
            backend_capacity: BACKEND_MAX_ENTRIES as usize,
            unfit: BTreeSet::new(),
        })
    }

    /// Sets the capacities checked before writing (the maps' real sizes,
    /// or smaller ones in tests), with no reserve for closed frontends.
    #[must_use]
    pub fn with_capacity(mut self, svc: usize, backends: usize) -> Self {
        self.svc_capacity = svc;
        self.svc_reserve = 0;
        self.backend_capacity = backends;
        self
    }

    /// Holds `entries` of the service map back for closed frontends.
    #[must_use]
    pub fn with_closed_reserve(mut self, entries: usize) -> Self {
        self.svc_reserve = entries.min(self.svc_capacity);
        self
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Entries and capacity of the service and backend maps, as programmed.
    #[must_use]
    pub fn occupancy(&self) -> std::collections::BTreeMap<&'static str, (u64, u64)> {
        [
            (SVC_MAP, (self.state.svc_entries[0] as u64, self.svc_capacity as u64)),
            (BACKEND_MAP, (self.state.backend_entries[0] as u64, self.backend_capacity as u64)),
            (SVC6_MAP, (self.state.svc_entries[1] as u64, self.svc_capacity as u64)),
            (BACKEND6_MAP, (self.state.backend_entries[1] as u64, self.backend_capacity as u64)),
        ]
        .into_iter()
        .collect()
    }

    /// Number of frontends currently programmed.
    #[must_use]
    pub fn programmed_frontends(&self) -> usize {
        self.state.frontends.len()
    }

    /// Brings the maps to `desired`, writing only differences.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        self.sync_inner(desired, None)
    }

    /// Brings the frontends `keys` (present in `desired` or gone from it)
    /// to `desired`, leaving every other frontend as it is: O(changed), for
    /// syncs that follow a few changes. Frontends that did not fit before
    /// are retried too.
    pub fn sync_keys(&mut self, desired: &Desired, keys: &BTreeSet<FrontendKey>) -> SyncReport {
        self.sync_inner(desired, Some(keys))
    }

    fn sync_inner(&mut self, desired: &Desired, keys: Option<&BTreeSet<FrontendKey>>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut keys = keys;
        if self.stale {
            match self.maps.dump() {
                Ok(d) => {
                    self.state = Programmed::from_dump(d);
                    self.stale = false;
                    // After a re-read everything is compared again.
                    keys = None;
                }
                Err(e) => {
                    report.other_errors.push(e);
                    return report;
                }
            }
        }
        self.remove_gone(desired, keys, &mut report);
        let open_limit = self.svc_capacity - self.svc_reserve;
        let mut unfit = Vec::new();
        let retry = std::mem::take(&mut self.unfit);
        let todo: Box<dyn Iterator<Item = (&FrontendKey, &Frontend)>> = match keys {
            None => Box::new(desired.frontends.iter()),
            Some(keys) => Box::new(
                keys.union(&retry).filter_map(|k| desired.frontends.get_key_value(k)),
            ),
        };
        for (key, fe) in todo {
            match self.program_frontend(*key, fe, open_limit, &mut report) {
                Ok(()) => {}
                Err(e @ Error::MapFull { .. }) => {
                    unfit.push(*key);
                    report.errors.push((*key, e));
                }
                Err(e) => {
                    self.stale = true;
                    report.errors.push((*key, e));
                }
            }
        }
        // After every frontend that fits, so closing one never takes the
        // room another needed.
        self.unfit = unfit.iter().copied().collect();
        for key in unfit {
            match self.program_frontend(key, &closed(&desired.frontends[&key]), self.svc_capacity, &mut report) {
                Ok(()) => {
                    report.closed.insert(key);
                }
                Err(Error::MapFull { .. }) => {}
                Err(e) => {
                    self.stale = true;
                    report.other_errors.push(e);
                }
            }
        }
        // Why: after a failed write the programmed view may miss slots that
        // were written (pointing at new backends); deleting "unreferenced"
        // backends now could leave such a slot dangling. The next sync
        // re-reads the maps and removes them safely.
        if !self.stale {
            self.remove_unreferenced_backends(&mut report);
        }
        report
    }

    fn remove_gone(&mut self, desired: &Desired, keys: Option<&BTreeSet<FrontendKey>>, report: &mut SyncReport) {
        let gone: Vec<FrontendKey> = match keys {
            None => self.state.frontends.keys().filter(|k| !desired.frontends.contains_key(k)).copied().collect(),
            Some(keys) => keys
                .iter()
                .filter(|k| self.state.frontends.contains_key(k) && !desired.frontends.contains_key(k))
                .copied()
                .collect(),
        };
        for key in gone {
            let fe = self.state.frontends[&key].clone();
            if key.protocol == Protocol::Udp {
                self.note_removed(&fe.slots, &[], report);
            }
            let res = (|| -> Result<()> {
                self.del_slot(slot_key(key, 0))?;
                report.deletes += 1;
                for s in (1..=fe.slots.len()).map(slot_u16).chain(fe.stale_slots.iter().copied()) {
                    self.del_slot(slot_key(key, s))?;
                    report.deletes += 1;
                }
                for r in &fe.ranges {
                    self.maps.delete_range(fe.svc_id, *r)?;
                    report.deletes += 1;
                }
                if fe.name.is_some() {
                    self.maps.delete_name(fe.svc_id)?;
                    report.deletes += 1;
                }
                Ok(())
            })();
            match res {
                Ok(()) => self.state.set_frontend(key, None),
                Err(e) => {
                    self.stale = true;
                    report.errors.push((key, e));
                }
            }
        }
        for k in std::mem::take(&mut self.state.orphan_svc) {
            match self.del_slot(k) {
                Ok(()) => {
                    report.deletes += 1;
                    let n = &mut self.state.svc_entries[usize::from(matches!(k, SlotKey::V6(_)))];
                    *n = n.saturating_sub(1);
                }
                Err(e) => {
                    self.stale = true;
                    report.other_errors.push(e);
                }
            }
        }
        for (id, a, l) in std::mem::take(&mut self.state.orphan_ranges) {
            match self.maps.delete_range(id, (a, l)) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    self.stale = true;
                    report.other_errors.push(e);
                }
            }
        }
        for id in std::mem::take(&mut self.state.orphan_names) {
            match self.maps.delete_name(id) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    self.stale = true;
                    report.other_errors.push(e);
                }
            }
        }
    }

    /// The slot layout for `wanted` ids that moves as few as possible from `cur`.
    fn plan_slots(cur: &[u32], wanted: &[u32]) -> Vec<u32> {
        let wanted_set: BTreeSet<u32> = wanted.iter().copied().collect();
        let mut slots: Vec<Option<u32>> = cur
            .iter()
            .map(|id| wanted_set.contains(id).then_some(*id))
            .collect();
        // An id twice in `cur` (should not happen) keeps its first slot only.
        let mut seen = BTreeSet::new();
        for s in &mut slots {
            if let Some(id) = *s
                && !seen.insert(id) {
                    *s = None;
                }
        }
        let mut fresh = wanted.iter().copied().filter(|id| !seen.contains(id));
        for s in &mut slots {
            if s.is_none() {
                *s = fresh.next();
            }
        }
        slots.extend(fresh.map(Some));
        // Compact: move entries from the tail into the remaining holes.
        let mut out: Vec<Option<u32>> = slots;
        let mut i = 0;
        while i < out.len() {
            if out[i].is_none() {
                while out.last() == Some(&None) {
                    out.pop();
                }
                if i < out.len() {
                    out[i] = out.pop().flatten();
                }
            }
            i += 1;
        }
        out.into_iter().flatten().collect()
    }

    #[expect(clippy::too_many_lines, reason = "one ordered sequence of writes; split up, the order would be harder to see")]
    fn program_frontend(&mut self, key: FrontendKey, fe: &Frontend, svc_limit: usize, report: &mut SyncReport) -> Result<()> {
        let proto = key.protocol;
        let cur = self.state.frontends.get(&key).cloned();
        // As the names map stores it (truncated), so an adopted name compares equal.
        let name = proxy_common::names::SvcName::new(&fe.display_name()).as_str().to_owned();
        // Capacity checks before any write: all or nothing.
        let new_backends: Vec<BackendAddr> = fe
            .backends
            .iter()
            .filter(|b| !self.state.backend_ids.contains_key(&(**b, proto)))
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let f = fam(key.addr);
        if self.state.backend_entries[f] + new_backends.len() > self.backend_capacity {
            return Err(Error::MapFull {
                map: [BACKEND_MAP, BACKEND6_MAP][f],
                capacity: u32::try_from(self.backend_capacity).unwrap_or(u32::MAX),
                what: format!("frontend {key} ({name})"),
            });
        }
        let need = 1 + fe.backends.len();
        let have = cur.as_ref().map_or(0, ProgFrontend::entries);
        if self.state.svc_entries[f] + need.saturating_sub(have) > svc_limit {
            return Err(Error::MapFull {
                map: [SVC_MAP, SVC6_MAP][f],
                capacity: u32::try_from(svc_limit).unwrap_or(u32::MAX),
                what: format!("frontend {key} ({name})"),
            });
        }
        // 1. Backends.
        for b in new_backends {
            let id = self.state.next_backend_id;
            let value = BackendEntry::new(b, proto);
            match value {
                BackendEntry::V4(v) => self.maps.write_backend(id, v)?,
                BackendEntry::V6(v) => self.maps.write_backend6(id, v)?,
            }
            report.writes += 1;
            self.state.next_backend_id += 1;
            self.state.backend_ids.insert((b, proto), id);
            self.state.backends.insert(id, value);
            self.state.backend_entries[f] += 1;
        }
        let wanted: Vec<u32> = fe.backends.iter().map(|b| self.state.backend_ids[&(*b, proto)]).collect();
        let cur_slots = cur.as_ref().map_or(&[][..], |c| c.slots.as_slice());
        if proto == Protocol::Udp {
            self.note_removed(cur_slots, &wanted, report);
        }
        let slots = Self::plan_slots(cur_slots, &wanted);
        let svc_id = if let Some(c) = &cur { c.svc_id } else {
            let id = self.state.next_svc_id;
            self.state.next_svc_id += 1;
            id
        };
        // Name before the frontend exists, so a reader never sees an unnamed id.
        if cur.as_ref().and_then(|c| c.name.as_deref()) != Some(name.as_str()) {
            self.maps.write_name(svc_id, &name)?;
            report.writes += 1;
        }
        // 2. Slots that differ.
        for (i, id) in slots.iter().enumerate() {
            if cur_slots.get(i) != Some(id) {
                let v = SvcValue { backend_id: *id, svc_id, ..SvcValue::default() };
                self.put_slot(slot_key(key, slot_u16(i + 1)), v)?;
                report.writes += 1;
            }
        }
        // Source ranges before slot 0 says to check them.
        let want_ranges: BTreeSet<(Ipv4Addr, u8)> = fe.source_ranges.iter().flatten().copied().collect();
        let cur_ranges = cur.as_ref().map(|c| c.ranges.clone()).unwrap_or_default();
        for r in want_ranges.difference(&cur_ranges) {
            self.maps.write_range(svc_id, *r)?;
            report.writes += 1;
        }
        // 3. Slot 0 with the count.
        let flags = fe.kind.flags()
            | if fe.source_ranges.is_some() { proxy_common::svc::SVC_FLAG_SOURCE_RANGES } else { 0 }
            | if fe.drop_when_empty { SVC_FLAG_DROP_WHEN_EMPTY } else { 0 }
            | if fe.snat_remote { SVC_FLAG_SNAT_REMOTE } else { 0 }
            | if fe.policy_local { SVC_FLAG_POLICY_LOCAL } else { 0 };
        let count = slot_u16(slots.len());
        let head_same = cur.as_ref().is_some_and(|c| {
            c.svc_id == svc_id
                && c.flags == flags
                && c.slots.len() == slots.len()
                && c.affinity_group == fe.affinity_group
                && c.affinity_timeout_s == fe.affinity_timeout_s
        });
        if !head_same {
            let v = SvcValue {
                backend_id: fe.affinity_group,
                count,
                flags,
                svc_id,
                affinity_timeout_s: fe.affinity_timeout_s,
            };
            self.put_slot(slot_key(key, 0), v)?;
            report.writes += 1;
        }
        // 4. Slots beyond the new count.
        let mut extra: Vec<u16> = (slots.len() + 1..=cur_slots.len()).map(slot_u16).collect();
        if let Some(c) = &cur {
            // Only leftovers beyond the new count: one within it was just
            // written above.
            extra.extend(c.stale_slots.iter().copied().filter(|&s| usize::from(s) > slots.len()));
        }
        for s in extra {
            self.del_slot(slot_key(key, s))?;
            report.deletes += 1;
        }
        // Ranges no longer wanted, after slot 0 stopped asking for them.
        for r in cur_ranges.difference(&want_ranges) {
            self.maps.delete_range(svc_id, *r)?;
            report.deletes += 1;
        }
        let prog = ProgFrontend {
            svc_id,
            flags,
            affinity_group: fe.affinity_group,
            affinity_timeout_s: fe.affinity_timeout_s,
            ranges: want_ranges,
            slots,
            stale_slots: Vec::new(),
            name: Some(name),
        };
        self.state.set_frontend(key, Some(prog));
        Ok(())
    }

    fn put_slot(&mut self, k: SlotKey, v: SvcValue) -> Result<()> {
        match k {
            SlotKey::V4(k) => self.maps.write_svc(k, v),
            SlotKey::V6(k) => self.maps.write_svc6(k, v),
        }
    }

    fn del_slot(&mut self, k: SlotKey) -> Result<()> {
        match k {
            SlotKey::V4(k) => self.maps.delete_svc(k),
            SlotKey::V6(k) => self.maps.delete_svc6(k),
        }
    }

    /// Records the backends of `before` that are not in `after`.
    fn note_removed(&self, before: &[u32], after: &[u32], report: &mut SyncReport) {
        for id in before.iter().filter(|id| !after.contains(id)) {
            // (Connected UDP sockets are destroyed for IPv4 backends only yet.)
            if let Some((BackendAddr { addr: IpAddr::V4(a), port, .. }, _)) = self.state.backends.get(id).and_then(|b| backend_key(*b)) {
                report.removed_udp_backends.insert((a, port));
            }
        }
    }

    fn remove_unreferenced_backends(&mut self, report: &mut SyncReport) {
        let unused: Vec<u32> = std::mem::take(&mut self.state.unref)
            .into_iter()
            .filter(|id| !self.state.refs.contains_key(id) && self.state.backends.contains_key(id))
            .collect();
        for id in unused {
            let res = match self.state.backends[&id] {
                BackendEntry::V4(_) => self.maps.delete_backend(id),
                BackendEntry::V6(_) => self.maps.delete_backend6(id),
            };
            match res {
                Ok(()) => {
                    report.deletes += 1;
                    let b = self.state.backends.remove(&id).expect("present");
                    let n = &mut self.state.backend_entries[usize::from(matches!(b, BackendEntry::V6(_)))];
                    *n = n.saturating_sub(1);
                    // The address this id stood for (only if it still maps to this id).
                    if let Some(key) = backend_key(b).filter(|k| self.state.backend_ids.get(k) == Some(&id)) {
                        self.state.backend_ids.remove(&key);
                    }
                }
                Err(e) => {
                    self.stale = true;
                    report.other_errors.push(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
